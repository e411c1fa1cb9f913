"""Documented behaviours (docs/concepts.md, docs/guarantees.md) the other test files leave out.

Handlers and objects: every listed object type and user codec hooks round-trip to a
worker; a handler instance is copied into each worker, a class or factory is called once
in each. Routing: per-key order with a user key, round-robin without metadata. Resync,
initial lists, sync, introspection, removal and shutdown edge cases. Failures: worker
deaths (SIGKILL, SIGSEGV) on both start methods, other lanes and listeners unaffected,
exceptions reported in the parent. Rings: ``send_to`` releases the GIL, and
``FANOUT_NO_EXTENSIONS=1`` selects the pure-Python twins.

Handlers here are module-level, so they pickle and a ``spawn`` worker can import them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import types
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
from helpers import (
    Collector,
    Dumper,
    FakeClock,
    Noop,
    Recorder,
    obj,
    read_calls,
    read_dumps,
    wait_calls,
    wait_for,
)

import fanout

TESTS_DIR = Path(__file__).resolve().parent


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def upd(name: str, v: int, **extra: Any) -> fanout.Update:
    return fanout.Update(obj(name, v - 1), obj(name, v, **extra))


# -- module-level handlers (they pickle; spawn workers import this module) -----------------


class Probe(fanout.Handler):
    """Record, per call, who built this instance and which call of it this is.

    Keeps no path: each object names the directory (``obj["out"]``); the line goes to
    the file named after the handler's class, so it can be built with no argument.
    """

    def __init__(self) -> None:
        self.built_pid = os.getpid()
        self.token = uuid.uuid4().hex
        self.calls = 0

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        self.calls += 1
        line = {
            "pid": os.getpid(),
            "thread": threading.current_thread().name,
            "built_pid": self.built_pid,
            "token": self.token,
            "call": self.calls,
            "v": obj["v"],
        }
        path = os.path.join(obj["out"], type(self).__name__)
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


class ProbeClass(Probe):
    """Given as a class: each worker builds one."""


class ProbeFromFunction(Probe):
    """Built by ``make_probe``, a zero-argument factory function."""


class ProbeInstance(Probe):
    """Given as an instance, built in the parent: each worker gets a copy."""


def make_probe() -> ProbeFromFunction:
    return ProbeFromFunction()


def read_probe(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


class Crasher(Recorder):
    """A ``Recorder`` whose worker segfaults on ``{"segv": True}``."""

    def _steer(self, o: Any) -> None:
        if isinstance(o, dict) and o.get("segv"):
            ctypes.string_at(0)  # a real SIGSEGV, as a buggy C extension would cause
        super()._steer(o)


class Keeper(fanout.Handler):
    """Keep every object in memory, with the thread that handled it (thread executor)."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, int, threading.Thread]] = []

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        self.seen.append((obj, os.getpid(), threading.current_thread()))


def note_impl(path: str, is_in_initial_list: bool) -> None:
    """A FuncHandler ``on_add``: write which serve loop this worker runs."""
    from fanout.native import pick as _impl

    with open(path, "a") as f:
        f.write(f"{_impl.serve.__module__} {_impl.NATIVE}\n")


# -- user codec hooks ------------------------------------------------------------------------

POINT_EXT = 64  # the first extension code left to users


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Unknown:
    pass


def point_default(o: Any) -> Any:
    """``MsgpackCodec(default=...)``: a Point becomes an ExtType, a Decimal its text."""
    if isinstance(o, Point):
        return msgpack.ExtType(POINT_EXT, msgpack.packb([o.x, o.y]))
    if isinstance(o, Decimal):
        return str(o)
    raise TypeError(f"cannot encode {type(o).__name__}")


def point_ext_hook(code: int, data: bytes) -> Any:
    """``MsgpackCodec(ext_hook=...)``: rebuild a Point."""
    if code == POINT_EXT:
        return Point(*msgpack.unpackb(data))
    return msgpack.ExtType(code, data)


# -- objects ---------------------------------------------------------------------------------

AWARE = dt.datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
NAIVE = dt.datetime(1999, 12, 31, 23, 59, 59, 999999)

