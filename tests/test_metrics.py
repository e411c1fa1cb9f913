"""fanout.metrics against the real thing: an HTTP endpoint on 127.0.0.1, scraped over HTTP.

Every figure a scrape shows must equal what ``stats()`` says at that moment;
each test waits until the distributor is quiet (nothing running, nothing
changing) before comparing, including after crashes, dead letters and drops.
"""

from __future__ import annotations

import gc
import itertools
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
from helpers import Recorder, obj, wait_for
from prometheus_client.parser import text_string_to_metric_families

import fanout
from fanout.metrics import (
    LATENCY_BOUNDS,
    MetricsServer,
    PrometheusCollector,
    latency_buckets,
    serve,
)
from fanout.stats import bucket_of
from fanout.wire.protocol import NBUCKETS

FIELDS = {  # sample name -> ListenerStats field
    "fanout_received_total": "received",
    "fanout_delivered_total": "delivered",
    "fanout_handler_errors_total": "errors",
    "fanout_dead_lettered_total": "dead_lettered",
    "fanout_dropped_total": "dropped",
    "fanout_worker_restarts_total": "restarts",
    "fanout_pending": "pending",
    "fanout_pending_bytes": "pending_bytes",
    "fanout_ring_capacity_bytes": "capacity_bytes",
    "fanout_workers": "workers",
    "fanout_start_failed": "start_failed",
}
LATENCY = "fanout_delivery_latency_seconds"


def scrape(url: str) -> dict[str, dict[str, Any]]:
    """GET ``url``, parse it; per listener: sample name (bucket: (name, le)) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            fig = out.setdefault(labels.pop("listener"), {})
            key = (s.name, labels.pop("le")) if "le" in labels else s.name
            assert not labels, f"unexpected labels on {s.name}: {labels}"
            fig[key] = s.value
    return out


def expected(reg: fanout.Registration) -> dict[str, Any]:
    """What a scrape must show for ``reg``, from ``stats()`` and its histogram."""
    s = reg.stats()
    hist = reg.latency_histogram()
    fig: dict[str, Any] = {name: float(getattr(s, field)) for name, field in FIELDS.items()}
    buckets, total = latency_buckets(hist)
    for le, count in buckets:
        fig[(f"{LATENCY}_bucket", le)] = count
    fig[f"{LATENCY}_count"] = float(sum(hist))
    fig[f"{LATENCY}_sum"] = total
    return fig


def assert_scrape_equals_stats(url: str, *regs: fanout.Registration) -> dict[str, Any]:
    """Scrape once; every listener's figures equal its stats() (sum within float error)."""
    got = scrape(url)
    assert set(got) == {r.name for r in regs}
    for reg in regs:
        want = expected(reg)
        have = got[reg.name]
        assert have.pop(f"{LATENCY}_sum") == pytest.approx(want.pop(f"{LATENCY}_sum"))
        assert have == want, reg.name
    return got


def quiet(*regs: fanout.Registration) -> bool:
    """Nothing pending: every accepted notification was handled, dropped or dead-lettered."""
    for reg in regs:
        s = reg.stats()
        if s.pending or s.received != s.delivered + s.dropped + s.dead_lettered:
            return False
    return True


@pytest.fixture
def endpoint(make_dist):
    """Serve a distributor on a free loopback port; closed after the test."""
    servers: list[MetricsServer] = []

    def start(d: fanout.Distributor) -> MetricsServer:
        server = serve(d, 0)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_scrape_over_http_equals_stats(make_dist, endpoint, tmp_path, executor):
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), name="pods", executor=executor)
    idle = d.add_listener(Recorder(tmp_path / "idle"), name="idle", executor=executor)
    server = endpoint(d)
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    d.start()
    for v in range(40):
        d.distribute(fanout.Update(obj("a", v), obj("a", v + 1, **{"raise": v % 10 == 0})))
    assert wait_for(lambda: quiet(reg, idle) and reg.stats().delivered == 40, 60)
    got = assert_scrape_equals_stats(server.url, reg, idle)
    fig = got["pods"]
    assert fig["fanout_received_total"] == 40
    assert fig["fanout_handler_errors_total"] == 4
    assert fig[f"{LATENCY}_count"] == 40
    assert fig[(f"{LATENCY}_bucket", "+Inf")] == 40
    counts = [fig[(f"{LATENCY}_bucket", le)] for le, _ in latency_buckets([0] * NBUCKETS)[0]]
    assert counts == sorted(counts)  # cumulative


def test_crash_restart_and_dead_letter_show_in_the_scrape(
    make_dist, endpoint, tmp_path, start_method
):
    d = make_dist(start_method=start_method)
    dead: list[str] = []
    reg = d.add_listener(
        Recorder(tmp_path / "r"),
        name="crashy",
        max_attempts=1,
        on_dead_letter=lambda r, n, why: dead.append(why),
    )
    server = endpoint(d)
    d.start()
    assert reg.wait_ready(60)
    d.distribute(fanout.Update(obj("a", 0), obj("a", 1)))
    d.distribute(fanout.Update(obj("a", 1), obj("a", 2, exit=3)))  # os._exit in the handler
    d.distribute(fanout.Update(obj("a", 2), obj("a", 3, **{"raise": True})))
    d.distribute(fanout.Update(obj("a", 3), obj("a", 4)))

    def settled() -> bool:
        s = reg.stats()
        return s.restarts == 1 and s.dead_lettered == 1 and s.delivered == 3 and quiet(reg)

    assert wait_for(settled, 60)
    assert wait_for(reg.ready, 60)
    assert len(dead) == 1 and "exited with code 3" in dead[0]
    fig = assert_scrape_equals_stats(server.url, reg)["crashy"]
    assert fig["fanout_worker_restarts_total"] == 1
    assert fig["fanout_dead_lettered_total"] == 1
    assert fig["fanout_handler_errors_total"] == 1
    assert fig["fanout_received_total"] == 4


