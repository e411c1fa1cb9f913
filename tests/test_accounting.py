"""Every notification accounted for: fail fast, no silent edges, the invariant.

After ``stop()`` returns, each listener's ``received == delivered + dead_lettered +
dropped``; a handler the workers cannot load is refused where the mistake was
made; nothing is dropped without being counted or reported.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import typing
from pathlib import Path

import msgpack
import numpy as np
import pytest
from helpers import (
    Collector,
    FailingFactory,
    Noop,
    PickyCodec,
    Recorder,
    ReprWriter,
    UnpicklableInWorker,
    assert_accounted,
    obj,
    read_calls,
    returns_none,
    wait_calls,
    wait_for,
)

import fanout

pytestmark = pytest.mark.timeout(120)

EXECUTORS = ["process", "thread"]
REPO = Path(__file__).resolve().parent.parent
README_EXAMPLE = REPO / "README.md"


def _python(code: str, *args: str, cwd: Path | None = None, stdin: str | None = None):
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run(
        [sys.executable, *args] if stdin is not None else [sys.executable, "-c", code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=90,
    )


# -- fail fast ---------------------------------------------------------------------------

MAIN_SCRIPT = """
import fanout

class Printer(fanout.Handler):
    def on_update(self, old, new):
        print("handled", new["v"])

def on_update(old, new):
    print("handled", new["v"])

with fanout.Distributor() as d:
    d.add_listener({handler}{options})
    d.distribute(fanout.Update({{"v": 1}}, {{"v": 2}}))
