"""distribute's fast path: ``Encoder`` and ``Feed``, native and twin alike.

Every test takes ``ring_impl`` (tests/conftest.py), so the native classes
(``_feed.pxi`` in ``fanout.native._ring``) and their twins (``_feed_py.py``)
pass the same checks. The arena here is a stand-in with the two attributes the
encoder reads; the distributor tests run the real one.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
import types
from typing import Any

import msgspec
import pytest

import fanout
from fanout.errors import RingClosed
from fanout.wire.codec import PLAIN_DEPTH
from fanout.wire.protocol import ADD, DELETE, UPDATE, UPDATE_SAME

OBJ = {"metadata": {"name": "a", "labels": {"k": "v"}}, "spec": [1, 2.5, None, True]}
NEW = {"metadata": {"name": "a"}, "spec": []}


class Leaf:
    """A leaf type: what the one-pass packer leaves to the msgspec encoder."""


WITH_LEAF = {"metadata": {"name": "a"}, "data": Leaf()}


class StandIn:
    """What the encoder reads of an arena: ``min_bytes`` and ``_events``."""

    def __init__(self, min_bytes: int = 1 << 20) -> None:
        self.min_bytes = min_bytes
        self._events = 0


class Calls:
    """Records each call made to it; answers ``answer``, or raises ``raises``."""

    def __init__(self, answer: Any = "other", raises: BaseException | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answer = answer
        self.raises = raises

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        if self.raises is not None:
            raise self.raises
        return self.answer


class FakeEncoder:
    """A msgspec encoder's two calls, made of one ``obj -> bytes`` function."""

    def __init__(self, enc: Any) -> None:
        self.encode = enc

    def encode_into(self, obj: Any, buf: bytearray) -> None:
        buf[:] = self.encode(obj)


def make_encoder(
    ring_impl: types.ModuleType,
    arena: StandIn | None = None,
    enc: Any = None,
    leaves: list[tuple[type, ...]] | None = None,
) -> tuple[Any, Calls, Calls]:
    other, failed = Calls(), Calls(raises=ValueError("failed says so"))
    encoder = ring_impl.Encoder(
        FakeEncoder(enc) if enc is not None else msgspec.msgpack.Encoder(),
        leaves if leaves is not None else [(msgspec.msgpack.Ext, Leaf)],
        PLAIN_DEPTH,
        arena or StandIn(),
        other,
        failed,
    )
    return encoder, other, failed


@pytest.mark.parametrize(
    ("n", "wire"),
    [
        (fanout.Add(OBJ), [ADD, 7, OBJ, False]),
        (fanout.Add(OBJ, is_in_initial_list=True), [ADD, 7, OBJ, True]),
        (fanout.Update(OBJ, NEW), [UPDATE, 7, OBJ, NEW]),
        (fanout.Update(OBJ, OBJ), [UPDATE_SAME, 7, OBJ, None]),
        (fanout.Delete(OBJ), [DELETE, 7, OBJ, None]),
    ],
)
def test_a_small_plain_notification_is_msgspecs_bytes_of_its_wire_list(ring_impl, n, wire):
    encoder, other, failed = make_encoder(ring_impl)
    payload = encoder(n, 7)
    assert type(payload) is bytes
    assert payload == msgspec.msgpack.encode(wire)
    assert payload == fanout.MsgpackCodec().encode(n, 7)  # the wire both codecs write
    assert other.calls == failed.calls == []


def test_a_payload_at_min_bytes_goes_on_to_the_arenas_path(ring_impl):
    small = msgspec.msgpack.encode([ADD, 7, OBJ, False])
    encoder, other, _ = make_encoder(ring_impl, StandIn(min_bytes=len(small)))
    assert encoder(fanout.Add(OBJ), 7) == "other"
    assert other.calls == [(fanout.Add(OBJ), 7, small, 0)]
    encoder, other, _ = make_encoder(ring_impl, StandIn(min_bytes=len(small) + 1))
    assert encoder(fanout.Add(OBJ), 7) == small
    assert other.calls == []


def test_a_big_buffer_met_during_the_encode_sends_it_on_with_the_events_before(ring_impl):
    arena = StandIn()
    arena._events = 5

    def enc(obj: Any) -> bytes:
        arena._events += 1  # as the arena's hook does for a big array
        return b"\x94payload"

    encoder, other, _ = make_encoder(ring_impl, arena, enc)
    assert encoder(fanout.Delete(WITH_LEAF), 3) == "other"
    assert other.calls == [(fanout.Delete(WITH_LEAF), 3, b"\x94payload", 5)]


