"""The worker's frame loop in pure Python: the twin of the native ``fanout.native._worker``.

Both take the same arguments, handle frames the same way and report the same
errors (tests/test_worker_loop.py feeds them the same frames);
``FANOUT_NO_EXTENSIONS=1`` makes workers use this one.
"""

from __future__ import annotations

import operator
import os
import select
import threading
import time
from typing import Any

from fanout.stats import bucket_of
from fanout.wire.protocol import (
    ADD,
    DONE,
    ERRORS,
    EXIT_ORPHANED,
    HANDLED,
    HEADER,
    HEADER_SIZE,
    HIST,
    MAX_T_NS,
    START_NS,
    STARTED,
    STOP,
    UPDATE,
    UPDATE_SAME,
    wire_fields_error,
    wire_shape_error,
)

__all__ = ["NATIVE", "guard_forks", "serve", "serve_batch", "watch_lifeline"]

NATIVE = False
READ_CHUNK = 1 << 20
_guarded: list[int] = []  # the worker's pipes, closed in any forked copy
_forked = False  # this process is a forked copy of the worker


def _in_forked_copy() -> None:
    global _forked
    _forked = True
    for fd in _guarded:
        try:
            os.close(fd)
        except OSError:
            pass


def guard_forks(data_fd: int, ret_fd: int) -> None:
    """Close ``fds`` in every forked copy of this process; ``serve`` there then ends it.

    Twin of ``fanout.native._worker.guard_forks`` (which hooks ``fork()`` itself; this hooks
    ``os.fork``). A copy forked from C code (``ctypes``, an extension) runs no Python
    hook: ``serve`` tells it by its pid and ends it before it touches the slot or
    the pipes.
    """
    if not _guarded:
        os.register_at_fork(after_in_child=_in_forked_copy)
    _guarded[:] = [data_fd, ret_fd]


def serve(
    fd: int,
    slot: memoryview,
    unpack: Any,
    handler: Any,
    on_error: Any,
    on_bad_frame: Any,
    chunk: int = READ_CHUNK,
) -> None:
    """Handle frames from ``fd`` until EOF or the slot's STOP word is set.

    ``unpack(payload)`` gives ``[kind, t_ns, a, b]``; a frame it cannot decode
    goes to ``on_bad_frame(seq, payload, exc)``, a handler exception to
    ``on_error(seq, payload)``. ``chunk``: bytes asked of each read. The twin of
    ``fanout.native._worker.serve``.
    """
    # Bound once: the frame loop takes them from this tuple at each read.
    calls = (unpack, handler.on_add, handler.on_update, handler.on_delete, on_error, on_bad_frame)
    owner = os.getpid()  # a copy forked from C code has another pid
    pending = bytearray()  # the start of a frame split across reads
    need = 0  # bytes that frame needs in all (header included), once known
    while True:
        if _forked or os.getpid() != owner:
            os._exit(0)
        got = _read(fd, max(chunk, need - len(pending)))
        if not got:
            return
        if pending:
            # Grow in place (amortised linear), not leftover + got (quadratic
            # on a multi-MiB frame), and parse only once the frame is whole.
            pending += got
            if len(pending) < need:
                continue
            data = bytes(pending)
            pending = bytearray()
        else:
            data = got
        pos, _ = _frames(data, slot, calls, owner)
        if pos < 0:  # the STOP word
            return
        # Keep the start of a frame split across reads for the next one.
        end = len(data)
        if pos < end:
            pending = bytearray(data[pos:])
            need = HEADER_SIZE
            if end - pos >= HEADER_SIZE:
                need += HEADER.unpack_from(data, pos)[0]
        else:
            need = 0


def _read(fd: int, n: int) -> bytes:
    """Read up to ``n`` bytes from the data pipe; ``b""`` at EOF."""
    try:
        return os.read(fd, n)
    except OSError as exc:  # said as the native loop says it
        raise OSError(exc.errno, f"read from the data pipe: {exc.strerror}") from None


def serve_batch(
    data: Any,
    slot: memoryview,
    unpack: Any,
    handler: Any,
    on_error: Any,
    on_bad_frame: Any,
    stamps: Any,
) -> int:
    """Handle the whole frames of ``data`` in order, as ``serve`` handles a pipe's.

    Frames up to the slot's DONE word as the call begins (finished before a
    restart) are counted in HANDLED and not run again; the ``t_ns`` of each
    frame handled is appended to ``stamps`` (an ``array("q")``). Stops early
    if the STOP word is set. Returns the sequence number of the last frame
    reached (0: none). Twin of ``fanout.native._worker.serve_batch``.
    """
    calls = (unpack, handler.on_add, handler.on_update, handler.on_delete, on_error, on_bad_frame)
    return _frames(bytes(data), slot, calls, os.getpid(), slot[DONE], stamps)[1]


