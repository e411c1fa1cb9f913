"""The codecs: a notification becomes one MessagePack payload, encoded once.

The payload's layout and the extension codes are the wire contract
(``fanout.wire.protocol``); the values fanout encodes itself (``datetime``, ``date``,
numpy arrays) are ``fanout.wire.exts``'s, and references to buffers kept beside the
frame (the shared-memory arena, Ray's object store) ``fanout.wire.refs``'s. Here:
the ``Codec`` interface, the two built-in codecs, which write the same bytes, and
``get_codec``.
"""

from __future__ import annotations

import pickle
import sys
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import msgspec

from fanout.notifications import Notification, Update
from fanout.wire.exts import builtin_from_ext, builtin_to_ext, tuple_keys
from fanout.wire.protocol import (
    EXT_SHARED,
    UPDATE,
    UPDATE_SAME,
    USER_EXT_CODES,
    from_wire,
    to_wire,
)
from fanout.wire.refusals import MSGSPEC_REFUSALS, encode_failure, msgspec_failure, unencodable
from fanout.wire.schema import typed_decoder

__all__ = ["Codec", "MsgpackCodec", "MsgspecCodec", "get_codec"]


# MessagePack's packer refuses objects nested deeper than about 1000 levels; a
# decoder needs a recursion limit above that to read everything the packer wrote
# (msgspec follows Python's, 1000 by default), so workers raise theirs to this.
DECODE_RECURSION_LIMIT = 3000


def decode_deep_enough() -> None:
    """Let this process decode whatever the packer accepted (workers call it once)."""
    if sys.getrecursionlimit() < DECODE_RECURSION_LIMIT:
        sys.setrecursionlimit(DECODE_RECURSION_LIMIT)


class Codec:
    """Base of codecs: ``encode`` a notification once, ``decode`` it in a worker.

    To write your own, subclass it and implement ``pack`` and ``unpack``; pass an
    instance as ``Distributor(codec=...)``. The instance is pickled to every
    worker, so keep its state picklable (rebuild unpicklable parts in
    ``__setstate__``).

    Attributes:
        name: A short name for the codec ("msgpack", "msgspec"; yours for a subclass).
    """

    name = "codec"
    # The payload is MessagePack, so a listener ``schema`` can decode it typed.
    msgpack_wire = False
    # The producer's shared-memory arena (``Distributor`` attaches it to the codecs
    # that can use it): ``_arena`` to decode references in the producer, ``_shares``
    # on the arena's own copy, whose encodes put big buffers there. Never pickled: a
    # worker's copy decodes references from its own read-only mapping.
    _arena: Any = None
    _shares: Any = None

    def pack(self, obj: Any) -> bytes:
        """Serialize a list of plain objects.

        Args:
            obj: The list ``[kind, t_ns, a, b]`` that ``encode`` builds, holding
                the user's objects.

        Returns:
            The serialized bytes.

        Raises:
            TypeError: ``obj`` holds something the codec cannot serialize; the
                message names its type.
        """
        raise NotImplementedError

    def unpack(self, data: Any) -> Any:
        """Deserialize what ``pack`` made.

        Args:
            data: A bytes-like object holding one payload.

        Returns:
            The object ``pack`` was given.
        """
        raise NotImplementedError

    def encode(self, n: Notification, t_ns: int) -> bytes:
        """Encode a notification and its timestamp into one payload.

        Args:
            n: The notification.
            t_ns: ``time.monotonic_ns()`` at ``distribute``, for latency figures.

        Returns:
            The payload that travels to the workers.

        Raises:
            TypeError: ``n`` is not a notification, or holds an object the codec
                cannot serialize.
        """
        kind, a, b = to_wire(n)
        return self.pack([kind, t_ns, a, b])

    def decode(self, data: Any) -> tuple[Notification, int]:
        """Decode a payload made by ``encode``.

        Args:
            data: A bytes-like object holding one payload.

        Returns:
            The notification and the ``t_ns`` it was stamped with.
        """
        kind, t_ns, a, b = self.unpack(data)
        return from_wire(kind, a, b), t_ns

    def unpacker(self, schema: Any = None) -> Callable[[Any], Any]:
        """Return the worker's ``payload -> [kind, t_ns, a, b]`` function.

        With a ``schema`` (``msgpack_wire`` codecs only) the objects come out as
        instances of it, decoded by msgspec; without, whatever ``unpack`` makes.

        Args:
            schema: A type msgspec decodes into, or None for plain objects.

        Returns:
            A function ``payload -> [kind, t_ns, a, b]``.
        """
        decode_deep_enough()
        if schema is None:
            return self.unpack
        return typed_decoder(schema, self._msgspec_ext).decode

    def _msgspec_ext(self, code: int, data: memoryview) -> Any:
        """msgspec's ext_hook (``data`` is a view): fanout's own extension codes."""
        obj = builtin_from_ext(code, bytes(data))
        return obj if obj is not None else msgpack.ExtType(code, bytes(data))


