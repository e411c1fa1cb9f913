"""`fanout bench --scenario arrays`: every contender sums every array, nothing leaks."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fanout.bench import array_contenders, arrays, stalled_arrays
from fanout.bench.model import UNSTABLE_SPREAD

pytestmark = pytest.mark.timeout(240)


def _segments() -> list[str]:
    """Shared-memory segments this process's baselines named (and did not unlink)."""
    return glob.glob(
        os.path.join(array_contenders.SHM_DIR, f"{array_contenders.SHM_PREFIX}{os.getpid()}-*")
    )


@pytest.mark.slow
def test_quick_run_measures_every_contender_and_size(tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fanout", "bench", "--quick", "--scenario", "arrays",
         "--json", str(out)],
        capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    results = doc["results"]
    listeners = doc["options"]["listeners"]
    names = {c.name for c in array_contenders.CONTENDERS}
    assert names == {"fanout-process", "pipe+msgpack", "shared_memory"}
    seen = {(r["params"]["array_bytes"], r["params"]["listeners"], r["contender"])
            for r in results}  # fmt: skip
    assert seen == {(s, L, n) for s in arrays.SIZES for L in listeners for n in names}
    for r in results:
        assert r["scenario"] == "arrays" and r["metric"] == "gbps" and r["unit"] == "GB/s"
        assert len(r["values"]) == r["rounds"] == doc["options"]["rounds"] >= 3
        assert r["min"] <= r["median"] <= r["max"] and r["min"] > 0
        assert r["unstable"] is (r["spread"] > UNSTABLE_SPREAD)
        # A round passed its checks: every consumer summed every array, exactly.
        assert r["arrays"] >= arrays.MIN_ARRAYS
        assert r["payload_bytes"] == r["arrays"] * r["params"]["array_bytes"]
        assert r["producer_peak_rss_bytes"] > 0 and r["producer_rss_growth_bytes"] >= 0
    # The table gives each baseline's ratio to fanout, and the producer's memory.
    for size in arrays.SIZES:
        title = f"float64 arrays of {arrays.size_text(size)} to {listeners[0]} listener"
        assert title in proc.stdout
    for base in ("pipe+msgpack", "shared_memory"):
        (line, *_) = [x for x in proc.stdout.splitlines() if x.strip().startswith(base)]
        assert "x fanout-process" in line and "producer RSS grew " in line
    assert _segments() == []


@pytest.mark.parametrize("cls", array_contenders.CONTENDERS, ids=lambda c: c.name)
def test_every_contender_sums_every_array(cls, no_leaks):
    pool = arrays.make_pool(64 << 10, count=3)
    r = arrays.run_round(cls, 2, pool, 10)  # 10 is no multiple of 3: a partial cycle
    assert r["arrays"] == 10 and r["payload_bytes"] == 10 * (64 << 10)
    assert r["gbps"] == pytest.approx(2 * r["payload_bytes"] / r["seconds"] / 1e9)
    assert _segments() == []


class _SkipsEveryOther(array_contenders.PipeArrays):
    """A contender that does half the work: the round must not pass."""

    name = "pipe-skipping"

    def __init__(self, listeners):
        super().__init__(listeners)
        self.sent = 0

    def send(self, arr):
        self.sent += 1
        if self.sent % 2:
            super().send(arr)


class _SendsTheWrongArray(array_contenders.PipeArrays):
    """As many arrays as asked, but always the first: the count is right, the sum not."""

    name = "pipe-wrong"

    def send(self, arr):
        super().send(np.zeros_like(arr))


@pytest.mark.parametrize("cls", [_SkipsEveryOther, _SendsTheWrongArray])
def test_a_contender_that_skips_work_fails_its_round(cls, no_leaks):
    pool = arrays.make_pool(64 << 10, count=2)
    with pytest.raises(RuntimeError, match=r"consumer 0 summed \d+ arrays to .*; sent 8"):
        arrays.run_round(cls, 1, pool, 8)


def test_shared_memory_baseline_unlinks_segments_as_they_are_acknowledged(no_leaks):
    pool = arrays.make_pool(1 << 20, count=2)
    session = array_contenders.ShmArrays(2)
    try:
        session.start()
        # More than the window holds: the producer must unlink on the way.
        count = array_contenders.SHM_WINDOW_BYTES // (1 << 20) + 8
        for i in range(count):
            session.send(pool[i % 2])
            assert session.in_flight <= array_contenders.SHM_WINDOW_BYTES
            assert len(_segments()) == len(session.live) <= array_contenders.SHM_WINDOW_COUNT
        results = session.finish(60)
    finally:
        session.close()
    assert [r["count"] for r in results] == [count, count]
    assert _segments() == [] and session.live == {}


