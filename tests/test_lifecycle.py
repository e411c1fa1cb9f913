"""Lifecycle edges: no deadlock, no hang, nothing silent, no user code under fanout's locks."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fanout
from fanout.core.lifecycle import State
from tests.helpers import (
    Collector,
    FailingFactory,
    Noop,
    Raiser,
    Recorder,
    assert_accounted,
    churn_stress,
    obj,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent


def _owned(d: fanout.Distributor) -> bool:
    """Whether the calling thread holds the distributor's lock."""
    return bool(d.lock._is_owned())  # type: ignore[attr-defined]


# -- the state machine -----------------------------------------------------------------


def test_the_lifecycle_moves_forward_through_named_states(make_dist):
    d = make_dist()
    assert d.state is State.NEW and (d.started, d.stopped) == (False, False)
    d.add_listener(Noop(), executor="thread")
    d.start()
    assert d.state is State.STARTED and d.start() is d  # start() again: at once
    assert d.stop(drain=True, timeout=30) is True
    assert d.state is State.STOPPED and (d.started, d.stopped) == (True, True)
    assert "stopped" in repr(d)
    for call in (d.start, lambda: d.add_listener(Noop()), lambda: d.distribute(fanout.Add({}))):
        with pytest.raises(fanout.DistributorStopped, match="is stopped"):
            call()
    assert d.stop() is True


def test_a_refusal_during_a_drain_names_the_state(make_dist):
    d = make_dist()
    release = threading.Event()

    class Slow(fanout.Handler):
        def on_add(self, o, initial):
            release.wait(30)

    d.add_listener(Slow(), executor="thread")
    d.start()
    d.distribute(fanout.Add(obj("a")))
    stopper = threading.Thread(target=d.stop, kwargs={"drain": True, "timeout": 60})
    stopper.start()
    assert wait_for(lambda: d.state is State.DRAINING)
    with pytest.raises(fanout.DistributorStopped, match="is draining"):
        d.add_listener(Noop(), executor="thread")
    with pytest.raises(fanout.DistributorStopped, match="draining"):
        d.distribute(fanout.Add(obj("b")))
    release.set()
    stopper.join(60)
    assert not stopper.is_alive() and d.state is State.STOPPED


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"timeout": "5"}, TypeError, "timeout must be a number"),
        ({"timeout": -1}, ValueError, "timeout must be a finite number"),
        ({"drain": "yes"}, TypeError, "drain must be True or False"),
    ],
)
def test_stop_checks_its_arguments_before_stopping_anything(make_dist, kwargs, error, text):
    d = make_dist()
    d.add_listener(Noop(), executor="thread")
    d.start()
    with pytest.raises(error, match=text):
        d.stop(**kwargs)
    assert d.state is State.STARTED and d.accepting
    d.distribute(fanout.Add(obj("still taken")))
    assert d.stop(drain=True, timeout=30) is True


def test_close_grace_is_checked(make_dist):
    d = make_dist()
    with pytest.raises(TypeError, match="close_grace"):
        d.close_grace = "5"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="close_grace"):
        d.close_grace = -1
    d.close_grace = 2
    assert d.close_grace == 2.0


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("x" * 250, "at most 200 bytes"),
        ("é" * 101, "at most 200 bytes"),  # 202 bytes in UTF-8
        ("a\0b", "printable"),
        ("a\nb", "printable"),
    ],
)
@pytest.mark.parametrize("executor", ["process", "thread"])
def test_a_bad_listener_name_gets_a_clear_error(make_dist, name, text, executor):
    d = make_dist()
    with pytest.raises(ValueError, match=text):
        d.add_listener(Noop(), name=name, executor=executor)
    assert d.listener_count == 0
    d.add_listener(Noop(), name="x" * 200, executor=executor)  # the limit itself is fine


# -- stop from a thread handler while a stop runs --------------------------------------


