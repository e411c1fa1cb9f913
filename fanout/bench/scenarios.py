"""The list of benchmark scenarios, and the suite that plans and runs their cases.

Each scenario runs against every installed contender the same way:

* ``throughput``: no-op handlers, L listeners, deliveries/s from the first send
  until every consumer handled everything.
* ``cpu``: handlers doing ``work_us`` of pure Python, W consumers per listener.
* ``latency``: a fixed offered rate; send -> handler start p50 / p99 / max.
* ``stalled``: one listener's handler blocks for a while; the healthy
  listeners' throughput and the memory held for the stalled one. These four
  are in ``fanout.bench.delivery``.
* ``recovery``: (fanout) time from SIGKILL of a worker to the next handled
  notification on its lane, beside a worker's cold start for comparison
  (``fanout.bench.recovery``).
* ``schema``: Pods to 4 listeners whose handlers read five fields, with and
  without ``schema=`` (``fanout.bench.schema``).
* ``arrays``: float64 arrays of 64 KiB, 1 MiB and 16 MiB to L listeners whose
  handlers sum them, in GB/s, against a pipe and a ``shared_memory`` baseline
  (``fanout.bench.arrays``).
* ``stalled-arrays``: 1 MiB arrays to a healthy listener, alone and then beside
  a stalled one (defaults, and ``drop_newest`` bounds), in one run: the healthy
  listener's rate as a fraction of its rate alone
  (``fanout.bench.stalled_arrays``).
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

To add a scenario, write a function ``(bench) -> list[Case]`` in a module that
imports ``fanout.bench.model`` (never this one), and add it to ``SCENARIOS``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fanout._version import DISTRIBUTION
from fanout.bench.arrays import cases as arrays_cases
from fanout.bench.delivery import cpu, latency, stalled, throughput
from fanout.bench.kube import cases as kube_cases
from fanout.bench.model import SESSION_S, Bench, Case, Measurement, Options, interleave
from fanout.bench.recovery import recovery
from fanout.bench.schema import cases as schema_cases
from fanout.bench.stalled_arrays import cases as stalled_arrays_cases

__all__ = ["SCENARIOS", "Suite"]


@dataclass
class _Step:
    case: Case
    contender: Any
    round: int | None  # None: the calibration
    estimate_s: float


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Suite(Bench):
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
        super().__init__(opts)
        self.progress = progress
        self.status = status

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


# -- the registry -------------------------------------------------------------------------
# A function per scenario, whose docstring ``fanout bench --help`` lists.


def schema(suite: Bench) -> list[Case]:
    """Pods to 4 listeners whose handlers read five fields (``fanout.bench.schema``)."""
    return schema_cases(suite)


def arrays(suite: Bench) -> list[Case]:
    """Float64 arrays to --listeners listeners summing them, in GB/s (``fanout.bench.arrays``)."""
    return arrays_cases(suite)


def stalled_arrays(suite: Bench) -> list[Case]:
    """Big arrays beside a stalled listener: the healthy rate / its rate alone."""
    return stalled_arrays_cases(suite)


def kube(suite: Bench) -> list[Case]:
    """Pod watch events to a handler, fanout.kube against the client (``fanout.bench.kube``)."""
    return kube_cases(suite)


def ray(suite: Bench) -> list[Case]:
    """One listener of 2 Ray actors against Ray used directly (``fanout.bench.ray``)."""
    try:  # imported here: Ray is optional, and starting it is slow
        from fanout.bench import ray as module
    except ImportError as exc:  # Ray is not installed
        suite.skipped["ray"] = f"needs Ray: pip install '{DISTRIBUTION}[ray]' ({exc})"
        return []
    return module.cases(suite)


SCENARIOS: dict[str, Callable[[Bench], list[Case]]] = {
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
