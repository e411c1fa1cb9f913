"""The worker's frame loop: the native ``serve`` and its pure-Python twin agree.

Each case feeds the same frames through a real pipe to both loops, in this
process, and compares what the handler saw and what was reported as undecodable.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from frames import wire

import fanout
from fanout._protocol import DONE, ERRORS, HANDLED, SLOT_WORDS, STARTED
from fanout._worker_py import serve as serve_py

try:
    from fanout._worker import serve as serve_native
except ImportError:  # pure-Python build
    serve_native = None

SERVES = [pytest.param(serve_py, id="py")]
if serve_native is not None and fanout.NATIVE:
    SERVES.insert(0, pytest.param(serve_native, id="native"))

UNPACK = fanout.MsgpackCodec().unpack


class Seen(fanout.Handler):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        if obj == "raise":
            raise ValueError("asked to")
        self.calls.append(("add", obj, is_in_initial_list))

    def on_update(self, old: Any, new: Any) -> None:
        self.calls.append(("update", old, new))

    def on_delete(self, obj: Any) -> None:
        self.calls.append(("delete", obj))


def frame(seq: int, fields: list[Any]) -> bytes:
    """A frame on the wire whose payload is ``fields`` packed by msgpack."""
    return wire(seq, msgpack.packb(fields, use_bin_type=True))


def unpack_numpy(payload: bytes) -> Any:
    """A codec handing back numpy integers for kind and timestamp, as a user's may."""
    kind, t_ns, a, b = UNPACK(payload)
    return [np.int64(kind), np.uint64(t_ns), a, b]


def run(
    serve: Callable[..., Any], data: bytes, writes: int = 1, unpack: Any = UNPACK
) -> dict[str, Any]:
    """Feed ``data`` (in ``writes`` pieces) to ``serve``; return what it did."""
    r, w = os.pipe()
    slot = np.zeros(SLOT_WORDS, dtype=np.uint64)
    handler = Seen()
    bad: list[tuple[int, str, bytes]] = []
    errors: list[int] = []

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
            lambda seq, payload: errors.append(seq),
            lambda seq, payload, exc: bad.append((seq, repr(exc), payload)),
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
        pytest.skip("fanout._worker (native) is not built")
    data = b"".join(frame(i + 1, f) for i, f in enumerate(CASES[case]))
    native, py = run(serve_native, data), run(serve_py, data)
    assert native == py


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
