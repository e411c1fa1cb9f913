"""Scenarios ``throughput``, ``cpu``, ``latency`` and ``stalled``: updates to every contender.

* ``throughput``: no-op handlers, L listeners, deliveries/s from the first send
  until every consumer handled everything.
* ``cpu``: handlers doing ``work_us`` of pure Python, W consumers per listener.
* ``latency``: a fixed offered rate; send -> handler start p50 / p99 / max.
* ``stalled``: one listener's handler blocks for a while; the healthy
  listeners' throughput and the memory held for the stalled one.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from fanout.bench.model import FINISH_TIMEOUT, MAX_COUNT, Bench, Case, Metric
from fanout.bench.payloads import Payload, load_payload
from fanout.stats import percentile
from fanout.wire.protocol import NBUCKETS

__all__ = ["cpu", "latency", "stalled", "throughput"]


def _payload_title(payload: Payload) -> str:
    size = payload.encoded_size() // 2  # an update carries old and new
    names = {"small": "small objects", "pod": "Pods"}
    return f"{names.get(payload.name, payload.name)} (~{size:,} B)"


def throughput(suite: Bench) -> list[Case]:
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


def cpu(suite: Bench) -> list[Case]:
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


def latency(suite: Bench) -> list[Case]:
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


def stalled(suite: Bench) -> list[Case]:
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


def _merge_hists(results: list[dict[str, Any]]) -> list[int]:
    hist = [0] * NBUCKETS
    for r in results:
        for i, c in enumerate(r["hist"]):
            hist[i] += c
    return hist


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
