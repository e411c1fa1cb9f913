"""Pipe sizing: the one place fanout asks the kernel for larger pipes."""

from __future__ import annotations

import fcntl

__all__ = ["F_SETPIPE_SZ", "PIPE_SIZE", "grow_pipe"]

# Linux's fcntl command number, for Pythons whose fcntl module does not name it.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# The default /proc/sys/fs/pipe-max-size: the producer rarely waits on a full pipe.
PIPE_SIZE = 1 << 20


def grow_pipe(fd: int, size: int) -> None:
    """Ask for a pipe of ``size`` bytes; above the system's limit, keep the size it has.

    Past /proc/sys/fs/pipe-max-size the kernel refuses; the pipe still works,
    only with more reads and writes per batch.
    """
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:
        pass
