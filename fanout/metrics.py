"""Prometheus metrics of a ``Distributor``: a collector and a small HTTP endpoint.

``PrometheusCollector(distributor)`` turns every listener's ``stats()`` into
Prometheus metrics, labelled ``listener``; register it on any
``prometheus_client`` registry. ``serve(distributor, port)`` starts an endpoint
that serves only these metrics. Nothing here runs unless scraped: a scrape reads
the counters ``stats()`` reads (the parent's counters, the rings' sizes and the
workers' shared-memory progress slots), so ``distribute`` pays nothing for it.

The latency histogram comes from the buckets the workers already keep, four per
power of two (``fanout.stats.bucket_of``). Prometheus gets every fourth
boundary, one per power of two of nanoseconds, from 2**10 ns (about 1 us) to
2**35 ns (about 34 s): bucket ``le`` counts the handler starts whose latency was
below that bound, and the largest latencies go to ``+Inf`` only. ``_sum`` is
estimated from the midpoints of the fine buckets (``fanout.stats.bucket_value``);
a fine bucket is at most a quarter of its lower bound wide, so the estimate is
within 12.5 % of the true sum.

Needs the ``prometheus`` extra: ``pip install 'fanout-informer[prometheus]'``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from fanout._version import DISTRIBUTION

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
    from prometheus_client.utils import floatToGoString
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        f"fanout.metrics needs prometheus_client: pip install '{DISTRIBUTION}[prometheus]' "
        "(or pip install prometheus_client)"
    ) from exc

from fanout.core.options import check_period
from fanout.stats import bucket_value
from fanout.tools.endpoint import Endpoint
from fanout.wire.protocol import NBUCKETS

if TYPE_CHECKING:
    from fanout.core.distributor import Distributor
    from fanout.listeners.base import Registration
    from fanout.stats import ListenerStats

__all__ = [
    "IDLE_TIMEOUT",
    "LATENCY_BOUNDS",
    "MAX_CONNECTIONS",
    "MetricsServer",
    "PrometheusCollector",
    "latency_buckets",
    "serve",
]

LABEL = "listener"

# (metric name without "_total", help, ListenerStats field)
COUNTERS = (
    (
        "fanout_received",
        "Notifications accepted for the listener (live or initial list).",
        "received",
    ),
    (
        "fanout_delivered",
        "Handler calls finished, whether the handler raised or not.",
        "delivered",
    ),
    ("fanout_handler_errors", "Handler calls that raised.", "errors"),
    (
        "fanout_dead_lettered",
        "Notifications given up on (on_dead_letter was called).",
        "dead_lettered",
    ),
    (
        "fanout_dropped",
        "Notifications dropped by the overflow policy or a stop without drain.",
        "dropped",
    ),
    ("fanout_worker_restarts", "Workers started again after one died or was killed.", "restarts"),
)
GAUGES = (
    ("fanout_pending", "Notifications accepted and not yet handled.", "pending"),
    ("fanout_pending_bytes", "Encoded bytes the listener's rings hold.", "pending_bytes"),
    ("fanout_ring_capacity_bytes", "Bytes the listener's rings have allocated.", "capacity_bytes"),
    ("fanout_workers", "Worker processes (or threads) the listener runs.", "workers"),
    (
        "fanout_start_failed",
        "1 if the listener could not start after start() (see its start_error), else 0.",
        "start_failed",
    ),
)
LATENCY = "fanout_delivery_latency_seconds"
LATENCY_HELP = (
    "Time from distribute() to the handler call starting; buckets are powers of two of "
    "nanoseconds, _sum is estimated from finer buckets."
)
# Fine bucket 4*k is the first of the octave [2**k, 2**(k+1)) ns.
FIRST_OCTAVE, LAST_OCTAVE = 10, 35
# (seconds, fine buckets below it): every fourth fine-bucket boundary.
LATENCY_BOUNDS: tuple[tuple[float, int], ...] = tuple(
    ((1 << k) / 1e9, 4 * k) for k in range(FIRST_OCTAVE, LAST_OCTAVE + 1)
)


# Worked out once: a scrape formats many of these.
_LE_LABELS = tuple(floatToGoString(bound) for bound, _ in LATENCY_BOUNDS)
_MIDPOINTS = tuple(bucket_value(i) for i in range(NBUCKETS))


def latency_buckets(hist: Sequence[int]) -> tuple[list[tuple[str, float]], float]:
    """Turn a fine latency histogram into Prometheus buckets and an estimated sum.

    Args:
        hist: counts per fine bucket, as ``Registration.latency_histogram()``
            returns them (``fanout.stats.NBUCKETS`` entries).

    Returns:
        ``(buckets, sum)``: cumulative ``(le, count)`` pairs, ``le`` formatted as
        Prometheus writes it and ending with ``"+Inf"``; and the sum of the
        latencies in seconds, each counted at its fine bucket's midpoint.

    Raises:
        ValueError: ``hist`` does not have ``NBUCKETS`` entries.
    """
    if len(hist) != NBUCKETS:
        raise ValueError(f"expected {NBUCKETS} latency buckets, got {len(hist)}")
    buckets: list[tuple[str, float]] = []
    seen = 0
    cumulative = 0
    for label, (_, below) in zip(_LE_LABELS, LATENCY_BOUNDS, strict=True):
        cumulative += sum(hist[seen:below])
        seen = below
        buckets.append((label, float(cumulative)))
    buckets.append(("+Inf", float(sum(hist))))
    total = sum(count * mid for count, mid in zip(hist, _MIDPOINTS, strict=True) if count)
    return buckets, total


def _labelled(regs: Iterable[Registration]) -> Iterator[tuple[str, Registration]]:
    """Yield each listener with a unique label: its name, then ``name#2``... for repeats."""
    seen: dict[str, int] = {}
    for reg in regs:
        n = seen.get(reg.name, 0) + 1
        seen[reg.name] = n
        yield (reg.name if n == 1 else f"{reg.name}#{n}"), reg


