"""How ``distribute`` reaches the listeners: the delivery plan, and which lane takes a frame.

A ``Plan`` is worked out whenever the listeners change: which rings take the
payload in one native call, which listeners need a lane picked or room checked,
which take the notification objects, and how many encodings that needs.
``encode_all`` and ``deliver`` then carry one notification along it.

``distribute`` encodes a notification once with its big buffers in the arena
(``Arena.encode`` returns a ``SharedPayload``). Each lane then takes that frame if
its listener stays within its share of the arena (``Arena.claim``), and the same
notification encoded inline otherwise (``SharedPayload.inline``, encoded once for
all such lanes): a listener at its share grows its own ring, as an unbounded ring
does, and never makes another listener wait or drop. A plan never changes once
made and the rest is per call, so any number of producer threads may run it at once.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

from fanout.buffers.arena import Arena, SharedPayload, default_max_shared_bytes
from fanout.errors import RingClosed
from fanout.listeners.base import Registration
from fanout.native.pick import Feed, append_all
from fanout.notifications import Notification
from fanout.wire.codec import Codec, MsgpackCodec, MsgspecCodec

__all__ = ["Plan", "append_rings", "deliver", "encode_all", "make_arena", "put_lane"]


def make_arena(codec: Codec, max_bytes: Any, min_bytes: Any) -> tuple[Arena | None, Codec]:
    """Make the distributor's arena; return it (None: disabled) and the codec to use.

    The arena is None when ``max_bytes`` is 0 or the codec is not one of the two
    built-in codecs (a codec of your own does not use it); the codec is then
    ``codec`` itself.

    Raises:
        TypeError: A size is not an int.
        ValueError: A size is negative.
        OSError: The shared memory could not be created.
    """
    for opt, value in (("max_shared_bytes", max_bytes), ("shared_min_bytes", min_bytes)):
        if value is None and opt == "max_shared_bytes":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{opt} must be an int (bytes), not {value!r}")
        if value < 0:
            raise ValueError(f"{opt} must be >= 0 bytes, got {value}")
    size = default_max_shared_bytes() if max_bytes is None else max_bytes
    if size == 0 or type(codec) not in (MsgspecCodec, MsgpackCodec):
        return None, codec
    arena = Arena(size, max(1, min_bytes), pickle.loads(pickle.dumps(codec)))
    # A private copy that decodes references in the producer (dead letters,
    # errors): a codec instance passed to two distributors gets one arena each.
    # It encodes inline for the lanes at their share of the arena.
    private: Codec = pickle.loads(pickle.dumps(codec))
    private._arena = arena
    arena.inline_encode = private.encode
    return arena, private


class Plan:
    """How ``distribute`` reaches a set of listeners, worked out once per change.

    ``rings``: the rings of single-lane unbounded process listeners (the
    common case: one native call appends to all of them); ``routed``: listeners that
    take payloads but need a lane picked or room checked (``route``, ``check_room``,
    ``put``); ``puts``: listeners that take the notification objects themselves.
    ``feed``: ``distribute``'s whole common case in one native call
    (``fanout.native.pick.Feed``) when the distributor has started, a ``sink`` was
    given, one encoding serves every listener and each takes payloads without a
    bound (``Registration.feed_route``); else None.

    ``sink``: the distributor's ``(notify, deliver, closed)``: wake the pump,
    ``deliver(plan, n, t_ns, payloads)``, and check for a stop when a ring was closed.
    """

    __slots__ = ("encodes", "feed", "listeners", "puts", "rings", "routed", "wire")

    def __init__(
        self,
        listeners: tuple[Registration, ...],
        started: bool = False,
        sink: tuple[Callable[[], Any], Callable[..., Any], Callable[[], Any]] | None = None,
    ) -> None:
        self.listeners = listeners
        payloads = [r for r in listeners if r.takes_payloads]
        direct = [(r, r.direct_ring()) for r in payloads]
        # One encode per distinct encoding the listeners need (almost always one).
        # The direct rings all take the first one (one native call appends to them
        # all); a direct listener needing another encoding is routed instead.
        # ``wire[i]``: the index of routed[i]'s encoding.
        encodes: list[Callable[[Notification, int], bytes]] = []
        for r, ring in direct:
            if ring is not None:
                encodes.append(r.encoder())
                break
        direct = [
            (r, ring if ring is not None and r.encoder() == encodes[0] else None)
            for r, ring in direct
        ]
        self.rings = tuple(ring for _, ring in direct if ring is not None)
        # (put, route and check_room differ by kind: typed Any)
        self.routed: tuple[Any, ...] = tuple(r for r, ring in direct if ring is None)
        wire = []
        for r in self.routed:
            if r.encoder() not in encodes:
                encodes.append(r.encoder())
            wire.append(encodes.index(r.encoder()))
        self.encodes = tuple(encodes)
        self.wire = tuple(wire)
        self.puts: tuple[Any, ...] = tuple(
            r.put  # type: ignore[attr-defined]
            for r in listeners
            if not r.takes_payloads
        )
        self.feed: Callable[[Notification], bool] | None = None
        if started and sink is not None and len(encodes) == 1 and not self.puts:
            # Unbounded process and Ray listeners: distribute is one native call.
            routes = [r.feed_route() for r in self.routed]
            if all(route is not None for route in routes):
                notify, deliver_to, closed = sink

                def finish(n: Notification, t_ns: int, payload: bytes) -> None:
                    deliver_to(self, n, t_ns, [payload])

                self.feed = Feed(self.rings, encodes[0], notify, finish, closed, routes).feed


def encode_all(arena: Arena | None, plan: Plan, n: Notification, t_ns: int) -> list[bytes]:
    """Encode ``n`` once per encoding ``plan`` needs; on a failure free what the arena took."""
    payloads: list[bytes] = []
    try:
        for encode in plan.encodes:
            payloads.append(encode(n, t_ns))
    except BaseException:  # a later encoding failed: free what the arena took
        for p in payloads:
            if type(p) is SharedPayload and arena is not None:
                arena.unhold(p.blocks)
        raise
    return payloads


def deliver(
    arena: Arena | None, plan: Plan, n: Notification, t_ns: int, payloads: list[bytes]
) -> None:
    """Queue ``n``, encoded once per encoding (``payloads``), for ``plan``'s listeners.

    A ``SharedPayload``'s blocks get one share per ring that takes it (the
    others take it inline: ``put_lane``, ``append_rings``), and lose the
    producer's own when this returns.
    """
    shared = [p for p in payloads if type(p) is SharedPayload]
    try:
        routed = plan.routed
        lanes: list[Any] = []
        if routed:
            # Route and check room first: a key function that raises, or a
            # bounded listener without room (overflow="error"), stops the call
            # before any listener got anything, or counted anything.
            lanes = [r.route(n) for r in routed]
            for r, lane, i in zip(routed, lanes, plan.wire, strict=True):
                if r.max_pending_bytes is not None:
                    r.check_room(lane, payloads[i])
        if plan.rings:
            append_rings(arena, plan.rings, payloads[0])
        for r, lane, i in zip(routed, lanes, plan.wire, strict=True):
            put_lane(arena, r, lane, payloads[i])
        if plan.puts:
            item = (n, t_ns)
            for put in plan.puts:
                put(item)
    finally:
        for payload in shared:
            assert arena is not None
            arena.unhold(payload.blocks)  # a block no ring took is freed here


def append_rings(arena: Arena | None, rings: tuple[Any, ...], payload: bytes) -> int:
    """Append ``payload`` to every open ring (one lane per listener); return how many took it."""
    if type(payload) is not SharedPayload:
        return int(append_all(rings, payload))
    assert arena is not None
    taken = 0
    for ring in rings:
        try:
            if arena.claim(ring, (ring,), payload.nbytes):
                try:
                    seq = ring.append(payload)
                except BaseException:
                    arena.unclaim(ring, payload.nbytes)
                    raise
                arena.note(ring, seq, payload.blocks)
            else:
                ring.append(payload.inline())
        except RingClosed:
            continue
        taken += 1
    return taken


def put_lane(arena: Arena | None, reg: Any, lane: Any, payload: bytes) -> None:
    """``reg.put(lane, payload)``, or its inline form when ``reg`` is at its share."""
    if type(payload) is not SharedPayload:
        reg.put(lane, payload)
        return
    assert arena is not None
    ring = lane.ring
    if not arena.claim(ring, tuple(ln.ring for ln in reg.lanes), payload.nbytes):
        reg.put(lane, payload.inline())
        return
    seq = 0
    try:
        seq = reg.put(lane, payload)
    finally:
        if seq:
            arena.note(ring, seq, payload.blocks)
        else:  # dropped on arrival, the ring closed, or put raised
            arena.unclaim(ring, payload.nbytes)
