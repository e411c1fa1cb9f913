"""Scenario ``arrays``: float64 arrays to 1 and 4 listeners whose handlers sum them.

Big binary payloads are where copies cost most, so the contenders here are the
ways to move an array to several processes, each run the same way:

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

Every consumer reports how many arrays it summed and the total of the sums, which
the round checks against what was sent: a contender that skipped or lost an array
fails the round instead of looking fast. The arrays hold whole numbers, so every
sum is exact and compared exactly.

The figure is GB/s delivered, payload bytes x listeners / wall time, from the first
send until every consumer has summed everything. Each round also measures the
producer's peak RSS over that time (:class:`PeakRss`), which shows whether big
payloads pile up in the producer.
"""

from __future__ import annotations

import fcntl
import functools
import math
import mmap
import multiprocessing
import operator
import os
import re
import resource
import select
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NamedTuple

import msgpack
import numpy as np

import fanout
from fanout.bench.contenders import Contender, _read_result, _ready, reap
from fanout.bench.scenarios import MAX_COUNT, SESSION_S, Case, Metric
from fanout.listeners.pipes import F_SETPIPE_SZ, PIPE_SIZE
from fanout.worker.main import FdArg

__all__ = [
    "CONTENDERS",
    "GBPS",
    "SIZES",
    "ArraySum",
    "FanoutArrays",
    "PeakRss",
    "PipeArrays",
    "ShmArrays",
    "cached_pool",
    "cases",
    "make_pool",
    "run_round",
    "size_text",
]

SIZES = (64 << 10, 1 << 20, 16 << 20)  # bytes of one array
POOL = 4  # distinct arrays cycled through per size
MIN_ARRAYS = 8  # per round, however short the duration
PROBE_BYTES = 32 << 20  # payload of the calibration round
BATCH = 64  # frames (or names) a baseline holds before writing
BATCH_BYTES = 1 << 20  # ... or this many array bytes, whichever comes first
SHM_WINDOW_BYTES = 128 << 20  # shared_memory: segments in flight, in bytes ...
SHM_WINDOW_COUNT = 1024  # ... and in number (keeps names and acks within a pipe)
LANE_BOUND = 128 << 20  # fanout: max_pending_bytes of each lane (overflow="block")
FINISH_TIMEOUT = 120.0
SHM_DIR = "/dev/shm"
SHM_PREFIX = "fanout-bench-"  # + producer pid + "-": what a leak check looks for

GBPS = Metric("gbps", "GB/s", "higher", "GB/s delivered")
TALLY = struct.Struct("<qd")  # count, sum: what a fanout handler leaves in its file