class PrometheusCollector(Collector):
    """A ``prometheus_client`` collector for every listener of a distributor.

    Each scrape calls ``stats()`` and ``latency_histogram()`` of every listener
    registered at that moment, so the figures are those ``stats()`` returns, and
    a removed listener's series end. The label ``listener`` is the listener's
    name; listeners sharing a name get ``name#2``, ``name#3``... in the order
    they were added. After ``stop()`` a distributor has no listeners: its series
    end too.

    The collector holds the distributor weakly: registering it on a long-lived
    registry does not keep a distributor alive; a collected one has no series.

    Args:
        distributor: the ``fanout.Distributor`` to report on.

    Raises:
        TypeError: ``distributor`` is not a ``fanout.Distributor``.
    """

    def __init__(self, distributor: Distributor) -> None:
        from fanout.core.distributor import Distributor

        if not isinstance(distributor, Distributor):
            raise TypeError(
                f"PrometheusCollector takes a fanout.Distributor, not {type(distributor).__name__}"
            )
        self._dist = weakref.ref(distributor)

    def describe(self) -> Iterable[Metric]:
        """Name the metrics without reading any counter (registries call this)."""
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        """Read every listener's counters; return one family per metric."""
        dist = self._dist()
        listeners = dist.listeners if dist is not None else ()
        rows = [
            (label, reg.stats(), reg.latency_histogram()) for label, reg in _labelled(listeners)
        ]
        return self._families(rows)

    @staticmethod
    def _families(rows: list[tuple[str, ListenerStats, list[int]]]) -> list[Metric]:
        families: list[Metric] = []
        for name, text, field in COUNTERS:
            counter = CounterMetricFamily(name, text, labels=[LABEL])
            for label, stats, _ in rows:
                counter.add_metric([label], getattr(stats, field))
            families.append(counter)
        for name, text, field in GAUGES:
            gauge = GaugeMetricFamily(name, text, labels=[LABEL])
            for label, stats, _ in rows:
                gauge.add_metric([label], getattr(stats, field))
            families.append(gauge)
        histogram = HistogramMetricFamily(LATENCY, LATENCY_HELP, labels=[LABEL])
        for label, _, hist in rows:
            buckets, total = latency_buckets(hist)
            histogram.add_metric([label], buckets, total)
        families.append(histogram)
        return families