def test_shared_memory_baseline_leaves_nothing_when_a_consumer_dies(no_leaks):
    pool = arrays.make_pool(64 << 10, count=1)
    session = array_contenders.ShmArrays(2)
    try:
        session.start()
        for _ in range(4):
            session.send(pool[0])
        session.flush()
        victim = session.procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        with pytest.raises((RuntimeError, BrokenPipeError)):
            for _ in range(2000):  # 125 MiB: past the window, so acks are awaited
                session.send(pool[0])
            session.finish(30)
        assert _segments()  # the failure left segments named ...
    finally:
        session.close()
    assert _segments() == []  # ... and close() unlinked every one
    assert session.procs == [] and session.live == {}


@pytest.mark.parametrize("cls", array_contenders.CONTENDERS, ids=lambda c: c.name)
def test_a_failed_round_leaves_no_process_fd_or_segment(cls, no_leaks):
    # An array of Python objects has no bytes to send: fanout refuses it at
    # distribute, the baselines' consumers die on it; the round fails mid-way.
    pool = [*arrays.make_pool(64 << 10, count=1), np.array([1.0, 2.0], dtype=object)]
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        arrays.run_round(cls, 2, pool, 6)
    assert _segments() == []


def test_peak_rss_sees_a_short_allocation():
    with arrays.PeakRss() as rss:
        block = np.ones(64 << 17)  # 64 MiB, touched, then freed at once
        del block
    assert rss.method in ("VmHWM", "sampled")
    assert rss.growth >= 60 << 20
    assert rss.peak >= rss.start > 0


def test_peak_rss_sampling_fallback_sees_what_stays():
    with arrays.PeakRss(sampled=True) as rss:
        block = np.ones(64 << 17)
        deadline = time.monotonic() + 10
        while rss.peak - rss.start < 60 << 20 and time.monotonic() < deadline:
            time.sleep(0.005)  # until a sample has seen the block
        del block
    assert rss.method == "sampled" and rss.growth >= 60 << 20


@pytest.mark.parametrize("nbytes", [0, -8, 12])
def test_array_size_must_be_whole_float64s(nbytes):
    with pytest.raises(ValueError, match=f"positive multiple of 8 bytes, got {nbytes}"):
        arrays.make_pool(nbytes)


@pytest.mark.slow
def test_standalone_script_checks_the_rss_bound(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_arrays.py")
    out = tmp_path / "run.json"
    common = ["--total-gb", "0.02", "--sizes", "1M", "--listeners", "2", "--rounds", "1"]

    def run(*extra):
        return subprocess.run(
            [sys.executable, script, *common, *extra], capture_output=True, text=True,
            timeout=120, cwd=tmp_path,
        )  # fmt: skip

    proc = run("--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert {r["contender"] for r in doc["results"]} == {
        c.name for c in array_contenders.CONTENDERS
    }
    assert {r["arrays"] for r in doc["results"]} == {19}  # 0.02 GB of 1 MiB arrays
    assert "fanout/pipe+msgpack = " in proc.stdout and "fanout/shared_memory = " in proc.stdout
    # A bound fanout cannot keep: its producer holds at least one array (a frame
    # today, its copy in the shared arena tomorrow).
    proc = run("--rss-bound-mb", "0.5", "--contender", "fanout-process")
    assert proc.returncode == 1 and "OVER THE BOUND" in proc.stdout


@pytest.mark.parametrize("setting", list(stalled_arrays.STALLED_SETTINGS))
def test_a_stalled_round_measures_both_phases_and_holds_the_stalled_listener_to_its_bound(
    setting, no_leaks
):
    r = stalled_arrays.stalled_round(setting, 1 << 20, 40)
    assert r["fraction"] == pytest.approx(r["beside_per_s"] / r["alone_per_s"])
    assert r["percent_of_alone"] == pytest.approx(100 * r["fraction"])
    assert r["alone_per_s"] > 0 and r["beside_per_s"] > 0 and r["arrays"] == 40
    # The producer's own work per array in each phase, and the most the healthy
    # rate can be with that work beside (its wall-clock time over the CPU time).
    assert min(r["alone_cpu_ms"], r["alone_faults"], r["beside_faults"]) >= 0
    assert r["beside_cpu_ms"] > 0
    assert r["bound_percent"] == pytest.approx(1e5 / (r["alone_per_s"] * r["beside_cpu_ms"]))
    arena, opts = stalled_arrays.STALLED_SETTINGS[setting]
    bound = opts.get("max_pending_bytes")
    if bound is None:  # it keeps all but the one its handler sits on, arrays included
        assert r["stalled_pending_bytes"] >= 39 << 20 and r["stalled_dropped"] == 0
    else:  # its real bytes stay within its bound; the rest is dropped, for it alone
        assert r["stalled_pending_bytes"] <= bound and r["stalled_dropped"] >= 40 - 5
    if arena == 64 << 20:  # past its share of 32 MiB it takes arrays inline
        assert bound is not None or r["spilled"] >= 40 - 33
