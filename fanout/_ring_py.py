"""Pure-Python rings: the reference twin of the native ``fanout._ring``.

Both modules have the same API, raise the same exceptions with the same messages
and pass the same tests; ``FANOUT_NO_EXTENSIONS=1`` makes fanout use this one.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from fanout._ring_common import (
    HEADER,
    HEADER_SIZE,
    MIN_FRAME_CAPACITY,
    RING_CLOSED_MESSAGE,
    RING_GROW_FROM_ZERO,
    check_ack,
    check_fd,
    check_size,
    check_words,
    frame_length,
)
from fanout.errors import RingClosed, RingFull, ring_full_message

__all__ = ["HEADER_SIZE", "NATIVE", "FrameRing", "Ring", "append_all"]

NATIVE = False


class Ring:
    """A growable FIFO ring of Python objects (k8s.io/utils ``buffer.Ring``).

    Options:
        initial_size: slots to start with (0 allowed: the first write makes 16).
        normal_size: when set, a ``read_one`` that leaves the ring empty shrinks the
            capacity back to it if larger; ``None`` never shrinks (``RingGrowing``).

    Not thread-safe: callers serialise access (fanout's thread listener holds a
    lock around every call).
    """

    __slots__ = ("_beg", "_data", "_n", "_normal", "_readable")

    def __init__(self, initial_size: int = 0, normal_size: int | None = None) -> None:
        n = check_size("initial_size", initial_size)
        self._normal = check_size("normal_size", normal_size, allow_none=True)
        assert n is not None
        self._data: list[Any] = [None] * n
        self._n = n
        self._beg = 0
        self._readable = 0

    def write_one(self, item: Any) -> None:
        """Append ``item``, doubling the capacity when full."""
        if self._readable == self._n:
            self._resize(self._n * 2 if self._n else RING_GROW_FROM_ZERO)
        self._data[(self._beg + self._readable) % self._n] = item
        self._readable += 1

    def read_one(self) -> tuple[Any, bool]:
        """Remove and return ``(item, True)``, or ``(None, False)`` when empty."""
        if self._readable == 0:
            return None, False
        beg = self._beg
        item = self._data[beg]
        self._data[beg] = None  # keep no reference to what was read
        self._readable -= 1
        self._beg = 0 if beg == self._n - 1 else beg + 1
        if self._readable == 0 and self._normal is not None and self._n > self._normal:
            self._data = [None] * self._normal
            self._n = self._normal
            self._beg = 0
        return item, True

    def _resize(self, n: int) -> None:
        old, beg, count = self._data, self._beg, self._readable
        self._data = [old[(beg + i) % self._n] for i in range(count)] + [None] * (n - count)
        self._n = n
        self._beg = 0

    def __len__(self) -> int:
        return self._readable

    @property
    def capacity(self) -> int:
        """Number of slots allocated."""
        return self._n


class FrameRing:
    """A growable byte ring of length-delimited frames with three cursors.

    ``acked <= sent <= written``: frames before ``acked`` are freed; frames between
    ``acked`` and ``sent`` are in flight and stay until acked, so ``rewind()`` can
    send them again; frames after ``sent`` wait for ``send_to``.

    Each frame travels as a 12-byte header (payload length u32, sequence number
    u64, little endian) and the payload. Sequence numbers start at 1.

    Options:
        initial_bytes: capacity to start with (grows by doubling, from 64 if 0).
        normal_bytes: capacity to shrink back to once every frame is acked
            (default: ``initial_bytes``).
        max_bytes: bound on the bytes held (headers included); ``append`` past it
            raises ``RingFull``. ``None``: unbounded.

    Thread safety: every method takes the ring's lock, so one producer thread
    appending while one pump thread sends and another thread acks is safe.
    """

    __slots__ = (
        "_ack_index",
        "_ack_view",
        "_acked_seq",
        "_boundary",
        "_buf",
        "_cap",
        "_closed",
        "_frames",
        "_head",
        "_inflight",
        "_lock",
        "_max",
        "_next_seq",
        "_normal",
        "_sending",
        "_sent",
        "_sent_seq",
        "_used",
    )

    def __init__(
        self,
        initial_bytes: int = 4096,
        normal_bytes: int | None = None,
        max_bytes: int | None = None,
        max_inflight: int | None = None,
    ) -> None:
        cap = check_size("initial_bytes", initial_bytes)
        inflight = check_size("max_inflight", max_inflight, allow_none=True)
        if inflight == 0:
            raise ValueError("max_inflight must be > 0 bytes, or None for no cap")
        normal = check_size("normal_bytes", normal_bytes, allow_none=True)
        bound = check_size("max_bytes", max_bytes, allow_none=True)
        assert cap is not None
        if bound is not None and bound <= HEADER_SIZE:
            raise ValueError(
                f"max_bytes must exceed the {HEADER_SIZE}-byte frame header, got {bound}"
            )
        if bound is not None and cap > bound:
            cap = bound
        self._cap = cap
        self._normal = cap if normal is None else normal
        if bound is not None and self._normal > bound:
            self._normal = bound
        self._max = bound
        self._buf = bytearray(cap)
        self._head = 0  # physical index of the first byte held
        self._used = 0  # bytes held, from _head
        self._sent = 0  # bytes of those already written to the reader
        self._boundary = 0  # offset of the first frame not completely sent
        self._frames = 0
        self._next_seq = 1
        self._acked_seq = 0
        self._sent_seq = 0  # last frame completely sent
        self._inflight = inflight or 0  # 0: no cap on bytes sent but not acked
        self._sending = False  # a writev runs without the lock (see send_to)
        self._ack_view: memoryview | None = None
        self._ack_index = 0
        self._closed = False
        self._lock = threading.Lock()

    # -- byte helpers (lock held) -------------------------------------------------

    def _copy_in(self, off: int, data: bytes | memoryview) -> None:
        cap = self._cap
        start = (self._head + off) % cap
        n = len(data)
        first = min(n, cap - start)
        self._buf[start : start + first] = data[:first]
        if first < n:
            self._buf[: n - first] = data[first:]

    def _copy_out(self, off: int, n: int) -> bytes:
        cap = self._cap
        start = (self._head + off) % cap
        first = min(n, cap - start)
        out = bytes(self._buf[start : start + first])
        if first < n:
            out += bytes(self._buf[: n - first])
        return out

    def _header(self, off: int) -> tuple[int, int]:
        length, seq = HEADER.unpack(self._copy_out(off, HEADER_SIZE))
        return length, seq

    def _relocate(self, cap: int) -> None:
        """Move the bytes held to a new buffer of ``cap`` bytes, starting at 0."""
        held = self._copy_out(0, self._used) if self._used else b""
        self._buf = bytearray(cap)
        self._buf[: len(held)] = held
        self._cap = cap
        self._head = 0

    # -- API ----------------------------------------------------------------------

    def append(self, frame: Any) -> int:
        """Copy ``frame`` in as the next frame and return its sequence number."""
        n = frame_length(frame) + HEADER_SIZE
        with self._lock:
            if self._closed:
                raise RingClosed(RING_CLOSED_MESSAGE)
            if self._max is not None and self._used + n > self._max:
                raise RingFull(ring_full_message(n, self._used, self._max))
            if self._used + n > self._cap:
                cap = max(self._cap, MIN_FRAME_CAPACITY)
                while cap < self._used + n:
                    cap *= 2
                if self._max is not None:
                    cap = min(cap, self._max)
                self._relocate(cap)
            seq = self._next_seq
            self._copy_in(self._used, HEADER.pack(n - HEADER_SIZE, seq))
            self._copy_in(self._used + HEADER_SIZE, memoryview(frame).cast("B"))
            self._used += n
            self._frames += 1
            self._next_seq = seq + 1
            return seq

    def send_to(self, fd: int) -> int:
        """Write pending bytes to non-blocking ``fd``; return how many were taken."""
        fd = check_fd(fd)
        with self._lock:
            self._ack_from_source()
            todo = self._used - self._sent
            if self._inflight and todo:
                # Bytes in flight (sent, not acked) stay below the cap, so frames
                # that wait can still be dropped by an overflow policy; but a frame
                # begun is always finished (a reader can only finish whole frames).
                if self._sent < self._inflight:
                    room = self._inflight - self._sent  # may stop mid-frame: finished next
                elif self._sent > self._boundary:  # finish the frame begun, nothing more
                    room = self._boundary + HEADER_SIZE + self._header(self._boundary)[0]
                    room -= self._sent
                else:
                    room = 0
                todo = min(todo, room)
            if todo == 0:
                return 0
            cap = self._cap
            start = (self._head + self._sent) % cap
            first = min(todo, cap - start)
            view = memoryview(self._buf)
            parts = [view[start : start + first]]
            if first < todo:
                parts.append(view[: todo - first])
            # The writev runs without the lock, so appends do not wait for it:
            # they only add bytes past _used, and a growth makes a new buffer
            # (our views keep the old one alive); acks shift offsets that
            # _advance_sent then adds to.
            self._sending = True
        written = 0
        try:
            written = os.writev(fd, parts)
        except BlockingIOError:
            written = 0
        finally:
            for part in parts:
                part.release()
            view.release()
            with self._lock:
                self._sending = False
                if written > 0:
                    self._advance_sent(written)
        return written

    def _wait_not_sending(self) -> None:
        """Lock held: wait out a running writev before moving bytes it may read."""
        while self._sending:
            self._lock.release()
            time.sleep(0)
            self._lock.acquire()

    def _advance_sent(self, written: int) -> None:
        self._sent += written
        while self._boundary < self._sent:
            length, seq = self._header(self._boundary)
            end = self._boundary + HEADER_SIZE + length
            if end > self._sent:
                break
            self._boundary = end
            self._sent_seq = seq

    def ack(self, seq: int) -> int:
        """Free every frame up to and including ``seq``; return how many were freed."""
        with self._lock:
            check_ack(seq, self._next_seq - 1, self._sent_seq)
            return self._ack_to(seq)

    def _ack_from_source(self) -> int:
        """Lock held: free what the ack source says the reader finished."""
        if self._ack_view is None:
            return 0
        done = self._ack_view[self._ack_index]
        # A reader cannot finish a frame never appended: such a word is garbage
        # (the supervisor restarts that reader), so it frees nothing.
        if self._acked_seq < done < self._next_seq:
            return self._ack_to(min(done, self._sent_seq))
        return 0

    def ack_from_source(self) -> int:
        """Free the frames the ack source says the reader finished; return how many."""
        with self._lock:
            return self._ack_from_source()

    def close(self) -> None:
        """Refuse further appends (they raise ``RingClosed``); frames held stay."""
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def take_all(self) -> list[bytes]:
        """Remove every frame held, sent or not, and return their payloads, oldest first.

        The ring counts them as acked (``acked_seq == last_seq`` afterwards).
        """
        with self._lock:
            self._wait_not_sending()
            held = self._copy_out(0, self._used) if self._used else b""
            self._head = self._used = self._sent = self._boundary = self._frames = 0
            self._acked_seq = self._sent_seq = self._next_seq - 1
            if self._cap > self._normal:
                self._buf = bytearray(self._normal)
                self._cap = self._normal
        out = []
        pos = 0
        while pos < len(held):
            length, _ = HEADER.unpack_from(held, pos)
            out.append(held[pos + HEADER_SIZE : pos + HEADER_SIZE + length])
            pos += HEADER_SIZE + length
        return out

    def _ack_to(self, seq: int) -> int:
        """Free frames with seq <= ``seq`` among those completely sent; lock held."""
        if seq <= self._acked_seq:
            return 0
        freed_bytes = freed = 0
        while freed_bytes < self._boundary:
            length, frame_seq = self._header(freed_bytes)
            if frame_seq > seq:
                break
            freed_bytes += HEADER_SIZE + length
            freed += 1
        self._head = (self._head + freed_bytes) % self._cap if self._cap else 0
        self._used -= freed_bytes
        self._sent -= freed_bytes
        self._boundary -= freed_bytes
        self._frames -= freed
        self._acked_seq = seq
        if self._used == 0:
            self._head = 0
            if self._cap > self._normal:
                self._buf = bytearray(self._normal)
                self._cap = self._normal
        return freed

    def set_ack_source(self, words: Any, index: int = 0) -> None:
        """Let ``send_to`` ack up to ``words[index]`` (a uint64 buffer the reader updates).

        ``None`` removes the source. The ring keeps a view of ``words`` until then.
        """
        view = None if words is None else check_words(words, index)
        with self._lock:
            self._ack_view, self._ack_index = view, index

    def capped(self) -> bool:
        """Tell whether bytes wait but the in-flight cap holds them back."""
        with self._lock:
            return (
                bool(self._inflight)
                and self._used > self._sent == self._boundary
                and self._sent >= self._inflight
            )

    def rewind(self) -> int:
        """Make the next ``send_to`` start again at the first frame not acked."""
        with self._lock:
            self._wait_not_sending()
            self._sent = 0
            self._boundary = 0
            self._sent_seq = self._acked_seq
            return self._frames

    def drop_unsent(self, nbytes: int) -> tuple[int, int]:
        """Drop the oldest frames not yet sent until ``nbytes`` are free.

        Frames in flight (sent, not acked) are kept. Returns ``(frames, bytes)``
        dropped.
        """
        want = check_size("nbytes", nbytes)
        assert want is not None
        with self._lock:
            self._wait_not_sending()
            # A partly sent frame must be finished, so dropping starts after it.
            start = self._boundary
            if self._sent > start:
                length, _ = self._header(start)
                start += HEADER_SIZE + length
            end = start
            frames = 0
            while end < self._used and end - start < want:
                length, _ = self._header(end)
                end += HEADER_SIZE + length
                frames += 1
            gap = end - start
            if gap:
                # Move the kept prefix [0, start) forward over the dropped frames.
                prefix = self._copy_out(0, start)
                self._copy_in(gap, prefix)
                self._head = (self._head + gap) % self._cap
                self._used -= gap
                self._frames -= frames
            return frames, gap

    def peek(self) -> bytes | None:
        """Return a copy of the first payload not acked, or ``None``."""
        with self._lock:
            if self._frames == 0:
                return None
            length, _ = self._header(0)
            return self._copy_out(HEADER_SIZE, length)

    def __len__(self) -> int:
        return self._frames

    @property
    def nbytes(self) -> int:
        """Bytes held (headers included), in flight or waiting."""
        return self._used

    @property
    def capacity(self) -> int:
        """Bytes allocated."""
        return self._cap

    @property
    def unsent_bytes(self) -> int:
        """Bytes waiting for ``send_to``."""
        return self._used - self._sent

    @property
    def max_bytes(self) -> int | None:
        """The bound on bytes held, or ``None``."""
        return self._max

    @property
    def max_inflight(self) -> int | None:
        """The cap on bytes sent but not acked, or ``None``."""
        return self._inflight or None

    @property
    def normal_bytes(self) -> int:
        """The capacity the ring shrinks back to once empty."""
        return self._normal

    @property
    def last_seq(self) -> int:
        """Sequence number of the last frame appended (0 before any)."""
        return self._next_seq - 1

    @property
    def first_seq(self) -> int:
        """Sequence number of the first frame held (0 when empty)."""
        with self._lock:
            return self._header(0)[1] if self._frames else 0

    @property
    def acked_seq(self) -> int:
        """The highest sequence number acked (0 before any)."""
        return self._acked_seq

    @property
    def sent_seq(self) -> int:
        """Sequence number of the last frame completely sent."""
        return self._sent_seq


def append_all(rings: Any, frame: Any) -> int:
    """Append ``frame`` to every open ring of the sequence ``rings``.

    Closed rings are skipped; returns how many rings took the frame. Stops at
    the first other error; rings before it keep the frame.
    """
    frame_length(frame)
    taken = 0
    for ring in rings:
        try:
            ring.append(frame)
        except RingClosed:
            continue
        taken += 1
    return taken
