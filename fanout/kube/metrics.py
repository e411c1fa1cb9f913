"""Prometheus metrics of informers: restarts, relists, 410s, freshness, events, store size.

``InformerCollector(*informers)`` reads each informer's ``stats()`` at scrape
time, labelled ``informer`` (the collection's URL path, e.g.
``/api/v1/namespaces/prod/pods``). Register it next to the distributor's
collector, for example on the registry ``fanout.metrics.serve`` made::

    server = fanout.metrics.serve(d, 9100)
    server.registry.register(InformerCollector(pods, nodes))

Needs the ``prometheus`` and ``kube`` extras.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable

from fanout._version import DISTRIBUTION

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        f"fanout.kube.metrics needs prometheus_client: pip install '{DISTRIBUTION}[prometheus]'"
    ) from exc

from fanout.kube.informer import Informer, InformerStats

__all__ = ["COUNTERS", "GAUGES", "InformerCollector"]

LABEL = "informer"

# (metric name without "_total", help, InformerStats field)
COUNTERS = (
    ("fanout_kube_lists", "Lists (paged or streaming) that ran to their end.", "lists"),
    (
        "fanout_kube_list_restarts",
        "Lists abandoned before their end and started again.",
        "list_restarts",
    ),
    ("fanout_kube_relists", "Lists after the first, reconciled against the store.", "relists"),
    (
        "fanout_kube_watch_restarts",
        "Watches started again after the first (timeout, drop, silence, 410).",
        "watch_restarts",
    ),
    ("fanout_kube_gone", "410 Gone answers (compacted version, expired continue).", "gone"),
    (
        "fanout_kube_silent_watches",
        "Watches restarted after silence_timeout without an event or bookmark.",
        "silent_watches",
    ),
    ("fanout_kube_events", "Watch events applied (ADDED, MODIFIED, DELETED).", "events"),
    ("fanout_kube_bookmarks", "Watch bookmarks received.", "bookmarks"),
    ("fanout_kube_errors", "Failed requests, each retried after a backoff.", "errors"),
    ("fanout_kube_resyncs", "Times the store was sent to listeners due a resync.", "resyncs"),
)
GAUGES = (
    ("fanout_kube_store_objects", "Objects in the informer's store.", "store_size"),
    (
        "fanout_kube_resource_version_age_seconds",
        "Seconds since the last resourceVersion arrived (NaN before the first).",
        "resource_version_age",
    ),
    ("fanout_kube_synced", "1 once the first list was delivered, else 0.", "synced"),
)


class InformerCollector(Collector):
    """A ``prometheus_client`` collector for informers.

    Each scrape reads ``stats()`` of every informer still alive (they are held
    weakly); informers watching the same path are labelled ``path``,
    ``path#2``... in the order given. Events per second are the rate of
    ``fanout_kube_events_total``.

    Args:
        informers: the ``fanout.kube.Informer`` objects to report on.

    Raises:
        TypeError: one of ``informers`` is not an ``Informer``.
    """

    def __init__(self, *informers: Informer) -> None:
        for inf in informers:
            if not isinstance(inf, Informer):
                raise TypeError(
                    f"InformerCollector takes fanout.kube.Informer objects, not "
                    f"{type(inf).__name__}"
                )
        self._informers = [weakref.ref(inf) for inf in informers]

    def describe(self) -> Iterable[Metric]:
        """Name the metrics without reading any counter (registries call this).

        Returns:
            One empty family per metric.
        """
        return _families([])

    def collect(self) -> Iterable[Metric]:
        """Read every informer's counters.

        Returns:
            One family per metric, a sample per informer.
        """
        rows: list[tuple[str, InformerStats]] = []
        seen: dict[str, int] = {}
        for ref in self._informers:
            inf = ref()
            if inf is None:
                continue
            n = seen[inf.path] = seen.get(inf.path, 0) + 1
            rows.append((inf.path if n == 1 else f"{inf.path}#{n}", inf.stats()))
        return _families(rows)


def _families(rows: list[tuple[str, InformerStats]]) -> list[Metric]:
    families: list[Metric] = []
    for name, text, field in COUNTERS:
        counter = CounterMetricFamily(name, text, labels=[LABEL])
        for label, stats in rows:
            counter.add_metric([label], getattr(stats, field))
        families.append(counter)
    for name, text, field in GAUGES:
        gauge = GaugeMetricFamily(name, text, labels=[LABEL])
        for label, stats in rows:
            value = getattr(stats, field)
            gauge.add_metric([label], math.nan if value is None else float(value))
        families.append(gauge)
    return families
