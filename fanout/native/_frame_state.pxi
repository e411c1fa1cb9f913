# The C core of FrameRing: its state (fr_state, declared in _ring.pxd) and every
# operation on it, all without the GIL. Included by _ring.pyx: part of the one
# module fanout.native._ring, whose FrameRing class (_frame_ring.pxi) and pump
# (fanout.native._pump, through _ring.pxd) call these.

from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from fanout.native._sys cimport HDR

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
