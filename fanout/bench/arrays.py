"""Scenario ``arrays``: float64 arrays to 1 and 4 listeners whose handlers sum them.

The contenders (fanout, a pipe with msgpack, ``shared_memory``) are in
``fanout.bench.array_contenders``; this module sends them the arrays and checks
and times what they did.

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

import functools
import math
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fanout.bench.array_contenders import CONTENDERS, ShmArrays
from fanout.bench.model import FINISH_TIMEOUT, MAX_COUNT, SESSION_S, Bench, Case, Metric

__all__ = [
    "GBPS",
    "SIZES",
    "PeakRss",
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

GBPS = Metric("gbps", "GB/s", "higher", "GB/s delivered")


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


def cases(suite: Bench) -> list[Case]:
    """The scenario's cases for ``suite``.

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
