"""Listeners whose lanes are frame rings: what process and Ray listeners share.

``distribute`` encodes a notification once for all listeners that need the same
encoding (``Registration.encoder``); such a listener picks one lane by key
(``route``), checks room (``check_room``) and appends the payload to that lane's
``FrameRing`` (``put``), applying its overflow policy. What consumes a ring is the
subclass's business: the pump and a worker process (``process_listener``), or a
sender thread and a Ray actor (``ray_listener``). A lane has ``index``, ``ring``,
``ack()`` (free what its consumer finished), ``initial_seq``, ``first_start``,
``start_error`` and ``ever_ready``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

from fanout._impl import FrameRing
from fanout._protocol import HEADER_SIZE
from fanout.errors import ListenerFull, RingClosed, RingFull
from fanout.notifications import Add, Notification, Update
from fanout.options import ListenerOptions
from fanout.registration import ListenerContext, Registration

__all__ = ["LaneListener", "default_key", "lane_ring"]

RING_INITIAL_BYTES = 64 * 1024


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


class LaneListener(Registration):
    """A listener with one ``FrameRing`` lane per worker; subclasses make the lanes."""

    def __init__(self, ctx: ListenerContext, opts: ListenerOptions) -> None:
        super().__init__(ctx, opts)
        self.rr = 0
        self.lanes: list[Any] = []

    def make_rings(self) -> list[Any]:
        """One ring per worker, sized for the listener's bound and overflow policy."""
        return [lane_ring(self.max_pending_bytes, self.overflow) for _ in range(self.workers)]

    # -- producer side ---------------------------------------------------------------

    def route(self, n: Notification) -> Any:
        """Pick the lane of ``n``: by key, so one object's notifications keep order."""
        lanes = self.lanes
        if len(lanes) == 1:
            return lanes[0]
        key = self.key(n.new if type(n) is Update else n.obj) if self.key else default_key(n)  # type: ignore[union-attr]
        if key is None:
            self.rr += 1
            return lanes[self.rr % len(lanes)]
        return lanes[hash(key) % len(lanes)]

    def check_room(self, lane: Any, payload: bytes) -> None:
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
        waits_for_start = self.overflow == "block" and not self.ctx.started
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

    def put(self, lane: Any, payload: bytes) -> None:
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

    def _put_full(self, lane: Any, payload: bytes) -> None:
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
            self.dropped += self.drop_unsent(lane, need)
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

    def drop_unsent(self, lane: Any, nbytes: int) -> int:
        """Drop the oldest frames of ``lane`` not yet sent, for ``nbytes`` of room.

        Returns:
            How many frames were dropped.
        """
        frames, _ = lane.ring.drop_unsent(nbytes)
        return int(frames)

    def _put_blocking(self, lane: Any, payload: bytes) -> None:
        """Wait for room (backpressure); give up only when the listener goes away."""
        delay = 50e-6
        while True:
            if self.removed or self.ctx.stopping:
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

    def queue_initial(self, adds: list[Add], t_ns: int) -> None:
        """Queue the initial list and remember, per lane, where it ends.

        Everything is encoded (and routed) before anything is queued: an item the
        codec refuses leaves nothing queued.
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
            worst = max(per_lane.values())
            if worst > bound:
                raise ListenerFull(
                    f"listener {self.name!r}: its initial list needs {worst} bytes in one "
                    f"lane, more than max_pending_bytes={bound}; raise max_pending_bytes "
                    f"or add the listener without initial_list and distribute the items"
                )
        for lane, payload in planned:
            self.put(lane, payload)
            lane.initial_seq = lane.ring.last_seq

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

    def settle_lane(self, lane: Any, reason: str | None) -> list[Callable[[], None]]:
        """``settle`` for one lane, once nothing consumes it any more."""
        lane.ring.close()
        lane.ack()
        items: list[Any] = lane.ring.take_all()
        if reason is not None and self.payloads_refer_out():
            # Decoded now, while the buffers they refer to are held: the
            # on_dead_letter calls come after the stop let go of them.
            items = [self.decoded(item) for item in items]
        return self._settle_items(items, reason)

    def payloads_refer_out(self) -> bool:
        """Tell whether payloads may refer to buffers kept outside the frames.

        Those buffers go once the frames are settled, so dead letters are decoded
        first. Here: blocks of the distributor's shared-memory arena.
        """
        return self.maps_shared_memory and self.ctx.arena is not None

    def drop_unsent_until(
        self, enough: Callable[[], bool], dropped_from: Callable[[Any], bool]
    ) -> None:
        """Drop frames not yet sent, lane by lane, oldest first, until ``enough()``.

        A lane stops at the first drop that freed nothing (other listeners still
        hold those buffers): dropping more of it would lose notifications for nothing.
        """
        for lane in self.lanes:
            while not enough():
                lane.ack()
                frames, _ = lane.ring.drop_unsent(1)
                if not frames:
                    break
                self.dropped += frames
                if not dropped_from(lane.ring):
                    break

    def never_started(self) -> bool:
        """Tell whether no worker of this listener ever became ready."""
        return not any(lane.ever_ready for lane in self.lanes)

    def received(self) -> int:
        """Notifications accepted: every frame appended took its lane's next sequence
        number, and those dropped on arrival were never appended."""
        return self.unqueued + sum(lane.ring.last_seq for lane in self.lanes)
