"""The worker's frame loop: the native ``serve`` and its pure-Python twin agree.

Each case feeds the same frames through a real pipe to both loops, in this
process, and compares what the handler saw, what was reported (handler errors,
undecodable frames, with their messages) and the progress words left in the slot.
The tables cover the payload fields, raw streams (bytes that are no msgpack, empty
and truncated frames), codecs that misbehave, callbacks that raise, the STOP word
and a pipe that fails.
"""

from __future__ import annotations

import os
import threading
from array import array
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from frames import HEADER, Pipe, wire
from helpers import outcome, twin_cases

import fanout
from fanout.native._worker_py import serve as serve_py
from fanout.native._worker_py import serve_batch as serve_batch_py
from fanout.wire.protocol import DONE, ERRORS, HANDLED, SLOT_WORDS, START_NS, STARTED, STOP

try:
    from fanout.native._worker import serve as serve_native
    from fanout.native._worker import serve_batch as serve_batch_native
except ImportError:  # pure-Python build
    serve_native = serve_batch_native = None

SERVES = [pytest.param(serve_py, id="py")]
if serve_native is not None and fanout.NATIVE:
    SERVES.insert(0, pytest.param(serve_native, id="native"))

UNPACK = fanout.MsgpackCodec().unpack


class Seen(fanout.Handler):
    """Keeps every call; raises ValueError for the object ``"raise"``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        if obj == "raise":
            raise ValueError("asked to")
        self.calls.append(("add", obj, is_in_initial_list))

    def on_update(self, old: Any, new: Any) -> None:
        if new == "raise":
            raise ValueError("asked to, on update")
        self.calls.append(("update", old, new))

    def on_delete(self, obj: Any) -> None:
        if obj == "raise":
            raise ValueError("asked to, on delete")
        self.calls.append(("delete", obj))


def frame(seq: int, fields: list[Any]) -> bytes:
    """A frame on the wire whose payload is ``fields`` packed by msgpack."""
    return wire(seq, msgpack.packb(fields, use_bin_type=True))


def unpack_numpy(payload: bytes) -> Any:
    """A codec handing back numpy integers for kind and timestamp, as a user's may."""
    kind, t_ns, a, b = UNPACK(payload)
    return [np.int64(kind), np.uint64(t_ns), a, b]


def _callback_fails(*args: Any) -> None:
    raise RuntimeError("the callback fails")


