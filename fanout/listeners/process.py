"""Process listeners: a handler in ``workers`` worker processes, one lane each.

A ``Lane`` is one worker process, the pipe the pump writes its ring into, the
pipe it answers on and its progress slot (shared memory the worker writes and the
producer reads). ``distribute`` appends to the lane's ring (``listeners.lanes``);
the pump (``native._pump``) writes rings into pipes; the worker (``worker.main``)
handles the frames; the supervisor (``listeners.supervisor``) reads the return
pipes and slots and restarts, rewinds and reaps workers through the lane's methods.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from typing import Any

import numpy as np

from fanout.core.options import ListenerOptions
from fanout.listeners.base import ListenerContext
from fanout.listeners.lanes import LaneBase, LaneListener
from fanout.listeners.launch import WorkerProcess, before_start
from fanout.listeners.pipes import PIPE_SIZE, grow_pipe
from fanout.listeners.procs import ensure_forkserver
from fanout.wire.protocol import (
    DONE,
    ERRORS,
    HANDLED,
    HIST,
    NBUCKETS,
    PID,
    SLOT_BYTES,
    SLOT_WORDS,
    START_NS,
    STARTED,
    STOP,
    slot_stride,
)
from fanout.worker.main import FdArg, WorkerSpec, producer_fanout, worker_main

__all__ = ["Lane", "ProcessListener", "reap_discarded"]

STUCK_AFTER = 3  # start-up failures in a row after which drain gives up on a lane
PRODUCER_FANOUT = producer_fanout()


# Workers fanout started but could not take charge of: killed, not yet reaped.
_unreaped: list[Any] = []
# Starts run in parallel under no lock of ours; one at a time checks the forkserver.
_forkserver_lock = threading.Lock()


def _discard_started(proc: Any) -> None:
    """Kill a worker fanout could not take charge of (it must not leak).

    An error path under the distributor's lock: the wait for it is left to
    ``reap_discarded``, which the caller runs once the lock is released.
    """
    proc.kill()
    _unreaped.append(proc)


def reap_discarded() -> None:
    """Reap the workers ``_discard_started`` killed (no lock held: this waits).

    A SIGKILLed child is reaped at once; the wait is bounded regardless.
    """
    while _unreaped:
        try:
            proc = _unreaped.pop()
        except IndexError:  # another thread took the last one
            return
        proc.join(1.0)
        if proc.exitcode is not None:
            proc.close()


class ProcessListener(LaneListener):
    """A listener whose handler runs in ``workers`` processes, one lane each."""

    executor = "process"
    maps_shared_memory = True  # workers map the arena read-only (fanout.buffers.arena)

    def __init__(self, ctx: ListenerContext, opts: ListenerOptions) -> None:
        super().__init__(ctx, opts)
        # One memfd holds every lane's progress slot: shared with the workers,
        # freed by the kernel when the last mapping goes, so it cannot leak.
        # Each slot on pages of its own, so a worker can map its slot and no other.
        self.slot_stride = slot_stride(SLOT_BYTES)
        size = self.slot_stride * self.workers
        self.memfd = os.memfd_create(f"fanout-{self.name}", os.MFD_CLOEXEC)
        # Closed by release(), or when the listener is collected without one.
        self._close_memfd = weakref.finalize(self, os.close, self.memfd)
        self._close_memfd.atexit = False  # at exit, stop() releases it, after using it
        os.ftruncate(self.memfd, size)
        self.shm = mmap.mmap(self.memfd, size)
        self.slots = np.frombuffer(self.shm, dtype=np.uint64).reshape(self.workers, -1)[
            :, :SLOT_WORDS
        ]
        self.lanes: list[Lane] = [Lane(self, i, ring) for i, ring in enumerate(self.make_rings())]
        for lane in self.lanes:  # the pump frees what the worker finished
            lane.ring.set_ack_source(self.slots[lane.index], DONE)

    # -- lifecycle -------------------------------------------------------------------

    def direct_ring(self) -> Any:
        """The only lane's ring when nothing needs routing or a room check."""
        if self.workers == 1 and self.max_pending_bytes is None:
            return self.lanes[0].ring
        return None

    def start(self) -> None:
        """Start every lane's worker (no lock held: starting a process waits).

        The workers started before one that failed are attached all the same,
        so the removal that follows the failure reaps them.
        """
        launched = []
        try:
            for lane in self.lanes:
                lane.launching = True
                launched.append((lane, lane.launch()))
        finally:
            with self.ctx.lock:
                for lane in self.lanes:
                    lane.launching = False
                for lane, worker in launched:
                    lane.attach(worker)

    def discard(self) -> bool:
        """Ask the workers to leave; what they leave behind is dropped at ``release``."""
        self.close()
        if self.exited():
            self.release()
            return False
        return True

    def wait_exited(self, timeout: float | None) -> bool:
        """Wait until every worker was reaped; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for lane in self.lanes:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not lane.exited.wait(left):
                return False
        return True

    def supervised_lanes(self) -> list[Any]:
        """Every lane: the supervisor restarts, rewinds and reaps their workers."""
        return self.lanes

    def close(self, drain: bool = False) -> None:
        """Ask every worker to leave and stop feeding it (distributor lock held).

        The rings take no more frames from here on, so what they hold is final
        for ``settle``.
        """
        for lane in self.lanes:
            lane.ring.close()
            lane.close()

    def exited(self) -> bool:
        """Tell whether every worker has exited and been reaped."""
        return all(lane.proc is None and not lane.launching for lane in self.lanes)

    def release(self) -> None:
        """Free the shared memory once no lane uses it."""
        if self.memfd < 0:
            return
        for lane in self.lanes:
            lane.ack()  # what the last workers finished, before the slots go
        if not self.stop_settles:
            self.settle(None)  # a removed listener's leftovers are dropped (client-go)
        self._close_memfd()
        self.memfd = -1
        # Swap every numpy view of the mapping for a copy (stats() after stop
        # still reads the final counters), so the mapping and the fd mmap keeps
        # can be closed now rather than at GC.
        self.slots = self.slots.copy()
        for lane in self.lanes:
            lane.slot = self.slots[lane.index]
            lane.ring.set_ack_source(None)
        try:
            self.shm.close()
        except BufferError:  # a concurrent stats() still holds a view; GC frees it
            pass

    def drained(self) -> bool:
        """Tell whether every frame was handled (or dropped / dead-lettered)."""
        return not any(len(lane.ring) for lane in self.lanes)

    def stuck(self) -> bool:
        """Tell whether a lane's worker keeps failing to start (nothing drains)."""
        return any(
            lane.start_failures >= STUCK_AFTER or lane.start_error is not None
            for lane in self.lanes
        )

    def _initial_done(self) -> bool:
        if self.removed:  # nothing more will be handled: do not hang unsynced
            return True
        return not any(
            lane.initial_seq
            and int(lane.slot[DONE]) < lane.initial_seq
            and len(lane.ring)
            and lane.ring.acked_seq < lane.initial_seq
            for lane in self.lanes
        )

    def counters(self) -> dict[str, int]:
        """Pending frames and bytes, handled and failed calls, across lanes."""
        pending = pending_bytes = capacity = 0
        for lane in self.lanes:
            pending += len(lane.ring)
            pending_bytes += self.pending_bytes(lane)  # arena blocks included
            capacity += lane.ring.capacity
        return {
            "received": self.received(),
            "pending": pending,
            "pending_bytes": pending_bytes,
            "capacity_bytes": capacity,
            "delivered": sum(lane.counts()[0] for lane in self.lanes),
            "errors": sum(lane.counts()[1] for lane in self.lanes),
        }

    def ready(self) -> bool:
        """Tell whether every worker has started and can handle."""
        return all(lane.ready and lane.proc is not None for lane in self.lanes)

    def latency_histogram(self) -> list[int]:
        """Counts per latency bucket (``fanout.stats.bucket_of``), all workers summed."""
        return [int(x) for x in self.slots[:, HIST : HIST + NBUCKETS].sum(axis=0)]

    def worker_pids(self) -> list[int]:
        """Return the pids of the running workers."""
        return [lane.proc.pid for lane in self.lanes if lane.proc is not None and lane.proc.pid]


