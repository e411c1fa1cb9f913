# Native rings: the hot-path twin of fanout/native/_ring_py.py (same API, same errors).
#
# FrameRing keeps its whole state in a C struct (fr_state) guarded by a pthread
# mutex, so the native pump (fanout/native/_pump.pyx) can send from it without the GIL.
# Rule that keeps this deadlock-free: the ring mutex is never held while waiting
# for the GIL; a thread holding the GIL that finds the mutex taken releases the
# GIL before it waits.

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset

import operator

from fanout.native._ring_common import (
    RING_CLOSED_MESSAGE,
    RING_GROW_FROM_ZERO,
    check_ack,
    check_fd,
    check_size,
    check_words,
    frame_length,
)
from fanout.errors import RingClosed, RingFull, ring_full_message

from fanout.native._sys cimport HDR, os_error

from fanout.native._ring_common import HEADER_SIZE

__all__ = ["HEADER_SIZE", "NATIVE", "FrameRing", "Ring", "append_all", "frame_span", "plain"]

UINT64_MAX = (1 << 64) - 1

NATIVE = True

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec* iov, int iovcnt)

cdef enum:
    BIG_COPY = 64 * 1024    # copies at least this large run without the GIL
    MIN_CAP = 64            # == _ring_common.MIN_FRAME_CAPACITY


# -- byte helpers; all run with st.lock held --------------------------------------

cdef inline size_t _phys(fr_state* st, size_t off) noexcept nogil:
    # head < cap and off <= cap, so one subtraction replaces a division.
    cdef size_t i = st.head + off
    return i - st.cap if i >= st.cap else i


cdef inline void _copy_in(fr_state* st, size_t off, const unsigned char* src,
                          size_t n) noexcept nogil:
    cdef size_t start = _phys(st, off)
    cdef size_t first = n if n < st.cap - start else st.cap - start
    memcpy(st.buf + start, src, first)
    if first < n:
        memcpy(st.buf, src + first, n - first)


cdef inline void _copy_out(fr_state* st, size_t off, unsigned char* dst,
                           size_t n) noexcept nogil:
    cdef size_t start = _phys(st, off)
    cdef size_t first = n if n < st.cap - start else st.cap - start
    memcpy(dst, st.buf + start, first)
    if first < n:
        memcpy(dst + first, st.buf, n - first)


cdef inline void _put_header(unsigned char* h, uint32_t length,
                             uint64_t seq) noexcept nogil:
    cdef int i
    for i in range(4):
        h[i] = (length >> (8 * i)) & 0xFF
    for i in range(8):
        h[4 + i] = (seq >> (8 * i)) & 0xFF


cdef inline void _get_header(fr_state* st, size_t off, size_t* length,
                             uint64_t* seq) noexcept nogil:
    cdef unsigned char h[HDR]
    cdef int i
    cdef uint64_t s = 0
    cdef uint32_t n = 0
    _copy_out(st, off, h, HDR)
    for i in range(4):
        n |= (<uint32_t>h[i]) << (8 * i)
    for i in range(8):
        s |= (<uint64_t>h[4 + i]) << (8 * i)
    length[0] = n
    seq[0] = s


cdef int _relocate(fr_state* st, size_t cap) noexcept nogil:
    """Move the bytes held to a new buffer of cap bytes; -1 when out of memory."""
    cdef unsigned char* buf = <unsigned char*>PyMem_RawMalloc(cap if cap else 1)
    if buf == NULL:
        return -1
    if st.used:
        _copy_out(st, 0, buf, st.used)
    if st.sending and st.retired == NULL:
        st.retired = st.buf  # the running writev still reads it: fr_send frees it
    else:
        PyMem_RawFree(st.buf)
    st.buf = buf
    st.cap = cap
    st.head = 0
    return 0


