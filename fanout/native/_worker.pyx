# The worker's hot loop in native code: twin of fanout/native/_worker_py.py.
#
# Reads big chunks from the data pipe without the GIL, splits frames in C,
# writes progress words straight into the shared-memory slot, and calls the
# codec and the handler through Python only for what must be Python.

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, intptr_t, uint64_t
from libc.string cimport memmove
from posix.unistd cimport _exit, close, read

from operator import index as _index

from fanout.native._sys cimport HDR, now_ns, os_error

from fanout.wire.protocol import (
    ADD as _ADD,
    DELETE as _DELETE,
    DONE as _DONE,
    ERRORS as _ERRORS,
    EXIT_ORPHANED as _EXIT_ORPHANED,
    HANDLED as _HANDLED,
    HIST as _HIST,
    NBUCKETS as _NBUCKETS,
    START_NS as _START_NS,
    STARTED as _STARTED,
    STOP as _STOP,
    UPDATE as _UPDATE,
    UPDATE_SAME as _UPDATE_SAME,
    wire_fields_error,
    wire_shape_error,
)

__all__ = ["NATIVE", "guard_forks", "serve", "serve_batch", "watch_lifeline"]

NATIVE = True

cdef Py_ssize_t STARTED = _STARTED, DONE = _DONE, START_NS = _START_NS
cdef Py_ssize_t HANDLED = _HANDLED, ERRORS = _ERRORS, STOP = _STOP
cdef Py_ssize_t HIST = _HIST, NBUCKETS = _NBUCKETS

cdef int ADD = _ADD, UPDATE = _UPDATE, DELETE = _DELETE, UPDATE_SAME = _UPDATE_SAME


cdef inline Py_ssize_t _bucket(int64_t ns) noexcept nogil:
    # Same as fanout.stats.bucket_of: 4 buckets per power of two.
    cdef int bits
    cdef Py_ssize_t i
    if ns <= 0:
        return 0
    bits = 64 - __builtin_clzll(<unsigned long long>ns)
    i = 4 * (bits - 1) + (((ns >> (bits - 3)) & 3) if bits >= 3 else 0)
    return i if i < NBUCKETS else NBUCKETS - 1


cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil


cdef extern from *:
    """
    static inline void fanout_release64(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    """
    # The progress words the producer checks (fanout.native._ring.slot_progress
    # reads them with acquires): each store is a release, so a reader that sees
    # one sees every word stored before it, on any CPU. Only this process writes
    # them while it runs, so a count's read-then-store needs no atomic add.
    void _publish "fanout_release64"(uint64_t* p, uint64_t v) noexcept nogil


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum: POLLIN


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    int pthread_create(pthread_t* thread, const pthread_attr_t* attr,
                       void* (*start)(void*) noexcept nogil, void* arg)
    int pthread_detach(pthread_t thread)


cdef int EXIT_ORPHANED = _EXIT_ORPHANED


cdef void* _watch_lifeline(void* arg) noexcept nogil:
    # Runs in its own C thread: it needs no GIL, so a handler that holds the GIL
    # (a long C call) cannot delay it.
    cdef pollfd p
    p.fd = <int><intptr_t>arg
    p.events = POLLIN
    p.revents = 0
    while poll(&p, 1, -1) < 0 and errno == EINTR:
        pass
    # Hang-up (the producer is gone), or an fd the handler closed: either way, leave.
    _exit(EXIT_ORPHANED)
    return NULL


def watch_lifeline(int fd):
    """End the process (``EXIT_ORPHANED``) as soon as ``fd`` reports hang-up.

    Twin of ``fanout.native._worker_py.watch_lifeline``. A C thread polls ``fd`` and
    calls ``_exit``: the handler is cut off mid-call, and the hot loop pays nothing.
    """
    cdef pthread_t thread
    cdef int rc = pthread_create(&thread, NULL, _watch_lifeline, <void*><intptr_t>fd)
    if rc:
        raise os_error(rc, "cannot start the lifeline thread")
    pthread_detach(thread)


cdef extern from "<pthread.h>" nogil:
    int pthread_atfork(void (*prepare)() noexcept nogil, void (*parent)() noexcept nogil,
                       void (*child)() noexcept nogil)


