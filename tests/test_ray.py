"""executor="ray": listeners whose workers are Ray actors, against a real Ray.

One local cluster (``ray.init(num_cpus=2)``) serves every test that needs one: Ray
takes seconds to start. The node-loss test needs a two-node cluster of its own and
the owned-cluster test needs Ray not initialised, so they run in subprocesses, first
(before the shared cluster exists, so the clusters never compete for the 2 cores).
The whole module is skipped when Ray is not installed (``pip install
'fanout-informer[ray]'``).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    BufferProbe,
    FailingFactory,
    Noop,
    Recorder,
    assert_accounted,
    churn_stress,
    obj,
    read_calls,
    read_probes,
    wait_calls,
    wait_for,
)

import fanout
from fanout.errors import ListenerFull, WorkerStartError

TESTS = Path(__file__).resolve().parent
# Ray binds to loopback only on this kind of host when this is set; Ray reads it
# when it is imported, so before that.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(LOOPBACK_ENV)
ray = pytest.importorskip(
    "ray", reason="executor='ray' tests need Ray: pip install 'fanout-informer[ray]'"
)
from ray._private import state as ray_state  # noqa: E402  (GCS actor table, no dashboard)


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ, **LOOPBACK_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


def _run_scenario(name: str, tmp_path: Path, timeout: float = 150) -> dict[str, Any]:
    """Run ``scenario_<name>`` of this module in a fresh interpreter; return its JSON."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-c", f"import test_ray; test_ray.scenario_{name}({str(out)!r})"],
        env=_subprocess_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _actor_state(actor_id: str) -> dict[str, Any]:
    return ray_state.actors(actor_id=actor_id)


# -- subprocess scenarios (first: no shared cluster exists yet) -------------------------


def scenario_owned(out: str) -> None:
    """No ray.init by the program: fanout starts a local cluster and stops it."""
    path = Path(out).with_name("calls")
    d = fanout.Distributor()
    reg = d.add_listener(Recorder(str(path)), executor="ray", workers=1)
    assert not ray.is_initialized()
    d.start()
    started = ray.is_initialized()
    for i in range(100):
        d.distribute(fanout.Add(obj(f"o{i}")))
    drained = d.stop(drain=True)
    Path(out).write_text(
        json.dumps(
            {
                "started": started,
                "after_stop": ray.is_initialized(),
                "drained": drained,
                "calls": len(read_calls(path)),
                "delivered": reg.stats().delivered,
            }
        )
    )


def test_owned_cluster_started_and_shut_down(tmp_path: Path) -> None:
    result = _run_scenario("owned", tmp_path)
    assert result == {
        "started": True,
        "after_stop": False,
        "drained": True,
        "calls": 100,
        "delivered": 100,
    }


def scenario_node_loss(out: str) -> None:
    """Two nodes; actors pinned (softly) to the second, which is removed mid-batch."""
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    work = Path(out).parent
    path, gate = work / "calls", work / "gate"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    doomed = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)  # its nodes inherited PYTHONPATH: actors see helpers
    doomed_id = doomed.node_id
    head_id = cluster.head_node.node_id
    d = fanout.Distributor()
    reg = d.add_listener(
        Recorder(str(path)),
        executor="ray",
        workers=2,
        ray_options={
            "num_cpus": 0.5,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(doomed_id, soft=True),
        },
    )
    d.start()
    ids = reg.actor_ids()  # type: ignore[attr-defined]
    nodes_before = [_actor_state(a)["Address"]["NodeID"] for a in ids]
    n = 2000
    for i in range(n):
        # Every 100th object waits for the gate: batches sit unacknowledged.
        extra = {"gate": str(gate)} if i % 100 == 50 else {}
        d.distribute(fanout.Add(obj(f"o{i}", v=i, **extra)))
    wait_for(lambda: len(read_calls(path)) >= 50, 60)
    handled_before = len(read_calls(path))
    pending_before = reg.stats().pending
    t0 = time.monotonic()
    cluster.remove_node(doomed)
    gate.touch()
    wait_for(lambda: len(read_calls(path)) > handled_before, 60)
    recovery = time.monotonic() - t0
    drained = d.stop(drain=True, timeout=90)
    stats = reg.stats()
    names = Counter(c.name for c in read_calls(path))
    nodes_after = [_actor_state(a)["Address"]["NodeID"] for a in ids]
    ray.shutdown()
    cluster.shutdown()
    Path(out).write_text(
        json.dumps(
            {
                "doomed": doomed_id,
                "head": head_id,
                "nodes_before": nodes_before,
                "nodes_after": nodes_after,
                "pending_before": pending_before,
                "handled_before": handled_before,
                "drained": drained,
                "missing": [f"o{i}" for i in range(n) if names[f"o{i}"] == 0],
                "delivered": stats.delivered,
                "dead_lettered": stats.dead_lettered,
                "received": stats.received,
                "restarts": stats.restarts,
                "recovery_s": recovery,
            }
        )
    )


