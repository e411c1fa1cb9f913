"""The shared-memory arena: big buffers travel once, zero-copy to every process listener.

A numpy array (or ``bytes`` / ``bytearray`` / ``memoryview``) of at least
``shared_min_bytes`` is copied once, by the producer, into a block of one memfd the
``Distributor`` owns; the frame that goes to each lane carries only a reference
(``EXT_SHARED``: block offset, length, serial number, and for an array its dtype,
shape and order). Workers map the memfd read-only and build a read-only numpy view of
the block, or a ``bytes`` copy of it for a bytes-like payload.

Who may write: the producer maps the memfd writable, then seals it
(``F_SEAL_FUTURE_WRITE``): from then on nobody can map it writable or ``write()`` to
it, and a read-only mapping cannot be ``mprotect``-ed to writable. Workers get the
descriptor only to map it, and close it before the handler is loaded.

When a block is freed: each lane whose ring took a frame referring to it holds one
share, noted as ``(ring, seq)``. A share ends when the ring no longer holds that frame:
acked (``acked_seq`` passed it; a drop of frames not yet sent and ``take_all`` move
``acked_seq`` past them too, eventually or at once) or dropped (``seqs()`` no longer
lists it). A rewind keeps the frames, so it keeps the shares: a restarted worker reads
the same block. While ``distribute`` runs, the producer holds one share of its own, so
a block no lane took is freed when it returns.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from fanout._isolation import mmap_shared
from fanout.notifications import Add, Delete, Update

__all__ = [
    "DEFAULT_SHARED_MIN_BYTES",
    "Arena",
    "SharedStats",
    "default_max_shared_bytes",
    "map_worker_view",
    "swap_buffers",
]

# Below this a payload is cheaper inline: a block costs an allocation, a share per
# lane and a mapping lookup in the worker (measured: docs/tuning.md).
DEFAULT_SHARED_MIN_BYTES = 64 * 1024
ALIGN = 64  # block alignment: any numpy dtype, and whole cache lines
# Not in Python's fcntl before 3.12 (include/uapi/linux/fcntl.h).
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL

# What a reference stands for.
KIND_ARRAY, KIND_BYTES = 0, 1


def default_max_shared_bytes() -> int:
    """An eighth of the machine's RAM: the arena's default bound."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        ram = 8 << 30
    return max(ram // 8, 64 << 20)


@dataclass(frozen=True)
class SharedStats:
    """A snapshot of a distributor's shared-memory arena.

    Attributes:
        max_bytes: The arena's size (``max_shared_bytes``); 0 when disabled.
        held_bytes: Bytes in blocks some lane still holds (alignment included).
        blocks: Blocks held.
        shared: Buffers copied into the arena so far.
        shared_bytes: Their bytes.
        waits: Times ``distribute`` found the arena full and applied the overflow
            policies.
    """

    max_bytes: int
    held_bytes: int
    blocks: int
    shared: int
    shared_bytes: int
    waits: int


class NoRoom(Exception):
    """The arena has no room and every target's policy says drop the notification."""


def _no_room(plan: Any, nbytes: int) -> None:
    raise NoRoom(f"the shared-memory arena has no room for {nbytes} bytes")


class SharedPayload(bytes):
    """An encoded payload whose frame refers to arena blocks (``blocks``)."""

    blocks: list[int]


class _Block:
    __slots__ = ("offset", "serial", "shares", "size")

    def __init__(self, offset: int, size: int, serial: int) -> None:
        self.offset = offset
        self.size = size
        self.serial = serial
        self.shares = 1  # the encoding distribute's own, until it returns


_worker_view: memoryview | None = None


def map_worker_view(fd: int, size: int) -> memoryview:
    """Map the arena read-only for this worker's decoder (the worker closes ``fd``).

    The mapping lives as long as the process. Returns a read-only byte view of it.
    """
    global _worker_view
    addr = mmap_shared(fd, size, mmap.PROT_READ, 0, "shared-memory arena")
    view = memoryview((ctypes.c_char * size).from_address(addr)).cast("B").toreadonly()
    _worker_view = view
    return view


def _read_view(body: bytes, view: memoryview, copy: bool) -> Any:
    kind, offset, length, _serial, dtype, shape, fortran = msgpack.unpackb(body)
    raw = view[offset : offset + length]
    if kind == KIND_BYTES:
        return bytes(raw)
    import numpy as np

    arr = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape, order="F" if fortran else "C")
    if copy:
        arr = arr.copy(order="K")
        arr.flags.writeable = False
    return arr


def decode_worker(body: bytes) -> Any:
    """A worker's object for a reference: a read-only array view, or bytes."""
    if _worker_view is None:
        raise ValueError(
            "a shared-memory reference arrived, but this process has no arena mapped "
            "(it is not a worker of the distributor that made it)"
        )
    return _read_view(body, _worker_view, copy=False)