print("done")
"""


@pytest.mark.parametrize(
    "handler", ["Printer()", "Printer", "fanout.FuncHandler(on_update=on_update)"]
)
@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_handler_from_a_fileless_main_is_refused(handler, how):
    script = MAIN_SCRIPT.format(handler=handler, options="")
    if how == "stdin":
        proc = _python("", "-", stdin=script)
    else:
        proc = _python(script)
    assert proc.returncode != 0, proc.stdout
    assert "TypeError" in proc.stderr, proc.stderr
    assert "__main__ has no file" in proc.stderr
    assert "a module the workers can import" in proc.stderr
    assert "executor='thread'" in proc.stderr
    assert "done" not in proc.stdout


def test_thread_executor_works_from_a_fileless_main():
    script = MAIN_SCRIPT.format(handler="Printer()", options=", executor='thread'")
    proc = _python("", "-", stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["handled", "2", "done"]


def _readme_example() -> str:
    text = README_EXAMPLE.read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_runs_as_a_file(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_readme_example())
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "web-1 changed" in proc.stdout
    assert "delivered=1" in proc.stdout and "dead_lettered=0" in proc.stdout


def test_readme_example_from_stdin_fails_fast_and_clearly(tmp_path):
    proc = _python("", "-", stdin=_readme_example(), cwd=tmp_path)
    assert proc.returncode != 0
    assert "__main__ has no file" in proc.stderr, proc.stderr
    assert "changed" not in proc.stdout


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (UnpicklableInWorker(), "refuses to be rebuilt"),
        (FailingFactory(), "factory refuses to build the handler"),
        (returns_none, "returned NoneType"),
        (print, "returned NoneType"),
    ],
    ids=["unpickle", "factory-raises", "factory-returns-none", "print"],
)
def test_start_raises_worker_start_error(make_dist, handler, expected):
    d = make_dist()
    d.add_listener(Noop(), name="fine")
    d.add_listener(handler, name="broken", workers=2)
    d.distribute(fanout.Add(obj("queued")))
    with pytest.raises(fanout.WorkerStartError) as info:
        d.start()
    assert isinstance(info.value, RuntimeError)
    assert info.value.listener == "broken"
    assert expected in info.value.text and "Traceback" in info.value.text
    assert d.stopped  # nothing left half-started


def test_add_listener_on_a_running_distributor_raises_worker_start_error(make_dist, tmp_path):
    d = make_dist()
    d.start()
    good = d.add_listener(Recorder(tmp_path / "good"))
    with pytest.raises(fanout.WorkerStartError, match="factory refuses"):
        d.add_listener(FailingFactory(), name="broken")
    assert d.listener_count == 1 and d.is_registered(good)
    d.distribute(fanout.Add(obj("after")))
    assert d.stop(drain=True)
    assert [c.name for c in read_calls(tmp_path / "good")] == ["after"]


def test_a_handler_module_the_worker_cannot_import(make_dist):
    import types

    module = types.ModuleType("fanout_test_only_in_the_producer")
    exec("import fanout\nclass H(fanout.Handler):\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        d = make_dist()
        d.add_listener(module.H())
        with pytest.raises(fanout.WorkerStartError, match="fanout_test_only_in_the_producer"):
            d.start()
    finally:
        del sys.modules[module.__name__]


def test_start_cost_waits_for_workers_in_parallel(make_dist):
    # Behaviour, not speed: after start() returns every worker is ready.
    d = make_dist()
    regs = [d.add_listener(Noop(), workers=2) for _ in range(4)]
    d.start()
    assert all(r.ready() for r in regs)
    assert all(len(r.worker_pids()) == 2 for r in regs)


# -- the accounting invariant ------------------------------------------------------------


@pytest.mark.parametrize("executor", EXECUTORS)
def test_invariant_after_a_full_drain(make_dist, tmp_path, executor):
    d = make_dist()
    errors = Collector()
    reg = d.add_listener(Recorder(tmp_path / "r"), executor=executor, on_error=errors)
    d.start()
    for i in range(200):
        d.distribute(fanout.Add(obj(f"o{i}", i, raise_=True) if i % 50 == 0 else obj(f"o{i}")))
    assert d.stop(drain=True)
    s = assert_accounted(reg)
    assert s.received == 200 and s.delivered == 200 and s.dropped == s.dead_lettered == 0


@pytest.mark.parametrize("executor", EXECUTORS)
def test_stop_without_drain_counts_what_it_discards_as_dropped(make_dist, tmp_path, executor):
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), executor=executor)
    d.start()
    d.distribute(fanout.Add(obj("first", gate=str(gate))))
    for i in range(100):
        d.distribute(fanout.Add(obj(f"o{i}")))
    wait_for(lambda: reg.stats().latency_p50 is not None)  # the first call began
    stopper = threading.Thread(target=lambda: results.append(d.stop(drain=False)))
    results: list[bool] = []
    stopper.start()
    wait_for(lambda: d.stopping)
    gate.touch()  # let the running call finish
    stopper.join(60)
    assert results == [False]  # something was dropped, and stop says so
    s = assert_accounted(reg)
    assert s.received == 101 and s.dropped >= 99 and s.dead_lettered == 0


@pytest.mark.parametrize("executor", EXECUTORS)
def test_stop_drain_timeout_dead_letters_the_rest(make_dist, tmp_path, executor):
    gate = tmp_path / "gate"
    dead = Collector()
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), executor=executor, on_dead_letter=dead)
    d.start()
    d.distribute(fanout.Add(obj("slow", gate=str(gate))))
    for i in range(20):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    wait_for(lambda: reg.stats().latency_p50 is not None)
    releaser = threading.Timer(0.5, gate.touch)  # after the drain gave up
    releaser.start()
    try:
        assert d.stop(drain=True, timeout=0.2) is False
    finally:
        releaser.join()
    s = assert_accounted(reg)
    assert s.dead_lettered >= 20 and len(dead) == s.dead_lettered
    for _, n, why in dead.snapshot():
        assert isinstance(n, fanout.Add) and n.obj["metadata"]["name"].startswith("o")
        assert "gave up before it was delivered" in why


def test_never_started_distributor_dead_letters_its_backlog(make_dist):
    dead = Collector()
    d = make_dist()
    regs = [
        d.add_listener(Noop(), executor=executor, on_dead_letter=dead) for executor in EXECUTORS
    ]
    for i in range(5):
        d.distribute(fanout.Add(obj(f"o{i}")))
    assert d.stop() is False
    for reg in regs:
        s = assert_accounted(reg)
        assert s.received == 5 and s.dead_lettered == 5
    assert len(dead) == 10
    assert all("without ever being started" in why for _, _, why in dead.snapshot())


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_invariant_with_drops(make_dist, tmp_path, policy):
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(
        Recorder(tmp_path / "r"), max_pending_bytes=2000, overflow=policy, workers=1
    )
    d.start()
    d.distribute(fanout.Add(obj("gate", gate=str(gate))))
    for i in range(300):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    gate.touch()
    assert d.stop(drain=True)
    s = assert_accounted(reg)
    assert s.received == 301 and s.dropped > 0


def test_distribute_racing_stop_is_delivered_counted_or_refused(make_dist, tmp_path):
    d = make_dist()
    regs = [d.add_listener(Noop()), d.add_listener(Noop(), executor="thread")]
    d.start()
    sent = 0
    refused = threading.Event()

    def produce() -> None:
        nonlocal sent
        while True:
            try:
                d.distribute(fanout.Add(obj("x", sent)))
            except fanout.DistributorStopped:
                refused.set()
                return
            sent += 1

    t = threading.Thread(target=produce)
    t.start()
    wait_for(lambda: sent > 2000)
    d.stop(drain=True)
    t.join(30)
    assert refused.is_set()
    for reg in regs:
        s = assert_accounted(reg)
        assert sent <= s.received <= sent + 1  # the refused call may have reached it


def test_leaving_a_with_block_that_lost_notifications_warns_and_keeps_the_error(
    no_leaks, tmp_path, caplog
):
    gate = tmp_path / "gate"
    with pytest.raises(KeyError, match="from the block"):  # not masked
        with fanout.Distributor() as d:
            reg = d.add_listener(Recorder(tmp_path / "r"), name="slowpoke")
            d.distribute(fanout.Add(obj("slow", gate=str(gate))))
            for i in range(10):
                d.distribute(fanout.Add(obj(f"o{i}")))
            wait_for(lambda: reg.stats().latency_p50 is not None)
            threading.Timer(0.3, gate.touch).start()
            with caplog.at_level(logging.WARNING, logger="fanout"):
                raise KeyError("from the block")
    s = assert_accounted(reg)
    assert s.dropped == 10
    warning = [r.getMessage() for r in caplog.records if "with block" in r.getMessage()]
    assert warning and "'slowpoke': 0 dead-lettered, 10 dropped" in warning[0]


# -- no silent edges ---------------------------------------------------------------------


def test_block_listener_full_before_start_raises_instead_of_waiting(make_dist):
    d = make_dist()
    other = d.add_listener(Noop())
    d.add_listener(Noop(), max_pending_bytes=300, overflow="block", workers=2)
    d.distribute(fanout.Add(obj("a")))
    with pytest.raises(fanout.ListenerFull, match="before start"):
        for i in range(100):
            d.distribute(fanout.Add(obj(f"o{i}")))
    received = other.stats().received
    assert received == i + 1  # the refused notification reached no listener


@pytest.mark.parametrize("codec", ["msgpack", "msgspec"])
def test_tuple_keys_arrive_as_a_thread_listener_sees_them(make_dist, tmp_path, codec):
    seen = tmp_path / "seen"
    d = make_dist(codec=codec)
    d.add_listener(ReprWriter(str(seen)))
    d.start()
    value = {(1, "a"): "pair", "n": [1, 2], "nested": {("x", 2): {"k": 1}}}
    d.distribute(fanout.Add(value))
    assert d.stop(drain=True)
    got = seen.read_text()
    assert "(1, 'a'): 'pair'" in got and "('x', 2)" in got


def test_undecodable_frame_reaches_on_dead_letter_as_a_raw_frame(make_dist, tmp_path):
    dead = Collector()
    d = make_dist(codec=PickyCodec())
    reg = d.add_listener(Recorder(tmp_path / "r"), on_dead_letter=dead)
    d.start()
    d.distribute(fanout.Add(obj("bad", undecodable=True)))
    d.distribute(fanout.Add(obj("good")))
    assert d.stop(drain=True)
    assert [c.name for c in read_calls(tmp_path / "r")] == ["good"]
    ((_, raw, why),) = dead.snapshot()
    assert isinstance(raw, fanout.RawFrame)
    assert "cannot decode that object" in raw.error and "cannot decode" in why
    _kind, _, payload_obj, _ = msgpack.unpackb(raw.payload, raw=False)
    assert payload_obj["metadata"]["name"] == "bad"
    assert_accounted(reg)


def test_options_are_literal_types():
    hints = typing.get_type_hints(fanout.Distributor.add_listener)
    assert typing.get_args(hints["executor"]) == ("process", "thread", "ray")
    assert set(typing.get_args(hints["overflow"])) == {
        "block",
        "drop_oldest",
        "drop_newest",
        "error",
    }
    init = typing.get_type_hints(fanout.Distributor.__init__)
    assert typing.get_args(init["start_method"]) == ("forkserver", "spawn")
    assert ("msgpack", "msgspec") in [typing.get_args(a) for a in typing.get_args(init["codec"])]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"handler_timeout": -1}, "handler_timeout must be a finite number of seconds > 0"),
        ({"handler_timeout": 0}, "handler_timeout must be a finite number of seconds > 0"),
        ({"max_pending_bytes": 1}, "max_pending_bytes must exceed the 12-byte frame header"),
    ],
)
def test_clear_option_errors(make_dist, kwargs, message):
    d = make_dist()
    with pytest.raises(ValueError, match=message) as info:
        d.add_listener(Noop(), **kwargs)
    assert "max_bytes=" not in str(info.value)


def test_one_argument_function_points_to_funchandler(make_dist):
    d = make_dist()
    with pytest.raises(TypeError, match=r"fanout\.FuncHandler"):
        d.add_listener(lambda new: None)


def test_huge_int_message_says_what_to_do(make_dist):
    d = make_dist()
    d.add_listener(Noop())
    with pytest.raises(TypeError, match=r"integer 1180591620717411303424.*send a larger number"):
        d.distribute(fanout.Add({"n": 2**70}))


# -- workers import the producer's fanout ------------------------------------------------

DECOY_SCRIPT = """
import sys
import fanout
from helpers import Recorder

