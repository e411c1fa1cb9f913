"""The shared-memory arena: big buffers travel once, zero-copy to every process listener.

A numpy array (or ``bytes`` / ``bytearray`` / ``memoryview``) of at least
``shared_min_bytes`` is copied once, by the producer, into a block of one memfd the
``Distributor`` owns; the frame that goes to each lane carries only a reference
(``EXT_SHARED``: block offset, length, serial number, and for an array its dtype,
shape and order; ``fanout.wire.refs``). Workers map the memfd read-only and build a
read-only numpy view of the block, or a ``bytes`` copy of it for a bytes-like payload
(``fanout.worker.shared``): this module is the producer's side alone.

Who may write: the producer maps the memfd writable, then seals it
(``F_SEAL_FUTURE_WRITE``): from then on nobody can map it writable or ``write()`` to
it, and a read-only mapping cannot be ``mprotect``-ed to writable. Workers get the
descriptor only to map it, and close it before the handler is loaded.

Who may hold how much: each listener taking the arena's encoding has a share of
it, ``max_shared_bytes // listeners``, counted in the bytes of the blocks its rings'
frames refer to. A lane whose listener is at its share gets the notification
inline instead (``SharedPayload.inline``): its own ring grows, as an unbounded ring
does, and no other listener waits or drops for it. A notification whose blocks do
not fit the arena (full, or fragmented) travels inline too: ``distribute`` never
waits for the arena, so it can never wait for it forever. docs/design.md says why.

When a block is freed: each lane whose ring took a frame referring to it holds one
reference to it (``Block.shares``, a count; not to be confused with a listener's
share of the arena), noted as ``(ring, seq)``. It ends when the ring no longer holds
that frame:
acked (``acked_seq`` passed it; a drop of frames not yet sent and ``take_all`` move
``acked_seq`` past them too, eventually or at once) or dropped (``seqs()`` no longer
lists it). A rewind keeps the frames, so it keeps the references: a restarted worker
reads the same block. While ``distribute`` runs, the producer holds one reference of
its own, so a block no lane took is freed when it returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from fanout.buffers.blocks import Block, Encoding, KeptPayload, aligned, copy_into, give, take
from fanout.buffers.swap import swap_buffers
from fanout.wire.dtypes import dtype_to_wire
from fanout.wire.refs import KIND_ARRAY, KIND_BYTES, read_shared, shared_key, shared_ref

__all__ = [
    "DEFAULT_SHARED_MIN_BYTES",
    "Arena",
    "SharedPayload",
    "SharedStats",
    "default_max_shared_bytes",
]

# Below this a payload is cheaper inline: a block costs an allocation, a share per
# lane and a mapping lookup in the worker (measured: docs/tuning.md).
DEFAULT_SHARED_MIN_BYTES = 64 * 1024
# Not in Python's fcntl before 3.12 (include/uapi/linux/fcntl.h).
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL


def default_max_shared_bytes() -> int:
    """An eighth of the machine's RAM: the arena's default bound."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        ram = 8 << 30
    return max(ram // 8 // mmap.PAGESIZE * mmap.PAGESIZE, 64 << 20)  # whole pages


@dataclass(frozen=True)
class SharedStats:
    """A snapshot of a distributor's shared-memory arena.

    Attributes:
        max_bytes: The arena's size (``max_shared_bytes``); 0 when disabled.
        held_bytes: Bytes in blocks some lane still holds (alignment included).
        blocks: Blocks held.
        shared: Buffers copied into the arena so far.
        shared_bytes: Their bytes.
        spilled: Times big buffers went inline instead: a lane whose listener was
            at its share took a notification inline, or no listener had room or no
            block was free for a buffer.
        share_bytes: Each listener's share of the arena.
    """

    max_bytes: int
    held_bytes: int
    blocks: int
    shared: int
    shared_bytes: int
    spilled: int = 0
    share_bytes: int = 0


class SharedPayload(bytes):
    """An encoded payload whose frame refers to arena blocks.

    ``blocks``: their offsets; ``nbytes``: their bytes (aligned), what a lane taking
    this frame holds of the arena; ``inline()``: the same notification with every
    buffer inline, for lanes at their share (encoded once, on first use).
    """

    blocks: list[int]
    nbytes: int
    _inline: Callable[[], bytes]
    _spilled: bytes | None = None

    def inline(self) -> bytes:
        """The notification encoded without the arena (encoded once, then kept)."""
        if self._spilled is None:
            self._spilled = self._inline()
        return self._spilled


class Arena:
    """A bounded memfd holding the big buffers of the notifications in flight.

    Owned by one ``Distributor``: it allocates, notes which lane holds which block,
    keeps each listener within its share, and frees a block once no ring holds a
    frame that refers to it. ``encode`` may run in any number of threads at once.

    Args:
        size: Bytes of shared memory (``max_shared_bytes``).
        min_bytes: Buffers of at least this many bytes go into the arena.
        codec: A ``MsgpackCodec`` or ``MsgspecCodec`` of the arena's own (a copy of
            the distributor's).

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
        self._blocks: dict[int, Block] = {}
        self._held = 0
        self._serial = 0
        # Per ring: the frames referring to blocks, by sequence number, and the
        # bytes of arena the ring holds (its frames' blocks, and claims of frames
        # being appended).
        self._records: dict[Any, deque[tuple[int, tuple[int, ...]]]] = {}
        self._ring_bytes: dict[Any, int] = {}
        # The listeners taking the arena's encoding, as the rings of each, and the
        # share of each (``set_takers``). None: no distributor says (one share).
        self._takers: tuple[tuple[Any, ...], ...] | None = None
        self.share_bytes = size
        # Per thread: the state of the encode it runs (``share`` is called back by
        # the codec while it runs), an ``Encoding``.
        self._local = threading.local()
        # Lanes at their share get the notification encoded without the arena.
        self.inline_encode: Callable[[Any, int], bytes] = codec.encode
        # Its own copy of the codec: only its encodes put buffers here, never the
        # distributor's (initial lists, Ray listeners) nor decoding.
        self.codec = codec
        codec._shares = self
        self._encode = codec.encode
        self.shared = self.shared_bytes = self.spilled = 0
        self._events = 0  # big buffers met by any encode: see encode()
        # The common case's check folded into the codec's encode where it has
        # one; otherwise the full path itself, with no delegating frame between.
        fold = getattr(codec, "arena_encoder", None)
        self.encode = fold(self) if fold is not None else self._encode_shared  # type: ignore[method-assign]

    # -- allocation (lock held) ----------------------------------------------------

    def _drop_share(self, offset: int) -> int:
        """End one share of a block; return its size."""
        block = self._blocks[offset]
        block.shares -= 1
        if block.shares == 0:
            del self._blocks[offset]
            self._held -= block.size
            give(self._free, block.offset, block.size)
        return block.size

    def _alloc(self, nbytes: int) -> Block | None:
        need = aligned(nbytes)
        with self._lock:
            off = take(self._free, need)
            if off < 0:
                return None
            self._serial += 1
            block = self._blocks[off] = Block(off, need, self._serial)
            self._held += need
            return block

    def fits(self, nbytes: int) -> bool:
        """Tell whether a block of ``nbytes`` could be allocated now."""
        need = aligned(nbytes)
        with self._lock:
            return any(size >= need for _, size in self._free)

    # -- shares ---------------------------------------------------------------------

    def set_takers(self, takers: Iterable[tuple[Any, ...]]) -> None:
        """Say which listeners take the arena's encoding (the rings of each).

        Each gets an equal share: ``size // len(takers)``. A listener holding more
        than a new, smaller share takes no block until it is back within it.
        """
        with self._lock:
            self._takers = tuple(takers)
            self.share_bytes = self.size // max(1, len(self._takers))

    def _held_by(self, rings: tuple[Any, ...]) -> int:
        ring_bytes = self._ring_bytes
        return sum(ring_bytes.get(r, 0) for r in rings)

    def room(self) -> int:
        """The most bytes of new blocks some listener could still take now.

        A pure read: ``reconcile`` first to count what the workers finished as free.
        """
        with self._lock:
            if self._takers is None:
                return self.share_bytes - self._held
            return max((self.share_bytes - self._held_by(t) for t in self._takers), default=0)

    def claim(self, ring: Any, rings: tuple[Any, ...], nbytes: int) -> bool:
        """Count ``nbytes`` against ``ring`` if its listener (``rings``) stays in its share.

        Called before ``ring`` takes a frame of a ``SharedPayload``; False: the lane
        gets ``inline()`` instead. A claim not followed by ``note`` is ``unclaim``-ed.
        """
        with self._lock:
            if self.buf is None or self._held_by(rings) + nbytes > self.share_bytes:
                self.spilled += 1
                return False
            self._ring_bytes[ring] = self._ring_bytes.get(ring, 0) + nbytes
            return True

    def unclaim(self, ring: Any, nbytes: int) -> None:
        """Give back a claim whose frame the ring did not take."""
        with self._lock:
            self._uncount(ring, nbytes)

    def _uncount(self, ring: Any, nbytes: int) -> None:
        left = self._ring_bytes.get(ring, 0) - nbytes
        if left > 0:
            self._ring_bytes[ring] = left
        else:
            self._ring_bytes.pop(ring, None)

    def ring_bytes(self, ring: Any) -> int:
        """Bytes of the arena ``ring``'s frames refer to, as of the last ``catch_up`` (a read)."""
        return self._ring_bytes.get(ring, 0)

    def catch_up(self, ring: Any) -> None:
        """Free the blocks of the frames ``ring`` acked since the last reconcile."""
        if ring in self._ring_bytes:
            self.reconcile(ring=ring)  # (drops free theirs with reconcile_dropped)

    # -- encoding (any producer thread) --------------------------------------------

    def encode(self, n: Any, t_ns: int) -> bytes:
        """Encode ``n`` with big buffers moved into the arena, as room allows.

        Returns plain ``bytes`` when nothing went into the arena, else a
        ``SharedPayload``: the caller ``claim``-s and ``note``-s it for every ring
        that takes it, gives the others ``inline()``, and calls ``unhold`` once done.
        Each arena replaces this with a faster equal: the codec's
        ``arena_encoder``, which returns the common case itself and calls
        ``_encode_shared`` for the rest, or ``_encode_shared`` itself.
        """
        return self._encode_shared(n, t_ns)

    def _encode_shared(
        self, n: Any, t_ns: int, payload: bytes | None = None, events: int = -1
    ) -> bytes:
        """``encode``'s work.

        ``payload`` and ``events``: ``n`` already encoded by a codec's
        ``arena_encoder``, and ``_events`` as it was before that encode.
        """
        # Unchanged: no thread met a big buffer meanwhile, so this call has no
        # state to look at or undo (the usual case, kept to one attribute read).
        if payload is None:
            events = self._events
        try:
            if payload is None:
                payload = self._encode(n, t_ns)
            if self._events == events and len(payload) < self.min_bytes:
                return payload
            swapped = self._swapped(n) if len(payload) >= self.min_bytes else None
            if swapped is not None:
                payload = self._encode(swapped, t_ns)  # arrays: the same blocks again
        except BaseException as exc:
            self.encode_failed(events, exc)
        enc = self._encoding()
        made, used = enc.made, enc.used
        enc.reset()
        if not made:
            return payload
        out = SharedPayload(payload)
        out.blocks = made
        out.nbytes = used
        inline = self.inline_encode
        out._inline = lambda: inline(n, t_ns)
        return out

    def encode_failed(self, events: int, exc: BaseException) -> NoReturn:
        """Raise ``exc`` from an encode begun when ``_events`` was ``events``.

        If any encode met a big buffer meanwhile, this thread's may have taken
        blocks: they are freed first, and the error the arena raised inside the
        codec is raised rather than the codec's wrapping of it.
        """
        if self._events == events:
            raise exc
        enc = self._encoding()
        made, error = enc.made, enc.error
        enc.reset()
        self.unhold(made)
        if error is not None and error is not exc:
            raise error from None  # the codec wrapped it (ValueError -> TypeError)
        raise exc

    def _encoding(self) -> Encoding:
        """This thread's encode state (clean between calls)."""
        try:
            enc: Encoding = self._local.enc
        except AttributeError:
            enc = self._local.enc = Encoding()
        return enc

    def _swapped(self, n: Any) -> Any:
        """``n`` with big bytes-like buffers shared; None if none was (or too deep).

        The walk recurses: an object nested near the packer's limit (deeper than
        Python's recursion limit allows here) keeps its buffers inline.
        """
        try:
            return swap_buffers(n, self.share)
        except RecursionError:
            return None

    def share(self, obj: Any) -> msgpack.ExtType | None:
        """The reference that replaces ``obj`` in the frame, or None to send it inline.

        Called by the arena's own codec for numpy arrays and, through
        ``swap_buffers``, for big bytes-like objects, in the encoding thread.
        """
        import numpy as np

        if isinstance(obj, np.ndarray):
            if obj.nbytes < self.min_bytes or obj.dtype.hasobject:
                return None
            fortran = obj.ndim > 1 and obj.flags.f_contiguous and not obj.flags.c_contiguous
            kind, nbytes, shape = KIND_ARRAY, obj.nbytes, list(obj.shape)
            dtype = dtype_to_wire(obj.dtype)
        else:
            view = memoryview(obj)
            if view.nbytes < self.min_bytes or not view.c_contiguous:
                return None  # (the codec refuses a strided memoryview with a TypeError)
            fortran, kind, nbytes, dtype, shape = False, KIND_BYTES, view.nbytes, None, None
        enc = self._encoding()
        with self._lock:
            self._events += 1  # under the lock: no increment is lost, encode() sees it
        seen = enc.refs.get(id(obj))
        if seen is not None:
            return seen[1]  # the same buffer twice in one notification: one block
        block = self._block_for(enc, nbytes)
        if block is None:
            with self._lock:
                self.spilled += 1
            enc.refs[id(obj)] = (obj, None)
            return None
        self._copy_in(enc, block, obj, kind, nbytes, fortran)
        ext = shared_ref(kind, block.offset, nbytes, block.serial, dtype, shape, fortran)
        enc.refs[id(obj)] = (obj, ext)
        return ext

    def _block_for(self, enc: Encoding, nbytes: int) -> Block | None:
        """A block for ``nbytes`` if some listener has room for it and one is free."""
        if enc.room < 0:  # once per encode: free what the workers finished, then look
            self.reconcile()
            enc.room = self.room()
        if enc.used + aligned(nbytes) > enc.room:
            return None
        block = self._alloc(nbytes)
        if block is not None:
            enc.made.append(block.offset)
            enc.used += block.size
        return block

    def _copy_in(
        self, enc: Encoding, block: Block, obj: Any, kind: int, nbytes: int, fortran: bool
    ) -> None:
        """Copy ``obj`` into ``block``, holding a buffer export so ``close`` cannot unmap it.

        (An array over the mmap itself takes no export: ``mmap.close`` would unmap
        the memory under a copy running without the GIL.)
        """
        with self._lock:
            buf = self.buf
            if buf is None:
                from fanout.errors import DistributorStopped

                raise enc.fail(
                    DistributorStopped("distribute() after stop(): build a new Distributor")
                )
            dest = memoryview(buf)[block.offset : block.offset + nbytes]
        try:
            copy_into(dest, obj, kind == KIND_BYTES, fortran)
        finally:
            dest.release()
        with self._lock:
            self.shared += 1
            self.shared_bytes += nbytes

    def unhold(self, blocks: Iterable[int]) -> None:
        """End the producer's own share of ``blocks`` (distribute is done with them)."""
        with self._lock:
            if self.buf is None:  # closed by stop(): nothing is held any more
                return
            for offset in blocks:
                self._drop_share(offset)

    # -- the rings' shares ------------------------------------------------------------

    def note(self, ring: Any, seq: int, blocks: list[int]) -> None:
        """Record that ``ring`` took frame ``seq`` referring to ``blocks`` (claimed)."""
        with self._lock:
            if self.buf is None:  # a distribute racing stop(): the stop settled it
                return
            for offset in blocks:
                self._blocks[offset].shares += 1
            records = self._records.get(ring)
            if records is None:
                records = self._records[ring] = deque()
            if records and records[-1][0] > seq:  # another producer thread noted first
                kept = sorted([*records, (seq, tuple(blocks))])
                records.clear()
                records.extend(kept)
            else:
                records.append((seq, tuple(blocks)))

    def _free_record(self, ring: Any, blocks: tuple[int, ...]) -> None:
        freed = 0
        for offset in blocks:
            freed += self._drop_share(offset)
        self._uncount(ring, freed)

    def reconcile(self, exact: bool = False, ring: Any = None) -> None:
        """Free the shares of frames no ring holds any more (of ``ring`` alone if given).

        Cheap form: frames up to each ring's ``acked_seq``, after acking what its
        worker finished. ``exact`` also frees frames dropped from the middle (a drop
        of frames not yet sent) by asking the ring for the sequence numbers it holds.
        """
        with self._lock:
            if ring is None:
                items = list(self._records.items())
            else:
                mine = self._records.get(ring)
                items = [] if mine is None else [(ring, mine)]
            for held_by, records in items:
                held_by.ack_from_source()  # the pump acks only when it sends
                acked = held_by.acked_seq
                while records and records[0][0] <= acked:
                    self._free_record(held_by, records.popleft()[1])
                if exact and records:
                    held = set(held_by.seqs())
                    kept: deque[tuple[int, tuple[int, ...]]] = deque()
                    for seq, blocks in records:
                        if seq in held:
                            kept.append((seq, blocks))
                        else:
                            self._free_record(held_by, blocks)
                    records = self._records[held_by] = kept
                if not records:
                    del self._records[held_by]

    def reconcile_dropped(self, ring: Any) -> bool:
        """Free the shares of frames ``ring`` dropped; tell whether any block was freed."""
        held = self._held
        self.reconcile(exact=True, ring=ring)
        return self._held < held

    def keep(self, ring: Any, items: list[bytes], seqs: Iterable[int]) -> list[Any]:
        """``items``, frames ``seqs`` of ``ring``, as ``KeptPayload`` with their blocks.

        Only a copy of memory, so it may run under the distributor's lock while
        the frames still hold their blocks; the decoding (codec hooks: user code)
        comes later, without it (``reading``).
        """
        return self.wrap_kept(items, self.copy_blocks(ring, seqs))

    def copy_blocks(self, ring: Any, seqs: Iterable[int]) -> dict[tuple[int, int], bytes]:
        """Copy the blocks frames ``seqs`` of ``ring`` refer to, while they still hold them."""
        wanted = set(seqs)
        kept: dict[tuple[int, int], bytes] = {}
        with self._lock:
            buf = self.buf
            for seq, blocks in self._records.get(ring, ()):
                if seq not in wanted or buf is None:
                    continue
                for offset in blocks:
                    block = self._blocks[offset]
                    kept[(offset, block.serial)] = buf[offset : offset + block.size]
        return kept

    @staticmethod
    def wrap_kept(items: list[bytes], kept: dict[tuple[int, int], bytes]) -> list[Any]:
        """``items`` as ``KeptPayload`` decoding their references from ``kept``."""
        out: list[Any] = []
        for item in items:
            item = KeptPayload(item)
            item.kept = kept
            out.append(item)
        return out

    @contextlib.contextmanager
    def reading(self, kept: dict[tuple[int, int], bytes]) -> Iterator[None]:
        """Decode references from ``kept`` (``keep``) in this thread while in the block."""
        self._local.kept = kept
        try:
            yield
        finally:
            self._local.kept = None

    def decode_copy(self, body: bytes) -> Any:
        """The producer's object for a reference: a copy, if its block is still held.

        Raises:
            ValueError: The block was freed (or reused) since the frame was made.
        """
        offset, serial = shared_key(body)
        kept = getattr(self._local, "kept", None)
        if kept is not None and (offset, serial) in kept:
            return read_shared(body, memoryview(kept[(offset, serial)]), True, base=offset)
        with self._lock:
            block = self._blocks.get(offset)
            if block is None or block.serial != serial or self.buf is None:
                raise ValueError(
                    "its shared-memory block was freed once the frame left every ring"
                )
            return read_shared(body, memoryview(self.buf), copy=True)

    def stats(self) -> SharedStats:
        """A snapshot of the arena as it is; it frees nothing.

        ``reconcile`` first to count only the blocks some ring still holds.
        """
        with self._lock:
            return SharedStats(
                max_bytes=self.size,
                held_bytes=self._held,
                blocks=len(self._blocks),
                shared=self.shared,
                shared_bytes=self.shared_bytes,
                spilled=self.spilled,
                share_bytes=self.share_bytes,
            )

    def close(self) -> None:
        """Unmap and close (every worker has exited; the rings are settled).

        A copy still running in another thread holds a buffer export: the mapping
        then stays until that copy lets go of it (garbage collection unmaps it).
        """
        self.reconcile()
        with self._lock:
            buf, self.buf = self.buf, None
            # Every ring is settled: whatever a racing distribute still counts is gone.
            self._records.clear()
            self._ring_bytes.clear()
            self._blocks.clear()
            self._held = 0
            self._free = [(0, self.size)]
        if buf is not None:
            try:
                buf.close()
            except BufferError:  # a racing distribute still copies in: GC unmaps it
                pass
        self._close_fd()