SCALARS: list[Any] = [
    {"metadata": {"name": "n", "namespace": "ns"}, "spec": {"a": [1, {"b": None}]}},
    {},
    {1: "int key"},
    [1, "two", 3.0, None, True, b"\x00", [[]]],
    [],
    "text",
    "",
    "ünïcødé ✓",
    b"\x00\xffbytes",
    b"",
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    -0.0,
    float("inf"),
    True,
    False,
    None,
    AWARE,
    NAIVE,
    dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
]

ARRAYS: list[np.ndarray] = [
    np.array(5),  # 0-d: its shape () survives
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian dtype kept
    np.array([True, False, True]),
    np.array(["ab", "c"]),
    np.array([1 + 2j, -3j]),
    np.zeros((0, 3)),
    np.arange(24, dtype=np.int16).reshape(2, 3, 4)[:, ::2, 1:],  # not contiguous
    np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3)),
]


def _same(got: Any, sent: Any) -> bool:
    """Equal and of the same type, recursively; arrays by dtype, shape and values."""
    if isinstance(sent, np.ndarray):
        return (
            isinstance(got, np.ndarray)
            and got.dtype == sent.dtype
            and got.shape == sent.shape
            and np.array_equal(got, sent)
        )
    if type(got) is not type(sent):
        return False
    if isinstance(sent, dict):
        return got.keys() == sent.keys() and all(_same(got[k], sent[k]) for k in sent)
    if isinstance(sent, list):
        return len(got) == len(sent) and all(map(_same, got, sent))
    if isinstance(sent, float) and sent == 0:
        return str(got) == str(sent)  # -0.0 stays -0.0
    if isinstance(sent, dt.datetime):
        return got == sent and got.tzinfo == sent.tzinfo
    return bool(got == sent)


def test_every_listed_object_type_round_trips_to_a_process_handler(
    make_dist, tmp_path, start_method
):
    d = make_dist(start_method=start_method)
    path = tmp_path / "dump"
    d.add_listener(Dumper(path))
    d.start()
    for x in SCALARS:
        d.distribute(fanout.Add(x))
    for i, arr in enumerate(ARRAYS):
        d.distribute(fanout.Update({"i": i, "arr": arr}, arr))
    d.distribute(fanout.Delete({"when": AWARE, "arrays": ARRAYS, "scalars": SCALARS}))
    d.distribute(fanout.Add(AWARE, True))
    assert d.stop(drain=True, timeout=60) is True

    got = read_dumps(path)
    assert len(got) == len(SCALARS) + len(ARRAYS) + 2
    for (kind, x, initial), sent in zip(got, SCALARS, strict=False):
        assert kind == "add" and initial is False
        assert _same(x, sent), (x, sent)
    for i, (kind, old, new) in enumerate(got[len(SCALARS) : len(SCALARS) + len(ARRAYS)]):
        assert kind == "update"
        assert old["i"] == i and _same(old["arr"], ARRAYS[i]), (old, ARRAYS[i])
        assert _same(new, ARRAYS[i]), (new, ARRAYS[i])
    kind, deleted = got[-2]
    assert kind == "delete" and deleted["when"] == AWARE
    assert all(map(_same, deleted["arrays"], ARRAYS))
    assert all(map(_same, deleted["scalars"], SCALARS))
    assert got[-1] == ("add", AWARE, True)


def test_user_codec_hooks_round_trip_a_custom_type(make_dist, tmp_path):
    codec = fanout.MsgpackCodec(default=point_default, ext_hook=point_ext_hook)
    d = make_dist(codec=codec)
    path = tmp_path / "dump"
    d.add_listener(Dumper(path))
    d.start()
    sent = {
        "p": Point(1, 2),
        "ps": [Point(3, 4), Point(-5, 6)],
        "price": Decimal("1.50"),
        "when": AWARE,  # fanout's own types still come first
        "arr": np.arange(3),
    }
    d.distribute(fanout.Update(Point(0, 0), sent))
    with pytest.raises(TypeError, match="Unknown"):  # the hook refuses: nothing is sent
        d.distribute(fanout.Add({"p": Point(7, 7), "bad": Unknown()}))
    d.distribute(fanout.Delete(Point(9, 9)))
    assert d.stop(drain=True, timeout=60) is True
    (kind, old, new), last = read_dumps(path)
    assert kind == "update" and old == Point(0, 0)
    assert new["p"] == Point(1, 2) and new["ps"] == [Point(3, 4), Point(-5, 6)]
    assert new["price"] == "1.50"
    assert new["when"] == AWARE and np.array_equal(new["arr"], np.arange(3))
    assert last == ("delete", Point(9, 9))


