"""FrameRing sending through real pipes: send_to (full pipes, partial frames, a frame
wrapped around the buffer's end, errors), the in-flight cap, rewind after a reader is
lost, and drop_unsent, which may only withdraw what no reader got.

Every test takes ``ring_impl`` (tests/conftest.py): native ring and pure-Python twin.
"""

from __future__ import annotations

import errno
import os
import types
from typing import Any

import pytest
from frames import (
    HDR,
    PAGE,
    Pipe,
    parse,
    payload_for,
    read_available,
    send_all,
    wire,
)

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


# -- in-flight cap ---------------------------------------------------------------------


def send_until_refused(ring: Any, w: int) -> int:
    """Call send_to until it takes nothing more; return the bytes taken."""
    total = 0
    while (n := ring.send_to(w)) > 0:
        total += n
    return total


def test_max_inflight_stops_at_a_frame_boundary(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(4096, max_inflight=100)
    with Pipe(None) as (r, w):
        for i in range(10):
            ring.append(bytes([i]) * 30)  # 42 bytes a frame on the wire
        # The cap is reached inside the third frame, which is finished all the same.
        assert send_until_refused(ring, w) == 3 * (HDR + 30)
        assert ring.send_to(w) == 0 and ring.capped()
        assert ring.sent_seq == 3
        ring.ack(2)
        assert not ring.capped()
        # Frame 3 is still in flight (42 bytes): frames 4 and 5 reach past the cap.
        assert send_until_refused(ring, w) == 2 * (HDR + 30)
        frames, rest = parse(os.read(r, 1 << 16))
        assert [seq for seq, _ in frames] == [1, 2, 3, 4, 5] and rest == b""


def test_a_frame_larger_than_max_inflight_still_goes(ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(4096, max_inflight=64)
    with Pipe(None) as (r, w):
        ring.append(b"x" * 500)
        ring.append(b"y")
        assert send_until_refused(ring, w) == HDR + 500  # alone, whole
        assert ring.capped()
        ring.ack(1)
        assert send_until_refused(ring, w) == HDR + 1
        frames, _ = parse(os.read(r, 1 << 16))
        assert [seq for seq, _ in frames] == [1, 2]


def test_bad_max_inflight(ring_impl: types.ModuleType):
    with pytest.raises(ValueError, match="max_inflight must be > 0"):
        ring_impl.FrameRing(max_inflight=0)
    with pytest.raises(TypeError, match="max_inflight must be an int"):
        ring_impl.FrameRing(max_inflight=1.5)
    assert ring_impl.FrameRing(max_inflight=10).max_inflight == 10
    assert ring_impl.FrameRing().max_inflight is None


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
