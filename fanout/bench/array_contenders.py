"""The ``arrays`` scenario's contenders: ways to move a float64 array to several processes.

Big binary payloads are where copies cost most, so each of these is run the same
way (``fanout.bench.arrays`` measures them):

* ``fanout-process``: a Distributor with one process listener (1 worker) per
  listener; the handler sums each array it gets;
* ``pipe+msgpack``: hand-written, one consumer process per listener; frames
  ``[dtype, shape, bytes]`` packed with msgpack, the array bytes inline, written
  in batches to a pipe per consumer, read back with ``np.frombuffer``;
* ``shared_memory``: hand-written, one ``multiprocessing.shared_memory`` segment
  per array, the producer copies the array in once and sends the segment's name
  over a pipe to every consumer; a consumer maps it read-only, sums, and says so
  on a return pipe; the producer unlinks a segment once every consumer has.

A session, whichever the contender: ``cls(listeners)``, ``start()`` (consumers up and
ready; not timed), ``send(array)``, ``finish(timeout)`` (end of input; waits for every
consumer and returns one ``{"count", "sum"}`` per listener), ``close()`` (kills and
frees whatever is left, after a failure too; called always).
"""

from __future__ import annotations

import fcntl
import mmap
import multiprocessing
import os
import select
import shutil
import struct
import tempfile
import time
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import msgpack
import numpy as np

import fanout
from fanout.bench.model import FINISH_TIMEOUT
from fanout.bench.sessions import Contender, read_result, reap, say_ready
from fanout.listeners.pipes import F_SETPIPE_SZ, PIPE_SIZE
from fanout.worker.main import FdArg

__all__ = ["CONTENDERS", "TALLY", "ArraySum", "FanoutArrays", "PipeArrays", "ShmArrays"]

BATCH = 64  # frames (or names) a baseline holds before writing
BATCH_BYTES = 1 << 20  # ... or this many array bytes, whichever comes first
SHM_WINDOW_BYTES = 128 << 20  # shared_memory: segments in flight, in bytes ...
SHM_WINDOW_COUNT = 1024  # ... and in number (keeps names and acks within a pipe)
LANE_BOUND = 128 << 20  # fanout: max_pending_bytes of each lane (overflow="block")
SHM_DIR = "/dev/shm"
SHM_PREFIX = "fanout-bench-"  # + producer pid + "-": what a leak check looks for
TALLY = struct.Struct("<qd")  # count, sum: what a fanout handler leaves in its file


def _pipe_pair() -> tuple[int, int]:
    r, w = os.pipe()
    try:  # the pipe size fanout asks for: compare like with like
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return r, w


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _report(fd: int, count: int, total: float) -> None:
    _write_all(fd, msgpack.packb({"count": count, "sum": total}))
    os.close(fd)


# -- the baselines' shared plumbing ---------------------------------------------------------


