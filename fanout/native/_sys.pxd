# System declarations and small helpers the native modules share (cimported by
# fanout/native/_ring.pyx, _pump.pyx and _worker.pyx): one definition of each.

from libc.stdint cimport uint64_t
from libc.string cimport strerror
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec


cdef enum:
    HDR = 12  # frame header: u32 length + u64 seq, little endian (_ring_common.HEADER)


cdef inline uint64_t now_ns() noexcept nogil:
    # The clock of time.monotonic_ns(): frames carry it from producer to worker.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef inline void nap_ns(long ns) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = 0
    ts.tv_nsec = ns
    nanosleep(&ts, NULL)


cdef inline object os_error(int err, str doing=None):
    # The one errno -> exception translation: OSError picks the subclass
    # (BrokenPipeError, ...) from err, as os.write would raise it.
    cdef str text = (<bytes>strerror(err)).decode("utf-8", "replace")
    return OSError(err, text if doing is None else f"{doing}: {text}")