def test_without_hooks_a_custom_type_is_refused_naming_it(make_dist, tmp_path):
    d = make_dist()
    path = tmp_path / "dump"
    d.add_listener(Dumper(path))
    d.start()
    with pytest.raises(TypeError, match="Point"):
        d.distribute(fanout.Delete(Point(1, 2)))
    with pytest.raises(TypeError, match="Point"):
        d.distribute(fanout.Update({"ok": 1}, [Point(1, 2)]))
    d.distribute(fanout.Add("fine"))
    assert d.stop(drain=True, timeout=60) is True
    assert read_dumps(path) == [("add", "fine", False)]


# -- handlers: instance copies, classes and factories --------------------------------------


def test_instance_is_copied_and_class_or_factory_called_once_per_worker(
    make_dist, tmp_path, start_method
):
    d = make_dist(start_method=start_method)
    instance = ProbeInstance()
    regs = [
        d.add_listener(ProbeClass, workers=2),
        d.add_listener(make_probe, workers=2),
        d.add_listener(instance, workers=2),
    ]
    d.start()
    n = 20  # no metadata: round-robin, so both lanes of each listener get some
    for v in range(n):
        d.distribute(fanout.Add({"out": str(tmp_path), "v": v}))
    assert d.stop(drain=True, timeout=60) is True
    parent = os.getpid()

    for cls in (ProbeClass, ProbeFromFunction):
        lines = read_probe(tmp_path / cls.__name__)
        assert sorted(x["v"] for x in lines) == list(range(n)), cls
        pids = {x["pid"] for x in lines}
        assert len(pids) == 2 and parent not in pids, cls
        tokens = {x["pid"]: {y["token"] for y in lines if y["pid"] == x["pid"]} for x in lines}
        assert all(len(t) == 1 for t in tokens.values()), tokens  # one build per worker
        assert len({t for ts in tokens.values() for t in ts}) == 2  # a distinct one each
        assert all(x["built_pid"] == x["pid"] for x in lines), cls  # built in the worker
        for pid in pids:  # the same instance served every call of its worker
            calls = [x["call"] for x in lines if x["pid"] == pid]
            assert calls == list(range(1, len(calls) + 1)), (cls, calls)

    lines = read_probe(tmp_path / ProbeInstance.__name__)
    assert sorted(x["v"] for x in lines) == list(range(n))
    pids = {x["pid"] for x in lines}
    assert len(pids) == 2 and parent not in pids
    # Built once, in the parent, then copied: the same token, not re-initialised...
    assert {(x["built_pid"], x["token"]) for x in lines} == {(parent, instance.token)}
    for pid in pids:  # ...and each copy counts its own calls, unseen by the others
        calls = [x["call"] for x in lines if x["pid"] == pid]
        assert calls == list(range(1, len(calls) + 1))
    assert instance.calls == 0  # nor by the parent's instance
    assert all(r.stats().errors == 0 for r in regs)


def test_thread_executor_runs_the_handler_itself_in_one_thread(make_dist):
    d = make_dist()
    keeper = Keeper()
    reg = d.add_listener(keeper, executor="thread")
    d.start()
    sent = [{"v": v, "payload": object()} for v in range(50)]  # no codec: anything goes
    for o in sent:
        d.distribute(fanout.Add(o))
    assert d.stop(drain=True, timeout=60) is True
    assert [o for o, _, _ in keeper.seen] == sent
    assert all(got is o for (got, _, _), o in zip(keeper.seen, sent, strict=True))
    assert {pid for _, pid, _ in keeper.seen} == {os.getpid()}
    threads = {t for _, _, t in keeper.seen}
    assert len(threads) == 1 and threading.main_thread() not in threads
    assert reg.worker_pids() == []


