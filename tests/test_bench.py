"""`fanout bench`: the quick run works and reports every installed contender."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fanout.bench.contenders import CONTENDERS

SCENARIOS = {"throughput", "cpu", "latency", "stalled", "recovery"}


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fanout", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_reports_every_installed_contender_and_scenario(tmp_path, no_leaks):
    out = tmp_path / "out.json"
    proc = _bench("--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    installed = {c.name for c in CONTENDERS if c.unavailable() is None}
    assert set(doc["contenders"]) == installed
    assert {"fanout-process", "fanout-thread", "pipe+msgpack", "mp.Queue"} <= installed
    for name in {c.name for c in CONTENDERS} - installed:
        assert doc["skipped"][name]  # listed with the reason
    results = doc["results"]
    assert {r["scenario"] for r in results} == SCENARIOS
    for scenario in SCENARIOS - {"recovery"}:
        seen = {r["contender"] for r in results if r["scenario"] == scenario}
        assert seen == installed, scenario
    assert [r["contender"] for r in results if r["scenario"] == "recovery"] == ["fanout-process"]
    assert all(r["median"] > 0 and min(r["values"]) > 0 for r in results)
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["python"]
    assert doc["codec_limits"] and doc["codec_limits"][0]["limit_deliveries_per_s"] > 0
    assert "codec-bound limit" in proc.stdout and "fanout-process" in proc.stdout


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--payload", "/nonexistent.json"], "payload must be 'small', 'pod' or a JSON file"),
        (["--listeners", "0"], "every value must be >= 1"),
        (["--listeners", "two"], "expected comma-separated integers"),
        (["--duration", "-1"], "must be > 0"),
        (["--contender", "carrier-pigeon"], "unknown contender(s): carrier-pigeon"),
        (["--scenario", "everything"], "invalid choice"),
    ],
)
def test_bad_options_are_named(args, message):
    proc = _bench(*args, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