def size_text(nbytes: int) -> str:
    """``64 KiB``, ``1 MiB``, ``16 MiB``: a size as a person writes it."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def make_pool(nbytes: int, count: int = POOL) -> list[np.ndarray]:
    """``count`` distinct float64 arrays of ``nbytes`` each, holding whole numbers.

    Whole numbers below 2**53 add up exactly in any order, so a consumer's total
    can be compared with the producer's exactly.

    Raises:
        ValueError: ``nbytes`` is not a positive multiple of 8 (one float64).
    """
    if nbytes <= 0 or nbytes % 8:
        raise ValueError(f"array size must be a positive multiple of 8 bytes, got {nbytes}")
    base = np.arange(nbytes // 8, dtype=np.float64) % 1024
    return [base + j for j in range(count)]


@functools.lru_cache(maxsize=1)
def cached_pool(nbytes: int) -> tuple[np.ndarray, ...]:
    """:func:`make_pool` of ``nbytes``, kept for the next call with the same size.

    Only the latest size is kept: cases of one size run one after another.
    """
    return tuple(make_pool(nbytes))


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
            results.append(_read_result(fd, max(0.1, deadline - time.monotonic())))
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
    _ready(result)
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
    _ready(result)
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


# -- measuring ------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match[1]) * 1024


class PeakRss:
    """The peak RSS of this process over a ``with`` block, in bytes (Linux).

    At entry the kernel's high-water mark (``VmHWM``) is reset to the current RSS
    by writing 5 to ``/proc/self/clear_refs`` (Linux 4.0+), so at exit it holds
    the block's peak, however brief. Where that write is refused, a thread
    samples ``VmRSS`` every millisecond instead, which can miss a short spike.

    Args:
        sampled: Sample even where the reset works (to compare the two).

    Attributes:
        start: RSS at entry.
        peak: Highest RSS during the block (set at exit).
        method: ``"VmHWM"`` or ``"sampled"``.
    """

    SAMPLE_S = 0.001

    def __init__(self, sampled: bool = False) -> None:
        self.start = 0
        self.peak = 0
        self.method = "sampled" if sampled else "VmHWM"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def growth(self) -> int:
        """``peak - start``: what the block added at its highest."""
        return self.peak - self.start

    def __enter__(self) -> PeakRss:
        if self.method == "VmHWM":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.start = _status_kib("VmHWM")  # the current RSS, after the reset
                return self
            except OSError:
                self.method = "sampled"
        self.start = self.peak = _status_kib("VmRSS")
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            self.peak = max(self.peak, _status_kib("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _status_kib("VmRSS"))
        else:
            self.peak = _status_kib("VmHWM")


def run_round(cls: Any, listeners: int, pool: Sequence[np.ndarray], count: int) -> dict[str, Any]:
    """Send ``count`` arrays (cycling through ``pool``) to ``listeners``; check and time it.

    Start-up is not timed; the time runs from the first send until every consumer
    has summed everything and reported.

    Args:
        cls: A contender class of :data:`CONTENDERS` (or one like them).
        listeners: Consumers that each get every array.
        pool: The arrays to send, all of one size.
        count: Arrays to send.

    Returns:
        ``gbps`` (payload bytes x listeners / seconds / 1e9), ``seconds``,
        ``arrays``, ``producer_peak_rss_bytes`` and ``producer_rss_growth_bytes``.

    Raises:
        RuntimeError: A consumer summed a different number of arrays, or got a
            different total, than was sent.
    """
    sums = [float(a.sum()) for a in pool]
    k = len(pool)
    full, rest = divmod(count, k)
    expected = full * math.fsum(sums) + math.fsum(sums[:rest])
    nbytes = sum(pool[i % k].nbytes for i in range(count))
    session = cls(listeners)
    try:
        session.start()
        with PeakRss() as rss:
            t0 = time.perf_counter()
            send = session.send
            for i in range(count):
                send(pool[i % k])
            results = session.finish(FINISH_TIMEOUT)
            elapsed = time.perf_counter() - t0
    finally:
        session.close()
    if len(results) != listeners:
        raise RuntimeError(f"{cls.name}: {len(results)} of {listeners} consumers reported")
    for i, r in enumerate(results):
        if r["count"] != count or r["sum"] != expected:
            raise RuntimeError(
                f"{cls.name}: consumer {i} summed {r['count']} arrays to {r['sum']!r}; "
                f"sent {count} summing to {expected!r}"
            )
    return {
        "gbps": nbytes * listeners / elapsed / 1e9,
        "seconds": elapsed,
        "arrays": count,
        "payload_bytes": nbytes,
        "producer_peak_rss_bytes": rss.peak,
        "producer_rss_growth_bytes": rss.growth,
    }


def cases(suite: Any) -> list[Case]:
    """The scenario's cases for ``suite`` (a ``fanout.bench.scenarios.Suite``).

    One case per array size and ``--listeners`` count; each contender is first
    calibrated (a round of ``PROBE_BYTES``) so that a measured round lasts about
    ``--duration``, with at least ``MIN_ARRAYS`` arrays. ``--contender`` picks
    among fanout and the pipe; ``shared_memory`` is this scenario's own and
    always runs.
    """
    wanted = suite.opts.contenders
    chosen = [c for c in CONTENDERS if wanted is None or c.name in wanted or c is ShmArrays]
    out = []
    for nbytes in SIZES:
        for L in suite.opts.listeners:

            def calibrate(cls: Any, L: int = L, nbytes: int = nbytes) -> int:
                probe = max(MIN_ARRAYS, PROBE_BYTES // nbytes)
                r = run_round(cls, L, cached_pool(nbytes), probe)
                per_s = r["arrays"] / r["seconds"]
                return int(min(MAX_COUNT, max(MIN_ARRAYS, per_s * suite.opts.duration)))

            def measure(cls: Any, n: int, L: int = L, nbytes: int = nbytes) -> dict[str, Any]:
                return run_round(cls, L, cached_pool(nbytes), n)

            out.append(
                Case(
                    "arrays",
                    {"array_bytes": nbytes, "listeners": L},
                    f"float64 arrays of {size_text(nbytes)} to {L} listener{'s' * (L > 1)}, "
                    f"handlers summing",
                    [GBPS],
                    chosen,
                    measure,
                    calibrate=calibrate,
                    round_s=suite.opts.duration,
                    calibrate_s=0.1 + SESSION_S,
                )
            )
    return out


# -- big arrays beside a stalled listener -----------------------------------------------------

STALLED_ARRAY_BYTES = 1 << 20
STALLED_MAX_BYTES = 384 << 20  # arrays sent per phase, at most: the stalled lane keeps them
# By the name the table gives them: the arena's size (None: the default, an eighth
# of the RAM) and the stalled listener's options. 64 MiB: the stalled listener
# reaches its share (32 MiB) early in a round, and spills the rest.
STALLED_SETTINGS: dict[str, tuple[int | None, dict[str, Any]]] = {
    "defaults": (None, {}),
    "defaults, 64 MiB arena": (64 << 20, {}),
    "drop_newest, 64 MiB arena": (
        64 << 20,
        {"max_pending_bytes": 4 << 20, "overflow": "drop_newest"},
    ),
}
PERCENT = Metric("percent_of_alone", "% of alone", "higher", "healthy rate, % of alone")


class Stalled(fanout.Handler):
    """Blocks in its first call until ``gate`` exists (the bench opens it to stop)."""

    def __init__(self, gate: str) -> None:
        self.gate = gate

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        """Wait for the gate.

        Args:
            obj: Ignored.
            is_in_initial_list: Ignored.
        """
        while not os.path.exists(self.gate):
            time.sleep(0.01)


class FanoutStalled:
    """fanout, the only contender of ``stalled-arrays``: one healthy listener summing."""

    name = "fanout-process"


STALLED_CHUNKS = 16  # turns of each distributor within one round (4: twice the spread)


def _send_and_wait(d: Any, reg: Any, pool: Sequence[np.ndarray], count: int) -> _Phase:
    """Send ``count`` arrays; until ``reg`` (summing them) has handled them all, how long.

    Returns the wall-clock seconds, and the producer thread's CPU seconds and page
    faults while it distributed (the work ``distribute`` itself cost).
    """
    before = reg.stats().delivered
    t0 = time.perf_counter()
    cpu0, faults0 = time.thread_time(), _thread_faults()
    k = len(pool)
    for i in range(count):
        d.distribute(fanout.Add(pool[i % k]))
    cpu, faults = time.thread_time() - cpu0, _thread_faults() - faults0
    deadline = time.monotonic() + FINISH_TIMEOUT
    while reg.stats().delivered < before + count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the healthy listener did not finish in {FINISH_TIMEOUT} s")
        time.sleep(0.0005)
    return _Phase(time.perf_counter() - t0, cpu, faults)


class _Phase(NamedTuple):
    """What sending some arrays took: wall seconds; producer CPU seconds, page faults."""

    wall: float
    cpu: float
    faults: int


def _thread_faults() -> int:
    """Page faults (minor and major) of the calling thread so far."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_minflt + usage.ru_majflt