@pytest.mark.slow
def test_node_loss_loses_nothing(tmp_path: Path) -> None:
    r = _run_scenario("node_loss", tmp_path)
    assert r["nodes_before"] == [r["doomed"], r["doomed"]], r
    assert r["pending_before"] > 0, r  # the node held unacknowledged batches
    assert r["handled_before"] < 2000, r
    assert r["missing"] == [], r
    assert r["drained"] is True, r
    assert r["dead_lettered"] == 0, r
    assert r["delivered"] == r["received"] == 2000, r
    assert r["restarts"] >= 1, r
    assert r["nodes_after"] == [r["head"], r["head"]], r  # Ray restarted them elsewhere
    print(f"node loss: next handled notification {r['recovery_s']:.2f} s after the removal")


# -- checks without a cluster -----------------------------------------------------------


def test_without_ray_import_error_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import fanout, helpers\n"
        "try:\n"
        "    fanout.Distributor().add_listener(helpers.Noop(), executor='ray')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_subprocess_env(), capture_output=True, text=True
    )
    assert "pip install 'fanout-informer[ray]'" in proc.stdout, proc.stderr


def test_bench_skips_the_ray_scenario_without_ray(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from fanout.bench.model import Options\n"
        "from fanout.bench.scenarios import SCENARIOS, Suite\n"
        "suite = Suite(Options(scenarios=['ray']), print)\n"
        "print(SCENARIOS['ray'](suite), suite.skipped['ray'])\n"
    )
    env = dict(_subprocess_env(), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "[] needs Ray: pip install 'fanout-informer[ray]'" in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ([1], TypeError, "ray_options must be a dict"),
        ({"max_restarts": 2}, ValueError, r"ray_options\['max_restarts'\] cannot be set"),
        ({"max_concurrency": 4}, ValueError, "per-key order"),
        ({"num_cpu": 1}, ValueError, "unknown Ray actor option 'num_cpu'.*num_cpus"),
        ({"num_cpus": -1}, ValueError, "ray_options"),
    ],
)
def test_bad_ray_options_refused_at_add_listener(options: Any, error: Any, match: str) -> None:
    d = fanout.Distributor()
    with pytest.raises(error, match=match):
        d.add_listener(Recorder("/dev/null"), executor="ray", ray_options=options)
    assert d.listener_count == 0


def test_ray_options_need_executor_ray() -> None:
    with pytest.raises(ValueError, match="ray_options needs executor='ray'"):
        fanout.Distributor().add_listener(Recorder("/dev/null"), ray_options={"num_cpus": 1})


class _HoldsALock(fanout.Handler):
    def __init__(self) -> None:
        self.lock = threading.Lock()


def test_handler_ray_cannot_serialise_refused() -> None:
    with pytest.raises(TypeError, match="cannot be serialised for Ray actors"):
        fanout.Distributor().add_listener(_HoldsALock(), executor="ray")


