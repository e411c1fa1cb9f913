"""FrameRing: every method and error, partial writes, rewind, drop, growth and shrink,
real pipes drained by threads, and random operation sequences against a model.

Every test but ``test_messages_match`` takes ``ring_impl`` (tests/conftest.py), so the
native ring and its pure-Python twin pass the same tests; ``test_messages_match``
compares the two directly.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import importlib
import os
import random
import select
import struct
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import fanout
import fanout._ring_py
from fanout._ring_common import check_ack
from fanout.errors import FanoutError, RingClosed, RingFull, ring_full_message

HEADER = struct.Struct("<IQ")
HDR = HEADER.size
PAGE = 4096  # the smallest pipe capacity F_SETPIPE_SZ grants
MIN_GROW = 64


def wire(seq: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), seq) + payload


def parse(data: bytes | bytearray) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split a byte stream into complete ``(seq, payload)`` frames and a rest."""
    frames, pos = [], 0
    while len(data) - pos >= HDR:
        length, seq = HEADER.unpack_from(data, pos)
        assert length > 0, "a frame on the wire is never empty"
        if len(data) - pos - HDR < length:
            break
        frames.append((seq, bytes(data[pos + HDR : pos + HDR + length])))
        pos += HDR + length
    return frames, bytes(data[pos:])


