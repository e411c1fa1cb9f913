"""Frames on the wire and the pipes they travel through, for the ring, pump and loop tests.

The wire format is written out here on its own (``<IQ``: payload length, sequence
number, then the payload) rather than imported from fanout, so the tests catch a
change to it instead of following one.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import struct
import threading
from collections.abc import Iterator
from typing import Any

HEADER = struct.Struct("<IQ")
HDR = HEADER.size
PAGE = mmap.PAGESIZE  # the smallest pipe capacity F_SETPIPE_SZ grants: one page
MIN_GROW = 64  # a FrameRing that must grow from below this goes straight to it


def wire(seq: int, payload: bytes) -> bytes:
    """Frame ``payload`` as a ring sends it."""
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
    """Read a non-blocking fd until it has nothing more (or is at EOF)."""
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def read_exactly(fd: int, n: int) -> bytes:
    """Read ``n`` bytes from a blocking fd (fewer only at EOF)."""
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


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


def filled(ring_mod: Any, *frames: bytes, **kwargs: Any) -> Any:
    """A new ``ring_mod.FrameRing(**kwargs)`` holding ``frames``, none sent."""
    ring = ring_mod.FrameRing(**kwargs)
    for frame in frames:
        ring.append(frame)
    return ring


def sent(ring_mod: Any, *frames: bytes) -> Any:
    """A new ``ring_mod.FrameRing`` holding ``frames``, all sent (to a pipe now closed)."""
    ring = filled(ring_mod, *frames)
    with Pipe(None) as (r, w):
        send_all(ring, r, w)
    return ring


class PipeReader(threading.Thread):
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
    """Wait (at most ``timeout``) until ``fd`` can take bytes again."""
    select.select([], [fd], [], timeout)
