"""The byte ring of frames in pure Python: the twin of the native ``FrameRing``.

The native class is compiled from ``_frame_state.pxi`` and ``_frame_ring.pxi`` into
``fanout.native._ring``; ``fanout.native._ring_py`` names this one beside the other
twins.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from fanout.errors import RingClosed, RingFull, ring_full_message
from fanout.native._ring_common import (
    HEADER,
    HEADER_SIZE,
    MIN_FRAME_CAPACITY,
    RING_CLOSED_MESSAGE,
    check_ack,
    check_fd,
    check_size,
    check_words,
    frame_length,
)

__all__ = ["FrameRing"]


class FrameRing:
    """A growable byte ring of length-delimited frames with three cursors.

    ``fanout.FrameRing`` is the native implementation of this class, with the
    same API, exceptions and messages; this pure-Python one is its reference.
    Each lane of a process listener queues its encoded notifications in one.

    ``acked <= sent <= written``: frames before ``acked`` are freed; frames between
    ``acked`` and ``sent`` are in flight and stay until acked, so ``rewind()`` can
    send them again; frames after ``sent`` wait for ``send_to``.

    Each frame travels as a 12-byte header (payload length u32, sequence number
    u64, little endian) and the payload. Sequence numbers start at 1.

    Thread safety: every method takes the ring's lock, so one producer thread
    appending while one pump thread sends and another thread acks is safe.

    Args:
        initial_bytes: Capacity to start with; it grows by doubling (from 64 bytes
            if 0).
        normal_bytes: Capacity to shrink back to once every frame is acked; None
            means ``initial_bytes``.
        max_bytes: Bound on the bytes held, headers included; ``append`` past it
            raises ``RingFull``. None: unbounded.
        max_inflight: Cap on the bytes sent but not yet acked; ``send_to`` sends
            no more (beyond finishing a frame it began) until acks make room, so
            frames that wait can still be dropped. None: no cap.

    Raises:
        TypeError: A size is not an int.
        ValueError: A size is negative or over 2**62, ``max_inflight`` is 0, or
            ``max_bytes`` does not exceed the frame header.
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
        """Copy a frame in after the others.

        Args:
            frame: A contiguous bytes-like object of 1 byte to 4 GiB.

        Returns:
            The frame's sequence number (1 for the first frame, then +1 each).

        Raises:
            TypeError: ``frame`` is not a contiguous bytes-like object.
            ValueError: ``frame`` is empty or larger than 4 GiB.
            RingFull: The frame would take the bytes held past ``max_bytes``.
            RingClosed: ``close()`` was called.
        """
        n = frame_length(frame) + HEADER_SIZE
        # acquire/release, not `with`: its __enter__/__exit__ lookups cost an
        # append 1,600 instructions (callgrind); try/finally releases as it did.
        self._lock.acquire()
        try:
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
            start = (self._head + self._used) % self._cap
            if start + n <= self._cap:
                # The usual case, written in place: two _copy_in calls (slices,
                # a view, a temporary copy) cost an append 9,500 instructions.
                HEADER.pack_into(self._buf, start, n - HEADER_SIZE, seq)
                self._buf[start + HEADER_SIZE : start + n] = frame
            else:  # the frame wraps around the end of the buffer
                self._copy_in(self._used, HEADER.pack(n - HEADER_SIZE, seq))
                self._copy_in(self._used + HEADER_SIZE, memoryview(frame).cast("B"))
            self._used += n
            self._frames += 1
            self._next_seq = seq + 1
            return seq
        finally:
            self._lock.release()

    def send_to(self, fd: int) -> int:
        """Write waiting bytes to a file descriptor, in one system call.

        First frees the frames the ack source (``set_ack_source``) says are
        finished. A partly written frame is resumed by the next call. The
        native ring releases the GIL while writing.

        Args:
            fd: A non-blocking file descriptor open for writing (a pipe).

        Returns:
            The number of bytes the descriptor took; 0 when nothing waits, the
            in-flight cap holds everything back, or the pipe is full.

        Raises:
            TypeError: ``fd`` is not an int.
            ValueError: ``fd`` is negative or too large.
            OSError: The write failed for another reason than a full pipe (for
                example ``BrokenPipeError`` when the reader is gone).
        """
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
        """Free every frame up to and including a sequence number.

        Acking a number at or below ``acked_seq`` frees nothing. Once the ring
        is empty it shrinks back to ``normal_bytes``.

        Args:
            seq: The sequence number of the last frame the reader finished.

        Returns:
            The number of frames freed.

        Raises:
            TypeError: ``seq`` is not an int.
            ValueError: ``seq`` was never appended, or not completely sent yet
                (a reader can only finish frames it was sent).
        """
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
        """Free the frames the ack source (``set_ack_source``) says are finished.

        A word beyond the last frame appended is garbage and frees nothing; a
        frame is freed only once it was completely sent.

        Returns:
            The number of frames freed.
        """
        with self._lock:
            return self._ack_from_source()

    def close(self) -> None:
        """Refuse further appends (they raise ``RingClosed``); frames held stay."""
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (appends are then refused)."""
        return self._closed

    def take_all(self) -> list[bytes]:
        """Remove every frame held, sent or not.

        The ring counts them as acked (``acked_seq == last_seq`` afterwards) and
        shrinks back to its normal capacity.

        Returns:
            The payloads (headers stripped), oldest first.
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
        """Let ``send_to`` ack up to a number the reader keeps in shared memory.

        Before each write, ``send_to`` reads ``words[index]`` and frees the frames
        up to it. A value that is not a frame sent (garbage from a faulty reader)
        frees nothing.

        Args:
            words: A writable buffer of uint64 words (a numpy ``uint64`` array or a
                memoryview cast to ``"Q"``), or None to remove the source. The ring
                keeps a view of it until then.
            index: Which word holds the reader's last finished sequence number.

        Raises:
            TypeError: ``words`` is not a buffer of uint64 words.
            ValueError: ``index`` is out of range.
        """
        view = None if words is None else check_words(words, index)
        with self._lock:
            self._ack_view, self._ack_index = view, index

    def capped(self) -> bool:
        """Tell whether bytes wait but the in-flight cap holds them back.

        Returns:
            True when ``send_to`` would send nothing until acks make room.
        """
        with self._lock:
            return (
                bool(self._inflight)
                and self._used > self._sent == self._boundary
                and self._sent >= self._inflight
            )

    def rewind(self) -> int:
        """Make the next ``send_to`` start again at the first frame not acked.

        Used when a reader died: its replacement is sent every frame the old
        one had not finished, in order.

        Returns:
            The number of frames held, which will all be sent again.
        """
        with self._lock:
            self._wait_not_sending()
            self._sent = 0
            self._boundary = 0
            self._sent_seq = self._acked_seq
            return self._frames

    def drop_unsent(self, nbytes: int) -> tuple[int, int]:
        """Drop the oldest frames not yet sent until enough bytes are free.

        Frames in flight (sent, not acked) are kept, and so is a frame partly
        sent. Fewer bytes are dropped when fewer wait.

        Args:
            nbytes: How many bytes to free, at least.

        Returns:
            ``(frames, bytes)`` dropped.

        Raises:
            TypeError: ``nbytes`` is not an int.
            ValueError: ``nbytes`` is negative.
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

    def seqs(self) -> list[int]:
        """Return the sequence numbers of the frames held, oldest first.

        Frames dropped by ``drop_unsent`` leave gaps in them.

        Returns:
            One number per frame held, in flight or waiting.
        """
        with self._lock:
            out = []
            off = 0
            while off < self._used:
                length, seq = self._header(off)
                out.append(seq)
                off += HEADER_SIZE + length
            return out

    def peek(self) -> bytes | None:
        """Return a copy of the first payload not acked.

        Returns:
            The payload (without its header), or None when the ring is empty.
        """
        with self._lock:
            if self._frames == 0:
                return None
            length, _ = self._header(0)
            return self._copy_out(HEADER_SIZE, length)

    def __len__(self) -> int:
        """Return the number of frames held, in flight or waiting."""
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
