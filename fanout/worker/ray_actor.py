"""The Ray actor behind one lane of a ``executor="ray"`` listener.

It is the Ray counterpart of ``fanout.worker.main``: it builds the handler once, then
handles batches of frames exactly as they sit in the lane's ``FrameRing`` (12-byte
header, payload), and answers with what the producer needs to acknowledge them.
This module does not import Ray: ``fanout.listeners.ray`` wraps ``LaneActor`` with
``ray.remote`` and the user's options.

The actor notes, in a small file in ``/dev/shm`` named after its Ray actor id (which
survives restarts), the sequence number of the last frame it finished. When Ray
restarts it on the same node after a crash, the frames its predecessor finished are
acknowledged without calling the handler again, so a frame that kills its actor
does not make the frames handled before it in the same batch run twice. (On another
node the file is not there: those frames run again, at least once as always.)

A batch is accepted only if it continues what this actor instance handled (same
generation, and the batch before it is the last one this instance handled) or opens
a generation. A restarted actor has
lost that state, so a batch submitted before the producer noticed the restart is
refused instead of being handled ahead of the frames the producer resends: that is
what keeps first deliveries in per-key order across restarts.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import threading
import time
import traceback
from array import array
from typing import Any

from fanout.handlers import build_handler
from fanout.native.pick import serve_batch
from fanout.wire.codec import Codec
from fanout.wire.protocol import DONE, HANDLED, SLOT_WORDS, STARTED
from fanout.wire.schema import describe_misfit
from fanout.worker.ray_refs import use_batch_refs
from fanout.worker.warden import MEMORY_TICK, private_resident

__all__ = ["BatchResult", "LaneActor"]

MAX_ECHO = 1 << 20  # a payload larger than this is not echoed back with its error
WATCHDOG_TICK = 0.02  # seconds between the handler_timeout watchdog's looks
PROGRESS_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
# The progress file is laid out as a worker's progress slot (fanout.wire.protocol).
PROGRESS_BYTES = SLOT_WORDS * 8


def progress_path(actor_id: str) -> str:
    """Where the actor with this id keeps its progress (on its own node)."""
    return os.path.join(PROGRESS_DIR, f"fanout-ray-{actor_id}")


# What ``handle_batch`` returns: (last_seq, handled, errors, bad, t_ns bytes), or
# None when it refused a stale batch. ``errors``: (seq, traceback, payload) for each
# handler call that raised; ``bad``: (seq, reason, payload) for each frame that could
# not be decoded (dead-lettered, never retried); ``t_ns``: array("q") of the
# distribute timestamps of the handled frames, for the producer's latency figures.
BatchResult = tuple[int, int, list[tuple[int, str, bytes]], list[tuple[int, str, bytes]], bytes]


class LaneActor:
    """Handle batches of frames for one lane (run by Ray as an actor).

    Args:
        handler_blob: The handler, pickled by Ray's cloudpickle.
        is_factory: Whether the handler is a factory to call once here.
        codec_blob: The distributor's codec, pickled.
        schema_blob: The listener's schema type, pickled, or None.
        handler_timeout: Seconds one handler call may run before this actor
            kills itself (Ray then restarts it); None: no limit.
        memory_limit: Bytes of private resident memory this actor and what it
            started may hold before it kills itself; None: no limit. An actor
            that holds more at rest, its handler built, refuses to start.
    """

    def __init__(
        self,
        handler_blob: bytes,
        is_factory: bool,
        codec_blob: bytes,
        schema_blob: bytes | None,
        handler_timeout: float | None,
        memory_limit: int | None = None,
    ) -> None:
        codec: Codec = pickle.loads(codec_blob)
        self.schema = None if schema_blob is None else pickle.loads(schema_blob)
        self.unpack = codec.unpacker(self.schema)
        self.handler = build_handler(pickle.loads(handler_blob), is_factory)
        self.gen = -1  # no generation opened yet: only an opening batch is accepted
        self.last_seq = 0  # of the last batch handled in generation ``gen``
        import ray  # here, not at module level: only the actor process needs Ray

        self.path = progress_path(str(ray.get_runtime_context().get_actor_id()))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < PROGRESS_BYTES:
                os.ftruncate(fd, PROGRESS_BYTES)
            self.map = mmap.mmap(fd, PROGRESS_BYTES)
        finally:
            os.close(fd)
        self.progress = memoryview(self.map).cast("Q")
        # A call the predecessor died in is not running here.
        self.progress[STARTED] = self.progress[DONE]
        if memory_limit is not None:
            at_rest = private_resident(os.getpid(), with_root=True)
            if at_rest > memory_limit:  # it would kill itself before every call, forever
                raise ValueError(
                    f"memory_limit={memory_limit} bytes is less than this Ray actor holds "
                    f"at rest, its handler built ({at_rest} bytes, most of it Ray's own "
                    f"runtime); a Ray listener's limit counts the whole actor process: "
                    f"raise it well above {at_rest}"
                )
        if handler_timeout is not None or memory_limit is not None:
            threading.Thread(
                target=self._watchdog,
                args=(handler_timeout, memory_limit),
                name="fanout-watchdog",
                daemon=True,
            ).start()

    def _watchdog(self, timeout: float | None, memory_limit: int | None) -> None:
        """Kill this actor when one handler call outlives ``timeout``, or it grows
        past ``memory_limit`` (``fanout.worker.warden.private_resident``, every ``MEMORY_TICK``).

        A thread cannot stop a Python call, so the process goes: Ray restarts the
        actor and the producer resends, counting one attempt for the frame.
        """
        progress = self.progress
        running, since = 0, 0.0
        me = os.getpid()
        next_check = 0.0
        while True:
            time.sleep(WATCHDOG_TICK)
            if memory_limit is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + MEMORY_TICK
                if private_resident(me, with_root=True) > memory_limit:
                    os.kill(me, signal.SIGKILL)
            if timeout is None:
                continue
            started = progress[STARTED]
            if started <= progress[DONE]:  # between calls
                running = 0
                continue
            now = time.monotonic()
            if started != running:  # a call began since the last look
                running, since = started, now
            elif now - since > timeout:
                os.kill(os.getpid(), signal.SIGKILL)

    def ready(self) -> int:
        """Answer once the handler is built; returns this actor's pid."""
        return os.getpid()

    def leave(self) -> None:
        """Remove the progress file; the listener is done with this actor."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def handle_batch(
        self, gen: int, opens: bool, after: int, data: Any, refs: dict[int, Any] | None = None
    ) -> BatchResult | None:
        """Handle every frame of ``data`` in order.

        Args:
            gen: The producer's generation of this lane (it grows at each rewind).
            opens: True for the first batch of a generation.
            after: The last sequence number of the batch sent before this one in
                the same generation (sequence numbers have gaps where an overflow
                policy dropped frames).
            data: Whole frames (header and payload), as the ring holds them: any
                bytes-like object (the listener sends a numpy array, which Ray
                hands over without copying it).
            refs: ``token -> ObjectRef`` of the big buffers the frames refer to
                (``fanout.buffers.ray_store``); a handler gets them through ``ray.get``.

        Returns:
            ``BatchResult``, or None when the batch is stale and was not handled.
        """
        if opens:
            self.gen = gen
        elif gen != self.gen or after != self.last_seq:
            return None
        use_batch_refs(refs)
        try:
            return self._handle(data)
        finally:
            use_batch_refs(None)

    def _handle(self, data: Any) -> BatchResult:
        """Handle the frames of an accepted batch, in the worker's frame loop."""
        stamps = array("q")
        errors: list[tuple[int, str, bytes]] = []
        bad: list[tuple[int, str, bytes]] = []
        schema = self.schema

        def on_error(seq: int, payload: bytes) -> None:
            echo = payload if len(payload) <= MAX_ECHO else b""
            errors.append((seq, traceback.format_exc(), echo))

        def on_bad_frame(seq: int, payload: bytes, exc: Exception) -> None:
            # Deterministic: a retry would fail the same way, so the producer
            # dead-letters it at once and this batch goes on.
            misfit = None if schema is None else describe_misfit(schema, payload, exc)
            why = f"frame {seq}: {misfit}" if misfit else f"frame {seq} cannot be decoded: {exc!r}"
            bad.append((seq, why, payload))

        progress = self.progress
        before = progress[HANDLED]
        # Frames up to DONE were finished before a crash: acknowledged, not run again.
        seq = serve_batch(
            data, progress, self.unpack, self.handler, on_error, on_bad_frame, stamps
        )
        self.last_seq = seq
        return seq, progress[HANDLED] - before, errors, bad, stamps.tobytes()
