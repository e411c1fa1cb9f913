"""Typed, partial decoding: ``add_listener(handler, schema=T)``.

Workers decode each object straight into ``T`` (msgspec), skipping what ``T`` does not
declare; an object that does not fit is dead-lettered at once, never retried. Also:
an update whose old is new travels once, and the untyped worker decode uses msgspec.
Schemas and handlers live at module level: workers import them from here.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, TypedDict

import msgpack
import numpy as np
import pytest
from helpers import Recorder, obj, wait_for

import fanout
import fanout.native._worker_py
from fanout.native._ring_common import HEADER, HEADER_SIZE
from fanout.wire.codec import MsgpackCodec, MsgspecCodec, get_codec
from fanout.wire.protocol import DONE, HANDLED, SLOT_WORDS
from fanout.wire.schema import describe_misfit

msgspec = pytest.importorskip("msgspec")

try:
    from fanout.native import _worker as native_worker  # type: ignore[attr-defined]
except ImportError:  # a pure-Python build
    native_worker = None

CODECS = ["msgpack", "msgspec"]
# Both worker loops in one run: spawned workers read FANOUT_NO_EXTENSIONS when they
# import fanout, so setting it for one test puts that test's workers on the twin.
IMPLS = ["native", "py"] if native_worker is not None else ["py"]


# -- schemas ------------------------------------------------------------------------------


class Status(msgspec.Struct):
    phase: str = "Pending"
    podIP: str | None = None


class Meta(msgspec.Struct):
    name: str
    namespace: str = "default"
    labels: dict[str, str] = {}


class Pod(msgspec.Struct):
    metadata: Meta
    status: Status | None = None


@dataclasses.dataclass
class DataMeta:
    name: str
    namespace: str = "default"


@dataclasses.dataclass
class DataPod:
    metadata: DataMeta
    v: int = 0


class DictMeta(TypedDict):
    name: str


class DictPod(TypedDict):
    metadata: DictMeta


class Sample(msgspec.Struct):
    metadata: Meta
    values: np.ndarray
    mask: np.ndarray | None = None


class Tagged(msgspec.Struct, tag=True):
    metadata: Meta


# -- handlers -----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """What a handler got, as JSON: schema instances as builtins, arrays described."""

    def arrays(a: Any) -> Any:
        if isinstance(a, np.ndarray):
            return {
                "array": a.tolist(),
                "dtype": a.dtype.str,
                "shape": list(a.shape),
            }
        raise NotImplementedError(type(a))

    return msgspec.to_builtins(value, enc_hook=arrays)


class TypedRecorder(fanout.Handler):
    """Append one JSON line per call: kind, the type received, the value, ``old is new``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, **record: Any) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        self._write(
            kind="add", type=type(obj).__name__, obj=_plain(obj), initial=is_in_initial_list
        )

    def on_update(self, old: Any, new: Any) -> None:
        self._write(
            kind="update",
            type=type(new).__name__,
            old=_plain(old),
            obj=_plain(new),
            same=old is new,
        )

    def on_delete(self, obj: Any) -> None:
        self._write(kind="delete", type=type(obj).__name__, obj=_plain(obj))


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_records(path: Path, count: int) -> list[dict[str, Any]]:
    assert wait_for(lambda: len(records(path)) >= count), records(path)
    return records(path)


class Letters:
    """An ``on_dead_letter`` callback that keeps (notification, reason)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[Any, str]] = []

    def __call__(self, reg: Any, n: Any, reason: str) -> None:
        with self.lock:
            self.items.append((n, reason))

    def snapshot(self) -> list[tuple[Any, str]]:
        with self.lock:
            return list(self.items)


@pytest.fixture(params=IMPLS)
def worker_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The worker loop under test, with the start method that lets us pick it."""
    if request.param == "py":
        monkeypatch.setenv("FANOUT_NO_EXTENSIONS", "1")
    return request.param


def pod(name: str, phase: str | None = "Running", **extra: Any) -> dict[str, Any]:
    o = obj(name, **extra)
    o["metadata"]["labels"] = {"app": "web"}
    o["metadata"]["uid"] = f"uid-{name}"
    o["spec"] = {"containers": [{"name": "c", "image": "nginx", "ports": [80, 443]}]}
    if phase is not None:
        o["status"] = {"phase": phase, "podIP": "10.0.0.1", "conditions": [{"type": "Ready"}]}
    return o