cdef int _grow(fr_state* st, size_t cap) noexcept nogil:
    """Grow to cap bytes, in place when it can; -1 when out of memory; lock held.

    In place is realloc: the C library remaps a large buffer rather than copy it,
    so a long backlog (a stalled listener's big frames) costs no copy of what it
    already holds and no new pages for it. Not while the running writev reads the
    buffer (it may not move under it), nor when the bytes wrap around its end
    (they must be put back in order): those move into a new buffer.
    """
    cdef unsigned char* buf
    if st.sending or st.head + st.used > st.cap:
        return _relocate(st, cap)
    buf = <unsigned char*>PyMem_RawRealloc(st.buf, cap)
    if buf == NULL:
        return -1
    st.buf = buf
    st.cap = cap
    return 0


cdef void _advance_sent(fr_state* st, size_t written) noexcept nogil:
    cdef size_t length, end
    cdef uint64_t seq
    st.sent += written
    while st.boundary < st.sent:
        _get_header(st, st.boundary, &length, &seq)
        end = st.boundary + HDR + length
        if end > st.sent:
            break
        st.boundary = end
        st.sent_seq = seq


cdef size_t _ack_to(fr_state* st, uint64_t target) noexcept nogil:
    """Free frames with seq <= target among those completely sent; lock held."""
    cdef size_t freed_bytes = 0, freed = 0, length
    cdef uint64_t frame_seq
    if target <= st.acked_seq:
        return 0
    while freed_bytes < st.boundary:
        _get_header(st, freed_bytes, &length, &frame_seq)
        if frame_seq > target:
            break
        freed_bytes += HDR + length
        freed += 1
    st.head = _phys(st, freed_bytes) if st.cap else 0
    st.used -= freed_bytes
    st.sent -= freed_bytes
    st.boundary -= freed_bytes
    st.frames -= freed
    st.acked_seq = target
    if st.used == 0:
        st.head = 0
        if st.cap > st.normal:
            _relocate(st, st.normal)  # shrinking: failure keeps the old buffer
    return freed


cdef inline void _ack_from_source(fr_state* st) noexcept nogil:
    # The reader publishes its last finished seq; frames up to it are free.
    cdef uint64_t done
    if st.ack_src != NULL:
        done = st.ack_src[0]
        # A reader cannot finish a frame never appended: such a word is garbage
        # (the supervisor restarts that reader), so it frees nothing.
        if done > st.acked_seq and done < st.next_seq:
            _ack_to(st, done if done < st.sent_seq else st.sent_seq)


cdef inline void _wait_not_sending(fr_state* st) noexcept nogil:
    # Lock held on entry and exit. For the rare operations that move bytes a
    # running writev may be reading (drop_unsent, rewind).
    while st.sending:
        pthread_mutex_unlock(&st.lock)
        sched_yield()
        pthread_mutex_lock(&st.lock)


cdef Py_ssize_t fr_send(fr_state* st, int fd) noexcept nogil:
    cdef size_t room, flen
    cdef uint64_t fseq
    cdef iovec iov[2]
    cdef ssize_t written
    cdef size_t todo, start, first
    cdef int count = 1, err
    pthread_mutex_lock(&st.lock)
    _ack_from_source(st)
    todo = st.used - st.sent
    if st.inflight_cap and todo:
        # Bytes in flight (sent, not acked) stay below the cap, so frames that
        # wait can still be dropped by an overflow policy; but a frame begun is
        # always finished (a reader can only finish whole frames).
        if st.sent < st.inflight_cap:
            room = st.inflight_cap - st.sent  # may stop mid-frame: finished next
        elif st.sent > st.boundary:  # finish the frame begun, nothing more
            _get_header(st, st.boundary, &flen, &fseq)
            room = st.boundary + HDR + flen - st.sent
        else:
            room = 0
        if todo > room:
            todo = room
    if todo == 0:
        pthread_mutex_unlock(&st.lock)
        return 0
    start = _phys(st, st.sent)
    first = todo if todo < st.cap - start else st.cap - start
    iov[0].iov_base = st.buf + start
    iov[0].iov_len = first
    if first < todo:
        iov[1].iov_base = st.buf
        iov[1].iov_len = todo - first
        count = 2
    # The writev runs without the ring lock, so the producer's appends do not
    # wait for it. Appends only add bytes past `used` (a growth keeps the old
    # buffer alive in `retired` until we are done); acks only move `head` and
    # shift offsets, which _advance_sent below adds to.
    st.sending = 1
    pthread_mutex_unlock(&st.lock)
    while True:
        written = writev(fd, iov, count)
        if written >= 0 or errno != EINTR:
            break
    err = errno if written < 0 else 0
    pthread_mutex_lock(&st.lock)
    st.sending = 0
    if st.retired != NULL:
        PyMem_RawFree(st.retired)
        st.retired = NULL
    if written > 0:
        _advance_sent(st, <size_t>written)
    pthread_mutex_unlock(&st.lock)
    if written < 0:
        if err == EAGAIN:  # == EWOULDBLOCK on Linux
            return 0
        return -err
    return written