@pytest.mark.parametrize("drain", [False, True])
def test_a_thread_handler_calling_stop_during_a_stop_is_refused_not_deadlocked(make_dist, drain):
    d = make_dist()
    results: list[str] = []
    entered = threading.Event()

    class StopsDuringStop(fanout.Handler):
        def on_add(self, o, initial):
            entered.set()
            wait_for(lambda: not d.accepting, 30)  # a stop has begun
            try:
                d.stop()
            except RuntimeError as exc:
                results.append(str(exc))

    reg = d.add_listener(StopsDuringStop(), executor="thread")
    d.start()
    d.distribute(fanout.Add(obj("a")))
    assert entered.wait(30)
    stopper = threading.Thread(target=d.stop, kwargs={"drain": drain})
    stopper.start()
    stopper.join(60)
    assert not stopper.is_alive(), "stop() deadlocked with a handler calling stop()"
    assert len(results) == 1 and "would wait for itself" in results[0]
    assert_accounted(reg)


def test_stop_waits_for_a_removed_thread_listeners_running_call(make_dist):
    """remove_listener does not wait; the stop that follows does, so nothing outlives it."""
    d = make_dist()
    entered, gate = threading.Event(), threading.Event()
    finished: list[str] = []

    class Blocks(fanout.Handler):
        def on_add(self, o, initial):
            entered.set()
            gate.wait(60)
            finished.append(o["metadata"]["name"])

    reg = d.add_listener(Blocks(), executor="thread")
    d.start()
    d.distribute(fanout.Add(obj("a")))
    assert entered.wait(30)
    d.remove_listener(reg)  # returns while the call runs
    assert not reg.exited()
    stopper = threading.Thread(target=d.stop)
    stopper.start()
    assert wait_for(lambda: d.state is State.CLOSING or d.stopped)
    stopper.join(0.2)
    assert stopper.is_alive(), "stop() returned while a removed listener's call still ran"
    gate.set()
    stopper.join(60)
    assert not stopper.is_alive() and reg.exited() and finished == ["a"]
    assert_accounted(reg)


# -- no user code and no blocking wait under the distributor's lock ----------------------


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_every_callback_runs_without_the_lock_and_may_call_any_public_method(make_dist, executor):
    d = make_dist()
    seen: list[tuple[str, bool]] = []
    refused: list[str] = []
    added: list[Any] = []

    def callback(kind: str):
        def call(reg, n, text):
            owned = _owned(d)
            reg.stats()
            try:
                d.stop()
            except RuntimeError as exc:
                refused.append(str(exc))
            new = d.add_listener(Noop(), executor="thread")
            added.append(new)
            d.remove_listener(new)
            seen.append((kind, owned))  # last: the test waits for it

        return call

    reg = d.add_listener(
        Raiser(),
        executor=executor,
        schema=dict[str, int],  # an object that does not fit is dead-lettered
        on_error=callback("on_error"),
        on_dead_letter=callback("on_dead_letter"),
    )
    d.start()
    d.distribute(fanout.Add({"raise": 1}))
    d.distribute(fanout.Add({"name": "does not fit"}))
    d.distribute(fanout.Add({"fine": 1}))
    assert wait_for(lambda: len(seen) == 2)
    assert sorted(kind for kind, _ in seen) == ["on_dead_letter", "on_error"]
    assert not any(owned for _, owned in seen), seen
    assert len(refused) == 2 and all("would wait for itself" in r for r in refused)
    assert len(added) == 2 and not any(d.is_registered(r) for r in added)
    assert d.stop(drain=True, timeout=60) is True
    s = assert_accounted(reg)
    assert (s.delivered, s.errors, s.dead_lettered) == (2, 1, 1)


def test_a_key_function_runs_without_the_lock_and_may_call_public_methods(make_dist):
    d = make_dist()
    owned: list[bool] = []

    def key(o):
        owned.append(_owned(d))
        assert d.listener_count == 1 and d.shared_stats() is not None
        return o["metadata"]["name"]

    reg = d.add_listener(Noop(), workers=2, key=key)
    d.start()
    for i in range(20):
        d.distribute(fanout.Add(obj(f"o{i}")))
    assert d.stop(drain=True, timeout=60) is True
    assert len(owned) == 20 and not any(owned)
    assert assert_accounted(reg).delivered == 20


