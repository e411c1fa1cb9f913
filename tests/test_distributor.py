"""Distributor semantics (client-go's sharedProcessor scenarios and beyond)."""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time

import numpy as np
import pytest
from helpers import (
    Dumper,
    FakeClock,
    Noop,
    Recorder,
    add_only,
    distribute_behind_gate,
    obj,
    read_calls,
    read_dumps,
    wait_calls,
    wait_for,
)

import fanout
from fanout.wire.codec import MsgpackCodec

EXECUTORS = ["process", "thread"]


# -- client-go processor scenarios --------------------------------------------------------


@pytest.mark.parametrize("executor", EXECUTORS)
def test_resync_listeners_get_only_their_syncs(make_dist, tmp_path, executor):
    clock = FakeClock()
    d = make_dist(resync_check_period=1.0, clock=clock)
    paths = {p: tmp_path / f"r{p}" for p in (0, 2, 3)}
    regs = {
        p: d.add_listener(Recorder(paths[p]), executor=executor, resync_period=p) for p in paths
    }
    assert [regs[p].resync_period for p in (0, 2, 3)] == [0, 2, 3]
    d.start()
    for i in range(5):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    for p in paths:
        assert [c.v for c in wait_calls(paths[p], 5)] == list(range(5))

    def resync_at(t: float) -> set[int]:
        clock.now = 1000.0 + t
        d.should_resync()
        return {p for p, r in regs.items() if r.syncing}

    assert resync_at(1.0) == set()
    assert d.should_resync() is False
    assert resync_at(2.0) == {2}
    d.distribute(fanout.Update(obj("o1", 1), obj("o1", 100)), sync=True)
    assert resync_at(3.0) == {3}
    d.distribute(fanout.Update(obj("o2", 2), obj("o2", 200)), sync=True)
    d.stop(drain=True)
    assert [c.v for c in read_calls(paths[0])] == list(range(5))
    assert [c.v for c in read_calls(paths[2])] == [*range(5), 100]
    assert [c.v for c in read_calls(paths[3])] == [*range(5), 200]


def test_new_listener_is_syncing_until_first_check(make_dist, tmp_path):
    d = make_dist(resync_check_period=1.0, clock=FakeClock())
    path = tmp_path / "r"
    d.add_listener(Recorder(path), executor="thread", resync_period=5)
    d.start()
    d.distribute(fanout.Add(obj("a")), sync=True)
    d.stop(drain=True)
    assert [c.name for c in read_calls(path)] == ["a"]


def test_should_resync_reports_due_and_reschedules(make_dist):
    clock = FakeClock()
    d = make_dist(resync_check_period=1.0, clock=clock)
    reg = d.add_listener(Noop(), executor="thread", resync_period=2)
    assert d.should_resync() is False and reg.syncing is False
    clock.now += 2
    assert d.should_resync() is True and reg.syncing is True
    assert d.should_resync() is False  # next_resync moved to now + 2
    clock.now += 2
    assert d.should_resync() is True


def test_check_period_lowered_by_listeners_added_before_start(make_dist):
    d = make_dist(resync_check_period=12 * 3600, clock=FakeClock())
    regs = [d.add_listener(Noop(), executor="thread", resync_period=p) for p in (0, 60, 55, 5)]
    assert d.resync_check_period == 5
    assert [r.resync_period for r in regs] == [0, 60, 55, 5]


def test_resync_floor_and_raise_once_started(make_dist):
    d = make_dist(resync_check_period=5, clock=FakeClock())
    tiny = d.add_listener(Noop(), executor="thread", resync_period=0.2)
    assert tiny.resync_period == 1.0  # the 1 s floor, then the check period drops to it
    assert d.resync_check_period == 1.0
    d.start()
    d2 = make_dist(resync_check_period=10, clock=FakeClock())
    d2.start()
    late = d2.add_listener(Noop(), executor="thread", resync_period=3)
    assert late.resync_period == 10  # raised to the check period once started
    assert d2.resync_check_period == 10
    default = d2.add_listener(Noop(), executor="thread")
    assert default.resync_period == 10  # None means the check period


def test_check_period_zero_means_no_resync(make_dist):
    clock = FakeClock()
    d = make_dist(resync_check_period=0, clock=clock)
    reg = d.add_listener(Noop(), executor="thread", resync_period=30)
    assert reg.resync_period == 0
    clock.now += 10_000
    assert d.should_resync() is False


# -- listeners: add / remove ---------------------------------------------------------------


