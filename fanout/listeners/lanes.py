"""Listeners whose lanes are frame rings: what process and Ray listeners share.

``distribute`` encodes a notification once for all listeners that need the same
encoding (``Registration.encoder``); such a listener picks one lane by key
(``route``), checks room (``check_room``) and appends the payload to that lane's
``FrameRing`` (``put``), applying its overflow policy. What consumes a ring is the
subclass's business: the pump and a worker process (``listeners.process``), or a
sender thread and a Ray actor (``listeners.ray``). What every lane has is
``LaneBase``: ``index``, ``ring``, ``ack()`` (free what its consumer finished),
``initial_seq``, ``first_start``, ``start_error``, ``ever_ready``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fanout.buffers.arena import SharedPayload
from fanout.core.options import ListenerOptions
from fanout.core.poll import poll_until
from fanout.errors import ListenerFull, RingClosed, RingFull
from fanout.listeners.base import ListenerContext, Registration
from fanout.native.pick import FrameRing, Router
from fanout.notifications import Add, Notification
from fanout.wire.protocol import HEADER_SIZE

__all__ = ["LaneBase", "LaneListener", "lane_ring"]

RING_INITIAL_BYTES = 64 * 1024
DROPS = ("drop_newest", "drop_oldest")


def _real_bytes(payload: bytes) -> int:
    """The bytes a lane holds for ``payload``: its frame, and the arena blocks it refers to."""
    return len(payload) + HEADER_SIZE + (payload.nbytes if type(payload) is SharedPayload else 0)


class LaneBase:
    """What every lane of a ``LaneListener`` has: its place, its ring, how its start went.

    A process lane (``fanout.listeners.process.Lane``) adds its worker, pipes and
    progress slot; a Ray lane (``fanout.listeners.ray_lane.RayLane``) its actor and
    the calls in flight.
    """

    def __init__(self, listener: Registration, index: int, ring: Any) -> None:
        self.listener = listener
        self.index = index
        self.ring = ring
        self.ready = False
        self.ever_ready = False
        # Until the first worker said ready or died: start() waits for that.
        self.first_start = True
        self.start_error: str | None = None  # why the first start cannot succeed
        self.initial_seq = 0  # the initial list's last frame (0: none)
        self.attempts: dict[int, int] = {}  # deaths each frame caused so far
        self.wfd = self.rfd = -1  # the pipe ends the producer holds

    def ack(self) -> None:
        """Free the ring frames the lane's consumer has finished."""
        raise NotImplementedError