class Arena:
    """A bounded memfd holding the big buffers of the notifications in flight.

    Owned by one ``Distributor``: it allocates, notes which lane holds which block,
    and frees a block once no ring holds a frame that refers to it.

    Args:
        size: Bytes of shared memory (``max_shared_bytes``).
        min_bytes: Buffers of at least this many bytes go into the arena.
        codec: A ``MsgpackCodec`` of the arena's own (a copy of the distributor's).

    Raises:
        OSError: The memfd could not be created, sized or sealed.
    """

    def __init__(self, size: int, min_bytes: int, codec: Any) -> None:
        self.size = size
        self.min_bytes = min_bytes
        self.fd = os.memfd_create("fanout:arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        self._close_fd.atexit = False  # at exit, stop() closes it after the workers left
        try:
            os.ftruncate(self.fd, size)
            self.buf: mmap.mmap | None = mmap.mmap(self.fd, size)
            # After our own writable mapping: every later mapping is read-only for good.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            self._close_fd()
            raise
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), by offset
        self._blocks: dict[int, _Block] = {}
        self._held = 0
        self._serial = 0
        self._records: dict[Any, deque[tuple[int, tuple[int, ...]]]] = {}
        # The encode running (only ever in the producer's thread): blocks it made,
        # buffers it shared (a buffer met twice takes one block), an error to re-raise.
        self._made: list[int] = []
        self._refs: dict[int, tuple[Any, msgpack.ExtType]] = {}
        self._error: BaseException | None = None
        self._target: Any = None
        # Whom a distribute addresses, and what to do when the arena is full: the
        # distributor sets both (``make_room(plan, nbytes)`` returns once a block of
        # ``nbytes`` fits, or raises).
        self.plan: Any = None
        self.make_room: Callable[[Any, int], None] = _no_room
        # Its own copy of the codec: only its encodes put buffers here, never the
        # distributor's (initial lists, Ray listeners) nor decoding.
        self.codec = codec
        codec._shares = self
        self._encode = codec.encode
        self.shared = self.shared_bytes = self.waits = 0

    # -- allocation (lock held) ----------------------------------------------------

    def _take(self, need: int) -> int:
        """First fit from the lowest offset (keeps the touched pages few); -1: no room."""
        free = self._free
        for i, (off, size) in enumerate(free):
            if size >= need:
                if size == need:
                    del free[i]
                else:
                    free[i] = (off + need, size - need)
                return off
        return -1

    def _give(self, off: int, size: int) -> None:
        free = self._free
        i = bisect.bisect(free, (off, size))
        if i < len(free) and off + size == free[i][0]:  # merge with the next
            size += free[i][1]
            del free[i]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == off:  # and the previous
            off, size = free[i - 1][0], free[i - 1][1] + size
            i -= 1
            del free[i]
        free.insert(i, (off, size))

    def _drop_share(self, offset: int) -> None:
        block = self._blocks[offset]
        block.shares -= 1
        if block.shares == 0:
            del self._blocks[offset]
            self._held -= block.size
            self._give(block.offset, block.size)

    def _alloc(self, nbytes: int) -> _Block | None:
        need = _aligned(nbytes)
        # Free what the workers finished first, so the lowest blocks are reused: their
        # pages are already in memory and mapped in every worker (a fresh page costs a
        # fault in the producer and in each worker).
        self.reconcile()
        with self._lock:
            off = self._take(need)
            if off < 0:
                return None
            self._serial += 1
            block = self._blocks[off] = _Block(off, need, self._serial)
            self._held += need
            return block

    def fits(self, nbytes: int) -> bool:
        """Tell whether a block of ``nbytes`` could be allocated now."""
        need = _aligned(nbytes)
        with self._lock:
            return any(size >= need for _, size in self._free)

    # -- encoding (the producer's thread) ------------------------------------------

    def encode(self, n: Any, t_ns: int, plan: Any = None) -> bytes:
        """Encode ``n`` with big buffers moved into the arena.

        Returns plain ``bytes`` when nothing went into the arena, else a
        ``SharedPayload`` whose ``blocks`` the caller passes to ``note`` for every
        ring that took it and to ``unhold`` once done. ``plan`` (default
        ``self.plan``) is handed to ``make_room`` when the arena is full.
        """
        self._target = plan
        try:
            payload = self._encode(n, t_ns)
            if not self._made and len(payload) < self.min_bytes:
                return payload  # the usual case: no big buffer, nothing to undo
            swapped = swap_buffers(n, self.share) if len(payload) >= self.min_bytes else None
            if swapped is not None:
                payload = self._encode(swapped, t_ns)  # arrays: the same blocks again
        except BaseException as exc:
            made, self._made, self._refs = self._made, [], {}
            self.unhold(made)
            error, self._error = self._error, None
            if error is not None and error is not exc:
                raise error from None  # the codec wrapped it (ValueError -> TypeError)
            raise
        made, self._made, self._refs = self._made, [], {}
        if not made:
            return payload
        out = SharedPayload(payload)
        out.blocks = made
        return out

    def share(self, obj: Any) -> msgpack.ExtType | None:
        """The reference that replaces ``obj`` in the frame, or None to send it inline.

        Called by the arena's own codec for numpy arrays and, through
        ``swap_buffers``, for big bytes-like objects, in the producer's thread.
        """
        import numpy as np

        if isinstance(obj, np.ndarray):
            if obj.nbytes < self.min_bytes or obj.dtype.hasobject or obj.dtype.fields:
                return None
            fortran = obj.ndim > 1 and obj.flags.f_contiguous and not obj.flags.c_contiguous
            kind, nbytes, dtype, shape = KIND_ARRAY, obj.nbytes, obj.dtype.str, list(obj.shape)
        else:
            view = memoryview(obj)
            if view.nbytes < self.min_bytes or not view.c_contiguous:
                return None  # (a strided memoryview cannot be encoded at all)
            fortran, kind, nbytes, dtype, shape = False, KIND_BYTES, view.nbytes, None, None
        seen = self._refs.get(id(obj))
        if seen is not None:
            return seen[1]  # the same buffer twice in one notification: one block
        block = self._block_for(nbytes)
        self._made.append(block.offset)
        buf = self.buf
        if buf is None:
            from fanout.errors import DistributorStopped

            raise self._fail(
                DistributorStopped("distribute() after stop(): build a new Distributor")
            )
        if kind == KIND_BYTES:
            buf[block.offset : block.offset + nbytes] = view.cast("B")
        else:
            # One copy, straight into the block: a strided array becomes contiguous here.
            dest = np.ndarray(
                obj.shape, obj.dtype, buf, block.offset, order="F" if fortran else "C"
            )
            np.copyto(dest, obj, casting="no")
            del dest
        self.shared += 1
        self.shared_bytes += nbytes
        body = msgpack.packb([kind, block.offset, nbytes, block.serial, dtype, shape, fortran])
        from fanout.codec import EXT_SHARED

        ext = msgpack.ExtType(EXT_SHARED, body)
        self._refs[id(obj)] = (obj, ext)  # obj kept alive: its id stays unique
        return ext

    def _block_for(self, nbytes: int) -> _Block:
        # Blocks are aligned, and one notification's blocks are all held at once:
        # what can never fit must fail here, not wait forever for room.
        with self._lock:
            ours = sum(self._blocks[offset].size for offset in self._made)
        if _aligned(nbytes) + ours > self.size:
            more = f" with the {ours} bytes of its other buffers" if ours else ""
            raise self._fail(
                ValueError(
                    f"a buffer of {nbytes} bytes{more} can never fit the shared-memory "
                    f"arena of max_shared_bytes={self.size} bytes (blocks are aligned to "
                    f"{ALIGN} bytes); nothing was distributed. Raise max_shared_bytes "
                    f"(Distributor option) above the largest notification's buffers"
                )
            )
        block = self._alloc(nbytes)
        while block is None:
            self.waits += 1
            try:
                self.make_room(self.plan if self._target is None else self._target, nbytes)
            except BaseException as exc:
                raise self._fail(exc) from None
            block = self._alloc(nbytes)
        return block

    def _fail(self, exc: BaseException) -> BaseException:
        self._error = exc  # the codec may wrap it; encode() re-raises this one
        return exc

    def unhold(self, blocks: Iterable[int]) -> None:
        """End the producer's own share of ``blocks`` (distribute is done with them)."""
        with self._lock:
            if self.buf is None:  # closed by stop(): nothing is held any more
                return
            for offset in blocks:
                self._drop_share(offset)

    # -- shares ---------------------------------------------------------------------

    def note(self, ring: Any, seq: int, blocks: list[int]) -> None:
        """Record that ``ring`` took frame ``seq`` referring to ``blocks``."""
        with self._lock:
            if self.buf is None:  # a distribute racing stop(): the stop settled it
                return
            for offset in blocks:
                self._blocks[offset].shares += 1
            records = self._records.get(ring)
            if records is None:
                records = self._records[ring] = deque()
            records.append((seq, tuple(blocks)))

    def reconcile(self, exact: bool = False, ring: Any = None) -> None:
        """Free the shares of frames no ring holds any more (of ``ring`` alone if given).

        Cheap form: frames up to each ring's ``acked_seq``, after acking what its
        worker finished. ``exact`` also frees frames dropped from the middle (a drop
        of frames not yet sent) by asking the ring for the sequence numbers it holds.
        """
        with self._lock:
            items = list(self._records.items())
            if ring is not None:
                items = [(r, q) for r, q in items if r is ring]
            for held_by, records in items:
                held_by.ack_from_source()  # the pump acks only when it sends
                acked = held_by.acked_seq
                while records and records[0][0] <= acked:
                    for offset in records.popleft()[1]:
                        self._drop_share(offset)
                if exact and records:
                    held = set(held_by.seqs())
                    kept: deque[tuple[int, tuple[int, ...]]] = deque()
                    for seq, blocks in records:
                        if seq in held:
                            kept.append((seq, blocks))
                        else:
                            for offset in blocks:
                                self._drop_share(offset)
                    records = self._records[held_by] = kept
                if not records:
                    del self._records[held_by]

    def reconcile_dropped(self, ring: Any) -> bool:
        """Free the shares of frames ``ring`` dropped; tell whether any block was freed."""
        held = self._held
        self.reconcile(exact=True, ring=ring)
        return self._held < held

    def decode_copy(self, body: bytes) -> Any:
        """The producer's object for a reference: a copy, if its block is still held.

        Raises:
            ValueError: The block was freed (or reused) since the frame was made.
        """
        _kind, offset, _length, serial = msgpack.unpackb(body)[:4]
        with self._lock:
            block = self._blocks.get(offset)
            if block is None or block.serial != serial or self.buf is None:
                raise ValueError(
                    "its shared-memory block was freed once the frame left every ring"
                )
            return _read_view(body, memoryview(self.buf), copy=True)

    def stats(self) -> SharedStats:
        """A snapshot of the arena (after freeing what the rings let go)."""
        if self.buf is not None:
            self.reconcile()
        return SharedStats(
            max_bytes=self.size,
            held_bytes=self._held,
            blocks=len(self._blocks),
            shared=self.shared,
            shared_bytes=self.shared_bytes,
            waits=self.waits,
        )

    def close(self) -> None:
        """Unmap and close (every worker has exited; the rings are settled)."""
        self.reconcile()
        with self._lock:
            buf, self.buf = self.buf, None
            # Every ring is settled: whatever a racing distribute still counts is gone.
            self._records.clear()
            self._blocks.clear()
            self._held = 0
            self._free = [(0, self.size)]
        if buf is not None:
            try:
                buf.close()
            except BufferError:  # a racing distribute still copies in: GC unmaps it
                pass
        self._close_fd()