# How deep ``MsgspecCodec`` looks for objects msgspec would write its own way; a
# deeper object is packed by msgpack (Kubernetes objects nest about 10 levels).
PLAIN_DEPTH = 64
# The leaf types both packages write alike (numpy's array once numpy is loaded: an
# array can only exist then): one tuple, replaced when numpy arrives. Not
# ``msgpack.ExtType``: a named tuple to msgspec, which writes it as an array.
_plain_leaves: list[tuple[type, ...]] = [(msgspec.msgpack.Ext,)]


def _never_plain(obj: Any, depth: int, leaves: tuple[type, ...]) -> bool:
    return False


def _never_packed(obj: Any, depth: int) -> None:
    return None


def _more_plain_leaves() -> bool:
    """Add numpy's array to the plain leaves if numpy is loaded now; tell if it was added."""
    np = sys.modules.get("numpy")
    if np is None or np.ndarray in _plain_leaves[0]:
        return False
    _plain_leaves[0] = (*_plain_leaves[0], np.ndarray)
    return True


class _MsgpackPacking:
    """Packing with the ``msgpack`` package: ``MsgpackCodec``'s, and ``MsgspecCodec``'s
    for what msgspec would encode differently (so both write the same bytes).

    Needs ``default`` (a user hook or None), ``_local`` (a ``threading.local``) and
    ``_shares`` (the arena, on the arena's own copy).
    """

    default: Callable[[Any], Any] | None
    _local: threading.local
    _shares: Any

    def _default(self, obj: Any) -> Any:
        if self._shares is not None and type(obj).__module__ == "numpy":
            shared = self._shares.share(obj)  # None: small, or not shareable
            if shared is not None:
                return shared
        ext = builtin_to_ext(obj)
        if ext is not None:
            return msgpack.ExtType(*ext)
        if type(obj).__module__ == "numpy" and hasattr(obj, "item"):
            return obj.item()  # numpy scalar
        if type(obj) is msgspec.msgpack.Ext:  # as MsgspecCodec takes it
            return msgpack.ExtType(obj.code, obj.data)
        if self.default is not None:
            return self.default(obj)
        raise unencodable(obj)

    def _packer(self) -> msgpack.Packer:
        # One Packer per thread: Packer is not thread-safe.
        packer = self._local.packer = msgpack.Packer(
            default=self._default, use_bin_type=True, datetime=False
        )
        return packer

    def _msgpack_encode(self, n: Notification, t_ns: int) -> bytes:
        """Encode a notification and its timestamp into one payload (the hot path).

        Args:
            n: The notification.
            t_ns: ``time.monotonic_ns()`` at ``distribute``.

        Returns:
            The payload.

        Raises:
            TypeError: ``n`` holds an object the codec cannot serialize, or an
                integer out of MessagePack's range.
        """
        if type(n) is not Update:
            return Codec.encode(self, n, t_ns)  # type: ignore[arg-type]
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._packer()
        old, new = n.old, n.new
        try:
            if old is new:
                return packer.pack([UPDATE_SAME, t_ns, new, None])
            return packer.pack([UPDATE, t_ns, old, new])
        except (OverflowError, ValueError, BufferError) as exc:
            raise encode_failure(exc) from exc

    def _msgpack_pack(self, obj: Any) -> bytes:
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._packer()
        try:
            return packer.pack(obj)
        except TypeError:
            raise
        except (OverflowError, ValueError, BufferError) as exc:
            raise encode_failure(exc) from exc


