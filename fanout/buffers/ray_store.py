"""Big buffers for Ray listeners: put into Ray's object store once, referenced by frames.

A numpy array or a ``bytes`` / ``bytearray`` / ``memoryview`` of at least
``min_bytes`` in a notification for Ray listeners is ``ray.put`` once by the producer,
whatever the number of Ray listeners and lanes; the frame carries only a token
(MessagePack ext code ``EXT_RAY_REF``). Each batch sent to an actor carries the
``ObjectRef`` of every token its frames use, so Ray counts the actor as a borrower
and the actor reads the buffer with ``ray.get`` (``fanout.worker.ray_refs``): zero-copy,
read-only, for an array on the same node; a ``bytes`` copy for a bytes-like buffer.
This module is the producer's side.

Who keeps a buffer alive: each lane whose ring took a frame holds the frame's tokens
until the frame is acknowledged, dropped or settled; the store drops its ``ObjectRef``
(and Ray frees the object once no actor uses it) when the last lane let go. A rewind
keeps the frames, so a restarted actor gets the same references again.
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
import weakref
from typing import Any, NoReturn

import msgpack

from fanout.buffers.swap import swap_buffers
from fanout.notifications import Notification
from fanout.wire.protocol import EXT_RAY_REF
from fanout.wire.refs import add_resolver, ray_ref, ray_token

__all__ = ["DEFAULT_RAY_MIN_BYTES", "RayPayload", "RayStore", "TokenLog"]

DEFAULT_RAY_MIN_BYTES = 64 * 1024  # below this, a buffer is cheaper inline in the frame

# The stores whose tokens a payload decoded here may use, and the tokens, unique in
# the process, so a decode never finds another store's buffer.
_stores: weakref.WeakSet[RayStore] = weakref.WeakSet()
_tokens = itertools.count(1)


def _resolve_held(body: bytes) -> Any:
    """The buffer of a reference some store of this process holds, else None.

    The producer decodes a frame to report it (an error, a dead letter); an actor
    resolves its batch's references itself (``fanout.worker.ray_refs``).
    """
    token = ray_token(body)
    for store in list(_stores):
        ref = store.ref(token)
        if ref is not None:
            import ray

            return ray.get(ref)  # read-only, zero-copy if local
    return None


add_resolver(EXT_RAY_REF, _resolve_held)


class RayPayload(bytes):
    """An encoded notification whose big buffers are in Ray's object store.

    ``tokens``: the references its frame carries. The payload itself holds one
    share of each while it lives (``distribute`` is putting it into lanes), so a
    lane that drops it at once cannot free a buffer the next lane still needs.
    """

    tokens: tuple[int, ...] = ()
    _store: RayStore | None = None

    def __del__(self) -> None:
        store = self._store
        if store is not None:
            self._store = None
            # No lock here: the collector may run this inside a section of this
            # very thread that holds the store's lock.
            store.release_later(self.tokens)


class RayStore:
    """The producer's big buffers for Ray listeners, each put once, shared by all lanes.

    Args:
        ray: The ``ray`` module.
        encode: The codec's ``encode(n, t_ns)`` (MessagePack: references are ext
            values).
        min_bytes: Buffers at least this large go into the object store.
    """

    def __init__(self, ray: Any, encode: Any, min_bytes: int = DEFAULT_RAY_MIN_BYTES) -> None:
        self.ray = ray
        self._encode = encode
        self.min_bytes = min_bytes
        self._lock = threading.Lock()
        self._refs: dict[int, Any] = {}  # token -> ObjectRef, while something holds it
        self._holders: dict[int, int] = {}  # token -> shares (lanes, and the payload)
        # Shares of payloads collected since, released by the next locked call.
        self._later: collections.deque[tuple[int, ...]] = collections.deque()
        self._folded: Any = None  # encoder()
        self.puts = 0  # buffers put into the object store
        self.put_bytes = 0
        _stores.add(self)

    # What a codec's ``arena_encoder`` reads besides ``min_bytes``: the count of
    # big buffers met inside an encode. The codec's hook puts nothing here (the
    # buffers are found after the encode, by size), so it never changes.
    _events = 0

    def encoder(self, codec: Any) -> Any:
        """``encode``, as ``codec``'s ``arena_encoder`` folds it when it has one.

        Made on the first call and the same object after it (the delivery plan
        tells listeners that share an encoding by it); ``codec`` must be the one
        whose ``encode`` this store was given.
        """
        if self._folded is None:
            fold = getattr(codec, "arena_encoder", None)
            self._folded = fold(self) if fold is not None else self.encode
        return self._folded

    def encode_failed(self, events: int, exc: BaseException) -> NoReturn:
        """Raise ``exc``, the failed encode's error (no encode takes anything here)."""
        raise exc

    def encode(self, n: Notification, t_ns: int) -> bytes:
        """Encode ``n`` for Ray listeners: big buffers become references.

        Returns plain ``bytes`` when nothing was put, else a ``RayPayload``.
        While Ray is not connected (before ``start()``, unless the program called
        ``ray.init`` itself) buffers stay inline: a put would start a cluster.
        Safe from several threads (``add_listener`` encodes an initial list while
        the producer distributes).
        """
        return self._encode_shared(n, t_ns)

    def _encode_shared(
        self, n: Notification, t_ns: int, payload: bytes | None = None, events: int = 0
    ) -> bytes:
        """``encode``'s work; ``payload``: ``n`` already encoded (``arena_encoder``)."""
        if payload is None:
            payload = self._encode(n, t_ns)
        if len(payload) < self.min_bytes or not self.ray.is_initialized():
            return payload
        session: dict[int, tuple[Any, msgpack.ExtType, int]] = {}
        try:
            swapped = swap_buffers(n, functools.partial(self._share, session), arrays=True)
            if swapped is None:
                return payload
            out = RayPayload(self._encode(swapped, t_ns))
        except BaseException:
            self.release(tuple(token for _, _, token in session.values()))
            raise
        out.tokens = tuple(token for _, _, token in session.values())
        out._store = self
        return out

    def _share(
        self, session: dict[int, tuple[Any, msgpack.ExtType, int]], obj: Any
    ) -> msgpack.ExtType | None:
        """Put ``obj`` into the object store if it is big enough; its reference, or None."""
        seen = session.get(id(obj))
        if seen is not None:
            return seen[1]  # the same buffer twice in one notification: one put
        import numpy as np

        value: Any = obj
        if isinstance(obj, np.ndarray):
            if obj.nbytes < self.min_bytes or obj.dtype.hasobject:
                return None
            nbytes = obj.nbytes
            if not (obj.flags.c_contiguous or obj.flags.f_contiguous):
                # Copied to contiguous once here; Ray would pickle a strided array
                # in-band and every actor would get a private, writable copy.
                value = np.ascontiguousarray(obj)
        else:
            view = memoryview(obj)
            if view.nbytes < self.min_bytes:
                return None
            nbytes = view.nbytes
            if type(obj) is not bytes:
                value = bytes(view)  # put as bytes: the handler gets bytes
        ref = self.ray.put(value)
        token = next(_tokens)  # unique in the process: a decode finds the right store
        with self._lock:
            self._release_later_ones()
            self._refs[token] = ref
            self._holders[token] = 1  # the payload's share, until it is gone
        self.puts += 1
        self.put_bytes += nbytes
        ext = ray_ref(token)
        session[id(obj)] = (obj, ext, token)  # obj kept alive: its id stays unique
        return ext

    def hold(self, tokens: tuple[int, ...]) -> None:
        """A lane took a frame using ``tokens``."""
        with self._lock:
            self._release_later_ones()
            for token in tokens:
                self._holders[token] += 1

    def release(self, tokens: tuple[int, ...]) -> None:
        """A lane (or a payload) is done with ``tokens``."""
        with self._lock:
            self._release_later_ones()
            self._release(tokens)

    def release_later(self, tokens: tuple[int, ...]) -> None:
        """``release`` without taking the lock (from ``__del__``): done by the next call."""
        self._later.append(tokens)  # atomic: no lock needed

    def _release_later_ones(self) -> None:
        """Release what collected payloads left (lock held)."""
        while self._later:
            self._release(self._later.popleft())

    def _release(self, tokens: tuple[int, ...]) -> None:
        for token in tokens:
            left = self._holders.get(token, 0) - 1
            if left > 0:
                self._holders[token] = left
            else:
                self._refs.pop(token, None)
                self._holders.pop(token, None)

    def ref(self, token: int) -> Any:
        """The ``ObjectRef`` of ``token`` while something holds it, else None."""
        return self._refs.get(token)

    def refs(self, tokens: Any) -> dict[int, Any]:
        """``token -> ObjectRef`` for ``tokens`` (those still held)."""
        with self._lock:
            self._release_later_ones()
            return {t: self._refs[t] for t in tokens if t in self._refs}

    def held(self) -> int:
        """Buffers something still holds."""
        with self._lock:
            self._release_later_ones()
            return len(self._refs)