def payload_for(seq: int, size: int) -> bytes:
    """Bytes that depend on the frame, so a mix-up shows."""
    return (seq.to_bytes(8, "little") * (size // 8 + 1))[:size]


def grown(cap: int, need: int, max_bytes: int | None) -> int:
    """The capacity after an append that needs ``need`` bytes held."""
    if need <= cap:
        return cap
    cap = max(cap, MIN_GROW)
    while cap < need:
        cap *= 2
    return cap if max_bytes is None else min(cap, max_bytes)


class Pipe:
    """A pipe with a non-blocking write end, shrunk to ``size`` bytes (None: default).

    Unpacks as ``r, w``; closes what is still open on exit, each end once.
    """

    def __init__(self, size: int | None = PAGE, *, blocking_reader: bool = False) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.w, False)
        os.set_blocking(self.r, blocking_reader)
        if size is not None:
            assert fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size) == size

    def __iter__(self) -> Iterator[int]:
        return iter((self.r, self.w))

    def __enter__(self) -> Pipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_reader()
        self.close_writer()

    def close_reader(self) -> None:
        if self.r >= 0:
            os.close(self.r)
            self.r = -1

    def close_writer(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1


def read_available(fd: int) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def send_all(ring: Any, r: int, w: int) -> bytes:
    """Send everything pending, draining the (non-blocking) read end; return what came."""
    out = bytearray(read_available(r))
    for _ in range(100_000):
        if not ring.unsent_bytes:
            break
        ring.send_to(w)
        out += read_available(r)
    assert ring.unsent_bytes == 0
    return bytes(out)


def _native() -> types.ModuleType | None:
    try:
        return importlib.import_module("fanout._ring")
    except ImportError:
        return None


NATIVE_MODULE = _native()


class Collector(threading.Thread):
    """Read a blocking pipe end until EOF, keeping every byte."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.chunks: list[bytes] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 1 << 16):
                self.chunks.append(chunk)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def result(self, timeout: float = 30.0) -> bytes:
        self.join(timeout)
        assert not self.is_alive(), "reader thread did not see EOF"
        if self.error is not None:
            raise self.error
        return b"".join(self.chunks)


def wait_writable(fd: int, timeout: float = 0.05) -> None:
    select.select([], [fd], [], timeout)


# -- construction and properties -------------------------------------------------------


def test_defaults(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    assert len(ring) == 0
    assert (ring.nbytes, ring.capacity, ring.unsent_bytes) == (0, 4096, 0)
    assert (ring.max_bytes, ring.normal_bytes) == (None, 4096)
    assert (ring.last_seq, ring.acked_seq, ring.sent_seq) == (0, 0, 0)
    assert ring.peek() is None
    assert ring_impl.HEADER_SIZE == HDR


def test_options(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(initial_bytes=100, normal_bytes=50, max_bytes=1000)
    assert (ring.capacity, ring.normal_bytes, ring.max_bytes) == (100, 50, 1000)
    ring = ring_impl.FrameRing(200)
    assert (ring.capacity, ring.normal_bytes, ring.max_bytes) == (200, 200, None)
    # initial and normal sizes above the bound are cut down to it
    ring = ring_impl.FrameRing(5000, max_bytes=1000)
    assert (ring.capacity, ring.normal_bytes) == (1000, 1000)
    ring = ring_impl.FrameRing(100, 5000, 1000)
    assert (ring.capacity, ring.normal_bytes) == (100, 1000)
    ring = ring_impl.FrameRing(0, 0, 13)
    assert (ring.capacity, ring.normal_bytes, ring.max_bytes) == (0, 0, 13)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"initial_bytes": -1}, ValueError, "initial_bytes must be >= 0, got -1"),
        ({"normal_bytes": -2}, ValueError, "normal_bytes must be >= 0, got -2"),
        ({"max_bytes": -3}, ValueError, "max_bytes must be >= 0, got -3"),
        ({"initial_bytes": 1.0}, TypeError, "initial_bytes must be an int, not float (1.0)"),
        ({"initial_bytes": None}, TypeError, "initial_bytes must be an int, not NoneType (None)"),
        ({"normal_bytes": "64"}, TypeError, "normal_bytes must be an int, not str ('64')"),
        ({"max_bytes": True}, TypeError, "max_bytes must be an int, not bool (True)"),
        ({"max_bytes": 12}, ValueError, "max_bytes must exceed the 12-byte frame header, got 12"),
        ({"max_bytes": 0}, ValueError, "max_bytes must exceed the 12-byte frame header, got 0"),
    ],
)
def test_bad_constructor_arguments(ring_impl: types.ModuleType, kwargs, exc, message):
    with pytest.raises(exc) as info:
        ring_impl.FrameRing(**kwargs)
    assert str(info.value) == message


# -- append ----------------------------------------------------------------------------


def test_append_numbers_frames_from_one(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    payloads = [b"a", b"bc" * 50, b"def"]
    assert [ring.append(p) for p in payloads] == [1, 2, 3]
    assert len(ring) == 3
    assert ring.nbytes == sum(HDR + len(p) for p in payloads)
    assert ring.unsent_bytes == ring.nbytes
    assert (ring.last_seq, ring.acked_seq, ring.sent_seq) == (3, 0, 0)
    assert ring.peek() == b"a"


def test_append_accepts_bytes_like(ring_impl: types.ModuleType):
    ints = array.array("i", [1, 2, -3])
    frames = [
        b"bytes",
        bytearray(b"bytearray"),
        memoryview(b"xxmemoryviewxx")[2:-2],
        ints,
        memoryview(ints),
        memoryview(bytes(range(12))).cast("B", (3, 4)),  # 2-D, C-contiguous
    ]
    ring = ring_impl.FrameRing()
    for frame in frames:
        ring.append(frame)
    with Pipe() as (r, w):
        got, rest = parse(send_all(ring, r, w))
    assert rest == b""
    assert got == [(i + 1, memoryview(f).tobytes()) for i, f in enumerate(frames)]


def test_append_copies_the_frame(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    frame = bytearray(b"before")
    ring.append(frame)
    frame[:] = b"AFTER!"
    assert ring.peek() == b"before"
    with Pipe() as (r, w):
        assert send_all(ring, r, w) == wire(1, b"before")


@pytest.mark.parametrize("frame", [b"", bytearray(), memoryview(b"abc")[3:]])
def test_append_rejects_empty_frames(ring_impl: types.ModuleType, frame):
    ring = ring_impl.FrameRing()
    with pytest.raises(ValueError, match=r"^frame is empty; a frame must hold at least one byte$"):
        ring.append(frame)
    assert (len(ring), ring.nbytes, ring.last_seq) == (0, 0, 0)


@pytest.mark.parametrize(
    ("frame", "type_name"),
    [("text", "str"), (1, "int"), (None, "NoneType"), ([1, 2], "list"), (1.5, "float")],
)
def test_append_rejects_non_bytes(ring_impl: types.ModuleType, frame, type_name):
    ring = ring_impl.FrameRing()
    with pytest.raises(TypeError) as info:
        ring.append(frame)
    assert str(info.value) == (
        f"frame must be a bytes-like object (bytes, bytearray, memoryview), not {type_name}"
    )
    assert (len(ring), ring.nbytes, ring.last_seq) == (0, 0, 0)


def test_wire_format(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    ring.append(b"hello")
    ring.append(b"\x00" * 300)
    with Pipe() as (r, w):
        data = send_all(ring, r, w)
    assert data == (
        struct.pack("<IQ", 5, 1) + b"hello" + struct.pack("<IQ", 300, 2) + b"\x00" * 300
    )
    assert ring.sent_seq == 2


# -- growth and bounds -----------------------------------------------------------------


def test_growth_doubles_from_64(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(16)
    ring.append(b"x" * 40)  # 52 held
    assert ring.capacity == 64
    ring.append(b"x" * 40)  # 104 held
    assert ring.capacity == 128
    ring.append(b"x" * 200)  # 316 held
    assert ring.capacity == 512
    ring = ring_impl.FrameRing(0)
    assert ring.capacity == 0
    ring.append(b"x")
    assert ring.capacity == 64
    ring = ring_impl.FrameRing(100)
    ring.append(b"x" * 200)  # 212: 100 -> 200 -> 400
    assert ring.capacity == 400
    assert ring.nbytes == 212


def test_growth_is_capped_at_max_bytes(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(64, max_bytes=300)
    ring.append(b"x" * 100)
    assert ring.capacity == 128
    ring.append(b"x" * 100)
    assert ring.capacity == 256
    ring.append(b"x" * 50)  # 286 held: doubling would give 512
    assert (ring.capacity, ring.nbytes) == (300, 286)


def test_ring_full(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(64, max_bytes=300)
    for _ in range(2):
        ring.append(b"x" * 100)
    ring.append(b"x" * 50)
    with pytest.raises(RingFull) as info:
        ring.append(b"y" * 10)
    assert isinstance(info.value, FanoutError)
    assert info.value.__class__ is fanout.RingFull
    assert str(info.value) == ring_full_message(22, 286, 300)
    assert "max_bytes=300" in str(info.value) and "22 bytes" in str(info.value)
    # nothing changed, and the sequence number was not used up
    assert (len(ring), ring.nbytes, ring.last_seq) == (3, 286, 3)
    ring.append(b"z" * 2)  # 14 bytes still fit exactly
    assert (ring.nbytes, ring.last_seq, ring.capacity) == (300, 4, 300)
    with pytest.raises(RingFull):
        ring.append(b"z")


def test_frame_larger_than_max_bytes(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(max_bytes=100)
    with pytest.raises(RingFull) as info:
        ring.append(b"x" * 89)  # 101 bytes with its header
    assert str(info.value) == ring_full_message(101, 0, 100)
    assert "can never fit" in str(info.value) and "max_bytes=100" in str(info.value)
    assert (len(ring), ring.nbytes, ring.last_seq) == (0, 0, 0)
    assert ring.append(b"x" * 88) == 1  # exactly max_bytes
    assert ring.nbytes == ring.capacity == 100


def test_ring_full_clears_after_ack(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(max_bytes=200)
    ring.append(b"a" * 88)
    ring.append(b"b" * 88)
    with pytest.raises(RingFull):
        ring.append(b"c" * 88)
    with Pipe() as (r, w):
        ring.send_to(w)
        assert ring.ack(1) == 1
        assert ring.append(b"c" * 88) == 3
        assert parse(send_all(ring, r, w)) == (
            [(1, b"a" * 88), (2, b"b" * 88), (3, b"c" * 88)],
            b"",
        )
    assert ring.nbytes <= 200 and ring.capacity <= 200


# -- send_to ---------------------------------------------------------------------------


def test_send_to_with_nothing_pending(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    with Pipe() as (r, w):
        assert ring.send_to(w) == 0
        ring.append(b"abc")
        assert ring.send_to(w) == HDR + 3
        assert ring.send_to(w) == 0
        assert read_available(r) == wire(1, b"abc")


def test_send_to_full_pipe_returns_zero(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    with Pipe() as (r, w):
        os.write(w, b"\xff" * PAGE)  # fill it
        ring.append(b"abc")
        assert ring.send_to(w) == 0
        assert (ring.unsent_bytes, ring.sent_seq) == (HDR + 3, 0)
        assert os.read(r, PAGE) == b"\xff" * PAGE
        assert ring.send_to(w) == HDR + 3
        assert ring.sent_seq == 1


def test_partial_frame_writes_are_resumed(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    payloads = [payload_for(seq, 300) for seq in range(1, 21)]
    for p in payloads:
        ring.append(p)
    total = 20 * (HDR + 300)
    assert total > PAGE
    with Pipe(PAGE) as (r, w):
        first = ring.send_to(w)
        assert 0 < first < total
        assert ring.send_to(w) == 0  # pipe full
        got = read_available(r)
        assert len(got) == first
        frames, rest = parse(got)
        assert rest, "the pipe took part of a frame"  # a partial frame write happened
        n = len(frames)
        assert frames == [(i + 1, payloads[i]) for i in range(n)]
        assert ring.sent_seq == n
        assert ring.unsent_bytes == total - first
        # the partly written frame is not sent yet: it cannot be acked or dropped
        with pytest.raises(ValueError, match=f"frames are sent up to {n} only"):
            ring.ack(n + 1)
        assert ring.ack(n) == n
        assert ring.peek() == payloads[n]
        data = got + send_all(ring, r, w)
    frames, rest = parse(data)
    assert rest == b""
    assert frames == [(i + 1, p) for i, p in enumerate(payloads)]
    assert ring.sent_seq == 20
    assert ring.ack(20) == 20 - n
    assert (len(ring), ring.nbytes) == (0, 0)


def test_send_to_broken_pipe(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    ring.append(b"abc")
    with Pipe() as p:
        p.close_reader()
        with pytest.raises(BrokenPipeError) as info:
            ring.send_to(p.w)
        assert info.value.errno == errno.EPIPE
    assert (ring.unsent_bytes, ring.sent_seq, len(ring)) == (HDR + 3, 0, 1)


def test_send_to_bad_fd(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    ring.append(b"abc")
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        ring.send_to(w)
    assert info.value.errno == errno.EBADF
    assert ring.unsent_bytes == HDR + 3


def test_send_to_rejects_float_fd(ring_impl: types.ModuleType, request):
    ring = ring_impl.FrameRing()
    ring.append(b"abc")
    with Pipe() as (r, w):
        try:
            with pytest.raises(TypeError):
                ring.send_to(w + 0.5)
        finally:
            leaked = read_available(r)
        assert leaked == b""
    assert ring.unsent_bytes == HDR + 3


def test_send_to_uses_two_iovecs_when_wrapped(ring_impl: types.ModuleType):
    # Capacity 100: frames of 42 bytes; after one is acked the third straddles the end.
    ring = ring_impl.FrameRing(100)
    frames = [payload_for(seq, 30) for seq in range(1, 6)]
    with Pipe() as (r, w):
        ring.append(frames[0])
        ring.append(frames[1])
        got = send_all(ring, r, w)
        assert ring.ack(1) == 1
        ring.append(frames[2])  # bytes 84..125 of the stream: physical 84..99, 0..25
        assert ring.capacity == 100
        got += send_all(ring, r, w)
        assert ring.peek() == frames[1]
        assert ring.ack(2) == 1
        assert ring.peek() == frames[2]
        ring.append(frames[3])  # head at 84, wrapped: no growth
        assert ring.capacity == 100
        ring.append(frames[4])  # 126 bytes held while wrapped: grows, unwraps
        assert ring.capacity == 200
        assert ring.peek() == frames[2]
        got += send_all(ring, r, w)
    assert parse(got) == ([(i + 1, f) for i, f in enumerate(frames)], b"")


def test_partial_write_of_a_wrapped_frame(ring_impl: types.ModuleType):
    # A frame straddling the buffer's end, written in pieces, then resent after rewind.
    ring = ring_impl.FrameRing(8192, max_bytes=8192)
    with Pipe(PAGE) as (r, w):
        ring.append(payload_for(1, 3000))
        ring.append(payload_for(2, 3000))
        got = send_all(ring, r, w)
        ring.ack(2)  # empty: head back to 0, no shrink (normal is 8192)
        ring.append(payload_for(3, 5000))
        ring.append(payload_for(4, 2000))
        got += send_all(ring, r, w)
        ring.ack(3)  # head at 5012
        ring.append(payload_for(5, 5000))  # wraps: physical 7024..8191, 0..3843
        assert ring.capacity == 8192
        part = ring.send_to(w)  # two iovecs: 1168 bytes at the end, the rest from 0
        assert 0 < part < HDR + 5000  # the pipe takes only part of it
        assert ring.sent_seq == 4
        got += read_available(r)
        got += send_all(ring, r, w)
        assert ring.sent_seq == 5
    frames, rest = parse(got)
    assert rest == b""
    assert [seq for seq, _ in frames] == [1, 2, 3, 4, 5]
    assert all(p == payload_for(seq, len(p)) for seq, p in frames)
    assert ring.rewind() == 2
    with Pipe(PAGE) as (r, w):
        again = send_all(ring, r, w)
    assert again == wire(4, payload_for(4, 2000)) + wire(5, payload_for(5, 5000))


# -- ack -------------------------------------------------------------------------------


def test_ack(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    for seq in range(1, 6):
        ring.append(payload_for(seq, 10 * seq))
    with Pipe() as (r, w):
        send_all(ring, r, w)
    assert ring.sent_seq == 5
    assert ring.ack(0) == 0
    assert ring.ack(2) == 2
    assert (len(ring), ring.acked_seq, ring.nbytes) == (3, 2, 3 * HDR + 120)
    assert ring.peek() == payload_for(3, 30)
    assert ring.ack(2) == 0  # already acked
    assert ring.ack(1) == 0
    assert ring.ack(-7) == 0
    assert ring.acked_seq == 2
    assert ring.ack(5) == 3
    assert (len(ring), ring.nbytes, ring.acked_seq, ring.peek()) == (0, 0, 5, None)
    assert ring.unsent_bytes == 0


def test_ack_errors(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    ring.append(b"one")
    ring.append(b"two")
    with pytest.raises(ValueError) as info:
        ring.ack(3)
    assert str(info.value) == "cannot ack frame 3: the last frame appended is 2"
    with pytest.raises(ValueError) as info:
        ring.ack(1)
    assert str(info.value) == (
        "cannot ack frame 1: frames are sent up to 0 only; "
        "a reader can only finish frames it was sent"
    )
    for bad, name in [("1", "str"), (1.0, "float"), (None, "NoneType"), (True, "bool")]:
        with pytest.raises(TypeError) as info:
            ring.ack(bad)
        assert str(info.value) == f"seq must be an int, not {name}"
    with pytest.raises(ValueError, match="the last frame appended is 2"):
        ring.ack(2**70)
    assert (len(ring), ring.acked_seq) == (2, 0)


# -- rewind ----------------------------------------------------------------------------


def test_rewind_resends_unacked_frames(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    payloads = {seq: payload_for(seq, 20 + seq) for seq in range(1, 7)}
    for seq in range(1, 5):
        ring.append(payloads[seq])
    with Pipe() as (r, w):
        first, _ = parse(send_all(ring, r, w))
    assert [s for s, _ in first] == [1, 2, 3, 4]
    assert ring.ack(2) == 2
    ring.append(payloads[5])
    assert ring.rewind() == 3
    assert (ring.sent_seq, ring.acked_seq) == (2, 2)
    assert ring.unsent_bytes == ring.nbytes
    with pytest.raises(ValueError, match="frames are sent up to 2 only"):
        ring.ack(3)  # sent to the old reader only
    ring.append(payloads[6])
    with Pipe() as (r, w):  # a new reader, as after a worker crash
        second, rest = parse(send_all(ring, r, w))
    assert rest == b""
    assert second == [(seq, payloads[seq]) for seq in range(3, 7)]
    assert ring.ack(6) == 4


def test_rewind_mid_frame(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    payloads = [payload_for(seq, 1000) for seq in range(1, 11)]
    for p in payloads:
        ring.append(p)
    with Pipe(PAGE) as (r, w):
        written = ring.send_to(w)
        assert 0 < written < ring.nbytes
        done = ring.sent_seq
        assert written > done * (HDR + 1000)  # part of the next frame went too
    ring.ack(done)
    assert ring.rewind() == 10 - done
    assert ring.unsent_bytes == ring.nbytes == (10 - done) * (HDR + 1000)
    with Pipe(None) as (r, w):
        frames, rest = parse(send_all(ring, r, w))
    assert rest == b""
    assert frames == [(i + 1, payloads[i]) for i in range(done, 10)]


def test_rewind_of_empty_and_unsent_ring(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    assert ring.rewind() == 0
    ring.append(b"x")
    assert ring.rewind() == 1
    assert (ring.unsent_bytes, ring.sent_seq) == (HDR + 1, 0)


# -- drop_unsent -----------------------------------------------------------------------


def test_drop_unsent_keeps_frames_in_flight(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    sizes = {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}
    for seq, size in sizes.items():
        if seq == 3:
            with Pipe() as (r, w):
                sent = send_all(ring, r, w)
        ring.append(payload_for(seq, size))
    assert ring.sent_seq == 2
    assert ring.drop_unsent(0) == (0, 0)
    assert ring.drop_unsent(1) == (1, HDR + 30)  # only the oldest unsent frame
    assert (len(ring), ring.nbytes) == (4, 4 * HDR + 10 + 20 + 40 + 50)
    assert ring.peek() == payload_for(1, 10)
    assert ring.drop_unsent(HDR + 41) == (2, 2 * HDR + 90)  # until enough is free
    assert ring.drop_unsent(10**9) == (0, 0)  # what is left is in flight
    assert (len(ring), ring.unsent_bytes, ring.last_seq) == (2, 0, 5)
    assert ring.append(b"six") == 6  # numbering goes on
    with Pipe() as (r, w):
        sent += send_all(ring, r, w)
    assert parse(sent) == (
        [(1, payload_for(1, 10)), (2, payload_for(2, 20)), (6, b"six")],
        b"",
    )
    with pytest.raises(ValueError, match="the last frame appended is 6"):
        ring.ack(7)
    assert ring.ack(4) == 2  # 3 and 4 were dropped: only 1 and 2 are freed
    assert ring.ack(6) == 1
    assert (len(ring), ring.nbytes) == (0, 0)


def test_drop_unsent_skips_a_partly_sent_frame(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    for seq in range(1, 11):
        ring.append(payload_for(seq, 1000))
    with Pipe(PAGE) as (r, w):
        written = ring.send_to(w)
        done = ring.sent_seq
        assert done * (HDR + 1000) < written < (done + 1) * (HDR + 1000)
        dropped = ring.drop_unsent(1)
        assert dropped == (1, HDR + 1000)  # frame done + 2, not the partly sent one
        assert len(ring) == 9
        got = read_available(r) + send_all(ring, r, w)
    frames, rest = parse(got)
    assert rest == b""
    expected = [s for s in range(1, 11) if s != done + 2]
    assert [s for s, _ in frames] == expected
    assert all(p == payload_for(s, 1000) for s, p in frames)


def test_drop_unsent_everything(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(64)
    for seq in range(1, 30):
        ring.append(payload_for(seq, 50))
    cap = ring.capacity
    assert ring.drop_unsent(10**9) == (29, 29 * (HDR + 50))
    assert (len(ring), ring.nbytes, ring.unsent_bytes, ring.peek()) == (0, 0, 0, None)
    assert ring.capacity == cap
    assert ring.append(b"again") == 30
    with Pipe() as (r, w):
        assert send_all(ring, r, w) == wire(30, b"again")


def test_drop_unsent_rejects_bad_sizes(ring_impl: types.ModuleType, request):
    ring = ring_impl.FrameRing()
    ring.append(b"abc")
    with pytest.raises(ValueError) as info:
        ring.drop_unsent(-1)
    assert str(info.value) == "nbytes must be >= 0, got -1"
    with pytest.raises(TypeError) as info:
        ring.drop_unsent("1")
    assert str(info.value) == "nbytes must be an int, not str ('1')"
    with pytest.raises(TypeError):
        ring.drop_unsent(1.5)
    assert len(ring) == 1


# -- peek ------------------------------------------------------------------------------


def test_peek(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(0)
    assert ring.peek() is None
    ring.append(bytearray(b"first"))
    ring.append(b"second")
    first = ring.peek()
    assert type(first) is bytes and first == b"first"
    assert ring.peek() == b"first"  # peeking takes nothing
    with Pipe() as (r, w):
        send_all(ring, r, w)
    assert ring.peek() == b"first"  # sent but not acked
    ring.ack(1)
    assert ring.peek() == b"second"
    ring.ack(2)
    assert ring.peek() is None


# -- shrink ----------------------------------------------------------------------------


def test_capacity_shrinks_to_normal_once_all_acked(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(64)
    with Pipe(None) as (r, w):
        for seq in range(1, 41):
            ring.append(payload_for(seq, 100))
        assert ring.capacity == 8192
        send_all(ring, r, w)
        ring.ack(20)
        assert ring.capacity == 8192  # frames still held
        ring.ack(40)
        assert (ring.nbytes, ring.capacity) == (0, 64)
        # and it grows again and shrinks again
        for seq in range(41, 51):
            ring.append(payload_for(seq, 100))
        assert ring.capacity == 2048
        send_all(ring, r, w)
        ring.ack(50)
        assert ring.capacity == 64


@pytest.mark.parametrize(("initial", "normal"), [(4096, 128), (1000, 0), (0, 64), (64, 4096)])
def test_capacity_shrinks_to_normal_bytes(ring_impl: types.ModuleType, initial, normal):
    ring = ring_impl.FrameRing(initial, normal)
    assert ring.normal_bytes == normal
    with Pipe(None) as (r, w):
        for seq in range(1, 11):
            ring.append(payload_for(seq, 200))
        grown_to = ring.capacity
        send_all(ring, r, w)
        ring.ack(10)
    assert ring.capacity == min(grown_to, normal)
    ring.append(b"x")  # from capacity 0, the ring grows again
    assert ring.capacity == max(min(grown_to, normal), MIN_GROW)


# -- real pipes, threads ---------------------------------------------------------------


def test_megabytes_through_a_real_pipe(ring_impl: types.ModuleType):
    rng = random.Random(1234)
    ring = ring_impl.FrameRing(1024)
    expected = bytearray()
    largest = 0
    with Pipe(None, blocking_reader=True) as p:
        r, w = p
        reader = Collector(r)
        reader.start()
        try:
            seq = 0
            while len(expected) < 4 << 20:
                for _ in range(rng.randint(1, 60)):
                    seq += 1
                    frame = payload_for(seq, rng.randint(1, 4000))
                    assert ring.append(frame) == seq
                    expected += wire(seq, frame)
                largest = max(largest, ring.capacity)
                for _ in range(rng.randint(0, 3)):  # sometimes leave bytes pending
                    if ring.send_to(w) == 0:
                        wait_writable(w)
                    if ring.sent_seq > ring.acked_seq:
                        ring.ack(ring.sent_seq)
            while ring.unsent_bytes:
                if ring.send_to(w) == 0:
                    wait_writable(w)
            ring.ack(ring.sent_seq)
        finally:
            p.close_writer()
        data = reader.result()
    assert data == expected
    assert largest > 1024  # it grew
    assert (len(ring), ring.nbytes, ring.capacity) == (0, 0, 1024)  # and shrank back


@pytest.mark.parametrize("size", [64 * 1024, 100_000, (1 << 20) + 7])
def test_large_frames(ring_impl: types.ModuleType, size):
    rng = random.Random(size)
    frames = [rng.randbytes(size) for _ in range(3)]
    ring = ring_impl.FrameRing(0)
    with Pipe(None, blocking_reader=True) as p:
        r, w = p
        reader = Collector(r)
        reader.start()
        try:
            for seq, frame in enumerate(frames, 1):
                assert ring.append(memoryview(frame)) == seq
            assert ring.peek() == frames[0]
            while ring.unsent_bytes:
                if ring.send_to(w) == 0:
                    wait_writable(w)
            assert ring.ack(3) == 3
        finally:
            p.close_writer()
        data = reader.result()
    assert parse(data) == ([(i + 1, f) for i, f in enumerate(frames)], b"")


def test_large_frame_wraps(ring_impl: types.ModuleType):
    # Capacity 300,000: after a 150,000-byte frame is acked, a 200,000-byte one wraps.
    big = [random.Random(seq).randbytes(n) for seq, n in ((1, 150_000), (2, 200_000))]
    ring = ring_impl.FrameRing(300_000)
    with Pipe(None, blocking_reader=True) as p:
        r, w = p
        reader = Collector(r)
        reader.start()
        try:
            ring.append(big[0])
            while ring.unsent_bytes:
                if ring.send_to(w) == 0:
                    wait_writable(w)
            ring.append(b"small")  # keeps the ring from emptying (head stays put)
            ring.ack(1)
            ring.append(big[1])
            assert ring.capacity == 300_000
            assert ring.peek() == b"small"
            while ring.unsent_bytes:
                if ring.send_to(w) == 0:
                    wait_writable(w)
            ring.ack(3)
            assert ring.peek() is None
        finally:
            p.close_writer()
        data = reader.result()
    assert parse(data) == ([(1, big[0]), (2, b"small"), (3, big[1])], b"")


@pytest.mark.parametrize(
    ("count", "unit", "initial"),
    [
        (20_000, 4, 256),  # small frames: many appends racing send_to and ack
        (300, 16 * 1024, 0),  # 64..128 KiB frames: the native copy runs without the GIL
    ],
    ids=["small", "large"],
)
def test_threads_append_send_ack(ring_impl: types.ModuleType, count, unit, initial):
    """One thread appends, one sends and acks, one reads the pipe: all arrives in order.

    The pump loop avoids ``unsent_bytes``, see ``test_unsent_bytes_while_appending``.
    """
    ring = ring_impl.FrameRing(initial)
    appended = threading.Event()
    errors: list[BaseException] = []

    def frame(seq: int) -> bytes:  # 4..64 bytes, or 64..128 KiB
        block = seq.to_bytes(4, "little") * (unit // 4)
        return block * (1 + seq % 16 if unit == 4 else 4 + seq % 5)

    def produce() -> None:
        try:
            for seq in range(1, count + 1):
                ring.append(frame(seq))
        except BaseException as exc:
            errors.append(exc)
        finally:
            appended.set()

    def pump(p: Pipe) -> None:
        w = p.w
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                written = ring.send_to(w)
                sent = ring.sent_seq
                if sent > ring.acked_seq:
                    ring.ack(sent)
                if appended.is_set() and sent == ring.last_seq:
                    return
                if written == 0:
                    if sent == ring.last_seq:
                        time.sleep(0.0005)  # nothing to send yet
                    else:
                        wait_writable(w, 0.01)
            raise AssertionError("pump did not finish")
        except BaseException as exc:
            errors.append(exc)
        finally:
            p.close_writer()  # EOF for the reader

    with Pipe(None, blocking_reader=True) as p:
        reader = Collector(p.r)
        reader.start()
        producer = threading.Thread(target=produce)
        pumper = threading.Thread(target=pump, args=(p,))
        producer.start()
        pumper.start()
        producer.join(60)
        pumper.join(60)
        data = reader.result()
    assert not producer.is_alive() and not pumper.is_alive()
    assert not errors, errors
    frames, rest = parse(data)
    assert rest == b""
    assert len(frames) == count
    assert frames == [(seq, frame(seq)) for seq in range(1, count + 1)]
    assert (len(ring), ring.nbytes, ring.acked_seq, ring.capacity) == (0, 0, count, initial)


def test_unsent_bytes_while_appending(ring_impl: types.ModuleType, request):
    """Reading ``unsent_bytes`` while another thread appends large frames must not hang.

    Runs in a child process: a deadlock there cannot hang the test run.
    """
    code = textwrap.dedent(
        f"""
        import faulthandler, sys, threading, time
        from {ring_impl.__name__} import FrameRing
        faulthandler.dump_traceback_later(2, exit=True)  # a deadlock exits with 1
        ring = FrameRing(0)
        big = bytes(100 * 1024)  # >= 64 KiB: the native append copies it without the GIL
        stop = threading.Event()
        def produce():
            while not stop.is_set():
                ring.append(big)
                ring.drop_unsent(1 << 30)
        t = threading.Thread(target=produce)
        t.start()
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            ring.unsent_bytes
        stop.set()
        t.join()
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# -- the two implementations agree -----------------------------------------------------


def _filled(m: types.ModuleType, *frames: bytes, **kwargs: Any) -> Any:
    ring = m.FrameRing(**kwargs)
    for frame in frames:
        ring.append(frame)
    return ring


def _send_to_closed_reader(m: types.ModuleType) -> int:
    with Pipe() as p:
        p.close_reader()
        return _filled(m, b"abc").send_to(p.w)


def _send_to_closed_fd(m: types.ModuleType) -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return _filled(m, b"abc").send_to(w)


def _sent(m: types.ModuleType, *frames: bytes) -> Any:
    ring = _filled(m, *frames)
    with Pipe(None) as (r, w):
        send_all(ring, r, w)
    return ring


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
    "ring-full": lambda m: _filled(m, b"x" * 50, max_bytes=100).append(b"y" * 50),
    "never-fits": lambda m: m.FrameRing(max_bytes=100).append(b"x" * 200),
    "ack-str": lambda m: _filled(m, b"a").ack("1"),
    "ack-float": lambda m: _filled(m, b"a").ack(1.0),
    "ack-none": lambda m: m.FrameRing().ack(None),
    "ack-bool": lambda m: _filled(m, b"a").ack(True),
    "ack-beyond-last": lambda m: _filled(m, b"a", b"b").ack(3),
    "ack-unsent": lambda m: _filled(m, b"a", b"b").ack(1),
    "ack-huge": lambda m: _sent(m, b"a").ack(2**70),
    "ack-negative": lambda m: _sent(m, b"a").ack(-1),
    "ack-ok": lambda m: _sent(m, b"a", b"b").ack(2),
    "drop-negative": lambda m: _filled(m, b"a").drop_unsent(-1),
    "drop-str": lambda m: _filled(m, b"a").drop_unsent("1"),
    "drop-float": lambda m: _filled(m, b"a").drop_unsent(1.5),
    "drop-ok": lambda m: _filled(m, b"a", b"bb").drop_unsent(14),
    "send-str-fd": lambda m: _filled(m, b"a").send_to("0"),
    "send-str-fd-empty": lambda m: m.FrameRing().send_to("0"),
    "send-huge-fd": lambda m: _filled(m, b"a").send_to(2**40),
    "send-closed-reader": (_send_to_closed_reader, None),
    "send-closed-fd": (_send_to_closed_fd, None),
    "peek-empty": lambda m: m.FrameRing().peek(),
    "rewind-empty": lambda m: m.FrameRing().rewind(),
    "append-closed": lambda m: _closed(m).append(b"b"),
    "take-all": lambda m: _filled(m, b"a", b"bb").take_all(),
    "ack-from-no-source": lambda m: _filled(m, b"a").ack_from_source(),
}


