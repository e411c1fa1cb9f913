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
    """Base class of fanout's own exceptions."""


class RingFull(FanoutError):
    """A bounded ring has no room for a frame (see ``FrameRing(max_bytes=...)``)."""


class RingClosed(FanoutError):
    """A ``FrameRing`` was closed (``FrameRing.close()``) and takes no more frames."""


class ListenerFull(FanoutError):
    """A listener with ``overflow="error"`` has no room; nothing was distributed."""


class DistributorStopped(FanoutError, RuntimeError):
    """The distributor was stopped; build a new one to go on."""


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
