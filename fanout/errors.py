"""Every exception fanout raises, shared by the native and the pure-Python code."""

from __future__ import annotations

__all__ = [
    "DistributorStopped",
    "FanoutError",
    "ListenerFull",
    "RingClosed",
    "RingFull",
    "WorkerStartError",
]


class FanoutError(Exception):
    """Base class of fanout's own exceptions: catch it to catch any of them."""


class RingFull(FanoutError):
    """A bounded ring has no room for a frame.

    Raised by ``FrameRing.append`` when the frame would take the bytes held past
    ``max_bytes``. A listener never lets it reach the producer: its ``overflow``
    policy decides instead.
    """


class RingClosed(FanoutError):
    """A ``FrameRing`` was closed (``FrameRing.close()``) and takes no more frames."""


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


class WorkerStartError(FanoutError, RuntimeError):
    """A listener's first worker could not start, for a reason retrying cannot fix.

    Raised by ``Distributor.start()``, or by ``add_listener`` on a running
    distributor, when the handler cannot be unpickled or imported in the worker,
    or its factory raised or returned something that is not a handler.

    Attributes:
        listener: the name of the listener whose worker failed.
        text: the worker's own account of the failure, with its traceback.
    """

    def __init__(self, listener: str, text: str) -> None:
        super().__init__(
            f"listener {listener!r}: its worker could not start, and retrying cannot "
            f"fix that:\n{text}"
        )
        self.listener = listener
        self.text = text


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