cdef int _guarded[2]
cdef int _nguarded = 0
cdef bint _hooked = False
cdef volatile bint _forked = False


cdef void _in_forked_copy() noexcept nogil:
    # Runs in the child of every fork() (os.fork included), before any Python.
    global _forked
    cdef int i
    _forked = True
    for i in range(_nguarded):
        close(_guarded[i])


def guard_forks(int data_fd, int ret_fd):
    """Close the worker's pipes in every forked copy; ``serve`` there then ends it.

    Twin of ``fanout.native._worker_py.guard_forks``. Hooks ``fork()`` itself
    (``pthread_atfork``), so a fork from C code is caught too.
    """
    global _hooked, _nguarded
    _guarded[0] = data_fd
    _guarded[1] = ret_fd
    _nguarded = 2
    if not _hooked:
        rc = pthread_atfork(NULL, NULL, _in_forked_copy)
        if rc:
            raise os_error(rc, "cannot hook fork()")
        _hooked = True


def serve(int fd, slot, unpack, handler, on_error, on_bad_frame,
          Py_ssize_t chunk=1 << 20):
    """Handle frames from ``fd`` until EOF or the slot's STOP word is set.

    ``unpack(payload)`` gives ``[kind, t_ns, a, b]``; a frame it cannot decode
    goes to ``on_bad_frame(seq, payload, exc)``, a handler exception to
    ``on_error(seq, payload)``. ``chunk``: bytes asked of each read. Twin of
    ``fanout.native._worker_py.serve``.
    """
    cdef uint64_t[::1] words = slot
    cdef unsigned char* buf = <unsigned char*>PyMem_RawMalloc(chunk)
    cdef unsigned char* grown
    cdef Py_ssize_t cap = chunk, have = 0, pos, n, need
    cdef uint64_t last = 0
    if buf == NULL:
        raise MemoryError()
    # Bound once: the frame loop takes them from this tuple at each read.
    calls = (unpack, handler.on_add, handler.on_update, handler.on_delete, on_error,
             on_bad_frame)
    try:
        while True:
            if _forked:
                _exit(0)
            n = _read(fd, buf + have, cap - have)
            if n == 0:
                return
            have += n
            need = 0
            pos = _frames(buf, have, cap, words, calls, &need, 0, None, &last)
            if pos < 0:  # the STOP word
                return
            # Keep the start of a frame split across reads for the next one.
            if pos:
                memmove(buf, buf + pos, have - pos)
                have -= pos
            if need > cap:  # a frame larger than the buffer: grow it
                grown = <unsigned char*>PyMem_RawRealloc(buf, need)
                if grown == NULL:
                    raise MemoryError()
                buf = grown
                cap = need
    finally:
        PyMem_RawFree(buf)


cdef Py_ssize_t _read(int fd, unsigned char* buf, Py_ssize_t n) except -1:
    """Read up to n bytes from the data pipe into buf; 0 at EOF."""
    cdef Py_ssize_t got
    with nogil:  # buf is ours alone; read() blocks until the pump writes
        got = read(fd, buf, n)
        while got < 0 and errno == EINTR:
            got = read(fd, buf, n)
    if got < 0:
        raise os_error(errno, "read from the data pipe")
    return got


def serve_batch(data, slot, unpack, handler, on_error, on_bad_frame, stamps):
    """Handle the whole frames of ``data`` in order, as ``serve`` handles a pipe's.

    Frames up to the slot's DONE word as the call begins (finished before a
    restart) are counted in HANDLED and not run again; the ``t_ns`` of each
    frame handled is appended to ``stamps`` (an ``array("q")``). Stops early
    if the STOP word is set. Returns the sequence number of the last frame
    reached (0: none). Twin of ``fanout.native._worker_py.serve_batch``.
    """
    cdef uint64_t[::1] words = slot
    cdef Py_buffer view
    cdef Py_ssize_t need = 0
    cdef uint64_t last = 0
    calls = (unpack, handler.on_add, handler.on_update, handler.on_delete, on_error,
             on_bad_frame)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        _frames(<const unsigned char*>view.buf, view.len, view.len, words, calls, &need,
                words[DONE], stamps, &last)
    finally:
        PyBuffer_Release(&view)
    return last