# -- routing ---------------------------------------------------------------------------------


def test_per_key_order_with_a_user_key_and_three_workers(make_dist, tmp_path):
    d = make_dist()
    path = tmp_path / "r"
    reg = d.add_listener(Recorder(path), workers=3, key=lambda o: o["k"])
    d.start()
    keys, versions = 9, 40
    for v in range(versions):
        for k in range(keys):  # the name varies: only the user key keeps one lane
            d.distribute(fanout.Add(obj(f"k{k}-{v}", v, k=k)))
    assert d.stop(drain=True, timeout=60) is True
    calls = read_calls(path)
    assert len(calls) == keys * versions
    by_key: dict[int, list[int]] = {}
    pids: dict[int, set[int]] = {}
    for c in calls:
        k = int(c.name.split("-")[0][1:])
        by_key.setdefault(k, []).append(c.v)
        pids.setdefault(k, set()).add(c.pid)
    assert all(vs == list(range(versions)) for vs in by_key.values()), by_key
    assert all(len(p) == 1 for p in pids.values())
    assert len({p for s in pids.values() for p in s}) > 1  # the keys spread over lanes
    assert reg.stats().delivered == keys * versions


def test_default_key_round_robins_objects_without_metadata(make_dist, tmp_path):
    d = make_dist()
    path = tmp_path / "r"
    d.add_listener(Recorder(path), workers=2)
    d.start()
    sent = [*range(10), *({"v": i} for i in range(10))]  # neither has metadata
    for x in sent:
        d.distribute(fanout.Add(x))
    assert d.stop(drain=True, timeout=60) is True
    calls = read_calls(path)
    assert len(calls) == len(sent)
    per_pid: dict[int, int] = {}
    for c in calls:
        per_pid[c.pid] = per_pid.get(c.pid, 0) + 1
    assert sorted(per_pid.values()) == [10, 10], per_pid  # both lanes, in turn


# -- distribute, sync and resync -------------------------------------------------------------


def test_sync_distribute_without_a_syncing_listener_is_a_noop(make_dist, tmp_path):
    clock = FakeClock()
    d = make_dist(resync_check_period=1.0, clock=clock)
    paths = [tmp_path / "process", tmp_path / "thread"]
    regs = [
        d.add_listener(Recorder(paths[0]), resync_period=5),
        d.add_listener(Recorder(paths[1]), executor="thread", resync_period=5),
    ]
    assert all(r.syncing for r in regs)  # new listeners start syncing
    assert d.should_resync() is False  # not due yet: nobody syncs now
    assert not any(r.syncing for r in regs)
    d.start()
    d.distribute(fanout.Add(obj("resync")), sync=True)
    d.distribute(fanout.Add(obj("live")))
    assert d.stop(drain=True, timeout=60) is True
    for path in paths:
        assert [c.name for c in read_calls(path)] == ["live"]
    assert [r.stats().delivered for r in regs] == [1, 1]


def test_should_resync_with_a_period_zero_listener(make_dist):
    clock = FakeClock()
    d = make_dist(resync_check_period=1.0, clock=clock)
    never = d.add_listener(Noop(), executor="thread", resync_period=0)
    assert never.resync_period == 0
    for step in (0, 1, 10, 1e6):
        clock.now = 1000.0 + step
        assert d.should_resync() is False
        assert never.syncing is False
    periodic = d.add_listener(Noop(), executor="thread", resync_period=3)  # at t = 1e6 + 1000
    clock.now += 3
    assert d.should_resync() is True
    assert (never.syncing, periodic.syncing) == (False, True)


