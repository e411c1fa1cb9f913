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
from typing import Any

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
    distribute_behind_gate,
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


def _env_with_tests() -> dict[str, str]:
    """This environment, with helpers.py importable and fanout found where this run found it
    (installed, or on PYTHONPATH)."""
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    env.pop("PYTHONSAFEPATH", None)
    return env


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


class Producer(threading.Thread):
    """Distributes without pause until the distributor refuses (DistributorStopped)."""

    def __init__(self, d: fanout.Distributor) -> None:
        super().__init__()
        self.d = d
        self.sent = 0
        self.refused = False
        self.start()

    def run(self) -> None:
        while True:
            try:
                self.d.distribute(fanout.Add(obj("x", self.sent)))
            except fanout.DistributorStopped:
                self.refused = True
                return
            self.sent += 1

    def join(self, timeout: float | None = 30) -> int:  # type: ignore[override]
        """Wait for the refusal; return how many notifications were accepted."""
        super().join(timeout)
        assert self.refused, "distribute was never refused"
        return self.sent


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


GUARDED_SCRIPT = """
import fanout
{above}
if __name__ == "__main__":
    class Printer(fanout.Handler):
        def on_update(self, old, new):
            print("handled", new["v"])

    with fanout.Distributor() as d:
        d.add_listener(Printer(){options})
        d.distribute(fanout.Update({{"v": 1}}, {{"v": 2}}))
    print("done")
"""


def test_handler_defined_under_the_main_guard_is_refused_with_a_hint(tmp_path):
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED_SCRIPT.format(above="", options=""))
    proc = _python("", str(script), stdin="", cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "TypeError" in proc.stderr, proc.stderr
    assert 'uses Printer, defined under `if __name__ == "__main__":`' in proc.stderr
    assert "Define it at module level" in proc.stderr
    assert "Can't get attribute" not in proc.stderr  # refused before any worker tried
    assert "done" not in proc.stdout


@pytest.mark.parametrize(
    ("above", "options"),
    [
        ("", ", executor='thread'"),  # no worker imports the script
        ("class Printer(fanout.Handler): pass", ""),  # bound at module level as well
    ],
    ids=["thread", "also-at-module-level"],
)
def test_a_guarded_definition_is_refused_only_when_workers_cannot_find_it(
    tmp_path, above, options
):
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED_SCRIPT.format(above=above, options=options))
    proc = _python("", str(script), stdin="", cwd=tmp_path)
    assert "defined under" not in proc.stderr, proc.stderr
    if options:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["handled", "2", "done"]


def _readme_example(index: int = 0) -> str:
    text = README_EXAMPLE.read_text()
    return text.split("```python\n")[1 + index].split("```", 1)[0]


def test_readme_schema_example_runs_as_a_file(tmp_path):
    pytest.importorskip("msgspec")
    script = tmp_path / "schema_example.py"
    script.write_text(_readme_example(1))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "web-1 is now Running"


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


def test_a_worker_that_ended_before_fanout_watched_it_still_tells_why(make_dist, monkeypatch):
    """Its messages are read after its warden was reaped: the reason is not lost."""
    from multiprocessing.connection import wait

    from fanout.listeners.process import Lane

    real_launch = Lane.launch

    def launch(lane):
        worker = real_launch(lane)
        assert wait([worker[0].sentinel], 60)  # it has ended before it is attached
        return worker

    monkeypatch.setattr(Lane, "launch", launch)
    d = make_dist()
    d.add_listener(print, name="broken")
    with pytest.raises(fanout.WorkerStartError) as info:
        d.start()
    assert "returned NoneType" in info.value.text and "Traceback" in info.value.text


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
    distribute_behind_gate(d, gate, 100)
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
    distribute_behind_gate(d, gate, 20, versions=True)
    wait_for(lambda: reg.stats().latency_p50 is not None)
    releaser = threading.Timer(0.5, gate.touch)  # after the drain gave up
    releaser.start()
    try:
        assert d.stop(drain=True, timeout=0.2) is False
    finally:
        releaser.join()
    # A thread cannot be stopped: the call it was in ends after the gate opens.
    wait_for(lambda: reg.stats().pending == 0)
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
    distribute_behind_gate(d, gate, 300, versions=True)
    gate.touch()
    assert d.stop(drain=True)
    s = assert_accounted(reg)
    assert s.received == 301 and s.dropped > 0


def test_distribute_racing_stop_is_delivered_counted_or_refused(make_dist, tmp_path):
    d = make_dist()
    regs = [d.add_listener(Noop()), d.add_listener(Noop(), executor="thread")]
    d.start()
    producer = Producer(d)
    wait_for(lambda: producer.sent > 2000)
    d.stop(drain=True)
    sent = producer.join()
    for reg in regs:
        s = assert_accounted(reg)
        assert sent <= s.received <= sent + 1  # the refused call may have reached it


