"""Print, save and plot what a ``fanout bench`` run measured."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections import defaultdict
from importlib import metadata
from typing import Any

from fanout.bench.scenarios import Measurement, Suite

__all__ = ["machine", "plot", "table", "to_json"]

REFERENCE = "fanout-process"
PACKAGES = ("fanout", "msgpack", "numpy", "msgspec", "pyzmq", "faster-fifo", "Cython")


def machine() -> dict[str, Any]:
    """CPU count, Python, platform and the versions of the packages involved."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import fanout

    return {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "fanout_native": fanout.NATIVE,
        "packages": versions,
    }


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:,.3f} ms" if value < 1 else f"{value:,.2f} s"
    return f"{value:,.0f} {unit}"


def _ratio(m: Measurement, ref: Measurement | None) -> str:
    if ref is None or ref is m or not ref.median or not m.median:
        return ""
    if m.unit == "s":  # lower is better: how many times fanout's time it took
        return f"{m.median / ref.median:.2f}x fanout's"
    return f"fanout = {ref.median / m.median:.2f}x"


def table(suite: Suite) -> str:
    """A text table: every measurement with its spread and its ratio to fanout."""
    groups: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
    for m in suite.measurements:
        key = (m.scenario, " ".join(f"{k}={v}" for k, v in m.params.items()))
        groups[key].append(m)
    lines = []
    for (scenario, params), ms in groups.items():
        lines.append(f"\n{scenario}  {params}")
        ref = next((m for m in ms if m.contender == REFERENCE), None)
        for m in ms:
            spread = ""
            if len(m.values) > 1:
                spread = f"[{_fmt(min(m.values), m.unit)} .. {_fmt(max(m.values), m.unit)}]"
            note = ""
            if "ratio_to_unstalled" in m.extra:
                note = f"  {m.extra['ratio_to_unstalled']:.2f}x of unstalled"
            if m.extra.get("stalled_buffered_bytes") is not None:
                note += f", stalled one holds {m.extra['stalled_buffered_bytes']:,} B"
            lines.append(
                f"  {m.contender:<16}{_fmt(m.median, m.unit):>22}  {spread:<46} "
                f"{_ratio(m, ref)}{note}"
            )
    for lim in suite.codec_limits:
        fan = next(
            (
                m
                for m in suite.measurements
                if m.scenario == "throughput"
                and m.contender == REFERENCE
                and m.params == {"payload": lim["payload"], "listeners": lim["listeners"]}
            ),
            None,
        )
        limit = lim["limit_deliveries_per_s"]
        share = f", fanout at {100 * fan.median / limit:.0f}%" if fan else ""
        lines.append(
            f"\ncodec-bound limit {lim['payload']} L={lim['listeners']}: "
            f"{lim['cores']} cores / (encode {lim['encode_s'] * 1e6:.2f} us + "
            f"{lim['listeners']} x decode {lim['decode_s'] * 1e6:.2f} us) = "
            f"{lim['limit_deliveries_per_s']:,.0f} deliveries/s{share}"
        )
    for name, reason in suite.skipped.items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines).lstrip("\n")


def to_json(suite: Suite, path: str, options: dict[str, Any]) -> None:
    """Write every raw figure, the options and the machine description."""
    doc = {
        "machine": machine(),
        "options": options,
        "results": [m.as_dict() for m in suite.measurements],
        "codec_limits": suite.codec_limits,
        "skipped": suite.skipped,
        "contenders": [c.name for c in suite.contenders],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def plot(suite: Suite, path: str) -> None:
    """Write a PNG with one bar chart per scenario and parameter set."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "fanout bench --plot needs matplotlib: pip install matplotlib "
            "(or pip install 'fanout[plot]')"
        ) from None
    groups: dict[str, list[Measurement]] = defaultdict(list)
    for m in suite.measurements:
        groups[f"{m.scenario} " + " ".join(f"{k}={v}" for k, v in m.params.items())].append(m)
    n = len(groups)
    cols = 2
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), squeeze=False)
    for ax, (title, ms) in zip(axes.flat, groups.items(), strict=False):
        names = [m.contender for m in ms]
        values = [m.median * (1e3 if m.unit == "s" else 1) for m in ms]
        colors = ["tab:blue" if n.startswith("fanout") else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("ms" if ms[0].unit == "s" else ms[0].unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.invert_yaxis()
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
