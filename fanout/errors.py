"""Every exception fanout raises, shared by the native and the pure-Python code."""

from __future__ import annotations

__all__ = [
    "DistributorStopped",
    "FanoutError",
    "ListenerFull",
    "RingFull",
]


class FanoutError(Exception):
    """Base class of fanout's own exceptions: catch it to catch any of them."""


class RingFull(FanoutError):
    """A bounded ring has no room for a frame.

    Raised by ``FrameRing.append`` when the frame would take the bytes held past
    ``max_bytes``. A listener never lets it reach the producer: its ``overflow``
    policy decides instead.
    """


class ListenerFull(FanoutError):
    """A bounded listener has no room for a notification; nothing was distributed.

    Raised by ``Distributor.distribute`` when a listener with
    ``overflow="error"`` is full, or when a notification is larger than a
    listener's ``max_pending_bytes`` (whatever its policy). No listener received
    any part of that notification, so the call can simply be retried later.
    """


class DistributorStopped(FanoutError, RuntimeError):
    """The distributor was stopped; build a new one to go on.

    Raised by calls that need a live distributor (``add_listener``, ``start``,
    ``distribute``) once ``stop()`` has begun.
    """


def ring_full_message(frame_bytes: int, held: int, max_bytes: int) -> str:
    """Say why a frame did not fit and what to do; one text for both rings."""
    if frame_bytes > max_bytes:
        return (
            f"frame of {frame_bytes} bytes (header included) can never fit a ring "
            f"bounded to max_bytes={max_bytes}; raise max_bytes or send smaller frames"
        )
    return (
        f"ring full: {held} of max_bytes={max_bytes} bytes held, frame of {frame_bytes} "
        f"bytes does not fit; ack frames the reader has finished, or raise max_bytes"
    )