def _process_dist(make_dist: Any, worker_impl: str, codec: str) -> fanout.Distributor:
    # spawn: each worker starts a fresh interpreter, so it sees worker_impl's env.
    method = "spawn" if worker_impl == "py" else "forkserver"
    return make_dist(codec=codec, start_method=method)


# -- process listeners --------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_struct_schema_decodes_only_declared_fields(make_dist, tmp_path, worker_impl, codec):
    out = tmp_path / "calls.jsonl"
    d = _process_dist(make_dist, worker_impl, codec)
    reg = d.add_listener(TypedRecorder(str(out)), schema=Pod)
    d.start()
    a, b = pod("a"), pod("a", phase="Succeeded")
    d.distribute(fanout.Add(a, True))
    d.distribute(fanout.Update(a, b))
    bare_pod = pod("bare", phase=None)
    d.distribute(fanout.Update(bare_pod, bare_pod))
    d.distribute(fanout.Delete(b))
    got = wait_records(out, 4)
    meta = {"name": "a", "namespace": "default", "labels": {"app": "web"}}
    full = {"metadata": meta, "status": {"phase": "Running", "podIP": "10.0.0.1"}}
    assert got[0] == {"kind": "add", "type": "Pod", "obj": full, "initial": True}
    assert got[1]["type"] == "Pod" and got[1]["same"] is False
    assert got[1]["old"] == full
    assert got[1]["obj"]["status"] == {"phase": "Succeeded", "podIP": "10.0.0.1"}
    # Nested optional: no status at all decodes to the default.
    bare = {"metadata": {**meta, "name": "bare"}, "status": None}
    assert got[2] == {"kind": "update", "type": "Pod", "old": bare, "obj": bare, "same": True}
    assert got[3]["kind"] == "delete" and got[3]["obj"]["status"]["phase"] == "Succeeded"
    assert reg.stats().dead_lettered == 0


@pytest.mark.parametrize(
    ("schema", "expected_type", "expected"),
    [
        (DataPod, "DataPod", {"metadata": {"name": "a", "namespace": "default"}, "v": 7}),
        (DictPod, "dict", {"metadata": {"name": "a"}}),
    ],
    ids=["dataclass", "typeddict"],
)
@pytest.mark.parametrize("codec", CODECS)
def test_dataclass_and_typeddict_schemas(
    make_dist, tmp_path, worker_impl, codec, schema, expected_type, expected
):
    out = tmp_path / "calls.jsonl"
    d = _process_dist(make_dist, worker_impl, codec)
    d.add_listener(TypedRecorder(str(out)), schema=schema)
    d.start()
    d.distribute(fanout.Add(pod("a", v=7)))
    (got,) = wait_records(out, 1)
    assert got["type"] == expected_type
    assert got["obj"] == expected  # undeclared keys (spec, status, uid) are gone


@pytest.mark.parametrize("codec", CODECS)
def test_numpy_fields(make_dist, tmp_path, worker_impl, codec):
    out = tmp_path / "calls.jsonl"
    d = _process_dist(make_dist, worker_impl, codec)
    d.add_listener(TypedRecorder(str(out)), schema=Sample)
    d.start()
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    d.distribute(fanout.Add({"metadata": {"name": "s"}, "values": values, "extra": [1, 2]}))
    d.distribute(
        fanout.Add(
            {
                "metadata": {"name": "t"},
                "values": np.int64(3) * np.ones(2, dtype=np.int64),
                "mask": np.array([True, False]),
            }
        )
    )
    first, second = wait_records(out, 2)
    assert first["type"] == "Sample"
    assert first["obj"]["values"] == {"array": values.tolist(), "dtype": "<f4", "shape": [2, 3]}
    assert first["obj"]["mask"] is None
    assert second["obj"]["values"]["array"] == [3, 3]
    assert second["obj"]["mask"] == {"array": [True, False], "dtype": "|b1", "shape": [2]}


