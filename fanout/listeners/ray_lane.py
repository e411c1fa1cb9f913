"""One Ray lane: an actor, its frame ring, and the batches of frames in flight to it.

A ``RayListener``'s sender thread owns its lanes. Each turn it takes the lane's
unsent frames from the ring (through a pipe the ring writes into and the lane
reads back), cuts them into a batch of whole frames and submits it in one actor
call (``submit``), while the calls in flight stay under the lane's ``room``.
When a call fails, ``rewind`` forgets what was in flight and the ring sends
again from the first frame not acknowledged.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import numpy as np

from fanout.buffers.ray_store import RayStore, TokenLog
from fanout.listeners.base import Registration
from fanout.listeners.lanes import LaneBase
from fanout.listeners.pipes import PIPE_SIZE, grow_pipe
from fanout.native.pick import frame_span
from fanout.wire.protocol import HEADER, HEADER_SIZE

__all__ = ["KILL_GRACE", "Batch", "RayLane"]

KILL_GRACE = 5.0  # past handler_timeout per frame, the producer kills a stuck actor
PROBES = 10  # unanswered ready() probes (about 6 s) before frames go to the actor anyway


class Batch:
    """One actor call in flight: which frames it carries and when it may be late."""

    __slots__ = ("data", "first", "last", "nframes", "ref", "since", "single")

    def __init__(
        self, ref: Any, data: bytes, first: int, last: int, nframes: int, single: bool
    ) -> None:
        self.ref = ref
        self.data = data
        self.first = first
        self.last = last
        self.nframes = nframes
        self.single = single
        self.since = time.monotonic()  # when it became the running call (at the latest)


class RayLane(LaneBase):
    """One actor, its ring, and the calls in flight to it (owned by the sender thread)."""

    def __init__(self, listener: Registration, index: int, ring: Any, store: RayStore) -> None:
        super().__init__(listener, index, ring)
        self.store = store
        self.actor: Any = None
        self.ready_ref: Any = None
        self.gen = 0
        self.opens = True  # the next call opens generation ``gen``
        self.last_submitted = 0  # last seq of the last batch submitted
        self.single_until = 0  # frames up to this seq go one per call
        self.inflight: collections.deque[Batch] = collections.deque()
        self.taken = bytearray()  # frames the ring sent (to our pipe), not yet submitted
        # Frames whose big buffers are in Ray's object store, and their references.
        self.tokens = TokenLog(store)
        self.killed = False  # the producer killed the actor for handler_timeout
        # After a failed call, frames wait until the restarted actor answers
        # ``ready()``: a call Ray sends while it still restarts the actor can fail
        # too (ActorUnavailableError), and its frame would be charged an attempt
        # for a death it did not cause.
        self.probe_ref: Any = None
        self.probe_at = 0.0  # when to ask next; 0: the actor is known to run
        self.probe_failures = 0

    def __repr__(self) -> str:
        return f"<RayLane {self.listener.name!r}[{self.index}]>"

    def ack(self) -> None:
        """Nothing to read: results acknowledge frames as they arrive."""

    def open_pipe(self, batch_bytes: int) -> None:
        """Make the pipe the ring sends to and this lane reads back: its size is the batch."""
        self.rfd, self.wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # Past the pipe size, a batch takes more reads: the same batches all the same.
        grow_pipe(self.wfd, min(batch_bytes, PIPE_SIZE))

    def close_pipe(self) -> None:
        """Close both pipe ends."""
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                os.close(fd)
        self.rfd = self.wfd = -1

    def take(self, budget: int) -> None:
        """Move unsent frames from the ring into ``taken`` until it holds ``budget`` bytes."""
        ring = self.ring
        while len(self.taken) < budget or not self._whole_frame():
            if not ring.send_to(self.wfd):
                return
            while True:
                try:
                    chunk = os.read(self.rfd, 1 << 20)
                except BlockingIOError:
                    break
                self.taken += chunk

    def _whole_frame(self) -> bool:
        taken = self.taken
        if len(taken) < HEADER_SIZE:
            return False
        return len(taken) >= HEADER_SIZE + HEADER.unpack_from(taken, 0)[0]

    def cut(self, budget: int, single: bool) -> tuple[bytes, int, int, int] | None:
        """Remove whole frames (one if ``single``) from ``taken``: data, first, last, count."""
        taken = self.taken
        pos, first, last, count = frame_span(taken, budget, single)  # native: no GIL-bound loop
        if not count:
            return None
        with memoryview(taken) as view:  # one copy, not a slice and then its bytes
            data = bytes(view[:pos])
        del taken[:pos]
        return data, first, last, count

    def rewind(self) -> None:
        """Forget what is in flight; the ring sends from the first frame not acknowledged."""
        self.inflight.clear()
        self.taken = bytearray()
        while True:
            try:
                if not os.read(self.rfd, 1 << 20):
                    break
            except BlockingIOError:
                break
        self.ring.rewind()
        self.gen += 1
        self.opens = True
        self.ready = False

    @property
    def probing(self) -> bool:
        """Tell whether frames wait for the restarted actor to answer."""
        return bool(self.probe_at)  # cleared only by an answer, or after PROBES

    def await_restart(self) -> None:
        """Hold the frames until the actor, restarted by Ray, answers ``ready()``."""
        self.probe_at = time.monotonic()
        self.probe_failures = 0

    def probe(self) -> None:
        """Ask the actor whether it runs again, once the time to ask has come."""
        if self.probe_at and self.probe_ref is None and time.monotonic() >= self.probe_at:
            self.probe_ref = self.actor.ready.remote()

    def probed(self, ray: Any) -> bool:
        """Take the answer to ``probe``; tell whether the actor answered.

        Unanswered, it is asked again a little later; after ``PROBES`` unanswered
        probes the frames go anyway (as calls that fail and are charged attempts):
        an actor Ray cannot bring back must not hold them forever.
        """
        ref, self.probe_ref = self.probe_ref, None
        try:
            ray.get(ref)
        except ray.exceptions.RayError:
            self.probe_failures += 1
            if self.probe_failures < PROBES:
                self.probe_at = time.monotonic() + min(0.05 * 2**self.probe_failures, 1.0)
            else:
                self.probe_at = 0.0
            return False
        self.probe_at = 0.0
        return True

    def waiting(self) -> bool:
        """Tell whether frames wait to be submitted."""
        return bool(self.taken) or self.ring.unsent_bytes > 0

    def room(self, max_inflight: int) -> int:
        """Calls this lane may have in flight now."""
        if not self.ever_ready or self.start_error is not None or self.probing:
            return 0
        if self.single_until > self.ring.acked_seq:
            return 1  # isolating the frame that killed the actor: one at a time
        return max_inflight

    def submit(self, batch_bytes: int, max_inflight: int) -> None:
        """Submit waiting frames in calls of up to ``batch_bytes``, while there is room."""
        room = self.room(max_inflight)
        while len(self.inflight) < room:
            single = self.single_until > self.ring.acked_seq
            self.take(batch_bytes)
            cut = self.cut(batch_bytes, single)
            if cut is None:
                return
            data, first, last, count = cut
            # The batch carries the references its frames use: Ray keeps the
            # objects alive for the actor, which reads them with ray.get.
            tokens = self.tokens
            refs = self.store.refs(tokens.tokens_between(first, last)) if tokens else None
            # As a numpy array, Ray puts the frames into its object store as one
            # out-of-band buffer (no pickle copy) and the actor reads them there.
            frames = np.frombuffer(data, dtype=np.uint8)
            ref = self.actor.handle_batch.remote(
                self.gen, self.opens, self.last_submitted, frames, refs
            )
            self.opens = False
            self.last_submitted = last
            if self.inflight:
                since = float("inf")  # starts running when the one before finishes
            else:
                since = time.monotonic()
            batch = Batch(ref, data, first, last, count, single)
            batch.since = since
            self.inflight.append(batch)

    def kill_if_overdue(self, ray: Any, limit: float | None) -> None:
        """Kill the actor if its running call overstays (its own watchdog could not)."""
        if limit is None or not self.inflight or self.killed:
            return
        head = self.inflight[0]
        if time.monotonic() - head.since > limit * head.nframes + KILL_GRACE:
            self.killed = True
            ray.kill(self.actor, no_restart=False)
