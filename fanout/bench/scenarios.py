"""The benchmark scenarios, each run against every installed contender the same way.

* ``throughput``: no-op handlers, L listeners, deliveries/s from the first send
  until every consumer handled everything.
* ``cpu``: handlers doing ``work_us`` of pure Python, W consumers per listener.
* ``latency``: a fixed offered rate; send -> handler start p50 / p99 / max.
* ``stalled``: one listener's handler blocks for a while; the healthy
  listeners' throughput and the memory held for the stalled one.
* ``recovery``: (fanout) time from SIGKILL of a worker to the next handled
  notification on its lane.

Every measurement: a calibration run sizes the batch to ``duration`` seconds,
then ``rounds`` measured runs; median, min and max are kept.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from fanout.bench.contenders import CONTENDERS, FanoutProcess
from fanout.bench.payloads import Payload, load_payload
from fanout.stats import NBUCKETS, percentile

__all__ = ["Options", "Suite"]

MAX_COUNT = 2_000_000
FINISH_TIMEOUT = 120.0


@dataclass
class Options:
    """What ``fanout bench`` runs; see ``fanout bench --help``."""

    listeners: list[int] = field(default_factory=lambda: [1, 4])
    workers: list[int] = field(default_factory=lambda: [1, 2])
    payloads: list[str] = field(default_factory=lambda: ["small", "pod"])
    work_us: float = 50.0
    duration: float = 0.5
    rounds: int = 3
    latency_rate: float = 2000.0
    latency_seconds: float = 2.0
    stall_seconds: float = 1.5
    scenarios: list[str] = field(
        default_factory=lambda: ["throughput", "cpu", "latency", "stalled", "recovery"]
    )
    contenders: list[str] | None = None

    @classmethod
    def quick(cls) -> Options:
        """A run of a few tens of seconds that still touches every scenario."""
        return cls(
            listeners=[2],
            workers=[1],
            payloads=["small"],
            work_us=20.0,
            duration=0.1,
            rounds=1,
            latency_rate=500.0,
            latency_seconds=0.4,
            stall_seconds=0.4,
        )


@dataclass
class Measurement:
    """One scenario x contender x parameters, with its rounds."""

    scenario: str
    contender: str
    params: dict[str, Any]
    metric: str
    unit: str
    values: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "contender": self.contender,
            "params": self.params,
            "metric": self.metric,
            "unit": self.unit,
            "values": self.values,
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            **self.extra,
        }


def _merge_hists(results: list[dict[str, Any]]) -> list[int]:
    hist = [0] * NBUCKETS
    for r in results:
        for i, c in enumerate(r["hist"]):
            hist[i] += c
    return hist


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Suite:
    """Runs the scenarios, reporting progress through ``progress(text)``."""

    def __init__(
        self,
        opts: Options,
        progress: Callable[[str], None],
        status: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.opts = opts
        self.progress = progress  # a finished measurement, one line each
        self.status = status  # what is running now (a live line on a terminal)
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

    # -- helpers -------------------------------------------------------------------------

    def _run(self, cls: Any, L: int, W: int, work_us: float, payload: Payload, n: int) -> Any:
        """One measured batch: returns (deliveries/s, results)."""
        self.status(f"{cls.name}: {n:,} notifications of {payload.name} to {L} x {W}")
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

    def _sized_runs(
        self, cls: Any, L: int, W: int, work_us: float, payload: Payload
    ) -> list[float]:
        """Calibrate the batch to ``duration`` seconds, then measure ``rounds`` times."""
        probe = 200 if payload.name == "small" else 50
        if work_us:
            probe = max(20, int(0.05 / (work_us / 1e6)))
        # Two probes: a tiny one, then one of about a fifth of the duration, so
        # the rate used to size the measured rounds is the steady one (a tiny
        # probe is dominated by start and stop, and would make short rounds).
        for share in (None, 0.2):
            rate, _ = self._run(cls, L, W, work_us, payload, probe)
            if share is None:
                probe = int(min(MAX_COUNT, max(probe, rate / L * self.opts.duration * 0.2)))
        n = int(min(MAX_COUNT, max(probe, rate / L * self.opts.duration)))
        return [self._run(cls, L, W, work_us, payload, n)[0] for _ in range(self.opts.rounds)]

    def _record(self, m: Measurement) -> None:
        self.measurements.append(m)

        def fmt(v: float) -> str:
            return f"{v * 1e3:,.3f} ms" if m.unit == "s" else f"{v:,.0f} {m.unit}"

        spread = f" ({fmt(min(m.values))} .. {fmt(max(m.values))})" if len(m.values) > 1 else ""
        params = " ".join(f"{k}={v}" for k, v in m.params.items())
        head = f"{m.scenario:<10} {params:<28} {m.contender:<15}"
        self.progress(f"{head} {fmt(m.median):>20}{spread}")

    # -- scenarios -----------------------------------------------------------------------

    def run(self) -> None:
        """Run every selected scenario."""
        for name in self.opts.scenarios:
            getattr(self, f"scenario_{name}")()

    def scenario_throughput(self) -> None:
        for pname in self.opts.payloads:
            payload = load_payload(pname)
            for L in self.opts.listeners:
                self._codec_limit(payload, L)
                for cls in self.contenders:
                    values = self._sized_runs(cls, L, 1, 0.0, payload)
                    params = {"payload": payload.name, "listeners": L}
                    self._record(
                        Measurement(
                            "throughput", cls.name, params, "deliveries", "deliveries/s", values
                        )
                    )

    def scenario_cpu(self) -> None:
        payload = load_payload("small")
        L = max(self.opts.listeners)
        for W in self.opts.workers:
            for cls in self.contenders:
                values = self._sized_runs(cls, L, W, self.opts.work_us, payload)
                self._record(
                    Measurement(
                        "cpu",
                        cls.name,
                        {"work_us": self.opts.work_us, "listeners": L, "workers": W},
                        "deliveries",
                        "deliveries/s",
                        values,
                    )
                )

    def scenario_latency(self) -> None:
        payload = load_payload("small")
        L = max(self.opts.listeners)
        rate = self.opts.latency_rate
        n = max(10, int(rate * self.opts.latency_seconds))
        for cls in self.contenders:
            self.status(f"latency: {cls.name} at {rate:,.0f}/s for {n / rate:.1f} s")
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
            p50, p99, pmax = (percentile(hist, q) for q in (0.5, 0.99, 1.0))
            params = {"rate": rate, "listeners": L}
            for metric, value in (("p50", p50), ("p99", p99), ("max", pmax)):
                self._record(
                    Measurement(
                        "latency",
                        cls.name,
                        {**params, "stat": metric},
                        metric,
                        "s",
                        [float(value or 0.0)],
                    )
                )

    def scenario_stalled(self) -> None:
        payload = load_payload("small")
        L = max(2, max(self.opts.listeners))
        plain = {
            m.contender: m.median
            for m in self.measurements
            if m.scenario == "throughput" and m.params == {"payload": "small", "listeners": L}
        }
        for cls in self.contenders:
            gate = os.path.join(self.tmp, f"gate-{cls.name}")
            rate, _ = self._run(cls, L, 1, 0.0, payload, 200)
            n = int(min(MAX_COUNT, max(200, rate / L * self.opts.duration)))
            self.status(f"stalled: {cls.name}, one listener blocked {self.opts.stall_seconds} s")
            session = cls(L, 1, 0.0, gate, stalled=frozenset({0}))
            rss0 = _rss_bytes()
            held = None
            try:
                session.start()
                t0 = time.monotonic()
                producer = threading.Thread(target=self._produce, args=(session, payload, n))
                producer.start()
                monitor = _HealthyMonitor(session, n)
                time.sleep(self.opts.stall_seconds)
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
            extra = {
                "stalled_buffered_bytes": held,
                "producer_rss_growth_bytes": rss1 - rss0,
                "encoded_bytes_per_notification": payload.encoded_size(),
                "notifications": n,
            }
            if cls.name in plain:
                # Per listener: a healthy one beside a stalled sibling, against
                # one of L healthy listeners in the throughput scenario.
                extra["ratio_to_unstalled"] = (healthy / (L - 1)) / (plain[cls.name] / L)
            params = {"listeners": L, "stall_s": self.opts.stall_seconds}
            self._record(
                Measurement(
                    "stalled",
                    cls.name,
                    params,
                    "healthy deliveries",
                    "deliveries/s",
                    [healthy],
                    extra,
                )
            )

    @staticmethod
    def _produce(session: Any, payload: Payload, n: int) -> None:
        for i in range(n):
            session.send(*payload.pair(i))
        session.flush()

    def scenario_recovery(self) -> None:
        cls = FanoutProcess
        if cls not in self.contenders:
            return
        payload = load_payload("small")
        values = []
        log = logging.getLogger("fanout")
        level = log.level
        log.setLevel(logging.ERROR)  # the kills are deliberate: no restart warnings
        try:
            for i in range(max(1, self.opts.rounds)):
                self.status(f"recovery: SIGKILL {i + 1} of {max(1, self.opts.rounds)}")
                values.append(_recovery_once(payload))
        finally:
            log.setLevel(level)
        self._record(
            Measurement("recovery", cls.name, {"rate": 2000}, "sigkill->handled", "s", values)
        )
        for other in self.contenders:
            if not other.name.startswith("fanout") and other.kind == "process":
                self.skipped.setdefault(
                    f"recovery/{other.name}",
                    "no supervisor: a killed consumer is not restarted and its backlog is lost",
                )

    def scenario_schema(self) -> None:
        try:
            from fanout.bench import schema
        except ImportError as exc:  # msgspec is not installed
            self.skipped["schema"] = f"needs msgspec ({exc})"
            return
        schema.run(self)

    def _codec_limit(self, payload: Payload, L: int) -> None:
        """``cores / (encode + L x decode)`` with msgpack, measured now."""
        old, new = payload.pair(0)
        data = msgpack.packb([1, 0, old, new])
        number = 2000

        def best(stmt: Callable[[], Any]) -> float:
            return min(timeit.repeat(stmt, number=number, repeat=3)) / number

        enc = best(lambda: msgpack.packb([1, 0, old, new]))
        dec = best(lambda: msgpack.unpackb(data))
        cores = os.cpu_count() or 1
        per_notification = cores / (enc + L * dec)
        self.codec_limits.append(
            {
                "payload": payload.name,
                "listeners": L,
                "encode_s": enc,
                "decode_s": dec,
                "cores": cores,
                "limit_deliveries_per_s": per_notification * L,
            }
        )


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


def _recovery_once(payload: Payload) -> float:
    """SIGKILL the only worker of a listener fed at 2,000/s; time to the next handled."""
    import fanout
    from fanout.bench.contenders import BenchHandler

    d = fanout.Distributor()
    reg = d.add_listener(BenchHandler(0.0), name="recovery")
    try:
        d.start()
        reg.wait_ready(60)
        for i in range(200):  # warm the worker up, then let it go idle
            d.distribute(fanout.Update(*payload.pair(i)))
        while reg.stats().delivered < 200:
            time.sleep(0.0005)
        (pid,) = reg.worker_pids()
        # The worker is idle, so the next notification handled is the new
        # worker's: from the kill, through detection, respawn and resend.
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        d.distribute(fanout.Update(*payload.pair(200)))
        while reg.stats().delivered <= 200:
            time.sleep(0.0001)
        return time.perf_counter() - t_kill
    finally:
        d.stop(drain=False)