def test_remove_listener_counts_idempotence_foreign_and_after_stop(make_dist):
    d = make_dist()
    other = make_dist()
    a = d.add_listener(Noop(), executor="thread")
    b = d.add_listener(Noop())
    foreign = other.add_listener(Noop(), executor="thread")
    assert d.listener_count == 2 and d.is_registered(a) and d.is_registered(b)
    d.start()
    d.remove_listener(a)
    d.remove_listener(a)
    d.remove_listener(foreign)
    d.remove_listener("not a registration")
    assert d.listener_count == 1 and not d.is_registered(a)
    assert other.listener_count == 1
    d.stop()
    d.remove_listener(b)
    assert d.listener_count == 0


def test_same_handler_twice_gives_distinct_registrations(make_dist, tmp_path):
    d = make_dist()
    handler = Recorder(tmp_path / "r")
    a = d.add_listener(handler)
    b = d.add_listener(handler)
    assert a is not b and d.listener_count == 2
    d.start()
    d.distribute(fanout.Add(obj("x")))
    d.stop(drain=True)
    assert len(read_calls(tmp_path / "r")) == 2
    assert len({c.pid for c in read_calls(tmp_path / "r")}) == 2


def test_add_after_stop_raises_distributor_stopped(make_dist):
    d = make_dist()
    d.start()
    d.stop()
    with pytest.raises(fanout.DistributorStopped) as info:
        d.add_listener(Noop())
    assert isinstance(info.value, RuntimeError)
    assert d.stopped and d.started
    with pytest.raises(fanout.DistributorStopped, match="distribute\\(\\) after stop"):
        d.distribute(fanout.Add(obj("x")))  # never silently ignored


@pytest.mark.parametrize("executor", EXECUTORS)
def test_remove_while_active_stops_delivery(make_dist, tmp_path, executor):
    d = make_dist()
    path = tmp_path / "r"
    reg = d.add_listener(Recorder(path), executor=executor)
    d.start()
    d.distribute(fanout.Add(obj("before")))
    wait_calls(path, 1)
    assert d.shutdown_listener(reg, timeout=30) is True
    d.distribute(fanout.Add(obj("after")))
    d.stop(drain=True)
    assert [c.name for c in read_calls(path)] == ["before"]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_add_while_active_gets_initial_list_first(make_dist, tmp_path, executor):
    d = make_dist()
    first = d.add_listener(Noop(), executor="thread")
    d.start()
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            d.distribute(fanout.Update(obj("live", i), obj("live", i)))
            i += 1
            time.sleep(0.0005)  # a steady stream, not a flood

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        # The late listener must arrive while live notifications flow.
        assert wait_for(lambda: first.stats().received >= 20, 30)
        path = tmp_path / "late"
        d.add_listener(
            Recorder(path),
            executor=executor,
            initial_list=[obj(f"init{i}", i) for i in range(50)],
        )
        wait_calls(path, 60)
    finally:
        stop.set()
        producer.join()
    d.stop(drain=True)
    calls = read_calls(path)
    assert [c.name for c in calls[:50]] == [f"init{i}" for i in range(50)]
    assert all(c.kind == "add" and c.initial for c in calls[:50])
    assert all(c.name == "live" and not c.initial for c in calls[50:])


@pytest.mark.parametrize("executor", EXECUTORS)
def test_has_synced_waits_for_initial_adds(make_dist, tmp_path, executor):
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(
        Recorder(tmp_path / "r"),
        executor=executor,
        initial_list=[obj("a"), obj("slow", gate=str(gate)), obj("c")],
    )
    d.start()
    d.mark_synced()
    assert wait_calls(tmp_path / "r", 1)
    assert reg.has_synced() is False
    assert reg.wait_synced(timeout=0.2) is False
    gate.touch()
    assert reg.wait_synced(timeout=30) is True
    assert reg.has_synced() is True


@pytest.mark.parametrize("executor", EXECUTORS)
def test_has_synced_waits_for_the_initial_adds_distributed_before_mark_synced(
    make_dist, tmp_path, executor
):
    # An informer's way: no initial_list, the list distributed as initial adds.
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), executor=executor, workers=1)
    d.start()
    for o in (obj("a"), obj("slow", gate=str(gate)), obj("c")):
        d.distribute(fanout.Add(o, is_in_initial_list=True))
    d.mark_synced()
    d.distribute(fanout.Add(obj("live")))  # after mark_synced: not waited for
    assert wait_calls(tmp_path / "r", 1)
    assert reg.has_synced() is False
    assert reg.wait_synced(timeout=0.2) is False
    gate.touch()
    assert reg.wait_synced(timeout=30) is True
    # Synced means handled: every initial add has run by now, without a wait.
    assert [c.name for c in read_calls(tmp_path / "r")][:3] == ["a", "slow", "c"]


