"""The benchmark scenarios, each run against every installed contender the same way.

* ``throughput``: no-op handlers, L listeners, deliveries/s from the first send
  until every consumer handled everything.
* ``cpu``: handlers doing ``work_us`` of pure Python, W consumers per listener.
* ``latency``: a fixed offered rate; send -> handler start p50 / p99 / max.
* ``stalled``: one listener's handler blocks for a while; the healthy
  listeners' throughput and the memory held for the stalled one.
* ``recovery``: (fanout) time from SIGKILL of a worker to the next handled
  notification on its lane, beside a worker's cold start for comparison.
* ``schema``: Pods to 4 listeners whose handlers read five fields, with and
  without ``schema=`` (``fanout.bench.schema``).
* ``arrays``: float64 arrays of 64 KiB, 1 MiB and 16 MiB to L listeners whose
  handlers sum them, in GB/s, against a pipe and a ``shared_memory`` baseline
  (``fanout.bench.arrays``).
* ``stalled-arrays``: 1 MiB arrays to a healthy listener, alone and then beside
  a stalled one (defaults, and ``drop_newest`` bounds), in one run: the healthy
  listener's rate as a fraction of its rate alone (``fanout.bench.arrays``).
* ``ray``: one listener of 2 Ray actors against Ray used directly, and recovery
  from a SIGKILLed actor (``fanout.bench.ray``). Not in the default list: it
  starts a Ray cluster (about 4 s); ``--scenario ray`` runs it.
* ``kube``: Pod watch events from raw lines to a handler, ``fanout.kube``'s
  informer against the official client's ``watch.Watch().stream()``
  (``fanout.bench.kube``). Not in the default list (it needs the ``kube``
  extra); ``--scenario kube`` runs it.

A scenario turns the options into :class:`Case` objects, one per parameter set.
Every case first calibrates each contender (sizes its batch to ``duration``
seconds), then runs ``rounds`` measured rounds *interleaved* across contenders
(A B C, A B C, ...): a noisy minute on the machine then hurts every contender
of a figure, instead of only the one that happened to run during it. Each
figure keeps every round, its median and its spread, ``(max - min) / median``;
a spread over ``UNSTABLE_SPREAD`` marks the figure unstable.

To add a scenario, write a function ``(suite) -> list[Case]`` and add it to
``SCENARIOS``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
import timeit
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fanout._version import DISTRIBUTION
from fanout.bench.contenders import CONTENDERS, FanoutProcess
from fanout.bench.payloads import Payload, load_payload
from fanout.notifications import Update
from fanout.stats import percentile
from fanout.wire.codec import get_codec
from fanout.wire.protocol import NBUCKETS

__all__ = [
    "SCENARIOS",
    "UNSTABLE_SPREAD",
    "Case",
    "Measurement",
    "Metric",
    "Options",
    "Suite",
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


@dataclass
class _Step:
    case: Case
    contender: Any
    round: int | None  # None: the calibration
    estimate_s: float


def _merge_hists(results: list[dict[str, Any]]) -> list[int]:
    hist = [0] * NBUCKETS
    for r in results:
        for i, c in enumerate(r["hist"]):
            hist[i] += c
    return hist


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Suite:
    """Plans the selected scenarios' cases and runs them with ``[i/N]`` progress.

    Args:
        opts: What to run.
        progress: Called with one line per finished figure.
        status: Called with ``"[i/N] ETA m:ss what"`` before each step (a
            calibration or a round) starts.
    """

    def __init__(
        self,
        opts: Options,
        progress: Callable[[str], None],
        status: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.opts = opts
        self.progress = progress
        self.status = status
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

    # -- planning and running ---------------------------------------------------------------

    def plan(self) -> list[Case]:
        """Every case of the selected scenarios, in the order they run."""
        return [case for name in self.opts.scenarios for case in SCENARIOS[name](self)]

    def run(self) -> None:
        """Run every case; on KeyboardInterrupt, keep what the current case measured."""
        steps = [step for case in self.plan() for step in self._steps(case)]
        total_s = sum(s.estimate_s for s in steps)
        self.progress(f"{len(steps)} steps (calibrations and rounds), about {_fmt_eta(total_s)}")
        done_s = 0.0
        started = time.monotonic()
        current: Case | None = None
        samples: dict[str, list[dict[str, Any]]] = {}
        calibration: dict[str, Any] = {}
        try:
            for i, step in enumerate(steps, 1):
                case = step.case
                if case is not current:
                    if current is not None:
                        self._record(current, samples)
                    current, samples, calibration = case, {}, {}
                    if case.before is not None:
                        case.before()
                elapsed = time.monotonic() - started
                # Scale the estimates by how far off they were so far.
                eta = (total_s - done_s) * (elapsed / done_s if done_s else 1.0)
                name = step.contender.name
                what = (
                    f"calibrate {name}"
                    if step.round is None
                    else f"{name} round {step.round + 1}/{self.opts.rounds}"
                )
                self.status(
                    f"[{i}/{len(steps)}] ETA {_fmt_eta(eta)}  {case.scenario} "
                    f"{_params_text(case.params)}: {what}"
                )
                if step.round is None:
                    assert case.calibrate is not None
                    calibration[name] = case.calibrate(step.contender)
                else:
                    sample = case.run_round(step.contender, calibration.get(name))
                    samples.setdefault(name, []).append(sample)
                done_s += step.estimate_s
        finally:
            if current is not None:
                self._record(current, samples)

    def _steps(self, case: Case) -> Iterable[_Step]:
        if case.calibrate is not None:
            for c in case.contenders:
                yield _Step(case, c, None, case.calibrate_s + SESSION_S)
        for r, c in interleave(case.contenders, self.opts.rounds):
            yield _Step(case, c, r, case.round_s + SESSION_S)

    def _record(self, case: Case, samples: dict[str, list[dict[str, Any]]]) -> None:
        names = {m.name for m in case.metrics}
        for metric in case.metrics:
            for cls in case.contenders:
                rounds = samples.get(cls.name)
                if not rounds:
                    continue
                extra: dict[str, Any] = {}
                for key in rounds[0]:
                    kept = [r[key] for r in rounds if r.get(key) is not None]
                    if key not in names and kept:
                        extra[key] = statistics.median(kept)
                m = Measurement(
                    case.scenario,
                    cls.name,
                    case.params,
                    metric.name,
                    metric.unit,
                    [float(r[metric.name]) for r in rounds],
                    extra,
                    metric.better,
                    case.title,
                    metric.label,
                )
                self.measurements.append(m)
                self.progress(_describe(m))

    def find(self, scenario: str, contender: str, params: dict[str, Any]) -> Measurement | None:
        """A figure measured earlier in this run, if any."""
        for m in self.measurements:
            if m.scenario == scenario and m.contender == contender and m.params == params:
                return m
        return None

    # -- what the scenarios share ----------------------------------------------------------

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


def _describe(m: Measurement) -> str:
    """One line for a finished figure: median, min..max and the stability verdict."""

    def fmt(v: float) -> str:
        if m.unit == "GB/s":
            return f"{v:,.3f}"
        return f"{v * 1e3:,.3f}" if m.unit == "s" else f"{v:,.0f}"

    unit = "ms" if m.unit == "s" else m.unit
    head = f"{m.scenario:<10} {_params_text(m.params):<28} {m.contender:<15}"
    if m.label and m.metric != "deliveries":
        head += f" {m.label}"
    tail = ""
    if m.spread is not None:
        tail = f"  ({fmt(min(m.values))} .. {fmt(max(m.values))}, spread {m.spread:.0%})"
        if m.unstable:
            tail += " UNSTABLE"
    return f"{head}  {fmt(m.median)} {unit}{tail}"


# -- the scenarios ------------------------------------------------------------------------


def _payload_title(payload: Payload) -> str:
    size = payload.encoded_size() // 2  # an update carries old and new
    names = {"small": "small objects", "pod": "Pods"}
    return f"{names.get(payload.name, payload.name)} (~{size:,} B)"


def throughput(suite: Suite) -> list[Case]:
    """No-op handlers: deliveries/s for each --payload and --listeners count."""
    cases = []
    for pname in suite.opts.payloads:
        payload = load_payload(pname)
        for L in suite.opts.listeners:
            case = suite.batch_case(
                "throughput",
                {"payload": payload.name, "listeners": L},
                f"Throughput, {_payload_title(payload)} to {L} listener{'s' * (L > 1)}",
                L,
                1,
                0.0,
                payload,
            )
            case.before = lambda payload=payload, L=L: suite.codec_limit(payload, L)
            cases.append(case)
    return cases


def cpu(suite: Suite) -> list[Case]:
    """Handlers doing --work-us of pure Python, for each --workers count."""
    payload = load_payload("small")
    L = max(suite.opts.listeners)
    work = suite.opts.work_us
    return [
        suite.batch_case(
            "cpu",
            {"work_us": work, "listeners": L, "workers": W},
            f"Handlers doing {work:g} us of Python each, {L} listeners x {W} "
            f"worker{'s' * (W > 1)}",
            L,
            W,
            work,
            payload,
        )
        for W in suite.opts.workers
    ]


LATENCY_METRICS = [
    Metric("p50", "s", "lower", "p50"),
    Metric("p99", "s", "lower", "p99"),
    Metric("max", "s", "lower", "max"),
]


def latency(suite: Suite) -> list[Case]:
    """Send to handler start at a fixed offered rate: p50, p99 and max."""
    payload = load_payload("small")
    L = max(suite.opts.listeners)
    rate = suite.opts.latency_rate
    n = max(10, int(rate * suite.opts.latency_seconds))

    def run_round(cls: Any, _: Any) -> dict[str, Any]:
        session = cls(L, 1, 0.0, None)
        try:
            session.start()
            t0 = time.perf_counter()
            for i in range(n):
                # Pace by sleeping, never spinning: a spinning producer would
                # hold the GIL and starve in-process listeners and feeders.
                left = t0 + i / rate - time.perf_counter()
                if left > 0:
                    time.sleep(left)
                session.send(*payload.pair(i))
                session.flush()
            results = session.finish(FINISH_TIMEOUT)
        finally:
            session.close()
        hist = _merge_hists(results)
        return {
            m.name: float(percentile(hist, q) or 0.0)
            for m, q in zip(LATENCY_METRICS, (0.5, 0.99, 1.0), strict=True)
        }

    return [
        Case(
            "latency",
            {"rate": rate, "listeners": L},
            f"Latency, send to handler start, {rate:,.0f}/s to {L} listeners",
            LATENCY_METRICS,
            suite.contenders,
            run_round,
            round_s=n / rate,
        )
    ]


def stalled(suite: Suite) -> list[Case]:
    """One listener's handler blocks a while: the healthy listeners' deliveries/s."""
    opts = suite.opts
    payload = load_payload("small")
    L = max(2, max(opts.listeners))
    params = {"listeners": L, "stall_s": opts.stall_seconds}

    def calibrate(cls: Any) -> int:
        rate, _ = suite.batch(cls, L, 1, 0.0, payload, 200)
        return int(min(MAX_COUNT, max(200, rate / L * opts.duration)))

    def run_round(cls: Any, n: int) -> dict[str, Any]:
        gate = os.path.join(suite.tmp, f"gate-{cls.name}")
        session = cls(L, 1, 0.0, gate, stalled=frozenset({0}))
        rss0 = _rss_bytes()
        try:
            session.start()
            t0 = time.monotonic()
            producer = threading.Thread(target=_produce, args=(session, payload, n))
            producer.start()
            monitor = _HealthyMonitor(session, n)
            time.sleep(opts.stall_seconds)
            held = session.buffered_bytes()
            rss1 = _rss_bytes()
            open(gate, "w").close()  # release the stalled listener
            producer.join()
            results = session.finish(FINISH_TIMEOUT)
            monitor.stop()
        finally:
            session.close()
            if os.path.exists(gate):
                os.unlink(gate)
        done_at = [r.get("t_last") for r in results[1:]]
        done_at = [t for t in done_at if t] or monitor.done_at
        healthy = n * (L - 1) / max(1e-9, max(done_at) - t0) if done_at else 0.0
        sample = {
            "deliveries": healthy,
            "stalled_buffered_bytes": held,
            "producer_rss_growth_bytes": rss1 - rss0,
            "encoded_bytes_per_notification": payload.encoded_size(),
            "notifications": n,
        }
        plain = suite.find("throughput", cls.name, {"payload": "small", "listeners": L})
        if plain is not None:
            # Per listener: a healthy one beside a stalled sibling, against
            # one of L healthy listeners in the throughput scenario.
            sample["ratio_to_unstalled"] = (healthy / (L - 1)) / (plain.median / L)
        return sample

    return [
        Case(
            "stalled",
            params,
            f"Healthy listeners beside one stalled for {opts.stall_seconds:g} s, {L} listeners",
            [Metric("deliveries", "deliveries/s", "higher", "healthy deliveries/s")],
            suite.contenders,
            run_round,
            calibrate=calibrate,
            round_s=opts.stall_seconds + opts.duration,
            calibrate_s=0.05,
        )
    ]


def _produce(session: Any, payload: Payload, n: int) -> None:
    for i in range(n):
        session.send(*payload.pair(i))
    session.flush()


RECOVERY_METRICS = [
    Metric("sigkill_to_handled", "s", "lower", "SIGKILL to next handled"),
    # The floor recovery cannot beat: a new worker must start. Measured in the
    # same round, so the chart compares recovery with something.
    Metric("cold_start", "s", "lower", "cold start of a worker (reference)"),
]


def recovery(suite: Suite) -> list[Case]:
    """fanout only: SIGKILL a worker, time until its lane handles again."""
    if FanoutProcess not in suite.contenders:
        return []
    for other in suite.contenders:
        if not other.name.startswith("fanout") and other.kind == "process":
            suite.skipped.setdefault(
                f"recovery/{other.name}",
                "no supervisor: a killed consumer is not restarted and its backlog is lost",
            )
    payload = load_payload("small")

    def run_round(cls: Any, _: Any) -> dict[str, Any]:
        log = logging.getLogger("fanout")
        level = log.level
        log.setLevel(logging.ERROR)  # the kills are deliberate: no restart warnings
        try:
            return _recovery_once(payload)
        finally:
            log.setLevel(level)

    def warm_up() -> None:
        # A respawn finds the forkserver running; so must the cold start it is
        # compared with, even when no other scenario started it before.
        run_round(FanoutProcess, None)

    return [
        Case(
            "recovery",
            {"rate": 2000},
            "Recovery from a SIGKILLed worker",
            RECOVERY_METRICS,
            [FanoutProcess],
            run_round,
            before=warm_up,
            round_s=0.2,
        )
    ]


def schema(suite: Suite) -> list[Case]:
    """Pods to 4 listeners whose handlers read five fields (``fanout.bench.schema``)."""
    from fanout.bench import schema as module

    return module.cases(suite)


def arrays(suite: Suite) -> list[Case]:
    """Float64 arrays to --listeners listeners summing them, in GB/s (``fanout.bench.arrays``)."""
    from fanout.bench import arrays as module

    return module.cases(suite)


def stalled_arrays(suite: Suite) -> list[Case]:
    """Big arrays beside a stalled listener: the healthy rate / its rate alone."""
    from fanout.bench import arrays as module

    return module.stalled_cases(suite)


def kube(suite: Suite) -> list[Case]:
    """Pod watch events to a handler, fanout.kube against the client (``fanout.bench.kube``)."""
    from fanout.bench import kube as module

    return module.cases(suite)


def ray(suite: Suite) -> list[Case]:
    """One listener of 2 Ray actors against Ray used directly (``fanout.bench.ray``)."""
    try:
        from fanout.bench import ray as module
    except ImportError as exc:  # Ray is not installed
        suite.skipped["ray"] = f"needs Ray: pip install '{DISTRIBUTION}[ray]' ({exc})"
        return []
    return module.cases(suite)


SCENARIOS: dict[str, Callable[[Suite], list[Case]]] = {
    "throughput": throughput,
    "cpu": cpu,
    "latency": latency,
    "stalled": stalled,
    "recovery": recovery,
    "schema": schema,
    "arrays": arrays,
    "stalled-arrays": stalled_arrays,
    "kube": kube,
    "ray": ray,
}


class _HealthyMonitor:
    """For fanout sessions: note when every healthy listener has handled n."""

    def __init__(self, session: Any, n: int) -> None:
        self.done_at: list[float] = []
        self._stop = threading.Event()
        regs = getattr(session, "regs", None)
        if regs is None:
            return
        self._thread = threading.Thread(target=self._watch, args=(regs[1:], n), daemon=True)
        self._thread.start()

    def _watch(self, regs: list[Any], n: int) -> None:
        while not self._stop.is_set():
            if all(r.stats().delivered >= n for r in regs):
                self.done_at = [time.monotonic()]
                return
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()


def _wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Spin-sleep briefly until ``predicate()``; a fine grain, since it is timed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("recovery: the worker did not come back in time")
        time.sleep(0.0001)


def _recovery_once(payload: Payload) -> dict[str, float]:
    """SIGKILL the only worker of a listener fed at 2,000/s; time to the next handled.

    Also times the listener's first start (``start()`` until its worker is
    ready), which recovery must at least repeat.
    """
    import fanout
    from fanout.bench.sessions import BenchHandler

    d = fanout.Distributor()
    reg = d.add_listener(BenchHandler(0.0), name="recovery")
    try:
        t_start = time.perf_counter()
        d.start()
        _wait_for(reg.ready)
        cold = time.perf_counter() - t_start
        for i in range(200):  # warm the worker up, then let it go idle
            d.distribute(fanout.Update(*payload.pair(i)))
        _wait_for(lambda: reg.stats().delivered >= 200)
        (pid,) = reg.worker_pids()
        # The worker is idle, so the next notification handled is the new
        # worker's: from the kill, through detection, respawn and resend.
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        d.distribute(fanout.Update(*payload.pair(200)))
        _wait_for(lambda: reg.stats().delivered > 200)
        return {"sigkill_to_handled": time.perf_counter() - t_kill, "cold_start": cold}
    finally:
        d.stop(drain=False)