@pytest.mark.parametrize(
    "obj",
    [{"at": datetime.date(2026, 12, 6)}, {"s": {1}}, {1.5: "float key"}, [bytearray(b"x")]],
)
def test_what_msgspec_would_write_its_own_way_takes_the_full_path(ring_impl, obj):
    encoder, other, _ = make_encoder(ring_impl)
    assert encoder(fanout.Add(obj), 9) == "other"
    assert other.calls == [(fanout.Add(obj), 9)]


def test_no_notification_takes_the_full_path_and_its_error(ring_impl):
    encoder, other, _ = make_encoder(ring_impl)
    other.raises = TypeError("distribute takes fanout.Add, ...")
    with pytest.raises(TypeError, match="distribute takes"):
        encoder({"not": "a notification"}, 1)
    assert other.calls == [({"not": "a notification"}, 1)]


def test_a_failed_encode_is_reported_with_the_events_it_began_with(ring_impl):
    arena = StandIn()
    arena._events = 2
    boom = OverflowError("int too big")

    def enc(obj: Any) -> bytes:
        raise boom

    encoder, other, failed = make_encoder(ring_impl, arena, enc)
    with pytest.raises(ValueError, match="failed says so") as info:
        encoder(fanout.Add(WITH_LEAF), 4)
    assert info.value.__context__ is boom
    assert failed.calls == [([ADD, 4, WITH_LEAF, False], 2, boom)]
    assert other.calls == []
    failed.raises = None  # a failed() that returns: the encode's own error goes up
    with pytest.raises(OverflowError):
        encoder(fanout.Add(WITH_LEAF), 4)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, "\ud800"])
def test_what_the_packer_gives_up_on_reaches_msgspec_and_its_error(ring_impl, value):
    encoder, other, failed = make_encoder(ring_impl)
    with pytest.raises(ValueError, match="failed says so") as info:
        encoder(fanout.Add({"n": value}), 4)
    assert isinstance(info.value.__context__, OverflowError | UnicodeEncodeError)
    assert [call[:2] for call in failed.calls] == [([ADD, 4, {"n": value}, False], 0)]
    assert other.calls == []


def test_a_plain_notification_is_packed_without_the_msgspec_encoder(ring_impl):
    def enc(obj: Any) -> bytes:
        raise AssertionError("the msgspec encoder ran for a plain notification")

    encoder, other, failed = make_encoder(ring_impl, enc=enc)
    for n in (fanout.Add(OBJ), fanout.Update(OBJ, NEW), fanout.Delete(NEW)):
        assert encoder(n, 11) == fanout.MsgpackCodec().encode(n, 11)
    assert other.calls == failed.calls == []


def test_leaf_types_are_read_at_each_call(ring_impl):
    class Leaf:
        pass

    leaves: list[tuple[type, ...]] = [()]
    encoder, other, _ = make_encoder(ring_impl, enc=lambda obj: b"\x01", leaves=leaves)
    assert encoder(fanout.Add([Leaf()]), 1) == "other"  # not a leaf yet
    leaves[0] = (Leaf,)
    assert encoder(fanout.Add([Leaf()]), 1) == b"\x01"
    assert len(other.calls) == 1


# -- Feed -----------------------------------------------------------------------------


class Sink:
    """The distributor's side of a feed: notify, finish and closed, in call order."""

    def __init__(self, closed_raises: BaseException | None = None) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.closed_raises = closed_raises

    def notify(self) -> None:
        self.log.append(("notify",))

    def finish(self, n: Any, t_ns: int, payload: Any) -> None:
        self.log.append(("finish", n, t_ns, payload))

    def closed(self) -> None:
        self.log.append(("closed",))
        if self.closed_raises is not None:
            raise self.closed_raises


def make_feed(ring_impl: types.ModuleType, rings: tuple[Any, ...], encode: Any, sink: Sink) -> Any:
    return ring_impl.Feed(rings, encode, sink.notify, sink.finish, sink.closed)


