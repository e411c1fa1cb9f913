"""The performance targets fanout holds itself to, checked against one bench run's figures.

Each target compares figures measured in the same run (interleaved rounds), so
the machine's speed cancels out.
"""

from __future__ import annotations

from typing import Any

from fanout.bench.formatting import REFERENCE, find_figure

__all__ = ["INSTRUCTIONS_BEFORE", "targets"]

# Instructions per small distribute to 1 listener before the fast-path work
# (msgpack codec, main 28eacde): the count to stay below.
INSTRUCTIONS_BEFORE = 21_734


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


def _ratio(a: Any, b: Any) -> float | None:
    """``a``'s median over ``b``'s, when both were measured."""
    return a["median"] / b["median"] if a and b and b["median"] else None


def _throughput_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """fanout against the pipes at the most listeners, and its share of the codec limit."""
    rows: list[dict[str, Any]] = []
    counts = [r["params"]["listeners"] for r in doc["results"] if r["scenario"] == "throughput"]
    L = max(counts)
    for payload, title, vs_pipe, vs_best in (
        ("small", "small", 1.5, 1.1),
        ("pod", "Pods", 1.8, 1.3),
    ):
        fan = find_figure(doc, "throughput", REFERENCE, payload=payload, listeners=L)
        for contender, target in (("pipe+msgpack", vs_pipe), ("pipe+msgspec", vs_best)):
            other = find_figure(doc, "throughput", contender, payload=payload, listeners=L)
            rows.append(
                _target_row(
                    f"{title} to {L} listeners, {REFERENCE} vs {contender}",
                    _ratio(fan, other),
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
    fan = find_figure(doc, "throughput", REFERENCE, payload="small", listeners=L)
    share = fan["median"] / lim["limit_deliveries_per_s"] if fan and lim else None
    rows.append(
        _target_row(f"small to {L} listeners, share of the codec-bound limit", share, 0.7, "%")
    )
    return rows


def _schema_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """fanout with ``schema=`` against the pipe and against fanout without it."""
    schema = find_figure(doc, "schema", "fanout-schema")
    return [
        _target_row(
            f"Pods reading five fields, fanout-schema vs {contender}",
            _ratio(schema, find_figure(doc, "schema", contender)),
            target,
            "x",
        )
        for contender, target in (("pipe+msgpack", 4.5), (REFERENCE, 2.2))
    ]


def _ray_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """fanout's Ray lane against Ray called per object and batched by hand."""
    ray = find_figure(doc, "ray", "fanout-ray", payload="small")
    return [
        _target_row(
            f"small to Ray actors, fanout-ray vs {contender}",
            _ratio(ray, find_figure(doc, "ray", contender, payload="small")),
            target,
            "%" if target < 1 else "x",
        )
        for contender, target in (("ray-call", 60.0), ("ray-batch", 0.6))
    ]


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance targets fanout holds itself to, from one run's figures.

    Each compares figures measured in the same run (interleaved rounds), so the
    machine's speed cancels out; a row whose figures the run did not measure
    says so. Rows appear only for the scenarios the run had.
    """
    rows: list[dict[str, Any]] = []
    scenarios = {r["scenario"] for r in doc["results"]}
    if "throughput" in scenarios:
        rows += _throughput_targets(doc)
    if "schema" in scenarios:
        rows += _schema_targets(doc)
    if "ray" in scenarios:
        rows += _ray_targets(doc)
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