def run(
    serve: Callable[..., Any],
    data: bytes,
    writes: int = 1,
    unpack: Any = UNPACK,
    *,
    stop: bool = False,
    failing: str | None = None,
) -> dict[str, Any]:
    """Feed ``data`` (in ``writes`` pieces) to ``serve``; return what it did.

    ``stop`` sets the slot's STOP word first; ``failing`` (``"on_error"`` or
    ``"on_bad_frame"``) names a callback that raises instead of recording.
    """
    r, w = os.pipe()
    slot = np.zeros(SLOT_WORDS, dtype=np.uint64)
    slot[STOP] = int(stop)
    handler = Seen()
    bad: list[tuple[int, str, bytes]] = []
    errors: list[int] = []
    callbacks = {
        "on_error": lambda seq, payload: errors.append(seq),
        "on_bad_frame": lambda seq, payload, exc: bad.append((seq, repr(exc), payload)),
    }
    if failing is not None:
        callbacks[failing] = _callback_fails

    def feed() -> None:
        step = max(1, len(data) // writes)
        for i in range(0, len(data), step):
            os.write(w, data[i : i + step])
        os.close(w)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        serve(
            r,
            slot,
            unpack,
            handler,
            callbacks["on_error"],
            callbacks["on_bad_frame"],
        )
    finally:
        writer.join()
        os.close(r)
    return {
        "calls": handler.calls,
        "bad": [(seq, text) for seq, text, _ in bad],
        "bad_payloads": [payload for _, _, payload in bad],
        "errors": errors,
        "slot": (int(slot[STARTED]), int(slot[DONE]), int(slot[HANDLED]), int(slot[ERRORS])),
        "running_since": int(slot[START_NS]),  # 0: no call is running any more
    }


CASES: dict[str, list[list[Any]]] = {
    "add-update-delete": [[0, 5, {"a": 1}, True], [1, 6, {"v": 1}, {"v": 2}], [2, 7, "x", None]],
    "handler-raises": [[0, 5, "raise", False], [0, 6, "after", False]],
    "kind-negative": [[-1, 5, "x", None], [0, 6, "ok", False]],
    "kind-too-big": [[4, 5, "x", None]],
    "update-same": [[3, 5, {"v": 1}, None]],
    "kind-beyond-int": [[2**31, 5, "x", None], [0, 6, "ok", False]],
    "kind-beyond-int64": [[2**63, 5, "x", None]],
    "kind-str": [["0", 5, "x", None]],
    "kind-float": [[0.0, 5, "x", None]],
    "kind-bool": [[True, 5, {"v": 1}, {"v": 2}]],
    "t-negative": [[0, -1, "x", False]],
    "t-beyond-int64": [[0, 2**63, "x", False], [0, 6, "ok", False]],
    "t-max": [[0, 2**63 - 1, "x", False]],
    "t-float": [[0, 1.5, "x", False]],
    "too-few-fields": [[0, 5, "x"]],
    "not-a-list": [{"kind": 0}],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_serve_twins_agree(case):
    if serve_native is None:
        pytest.skip("fanout.native._worker (native) is not built")
    data = b"".join(frame(i + 1, f) for i, f in enumerate(CASES[case]))
    native, py = run(serve_native, data), run(serve_py, data)
    assert native == py


OK = frame(9, [0, 6, "ok", False])  # a good frame after a bad one: the loop goes on

STREAMS: dict[str, bytes] = {
    "payload-not-msgpack": wire(1, b"\xc1") + OK,  # 0xc1 is no msgpack type
    "payload-empty": HEADER.pack(0, 1) + OK,
    "payload-trailing-bytes": wire(1, msgpack.packb([0, 5, "x", False]) + b"\x00") + OK,
    "eof-in-header": OK + HEADER.pack(50, 10)[:5],
    "eof-in-payload": OK + HEADER.pack(50, 10) + b"x" * 10,
    "seq-zero": frame(0, [0, 5, "x", False]),
    "seq-max": frame(2**64 - 1, [0, 5, "x", False]),
    "update-raises": frame(1, [1, 5, {"v": 1}, "raise"]) + OK,
    "delete-raises": frame(1, [2, 5, "raise", None]) + OK,
    "update-same-raises": frame(1, [3, 5, "raise", None]) + OK,
}


def _unpack_raises(payload: bytes) -> Any:
    raise ValueError("this codec cannot decode anything")


def _closed_fd(serve: Callable[..., Any]) -> Any:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    slot = np.zeros(SLOT_WORDS, dtype=np.uint64)
    return serve(r, slot, UNPACK, Seen(), _callback_fails, _callback_fails)


BAD = frame(1, [0, 2**63, "x", False])  # a timestamp out of range: undecodable
RAISES = frame(1, [0, 5, "raise", False])

CALLS: dict[str, Callable[[Callable[..., Any]], Any]] = {
    "codec-raises": lambda s: run(s, OK, unpack=_unpack_raises),
    "codec-gives-tuple": lambda s: run(s, OK, unpack=lambda p: tuple(UNPACK(p))),
    "codec-gives-none": lambda s: run(s, OK, unpack=lambda p: None),
    "codec-gives-five-fields": lambda s: run(s, OK, unpack=lambda p: [*UNPACK(p), 1]),
    "stop-word-set": lambda s: run(s, OK + OK, stop=True),
    "on-error-raises": lambda s: run(s, RAISES + OK, failing="on_error"),
    "on-bad-frame-raises": lambda s: run(s, BAD + OK, failing="on_bad_frame"),
    "data-pipe-closed": _closed_fd,
}

# Known differences, kept so a fix shows (a strict xfail fails once both agree).
DIVERGENT: dict[str, str] = {}


@pytest.mark.parametrize("case", sorted(STREAMS))
def test_serve_twins_agree_on_raw_streams(case):
    if serve_native is None:
        pytest.skip("fanout.native._worker (native) is not built")
    assert run(serve_native, STREAMS[case]) == run(serve_py, STREAMS[case])


@pytest.mark.parametrize("case", twin_cases(CALLS, DIVERGENT))
def test_serve_twins_agree_on_codecs_callbacks_and_pipes(case):
    if serve_native is None:
        pytest.skip("fanout.native._worker (native) is not built")
    assert outcome(CALLS[case], serve_native) == outcome(CALLS[case], serve_py)


@pytest.mark.parametrize(
    ("fd", "slot_words"), [("0", SLOT_WORDS), (0, 2)], ids=["fd-str", "slot-too-short"]
)
def test_serve_twins_refuse_bad_arguments_alike(fd, slot_words):
    """Same exception type; the messages are Cython's and numpy's, not fanout's."""
    if serve_native is None:
        pytest.skip("fanout.native._worker (native) is not built")

    def call(serve: Callable[..., Any]) -> Any:
        with Pipe(None) as pipe:
            os.write(pipe.w, OK)
            pipe.close_writer()
            slot = np.zeros(slot_words, dtype=np.uint64)
            return serve(pipe.r if fd == 0 else fd, slot, UNPACK, Seen(), print, print)

    native, py = outcome(call, serve_native), outcome(call, serve_py)
    assert native[0] is py[0] and native[0] in (TypeError, IndexError), (native, py)


@pytest.mark.parametrize("serve", SERVES)
def test_bad_fields_are_reported_with_the_payload(serve):
    fields = [0, 2**63, "x", False]
    out = run(serve, frame(1, fields) + frame(2, [0, 6, "ok", False]))
    assert out["calls"] == [("add", "ok", False)]
    ((seq, text),) = out["bad"]
    assert seq == 1 and "bad payload fields" in text and "2**63-1" in text, text
    assert msgpack.unpackb(out["bad_payloads"][0]) == fields
    assert out["slot"] == (2, 2, 1, 0)


@pytest.mark.parametrize("serve", SERVES)
@pytest.mark.parametrize("size", [1, 70_000, 3 * 1024 * 1024 + 5])
def test_frames_split_across_many_reads(serve, size):
    objs = [b"x" * size, b"y" * 10, b"z" * size]
    data = b"".join(frame(i + 1, [0, 5, o, False]) for i, o in enumerate(objs))
    out = run(serve, data, writes=97)  # pieces that cut headers and payloads anywhere
    assert [c[1] for c in out["calls"]] == objs
    assert out["slot"] == (3, 3, 3, 0)


@pytest.mark.parametrize("serve", SERVES)
def test_numpy_integer_fields_are_taken(serve):
    out = run(serve, frame(1, [1, 5, {"v": 1}, {"v": 2}]), unpack=unpack_numpy)
    assert out["calls"] == [("update", {"v": 1}, {"v": 2})] and out["bad"] == []


# -- serve_batch: the same loop over frames already in memory (the Ray actor's) ---------

BATCHES = [pytest.param(serve_py, serve_batch_py, id="py")]
if serve_native is not None and fanout.NATIVE:
    BATCHES.insert(0, pytest.param(serve_native, serve_batch_native, id="native"))


def run_batch(serve_batch: Callable[..., Any], data: bytes, done: int = 0) -> dict[str, Any]:
    """``run``'s record of ``serve_batch(data)``, plus its stamps and its answer."""
    slot = np.zeros(SLOT_WORDS, dtype=np.uint64)
    slot[DONE] = slot[STARTED] = done
    handler = Seen()
    bad: list[tuple[int, str, bytes]] = []
    errors: list[int] = []
    stamps = array("q")
    last = serve_batch(
        memoryview(data),
        slot,
        UNPACK,
        handler,
        lambda seq, payload: errors.append(seq),
        lambda seq, payload, exc: bad.append((seq, repr(exc), payload)),
        stamps,
    )
    return {
        "calls": handler.calls,
        "bad": [(seq, text) for seq, text, _ in bad],
        "bad_payloads": [payload for _, _, payload in bad],
        "errors": errors,
        "slot": (int(slot[STARTED]), int(slot[DONE]), int(slot[HANDLED]), int(slot[ERRORS])),
        "running_since": int(slot[START_NS]),
        "stamps": list(stamps),
        "last": last,
    }


@pytest.mark.parametrize(("serve", "serve_batch"), BATCHES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_serve_batch_does_what_serve_does_with_the_same_frames(serve, serve_batch, case):
    data = b"".join(frame(i + 1, f) for i, f in enumerate(CASES[case]))
    got = run_batch(serve_batch, data)
    stamps, last = got.pop("stamps"), got.pop("last")
    assert got == run(serve, data)
    assert last == len(CASES[case])
    bad = {seq for seq, _ in got["bad"]}
    frames = CASES[case]
    assert stamps == [
        int(frames[seq - 1][1]) for seq in range(1, len(frames) + 1) if seq not in bad
    ]


@pytest.mark.parametrize(("serve", "serve_batch"), BATCHES)
def test_serve_batch_counts_frames_finished_before_a_restart_without_running_them(
    serve, serve_batch
):
    data = b"".join(frame(seq, [0, 100 + seq, f"o{seq}", False]) for seq in range(1, 6))
    got = run_batch(serve_batch, data, done=3)
    assert got["calls"] == [("add", "o4", False), ("add", "o5", False)]
    assert got["slot"] == (5, 5, 5, 0)  # the three skipped count as handled
    assert got["stamps"] == [104, 105]
    assert got["last"] == 5
    every = run_batch(serve_batch, data, done=9)  # all of them: nothing runs
    assert every["calls"] == [] and every["slot"] == (9, 9, 5, 0) and every["last"] == 5


@pytest.mark.parametrize(("serve", "serve_batch"), BATCHES)
def test_serve_batch_of_nothing_answers_zero(serve, serve_batch):
    got = run_batch(serve_batch, b"")
    assert got["last"] == 0 and got["calls"] == [] and got["slot"] == (0, 0, 0, 0)
