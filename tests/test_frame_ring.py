"""FrameRing, one call at a time: construction, append, growth and its bound, ack
(from the caller and from an ack source), peek, shrinking back, close and take_all.

Every test takes ``ring_impl`` (tests/conftest.py), so the native ring and its
pure-Python twin pass the same tests. Sending and resending are in
test_frame_ring_send.py, threads and large volumes in test_frame_ring_stress.py, a
random-sequence model in test_frame_ring_model.py, and the table comparing the two
implementations' results and messages in test_frame_ring_twins.py.
"""

from __future__ import annotations

import array
import struct
import types

import pytest
from frames import (
    HDR,
    MIN_GROW,
    Pipe,
    filled,
    parse,
    payload_for,
    send_all,
    sent,
    wire,
)

import fanout
from fanout.errors import FanoutError, RingClosed, RingFull, ring_full_message

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


@pytest.mark.parametrize("layout", ["from the start", "past acked frames", "wrapped"])
@pytest.mark.parametrize("size", [40, 1 << 20])
def test_growth_keeps_every_frame_in_order(ring_impl: types.ModuleType, layout, size):
    # Growth moves the buffer in place when the frames do not wrap around its end
    # (large buffers: remapped, not copied) and into a new buffer when they do.
    frame = size + HDR
    ring = ring_impl.FrameRing(4 * frame, 4 * frame)
    with Pipe(None) as (r, w):
        if layout != "from the start":  # frame 3 stays held, 2 frames past the start
            for seq in (1, 2, 3):
                ring.append(payload_for(seq, size))
            assert len(parse(send_all(ring, r, w))[0]) == 3
            ring.ack(2)
        # The frames that fill the buffer, then one that does not fit: held from the
        # start; held from past its start, up to before its end; wrapped around it.
        sizes = {
            "from the start": [size] * 4 + [size],
            "past acked frames": [3 * frame],
            "wrapped": [size] * 3 + [size],
        }[layout]
        first = ring.last_seq + 1
        for seq, n in enumerate(sizes[:-1], first):
            ring.append(payload_for(seq, n))
        assert ring.capacity == 4 * frame  # no growth yet
        ring.append(payload_for(first + len(sizes) - 1, sizes[-1]))
        assert ring.capacity > 4 * frame
        frames, rest = parse(send_all(ring, r, w))
        want = [(seq, payload_for(seq, n)) for seq, n in enumerate(sizes, first)]
        assert (frames, rest) == (want, b"")  # what was not sent yet
        held = [payload_for(3, size)] if layout != "from the start" else []
        assert ring.take_all() == held + [p for _, p in want]  # and what was sent


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


def test_ack_source_frees_what_the_reader_finished(ring_impl: types.ModuleType):
    import numpy as np

    words = np.zeros(4, dtype=np.uint64)
    ring = ring_impl.FrameRing(4096)
    ring.set_ack_source(words, 2)
    with Pipe(None) as (_, w):
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


class _HostileInt(int):
    """An int whose comparisons raise: must never run while a ring holds its mutex."""

    def __gt__(self, other):
        raise RuntimeError("hostile comparison")

    __lt__ = __ge__ = __le__ = __eq__ = __gt__
    __hash__ = int.__hash__


def test_ack_runs_no_python_code_under_the_ring_lock(ring_impl: types.ModuleType):
    ring = sent(ring_impl, b"a", b"b")
    try:
        ring.ack(_HostileInt(1))
    except RuntimeError:
        pass  # raising is fine; leaving the ring locked is not
    assert ring.ack(2) in (1, 2)  # would hang if the mutex were left locked
    assert ring.acked_seq == 2


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


def test_peek_after_wrap(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(64, 64)
    with Pipe(None) as (r, w):
        ring.append(b"x" * 30)
        send_all(ring, r, w)
        ring.append(b"y" * 20)
        ring.ack(1)
        ring.append(b"z" * 25)  # wraps around the end of the buffer
        assert ring.peek() == b"y" * 20


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


# -- closing and taking everything back ------------------------------------------------


def test_close_refuses_appends_and_keeps_frames(ring_impl: types.ModuleType):
    ring = filled(ring_impl, b"a", b"bb")
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
