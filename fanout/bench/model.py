"""What the bench scenarios share: options, metrics, figures, cases and the bench itself.

A scenario module (``fanout.bench.delivery``, ``recovery``, ``schema``,
``arrays``, ``stalled_arrays``, ``kube``, ``ray``) turns a :class:`Bench` into
:class:`Case` objects and imports this module, never the runner
(``fanout.bench.scenarios``), which lists the scenarios and runs their cases.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fanout.bench.contenders import CONTENDERS
from fanout.bench.payloads import Payload
from fanout.notifications import Update
from fanout.wire.codec import get_codec

__all__ = [
    "CODEC_CONTENDERS",
    "DELIVERIES",
    "FINISH_TIMEOUT",
    "MAX_COUNT",
    "SESSION_S",
    "UNSTABLE_SPREAD",
    "Bench",
    "Case",
    "Measurement",
    "Metric",
    "Options",
    "interleave",
]

MAX_COUNT = 2_000_000
FINISH_TIMEOUT = 120.0
UNSTABLE_SPREAD = 0.15  # (max - min) / median above which a figure is marked unstable
# The contender measuring each codec, for its codec-bound limit (the default first).
CODEC_CONTENDERS = {"msgspec": "fanout-process", "msgpack": "fanout-msgpack"}
SESSION_S = 0.25  # rough start + stop cost of one session, for the ETA only

T = TypeVar("T")


@dataclass
class Options:
    """What ``fanout bench`` runs; see ``fanout bench --help``."""

    listeners: list[int] = field(default_factory=lambda: [1, 4])
    workers: list[int] = field(default_factory=lambda: [1, 2])
    payloads: list[str] = field(default_factory=lambda: ["small", "pod"])
    work_us: float = 50.0
    duration: float = 0.5
    rounds: int = 5
    latency_rate: float = 2000.0
    latency_seconds: float = 1.0
    stall_seconds: float = 1.5
    scenarios: list[str] = field(
        default_factory=lambda: [
            "throughput",
            "cpu",
            "latency",
            "stalled",
            "recovery",
            "schema",
            "arrays",
            "stalled-arrays",
        ]
    )
    contenders: list[str] | None = None

    @classmethod
    def quick(cls) -> Options:
        """A run of about a minute that still touches every scenario, 3 rounds each.

        Three rounds is the fewest for which a median and a spread mean anything.
        """
        return cls(
            listeners=[2],
            workers=[1],
            payloads=["small"],
            work_us=20.0,
            duration=0.05,
            rounds=3,
            latency_rate=500.0,
            latency_seconds=0.2,
            stall_seconds=0.3,
        )


@dataclass(frozen=True)
class Metric:
    """One figure a case measures per round.

    Args:
        name: Key in a round's results and in the JSON (``"deliveries"``, ``"p99"``).
        unit: ``"deliveries/s"`` or ``"s"``.
        better: ``"higher"`` or ``"lower"``.
        label: How a chart names it when a panel shows several metrics.
    """

    name: str
    unit: str
    better: Literal["higher", "lower"]
    label: str = ""


DELIVERIES = Metric("deliveries", "deliveries/s", "higher", "deliveries/s")


@dataclass
class Measurement:
    """One figure: a case's metric for one contender, with every round's value."""

    scenario: str
    contender: str
    params: dict[str, Any]
    metric: str
    unit: str
    values: list[float]
    extra: dict[str, Any] = field(default_factory=dict)
    better: Literal["higher", "lower"] = "higher"
    title: str = ""
    label: str = ""

    @property
    def median(self) -> float:
        """The median of the rounds."""
        return statistics.median(self.values)

    @property
    def spread(self) -> float | None:
        """``(max - min) / median`` of the rounds; None with fewer than 2 rounds."""
        if len(self.values) < 2:
            return None
        median = self.median
        if median == 0:
            return 0.0 if max(self.values) == min(self.values) else float("inf")
        return (max(self.values) - min(self.values)) / abs(median)

    @property
    def unstable(self) -> bool | None:
        """True when the spread exceeds ``UNSTABLE_SPREAD``; None when unknown (1 round)."""
        spread = self.spread
        return None if spread is None else spread > UNSTABLE_SPREAD

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: every round, median, min, max, spread and the unstable flag."""
        return {
            "scenario": self.scenario,
            "contender": self.contender,
            "params": self.params,
            "title": self.title,
            "metric": self.metric,
            "label": self.label,
            "unit": self.unit,
            "better": self.better,
            "values": self.values,
            "rounds": len(self.values),
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            "spread": self.spread,
            "unstable": self.unstable,
            **self.extra,
        }


Round = Callable[[Any, Any], dict[str, Any]]


@dataclass
class Case:
    """One parameter set of a scenario, measured for every contender.

    Args:
        scenario: The scenario's name (a key of ``SCENARIOS``).
        params: The parameters, as the JSON records them.
        title: A human title for the table and the chart.
        metrics: What one round measures.
        contenders: The contender classes to measure.
        run_round: ``(contender, calibration) -> {metric name: value, other: extra}``;
            keys that are not a metric name are kept as extras (their median).
        calibrate: ``(contender) -> calibration``, once per contender before its rounds.
        before: Run once before anything else in the case (e.g. a codec limit).
        round_s: Roughly how long one round takes, for the ETA.
        calibrate_s: Roughly how long one calibration takes, for the ETA.
    """

    scenario: str
    params: dict[str, Any]
    title: str
    metrics: list[Metric]
    contenders: Sequence[Any]
    run_round: Round
    calibrate: Callable[[Any], Any] | None = None
    before: Callable[[], None] | None = None
    round_s: float = 1.0
    calibrate_s: float = 0.0