class _Baseline(Contender):
    """One consumer process per listener, each with a result pipe (ready byte, result)."""

    def __init__(self, listeners: int) -> None:
        self.L = listeners
        self.ctx = multiprocessing.get_context("forkserver")
        self.procs: list[Any] = []
        self.results: list[int] = []  # read ends: a consumer's ready byte, then result
        self.outs: list[int] = []  # write ends: what the producer sends each consumer
        self.batch: list[bytes] = []  # frames held for the next write to every consumer
        self.batch_bytes = 0  # array bytes they stand for

    def _spawn(self, target: Any, *args: Any) -> None:
        """Start a consumer ``target(*args, result_fd)``; fds in ``args`` as ``FdArg``."""
        r, w = os.pipe()
        self.results.append(r)
        try:
            p = self.ctx.Process(target=target, args=(*args, FdArg(w)), daemon=True)
            p.start()
            self.procs.append(p)
        finally:
            os.close(w)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        for fd in self.results:
            if not select.select([fd], [], [], timeout)[0] or os.read(fd, 1) != b"R":
                raise RuntimeError(f"{self.name}: a consumer failed to start")

    def _hold(self, frame: bytes, nbytes: int) -> None:
        """Hold ``frame`` (for ``nbytes`` of array) for the next write; write when enough."""
        self.batch.append(frame)
        self.batch_bytes += nbytes
        if len(self.batch) >= BATCH or self.batch_bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the frames held to every consumer, in one write each."""
        if not self.batch:
            return
        data = self.batch[0] if len(self.batch) == 1 else b"".join(self.batch)
        self._sent(len(self.batch))
        self.batch, self.batch_bytes = [], 0
        for fd in self.outs:
            _write_all(fd, data)

    def _sent(self, frames: int) -> None:
        """Note that ``frames`` more frames go to every consumer (for subclasses)."""

    def _close_outs(self) -> None:
        for fd in self.outs:
            os.close(fd)
        self.outs = []

    def _collect(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        results = []
        while self.results:
            fd = self.results.pop(0)
            results.append(read_result(fd, max(0.1, deadline - time.monotonic())))
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        return results

    def close(self) -> None:
        """Kill and reap every consumer left, close every fd (after a failure too)."""
        self._close_outs()
        reap(self.procs)
        self.procs = []
        for fd in self.results:
            os.close(fd)
        self.results = []


# -- pipe + msgpack -------------------------------------------------------------------------


def _pipe_consumer(fd: int, result: int) -> None:
    """Stream-decode ``[dtype, shape, bytes]`` frames, sum each array, report."""
    say_ready(result)
    count, total = 0, 0.0
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 30)
    while chunk := os.read(fd, PIPE_SIZE):
        unpacker.feed(chunk)
        for dtype, shape, raw in unpacker:
            total += float(np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).sum())
            count += 1
    os.close(fd)
    _report(result, count, total)


class PipeArrays(_Baseline):
    """Hand-written: msgpack frames with the array bytes inline, batched, a pipe each."""

    name = "pipe+msgpack"

    def start(self) -> None:
        for _ in range(self.L):
            r, w = _pipe_pair()
            self.outs.append(w)
            try:
                self._spawn(_pipe_consumer, FdArg(r))
            finally:
                os.close(r)
        self._wait_ready()

    def send(self, arr: np.ndarray) -> None:
        self._hold(msgpack.packb([arr.dtype.str, list(arr.shape), arr.data]), arr.nbytes)

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        self.flush()
        self._close_outs()  # end of input: each consumer reports and exits
        return self._collect(timeout)


# -- multiprocessing.shared_memory ----------------------------------------------------------


def _shm_consumer(names: int, acks: int, result: int) -> None:
    """Map each named segment read-only, sum it, unmap, and acknowledge its name.

    The segment is opened under /dev/shm rather than with ``SharedMemory(name)``:
    before Python 3.13 attaching registers the name with the resource tracker this
    consumer shares with the producer, which then reports a leak and unlinks the
    name again after the producer has already unlinked it.
    """
    say_ready(result)
    count, total = 0, 0.0
    unpacker = msgpack.Unpacker(raw=False)
    while chunk := os.read(names, 1 << 16):
        unpacker.feed(chunk)
        done = []
        for name, dtype, shape in unpacker:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
            try:
                mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            arr = np.frombuffer(mm, dtype=np.dtype(dtype)).reshape(shape)
            total += float(arr.sum())
            del arr  # the view must go before the mapping can close
            mm.close()
            count += 1
            done.append(msgpack.packb(name))
        if done:  # one write per chunk of names: acks are batched as names are
            _write_all(acks, b"".join(done))
    os.close(names)
    os.close(acks)
    _report(result, count, total)


class ShmArrays(_Baseline):
    """Hand-written: a ``multiprocessing.shared_memory`` segment per array, names by pipe.

    At most ``SHM_WINDOW_BYTES`` (and ``SHM_WINDOW_COUNT`` segments) are in flight:
    past that, the producer waits for acknowledgements, as a bounded arena would.
    """

    name = "shared_memory"

    def __init__(self, listeners: int) -> None:
        super().__init__(listeners)
        self.prefix = f"{SHM_PREFIX}{os.getpid()}-{id(self):x}-"
        self.seq = 0
        # name -> [segment, consumers yet to acknowledge]; every segment created is
        # here until unlinked, so close() can unlink whatever a failure left.
        self.live: dict[str, list[Any]] = {}
        self.in_flight = 0
        self.acks: list[int] = []  # read ends of the consumers' ack pipes
        self.unpackers: dict[int, Any] = {}
        self.owed: dict[int, int] = {}  # ack fd -> names sent to its consumer, unacknowledged

    def start(self) -> None:
        for _ in range(self.L):
            names_r, names_w = _pipe_pair()
            acks_r, acks_w = _pipe_pair()
            self.outs.append(names_w)
            self.acks.append(acks_r)
            self.unpackers[acks_r] = msgpack.Unpacker(raw=False)
            self.owed[acks_r] = 0
            try:
                self._spawn(_shm_consumer, FdArg(names_r), FdArg(acks_w))
            finally:
                os.close(names_r)
                os.close(acks_w)
        self._wait_ready()

    def send(self, arr: np.ndarray) -> None:
        self._reap(0.0)
        while self.live and (
            self.in_flight + arr.nbytes > SHM_WINDOW_BYTES or len(self.live) >= SHM_WINDOW_COUNT
        ):
            self.flush()  # names held back would never be acknowledged
            self._reap(FINISH_TIMEOUT)
        name = f"{self.prefix}{self.seq}"
        self.seq += 1
        shm = SharedMemory(name=name, create=True, size=arr.nbytes)
        self.live[name] = [shm, self.L]
        self.in_flight += arr.nbytes
        view: np.ndarray = np.ndarray(arr.shape, dtype=arr.dtype, buffer=shm.buf)
        view[...] = arr  # the one copy
        del view
        shm.close()  # the producer keeps no mapping, only the name to unlink
        self._hold(msgpack.packb([name, arr.dtype.str, list(arr.shape)]), arr.nbytes)

    def _sent(self, frames: int) -> None:
        for fd in self.acks:
            self.owed[fd] += frames

    def _reap(self, timeout: float) -> None:
        """Read the acknowledgements there are (waiting up to ``timeout`` for some).

        Raises:
            RuntimeError: A consumer hung up with segments unacknowledged (it died).
            TimeoutError: ``timeout`` > 0 and no acknowledgement came in time.
        """
        if not self.acks:
            return
        ready = select.select(self.acks, [], [], timeout)[0]
        if timeout and not ready:
            raise TimeoutError(f"{self.name}: no consumer acknowledged in {timeout} s")
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.acks.remove(fd)
                os.close(fd)
                if self.owed[fd]:
                    raise RuntimeError(
                        f"{self.name}: a consumer hung up owing {self.owed[fd]} "
                        f"acknowledgements (it died)"
                    )
                continue
            unpacker = self.unpackers[fd]
            unpacker.feed(chunk)
            for name in unpacker:
                self.owed[fd] -= 1
                entry = self.live[name]
                entry[1] -= 1
                if entry[1] == 0:
                    self._unlink(name)

    def _unlink(self, name: str) -> None:
        shm = self.live.pop(name)[0]
        self.in_flight -= shm.size
        shm.close()  # already closed unless the copy into it failed
        shm.unlink()

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        self.flush()
        self._close_outs()  # end of input: consumers acknowledge the rest and exit
        deadline = time.monotonic() + timeout
        while self.live:
            self._reap(max(0.1, deadline - time.monotonic()))
        return self._collect(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        """Unlink every segment still named, then kill and reap the consumers."""
        try:
            for name in list(self.live):
                self._unlink(name)
        finally:
            for fd in self.acks:
                os.close(fd)
            self.acks = []
            super().close()


# -- fanout ---------------------------------------------------------------------------------


class ArraySum(fanout.Handler):
    """Sum every added array; keep the count and total in a small file for the producer.

    Args:
        path: A file of at least ``TALLY.size`` bytes; each worker maps it and
            rewrites ``(count, total)`` after every array.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.count = 0
        self.total = 0.0
        self._tally: mmap.mmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "count": 0, "total": 0.0, "_tally": None}

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        """Sum ``obj`` and record the new count and total.

        Args:
            obj: The array.
            is_in_initial_list: Ignored.
        """
        self.total += float(np.sum(obj))
        self.count += 1
        if self._tally is None:
            with open(self.path, "r+b") as f:
                self._tally = mmap.mmap(f.fileno(), TALLY.size)
        TALLY.pack_into(self._tally, 0, self.count, self.total)


