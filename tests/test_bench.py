"""`fanout bench`: interleaved rounds, every figure with its spread, readable output."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fanout.bench import chart, report
from fanout.bench.contenders import CONTENDERS
from fanout.bench.model import UNSTABLE_SPREAD, Measurement, Options, interleave
from fanout.bench.scenarios import SCENARIOS, Suite
from fanout.bench.targets import targets
from fanout.tools.cli import _non_negative_float, build_parser

STEP = re.compile(r"^\[(\d+)/(\d+)\] ETA \d+:\d\d  (.*)$")


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fanout", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _steps(stderr: str) -> list[tuple[int, int, str]]:
    """The ``[i/N] ETA m:ss what`` progress lines, parsed."""
    out = []
    for line in stderr.splitlines():
        m = STEP.match(line)
        if m:
            out.append((int(m[1]), int(m[2]), m[3]))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_reports_every_figure_with_its_spread(tmp_path, no_leaks):
    out, md = tmp_path / "out.json", tmp_path / "table.md"
    args = ["--quick", "--json", str(out), "--markdown", str(md)]
    png = tmp_path / "chart.png"
    args += ["--plot", str(png)]
    proc = _bench(*args)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    installed = {c.name for c in CONTENDERS if c.unavailable() is None}
    assert set(doc["contenders"]) == installed
    assert {"fanout-process", "fanout-thread", "pipe+msgpack", "mp.Queue"} <= installed
    for name in {c.name for c in CONTENDERS} - installed:
        assert doc["skipped"][name]  # listed with the reason
    results = doc["results"]
    default = set(Options().scenarios)  # every scenario but the opt-in "ray" and "kube"
    assert default == set(SCENARIOS) - {"ray", "kube"}
    assert {r["scenario"] for r in results} == default
    for scenario in default - {"recovery", "schema", "arrays", "stalled-arrays"}:
        seen = {r["contender"] for r in results if r["scenario"] == scenario}
        assert seen == installed, scenario
    from fanout.bench import array_contenders, schema, stalled_arrays  # their own contenders

    seen = {r["contender"] for r in results if r["scenario"] == "schema"}
    assert seen == {c.name for c in schema.CONTENDERS}
    seen = {r["contender"] for r in results if r["scenario"] == "arrays"}
    assert seen == {c.name for c in array_contenders.CONTENDERS}
    stalled = [r for r in results if r["scenario"] == "stalled-arrays"]
    assert {r["contender"] for r in stalled} == {"fanout-process"}
    assert {r["params"]["stalled"] for r in stalled} == set(stalled_arrays.STALLED_SETTINGS)
    recovery = [r for r in results if r["scenario"] == "recovery"]
    assert {r["contender"] for r in recovery} == {"fanout-process"}
    assert {r["metric"] for r in recovery} == {"sigkill_to_handled", "cold_start"}
    # Every figure: its rounds, median, min..max, spread and the unstable verdict.
    rounds = doc["options"]["rounds"]
    assert rounds >= 3
    for r in results:
        assert len(r["values"]) == r["rounds"] == rounds, r
        assert r["min"] == min(r["values"]) and r["max"] == max(r["values"])
        assert r["min"] <= r["median"] <= r["max"]
        assert r["spread"] == pytest.approx((r["max"] - r["min"]) / r["median"])
        assert r["unstable"] is (r["spread"] > UNSTABLE_SPREAD)
        assert r["better"] in ("higher", "lower") and r["title"]
        assert r["median"] > 0
    assert doc["unstable_above"] == UNSTABLE_SPREAD and "max - min" in doc["spread"]
    assert len(doc["machine"]["load_average"]) == 3 and doc["machine"]["cpu_count"] >= 1
    assert doc["codec_limits"] and doc["codec_limits"][0]["limit_deliveries_per_s"] > 0
    assert "codec-bound limit" in proc.stdout and "fanout-process" in proc.stdout
    for r in results:  # the text table says which figures are unstable, and only those
        if r["unstable"]:
            assert "UNSTABLE" in proc.stdout
    # Progress: every step numbered [i/N] once, in order, with an ETA.
    steps = _steps(proc.stderr)
    total = steps[0][1]
    assert [(i, n) for i, n, _ in steps] == [(i, total) for i in range(1, total + 1)]
    assert md.read_text().startswith("| figure |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rounds_are_interleaved_across_contenders_with_numbered_progress(tmp_path):
    out = tmp_path / "out.json"
    proc = _bench(
        "--scenario", "throughput", "--contender", "fanout-thread", "--contender",
        "thread+deque", "--payload", "small", "--listeners", "1", "--rounds", "3",
        "--duration", "0.02",
        "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    steps = _steps(proc.stderr)
    # Two calibrations, then round 1 of each contender, round 2 of each, ...
    assert [(i, n) for i, n, _ in steps] == [(i, 8) for i in range(1, 9)]
    whats = [what.split(": ", 1)[1] for _, _, what in steps]
    assert whats == [
        "calibrate fanout-thread",
        "calibrate thread+deque",
        "fanout-thread round 1/3",
        "thread+deque round 1/3",
        "fanout-thread round 2/3",
        "thread+deque round 2/3",
        "fanout-thread round 3/3",
        "thread+deque round 3/3",
    ]
    results = json.loads(out.read_text())["results"]
    assert [len(r["values"]) for r in results] == [3, 3]


def test_interleave_yields_one_round_of_every_contender_at_a_time():
    assert list(interleave(["A", "B", "C"], 2)) == [
        (0, "A"), (0, "B"), (0, "C"), (1, "A"), (1, "B"), (1, "C"),
    ]  # fmt: skip
    assert list(interleave(["A"], 0)) == []


@pytest.mark.parametrize(
    ("values", "spread", "unstable"),
    [
        ([100.0, 110.0, 90.0], 0.2, True),
        ([100.0, 105.0, 98.0], 0.07, False),
        ([100.0, 115.0, 100.0], 0.15, False),  # exactly at the threshold: not over it
        ([100.0], None, None),  # one round: no spread to judge
    ],
)
def test_spread_is_max_minus_min_over_median(values, spread, unstable):
    m = Measurement("throughput", "x", {}, "deliveries", "deliveries/s", values)
    if spread is None:
        assert m.spread is None
    else:
        assert m.spread == pytest.approx(spread)
    assert m.unstable is unstable
    assert m.as_dict()["unstable"] is unstable


def _doc(*measurements: Measurement) -> dict:
    return {
        "machine": {"cpu_count": 2, "python": "3.x", "fanout_native": True,
                    "load_average": [0.1, 0.1, 0.1]},
        "options": {"rounds": 3},
        "results": [m.as_dict() for m in measurements],
        "codec_limits": [],
        "skipped": {},
        "contenders": sorted({m.contender for m in measurements}),
    }  # fmt: skip


def _rate(contender: str, values: list[float]) -> Measurement:
    return Measurement(
        "throughput", contender, {"payload": "small", "listeners": 2}, "deliveries",
        "deliveries/s", values, title="Throughput, small objects to 2 listeners",
    )  # fmt: skip


def _latency(contender: str, values: list[float]) -> Measurement:
    return Measurement(
        "latency", contender, {"rate": 500.0}, "p99", "s", values, better="lower",
        title="Latency at 500/s", label="p99",
    )  # fmt: skip


def test_markdown_table_gives_every_figure_with_its_spread():
    doc = _doc(
        _rate("fanout-process", [100e3, 107e3, 110e3]),
        _rate("pipe+msgpack", [60e3, 122e3, 140e3]),
    )
    text = report.markdown(doc)
    lines = text.splitlines()
    assert lines[0] == "| figure | fanout-process | pipe+msgpack |"
    assert lines[2] == (
        "| Throughput, small objects to 2 listeners [deliveries/s, higher is better] "
        "| 107 k (9%) | 122 k (66%, unstable) |"
    )
    assert "(max - min) / median" in text


def test_markdown_table_has_columns_for_a_scenarios_own_contenders():
    own = Measurement(
        "schema", "fanout-schema", {"payload": "pod"}, "deliveries", "deliveries/s",
        [70e3, 75e3, 80e3], title="Pods to 4 listeners whose handlers read five fields",
    )  # fmt: skip
    doc = _doc(_rate("fanout-process", [100e3, 107e3, 110e3]), own)
    doc["contenders"] = ["fanout-process"]  # the suite's; schema brings its own
    lines = report.markdown(doc).splitlines()
    assert lines[0] == "| figure | fanout-process | fanout-schema |"
    assert lines[3].endswith("|  | 75 k (13%) |")


def test_text_table_marks_unstable_figures():
    doc = _doc(_rate("fanout-process", [100e3, 107e3, 110e3]), _rate("mp.Queue", [1, 5, 9]))
    text = report.table(doc)
    (stable,) = [line for line in text.splitlines() if line.startswith("  fanout-process")]
    (noisy,) = [line for line in text.splitlines() if line.startswith("  mp.Queue")]
    assert "UNSTABLE" not in stable and "9%" in stable
    assert "160% UNSTABLE" in noisy
    assert "1 of 2 figures UNSTABLE" in text


def test_chart_reads_without_the_terminal():
    doc = _doc(
        _rate("fanout-process", [100e3, 107e3, 110e3]),
        _rate("mp.Queue", [30e3, 40e3, 60e3]),
        _latency("fanout-process", [0.0001, 0.00012, 0.00011]),
        _latency("mp.Queue", [0.002, 0.003, 0.0025]),  # 25x fanout's: a log axis
        Measurement("recovery", "fanout-process", {}, "sigkill_to_handled", "s",
                    [0.030, 0.031, 0.029], better="lower", title="Recovery",
                    label="SIGKILL to next handled"),
        Measurement("recovery", "fanout-process", {}, "cold_start", "s",
                    [0.020, 0.021, 0.022], better="lower", title="Recovery",
                    label="cold start (reference)"),
    )  # fmt: skip
    fig = chart.figure(doc)
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == [
        "Throughput, small objects to 2 listeners",
        "Latency at 500/s",
        "Recovery",
    ]
    throughput, latency, recovery = axes
    assert throughput.get_xlabel() == "deliveries per second   (higher is better \u2192)"
    assert latency.get_xlabel() == "milliseconds, log scale   (\u2190 lower is better)"
    assert recovery.get_xlabel() == "milliseconds   (\u2190 lower is better)"
    assert throughput.get_xscale() == "linear" and latency.get_xscale() == "log"
    labels = [t.get_text() for t in throughput.texts]
    assert labels == [" 107 k (9%)", " 40 k (75%, unstable)"]
    assert [bar.get_hatch() for bar in throughput.patches] == [None, "///"]
    # Error bars from min to max: one segment per bar.
    (bars,) = [c for c in throughput.collections if len(c.get_segments()) == 2]
    spans = sorted(sorted(seg[:, 0]) for seg in bars.get_segments())
    assert spans == [[30e3, 60e3], [100e3, 110e3]]
    # The recovery panel is compared with its reference: both bars, a line, a ratio.
    assert [t.get_text() for t in recovery.get_yticklabels()] == [
        "SIGKILL to next handled",
        "cold start (reference)",
    ]
    assert recovery.lines and recovery.texts[0].get_text().endswith("1.43x the reference")
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert "fanout" in legend and any("unstable" in t for t in legend)


def _stalled(contender: str, values: list[float], ratio: float) -> Measurement:
    return Measurement(
        "stalled", contender, {"listeners": 4}, "deliveries", "deliveries/s", values,
        {"ratio_to_unstalled": ratio, "stalled_buffered_bytes": 1_108_401},
        title="Healthy listeners beside one stalled for 1.5 s, 4 listeners",
    )  # fmt: skip


def test_chart_value_labels_end_inside_their_panel():
    # The stalled panel: a log axis (20 k .. 330 k) and the longest labels.
    doc = _doc(
        _stalled("fanout-process", [120e3, 271e3, 300e3], 0.84),
        _stalled("fanout-schema-msgspec", [200e3, 330e3, 540e3], 1.01),
        _stalled("pipe+msgpack", [19e3, 20e3, 20.5e3], 0.11),
        _stalled("mp.Queue", [30e3, 70e3, 90e3], 1.54),
        _rate("fanout-process", [100e3, 107e3, 110e3]),
        _rate("mp.Queue", [30e3, 40e3, 60e3]),
    )
    fig = chart.figure(doc)
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.axison]
    assert "log" in {ax.get_xscale() for ax in axes}
    for ax in axes:
        right = ax.get_window_extent(renderer).x1
        for text in ax.texts:
            assert text.get_window_extent(renderer).x1 <= right, (ax.get_title(), text)


def test_text_table_names_each_rows_baseline_and_aligns_long_names():
    growth = {"producer_rss_growth_bytes": -3.0}  # the peak came before the round
    doc = _doc(
        _rate("fanout-process", [100e3, 107e3, 110e3]),
        _rate("pipe+msgpack", [50e3, 53.5e3, 55e3]),
        Measurement("throughput", "fanout-schema-msgspec", {"payload": "small", "listeners": 2},
                    "deliveries", "deliveries/s", [200e3, 214e3, 220e3], growth,
                    title="Throughput, small objects to 2 listeners"),
    )  # fmt: skip
    text = report.table(doc)
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert rows["fanout-process"].rstrip().endswith("(baseline)")
    assert "= 0.50x fanout-process" in rows["pipe+msgpack"]
    assert "= 2.00x fanout-process" in rows["fanout-schema-msgspec"]
    assert "producer RSS grew < 1 MiB" in rows["fanout-schema-msgspec"]
    assert "+-" not in text
    # The medians end in one column, however long the contender's name.
    assert len({re.match(r"  \S+ +\S+", line).end() for line in rows.values()}) == 1


def test_the_readme_states_a_full_runs_step_count():
    suite = Suite(Options(), lambda text: None)
    suite.contenders = list(CONTENDERS)  # as with the bench extra: every one installed
    try:
        steps = sum(1 for case in suite.plan() for _ in suite._steps(case))
    finally:
        shutil.rmtree(suite.tmp, ignore_errors=True)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"a full run is {steps} steps" in " ".join(readme.split())


def test_busy_machine_is_named():
    assert report.busy_warning(load1=0.4, cores=2) is None
    warning = report.busy_warning(load1=3.5, cores=2)
    assert warning is not None and "load average 3.5 on 2 cores" in warning


def test_help_lists_names_and_shows_no_markup():
    top = subprocess.run(
        [sys.executable, "-m", "fanout", "--help"], capture_output=True, text=True, timeout=60
    )
    bench = _bench("--help", timeout=60)
    assert top.returncode == bench.returncode == 0
    for text in (top.stdout, bench.stdout):
        assert "``" not in text and "::" not in text
    for c in CONTENDERS:
        assert re.search(rf"^  {re.escape(c.name)}  ", bench.stdout, re.M), c.name
    for name in SCENARIOS:
        assert re.search(rf"^  {name}  ", bench.stdout, re.M), name


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0.0), ("0.00", 0.0), ("0e0", 0.0), ("2.5", 2.5)]
)
def test_work_us_accepts_zero_however_written(text, value):
    assert _non_negative_float(text) == value
    assert build_parser().parse_args(["bench", "--work-us", text]).work_us == value


@pytest.mark.parametrize(("text", "message"), [("-1", "must be >= 0"), ("nan", "finite")])
def test_work_us_refuses_negative_and_nan(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        _non_negative_float(text)


def test_user_payload_file_and_one_scenario(tmp_path):
    payload = tmp_path / "thing.json"
    payload.write_text(json.dumps({"metadata": {"name": "thing"}, "spec": {"n": 1}}))
    out = tmp_path / "out.json"
    proc = _bench(
        "--scenario", "throughput", "--contender", "fanout-thread", "--payload", str(payload),
        "--listeners", "1", "--rounds", "1", "--duration", "0.05", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert result["params"] == {"payload": "thing", "listeners": 1}
    assert result["median"] > 0
    # One round cannot tell stable from unstable, and says so.
    assert result["spread"] is None and result["unstable"] is None
    assert "1 round" in proc.stdout


def test_saved_run_is_shown_again_without_measuring(tmp_path):
    saved = tmp_path / "run.json"
    report.to_json(_doc(_rate("fanout-process", [100e3, 107e3, 110e3])), str(saved))
    proc = _bench("--from-json", str(saved), "--markdown", "-", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "| 107 k (9%) |" in proc.stdout
    assert "[1/" not in proc.stderr  # nothing ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--payload", "/nonexistent.json"], "payload must be 'small', 'pod' or a JSON file"),
        (["--listeners", "0"], "every value must be >= 1"),
        (["--listeners", "two"], "expected comma-separated integers"),
        (["--duration", "-1"], "must be > 0"),
        (["--rounds", "0"], "must be >= 1"),
        (["--work-us", "-0.5"], "must be >= 0"),
        (["--contender", "carrier-pigeon"], "invalid choice: 'carrier-pigeon'"),
        (["--scenario", "everything"], "invalid choice"),
        (["--from-json", "/nonexistent.json"], "cannot read bench results"),
    ],
)
def test_bad_options_are_named(args, message):
    proc = _bench(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_targets_are_ratios_of_figures_from_the_same_run():
    def small(contender: str, median: float) -> Measurement:
        return Measurement(
            "throughput", contender, {"payload": "small", "listeners": 4}, "deliveries",
            "deliveries/s", [median] * 3, title="Throughput, small objects to 4 listeners",
        )  # fmt: skip

    doc = _doc(
        small("fanout-process", 600e3),
        small("pipe+msgpack", 300e3),
        small("pipe+msgspec", 600e3),
    )
    doc["codec_limits"] = [
        {"payload": "small", "listeners": 4, "codec": "msgspec", "encode_s": 1e-6,
         "decode_s": 1e-6, "cores": 2, "limit_deliveries_per_s": 1_000_000.0},
    ]  # fmt: skip
    doc["instructions"] = {"distribute": {"small L=1": 15_000.0}}
    rows = {t["what"]: t for t in targets(doc)}
    vs_pipe = rows["small to 4 listeners, fanout-process vs pipe+msgpack"]
    assert (vs_pipe["value"], vs_pipe["met"], vs_pipe["shown"]) == (2.0, True, "2.00x")
    vs_best = rows["small to 4 listeners, fanout-process vs pipe+msgspec"]
    assert (vs_best["value"], vs_best["met"]) == (1.0, False)
    share = rows["small to 4 listeners, share of the codec-bound limit"]
    assert (share["value"], share["met"], share["shown"]) == (0.6, False, "60%")
    pods = rows["Pods to 4 listeners, fanout-process vs pipe+msgpack"]
    assert pods["value"] is None and pods["verdict"] == "not measured in this run"
    instr = rows["instructions per small distribute, 1 listener"]
    assert instr["met"] is True and instr["shown"] == "15,000"
    text = report.table(doc)
    assert "Targets (ratios of figures from this one run):" in text
    assert "NOT MET" in text and "not measured in this run" in text
    assert "judge the targets" not in text  # no duration given: nothing to say
    assert not [t for t in targets(_doc()) if t["value"] is not None]
    doc["options"]["duration"] = 0.05  # as --quick runs it
    assert "rounds of 0.05 s, as --quick runs them" in report.table(doc)
    doc["options"]["duration"] = 0.5
    assert "judge the targets" not in report.table(doc)
