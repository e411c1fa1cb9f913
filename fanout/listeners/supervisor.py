"""The supervisor thread: watches workers, restarts them, and loses nothing.

It waits on every worker's sentinel and return pipe. A dead worker's lane is
rewound to the first frame the worker had not finished (read from its progress
slot) and a new worker gets those frames again; the frame it died in counts one
attempt, and after ``max_attempts`` it is dead-lettered (that accounting is
``fanout.listeners.deaths``; this module watches and decides). A call running past
``handler_timeout`` gets its worker SIGTERM, then SIGKILL. Return-pipe messages
(handler exceptions, start-up failures) are reported; garbage gets the worker
killed and restarted. User callbacks run here, outside the distributor's lock.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

import msgpack

from fanout.listeners.base import ListenerContext, decode_or_raw
from fanout.listeners.deaths import corrupt_slot_reason, describe_exit, rewind_dead_lane
from fanout.listeners.errorlog import error_log
from fanout.listeners.process import reap_discarded
from fanout.notifications import RawFrame
from fanout.wire.protocol import (
    MAX_RETURN_MESSAGE,
    MSG_ERROR,
    MSG_FATAL,
    MSG_READY,
    MSG_UNDECODABLE,
    MSG_WORKER,
    RETURN_HEADER,
    START_NS,
    STARTED,
)
from fanout.worker.warden import MEMORY_TICK

if TYPE_CHECKING:
    from fanout.listeners.process import Lane

__all__ = ["Supervisor"]

log = logging.getLogger("fanout")

TERM_GRACE = 0.2  # SIGTERM -> SIGKILL for a handler past its timeout
MAX_BACKOFF = 5.0  # between restarts of a worker that dies while starting
FIRST_BACKOFF = 0.1
ACK_TICK = 0.1  # how often held frames are released when nothing else happens
CHECK_TICK = 0.5  # how often running workers' progress slots are checked


def _close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


class Supervisor(threading.Thread):
    """Per-distributor thread that keeps every lane's worker alive."""

    def __init__(self, ctx: ListenerContext, lock: Any, lanes: Callable[[], list[Lane]]) -> None:
        """``lanes()`` starts a round and lists the lanes to watch; called with ``lock`` held."""
        super().__init__(name="fanout-supervisor", daemon=True)
        self.ctx = ctx
        self.lock = lock
        self.lanes = lanes
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # Closed by close(), or when never started and collected.
        self._close_pipe = weakref.finalize(self, _close_fds, (self.wake_r, self.wake_w))
        self._close_pipe.atexit = False  # at exit, stop() closes it, after using it
        self._wake_lock = threading.Lock()  # wake() never writes to a closed fd
        self.stopping = False
        # Chosen under the lock, done after it: worker starts to make, and
        # memory_limit checks to read from /proc (both wait on the kernel).
        self._launches: list[Lane] = []
        self._memory_checks: list[tuple[Lane, Any, int]] = []

    def wake(self) -> None:
        """Make the loop look at the lanes again."""
        with self._wake_lock:
            if self.wake_w < 0:
                return  # closed after stop: nothing to wake
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                pass  # already woken (full), or gone: nothing to wake

    def stop(self) -> None:
        """End the loop (after the distributor stopped every worker)."""
        self.stopping = True
        self.wake()

    def close(self) -> None:
        """Free the wake pipe (after the thread ended)."""
        with self._wake_lock:
            self.wake_w = -1
            self._close_pipe()

    def reap(self, lane: Lane) -> list[Callable[[], None]]:
        """Reap a stopping lane's worker now (without the distributor lock held).

        Returns:
            The reports its last messages asked for, to make without the lock.
        """
        calls: list[Callable[[], None]] = []
        proc = lane.proc
        if proc is not None:
            self._await_exit(proc)
            with self.lock:
                if lane.proc is proc:
                    self._on_exit(lane, calls)
        return calls

    @staticmethod
    def _await_exit(proc: Any) -> None:
        """Wait (no lock held) until a worker whose sentinel fired can be reaped.

        The sentinel can turn readable (the child's fds closed) a moment before
        the child can be reaped (seen with spawn): wait for it, briefly.
        """
        try:
            proc.join(5)
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)
        except ValueError:  # a stop's fallback reap closed it meanwhile
            pass

    def run(self) -> None:
        while not self.stopping:
            try:
                self._once()
            except BaseException:  # never let the supervisor die: it is the safety net
                log.exception("fanout supervisor: unexpected error (continuing)")
                time.sleep(0.05)
        error_log.flush(self.ctx, final=True)  # repeats not yet summarised

    def _once(self) -> None:
        calls: list[Callable[[], None]] = []
        with self.lock:
            lanes = self.lanes()
            watch: dict[int, tuple[Lane, str, Any]] = {}
            for lane in lanes:
                if lane.proc is not None:
                    watch[lane.proc.sentinel] = (lane, "exit", lane.proc)
                    if lane.rfd >= 0:
                        watch[lane.rfd] = (lane, "msg", lane.proc)
            timeout = self._timeout(lanes)
        ready = wait([self.wake_r, *watch], timeout)
        if self.wake_r in ready:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        hits = [watch[fd] for fd in ready if isinstance(fd, int) and fd in watch]
        for _, what, proc in hits:
            if what == "exit":
                self._await_exit(proc)  # no lock held: it may take a moment
        with self.lock:
            # Messages first: an exception reported just before a crash is
            # reported before the crash is handled.
            for lane, what, _ in hits:
                if what == "msg" and lane.rfd >= 0:
                    self._read_messages(lane, calls)
            for lane, what, proc in hits:
                if what == "exit" and lane.proc is proc:
                    self._on_exit(lane, calls)
            self._tick(self.lanes(), calls)
        if self._memory_checks:
            self._check_memory()
        if self._launches:
            self._launch(calls)
        for call in calls:
            call()
        error_log.flush(self.ctx)  # summaries of repeated handler errors that are due

    def _timeout(self, lanes: list[Lane]) -> float | None:
        now = time.monotonic()
        timeout: float | None = None

        def sooner(t: float) -> None:
            nonlocal timeout
            t = max(t, 0.001)
            timeout = t if timeout is None else min(timeout, t)

        for lane in lanes:
            listener = lane.listener
            if lane.proc is None:
                if lane.respawn_at and not lane.closing:
                    sooner(lane.respawn_at - now)
                continue
            if lane.kill_at:
                sooner(lane.kill_at - now)
            if lane.closing:
                sooner(lane.close_deadline - now)
            if listener.handler_timeout is not None:
                sooner(min(listener.handler_timeout / 4, 0.1))
            if listener.opts.memory_limit is not None:
                sooner(lane.memory_check_at - now)
            if len(lane.ring):
                sooner(ACK_TICK)
            sooner(CHECK_TICK)  # the progress-slot sanity check
        summary = error_log.due_in(self.ctx)
        if summary is not None:
            sooner(summary)
        return timeout

    # -- return pipe ---------------------------------------------------------------------

    def _read_messages(self, lane: Lane, calls: list[Callable[[], None]]) -> None:
        while lane.rfd >= 0:
            try:
                chunk = os.read(lane.rfd, 65536)
            except BlockingIOError:
                break
            if not chunk:  # the worker is exiting; its sentinel tells when it is gone
                os.close(lane.rfd)
                lane.rfd = -1
                break
            lane.rbuf += chunk
        buf = lane.rbuf
        pos = 0
        while len(buf) - pos >= RETURN_HEADER.size:
            (size,) = RETURN_HEADER.unpack_from(buf, pos)
            if size > MAX_RETURN_MESSAGE:
                self._garbage(lane, f"a {size}-byte message header", calls)
                return
            end = pos + RETURN_HEADER.size + size
            if end > len(buf):
                break
            try:
                msg = msgpack.unpackb(bytes(buf[pos + RETURN_HEADER.size : end]), raw=False)
                kind = msg["t"]
            except Exception as exc:
                self._garbage(lane, f"an undecodable message ({exc})", calls)
                return
            pos = end
            self._on_message(lane, kind, msg, calls)
            if lane.rbuf is not buf:  # it was garbage: the worker is being killed
                return
        del buf[:pos]

    def _on_message(
        self, lane: Lane, kind: Any, msg: dict[str, Any], calls: list[Callable[[], None]]
    ) -> None:
        listener = lane.listener
        proc = lane.proc
        if proc is not None and not proc.pid and kind != MSG_FATAL:
            # The warden names its worker first, before any handler code runs.
            pid = msg.get("pid")
            if kind != MSG_WORKER or not isinstance(pid, int) or not proc.set_worker(pid):
                self._garbage(lane, f"{msg!r} where the warden names its worker", calls)
            return
        if kind == MSG_WORKER:
            self._garbage(lane, "a second worker pid", calls)
        elif kind == MSG_READY:
            if lane.ready:
                self._garbage(lane, "a second ready message", calls)
                return
            lane.ready = lane.ever_ready = True
            lane.first_start = False
            lane.start_failures = 0
        elif kind == MSG_ERROR:
            payload = msg.get("payload")
            text = str(msg.get("text", ""))
            # Decoded in the call, without the lock: the codec may run user code
            # (a custom unpack, an ext_hook).
            calls.append(functools.partial(self._report_error, listener, payload, text))
        elif kind == MSG_UNDECODABLE:
            seq = msg.get("seq")
            # Only a frame this worker was sent, and has started.
            if not (
                isinstance(seq, int)
                and lane.done_at_spawn < seq <= min(int(lane.slot[STARTED]), lane.ring.last_seq)
            ):
                self._garbage(lane, f"an undecodable report for frame {seq!r}", calls)
                return
            lane.undecodable_since_spawn += 1
            # A worker that died between reporting a frame and marking it done
            # reports it again when it is resent: count it once.
            if isinstance(seq, int):
                if seq in lane.undecodable:
                    return
                acked = lane.ring.acked_seq  # those are never resent: forget them
                lane.undecodable = {s for s in lane.undecodable if s > acked}
                lane.undecodable.add(seq)
            listener._count(dead_lettered=1)
            why = str(msg.get("text", "frame cannot be decoded"))
            payload = msg.get("payload")
            raw = RawFrame(payload if isinstance(payload, bytes) else b"", why)
            calls.append(functools.partial(listener.report_dead_letter, raw, why))
        elif kind == MSG_FATAL:
            lane.fatal = True
            lane.fatal_text = text = str(msg.get("text", ""))
            if not lane.first_start:  # a first start raises WorkerStartError instead
                calls.append(lambda: listener.report_error(None, text))
        else:
            calls.append(
                lambda: listener.report_error(None, f"worker sent unknown message {kind!r}")
            )

    def _report_error(self, listener: Any, payload: Any, text: str) -> None:
        """Report a handler exception, decoding the frame it was handling (no lock)."""
        n: Any = None
        if isinstance(payload, bytes) and payload:
            n = decode_or_raw(self.ctx.codec, payload)
        listener.report_error(n, text)

    def _garbage(self, lane: Lane, what: str, calls: list[Callable[[], None]]) -> None:
        listener = lane.listener
        pid = lane.proc.pid if lane.proc is not None else None
        text = (
            f"worker {pid} of listener {listener.name!r} sent {what} on its return pipe; "
            f"restarting it"
        )
        calls.append(lambda: listener.report_error(None, text))
        if lane.rfd >= 0:
            os.close(lane.rfd)
            lane.rfd = -1
        lane.rbuf = bytearray()
        if lane.proc is not None:
            lane.kill_reason = lane.kill_reason or "worker sent garbage on its return pipe"
            lane.proc.kill()

    # -- exits ---------------------------------------------------------------------------

    def _on_exit(self, lane: Lane, calls: list[Callable[[], None]]) -> None:
        """Handle a worker that ended (lock held; ``_await_exit`` waited for it)."""
        proc = lane.proc
        code = proc.exitcode
        if lane.rfd >= 0:
            self._read_messages(lane, calls)
        if lane.rfd >= 0:
            os.close(lane.rfd)
            lane.rfd = -1
        lane.detach()
        proc.close()
        lane.proc = None
        listener = lane.listener
        if lane.closing or self.ctx.stopping:
            lane.first_start = False
            lane.exited.set()
            if listener.start_error is not None and not self.ctx.stopping:
                # A listener that could not start: what this lane held goes now.
                calls += listener.settle_lane(lane, listener.start_failure())
            return
        if lane.first_start:
            lane.first_start = False
            if lane.fatal or (code is not None and code > 0):
                # The handler cannot be built (or fanout cannot be imported):
                # retrying cannot fix that. start() / add_listener raise it.
                lane.start_error = lane.fatal_text or (
                    f"worker exited with code {code} before it was ready (its "
                    f"traceback, if any, went to stderr). Workers import the main "
                    f"script: if it builds and starts the Distributor at module "
                    f'level, put that under `if __name__ == "__main__":`'
                )
                lane.exited.set()
                if not listener.start_awaited:  # nobody raises it: report it
                    self._start_failed(listener, lane.start_error, calls)
                return
        # Should anything below fail, the tick still starts a new worker.
        lane.respawn_at = time.monotonic() + FIRST_BACKOFF
        reason = lane.kill_reason or describe_exit(code, lane.fatal)
        progressed, charged = rewind_dead_lane(lane, reason, calls)
        listener.restarts += 1
        if lane.ready:
            lane.start_failures = 0
            # A death that charged an attempt is bounded by max_attempts already.
            lane.idle_deaths = 0 if progressed or charged else lane.idle_deaths + 1
        else:
            lane.start_failures += 1
        if lane.ready and lane.idle_deaths < 2:
            log.warning(
                "listener %r lane %d: %s; restarting it", listener.name, lane.index, reason
            )
            lane.backoff = 0.0
            self._respawn(lane, calls)
        else:
            # It died while starting, or twice in a row without finishing a
            # frame: wait longer each time rather than spin.
            lane.backoff = min(max(lane.backoff * 2, FIRST_BACKOFF), MAX_BACKOFF)
            lane.respawn_at = time.monotonic() + lane.backoff
            log.error(
                "listener %r lane %d: %s%s; retrying in %.1f s",
                listener.name,
                lane.index,
                reason,
                "" if lane.ready else " while starting",
                lane.backoff,
            )

    def _start_failed(self, listener: Any, why: str, calls: list[Callable[[], None]]) -> None:
        """A listener nobody waited for cannot start: out of distribution, lanes settled.

        The lanes with no worker are settled now; the others as their workers
        leave (``_on_exit``), so nothing a worker still handles is counted twice.
        """
        calls += self.ctx.listener_failed(listener, why)
        listener.close()
        reason = listener.start_failure()
        for lane in listener.supervised_lanes():
            if lane.proc is None:
                calls += listener.settle_lane(lane, reason)

    def _respawn(self, lane: Lane, calls: list[Callable[[], None]]) -> None:
        """Choose ``lane`` for a new worker (lock held); ``_launch`` starts it after the lock."""
        lane.launching = True
        self.ctx.begin_start(lane.listener)  # a stop or removal meanwhile waits for it
        self._launches.append(lane)

    def _launch(self, calls: list[Callable[[], None]]) -> None:
        """Start the workers chosen under the lock, with no lock held, then attach them."""
        lanes, self._launches = self._launches, []
        started: list[tuple[Lane, Any]] = []
        for lane in lanes:
            try:
                started.append((lane, lane.launch()))
            except BaseException as exc:  # every start ends below: a stop waits for it
                started.append((lane, exc))
        with self.lock:
            for lane, worker in started:
                if isinstance(worker, BaseException):
                    lane.launching = False
                    lane.start_failures += 1  # so a lane that cannot spawn counts as stuck
                    lane.backoff = min(max(lane.backoff * 2, FIRST_BACKOFF), MAX_BACKOFF)
                    lane.respawn_at = time.monotonic() + lane.backoff
                    text = (
                        f"could not start a worker: {worker!r}; retrying in {lane.backoff:.1f} s"
                    )
                    calls.append(reap_discarded)  # one it started and killed, after the lock
                    calls.append(functools.partial(lane.listener.report_error, None, text))
                else:
                    lane.attach(worker)
                self.ctx.end_start(lane.listener)
        self.ctx.pump.notify()  # frames may wait for the new workers

    def _check_memory(self) -> None:
        """Read the workers' memory from /proc (no lock held); kill those past their limit."""
        checks, self._memory_checks = self._memory_checks, []
        over = [
            (lane, proc, limit, used)
            for lane, proc, limit in checks
            if (used := proc.private_bytes()) > limit
        ]
        if not over:
            return
        with self.lock:
            for lane, proc, limit, used in over:
                if lane.proc is proc and not lane.kill_reason:
                    lane.kill_reason = (
                        f"memory_limit={limit} bytes exceeded ({used} bytes private resident)"
                    )
                    proc.kill()

    # -- timers --------------------------------------------------------------------------

    def _tick(self, lanes: list[Lane], calls: list[Callable[[], None]]) -> None:
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        for lane in lanes:
            proc = lane.proc
            listener = lane.listener
            if proc is None:
                if lane.launching:
                    continue
                if lane.respawn_at and now >= lane.respawn_at and not lane.closing:
                    if not self.ctx.stopping:
                        self._respawn(lane, calls)
                continue
            proc.follow_up(now)
            if not lane.kill_reason and not lane.closing:
                corrupt = corrupt_slot_reason(lane)
                if corrupt:
                    lane.corrupt = True
                    lane.kill_reason = f"worker corrupted its progress slot ({corrupt})"
                    text = f"listener {listener.name!r} lane {lane.index}: {lane.kill_reason}"
                    calls.append(functools.partial(listener.report_error, None, text))
                    proc.kill()
                    continue
            limit = listener.opts.memory_limit
            if limit is not None and now >= lane.memory_check_at and not lane.kill_reason:
                lane.memory_check_at = now + MEMORY_TICK
                self._memory_checks.append((lane, proc, limit))  # read after the lock
            lane.ack()
            if lane.kill_at and now >= lane.kill_at:
                proc.kill()
                lane.kill_at = 0.0
            if lane.closing and now >= lane.close_deadline:
                proc.kill()
                continue
            timeout = listener.handler_timeout
            if timeout is not None and not lane.kill_reason:
                started_ns = int(lane.slot[START_NS])
                if started_ns and now_ns - started_ns > timeout * 1e9:
                    lane.kill_reason = f"handler_timeout={timeout} s exceeded"
                    proc.terminate()
                    lane.kill_at = now + TERM_GRACE