MAX_CONNECTIONS = 16  # open at once; the oldest idle one makes room for a new one
IDLE_TIMEOUT = 10.0  # seconds a connection has to send its request and take the answer


class MetricsServer:
    """A running metrics endpoint, as ``serve`` returns it; close it when done.

    Attributes:
        addr: the address it listens on.
        port: the port it listens on (the one the system picked for ``port=0``).
        url: ``http://addr:port/metrics``, what ``fanout top`` and Prometheus take.
        registry: the ``CollectorRegistry`` it serves (only fanout's collector).
    """

    def __init__(self, endpoint: Endpoint, registry: CollectorRegistry) -> None:
        self._endpoint: Endpoint | None = endpoint
        self.registry = registry
        self.addr: str = endpoint.address[0]
        self.port: int = endpoint.address[1]
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        self.url = f"http://{host}:{self.port}/metrics"

    def __repr__(self) -> str:
        state = "closed" if self._endpoint is None else "serving"
        return f"<MetricsServer {self.url} {state}>"

    def close(self) -> None:
        """Stop serving, close every socket and join the server thread (idempotent)."""
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    distributor: Distributor,
    port: int,
    addr: str = "127.0.0.1",
    *,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT,
) -> MetricsServer:
    """Serve the distributor's metrics over HTTP, from one background thread.

    The endpoint has its own registry holding only a ``PrometheusCollector`` of
    ``distributor``; any path answers ``GET`` and ``HEAD`` (``/metrics`` by
    convention). It listens on the loopback address unless told otherwise: the
    metrics name your listeners, so expose them on purpose.

    It costs one thread and at most ``max_connections`` + 3 descriptors however
    many clients connect: one thread serves every connection from a selector;
    when one more connection arrives, the oldest one that has not sent a whole
    request is closed for it, so idle or slow clients cannot lock scrapers out,
    nor take the descriptors the distributor needs to start workers. Each answer
    closes its connection.

    Args:
        distributor: the ``fanout.Distributor`` to report on.
        port: TCP port; 0 lets the system pick a free one (see ``.port``).
        addr: address to listen on; ``"0.0.0.0"`` for every interface.
        max_connections: connections open at once (at least 1).
        idle_timeout: seconds a connection has, in all, to send its request and
            take its answer before it is closed (a number > 0).

    Returns:
        A ``MetricsServer``; call ``close()`` (or use it in a ``with`` block)
        to stop it.

    Raises:
        TypeError: ``distributor`` is not a ``fanout.Distributor``, or ``port``,
            ``max_connections`` or ``idle_timeout`` is not a number of the right kind.
        ValueError: ``port`` is outside 0..65535, ``max_connections`` < 1 or
            ``idle_timeout`` not a finite number > 0.
        OSError: the address cannot be bound (in use, or not this machine's).
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535 (0: any free port), got {port}")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise TypeError(f"max_connections must be an int, not {max_connections!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    idle = check_period("idle_timeout", idle_timeout)
    if not idle:
        raise ValueError("idle_timeout must be > 0 seconds, got 0")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PrometheusCollector(distributor))

    def render() -> tuple[bytes, str]:
        return generate_latest(registry), CONTENT_TYPE_LATEST

    endpoint = Endpoint(addr, port, render, max_connections, idle)
    endpoint.start()
    return MetricsServer(endpoint, registry)
