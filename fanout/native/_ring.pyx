# Native rings: the hot-path twin of fanout/native/_ring_py.py (same API, same errors).
#
# FrameRing keeps its whole state in a C struct (fr_state) guarded by a pthread
# mutex, so the native pump (fanout/native/_pump.pyx) can send from it without the GIL.
# Rule that keeps this deadlock-free: the ring mutex is never held while waiting
# for the GIL; a thread holding the GIL that finds the mutex taken releases the
# GIL before it waits.
#
# One extension module, its source split by concern into files it includes:
#   _frame_state.pxi   FrameRing's C state and its operations, all without the GIL
#   _frame_ring.pxi    the FrameRing class around that state
#   _object_ring.pxi   Ring, the ring of Python objects
#   _plain.pxi         plain(), the producer's check that both codecs agree
#   _pack.pxi          pack_plain(), that check and the encode in one pass
#   _feed.pxi          Encoder and Feed, distribute's fast path (uses the three above)
# This file keeps the two calls on frames beyond one ring: append_all (one frame
# into many rings) and frame_span (the whole frames in a buffer), and the
# producer's read of a worker's progress words (slot_progress).

cimport cython
from cpython.buffer cimport PyBuffer_Release
from libc.stdint cimport uint32_t, uint64_t

from fanout.errors import RingClosed

from fanout.native._sys cimport HDR

from fanout.native._ring_common import HEADER_SIZE

from fanout.wire.protocol import (
    DONE as _DONE,
    ERRORS as _ERRORS,
    HANDLED as _HANDLED,
    STARTED as _STARTED,
)

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

NATIVE = True

include "_frame_state.pxi"
include "_frame_ring.pxi"
include "_object_ring.pxi"
include "_plain.pxi"
include "_pack.pxi"
include "_feed.pxi"


def append_all(rings, frame):
    """Append ``frame`` to every open ring of the sequence ``rings`` (one buffer lookup).

    Closed rings are skipped; returns how many rings took the frame. Stops at
    the first other error; rings before it keep the frame.
    """
    return _append_all(rings, frame)


cdef Py_ssize_t _append_all(rings, frame) except -1:
    cdef Py_buffer view
    _get_frame(frame, &view)
    try:
        return _append_data(rings, <const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cdef Py_ssize_t _append_data(rings, const unsigned char* data, Py_ssize_t size) except -1:
    # A checked frame (1 byte to 4 GiB) into every open ring; how many took it.
    cdef FrameRing ring
    cdef Py_ssize_t taken = 0
    for ring in rings:
        if ring.st.closed:  # racy read; _put checks again under the lock
            continue
        try:
            ring._put(data, <size_t>size)
        except RingClosed:
            continue
        taken += 1
    return taken


@cython.boundscheck(False)
@cython.wraparound(False)
def frame_span(const unsigned char[:] buf, Py_ssize_t budget, bint single):
    """Whole frames at the start of ``buf``: ``(end, first, last, count)``.

    Frames are taken while they fit in ``budget`` bytes (the first one always, so
    a frame larger than the budget still goes), and only one if ``single``.
    ``end``: the bytes they take; ``first`` / ``last``: their sequence numbers;
    ``count``: how many (0, and ``end`` 0, when ``buf`` holds no whole frame).
    """
    cdef Py_ssize_t end = buf.shape[0], pos = 0, stop
    cdef uint64_t first = 0, last = 0, seq
    cdef uint32_t length
    cdef Py_ssize_t count = 0
    cdef int i
    with nogil:
        while end - pos >= HDR:
            length = 0
            seq = 0
            for i in range(4):
                length |= (<uint32_t>buf[pos + i]) << (8 * i)
            for i in range(8):
                seq |= (<uint64_t>buf[pos + 4 + i]) << (8 * i)
            stop = pos + HDR + length
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


cdef extern from *:
    """
    static inline uint64_t fanout_acquire64(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    """
    uint64_t _acquire "fanout_acquire64"(const uint64_t* p) noexcept nogil


cdef Py_ssize_t ERRORS = _ERRORS, HANDLED = _HANDLED, DONE = _DONE, STARTED = _STARTED


def slot_progress(slot):
    """A worker's progress words ``(errors, handled, done, started)``, read in that order.

    The worker stores them in the opposite order (it counts an error before the
    call, the call before its frame is done), each store a release; each read
    here is an acquire, so a later read never shows an older state than an
    earlier one did, on any CPU (on x86 all of these are plain moves).
    ``slot``: the lane's progress slot, a buffer of uint64 words.
    """
    cdef const uint64_t[::1] w = slot
    cdef uint64_t errors = _acquire(&w[ERRORS])
    cdef uint64_t handled = _acquire(&w[HANDLED])
    cdef uint64_t done = _acquire(&w[DONE])
    return errors, handled, done, _acquire(&w[STARTED])