@pytest.mark.parametrize("inline", [True, False], ids=["encoder", "callable"])
def test_feed_stamps_encodes_once_appends_to_every_ring_and_wakes_the_pump(ring_impl, inline):
    rings = tuple(ring_impl.FrameRing() for _ in range(3))
    stamps: list[int] = []
    if inline:
        encode, _, _ = make_encoder(ring_impl)
    else:

        def encode(n: Any, t_ns: int) -> bytes:
            stamps.append(t_ns)
            return fanout.MsgpackCodec().encode(n, t_ns)

    sink = Sink()
    feed = make_feed(ring_impl, rings, encode, sink)
    before = time.monotonic_ns()
    assert feed.feed(fanout.Update(OBJ, NEW)) is True
    after = time.monotonic_ns()
    assert sink.log == [("notify",)]
    frames = [ring.take_all() for ring in rings]
    assert all(f == frames[0] for f in frames) and len(frames[0]) == 1
    kind, t_ns, old, new = msgspec.msgpack.decode(frames[0][0])
    assert (kind, old, new) == (UPDATE, OBJ, NEW)
    assert before <= t_ns <= after  # time.monotonic_ns()'s clock
    assert stamps in ([], [t_ns])


def test_feed_refuses_what_is_no_notification_having_done_nothing(ring_impl):
    ring = ring_impl.FrameRing()
    encode = Calls(b"x")
    sink = Sink()
    feed = make_feed(ring_impl, (ring,), encode, sink)
    for bad in ({"a": 1}, None, fanout.Add, "Add"):
        assert feed.feed(bad) is False
    assert encode.calls == [] and sink.log == [] and len(ring) == 0


def test_a_payload_that_is_not_bytes_is_finished_by_the_distributor(ring_impl):
    ring = ring_impl.FrameRing()
    shared = object()  # a SharedPayload, say
    sink = Sink()
    feed = make_feed(ring_impl, (ring,), lambda n, t_ns: shared, sink)
    n = fanout.Delete(OBJ)
    assert feed.feed(n) is True
    assert len(sink.log) == 1
    step, got, t_ns, payload = sink.log[0]
    assert (step, got, payload) == ("finish", n, shared) and t_ns > 0
    assert len(ring) == 0  # finish delivers it, and wakes the pump itself


def test_a_closed_ring_is_skipped_and_reported_before_the_wake(ring_impl):
    rings = tuple(ring_impl.FrameRing() for _ in range(3))
    rings[1].close()
    sink = Sink()
    feed = make_feed(ring_impl, rings, lambda n, t_ns: b"\x01\x02", sink)
    assert feed.feed(fanout.Add(OBJ)) is True
    assert sink.log == [("closed",), ("notify",)]
    assert rings[0].take_all() == rings[2].take_all() == [b"\x01\x02"]
    with pytest.raises(RingClosed):
        rings[1].append(b"x")


def test_a_stop_seen_by_closed_raises_out_of_feed_without_a_wake(ring_impl):
    ring = ring_impl.FrameRing()
    ring.close()
    sink = Sink(closed_raises=fanout.DistributorStopped("stopped"))
    feed = make_feed(ring_impl, (ring,), lambda n, t_ns: b"\x01", sink)
    with pytest.raises(fanout.DistributorStopped):
        feed.feed(fanout.Add(OBJ))
    assert sink.log == [("closed",)]


def test_an_encode_error_reaches_the_caller_and_nothing_is_appended(ring_impl):
    ring = ring_impl.FrameRing()
    sink = Sink()
    feed = make_feed(ring_impl, (ring,), Calls(raises=TypeError("cannot encode")), sink)
    with pytest.raises(TypeError, match="cannot encode"):
        feed.feed(fanout.Add({"x": object()}))
    assert sink.log == [] and len(ring) == 0


def test_an_empty_payload_is_refused_as_append_all_refuses_it(ring_impl):
    ring = ring_impl.FrameRing()
    sink = Sink()
    feed = make_feed(ring_impl, (ring,), lambda n, t_ns: b"", sink)
    with pytest.raises(ValueError) as feed_error:
        feed.feed(fanout.Add(OBJ))
    with pytest.raises(ValueError) as append_error:
        ring_impl.append_all((ring,), b"")
    assert str(feed_error.value) == str(append_error.value)
    assert sink.log == []


