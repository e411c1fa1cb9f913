"""Ray listeners: a listener whose lanes are Ray actors, fed in batches from its rings.

Each lane keeps the ``FrameRing`` a process lane has, filled by ``distribute`` the
same way. Instead of the pump and a pipe to a worker, one sender thread per
listener takes the lane's unsent frames (up to ``BATCH_BYTES``) and submits them in
ONE actor call, with at most ``MAX_INFLIGHT`` calls in flight per actor. A result
acknowledges its frames (the ring frees them) and carries handler errors, undecodable
frames and the frames' distribute timestamps. A lane, and how it cuts and submits
its batches, is ``fanout.listeners.ray_lane``; this module starts and stops the
actors and accounts for the results.

Failures are Ray's to repair and fanout's to account for: actors run with
``max_restarts=-1`` and no task retries. When a call fails (the actor or its node
died, or the actor killed itself past ``handler_timeout``), the lane opens a new
generation: the ring rewinds to the first frame not acknowledged and, once the
restarted actor answers ``ready()``, resends from there. The frames of the batch
that failed are resent one per call, so the frame that kills its actor is the only
one charged attempts; after ``max_attempts`` it is dead-lettered.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fanout.buffers.ray_store import RayPayload, RayStore
from fanout.core.options import ListenerOptions
from fanout.core.ray_options import import_ray
from fanout.listeners.base import ListenerContext, decode_or_raw
from fanout.listeners.lanes import LaneListener
from fanout.listeners.ray_lane import Batch, RayLane
from fanout.notifications import RawFrame
from fanout.wire.codec import MsgpackCodec, MsgspecCodec
from fanout.wire.protocol import HEADER_SIZE, NBUCKETS
from fanout.worker.ray_actor import LaneActor, progress_path

__all__ = ["RayCluster", "RayListener"]

log = logging.getLogger("fanout")

# Defaults from the batch-size sweep in docs/ray.md (benchmarks/ray_batch_sweep.py):
# small objects stop gaining at about 1 MiB per call, Pods (4.5 KB) still gain up
# to 4 MiB. It is a cap: the sender submits what waits, so a light load makes small
# batches and low latency; only a backlog fills batches up to it.
BATCH_BYTES = 4 << 20
MAX_INFLIGHT = 2  # calls per actor: one running, one queued behind it (4 gained nothing)
LEAVE_WAIT = 1.0  # seconds close() lets the actors remove their progress files
STOP_WAIT = 10.0  # seconds close() waits for the sender thread and the actors


class RayCluster:
    """The Ray cluster a distributor's Ray listeners use.

    The one the program initialised (``ray.init(address=...)``) is used and never
    shut down; otherwise a local one is started on loopback and shut down with
    the distributor.
    """

    def __init__(self) -> None:
        self.owned = False
        self.attached = False

    def attach(self) -> None:
        """Make sure Ray is initialised (start a local cluster if it is not)."""
        ray = import_ray()
        if self.attached:
            return
        self.attached = True
        if ray.is_initialized():
            return
        # Without it, Ray on this kind of host advertises a public address; with it,
        # the local cluster binds to loopback only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(
            # "local": a new cluster of our own, even when another program on this
            # machine runs one (ray.init() would join that one instead).
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
        )
        self.owned = True

    def detach(self) -> None:
        """Shut the cluster down if this distributor started it."""
        if self.owned:
            self.owned = False
            import_ray().shutdown()


class RayListener(LaneListener):
    """A listener whose handler runs in ``workers`` Ray actors, one lane each."""

    executor = "ray"

    def __init__(self, ctx: ListenerContext, opts: ListenerOptions) -> None:
        super().__init__(ctx, opts)
        self.ray = import_ray()
        with ctx.ray_lock:  # one for the distributor's Ray listeners: one put each
            if ctx.ray_store is None:
                ctx.ray_store = RayStore(self.ray, ctx.codec.encode)
                ctx.ray_store.encoder(ctx.codec)  # made here, under the lock
        self.store: RayStore = ctx.ray_store
        self.ray_options: dict[str, Any] = opts.ray_options or {}
        self.batch_bytes = BATCH_BYTES
        self.max_inflight = MAX_INFLIGHT
        self.delivered = 0
        self.errors = 0
        self.hist = np.zeros(NBUCKETS, dtype=np.int64)
        self.lanes: list[RayLane] = [
            RayLane(self, i, ring, self.store) for i, ring in enumerate(self.make_rings())
        ]
        self.wake = threading.Event()
        self.idle = False
        self.stopping = False
        self.failed = False  # the sender thread died of an unexpected error
        self.thread: threading.Thread | None = None
        self.actors_gone = True
        self._actor_ids: list[str] = []

    # -- producer side ---------------------------------------------------------------

    def encoder(self) -> Callable[[Any, int], bytes]:
        """Big buffers go into Ray's object store once, for every Ray listener."""
        if not isinstance(self.ctx.codec, (MsgpackCodec, MsgspecCodec)):
            return self.ctx.encode  # references are MessagePack ext values
        return self.store.encoder(self.ctx.codec)

    def put(self, lane: Any, payload: bytes) -> None:
        """Append a payload to ``lane`` (the overflow policy applies); wake the sender."""
        if type(payload) is RayPayload:
            # Noted before the append: the sender may submit the frame at once.
            seq = lane.ring.last_seq + 1
            lane.tokens.add(seq, payload.tokens)
            try:
                super().put(lane, payload)
            finally:
                if lane.ring.last_seq < seq:  # not taken (dropped on arrival, closed)
                    lane.tokens.retract(seq)
        else:
            super().put(lane, payload)
        self.wake_if_idle()

    def wake_if_idle(self) -> None:
        """Wake the sender thread if it sleeps (after an append)."""
        if self.idle:
            self.wake.set()

    def feed_route(self) -> tuple[tuple[Any, ...], Any, Any] | None:
        """Its lanes' rings and router, and the sender's wake: a bytes payload's ``put``."""
        if self.max_pending_bytes is not None:
            return None
        return tuple(lane.ring for lane in self.lanes), self.router, self.wake_if_idle

    def drop_unsent(self, lane: Any, nbytes: int) -> int:
        """Drop the oldest unsent frames, and let go of their Ray objects at once."""
        last = lane.ring.last_seq  # (the frame being put has its entry already)
        frames = super().drop_unsent(lane, nbytes)
        if frames and lane.tokens:
            lane.tokens.release_missing(set(lane.ring.seqs()), last)
        return frames

    def settle(self, reason: str | None) -> list[Callable[[], None]]:
        """Account for the frames still held, and let go of their Ray objects."""
        calls = super().settle(reason)
        for lane in self.lanes:
            lane.tokens.release_all()
        return calls

    def payloads_refer_out(self) -> bool:
        """Payloads may refer to objects in Ray's object store (``fanout.buffers.ray_store``)."""
        return True

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start Ray if needed, create the actors and the sender thread (no lock held)."""
        ctx = self.ctx
        with ctx.ray_lock:  # shared by the distributor's Ray listeners
            if ctx.ray_cluster is None:
                ctx.ray_cluster = RayCluster()
            ctx.ray_cluster.attach()
        ray = self.ray
        actor_class = ray.remote(LaneActor).options(
            **self.ray_options, max_restarts=-1, max_task_retries=0
        )
        self.actors_gone = False
        for lane in self.lanes:
            lane.open_pipe(self.batch_bytes)
            lane.actor = actor_class.remote(
                self.opts.handler_blob,
                self.opts.is_factory,
                ctx.codec_blob,
                self.opts.schema_blob,
                self.handler_timeout,
                self.opts.memory_limit,
            )
            lane.ready_ref = lane.actor.ready.remote()
            self._actor_ids.append(lane.actor._actor_id.hex())
        self.thread = threading.Thread(
            target=self._run, name=f"fanout-ray-{self.name}", daemon=True
        )
        with ctx.lock:  # stop() reads them to refuse a call from its own threads
            ctx.threads.add(self.thread)
        self.thread.start()

    def close(self, drain: bool = False) -> None:
        """Take nothing more and ask the sender to leave; it kills the actors itself.

        Never waits (the distributor's lock may be held): ``wait_exited`` waits
        for the sender and the actors; what the rings hold is final for
        ``settle`` after that.
        """
        for lane in self.lanes:
            lane.ring.close()
        self.stopping = True
        self.wake.set()

    def discard(self) -> bool:
        """Close after a removal; the sender drops what is left as it leaves."""
        self.close()
        thread = self.thread
        if thread is None or not thread.is_alive():  # nothing consumes the rings
            self.settle(None)
        return False

    def wait_exited(self, timeout: float | None) -> bool:
        """Wait for the sender, which kills the actors as it leaves (no lock held)."""
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(STOP_WAIT + 2 * LEAVE_WAIT if timeout is None else timeout)
        if thread is None or not thread.is_alive():
            self._kill_actors()  # the sender failed, or never ran: left to us
        return self.exited()

    def _kill_actors(self) -> None:
        """Kill every actor for good and wait until Ray reports each one dead."""
        if self.actors_gone:
            return
        ray = self.ray
        actors = [lane.actor for lane in self.lanes if lane.actor is not None]
        ids = [actor._actor_id.hex() for actor in actors]
        try:
            # Each actor removes its progress file once the calls queued before
            # are done; one that takes longer is killed regardless, below.
            ray.wait(
                [a.leave.remote() for a in actors], num_returns=len(actors), timeout=LEAVE_WAIT
            )
        except Exception:  # Ray is already gone: so are its actors
            log.debug("listener %r: asking the actors to leave failed", self.name, exc_info=True)
        probes = []
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
                probes.append(actor.ready.remote())
            except Exception:  # Ray is already gone: so are its actors
                log.debug("listener %r: ray.kill failed", self.name, exc_info=True)
        for probe in probes:
            try:
                ray.get(probe, timeout=STOP_WAIT)
            except Exception:
                pass  # expected: the actor is dead
        for actor_id in ids:  # left behind by an actor killed first, on this node
            try:
                os.unlink(progress_path(actor_id))
            except FileNotFoundError:
                pass
        for lane in self.lanes:
            lane.actor = None
            lane.ready = False
            lane.close_pipe()
        self.actors_gone = True

    def exited(self) -> bool:
        """Tell whether the sender has ended and every actor was killed."""
        return self.actors_gone and (self.thread is None or not self.thread.is_alive())

    def drained(self) -> bool:
        """Tell whether every frame was acknowledged (or dropped / dead-lettered)."""
        return all(not len(lane.ring) for lane in self.lanes)

    def stuck(self) -> bool:
        """Tell whether an actor cannot be built (or the sender died): nothing drains."""
        return self.failed or any(lane.start_error is not None for lane in self.lanes)

    def ready(self) -> bool:
        """Tell whether every actor runs (answered, and not being restarted)."""
        return all(lane.ready for lane in self.lanes)

    def _initial_done(self) -> bool:
        if self.removed:
            return True
        return all(lane.ring.acked_seq >= lane.initial_seq for lane in self.lanes)

    def counters(self) -> dict[str, int]:
        """Pending frames and bytes, handled and failed calls, across lanes."""
        return {
            "received": self.received(),
            "pending": sum(len(lane.ring) for lane in self.lanes),
            "pending_bytes": sum(lane.ring.nbytes for lane in self.lanes),
            "capacity_bytes": sum(lane.ring.capacity for lane in self.lanes),
            "delivered": self.delivered,
            "errors": self.errors,
        }

    def latency_histogram(self) -> list[int]:
        """Counts per latency bucket (distribute → completion acknowledged)."""
        return [int(x) for x in self.hist]

    def worker_pids(self) -> list[int]:
        """Ray listeners have no local worker processes: see ``actor_ids``."""
        return []

    def actor_ids(self) -> list[str]:
        """Return the ids of the Ray actors this listener made (hex), alive or not.

        Returns:
            One id per lane once started (Ray keeps the id across restarts); look
            them up in Ray's state API. Empty before ``start()``.
        """
        return list(self._actor_ids)

    # -- the sender thread -----------------------------------------------------------

    def _run(self) -> None:
        ray = self.ray
        try:
            while not self.stopping:
                calls: list[Callable[[], None]] = []
                for lane in self.lanes:
                    lane.probe()
                    lane.submit(self.batch_bytes, self.max_inflight)
                refs = [lane.ready_ref for lane in self.lanes if lane.ready_ref is not None]
                refs += [lane.probe_ref for lane in self.lanes if lane.probe_ref is not None]
                refs += [b.ref for lane in self.lanes for b in lane.inflight]
                if not refs:
                    self.idle = True
                    room = self.max_inflight
                    if not any(lane.room(room) and lane.waiting() for lane in self.lanes):
                        self.wake.wait(0.05)
                    self.idle = False
                    self.wake.clear()
                    continue
                full = all(
                    len(lane.inflight) >= lane.room(self.max_inflight) or not lane.waiting()
                    for lane in self.lanes
                )
                # Frames that arrive while we wait here for a result wait too: a
                # short nap bounds that (a lane with room and frames: shorter still).
                done, _ = ray.wait(refs, num_returns=1, timeout=0.005 if full else 0.001)
                if done:
                    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                finished = set(done)
                for lane in self.lanes:
                    self._collect(lane, finished, calls)
                for call in calls:  # on_error / on_dead_letter, no lane state held
                    call()
        except BaseException:  # the listener cannot go on: say so loudly
            self.failed = True  # stuck(): stop(drain=True) does not wait for it
            log.exception("listener %r: the Ray sender thread failed", self.name)
            # Its actors must not outlive it: a removal after this never waits
            # for the listener (wait_exited), so nothing else would kill them.
            try:
                self._kill_actors()
            except Exception:
                log.exception("listener %r: its Ray actors could not be killed", self.name)
            return
        self._leave()

    def _leave(self) -> None:
        """The sender's last act: kill the actors, and settle unless a stop will.

        Here, not in ``close``: ``close`` may run under the distributor's lock,
        and waiting for Ray must not.
        """
        self._kill_actors()
        if self.stop_settles:
            return  # the stop settles every listener once they all left
        reason = self.start_failure() if self.start_error is not None else None
        for call in self.settle(reason):
            call()

    def _collect(self, lane: RayLane, finished: set[Any], calls: list[Callable[[], None]]) -> None:
        ray = self.ray
        if lane.ready_ref is not None and lane.ready_ref in finished:
            ref, lane.ready_ref = lane.ready_ref, None
            try:
                ray.get(ref)
                lane.ready = lane.ever_ready = True
            except Exception as exc:
                lane.start_error = f"the Ray actor of lane {lane.index} could not start:\n{exc}"
                if not self.start_awaited:  # nobody raises it: report it, and leave
                    calls += self.ctx.listener_failed(self, lane.start_error)
                    self.stopping = True
            lane.first_start = False
        if lane.probe_ref is not None and lane.probe_ref in finished and not lane.probed(ray):
            self.restarts += 1  # it died again (or is not back yet), as a failed call counts
        while lane.inflight and lane.inflight[0].ref in finished:
            batch = lane.inflight.popleft()
            try:
                result = ray.get(batch.ref)
            except ray.exceptions.RayError as exc:
                self._failed(lane, batch, exc, calls)
                return
            if lane.inflight:
                lane.inflight[0].since = time.monotonic()
            if result is None:
                # A restarted actor refused a call meant for its predecessor, whose
                # death we have not seen yet: nothing of it ran, so send it all again.
                self.restarts += 1
                lane.rewind()
                return
            self._acknowledge(lane, result, calls)
        if lane.tokens:
            lane.tokens.release_upto(lane.ring.acked_seq)
        lane.kill_if_overdue(self.ray, self.handler_timeout)

    def _acknowledge(self, lane: RayLane, result: Any, calls: list[Callable[[], None]]) -> None:
        last, handled, errors, bad, stamps = result
        if last > lane.ring.acked_seq:
            lane.ring.ack(last)
        lane.ready = True
        for seq in [s for s in lane.attempts if s <= last]:
            del lane.attempts[seq]
        self.delivered += handled
        self.errors += len(errors)
        self._count(dead_lettered=len(bad))
        if stamps:
            self._record_latency(np.frombuffer(stamps, dtype=np.int64))
        for _seq, text, payload in errors:
            # Decoded here, in the sender thread, which holds no lock.
            n: Any = decode_or_raw(self.ctx.codec, payload) if payload else None
            calls.append(functools.partial(self.report_error, n, text))
        for _seq, why, payload in bad:
            raw = RawFrame(payload, why)
            calls.append(functools.partial(self.report_dead_letter, raw, why))

    def _record_latency(self, t_ns: np.ndarray) -> None:
        """Add distribute → acknowledged latencies to the histogram (``bucket_of`` numbering)."""
        ns = np.maximum(time.monotonic_ns() - t_ns, 1).astype(np.uint64)
        bits = np.floor(np.log2(ns.astype(np.float64))).astype(np.int64) + 1
        # float rounding near a power of two can be one bit off: correct it exactly
        bits -= ((np.uint64(1) << (bits - 1).astype(np.uint64)) > ns).astype(np.int64)
        bits += ((np.uint64(1) << bits.astype(np.uint64)) <= ns).astype(np.int64)
        shift = np.maximum(bits - 3, 0).astype(np.uint64)
        sub = np.where(bits >= 3, (ns >> shift) & np.uint64(3), 0).astype(np.int64)
        idx = np.minimum(4 * (bits - 1) + sub, NBUCKETS - 1)
        self.hist += np.bincount(idx, minlength=NBUCKETS)

    def _failed(
        self, lane: RayLane, batch: Batch, exc: BaseException, calls: list[Callable[[], None]]
    ) -> None:
        """A call failed: charge the frame if it ran alone, then rewind and resend."""
        self.restarts += 1
        lane.killed = False
        log.info(
            "listener %r lane %d: actor call failed (%s); resending",
            self.name,
            lane.index,
            type(exc).__name__,
        )
        if batch.single:
            seq = batch.last
            tries = lane.attempts[seq] = lane.attempts.get(seq, 0) + 1
            if tries >= self.max_attempts:
                del lane.attempts[seq]
                lane.ring.ack(seq)
                self._count(dead_lettered=1)
                causes = [f"ran past handler_timeout={self.handler_timeout}"]
                if self.opts.memory_limit is not None:
                    causes.append(f"grew past memory_limit={self.opts.memory_limit} bytes")
                reason = (
                    f"its handler call ended its Ray actor (died, {', or '.join(causes)}) "
                    f"{tries} times: {type(exc).__name__}"
                )
                payload = batch.data[HEADER_SIZE:]
                calls.append(lambda: self.dead_letter_item(payload, reason))
        else:
            lane.single_until = max(lane.single_until, batch.last)
        lane.rewind()
        lane.await_restart()