@pytest.mark.parametrize("started", [False, True])
def test_an_initial_lists_key_function_and_encode_run_without_the_lock(make_dist, started):
    d = make_dist()
    owned: list[bool] = []

    def key(o):
        owned.append(_owned(d))
        assert d.shared_stats() is not None and d.listener_count >= 0  # public methods work
        return o["metadata"]["name"]

    if started:
        d.start()
    codec = d.codec
    real_encode = d.ctx.encode

    def encode(n, t_ns):
        owned.append(_owned(d))
        return real_encode(n, t_ns)

    d.ctx.encode = encode  # the codec's encode is where its hooks run
    try:
        reg = d.add_listener(
            Noop(), workers=2, key=key, initial_list=[obj(f"i{j}") for j in range(5)]
        )
    finally:
        d.ctx.encode = real_encode
    assert codec is d.codec
    d.start()
    assert d.stop(drain=True, timeout=60) is True
    assert len(owned) == 10 and not any(owned), owned
    assert assert_accounted(reg).delivered == 5


class HookCodec(fanout.MsgpackCodec):
    """The msgpack codec, with a custom unpack that reports where it runs."""

    def unpack(self, data: Any) -> Any:
        value = super().unpack(data)
        probe = _HOOK_PROBE.get("probe")
        if probe is not None:
            probe()
        return value


_HOOK_PROBE: dict[str, Any] = {}


def test_a_codec_hook_runs_without_the_lock(make_dist, tmp_path):
    d = make_dist(codec=HookCodec())
    owned: list[tuple[str, bool]] = []
    _HOOK_PROBE["probe"] = lambda: owned.append((threading.current_thread().name, _owned(d)))
    try:
        errors = Collector()
        reg = d.add_listener(Recorder(tmp_path / "r"), on_error=errors)
        d.start()
        d.distribute(fanout.Add(obj("bad", **{"raise": True})))
        assert wait_for(lambda: len(errors) == 1)
        assert d.stop(drain=True, timeout=60) is True
    finally:
        _HOOK_PROBE.clear()
    # the producer decoded the frame the handler raised on, to report it
    assert any(name == "fanout-supervisor" for name, _ in owned), owned
    assert not any(o for _, o in owned), owned
    assert errors.snapshot()[0][1] == fanout.Add(obj("bad", **{"raise": True}))
    assert_accounted(reg)


