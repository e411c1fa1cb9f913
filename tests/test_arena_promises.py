"""The arena keeps fanout's promises: what arrives is what left, and nobody paces another.

Structured dtypes round-trip; what a worker could not decode is refused at
``distribute``; any number of producer threads; ``stop()`` racing a copy into the
arena; and a randomised run (sizes, speeds, kills, stops) checking that no
notification is lost, no byte changed, no block leaked and no listener paced another.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest
from helpers import assert_accounted, wait_for
from test_arena import Digester, digest, lines, write_line

import fanout
from fanout.buffers.arena import Arena
from fanout.wire.codec import get_codec

KIB = 1024


def nest(depth: int) -> Any:
    x: Any = 1
    for _ in range(depth):
        x = [x]
    return x


class Depth(fanout.Handler):
    """Records how deep the object it got is nested."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        depth = 0
        while isinstance(obj, list):
            obj, depth = obj[0], depth + 1
        with open(self.path, "a") as f:
            f.write(f"{depth}\n")


def structured() -> list[np.ndarray]:
    dts = [
        np.dtype([("a", "<i4"), ("b", "<f8")]),
        np.dtype([("a", "<i4"), ("b", "<f8")], align=True),
        np.dtype(
            {"names": ["x", "y"], "formats": ["u1", "<f4"], "offsets": [4, 8], "itemsize": 16}
        ),
        np.dtype([("p", [("x", "<f4"), ("y", ">f8")]), ("m", "<i2", (2, 3)), ("s", "S5")]),
        np.dtype([("outer", [("inner", [("v", "<u2")], (2,))])], align=True),
        np.dtype({"names": ["t", "u"], "formats": ["<M8[ns]", "<U3"], "titles": ["Time", None]}),
    ]
    out = []
    for seed, dt in enumerate(dts):
        raw = np.random.default_rng(seed).integers(0, 256, 700 * dt.itemsize, dtype=np.uint8)
        arr = raw.view(dt).copy()
        out.append(arr)
    return out


@pytest.fixture(params=["msgspec", "msgpack"])
def codec(request: pytest.FixtureRequest) -> str:
    """Both built-in codecs: the arena encodes and decodes alike under either."""
    return str(request.param)


@pytest.mark.parametrize("through", ["inline", "arena"])
def test_structured_dtypes_arrive_exactly(make_dist, codec, tmp_path, start_method, through):
    out = tmp_path / "out"
    min_bytes = 1 if through == "arena" else 1 << 30
    d = make_dist(codec=codec, start_method=start_method, shared_min_bytes=min_bytes)
    d.add_listener(Digester(str(out)))
    d.start()
    arrays = structured()
    for i, arr in enumerate(arrays):
        d.distribute(fanout.Add({"i": i, "data": arr}))
    assert wait_for(lambda: len(lines(out)) == len(arrays))
    got = {i: dg for i, dg, _ in (line.split("\t") for line in lines(out))}
    assert got == {str(i): digest(arr) for i, arr in enumerate(arrays)}
    assert d.shared_stats().shared == (len(arrays) if through == "arena" else 0)
    assert d.stop(drain=True, timeout=30)


def test_the_producer_decodes_structured_dtypes_exactly(codec):
    codec = get_codec(codec)
    plain_datetimes = np.arange(5).astype("M8[ns]")  # no buffer export of its own
    for arr in [*structured(), plain_datetimes]:
        n, _ = codec.decode(codec.encode(fanout.Add({"data": arr}), 0))
        assert n.obj["data"].dtype == arr.dtype
        assert n.obj["data"].dtype.isalignedstruct == arr.dtype.isalignedstruct
        assert digest(n.obj["data"]) == digest(arr)


def test_deep_nesting_the_packer_takes_reaches_the_worker_and_deeper_is_refused(
    make_dist, codec, tmp_path, start_method
):
    out = tmp_path / "out"
    seen: list[Any] = []
    d = make_dist(codec=codec, start_method=start_method)
    reg = d.add_listener(Depth(str(out)))
    threaded = d.add_listener(
        fanout.FuncHandler(on_add=lambda o, i: seen.append(o)), executor="thread"
    )
    d.start()
    # Past the default recursion limit of the workers' decoder: they raise theirs.
    d.distribute(fanout.Add(nest(1015)))
    blob = os.urandom(100 * KIB)  # deep and big: too deep to look for big buffers
    deep_and_big: Any = [blob]
    for _ in range(1010):
        deep_and_big = [deep_and_big]
    d.distribute(fanout.Add(deep_and_big))
    with pytest.raises(TypeError, match="nested too deep"):
        d.distribute(fanout.Add(nest(1100)))
    assert d.stop(drain=True, timeout=30)
    assert lines(out) == ["1015", "1011"]
    assert assert_accounted(reg).received == 2 and reg.stats().dead_lettered == 0
    assert len(seen) == 2 and assert_accounted(threaded).received == 2