def stalled_round(setting: str, nbytes: int, count: int) -> dict[str, Any]:
    """One run: a healthy listener alone and one beside a stalled listener; their rates.

    Two distributors with the same arena run side by side: one with a healthy
    listener alone, one with a healthy listener and a stalled one (blocked in its
    first call, with the options ``STALLED_SETTINGS[setting]``). The round feeds
    them in turns, ``count / STALLED_CHUNKS`` arrays at a time and each turn in
    the other order, after one such turn untimed, so that the machine's other
    load weighs on both alike, and compares the healthy listeners' rates over the
    whole round.

    Returns:
        ``percent_of_alone`` and ``fraction`` (rate beside / rate alone), both
        rates, and the arena's and the stalled listener's figures at the end.
    """
    tmp = tempfile.mkdtemp(prefix="fanout-bench-stalled-")
    gate = os.path.join(tmp, "gate")
    paths = [os.path.join(tmp, f"tally-{i}") for i in range(2)]
    for path in paths:
        with open(path, "wb") as f:
            f.write(TALLY.pack(0, 0.0))
    pool = cached_pool(nbytes)
    arena_bytes, opts = STALLED_SETTINGS[setting]
    alone_d = fanout.Distributor(max_shared_bytes=arena_bytes)
    beside_d = fanout.Distributor(max_shared_bytes=arena_bytes)
    try:
        alone_reg = alone_d.add_listener(ArraySum(paths[0]), name="healthy")
        beside_reg = beside_d.add_listener(ArraySum(paths[1]), name="healthy")
        stalled = beside_d.add_listener(Stalled(gate), name="stalled", **opts)
        alone_d.start()
        beside_d.start()
        chunk = max(1, count // STALLED_CHUNKS)
        pair = ((alone_d, alone_reg), (beside_d, beside_reg))
        for d, reg in pair:  # untimed: the workers' and the arenas' first use
            _send_and_wait(d, reg, pool, chunk)
        phases = [_Phase(0.0, 0.0, 0), _Phase(0.0, 0.0, 0)]
        sent = 0
        while sent < count:
            n = min(chunk, count - sent)
            # In turns, and each turn in the other order (ABBA): neither phase is
            # always the one after the other.
            order = (0, 1) if sent // chunk % 2 == 0 else (1, 0)
            for i in order:
                d, reg = pair[i]
                phases[i] = _Phase(*map(operator.add, phases[i], _send_and_wait(d, reg, pool, n)))
            sent += n
        alone, beside = phases
        s = stalled.stats()
        arena = beside_d.shared_stats()
    finally:
        open(gate, "w").close()  # let the stalled worker leave
        for d in (alone_d, beside_d):
            d.stop(drain=False)  # the stalled backlog is dropped, counted
        shutil.rmtree(tmp, ignore_errors=True)
    rate_alone, rate_beside = count / alone.wall, count / beside.wall
    return {
        "percent_of_alone": 100 * rate_beside / rate_alone,
        "fraction": rate_beside / rate_alone,
        "alone_per_s": rate_alone,
        "beside_per_s": rate_beside,
        # The producer's own work per array: beside a stalled listener it takes a
        # copy into memory that listener keeps, so pages never touched before.
        "alone_cpu_ms": 1e3 * alone.cpu / count,
        "beside_cpu_ms": 1e3 * beside.cpu / count,
        "alone_faults": alone.faults / count,
        "beside_faults": beside.faults / count,
        # The most the healthy rate can be, in % of alone, with that much producer
        # work per array beside (a wall-clock time is at least its CPU time).
        "bound_percent": 100 * alone.wall / max(beside.cpu, 1e-9),
        "arrays": count,
        "stalled_pending_bytes": s.pending_bytes,
        "stalled_dropped": s.dropped,
        "spilled": arena.spilled,
    }


def stalled_cases(suite: Any) -> list[Case]:
    """``stalled-arrays``: 1 MiB arrays beside a stalled listener, per stalled setting."""

    def calibrate(cls: Any) -> int:
        r = stalled_round("drop_newest, 64 MiB arena", STALLED_ARRAY_BYTES, MIN_ARRAYS * 4)
        want = r["alone_per_s"] * suite.opts.duration
        return int(min(STALLED_MAX_BYTES // STALLED_ARRAY_BYTES, max(MIN_ARRAYS * 4, want)))

    out = []
    for setting in STALLED_SETTINGS:

        def measure(cls: Any, n: int, setting: str = setting) -> dict[str, Any]:
            return stalled_round(setting, STALLED_ARRAY_BYTES, n)

        out.append(
            Case(
                "stalled-arrays",
                {"array_bytes": STALLED_ARRAY_BYTES, "stalled": setting},
                f"big arrays ({size_text(STALLED_ARRAY_BYTES)}) beside a stalled listener "
                f"({setting})",
                [PERCENT],
                [FanoutStalled],
                measure,
                calibrate=calibrate,
                round_s=2 * suite.opts.duration + 1.0,
                calibrate_s=1.0,
            )
        )
    return out