class Tag:
    """A type only the codec's ``default`` / ``ext_hook`` know."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag)

    __hash__ = object.__hash__


def _tag_default(o: Any) -> Any:
    if isinstance(o, Tag):
        import msgpack

        return msgpack.ExtType(64, b"tag")
    raise TypeError(f"cannot encode {o!r}")


def _tag_hook(code: int, data: bytes) -> Any:
    probe = _HOOK_PROBE.get("probe")
    if probe is not None:  # in the producer only: workers have no probe
        probe()
    return Tag()


def _arena_dist(make_dist: Any) -> fanout.Distributor:
    """A distributor whose big buffers go through the arena, with codec hooks."""
    codec = fanout.MsgpackCodec(default=_tag_default, ext_hook=_tag_hook)
    d = make_dist(codec=codec, max_shared_bytes=1 << 20, shared_min_bytes=1024)
    assert d.arena is not None
    owned: list[tuple[str, bool]] = []
    _HOOK_PROBE["owned"] = owned
    _HOOK_PROBE["probe"] = lambda: owned.append((threading.current_thread().name, _owned(d)))
    return d


def _big(name: str, **extra: Any) -> dict[str, Any]:
    return obj(name, blob=np.arange(4096, dtype=np.uint8), tag=Tag(), **extra)


def test_a_dead_letter_referring_to_the_arena_is_decoded_without_the_lock(make_dist, tmp_path):
    d = _arena_dist(make_dist)
    try:
        dead = Collector()
        reg = d.add_listener(Recorder(tmp_path / "r"), on_dead_letter=dead, max_attempts=1)
        d.start()
        d.distribute(fanout.Add(_big("die", exit="kill")))
        assert wait_for(lambda: len(dead) == 1, 60)
        assert d.stop(drain=True, timeout=60) is True
        owned = _HOOK_PROBE["owned"]
    finally:
        _HOOK_PROBE.clear()
    n = dead.snapshot()[0][1]
    assert isinstance(n, fanout.Add) and n.obj["tag"] == Tag()
    assert np.array_equal(n.obj["blob"], np.arange(4096, dtype=np.uint8))
    assert owned and not any(o for _, o in owned), owned
    assert_accounted(reg)


def test_a_listener_that_cannot_start_dead_letters_arena_frames_without_the_lock(
    make_dist, tmp_path
):
    d = _arena_dist(make_dist)
    try:
        dead = Collector()
        added: list[Any] = []

        def on_error(reg, n, text):
            if not added:  # nobody waits for its start: the supervisor settles it
                added.append(d.add_listener(FailingFactory(), name="bad", on_dead_letter=dead))

        ok = d.add_listener(Recorder(tmp_path / "r"), on_error=on_error)
        d.start()
        d.distribute(fanout.Add(obj("first", **{"raise": True})))
        assert wait_for(lambda: added, 60)
        (bad,) = added
        for i in range(20):
            d.distribute(fanout.Add(_big(f"o{i}")))
        assert wait_for(lambda: bad.stats().start_error is not None, 60)
        assert wait_for(lambda: len(dead) == bad.stats().received, 60)
        assert d.stop(drain=True, timeout=60) is True
        owned = _HOOK_PROBE["owned"]
    finally:
        _HOOK_PROBE.clear()
    assert dead.snapshot() and all(n.obj["tag"] == Tag() for _, n, _ in dead.snapshot())
    assert owned and not any(o for _, o in owned), owned
    assert_accounted(bad)
    assert_accounted(ok)


def test_the_supervisor_reaps_a_dead_worker_without_the_lock(make_dist, tmp_path, monkeypatch):
    from fanout.listeners import launch as _isolation

    d = make_dist()
    joins: list[bool] = []
    real = _isolation.WorkerProcess.join

    def join(self, timeout=None):
        joins.append(_owned(d))
        return real(self, timeout)

    monkeypatch.setattr(_isolation.WorkerProcess, "join", join)
    reg = d.add_listener(Recorder(tmp_path / "r"))
    d.start()
    (pid,) = reg.worker_pids()
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: reg.stats().restarts == 1 and reg.ready(), 60)
    d.distribute(fanout.Add(obj("after")))
    assert d.stop(drain=True, timeout=60) is True
    assert joins and not any(joins), joins


def test_worker_starts_and_memory_reads_run_without_the_lock(make_dist, tmp_path, monkeypatch):
    """Starting a process and reading /proc wait on the kernel: never under the lock."""
    from fanout.listeners.launch import WorkerProcess
    from fanout.listeners.process import Lane

    d = make_dist()
    seen: list[tuple[str, bool]] = []
    real_launch, real_private = Lane.launch, WorkerProcess.private_bytes

    def launch(lane):
        seen.append(("launch", _owned(d)))
        return real_launch(lane)

    def private_bytes(proc):
        seen.append(("memory", _owned(d)))
        return real_private(proc)

    monkeypatch.setattr(Lane, "launch", launch)
    monkeypatch.setattr(WorkerProcess, "private_bytes", private_bytes)
    first = d.add_listener(Recorder(tmp_path / "a"), workers=2, memory_limit=1 << 30)
    d.start()  # two starts
    d.add_listener(Recorder(tmp_path / "b"))  # one more
    (pid, _) = first.worker_pids()
    os.kill(pid, signal.SIGKILL)  # and a restart by the supervisor
    assert wait_for(lambda: first.stats().restarts == 1 and first.ready(), 60)
    assert wait_for(lambda: any(what == "memory" for what, _ in seen), 30)
    d.distribute(fanout.Add(obj("x")))
    assert d.stop(drain=True, timeout=60) is True
    assert [what for what, _ in seen].count("launch") == 4, seen
    assert not any(owned for _, owned in seen), seen


def _gate_launches(monkeypatch: Any) -> tuple[threading.Event, threading.Event]:
    """Hold every worker start until ``gate`` is set; ``entered`` tells one is held."""
    from fanout.listeners.process import Lane

    entered, gate = threading.Event(), threading.Event()
    real_launch = Lane.launch

    def launch(lane):
        entered.set()
        assert gate.wait(60)
        return real_launch(lane)

    monkeypatch.setattr(Lane, "launch", launch)
    return entered, gate


def test_a_stop_during_a_start_waits_for_it_and_leaves_nothing(make_dist, tmp_path, monkeypatch):
    """A stop that begins while add_listener starts workers (no lock held) waits for the start."""
    d = make_dist()
    d.start()
    entered, gate = _gate_launches(monkeypatch)
    errors: list[BaseException] = []

    def add() -> None:
        try:
            d.add_listener(Recorder(tmp_path / "r"))
        except BaseException as exc:
            errors.append(exc)

    adder = threading.Thread(target=add)
    adder.start()
    assert entered.wait(30)
    stopper = threading.Thread(target=d.stop)
    stopper.start()
    assert wait_for(lambda: d.state is State.CLOSING)
    assert d.listener_count == 0  # not published while it starts
    gate.set()
    adder.join(60)
    stopper.join(60)
    assert not adder.is_alive() and not stopper.is_alive()
    assert d.stopped and len(errors) == 1
    assert isinstance(errors[0], fanout.DistributorStopped), errors
    assert "began to stop" in str(errors[0])  # and the leak check finds no worker


def test_a_removal_during_the_start_is_done_once_the_start_ends(make_dist, tmp_path, monkeypatch):
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), workers=2)
    entered, gate = _gate_launches(monkeypatch)
    starter = threading.Thread(target=d.start)
    starter.start()
    assert entered.wait(30)
    d.remove_listener(reg)  # returns at once; the start is still under way
    assert not d.is_registered(reg) and reg.starting
    gate.set()
    starter.join(60)
    assert not starter.is_alive() and d.started
    assert d.shutdown_listener(reg, timeout=60) is True  # its workers were asked to leave
    assert reg.worker_pids() == []
    assert d.stop() is True


@pytest.mark.parametrize("when", ["add_listener", "start", "respawn"])
def test_a_child_is_not_leaked_when_fanout_cannot_take_charge_of_it(
    make_dist, tmp_path, monkeypatch, when
):
    import multiprocessing.process

    from fanout.listeners import process as process_listener

    d = make_dist()
    joins: list[bool] = []  # whether the lock was held while a discarded child was reaped
    real_join = multiprocessing.process.BaseProcess.join

    def join(self, timeout=None):
        joins.append(_owned(d))
        return real_join(self, timeout)

    def refuse(proc, start_method):
        monkeypatch.setattr(multiprocessing.process.BaseProcess, "join", join)
        raise OSError("pidfd_open refused (simulated)")

    if when == "respawn":
        errors = Collector()
        reg = d.add_listener(Recorder(tmp_path / "r"), on_error=errors)
        d.start()
        monkeypatch.setattr(process_listener, "WorkerProcess", refuse)
        (pid,) = reg.worker_pids()
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: any("simulated" in t for _, _, t in errors.snapshot()), 60)
        assert wait_for(lambda: joins, 10)
    elif when == "start":
        d.add_listener(Recorder(tmp_path / "r"))
        monkeypatch.setattr(process_listener, "WorkerProcess", refuse)
        with pytest.raises(OSError, match="simulated"):
            d.start()
    else:
        d.start()
        monkeypatch.setattr(process_listener, "WorkerProcess", refuse)
        with pytest.raises(OSError, match="simulated"):
            d.add_listener(Recorder(tmp_path / "r"))
        assert d.listener_count == 0
    monkeypatch.undo()
    assert joins and not any(joins), joins  # and the leak check finds no child


# -- counters change only for what was accepted ------------------------------------------


def test_drops_counted_by_producers_and_a_stop_at_once_add_up(make_dist, tmp_path):
    """Producers drop on a full lane while stop() drops what is queued: one count lock."""
    gate = tmp_path / "gate"
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    try:
        d = make_dist()
        regs = [
            d.add_listener(
                Recorder(tmp_path / "p"), max_pending_bytes=4096, overflow="drop_newest"
            ),
            d.add_listener(Recorder(tmp_path / "t"), executor="thread"),
        ]
        d.start()
        go = threading.Event()

        def produce() -> None:
            go.wait(30)
            while True:
                try:
                    d.distribute(fanout.Add(obj("x", gate=str(gate))))
                except fanout.DistributorStopped:
                    return

        producers = [threading.Thread(target=produce) for _ in range(3)]
        for t in producers:
            t.start()
        go.set()
        assert wait_for(lambda: regs[0].stats().dropped > 100)
        stopper = threading.Thread(target=d.stop)
        stopper.start()
        assert wait_for(lambda: not d.accepting)
        gate.touch()
        for t in (*producers, stopper):
            t.join(60)
        assert not any(t.is_alive() for t in (*producers, stopper))
    finally:
        sys.setswitchinterval(interval)
    for reg in regs:
        assert_accounted(reg)


def test_a_refused_notification_is_not_counted(make_dist):
    d = make_dist(max_shared_bytes=1 << 20, shared_min_bytes=1024)

    def key(o):
        if o.get("boom"):
            raise KeyError("boom")
        return "one lane"

    regs = [
        d.add_listener(
            Noop(), workers=2, key=key, max_pending_bytes=900_000, overflow="drop_newest"
        )
        for _ in range(2)
    ]
    big = np.zeros(600_000, dtype=np.uint8)
    d.distribute(fanout.Add(obj("fills", data=big)))  # the lane holds it until start()
    d.distribute(fanout.Add(obj("no room", data=big)))  # accepted, dropped: counted
    before = [(r.stats().received, r.stats().dropped) for r in regs]
    assert before == [(2, 1), (2, 1)]
    for _ in range(2):  # a retry must not count twice either
        with pytest.raises(KeyError, match="boom"):
            d.distribute(fanout.Add(obj("refused", data=big, boom=True)))
    assert [(r.stats().received, r.stats().dropped) for r in regs] == before
    d.start()
    assert d.stop(drain=True, timeout=60) is True
    for r in regs:
        assert assert_accounted(r).received == 2


# -- a start failure after start() is never silent ---------------------------------------


def test_a_listener_that_cannot_start_added_from_a_callback_is_reported(
    make_dist, tmp_path, caplog
):
    d = make_dist()
    dead = Collector()
    added: list[Any] = []

    def on_error(reg, n, text):
        if not added:
            added.append(d.add_listener(FailingFactory(), name="bad", on_dead_letter=dead))

    ok = d.add_listener(Recorder(tmp_path / "r"), on_error=on_error)
    d.start()
    with caplog.at_level(logging.ERROR, logger="fanout"):
        d.distribute(fanout.Add(obj("first", **{"raise": True})))
        assert wait_for(lambda: added)
        (bad,) = added
        for i in range(50):
            d.distribute(fanout.Add(obj(f"o{i}")))
        assert wait_for(lambda: bad.stats().start_error is not None, 60)
        assert wait_for(lambda: "factory refuses to build the handler" in caplog.text)
    s = bad.stats()
    assert "factory refuses to build the handler" in s.start_error
    assert s.start_failed == 1 and d.is_registered(bad)
    # It takes no more notifications: nothing queues behind a worker that never comes.
    received = s.received
    for i in range(50):
        d.distribute(fanout.Add(obj(f"p{i}")))
    assert bad.stats().received == received
    assert wait_for(lambda: bad.stats().pending == 0)
    # counted first, then reported
    assert wait_for(lambda: len(dead) == bad.stats().dead_lettered == received)
    assert all("could not start" in why for _, _, why in dead.snapshot())
    assert d.stop(drain=True, timeout=60) is True
    assert_accounted(bad)
    assert assert_accounted(ok).delivered == 101


def test_a_start_failure_shows_in_the_metrics(make_dist):
    pytest.importorskip("prometheus_client")
    from fanout.metrics import PrometheusCollector

    d = make_dist()
    added: list[Any] = []

    def on_error(reg, n, text):
        if not added:
            added.append(d.add_listener(FailingFactory(), name="bad"))

    d.add_listener(Recorder("/dev/null"), name="good", on_error=on_error)
    d.start()
    d.distribute(fanout.Add(obj("x", **{"raise": True})))
    assert wait_for(lambda: added and added[0].stats().start_error is not None, 60)
    values = {
        s.labels["listener"]: s.value
        for family in PrometheusCollector(d).collect()
        if family.name == "fanout_start_failed"
        for s in family.samples
    }
    assert values == {"good": 0.0, "bad": 1.0}


# -- exit is bounded ---------------------------------------------------------------------


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_exit_without_stop_is_bounded_even_with_a_stuck_handler(tmp_path, executor):
    script = tmp_path / "stuck.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import threading, time
            import fanout

            class Stuck(fanout.Handler):
                def on_add(self, o, initial):
                    threading.Event().wait() if {executor!r} == "thread" else time.sleep(3600)

            if __name__ == "__main__":
                d = fanout.Distributor()
                d.close_grace = 1.0
                reg = d.add_listener(Stuck, name="stuck", executor={executor!r})
                d.start()
                for i in range(5):
                    d.distribute(fanout.Add({{"i": i}}))
                while reg.stats().latency_p50 is None:
                    time.sleep(0.01)
                print("exiting", flush=True)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    env.pop("PYTHONSAFEPATH", None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # the bug: the exit hook joined the handler thread for ever
    )
    assert proc.returncode == 0, proc.stderr
    assert "exiting" in proc.stdout
    assert "the program exits without stop()" in proc.stderr
    assert "listener 'stuck'" in proc.stderr
    if executor == "thread":
        assert "a thread cannot be killed" in proc.stderr, proc.stderr
    else:
        assert "5 dropped" in proc.stderr, proc.stderr  # the running call too


# -- Ray's store lock -------------------------------------------------------------------


def test_a_ray_payload_collected_inside_the_stores_lock_does_not_deadlock():
    from fanout.buffers.ray_store import RayPayload, RayStore

    store = RayStore(ray=None, encode=None)
    with store._lock:  # as a locked section would be...
        store._refs[1] = "ref"
        store._holders[1] = 1
    done = threading.Event()

    def collect_inside_the_lock():
        payload = RayPayload(b"x")
        payload.tokens, payload._store = (1,), store
        with store._lock:
            del payload  # ...when the collector runs __del__ on this very thread
        done.set()

    thread = threading.Thread(target=collect_inside_the_lock, daemon=True)
    thread.start()
    assert done.wait(10), "RayPayload.__del__ deadlocked on the store's lock"
    assert store.held() == 0  # its share was released by the next locked call


# -- stress: callbacks that add, remove and stop while notifications flow, with kills -----


def test_callbacks_add_remove_and_stop_while_notifications_flow_with_kills(make_dist):
    faulthandler.dump_traceback_later(240)  # a hang shows every thread's stack
    try:
        d = make_dist()
        every, refused, kills, sent = churn_stress(
            d, ["thread", "process"], lambda r: r.worker_pids(), kills=20, notifications=3000
        )
        assert d.stopped and refused and all("would wait for itself" in r for r in refused)
        assert kills >= 20 and len(every) > 10  # the callbacks did add listeners
        for reg in every:
            assert_accounted(reg)
        assert every[2].stats().received == sent  # the thread listener was never removed
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_waits_check_their_timeout_before_waiting(make_dist):
    d = make_dist()
    reg = d.add_listener(Noop(), executor="thread")
    for call in (reg.wait_ready, reg.wait_synced, lambda t: d.shutdown_listener(reg, t)):
        with pytest.raises(TypeError, match="timeout must be a number"):
            call("5")
        with pytest.raises(ValueError, match="timeout must be a finite number"):
            call(float("nan"))
    assert d.is_registered(reg)  # the refused shutdown_listener removed nothing
