# Declarations of the native rings, cimported by fanout/native/_pump.pyx.

from libc.stdint cimport uint64_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_trylock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)


# The whole state of a FrameRing. Offsets are relative to `head` (the physical
# index of the first byte held): 0 <= boundary <= sent <= used <= cap.
# `lock` guards every field; it is never held while waiting for the GIL.
cdef struct fr_state:
    unsigned char* buf
    size_t cap
    size_t head
    size_t used
    size_t sent
    size_t boundary
    size_t normal
    size_t maxb
    bint bounded
    size_t frames
    uint64_t next_seq
    uint64_t acked_seq
    uint64_t sent_seq
    size_t inflight_cap       # 0: no cap on bytes sent but not acked
    uint64_t* ack_src         # reader's "last done" word, or NULL
    bint sending              # a writev runs without the lock (see fr_send)
    unsigned char* retired    # buffer replaced during that writev, freed after it
    bint closed               # close() was called: appends are refused
    pthread_mutex_t lock


# Write what is pending to fd; bytes written, 0 if the fd is full, -errno on error.
cdef Py_ssize_t fr_send(fr_state* st, int fd) noexcept nogil
# Bytes waiting to be sent (takes the lock).
cdef size_t fr_unsent(fr_state* st) noexcept nogil
# True when bytes wait but the in-flight cap holds them back (takes the lock).
cdef bint fr_capped(fr_state* st) noexcept nogil


cdef class Ring:
    cdef list _data
    cdef Py_ssize_t _n
    cdef Py_ssize_t _beg
    cdef Py_ssize_t _readable
    cdef Py_ssize_t _normal
    cdef bint _shrinks
    cdef _resize(self, Py_ssize_t n)


cdef class FrameRing:
    cdef fr_state* st
    cdef object _ack_view
    cdef uint64_t _put(self, const unsigned char* data, size_t n) except 0
