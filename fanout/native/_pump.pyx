# The native pump: one loop per Distributor that drains every lane's FrameRing
# into that lane's non-blocking pipe, without the GIL. Twin: fanout/native/_pump_py.py.
#
# Who owns what: the Pump holds a strong reference to every FrameRing in its
# table (self._rings), so the fr_state pointers in the C table stay valid while
# the loop uses them. The table itself is guarded by table_lock; the loop holds
# it for one send pass (never while sleeping in poll), so after remove() returns
# the loop no longer touches that lane's fd and the caller may close it. No
# Python code runs under table_lock: a new table is built first, then swapped in.

from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint64_t
from posix.unistd cimport close, read, write

from fanout.native._ring_common import check_fd

from fanout.native._sys cimport nap_ns, now_ns, os_error
from fanout.native._ring cimport (
    FrameRing,
    fr_capped,
    fr_send,
    fr_state,
    fr_unsent,
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_t,
    pthread_mutex_unlock,
)

__all__ = ["NATIVE", "Pump"]

import threading

from fanout.native._ring_common import check_pump_ring

NATIVE = True

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    ctypedef unsigned long nfds_t
    int poll(pollfd* fds, nfds_t nfds, int timeout)
    enum:
        POLLIN
        POLLOUT

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from *:
    """
    static inline void fanout_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int fanout_load(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline int fanout_xchg(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    """
    void fanout_store(int* p, int v) nogil
    int fanout_load(int* p) nogil
    int fanout_xchg(int* p, int v) nogil


cdef enum:
    BURST_NS = 200000      # wake-ups closer than this form a burst
    COALESCE_NS = 200000    # how long the pump lets a burst gather


cdef struct lane_t:
    fr_state* st
    int fd
    int blocked   # the last send left bytes behind: wait for POLLOUT
    int broken    # the fd failed (reader gone): skip until re-added
    int error


cdef class Pump:
    # The first docstring line (clinic format) is what inspect.signature reads.
    """Pump()
--

    Drains lanes' FrameRings into their pipes from one thread, without the GIL.

    ``add(key, ring, fd)`` attaches (or re-attaches) a lane, ``remove(key)``
    detaches it, ``notify()`` wakes the loop after appends, ``run()`` is the loop
    (call it in a thread), ``stop()`` ends it, ``close()`` frees the eventfd.
    ``notify`` costs a syscall only when the loop sleeps.
    """

    cdef pthread_mutex_t table_lock
    cdef lane_t* lanes
    cdef Py_ssize_t nlanes
    cdef dict _rings
    cdef list _keys
    cdef object _edit_lock  # serialises add/remove (Python-level: they build tables)
    cdef int efd
    cdef int sleeping
    cdef int running
    cdef object __weakref__

    def __cinit__(self):
        self.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.efd < 0:
            raise os_error(errno, "eventfd")
        pthread_mutex_init(&self.table_lock, NULL)
        self.lanes = NULL
        self.nlanes = 0
        self._rings = {}
        self._keys = []
        self._edit_lock = threading.Lock()
        self.running = 1
        self.sleeping = 0

    def __dealloc__(self):
        if self.efd >= 0:
            close(self.efd)
        PyMem_RawFree(self.lanes)
        pthread_mutex_destroy(&self.table_lock)

    def add(self, key, ring, fd):
        """Attach ``ring`` to be drained into ``fd`` (replacing ``key``'s lane)."""
        check_pump_ring(ring, FrameRing)
        fd = check_fd(fd)
        with self._edit_lock:
            rings = dict(self._rings)
            rings[key] = (ring, fd)
            self._swap(rings)
        self._wake()

    def remove(self, key):
        """Detach ``key``'s lane; on return the loop no longer uses its fd."""
        with self._edit_lock:
            if key in self._rings:
                rings = dict(self._rings)
                del rings[key]
                self._swap(rings)
        # A poll() still watching the old fd holds a reference to its file, which
        # would delay the reader's EOF: wake the loop so it lets go.
        self._wake()

    def broken(self):
        """Return ``{key: errno}`` of lanes whose fd failed since they were added."""
        cdef Py_ssize_t i, n
        cdef int* errors
        with self._edit_lock:  # the table cannot change under us
            keys = self._keys
            n = self.nlanes
            errors = <int*>PyMem_RawMalloc(sizeof(int) * (n + 1))
            if errors == NULL:
                raise MemoryError()
            with nogil:  # copy the flags out under the lock; Python objects after
                pthread_mutex_lock(&self.table_lock)
                for i in range(n):
                    errors[i] = self.lanes[i].error if self.lanes[i].broken else 0
                pthread_mutex_unlock(&self.table_lock)
            try:
                return {keys[i]: errors[i] for i in range(n) if errors[i]}
            finally:
                PyMem_RawFree(errors)

    cdef _swap(self, dict rings):
        """Build the C table of ``rings`` and swap it in (``_edit_lock`` held).

        Everything that touches Python objects happens before the table lock is
        taken; under it, only C: flags of lanes that stay are kept, then swap.
        """
        cdef lane_t* new
        cdef lane_t* old
        cdef Py_ssize_t i = 0, j, n = len(rings)
        cdef FrameRing ring
        new = <lane_t*>PyMem_RawMalloc(sizeof(lane_t) * (n + 1))
        if new == NULL:
            raise MemoryError()  # nothing changed: the Python and C tables agree
        keys = []
        for key, (ring, fd) in rings.items():
            new[i].st = ring.st
            new[i].fd = fd
            new[i].blocked = 0
            new[i].broken = 0
            new[i].error = 0
            keys.append(key)
            i += 1
        with nogil:  # only C under the table lock; the loop waits at most one swap
            pthread_mutex_lock(&self.table_lock)
            for i in range(n):
                for j in range(self.nlanes):
                    if self.lanes[j].st == new[i].st and self.lanes[j].fd == new[i].fd:
                        new[i] = self.lanes[j]
                        break
            old = self.lanes
            self.lanes = new
            self.nlanes = n
            pthread_mutex_unlock(&self.table_lock)
        PyMem_RawFree(old)
        self._rings = rings  # keeps every ring (and its fr_state) alive
        self._keys = keys

    cdef void _wake(self) noexcept nogil:
        cdef uint64_t one = 1
        write(self.efd, &one, 8)

    def notify(self):
        """Wake the loop if it sleeps (call after appending to a ring)."""
        if fanout_load(&self.sleeping) and fanout_xchg(&self.sleeping, 0):
            self._wake()

    def stop(self):
        """Make ``run()`` return soon."""
        fanout_store(&self.running, 0)
        self._wake()

    def close(self):
        """Free the eventfd (after ``run()`` returned)."""
        if self.efd >= 0:
            close(self.efd)
            self.efd = -1

    def run(self):
        """Drain rings into their fds until ``stop()``; call in a dedicated thread."""
        with nogil:  # the loop touches only C state: the table under table_lock,
            self._loop()  # each ring under its own mutex

    cdef void _loop(self) noexcept nogil:
        cdef pollfd* fds = NULL
        cdef Py_ssize_t nfds, cap = 0
        cdef int timeout = -1, sent = 0, burst = 0
        cdef bint ready
        cdef uint64_t last_wake = 0
        while fanout_load(&self.running):
            pthread_mutex_lock(&self.table_lock)
            fds = _room(fds, &cap, self.nlanes + 1)
            if fds == NULL:  # keep trying with a short nap rather than die
                pthread_mutex_unlock(&self.table_lock)
                poll(NULL, 0, 10)
                continue
            nfds = _send_pass(self.lanes, self.nlanes, fds, self.efd, &timeout, &sent)
            pthread_mutex_unlock(&self.table_lock)
            if burst and sent and nfds == 1 and timeout == -1:
                # In a burst, nap without announcing it: producers skip the
                # eventfd write, and the next pass carries what gathered.
                nap_ns(COALESCE_NS)
                continue
            burst = 0
            # Announce the nap, then look once more: an append that raced with
            # the pass either shows up here or sees sleeping == 1 and wakes us.
            fanout_store(&self.sleeping, 1)
            pthread_mutex_lock(&self.table_lock)
            ready = _any_waiting(self.lanes, self.nlanes)
            pthread_mutex_unlock(&self.table_lock)
            if ready or not fanout_load(&self.running):
                fanout_store(&self.sleeping, 0)
                continue
            while poll(fds, nfds, timeout) < 0 and errno == EINTR:
                pass
            fanout_store(&self.sleeping, 0)
            if fds[0].revents & POLLIN:
                burst = _woken(self.efd, &last_wake)
        PyMem_RawFree(fds)


