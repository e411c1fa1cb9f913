"""Listeners: a registration, its lanes (worker + pipe + ring) or its thread.

A ``Registration`` is what ``Distributor.add_listener`` returns. Process
listeners own one ``Lane`` per worker; thread listeners own one object ``Ring``
and one thread. The distributor calls ``route`` then ``put`` for each
notification; the supervisor (``fanout.supervisor``) calls the lane methods that
start, reap and rewind workers.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import mmap
import operator
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from fanout._impl import FrameRing, Ring
from fanout._isolation import WorkerProcess, before_start, slot_stride
from fanout._logs import error_log
from fanout._procs import ensure_forkserver
from fanout._protocol import (
    DONE,
    ERRORS,
    HANDLED,
    HEADER_SIZE,
    HIST,
    NBUCKETS,
    PID,
    SLOT_BYTES,
    SLOT_WORDS,
    START_NS,
    STARTED,
    STOP,
)
from fanout.codec import misfit_text, schema_converter
from fanout.errors import ListenerFull, RingClosed, RingFull
from fanout.handlers import build_handler
from fanout.notifications import Add, Delete, Notification, RawFrame, Update
from fanout.stats import ListenerStats, bucket_of, percentile
from fanout.worker import FdArg, WorkerSpec, producer_fanout, worker_main

if TYPE_CHECKING:
    from fanout.distributor import Distributor

__all__ = ["Registration"]

log = logging.getLogger("fanout")

STUCK_AFTER = 3  # start-up failures in a row after which drain gives up on a lane
PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: the producer rarely waits on a full pipe
RING_INITIAL_BYTES = 64 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PRODUCER_FANOUT = producer_fanout()


def default_key(n: Notification) -> Hashable | None:
    """``(namespace, name)`` of the object's ``metadata`` when present, else None."""
    obj = n.new if type(n) is Update else n.obj  # type: ignore[union-attr]
    if type(obj) is dict:
        md = obj.get("metadata")
        if type(md) is dict:
            name = md.get("name")
            if name is not None:
                return (md.get("namespace"), name)
    return None