cdef size_t fr_unsent(fr_state* st) noexcept nogil:
    cdef size_t n
    pthread_mutex_lock(&st.lock)
    n = st.used - st.sent
    pthread_mutex_unlock(&st.lock)
    return n


cdef bint fr_capped(fr_state* st) noexcept nogil:
    cdef bint capped
    pthread_mutex_lock(&st.lock)
    capped = _capped(st)
    pthread_mutex_unlock(&st.lock)
    return capped


cdef inline bint _capped(fr_state* st) noexcept nogil:
    # Bytes wait, no frame is half sent, and what is in flight reached the cap.
    return (st.inflight_cap != 0 and st.used > st.sent and st.sent == st.boundary
            and st.sent >= st.inflight_cap)


cdef enum:
    PUT_OK = 0
    PUT_FULL = 1
    PUT_NOMEM = 2
    PUT_CLOSED = 3


cdef inline uint64_t _append_locked(fr_state* st, const unsigned char* data,
                                    size_t n) noexcept nogil:
    """Write header and payload at the end; room checked; lock held."""
    cdef unsigned char hdr[HDR]
    cdef uint64_t seq = st.next_seq
    _put_header(hdr, <uint32_t>n, seq)
    _copy_in(st, st.used, hdr, HDR)
    _copy_in(st, st.used + HDR, data, n)
    st.used += n + HDR
    st.frames += 1
    st.next_seq = seq + 1
    return seq


cdef int _put_nogil(fr_state* st, const unsigned char* data, size_t n,
                    uint64_t* seq, size_t* held) noexcept nogil:
    """Take the lock, grow if needed, append; PUT_OK / _FULL / _NOMEM / _CLOSED."""
    cdef size_t total = n + HDR, cap
    pthread_mutex_lock(&st.lock)
    held[0] = st.used
    if st.closed:
        pthread_mutex_unlock(&st.lock)
        return PUT_CLOSED
    if st.bounded and st.used + total > st.maxb:
        pthread_mutex_unlock(&st.lock)
        return PUT_FULL
    if st.used + total > st.cap:
        cap = st.cap if st.cap > MIN_CAP else MIN_CAP
        while cap < st.used + total:
            cap *= 2
        if st.bounded and cap > st.maxb:
            cap = st.maxb
        if _grow(st, cap) != 0:
            pthread_mutex_unlock(&st.lock)
            return PUT_NOMEM
    seq[0] = _append_locked(st, data, n)
    pthread_mutex_unlock(&st.lock)
    return PUT_OK