# -- the loop's steps: C only, no GIL ------------------------------------------------

cdef inline pollfd* _room(pollfd* fds, Py_ssize_t* cap, Py_ssize_t n) noexcept nogil:
    # fds, or a new array when it has room for fewer than n; NULL (and cap 0)
    # when out of memory.
    if cap[0] >= n:
        return fds
    PyMem_RawFree(fds)
    fds = <pollfd*>PyMem_RawMalloc(sizeof(pollfd) * n)
    cap[0] = n if fds != NULL else 0
    return fds


cdef inline Py_ssize_t _send_pass(lane_t* lanes, Py_ssize_t nlanes, pollfd* fds, int efd,
                                  int* timeout, int* sent) noexcept nogil:
    # One pass, table lock held: every lane with bytes waiting gets one writev.
    # Fills fds with the eventfd and the lanes to wait for and returns how many;
    # sent: whether any bytes went; timeout: the poll timeout the lanes need.
    cdef Py_ssize_t i, r, nfds = 1
    cdef lane_t* lane
    fds[0].fd = efd
    fds[0].events = POLLIN
    timeout[0] = -1
    sent[0] = 0
    for i in range(nlanes):
        lane = &lanes[i]
        lane.blocked = 0
        if lane.broken:
            continue
        if fr_unsent(lane.st) == 0:
            continue
        r = fr_send(lane.st, lane.fd)
        if r > 0:
            sent[0] = 1
        if r < 0:
            lane.broken = 1
            lane.error = <int>-r
        elif fr_unsent(lane.st) > 0:
            lane.blocked = 1
            if fr_capped(lane.st):
                # Waiting for the reader to finish frames, which no fd
                # announces: look again in a millisecond.
                timeout[0] = 1
            else:
                fds[nfds].fd = lane.fd
                fds[nfds].events = POLLOUT
                nfds += 1
    return nfds


cdef inline bint _any_waiting(lane_t* lanes, Py_ssize_t nlanes) noexcept nogil:
    # Table lock held: whether a lane that can take bytes has some waiting.
    cdef Py_ssize_t i
    for i in range(nlanes):
        if not lanes[i].broken and not lanes[i].blocked and fr_unsent(lanes[i].st) > 0:
            return True
    return False


cdef inline bint _woken(int efd, uint64_t* last_wake) noexcept nogil:
    # The eventfd woke the loop: drain it; True (after a nap) when wake-ups come
    # in a burst.
    cdef uint64_t drained, woke
    cdef bint burst
    read(efd, &drained, 8)
    woke = now_ns()
    burst = woke - last_wake[0] < BURST_NS
    if burst:
        # Let the producer add a few more frames so one writev (and one reader
        # wake-up) carries them, and keep napping while passes find work. At low
        # rates there is no pause, so latency stays low.
        nap_ns(COALESCE_NS)
    last_wake[0] = woke
    return burst
