"""Scenario ``stalled-arrays``: 1 MiB arrays to a listener, alone and beside a stalled one.

fanout is the only contender: the figure is the healthy listener's rate beside a
listener blocked in its first call, as a percentage of its rate alone, for the
arena and overflow settings of ``STALLED_SETTINGS``.
"""

from __future__ import annotations

import operator
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

import fanout
from fanout.bench.array_contenders import TALLY, ArraySum
from fanout.bench.arrays import MIN_ARRAYS, cached_pool, size_text
from fanout.bench.model import FINISH_TIMEOUT, Bench, Case, Metric

__all__ = ["STALLED_SETTINGS", "cases", "stalled_round"]


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


def cases(suite: Bench) -> list[Case]:
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