def test_leaving_a_with_block_on_an_error_still_drains(no_leaks, tmp_path, caplog):
    gate = tmp_path / "gate"
    with pytest.raises(KeyError, match="from the block"):  # not masked
        with fanout.Distributor() as d:
            reg = d.add_listener(Recorder(tmp_path / "r"), name="slowpoke")
            distribute_behind_gate(d, gate, 10)
            threading.Timer(0.3, gate.touch).start()
            raise KeyError("from the block")
    s = assert_accounted(reg)
    assert s.delivered == 11 and s.dropped == 0
    assert not [r for r in caplog.records if "with block" in r.getMessage()]


def test_leaving_a_with_block_on_an_interrupt_drops_and_warns(no_leaks, tmp_path, caplog):
    gate = tmp_path / "gate"
    with pytest.raises(SystemExit):  # not masked
        with fanout.Distributor() as d:
            reg = d.add_listener(Recorder(tmp_path / "r"), name="slowpoke")
            distribute_behind_gate(d, gate, 10)
            wait_for(lambda: reg.stats().latency_p50 is not None)
            threading.Timer(0.3, gate.touch).start()
            with caplog.at_level(logging.WARNING, logger="fanout"):
                raise SystemExit(3)
    s = assert_accounted(reg)
    assert s.dropped == 10
    warning = [r.getMessage() for r in caplog.records if "with block" in r.getMessage()]
    assert warning and "'slowpoke': 0 dead-lettered, 10 dropped" in warning[0]


def test_a_callback_may_call_stop_while_stop_runs_it(make_dist):
    d = make_dist()
    answers: list[bool] = []
    d.add_listener(Noop(), on_dead_letter=lambda reg, n, why: answers.append(d.stop()))
    for i in range(3):
        d.distribute(fanout.Add(obj(f"o{i}")))
    assert d.stop() is False  # never started: its backlog is dead-lettered
    assert answers == [True, True, True]


def test_dead_letters_at_stop_log_one_line_per_listener(make_dist, caplog):
    dead = Collector()
    d = make_dist()
    d.add_listener(Noop(), name="backlog", on_dead_letter=dead)
    for i in range(50):
        d.distribute(fanout.Add(obj(f"o{i}")))
    with caplog.at_level(logging.WARNING, logger="fanout"):
        d.stop()
    lines = [r.getMessage() for r in caplog.records if "backlog" in r.getMessage()]
    assert len(lines) == 1 and "50 notifications dead-lettered" in lines[0]
    assert len(dead) == 50


def test_a_raw_frame_shows_its_size_not_its_bytes():
    raw = fanout.RawFrame(b"x" * 1_000_000, "too odd")
    assert len(repr(raw)) < 200 and "1000000 bytes" in repr(raw)


def test_a_stop_interrupted_midway_is_finished_by_the_next_one(make_dist, tmp_path, monkeypatch):
    from fanout.core.distributor import Distributor

    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"))
    d.start()
    distribute_behind_gate(d, gate, 10)
    real = Distributor._reap

    def interrupted(self, listeners, timeout, at_exit=False):
        monkeypatch.setattr(Distributor, "_reap", real)
        raise KeyboardInterrupt  # Ctrl-C while stop() waits for the workers

    monkeypatch.setattr(Distributor, "_reap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        d.stop(drain=False)
    gate.touch()
    assert d.stop(drain=False) is False
    s = assert_accounted(reg)
    assert s.received == 11 and s.dropped >= 10


def test_a_thread_handler_slower_than_a_second_is_waited_for(make_dist, tmp_path):
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), executor="thread")
    d.start()
    distribute_behind_gate(d, gate, 30)  # in the same batch as the slow one
    wait_for(lambda: reg.stats().latency_p50 is not None)
    threading.Timer(1.5, gate.touch).start()
    assert d.stop(drain=False) is False
    s = assert_accounted(reg)  # right when stop returns, not later
    assert s.received == 31 and s.dropped == 30
    assert not reg.ready()  # its thread is gone


def test_add_listener_from_a_callback_does_not_hold_up_supervision(make_dist, tmp_path):
    d = make_dist()
    added: list[Any] = []

    def on_error(reg, n, text):
        if not added:
            added.append(d.add_listener(Recorder(tmp_path / "late")))

    d.add_listener(Recorder(tmp_path / "r"), on_error=on_error)
    d.start()
    d.distribute(fanout.Add(obj("boom", **{"raise": True})))
    # The wait for a new listener's first worker would block the supervisor,
    # the very thread that reads its "ready", for a minute.
    assert wait_for(lambda: added, timeout=20)
    d.distribute(fanout.Add(obj("after")))
    assert d.stop(drain=True)
    assert [c.name for c in read_calls(tmp_path / "late")] == ["after"]


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
    env = _env_with_tests()  # for helpers.Recorder
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

    from fanout.native import _pump_py

    if impl == "native":
        if not fanout.NATIVE:
            pytest.skip("native pump not built")
        from fanout.native import _pump as module  # type: ignore[attr-defined]
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
    from fanout.listeners import process as process_listener

    # As if the worker had imported a fanout from elsewhere (a shadowing folder).
    monkeypatch.setattr(process_listener, "PRODUCER_FANOUT", ("/elsewhere/fanout", "0.0.0"))
    d = make_dist()
    d.add_listener(Noop())
    with pytest.raises(fanout.WorkerStartError, match="shadows the producer's package"):
        d.start()


