# Ring, the growable FIFO ring of Python objects. Included by _ring.pyx: part of
# the one module fanout.native._ring. Twin: fanout/native/_object_ring_py.py.

cimport cython

from fanout.native._ring_common import RING_GROW_FROM_ZERO, check_size


cdef class Ring:
    # The first docstring line (clinic format) is what inspect.signature reads.
    """Ring(initial_size=0, normal_size=None)
--

    A growable FIFO ring of Python objects (k8s.io/utils ``buffer.Ring``).

    Options:
        initial_size: slots to start with (0 allowed: the first write makes 16).
        normal_size: when set, a ``read_one`` that leaves the ring empty shrinks the
            capacity back to it if larger; ``None`` never shrinks (``RingGrowing``).

    Not thread-safe: callers serialise access (fanout's thread listener holds a
    lock around every call).
    """

    def __init__(self, initial_size=0, normal_size=None):
        pass  # __cinit__ did the work

    def __cinit__(self, initial_size=0, normal_size=None):
        self._n = check_size("initial_size", initial_size)
        normal = check_size("normal_size", normal_size, allow_none=True)
        self._shrinks = normal is not None
        self._normal = normal if self._shrinks else 0
        self._data = [None] * self._n
        self._beg = 0
        self._readable = 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def write_one(self, item):
        """Append ``item``, doubling the capacity when full."""
        cdef Py_ssize_t i
        if self._readable == self._n:
            self._resize(self._n * 2 if self._n else RING_GROW_FROM_ZERO)
        i = self._beg + self._readable
        if i >= self._n:
            i -= self._n
        self._data[i] = item
        self._readable += 1

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def read_one(self):
        """Remove and return ``(item, True)``, or ``(None, False)`` when empty."""
        cdef Py_ssize_t beg = self._beg
        if self._readable == 0:
            return None, False
        item = self._data[beg]
        self._data[beg] = None  # keep no reference to what was read
        self._readable -= 1
        self._beg = 0 if beg == self._n - 1 else beg + 1
        if self._readable == 0 and self._shrinks and self._n > self._normal:
            self._data = [None] * self._normal
            self._n = self._normal
            self._beg = 0
        return item, True

    cdef _resize(self, Py_ssize_t n):
        cdef list old = self._data
        cdef Py_ssize_t i
        new = [None] * n
        for i in range(self._readable):
            new[i] = old[(self._beg + i) % self._n]
        self._data = new
        self._n = n
        self._beg = 0

    def __len__(self):
        return self._readable

    @property
    def capacity(self):
        """Number of slots allocated."""
        return self._n