class MsgpackCodec(_MsgpackPacking, Codec):
    """MessagePack through the ``msgpack`` package (``codec="msgpack"``).

    Besides MessagePack's own types it carries ``datetime``, ``date`` and numpy
    arrays (dtype, shape and raw bytes; a worker gets a read-only array).

    Args:
        default: ``f(obj) -> encodable`` for types fanout does not know, called
            after fanout's own datetime / date / numpy handling. It may return a
            ``msgpack.ExtType`` with a code from 64 to 127. It must pickle.
        ext_hook: ``f(code, data) -> obj`` for the extension codes 64 to 127 that
            ``default`` produced; runs in the workers, so it must pickle.

    Raises:
        TypeError: ``default`` or ``ext_hook`` is neither callable nor None.
    """

    name = "msgpack"
    msgpack_wire = True

    def __init__(
        self,
        default: Callable[[Any], Any] | None = None,
        ext_hook: Callable[[int, bytes], Any] | None = None,
    ) -> None:
        for opt, value in (("default", default), ("ext_hook", ext_hook)):
            if value is not None and not callable(value):
                raise TypeError(f"MsgpackCodec {opt} must be callable or None, not {value!r}")
        self.default = default
        self.ext_hook = ext_hook
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_local"]  # per-thread Packers stay in this process
        state.pop("_arena", None)  # the producer's: workers map their own, read-only
        state.pop("_shares", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _ext(self, code: int, data: bytes) -> Any:
        if code == EXT_SHARED and self._arena is not None:
            return self._arena.decode_copy(data)  # in the producer: a copy, if still held
        obj = builtin_from_ext(code, data)
        if obj is not None:
            return obj
        if self.ext_hook is not None and code in USER_EXT_CODES:
            return self.ext_hook(code, data)
        return msgpack.ExtType(code, data)

    # The hot path, with no call in between.
    encode = _MsgpackPacking._msgpack_encode

    def pack(self, obj: Any) -> bytes:
        """Serialize ``obj`` to MessagePack.

        Args:
            obj: Plain objects, numpy arrays, datetimes, dates, or what
                ``default`` converts.

        Returns:
            The serialized bytes.

        Raises:
            TypeError: ``obj`` holds something that cannot be serialized; the
                message names its type.
        """
        return self._msgpack_pack(obj)

    def unpack(self, data: Any) -> Any:
        """Deserialize what ``pack`` made.

        Args:
            data: A bytes-like object holding one MessagePack value.

        Returns:
            The value: tuples come back as lists, numpy arrays read-only, and
            extension codes ``ext_hook`` does not take as ``msgpack.ExtType``.
        """
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=self._ext)
        except TypeError as exc:
            if "unhashable" not in str(exc):
                raise
        # A map keyed by arrays (tuples when sent): build those maps one by one.
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            ext_hook=self._ext,
            object_pairs_hook=tuple_keys,
        )

    def _msgspec_ext(self, code: int, data: memoryview) -> Any:
        return self._ext(code, bytes(data))

    def unpacker(self, schema: Any = None) -> Callable[[Any], Any]:
        """Return the worker's ``payload -> [kind, t_ns, a, b]`` function.

        Untyped, msgspec reads this codec's MessagePack about twice as fast as
        ``msgpack`` and builds the same objects (the same hooks make extension
        values), so workers use it whenever ``unpack`` is ours.

        Args:
            schema: A type msgspec decodes into, or None for plain objects.

        Returns:
            A function ``payload -> [kind, t_ns, a, b]``.
        """
        decode_deep_enough()
        if schema is not None or type(self).unpack is not MsgpackCodec.unpack:
            return super().unpacker(schema)
        return msgspec.msgpack.Decoder(ext_hook=self._msgspec_ext).decode