@pytest.mark.parametrize("max_shared_bytes", [None, 0])
def test_a_strided_memoryview_is_a_type_error_and_nobody_gets_anything(
    make_dist, codec, tmp_path, max_shared_bytes
):
    seen: list[Any] = []
    d = make_dist(codec=codec, max_shared_bytes=max_shared_bytes)
    reg = d.add_listener(Digester(str(tmp_path / "out")))
    threaded = d.add_listener(
        fanout.FuncHandler(on_add=lambda o, i: seen.append(o)), executor="thread"
    )
    d.start()
    strided = memoryview(os.urandom(200 * KIB))[::2]
    with pytest.raises(TypeError, match=r"non-contiguous buffer.*bytes\(view\)"):
        d.distribute(fanout.Add({"i": 0, "data": strided}))
    assert reg.stats().received == 0 and threaded.stats().received == 0
    assert d.shared_stats().held_bytes == 0
    assert d.stop(drain=True, timeout=30)
    assert seen == []


# -- any number of producer threads ---------------------------------------------------


def test_arena_encodes_in_many_threads_keep_their_own_blocks(no_leaks, codec):
    arena = Arena(64 * 1024 * KIB, 1, get_codec(codec))
    codec = get_codec(codec)
    codec._arena = arena
    errors: list[str] = []
    start = threading.Barrier(4)

    def produce(t: int) -> None:
        start.wait()
        for i in range(100):
            arr = np.full(2 * KIB + t * 64 + i, t * 1000 + i, dtype=np.int32)
            blob = bytes([t]) * (3 * KIB + i)
            payload = arena.encode(fanout.Add({"a": arr, "b": blob}), 0)
            n, _ = codec.decode(payload)
            if digest(n.obj["a"]) != digest(arr) or n.obj["b"] != blob:
                errors.append(f"thread {t} notification {i} changed")
            arena.unhold(payload.blocks)  # type: ignore[attr-defined]

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert arena.stats().held_bytes == 0 and arena.stats().shared == 800
    finally:
        arena.close()


