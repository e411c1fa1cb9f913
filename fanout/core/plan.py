"""The producer's side of the arena: which lane takes a shared frame, which one its own copy.

``distribute`` encodes a notification once with its big buffers in the arena
(``Arena.encode`` returns a ``SharedPayload``). Each lane then takes that frame if
its listener stays within its share of the arena (``Arena.claim``), and the same
notification encoded inline otherwise (``SharedPayload.inline``, encoded once for
all such lanes): a listener at its share grows its own ring, as an unbounded ring
does, and never makes another listener wait or drop. Everything here is per call,
so any number of producer threads may run it at once.
"""

from __future__ import annotations

from typing import Any

from fanout.buffers.arena import Arena, SharedPayload
from fanout.errors import RingClosed
from fanout.native.pick import append_all

__all__ = ["append_rings", "put_lane"]


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
