"""FrameRing driven by random operation sequences (hypothesis) and checked, after every
step, against a plain model: frames held, bytes, capacity, sequence numbers, and what
each reader (a new one after every rewind) receives.

Runs on both implementations through ``ring_impl`` (tests/conftest.py).
"""

from __future__ import annotations

import os
import types
from typing import Any, ClassVar

import pytest
from frames import (
    HDR,
    MIN_GROW,
    PAGE,
    Pipe,
    parse,
    payload_for,
    read_available,
    wire,
)
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from fanout.errors import RingFull, ring_full_message
from fanout.native._ring_common import check_ack


def grown(cap: int, need: int, max_bytes: int | None) -> int:
    """The capacity after an append that needs ``need`` bytes held."""
    if need <= cap:
        return cap
    cap = max(cap, MIN_GROW)
    while cap < need:
        cap *= 2
    return cap if max_bytes is None else min(cap, max_bytes)


class Reader:
    """One reader of one pipe: what it was sent must be a prefix of what it expects."""

    def __init__(self, expected: list[tuple[int, bytes]]) -> None:
        self.pipe = Pipe(PAGE)
        self.r, self.w = self.pipe
        # frames (seq, payload) this reader must get, in this order
        self.expected = list(expected)
        self.written = 0  # bytes send_to said it wrote here
        self.buf = bytearray()  # received, not yet parsed
        self.received: list[tuple[int, bytes]] = []

    def read(self, n: int) -> None:
        try:
            self.take(os.read(self.r, n))
        except BlockingIOError:
            pass

    def take(self, data: bytes) -> None:
        self.buf += data
        frames, rest = parse(self.buf)
        self.buf = bytearray(rest)
        for frame in frames:
            i = len(self.received)
            assert i < len(self.expected), f"unexpected frame {frame[0]}"
            assert frame == self.expected[i], f"frame {i} is {frame[0]}, not {self.expected[i]}"
            self.received.append(frame)
        if self.buf:  # a frame in pieces: its start matches the frame expected
            nxt = self.expected[len(self.received)]
            assert wire(*nxt).startswith(self.buf)

    def drain(self) -> None:
        self.take(read_available(self.r))
        consumed = sum(HDR + len(p) for _, p in self.received) + len(self.buf)
        assert consumed == self.written

    def close(self) -> None:
        self.pipe.close_reader()
        self.pipe.close_writer()


