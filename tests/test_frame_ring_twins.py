"""The native FrameRing and its pure-Python twin agree: a table of calls (good and bad
arguments, full rings, closed pipes and fds) run on both, comparing each result, or the
exception's type and message.
"""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Callable
from typing import Any

import pytest
from frames import Pipe, filled, sent
from helpers import outcome

import fanout
import fanout.native._ring_py


def _native() -> types.ModuleType | None:
    try:
        return importlib.import_module("fanout.native._ring")
    except ImportError:
        return None


NATIVE_MODULE = _native()


def _send_to_closed_reader(m: types.ModuleType) -> int:
    with Pipe() as p:
        p.close_reader()
        return filled(m, b"abc").send_to(p.w)


def _send_to_closed_fd(m: types.ModuleType) -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return filled(m, b"abc").send_to(w)


FRAME_CASES: dict[str, Callable[[types.ModuleType], Any]] = {
    "init-negative": lambda m: m.FrameRing(-1),
    "init-float": lambda m: m.FrameRing(4.0),
    "init-bool": lambda m: m.FrameRing(False),
    "normal-negative": lambda m: m.FrameRing(64, -1),
    "normal-str": lambda m: m.FrameRing(64, "1"),
    "max-header": lambda m: m.FrameRing(max_bytes=12),
    "max-negative": lambda m: m.FrameRing(max_bytes=-1),
    "max-none-type": lambda m: m.FrameRing(max_bytes=[]),
    "init-huge": lambda m: m.FrameRing(2**64),
    "append-empty": lambda m: m.FrameRing().append(b""),
    "append-str": lambda m: m.FrameRing().append("abc"),
    "append-int": lambda m: m.FrameRing().append(3),
    "append-none": lambda m: m.FrameRing().append(None),
    "append-dict": lambda m: m.FrameRing().append({}),
    "append-non-contiguous": lambda m: m.FrameRing().append(memoryview(b"abcdef")[::2]),
    "ring-full": lambda m: filled(m, b"x" * 50, max_bytes=100).append(b"y" * 50),
    "never-fits": lambda m: m.FrameRing(max_bytes=100).append(b"x" * 200),
    "ack-str": lambda m: filled(m, b"a").ack("1"),
    "ack-float": lambda m: filled(m, b"a").ack(1.0),
    "ack-none": lambda m: m.FrameRing().ack(None),
    "ack-bool": lambda m: filled(m, b"a").ack(True),
    "ack-beyond-last": lambda m: filled(m, b"a", b"b").ack(3),
    "ack-unsent": lambda m: filled(m, b"a", b"b").ack(1),
    "ack-huge": lambda m: sent(m, b"a").ack(2**70),
    "ack-negative": lambda m: sent(m, b"a").ack(-1),
    "ack-ok": lambda m: sent(m, b"a", b"b").ack(2),
    "drop-negative": lambda m: filled(m, b"a").drop_unsent(-1),
    "drop-str": lambda m: filled(m, b"a").drop_unsent("1"),
    "drop-float": lambda m: filled(m, b"a").drop_unsent(1.5),
    "drop-ok": lambda m: filled(m, b"a", b"bb").drop_unsent(14),
    "send-str-fd": lambda m: filled(m, b"a").send_to("0"),
    "send-str-fd-empty": lambda m: m.FrameRing().send_to("0"),
    "send-huge-fd": lambda m: filled(m, b"a").send_to(2**40),
    "send-closed-reader": (_send_to_closed_reader, None),
    "send-closed-fd": (_send_to_closed_fd, None),
    "peek-empty": lambda m: m.FrameRing().peek(),
    "rewind-empty": lambda m: m.FrameRing().rewind(),
    "append-closed": lambda m: _closed(m).append(b"b"),
    "take-all": lambda m: filled(m, b"a", b"bb").take_all(),
    "ack-from-no-source": lambda m: filled(m, b"a").ack_from_source(),
}


def _closed(m: types.ModuleType) -> Any:
    ring = filled(m, b"a")
    ring.close()
    return ring


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
def test_messages_match(case):
    if NATIVE_MODULE is None:
        pytest.skip("fanout.native._ring (native) is not built")
    call = FRAME_CASES[case]
    assert outcome(call, NATIVE_MODULE) == outcome(call, fanout.native._ring_py)


def test_frame_span_agrees_between_twins_on_every_cut():
    import random

    from fanout.wire.protocol import HEADER

    rng = random.Random(7)
    buf = bytearray()
    for seq in range(1, 40):
        length = rng.choice([0, 1, 5, 100, 3000])
        buf += HEADER.pack(length, seq * 3) + bytes(rng.getrandbits(8) for _ in range(length))
    modules = [fanout.native._ring_py] + ([NATIVE_MODULE] if NATIVE_MODULE is not None else [])
    for cut in [0, 5, 11, 12, 13, *rng.sample(range(len(buf)), 40), len(buf)]:
        for budget in (0, 12, 200, 5000, 1 << 20):
            for single in (False, True):
                spans = {m.frame_span(buf[:cut], budget, single) for m in modules}
                assert len(spans) == 1, (cut, budget, single, spans)
    pos, first, last, count = fanout.native._ring_py.frame_span(buf, 1 << 20, False)
    assert (pos, first, last, count) == (len(buf), 3, 39 * 3, 39)
    assert fanout.native._ring_py.frame_span(buf, 0, False)[3] == 1  # the first always goes
    assert fanout.native._ring_py.frame_span(buf[:11], 1 << 20, False) == (0, 0, 0, 0)