def test_has_synced_needs_mark_synced(make_dist, tmp_path):
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), initial_list=[obj("a")])
    d.start()
    wait_calls(tmp_path / "r", 1)
    assert reg.has_synced() is False
    d.mark_synced()
    assert reg.wait_synced(timeout=30) is True


def test_initial_add_that_raised_still_counts_as_synced(make_dist, tmp_path):
    d = make_dist()
    errors = []
    reg = d.add_listener(
        Recorder(tmp_path / "r"),
        initial_list=[obj("bad", **{"raise": True}), obj("ok")],
        on_error=lambda r, n, text: errors.append(n),
    )
    d.start()
    d.mark_synced()
    assert reg.wait_synced(timeout=30) is True
    assert wait_for(lambda: len(errors) == 1)
    assert errors[0] == fanout.Add(obj("bad", **{"raise": True}), True)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_distribute_before_start_buffers_and_start_delivers_in_order(
    make_dist, tmp_path, executor
):
    d = make_dist()
    d.add_listener(Recorder(tmp_path / "r"), executor=executor)
    for i in range(50):  # returns at once: nothing waits for start()
        d.distribute(fanout.Add(obj("early", i)))
    assert read_calls(tmp_path / "r") == []
    d.start()
    assert d.stop(drain=True)
    assert [c.v for c in read_calls(tmp_path / "r")] == list(range(50))


def test_distribute_without_listeners_is_a_noop(make_dist):
    d = make_dist()
    d.distribute(fanout.Add(obj("nobody")))  # not started, no listener: returns at once
    d.start()
    d.distribute(fanout.Delete(obj("nobody")))


def test_context_manager_starts_and_drains(no_leaks, tmp_path):
    path = tmp_path / "r"
    with fanout.Distributor() as d:
        assert d.started
        d.add_listener(Recorder(path), workers=2)
        for i in range(200):
            d.distribute(fanout.Update(obj(f"k{i}", i), obj(f"k{i}", i)))
    assert d.stopped
    assert len(read_calls(path)) == 200


def test_both_start_methods_deliver(make_dist, tmp_path, start_method):
    d = make_dist(start_method=start_method)
    d.add_listener(Recorder(tmp_path / "r"))
    d.add_listener(Noop)  # a factory, called in the worker
    d.start()
    d.distribute(fanout.Delete(obj("gone", 7)))
    d.stop(drain=True)
    assert [(c.kind, c.name, c.v) for c in read_calls(tmp_path / "r")] == [("delete", "gone", 7)]


def test_func_handler_and_factory(make_dist, tmp_path):
    d = make_dist()
    reg = d.add_listener(fanout.FuncHandler(on_add=add_only), workers=2)
    d.start()
    for i in range(20):
        d.distribute(fanout.Add(obj(f"k{i}")))
        d.distribute(fanout.Update(obj(f"k{i}"), obj(f"k{i}")))  # no on_update: ignored
    d.stop(drain=True)
    assert reg.stats().delivered == 40 and reg.stats().errors == 0


# -- stress and ordering --------------------------------------------------------------------


@pytest.mark.slow
def test_abuse_add_remove_from_many_threads_while_distributing(make_dist, tmp_path):
    d = make_dist()
    d.add_listener(Noop(), executor="thread")
    d.start()
    failures: list[BaseException] = []
    stop = threading.Event()

    def churn(k: int) -> None:
        rng = random.Random(k)
        try:
            while not stop.is_set():
                executor = "process" if rng.random() < 0.15 else "thread"
                reg = d.add_listener(Noop(), executor=executor)
                time.sleep(rng.random() * 0.01)
                if rng.random() < 0.5:
                    d.remove_listener(reg)
                else:
                    d.shutdown_listener(reg, timeout=30)
        except fanout.DistributorStopped:
            pass
        except BaseException as exc:  # pragma: no cover - the assertion reports it
            failures.append(exc)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for i in range(10_000):
        d.distribute(fanout.Update(obj(f"k{i % 50}", i), obj(f"k{i % 50}", i)))
    stop.set()
    d.stop()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert failures == []


