"""Ring: the k8s.io/utils ``buffer.Ring`` cases, wrap-around, cleared slots, bad
arguments, and random write/read sequences checked against ``collections.deque``.

Every test takes ``ring_impl`` (tests/conftest.py), so the native ring and its
pure-Python twin pass the same tests; ``test_messages_match`` compares the two directly.
"""

from __future__ import annotations

import collections
import gc
import importlib
import types
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from helpers import outcome
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import fanout.native._ring_py

GROW_FROM_ZERO = 16


class Item:
    """A value a weakref can watch (ints and strs cannot be weakly referenced)."""

    __slots__ = ("__weakref__", "value")

    def __init__(self, value: int) -> None:
        self.value = value


def drain(ring: Any) -> list[Any]:
    out = []
    while True:
        item, ok = ring.read_one()
        if not ok:
            assert item is None
            return out
        out.append(item)


# -- k8s.io/utils buffer/ring_growing_test.go ------------------------------------------


@pytest.mark.parametrize("initial_size", [0, 1])
def test_growing_ring_grows_to_16_and_reads_fifo(ring_impl: types.ModuleType, initial_size):
    ring = ring_impl.Ring(initial_size)
    assert len(ring) == 0
    assert ring.capacity == initial_size
    for i in range(10):
        assert len(ring) == i
        ring.write_one(i)
    assert len(ring) == 10
    assert ring.capacity == 16
    for i in range(10):
        assert ring.read_one() == (i, True)
    assert ring.read_one() == (None, False)
    assert len(ring) == 0
    assert ring.capacity == 16  # normal_size=None (RingGrowing) never shrinks


def test_default_ring_is_empty_and_grows_from_zero(ring_impl: types.ModuleType):
    ring = ring_impl.Ring()
    assert (len(ring), ring.capacity) == (0, 0)
    assert ring.read_one() == (None, False)
    ring.write_one("x")
    assert (len(ring), ring.capacity) == (1, GROW_FROM_ZERO)


@pytest.mark.parametrize(("initial_size", "normal_size"), [(0, 0), (1, 2), (2, 1)])
def test_ring_shrinks_to_normal_size_after_drain(
    ring_impl: types.ModuleType, initial_size, normal_size
):
    ring = ring_impl.Ring(initial_size, normal_size)
    assert ring.capacity == initial_size
    for i in range(10):
        assert len(ring) == i
        ring.write_one(i)
    assert len(ring) == 10
    assert ring.capacity == 16
    for i in range(10):
        assert ring.capacity == 16  # no shrink while something is left
        assert ring.read_one() == (i, True)
    assert len(ring) == 0
    assert ring.capacity == normal_size
    assert ring.read_one() == (None, False)
    assert ring.capacity == normal_size


def test_empty_read(ring_impl: types.ModuleType):
    for ring in (ring_impl.Ring(), ring_impl.Ring(4), ring_impl.Ring(0, 0), ring_impl.Ring(3, 5)):
        assert ring.read_one() == (None, False)
        assert len(ring) == 0