def _aligned(nbytes: int) -> int:
    """The size of the block ``nbytes`` take."""
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


def swap_buffers(n: Any, share: Callable[[Any], Any], arrays: bool = False) -> Any:
    """``n`` with its big buffers replaced by ``share(buffer)``; None if none was.

    Buffers are ``bytes``, ``bytearray`` and ``memoryview`` values, and numpy arrays
    too with ``arrays`` (the arena's codec shares arrays itself, as it meets them);
    ``share`` returns the reference, or None to leave the buffer inline.
    """
    if type(n) is Update:
        if n.old is n.new:
            new = _swap(n.new, share, arrays)
            return None if new is n.new else Update(new, new)
        old, new = _swap(n.old, share, arrays), _swap(n.new, share, arrays)
        return None if old is n.old and new is n.new else Update(old, new)
    obj = _swap(n.obj, share, arrays)
    if obj is n.obj:
        return None
    return Add(obj, n.is_in_initial_list) if type(n) is Add else Delete(obj)


def _swap(obj: Any, share: Callable[[Any], Any], arrays: bool) -> Any:
    """``obj`` with big buffers replaced by ``share(buffer)`` (``obj`` if none was)."""
    cls = type(obj)
    if (
        cls is bytes
        or cls is bytearray
        or cls is memoryview
        or (arrays and cls.__module__ == "numpy" and cls.__name__ == "ndarray")
    ):
        ext = share(obj)
        return obj if ext is None else ext
    if cls is dict:
        out = None
        for k, v in obj.items():
            w = _swap(v, share, arrays)
            if w is not v:
                if out is None:
                    out = dict(obj)
                out[k] = w
        return obj if out is None else out
    if cls is list or cls is tuple:
        items = [_swap(v, share, arrays) for v in obj]
        if all(w is v for w, v in zip(items, obj, strict=True)):
            return obj
        return items
    return obj


def wait_for(predicate: Callable[[], bool], give_up: Callable[[], bool]) -> bool:
    """Poll ``predicate`` with a growing nap until true (True) or ``give_up()`` (False)."""
    delay = 50e-6
    while not predicate():
        if give_up():
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.005)
    return True