@pytest.mark.parametrize("codec", CODECS)
def test_misfit_is_dead_lettered_once_never_retried(make_dist, tmp_path, worker_impl, codec):
    out = tmp_path / "calls.jsonl"
    letters = Letters()
    d = _process_dist(make_dist, worker_impl, codec)
    reg = d.add_listener(
        TypedRecorder(str(out)), schema=Pod, max_attempts=3, on_dead_letter=letters
    )
    d.start()
    bad = pod("bad")
    bad["metadata"]["name"] = 42
    d.distribute(fanout.Update(pod("x"), pod("x")))
    d.distribute(fanout.Update(pod("x"), bad))  # the new object does not fit
    d.distribute(fanout.Add(bad))  # nor does this one
    d.distribute(fanout.Update(pod("y"), pod("y", phase="Failed")))
    assert wait_for(lambda: reg.stats().delivered + reg.stats().dead_lettered >= 4)
    assert d.stop(drain=True, timeout=30)
    stats = reg.stats()
    assert (stats.delivered, stats.dead_lettered, stats.restarts, stats.errors) == (2, 2, 0, 0)
    assert stats.received == stats.delivered + stats.dead_lettered + stats.dropped
    assert [r["obj"]["metadata"]["name"] for r in records(out)] == ["x", "y"]
    reasons = [reason for _, reason in letters.snapshot()]
    where = "Expected `str`, got `int` - at `$.metadata.name`"
    assert reasons == [
        f"frame 2: the new object does not fit schema test_schema.Pod: {where}",
        f"frame 3: the object does not fit schema test_schema.Pod: {where}",
    ]


def test_misfit_in_initial_list_still_syncs(make_dist, tmp_path):
    out = tmp_path / "calls.jsonl"
    d = make_dist()
    bad = pod("bad")
    del bad["metadata"]["name"]
    reg = d.add_listener(TypedRecorder(str(out)), schema=Pod, initial_list=[pod("a"), bad])
    d.start()
    d.mark_synced()
    assert reg.wait_synced(30)
    assert wait_for(lambda: reg.stats().dead_lettered == 1)
    assert [r["obj"]["metadata"]["name"] for r in records(out)] == ["a"]


def test_update_with_old_is_new_travels_once(make_dist, tmp_path):
    """The frame on the lane's ring holds the object once (and decodes to one object)."""
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(Recorder(tmp_path / "calls"))
    d.start()
    held = pod("held", gate=str(gate))  # the worker blocks on it: frames stay held
    d.distribute(fanout.Add(held))
    assert wait_for(lambda: reg.stats().pending == 1)
    base = reg.stats().pending_bytes
    p = pod("p")
    d.distribute(fanout.Update(p, p))
    same = reg.stats().pending_bytes - base
    d.distribute(fanout.Update(p, copy.deepcopy(p)))
    twice = reg.stats().pending_bytes - base - same
    gate.touch()
    one_object = len(msgpack.packb(p))
    assert same - HEADER_SIZE < one_object + 16 < twice - HEADER_SIZE
    now = time.monotonic_ns()  # stamps take as many bytes as distribute's
    assert same == HEADER_SIZE + len(d.codec.encode(fanout.Update(p, p), now))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("schema", [None, Pod], ids=["plain", "schema"])
def test_resync_update_hands_one_object_as_both(make_dist, tmp_path, worker_impl, codec, schema):
    out = tmp_path / "calls.jsonl"
    d = _process_dist(make_dist, worker_impl, codec)
    d.add_listener(TypedRecorder(str(out)), schema=schema)
    d.start()
    p = pod("p")
    d.distribute(fanout.Update(p, p))
    d.distribute(fanout.Update(p, copy.deepcopy(p)))
    first, second = wait_records(out, 2)
    assert (first["same"], second["same"]) == (True, False)
    assert first["obj"] == first["old"] == second["obj"]


@pytest.mark.parametrize("codec", ["msgpack", "msgspec"])
def test_resync_payload_is_half_the_size(codec):
    c = get_codec(codec)
    p = pod("p")
    once = c.encode(fanout.Update(p, p), 0)
    twice = c.encode(fanout.Update(p, copy.deepcopy(p)), 0)
    assert len(twice) - len(once) > len(msgpack.packb(p)) - 8
    n, _ = c.decode(once)
    assert n == fanout.Update(p, p) and n.old is n.new


# -- thread listeners ---------------------------------------------------------------------


def test_thread_listener_converts_and_dead_letters_misfits(make_dist, tmp_path):
    out = tmp_path / "calls.jsonl"
    letters = Letters()
    d = make_dist()
    reg = d.add_listener(
        TypedRecorder(str(out)), executor="thread", schema=Pod, on_dead_letter=letters
    )
    d.start()
    bad = pod("bad")
    bad["metadata"]["name"] = 42
    p = pod("p")
    d.distribute(fanout.Update(p, p))
    d.distribute(fanout.Update(bad, p))
    d.distribute(fanout.Add(pod("q")))
    assert d.stop(drain=True, timeout=30)
    got = records(out)
    assert [(r["type"], r.get("same"), r["obj"]["metadata"]["name"]) for r in got] == [
        ("Pod", True, "p"),
        ("Pod", None, "q"),
    ]
    ((n, reason),) = letters.snapshot()
    assert n == fanout.Update(bad, p)  # the thread has the notification itself
    assert reason == (
        "the old object does not fit schema test_schema.Pod: "
        "Expected `str`, got `int` - at `$.metadata.name`"
    )
    stats = reg.stats()
    assert (stats.delivered, stats.dead_lettered) == (2, 1)
    assert stats.received == stats.delivered + stats.dead_lettered