class FanoutArrays(Contender):
    """fanout: one process listener of 1 worker per listener, handlers summing.

    Each lane is bounded (``max_pending_bytes=LANE_BOUND``, ``overflow="block"``) so
    a long run cannot pile every array up in the producer.
    """

    name = "fanout-process"

    def __init__(self, listeners: int) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fanout-bench-arrays-")
        self.paths = [os.path.join(self.tmp, f"tally-{i}") for i in range(listeners)]
        for path in self.paths:
            with open(path, "wb") as f:
                f.write(TALLY.pack(0, 0.0))
        self.d = fanout.Distributor()
        self.regs = [
            self.d.add_listener(
                ArraySum(path),
                name=f"arrays-{i}",
                max_pending_bytes=LANE_BOUND,
                overflow="block",
            )
            for i, path in enumerate(self.paths)
        ]

    def start(self) -> None:
        self.d.start()
        for reg in self.regs:
            if not reg.wait_ready(60):
                raise RuntimeError(f"{self.name}: workers did not start")

    def send(self, arr: np.ndarray) -> None:
        self.d.distribute(fanout.Add(arr))

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        if not self.d.stop(drain=True, timeout=timeout):
            raise TimeoutError(f"{self.name}: not drained in {timeout} s")
        out = []
        for reg, path in zip(self.regs, self.paths, strict=True):
            with open(path, "rb") as f:
                count, total = TALLY.unpack(f.read(TALLY.size))
            s = reg.stats()
            if s.errors or s.delivered != count:
                raise RuntimeError(
                    f"{self.name}: {reg.name} delivered {s.delivered} with {s.errors} "
                    f"errors, its handler summed {count}"
                )
            out.append({"count": count, "sum": total})
        return out

    def close(self) -> None:
        try:
            self.d.stop(drain=False)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


CONTENDERS: list[Any] = [FanoutArrays, PipeArrays, ShmArrays]