cdef Py_ssize_t _frames(const unsigned char* buf, Py_ssize_t have, Py_ssize_t cap,
                        uint64_t[::1] words, tuple calls, Py_ssize_t* need,
                        uint64_t skip, stamps, uint64_t* last) except -2:
    """Handle the whole frames at the start of buf; return the bytes they took.

    -1: the STOP word is set. need: set to a frame's size when it exceeds cap.
    Frames up to ``skip`` are counted handled, not run; each handled frame's
    t_ns goes to ``stamps`` unless it is None; ``last``: the last frame's seq.
    """
    cdef Py_ssize_t pos = 0, length, i
    cdef uint64_t seq, now
    cdef int64_t t_ns
    cdef int kind
    unpack, on_add, on_update, on_delete, on_error, on_bad_frame = calls
    while have - pos >= HDR:
        length = 0
        seq = 0
        for i in range(4):
            length |= (<Py_ssize_t>buf[pos + i]) << (8 * i)
        for i in range(8):
            seq |= (<uint64_t>buf[pos + 4 + i]) << (8 * i)
        if HDR + length > cap:
            need[0] = HDR + length
            break
        if have - pos < HDR + length:
            break
        if words[STOP]:
            return -1
        last[0] = seq
        if seq <= skip:  # finished before a restart: acknowledged, not run again
            pos += HDR + length
            _publish(&words[HANDLED], words[HANDLED] + 1)
            continue
        payload = PyBytes_FromStringAndSize(<char*>buf + pos + HDR, length)
        pos += HDR + length
        try:
            fields = unpack(payload)
            if not isinstance(fields, (list, tuple)) or len(fields) != 4:
                raise wire_shape_error(fields)
            kind_o, t_o, a, b = fields
            try:
                # As the twin takes them: ints and what has __index__
                # (numpy ints), never floats, which a C conversion takes.
                kind = kind_o if type(kind_o) is int else _index(kind_o)
                t_ns = t_o if type(t_o) is int else _index(t_o)
            except (OverflowError, TypeError):
                raise wire_fields_error(kind_o, t_o) from None
            if kind < ADD or kind > UPDATE_SAME or t_ns < 0:
                raise wire_fields_error(kind_o, t_o)
        except Exception as exc:
            _bad_frame(words, seq, payload, exc, on_bad_frame)
            continue
        now = now_ns()
        _publish(&words[START_NS], now)
        _publish(&words[STARTED], seq)
        words[HIST + _bucket(<int64_t>(now - <uint64_t>t_ns))] += 1
        try:
            if kind == UPDATE:
                on_update(a, b)
            elif kind == ADD:
                on_add(a, bool(b))
            elif kind == UPDATE_SAME:  # one object on the wire, passed as both
                on_update(a, a)
            else:
                on_delete(a)
        except Exception:
            _handler_failed(words, seq, payload, on_error)
        if _forked:  # a copy the handler forked: its call is not the worker's
            _exit(0)
        _publish(&words[HANDLED], words[HANDLED] + 1)
        _publish(&words[START_NS], 0)
        _publish(&words[DONE], seq)
        if stamps is not None:
            stamps.append(t_ns)
    return pos


cdef _bad_frame(uint64_t[::1] words, uint64_t seq, payload, exc, on_bad_frame):
    """Report a frame that does not decode, and count it done."""
    # Decoding is deterministic (an object that does not fit the schema never
    # will): a retry would fail the same way. The parent dead-letters it; this
    # worker goes on.
    _publish(&words[STARTED], seq)
    on_bad_frame(seq, payload, exc)
    _publish(&words[DONE], seq)


cdef _handler_failed(uint64_t[::1] words, uint64_t seq, payload, on_error):
    """Count and report the exception the handler raised for frame seq."""
    if _forked:  # a copy the handler forked: the worker reports
        _exit(0)
    # The call is over: stop the handler_timeout clock before a report that may
    # wait on a full return pipe.
    _publish(&words[START_NS], 0)
    _publish(&words[ERRORS], words[ERRORS] + 1)
    on_error(seq, payload)
