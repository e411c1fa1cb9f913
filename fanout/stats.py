"""Listener statistics and the latency histogram the workers keep in their slots.

The slot layout itself is part of the producer-worker contract in
``fanout.wire.protocol``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fanout.wire.protocol import NBUCKETS

__all__ = ["ListenerStats", "bucket_of", "percentile"]


def bucket_of(ns: int) -> int:
    """Return the histogram bucket of a latency (4 buckets per octave).

    Args:
        ns: The latency in nanoseconds; 0 or less falls in bucket 0.

    Returns:
        The bucket index, from 0 to ``NBUCKETS - 1`` (the last one takes
        everything above about 1,000 s).
    """
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
    """Return the latency at a quantile of a histogram.

    Args:
        hist: Counts per bucket, as ``bucket_of`` numbers them.
        q: The quantile, from 0 to 1 (0.5 for the median, 1.0 for the maximum).

    Returns:
        The midpoint of the bucket holding the quantile, in seconds, or None when
        the histogram is empty.
    """
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
    """A snapshot of one listener's counters, as ``Registration.stats()`` returns it.

    Once ``stop()`` has returned, ``received == delivered + dead_lettered +
    dropped`` holds for every listener; while it runs, the difference is what
    is still on its way.

    Attributes:
        name: The listener's name.
        executor: ``"process"``, ``"thread"`` or ``"ray"``.
        workers: Number of worker processes (1 for a thread listener).
        received: Notifications accepted for this listener, live or from its
            initial list, including those an overflow policy dropped on arrival.
        pending: Notifications accepted and not yet handled.
        pending_bytes: Bytes held for them, in flight or waiting: the encoded
            frames and the shared-memory blocks they refer to (0 for a thread
            listener, which holds objects).
        capacity_bytes: Bytes allocated for the listener's rings (0 for a thread
            listener).
        delivered: Handler calls that finished, returning or raising.
        errors: Handler calls that raised (also counted in ``delivered``).
        dropped: Notifications discarded by the overflow policy or by
            ``stop(drain=False)``.
        dead_lettered: Notifications given up and passed to ``on_dead_letter``.
        restarts: Worker processes started again after one died or was killed.
        latency_p50: Median time from ``distribute`` to the start of the handler
            call, in seconds, or None before the first call. Read from a histogram
            with 4 buckets per octave, so within about 12 % of the true value.
        latency_p99: The 99th percentile of the same, or None.
        latency_max: The largest of the same (its bucket's midpoint), or None.
        start_error: Why the listener could not start after ``start()`` (its
            handler could not be built, an actor could not be created) when
            nothing waited to raise it, else None. Such a listener takes no
            more notifications; what it held was dead-lettered with this text.
            fanout does not retry it: remove it and add a fixed one.
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
    start_error: str | None = None

    @property
    def start_failed(self) -> int:
        """1 if the listener could not start (``start_error``), else 0: for metrics."""
        return int(self.start_error is not None)