def test_next_resync_starts_at_add_time_plus_period(make_dist):
    clock = FakeClock(1000.0)
    d = make_dist(resync_check_period=1.0, clock=clock)
    first = d.add_listener(Noop(), executor="thread", resync_period=3)
    clock.now = 1001.0
    second = d.add_listener(Noop(), executor="thread", resync_period=3)

    def syncing_at(t: float) -> tuple[bool, bool, bool]:
        clock.now = t
        due = d.should_resync()
        return due, first.syncing, second.syncing

    assert syncing_at(1002.5) == (False, False, False)
    assert syncing_at(1003.0) == (True, True, False)  # now >= next_resync: due
    assert syncing_at(1003.5) == (False, False, False)
    assert syncing_at(1004.0) == (True, False, True)
    assert syncing_at(1006.0) == (True, True, False)  # first: 1003 + 3
    assert syncing_at(1007.0) == (True, False, True)  # second: 1004 + 3


def test_stop_before_start_dead_letters_the_backlog(make_dist, tmp_path):
    dead = []
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), on_dead_letter=lambda r, n, why: dead.append(n))
    d.distribute(fanout.Add(obj("never")))  # buffered, never waits
    assert d.stop() is False
    assert read_calls(tmp_path / "r") == []
    assert [n.obj["metadata"]["name"] for n in dead] == ["never"]
    assert reg.stats().dead_lettered == 1


# -- initial lists and sync ------------------------------------------------------------------


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_initial_flag_only_on_initial_items_and_only_for_their_listener(
    make_dist, tmp_path, executor
):
    d = make_dist()
    with_list, without = tmp_path / "with", tmp_path / "without"
    d.add_listener(Recorder(with_list), executor=executor, initial_list=[obj("i0"), obj("i1")])
    d.add_listener(Recorder(without), executor=executor)
    d.start()
    d.distribute(fanout.Add(obj("live")))
    d.distribute(fanout.Add(obj("also-live")))
    assert d.stop(drain=True, timeout=60) is True
    assert [(c.name, c.initial) for c in read_calls(with_list)] == [
        ("i0", True),
        ("i1", True),
        ("live", False),
        ("also-live", False),
    ]
    assert [(c.name, c.initial) for c in read_calls(without)] == [
        ("live", False),
        ("also-live", False),
    ]


def test_dead_lettered_initial_add_still_counts_as_synced(make_dist, tmp_path):
    path = tmp_path / "r"
    dead = Collector()
    d = make_dist()
    reg = d.add_listener(
        Recorder(path),
        initial_list=[obj("poison", exit="kill"), obj("after")],
        max_attempts=1,
        on_dead_letter=dead,
    )
    d.start()
    d.mark_synced()
    assert reg.wait_synced(timeout=60) is True
    assert reg.has_synced() is True
    assert wait_for(lambda: len(dead) == 1)
    assert dead.snapshot()[0][1] == fanout.Add(obj("poison", exit="kill"), True)
    assert [(c.name, c.initial) for c in read_calls(path)] == [("after", True)]
    assert reg.stats().dead_lettered == 1


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_without_initial_list_synced_follows_mark_synced(make_dist, executor):
    d = make_dist()
    reg = d.add_listener(Noop(), executor=executor)
    d.start()
    assert reg.has_synced() is False
    assert reg.wait_synced(timeout=0.05) is False
    d.mark_synced()
    assert reg.has_synced() is True
    assert reg.wait_synced() is True


# -- introspection and lifecycle -------------------------------------------------------------


def test_introspection_through_the_lifecycle(make_dist):
    d = make_dist()
    assert (d.started, d.stopped, d.listener_count) == (False, False, 0)
    a = d.add_listener(Noop(), executor="thread")
    b = d.add_listener(Noop())
    assert d.listener_count == 2 and d.listeners == (a, b)
    assert d.is_registered(a) and d.is_registered(b)
    assert not d.is_registered(None) and not d.is_registered(object())
    d.start()
    assert (d.started, d.stopped) == (True, False)
    assert b.wait_ready(30)
    d.remove_listener(b)
    assert d.listener_count == 1 and not d.is_registered(b) and d.is_registered(a)
    assert d.stop() is True  # nothing was pending
    assert (d.started, d.stopped) == (True, True)
    assert d.stop() is True  # again: nothing to do


