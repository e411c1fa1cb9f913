"""Pure-Python rings: the reference twin of the native ``fanout.native._ring``.

Both modules have the same API, raise the same exceptions with the same messages
and pass the same tests; ``FANOUT_NO_EXTENSIONS=1`` makes fanout use this one.
As the native module is built from one file per concept, this one gathers them:
``FrameRing`` from ``_frame_ring_py``, ``Ring`` from ``_object_ring_py``, ``plain`` and
``pack_plain`` from ``_plain_py``, ``distribute``'s fast path (``Encoder``, ``Feed``) and
``append_all`` and ``default_key`` from ``_feed_py``; it keeps ``frame_span`` and
``slot_progress``.
"""

from __future__ import annotations

from typing import Any

from fanout.native._feed_py import Encoder, Feed, Router, append_all, default_key
from fanout.native._frame_ring_py import FrameRing
from fanout.native._object_ring_py import Ring
from fanout.native._plain_py import pack_plain, plain
from fanout.native._ring_common import HEADER, HEADER_SIZE
from fanout.wire.protocol import DONE, ERRORS, HANDLED, STARTED

__all__ = [
    "HEADER_SIZE",
    "NATIVE",
    "Encoder",
    "Feed",
    "FrameRing",
    "Ring",
    "Router",
    "append_all",
    "default_key",
    "frame_span",
    "pack_plain",
    "plain",
    "slot_progress",
]

NATIVE = False

# This module is their public home, as fanout.native._ring is the native ones':
# reprs and error messages (the pump's "ring must be a ...FrameRing") name it,
# whichever file holds the source.
for _cls in (FrameRing, Ring, plain, pack_plain, Encoder, Feed, Router, append_all, default_key):
    _cls.__module__ = __name__


def frame_span(buf: Any, budget: int, single: bool) -> tuple[int, int, int, int]:
    """Whole frames at the start of ``buf``: ``(end, first, last, count)``.

    Frames are taken while they fit in ``budget`` bytes (the first one always, so
    a frame larger than the budget still goes), and only one if ``single``.
    ``end``: the bytes they take; ``first`` / ``last``: their sequence numbers;
    ``count``: how many (0, and ``end`` 0, when ``buf`` holds no whole frame).
    """
    end = len(buf)
    pos = first = last = count = 0
    while end - pos >= HEADER_SIZE:
        length, seq = HEADER.unpack_from(buf, pos)
        stop = pos + HEADER_SIZE + length
        if stop > end or (count and stop > budget):
            break
        if count == 0:
            first = seq
        last = seq
        count += 1
        pos = stop
        if single:
            break
    return pos, first, last, count


def slot_progress(slot: Any) -> tuple[int, int, int, int]:
    """A worker's progress words ``(errors, handled, done, started)``, read in that order.

    The worker stores them in the opposite order (it counts an error before the
    call, the call before its frame is done), so calls finishing between these
    reads can only make a later word look newer, never an impossible state. Plain
    reads: the native twin reads with acquire ordering, for weakly ordered CPUs.
    ``slot``: the lane's progress slot, a buffer of uint64 words.
    """
    errors = int(slot[ERRORS])
    handled = int(slot[HANDLED])
    done = int(slot[DONE])
    return errors, handled, done, int(slot[STARTED])
