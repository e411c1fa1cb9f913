"""Starting and watching a worker process from the producer, whatever the handler does.

* ``WorkerProcess`` wraps a started ``multiprocessing.Process``: the worker's warden
  (``fanout.worker.warden``), which forks the worker proper. Its death is seen on a pidfd
  (Linux), so it does not depend on the forkserver: under the forkserver start method
  the warden is the forkserver's child, and the status pipe multiprocessing watches
  closes, for every worker at once, when a handler kills or freezes the forkserver.
  Signals go to the worker through its own pidfd, so they cannot hit a recycled pid.
* ``before_start`` replaces a frozen (SIGSTOPped) forkserver before a worker start would
  wait on it forever; a dead one multiprocessing replaces itself.

The worker's own side of its isolation is ``fanout.worker.isolation``.
"""

from __future__ import annotations

import os
import signal
import time
import weakref
from multiprocessing import connection, forkserver
from typing import Any

from fanout.core.poll import poll_until
from fanout.worker.isolation import pidfd_open
from fanout.worker.warden import private_resident

__all__ = ["WorkerProcess", "before_start"]

STATUS_WAIT = 1.0  # a live forkserver reports a child's exit status within this
FROZEN_CHECK = 0.05  # a status this late: see whether the forkserver is frozen
FORKSERVER_EXIT_WAIT = 1.0  # a SIGKILLed forkserver is gone within this
# A warden cleans up within this of its worker's SIGKILL, or is killed itself (a
# handler kept it stopped): what the worker started may then outlive it.
WARDEN_GRACE = 2.0


