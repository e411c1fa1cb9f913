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
from fanout.codec import (
    ADD,
    MAX_T_NS,
    UPDATE,
    UPDATE_SAME,
    Codec,
    describe_misfit,
    wire_fields_error,
    wire_shape_error,
)
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
# An undecodable payload travels back whole for on_dead_letter, up to this size.
MAX_RAW_ECHO = MAX_RETURN_MESSAGE - (1 << 20)

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
    schema_blob: bytes | None = None  # the listener's schema type, pickled
    # The producer's fanout: a worker that imported another one refuses to run.
    fanout_dir: str = ""
    fanout_version: str = ""


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
        check_same_fanout(spec)
        codec: Codec = pickle.loads(spec.codec_blob)
        schema = None if spec.schema_blob is None else pickle.loads(spec.schema_blob)
        unpack = codec.unpacker(schema)  # one typed decoder for the listener's schema
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

    def on_bad_frame(seq: int, payload: bytes, exc: Exception) -> None:
        misfit = None if schema is None else describe_misfit(schema, payload, exc)
        text = f"frame {seq}: {misfit}" if misfit else f"frame {seq} cannot be decoded: {exc!r}"
        if len(payload) > MAX_RAW_ECHO:
            text += f" (payload of {len(payload)} bytes cut to its first {MAX_RAW_ECHO})"
            payload = payload[:MAX_RAW_ECHO]
        send_message(ret_fd, {"t": "undecodable", "seq": seq, "text": text, "payload": payload})

    serve(data_fd, slot, unpack, handler, on_error, on_bad_frame)
    # Everything was handled (EOF) or the parent asked to stop: leave at once,
    # without running handlers' atexit hooks twice or flushing inherited buffers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve_py(
    fd: int, slot: memoryview, unpack: Any, handler: Any, on_error: Any, on_bad_frame: Any
) -> None:
    """Handle frames from ``fd`` until EOF or the slot's STOP word is set.

    ``unpack(payload)`` gives ``[kind, t_ns, a, b]``; a frame it cannot decode
    goes to ``on_bad_frame(seq, payload, exc)``, a handler exception to
    ``on_error(seq, payload)``. Pure-Python twin of ``fanout._worker.serve``.
    """
    on_add, on_update, on_delete = handler.on_add, handler.on_update, handler.on_delete
    unpack_header = HEADER.unpack_from
    monotonic_ns = time.monotonic_ns
    pending = bytearray()  # the start of a frame split across reads
    need = 0  # bytes that frame needs in all (header included), once known
    while True:
        chunk = os.read(fd, max(READ_CHUNK, need - len(pending)))
        if not chunk:
            return
        if pending:
            # Grow in place (amortised linear), not leftover + chunk (quadratic
            # on a multi-MiB frame), and parse only once the frame is whole.
            pending += chunk
            if len(pending) < need:
                continue
            data = bytes(pending)
            pending = bytearray()
        else:
            data = chunk
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
                fields = unpack(payload)
                if not isinstance(fields, (list, tuple)) or len(fields) != 4:
                    raise wire_shape_error(fields)
                kind_o, t_o, a, b = fields
                # Integers as the native loop takes them (it converts to C ints).
                try:
                    kind, t_ns = operator.index(kind_o), operator.index(t_o)
                except TypeError:
                    raise wire_fields_error(kind_o, t_o) from None
                if not (ADD <= kind <= UPDATE_SAME and 0 <= t_ns <= MAX_T_NS):
                    raise wire_fields_error(kind_o, t_o)
            except Exception as exc:
                # Decoding is deterministic (an object that does not fit the
                # schema never will): a retry would fail the same way. The
                # parent dead-letters it; this worker goes on.
                slot[STARTED] = seq
                on_bad_frame(seq, payload, exc)
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
                elif kind == UPDATE_SAME:  # one object on the wire, passed as both
                    on_update(a, a)
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
        if pos < end:
            pending = bytearray(data[pos:])
            need = HEADER_SIZE
            if end - pos >= HEADER_SIZE:
                need += unpack_header(data, pos)[0]
        else:
            need = 0