@pytest.mark.slow
def test_per_key_order_with_four_workers(make_dist, tmp_path):
    d = make_dist()
    path = tmp_path / "r"
    reg = d.add_listener(Recorder(path), workers=4)
    d.start()
    for v in range(200):
        for k in range(100):
            d.distribute(fanout.Update(obj(f"k{k}", v - 1), obj(f"k{k}", v)))
    assert d.stop(drain=True) is True
    calls = read_calls(path)
    assert len(calls) == 20_000
    by_key: dict[str, list[int]] = {}
    pids: dict[str, set[int]] = {}
    for c in calls:
        by_key.setdefault(c.name, []).append(c.v)
        pids.setdefault(c.name, set()).add(c.pid)
    assert all(vs == list(range(200)) for vs in by_key.values())
    assert all(len(p) == 1 for p in pids.values())  # one key, one lane
    assert len({p for s in pids.values() for p in s}) == 4  # every lane used
    assert reg.stats().delivered == 20_000


def test_strict_order_per_listener_with_one_worker(make_dist, tmp_path):
    d = make_dist()
    path = tmp_path / "r"
    d.add_listener(Recorder(path))
    d.start()
    for i in range(2000):
        d.distribute(fanout.Add(obj(f"k{i % 7}", i)))
    d.stop(drain=True)
    assert [c.v for c in read_calls(path)] == list(range(2000))


class CountingCodec(MsgpackCodec):
    """Counts encodes in the parent (the count is not shipped to workers)."""

    def __init__(self) -> None:
        super().__init__()
        self.encodes = 0

    def encode(self, n, t_ns):
        self.encodes += 1
        return super().encode(n, t_ns)


def test_encode_once_per_distribute_for_four_listeners(make_dist, tmp_path):
    codec = CountingCodec()
    d = make_dist(codec=codec)
    paths = [tmp_path / f"r{i}" for i in range(4)]
    for p in paths:
        d.add_listener(Recorder(p))
    d.start()
    for i in range(100):
        d.distribute(fanout.Update(obj("x", i), obj("x", i)))
    assert codec.encodes == 100
    d.stop(drain=True)
    assert all(len(read_calls(p)) == 100 for p in paths)


# -- codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["msgpack", "msgspec"])
def test_codec_round_trips_datetime_and_numpy(make_dist, tmp_path, codec):
    pytest.importorskip(codec)
    d = make_dist(codec=codec)
    path = str(tmp_path / "dump")
    d.add_listener(Dumper(path))
    d.start()
    aware = dt.datetime(2026, 11, 28, 5, 30, tzinfo=dt.timezone.utc)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    sent = {
        "when": aware,
        "arr": arr,
        "n": np.int64(5),
        "b": b"\x00\x01",
        "l": [1, 2.5, None, True],
    }
    d.distribute(fanout.Add(sent))
    d.stop(drain=True)
    ((_, got, _),) = read_dumps(path)
    assert got["when"] == aware
    assert got["arr"].dtype == np.float32 and got["arr"].shape == (3, 4)
    assert np.array_equal(got["arr"], arr)
    assert got["n"] == 5 and got["b"] == b"\x00\x01" and got["l"] == [1, 2.5, None, True]


def test_msgpack_codec_round_trips_naive_datetime_and_date(make_dist, tmp_path):
    d = make_dist()
    path = str(tmp_path / "dump")
    d.add_listener(Dumper(path))
    d.start()
    sent = {"naive": dt.datetime(2026, 1, 2, 3, 4, 5, 6), "day": dt.date(2026, 1, 2)}
    d.distribute(fanout.Add(sent))
    d.stop(drain=True)
    assert read_dumps(path) == [("add", sent, False)]


# -- bad input ----------------------------------------------------------------------------------


class Opaque:
    pass


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_unencodable_object_raises_and_nobody_gets_it(make_dist, tmp_path, executor):
    d = make_dist()
    first = tmp_path / "first"
    second = tmp_path / "second"
    d.add_listener(Recorder(first), executor=executor)
    d.add_listener(Recorder(second))  # a process listener: the codec runs
    d.start()
    with pytest.raises(TypeError, match="Opaque"):
        d.distribute(fanout.Add(obj("bad", payload=Opaque())))
    with pytest.raises(TypeError, match="set"):
        d.distribute(fanout.Update(obj("x"), obj("bad", payload={1, 2})))
    d.distribute(fanout.Add(obj("good")))  # still usable
    d.stop(drain=True)
    assert [c.name for c in read_calls(first)] == ["good"]
    assert [c.name for c in read_calls(second)] == ["good"]