def interleave(contenders: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
    """Yield ``(round, contender)``: every contender's round 0, then every round 1, ...

    So a burst of noise on the machine lands on all contenders of a figure alike
    rather than on whichever ran all its rounds during it.
    """
    for r in range(rounds):
        for c in contenders:
            yield r, c


class Bench:
    """One ``fanout bench`` run as its scenarios see it: its state and their shared helpers.

    Holds the options, the contenders that can run here, what was measured and
    skipped so far, and a scratch directory. ``fanout.bench.scenarios.Suite``
    adds the planning and running.

    Args:
        opts: What to run.
    """

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.measurements: list[Measurement] = []
        self.skipped: dict[str, str] = {}
        self.contenders = []
        for cls in CONTENDERS:
            if opts.contenders is not None and cls.name not in opts.contenders:
                continue
            reason = cls.unavailable()
            if reason:
                self.skipped[cls.name] = reason
            else:
                self.contenders.append(cls)
        self.codec_limits: list[dict[str, Any]] = []
        self.tmp = tempfile.mkdtemp(prefix="fanout-bench-")

    def find(self, scenario: str, contender: str, params: dict[str, Any]) -> Measurement | None:
        """A figure measured earlier in this run, if any."""
        for m in self.measurements:
            if m.scenario == scenario and m.contender == contender and m.params == params:
                return m
        return None

    def batch(self, cls: Any, L: int, W: int, work_us: float, payload: Payload, n: int) -> Any:
        """One measured batch: returns (deliveries/s, results)."""
        session = cls(L, W, work_us, None)
        try:
            session.start()
            pair = payload.pair
            send = session.send
            t0 = time.perf_counter()
            for i in range(n):
                send(*pair(i))
            results = session.finish(FINISH_TIMEOUT)
            elapsed = time.perf_counter() - t0
        finally:
            session.close()
        delivered = sum(r["count"] for r in results)
        if delivered != n * L:
            raise RuntimeError(f"{cls.name} delivered {delivered} of {n * L}")
        return delivered / elapsed, results

    def size_batch(self, cls: Any, L: int, W: int, work_us: float, payload: Payload) -> int:
        """How many notifications make a batch of about ``duration`` seconds."""
        probe = 200 if payload.name == "small" else 50
        if work_us:
            probe = max(20, int(0.05 / (work_us / 1e6)))
        # Two probes: a tiny one, then one of about a fifth of the duration, so
        # the rate used to size the measured rounds is the steady one (a tiny
        # probe is dominated by start and stop, and would make short rounds).
        rate, _ = self.batch(cls, L, W, work_us, payload, probe)
        probe = int(min(MAX_COUNT, max(probe, rate / L * self.opts.duration * 0.2)))
        rate, _ = self.batch(cls, L, W, work_us, payload, probe)
        return int(min(MAX_COUNT, max(probe, rate / L * self.opts.duration)))

    def batch_case(
        self,
        scenario: str,
        params: dict[str, Any],
        title: str,
        L: int,
        W: int,
        work_us: float,
        payload: Payload,
    ) -> Case:
        """A case measuring deliveries/s of batches sized to ``duration``."""

        def run_round(cls: Any, n: int) -> dict[str, Any]:
            return {"deliveries": self.batch(cls, L, W, work_us, payload, n)[0]}

        return Case(
            scenario,
            params,
            title,
            [DELIVERIES],
            self.contenders,
            run_round,
            calibrate=lambda cls: self.size_batch(cls, L, W, work_us, payload),
            round_s=self.opts.duration,
            calibrate_s=0.3 * self.opts.duration + SESSION_S,
        )

    def codec_limit(self, payload: Payload, L: int) -> None:
        """Measure ``cores / (encode + L x decode)`` now, for each codec, and keep it.

        With the codec's own encode and the worker's decode (``Codec.unpacker``):
        what fanout cannot do with less CPU, whatever it does around them.
        """
        old, new = payload.pair(0)
        n = Update(old, new)
        number = 2000

        def best(stmt: Callable[[], Any]) -> float:
            return min(timeit.repeat(stmt, number=number, repeat=3)) / number

        cores = os.cpu_count() or 1
        for name in CODEC_CONTENDERS:
            codec = get_codec(name)
            data = codec.encode(n, 0)
            decode = codec.unpacker(None)
            enc = best(functools.partial(codec.encode, n, 0))
            dec = best(functools.partial(decode, data))
            self.codec_limits.append(
                {
                    "payload": payload.name,
                    "listeners": L,
                    "codec": name,
                    "encode_s": enc,
                    "decode_s": dec,
                    "cores": cores,
                    "limit_deliveries_per_s": cores / (enc + L * dec) * L,
                }
            )
