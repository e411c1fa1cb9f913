"""What a worker's death costs: how it ended, which frame it is charged, where its lane resumes.

The supervisor (``fanout.listeners.supervisor``) decides when a worker is dead
or misbehaves; this module does the accounting on the lane, with the
distributor's lock held: it frees what the dead worker finished, charges the
frame it died in one attempt (dead-lettering it after ``max_attempts``) and
rewinds the ring, and it says what is impossible in a live worker's progress
slot. Nothing here waits or runs user code: what must be reported is appended
to ``calls``, which the supervisor makes after the lock.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fanout.native.pick import slot_progress
from fanout.wire.protocol import DONE, EXIT_START_FAILED, PID, STARTED

if TYPE_CHECKING:
    from fanout.listeners.process import Lane

__all__ = ["corrupt_slot_reason", "describe_exit", "rewind_dead_lane"]


def describe_exit(code: int | None, fatal: bool = False) -> str:
    """Say how a worker ended, from its exit code (``fatal``: it said why first)."""
    if code is None:
        return "worker vanished"
    if code < 0:
        try:
            return f"worker killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"worker killed by signal {-code}"
    # A handler may exit with any code: trust fanout's own codes only when the
    # worker announced them on its return pipe.
    if fatal and code == EXIT_START_FAILED:
        return "worker could not build its handler"
    return f"worker exited with code {code}"


def rewind_dead_lane(
    lane: Lane, reason: str, calls: list[Callable[[], None]]
) -> tuple[bool, bool]:
    """Free what the dead worker finished, charge the frame it died in, rewind.

    Returns whether the worker finished any frame since it was started, and
    whether the death was charged to a frame.
    """
    listener, ring, slot = lane.listener, lane.ring, lane.slot
    # The pump is detached: sent_seq is final, and no frame past it ran.
    sent = ring.sent_seq
    if lane.corrupt:
        lane.distrust_counts()
        # Trust no "done" it wrote: resend all that was not acked. Charge the
        # attempt to the frame it said it started if that is plausible, else
        # to the first frame held, so a handler that keeps corrupting its
        # slot on one notification ends up dead-lettering something.
        done = ring.acked_seq
        started = int(slot[STARTED])
        if not done < started <= sent:
            started = min(ring.first_seq, sent)
    else:
        started = min(int(slot[STARTED]), sent)
        done = min(int(slot[DONE]), sent)
    progressed = done > lane.done_at_spawn
    charged = False
    if done > ring.acked_seq:
        ring.ack(done)
    # Killed after counting a call but before marking its frame done: the
    # frame is not finished (it runs again, or is dead-lettered), so that
    # call must not count as delivered. No more calls than frames finished.
    lane.distrust_counts()
    if started > done and started > ring.acked_seq:
        charged = True
        attempts = lane.attempts.get(started, 0) + 1
        if attempts >= listener.max_attempts:
            # Frames before it were finished (it started this one after them).
            if started - 1 > ring.acked_seq:
                ring.ack(started - 1)
            payload: Any = ring.peek()
            if payload is not None and listener.payloads_refer_out():
                # Its shared-memory blocks copied while the frame holds them:
                # decoded (codec hooks: user code) in the call, without the lock.
                payload = listener.ctx.arena.keep(ring, [payload], [started])[0]
            ring.ack(started)
            lane.attempts.pop(started, None)
            listener._count(dead_lettered=1)
            why = (
                f"{reason} while handling it, {attempts} times "
                f"(max_attempts={listener.max_attempts})"
            )
            if payload is not None:
                calls.append(functools.partial(listener.dead_letter_item, payload, why))
            progressed = True  # the lane moves on
        else:
            lane.attempts[started] = attempts
    for seq in [s for s in lane.attempts if s <= ring.acked_seq]:
        del lane.attempts[seq]
    lane.undecodable = {s for s in lane.undecodable if s > ring.acked_seq}
    ring.rewind()
    return progressed, charged


def corrupt_slot_reason(lane: Lane) -> str | None:
    """Say what is impossible in a worker's progress slot, if anything."""
    slot = lane.slot
    # Read in the order opposite to the worker's writes, so calls finishing
    # between two reads err on the safe side: the worker counts an error before
    # its call, and a call before marking its frame done. (Errors read after the
    # calls could count calls made after that read: a busy machine could then
    # see more errors than calls.) The native reads are acquires, matching the
    # worker's release stores, so this holds on weakly ordered CPUs too.
    errors, handled, done, started = slot_progress(slot)
    errors -= lane.errors_at_spawn
    handled -= lane.handled_at_spawn
    last = lane.ring.last_seq  # read after the slot: appends only raise it
    if done > last or started > last:
        return f"done={done} started={started} beyond the last frame appended, {last}"
    # Every finished frame is one call or one undecodable report, never more;
    # one call may be counted a moment before its frame is marked done.
    finished = done - lane.done_at_spawn
    if handled < 0 or errors < 0 or errors > handled + 1:
        return f"{handled} calls and {errors} errors since the worker started"
    if handled + lane.undecodable_since_spawn > finished + 1:
        return (
            f"{handled} calls and {lane.undecodable_since_spawn} undecodable frames "
            f"for {finished} frames finished"
        )
    pid = int(slot[PID])
    if lane.ready and lane.proc is not None and pid not in (0, lane.proc.pid):
        return f"pid word {pid} is not the worker's pid {lane.proc.pid}"
    return None