def test_stop_before_start_leaves_nothing_behind(make_dist, tmp_path):
    d = make_dist()
    d.add_listener(Recorder(tmp_path / "r"), workers=2, initial_list=[obj("a")])
    d.add_listener(Noop(), executor="thread")
    d.stop(drain=False)
    assert (d.started, d.stopped) == (False, True)
    with pytest.raises(fanout.DistributorStopped):
        d.add_listener(Noop())
    assert read_calls(tmp_path / "r") == []  # no worker ever ran


# -- removal and shutdown --------------------------------------------------------------------


def test_remove_listener_does_not_wait_for_a_running_handler(make_dist, tmp_path):
    gate = tmp_path / "gate"
    path, other_path = tmp_path / "removed", tmp_path / "other"
    d = make_dist()
    reg = d.add_listener(Recorder(path))
    d.add_listener(Recorder(other_path))
    d.start()
    d.distribute(fanout.Add(obj("stuck", gate=str(gate))))
    assert wait_for(lambda: reg.stats().latency_p50 is not None)  # the handler runs
    (pid,) = reg.worker_pids()
    d.remove_listener(reg)  # returns while the handler is still blocked on the gate
    assert not d.is_registered(reg) and d.listener_count == 1
    assert _alive(pid)
    assert read_calls(path) == []
    d.distribute(fanout.Add(obj("after")))
    gate.touch()
    assert d.shutdown_listener(reg, timeout=60) is True  # already removed: waits only
    assert wait_for(lambda: not _alive(pid))
    assert d.stop(drain=True, timeout=60) is True
    assert {c.name for c in read_calls(path)} <= {"stuck"}  # never "after"
    assert [c.name for c in read_calls(other_path)] == ["stuck", "after"]


def test_shutdown_listener_times_out_on_a_stuck_handler(make_dist, tmp_path):
    never = tmp_path / "never-created"
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"))
    d.start()
    d.distribute(fanout.Add(obj("stuck", gate=str(never))))
    assert wait_for(lambda: reg.stats().latency_p50 is not None)
    (pid,) = reg.worker_pids()
    assert d.shutdown_listener(reg, timeout=0.3) is False
    assert not d.is_registered(reg)
    assert _alive(pid)  # still inside the handler
    d.stop(drain=False)  # kills it; the fixture checks nothing is left
    assert wait_for(lambda: not _alive(pid))
    assert reg.worker_pids() == []
    assert read_calls(tmp_path / "r") == []


def test_shutdown_listener_from_an_on_error_callback_raises(make_dist, tmp_path):
    seen: list[str] = []

    def on_error(reg: Any, n: Any, text: str) -> None:
        try:
            d.shutdown_listener(reg, timeout=5)
        except RuntimeError as exc:
            seen.append(str(exc))
            d.remove_listener(reg)  # what the message advises: does not wait

    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "r"), on_error=on_error)
    d.start()
    d.distribute(fanout.Add(obj("bad", **{"raise": True})))
    assert wait_for(lambda: seen)
    assert "remove_listener" in seen[0]
    assert wait_for(lambda: not d.is_registered(reg))
    assert d.shutdown_listener(reg, timeout=60) is True


# -- stats -----------------------------------------------------------------------------------

STATS_FIELDS = {
    "pending",
    "pending_bytes",
    "capacity_bytes",
    "delivered",
    "errors",
    "dropped",
    "dead_lettered",
    "restarts",
    "latency_p50",
    "latency_p99",
}


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_stats_before_any_delivery(make_dist, executor):
    d = make_dist()
    reg = d.add_listener(Noop(), executor=executor)
    for started in (False, True):
        if started:
            d.start()
            assert reg.wait_ready(30)
        s = reg.stats()
        assert isinstance(s, fanout.ListenerStats)
        assert STATS_FIELDS <= {f.name for f in dataclasses.fields(s)}
        assert (s.latency_p50, s.latency_p99) == (None, None)
        assert (s.pending, s.pending_bytes, s.delivered, s.errors) == (0, 0, 0, 0)
        assert (s.dropped, s.dead_lettered, s.restarts) == (0, 0, 0)
    d.distribute(fanout.Add(obj("x")))
    assert wait_for(lambda: reg.stats().delivered == 1)
    s = reg.stats()
    assert s.latency_p50 is not None and 0 < s.latency_p50 <= s.latency_p99