def test_feed_with_an_encoder_hands_a_big_payload_on_as_bytes(ring_impl):
    small = msgspec.msgpack.encode([ADD, 7, OBJ, False])
    ring = ring_impl.FrameRing()
    encoder, other, _ = make_encoder(ring_impl, StandIn(min_bytes=len(small)))
    other.answer = b"\x01inline"
    sink = Sink()
    feed = make_feed(ring_impl, (ring,), encoder, sink)
    assert feed.feed(fanout.Add(OBJ)) is True
    [(n, t_ns, payload, events)] = other.calls
    assert type(payload) is bytes and payload == msgspec.msgpack.encode([ADD, t_ns, OBJ, False])
    assert (n, events) == (fanout.Add(OBJ), 0)
    assert ring.take_all() == [b"\x01inline"] and sink.log == [("notify",)]


def test_feed_with_an_encoder_keeps_every_payload_whole_from_tiny_to_past_a_mebibyte(ring_impl):
    ring = ring_impl.FrameRing()
    encoder, other, _ = make_encoder(ring_impl, StandIn(min_bytes=1 << 30))
    feed = make_feed(ring_impl, (ring,), encoder, Sink())
    objs = [{"a": 1}, {"b": "x" * 3000}, {"c": "y" * (2 << 20)}, {"d": 2}, OBJ]
    for obj in objs:
        assert feed.feed(fanout.Delete(obj)) is True
    got = [msgspec.msgpack.decode(f) for f in ring.take_all()]
    assert [(kind, a, b) for kind, _, a, b in got] == [(DELETE, obj, None) for obj in objs]
    assert other.calls == []


def test_a_feed_entered_again_during_its_encode_keeps_both_payloads_whole(ring_impl):
    # As a second producer thread would while the first is between its encode
    # and its appends (the native encoder's reused buffer is then in use).
    ring = ring_impl.FrameRing()
    inner = fanout.Add({"inner": 1})
    entered: list[bool] = []
    feed: Any = None

    def enc(obj: Any) -> bytes:
        if not entered:
            entered.append(True)
            assert feed.feed(inner) is True
        return msgspec.msgpack.encode(obj, enc_hook=lambda leaf: "leaf")

    encoder, _, _ = make_encoder(ring_impl, enc=enc)
    feed = make_feed(ring_impl, (ring,), encoder, Sink())
    assert feed.feed(fanout.Add(WITH_LEAF)) is True
    got = [msgspec.msgpack.decode(f) for f in ring.take_all()]
    outer = {"metadata": {"name": "a"}, "data": "leaf"}
    assert [(kind, a) for kind, _, a, _ in got] == [(ADD, {"inner": 1}), (ADD, outer)]


def test_a_feed_entered_again_from_a_key_keeps_both_payloads_whole(ring_impl):
    # The key runs while the native feed's packed bytes wait in its reused buffer.
    single, lanes = ring_impl.FrameRing(), (ring_impl.FrameRing(), ring_impl.FrameRing())
    inner = fanout.Add(pod("inner"))
    feed: Any = None

    def key(obj: Any) -> Any:
        if obj is not inner.obj:
            assert feed.feed(inner) is True
        return "same lane for both"

    feed = make_feed_routed(ring_impl, (single,), [(lanes, key, None)])
    assert feed.feed(fanout.Add(OBJ)) is True
    for ring in (single, lanes[hash("same lane for both") % 2]):
        got = [msgspec.msgpack.decode(f) for f in ring.take_all()]
        assert [(kind, a) for kind, _, a, _ in got] == [(ADD, pod("inner")), (ADD, OBJ)]


# -- Feed: routed listeners --------------------------------------------------------


def pod(name: str | None, namespace: str | None = "ns") -> dict[str, Any]:
    md: dict[str, Any] = {"namespace": namespace}
    if name is not None:
        md["name"] = name
    return {"metadata": md, "spec": {}}


@pytest.mark.parametrize(
    ("obj", "key"),
    [
        (pod("a"), ("ns", "a")),
        (pod("a", namespace=None), (None, "a")),
        ({"metadata": {"name": "b"}}, (None, "b")),
        (pod(None), None),
        ({"metadata": "text"}, None),
        ({"spec": 1}, None),
        ([1, 2], None),
        ("str", None),
    ],
)
def test_default_key_is_namespace_and_name(ring_impl, obj, key):
    assert ring_impl.default_key(obj) == key