def lane_ring(bound: int | None, overflow: str) -> Any:
    """A lane's ``FrameRing`` for a listener's ``max_pending_bytes`` and ``overflow``."""
    normal = RING_INITIAL_BYTES
    if bound is not None:
        normal = min(normal, bound)
    # drop_oldest can only drop frames not yet sent to the worker: keep half the
    # bound for them by capping what is in flight.
    inflight = max(1, bound // 2) if bound is not None and overflow == "drop_oldest" else None
    return FrameRing(normal, normal, bound, inflight)


def close_rings(lanes: list[Any]) -> None:
    """Make every lane's ring take no more frames (those held stay)."""
    for lane in lanes:
        lane.ring.close()


def settle_rings(reg: Registration, lanes: list[Any], reason: str | None) -> list[Any]:
    """Settle the frames ``lanes`` still hold for ``reg`` once nothing consumes them.

    Each lane acks first what its consumer finished (delivered, not lost).
    Returns the ``on_dead_letter`` calls, as ``Registration.settle`` does.
    """
    calls: list[Any] = []
    for lane in lanes:
        lane.ring.close()
        lane.ack()
        items: list[Any] = lane.ring.take_all()
        if reason is not None and getattr(reg._dist, "arena", None) is not None:
            # Decoded now, while their shared-memory blocks are held: the
            # on_dead_letter calls come after the stop freed the arena.
            items = [reg.decoded(item) for item in items]
        calls += reg._settle_items(items, reason)
    return calls


class Registration:
    """One listener of a ``Distributor``: the handle ``add_listener`` returns.

    Not built directly. Pass it to ``remove_listener`` / ``shutdown_listener``;
    it stays usable after both and after ``stop()`` (``stats()`` then shows the
    final counts). It cannot be pickled: it belongs to the producer's process.

    Attributes:
        name: The listener's name (given to ``add_listener``, or generated).
        executor: ``"process"``, ``"thread"`` or ``"ray"``.
        workers: Number of worker processes (1 for a thread listener).
        resync_period: The resync period in force, in seconds, after client-go's
            clamping rules; 0 means never.
    """

    executor = "?"

    def __init__(self, dist: Distributor, opts: dict[str, Any]) -> None:
        self._dist = dist
        self.name: str = opts["name"]
        self.workers: int = opts["workers"]
        self.requested_resync: float = opts["resync_period"]
        self.resync_period: float = 0.0
        self.next_resync = 0.0
        self.syncing = True  # client-go: a new listener is a syncing listener
        self.key: Callable[[Any], Hashable] | None = opts["key"]
        self.on_error = opts["on_error"]
        self.on_dead_letter = opts["on_dead_letter"]
        self.max_attempts: int = opts["max_attempts"]
        self.handler_timeout: float | None = opts["handler_timeout"]
        self.max_pending_bytes: int | None = opts["max_pending_bytes"]
        self.overflow: str = opts["overflow"]
        self.removed = False
        self.dropped = 0
        self.dead_lettered = 0
        self.restarts = 0
        # Accepted but never queued (dropped on arrival): received counts them too.
        self.unqueued = 0
        # Set by stop() for the listeners it settles itself (with its reason).
        self.stop_settles = False
        self.settled_count = 0  # notifications settle() dropped or dead-lettered

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"<Registration {self.name!r} {self.executor} workers={self.workers} {state}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Registration belongs to its Distributor's process; it cannot be pickled"
        )

    # -- sync ------------------------------------------------------------------------

    def has_synced(self) -> bool:
        """Tell whether this listener has caught up with the initial state.

        Returns:
            True once the producer called ``Distributor.mark_synced()`` and the
            handler returned from every initial-list add it was given (one that
            raised or was dead-lettered counts as finished). A removed listener
            counts as finished too.
        """
        return self._dist.producer_synced and self._initial_done()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until ``has_synced()`` is true.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            True when synced, False when the timeout passed first.
        """
        return _poll(self.has_synced, timeout)

    def _initial_done(self) -> bool:
        raise NotImplementedError

    def ready(self) -> bool:
        """Tell whether the listener runs.

        Returns:
            True when every worker (or the thread) has started and loaded its
            handler; False before ``start()``, while a worker restarts, and after
            the listener stopped.
        """
        raise NotImplementedError

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until ``ready()`` is true.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            True when ready, False when the timeout passed first.
        """
        return _poll(self.ready, timeout)

    def latency_histogram(self) -> list[int]:
        """Return the latency histogram behind the ``stats()`` percentiles.

        Returns:
            Counts of handler calls per bucket of time from ``distribute`` to
            handler start, all workers summed; ``fanout.stats.bucket_of`` maps a
            latency in nanoseconds to its bucket (4 buckets per octave).
        """
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """The executor-specific part of ``stats()``."""
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        """Return the process ids of the running workers.

        Returns:
            One pid per running worker; empty for a thread listener.
        """
        return []

    def stuck(self) -> bool:
        """Tell whether a worker keeps failing to start (so nothing drains)."""
        return False

    # -- lifecycle, driven by the distributor (its lock held) ------------------------

    def start(self) -> None:
        """Start the workers or the thread."""
        raise NotImplementedError

    def close(self, drain: bool = False) -> None:
        """Stop taking notifications and ask the workers or the thread to leave."""
        raise NotImplementedError

    def close_input(self) -> None:
        """Take no more notifications; what is queued is still handled."""
        raise NotImplementedError

    def exited(self) -> bool:
        """Tell whether every worker or the thread has ended."""
        raise NotImplementedError

    def release(self) -> None:
        """Free what outlives the workers (shared memory)."""

    def drained(self) -> bool:
        """Tell whether everything queued was handled."""
        raise NotImplementedError

    def never_started(self) -> bool:
        """Tell whether no worker of this listener ever became ready."""
        return False

    def settle(self, reason: str | None) -> list[Callable[[], None]]:
        """Account for what is still queued once nothing handles it any more.

        With ``reason`` None it is dropped (counted in ``dropped``); otherwise it
        is dead-lettered with that reason. ``settled_count`` grows by how many.
        Returns the ``on_dead_letter`` calls to make, outside the distributor's
        lock.
        """
        raise NotImplementedError

    def _settle_items(self, items: list[Any], reason: str | None) -> list[Callable[[], None]]:
        """Count ``items`` (payloads or notifications) as dropped or dead-lettered."""
        if not items:
            return []
        self.settled_count += len(items)
        if reason is None:
            self.dropped += len(items)
            return []
        self.dead_lettered += len(items)
        # One log line for them all (not one per item); on_dead_letter per item.
        log.warning(
            "listener %r: %d notifications dead-lettered: %s", self.name, len(items), reason
        )
        return [
            functools.partial(self.dead_letter_item, item, reason, quiet=True) for item in items
        ]

    def decoded(self, payload: bytes | bytearray) -> Notification | RawFrame:
        """The notification ``payload`` holds, or a ``RawFrame`` saying why not."""
        try:
            return self._dist.codec.decode(payload)[0]
        except Exception as exc:
            return RawFrame(bytes(payload), f"cannot be decoded: {exc!r}")

    def dead_letter_item(self, item: Any, reason: str, quiet: bool = False) -> None:
        """Report ``item`` (a notification or an encoded payload) as dead-lettered.

        ``quiet``: call ``on_dead_letter`` only (the caller logged a summary).
        """
        if isinstance(item, (bytes, bytearray)):
            item = self.decoded(item)
        if quiet:
            self._callback(self.on_dead_letter, item, reason)
        else:
            self.report_dead_letter(item, reason)

    def stats(self) -> ListenerStats:
        """Return a snapshot of this listener's counters.

        Cheap (no system call), safe from any thread, and valid after ``stop()``.

        Returns:
            The counters and latency percentiles at the time of the call.
        """
        hist = self.latency_histogram()
        return ListenerStats(
            name=self.name,
            executor=self.executor,
            workers=self.workers,
            dropped=self.dropped,
            dead_lettered=self.dead_lettered,
            restarts=self.restarts,
            latency_p50=percentile(hist, 0.5),
            latency_p99=percentile(hist, 0.99),
            latency_max=percentile(hist, 1.0),
            **self.counters(),
        )

    # -- reporting (called outside the distributor's lock) ---------------------------

    def report_error(self, n: Notification | RawFrame | None, text: str) -> None:
        """Log a handler exception (repeats summarised) and pass it to ``on_error``."""
        error_log.report(self._dist, self.name, n, text, self._dist.supervisor.wake)
        self._callback(self.on_error, n, text)

    def report_dead_letter(self, n: Notification | RawFrame | None, reason: str) -> None:
        """Log a dead-lettered notification and pass it to ``on_dead_letter``."""
        log.warning("listener %r: dead-lettered %r: %s", self.name, n, reason)
        self._callback(self.on_dead_letter, n, reason)

    def _callback(self, func: Callable[..., Any] | None, n: Any, text: str) -> None:
        if func is None:
            return
        try:
            func(self, n, text)
        except BaseException:  # even SystemExit: the supervisor must go on
            log.exception("listener %r: callback %r raised", self.name, func)


