"""The warden: the parent of every worker, and the end of everything the worker starts.

A worker process is two processes. The one multiprocessing starts is the *warden*; it
becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``), raises its OOM score and forks
the *worker*, which runs the handler. Whatever the handler starts, however it detaches
(a double fork, ``setsid``, ``daemon()``), stays in the warden's subtree: an orphan is
reparented to the nearest subreaper, the warden, not to PID 1.

The warden then waits for one of three things: the worker ends (it returned, crashed,
or the producer killed it for a timeout, garbage or memory), the producer dies (its
lifeline hangs up), or SIGTERM. In every case it kills its whole subtree, the worker
included, reaps it, and ends the way the worker ended (same exit code, same signal), so
the producer reads the worker's fate from the warden's.

The worker holds ``PR_SET_PDEATHSIG=SIGKILL``: a handler that kills its parent kills
its own worker, and nothing else (not the producer, under either start method).

The warden tells the producer the worker's pid as the first message on the return
pipe, before the worker runs a line of handler code: the producer signals the worker
itself (a SIGKILLed warden could no longer clean up).
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
from typing import Any

from fanout.wire.protocol import EXIT_ORPHANED, MSG_FATAL, MSG_WORKER, send_message

__all__ = [
    "MEMORY_TICK",
    "OOM_SCORE_BOOST",
    "become_warden",
    "children",
    "kill_subtree",
    "private_resident",
    "raise_oom_score",
]

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
MEMORY_TICK = 0.25  # how often a memory_limit is checked: a crossing is seen within a second
# Added to a worker's oom_score_adj (capped at 1000): under memory pressure the kernel
# kills a worker, whose lane restarts, before the producer, which holds every lane.
OOM_SCORE_BOOST = 500
EXIT_WARDEN_FAILED = 5  # the warden could not start its worker

_libc: Any = None


def _prctl(option: int, arg: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def raise_oom_score(boost: int = OOM_SCORE_BOOST) -> int:
    """Raise this process's ``oom_score_adj`` by ``boost`` (never lower it); the new value."""
    path = "/proc/self/oom_score_adj"
    try:
        with open(path) as f:
            now = int(f.read())
        target = min(1000, now + boost)
        if target > now:
            with open(path, "w") as f:
                f.write(str(target))
        return target
    except (OSError, ValueError):  # no /proc, or a sandbox that forbids it
        return 0


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from ``/proc``; every thread's list)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended
            return _children_by_scan(pid)  # a kernel without CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return kids


def _children_by_scan(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(name))
    return kids


_PAGE = os.sysconf("SC_PAGE_SIZE")


def private_resident(root: int, *, with_root: bool = False) -> int:
    """Bytes of private resident memory (``RssAnon``) of every process under ``root``.

    For a warden: the worker and every process it started (orphans come back to
    the warden), the warden itself excluded (``with_root`` counts ``root`` too).
    Read from ``/proc/PID/statm`` (resident minus shared pages): a few small reads
    per process. Pages a fork still shares with its parent count once per process
    holding them.
    """
    total = 0
    todo = [root] if with_root else children(root)
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                fields = f.read().split()
        except OSError:  # ended meanwhile
            continue
        total += max(0, int(fields[1]) - int(fields[2])) * _PAGE
        todo.extend(children(pid))
    return total


def kill_subtree() -> None:
    """SIGKILL every descendant of this (subreaper) process and reap them all.

    Only direct children are signalled: their pids cannot be recycled before this
    process reaps them. A killed child's own children are reparented here (this is
    a subreaper) before it can be reaped, and are killed in the next round.
    """
    me = os.getpid()
    while True:
        for kid in children(me):
            try:
                os.kill(kid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _end_like(status: int) -> None:
    """End this process as the worker ended: same exit code, or the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the worker's core, not ours
        except (OSError, ValueError):
            pass
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default action does not end a process
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


class _Terminate(Exception):
    pass


def _on_term(signum: int, frame: Any) -> None:
    raise _Terminate


def become_warden(lifeline: int, ret_fd: int, worker_only: tuple[int, ...]) -> None:
    """Fork the worker and watch it; returns in the worker only.

    Args:
        lifeline: read end whose hang-up means the producer died.
        ret_fd: the return pipe; the warden announces the worker's pid on it, then
            closes its copy.
        worker_only: descriptors the worker needs and the warden closes.
    """
    warden = os.getpid()
    subreaper = True
    try:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:  # a kernel before 3.4: the warden still kills what it can see
        subreaper = False
    raise_oom_score()
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as exc:
        send_message(ret_fd, {"t": MSG_FATAL, "text": f"the warden could not fork: {exc!r}"})
        os._exit(EXIT_WARDEN_FAILED)
    if pid == 0:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != warden:  # the warden died before the line above
            os._exit(EXIT_ORPHANED)
        os.close(go_w)
        # Wait until the warden has named this worker on the return pipe.
        while True:
            try:
                os.read(go_r, 1)
                break
            except InterruptedError:
                continue
        os.close(go_r)
        return
    os.close(go_r)
    for fd in worker_only:
        os.close(fd)
    try:
        send_message(ret_fd, {"t": MSG_WORKER, "pid": pid, "subreaper": subreaper})
    except OSError:
        pass  # the producer is gone: the lifeline says so below
    os.close(ret_fd)
    status = _watch(pid, lifeline, go_w)
    kill_subtree()
    if status is None:
        os._exit(EXIT_ORPHANED)
    _end_like(status)


def _watch(pid: int, lifeline: int, go: int) -> int | None:
    """Let the worker go (close ``go``), then wait for its end or the producer's.

    Returns the worker's wait status, or None when the producer died.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    poller = select.poll()
    poller.register(lifeline, select.POLLIN)
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    # Until here SIGTERM simply ends the warden, and the worker with it (its death
    # signal): no handler code has run. From here on it means "clean up, then end".
    signal.signal(signal.SIGTERM, _on_term)
    try:
        os.close(go)
        while True:
            try:
                ready = poller.poll(None if pidfd >= 0 else 100)
            except InterruptedError:
                continue
            if any(fd == lifeline for fd, _ in ready):
                return None
            # Reap the worker only: orphans are reaped by kill_subtree.
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if got == pid:
                return status
    except _Terminate:  # asked to end: as if the worker had been terminated
        return int(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if pidfd >= 0:
            os.close(pidfd)
