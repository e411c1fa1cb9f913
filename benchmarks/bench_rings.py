"""Ring and FrameRing against the baselines they compete with.

* ``Ring.write_one`` + ``read_one`` vs ``collections.deque.append`` + ``popleft``,
  ``PAIRS`` operation pairs per round.
* ``FrameRing.append`` + ``send_to`` of 200-byte frames into a pipe drained by a
  reader process, vs one ``os.write`` per frame into the same kind of pipe,
  ``FRAMES`` frames per round.

Run ``pytest benchmarks/ --benchmark-only``; ``python benchmarks/ratios.py`` prints
the ratios from the same workloads without pytest.
"""

from __future__ import annotations

import collections
import os
import select
import struct
import subprocess
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

PAIRS = 1000  # write/read pairs per round
FRAME_SIZE = 200  # payload bytes
SEND_EVERY = 64  # appends between two send_to calls, as a pump batches them
FRAMES = 10_240  # frames per round (a multiple of every batch size measured)
PIPE_SIZE = 1 << 20  # fanout raises its pipes to this (F_SETPIPE_SZ)
HEADER = struct.Struct("<IQ")

ITEMS = list(range(PAIRS))
PAYLOAD = bytes(range(256))[:FRAME_SIZE]
WIRE_FRAME = HEADER.pack(FRAME_SIZE, 1) + PAYLOAD  # what one os.write sends per frame

# The reader: another process, so it does not compete for the writer's GIL.
DRAIN = "import os\nwhile os.read(0, 1 << 20):\n    pass\n"


# -- workloads (shared with ratios.py) -------------------------------------------------


def ring_pairs(ring: Any, items: list[int] = ITEMS) -> None:
    write, read = ring.write_one, ring.read_one
    for x in items:
        write(x)
        read()


def deque_pairs(queue: collections.deque, items: list[int] = ITEMS) -> None:
    append, popleft = queue.append, queue.popleft
    for x in items:
        append(x)
        popleft()


def frame_ring_round(
    ring: Any, fd: int, payload: bytes = PAYLOAD, send_every: int = SEND_EVERY
) -> None:
    """Append ``FRAMES`` frames, sending every ``send_every``; then flush and ack."""
    append, send_to, ack = ring.append, ring.send_to, ring.ack
    for _ in range(FRAMES // send_every):
        for _ in range(send_every):
            append(payload)
        send_to(fd)
        ack(ring.sent_seq)  # the reader keeps up: what was sent is done
    while ring.unsent_bytes:
        if send_to(fd) == 0:
            select.select([], [fd], [], 1.0)
    ack(ring.sent_seq)


def os_write_round(fd: int, frame: bytes = WIRE_FRAME) -> None:
    """One ``os.write`` per frame into a blocking pipe."""
    write = os.write
    for _ in range(FRAMES):
        write(fd, frame)


@contextmanager
def drained_pipe(*, blocking: bool) -> Iterator[int]:
    """Yield the write end of a pipe that a child process reads until EOF."""
    r, w = os.pipe()
    try:
        os.set_blocking(w, blocking)
        try:
            import fcntl

            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (ImportError, AttributeError, OSError):  # not Linux, or over pipe-max-size
            pass
        proc = subprocess.Popen([sys.executable, "-c", DRAIN], stdin=r)
    finally:
        os.close(r)
    try:
        yield w
    finally:
        os.close(w)  # EOF: the reader exits
        proc.wait(timeout=30)


# -- pytest-benchmark --------------------------------------------------------------------


@pytest.mark.benchmark(group=f"ring: {PAIRS} write+read pairs")
def test_ring_write_read(benchmark, ring_impl: types.ModuleType):
    ring = ring_impl.Ring(16)
    benchmark(ring_pairs, ring)
    assert len(ring) == 0
    benchmark.extra_info["pairs_per_round"] = PAIRS


@pytest.mark.benchmark(group=f"ring: {PAIRS} write+read pairs")
def test_deque_append_popleft(benchmark):
    queue: collections.deque[int] = collections.deque()
    benchmark(deque_pairs, queue)
    assert not queue
    benchmark.extra_info["pairs_per_round"] = PAIRS


@pytest.mark.benchmark(group=f"frames: {FRAMES} x {FRAME_SIZE} B into a pipe")
def test_frame_ring_append_send(benchmark, ring_impl: types.ModuleType):
    ring = ring_impl.FrameRing(1 << 16)
    with drained_pipe(blocking=False) as fd:
        benchmark(frame_ring_round, ring, fd)
    assert (len(ring), ring.last_seq % FRAMES) == (0, 0)
    benchmark.extra_info["frames_per_round"] = FRAMES
    benchmark.extra_info["frames_per_s"] = round(FRAMES / benchmark.stats.stats.min)


@pytest.mark.benchmark(group=f"frames: {FRAMES} x {FRAME_SIZE} B into a pipe")
def test_os_write_per_frame(benchmark):
    with drained_pipe(blocking=True) as fd:
        benchmark(os_write_round, fd)
    benchmark.extra_info["frames_per_round"] = FRAMES
    benchmark.extra_info["frames_per_s"] = round(FRAMES / benchmark.stats.stats.min)
