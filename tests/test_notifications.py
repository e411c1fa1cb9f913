"""Notifications are immutable value types; handlers have no-op defaults."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

import fanout


@pytest.mark.parametrize(
    ("n", "fields"),
    [
        (fanout.Add({"a": 1}), {"obj": {"a": 1}, "is_in_initial_list": False}),
        (fanout.Add("x", True), {"obj": "x", "is_in_initial_list": True}),
        (fanout.Update(1, 2), {"old": 1, "new": 2}),
        (fanout.Delete([1]), {"obj": [1]}),
    ],
)
def test_value_types(n, fields):
    assert dataclasses.is_dataclass(n)
    assert dataclasses.asdict(n) == fields
    assert not hasattr(n, "__dict__")  # slots
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(n, next(iter(fields)), "changed")
    assert pickle.loads(pickle.dumps(n)) == n
    assert type(n)(**fields) == n
    assert dataclasses.replace(n) == n


def test_equality_and_hash():
    assert fanout.Update(1, 2) == fanout.Update(1, 2) != fanout.Update(2, 1)
    assert hash(fanout.Add("a", True)) == hash(fanout.Add("a", True))
    assert fanout.Add("a") != fanout.Delete("a")
    assert fanout.Add(obj="a", is_in_initial_list=True).is_in_initial_list is True


def test_handler_defaults_are_no_ops():
    h = fanout.Handler()
    assert h.on_add({}, False) is None
    assert h.on_update({}, {}) is None
    assert h.on_delete({}) is None


def test_func_handler_calls_what_it_was_given():
    seen = []
    h = fanout.FuncHandler(on_update=lambda old, new: seen.append((old, new)))
    h.on_update(1, 2)
    h.on_add(3, True)  # not given: ignored
    h.on_delete(4)
    assert seen == [(1, 2)]


def test_func_handler_refuses_non_callables():
    with pytest.raises(TypeError, match="on_delete must be callable"):
        fanout.FuncHandler(on_delete="print")