def _poll(predicate: Callable[[], bool], timeout: float | None) -> bool:
    """Poll ``predicate`` with a growing nap until true or ``timeout`` passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.0005
    while not predicate():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    return True


class ProcessListener(Registration):
    """A listener whose handler runs in ``workers`` processes, one lane each."""

    executor = "process"

    def __init__(self, dist: Distributor, opts: dict[str, Any]) -> None:
        super().__init__(dist, opts)
        self.handler_blob: bytes = opts["handler_blob"]
        self.is_factory: bool = opts["is_factory"]
        self.schema_blob: bytes | None = opts.get("schema_blob")
        self.rr = 0
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
        self.lanes = [
            Lane(self, i, lane_ring(self.max_pending_bytes, self.overflow))
            for i in range(self.workers)
        ]
        for lane in self.lanes:  # the pump frees what the worker finished
            lane.ring.set_ack_source(self.slots[lane.index], DONE)

    # -- producer side ---------------------------------------------------------------

    def route(self, n: Notification) -> Lane:
        """Pick the lane of ``n``: by key, so one object's notifications keep order."""
        lanes = self.lanes
        if len(lanes) == 1:
            return lanes[0]
        key = self.key(n.new if type(n) is Update else n.obj) if self.key else default_key(n)  # type: ignore[union-attr]
        if key is None:
            self.rr += 1
            return lanes[self.rr % len(lanes)]
        return lanes[hash(key) % len(lanes)]

    def check_room(self, lane: Lane, payload: bytes) -> None:
        """Raise ``ListenerFull`` if ``payload`` cannot go to ``lane`` (before any put)."""
        need = len(payload) + HEADER_SIZE
        bound = self.max_pending_bytes
        assert bound is not None
        if need > bound:
            raise ListenerFull(
                f"listener {self.name!r}: a notification of {need} bytes can never fit "
                f"max_pending_bytes={bound}; nothing was distributed. Raise "
                f"max_pending_bytes above the largest notification"
            )
        waits_for_start = self.overflow == "block" and not self._dist.started
        if self.overflow != "error" and not waits_for_start:
            return
        ring = lane.ring
        if ring.nbytes + need > bound:
            lane.ack()
            if ring.nbytes + need > bound and waits_for_start:
                # No worker runs before start(): "block" would wait for start()
                # itself, which distribute must never do.
                raise ListenerFull(
                    f"listener {self.name!r} lane {lane.index} is full before start(): "
                    f"{ring.nbytes} of max_pending_bytes={bound} bytes queued, and "
                    f"nothing drains until start(); nothing was distributed. Call "
                    f"start() first, or raise max_pending_bytes"
                )
            if ring.nbytes + need > bound:
                raise ListenerFull(
                    f"listener {self.name!r} lane {lane.index} is full: {ring.nbytes} of "
                    f"max_pending_bytes={bound} bytes pending; nothing was distributed. "
                    f"Let the handler catch up, raise max_pending_bytes, or use "
                    f"overflow='block', 'drop_oldest' or 'drop_newest'"
                )

    def put(self, lane: Lane, payload: bytes) -> None:
        """Append an encoded notification to ``lane``, applying the overflow policy.

        A closed lane (listener removed or stopping) takes nothing: the caller
        checks whether the distributor is stopping.
        """
        try:
            lane.ring.append(payload)  # the pump acks what the worker finished
        except RingFull:
            self._put_full(lane, payload)
        except RingClosed:
            pass

    def _put_full(self, lane: Lane, payload: bytes) -> None:
        ring = lane.ring
        lane.ack()
        try:
            ring.append(payload)
            return
        except (RingFull, RingClosed):
            if ring.closed:
                return
        policy = self.overflow
        if policy == "drop_newest":
            self.dropped += 1
            self.unqueued += 1
        elif policy == "drop_oldest":
            bound = self.max_pending_bytes
            assert bound is not None
            # max(0): acks may have made room since the append failed (the pump,
            # or a Ray listener's sender, frees frames concurrently).
            need = max(0, ring.nbytes + len(payload) + HEADER_SIZE - bound)
            frames, _ = ring.drop_unsent(need)
            self.dropped += frames
            try:
                ring.append(payload)
            except RingFull:  # frames in flight fill the bound: the newest goes
                self.dropped += 1
                self.unqueued += 1
            except RingClosed:
                pass
        elif policy == "error":  # check_room passed, then the ring filled: a race
            raise ListenerFull(f"listener {self.name!r} lane {lane.index} is full")
        else:
            self._put_blocking(lane, payload)

    def _put_blocking(self, lane: Lane, payload: bytes) -> None:
        """Wait for room (backpressure); give up only when the listener goes away."""
        delay = 50e-6
        dist = self._dist
        while True:
            if self.removed or dist.stopping:
                self.dropped += 1
                self.unqueued += 1
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
            lane.ack()
            try:
                lane.ring.append(payload)
                return
            except RingFull:
                continue
            except RingClosed:
                return

    def add_initial(self, payloads: list[tuple[Lane, bytes]]) -> None:
        """Queue the initial list and remember, per lane, where it ends."""
        for lane, payload in payloads:
            self.put(lane, payload)
            lane.initial_seq = lane.ring.last_seq

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start every lane's worker (distributor lock held)."""
        for lane in self.lanes:
            lane.spawn()

    def close(self, drain: bool = False) -> None:
        """Ask every worker to leave and stop feeding it (distributor lock held).

        The rings take no more frames from here on, so what they hold is final
        for ``settle``.
        """
        for lane in self.lanes:
            lane.ring.close()
            lane.close()

    def close_input(self) -> None:
        """Take no more frames; the workers go on with those held."""
        close_rings(self.lanes)

    def settle(self, reason: str | None) -> list[Callable[[], None]]:
        """Account for the frames still held once the workers are gone."""
        return settle_rings(self, self.lanes, reason)

    def never_started(self) -> bool:
        """Tell whether no worker of this listener ever became ready."""
        return not any(lane.ever_ready for lane in self.lanes)

    def exited(self) -> bool:
        """Tell whether every worker has exited and been reaped."""
        return all(lane.proc is None for lane in self.lanes)

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
        for lane in self.lanes:
            lane.ack()
            if len(lane.ring):
                return False
        return True

    def stuck(self) -> bool:
        """Tell whether a lane's worker keeps failing to start (nothing drains)."""
        return any(
            lane.start_failures >= STUCK_AFTER or lane.start_error is not None
            for lane in self.lanes
        )

    def _initial_done(self) -> bool:
        if self.removed:  # nothing more will be handled: do not hang unsynced
            return True
        for lane in self.lanes:
            if lane.initial_seq and int(lane.slot[DONE]) < lane.initial_seq:
                lane.ack()
                if len(lane.ring) and lane.ring.acked_seq < lane.initial_seq:
                    return False
        return True

    def counters(self) -> dict[str, int]:
        """Pending frames and bytes, handled and failed calls, across lanes."""
        pending = pending_bytes = capacity = 0
        for lane in self.lanes:
            lane.ack()
            pending += len(lane.ring)
            pending_bytes += lane.ring.nbytes
            capacity += lane.ring.capacity
        return {
            # Every frame appended took the next sequence number of its lane.
            "received": self.unqueued + sum(lane.ring.last_seq for lane in self.lanes),
            "pending": pending,
            "pending_bytes": pending_bytes,
            "capacity_bytes": capacity,
            "delivered": int(self.slots[:, HANDLED].sum()),
            "errors": int(self.slots[:, ERRORS].sum()),
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


class Lane:
    """One worker process, its data pipe, return pipe, ring and progress slot.

    State belongs to the distributor's lock; the pump reads the ring and the pipe
    under their own locks.
    """

    def __init__(self, listener: ProcessListener, index: int, ring: Any) -> None:
        self.listener = listener
        self.index = index
        self.ring = ring
        self.slot = listener.slots[index]
        self.proc: Any = None
        self.wfd = -1  # data pipe, parent's (write) end, non-blocking
        self.rfd = -1  # return pipe, parent's (read) end, non-blocking
        self.rbuf = bytearray()
        self.ready = False
        self.ever_ready = False
        # Until the first worker said ready or died: start() waits for that.
        self.first_start = True
        self.start_error: str | None = None  # why the first start cannot succeed
        self.fatal = False  # the worker reported a start-up or frame failure
        self.fatal_text = ""
        self.corrupt = False  # the worker wrote impossible progress: trust none of it
        self.closing = False
        self.initial_seq = 0
        self.attempts: dict[int, int] = {}
        self.undecodable: set[int] = set()  # seqs reported undecodable, not yet acked
        self.kill_reason: str | None = None
        self.kill_at = 0.0  # when a SIGTERM'ed worker gets SIGKILL
        self.close_deadline = 0.0
        self.respawn_at = 0.0
        self.backoff = 0.0
        self.start_failures = 0  # deaths in a row before the worker said ready
        self.idle_deaths = 0  # deaths in a row that finished no frame
        self.done_at_spawn = 0
        self.exited = threading.Event()

    def __repr__(self) -> str:
        return f"<Lane {self.listener.name!r}[{self.index}]>"

    def ack(self) -> None:
        """Free ring frames the worker has finished (read from its progress slot)."""
        self.ring.ack_from_source()

    def spawn(self) -> None:
        """Start a worker for this lane and attach its pipe to the pump."""
        listener = self.listener
        dist = listener._dist
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
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size: keep the default
            spec = WorkerSpec(
                listener=listener.name,
                lane=self.index,
                handler_blob=listener.handler_blob,
                is_factory=listener.is_factory,
                codec_blob=dist.codec_blob,
                slot_offset=self.index * listener.slot_stride,
                fanout_dir=PRODUCER_FANOUT[0],
                fanout_version=PRODUCER_FANOUT[1],
                schema_blob=listener.schema_blob,
                arena_size=0 if dist.arena is None else dist.arena.size,
            )
            # The shared-memory arena, which the worker maps read-only.
            arena_fd = () if dist.arena is None else (FdArg(dist.arena.fd),)
            before_start(dist.start_method)  # a frozen forkserver is replaced first
            if dist.start_method == "forkserver":
                ensure_forkserver()  # (again, if it died) importing our fanout
            proc = dist.mp_context.Process(  # type: ignore[attr-defined]
                target=worker_main,
                args=(spec, FdArg(r), FdArg(rw), FdArg(listener.memfd), *arena_fd),
                name=f"fanout-{listener.name}-{self.index}",
                daemon=True,
            )
            proc.start()
            # Watched by pidfd: a handler that kills or freezes the forkserver (its
            # parent) does not make every other worker look dead.
            proc = WorkerProcess(proc, dist.start_method)
        except BaseException:
            for fd in (w, rr):
                os.close(fd)
            raise
        finally:
            os.close(r)
            os.close(rw)
        os.set_blocking(w, False)
        os.set_blocking(rr, False)
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
        self.ring.rewind()
        dist.pump.add(self, self.ring, w)

    def detach(self) -> None:
        """Stop feeding the worker and close the parent's pipe ends."""
        self.listener._dist.pump.remove(self)
        if self.wfd >= 0:
            os.close(self.wfd)
            self.wfd = -1

    def close(self) -> None:
        """Ask the worker to leave: STOP flag, then EOF on its pipe."""
        if self.closing:
            return
        self.closing = True
        self.slot[STOP] = 1
        self.detach()
        self.close_deadline = time.monotonic() + self.listener._dist.close_grace
        if self.proc is None:
            self.exited.set()


class ThreadListener(Registration):
    """A listener whose handler runs in one in-process thread fed from a ``Ring``.

    The notification objects themselves are passed (no copy, no codec): for
    cheap, trusted handlers.
    """

    executor = "thread"

    def __init__(self, dist: Distributor, opts: dict[str, Any]) -> None:
        super().__init__(dist, opts)
        self.handler = build_handler(opts["handler"], opts["is_factory"])
        self.schema = opts.get("schema")
        self.to_schema: Callable[[Any], Any] | None = None
        self.misfit: type[Exception] = Exception
        if self.schema is not None:
            import msgspec  # add_listener checked it is installed

            self.to_schema = schema_converter(self.schema)
            self.misfit = msgspec.ValidationError
        self.ring = Ring(0, 16)
        self.cond = threading.Condition(threading.Lock())
        self.waiting = False
        self.stopping = False
        self.discard = False  # stopping without a drain: handle nothing more
        self.leftover: list[Any] = []  # taken from the ring, then discarded: for settle
        self.settled = False  # settle() ran: the thread accounts for what it still holds
        self.final_reason: str | None = None
        # The batch the thread works through. Each item is taken exactly once,
        # by the thread or by settle(): next() on a list iterator is atomic.
        self.batch_it: Iterator[tuple[Notification, int]] = iter(())
        self.in_call = False  # the thread is inside a handler call
        self.received = 0
        self.delivered = 0
        self.errors = 0
        self.initial_left = 0
        self.hist = [0] * NBUCKETS
        self.thread: threading.Thread | None = None

    def put(self, item: tuple[Notification, int]) -> None:
        """Queue ``(notification, t_ns)`` for the thread (nothing once it is closed)."""
        with self.cond:
            if self.stopping:
                return
            self.ring.write_one(item)
            self.received += 1
            if self.waiting:
                self.cond.notify()

    def add_initial(self, items: list[tuple[Notification, int]]) -> None:
        """Queue the initial list (counted for ``has_synced``)."""
        self.initial_left += len(items)
        for item in items:
            self.put(item)

    def start(self) -> None:
        """Start the thread."""
        self.thread = threading.Thread(target=self._run, name=f"fanout-{self.name}", daemon=True)
        self.thread.start()

    def close(self, drain: bool = False) -> None:
        """Take nothing more; the thread leaves after what is queued, if ``drain``.

        Without ``drain`` it leaves after the call it is in; what it leaves
        behind is counted by ``settle``.
        """
        with self.cond:
            self.stopping = True
            self.discard = not drain
            self.cond.notify()

    def close_input(self) -> None:
        """Take no more notifications; the thread handles those queued, then leaves."""
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def settle(self, reason: str | None) -> list[Callable[[], None]]:
        """Account for the notifications still queued."""
        with self.cond:
            self.stopping = self.discard = True
            self.settled, self.final_reason = True, reason
            left, self.leftover = self.leftover, []
            left += [item[0] for item in self.batch_it]  # what the thread has not taken
            while True:
                item, ok = self.ring.read_one()
                if not ok:
                    break
                left.append(item[0])
            self.cond.notify()
        return self._settle_items(left, reason)

    def exited(self) -> bool:
        """Tell whether the thread has ended (or never started)."""
        return self.thread is None or not self.thread.is_alive()

    def drained(self) -> bool:
        """Tell whether everything queued was handled."""
        with self.cond:
            return (
                len(self.ring) == 0
                and operator.length_hint(self.batch_it) == 0
                and not self.in_call
            )

    def _initial_done(self) -> bool:
        return self.initial_left <= 0 or self.removed  # removed: nothing more comes

    def ready(self) -> bool:
        """Tell whether the thread has started."""
        return self.thread is not None and self.thread.is_alive()

    def latency_histogram(self) -> list[int]:
        """Counts per latency bucket (``fanout.stats.bucket_of``)."""
        return list(self.hist)

    def _run(self) -> None:
        ring, cond, handler = self.ring, self.cond, self.handler
        on_add, on_update, on_delete = handler.on_add, handler.on_update, handler.on_delete
        hist = self.hist
        monotonic_ns = time.monotonic_ns
        while True:
            batch: list[tuple[Any, int]] = []  # (notification, t_ns)
            with cond:
                while not len(ring) or self.discard:
                    if self.stopping:
                        return
                    self.waiting = True
                    cond.wait()
                    self.waiting = False
                while len(batch) < 256:
                    item, ok = ring.read_one()
                    if not ok:
                        break
                    batch.append(item)
                self.batch_it = it = iter(batch)
            while True:
                # Flagged before the item is taken, so drained() never sees an
                # item that is neither in the batch nor in a call.
                self.in_call = True
                item = next(it, None)
                if item is None:
                    self.in_call = False
                    break
                n, t_ns = item
                if self.discard:  # stopped: n and the rest are settled, not handled
                    self._give_back(n)
                    self.in_call = False
                    break
                hist[bucket_of(monotonic_ns() - t_ns)] += 1
                typed = n if self.to_schema is None else self._typed(n)
                if typed is not None:
                    cls = type(typed)
                    try:
                        if cls is Update:
                            on_update(typed.old, typed.new)  # type: ignore[union-attr]
                        elif cls is Add:
                            on_add(typed.obj, typed.is_in_initial_list)  # type: ignore[union-attr]
                        else:
                            on_delete(typed.obj)  # type: ignore[union-attr]
                    except BaseException:  # even SystemExit: the listener must go on
                        self.errors += 1
                        self.report_error(n, traceback.format_exc())
                    self.delivered += 1
                if self.initial_left > 0:  # the initial list is queued first
                    self.initial_left -= 1
                self.in_call = False

    def _give_back(self, n: Notification) -> None:
        """Account for ``n`` and the rest of the batch: settle() did or will."""
        with self.cond:
            rest = [n, *(item[0] for item in self.batch_it)]
            if self.settled:
                calls = self._settle_items(rest, self.final_reason)
            else:
                self.leftover.extend(rest)
                calls = []
        for call in calls:
            call()

    def _typed(self, n: Notification) -> Notification | None:
        """``n`` with its objects converted to the schema; None (dead-lettered) on a misfit.

        As in a worker: an object that does not fit never will, so it is not retried.
        """
        convert = self.to_schema
        assert convert is not None
        role = "object"
        try:
            if type(n) is Update:
                if n.old is n.new:
                    obj = convert(n.new)
                    return Update(obj, obj)
                role = "old object"
                old = convert(n.old)
                role = "new object"
                return Update(old, convert(n.new))
            if type(n) is Add:
                return Add(convert(n.obj), n.is_in_initial_list)
            return Delete(convert(n.obj))  # type: ignore[union-attr]
        except self.misfit as exc:
            self.dead_lettered += 1
            self.report_dead_letter(n, misfit_text(self.schema, role, str(exc)))
            return None
        except Exception as exc:  # the schema's own code raised (__post_init__, ...)
            self.dead_lettered += 1
            self.report_dead_letter(
                n, misfit_text(self.schema, role, f"building it raised {exc!r}")
            )
            return None

    def counters(self) -> dict[str, int]:
        """Pending items, handled and failed calls (no bytes: objects are passed)."""
        return {
            "received": self.received,
            "pending": len(self.ring) + operator.length_hint(self.batch_it) + self.in_call,
            "pending_bytes": 0,
            "capacity_bytes": 0,
            "delivered": self.delivered,
            "errors": self.errors,
        }
