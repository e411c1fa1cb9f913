"""The worker process: read frames from its pipe, call the handler, record progress.

One worker serves one lane. It shares no lock with anyone: it reads its data pipe,
writes its own progress slot (shared memory) and writes rare messages (ready,
handler exceptions, start-up failures) to its return pipe. Killed at any instant,
it can wedge nothing; the parent rewinds the lane from the slot.
"""

from __future__ import annotations

import multiprocessing
import operator
import os
import pickle
import signal
import struct
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any

import msgpack

from fanout._isolation import close_inherited, map_slot
from fanout._ring_common import HEADER, HEADER_SIZE
from fanout.codec import ADD, DELETE, UPDATE, Codec
from fanout.handlers import build_handler
from fanout.stats import (
    DONE,
    ERRORS,
    HANDLED,
    HIST,
    PID,
    SLOT_BYTES,
    START_NS,
    STARTED,
    STOP,
    bucket_of,
)

__all__ = ["FdArg", "WorkerSpec", "serve_py", "worker_main"]

RETURN_HEADER = struct.Struct("<I")
MAX_RETURN_MESSAGE = 16 * 1024 * 1024
READ_CHUNK = 1 << 20

MAX_ECHO = 1 << 20  # a notification larger than this is not echoed with its error

# Exit code the parent understands (with a "fatal" message before it).
EXIT_START_FAILED = 3


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to start, pickled by multiprocessing."""

    listener: str
    lane: int
    handler_blob: bytes
    is_factory: bool
    codec_blob: bytes
    slot_offset: int


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


def send_message(fd: int, msg: dict[str, Any]) -> None:
    """Write one length-prefixed MessagePack message to the return pipe."""
    body = msgpack.packb(msg, use_bin_type=True)
    data = memoryview(RETURN_HEADER.pack(len(body)) + body)
    while data:
        data = data[os.write(fd, data) :]


def worker_main(spec: WorkerSpec, data_fd: int, ret_fd: int, shm_fd: int) -> None:
    """Entry point of a worker process."""
    # Ctrl-C in a terminal reaches the whole process group: the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from fanout._impl import serve, watch_lifeline  # native unless FANOUT_NO_EXTENSIONS

    # multiprocessing's pipe for parent_process(): its write end is in the producer
    # alone, whoever forked this worker. At its hang-up the worker ends, even mid-call.
    lifeline = multiprocessing.parent_process().sentinel  # type: ignore[union-attr]
    watch_lifeline(lifeline)
    slot = map_slot(shm_fd, spec.slot_offset, SLOT_BYTES)  # this lane's slot, no other
    os.close(shm_fd)
    # Before any handler code runs: what it cannot hold, it cannot scribble on.
    close_inherited({data_fd, ret_fd, lifeline})
    slot[PID] = os.getpid()
    try:
        # Unpickled here, not by multiprocessing, so a failure is reported.
        codec: Codec = pickle.loads(spec.codec_blob)
        handler = build_handler(pickle.loads(spec.handler_blob), spec.is_factory)
    except BaseException:
        send_message(
            ret_fd,
            {
                "t": "fatal",
                "text": f"handler could not be built in worker {os.getpid()}:\n"
                + traceback.format_exc(),
            },
        )
        os._exit(EXIT_START_FAILED)
    send_message(ret_fd, {"t": "ready", "pid": os.getpid()})

    def on_error(seq: int, payload: bytes) -> None:
        # Called inside the handler's except block: format_exc sees its error.
        text = traceback.format_exc()
        if len(payload) > MAX_ECHO:  # the parent decodes it only to name it
            payload = b""
        send_message(ret_fd, {"t": "error", "seq": seq, "text": text, "payload": payload})

    def on_bad_frame(seq: int, text: str) -> None:
        send_message(ret_fd, {"t": "undecodable", "seq": seq, "text": text})

    serve(data_fd, slot, codec.unpack, handler, on_error, on_bad_frame)
    # Everything was handled (EOF) or the parent asked to stop: leave at once,
    # without running handlers' atexit hooks twice or flushing inherited buffers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve_py(
    fd: int, slot: memoryview, unpack: Any, handler: Any, on_error: Any, on_bad_frame: Any
) -> None:
    """Handle frames from ``fd`` until EOF or the slot's STOP word is set.

    Pure-Python twin of ``fanout._worker.serve``.
    """
    on_add, on_update, on_delete = handler.on_add, handler.on_update, handler.on_delete
    unpack_header = HEADER.unpack_from
    monotonic_ns = time.monotonic_ns
    leftover = b""
    while True:
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            return
        data = leftover + chunk if leftover else chunk
        end = len(data)
        pos = 0
        while end - pos >= HEADER_SIZE:
            length, seq = unpack_header(data, pos)
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            if slot[STOP]:
                return
            payload = data[pos + HEADER_SIZE : stop]
            pos = stop
            try:
                kind, t_ns, a, b = unpack(payload)
                # Integers as the native loop takes them (it converts to C ints).
                kind, t_ns = operator.index(kind), operator.index(t_ns)
                if not ADD <= kind <= DELETE:
                    raise ValueError(f"unknown notification kind {kind!r}")
            except Exception as exc:
                # Decoding is deterministic: a retry would fail the same way.
                # The parent dead-letters it; this worker goes on.
                slot[STARTED] = seq
                on_bad_frame(seq, f"frame {seq} cannot be decoded: {exc!r}")
                slot[DONE] = seq
                continue
            now = monotonic_ns()
            slot[START_NS] = now
            slot[STARTED] = seq
            slot[HIST + bucket_of(now - t_ns)] += 1
            try:
                if kind == UPDATE:
                    on_update(a, b)
                elif kind == ADD:
                    on_add(a, bool(b))
                else:
                    on_delete(a)
            except Exception:
                # The call is over: stop the handler_timeout clock before a report
                # that may wait on a full return pipe.
                slot[START_NS] = 0
                slot[ERRORS] += 1
                on_error(seq, payload)
            slot[HANDLED] += 1
            slot[START_NS] = 0
            slot[DONE] = seq
        leftover = data[pos:] if pos < end else b""