# -- bad schemas, refused at add_listener -------------------------------------------------


class NotASchema:
    """A plain class: msgspec can only pass it through, never decode into it."""


def _local_schema() -> type:
    class Local(msgspec.Struct):
        name: str

    return Local


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        (5, "Type '5' is not supported"),
        (NotASchema, "custom type"),
        (Pod | Meta, "not supported"),
        (Tagged | Meta, "not supported"),
    ],
    ids=["not-a-type", "plain-class", "untagged-union", "two-dict-likes"],
)
@pytest.mark.parametrize("executor", ["process", "thread"])
def test_bad_schema_refused_with_msgspec_message(make_dist, schema, words, executor):
    d = make_dist()
    with pytest.raises(TypeError, match="is not a type msgspec can decode into") as info:
        d.add_listener(Recorder("/nonexistent"), schema=schema, executor=executor)
    assert words in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)  # msgspec's own error
    assert d.listener_count == 0


def test_unpicklable_schema_refused_for_processes_only(make_dist):
    d = make_dist()
    local = _local_schema()
    with pytest.raises(TypeError, match=r"cannot be pickled.*executor='thread'"):
        d.add_listener(Recorder("/nonexistent"), schema=local)
    d.add_listener(Recorder("/nonexistent"), schema=local, executor="thread")


def test_schema_needs_a_msgpack_codec(make_dist):
    d = make_dist(codec=PickleCodec())
    with pytest.raises(TypeError, match="needs a MessagePack codec"):
        d.add_listener(Recorder("/nonexistent"), schema=Pod)


class PickleCodec(fanout.wire.codec.Codec):
    """A codec whose wire is not MessagePack."""

    def pack(self, obj: Any) -> bytes:
        import pickle

        return pickle.dumps(obj)

    def unpack(self, data: Any) -> Any:
        import pickle

        return pickle.loads(data)


def _run_script(code: str, env: dict[str, str] | None = None) -> str:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_schema_from_fileless_main_refused():
    out = _run_script(
        """
        import msgspec, fanout

        class Pod(msgspec.Struct):
            name: str

        d = fanout.Distributor()
        try:
            d.add_listener(fanout.Handler(), schema=list[Pod])
        except TypeError as exc:
            print(exc)
        d.add_listener(fanout.Handler(), schema=Pod, executor="thread")
        print("thread ok")
        """
    )
    assert "defined in a __main__ that has no file" in out
    assert "define it in an importable module, or use executor='thread'" in out
    assert out.endswith("thread ok\n")


# -- the worker loop twins ----------------------------------------------------------------


def _frames(codec: Any, items: list[Any]) -> bytes:
    out = bytearray()
    for seq, item in enumerate(items, 1):
        payload = item if isinstance(item, bytes) else codec.encode(item, 0)
        out += HEADER.pack(len(payload), seq) + payload
    return bytes(out)


def _serve(
    serve: Any, data: bytes, frames: int, unpack: Any, schema: Any
) -> tuple[list[Any], list[Any]]:
    calls: list[Any] = []
    bad: list[Any] = []

    class Collect(fanout.Handler):
        def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
            calls.append(("add", obj, is_in_initial_list))

        def on_update(self, old: Any, new: Any) -> None:
            calls.append(("update", old, new, old is new))

        def on_delete(self, obj: Any) -> None:
            calls.append(("delete", obj))

    def on_bad_frame(seq: int, payload: bytes, exc: Exception) -> None:
        bad.append((seq, describe_misfit(schema, payload, exc) if schema else type(exc)))

    slot = np.zeros(SLOT_WORDS, dtype=np.uint64)
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        w = -1
        serve(r, slot, unpack, Collect(), None, on_bad_frame)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert int(slot[DONE]) == frames  # every frame finished, handled or not
    assert int(slot[HANDLED]) == len(calls)
    return calls, bad


TWIN_SERVES = [pytest.param(fanout.native._worker_py.serve, id="py")]
if native_worker is not None:
    TWIN_SERVES.insert(0, pytest.param(native_worker.serve, id="native"))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("schema", [None, Pod], ids=["plain", "schema"])
