"""Print, save and plot what a ``fanout bench`` run measured.

Everything here works from the run's JSON document (:func:`document`), so a
saved run can be shown again, as a text table, a markdown table for the README
or a chart, without measuring anything.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections import defaultdict
from collections.abc import Callable
from importlib import metadata
from typing import Any

from fanout._version import DISTRIBUTION
from fanout.bench.model import CODEC_CONTENDERS, UNSTABLE_SPREAD, Bench

__all__ = [
    "busy_warning",
    "document",
    "figure",
    "load",
    "machine",
    "markdown",
    "plot",
    "table",
    "to_json",
]

REFERENCE = "fanout-process"
# Instructions per small distribute to 1 listener before the fast-path work
# (msgpack codec, main 28eacde): the count to stay below.
INSTRUCTIONS_BEFORE = 21_734
PACKAGES = (DISTRIBUTION, "msgpack", "numpy", "msgspec", "pyzmq", "faster-fifo", "Cython")
SPREAD_DEFINITION = "(max - min) / median of the rounds"
LATENCY_NOTE = (
    "latency figures are histogram buckets, 4 per octave (neighbours 14-25% apart), "
    "so a one-bucket move already reads as a spread over 15%"
)
BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average per core above which we warn


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    """CPU count, load, Python, platform and the versions of the packages involved."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import fanout

    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": _cores(),
        "load_average": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "fanout_native": fanout.NATIVE,
        "packages": versions,
    }


def busy_warning(load1: float | None = None, cores: int | None = None) -> str | None:
    """A warning when the 1-minute load average says other work shares the CPUs.

    Args:
        load1: The 1-minute load average; ``os.getloadavg()[0]`` when None.
        cores: The CPUs this process may use; its affinity mask when None.

    Returns:
        The warning text, or None when the machine looks quiet enough to measure.
    """
    load1 = os.getloadavg()[0] if load1 is None else load1
    cores = _cores() if cores is None else cores
    if load1 <= BUSY_LOAD_PER_CORE * cores:
        return None
    return (
        f"warning: this machine is busy (1-minute load average {load1:.1f} on {cores} "
        f"cores): other work will move the figures; expect some marked unstable, and "
        f"rerun on a quiet machine before comparing"
    )


