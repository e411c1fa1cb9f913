"""FrameRing under volume and concurrency: megabytes through a real pipe read by a
thread, frames larger than a pipe, one thread appending while another sends and acks,
and reading a counter while another thread appends (a deadlock check in a child).

Every test takes ``ring_impl`` (tests/conftest.py): native ring and pure-Python twin.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
import types
from typing import Any

import pytest
from frames import (
    Pipe,
    PipeReader,
    parse,
    payload_for,
    wait_writable,
    wire,
)


class DrainedPipe:
    """A default-size pipe whose read end a ``PipeReader`` thread empties until EOF."""

    def __init__(self) -> None:
        self.pipe = Pipe(None, blocking_reader=True)
        self.w = self.pipe.w
        self.reader = PipeReader(self.pipe.r)
        self.reader.start()

    def __enter__(self) -> DrainedPipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pipe.close_writer()  # EOF: the reader thread ends
        self.reader.join(30)
        self.pipe.close_reader()

    def received(self) -> bytes:
        """Close the write end and return everything the reader got."""
        self.pipe.close_writer()
        return self.reader.result()


def send_everything(ring: Any, w: int) -> None:
    """Send what ``ring`` holds unsent, waiting whenever the pipe is full."""
    while ring.unsent_bytes:
        if ring.send_to(w) == 0:
            wait_writable(w)


def test_megabytes_through_a_real_pipe(ring_impl: types.ModuleType):
    rng = random.Random(1234)
    ring = ring_impl.FrameRing(1024)
    expected = bytearray()
    largest = 0
    with DrainedPipe() as pipe:
        w = pipe.w
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
        send_everything(ring, w)
        ring.ack(ring.sent_seq)
        data = pipe.received()
    assert data == expected
    assert largest > 1024  # it grew
    assert (len(ring), ring.nbytes, ring.capacity) == (0, 0, 1024)  # and shrank back


@pytest.mark.parametrize("size", [64 * 1024, 100_000, (1 << 20) + 7])
def test_large_frames(ring_impl: types.ModuleType, size):
    rng = random.Random(size)
    frames = [rng.randbytes(size) for _ in range(3)]
    ring = ring_impl.FrameRing(0)
    with DrainedPipe() as pipe:
        for seq, frame in enumerate(frames, 1):
            assert ring.append(memoryview(frame)) == seq
        assert ring.peek() == frames[0]
        send_everything(ring, pipe.w)
        assert ring.ack(3) == 3
        data = pipe.received()
    assert parse(data) == ([(i + 1, f) for i, f in enumerate(frames)], b"")


def test_large_frame_wraps(ring_impl: types.ModuleType):
    # Capacity 300,000: after a 150,000-byte frame is acked, a 200,000-byte one wraps.
    big = [random.Random(seq).randbytes(n) for seq, n in ((1, 150_000), (2, 200_000))]
    ring = ring_impl.FrameRing(300_000)
    with DrainedPipe() as pipe:
        ring.append(big[0])
        send_everything(ring, pipe.w)
        ring.append(b"small")  # keeps the ring from emptying (head stays put)
        ring.ack(1)
        ring.append(big[1])
        assert ring.capacity == 300_000
        assert ring.peek() == b"small"
        send_everything(ring, pipe.w)
        ring.ack(3)
        assert ring.peek() is None
        data = pipe.received()
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

    def pump(pipe: DrainedPipe) -> None:
        w = pipe.w
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
            pipe.pipe.close_writer()  # EOF for the reader

    with DrainedPipe() as pipe:
        producer = threading.Thread(target=produce)
        pumper = threading.Thread(target=pump, args=(pipe,))
        producer.start()
        pumper.start()
        producer.join(60)
        pumper.join(60)
        data = pipe.received()
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