cdef int _drop_unsent(fr_state* st, size_t want, size_t* frames,
                      size_t* gap) noexcept nogil:
    """Drop the oldest whole unsent frames until want bytes are free; -1: no memory."""
    cdef size_t start, end, length
    cdef uint64_t seq
    cdef unsigned char* prefix
    pthread_mutex_lock(&st.lock)
    _wait_not_sending(st)
    # A partly sent frame must be finished, so dropping starts after it.
    start = st.boundary
    if st.sent > start:
        _get_header(st, start, &length, &seq)
        start += HDR + length
    end = start
    while end < st.used and end - start < want:
        _get_header(st, end, &length, &seq)
        end += HDR + length
        frames[0] += 1
    gap[0] = end - start
    if gap[0]:
        # Move the kept prefix [0, start) forward over the dropped frames.
        prefix = <unsigned char*>PyMem_RawMalloc(start if start else 1)
        if prefix == NULL:
            frames[0] = 0
            gap[0] = 0
            pthread_mutex_unlock(&st.lock)
            return -1
        _copy_out(st, 0, prefix, start)
        _copy_in(st, gap[0], prefix, start)
        PyMem_RawFree(prefix)
        st.head = _phys(st, gap[0])
        st.used -= gap[0]
        st.frames -= frames[0]
    pthread_mutex_unlock(&st.lock)
    return 0


cdef int _peek(fr_state* st, unsigned char** copy, size_t* length) noexcept nogil:
    """Copy the first payload held into a new buffer: 1, 0 when empty, -1: no memory."""
    cdef uint64_t seq
    pthread_mutex_lock(&st.lock)
    if st.frames == 0:
        pthread_mutex_unlock(&st.lock)
        return 0
    _get_header(st, 0, length, &seq)
    copy[0] = <unsigned char*>PyMem_RawMalloc(length[0] if length[0] else 1)
    if copy[0] == NULL:
        pthread_mutex_unlock(&st.lock)
        return -1
    _copy_out(st, HDR, copy[0], length[0])
    pthread_mutex_unlock(&st.lock)
    return 1


cdef int _seqs(fr_state* st, uint64_t** out, size_t* count) noexcept nogil:
    """Copy the sequence numbers of the frames held into a new array; -1: no memory."""
    cdef size_t off = 0, length, i = 0
    cdef uint64_t seq
    pthread_mutex_lock(&st.lock)
    count[0] = st.frames
    out[0] = <uint64_t*>PyMem_RawMalloc((st.frames if st.frames else 1) * sizeof(uint64_t))
    if out[0] == NULL:
        pthread_mutex_unlock(&st.lock)
        return -1
    while off < st.used and i < st.frames:
        _get_header(st, off, &length, &seq)
        out[0][i] = seq
        i += 1
        off += HDR + length
    pthread_mutex_unlock(&st.lock)
    return 0


cdef int _take_all(fr_state* st, unsigned char** copy, size_t* n) noexcept nogil:
    """Copy every frame held (headers too) into a new buffer and empty the ring."""
    pthread_mutex_lock(&st.lock)
    _wait_not_sending(st)
    n[0] = st.used
    copy[0] = <unsigned char*>PyMem_RawMalloc(st.used if st.used else 1)
    if copy[0] == NULL:
        pthread_mutex_unlock(&st.lock)
        return -1
    _copy_out(st, 0, copy[0], st.used)
    st.head = 0
    st.used = 0
    st.sent = 0
    st.boundary = 0
    st.frames = 0
    st.acked_seq = st.next_seq - 1
    st.sent_seq = st.acked_seq
    if st.cap > st.normal:
        _relocate(st, st.normal)  # shrinking: failure keeps the old buffer
    pthread_mutex_unlock(&st.lock)
    return 0


cdef inline void _lock(fr_state* st):
    if pthread_mutex_trylock(&st.lock) != 0:
        with nogil:  # wait for the pump's writev without blocking other threads
            pthread_mutex_lock(&st.lock)


cdef inline void _get_frame(frame, Py_buffer* view) except *:
    """Get a simple buffer of a non-empty frame, or raise the shared errors."""
    try:
        PyObject_GetBuffer(frame, view, PyBUF_SIMPLE)
    except (TypeError, BufferError):
        frame_length(frame)  # raises the message both rings share
        raise
    if view.len == 0 or view.len > 0xFFFFFFFF:
        PyBuffer_Release(view)
        frame_length(frame)