def test_drops_and_a_stalled_listener_show_in_the_scrape(make_dist, endpoint, tmp_path):
    gate = tmp_path / "gate"
    d = make_dist()
    stalled = d.add_listener(
        Recorder(tmp_path / "r"),
        name="stalled",
        max_pending_bytes=2048,
        overflow="drop_newest",
    )
    server = endpoint(d)
    d.start()
    assert stalled.wait_ready(60)
    d.distribute(fanout.Add(obj("first", 0, gate=str(gate))))  # blocks the worker
    assert wait_for(lambda: stalled.stats().latency_p50 is not None, 60)  # it started
    for v in range(1, 200):
        d.distribute(fanout.Add(obj("b", v, pad="x" * 100)))
    s = stalled.stats()
    assert s.dropped > 0 and s.pending > 0 and s.pending_bytes > 0
    fig = assert_scrape_equals_stats(server.url, stalled)["stalled"]
    assert fig["fanout_dropped_total"] == s.dropped
    assert fig["fanout_pending"] == s.pending
    assert fig["fanout_ring_capacity_bytes"] >= fig["fanout_pending_bytes"] > 0

    gate.touch()
    assert wait_for(lambda: quiet(stalled), 60)
    fig = assert_scrape_equals_stats(server.url, stalled)["stalled"]
    assert fig["fanout_received_total"] == 200
    assert fig["fanout_delivered_total"] + fig["fanout_dropped_total"] == 200

    d.stop()
    assert scrape(server.url) == {}  # a stopped distributor has no listeners left


def test_listeners_sharing_a_name_get_distinct_labels(make_dist, endpoint):
    d = make_dist()
    regs = [d.add_listener(fanout.Handler(), name="same", executor="thread") for _ in range(3)]
    other = d.add_listener(fanout.Handler(), name="other", executor="thread")
    server = endpoint(d)
    d.start()
    d.distribute(fanout.Add(obj("a")))
    assert wait_for(lambda: quiet(*regs, other) and other.stats().delivered == 1)
    assert set(scrape(server.url)) == {"same", "same#2", "same#3", "other"}
    d.remove_listener(regs[0])
    assert set(scrape(server.url)) == {"same", "same#2", "other"}


def test_collector_on_a_users_registry(make_dist):
    from prometheus_client import CollectorRegistry, generate_latest

    d = make_dist()
    d.add_listener(fanout.Handler(), name="mine", executor="thread")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PrometheusCollector(d))
    text = generate_latest(registry).decode()
    assert 'fanout_received_total{listener="mine"} 0.0' in text
    assert "# TYPE fanout_delivery_latency_seconds histogram" in text
    # Registering the same names twice is refused (describe() names them).
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(PrometheusCollector(d))


def test_latency_buckets_are_powers_of_two_and_cumulative():
    hist = [0] * NBUCKETS
    samples_ns = [1, 500, 1023, 1024, 1500, 2**20, 2**20 + 5, 2**34, 2**36, 2**50]
    for ns in samples_ns:
        hist[bucket_of(ns)] += 1
    buckets, total = latency_buckets(hist)
    assert [le for le, _ in buckets][-1] == "+Inf"
    assert len(buckets) == len(LATENCY_BOUNDS) + 1
    bounds = [float(le) for le, _ in buckets[:-1]]
    assert all(b2 == 2 * b1 for b1, b2 in itertools.pairwise(bounds))
    for (le, count), bound in zip(buckets, bounds, strict=False):
        assert count == sum(1 for ns in samples_ns if ns < bound * 1e9), le
    assert buckets[-1][1] == len(samples_ns)
    # Midpoint estimate: within an eighth of each value (4 buckets per octave),
    # except the last bucket, which holds everything above ~1,100 s.
    clamp = 2**40
    true = sum(min(ns, clamp) for ns in samples_ns) / 1e9
    assert total == pytest.approx(true, rel=0.13)
    with pytest.raises(ValueError, match="160 latency buckets"):
        latency_buckets([0] * 10)


def test_serve_refuses_bad_arguments_and_closes(make_dist):
    d = make_dist()
    with pytest.raises(TypeError, match="port must be an int"):
        serve(d, "9100")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        serve(d, 70000)
    with pytest.raises(TypeError, match=r"fanout\.Distributor, not dict"):
        serve({}, 0)  # type: ignore[arg-type]
    with serve(d, 0) as server:
        assert "serving" in repr(server)
        assert scrape(server.url) == {}
        # The port is taken while it serves.
        with pytest.raises(OSError):
            serve(d, server.port)
    server.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=5)
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))


def test_scrape_after_the_distributor_is_gone():
    # No leak check here: gc.collect() below also frees earlier tests' garbage,
    # which moves fd numbers under the check. Nothing here starts anything.
    d = fanout.Distributor()
    d.add_listener(fanout.Handler(), name="x", executor="thread")
    collector = PrometheusCollector(d)
    assert next(iter(collector.collect())).samples
    del d
    gc.collect()
    assert all(not f.samples for f in collector.collect())


def test_missing_prometheus_client_names_the_extra():
    code = "import sys; sys.modules['prometheus_client'] = None; import fanout.metrics"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode != 0
    assert "ImportError: fanout.metrics needs prometheus_client" in proc.stderr
    assert "pip install 'fanout-informer[prometheus]'" in proc.stderr