def test_unencodable_initial_list_leaves_nothing_registered(make_dist):
    d = make_dist()
    with pytest.raises(TypeError, match="Opaque"):
        d.add_listener(Noop(), initial_list=[obj("a"), Opaque()])
    assert d.listener_count == 0


def test_distribute_refuses_non_notifications(make_dist):
    d = make_dist()
    d.add_listener(Noop(), executor="thread")
    d.start()
    with pytest.raises(TypeError, match=r"fanout\.Add"):
        d.distribute({"metadata": {}})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"handler": 42}, TypeError, "handler must be"),
        ({"handler": "on_add"}, TypeError, "handler must be"),
        ({"workers": 0}, ValueError, "workers must be >= 1, got 0"),
        ({"workers": 1.5}, TypeError, "workers must be an int"),
        (
            {"executor": "fiber"},
            ValueError,
            "executor must be 'process', 'thread' or 'ray', got 'fiber'",
        ),
        ({"resync_period": -1}, ValueError, "resync_period must be"),
        ({"resync_period": "5s"}, TypeError, "resync_period must be a number"),
        (
            {"max_pending_bytes": -5},
            ValueError,
            "max_pending_bytes must exceed the 12-byte frame header",
        ),
        ({"overflow": "spill"}, ValueError, "overflow must be one of"),
        ({"handler_timeout": -1}, ValueError, "handler_timeout must be"),
        (
            {"handler_timeout": 0},
            ValueError,
            "handler_timeout must be a finite number of seconds > 0",
        ),
        ({"max_attempts": 0}, ValueError, "max_attempts must be >= 1, got 0"),
        ({"on_error": "log"}, TypeError, "on_error must be callable"),
        ({"on_dead_letter": 1}, TypeError, "on_dead_letter must be callable"),
        ({"key": "name"}, TypeError, "key must be a function"),
        ({"name": ""}, TypeError, "name must be a non-empty str"),
        ({"executor": "thread", "workers": 2}, ValueError, "workers needs executor='process'"),
        (
            {"executor": "thread", "handler_timeout": 1},
            ValueError,
            "handler_timeout needs executor='process'",
        ),
        (
            {"handler": lambda: Noop()},
            TypeError,
            "cannot be pickled",
        ),
        (
            {"handler": lambda x: Noop()},
            TypeError,
            "takes arguments, but a callable handler is a factory",
        ),
    ],
)
def test_bad_listener_options_raise_and_leave_nothing(make_dist, kwargs, error, match):
    d = make_dist()
    d.start()
    kwargs = {"handler": Noop(), **kwargs}
    with pytest.raises(error, match=match):
        d.add_listener(**kwargs)
    assert d.listener_count == 0
    d.add_listener(Noop(), executor="thread")  # still usable
    d.distribute(fanout.Add(obj("x")))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"codec": "json"}, ValueError, "codec must be 'msgpack', 'msgspec'"),
        ({"start_method": "fork"}, ValueError, "unsafe"),
        ({"start_method": "thread"}, ValueError, "start_method must be"),
        ({"resync_check_period": -1}, ValueError, "resync_check_period must be"),
        ({"clock": 5}, TypeError, "clock must be a callable"),
    ],
)
def test_bad_distributor_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        fanout.Distributor(**kwargs)


def test_factory_returning_a_non_handler_fails_start(make_dist):
    d = make_dist()
    d.add_listener(int)
    with pytest.raises(fanout.WorkerStartError, match="no on_add / on_update / on_delete"):
        d.start()


def test_distributor_and_registration_do_not_pickle(make_dist):
    import pickle

    d = make_dist()
    reg = d.add_listener(Noop(), executor="thread")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(d)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(reg)


# -- errors and stats ---------------------------------------------------------------------------


