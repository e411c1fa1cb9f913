"""The pump twins: the native ``fanout.native._pump.Pump`` and ``fanout.native._pump_py.Pump``.

A parity table feeds the same calls to both (every method, good and bad arguments,
calls after ``stop()`` and ``close()``) and compares results and messages; the
behaviour tests run on each, with a real pump thread and real pipes.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from frames import Pipe, read_exactly, wire
from helpers import outcome, twin_cases, wait_for

import fanout
import fanout.native._pump_py
import fanout.native._ring_py

try:
    import fanout.native._pump as native_pump
    import fanout.native._ring as native_ring
except ImportError:  # pure-Python build
    native_pump = native_ring = None

PAIRS = [pytest.param((fanout.native._pump_py, fanout.native._ring_py), id="py")]
if native_pump is not None and fanout.NATIVE:
    PAIRS.insert(0, pytest.param((native_pump, native_ring), id="native"))


@pytest.fixture(params=PAIRS)
def impl(request: pytest.FixtureRequest) -> tuple[types.ModuleType, types.ModuleType]:
    """``(pump module, ring module)`` of one implementation."""
    return request.param


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
    other = fanout.native._ring_py if ring_mod is not fanout.native._ring_py else native_ring
    return other.FrameRing() if other is not None else object()


def _closed_ring(ring_mod: types.ModuleType) -> Any:
    ring = ring_mod.FrameRing()
    ring.close()
    return ring


def _on(call: Callable[[Any, types.ModuleType], Any]) -> Callable[..., Any]:
    """A case that runs ``call(pump, ring module)`` on a new pump, closed after."""
    return lambda p, r: _with_pump(p, lambda pump: call(pump, r))


def _replace_ring(pump: Any, r: types.ModuleType) -> Any:
    pump.add("k", r.FrameRing(), 1)
    pump.add("k", r.FrameRing(), 2)  # same key: the lane is replaced, not added
    return pump.broken()


def _after_close(call: Callable[[Any, types.ModuleType], Any]) -> Callable[..., Any]:
    """A case that calls ``call(pump, ring module)`` once the pump was stopped and closed."""

    def case(p: types.ModuleType, r: types.ModuleType) -> Any:
        pump = p.Pump()
        pump.stop()
        pump.close()
        return call(pump, r)

    return case


CASES: dict[str, Callable[[types.ModuleType, types.ModuleType], Any]] = {
    "add-ring-none": _add(None, 1),
    "add-ring-str": _add("ring", 1),
    "add-ring-other-impl": _add(_other_ring, 1),
    "add-ring-closed": _add(_closed_ring, 1),
    "add-fd-str": _add(lambda m: m.FrameRing(), "1"),
    "add-fd-float": _add(lambda m: m.FrameRing(), 1.0),
    "add-fd-bool": _add(lambda m: m.FrameRing(), True),
    "add-fd-negative": _add(lambda m: m.FrameRing(), -1),
    "add-fd-huge": _add(lambda m: m.FrameRing(), 2**40),
    "add-ok": _add(lambda m: m.FrameRing(), 1),
    "add-keywords": _on(lambda pump, r: pump.add(key="k", ring=r.FrameRing(), fd=1)),
    "add-key-unhashable": _on(lambda pump, r: pump.add([], r.FrameRing(), 1)),
    "add-same-key-again": _on(_replace_ring),
    "remove-unknown": _on(lambda pump, r: pump.remove("nobody")),
    "remove-unhashable": _on(lambda pump, r: pump.remove([])),
    "broken-empty": _on(lambda pump, r: pump.broken()),
    "add-remove-broken": _on(
        lambda pump, r: (pump.add("k", r.FrameRing(), 1), pump.remove("k"), pump.broken())
    ),
    "notify-idle": _on(lambda pump, r: pump.notify()),
    "stop-then-run": _on(lambda pump, r: (pump.stop(), pump.run())),  # returns at once
    "stop-twice": _on(lambda pump, r: (pump.stop(), pump.stop())),
    "close-twice": _after_close(lambda pump, r: pump.close()),
    "notify-after-close": _after_close(lambda pump, r: pump.notify()),
    "broken-after-close": _after_close(lambda pump, r: pump.broken()),
    "stop-after-close": _after_close(lambda pump, r: pump.stop()),
    "remove-after-close": _after_close(lambda pump, r: pump.remove("k")),
    "add-after-close": _after_close(lambda pump, r: pump.add("k", r.FrameRing(), 1)),
}

# Known differences, kept in the table so a fix shows (a strict xfail turns into a
# failure once both agree).
DIVERGENT: dict[str, str] = {}


def _outcome(call: Callable[..., Any], *args: Any) -> tuple[Any, str]:
    """``outcome``, with each twin's own ring module named alike."""
    kind, text = outcome(call, *args)
    return kind, text.replace("fanout.native._ring_py", "fanout.native._ring")


@pytest.mark.parametrize("case", twin_cases(CASES, DIVERGENT))
def test_pump_twins_agree(case):
    if native_pump is None or not fanout.NATIVE:
        pytest.skip("fanout.native._pump (native) is not built")
    call = CASES[case]
    native = _outcome(call, native_pump, native_ring)
    py = _outcome(call, fanout.native._pump_py, fanout.native._ring_py)
    if case == "add-ring-other-impl":  # each names its own FrameRing
        assert native[0] is py[0] is TypeError
    else:
        assert native == py


@contextlib.contextmanager
def running(pump_mod: types.ModuleType) -> Iterator[Any]:
    """A pump whose ``run()`` loop turns in a thread; stopped, joined and closed after."""
    pump = pump_mod.Pump()
    thread = threading.Thread(target=pump.run, name="pump")
    thread.start()
    try:
        yield pump
    finally:
        pump.stop()
        thread.join(30)
        pump.close()
    assert not thread.is_alive(), "run() did not return after stop()"


def test_pump_drains_rings_into_their_pipes(impl):
    pump_mod, ring_mod = impl
    with contextlib.ExitStack() as stack:
        pipes = [stack.enter_context(Pipe(None, blocking_reader=True)) for _ in range(3)]
        pump = stack.enter_context(running(pump_mod))
        rings = [ring_mod.FrameRing() for _ in pipes]
        for i, (ring, pipe) in enumerate(zip(rings, pipes, strict=True)):
            pump.add(i, ring, pipe.w)
        for n in range(50):
            ring_mod.append_all(rings, b"frame %d" % n)
            pump.notify()
        expected = b"".join(wire(n + 1, b"frame %d" % n) for n in range(50))
        for pipe in pipes:
            assert read_exactly(pipe.r, len(expected)) == expected
        assert pump.broken() == {}
        for i in range(len(pipes)):
            pump.remove(i)


def test_a_reader_gone_is_reported_by_broken(impl):
    pump_mod, ring_mod = impl
    with Pipe(None) as pipe, running(pump_mod) as pump:
        pipe.close_reader()
        ring = ring_mod.FrameRing()
        pump.add("gone", ring, pipe.w)
        ring.append(b"x")
        pump.notify()
        assert wait_for(pump.broken, 30)
        assert pump.broken() == {"gone": errno.EPIPE}
        pump.add("gone", ring, pipe.w)  # the same lane again: still broken
        assert pump.broken() == {"gone": errno.EPIPE}
        pump.remove("gone")
        assert pump.broken() == {}