# -- worker deaths and exceptions, on both start methods ------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 2])
def test_sigkill_mid_call_resends_in_order_and_counts_one_attempt(
    make_dist, tmp_path, start_method, max_attempts
):
    gate = tmp_path / "gate"
    path = tmp_path / "r"
    dead = Collector()
    d = make_dist(start_method=start_method)
    reg = d.add_listener(Recorder(path), max_attempts=max_attempts, on_dead_letter=dead)
    d.start()
    assert reg.wait_ready(60)
    (pid,) = reg.worker_pids()
    first = upd("k", 0, gate=str(gate))
    d.distribute(first)
    for v in range(1, 10):
        d.distribute(upd("k", v))
    assert wait_for(lambda: reg.stats().latency_p50 is not None)  # inside call 0
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: reg.stats().restarts == 1 and reg.worker_pids() not in ([], [pid]))
    gate.touch()
    expected = list(range(10)) if max_attempts > 1 else list(range(1, 10))
    calls = wait_calls(path, len(expected), timeout=60)
    assert [c.v for c in calls] == expected  # every unfinished frame again, in order
    assert pid not in {c.pid for c in calls}
    assert d.stop(drain=True, timeout=60) is True
    s = reg.stats()
    assert (s.restarts, s.pending, s.errors) == (1, 0, 0)
    if max_attempts == 1:  # the call it died in was its one attempt
        assert s.dead_lettered == 1 and len(dead) == 1
        got_reg, got_n, reason = dead.snapshot()[0]
        assert got_reg is reg and got_n == first and dead.caller_pids() == [os.getpid()]
        assert "SIGKILL" in reason
    else:  # one attempt used, one left: handled by the new worker
        assert s.dead_lettered == 0 and len(dead) == 0
    assert [c.v for c in read_calls(path)] == expected


def test_segfault_is_a_worker_death(make_dist, tmp_path):
    path = tmp_path / "r"
    dead = Collector()
    d = make_dist()
    reg = d.add_listener(Crasher(path), max_attempts=1, on_dead_letter=dead)
    d.start()
    d.distribute(upd("a", 0))
    d.distribute(upd("crash", 1, segv=True))
    d.distribute(upd("b", 2))
    assert [c.v for c in wait_calls(path, 2, timeout=60)] == [0, 2]
    assert wait_for(lambda: len(dead) == 1)
    assert "SIGSEGV" in dead.snapshot()[0][2]
    s = reg.stats()
    assert (s.dead_lettered, s.restarts, s.errors) == (1, 1, 0)
    assert d.stop(drain=True, timeout=60) is True


def test_a_worker_death_goes_unnoticed_by_other_lanes_and_listeners(make_dist, tmp_path):
    path_a, path_b = tmp_path / "a", tmp_path / "b"
    d = make_dist()
    a = d.add_listener(Recorder(path_a), workers=2, key=lambda o: o["lane"])
    b = d.add_listener(Recorder(path_b))
    d.start()
    assert a.wait_ready(60) and b.wait_ready(60)
    (pid_b,) = b.worker_pids()

    def send(v: int) -> None:
        d.distribute(fanout.Add(obj(f"l{v % 2}", v, lane=v % 2)))

    send(0)
    send(1)
    calls = wait_calls(path_a, 2)
    assert wait_for(lambda: a.stats().pending == 0)  # both calls finished, not just logged
    lane_pid = {int(c.name[1]): c.pid for c in calls}
    assert len(set(lane_pid.values())) == 2
    os.kill(lane_pid[0], signal.SIGKILL)  # lane 0 is idle: nothing was running
    for v in range(2, 40):
        send(v)
    assert wait_for(lambda: a.stats().restarts == 1)
    assert d.stop(drain=True, timeout=60) is True

    calls_a = read_calls(path_a)
    assert sorted(c.v for c in calls_a) == list(range(40))  # each exactly once
    assert [c.v for c in calls_a if c.name == "l1"] == list(range(1, 40, 2))
    assert {c.pid for c in calls_a if c.name == "l1"} == {lane_pid[1]}  # lane 1: same worker
    assert [c.v for c in read_calls(path_b)] == list(range(40))
    assert {c.pid for c in read_calls(path_b)} == {pid_b}
    assert (b.stats().restarts, b.stats().errors) == (0, 0)
    assert (a.stats().restarts, a.stats().dead_lettered) == (1, 0)