class MsgspecCodec(_MsgpackPacking, Codec):
    """MessagePack through ``msgspec`` (the default codec): the same wire, faster.

    It writes byte for byte what ``MsgpackCodec`` writes and takes exactly the
    same objects (tests/test_codec_parity.py): dicts, lists, tuples, str,
    bytes, int, float, bool, None, ``datetime``, ``date`` and numpy arrays, and
    refuses the rest with the same ``TypeError``. msgspec encodes a notification
    made of plain containers and scalars, and numpy arrays; one holding anything
    msgspec would write its own way (a ``datetime`` or ``date``, which msgspec
    writes as text or a timestamp; a ``set``, ``Decimal`` or ``UUID``, which
    ``msgpack`` refuses; a subclass) or nested deeper than
    ``PLAIN_DEPTH`` levels is packed by the ``msgpack`` package instead, as
    ``MsgpackCodec`` packs it. With the native extensions, a notification of
    plain containers and scalars alone is written by fanout's own one-pass
    packer (``pack_plain``: the same bytes, a Pod in two thirds of the time
    msgspec and the walk that tells which objects are plain take together); the
    rest takes that walk, then msgspec or msgpack. Without the extensions
    msgpack packs everything. Decoding is msgspec's alone.
    """

    name = "msgspec"
    msgpack_wire = True
    default = None  # (MsgpackCodec's user hook: none here)

    def __init__(self) -> None:
        from fanout.native.pick import NATIVE, pack_plain, plain

        self._msgspec = msgspec
        # The pure-Python walk costs more than msgspec saves (a Pod: 850,000
        # instructions against msgpack's 180,000): without the extensions, msgpack
        # packs everything, as MsgpackCodec does.
        self._plain = plain if NATIVE else _never_plain
        self._pack_plain = pack_plain if NATIVE else _never_packed
        if not NATIVE and type(self).encode is MsgspecCodec.encode:  # not a subclass's
            self.encode = self._msgpack_encode  # type: ignore[method-assign]
        self._enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._dec = msgspec.msgpack.Decoder(ext_hook=self._ext_hook)
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_msgspec", "_plain", "_pack_plain", "_enc", "_dec", "_local"):  # rebuilt
            del state[name]
        state.pop("encode", None)
        state.pop("_arena", None)  # the producer's: workers map their own, read-only
        state.pop("_shares", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        MsgspecCodec.__init__(self)

    def _enc_hook(self, obj: Any) -> Any:
        # Called only for the numpy arrays ``_plain`` lets through, so the arena's
        # look at an array costs a notification without arrays nothing. The msgpack
        # packer's hook makes the same values.
        obj = self._default(obj)
        if type(obj) is msgpack.ExtType:
            return self._msgspec.msgpack.Ext(obj.code, obj.data)
        return obj

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code == EXT_SHARED and self._arena is not None:
            return self._arena.decode_copy(bytes(data))  # in the producer: a copy, if held
        obj = builtin_from_ext(code, bytes(data))
        return obj if obj is not None else self._msgspec.msgpack.Ext(code, bytes(data))

    _msgspec_ext = _ext_hook

    def unpacker(self, schema: Any = None) -> Callable[[Any], Any]:
        """Return the worker's ``payload -> [kind, t_ns, a, b]`` function.

        Args:
            schema: A type msgspec decodes into, or None for plain objects.

        Returns:
            A function ``payload -> [kind, t_ns, a, b]``.
        """
        decode_deep_enough()
        if schema is None and type(self).unpack is MsgspecCodec.unpack:
            return self._dec.decode  # the decoder itself: no wrapper call per frame
        return super().unpacker(schema)

    def encode(self, n: Notification, t_ns: int) -> bytes:
        """Encode a notification and its timestamp into one payload (the hot path).

        Args:
            n: The notification.
            t_ns: ``time.monotonic_ns()`` at ``distribute``.

        Returns:
            The payload.

        Raises:
            TypeError: ``n`` is not a notification, or holds an object the codec
                cannot serialize, or an integer out of MessagePack's range.
        """
        if type(n) is Update:
            old, new = n.old, n.new
            obj = [UPDATE_SAME, t_ns, new, None] if old is new else [UPDATE, t_ns, old, new]
        else:
            kind, a, b = to_wire(n)
            obj = [kind, t_ns, a, b]
        payload = self._pack_plain(obj, PLAIN_DEPTH)  # pack(), one call shorter
        if payload is not None:
            return payload
        if self._plain(obj, PLAIN_DEPTH, _plain_leaves[0]):
            try:
                return self._enc.encode(obj)
            except MSGSPEC_REFUSALS as exc:
                raise msgspec_failure(obj, exc) from exc
        return self._pack_other(obj)

    def arena_encoder(self, arena: Any) -> Callable[[Notification, int], bytes]:
        """The shared-memory arena's encode, with its check folded in: one native call.

        The steps of ``encode`` in a ``fanout.native.pick.Encoder``, which spares
        the common case (no array, a small payload) the arena's own frame: a
        payload under ``arena.min_bytes`` during which no encode met a big buffer
        (``arena._events``) is returned as it is; the rest goes on in
        ``arena._encode_shared``, and a failure to ``arena.encode_failed``.
        ``distribute``'s ``Feed`` runs it without a Python call.

        Args:
            arena: The ``fanout.buffers.arena.Arena`` this codec encodes for, or
                Ray's store (``fanout.buffers.ray_store.RayStore``): what has
                ``min_bytes``, ``_events``, ``_encode_shared`` and ``encode_failed``.

        Returns:
            ``encode(n, t_ns) -> payload``.
        """
        other = arena._encode_shared
        if self._plain is _never_plain or type(self).encode is not MsgspecCodec.encode:
            return other  # no native walk, or an encode of the user's: the full path
        from fanout.native.pick import Encoder

        def failed(obj: Any, events: int, exc: BaseException) -> None:
            if isinstance(exc, MSGSPEC_REFUSALS):
                failure = msgspec_failure(obj, exc)
                failure.__cause__ = exc
                exc = failure
            arena.encode_failed(events, exc)

        return Encoder(self._enc, _plain_leaves, PLAIN_DEPTH, arena, other, failed)

    def _pack_other(self, obj: Any) -> bytes:
        """Pack ``obj``, which the walk found not plain (numpy may have arrived since)."""
        if _more_plain_leaves():
            return self.pack(obj)
        return self._msgpack_pack(obj)  # as MsgpackCodec writes it

    def pack(self, obj: Any) -> bytes:
        """Serialize ``obj`` to MessagePack.

        Args:
            obj: Plain objects, numpy arrays, datetimes and dates.

        Returns:
            The serialized bytes.

        Raises:
            TypeError: ``obj`` holds something that cannot be serialized; the
                message names its type.
        """
        payload = self._pack_plain(obj, PLAIN_DEPTH)
        if payload is not None:
            return payload
        if not self._plain(obj, PLAIN_DEPTH, _plain_leaves[0]):
            return self._pack_other(obj)
        try:
            return self._enc.encode(obj)
        except MSGSPEC_REFUSALS as exc:
            raise msgspec_failure(obj, exc) from exc

    def unpack(self, data: Any) -> Any:
        """Deserialize what ``pack`` made.

        Args:
            data: A bytes-like object holding one MessagePack value.

        Returns:
            The value.
        """
        return self._dec.decode(data)


def get_codec(spec: Any) -> Codec:
    """Return the codec a ``Distributor(codec=...)`` argument names.

    Args:
        spec: ``"msgpack"``, ``"msgspec"`` or a ``Codec`` instance.

    Returns:
        A new codec for a name, or ``spec`` itself.

    Raises:
        TypeError: ``spec`` is a codec that does not survive pickling.
        ValueError: ``spec`` is neither a known name nor a codec.
    """
    if isinstance(spec, Codec):
        try:  # every worker gets a pickled copy: fail here, not in the workers
            pickle.loads(pickle.dumps(spec))
        except Exception as exc:
            raise TypeError(
                f"codec {spec!r} must survive pickling to reach the workers: {exc!r}"
            ) from exc
        return spec
    if spec == "msgpack":
        return MsgpackCodec()
    if spec == "msgspec":
        return MsgspecCodec()
    raise ValueError(
        f"codec must be 'msgpack', 'msgspec' or a fanout.Codec instance, got {spec!r}"
    )
