"""examples/informer.py runs against the loopback API server, configured by a kubeconfig."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("kubernetes", reason="pip install 'fanout-informer[kube]'")

from helpers import wait_for
from kube_server import KubeServer, kubeconfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "informer.py"


@pytest.fixture
def kube(no_leaks):
    server = KubeServer()
    yield server
    server.close()


TOKEN_USER = "    token: example-token"
# An exec credential plugin, as cloud providers ship them: the client runs it
# and sends the token it prints.
EXEC_USER = """\
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: {python}
      args: [{script}]
      interactiveMode: Never"""
EXEC_PLUGIN = """\
import json
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1",
                  "kind": "ExecCredential", "status": {"token": "exec-token"}}))
"""


@pytest.mark.parametrize(
    ("workers", "auth"),
    [(0, "token"), (2, "token"), (0, "exec")],
    ids=["thread", "processes", "exec-plugin"],
)
def test_example_prints_the_list_then_changes(kube, tmp_path, workers, auth):
    config = tmp_path / "kubeconfig"
    user = TOKEN_USER
    if auth == "exec":
        plugin = tmp_path / "plugin.py"
        plugin.write_text(EXEC_PLUGIN)
        user = EXEC_USER.format(python=sys.executable, script=plugin)
    config.write_text(kubeconfig(kube.url, user))
    kube.create("pods", "a", namespace="prod")
    kube.create("pods", "b", namespace="prod")
    kube.create("pods", "c", namespace="dev")
    out = tmp_path / "out"
    cmd = [sys.executable, str(EXAMPLE), "--kubeconfig", str(config), "-n", "prod"]
    cmd += ["--count", "4", "--workers", str(workers), "pods"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with out.open("a") as sink:  # O_APPEND: the processes printing never share a stale offset
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
    text = out.read_text()  # the whole output in every message: a failure explains itself
    lines = text.splitlines()
    assert sorted(line.split(" rv=")[0] for line in lines if line.startswith("ADD")) == [
        "ADD (initial) prod/a",
        "ADD (initial) prod/b",
    ], text
    changes = [line.split(" rv=")[0] for line in lines if line.startswith(("UPDATE", "DELETE"))]
    # Two keys: with two workers their order may differ (per-key order holds).
    assert sorted(changes) == ["DELETE prod/b", "UPDATE prod/a"], text
    # The token came from the kubeconfig (or its exec plugin), through the client.
    token = "exec-token" if auth == "exec" else "example-token"
    assert set(kube.authorizations) == {f"Bearer {token}"}