def _closed(m: types.ModuleType) -> Any:
    ring = _filled(m, b"a")
    ring.close()
    return ring


def _outcome(call: Callable[[types.ModuleType], Any], module: types.ModuleType):
    try:
        result = call(module)
    except Exception as exc:  # compared, not swallowed
        return type(exc), str(exc)
    return "ok", repr(result)


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
def test_messages_match(case):
    if NATIVE_MODULE is None:
        pytest.skip("fanout._ring (native) is not built")
    call = FRAME_CASES[case]
    assert _outcome(call, NATIVE_MODULE) == _outcome(call, fanout._ring_py)


# -- random operation sequences against a model ----------------------------------------


class Reader:
    """One reader of one pipe: what it was sent must be a prefix of what it expects."""

    def __init__(self, expected: list[tuple[int, bytes]]) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PAGE)
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
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


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


# -- in-flight cap and ack source -----------------------------------------------------------


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w


def _send_all(ring: Any, w: int) -> int:
    """Call send_to until it takes nothing more; return the bytes taken."""
    total = 0
    while (n := ring.send_to(w)) > 0:
        total += n
    return total


def test_max_inflight_stops_at_a_frame_boundary(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(4096, max_inflight=100)
    r, w = _pipe()
    try:
        for i in range(10):
            ring.append(bytes([i]) * 30)  # 42 bytes a frame on the wire
        # The cap is reached inside the third frame, which is finished all the same.
        assert _send_all(ring, w) == 3 * (HDR + 30)
        assert ring.send_to(w) == 0 and ring.capped()
        assert ring.sent_seq == 3
        ring.ack(2)
        assert not ring.capped()
        # Frame 3 is still in flight (42 bytes): frames 4 and 5 reach past the cap.
        assert _send_all(ring, w) == 2 * (HDR + 30)
        frames, rest = parse(os.read(r, 1 << 16))
        assert [seq for seq, _ in frames] == [1, 2, 3, 4, 5] and rest == b""
    finally:
        os.close(r)
        os.close(w)


def test_a_frame_larger_than_max_inflight_still_goes(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(4096, max_inflight=64)
    r, w = _pipe()
    try:
        ring.append(b"x" * 500)
        ring.append(b"y")
        assert _send_all(ring, w) == HDR + 500  # alone, whole
        assert ring.capped()
        ring.ack(1)
        assert _send_all(ring, w) == HDR + 1
        frames, _ = parse(os.read(r, 1 << 16))
        assert [seq for seq, _ in frames] == [1, 2]
    finally:
        os.close(r)
        os.close(w)


def test_bad_max_inflight(ring_impl: types.ModuleType):
    with pytest.raises(ValueError, match="max_inflight must be > 0"):
        ring_impl.FrameRing(max_inflight=0)
    with pytest.raises(TypeError, match="max_inflight must be an int"):
        ring_impl.FrameRing(max_inflight=1.5)
    assert ring_impl.FrameRing(max_inflight=10).max_inflight == 10
    assert ring_impl.FrameRing().max_inflight is None


def test_ack_source_frees_what_the_reader_finished(ring_impl: types.ModuleType):
    import numpy as np

    words = np.zeros(4, dtype=np.uint64)
    ring = ring_impl.FrameRing(4096)
    ring.set_ack_source(words, 2)
    r, w = _pipe()
    try:
        for i in range(5):
            ring.append(b"f%d" % i)
        ring.send_to(w)
        words[2] = 3  # the reader finished frames 1..3
        ring.append(b"more")
        ring.send_to(w)  # acks from the source before sending
        assert ring.acked_seq == 3 and len(ring) == 3 and ring.first_seq == 4
        words[2] = 10**9  # garbage: beyond anything appended, frees nothing
        ring.append(b"again")
        ring.send_to(w)
        assert ring.acked_seq == 3
        ring.set_ack_source(None)
        words[2] = 6
        ring.append(b"last")
        ring.send_to(w)
        assert ring.acked_seq == 3  # no source any more
    finally:
        os.close(r)
        os.close(w)


def test_bad_ack_source(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    with pytest.raises(TypeError, match="ack source must be a buffer of uint64 words"):
        ring.set_ack_source("words")
    with pytest.raises(ValueError, match="ack source index must be in range"):
        ring.set_ack_source(bytearray(16), 2)


def test_first_seq(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing()
    assert ring.first_seq == 0
    ring.append(b"a")
    ring.append(b"b")
    assert ring.first_seq == 1
    ring.drop_unsent(1)
    assert ring.first_seq == 2


# -- closing, taking everything back, acking from the source ---------------------------


def test_close_refuses_appends_and_keeps_frames(ring_impl: types.ModuleType):
    ring = _filled(ring_impl, b"a", b"bb")
    assert not ring.closed
    ring.close()
    assert ring.closed
    with pytest.raises(RingClosed, match="ring closed"):
        ring.append(b"c")
    assert len(ring) == 2 and ring.last_seq == 2
    ring.close()  # idempotent
    assert ring.take_all() == [b"a", b"bb"]


def test_append_all_skips_closed_rings(ring_impl: types.ModuleType):
    rings = [ring_impl.FrameRing() for _ in range(3)]
    rings[1].close()
    assert ring_impl.append_all(rings, b"x") == 2
    assert [len(r) for r in rings] == [1, 0, 1]
    for r in rings:
        r.close()
    assert ring_impl.append_all(rings, b"y") == 0


def test_take_all_returns_sent_and_unsent_frames(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(64, 64)
    frames = [payload_for(i, 10 + 7 * i) for i in range(1, 30)]  # grows past 64
    with Pipe(None) as (r, w):
        for frame in frames[:10]:
            ring.append(frame)
        send_all(ring, r, w)
        ring.ack(4)
        for frame in frames[10:]:
            ring.append(frame)
        assert ring.take_all() == frames[4:]
    assert len(ring) == 0 and ring.nbytes == 0
    assert ring.acked_seq == ring.last_seq == ring.sent_seq == 29
    assert ring.capacity == 64  # shrunk back to normal
    assert ring.take_all() == []
    assert ring.append(b"next") == 30  # numbering goes on


def test_ack_from_source(ring_impl: types.ModuleType):
    import numpy as np

    words = np.zeros(1, dtype=np.uint64)
    ring = ring_impl.FrameRing()
    assert ring.ack_from_source() == 0  # no source
    ring.set_ack_source(words)
    with Pipe(None) as (r, w):
        for i in range(4):
            ring.append(b"f%d" % i)
        send_all(ring, r, w)
        ring.append(b"unsent")
        words[0] = 2
        assert ring.ack_from_source() == 2 and ring.acked_seq == 2
        words[0] = 5  # appended but not sent: acks only what was sent
        assert ring.ack_from_source() == 2 and ring.acked_seq == 4
        words[0] = 99  # beyond the last frame appended: garbage, frees nothing
        assert ring.ack_from_source() == 0 and ring.acked_seq == 4


class _HostileInt(int):
    """An int whose comparisons raise: must never run while a ring holds its mutex."""

    def __gt__(self, other):
        raise RuntimeError("hostile comparison")

    __lt__ = __ge__ = __le__ = __eq__ = __gt__
    __hash__ = int.__hash__


def test_ack_runs_no_python_code_under_the_ring_lock(ring_impl: types.ModuleType):
    ring = _sent(ring_impl, b"a", b"b")
    try:
        ring.ack(_HostileInt(1))
    except RuntimeError:
        pass  # raising is fine; leaving the ring locked is not
    assert ring.ack(2) in (1, 2)  # would hang if the mutex were left locked
    assert ring.acked_seq == 2


def test_peek_after_wrap(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(64, 64)
    with Pipe(None) as (r, w):
        ring.append(b"x" * 30)
        send_all(ring, r, w)
        ring.append(b"y" * 20)
        ring.ack(1)
        ring.append(b"z" * 25)  # wraps around the end of the buffer
        assert ring.peek() == b"y" * 20