@pytest.mark.parametrize("executor", EXECUTORS)
def test_handler_exception_is_logged_counted_and_passed_on(make_dist, tmp_path, executor, caplog):
    errors = []
    d = make_dist()
    reg = d.add_listener(
        Recorder(tmp_path / "r"),
        executor=executor,
        on_error=lambda r, n, text: errors.append((r, n, text)),
    )
    d.start()
    with caplog.at_level(logging.ERROR, logger="fanout"):
        d.distribute(fanout.Add(obj("bad", **{"raise": True})))
        d.distribute(fanout.Add(obj("good")))
        d.stop(drain=True)
        assert wait_for(lambda: errors)
    (r, n, text) = errors[0]
    assert r is reg and n == fanout.Add(obj("bad", **{"raise": True}))
    assert "ValueError: asked to raise by bad" in text
    assert "asked to raise by bad" in caplog.text
    stats = reg.stats()
    assert stats.errors == 1 and stats.delivered == 2
    assert [c.name for c in read_calls(tmp_path / "r")] == ["good"]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_stats_count_and_measure_latency(make_dist, tmp_path, executor):
    d = make_dist()
    reg = d.add_listener(Noop(), executor=executor, name="stats-me")
    d.start()
    for i in range(500):
        d.distribute(fanout.Update(obj("x", i), obj("x", i)))
    d.stop(drain=True)
    s = reg.stats()
    assert isinstance(s, fanout.ListenerStats)
    assert (s.name, s.executor, s.delivered, s.pending, s.errors, s.dropped) == (
        "stats-me",
        executor,
        500,
        0,
        0,
        0,
    )
    assert s.dead_lettered == 0 and s.restarts == 0
    assert 0 < s.latency_p50 <= s.latency_p99 <= s.latency_max


def test_stats_pending_while_stalled(make_dist, tmp_path):
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"))
    d.start()
    distribute_behind_gate(d, gate, 99)
    s = reg.stats()
    assert s.pending == 100 and s.pending_bytes > 0 and s.capacity_bytes >= s.pending_bytes
    gate.touch()
    d.stop(drain=True)
    assert reg.stats().pending == 0 and reg.stats().delivered == 100


def test_key_function_routes_lanes_and_errors_stop_the_call(make_dist, tmp_path):
    d = make_dist()
    path = tmp_path / "r"
    reg = d.add_listener(Recorder(path), workers=3, key=lambda o: o["v"] % 3)
    d.start()
    for i in range(30):
        d.distribute(fanout.Add(obj("same-name", i)))
    d.stop(drain=True)
    calls = read_calls(path)
    by_pid: dict[int, set[int]] = {}
    for c in calls:
        by_pid.setdefault(c.pid, set()).add(c.v % 3)
    assert len(by_pid) == 3 and all(len(s) == 1 for s in by_pid.values())
    assert reg.stats().delivered == 30


def test_key_function_error_distributes_nothing(make_dist, tmp_path):
    d = make_dist()
    first = tmp_path / "first"
    d.add_listener(Recorder(first), executor="thread")
    d.add_listener(Noop(), workers=2, key=lambda o: o["missing"])
    d.start()
    with pytest.raises(KeyError):
        d.distribute(fanout.Add(obj("x")))
    d.stop(drain=True)
    assert read_calls(first) == []


def test_shutdown_listener_from_own_handler_raises(make_dist):
    d = make_dist()
    seen = []

    class SelfStopper(fanout.Handler):
        def on_add(self, obj, is_in_initial_list):
            try:
                d.shutdown_listener(reg)
            except RuntimeError as exc:
                seen.append(str(exc))

    reg = d.add_listener(SelfStopper(), executor="thread")
    d.start()
    d.distribute(fanout.Add(obj("x")))
    assert wait_for(lambda: seen)
    assert "remove_listener" in seen[0]
    assert d.shutdown_listener(reg, timeout=30) is True


def test_a_forgotten_distributor_is_stopped_at_interpreter_exit(tmp_path):
    import subprocess
    import sys
    import textwrap

    import psutil

    script = tmp_path / "forget.py"
    script.write_text(
        textwrap.dedent(
            """
            import fanout
            if __name__ == "__main__":
                d = fanout.Distributor()
                reg = d.add_listener(fanout.Handler(), workers=2)
                d.start()
                reg.wait_ready(60)
                d.distribute(fanout.Add({"x": 1}))
                print(*reg.worker_pids())
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    assert wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), timeout=30)


def test_a_distributor_keeps_the_programs_own_forkserver_preloads(make_dist, monkeypatch):
    from multiprocessing import forkserver

    monkeypatch.setattr(
        forkserver._forkserver, "_preload_modules", list(forkserver._forkserver._preload_modules)
    )
    forkserver.set_forkserver_preload(["__main__", "json"])
    make_dist()
    assert forkserver._forkserver._preload_modules == ["__main__", "json", "fanout.worker.main"]
    make_dist()  # added once
    assert forkserver._forkserver._preload_modules == ["__main__", "json", "fanout.worker.main"]
