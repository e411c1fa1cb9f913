"""The worker process: read frames from its pipe, call the handler, record progress.

One worker serves one lane. It shares no lock with anyone: it reads its data pipe,
writes its own progress slot (shared memory) and writes rare messages (ready,
handler exceptions, start-up failures) to its return pipe. Killed at any instant,
it can wedge nothing; the parent rewinds the lane from the slot.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any

from fanout.handlers import build_handler
from fanout.wire.codec import Codec
from fanout.wire.protocol import (
    EXIT_START_FAILED,
    MAX_RETURN_MESSAGE,
    MSG_ERROR,
    MSG_FATAL,
    MSG_READY,
    MSG_UNDECODABLE,
    PID,
    SLOT_BYTES,
    send_message,
)
from fanout.wire.schema import describe_misfit
from fanout.worker.isolation import close_inherited, map_slot
from fanout.worker.shared import map_worker_view
from fanout.worker.warden import become_warden

__all__ = ["FdArg", "WorkerSpec", "worker_main"]

MAX_ECHO = 1 << 20  # a notification larger than this is not echoed with its error
# An undecodable payload travels back whole for on_dead_letter, up to this size.
MAX_RAW_ECHO = MAX_RETURN_MESSAGE - (1 << 20)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to start, pickled by multiprocessing."""

    listener: str
    lane: int
    handler_blob: bytes
    is_factory: bool
    codec_blob: bytes
    slot_offset: int
    schema_blob: bytes | None = None  # the listener's schema type, pickled
    # The producer's fanout: a worker that imported another one refuses to run.
    fanout_dir: str = ""
    fanout_version: str = ""
    arena_size: int = 0  # bytes of the distributor's shared-memory arena; 0: none


def producer_fanout() -> tuple[str, str]:
    """Where this process's fanout package lives, and its version."""
    from fanout._version import __version__

    return os.path.dirname(os.path.realpath(__file__)), __version__


def check_same_fanout(spec: WorkerSpec) -> None:
    """Raise ``ImportError`` if this worker runs another fanout than its producer."""
    if not spec.fanout_dir:
        return
    here, version = producer_fanout()
    if (here, version) != (spec.fanout_dir, spec.fanout_version):
        raise ImportError(
            f"this worker imported fanout {version} from {here}, but its producer "
            f"runs fanout {spec.fanout_version} from {spec.fanout_dir}; a folder named "
            f"fanout on the worker's sys.path (PYTHONPATH, the current directory) "
            f"shadows the producer's package: rename it or fix the path"
        )


class FdArg:
    """A file descriptor passed to a worker (works with forkserver and spawn)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        # Called while multiprocessing pickles the Process: DupFd registers the
        # fd with the spawning Popen, which hands it over to the child.
        return (_rebuild_fd, (reduction.DupFd(self.fd),))


def _rebuild_fd(dup: Any) -> int:
    return int(dup.detach())


def inline_copy(codec: Codec, payload: bytes) -> bytes:
    """``payload`` with shared-memory buffers inline, for the producer to decode later.

    By the time the producer reads an error report the worker has finished the frame
    and its arena blocks may be reused; the buffers' bytes must travel with it.
    """
    try:
        return codec.pack(codec.unpack(payload))
    except Exception:  # keep the reference: the producer may still find the block
        return payload


def worker_main(
    spec: WorkerSpec, data_fd: int, ret_fd: int, shm_fd: int, arena_fd: int = -1
) -> None:
    """Entry point of a worker process."""
    # Ctrl-C in a terminal reaches the whole process group: the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # native unless FANOUT_NO_EXTENSIONS
    from fanout.native.pick import guard_forks, serve, watch_lifeline

    # multiprocessing's pipe for parent_process(): its write end is in the producer
    # alone, whoever forked this worker. At its hang-up the worker ends, even mid-call.
    lifeline = multiprocessing.parent_process().sentinel  # type: ignore[union-attr]
    # This process stays behind as the warden of everything the handler starts;
    # the handler runs in a child, from the next line on.
    worker_only = (data_fd, shm_fd) if arena_fd < 0 else (data_fd, shm_fd, arena_fd)
    become_warden(lifeline, ret_fd, worker_only)
    watch_lifeline(lifeline)
    slot = map_slot(shm_fd, spec.slot_offset, SLOT_BYTES)  # this lane's slot, no other
    os.close(shm_fd)
    if arena_fd >= 0:
        # Read-only, and sealed so it cannot be made writable; no descriptor kept.
        map_worker_view(arena_fd, spec.arena_size)
        os.close(arena_fd)
    # Before any handler code runs: what it cannot hold, it cannot scribble on.
    close_inherited({data_fd, ret_fd, lifeline})
    for fd in (data_fd, ret_fd, lifeline):  # nothing the handler runs holds them
        os.set_inheritable(fd, False)
    slot[PID] = os.getpid()
    # Before any handler code (its factory and __init__ included): a forked copy of
    # this worker loses the pipes at once and leaves when its call returns, so each
    # pipe has one reader.
    guard_forks(data_fd, ret_fd)
    try:
        # Unpickled here, not by multiprocessing, so a failure is reported.
        check_same_fanout(spec)
        codec: Codec = pickle.loads(spec.codec_blob)
        schema = None if spec.schema_blob is None else pickle.loads(spec.schema_blob)
        unpack = codec.unpacker(schema)  # one typed decoder for the listener's schema
        handler = build_handler(pickle.loads(spec.handler_blob), spec.is_factory)
    except BaseException:
        send_message(
            ret_fd,
            {
                "t": MSG_FATAL,
                "text": f"handler could not be built in worker {os.getpid()}:\n"
                + traceback.format_exc(),
            },
        )
        os._exit(EXIT_START_FAILED)
    send_message(ret_fd, {"t": MSG_READY, "pid": os.getpid()})

    def on_error(seq: int, payload: bytes) -> None:
        # Called inside the handler's except block: format_exc sees its error.
        text = traceback.format_exc()
        if spec.arena_size:
            payload = inline_copy(codec, payload)
        if len(payload) > MAX_ECHO:  # the parent decodes it only to name it
            payload = b""
        send_message(ret_fd, {"t": MSG_ERROR, "seq": seq, "text": text, "payload": payload})

    def on_bad_frame(seq: int, payload: bytes, exc: Exception) -> None:
        misfit = None if schema is None else describe_misfit(schema, payload, exc)
        text = f"frame {seq}: {misfit}" if misfit else f"frame {seq} cannot be decoded: {exc!r}"
        if len(payload) > MAX_RAW_ECHO:
            text += f" (payload of {len(payload)} bytes cut to its first {MAX_RAW_ECHO})"
            payload = payload[:MAX_RAW_ECHO]
        send_message(ret_fd, {"t": MSG_UNDECODABLE, "seq": seq, "text": text, "payload": payload})

    serve(data_fd, slot, unpack, handler, on_error, on_bad_frame)
    # Everything was handled (EOF) or the parent asked to stop: leave at once,
    # without running handlers' atexit hooks twice or flushing inherited buffers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