class TokenLog:
    """One lane's frames that use references: ``(seq, tokens)`` in sequence order.

    The producer adds an entry just before it appends the frame, and takes it back
    if the ring did not take the frame; the lane's sender reads and releases entries.
    """

    def __init__(self, store: RayStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._log: collections.deque[tuple[int, tuple[int, ...]]] = collections.deque()

    def __len__(self) -> int:
        return len(self._log)

    def add(self, seq: int, tokens: tuple[int, ...]) -> None:
        """Frame ``seq`` uses ``tokens`` (the lane holds them until it is done)."""
        self.store.hold(tokens)
        with self._lock:
            self._log.append((seq, tokens))

    def retract(self, seq: int) -> None:
        """Frame ``seq`` was not taken after all (dropped on arrival, or closed)."""
        with self._lock:
            if not self._log or self._log[-1][0] != seq:
                return
            _, tokens = self._log.pop()
        self.store.release(tokens)

    def tokens_between(self, first: int, last: int) -> list[int]:
        """The tokens of the frames ``first..last``."""
        with self._lock:
            return [t for seq, tokens in self._log if first <= seq <= last for t in tokens]

    def release_missing(self, held: set[int], upto: int) -> None:
        """Let go of the frames up to ``upto`` the ring no longer ``held`` (dropped)."""
        done: list[int] = []
        with self._lock:
            keep: collections.deque[tuple[int, tuple[int, ...]]] = collections.deque()
            for seq, tokens in self._log:
                if seq <= upto and seq not in held:
                    done.extend(tokens)
                else:
                    keep.append((seq, tokens))
            self._log = keep
        if done:
            self.store.release(tuple(done))

    def release_upto(self, seq: int) -> None:
        """Let go of the frames up to ``seq`` (acknowledged or dropped)."""
        done: list[int] = []
        with self._lock:
            while self._log and self._log[0][0] <= seq:
                done.extend(self._log.popleft()[1])
        if done:
            self.store.release(tuple(done))

    def release_all(self) -> None:
        """Let go of every frame (the lane is settled)."""
        with self._lock:
            done = [t for _, tokens in self._log for t in tokens]
            self._log.clear()
        if done:
            self.store.release(tuple(done))