def test_handler_exception_reported_in_the_parent(make_dist, tmp_path, start_method, caplog):
    caplog.set_level(logging.ERROR, logger="fanout")
    path = tmp_path / "r"
    errors = Collector()
    d = make_dist(start_method=start_method)
    reg = d.add_listener(Recorder(path), on_error=errors)
    d.start()
    assert reg.wait_ready(60)
    pids = reg.worker_pids()
    boom = upd("boom", 1, **{"raise": True})
    d.distribute(upd("a", 0))
    d.distribute(boom)
    d.distribute(upd("b", 2))
    assert [c.v for c in wait_calls(path, 2, timeout=60)] == [0, 2]
    assert wait_for(lambda: len(errors) == 1)
    assert d.stop(drain=True, timeout=60) is True
    got_reg, got_n, text = errors.snapshot()[0]
    assert got_reg is reg and got_n == boom
    assert errors.caller_pids() == [os.getpid()]  # on_error runs in the parent
    assert "Traceback" in text and "ValueError: asked to raise by boom" in text
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "fanout")
    assert "ValueError: asked to raise by boom" in logged and "Traceback" in logged
    assert {c.pid for c in read_calls(path)} == set(pids)  # the worker survived
    s = reg.stats()
    assert (s.errors, s.delivered, s.restarts, s.dead_lettered) == (1, 3, 0, 0)
    assert [c.v for c in read_calls(path)] == [0, 2]  # no retry


# -- rings -----------------------------------------------------------------------------------


def test_send_to_releases_the_gil(ring_impl: types.ModuleType):
    """A ``send_to`` blocked in its write lets other threads run (here: the reader).

    A blocking write end makes the write wait for the reader; holding the GIL there
    would deadlock, so it runs in a child process that exits on a watchdog.
    """
    code = textwrap.dedent(
        f"""
        import faulthandler, os, threading
        from {ring_impl.__name__} import FrameRing
        faulthandler.dump_traceback_later(20, exit=True)  # a deadlock exits with 1
        r, w = os.pipe()  # the write end blocks: send_to waits for the reader
        ring = FrameRing(0)
        size = 1 << 20  # far more than a pipe holds
        ring.append(bytes(size))
        result = []
        sender = threading.Thread(target=lambda: result.append(ring.send_to(w)))
        sender.start()
        got = 0
        while got < size + 12:
            got += len(os.read(r, 1 << 16))
        sender.join()
        print(result[0], got)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str((1 << 20) + 12)] * 2


def test_fanout_no_extensions_forces_the_pure_python_twins(tmp_path):
    out = tmp_path / "impl"
    code = textwrap.dedent(
        f"""
        import fanout, fanout.native._ring_py, fanout.native._pump_py
        from fanout.native import pick as _impl
        assert fanout.NATIVE is False, fanout.NATIVE
        assert fanout.Ring is fanout.native._ring_py.Ring
        assert fanout.FrameRing is fanout.native._ring_py.FrameRing
        assert _impl.Pump is fanout.native._pump_py.Pump
        assert "FANOUT_NO_EXTENSIONS" in fanout.IMPORT_ERROR
        from test_semantics import note_impl
        with fanout.Distributor() as d:
            d.add_listener(fanout.FuncHandler(on_add=note_impl))
            d.distribute(fanout.Add({str(out)!r}))
        print("ok")
        """
    )
    env = {**os.environ, "FANOUT_NO_EXTENSIONS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert out.read_text() == "fanout.native._worker_py False\n"  # the worker's serve loop too