def lane_ring(bound: int | None, overflow: str) -> Any:
    """A lane's ``FrameRing`` for a listener's ``max_pending_bytes`` and ``overflow``."""
    normal = RING_INITIAL_BYTES
    if bound is not None:
        normal = min(normal, bound)
    # drop_oldest can only drop frames not yet sent to the worker: keep half the
    # bound for them by capping what is in flight.
    inflight = max(1, bound // 2) if bound is not None and overflow == "drop_oldest" else None
    return FrameRing(normal, normal, bound, inflight)


class LaneListener(Registration):
    """A listener with one ``FrameRing`` lane per worker; subclasses make the lanes."""

    def __init__(self, ctx: ListenerContext, opts: ListenerOptions) -> None:
        super().__init__(ctx, opts)
        self.lanes: list[Any] = []
        # Picks each notification's lane, here and in distribute's Feed alike.
        self.router = Router(self.workers, self.key)

    def _count_drops(self, held: int = 0, arriving: int = 0) -> None:
        """Count ``held`` frames dropped from a ring and ``arriving`` ones never appended."""
        self._count(dropped=held + arriving, unqueued=arriving)

    def make_rings(self) -> list[Any]:
        """One ring per worker, sized for the listener's bound and overflow policy."""
        return [lane_ring(self.max_pending_bytes, self.overflow) for _ in range(self.workers)]

    # -- producer side ---------------------------------------------------------------

    def mark_initial(self) -> None:
        """Every frame appended so far belongs to the initial list."""
        for lane in self.lanes:
            lane.initial_seq = max(lane.initial_seq, lane.ring.last_seq)

    def feed_route(self) -> tuple[tuple[Any, ...], Any, Any] | None:
        """Its lanes' rings and router: an unbounded lane's ``put`` is its ring's append."""
        if self.max_pending_bytes is not None or type(self).put is not LaneListener.put:
            return None
        return tuple(lane.ring for lane in self.lanes), self.router, None

    def route(self, n: Notification) -> Any:
        """Pick the lane of ``n``: by key, so one object's notifications keep order."""
        return self.lanes[self.router.index(n)]

    def arena_bytes(self, lane: LaneBase) -> int:
        """Bytes of the shared-memory arena ``lane``'s frames refer to (0 without one).

        As of the last ``catch_up``: a read, it frees nothing.
        """
        arena = self.ctx.arena
        return 0 if arena is None else arena.ring_bytes(lane.ring)

    def pending_bytes(self, lane: LaneBase) -> int:
        """The bytes ``lane`` holds: its ring's, and the arena blocks its frames refer to."""
        return int(lane.ring.nbytes) + self.arena_bytes(lane)

    def catch_up_lane(self, lane: LaneBase) -> None:
        """Let go of what ``lane``'s consumer finished: ring frames, then their arena blocks."""
        lane.ack()
        arena = self.ctx.arena
        if arena is not None:
            arena.catch_up(lane.ring)

    def catch_up(self) -> None:
        """``catch_up_lane`` for every lane."""
        for lane in self.lanes:
            self.catch_up_lane(lane)

    def _fits(self, lane: LaneBase, need: int) -> bool:
        """Tell whether ``need`` more bytes keep ``lane`` within ``max_pending_bytes``."""
        bound = self.max_pending_bytes
        return bound is None or self.pending_bytes(lane) + need <= bound

    def check_room(self, lane: LaneBase, payload: bytes) -> None:
        """Raise ``ListenerFull`` if ``payload`` cannot go to ``lane`` (before any put).

        The bound counts real bytes: a shared payload's arena blocks too.
        """
        need = _real_bytes(payload)
        bound = self.max_pending_bytes
        assert bound is not None
        if need > bound and self.overflow not in DROPS:
            raise ListenerFull(
                f"listener {self.name!r}: a notification of {need} bytes can never fit "
                f"max_pending_bytes={bound}; nothing was distributed. Raise "
                f"max_pending_bytes above the largest notification"
            )
        waits_for_start = self.overflow == "block" and not self.ctx.started
        if self.overflow != "error" and not waits_for_start:
            return
        if not self._fits(lane, need):
            self.catch_up_lane(lane)
            held = self.pending_bytes(lane)
            if held + need > bound and waits_for_start:
                # No worker runs before start(): "block" would wait for start()
                # itself, which distribute must never do.
                raise ListenerFull(
                    f"listener {self.name!r} lane {lane.index} is full before start(): "
                    f"{held} of max_pending_bytes={bound} bytes queued, and "
                    f"nothing drains until start(); nothing was distributed. Call "
                    f"start() first, or raise max_pending_bytes"
                )
            if held + need > bound:
                raise ListenerFull(
                    f"listener {self.name!r} lane {lane.index} is full: {held} of "
                    f"max_pending_bytes={bound} bytes pending; nothing was distributed. "
                    f"Let the handler catch up, raise max_pending_bytes, or use "
                    f"overflow='block', 'drop_oldest' or 'drop_newest'"
                )

    def put(self, lane: LaneBase, payload: bytes) -> int | None:
        """Append an encoded notification to ``lane``, applying the overflow policy.

        A bounded lane counts the arena bytes its frames refer to (a shared
        payload's are claimed before the put). A closed lane (listener removed or
        stopping) takes nothing: the caller checks whether the distributor is
        stopping.

        Returns:
            The frame's sequence number, or 0 if the lane did not take it (a
            subclass whose callers need no number may return None).
        """
        try:
            # Without arena bytes in the lane, the ring's own bound is the whole bound.
            if (
                self.max_pending_bytes is None
                or not self.arena_bytes(lane)
                or self._fits(lane, len(payload) + HEADER_SIZE)
            ):
                return int(lane.ring.append(payload))  # the pump acks what the worker finished
        except RingFull:
            pass
        except RingClosed:
            return 0
        return self._put_full(lane, payload)

    def _append_in_bound(self, lane: LaneBase, payload: bytes) -> int:
        """Append if ``payload`` fits the bound now; 0 if not (or the ring closed)."""
        if not self._fits(lane, len(payload) + HEADER_SIZE):
            return 0
        try:
            return int(lane.ring.append(payload))
        except (RingFull, RingClosed):
            return 0

    def _put_full(self, lane: LaneBase, payload: bytes) -> int:
        ring = lane.ring
        self.catch_up_lane(lane)
        seq = self._append_in_bound(lane, payload)
        if seq or ring.closed:
            return seq
        policy = self.overflow
        assert self.max_pending_bytes is not None
        if _real_bytes(payload) > self.max_pending_bytes:  # never fits: drop only it
            policy = "drop_newest"
        if policy == "drop_oldest":
            # Frame by frame: a dropped frame may give back arena blocks as well.
            arena = self.ctx.arena
            while not self._fits(lane, len(payload) + HEADER_SIZE):
                frames = self.drop_unsent(lane, 1)
                if not frames:
                    break
                self._count_drops(held=frames)
                if arena is not None:
                    arena.reconcile_dropped(ring)
            seq = self._append_in_bound(lane, payload)
            if not seq and not ring.closed:  # frames in flight fill the bound
                self._count_drops(arriving=1)
            return seq
        if policy == "error":  # check_room passed, then the ring filled: a race
            raise ListenerFull(f"listener {self.name!r} lane {lane.index} is full")
        if policy == "block":
            return self._put_blocking(lane, payload)
        self._count_drops(arriving=1)  # drop_newest
        return 0

    def drop_unsent(self, lane: LaneBase, nbytes: int) -> int:
        """Drop the oldest frames of ``lane`` not yet sent, for ``nbytes`` of room.

        Returns:
            How many frames were dropped.
        """
        frames, _ = lane.ring.drop_unsent(nbytes)
        return int(frames)

    def _put_blocking(self, lane: LaneBase, payload: bytes) -> int:
        """Wait for room (backpressure); give up only when the listener goes away."""
        seq = 0

        def appended_or_gone() -> bool:
            nonlocal seq
            if self.removed or self.ctx.stopping:
                self._count_drops(arriving=1)
                return True
            self.catch_up_lane(lane)
            seq = self._append_in_bound(lane, payload)
            return bool(seq) or lane.ring.closed

        poll_until(appended_or_gone, None, first=50e-6, longest=0.005)
        return seq

    def queue_initial(self, adds: list[Add], t_ns: int) -> None:
        """Queue the initial list and remember, per lane, where it ends."""
        self.prepare_initial(adds, t_ns)()

    def prepare_initial(self, adds: list[Add], t_ns: int) -> Callable[[], None]:
        """Route and encode the initial list (key function, codec hooks), no lock held.

        Everything is encoded (and routed) before anything is queued: an item the
        codec refuses leaves nothing queued. The returned call queues it and
        notes, per lane, where it ends.
        """
        encode = self.encoder()
        if encode is self.ctx.shared_encode:
            # Inline: a block held by a frame no distribute noted would never be freed.
            encode = self.ctx.encode
        planned = [(self.route(n), encode(n, t_ns)) for n in adds]
        bound = self.max_pending_bytes
        if bound is not None and self.overflow in ("block", "error"):
            # No worker runs yet, so nothing would make room: what does not fit
            # now never will ("block" would wait forever). The drop policies
            # drop and count instead, as for any distribute.
            per_lane: dict[int, int] = {}
            for lane, payload in planned:
                per_lane[lane.index] = per_lane.get(lane.index, 0) + len(payload) + HEADER_SIZE
            worst = max(per_lane.values(), default=0)
            if worst > bound:
                raise ListenerFull(
                    f"listener {self.name!r}: its initial list needs {worst} bytes in one "
                    f"lane, more than max_pending_bytes={bound}; raise max_pending_bytes "
                    f"or add the listener without initial_list and distribute the items"
                )

        def queue() -> None:
            for lane, payload in planned:
                self.put(lane, payload)
            self.mark_initial()  # queued before anything live: every frame so far

        return queue

    # -- lifecycle -------------------------------------------------------------------

    def close_input(self) -> None:
        """Take no more frames; the consumers go on with those held."""
        for lane in self.lanes:
            lane.ring.close()

    def settle(self, reason: str | None) -> list[Callable[[], None]]:
        """Account for the frames still held once nothing consumes them.

        Each lane acks first what its consumer finished (delivered, not lost).
        """
        calls: list[Callable[[], None]] = []
        for lane in self.lanes:
            calls += self.settle_lane(lane, reason)
        return calls

    def settle_lane(self, lane: LaneBase, reason: str | None) -> list[Callable[[], None]]:
        """``settle`` for one lane, once nothing consumes it any more."""
        lane.ring.close()
        lane.ack()
        refer_out = reason is not None and self.payloads_refer_out()
        arena = self.ctx.arena if self.maps_shared_memory else None
        # Arena blocks are copied before take_all() acks the frames (a reconcile
        # after it may free them); decoded (codec hooks: user code) in the
        # on_dead_letter calls, without the lock.
        kept = arena.copy_blocks(lane.ring, lane.ring.seqs()) if refer_out and arena else None
        items: list[Any] = lane.ring.take_all()
        if kept is not None:
            items = arena.wrap_kept(items, kept)  # type: ignore[union-attr]
        elif refer_out:
            # Ray's object store: decoded now, while the lane still holds the
            # objects; the on_dead_letter calls come after they are let go.
            items = [self.decoded(item) for item in items]
        return self._settle_items(items, reason)

    def payloads_refer_out(self) -> bool:
        """Tell whether payloads may refer to buffers kept outside the frames.

        Those buffers go once the frames are settled, so dead letters are decoded
        first. Here: blocks of the distributor's shared-memory arena.
        """
        return self.maps_shared_memory and self.ctx.arena is not None

    def never_started(self) -> bool:
        """Tell whether no worker of this listener ever became ready."""
        return not any(lane.ever_ready for lane in self.lanes)

    def received(self) -> int:
        """Notifications accepted: every frame appended took its lane's next sequence
        number, and those dropped on arrival were never appended."""
        return self.unqueued + sum(lane.ring.last_seq for lane in self.lanes)
