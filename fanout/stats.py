"""Listener statistics, the shared-memory progress slot, and the latency histogram.

Each lane (one worker process) owns one slot of ``SLOT_WORDS`` unsigned 64-bit
words in its listener's shared memory (a memfd mapped by parent and workers).
Only the worker writes a slot, except the words the parent sets while that
worker is not running (``STARTED``/``DONE`` before a spawn) and ``STOP``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ListenerStats", "bucket_of", "percentile"]

# Word indexes in a slot.
STARTED = 0  # seq of the last frame whose handler call began
DONE = 1  # seq of the last frame whose handler call returned (or raised)
START_NS = 2  # monotonic_ns when the running call began; 0 when idle
HANDLED = 3  # handler calls finished (returned or raised)
ERRORS = 4  # handler calls that raised
STOP = 5  # set by the parent: exit before the next frame
PID = 6  # the worker's pid, once it runs
HIST = 8  # first latency bucket
NBUCKETS = 160  # 4 buckets per power of two, from 1 ns to ~1,000 s
SLOT_WORDS = 256  # 2 KiB per lane, a whole number of cache lines
SLOT_BYTES = SLOT_WORDS * 8


def bucket_of(ns: int) -> int:
    """Histogram bucket of a latency in nanoseconds (4 buckets per octave)."""
    if ns <= 0:
        return 0
    bits = ns.bit_length()
    sub = (ns >> (bits - 3)) & 3 if bits >= 3 else 0
    i = 4 * (bits - 1) + sub
    return i if i < NBUCKETS else NBUCKETS - 1


def bucket_value(i: int) -> float:
    """A representative latency (seconds) of bucket ``i``: its midpoint."""
    bits, sub = i // 4 + 1, i % 4
    if bits < 3:
        low, width = 1 << (bits - 1), 1 << (bits - 1)
    else:
        low, width = (4 + sub) << (bits - 3), 1 << (bits - 3)
    return (low + width / 2) / 1e9


def percentile(hist: list[int], q: float) -> float | None:
    """Latency (seconds) at quantile ``q`` of a histogram, or None if empty."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(hist):
        seen += count
        if count and seen >= rank:
            return bucket_value(i)
    return bucket_value(len(hist) - 1)


@dataclass(frozen=True, slots=True)
class ListenerStats:
    """A snapshot of one registration's counters.

    Fields: ``received`` (notifications accepted for this listener, live or
    initial list; after ``stop()`` it equals ``delivered + dead_lettered +
    dropped``), ``pending`` (notifications not yet handled), ``pending_bytes`` and
    ``capacity_bytes`` (of its rings), ``delivered`` (handler calls finished),
    ``errors`` (calls that raised), ``dropped`` (by an overflow policy),
    ``dead_lettered``, ``restarts`` (workers started again), ``latency_p50`` /
    ``latency_p99`` / ``latency_max`` (seconds from ``distribute`` to handler
    start, from a log histogram with 4 buckets per octave; None before any).
    """

    name: str
    executor: str
    workers: int
    received: int
    pending: int
    pending_bytes: int
    capacity_bytes: int
    delivered: int
    errors: int
    dropped: int
    dead_lettered: int
    restarts: int
    latency_p50: float | None
    latency_p99: float | None
    latency_max: float | None
