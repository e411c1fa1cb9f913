"""The ring of Python objects in pure Python: the twin of the native ``Ring``.

The native class is compiled from ``_object_ring.pxi`` into ``fanout.native._ring``;
``fanout.native._ring_py`` names this one beside the other twins.
"""

from __future__ import annotations

from typing import Any

from fanout.native._ring_common import RING_GROW_FROM_ZERO, check_size

__all__ = ["Ring"]


class Ring:
    """A growable FIFO ring of Python objects (k8s.io/utils ``buffer.Ring``).

    ``fanout.Ring`` is the native implementation of this class, with the same
    API, exceptions and messages; this pure-Python one is its reference. A thread
    listener queues its notifications in one.

    When full, the capacity doubles (or becomes 16 from 0). Slots are cleared as
    they are read, so the ring keeps no reference to what it handed out.

    Not thread-safe: callers serialise access (fanout's thread listener holds a
    lock around every call).

    Args:
        initial_size: Slots to start with; 0 allocates nothing until the first
            write.
        normal_size: When set, a ``read_one`` that leaves the ring empty shrinks
            the capacity back to it if larger (``buffer.Ring``); None never
            shrinks (``buffer.RingGrowing``).

    Raises:
        TypeError: A size is not an int.
        ValueError: A size is negative or absurdly large (over 2**62).
    """

    __slots__ = ("_beg", "_data", "_n", "_normal", "_readable")

    def __init__(self, initial_size: int = 0, normal_size: int | None = None) -> None:
        n = check_size("initial_size", initial_size)
        self._normal = check_size("normal_size", normal_size, allow_none=True)
        assert n is not None
        self._data: list[Any] = [None] * n
        self._n = n
        self._beg = 0
        self._readable = 0

    def write_one(self, item: Any) -> None:
        """Append an item, doubling the capacity when full.

        Args:
            item: Any object; the ring keeps a reference until it is read.
        """
        if self._readable == self._n:
            self._resize(self._n * 2 if self._n else RING_GROW_FROM_ZERO)
        self._data[(self._beg + self._readable) % self._n] = item
        self._readable += 1

    def read_one(self) -> tuple[Any, bool]:
        """Remove the oldest item and return it.

        Returns:
            ``(item, True)``, or ``(None, False)`` when the ring is empty (so a
            stored None can be told from an empty ring).
        """
        if self._readable == 0:
            return None, False
        beg = self._beg
        item = self._data[beg]
        self._data[beg] = None  # keep no reference to what was read
        self._readable -= 1
        self._beg = 0 if beg == self._n - 1 else beg + 1
        if self._readable == 0 and self._normal is not None and self._n > self._normal:
            self._data = [None] * self._normal
            self._n = self._normal
            self._beg = 0
        return item, True

    def _resize(self, n: int) -> None:
        old, beg, count = self._data, self._beg, self._readable
        self._data = [old[(beg + i) % self._n] for i in range(count)] + [None] * (n - count)
        self._n = n
        self._beg = 0

    def __len__(self) -> int:
        """Return the number of items held."""
        return self._readable

    @property
    def capacity(self) -> int:
        """Number of slots allocated."""
        return self._n