def test_routes_pick_lanes_as_the_listener_routes_them(ring_impl):
    lanes = tuple(ring_impl.FrameRing() for _ in range(3))
    keyed = tuple(ring_impl.FrameRing() for _ in range(2))
    single = (ring_impl.FrameRing(),)
    routes = [
        (lanes, None, None),
        (keyed, lambda obj: obj["spec"].get("k", 0), None),
        (single, None, None),
    ]
    feed = make_feed_routed(ring_impl, (), routes)
    notes = [fanout.Add(pod(f"p{i}") | {"spec": {"k": -i}}) for i in range(12)]
    notes += [fanout.Update(pod("p1"), pod("p1")), fanout.Delete(pod("p5"))]
    for n in notes:
        assert feed.feed(n) is True
    expect_lanes: list[list[str]] = [[] for _ in lanes]
    expect_keyed: list[list[str]] = [[] for _ in keyed]
    for n in notes:
        obj = n.new if type(n) is fanout.Update else n.obj
        name = obj["metadata"]["name"]
        expect_lanes[hash(("ns", name)) % 3].append(name)
        expect_keyed[hash(obj["spec"].get("k", 0)) % 2].append(name)

    def names(ring: Any) -> list[str]:
        return [msgspec.msgpack.decode(f)[2]["metadata"]["name"] for f in ring.take_all()]

    assert [names(r) for r in lanes] == expect_lanes
    assert [names(r) for r in keyed] == expect_keyed
    assert len(single[0].take_all()) == len(notes)


def test_objects_without_a_key_take_the_lanes_in_turn(ring_impl):
    lanes = tuple(ring_impl.FrameRing() for _ in range(3))
    feed = make_feed_routed(ring_impl, (), [(lanes, None, None)])
    for i in range(7):
        feed.feed(fanout.Add({"i": i}))
    got = [[msgspec.msgpack.decode(f)[2]["i"] for f in r.take_all()] for r in lanes]
    assert sorted(map(len, got)) == [2, 2, 3]
    assert sorted(x for lane in got for x in lane) == list(range(7))
    assert all(lane == sorted(lane) for lane in got)
    assert all(j - i == 3 for lane in got for i, j in itertools.pairwise(lane))


def test_a_key_that_raises_stops_the_feed_before_any_ring_took_anything(ring_impl):
    direct = ring_impl.FrameRing()
    first = tuple(ring_impl.FrameRing() for _ in range(2))
    second = tuple(ring_impl.FrameRing() for _ in range(2))

    def key(obj: Any) -> Any:
        raise KeyError("no key here")

    sink = Sink()
    after = Calls()
    feed = ring_impl.Feed(
        (direct,),
        lambda n, t_ns: b"\x01",
        sink.notify,
        sink.finish,
        sink.closed,
        [(first, ring_impl.Router(2), after), (second, ring_impl.Router(2, key), None)],
    )
    with pytest.raises(KeyError, match="no key here"):
        feed.feed(fanout.Add(pod("a")))
    assert [len(r) for r in (direct, *first, *second)] == [0] * 5
    assert sink.log == [] and after.calls == []


def test_afters_run_once_after_every_append_then_closed_then_notify(ring_impl):
    direct = ring_impl.FrameRing()
    lanes = (ring_impl.FrameRing(), ring_impl.FrameRing())
    lanes[0].close()
    lanes[1].close()
    sink = Sink()

    def after() -> None:
        sink.log.append(("after", len(direct)))

    feed = ring_impl.Feed(
        (direct,),
        lambda n, t_ns: b"\x01",
        sink.notify,
        sink.finish,
        sink.closed,
        [(lanes, ring_impl.Router(2), after)],
    )
    assert feed.feed(fanout.Add(pod("a"))) is True
    assert sink.log == [("after", 1), ("closed",), ("notify",)]


def test_a_routed_listener_needs_a_lane_and_a_router_of_its_lanes(ring_impl):
    encoder, _, _ = make_encoder(ring_impl)
    sink = Sink()

    def feed(routes: Any) -> Any:
        return ring_impl.Feed((), encoder, sink.notify, sink.finish, sink.closed, routes)

    lanes = (ring_impl.FrameRing(), ring_impl.FrameRing())
    with pytest.raises(ValueError, match="at least one lane"):
        feed([((), ring_impl.Router(1), None)])
    with pytest.raises(ValueError, match="a Router of its 2 lanes, not None"):
        feed([(lanes, None, None)])  # a key function is no router
    with pytest.raises(ValueError, match="a Router of its 2 lanes"):
        feed([(lanes, ring_impl.Router(3), None)])


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((0,), ValueError, "at least one lane, got count=0"),
        ((-2,), ValueError, "at least one lane, got count=-2"),
        ((2, "name"), TypeError, "key must be callable or None, not 'name'"),
    ],
)
def test_a_router_refuses_bad_arguments_by_name(ring_impl, args, error, message):
    with pytest.raises(error, match=message):
        ring_impl.Router(*args)