def test_none_item_is_not_empty(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(1, 1)
    ring.write_one(None)
    assert len(ring) == 1
    assert ring.read_one() == (None, True)
    assert ring.read_one() == (None, False)


def test_normal_size_none_never_shrinks(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(2, None)
    for _ in range(3):
        for i in range(100):
            ring.write_one(i)
        assert drain(ring) == list(range(100))
        assert ring.capacity == 128
    ring.read_one()
    assert ring.capacity == 128


def test_normal_size_larger_than_capacity_is_kept(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(4, 64)
    for i in range(20):
        ring.write_one(i)
    assert ring.capacity == 32
    assert drain(ring) == list(range(20))
    assert ring.capacity == 32  # only shrinks to normal_size when it is smaller


def test_shrink_only_when_a_read_empties_the_ring(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(0, 4)
    for i in range(40):
        ring.write_one(i)
    assert ring.capacity == 64
    for i in range(39):
        assert ring.read_one() == (i, True)
        assert ring.capacity == 64
    assert ring.read_one() == (39, True)
    assert ring.capacity == 4
    # and it grows again from the normal size
    for i in range(5):
        ring.write_one(i)
    assert ring.capacity == 8
    assert drain(ring) == list(range(5))
    assert ring.capacity == 4


# -- wrap-around -----------------------------------------------------------------------


def test_wrap_around_without_growth(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(4)
    expected = collections.deque()
    nxt = 0
    for _ in range(50):  # keep 1..3 items in, so the start walks round and round
        for _ in range(3 - len(expected)):
            ring.write_one(nxt)
            expected.append(nxt)
            nxt += 1
        assert ring.read_one() == (expected.popleft(), True)
        assert ring.read_one() == (expected.popleft(), True)
        assert ring.capacity == 4
    assert drain(ring) == list(expected)


def test_growth_mid_wrap_keeps_order(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(4)
    for i in range(3):
        ring.write_one(i)
    assert ring.read_one() == (0, True)
    assert ring.read_one() == (1, True)
    # start is at slot 2: 3, 4, 5 wrap round to slots 3, 0, 1
    for i in range(3, 6):
        ring.write_one(i)
    assert (len(ring), ring.capacity) == (4, 4)
    ring.write_one(6)  # full while wrapped: grows
    assert (len(ring), ring.capacity) == (5, 8)
    assert ring.read_one() == (2, True)
    for i in range(7, 10):  # wraps again in the grown ring
        ring.write_one(i)
    assert (len(ring), ring.capacity) == (7, 8)
    assert drain(ring) == list(range(3, 10))


def test_growth_mid_wrap_several_times(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(1)
    expected = collections.deque()
    nxt = 0
    for step in range(200):
        for _ in range(step % 5 + 2):
            ring.write_one(nxt)
            expected.append(nxt)
            nxt += 1
        for _ in range(step % 3 + 1):
            assert ring.read_one() == (expected.popleft(), True)
    assert len(ring) == len(expected)
    assert drain(ring) == list(expected)


# -- read slots are cleared ------------------------------------------------------------


def test_read_slots_are_cleared(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(4)
    items = [Item(i) for i in range(3)]
    refs = [weakref.ref(item) for item in items]
    for item in items:
        ring.write_one(item)
    del items, item
    first, ok = ring.read_one()
    assert ok and first.value == 0
    del first
    gc.collect()
    assert refs[0]() is None  # read: the ring keeps no reference
    assert refs[1]() is not None and refs[2]() is not None  # still queued
    drain(ring)
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]


def test_read_slots_are_cleared_after_wrap_and_growth(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(2)
    refs = []
    for i in range(50):
        item = Item(i)
        refs.append(weakref.ref(item))
        ring.write_one(item)
        if i % 3 == 0:
            got, ok = ring.read_one()
            assert ok
    del item, got
    assert [item.value for item in drain(ring)] == list(range(17, 50))
    gc.collect()
    assert all(ref() is None for ref in refs)


@pytest.mark.parametrize("normal_size", [None, 0, 4])
def test_write_read_keeps_no_reference(ring_impl: types.ModuleType, normal_size):
    ring = ring_impl.Ring(0, normal_size)
    item = Item(1)
    ref = weakref.ref(item)
    ring.write_one(item)
    del item
    gc.collect()
    assert ref() is not None
    assert ring.read_one()[0].value == 1
    gc.collect()
    assert ref() is None


# -- bad arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "exc", "message"),
    [
        ((-1,), ValueError, "initial_size must be >= 0, got -1"),
        ((0, -1), ValueError, "normal_size must be >= 0, got -1"),
        ((1.5,), TypeError, "initial_size must be an int, not float (1.5)"),
        (("3",), TypeError, "initial_size must be an int, not str ('3')"),
        ((None,), TypeError, "initial_size must be an int, not NoneType (None)"),
        ((True,), TypeError, "initial_size must be an int, not bool (True)"),
        ((0, 2.0), TypeError, "normal_size must be an int, not float (2.0)"),
        ((0, "x"), TypeError, "normal_size must be an int, not str ('x')"),
        ((0, False), TypeError, "normal_size must be an int, not bool (False)"),
    ],
)
def test_bad_arguments(ring_impl: types.ModuleType, args, exc, message):
    with pytest.raises(exc) as info:
        ring_impl.Ring(*args)
    assert str(info.value) == message


def test_keyword_arguments(ring_impl: types.ModuleType):
    ring = ring_impl.Ring(initial_size=3, normal_size=2)
    assert ring.capacity == 3
    ring.write_one(1)
    ring.read_one()
    assert ring.capacity == 2


# -- the two implementations agree -----------------------------------------------------

RING_CASES: dict[str, Callable[[types.ModuleType], Any]] = {
    "negative-initial": lambda m: m.Ring(-1),
    "negative-normal": lambda m: m.Ring(0, -5),
    "float-initial": lambda m: m.Ring(2.5),
    "str-initial": lambda m: m.Ring("4"),
    "none-initial": lambda m: m.Ring(None),
    "bool-initial": lambda m: m.Ring(True),
    "float-normal": lambda m: m.Ring(1, 1.0),
    "list-normal": lambda m: m.Ring(1, [1]),
    "kw-negative": lambda m: m.Ring(initial_size=0, normal_size=-1),
    "empty-read": lambda m: m.Ring().read_one(),
}


@pytest.mark.parametrize("case", sorted(RING_CASES))
def test_messages_match(case):
    try:
        native = importlib.import_module("fanout.native._ring")
    except ImportError:
        pytest.skip("fanout.native._ring (native) is not built")
    call = RING_CASES[case]
    assert outcome(call, native) == outcome(call, fanout.native._ring_py)


# -- random write/read sequences against deque -----------------------------------------


class RingMachine(RuleBasedStateMachine):
    """Ring vs ``collections.deque``, with the capacity modelled exactly."""

    impl: ClassVar[types.ModuleType]

    def __init__(self) -> None:
        super().__init__()
        self.model: collections.deque[Any] = collections.deque()
        self.next_value = 0
        self.cap = 0
        self.normal: int | None = None

    @initialize(initial=st.integers(0, 40), normal=st.none() | st.integers(0, 40))
    def build(self, initial, normal):
        self.ring = self.impl.Ring(initial, normal)
        self.cap = initial
        self.normal = normal

    def _write(self) -> None:
        value = self.next_value
        self.next_value += 1
        if len(self.model) == self.cap:
            self.cap = self.cap * 2 if self.cap else GROW_FROM_ZERO
        self.ring.write_one(value)
        self.model.append(value)

    def _read(self) -> None:
        if not self.model:
            assert self.ring.read_one() == (None, False)
            return
        assert self.ring.read_one() == (self.model.popleft(), True)
        if not self.model and self.normal is not None and self.cap > self.normal:
            self.cap = self.normal

    @rule()
    def write(self):
        self._write()

    @rule(n=st.integers(1, 70))
    def write_many(self, n):
        for _ in range(n):
            self._write()

    @rule()
    def read(self):
        self._read()

    @rule(n=st.integers(1, 70))
    def read_many(self, n):
        for _ in range(n):
            self._read()

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def drain(self):
        grown = self.ring.capacity
        assert drain(self.ring) == list(self.model)
        self.model.clear()
        if self.normal is not None and grown > self.normal:
            self.cap = self.normal
            assert self.ring.capacity == self.normal
        else:
            assert self.ring.capacity == grown

    @invariant()
    def matches_model(self):
        assert len(self.ring) == len(self.model)
        assert self.ring.capacity == self.cap
        assert self.ring.capacity >= len(self.ring)


def test_random_writes_and_reads_match_deque(ring_impl: types.ModuleType):
    machine = type(f"RingMachine_{ring_impl.__name__}", (RingMachine,), {"impl": ring_impl})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=100, stateful_step_count=40, deadline=None),
    )


def test_slot_progress_reads_a_workers_progress_words(ring_impl: types.ModuleType):
    from fanout.wire.protocol import DONE, ERRORS, HANDLED, SLOT_WORDS, STARTED

    slot = memoryview(bytearray(8 * SLOT_WORDS)).cast("Q")
    for word, value in ((ERRORS, 3), (HANDLED, 5), (DONE, 9), (STARTED, 2**64 - 1)):
        slot[word] = value
    assert ring_impl.slot_progress(slot) == (3, 5, 9, 2**64 - 1)