def _state(pid: int) -> str:
    """The state letter of ``pid`` from /proc ('' when unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name is in parentheses and may hold anything: split after the last.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[0].decode() if fields else ""


def _forkserver_pid() -> int | None:
    # multiprocessing keeps no public handle on its forkserver; it is our child.
    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


def _replace_frozen_forkserver() -> bool:
    """Kill the forkserver if it is stopped; the next start launches a new one.

    Returns whether it was killed.
    """
    pid = _forkserver_pid()
    if pid is None or _state(pid) not in ("T", "t"):
        return False
    pidfd = pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    # Leave it unreaped: multiprocessing's ensure_running reaps it and starts another.
    if pidfd >= 0:
        try:
            connection.wait([pidfd], FORKSERVER_EXIT_WAIT)
        finally:
            os.close(pidfd)
    else:
        poll_until(
            lambda: _state(pid) in ("Z", "X", ""), FORKSERVER_EXIT_WAIT, first=0.005, longest=0.005
        )
    return True


def before_start(start_method: str) -> None:
    """Make sure a worker start cannot hang on a frozen forkserver."""
    if start_method == "forkserver":
        _replace_frozen_forkserver()


def _ppid(pid: int) -> int:
    """The parent pid of ``pid`` from /proc (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else 0


class WorkerProcess:
    """A started worker: its warden (the ``multiprocessing.Process``) and the worker.

    The warden (``fanout.worker.warden``) forks the worker that runs the handler, names it
    on the return pipe (``set_worker``), and ends, the way the worker ended, once
    it and everything it started are gone. The warden is watched (``sentinel``,
    ``join``, ``exitcode``) by pidfd; signals go to the worker, by pidfd too, so they
    cannot hit a recycled pid, and the warden is left to clean up after it.

    It answers the calls the supervisor makes on a process (``sentinel``, ``join``,
    ``exitcode``, ``kill``, ``terminate``, ``close``). ``exitcode`` stays None when the
    worker is gone but nobody could tell how it ended: under the forkserver start method
    the exit status comes from the forkserver, which a handler may have killed.
    Without pidfds every call goes to the process itself, as before.
    """

    def __init__(self, proc: Any, start_method: str) -> None:
        self.proc = proc
        self.warden_pid: int = proc.pid
        self.pid = 0  # the worker's, once the warden named it
        self.name: str = proc.name
        self._forkserver = start_method == "forkserver"
        self._pidfd = pidfd_open(self.warden_pid)
        if self._pidfd >= 0:  # closed by close(), or when collected without one
            self._close_pidfd = weakref.finalize(self, os.close, self._pidfd)
            self._close_pidfd.atexit = False  # at exit, stop() closes it, after using it
        self._worker_pidfd = -1
        self._ended_at = 0.0  # when the worker was sent SIGKILL or seen ended
        self._dead = False
        self._code: int | None = None

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.name} warden={self.warden_pid} pid={self.pid}>"

    def set_worker(self, pid: int) -> bool:
        """Take the warden's word for its worker's pid; False if it cannot be so."""
        if self.pid or pid <= 0:
            return False
        if self._dead:
            # Read after the warden was reaped: it wrote this before it ended, and
            # it ends only once its worker has. Nothing is left to watch or signal.
            self.pid = pid
            return True
        pidfd = pidfd_open(pid)
        # Opened first, checked after: the pidfd names the process the check saw.
        # No parent at all: the worker already ended and its warden reaped it (a
        # handler that could not be built); the message is the warden's all the same.
        ppid = _ppid(pid)
        if ppid not in (self.warden_pid, 0):
            if pidfd >= 0:
                os.close(pidfd)
            return False
        if ppid == 0 and pidfd >= 0:
            os.close(pidfd)
            pidfd = -1
        self.pid = pid
        self._worker_pidfd = pidfd
        return True

    @property
    def sentinel(self) -> int:
        """An fd that turns readable when the worker has ended."""
        return self._pidfd if self._pidfd >= 0 else int(self.proc.sentinel)

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: killed by that signal); None if running or unknown."""
        if self._pidfd < 0:
            return self.proc.exitcode
        if not self._dead and connection.wait([self._pidfd], 0):
            self._collect()
        return self._code

    def join(self, timeout: float | None = None) -> None:
        """Wait until the worker has ended (at most ``timeout`` seconds)."""
        if self._pidfd < 0:
            self.proc.join(timeout)
            return
        if not self._dead:
            if not connection.wait([self._pidfd], timeout):
                return
            self._collect()

    def _collect(self) -> None:
        """Learn how the dead worker ended, waiting a bounded time for its status."""
        self._dead = True
        proc = self.proc
        if not self._forkserver:
            proc.join(STATUS_WAIT)  # our own child: waitpid answers at once
            self._code = proc.exitcode
            return
        sentinel = proc.sentinel
        ready = connection.wait([sentinel], FROZEN_CHECK)
        if not ready:
            _replace_frozen_forkserver()
            ready = connection.wait([sentinel], STATUS_WAIT)
        code = proc._popen.returncode  # set when multiprocessing read the status first
        if code is None and ready:
            try:
                code = forkserver.read_signed(sentinel)
            except (OSError, EOFError):  # the forkserver died before it could tell
                code = None
        self._code = code
        # Past the status the pipe is at end-of-file: the Process can now be closed.
        proc.join(STATUS_WAIT)

    def _signal_warden(self, sig: signal.Signals) -> None:
        if self._pidfd < 0:  # multiprocessing's own, which skips a reaped process
            if sig == signal.SIGKILL:
                self.proc.kill()
            elif sig == signal.SIGTERM:
                self.proc.terminate()
            elif self.proc.exitcode is None:
                os.kill(self.warden_pid, sig)
            return
        if self._dead:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass  # already ended

    def _signal(self, sig: signal.Signals) -> None:
        """Signal the worker; the warden itself while it has not named one."""
        if not self.pid:
            # Nothing of the handler's runs yet: the warden, on SIGTERM, or the
            # worker, on its parent's death, ends the rest.
            self._signal_warden(sig)
            return
        if self._dead:
            return
        try:
            if self._worker_pidfd >= 0:
                signal.pidfd_send_signal(self._worker_pidfd, sig)
            elif _ppid(self.pid) == self.warden_pid:  # no pidfds: check, then signal
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass  # already ended
        # A frozen warden could not see its worker end, nor clean up after it.
        self._signal_warden(signal.SIGCONT)

    def kill(self) -> None:
        """Send the worker SIGKILL (a pidfd never names a recycled pid).

        Its warden then kills what it started, and ends. A warden still there
        ``WARDEN_GRACE`` seconds later is killed by ``follow_up``.
        """
        self._signal(signal.SIGKILL)
        if not self._ended_at:
            self._ended_at = time.monotonic()

    def terminate(self) -> None:
        """Send the worker SIGTERM."""
        self._signal(signal.SIGTERM)

    def private_bytes(self) -> int:
        """Private resident bytes of the worker and all it started (``private_resident``)."""
        return private_resident(self.warden_pid) if self.pid and not self._dead else 0

    def follow_up(self, now: float) -> None:
        """Wake a warden whose worker ended; kill it ``WARDEN_GRACE`` seconds later.

        A handler may have stopped its warden (SIGSTOP) before its worker ended.
        """
        if not self._ended_at and self._worker_pidfd >= 0:
            if connection.wait([self._worker_pidfd], 0):
                self._ended_at = now
                self._signal_warden(signal.SIGCONT)
        if self._ended_at and now - self._ended_at > WARDEN_GRACE:
            self._signal_warden(signal.SIGKILL)

    def close(self) -> None:
        """Free the pidfds and the Process's pipes (the worker has ended)."""
        if self._pidfd >= 0:
            self._close_pidfd()
            self._pidfd = -1
        if self._worker_pidfd >= 0:
            os.close(self._worker_pidfd)
            self._worker_pidfd = -1
        try:
            self.proc.close()
        except ValueError:
            # No status came (a forkserver that is frozen yet running): the Process's
            # finalizer frees its pipes when it is collected.
            pass