class Lane(LaneBase):
    """One worker process, its data pipe, return pipe, ring and progress slot.

    State belongs to the distributor's lock; the pump reads the ring and the pipe
    under their own locks.
    """

    def __init__(self, listener: ProcessListener, index: int, ring: Any) -> None:
        super().__init__(listener, index, ring)
        self.listener: ProcessListener = listener
        self.slot = listener.slots[index]
        self.proc: Any = None
        # wfd: the data pipe's write end (non-blocking); rfd: the return pipe's read end.
        self.rbuf = bytearray()
        self.launching = False  # a worker start runs with no lock held (``launch``)
        self.fatal = False  # the worker reported a start-up or frame failure
        self.fatal_text = ""
        self.corrupt = False  # the worker wrote impossible progress: trust none of it
        self.closing = False
        self.undecodable: set[int] = set()  # seqs reported undecodable, not yet acked
        self.kill_reason: str | None = None
        self.kill_at = 0.0  # when a SIGTERM'ed worker gets SIGKILL
        self.close_deadline = 0.0
        self.respawn_at = 0.0
        self.backoff = 0.0
        self.start_failures = 0  # deaths in a row before the worker said ready
        self.idle_deaths = 0  # deaths in a row that finished no frame
        self.done_at_spawn = 0
        # The slot's counters when the worker started, and frames it reported
        # undecodable since: what it claims later must square with its DONE word.
        self.handled_at_spawn = 0
        self.errors_at_spawn = 0
        self.undecodable_since_spawn = 0
        self.memory_check_at = 0.0  # when the worker's memory_limit is checked next
        self.exited = threading.Event()

    def __repr__(self) -> str:
        return f"<Lane {self.listener.name!r}[{self.index}]>"

    def ack(self) -> None:
        """Free ring frames the worker has finished (read from its progress slot)."""
        self.ring.ack_from_source()

    def counts(self) -> tuple[int, int]:
        """Handler calls finished and failed, as the slot says, within what was sent.

        A worker writes its slot and may lie there; no lane reports more calls than
        frames were ever appended to it, nor more failures than calls.
        """
        handled = min(int(self.slot[HANDLED]), self.ring.last_seq)
        return handled, min(int(self.slot[ERRORS]), handled)

    def distrust_counts(self) -> None:
        """Put back counters a dead worker corrupted: at most one call per frame acked."""
        cap = self.handled_at_spawn + max(0, self.ring.acked_seq - self.done_at_spawn)
        handled = min(max(int(self.slot[HANDLED]), self.handled_at_spawn), cap)
        self.slot[HANDLED] = handled
        self.slot[ERRORS] = min(max(int(self.slot[ERRORS]), self.errors_at_spawn), handled)

    def launch(self) -> tuple[Any, int, int]:
        """Start a worker for this lane; no lock needed (nothing else touches the lane).

        Its caller holds a start of the listener (``ListenerContext.begin_start``),
        so nothing closes the lane meanwhile, and ``launching`` keeps the
        supervisor from starting a second one.

        Returns:
            ``(process, data pipe's write end, return pipe's read end)`` for ``attach``.
        """
        listener = self.listener
        ctx = listener.ctx
        self.slot[STARTED] = self.slot[DONE] = self.ring.acked_seq
        self.slot[START_NS] = 0
        self.slot[STOP] = 0
        self.slot[PID] = 0
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            rr, rw = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        try:
            grow_pipe(w, PIPE_SIZE)
            spec = WorkerSpec(
                listener=listener.name,
                lane=self.index,
                handler_blob=listener.opts.handler_blob,
                is_factory=listener.opts.is_factory,
                codec_blob=ctx.codec_blob,
                slot_offset=self.index * listener.slot_stride,
                fanout_dir=PRODUCER_FANOUT[0],
                fanout_version=PRODUCER_FANOUT[1],
                schema_blob=listener.opts.schema_blob,
                arena_size=0 if ctx.arena is None else ctx.arena.size,
            )
            # The shared-memory arena, which the worker maps read-only.
            arena_fd = () if ctx.arena is None else (FdArg(ctx.arena.fd),)
            with _forkserver_lock:
                before_start(ctx.start_method)  # a frozen forkserver is replaced first
                if ctx.start_method == "forkserver":
                    ensure_forkserver()  # (again, if it died) importing our fanout
            proc = ctx.mp_context.Process(
                target=worker_main,
                args=(spec, FdArg(r), FdArg(rw), FdArg(listener.memfd), *arena_fd),
                name=f"fanout-{listener.name}-{self.index}",
                daemon=True,
            )
            proc.start()
            try:
                # Watched by pidfd: a handler that kills or freezes the forkserver
                # (its parent) does not make every other worker look dead.
                proc = WorkerProcess(proc, ctx.start_method)
            except BaseException:
                _discard_started(proc)
                raise
        except BaseException:
            for fd in (w, rr):
                os.close(fd)
            raise
        finally:
            os.close(r)
            os.close(rw)
        os.set_blocking(w, False)
        os.set_blocking(rr, False)
        return proc, w, rr

    def attach(self, worker: tuple[Any, int, int]) -> None:
        """Take charge of a worker ``launch`` started, and feed it (lock held)."""
        proc, w, rr = worker
        self.launching = False
        self.proc, self.wfd, self.rfd = proc, w, rr
        self.rbuf = bytearray()
        self.ready = False
        self.fatal = False
        self.fatal_text = ""
        self.corrupt = False
        self.kill_reason = None
        self.kill_at = 0.0
        self.respawn_at = 0.0
        self.done_at_spawn = self.ring.acked_seq
        self.handled_at_spawn = int(self.slot[HANDLED])
        self.errors_at_spawn = int(self.slot[ERRORS])
        self.undecodable_since_spawn = 0
        self.ring.rewind()
        self.listener.ctx.pump.add(self, self.ring, w)

    def detach(self) -> None:
        """Stop feeding the worker and close the parent's pipe ends."""
        self.listener.ctx.pump.remove(self)
        if self.wfd >= 0:
            os.close(self.wfd)
            self.wfd = -1

    def kill(self) -> None:
        """SIGKILL the worker now (a stop past its grace); the supervisor reaps it."""
        self.close_deadline = 0.0
        if self.proc is not None:
            self.proc.kill()

    def close(self) -> None:
        """Ask the worker to leave: STOP flag, then EOF on its pipe."""
        if self.closing:
            return
        self.closing = True
        self.slot[STOP] = 1
        self.detach()
        self.close_deadline = time.monotonic() + self.listener.ctx.close_grace
        if self.proc is None:
            self.exited.set()
