"""The arena's parts: its free list, a block and the copy into it, what one encode made.

The free list is a list of ``(offset, size)`` ranges sorted by offset, kept
coalesced; ``take`` and ``give`` run with the arena's lock held. An ``Encoding``
belongs to the one thread that encodes with it.
"""

from __future__ import annotations

import bisect
from typing import Any

from fanout.wire.dtypes import array_over

__all__ = ["ALIGN", "Block", "Encoding", "KeptPayload", "aligned", "copy_into", "give", "take"]

ALIGN = 64  # block alignment: any numpy dtype, and whole cache lines


def aligned(nbytes: int) -> int:
    """The size of the block ``nbytes`` take."""
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


def take(free: list[tuple[int, int]], need: int) -> int:
    """Cut ``need`` bytes from ``free``, first fit from the lowest offset; -1: no room.

    The lowest offset first keeps the pages the arena touches few.
    """
    for i, (off, size) in enumerate(free):
        if size >= need:
            if size == need:
                del free[i]
            else:
                free[i] = (off + need, size - need)
            return off
    return -1


def give(free: list[tuple[int, int]], off: int, size: int) -> None:
    """Put the range ``off``, ``size`` back into ``free``, merged with its neighbours."""
    i = bisect.bisect(free, (off, size))
    if i < len(free) and off + size == free[i][0]:  # merge with the next
        size += free[i][1]
        del free[i]
    if i > 0 and free[i - 1][0] + free[i - 1][1] == off:  # and the previous
        off, size = free[i - 1][0], free[i - 1][1] + size
        i -= 1
        del free[i]
    free.insert(i, (off, size))


class Encoding:
    """What the ``Arena.encode`` call running in one thread made: threads never mix."""

    __slots__ = ("error", "made", "refs", "room", "used")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the last encode (each thread reuses one: no allocation per call)."""
        self.made: list[int] = []  # block offsets, in the order made
        self.used = 0  # their bytes
        self.room = -1  # bytes the encode may take: the largest room a listener has
        # id(buffer) -> (buffer, reference or None): a buffer met twice takes one
        # block (and the object stays alive, so its id stays unique).
        self.refs: dict[int, tuple[Any, Any]] = {}
        self.error: BaseException | None = None  # to re-raise if the codec wraps it

    def fail(self, exc: BaseException) -> BaseException:
        """Note ``exc`` as the arena's own error, and return it to be raised."""
        self.error = exc
        return exc


class Block:
    """A block of the arena: where, how big, which one, and how many hold it."""

    __slots__ = ("offset", "serial", "shares", "size")

    def __init__(self, offset: int, size: int, serial: int) -> None:
        self.offset = offset
        self.size = size
        self.serial = serial
        self.shares = 1  # the encoding distribute's own, until it returns


def copy_into(dest: memoryview, obj: Any, is_bytes: bool, fortran: bool) -> None:
    """Copy the buffer ``obj`` into a block's memory ``dest`` (a bytes-like or an array).

    Nothing made here keeps a view of ``dest`` once it returns, so the caller can
    release ``dest``. An array in Fortran order stays in Fortran order.
    """
    if is_bytes:
        dest[:] = memoryview(obj).cast("B")
        return
    import numpy as np

    if obj.flags.c_contiguous or fortran:
        # Every byte as it is (a structured dtype's padding too).
        raw = obj.reshape(-1, order="F" if fortran else "C").view(np.uint8)
        arr = np.frombuffer(dest, np.uint8)
        np.copyto(arr, raw)
        del raw
    else:
        # One copy, straight into the block: a strided array becomes contiguous.
        arr = array_over(dest, obj.dtype, obj.shape, fortran)
        np.copyto(arr, obj, casting="no")
    del arr


class KeptPayload(bytes):
    """An encoded payload leaving its ring, with copies of the arena blocks it refers to.

    ``kept`` maps ``(offset, serial)`` to a block's bytes: the payload can be
    decoded (``Arena.reading``) once the distributor's lock is released, even
    after the blocks were freed or the arena closed.
    """

    kept: dict[tuple[int, int], bytes]
