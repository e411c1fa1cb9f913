"""The pump twins: the native ``fanout._pump.Pump`` and ``fanout._pump_py.Pump``.

A parity table feeds the same calls to both and compares results and messages;
the behaviour tests run on each.
"""

from __future__ import annotations

import errno
import os
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest

import fanout
import fanout._pump_py
import fanout._ring_py
from fanout._ring_common import HEADER

try:
    import fanout._pump as native_pump
    import fanout._ring as native_ring
except ImportError:  # pure-Python build
    native_pump = native_ring = None

PAIRS = [pytest.param((fanout._pump_py, fanout._ring_py), id="py")]
if native_pump is not None and fanout.NATIVE:
    PAIRS.insert(0, pytest.param((native_pump, native_ring), id="native"))


@pytest.fixture(params=PAIRS)
def impl(request: pytest.FixtureRequest) -> tuple[types.ModuleType, types.ModuleType]:
    """``(pump module, ring module)`` of one implementation."""
    return request.param


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(w, False)
    return r, w


def _with_pump(pump_mod: Any, call: Callable[[Any], Any]) -> Any:
    pump = pump_mod.Pump()
    try:
        return call(pump)
    finally:
        pump.close()


def _add(ring: Any, fd: Any) -> Callable[[types.ModuleType, types.ModuleType], Any]:
    def call(pump_mod: types.ModuleType, ring_mod: types.ModuleType) -> Any:
        r = ring(ring_mod) if callable(ring) else ring
        return _with_pump(pump_mod, lambda p: p.add("k", r, fd))

    return call


def _other_ring(ring_mod: types.ModuleType) -> Any:
    other = fanout._ring_py if ring_mod is not fanout._ring_py else native_ring
    return other.FrameRing() if other is not None else object()


CASES: dict[str, Callable[[types.ModuleType, types.ModuleType], Any]] = {
    "add-ring-none": _add(None, 1),
    "add-ring-str": _add("ring", 1),
    "add-ring-other-impl": _add(_other_ring, 1),
    "add-fd-str": _add(lambda m: m.FrameRing(), "1"),
    "add-fd-float": _add(lambda m: m.FrameRing(), 1.0),
    "add-fd-negative": _add(lambda m: m.FrameRing(), -1),
    "add-fd-huge": _add(lambda m: m.FrameRing(), 2**40),
    "add-ok": _add(lambda m: m.FrameRing(), 1),
    "remove-unknown": lambda p, r: _with_pump(p, lambda pump: pump.remove("nobody")),
    "broken-empty": lambda p, r: _with_pump(p, lambda pump: pump.broken()),
    "add-remove-broken": lambda p, r: _with_pump(
        p, lambda pump: (pump.add("k", r.FrameRing(), 1), pump.remove("k"), pump.broken())
    ),
}


def _outcome(call: Callable[..., Any], *args: Any) -> tuple[Any, str]:
    try:
        result = call(*args)
    except Exception as exc:  # compared, not swallowed
        return type(exc), str(exc).replace("fanout._ring_py", "fanout._ring")
    return "ok", repr(result)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pump_twins_agree(case):
    if native_pump is None or not fanout.NATIVE:
        pytest.skip("fanout._pump (native) is not built")
    call = CASES[case]
    native = _outcome(call, native_pump, native_ring)
    py = _outcome(call, fanout._pump_py, fanout._ring_py)
    if case == "add-ring-other-impl":  # each names its own FrameRing
        assert native[0] is py[0] is TypeError
    else:
        assert native == py


def _read_all(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_pump_drains_rings_into_their_pipes(impl):
    pump_mod, ring_mod = impl
    pump = pump_mod.Pump()
    thread = threading.Thread(target=pump.run)
    thread.start()
    pipes = [_pipe() for _ in range(3)]
    rings = [ring_mod.FrameRing() for _ in pipes]
    try:
        for i, (ring, (_, w)) in enumerate(zip(rings, pipes, strict=True)):
            pump.add(i, ring, w)
        for n in range(50):
            ring_mod.append_all(rings, b"frame %d" % n)
            pump.notify()
        expected = b"".join(
            HEADER.pack(len(b"frame %d" % n), n + 1) + b"frame %d" % n for n in range(50)
        )
        for r, _ in pipes:
            assert _read_all(r, len(expected)) == expected
        assert pump.broken() == {}
    finally:
        for i in range(len(pipes)):
            pump.remove(i)
        pump.stop()
        thread.join(30)
        pump.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert not thread.is_alive()


def test_a_reader_gone_is_reported_by_broken(impl):
    pump_mod, ring_mod = impl
    pump = pump_mod.Pump()
    thread = threading.Thread(target=pump.run)
    thread.start()
    r, w = _pipe()
    os.close(r)
    ring = ring_mod.FrameRing()
    try:
        pump.add("gone", ring, w)
        ring.append(b"x")
        pump.notify()
        deadline = threading.Event()
        for _ in range(3000):
            if pump.broken():
                break
            deadline.wait(0.01)
        assert pump.broken() == {"gone": errno.EPIPE}
        pump.add("gone", ring, w)  # the same lane again: still broken
        assert pump.broken() == {"gone": errno.EPIPE}
        pump.remove("gone")
        assert pump.broken() == {}
    finally:
        pump.stop()
        thread.join(30)
        pump.close()
        os.close(w)
