"""The metrics endpoint is bounded: idle or slow clients cost neither threads nor fds.

Clients here are real sockets on 127.0.0.1 against a real ``fanout.metrics.serve``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from helpers import Recorder, obj, wait_for

import fanout
from fanout.metrics import serve

pytest.importorskip("prometheus_client")

IDLE = 500


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _sockets() -> int:
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def _connect(port: int, n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=30)
        clients.append(c)
    return clients


def test_idle_connections_cost_no_threads_and_few_fds(make_dist, tmp_path):
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "calls"), name="busy")
    d.start()
    d.distribute(fanout.Add(obj("a")))
    threads = threading.active_count()
    before = _sockets()
    with serve(d, 0, max_connections=16) as server:
        assert threading.active_count() == threads + 1
        clients = _connect(server.port, IDLE)
        try:
            # The server took at most its cap (and its listening socket); the rest wait.
            assert wait_for(lambda: _sockets() - before - IDLE <= 16 + 1, 10)
            assert threading.active_count() == threads + 1
            body = _get(server.url)
            assert b'fanout_received_total{listener="busy"} 1.0' in body
            assert _sockets() - before - IDLE <= 16 + 1
        finally:
            for c in clients:
                c.close()
    assert reg.stats().received == 1
    assert threading.active_count() == threads
    assert wait_for(lambda: _sockets() == before, 10)


def test_slow_clients_cannot_lock_scrapers_out(make_dist):
    d = make_dist()
    with serve(d, 0, max_connections=4) as server:
        slow = _connect(server.port, 50)
        try:
            for c in slow:  # half a request each, never finished
                c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            for _ in range(5):
                assert b"fanout_received_total" in _get(server.url)
        finally:
            for c in slow:
                c.close()


def test_an_idle_connection_is_closed_after_idle_timeout(make_dist):
    d = make_dist()
    with serve(d, 0, idle_timeout=0.2) as server:
        c = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        try:
            assert c.recv(1) == b""  # closed by the server, with nothing sent
        finally:
            c.close()
        c = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        try:
            c.sendall(b"HEAD /metrics HTTP/1.0\r\n\r\n")
            head = b""
            while chunk := c.recv(4096):
                head += chunk
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        finally:
            c.close()


def test_serve_refuses_bad_bounds(make_dist):
    d = make_dist()
    for bad in ("16", 1.5, True):
        with pytest.raises(TypeError, match="max_connections must be an int"):
            serve(d, 0, max_connections=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections must be >= 1, got 0"):
        serve(d, 0, max_connections=0)
    with pytest.raises(TypeError, match="idle_timeout must be a number of seconds"):
        serve(d, 0, idle_timeout="10")  # type: ignore[arg-type]
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="idle_timeout must be"):
            serve(d, 0, idle_timeout=bad)


PRODUCER = """
import resource, sys
sys.path.insert(0, sys.argv[2])
import fanout, fanout.metrics
from helpers import Recorder, obj, wait_calls

if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
    d = fanout.Distributor()
    d.start()
    server = fanout.metrics.serve(d, 0)
    print(server.port, flush=True)
    sys.stdin.readline()  # the test holds its idle connections now
    reg = d.add_listener(Recorder(sys.argv[1]), workers=2)
    for i in range(10):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    assert len(wait_calls(sys.argv[1], 10)) == 10
    print("ok", flush=True)
    d.stop(drain=True)
    server.close()
"""


def test_idle_connections_leave_the_distributor_its_fds(tmp_path, no_leaks):
    """Under an fd limit of 128, 200 idle connections do not stop a listener starting."""
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    paths = [str(Path(fanout.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    producer = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "calls"), str(Path(__file__).parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    clients: list[socket.socket] = []
    try:
        assert producer.stdout is not None and producer.stdin is not None
        port = int(producer.stdout.readline())
        clients = _connect(port, 200)
        producer.stdin.write(b"go\n")
        producer.stdin.flush()
        out, err = producer.communicate(timeout=120)
        assert out == b"ok\n", err.decode()
        assert producer.returncode == 0, err.decode()
    finally:
        for c in clients:
            c.close()
        if producer.poll() is None:
            producer.kill()
            producer.communicate()


def test_a_failing_collector_fails_the_scrape_not_the_endpoint(make_dist, monkeypatch, caplog):
    import urllib.error

    import fanout.metrics

    d = make_dist()
    with serve(d, 0) as server:
        real = fanout.metrics.PrometheusCollector.collect
        monkeypatch.setattr(fanout.metrics.PrometheusCollector, "collect", lambda self: 1 / 0)
        with pytest.raises(urllib.error.HTTPError, match="500"):
            _get(server.url)
        assert "collecting failed" in caplog.text
        monkeypatch.setattr(fanout.metrics.PrometheusCollector, "collect", real)
        assert b"fanout_received_total" in _get(server.url)