def append_all(rings, frame):
    """Append ``frame`` to every open ring of the sequence ``rings`` (one buffer lookup).

    Closed rings are skipped; returns how many rings took the frame. Stops at
    the first other error; rings before it keep the frame.
    """
    cdef Py_buffer view
    cdef FrameRing ring
    cdef Py_ssize_t taken = 0
    _get_frame(frame, &view)
    try:
        for ring in rings:
            if ring.st.closed:  # racy read; _put checks again under the lock
                continue
            try:
                ring._put(<const unsigned char*>view.buf, <size_t>view.len)
            except RingClosed:
                continue
            taken += 1
    finally:
        PyBuffer_Release(&view)
    return taken


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


cdef class FrameRing:
    # The first docstring line (clinic format) is what inspect.signature reads.
    """FrameRing(initial_bytes=4096, normal_bytes=None, max_bytes=None, max_inflight=None)
--

    A growable byte ring of length-delimited frames with three cursors.

    ``acked <= sent <= written``: frames before ``acked`` are freed; frames between
    ``acked`` and ``sent`` are in flight and stay until acked, so ``rewind()`` can
    send them again; frames after ``sent`` wait for ``send_to``.

    Each frame travels as a 12-byte header (payload length u32, sequence number
    u64, little endian) and the payload. Sequence numbers start at 1.

    Options:
        initial_bytes: capacity to start with (grows by doubling, from 64 if 0).
        normal_bytes: capacity to shrink back to once every frame is acked
            (default: ``initial_bytes``).
        max_bytes: bound on the bytes held (headers included); ``append`` past it
            raises ``RingFull``. ``None``: unbounded.

    Thread safety: every method takes the ring's mutex, so one producer thread
    appending while one pump thread sends and another thread acks is safe;
    ``send_to`` and large copies in ``append`` run without the GIL.
    """

    def __init__(self, initial_bytes=4096, normal_bytes=None, max_bytes=None,
                 max_inflight=None):
        pass  # __cinit__ did the work

    def __cinit__(self, initial_bytes=4096, normal_bytes=None, max_bytes=None,
                  max_inflight=None):
        cdef fr_state* st
        cap = check_size("initial_bytes", initial_bytes)
        inflight = check_size("max_inflight", max_inflight, allow_none=True)
        if inflight == 0:
            raise ValueError("max_inflight must be > 0 bytes, or None for no cap")
        normal = check_size("normal_bytes", normal_bytes, allow_none=True)
        bound = check_size("max_bytes", max_bytes, allow_none=True)
        if bound is not None and bound <= HDR:
            raise ValueError(
                f"max_bytes must exceed the {HDR}-byte frame header, got {bound}"
            )
        if bound is not None and cap > bound:
            cap = bound
        if normal is None:
            normal = cap
        if bound is not None and normal > bound:
            normal = bound
        st = <fr_state*>PyMem_RawMalloc(sizeof(fr_state))
        if st == NULL:
            raise MemoryError()
        memset(st, 0, sizeof(fr_state))
        st.buf = <unsigned char*>PyMem_RawMalloc(cap if cap else 1)
        if st.buf == NULL:
            PyMem_RawFree(st)
            raise MemoryError()
        st.cap = cap
        st.normal = normal
        st.bounded = bound is not None
        st.maxb = bound if bound is not None else 0
        st.next_seq = 1
        st.inflight_cap = inflight if inflight is not None else 0
        st.ack_src = NULL
        pthread_mutex_init(&st.lock, NULL)
        self.st = st
        self._ack_view = None

    def __dealloc__(self):
        if self.st != NULL:
            pthread_mutex_destroy(&self.st.lock)
            PyMem_RawFree(self.st.retired)
            PyMem_RawFree(self.st.buf)
            PyMem_RawFree(self.st)
            self.st = NULL

    def append(self, frame):
        """Copy ``frame`` in as the next frame and return its sequence number."""
        cdef Py_buffer view
        _get_frame(frame, &view)
        try:
            return self._put(<const unsigned char*>view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)

    cdef uint64_t _put(self, const unsigned char* data, size_t n) except 0:
        """Copy n bytes in as the next frame; return its seq (frame checked)."""
        cdef fr_state* st = self.st
        cdef uint64_t seq = 0
        cdef size_t held = 0
        cdef int status
        # Fast path with the GIL: a small frame that fits, lock free to take.
        if n < BIG_COPY and pthread_mutex_trylock(&st.lock) == 0:
            if (not st.closed and st.used + n + HDR <= st.cap
                    and not (st.bounded and st.used + n + HDR > st.maxb)):
                seq = _append_locked(st, data, n)
                pthread_mutex_unlock(&st.lock)
                return seq
            pthread_mutex_unlock(&st.lock)
        # Everything else (wait for the lock, grow, big copy) without the GIL, so
        # the lock is never held while waiting for the GIL.
        with nogil:  # data is pinned by the caller's buffer view; st by self
            status = _put_nogil(st, data, n, &seq, &held)
        if status == PUT_FULL:
            raise RingFull(ring_full_message(n + HDR, held, st.maxb))
        if status == PUT_NOMEM:
            raise MemoryError(f"FrameRing cannot grow to hold {held + n + HDR} bytes")
        if status == PUT_CLOSED:
            raise RingClosed(RING_CLOSED_MESSAGE)
        return seq

    def send_to(self, fd):
        """Write pending bytes to non-blocking ``fd``; return how many were taken."""
        cdef Py_ssize_t r
        cdef int cfd = check_fd(fd)
        with nogil:  # fr_send works on the C state under its own mutex
            r = fr_send(self.st, cfd)
        if r < 0:
            raise os_error(<int>-r)
        return r

    def ack(self, seq):
        """Free every frame up to and including ``seq``; return how many were freed."""
        cdef fr_state* st = self.st
        cdef size_t freed
        cdef uint64_t target, last, sent
        cdef bint beyond
        if isinstance(seq, bool) or not isinstance(seq, int):
            check_ack(seq, 0, 0)
        # Only C values under the mutex: an int subclass's comparisons could run
        # Python code (and raise) while it is held.
        seq = operator.index(seq)  # an exact int from here on
        if seq <= 0:
            return 0
        target = <uint64_t>seq if seq <= UINT64_MAX else UINT64_MAX
        _lock(st)
        last = st.next_seq - 1
        sent = st.sent_seq
        beyond = seq > UINT64_MAX or target > last or target > sent
        if beyond or target <= st.acked_seq:
            pthread_mutex_unlock(&st.lock)
            if beyond:
                check_ack(seq, last, sent)
            return 0
        freed = _ack_to(st, target)
        pthread_mutex_unlock(&st.lock)
        return freed

    def ack_from_source(self):
        """Free the frames the ack source says the reader finished; return how many."""
        cdef fr_state* st = self.st
        cdef size_t before, freed
        with nogil:  # the whole locked section is C; the source buffer is pinned by self
            pthread_mutex_lock(&st.lock)
            before = st.frames
            _ack_from_source(st)
            freed = before - st.frames
            pthread_mutex_unlock(&st.lock)
        return freed

    def close(self):
        """Refuse further appends (they raise ``RingClosed``); frames held stay."""
        cdef fr_state* st = self.st
        with nogil:
            pthread_mutex_lock(&st.lock)
            st.closed = 1
            pthread_mutex_unlock(&st.lock)

    @property
    def closed(self):
        """Whether ``close()`` was called."""
        return bool(self.st.closed)

    def take_all(self):
        """Remove every frame held, sent or not, and return their payloads, oldest first.

        The ring counts them as acked (``acked_seq == last_seq`` afterwards).
        """
        cdef fr_state* st = self.st
        cdef unsigned char* copy = NULL
        cdef size_t n = 0, off = 0, length
        cdef int status, i
        with nogil:  # the whole locked section is C: copy out, then reset
            status = _take_all(st, &copy, &n)
        if status != 0:
            raise MemoryError(f"FrameRing.take_all could not copy {n} bytes")
        out = []
        try:
            while off < n:
                length = 0
                for i in range(4):
                    length |= (<size_t>copy[off + i]) << (8 * i)
                out.append(PyBytes_FromStringAndSize(<char*>copy + off + HDR, length))
                off += HDR + length
        finally:
            PyMem_RawFree(copy)
        return out

    def set_ack_source(self, words, index=0):
        """Let ``send_to`` ack up to ``words[index]`` (a uint64 buffer the reader updates).

        ``None`` removes the source. The ring keeps a view of ``words`` until then.
        """
        cdef uint64_t* word
        cdef uint64_t[::1] view
        if words is None:
            _lock(self.st)
            self.st.ack_src = NULL
            pthread_mutex_unlock(&self.st.lock)
            self._ack_view = None
            return
        view = check_words(words, index)
        word = &view[<Py_ssize_t>index]  # before the lock: only C under it
        _lock(self.st)
        self.st.ack_src = word
        pthread_mutex_unlock(&self.st.lock)
        self._ack_view = view

    def capped(self):
        """Tell whether bytes wait but the in-flight cap holds them back."""
        cdef bint capped
        with nogil:
            capped = fr_capped(self.st)
        return capped

    def rewind(self):
        """Make the next ``send_to`` start again at the first frame not acked."""
        cdef fr_state* st = self.st
        cdef size_t n
        with nogil:  # the whole locked section, so the lock never waits for the GIL
            pthread_mutex_lock(&st.lock)
            _wait_not_sending(st)
            st.sent = 0
            st.boundary = 0
            st.sent_seq = st.acked_seq
            n = st.frames
            pthread_mutex_unlock(&st.lock)
        return n

    def drop_unsent(self, nbytes):
        """Drop the oldest frames not yet sent until ``nbytes`` are free.

        Frames in flight (sent, not acked) are kept. Returns ``(frames, bytes)``
        dropped.
        """
        cdef fr_state* st = self.st
        cdef size_t want = check_size("nbytes", nbytes)
        cdef size_t frames = 0, gap = 0
        cdef int failed
        with nogil:  # the whole locked section, so the lock never waits for the GIL
            failed = _drop_unsent(st, want, &frames, &gap)
        if failed:
            raise MemoryError("FrameRing.drop_unsent could not allocate its scratch copy")
        return frames, gap

    def seqs(self):
        """Return the sequence numbers of the frames held, oldest first."""
        cdef fr_state* st = self.st
        cdef uint64_t* out = NULL
        cdef size_t count = 0, i
        cdef int failed
        with nogil:  # C only under the mutex; the list is built after it
            failed = _seqs(st, &out, &count)
        if failed:
            raise MemoryError("FrameRing.seqs could not allocate its copy")
        try:
            return [out[i] for i in range(count)]
        finally:
            PyMem_RawFree(out)

    def peek(self):
        """Return a copy of the first payload not acked, or ``None``."""
        cdef fr_state* st = self.st
        cdef unsigned char* copy = NULL
        cdef size_t length = 0
        cdef int status
        with nogil:  # copy out under the mutex; Python objects are made after it
            status = _peek(st, &copy, &length)
        if status < 0:
            raise MemoryError(f"FrameRing.peek could not copy {length} bytes")
        if status == 0:
            return None
        try:
            return PyBytes_FromStringAndSize(<char*>copy, length)
        finally:
            PyMem_RawFree(copy)

    def __len__(self):
        return self.st.frames

    @property
    def nbytes(self):
        """Bytes held (headers included), in flight or waiting."""
        return self.st.used

    @property
    def capacity(self):
        """Bytes allocated."""
        return self.st.cap

    @property
    def unsent_bytes(self):
        """Bytes waiting for ``send_to``."""
        cdef size_t n
        with nogil:
            n = fr_unsent(self.st)
        return n

    @property
    def max_bytes(self):
        """The bound on bytes held, or ``None``."""
        return self.st.maxb if self.st.bounded else None

    @property
    def max_inflight(self):
        """The cap on bytes sent but not acked, or ``None``."""
        return self.st.inflight_cap if self.st.inflight_cap else None

    @property
    def normal_bytes(self):
        """The capacity the ring shrinks back to once empty."""
        return self.st.normal

    @property
    def last_seq(self):
        """Sequence number of the last frame appended (0 before any)."""
        return self.st.next_seq - 1

    @property
    def first_seq(self):
        """Sequence number of the first frame held (0 when empty)."""
        cdef fr_state* st = self.st
        cdef size_t length
        cdef uint64_t seq = 0
        _lock(st)
        if st.frames:
            _get_header(st, 0, &length, &seq)
        pthread_mutex_unlock(&st.lock)
        return seq

    @property
    def acked_seq(self):
        """The highest sequence number acked (0 before any)."""
        return self.st.acked_seq

    @property
    def sent_seq(self):
        """Sequence number of the last frame completely sent."""
        return self.st.sent_seq


