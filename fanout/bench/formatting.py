"""How a bench figure reads in the tables and the chart, and how to find one in a run.

A run's document is what :func:`fanout.bench.report.document` returns (or
``fanout bench --json`` wrote): its ``results`` hold one dict per figure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

__all__ = [
    "LATENCY_NOTE",
    "REFERENCE",
    "SPREAD_DEFINITION",
    "better_text",
    "find_figure",
    "row_name",
    "short_value",
    "spread_text",
    "table_rows",
]

REFERENCE = "fanout-process"  # the contender other figures are compared with
SPREAD_DEFINITION = "(max - min) / median of the rounds"
LATENCY_NOTE = (
    "latency figures are histogram buckets, 4 per octave (neighbours 14-25% apart), "
    "so a one-bucket move already reads as a spread over 15%"
)


def short_value(value: float, unit: str) -> str:
    """Compact, for the README table and the chart labels."""
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    if unit == "s":
        ms = value * 1e3
        if ms >= 1000:
            return f"{value:.2f} s"
        if ms >= 10:
            return f"{ms:.0f} ms"
        return f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:,.0f} k"
    return f"{value:.0f}"


def spread_text(r: dict[str, Any]) -> str:
    """``8%`` or ``31%, unstable``, or ``1 round`` when there is no spread."""
    if r["spread"] is None:
        return "1 round"
    text = f"{r['spread']:.0%}" if math.isfinite(r["spread"]) else "inf"
    return f"{text}, unstable" if r["unstable"] else text


def better_text(r: dict[str, Any]) -> str:
    """``higher is better`` or ``lower is better``, as the figure says."""
    return f"{r['better']} is better"


def table_rows(doc: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Figures grouped by (title, metric), in run order: one table row each."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in doc["results"]:
        rows[(r.get("title") or r["scenario"], r["metric"])].append(r)
    return rows


def row_name(doc: dict[str, Any], title: str, r: dict[str, Any]) -> str:
    """The row's title, with the metric's label when its case measures several metrics."""
    metrics = {x["metric"] for x in doc["results"] if (x.get("title") or x["scenario"]) == title}
    return f"{title}: {r['label']}" if len(metrics) > 1 and r.get("label") else title


def find_figure(doc: dict[str, Any], scenario: str, contender: str, **params: Any) -> Any:
    """The figure of ``contender`` in ``scenario`` whose params include ``params``."""
    return next(
        (
            r
            for r in doc["results"]
            if r["scenario"] == scenario
            and r["contender"] == contender
            and r.get("metric", "deliveries") == "deliveries"
            and all(r["params"].get(k) == v for k, v in params.items())
        ),
        None,
    )