def test_a_router_with_one_lane_never_computes_a_key(ring_impl):
    def key(obj: Any) -> Any:
        raise AssertionError("key computed for a single lane")

    router = ring_impl.Router(1, key)
    assert (router.count, router.key) == (1, key)
    assert [router.index(fanout.Add(pod(f"p{i}"))) for i in range(3)] == [0, 0, 0]


def test_a_router_shared_by_a_listener_and_a_feed_keeps_one_turn(ring_impl):
    # LaneListener.route and distribute's Feed ask the same router: objects
    # without a key take the lanes in turn across both.
    lanes = tuple(ring_impl.FrameRing() for _ in range(3))
    router = ring_impl.Router(3)
    feed = make_feed_routed(ring_impl, (), [(lanes, router, None)], routers=False)
    turns = []
    for i in range(6):
        if i % 2:
            turns.append(router.index(fanout.Add({"i": i})))  # as route() asks it
        else:
            feed.feed(fanout.Add({"i": i}))
            turns.append([len(r) for r in lanes])
    fed = [t for t in turns if isinstance(t, list)]
    asked = [t for t in turns if isinstance(t, int)]
    assert asked == [2, 1, 0]  # turns 2, 4 and 6 of 6: the feed took 1, 3 and 5
    assert fed[-1] == [1, 1, 1]


def make_feed_routed(
    ring_impl: types.ModuleType, rings: tuple[Any, ...], routes: Any, routers: bool = True
) -> Any:
    """A feed with an Encoder; ``routes`` give each listener's key (None: default)."""
    encoder, _, _ = make_encoder(ring_impl)
    sink = Sink()
    if routers:
        routes = [(r, ring_impl.Router(len(r), key), after) for r, key, after in routes]
    return ring_impl.Feed(rings, encoder, sink.notify, sink.finish, sink.closed, routes)


# -- through a distributor: producer threads share the fast path ---------------------


class Lines(fanout.Handler):
    """Writes ``t i name pad-length pad-ok`` per notification, in the order handled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        pad = obj["pad"]
        ok = pad == chr(97 + obj["i"] % 26) * len(pad)
        line = f"{obj['t']} {obj['i']} {obj['metadata']['name']} {len(pad)} {ok}\n"
        with open(self.path, "a") as f:
            f.write(line)


def test_four_producer_threads_through_the_fast_path_lose_and_change_nothing(make_dist, tmp_path):
    d = make_dist()
    outs = {name: tmp_path / name for name in ("one", "keyed", "by-thread")}
    d.add_listener(Lines(str(outs["one"])), name="one")
    d.add_listener(Lines(str(outs["keyed"])), name="keyed", workers=2)
    d.add_listener(
        Lines(str(outs["by-thread"])), name="by-thread", workers=2, key=lambda o: o["t"]
    )
    d.start()
    assert d._plan.feed is not None  # all three on the native path
    per_thread = 300
    start = threading.Barrier(4)

    def produce(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            pad = chr(97 + i % 26) * (i * 37 % 3000)  # sizes vary: the buffer regrows
            meta = {"name": f"o{t}-{i % 7}", "namespace": "ns"}
            d.distribute(fanout.Add({"t": t, "i": i, "pad": pad, "metadata": meta}))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert d.stop(drain=True, timeout=60)
    for name, out in outs.items():
        rows = [line.split() for line in out.read_text().splitlines()]
        assert len(rows) == 4 * per_thread, name
        assert all(ok == "True" and int(n) == int(i) * 37 % 3000 for _, i, _, n, ok in rows)
        for t in range(4):
            mine = [int(i) for tt, i, *_ in rows if int(tt) == t]
            assert sorted(mine) == list(range(per_thread)), name
            if name != "keyed":  # one lane, or one key per thread: the thread's order
                assert mine == list(range(per_thread)), name
            for key in range(7):  # one object's notifications keep their order
                same = [int(i) for tt, i, nm, *_ in rows if nm == f"o{t}-{key}"]
                assert same == sorted(same), (name, t, key)