class FrameRingMachine(RuleBasedStateMachine):
    """A FrameRing driven at random, checked against a list of held frames.

    Rewind is modelled as fanout uses it after a worker crash: the old reader gets
    what was in its pipe, then a new pipe and reader must receive exactly the frames
    not acked, in order, then whatever comes next.
    """

    impl: ClassVar[types.ModuleType]

    def __init__(self) -> None:
        super().__init__()
        self.ring: Any = None
        self.reader: Reader | None = None
        self.held: list[tuple[int, bytes]] = []  # appended, not acked, not dropped
        self.appended: list[int] = []
        self.dropped: set[int] = set()
        self.seen: set[int] = set()  # frames some reader received
        self.sent = 0  # bytes of `held` sent to the current reader
        self.sent_seq = self.acked_seq = self.last_seq = 0
        self.cap = self.normal = 0
        self.max_bytes: int | None = None

    @initialize(
        initial=st.sampled_from([0, 1, 64, 100, 1000, 4096]),
        normal=st.none() | st.sampled_from([0, 64, 200, 1000, 8192]),
        bound=st.none() | st.integers(13, 400) | st.integers(400, 12_000),
    )
    def build(self, initial, normal, bound):
        self.ring = self.impl.FrameRing(initial, normal, bound)
        self.max_bytes = bound
        self.cap = initial if bound is None else min(initial, bound)
        self.normal = self.cap if normal is None else normal
        if bound is not None:
            self.normal = min(self.normal, bound)
        self.reader = Reader([])

    def teardown(self) -> None:
        try:
            if self.ring is not None and self.reader is not None:
                self.flush()
                self.reader.drain()
                assert self.reader.received == self.reader.expected
                self.seen.update(seq for seq, _ in self.reader.received)
                # A frame sent, rewound, then dropped may have reached an old reader.
                assert set(self.appended) - self.dropped <= self.seen <= set(self.appended)
        finally:
            if self.reader is not None:
                self.reader.close()

    # -- helpers --

    @property
    def used(self) -> int:
        return sum(HDR + len(p) for _, p in self.held)

    def _append(self, payload: bytes) -> None:
        n = HDR + len(payload)
        if self.max_bytes is not None and self.used + n > self.max_bytes:
            with pytest.raises(RingFull) as info:
                self.ring.append(payload)
            assert str(info.value) == ring_full_message(n, self.used, self.max_bytes)
            event("ring full")
            return
        seq = self.ring.append(payload)
        assert seq == self.last_seq + 1
        self.cap = grown(self.cap, self.used + n, self.max_bytes)
        self.last_seq = seq
        self.appended.append(seq)
        self.held.append((seq, payload))
        self.reader.expected.append((seq, payload))

    def _first_unsent(self) -> tuple[int, int]:
        """Index and offset of the first held frame not completely sent."""
        off = 0
        for i, (_, p) in enumerate(self.held):
            if off + HDR + len(p) > self.sent:
                return i, off
            off += HDR + len(p)
        return len(self.held), off

    # -- rules --

    @rule(payload=st.binary(min_size=1, max_size=300))
    def append(self, payload):
        self._append(payload)

    @rule(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=40))
    def append_many(self, sizes):
        for size in sizes:
            self._append(payload_for(self.last_seq + 1, size))

    @rule(sizes=st.lists(st.integers(1, 300), min_size=10, max_size=40))
    def append_then_send(self, sizes):
        """Append a burst, then send once, as a pump does: often a partial write."""
        self.append_many(sizes)
        self.send()

    @rule()
    def send(self):
        before = self.ring.unsent_bytes
        written = self.ring.send_to(self.reader.w)
        assert 0 <= written <= before
        self.sent += written
        self.reader.written += written
        i, off = self._first_unsent()
        if i:
            self.sent_seq = self.held[i - 1][0]
        if off < self.sent:
            event("partial frame write")

    @rule(n=st.integers(1, 2 * PAGE))
    def read(self, n):
        self.reader.read(n)

    @rule(data=st.data())
    def ack(self, data):
        seq = data.draw(st.integers(self.acked_seq - 1, self.sent_seq + 2), label="seq")
        if seq > self.last_seq or seq > self.sent_seq:
            with pytest.raises(ValueError) as expected:
                check_ack(seq, self.last_seq, self.sent_seq)
            with pytest.raises(ValueError) as info:
                self.ring.ack(seq)
            assert str(info.value) == str(expected.value)
            return
        freed = self.ring.ack(seq)
        if seq <= self.acked_seq:
            assert freed == 0
            return
        gone = [f for f in self.held if f[0] <= seq]
        assert freed == len(gone)
        self.held = self.held[len(gone) :]
        self.sent -= sum(HDR + len(p) for _, p in gone)
        assert self.sent >= 0
        self.acked_seq = seq
        if not self.held and self.cap > self.normal:
            self.cap = self.normal

    @rule()
    def rewind(self):
        assert self.ring.rewind() == len(self.held)
        old = self.reader
        old.drain()
        self.seen.update(seq for seq, _ in old.received)
        old.close()
        self.reader = Reader(self.held)
        self.sent = 0
        self.sent_seq = self.acked_seq

    @rule(nbytes=st.integers(0, 2000))
    def drop_unsent(self, nbytes):
        i, off = self._first_unsent()
        if off < self.sent:  # partly sent: kept
            i += 1
        j, gap = i, 0
        while j < len(self.held) and gap < nbytes:
            gap += HDR + len(self.held[j][1])
            j += 1
        assert self.ring.drop_unsent(nbytes) == (j - i, gap)
        for seq, payload in self.held[i:j]:
            self.dropped.add(seq)
            k = self.reader.expected.index((seq, payload))
            start = sum(HDR + len(p) for _, p in self.reader.expected[:k])
            assert start >= self.reader.written  # never sent
            del self.reader.expected[k]
        del self.held[i:j]

    @rule()
    def peek(self):
        assert self.ring.peek() == (self.held[0][1] if self.held else None)

    @rule()
    def flush(self):
        for _ in range(10_000):
            if not self.ring.unsent_bytes:
                break
            self.send()
            self.reader.read(1 << 16)
        assert self.ring.unsent_bytes == 0
        assert self.ring.sent_seq == self.sent_seq

    # -- what must always hold --

    @invariant()
    def matches_model(self):
        ring = self.ring
        if ring is None:
            return
        assert len(ring) == len(self.held)
        assert ring.nbytes == self.used
        assert ring.unsent_bytes == self.used - self.sent
        assert ring.capacity == self.cap
        assert ring.capacity >= ring.nbytes
        assert ring.normal_bytes == self.normal
        assert ring.max_bytes == self.max_bytes
        if self.max_bytes is not None:
            assert ring.nbytes <= self.max_bytes
            assert ring.capacity <= self.max_bytes
        assert (ring.last_seq, ring.acked_seq, ring.sent_seq) == (
            self.last_seq,
            self.acked_seq,
            self.sent_seq,
        )


def test_random_operations_match_model(ring_impl: types.ModuleType):
    machine = type(
        f"FrameRingMachine_{ring_impl.__name__}", (FrameRingMachine,), {"impl": ring_impl}
    )
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=80, stateful_step_count=40, deadline=None),
    )
