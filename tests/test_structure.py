"""The seam between the distributor and its listeners.

Listeners see a ``ListenerContext``, never the ``Distributor``: no listener module
(nor the supervisor) imports ``fanout.core.distributor``. The distributor drives every
kind through the ``Registration`` interface only, so a new kind plugs in with one
class and one entry in ``LISTENER_KINDS``: shown here with a kind that exists only
in this test.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pytest

import fanout
import fanout.core.registry
from fanout.core.options import ListenerOptions
from fanout.listeners.base import Registration

BELOW_THE_DISTRIBUTOR = [
    "listeners.base",
    "core.options",
    "listeners.lanes",
    "listeners.process",
    "listeners.thread",
    "listeners.ray",
    "listeners.supervisor",
    "wire.codec",
    "worker.main",
]


def _imported_modules(module: str) -> set[str]:
    path = Path(importlib.import_module(f"fanout.{module}").__file__ or "")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # TYPE_CHECKING imports too
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("module", BELOW_THE_DISTRIBUTOR)
def test_nothing_below_the_distributor_imports_it(module):
    assert "fanout.core.distributor" not in _imported_modules(module)


def test_listener_options_are_frozen(make_dist):
    d = make_dist()
    reg = d.add_listener(fanout.FuncHandler(), executor="thread", name="t")
    assert isinstance(reg.opts, ListenerOptions)
    assert (reg.opts.name, reg.opts.executor, reg.opts.overflow) == ("t", "thread", "block")
    with pytest.raises(dataclasses.FrozenInstanceError):
        reg.opts.name = "other"  # type: ignore[misc]


class InlineListener(Registration):
    """A listener kind the distributor has never heard of: calls the handler in ``put``."""

    executor = "inline"
    takes_payloads = False

    def __init__(self, ctx: Any, opts: ListenerOptions) -> None:
        super().__init__(ctx, opts)
        self.handler = opts.handler
        self.seen = self.done = 0
        self.open = True

    def put(self, item: tuple[fanout.Notification, int]) -> None:
        if not self.open:
            return
        self.seen += 1
        n = item[0]
        if isinstance(n, fanout.Add):
            self.handler.on_add(n.obj, n.is_in_initial_list)
        self.done += 1

    def queue_initial(self, adds: list[fanout.Add], t_ns: int) -> None:
        for n in adds:
            self.put((n, t_ns))

    def start(self) -> None:
        pass

    def close(self, drain: bool = False) -> None:
        self.open = False

    def close_input(self) -> None:
        self.open = False

    def settle(self, reason: str | None) -> list[Any]:
        return []

    def exited(self) -> bool:
        return True

    def drained(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.open

    def _initial_done(self) -> bool:
        return True

    def latency_histogram(self) -> list[int]:
        return []

    def counters(self) -> dict[str, int]:
        return {
            "received": self.seen,
            "pending": 0,
            "pending_bytes": 0,
            "capacity_bytes": 0,
            "delivered": self.done,
            "errors": 0,
        }


def test_a_new_listener_kind_needs_no_special_case_in_the_distributor(make_dist, monkeypatch):
    # "thread" passes the option checks for an in-process handler; the class
    # behind it is swapped for one the distributor has no code for.
    monkeypatch.setitem(fanout.core.registry.LISTENER_KINDS, "thread", InlineListener)
    got: list[Any] = []
    d = make_dist()
    reg = d.add_listener(
        fanout.FuncHandler(on_add=lambda obj, initial: got.append((obj, initial))),
        executor="thread",
        initial_list=["first"],
    )
    assert isinstance(reg, InlineListener)
    d.start()
    for i in range(3):
        d.distribute(fanout.Add(i))
    d.mark_synced()
    assert reg.has_synced()
    assert d.stop(drain=True, timeout=30)
    assert got == [("first", True), (0, False), (1, False), (2, False)]
    s = reg.stats()
    assert (s.received, s.delivered, s.dropped, s.dead_lettered) == (4, 4, 0, 0)
