"""Print, save and plot what a ``fanout bench`` run measured.

Everything here works from the run's JSON document (:func:`document`), so a
saved run can be shown again, as a text table, a markdown table for the README
or a chart (drawn by ``fanout.bench.chart``), without measuring anything.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

from fanout._version import DISTRIBUTION
from fanout.bench import chart
from fanout.bench.formatting import (
    LATENCY_NOTE,
    REFERENCE,
    SPREAD_DEFINITION,
    better_text,
    find_figure,
    row_name,
    short_value,
    spread_text,
    table_rows,
)
from fanout.bench.model import CODEC_CONTENDERS, UNSTABLE_SPREAD, Bench, Options
from fanout.bench.targets import targets

__all__ = [
    "busy_warning",
    "document",
    "load",
    "machine",
    "markdown",
    "plot",
    "table",
    "to_json",
    "with_targets",
]

PACKAGES = (DISTRIBUTION, "msgpack", "numpy", "msgspec", "pyzmq", "faster-fifo", "Cython")
BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average per core above which we warn
TARGET_ROUND_S = Options.duration  # shorter rounds than the default (--quick) cannot judge


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


def plot(doc: dict[str, Any], path: str) -> None:
    """Write :func:`fanout.bench.chart.figure` of a run's document to ``path`` as a PNG.

    Raises:
        SystemExit: matplotlib is not installed.
    """
    chart.figure(doc).savefig(path, dpi=110)


# -- the tables ---------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    """Full precision, for the text table."""
    if unit == "GB/s":
        return f"{value:,.3f}"
    if unit == "s":
        return f"{value * 1e3:,.3f} ms" if value < 1 else f"{value:,.2f} s"
    return f"{value:,.0f}"


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


def table(doc: dict[str, Any]) -> str:
    """A text table: every figure's median, min..max, spread and ratio to fanout."""
    rounds = doc["options"].get("rounds")
    lines = [
        f"Median of {rounds} rounds per figure; spread = {SPREAD_DEFINITION}; "
        f"UNSTABLE = spread over {UNSTABLE_SPREAD:.0%}: do not compare such a figure."
    ]
    width = max((len(r["contender"]) for r in doc["results"]), default=0) + 2
    for (title, _), rs in table_rows(doc).items():
        first = rs[0]
        unit = "ms" if first["unit"] == "s" else first["unit"]
        lines.append(f"\n{row_name(doc, title, first)}  [{unit}, {better_text(first)}]")
        ref = next((r for r in rs if r["contender"] == REFERENCE), None)
        for r in rs:
            span = f"{_fmt(r['min'], r['unit'])} .. {_fmt(r['max'], r['unit'])}"
            spread = spread_text(r).replace(", unstable", " UNSTABLE")
            lines.append(
                f"  {r['contender']:<{width}}{_fmt(r['median'], r['unit']):>14}  {span:>32}  "
                f"{spread:<16}{_ratio(r, ref)}{_note(r)}"
            )
    for lim in doc["codec_limits"]:
        contender = CODEC_CONTENDERS.get(lim.get("codec", "msgpack"), REFERENCE)
        fan = find_figure(
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
        duration = doc["options"].get("duration")
        if duration is not None and duration < TARGET_ROUND_S:
            lines.append(
                f"  (rounds of {duration:g} s, as --quick runs them, time mostly starting and "
                f"stopping: judge the targets from rounds of {TARGET_ROUND_S:g} s or more, "
                f"the default)"
            )
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
    for (title, _), rs in table_rows(doc).items():
        first = rs[0]
        by = {r["contender"]: r for r in rs}
        cells = []
        for c in contenders:
            r = by.get(c)
            if r is None:
                cells.append("")
                continue
            cell = f"{short_value(r['median'], r['unit'])} ({spread_text(r)})"
            if r.get("ratio_to_unstalled") is not None:
                cell += f" {r['ratio_to_unstalled']:.2f}x"
            cells.append(cell)
        unit = "ms" if first["unit"] == "s" else first["unit"]
        name = f"{row_name(doc, title, first)} [{unit}, {first['better']} is better]"
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