def test_a_listener_removed_just_before_stop_is_still_accounted(make_dist, tmp_path):
    gate = tmp_path / "gate"
    d = make_dist()
    removed = d.add_listener(Recorder(tmp_path / "r"))
    kept = d.add_listener(Noop())
    d.start()
    distribute_behind_gate(d, gate, 30)
    wait_for(lambda: removed.stats().latency_p50 is not None)
    d.remove_listener(removed)  # its worker is still busy: reaped during stop
    threading.Timer(0.3, gate.touch).start()
    d.stop(drain=True)
    s = assert_accounted(removed)
    assert s.received == 31 and s.dropped == 30
    assert_accounted(kept)


def test_a_thread_listener_removed_mid_batch_counts_the_rest(make_dist, tmp_path):
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), executor="thread")
    d.start()
    # The thread takes them in the same batch as the slow one.
    distribute_behind_gate(d, gate, 30)
    wait_for(lambda: reg.stats().latency_p50 is not None)
    d.remove_listener(reg)
    gate.touch()
    assert d.shutdown_listener(reg, timeout=30)
    s = reg.stats()
    assert s.received == s.delivered + s.dead_lettered + s.dropped == 31, s
    d.stop()


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_draining_stop_refuses_new_notifications_so_it_ends(make_dist, tmp_path, executor):
    d = make_dist()
    reg = d.add_listener(Noop(), executor=executor)
    d.start()
    producer = Producer(d)  # it never stops on its own
    wait_for(lambda: producer.sent > 1000)
    assert d.stop(drain=True) is True  # ends, and everything accepted was delivered
    sent = producer.join()
    s = assert_accounted(reg)
    assert s.dropped == s.dead_lettered == 0 and sent <= s.received <= sent + 1
    with pytest.raises(fanout.DistributorStopped):
        d.add_listener(Noop())


# -- a forgotten start() or stop() is said at exit ----------------------------------------

FORGETFUL_SCRIPT = """
import sys
import fanout
from helpers import Recorder

if __name__ == "__main__":
    d = fanout.Distributor()
    d.add_listener(Recorder(sys.argv[1]), name="slow")
    if sys.argv[2] == "start":
        d.start()
    for i in range(100):
        d.distribute(fanout.Add({"metadata": {"name": f"o{i}"}, "sleep": 0.05}))
    print("exiting")
"""


@pytest.mark.parametrize("forgot", ["stop", "start"])
def test_exiting_without_stop_says_what_was_lost(tmp_path, forgot):
    script = tmp_path / "forgetful.py"
    script.write_text(FORGETFUL_SCRIPT)
    env = _env_with_tests()
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "calls"),
            "start" if forgot == "stop" else "",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "exiting"
    assert "the program exits without stop(): listener 'slow':" in proc.stderr
    if forgot == "stop":
        assert " dropped" in proc.stderr and "never called" not in proc.stderr
    else:
        assert "100 dead-lettered, 0 dropped, as start() was never called" in proc.stderr
    assert "Call stop(drain=True) before exiting" in proc.stderr


UNGUARDED_SCRIPT = """
import sys
import fanout
from helpers import Noop

d = fanout.Distributor(start_method=sys.argv[1])
d.add_listener(Noop())
try:
    d.start()
except fanout.WorkerStartError as exc:
    print(exc)
"""


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_script_without_the_main_guard_is_told_to_add_it(tmp_path, start_method):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    env = _env_with_tests()
    proc = subprocess.run(
        [sys.executable, str(script), start_method],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    assert 'put that under `if __name__ == "__main__":`' in proc.stdout, proc.stdout + proc.stderr


def test_a_call_counted_by_a_worker_killed_before_its_frame_was_done_is_not_delivered(
    make_dist, tmp_path
):
    """The window between a worker's HANDLED += 1 and DONE = seq: a kill there."""
    from fanout.wire.protocol import HANDLED

    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), max_attempts=1)
    d.start()
    for i in range(3):
        d.distribute(fanout.Add(obj(f"a{i}")))
    assert wait_for(lambda: reg.stats().delivered == 3)
    reg.lanes[0].slot[HANDLED] += 1  # counted, as if the kill came before DONE = seq
    d.distribute(fanout.Add(obj("boom", exit="kill")))  # that frame: never finished
    assert wait_for(lambda: reg.stats().dead_lettered == 1 and reg.ready(), 60)
    d.distribute(fanout.Add(obj("b0")))
    assert d.stop(drain=True, timeout=60) is True
    s = assert_accounted(reg)
    assert (s.received, s.delivered, s.dead_lettered) == (5, 4, 1)