def _frames(
    data: bytes,
    slot: memoryview,
    calls: tuple[Any, ...],
    owner: int,
    skip: int = 0,
    stamps: Any = None,
) -> tuple[int, int]:
    """Handle the whole frames at the start of ``data``: the bytes they took, the last seq.

    -1 bytes: the STOP word is set. Frames up to ``skip`` are counted handled,
    not run; each handled frame's t_ns goes to ``stamps`` unless it is None.
    """
    unpack, on_add, on_update, on_delete, on_error, on_bad_frame = calls
    # Every name the per-frame path uses, as a local: global and builtin lookups
    # cost this loop 4,450 of 32,400 instructions per small frame (callgrind).
    unpack_header, monotonic_ns, getpid = HEADER.unpack_from, time.monotonic_ns, os.getpid
    index, sequence = operator.index, (list, tuple)
    add, update, update_same = ADD, UPDATE, UPDATE_SAME
    header_size, max_t_ns, hist, bucket = HEADER_SIZE, MAX_T_NS, HIST, bucket_of
    stop_w, started_w, done_w, start_ns_w, handled_w = STOP, STARTED, DONE, START_NS, HANDLED
    _isinstance, _len = isinstance, len
    end = len(data)
    pos = last = 0
    while end - pos >= header_size:
        length, seq = unpack_header(data, pos)
        stop = pos + header_size + length
        if stop > end:
            break
        if slot[stop_w]:
            return -1, last
        last = seq
        if seq <= skip:  # finished before a restart: acknowledged, not run again
            pos = stop
            slot[handled_w] += 1
            continue
        payload = data[pos + header_size : stop]
        pos = stop
        try:
            fields = unpack(payload)
            if not _isinstance(fields, sequence) or _len(fields) != 4:
                raise wire_shape_error(fields)
            kind_o, t_o, a, b = fields
            # Integers as the native loop takes them (it converts to C ints).
            try:
                kind, t_ns = index(kind_o), index(t_o)
            except TypeError:
                raise wire_fields_error(kind_o, t_o) from None
            if not (add <= kind <= update_same and 0 <= t_ns <= max_t_ns):
                raise wire_fields_error(kind_o, t_o)
        except Exception as exc:
            _bad_frame(slot, seq, payload, exc, on_bad_frame)
            continue
        now = monotonic_ns()
        slot[start_ns_w] = now
        slot[started_w] = seq
        slot[hist + bucket(now - t_ns)] += 1
        try:
            if kind == update:
                on_update(a, b)
            elif kind == add:
                on_add(a, bool(b))
            elif kind == update_same:  # one object on the wire, passed as both
                on_update(a, a)
            else:
                on_delete(a)
        except Exception:
            _handler_failed(slot, seq, payload, on_error, owner)
        if _forked or getpid() != owner:  # a copy the handler forked: not its call
            os._exit(0)
        slot[handled_w] += 1
        slot[start_ns_w] = 0
        slot[done_w] = seq
        if stamps is not None:
            stamps.append(t_ns)
    return pos, last


def _bad_frame(
    slot: memoryview, seq: int, payload: bytes, exc: Exception, on_bad_frame: Any
) -> None:
    """Report a frame that does not decode, and count it done."""
    # Decoding is deterministic (an object that does not fit the schema never
    # will): a retry would fail the same way. The parent dead-letters it; this
    # worker goes on.
    slot[STARTED] = seq
    on_bad_frame(seq, payload, exc)
    slot[DONE] = seq


def _handler_failed(slot: memoryview, seq: int, payload: bytes, on_error: Any, owner: int) -> None:
    """Count and report the exception the handler raised for frame ``seq``."""
    if _forked or os.getpid() != owner:  # a copy the handler forked: not it
        os._exit(0)
    # The call is over: stop the handler_timeout clock before a report that may
    # wait on a full return pipe.
    slot[START_NS] = 0
    slot[ERRORS] += 1
    on_error(seq, payload)


def watch_lifeline(fd: int) -> None:
    """End the process (``EXIT_ORPHANED``) as soon as ``fd`` reports hang-up.

    Twin of ``fanout.native._worker.watch_lifeline``: a thread, so the handler
    is cut off mid-call too, instead of a check between frames.
    """

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            try:
                if poller.poll():
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="fanout-lifeline", daemon=True).start()
