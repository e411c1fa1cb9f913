"""examples/informer.py runs against the loopback API server, configured by a kubeconfig."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("kubernetes", reason="pip install 'fanout-informer[kube]'")

from helpers import wait_for
from kube_server import KubeServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "informer.py"

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: loopback
  cluster:
    server: {url}
users:
- name: tester
  user:
    token: example-token
contexts:
- name: loopback
  context:
    cluster: loopback
    user: tester
current-context: loopback
"""


@pytest.fixture
def kube(no_leaks):
    server = KubeServer()
    yield server
    server.close()


@pytest.mark.parametrize("workers", [0, 2], ids=["thread", "processes"])
def test_example_prints_the_list_then_changes(kube, tmp_path, workers):
    config = tmp_path / "kubeconfig"
    config.write_text(KUBECONFIG.format(url=kube.url))
    kube.create("pods", "a", namespace="prod")
    kube.create("pods", "b", namespace="prod")
    kube.create("pods", "c", namespace="dev")
    out = tmp_path / "out"
    cmd = [sys.executable, str(EXAMPLE), "--kubeconfig", str(config), "-n", "prod"]
    cmd += ["--count", "4", "--workers", str(workers), "pods"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with out.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            assert wait_for(lambda: "synced: 2 pods" in out.read_text(), 60), out.read_text()
            kube.update("pods", "a", namespace="prod", spec={"x": 1})
            kube.delete("pods", "b", namespace="prod")
            assert proc.wait(60) == 0, out.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = out.read_text().splitlines()
    assert sorted(line.split(" rv=")[0] for line in lines if line.startswith("ADD")) == [
        "ADD (initial) prod/a",
        "ADD (initial) prod/b",
    ]
    changes = [line.split(" rv=")[0] for line in lines if line.startswith(("UPDATE", "DELETE"))]
    # Two keys: with two workers their order may differ (per-key order holds).
    assert sorted(changes) == ["DELETE prod/b", "UPDATE prod/a"]
    # The token came from the kubeconfig, through the client.
    assert set(kube.authorizations) == {"Bearer example-token"}
