"""The chart of a ``fanout bench`` run: a bar panel per figure group, drawn with matplotlib.

Works from the run's JSON document (:func:`fanout.bench.report.document`);
matplotlib is imported only when a chart is drawn.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fanout._version import DISTRIBUTION
from fanout.bench.formatting import (
    LATENCY_NOTE,
    SPREAD_DEFINITION,
    better_text,
    row_name,
    short_value,
    spread_text,
    table_rows,
)
from fanout.bench.model import UNSTABLE_SPREAD

__all__ = ["figure"]

FANOUT_COLOR = "tab:blue"
OTHER_COLOR = "tab:gray"
REFERENCE_COLOR = "silver"
UNSTABLE_COLOR = "tab:red"


def _panels(doc: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Figures grouped into chart panels.

    One panel per table row, except that a case measuring a single contender
    (recovery) shows its metrics side by side, so each is read against the other.
    """
    by_title: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in doc["results"]:
        by_title[r.get("title") or r["scenario"]].append(r)
    panels = []
    for title, rs in by_title.items():
        if len({r["contender"] for r in rs}) == 1:
            panels.append((title, rs))
            continue
        for (t, _), row in table_rows(doc).items():
            if t == title:
                panels.append((row_name(doc, title, row[0]), row))
    return panels


def figure(doc: dict[str, Any]) -> Any:
    """The chart of a run: one horizontal bar panel per figure group, readable alone.

    Every bar is a median with a min..max error bar and its value written
    beside it; unstable figures are hatched and labelled in red; every axis
    names its unit and which way is better, and turns logarithmic when the
    values span more than a decade; a legend explains colours and marks.

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot).

    Raises:
        SystemExit: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise SystemExit(
            "fanout bench --plot needs matplotlib: pip install matplotlib "
            f"(or pip install '{DISTRIBUTION}[plot]')"
        ) from None
    panels = _panels(doc)
    cols = 2
    rows = max(1, (len(panels) + cols - 1) // cols)
    fig = Figure(figsize=(15, 3.6 * rows + 1.2))
    FigureCanvasAgg(fig)  # a renderer to measure the value labels with (_fit_labels)
    axes = fig.subplots(rows, cols, squeeze=False)
    fits = [_panel(ax, title, rs) for ax, (title, rs) in zip(axes.flat, panels, strict=False)]
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    info = doc["machine"]
    rounds = doc["options"].get("rounds")
    fig.suptitle(
        f"fanout bench: median of {rounds} rounds per bar, interleaved across contenders "
        f"({info['cpu_count']} CPUs, Python {info['python']}, native={info['fanout_native']}, "
        f"load {info['load_average'][0]:.1f} at start)",
        fontsize=11,
        y=1 - 0.12 / fig.get_figheight(),  # above the legend, whatever the height
        va="top",
    )
    legend = [
        Patch(color=FANOUT_COLOR, label="fanout"),
        Patch(color=OTHER_COLOR, label="alternative mechanism"),
        Patch(color=REFERENCE_COLOR, label="reference for comparison"),
        Patch(
            facecolor="white",
            edgecolor=UNSTABLE_COLOR,
            hatch="///",
            label=f"unstable: spread over {UNSTABLE_SPREAD:.0%} of the median",
        ),
        Line2D([], [], color="black", marker="|", label="error bar: min..max of the rounds"),
    ]
    fig.legend(
        handles=legend,
        loc="upper center",
        ncol=5,
        fontsize=9,
        frameon=False,
        bbox_to_anchor=(0.5, 1 - 0.5 / fig.get_figheight()),
    )
    footer = f"Value labels: median (spread = {SPREAD_DEFINITION})."
    if any(r["scenario"] == "latency" for r in doc["results"]):
        footer += f" Note: {LATENCY_NOTE}."
    height = fig.get_figheight()
    fig.text(0.5, 0.12 / height, footer, ha="center", fontsize=8.5, color="dimgray")
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1 - 1.0 / height))
    for fit in fits:
        fit()
    return fig


def _unit_name(unit: str) -> str:
    """Name ``unit`` in words, for an axis label."""
    return {
        "s": "milliseconds",
        "deliveries/s": "deliveries per second",
        "GB/s": "GB per second (payload x listeners)",
    }.get(unit, unit)


def _tick(value: float, unit: str) -> str:
    """An axis tick: plain numbers (the axis label names the unit), k / M for rates."""
    if unit == "s" or value < 1e3:
        return f"{value:g}"
    return f"{value / 1e6:g} M" if value >= 1e6 else f"{value / 1e3:g} k"


LABEL_ROOM = 0.98  # a value label ends within this share of its panel's width


def _fit_labels(ax: Any, texts: list[Any], starts: list[float], log: bool) -> None:
    """Widen the x axis until every value label ends inside the panel.

    A label's width in pixels does not depend on the axis limits, its start (a
    bar's max) does: on the axis's own scale (log10 for a log axis) the label starting
    at ``s`` fits when ``(s - x0) / (x1 - x0) + w / W <= LABEL_ROOM``, so ``x1`` follows.
    """
    renderer = ax.figure.canvas.get_renderer()
    panel = ax.get_window_extent(renderer).width
    x0, x1 = ax.get_xlim()
    f = math.log10 if log else float
    lo, hi = f(x0), f(x1)
    for text, start in zip(texts, starts, strict=True):
        share = text.get_window_extent(renderer).width / panel
        if share < LABEL_ROOM:  # otherwise no axis could fit it: leave it
            hi = max(hi, lo + (f(start) - lo) / (LABEL_ROOM - share))
    ax.set_xlim(x0, 10**hi if log else hi)


def _panel(ax: Any, title: str, rs: list[dict[str, Any]]) -> Callable[[], None]:
    """Draw one panel of bars with error bars, value labels and a titled axis.

    A single-contender panel compares its first metric with the others (the
    references): they are drawn in a neutral colour, with a dashed line at
    their median, and the first bar's label gives the ratio.
    """
    from matplotlib.ticker import FuncFormatter

    single = len({r["contender"] for r in rs}) == 1
    unit = rs[0]["unit"]
    scale = 1e3 if unit == "s" else 1.0
    names = [(r.get("label") or r["metric"]) if single else r["contender"] for r in rs]
    med = [r["median"] * scale for r in rs]
    low = [r["min"] * scale for r in rs]
    high = [r["max"] * scale for r in rs]
    colors = []
    for i, r in enumerate(rs):
        if single and i > 0:
            colors.append(REFERENCE_COLOR)
        else:
            colors.append(FANOUT_COLOR if r["contender"].startswith("fanout") else OTHER_COLOR)
    ys = list(range(len(rs)))
    bars = ax.barh(ys, med, color=colors, height=0.65)
    for bar, r in zip(bars, rs, strict=True):
        if r["unstable"]:
            bar.set_hatch("///")
            bar.set_edgecolor(UNSTABLE_COLOR)
    ax.errorbar(
        med,
        ys,
        xerr=[
            [m - lo for m, lo in zip(med, low, strict=True)],
            [hi - m for m, hi in zip(med, high, strict=True)],
        ],
        fmt="none",
        ecolor="black",
        elinewidth=1,
        capsize=3,
    )
    positive = [v for v in low + med if v > 0]
    log = bool(positive) and max(high) / min(positive) > 10
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(positive) / 2, max(high) * 2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick(v, unit)))
    labels = [f" {short_value(r['median'], r['unit'])} ({spread_text(r)})" for r in rs]
    for i, r in enumerate(rs):
        if r.get("ratio_to_unstalled") is not None:
            labels[i] += f", {r['ratio_to_unstalled']:.2f}x unstalled"
    if single and len(rs) > 1 and rs[1]["median"]:
        ax.axvline(med[1], color="dimgray", linestyle="--", linewidth=1)
        labels[0] += f", {rs[0]['median'] / rs[1]['median']:.2f}x the reference"
    if not log:
        ax.set_xlim(0, max(high) * 1.1 or 1)
    texts = [
        ax.text(hi, y, text, va="center", fontsize=7.5, color=color)
        for y, hi, text, color in zip(
            ys,
            high,
            labels,
            [UNSTABLE_COLOR if r["unstable"] else "black" for r in rs],
            strict=True,
        )
    ]
    # Keep bars as thick as in the other panels, however few they are.
    pad = max(0, 6 - len(rs)) / 2
    ax.set_ylim(len(rs) - 0.5 + pad, -0.5 - pad)
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_title(title, fontsize=10)
    better = better_text(rs[0])
    direction = f"{better} \u2192" if rs[0]["better"] == "higher" else f"\u2190 {better}"
    scale_note = ", log scale" if log else ""
    ax.set_xlabel(f"{_unit_name(unit)}{scale_note}   ({direction})", fontsize=8.5)
    ax.tick_params(axis="x", labelsize=8)
    return lambda: _fit_labels(ax, texts, high, log)  # once the layout is final
