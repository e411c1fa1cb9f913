"""Every exception fanout raises, shared by the native and the pure-Python code."""

from __future__ import annotations

__all__ = [
    "DistributorStopped",
    "FanoutError",
    "ListenerFull",
    "RingFull",
]


class FanoutError(Exception):
    """Base class of fanout's own exceptions."""


class RingFull(FanoutError):
    """A bounded ring has no room for a frame (see ``FrameRing(max_bytes=...)``)."""


class ListenerFull(FanoutError):
    """A listener with ``overflow="error"`` has no room; nothing was distributed."""


class DistributorStopped(FanoutError, RuntimeError):
    """The distributor was stopped; build a new one to go on."""


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
