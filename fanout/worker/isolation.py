"""What keeps a worker to itself, and fanout's helpers out of a handler's reach.

This is the worker's side; ``fanout.listeners.launch`` starts and watches workers from
the producer.

* ``watch_lifeline`` (in ``fanout.native._worker`` and its twin ``fanout.native._worker_py``) ends
  the worker as soon as the producer is gone. The lifeline is the pipe
  multiprocessing gives every child for ``parent_process()``: its write end
  lives in the producer only (it is close-on-exec and never sent to the forkserver),
  so end-of-file there means the producer died, whoever the worker's parent is.
* ``map_slot`` maps only the pages that hold the worker's own progress slot, and keeps
  no descriptor open for it.
* ``close_inherited`` closes what the worker inherited but has no use for: the pipe to
  multiprocessing's resource tracker, the forkserver's "alive" pipe, the status pipe of
  the spawn start method. A handler writing to them would kill or confuse helpers that
  every other listener depends on.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from multiprocessing import forkserver, resource_tracker
from typing import Any

from fanout.wire.protocol import slot_stride

__all__ = ["close_inherited", "map_slot", "mmap_shared", "pidfd_open"]


def pidfd_open(pid: int) -> int:
    """Return a pidfd for ``pid``, or -1 where pidfds do not exist (or it is gone)."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return -1
    try:
        return int(opener(pid))
    except OSError:  # ENOSYS (old kernel), EPERM (seccomp), ESRCH (already reaped)
        return -1


_libc: Any = None


def mmap_shared(fd: int, length: int, prot: int, offset: int = 0, what: str = "memory") -> int:
    """``mmap(MAP_SHARED)`` through libc, keeping no duplicate of ``fd``; the address.

    Unlike ``mmap.mmap``, nothing holds the descriptor afterwards, and the mapping
    lives as long as the process.
    """
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc = libc
    addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of the {what} failed: {os.strerror(err)}")
    return int(addr)


def map_slot(fd: int, offset: int, size: int) -> memoryview:
    """Map ``size`` bytes at ``offset`` (page-aligned) of ``fd``, shared, as 64-bit words.

    Unlike ``mmap.mmap`` this keeps no duplicate of ``fd``; the mapping lives as long
    as the process.
    """
    length = slot_stride(size)
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    addr = mmap_shared(fd, length, prot, offset, "progress slot")
    buf = (ctypes.c_char * length).from_address(addr)
    return memoryview(buf).cast("B")[:size].cast("Q")


def close_inherited(keep: set[int]) -> list[int]:
    """Close every inheritable fd above 2 not in ``keep``, and multiprocessing's helpers.

    Inheritable descriptors are the ones meant to cross into a child: what the worker
    inherited from its parent or the forkserver. Descriptors Python opened here are
    close-on-exec (PEP 446) and stay: a main module re-imported in the worker keeps its
    files. multiprocessing forgets the helpers closed here, so a handler that uses it
    gets a resource tracker (and forkserver) of its own. Returns the fds closed.
    """
    tracker = resource_tracker._resource_tracker
    server = forkserver._forkserver
    named = {getattr(tracker, "_fd", None), getattr(server, "_forkserver_alive_fd", None)}
    # Without pidfds the producer watches multiprocessing's sentinel, which under spawn
    # is a pipe this worker inherited: then close only the helpers' fds, named above.
    # (The producer runs on the same kernel, under a seccomp filter no looser.)
    own_pidfd = pidfd_open(os.getpid())
    sentinel_needed = own_pidfd < 0
    if own_pidfd >= 0:
        os.close(own_pidfd)
    closed = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            inheritable = not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        except OSError as exc:  # the fd listing /proc/self/fd itself, now closed
            if exc.errno == errno.EBADF:
                continue
            raise
        if (inheritable and not sentinel_needed) or fd in named:
            os.close(fd)
            closed.append(fd)
    # Stale numbers would point at whatever the handler opens next.
    if getattr(tracker, "_fd", None) in closed:
        tracker._fd = tracker._pid = None  # type: ignore[attr-defined]
    if getattr(server, "_forkserver_alive_fd", None) in closed:
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]
    if getattr(server, "_inherited_fds", None) is not None:
        server._inherited_fds = None  # type: ignore[attr-defined]
    return closed