# -- the shared cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for every test below; actors import the tests' helpers.

    Every Ray test is in this module, so this is the one cluster of the run. It is
    shut down when the module ends, not the session: Ray's own processes and threads
    come and go on their own while it runs, which the leak checks of the tests in
    later modules would count against them.
    """
    ray.init(
        address="local",  # our own, even if another run on this machine has one
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": _subprocess_env()["PYTHONPATH"]}},
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


@pytest.fixture
def rdist(ray_cluster):
    """Build Distributors; after the test stop them and check that nothing is left.

    Nothing left: no fanout thread, no actor of theirs alive in Ray's actor table,
    no progress file, and the shared cluster still up (fanout did not own it).
    """
    made: list[fanout.Distributor] = []
    threads = set(threading.enumerate())

    def make(**kwargs: Any) -> fanout.Distributor:
        d = fanout.Distributor(**kwargs)
        made.append(d)
        return d

    yield make
    ids: list[str] = []
    for d in made:
        d.stop(drain=False)
        for r in (*d.listeners, *d._stopped_listeners):
            if r.executor == "ray":
                ids += r.actor_ids()  # type: ignore[attr-defined]
    alive = {a: _actor_state(a)["State"] for a in set(ids) if _actor_state(a)["State"] != "DEAD"}
    assert not alive, f"actors alive after stop(): {alive}"
    extra = [t.name for t in threading.enumerate() if t not in threads and t.is_alive()]
    assert not [t for t in extra if t.startswith("fanout")], extra
    assert ray.is_initialized()


def _pid_of(actor_id: str, not_pid: int = 0) -> int:
    """The pid of the actor once Ray reports it alive (in another process than ``not_pid``)."""
    pid = 0

    def alive() -> bool:
        nonlocal pid
        st = _actor_state(actor_id)
        pid = int(st.get("Pid") or 0)
        return st["State"] == "ALIVE" and pid > 0 and pid != not_pid

    assert wait_for(alive, 60), _actor_state(actor_id)
    return pid


def _first_deliveries_in_order(calls: list[Any]) -> None:
    """Per key, the first delivery of each version comes in distribute order."""
    seen: set[tuple[str, int]] = set()
    last: dict[str, int] = {}
    for c in calls:
        if (c.name, c.v) in seen:
            continue
        seen.add((c.name, c.v))
        assert c.v > last.get(c.name, -1), (c.name, c.v, last.get(c.name))
        last[c.name] = c.v


def test_delivers_in_key_order_and_accounts(rdist, tmp_path: Path) -> None:
    path = tmp_path / "calls"
    d = rdist()
    reg = d.add_listener(Recorder(str(path)), executor="ray", workers=2)
    d.start()
    assert reg.wait_ready(30)
    n = 3000
    for i in range(n):
        d.distribute(fanout.Update(obj(f"k{i % 50}", i - 50), obj(f"k{i % 50}", i)))
    assert d.stop(drain=True) is True
    calls = read_calls(path)
    assert len(calls) == n
    assert len({c.pid for c in calls}) == 2  # both actors worked
    _first_deliveries_in_order(calls)
    s = assert_accounted(reg)
    assert s.executor == "ray" and s.delivered == n and s.errors == 0
    assert s.latency_p50 is not None and s.latency_p99 is not None


def test_start_fails_fast_when_the_actor_cannot_build_the_handler(rdist) -> None:
    d = rdist()
    d.add_listener(FailingFactory(), executor="ray")
    with pytest.raises(WorkerStartError, match="factory refuses to build the handler"):
        d.start()


def test_has_synced_after_initial_list(rdist, tmp_path: Path) -> None:
    path = tmp_path / "calls"
    d = rdist()
    gate = tmp_path / "gate"
    items = [obj(f"i{k}") for k in range(199)] + [obj("last", gate=str(gate))]
    reg = d.add_listener(Recorder(str(path)), executor="ray", initial_list=items)
    d.start()
    d.mark_synced()
    d.distribute(fanout.Add(obj("live")))
    assert not reg.wait_synced(0.5)  # the gated last initial item is not handled
    gate.touch()
    assert reg.wait_synced(30)
    calls = wait_calls(path, 201)
    assert [c.initial for c in calls[:200]] == [True] * 200
    assert calls[200].name == "live" and not calls[200].initial


def test_handler_errors_reach_on_error(rdist, tmp_path: Path) -> None:
    errors: list[tuple[Any, str]] = []
    d = rdist()
    reg = d.add_listener(
        Recorder(str(tmp_path / "calls")),
        executor="ray",
        on_error=lambda r, n, text: errors.append((n, text)),
    )
    d.start()
    d.distribute(fanout.Add(obj("ok")))
    d.distribute(fanout.Add(obj("bad", **{"raise": True})))
    assert d.stop(drain=True)
    assert len(errors) == 1
    n, text = errors[0]
    assert n.obj["metadata"]["name"] == "bad"
    assert "ValueError: asked to raise by bad" in text
    s = assert_accounted(reg)
    assert s.delivered == 2 and s.errors == 1


def test_process_and_ray_listeners_both_get_everything(rdist, tmp_path: Path) -> None:
    d = rdist()
    procs = d.add_listener(Recorder(str(tmp_path / "p")), workers=2)
    rays = d.add_listener(Recorder(str(tmp_path / "r")), executor="ray", workers=2)
    d.start()
    n = 2000
    for i in range(n):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    assert d.stop(drain=True)
    for reg, name in ((procs, "p"), (rays, "r")):
        assert sorted(c.v for c in read_calls(tmp_path / name)) == list(range(n))
        assert assert_accounted(reg).delivered == n


def test_poison_in_a_batch_of_500_only_it_dead_lettered(rdist, tmp_path: Path) -> None:
    path = tmp_path / "calls"
    dead: list[Any] = []
    d = rdist()
    reg = d.add_listener(
        Recorder(str(path)),
        executor="ray",
        max_attempts=2,
        on_dead_letter=lambda r, n, why: dead.append((n, why)),
    )
    # Queued before start(): the 500 travel as one batch of one actor call.
    for i in range(500):
        extra = {"exit": "kill"} if i == 200 else {}
        d.distribute(fanout.Add(obj(f"o{i}", i, **extra)))
    d.start()
    assert d.stop(drain=True, timeout=90) is True  # (its dead letter came before)
    counts = Counter(c.name for c in read_calls(path))
    assert counts == Counter({f"o{i}": 1 for i in range(500) if i != 200})
    assert [n.obj["metadata"]["name"] for n, _ in dead] == ["o200"]
    s = assert_accounted(reg)
    assert (s.delivered, s.dead_lettered) == (499, 1)
    assert s.restarts >= 2


class SlowToRestart(Recorder):
    """A ``Recorder`` whose actor takes ``delay`` seconds to come back after its first start.

    Each actor start unpickles the handler: the first one leaves ``started`` behind.
    """

    def __init__(self, path: str, started: str, delay: float) -> None:
        super().__init__(path)
        self.started, self.delay = started, delay

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "producer": os.getpid()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if os.getpid() == state["producer"]:
            return  # the producer's own check that it pickles
        try:
            os.close(os.open(self.started, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            time.sleep(self.delay)  # a restart


def test_frames_wait_for_a_restarting_actor_and_are_not_charged_for_it(
    rdist, tmp_path: Path
) -> None:
    path = tmp_path / "calls"
    dead: list[Any] = []
    d = rdist()
    reg = d.add_listener(
        SlowToRestart(str(path), str(tmp_path / "started"), delay=3.0),
        executor="ray",
        max_attempts=2,
        on_dead_letter=lambda r, n, why: dead.append((n, why)),
    )
    # Queued before start(): one batch, in which o5 kills its actor each time it
    # runs. The frames after it must not be charged for the restarts' 3 seconds.
    for i in range(10):
        extra = {"exit": "kill"} if i == 5 else {}
        d.distribute(fanout.Add(obj(f"o{i}", i, **extra)))
    d.start()
    assert d.stop(drain=True, timeout=120) is True
    assert [n.obj["metadata"]["name"] for n, _ in dead] == ["o5"]
    counts = Counter(c.name for c in read_calls(path))
    assert counts == Counter({f"o{i}": 1 for i in range(10) if i != 5})
    s = assert_accounted(reg)
    assert (s.delivered, s.dead_lettered) == (9, 1)
    assert s.restarts >= 2


def test_handler_timeout_kills_and_dead_letters(rdist, tmp_path: Path) -> None:
    path = tmp_path / "calls"
    dead: list[Any] = []
    d = rdist()
    reg = d.add_listener(
        Recorder(str(path)),
        executor="ray",
        handler_timeout=0.5,
        max_attempts=2,
        on_dead_letter=lambda r, n, why: dead.append((n, why)),
    )
    d.start()
    d.distribute(fanout.Add(obj("before")))
    d.distribute(fanout.Add(obj("hangs", sleep=600)))
    d.distribute(fanout.Add(obj("after")))
    assert d.stop(drain=True, timeout=90) is True
    assert [c.name for c in read_calls(path)] == ["before", "after"]
    assert [n.obj["metadata"]["name"] for n, _ in dead] == ["hangs"]
    assert "handler_timeout=0.5" in dead[0][1]
    assert assert_accounted(reg).dead_lettered == 1


def test_sigkill_storm_loses_nothing(rdist, tmp_path: Path) -> None:
    path = tmp_path / "calls"
    dead: list[Any] = []
    d = rdist()
    reg = d.add_listener(
        Recorder(str(path)),
        executor="ray",
        workers=2,
        on_dead_letter=lambda r, n, why: dead.append(n),
    )
    d.start()
    ids = reg.actor_ids()  # type: ignore[attr-defined]
    total, kills, per_round = 20_000, 20, 1000
    sent = 0
    killed = {a: 0 for a in ids}
    for k in range(kills):
        for _ in range(per_round):
            d.distribute(fanout.Add(obj(f"k{sent % 300}", sent)))
            sent += 1
        victim = ids[k % 2]
        pid = _pid_of(victim, killed[victim])  # Ray restarted it since the last kill
        before = len(read_calls(path))
        wait_for(lambda before=before: len(read_calls(path)) > before, 30)  # flowing
        os.kill(pid, signal.SIGKILL)
        killed[victim] = pid
    assert sent == total
    assert d.stop(drain=True, timeout=120) is True or dead
    calls = read_calls(path)
    handled = {c.v for c in calls}
    lettered = {n.obj["v"] for n in dead}
    assert handled | lettered == set(range(total))
    _first_deliveries_in_order(calls)
    s = assert_accounted(reg)
    assert s.restarts >= kills
    assert s.delivered + s.dead_lettered == total


def test_overflow_error(rdist, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    d = rdist()
    reg = d.add_listener(
        Recorder(str(tmp_path / "e")), executor="ray", max_pending_bytes=4096, overflow="error"
    )
    d.start()
    d.distribute(fanout.Add(obj("first", 0, gate=str(gate))))
    with pytest.raises(ListenerFull, match="is full"):
        for i in range(1, 1000):
            d.distribute(fanout.Add(obj(f"o{i}", i)))
    refused = i
    assert reg.stats().received == refused
    gate.touch()
    assert d.stop(drain=True, timeout=60) is True
    s = assert_accounted(reg)
    assert s.delivered == refused and s.dropped == 0
    assert [c.v for c in read_calls(tmp_path / "e")] == list(range(refused))


def test_overflow_drop_oldest(rdist, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    d = rdist()
    reg = d.add_listener(
        Recorder(str(tmp_path / "o")),
        executor="ray",
        max_pending_bytes=4096,
        overflow="drop_oldest",
    )
    d.start()
    d.distribute(fanout.Add(obj("first", 0, gate=str(gate))))
    n = 500
    for i in range(1, n):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    gate.touch()
    assert d.stop(drain=True, timeout=60) is True  # (the drops came before)
    s = assert_accounted(reg)
    assert s.dropped > 0 and s.delivered + s.dropped == n
    got = [c.v for c in read_calls(tmp_path / "o")]
    assert got[-1] == n - 1  # the newest survived
    assert got == sorted(got)


def test_stop_drain_while_batches_in_flight(rdist, tmp_path: Path) -> None:
    path = tmp_path / "calls"
    d = rdist()
    reg = d.add_listener(Recorder(str(path)), executor="ray", workers=2)
    d.start()
    n = 5000
    for i in range(n):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    assert reg.stats().pending > 0  # still in flight
    assert d.stop(drain=True) is True
    assert len(read_calls(path)) == n
    assert assert_accounted(reg).delivered == n


def test_stop_without_drain_accounts_and_kills_actors(rdist, tmp_path: Path) -> None:
    path = tmp_path / "calls"
    d = rdist()
    reg = d.add_listener(Recorder(str(path)), executor="ray", workers=2)
    d.start()
    ids = reg.actor_ids()  # type: ignore[attr-defined]
    for i in range(3000):  # 15 s of work for 2 actors: a stop now must drop some
        d.distribute(fanout.Add(obj(f"o{i}", i, sleep=0.01)))
    assert wait_for(lambda: reg.stats().delivered > 0)
    d.stop(drain=False)
    s = assert_accounted(reg)
    assert s.dropped > 0 and s.delivered > 0
    assert [_actor_state(a)["State"] for a in ids] == ["DEAD", "DEAD"]
    with pytest.raises(fanout.DistributorStopped):
        d.distribute(fanout.Add(obj("late")))


def test_remove_listener_kills_its_actors(rdist, tmp_path: Path) -> None:
    d = rdist()
    reg = d.add_listener(Recorder(str(tmp_path / "c")), executor="ray")
    d.start()
    ids = reg.actor_ids()  # type: ignore[attr-defined]
    assert d.shutdown_listener(reg, timeout=30) is True
    assert [_actor_state(a)["State"] for a in ids] == ["DEAD"]
    assert not d.is_registered(reg)


def test_stop_waits_for_a_removed_listeners_sender_and_actors(rdist, tmp_path: Path) -> None:
    """remove_listener returns at once; the stop after it leaves no sender thread behind."""
    d = rdist()
    reg = d.add_listener(Recorder(str(tmp_path / "c")), executor="ray")
    d.start()
    ids = reg.actor_ids()  # type: ignore[attr-defined]
    d.remove_listener(reg)  # the sender kills the actors as it leaves, on its own
    assert d.stop() is True
    assert reg.exited() and not reg.thread.is_alive()  # type: ignore[attr-defined]
    assert [_actor_state(a)["State"] for a in ids] == ["DEAD"]


def test_schema_decodes_in_the_actor(rdist, tmp_path: Path) -> None:
    pytest.importorskip("msgspec")
    from test_schema import Pod, TypedRecorder

    path = tmp_path / "typed"
    d = rdist()
    reg = d.add_listener(TypedRecorder(str(path)), executor="ray", schema=Pod)
    d.start()
    d.distribute(fanout.Add({"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {}}))
    d.distribute(fanout.Add({"metadata": "not a Meta"}))
    assert d.stop(drain=True) is True
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["Pod"]
    assert lines[0]["obj"]["metadata"]["labels"] == {"a": "b"}
    s = assert_accounted(reg)
    assert (s.delivered, s.dead_lettered) == (1, 1)


# -- big buffers travel once, through Ray's object store --------------------------------


def test_big_buffers_are_put_once_for_every_ray_listener(rdist, tmp_path: Path) -> None:
    import numpy as np

    d = rdist()
    regs = [
        d.add_listener(BufferProbe(str(tmp_path / "a")), executor="ray", workers=2),
        d.add_listener(BufferProbe(str(tmp_path / "b")), executor="ray"),
    ]
    d.start()
    sent = {
        "floats": np.arange(1 << 17, dtype=np.float64),  # 1 MiB
        "fortran": np.asfortranarray(np.arange(300 * 400, dtype=np.int32).reshape(300, 400)),
        "strided": np.arange(1 << 18, dtype=np.float32)[::2],  # not contiguous
        "blob": bytes(range(256)) * 512,  # 128 KiB
        "small": np.ones(16),  # inline: below the threshold
    }
    for name, data in sent.items():
        d.distribute(fanout.Add({"name": name, "data": data, "metadata": {"name": name}}))
    store = d.ctx.ray_store
    assert store.puts == 4  # one each, whatever the number of listeners and lanes
    assert d.stop(drain=True) is True
    for path in ("a", "b"):
        got = {r["name"]: r for r in read_probes(tmp_path / path)}
        assert set(got) == set(sent)
        for name, data in sent.items():
            rec = got[name]
            if isinstance(data, bytes):
                assert (rec["type"], rec["sum"], rec["len"]) == ("bytes", sum(data), len(data))
                continue
            assert rec["type"] == "ndarray"
            assert (rec["sum"], rec["shape"], rec["dtype"]) == (
                float(data.sum()),
                list(data.shape),
                data.dtype.str,
            )
            if name != "small":
                assert (rec["writeable"], rec["write"]) == (False, "refused"), name
    for reg in regs:
        assert assert_accounted(reg).delivered == len(sent)
    assert store.held() == 0  # every lane let go: Ray may free the objects


def test_a_restarted_actor_gets_the_same_big_buffer(rdist, tmp_path: Path) -> None:
    import numpy as np

    d = rdist()
    reg = d.add_listener(BufferProbe(str(tmp_path / "p")), executor="ray")
    d.start()
    assert reg.wait_ready(60)
    pid = _pid_of(reg.actor_ids()[0])  # type: ignore[attr-defined]
    data = np.arange(1 << 17, dtype=np.float64)
    started, gate = tmp_path / "started", tmp_path / "gate"
    d.distribute(
        fanout.Add({"name": "big", "data": data, "started": str(started), "gate": str(gate)})
    )
    assert wait_for(started.exists, 60)
    os.kill(pid, signal.SIGKILL)  # mid-handler, holding the buffer
    gate.touch()
    assert d.stop(drain=True, timeout=120) is True
    (rec,) = read_probes(tmp_path / "p")
    assert rec["pid"] != pid and rec["sum"] == float(data.sum())
    s = assert_accounted(reg)
    # (a call the restarted actor refused as stale may count a second restart)
    assert s.delivered == 1 and s.restarts >= 1
    assert d.ctx.ray_store.held() == 0


def test_stop_without_drain_lets_go_of_every_big_buffer(rdist, tmp_path: Path) -> None:
    import numpy as np

    d = rdist()
    reg = d.add_listener(BufferProbe(str(tmp_path / "p")), executor="ray")
    d.start()
    gate = tmp_path / "gate"
    for i in range(5):
        d.distribute(fanout.Add({"name": f"b{i}", "data": np.full(1 << 14, i), "gate": str(gate)}))
    store = d.ctx.ray_store
    assert store.held() == 5
    d.stop(drain=False)
    gate.touch()
    s = assert_accounted(reg)
    assert s.dropped + s.delivered == 5
    assert store.held() == 0


def test_a_drop_on_one_ray_listener_leaves_the_buffer_to_the_others(rdist, tmp_path: Path) -> None:
    import numpy as np

    d = rdist()
    gate = tmp_path / "gate"
    full = d.add_listener(
        BufferProbe(str(tmp_path / "full")),
        executor="ray",
        name="full",
        max_pending_bytes=1024,
        overflow="drop_newest",
    )
    oldest = d.add_listener(
        BufferProbe(str(tmp_path / "oldest")),
        executor="ray",
        name="oldest",
        max_pending_bytes=1024,
        overflow="drop_oldest",
    )
    free = d.add_listener(
        BufferProbe(str(tmp_path / "free"), obey_gate=False), executor="ray", name="free"
    )
    d.start()
    n = 300
    for i in range(n):  # the gated listeners fill up and drop; the free one gets all
        d.distribute(fanout.Add({"name": f"b{i}", "data": np.full(1 << 14, i), "gate": str(gate)}))
    store = d.ctx.ray_store
    # What the bounded listeners dropped is let go at once: only frames some ring
    # still holds (at most ~1 KiB of references each) keep their buffer.
    assert wait_for(lambda: free.stats().delivered == n, 120)
    held = [len(lane.tokens) for r in (full, oldest, free) for lane in r.lanes]  # type: ignore[attr-defined]
    assert store.held() < 120, (store.held(), held)
    gate.touch()
    assert d.stop(drain=True, timeout=120) is True
    got = read_probes(tmp_path / "free")
    assert sorted(r["sum"] for r in got) == sorted(float(i * (1 << 14)) for i in range(n))
    for reg in (full, oldest):
        s = assert_accounted(reg)
        assert s.dropped > 0 and s.delivered == len(read_probes(tmp_path / reg.name))
    assert store.held() == 0


def test_errors_and_dead_letters_show_this_distributors_buffer(rdist, tmp_path: Path) -> None:
    import numpy as np

    other = rdist()  # another distributor's buffers, under the same tokens if shared
    other.add_listener(BufferProbe(str(tmp_path / "other")), executor="ray")
    other.start()
    other.distribute(fanout.Add({"name": "zeros", "data": np.zeros(1 << 14)}))
    errors: list[Any] = []
    dead: list[Any] = []
    d = rdist()
    d.add_listener(
        BufferProbe(str(tmp_path / "p")),
        executor="ray",
        on_error=lambda r, n, text: errors.append(n),
        on_dead_letter=lambda r, n, why: dead.append(n),
    )
    d.start()
    ones = np.ones(1 << 14)
    d.distribute(fanout.Add({"name": "raises", "data": ones, "raise": True}))
    gate = tmp_path / "gate"
    d.distribute(fanout.Add({"name": "stuck", "data": ones * 2, "gate": str(gate)}))
    d.distribute(fanout.Add({"name": "behind", "data": ones * 3}))
    assert wait_for(lambda: errors, 60)
    assert d.stop(drain=True, timeout=1) is False  # "stuck" never returns
    assert errors[0].obj["name"] == "raises" and float(errors[0].obj["data"].sum()) == 1 << 14
    assert [n.obj["name"] for n in dead] == ["stuck", "behind"][: len(dead)] and dead
    for n in dead:  # decoded before the stop let go of the buffers
        assert float(n.obj["data"].sum()) > 1 << 14
    assert d.ctx.ray_store.held() == 0


def test_an_initial_list_of_big_buffers_on_a_running_distributor(rdist, tmp_path: Path) -> None:
    import numpy as np

    d = rdist()
    d.start()
    items = [{"name": f"i{k}", "data": np.full(1 << 14, k)} for k in range(3)]
    reg = d.add_listener(BufferProbe(str(tmp_path / "p")), executor="ray", initial_list=items)
    assert d.stop(drain=True) is True
    assert sorted(r["name"] for r in read_probes(tmp_path / "p")) == ["i0", "i1", "i2"]
    assert assert_accounted(reg).delivered == 3
    assert d.ctx.ray_store.held() == 0


def test_memory_limit_kills_and_dead_letters(rdist, tmp_path: Path) -> None:
    from test_containment import Hog

    limit = 512 << 20  # a Ray worker alone holds far more than a fanout worker
    path = tmp_path / "calls"
    dead: list[Any] = []
    d = rdist()
    reg = d.add_listener(
        Hog(str(path)),
        executor="ray",
        memory_limit=limit,
        max_attempts=2,
        on_dead_letter=lambda r, n, why: dead.append((n, why)),
    )
    d.start()
    d.distribute(fanout.Add(obj("before")))
    d.distribute(fanout.Add(obj("hog", hog="self", size=768 << 20)))
    d.distribute(fanout.Add(obj("after")))
    assert d.stop(drain=True, timeout=120) is True
    assert [c.name for c in read_calls(path)] == ["before", "after"]
    assert [n.obj["metadata"]["name"] for n, _ in dead] == ["hog"]
    assert f"memory_limit={limit} bytes" in dead[0][1]
    assert assert_accounted(reg).dead_lettered == 1


def test_a_memory_limit_below_what_an_actor_holds_at_rest_is_a_start_error(rdist) -> None:
    d = rdist()
    d.start()
    limit = 16 << 20  # enough for a fanout worker process, not for a Ray actor
    with pytest.raises(fanout.WorkerStartError, match="holds at rest") as info:
        d.add_listener(Noop(), executor="ray", memory_limit=limit)
    assert f"memory_limit={limit} bytes" in info.value.text
    assert d.listener_count == 0


# -- lifecycle edges (issue 19): no Ray wait and no callback under the lock ---------------


def test_callbacks_run_without_the_lock_and_may_add_and_remove(
    rdist, tmp_path: Path, monkeypatch: Any
) -> None:
    from fanout.listeners.ray import RayListener

    d = rdist()
    owned: list[tuple[str, bool]] = []
    real_kill = RayListener._kill_actors

    def kill_actors(self: Any) -> None:
        owned.append(("kill", d.lock._is_owned()))
        real_kill(self)

    monkeypatch.setattr(RayListener, "_kill_actors", kill_actors)
    refused: list[str] = []
    added: list[Any] = []

    def callback(kind: str) -> Any:
        def call(reg: Any, n: Any, text: str) -> None:
            owned.append((kind, d.lock._is_owned()))
            try:
                d.stop()
            except RuntimeError as exc:
                refused.append(str(exc))
            new = d.add_listener(Recorder(str(tmp_path / "t")), executor="thread")
            added.append(new)
            d.remove_listener(new)

        return call

    reg = d.add_listener(
        Recorder(str(tmp_path / "c")),
        executor="ray",
        schema=dict[str, Any],  # an object that does not fit is dead-lettered
        on_error=callback("on_error"),
        on_dead_letter=callback("on_dead_letter"),
    )
    gone = d.add_listener(Recorder(str(tmp_path / "g")), executor="ray")
    d.start()
    assert gone.wait_ready(60)
    ids = gone.actor_ids()  # type: ignore[attr-defined]
    d.remove_listener(gone)  # its sender kills the actors, not the caller under the lock
    assert wait_for(lambda: _actor_state(ids[0])["State"] == "DEAD", 60)
    d.distribute(fanout.Add(obj("bad", **{"raise": True})))
    d.distribute(fanout.Add([1, 2]))  # does not fit the schema: dead-lettered
    assert wait_for(lambda: len(added) == 2, 60)
    assert sorted(k for k, _ in owned if k != "kill") == ["on_dead_letter", "on_error"]
    assert d.stop(drain=True, timeout=60) is True
    assert len(refused) == 2 and all("would wait for itself" in r for r in refused)
    assert [k for k, _ in owned].count("kill") >= 2 and not any(o for _, o in owned), owned
    s = assert_accounted(reg)
    assert (s.errors, s.dead_lettered) == (1, 1)
    assert_accounted(gone)


def test_a_ray_listener_that_cannot_start_added_from_a_callback_is_reported(
    rdist, tmp_path: Path, caplog: Any
) -> None:
    d = rdist()
    added: list[Any] = []
    dead: list[str] = []

    def on_error(reg: Any, n: Any, text: str) -> None:
        if not added:
            added.append(
                d.add_listener(
                    FailingFactory(),
                    name="bad-ray",
                    executor="ray",
                    on_dead_letter=lambda r, n, why: dead.append(why),
                )
            )

    d.add_listener(Recorder(str(tmp_path / "c")), on_error=on_error)
    d.start()
    d.distribute(fanout.Add(obj("x", **{"raise": True})))
    assert wait_for(lambda: added, 60)
    (bad,) = added
    for i in range(20):
        d.distribute(fanout.Add(obj(f"o{i}")))
    assert wait_for(lambda: bad.stats().start_error is not None, 120)
    assert wait_for(lambda: bad.stats().pending == 0, 60)
    s = bad.stats()
    assert "factory refuses to build the handler" in s.start_error and s.start_failed == 1
    assert "could not start" in caplog.text
    assert wait_for(lambda: len(dead) == s.dead_lettered == s.received, 60)  # counted first
    assert all("could not start" in why for why in dead)
    assert d.stop(drain=True, timeout=60) is True
    assert_accounted(bad)


def _actor_pids(reg: Any) -> list[int]:
    """The pids of a Ray listener's actors Ray reports alive (none for other kinds)."""
    if reg.executor != "ray":
        return []
    states = [_actor_state(a) for a in reg.actor_ids()]
    return [int(st["Pid"]) for st in states if st["State"] == "ALIVE" and st.get("Pid")]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_callbacks_add_remove_and_stop_while_notifications_flow_with_kills(rdist) -> None:
    faulthandler.dump_traceback_later(360)  # a hang shows every thread's stack
    try:
        d = rdist()
        every, refused, kills, sent = churn_stress(
            d,
            ["thread", "ray"],
            _actor_pids,
            kills=4,
            notifications=1000,
            max_extra=3,
            kill_every=0.5,
        )
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert d.stopped and refused and all("would wait for itself" in r for r in refused)
    assert kills >= 4 and len(every) > 4  # the callbacks did add listeners
    assert any(r.executor == "ray" for r in every[3:]), [r.executor for r in every]
    assert sum(r.stats().restarts for r in every if r.executor == "ray") >= 1  # Ray restarted
    for reg in every:
        assert_accounted(reg)
    assert every[2].stats().received == sent  # the thread listener was never removed