# -- which objects the two MessagePack packages encode alike (fanout.wire.codec) ----------------
# On the producer's hot path: C-level type checks on borrowed references. Nothing in
# the walk runs Python code (leaves are matched by identity), so nothing can change
# a container under it.

from cpython.object cimport PyObject, PyTypeObject

cdef extern from "Python.h":
    PyTypeObject _str_t "PyUnicode_Type"
    PyTypeObject _int_t "PyLong_Type"
    PyTypeObject _float_t "PyFloat_Type"
    PyTypeObject _bool_t "PyBool_Type"
    PyTypeObject _bytes_t "PyBytes_Type"
    PyTypeObject _dict_t "PyDict_Type"
    PyTypeObject _list_t "PyList_Type"
    PyTypeObject _tuple_t "PyTuple_Type"
    PyObject* _none "Py_None"
    PyTypeObject* _type_of "Py_TYPE"(PyObject*)
    int _dict_next "PyDict_Next"(PyObject*, Py_ssize_t*, PyObject**, PyObject**)
    # (a list or a tuple, exactly)
    Py_ssize_t _seq_size "PySequence_Fast_GET_SIZE"(PyObject*)
    PyObject* _seq_item "PySequence_Fast_GET_ITEM"(PyObject*, Py_ssize_t)
    Py_ssize_t _tuple_size "PyTuple_GET_SIZE"(PyObject*)
    PyObject* _tuple_item "PyTuple_GET_ITEM"(PyObject*, Py_ssize_t)