def test_worker_loop_twins_agree(codec, schema):
    c = get_codec(codec)
    bad = pod("bad")
    bad["metadata"]["name"] = 1
    p = pod("p")
    items = [
        fanout.Add(p, True),
        fanout.Update(p, p),
        fanout.Update(p, pod("q")),
        fanout.Update(p, bad),
        fanout.Delete(p),
        b"\x94\x09\x00\xc0\xc0",  # kind 9: no such notification
        b"\xc1",  # not MessagePack
    ]
    data = _frames(c, items)
    unpack = c.unpacker(schema)
    outcomes = [_serve(s.values[0], data, len(items), unpack, schema) for s in TWIN_SERVES]
    calls, bad_frames = outcomes[0]
    for other in outcomes[1:]:
        assert other == outcomes[0]
    kinds = ["add", "update", "update", "update", "delete"]
    if schema is not None:
        del kinds[3]  # the misfit
    assert [c[0] for c in calls] == kinds
    assert calls[1][3] is True and calls[2][3] is False  # old is new, and not
    if schema is None:
        assert [seq for seq, _ in bad_frames] == [6, 7]
    else:
        assert isinstance(calls[0][1], Pod)
        assert bad_frames[0] == (
            4,
            "the new object does not fit schema test_schema.Pod: "
            "Expected `str`, got `int` - at `$.metadata.name`",
        )
        assert [seq for seq, _ in bad_frames] == [4, 6, 7]
        assert bad_frames[1][1] is None  # not an object's fault: the generic text


# -- the untyped worker decode ------------------------------------------------------------


def _user_default(o: Any) -> Any:
    if isinstance(o, complex):
        return msgpack.ExtType(70, f"{o.real},{o.imag}".encode())
    raise TypeError(f"cannot encode {type(o)}")


def _user_ext(code: int, data: bytes) -> Any:
    real, imag = data.decode().split(",")
    return complex(float(real), float(imag))


SAME_VALUES = [
    dt.datetime(2024, 5, 6, 7, 8, 9, 123456),
    dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.date(2024, 5, 6),
    b"\x00\xffbytes",
    bytearray(b"ba"),
    2**64 - 1,
    -(2**63),
    -1,
    0,
    1.5,
    True,
    None,
    "text \u00e9",
    [1, [2, (3, 4)], ()],
    (1, 2),
    {1: "int key", b"k": "bytes key", None: "none key", 2.5: "float key", -3: "negative key"},
    {"nested": {"deep": [{"a": 1}]}},
    np.arange(12, dtype=np.int16).reshape(3, 4),
    np.array(3.5),
    np.array([b"ab", b"c"]),
    np.zeros((0, 2)),
    complex(1, 2),  # a user extension type
]


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b)
            and a.flags.writeable == b.flags.writeable
        )
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize("value", SAME_VALUES, ids=[type(v).__name__ for v in SAME_VALUES])
def test_untyped_worker_decode_is_msgspec_and_identical(value):
    codec = MsgpackCodec(default=_user_default, ext_hook=_user_ext)
    unpack = codec.unpacker()
    assert isinstance(unpack.__self__, msgspec.msgpack.Decoder)
    data = codec.pack([fanout.wire.codec.UPDATE, 5, value, [value]])
    assert _same(unpack(data), codec.unpack(data))


def test_untyped_decode_keeps_an_overridden_unpack():
    class Custom(MsgpackCodec):
        def unpack(self, data: Any) -> Any:
            return super().unpack(data)

    codec = Custom()
    assert codec.unpacker() == codec.unpack
    other = MsgspecCodec()
    assert other.unpacker() == other._dec.decode


def test_untyped_worker_decode_keeps_tuple_keys():
    codec = MsgpackCodec()
    value = {(1, 2): "tuple key", "l": [5], "nested": {("a", (1, 2)): 1}}
    data = codec.pack(value)
    assert codec.unpack(data) == value  # msgpack, the fallback
    assert codec.unpacker()(data) == value  # msgspec, when installed


@dataclasses.dataclass
class WithTuple:
    pair: tuple[int, int]
    tags: list[str]


def test_a_schema_reads_tuples_as_sent():
    # Tuples travel as plain arrays, which a typed field reads.
    codec = MsgpackCodec()
    payload = codec.encode(fanout.Add({"pair": (1, 2), "tags": ("a", "b")}), 5)
    _, _, obj, _ = codec.unpacker(WithTuple)(payload)
    assert obj == WithTuple((1, 2), ["a", "b"])
