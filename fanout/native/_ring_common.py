"""What both ring implementations share: the frame header and argument checks.

Keeping these in one pure-Python module is what makes the native rings and their
pure-Python twins raise the same exceptions with the same messages.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MIN_FRAME_CAPACITY",
    "RING_CLOSED_MESSAGE",
    "RING_GROW_FROM_ZERO",
    "check_ack",
    "check_fd",
    "check_pump_ring",
    "check_size",
    "check_words",
    "frame_length",
]

# A frame on the wire: payload length (u32) and sequence number (u64), little
# endian, then the payload. The sequence number lets a reader say which frame it
# has finished, which is how the writer knows what it may free.
HEADER = struct.Struct("<IQ")
HEADER_SIZE = HEADER.size
# A FrameRing that has to grow from (near) nothing starts at this many bytes.
MIN_FRAME_CAPACITY = 64
# An object Ring of capacity 0 grows to this many slots (k8s.io/utils buffer.Ring).
RING_GROW_FROM_ZERO = 16
MAX_PAYLOAD = 0xFFFFFFFF
RING_CLOSED_MESSAGE = "ring closed: it takes no more frames"


def check_size(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """Return ``value`` as a size, or raise naming the option and the bad value."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > MAX_SIZE:
        raise ValueError(f"{name} must be <= 2**62, got {value}")
    return value


def frame_length(frame: Any) -> int:
    """Return the payload length of a bytes-like ``frame``, or raise."""
    if type(frame) is bytes:  # what encoders make: contiguous, no view needed
        n = len(frame)
    else:
        try:
            view = memoryview(frame)
        except TypeError:
            raise TypeError(
                f"frame must be a bytes-like object (bytes, bytearray, memoryview), "
                f"not {type(frame).__name__}"
            ) from None
        with view:
            n = view.nbytes
            contiguous = view.c_contiguous
        if not contiguous:
            raise TypeError("frame must be a contiguous bytes-like object; copy it with bytes()")
    if n == 0:
        raise ValueError("frame is empty; a frame must hold at least one byte")
    if n > MAX_PAYLOAD:
        raise ValueError(f"frame of {n} bytes exceeds the 4 GiB frame limit")
    return n


MAX_SIZE = 1 << 62  # sizes beyond this are mistakes, not rings


def check_fd(fd: Any) -> int:
    """Return ``fd`` as a file descriptor number, or raise naming the bad value."""
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"fd must be an int file descriptor, not {type(fd).__name__} ({fd!r})")
    if not 0 <= fd < 1 << 31:
        raise ValueError(f"fd must be a file descriptor number >= 0, got {fd}")
    return fd


def check_pump_ring(ring: Any, frame_ring_type: type) -> None:
    """Raise unless ``ring`` is a FrameRing of the pump's own implementation."""
    if not isinstance(ring, frame_ring_type):
        raise TypeError(
            f"ring must be a {frame_ring_type.__module__}.FrameRing (the pump's own "
            f"implementation), not {type(ring).__module__}.{type(ring).__qualname__}"
        )


def check_words(words: Any, index: Any) -> memoryview:
    """Return a writable uint64 view of ``words`` that has ``index``, or raise."""
    try:
        view = memoryview(words).cast("B").cast("Q")
    except (TypeError, ValueError):
        raise TypeError(
            f"ack source must be a buffer of uint64 words (numpy uint64 array, "
            f"memoryview cast to 'Q'), not {type(words).__name__}"
        ) from None
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(view):
        raise ValueError(f"ack source index must be in range(0, {len(view)}), got {index!r}")
    return view


def check_ack(seq: Any, last_seq: int, sent_seq: int) -> int:
    """Validate an ``ack(seq)`` argument against what was appended and sent."""
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise TypeError(f"seq must be an int, not {type(seq).__name__}")
    if seq > last_seq:
        raise ValueError(f"cannot ack frame {seq}: the last frame appended is {last_seq}")
    if seq > sent_seq:
        raise ValueError(
            f"cannot ack frame {seq}: frames are sent up to {sent_seq} only; "
            f"a reader can only finish frames it was sent"
        )
    return seq