cdef inline bint _scalar(PyObject* o) noexcept:
    cdef PyTypeObject* t = _type_of(o)
    return (
        t == &_str_t or t == &_int_t or t == &_float_t or o == _none
        or t == &_bool_t or t == &_bytes_t
    )


cdef bint _plain(PyObject* o, int depth, PyObject* leaves) noexcept:
    cdef PyTypeObject* t = _type_of(o)
    cdef PyTypeObject* kt
    cdef Py_ssize_t i, n, pos = 0
    cdef PyObject* k
    cdef PyObject* v
    if t == &_dict_t:
        if depth == 0:
            return False
        while _dict_next(o, &pos, &k, &v):
            kt = _type_of(k)
            if not (kt == &_str_t or kt == &_int_t or kt == &_bytes_t):
                return False
            if not _scalar(v) and not _plain(v, depth - 1, leaves):
                return False
        return True
    if t == &_list_t or t == &_tuple_t:
        if depth == 0:
            return False
        n = _seq_size(o)
        for i in range(n):
            v = _seq_item(o, i)
            if not _scalar(v) and not _plain(v, depth - 1, leaves):
                return False
        return True
    if _scalar(o):
        return True
    n = _tuple_size(leaves)
    for i in range(n):
        if <PyObject*>t == _tuple_item(leaves, i):
            return True
    return False


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


def plain(obj, int depth, tuple leaves):
    """Whether ``obj`` holds only what msgspec and msgpack encode to the same bytes.

    Exactly dicts (keyed by str, int or bytes), lists, tuples, str, bytes, int,
    float, bool and None, nested at most ``depth`` levels, and instances of the
    types in ``leaves`` (a tuple) anywhere. Anything else (a datetime, a set, a
    subclass) answers False.
    """
    return _plain(<PyObject*>obj, depth, <PyObject*>leaves)
