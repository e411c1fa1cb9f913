# FrameRing, the byte ring of frames: argument checks and Python objects around
# the C core in _frame_state.pxi. Included by _ring.pyx: part of the one module
# fanout.native._ring. Twin: fanout/native/_frame_ring_py.py.

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from libc.stdint cimport uint64_t
from libc.string cimport memset

import operator

from fanout.errors import RingClosed, RingFull, ring_full_message
from fanout.native._ring_common import (
    RING_CLOSED_MESSAGE,
    check_ack,
    check_fd,
    check_size,
    check_words,
    frame_length,
)

from fanout.native._sys cimport HDR, os_error

UINT64_MAX = (1 << 64) - 1


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