class Ordered(fanout.Handler):
    """Records ``thread <tab> index <tab> digest`` in the order handled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        write_line(self.path, f"{obj['t']}\t{obj['i']}\t{digest(obj['data'])}")


def test_distribute_from_four_threads_changes_no_byte_and_keeps_order_per_thread(
    make_dist, tmp_path
):
    # A small arena: blocks are reused, some lanes spill, some buffers go inline.
    d = make_dist(max_shared_bytes=2 * 1024 * KIB)
    outs = [tmp_path / "one", tmp_path / "keyed"]
    regs = [
        d.add_listener(Ordered(str(outs[0])), name="one"),
        d.add_listener(
            Ordered(str(outs[1])),
            name="keyed",
            workers=2,
            key=lambda o: o["t"],
            max_pending_bytes=64 << 20,
        ),
    ]
    d.start()
    per_thread = 60
    start = threading.Barrier(4)

    def array(t: int, i: int) -> np.ndarray:
        return np.full(16 * KIB + 8 * i, t * 1000 + i, dtype=np.float64)

    def produce(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            d.distribute(fanout.Add({"t": t, "i": i, "data": array(t, i)}))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert d.stop(drain=True, timeout=60)
    for reg, out in zip(regs, outs, strict=True):
        assert assert_accounted(reg).delivered == 4 * per_thread
        rows = [line.split("\t") for line in lines(out)]
        for t in range(4):
            mine = [(int(i), dg) for tt, i, dg in rows if int(tt) == t]
            assert [i for i, _ in mine] == list(range(per_thread))  # order per thread
            assert all(dg == digest(array(t, i)) for i, dg in mine)  # no byte changed
    assert d.shared_stats().held_bytes == 0


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_drops_by_concurrent_producers_are_all_counted(make_dist, tmp_path, overflow):
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(
        Digester(str(tmp_path / "out"), str(gate)), max_pending_bytes=300 * KIB, overflow=overflow
    )
    d.start()
    start = threading.Barrier(4)
    blob = os.urandom(70 * KIB)  # through the arena: real bytes fill the bound fast

    def produce(t: int) -> None:
        start.wait()
        for i in range(300):
            d.distribute(fanout.Add({"i": t * 1000 + i, "data": blob if i % 3 else b"x"}))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert reg.stats().dropped > 0
    gate.touch()
    assert d.stop(drain=True, timeout=60)
    s = assert_accounted(reg)  # received == delivered + dropped, exactly
    assert s.received == 1200
    assert d.shared_stats().held_bytes == 0


# -- lifetimes --------------------------------------------------------------------------


def test_close_during_a_copy_into_the_arena_leaves_the_mapping_until_the_copy_ends(
    no_leaks, monkeypatch
):
    arena = Arena(8 * 1024 * KIB, 1, fanout.MsgpackCodec())
    copying, finish = threading.Event(), threading.Event()
    real_copyto = np.copyto

    def slow_copyto(dst: Any, src: Any, **kw: Any) -> None:
        copying.set()
        finish.wait(30)
        real_copyto(dst, src, **kw)  # writes into the block: unmapped, this would crash

    monkeypatch.setattr(np, "copyto", slow_copyto)
    done: list[Any] = []
    arr = np.arange(1024 * KIB, dtype=np.float64)[::2]  # 4 MiB, strided: numpy copies it

    def encode() -> None:
        done.append(arena.encode(fanout.Add({"data": arr}), 0))

    t = threading.Thread(target=encode)
    t.start()
    assert copying.wait(30)
    arena.close()  # stop() closes the arena: the copy's buffer export keeps it mapped
    finish.set()
    t.join(30)
    assert not t.is_alive() and len(done) == 1
    arena.unhold(done[0].blocks)  # after close: nothing is held any more
    assert arena.stats().held_bytes == 0


def test_stop_racing_distribute_of_big_arrays_never_crashes(make_dist, tmp_path):
    arr = np.ones(1024 * KIB // 8)  # 1 MiB
    for trial in range(6):
        d = make_dist()
        d.add_listener(Digester(str(tmp_path / f"out{trial}")))
        d.start()
        stopped = threading.Event()

        def produce(d: Any = d, stopped: threading.Event = stopped) -> None:
            while not stopped.is_set():
                try:
                    d.distribute(fanout.Add({"i": 0, "data": arr}))
                except fanout.DistributorStopped:
                    return

        t = threading.Thread(target=produce)
        t.start()
        time.sleep(0.01 * trial)
        d.stop(drain=False)
        stopped.set()
        t.join(30)
        assert not t.is_alive()
        assert d.shared_stats().held_bytes == 0


# -- a randomised run: sizes, speeds, kills, stops ---------------------------------------


def _payload(rng: random.Random, i: int) -> Any:
    size = rng.choice([0, 10, 4 * KIB, 60 * KIB, 100 * KIB, 300 * KIB])
    kind = rng.choice(["f8", "u1", "struct", "bytes"])
    if kind == "bytes":
        return rng.randbytes(size)
    dt = np.dtype([("a", "<i4"), ("b", "<f8")], align=True) if kind == "struct" else np.dtype(kind)
    raw = np.random.default_rng(i).integers(0, 256, size - size % dt.itemsize, dtype=np.uint8)
    return raw.view(dt)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sizes_speeds_kills_and_stops_keep_every_promise(make_dist, tmp_path, seed):
    rng = random.Random(seed)
    d = make_dist(
        max_shared_bytes=rng.choice([256, 768, 2048]) * KIB,
        shared_min_bytes=rng.choice([1, 32 * KIB]),
    )
    gate = tmp_path / "gate"
    specs: list[dict[str, Any]] = [
        {"name": "fast", "delay": 0.0, "opts": {}},
        {"name": "stalled", "delay": 0.0, "gate": str(gate), "opts": {}},
        {
            "name": "slow",
            "delay": rng.choice([0.001, 0.005]),
            "opts": {"workers": 2, "max_attempts": 1000},
        },
        {
            "name": "bounded",
            "delay": 0.002,
            "opts": {
                "max_pending_bytes": rng.choice([400, 900]) * KIB,
                "overflow": rng.choice(["drop_newest", "drop_oldest"]),
            },
        },
    ]
    regs = {}
    for spec in specs:
        out = tmp_path / spec["name"]
        spec["out"] = out
        regs[spec["name"]] = d.add_listener(
            Digester(str(out), spec.get("gate"), spec["delay"]), name=spec["name"], **spec["opts"]
        )
    d.start()
    count = 60
    sent = [{"i": i, "data": _payload(rng, i)} for i in range(count)]
    want = {i: digest(n["data"]) for i, n in enumerate(sent)}
    kill_at = rng.randrange(10, count - 10)
    stop_early = rng.random() < 0.5

    # No listener paced by another: all of it is distributed, and the fast listener
    # handles all of it, while the stalled one handles nothing.
    for i, obj in enumerate(sent):
        d.distribute(fanout.Add(obj))
        if i == kill_at:
            pids = regs["slow"].worker_pids()
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
    assert wait_for(lambda: regs["fast"].stats().delivered == count, 60)
    assert regs["stalled"].stats().delivered == 0
    if stop_early:
        d.stop(drain=False)  # drops what is pending, counted
    else:
        gate.touch()
        assert d.stop(drain=True, timeout=60)
    for spec in specs:
        s = assert_accounted(regs[spec["name"]])  # no lost notification
        assert s.received == count and s.dead_lettered == 0
        got = [line.split("\t") for line in lines(spec["out"])]
        assert all(want[int(i)] == dg for i, dg, _ in got), spec["name"]  # no changed byte
        if spec["name"] != "bounded" and not stop_early:
            assert {int(i) for i, _, _ in got} == set(range(count)), spec["name"]
    assert d.shared_stats().held_bytes == 0 and d.shared_stats().blocks == 0  # no leak