def document(suite: Bench, options: dict[str, Any], start: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of a run: every round of every figure, and the machine.

    Args:
        suite: The suite that ran.
        options: The options it ran with (``dataclasses.asdict(opts)``).
        start: :func:`machine` as it was when the run started.

    Returns:
        A JSON-ready dict; ``results`` holds one entry per figure with its
        ``values`` (one per round), ``median``, ``min``, ``max``, ``spread`` and
        ``unstable``.
    """
    return {
        "machine": start,
        "load_average_at_end": list(os.getloadavg()),
        "options": options,
        "spread": SPREAD_DEFINITION,
        "unstable_above": UNSTABLE_SPREAD,
        "results": [m.as_dict() for m in suite.measurements],
        "codec_limits": suite.codec_limits,
        "skipped": suite.skipped,
        "contenders": [c.name for c in suite.contenders],
    }


def with_targets(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with its ``targets`` (see :func:`targets`) filled in."""
    doc["targets"] = targets(doc)
    return doc


def to_json(doc: dict[str, Any], path: str) -> None:
    """Write a run's document (see :func:`document`) to ``path``."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def load(path: str) -> dict[str, Any]:
    """Read a document written by ``fanout bench --json``.

    Raises:
        ValueError: The file is not such a document.
    """
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read bench results from {path}: {exc}") from None
    if not isinstance(doc, dict) or "results" not in doc or "contenders" not in doc:
        raise ValueError(f"{path} is not the output of fanout bench --json")
    return dict(doc)


# -- formatting ---------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    """Full precision, for the text table."""
    if unit == "GB/s":
        return f"{value:,.3f}"
    if unit == "s":
        return f"{value * 1e3:,.3f} ms" if value < 1 else f"{value:,.2f} s"
    return f"{value:,.0f}"


def _short(value: float, unit: str) -> str:
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


def _spread(r: dict[str, Any]) -> str:
    """``8%`` or ``31%, unstable``, or ``1 round`` when there is no spread."""
    if r["spread"] is None:
        return "1 round"
    text = f"{r['spread']:.0%}" if math.isfinite(r["spread"]) else "inf"
    return f"{text}, unstable" if r["unstable"] else text


def _better(r: dict[str, Any]) -> str:
    return f"{r['better']} is better"


def _unit_name(unit: str) -> str:
    return {
        "s": "milliseconds",
        "deliveries/s": "deliveries per second",
        "GB/s": "GB per second (payload x listeners)",
    }.get(unit, unit)


def _ratio(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """This row against the row's baseline, which it names: ``= 1.69x fanout-process``.

    The same way round for every row and unit (this figure over the baseline's), so
    a fanout variant compared with fanout-process reads as plainly as a contender.
    """
    if ref is None or not ref["median"] or not r["median"]:
        return ""
    if ref is r:
        return "(baseline)"
    return f"= {r['median'] / ref['median']:.2f}x {ref['contender']}"


def _rows(doc: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Figures grouped by (title, metric), in run order: one table row each."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in doc["results"]:
        rows[(r.get("title") or r["scenario"], r["metric"])].append(r)
    return rows


def _row_name(doc: dict[str, Any], title: str, r: dict[str, Any]) -> str:
    metrics = {x["metric"] for x in doc["results"] if (x.get("title") or x["scenario"]) == title}
    return f"{title}: {r['label']}" if len(metrics) > 1 and r.get("label") else title


def _note(r: dict[str, Any]) -> str:
    note = ""
    if r.get("ratio_to_unstalled") is not None:
        note = f"  {r['ratio_to_unstalled']:.2f}x of unstalled"
    if r.get("stalled_buffered_bytes") is not None:
        note += f", stalled one holds {r['stalled_buffered_bytes']:,.0f} B"
    if r.get("producer_rss_growth_bytes") is not None:
        mib = r["producer_rss_growth_bytes"] / 2**20  # below 0 when the peak came first
        note += (
            f"  producer RSS grew {mib:,.0f} MiB at peak"
            if mib >= 0.5
            else "  producer RSS grew < 1 MiB"
        )
    return note


def _find(doc: dict[str, Any], scenario: str, contender: str, **params: Any) -> Any:
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


def _target_row(what: str, value: float | None, target: float, unit: str) -> dict[str, Any]:
    """One target: what it compares, the value this run gives, and whether it is met."""
    if unit == "%":
        shown = "-" if value is None else f"{100 * value:.0f}%"
        wanted = f">= {100 * target:.0f}%"
    elif unit == "instr":
        shown = "-" if value is None else f"{value:,.0f}"
        wanted = f"< {target:,.0f}"
    else:
        shown = "-" if value is None else f"{value:.2f}x"
        wanted = f">= {target:g}x"
    if value is None:
        verdict = "not measured in this run"
    elif unit == "instr":
        verdict = "met" if value < target else "NOT MET"
    else:
        verdict = "met" if value >= target else "NOT MET"
    return {
        "what": what,
        "value": value,
        "shown": shown,
        "target": wanted,
        "met": None if value is None else verdict == "met",
        "verdict": verdict,
    }


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance targets fanout holds itself to, from one run's figures.

    Each compares figures measured in the same run (interleaved rounds), so the
    machine's speed cancels out; a row whose figures the run did not measure
    says so. Rows appear only for the scenarios the run had.
    """

    def ratio(a: Any, b: Any) -> float | None:
        return a["median"] / b["median"] if a and b and b["median"] else None

    rows: list[dict[str, Any]] = []
    scenarios = {r["scenario"] for r in doc["results"]}
    if "throughput" in scenarios:
        counts = [
            r["params"]["listeners"] for r in doc["results"] if r["scenario"] == "throughput"
        ]
        L = max(counts)
        for payload, title, vs_pipe, vs_best in (
            ("small", "small", 1.5, 1.1),
            ("pod", "Pods", 1.8, 1.3),
        ):
            fan = _find(doc, "throughput", REFERENCE, payload=payload, listeners=L)
            for contender, target in (("pipe+msgpack", vs_pipe), ("pipe+msgspec", vs_best)):
                other = _find(doc, "throughput", contender, payload=payload, listeners=L)
                rows.append(
                    _target_row(
                        f"{title} to {L} listeners, {REFERENCE} vs {contender}",
                        ratio(fan, other),
                        target,
                        "x",
                    )
                )
        lim = next(
            (
                x
                for x in doc["codec_limits"]
                if x.get("codec") == "msgspec" and x["payload"] == "small" and x["listeners"] == L
            ),
            None,
        )
        fan = _find(doc, "throughput", REFERENCE, payload="small", listeners=L)
        share = fan["median"] / lim["limit_deliveries_per_s"] if fan and lim else None
        rows.append(
            _target_row(f"small to {L} listeners, share of the codec-bound limit", share, 0.7, "%")
        )
    if "schema" in scenarios:
        schema = _find(doc, "schema", "fanout-schema")
        for contender, target in (("pipe+msgpack", 4.5), (REFERENCE, 2.2)):
            rows.append(
                _target_row(
                    f"Pods reading five fields, fanout-schema vs {contender}",
                    ratio(schema, _find(doc, "schema", contender)),
                    target,
                    "x",
                )
            )
    if "ray" in scenarios:
        ray = _find(doc, "ray", "fanout-ray", payload="small")
        for contender, target in (("ray-call", 60.0), ("ray-batch", 0.6)):
            rows.append(
                _target_row(
                    f"small to Ray actors, fanout-ray vs {contender}",
                    ratio(ray, _find(doc, "ray", contender, payload="small")),
                    target,
                    "%" if target < 1 else "x",
                )
            )
    instr = doc.get("instructions", {})
    if isinstance(instr, dict) and "distribute" in instr:
        rows.append(
            _target_row(
                "instructions per small distribute, 1 listener",
                instr["distribute"].get("small L=1"),
                INSTRUCTIONS_BEFORE,
                "instr",
            )
        )
    return rows


def table(doc: dict[str, Any]) -> str:
    """A text table: every figure's median, min..max, spread and ratio to fanout."""
    rounds = doc["options"].get("rounds")
    lines = [
        f"Median of {rounds} rounds per figure; spread = {SPREAD_DEFINITION}; "
        f"UNSTABLE = spread over {UNSTABLE_SPREAD:.0%}: do not compare such a figure."
    ]
    width = max((len(r["contender"]) for r in doc["results"]), default=0) + 2
    for (title, _), rs in _rows(doc).items():
        first = rs[0]
        unit = "ms" if first["unit"] == "s" else first["unit"]
        lines.append(f"\n{_row_name(doc, title, first)}  [{unit}, {_better(first)}]")
        ref = next((r for r in rs if r["contender"] == REFERENCE), None)
        for r in rs:
            span = f"{_fmt(r['min'], r['unit'])} .. {_fmt(r['max'], r['unit'])}"
            spread = _spread(r).replace(", unstable", " UNSTABLE")
            lines.append(
                f"  {r['contender']:<{width}}{_fmt(r['median'], r['unit']):>14}  {span:>32}  "
                f"{spread:<16}{_ratio(r, ref)}{_note(r)}"
            )
    for lim in doc["codec_limits"]:
        contender = CODEC_CONTENDERS.get(lim.get("codec", "msgpack"), REFERENCE)
        fan = _find(
            doc, "throughput", contender, payload=lim["payload"], listeners=lim["listeners"]
        )
        limit = lim["limit_deliveries_per_s"]
        share = f", {contender} at {100 * fan['median'] / limit:.0f}%" if fan else ""
        codec = f" codec={lim['codec']}" if "codec" in lim else ""
        lines.append(
            f"\ncodec-bound limit {lim['payload']} L={lim['listeners']}{codec}: "
            f"{lim['cores']} cores / (encode {lim['encode_s'] * 1e6:.2f} us + "
            f"{lim['listeners']} x decode {lim['decode_s'] * 1e6:.2f} us) = "
            f"{limit:,.0f} deliveries/s{share}"
        )
    rows = targets(doc)
    if rows:
        lines.append("\nTargets (ratios of figures from this one run):")
        for t in rows:
            lines.append(
                f"- {t['what']:<60} {t['shown']:>8}  target {t['target']:<10} {t['verdict']}"
            )
    for name, reason in doc["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    unstable = sum(1 for r in doc["results"] if r["unstable"])
    if unstable:
        lines.append(f"\n{unstable} of {len(doc['results'])} figures UNSTABLE")
    if any(r["scenario"] == "latency" for r in doc["results"]):
        lines.append(f"Note: {LATENCY_NOTE}.")
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    """The README's performance table: one row per figure, one column per contender.

    Each cell is the median and, in brackets, the spread of the rounds, with
    ``unstable`` added when the spread is over the threshold.
    """
    # The suite's contenders, then those a scenario brought itself (schema=, Ray).
    contenders = list(doc["contenders"])
    for r in doc["results"]:
        if r["contender"] not in contenders:
            contenders.append(r["contender"])
    head = "| figure | " + " | ".join(contenders) + " |"
    lines = [head, "|---" * (len(contenders) + 1) + "|"]
    for (title, _), rs in _rows(doc).items():
        first = rs[0]
        by = {r["contender"]: r for r in rs}
        cells = []
        for c in contenders:
            r = by.get(c)
            if r is None:
                cells.append("")
                continue
            cell = f"{_short(r['median'], r['unit'])} ({_spread(r)})"
            if r.get("ratio_to_unstalled") is not None:
                cell += f" {r['ratio_to_unstalled']:.2f}x"
            cells.append(cell)
        unit = "ms" if first["unit"] == "s" else first["unit"]
        name = f"{_row_name(doc, title, first)} [{unit}, {first['better']} is better]"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rounds = doc["options"].get("rounds")
    note = (
        f"\nMedian of {rounds} rounds, interleaved across contenders; in brackets the "
        f'spread, {SPREAD_DEFINITION}; "unstable" marks a spread over '
        f"{UNSTABLE_SPREAD:.0%}, a figure not to compare."
    )
    scenarios = {r["scenario"] for r in doc["results"]}
    if "stalled" in scenarios:
        note += (
            " In the stalled row, Nx is a healthy listener's rate against one with no "
            "stalled sibling (throughput row)."
        )
    if "latency" in scenarios:
        note += f" The {LATENCY_NOTE}."
    lines.append(note + " k = thousand, M = million.")
    return "\n".join(lines)


# -- the chart ----------------------------------------------------------------------------

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
        for (t, _), row in _rows(doc).items():
            if t == title:
                panels.append((_row_name(doc, title, row[0]), row))
    return panels


def plot(doc: dict[str, Any], path: str) -> None:
    """Write :func:`figure` of a run's document to ``path`` as a PNG.

    Raises:
        SystemExit: matplotlib is not installed.
    """
    figure(doc).savefig(path, dpi=110)


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
    labels = [f" {_short(r['median'], r['unit'])} ({_spread(r)})" for r in rs]
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
    better = _better(rs[0])
    direction = f"{better} \u2192" if rs[0]["better"] == "higher" else f"\u2190 {better}"
    scale_note = ", log scale" if log else ""
    ax.set_xlabel(f"{_unit_name(unit)}{scale_note}   ({direction})", fontsize=8.5)
    ax.tick_params(axis="x", labelsize=8)
    return lambda: _fit_labels(ax, texts, high, log)  # once the layout is final
