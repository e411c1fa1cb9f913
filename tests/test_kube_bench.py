"""`fanout bench --scenario kube`: the informer and the official client's watch, in one run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("kubernetes", reason="pip install 'fanout-informer[kube]'")

from fanout.bench import kube


@pytest.mark.parametrize("cls", kube.CONTENDERS, ids=[c.name for c in kube.CONTENDERS])
def test_each_contender_handles_every_event(cls, no_leaks):
    assert cls.unavailable() is None
    rate, cpu = kube.measure(cls, 300)
    assert rate > 0 and cpu > 0


def test_slim_keeps_what_a_handler_reads():
    pod = {
        "metadata": {"name": "p", "namespace": "n", "labels": {"a": "b"}, "uid": "u"},
        "spec": {"nodeName": "node", "containers": []},
        "status": {"phase": "Running", "conditions": []},
    }
    assert kube.slim(pod) == {
        "metadata": {"name": "p", "namespace": "n", "labels": {"a": "b"}, "resourceVersion": None},
        "spec": {"nodeName": "node"},
        "status": {"phase": "Running"},
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_scenario_reports_every_contender_in_one_run(tmp_path, no_leaks):
    out = tmp_path / "out.json"
    args = ["--scenario", "kube", "--duration", "0.05", "--rounds", "3", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "fanout", "bench", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert {r["contender"] for r in results} == {c.name for c in kube.CONTENDERS}
    for r in results:
        assert (r["scenario"], r["unit"], r["rounds"]) == ("kube", "events/s", 3)
        assert r["median"] > 0 and r["cpu_s_per_event"] > 0
