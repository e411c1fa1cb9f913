"""benchmarks/instructions.py: instruction counts under callgrind are real and repeatable.

The counts are the project's noise-free measure of its hot paths, so the tool
itself is tested: with valgrind installed, two runs on a few iterations must give
positive figures for every case that agree with each other; without it, the tool
says so instead of making a figure up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fanout.bench import instructions

ROOT = Path(__file__).resolve().parents[1]
NO_VALGRIND = instructions.available()
CASES = {
    "distribute": {"small L=1", "small L=4", "small L=1 msgpack"},
    "frame": {"small py"}
    | (
        {"small native", "small native msgpack"}
        if instructions._native_worker()
        else {"small py msgpack"}
    ),
    "codec": {"small encode", "small decode"},
}


@pytest.mark.skipif(
    NO_VALGRIND is not None, reason=f"{NO_VALGRIND} (CI: apt-get install -y valgrind)"
)
@pytest.mark.timeout(600)
def test_counts_are_positive_and_repeatable() -> None:
    first, second = (instructions.measure(40, ("small",)) for _ in range(2))
    for what, cases in CASES.items():
        assert set(first[what]) == cases, first
        for case in cases:
            a, b = first[what][case], second[what][case]
            assert a > 100, (what, case, a)  # no loop does its work in 100 instructions
            assert abs(a - b) <= 0.01 * a, (what, case, a, b)
    # One more listener costs a ring append, never less than nothing.
    assert first["distribute"]["small L=4"] > first["distribute"]["small L=1"]
    # The codec's part of a notification's instructions, from the counts above.
    codec, frame = first["codec"], first["frame"]
    worker = frame.get("small native", frame["small py"])
    for L in (1, 4):
        whole = first["distribute"][f"small L={L}"] + L * worker
        share = (codec["small encode"] + L * codec["small decode"]) / whole
        assert first["codec_share"][f"small L={L}"] == pytest.approx(share, abs=0.001)
        # Decoding is most of a worker frame, whatever the loop around it.
        assert 0.3 < share <= 1.2, (L, share)
    assert set(first["codec_share"]) == {"small L=1", "small L=4"}  # not the msgpack case


def test_codec_shares_need_all_three_counts() -> None:
    result = {
        "distribute": {"small L=1": 1000.0, "small L=2": 1100.0, "small L=1 msgpack": 3000.0},
        "frame": {"small native": 2000.0, "small py": 4000.0},
        "codec": {"small encode": 600.0, "small decode": 1500.0},
    }
    # The native worker loop when it was counted; the msgpack case is left out.
    assert instructions.codec_shares(result) == {
        "small L=1": round(2100 / 3000, 3),
        "small L=2": round(3600 / 5100, 3),
    }
    del result["frame"]["small native"]
    assert instructions.codec_shares(result)["small L=1"] == round(2100 / 5000, 3)
    del result["codec"]["small decode"]
    assert instructions.codec_shares(result) == {}
    lines = instructions.table(
        {"native": True, "iterations": 1, "valgrind": "v", "codec_share": {"small L=4": 0.5}}
    )
    assert "small L=4" in lines and "50%" in lines


@pytest.mark.skipif(
    NO_VALGRIND is not None, reason=f"{NO_VALGRIND} (CI: apt-get install -y valgrind)"
)
@pytest.mark.timeout(600)
def test_the_script_counts_what_it_is_asked_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "counts.json"
    script = str(ROOT / "benchmarks" / "instructions.py")
    args = ["--iterations", "20", "--payload", "small", "--only", "frame", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert set(doc["frame"]) == CASES["frame"] and "distribute" not in doc, doc
    assert "codec" not in doc and "codec_share" not in doc, doc
    assert doc["iterations"] == 20
    assert "small py" in proc.stdout


def test_without_valgrind_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    result = instructions.measure(10)
    assert result == {"error": "valgrind not installed (Debian/Ubuntu: apt-get install valgrind)"}
    assert "valgrind not installed" in instructions.table(result)


def test_iterations_must_be_positive() -> None:
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        instructions.measure(0)


def test_only_names_what_it_takes() -> None:
    with pytest.raises(ValueError, match="'distribute', 'frame', 'codec' or None, got 'pump'"):
        instructions.measure(10, only="pump")


def test_bench_json_carries_the_counts_or_why_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fanout bench --instructions``: the JSON says valgrind is missing, and so
    does the table, shown again from the saved JSON."""
    from fanout.tools import cli

    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    out = tmp_path / "run.json"
    args = ["bench", "--scenario", "throughput", "--contender", "fanout-thread"]
    args += ["--payload", "small", "--listeners", "1", "--rounds", "1", "--duration", "0.02"]
    assert cli.main([*args, "--json", str(out), "--instructions"]) == 0
    doc = json.loads(out.read_text())
    assert doc["instructions"] == {
        "error": "valgrind not installed (Debian/Ubuntu: apt-get install valgrind)"
    }
    assert "instruction counts: valgrind not installed" in capsys.readouterr().out
    assert cli.main(["bench", "--from-json", str(out)]) == 0
    assert "instruction counts: valgrind not installed" in capsys.readouterr().out