if __name__ == "__main__":
    with fanout.Distributor(start_method=sys.argv[2]) as d:
        d.add_listener(Recorder(sys.argv[1]))
        d.distribute(fanout.Add({"metadata": {"name": "through"}}))
    print("ok")
"""


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
@pytest.mark.parametrize("decoy", ["namespace", "package"])
def test_workers_import_the_producers_fanout_despite_a_decoy(tmp_path, start_method, decoy):
    decoy_dir = tmp_path / "cwd" / "fanout"
    decoy_dir.mkdir(parents=True)
    if decoy == "package":
        (decoy_dir / "__init__.py").write_text("raise ImportError('decoy fanout imported')\n")
    script = tmp_path / "run.py"
    script.write_text(DECOY_SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parent)  # for helpers.Recorder
    out = tmp_path / "calls"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), start_method],
        capture_output=True,
        text=True,
        cwd=decoy_dir.parent,
        env=env,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert [c.name for c in wait_calls(out, 1)] == ["through"]


# -- defects found in review --------------------------------------------------------------


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("impl", ["native", "py"])
def test_a_pump_dropped_without_close_frees_its_eventfd(impl):
    import gc

    from fanout import _pump_py

    if impl == "native":
        if not fanout.NATIVE:
            pytest.skip("native pump not built")
        from fanout import _pump as module  # type: ignore[attr-defined]
    else:
        module = _pump_py
    before = _open_fds()
    pump = module.Pump()
    assert _open_fds() - before  # it holds an eventfd
    del pump
    gc.collect()
    assert _open_fds() - before == set()


def test_lane_ack_cannot_race_a_rewind(ring_impl):
    # Lane.ack used to read the done word and sent_seq outside the ring's lock;
    # a rewind in between made it ack beyond what was sent (ValueError out of
    # distribute or stats). The ring now does the whole ack under its lock.
    words = np.zeros(1, dtype=np.uint64)
    ring = ring_impl.FrameRing()
    ring.set_ack_source(words)
    r, w = os.pipe()
    try:
        for i in range(5):
            ring.append(b"f%d" % i)
        ring.send_to(w)
        words[0] = 5
        ring.rewind()  # the supervisor restarting the worker: sent_seq falls back
        assert ring.ack_from_source() == 0  # nothing sent since: nothing to ack
        ring.send_to(w)
        assert ring.ack_from_source() == 5
    finally:
        os.close(r)
        os.close(w)


def test_a_worker_running_another_fanout_refuses_to_start(make_dist, monkeypatch):
    from fanout import listener

    # As if the worker had imported a fanout from elsewhere (a shadowing folder).
    monkeypatch.setattr(listener, "PRODUCER_FANOUT", ("/elsewhere/fanout", "0.0.0"))
    d = make_dist()
    d.add_listener(Noop())
    with pytest.raises(fanout.WorkerStartError, match="shadows the producer's package"):
        d.start()
