"""The wire codec: a notification becomes one MessagePack payload, encoded once.

Payload layout: ``[kind, t_ns, a, b]``: kind 0 = Add(obj=a, is_in_initial_list=b),
1 = Update(old=a, new=b), 2 = Delete(obj=a), 3 = Update(old=a, new=a) (an update whose
old and new are the same object, as a resync sends: the object travels once and the
worker passes one decoded object as both); ``t_ns`` is ``time.monotonic_ns()`` at
``distribute`` (system-wide on Linux), so a worker can measure latency.

Extension types (MessagePack ext codes 1-5 are fanout's; 64-127 are the user's):
1 = numpy array (``[dtype.str, shape, raw bytes]``, decoded read-only without a
second copy), 2 = ``datetime``, 3 = ``date`` (both as ISO 8601 text), 4 = a buffer in
the distributor's shared-memory arena (``fanout.buffers.arena``: the frame carries only where
it is; the built-in codecs make them, and only for process listeners), 5 = a
buffer a Ray listener's actors read from Ray's object store (``fanout.buffers.ray_store``).
Tuples travel
as arrays (a handler gets lists), except as dict keys, which decode as tuples again.
"""

from __future__ import annotations

import datetime as _dt
import pickle
import sys
import threading
import typing
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import msgspec

from fanout.notifications import Add, Delete, Notification, Update
from fanout.wire.protocol import ADD, DELETE, UPDATE, UPDATE_SAME

__all__ = ["Codec", "MsgpackCodec", "MsgspecCodec", "get_codec"]

EXT_NDARRAY, EXT_DATETIME, EXT_DATE, EXT_SHARED = 1, 2, 3, 4
EXT_RAY_REF = 5  # a buffer in Ray's object store, for a Ray listener (fanout.buffers.ray_store)
INT_RANGE = "-2**63 to 2**64-1"
USER_EXT_CODES = range(64, 128)


def _unencodable(obj: Any) -> TypeError:
    cls = type(obj)
    if cls is int:
        return TypeError(
            f"cannot encode the integer {obj}: MessagePack integers range from "
            f"{INT_RANGE}; send a larger number as a str (or a float, if losing "
            f"precision is fine)"
        )
    return TypeError(
        f"cannot encode an object of type {cls.__module__}.{cls.__qualname__}: fanout's "
        f"codec takes dict, list, tuple, str, bytes, int, float, bool, None, datetime, "
        f"date and numpy arrays; convert it first, or pass codec=MsgpackCodec("
        f"default=...) to teach the codec the type"
    )


# MessagePack's packer refuses objects nested deeper than about 1000 levels; a
# decoder needs a recursion limit above that to read everything the packer wrote
# (msgspec follows Python's, 1000 by default), so workers raise theirs to this.
DECODE_RECURSION_LIMIT = 3000


def decode_deep_enough() -> None:
    """Let this process decode whatever the packer accepted (workers call it once)."""
    if sys.getrecursionlimit() < DECODE_RECURSION_LIMIT:
        sys.setrecursionlimit(DECODE_RECURSION_LIMIT)


def encode_failure(exc: BaseException) -> TypeError:
    """The ``TypeError`` ``distribute`` raises for what a packer refused (``exc``)."""
    if isinstance(exc, BufferError):
        return TypeError(
            f"cannot encode a non-contiguous buffer ({exc}): pass bytes(view), or a "
            f"numpy array (copied to contiguous once)"
        )
    if isinstance(exc, RecursionError) or "recursion limit" in str(exc):
        return TypeError(
            "cannot encode notification: its object is nested too deep for MessagePack "
            "(the limit is about 1000 levels of lists and dicts); flatten it, or send "
            "the deep part as a str or bytes"
        )
    return TypeError(f"cannot encode notification: {exc}")


# What msgspec raises for a value MessagePack cannot carry (an integer out of range).
_MSGSPEC_REFUSALS = (OverflowError, ValueError, BufferError, msgspec.EncodeError)


def _msgspec_failure(obj: Any, exc: BaseException) -> TypeError:
    """What ``MsgspecCodec`` raises for what msgspec refused in ``obj`` (``exc``).

    ``obj`` is plain (``PLAIN_DEPTH`` levels at most), so looking through it is safe.
    """
    if not isinstance(exc, BufferError):
        big = _int_out_of_range(obj)  # said as MsgpackCodec says it
        if big is not None:
            return _unencodable(big)
    return encode_failure(exc)


def dtype_to_wire(dt: Any) -> Any:
    """A numpy dtype as plain MessagePack values that ``dtype_from_wire`` rebuilds exactly.

    A plain dtype is its ``str`` (``"<f8"``); a structured one (``"|V12"`` as a
    ``str``, its fields lost) is a map of names, formats (recursively), offsets,
    itemsize, alignment and titles; a subarray field is ``[base, shape]``.
    """
    if dt.fields is None:
        if dt.subdtype is not None:
            base, shape = dt.subdtype
            return [dtype_to_wire(base), list(shape)]
        return dt.str
    names = list(dt.names)
    fields = [dt.fields[name] for name in names]
    wire = {
        "names": names,
        "formats": [dtype_to_wire(f[0]) for f in fields],
        "offsets": [f[1] for f in fields],
        "itemsize": dt.itemsize,
        "aligned": dt.isalignedstruct,
    }
    if any(len(f) > 2 for f in fields):
        wire["titles"] = [f[2] if len(f) > 2 else None for f in fields]
    return wire


def dtype_from_wire(wire: Any) -> Any:
    """The numpy dtype ``dtype_to_wire`` described."""
    import numpy as np

    if type(wire) is str:
        return np.dtype(wire)
    if type(wire) is list:
        return np.dtype((dtype_from_wire(wire[0]), tuple(wire[1])))
    spec: Any = dict(wire)
    aligned = spec.pop("aligned", False)
    spec["formats"] = [dtype_from_wire(f) for f in spec["formats"]]
    return np.dtype(spec, align=aligned)


def _int_out_of_range(obj: Any) -> int | None:
    """The first integer in ``obj`` that MessagePack cannot carry, or None.

    Only on an encode's error path: msgspec names no value when it refuses one.
    """
    cls = type(obj)
    if cls is int:
        return obj if not -(2**63) <= obj < 2**64 else None
    if cls is dict:
        items: Any = (x for pair in obj.items() for x in pair)
    elif cls in (list, tuple):
        items = obj
    else:
        return None
    for item in items:
        found = _int_out_of_range(item)
        if found is not None:
            return found
    return None


def _builtin_to_ext(obj: Any) -> Any:
    """Return ``(code, bytes)`` for a type fanout encodes itself, or None."""
    if isinstance(obj, _dt.datetime):
        return EXT_DATETIME, obj.isoformat().encode()
    if isinstance(obj, _dt.date):
        return EXT_DATE, obj.isoformat().encode()
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise TypeError(
                    "cannot encode a numpy array of dtype object: only arrays of plain "
                    "numbers, bools or fixed-size strings travel as raw bytes"
                )
            arr = np.ascontiguousarray(obj)  # (a 0-d array comes back 1-d: keep obj's shape)
            # Raw bytes through a uint8 view: datetime64 (alone or in a structured
            # dtype) has no buffer export of its own.
            raw = arr.reshape(-1).view(np.uint8).data
            dtype = dtype_to_wire(arr.dtype)
            body = msgpack.packb([dtype, list(obj.shape), raw], use_bin_type=True)
            return EXT_NDARRAY, body
    return None


def _builtin_from_ext(code: int, data: bytes) -> Any:
    if code == EXT_NDARRAY:
        import numpy as np

        dtype, shape, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=dtype_from_wire(dtype)).reshape(shape)
    if code == EXT_DATETIME:
        return _dt.datetime.fromisoformat(data.decode())
    if code == EXT_DATE:
        return _dt.date.fromisoformat(data.decode())
    if code == EXT_SHARED:
        from fanout.buffers.arena import decode_worker

        return decode_worker(data)
    if code == EXT_RAY_REF:
        from fanout.buffers.ray_store import resolve

        return resolve(data)
    return None


def _tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Build a map whose array keys (tuples when sent) become tuples again."""
    return {_hashable(k): v for k, v in pairs}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if type(key) is list else key


def _to_wire(n: Notification) -> tuple[int, Any, Any]:
    cls = type(n)
    if cls is Update:
        if n.old is n.new:  # type: ignore[union-attr]
            return UPDATE_SAME, n.new, None  # type: ignore[union-attr]
        return UPDATE, n.old, n.new  # type: ignore[union-attr]
    if cls is Add:
        return ADD, n.obj, n.is_in_initial_list  # type: ignore[union-attr]
    if cls is Delete:
        return DELETE, n.obj, None  # type: ignore[union-attr]
    raise TypeError(
        f"distribute takes fanout.Add, fanout.Update or fanout.Delete, not "
        f"{type(n).__name__} ({n!r:.80})"
    )


def typed_decoder(schema: Any, ext_hook: Callable[[int, memoryview], Any] | None) -> Any:
    """A msgspec ``Decoder`` of whole payloads whose objects come out as ``schema``.

    One decoder per payload, not per object: the fourth item is the new object
    of an update, the flag of an add, or nothing, hence the union.
    """
    union: Any = typing.Union
    payload: Any = tuple[int, int, schema, union[schema, bool, None]]
    return msgspec.msgpack.Decoder(payload, ext_hook=ext_hook)


def schema_name(schema: Any) -> str:
    """Name a schema type in messages: ``module.QualName`` for a class."""
    if isinstance(schema, type):
        return f"{schema.__module__}.{schema.__qualname__}"
    return repr(schema)


def _types_in(schema: Any) -> Iterator[Any]:
    yield schema
    for arg in typing.get_args(schema):
        yield from _types_in(arg)


def check_schema(schema: Any, codec: Codec, in_process: bool) -> bytes | None:
    """Refuse a schema the listener could not decode into; pickle it for workers.

    Returns the pickled schema for a process listener, None for a thread one.
    """
    try:
        msgspec.msgpack.Decoder(schema)  # msgspec's own words about the type itself
        typed_decoder(schema, None)
    except Exception as exc:
        raise TypeError(
            f"schema {schema!r} is not a type msgspec can decode into ({exc}); use a "
            f"msgspec.Struct, a dataclass or a TypedDict"
        ) from exc
    if not in_process:
        return None
    if not codec.msgpack_wire:
        raise TypeError(
            f"schema= needs a MessagePack codec to decode in the workers; codec "
            f"{codec!r} is not one: use codec='msgpack' or 'msgspec'"
        )
    from fanout.handlers import main_has_no_file

    if main_has_no_file():
        for t in _types_in(schema):
            if getattr(t, "__module__", None) == "__main__":
                raise TypeError(
                    f"schema {schema_name(schema)} uses {t!r}, defined in a __main__ that "
                    f"has no file (stdin, python -c, a REPL or a notebook), so worker "
                    f"processes cannot import it; define it in an importable module, or "
                    f"use executor='thread'"
                )
    try:
        return pickle.dumps(schema, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"schema {schema!r} cannot be pickled for the worker processes ({exc}); "
            f"define it at module level in an importable module, or use executor='thread'"
        ) from exc


# (kind, payload index) -> which object sits there; index 3 of an add is its flag.
_ROLES = {
    (ADD, 2): "object",
    (DELETE, 2): "object",
    (UPDATE_SAME, 2): "object",
    (UPDATE, 2): "old object",
    (UPDATE, 3): "new object",
}


def misfit_text(schema: Any, role: str, error: str) -> str:
    """Say that the ``role`` object does not fit ``schema``, with msgspec's words."""
    return f"the {role} does not fit schema {schema_name(schema)}: {error}"


def describe_misfit(schema: Any, payload: bytes, exc: BaseException) -> str | None:
    """Turn a typed decoder's error into a misfit text, or None if no object is at fault.

    msgspec locates the error in the whole payload (``$[3].metadata``); the text
    names the object instead and gives the path inside it (``$.metadata``).
    """
    text = str(exc)
    # A payload is a 4-array (0x94) whose first item, the kind, is a positive fixint.
    kind = payload[1] if len(payload) > 1 and payload[0] == 0x94 else None
    for index in (2, 3):
        prefix = f"`$[{index}]"
        if prefix in text:
            role = _ROLES.get((kind, index))  # type: ignore[arg-type]
            if role is None:
                return None
            return misfit_text(schema, role, text.replace(prefix, "`$", 1))
    return None


def schema_converter(schema: Any) -> Callable[[Any], Any]:
    """``obj -> schema instance`` for thread listeners (``msgspec.convert``)."""
    convert = msgspec.convert

    def to_schema(obj: Any) -> Any:
        return convert(obj, schema)

    return to_schema


def from_wire(kind: int, a: Any, b: Any) -> Notification:
    """Rebuild the notification a payload carried."""
    if kind == UPDATE:
        return Update(a, b)
    if kind == ADD:
        return Add(a, bool(b))
    if kind == DELETE:
        return Delete(a)
    if kind == UPDATE_SAME:
        return Update(a, a)
    raise ValueError(f"unknown notification kind {kind!r} in payload")


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
        kind, a, b = _to_wire(n)
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
        obj = _builtin_from_ext(code, bytes(data))
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
        ext = _builtin_to_ext(obj)
        if ext is not None:
            return msgpack.ExtType(*ext)
        if type(obj).__module__ == "numpy" and hasattr(obj, "item"):
            return obj.item()  # numpy scalar
        if type(obj) is msgspec.msgpack.Ext:  # as MsgspecCodec takes it
            return msgpack.ExtType(obj.code, obj.data)
        if self.default is not None:
            return self.default(obj)
        raise _unencodable(obj)

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
        obj = _builtin_from_ext(code, data)
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
            object_pairs_hook=_tuple_keys,
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
    ``MsgpackCodec`` packs it. Telling which costs one native walk over the
    object (for a Kubernetes Pod, 40 % of msgspec's encode, which is a third of
    msgpack's); without the native extensions msgpack packs everything.
    Decoding is msgspec's alone.
    """

    name = "msgspec"
    msgpack_wire = True
    default = None  # (MsgpackCodec's user hook: none here)

    def __init__(self) -> None:
        from fanout.native.pick import NATIVE, plain

        self._msgspec = msgspec
        # The pure-Python walk costs more than msgspec saves (a Pod: 850,000
        # instructions against msgpack's 180,000): without the extensions, msgpack
        # packs everything, as MsgpackCodec does.
        self._plain = plain if NATIVE else _never_plain
        if not NATIVE and type(self).encode is MsgspecCodec.encode:  # not a subclass's
            self.encode = self._msgpack_encode  # type: ignore[method-assign]
        self._enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._dec = msgspec.msgpack.Decoder(ext_hook=self._ext_hook)
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_msgspec", "_plain", "_enc", "_dec", "_local"):  # rebuilt there
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
        obj = _builtin_from_ext(code, bytes(data))
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
            kind, a, b = _to_wire(n)
            obj = [kind, t_ns, a, b]
        if self._plain(obj, PLAIN_DEPTH, _plain_leaves[0]):  # pack(), one call shorter
            try:
                return self._enc.encode(obj)
            except _MSGSPEC_REFUSALS as exc:
                raise _msgspec_failure(obj, exc) from exc
        return self._pack_other(obj)

    def arena_encoder(self, arena: Any) -> Callable[[Notification, int], bytes]:
        """The shared-memory arena's encode, with its check folded in: one Python call.

        The steps of ``encode``, repeated to spare the common case (no array, a
        small payload) the arena's own frame, about 2,000 instructions a call:
        a payload under ``arena.min_bytes`` during which no encode met a big
        buffer (``arena._events``) is returned as it is; the rest goes on in
        ``arena._encode_shared``, and a failure to ``arena.encode_failed``.

        Args:
            arena: The ``fanout.buffers.arena.Arena`` this codec encodes for.

        Returns:
            ``encode(n, t_ns) -> payload``.
        """
        other = arena._encode_shared
        if self._plain is _never_plain or type(self).encode is not MsgspecCodec.encode:
            return other  # no native walk, or an encode of the user's: the full path
        enc, plain, leaves, min_bytes = (
            self._enc.encode,
            self._plain,
            _plain_leaves,
            arena.min_bytes,
        )

        def encode(n: Notification, t_ns: int) -> bytes:
            if type(n) is Update:
                old, new = n.old, n.new
                obj = [UPDATE_SAME, t_ns, new, None] if old is new else [UPDATE, t_ns, old, new]
            else:
                kind, a, b = _to_wire(n)
                obj = [kind, t_ns, a, b]
            if not plain(obj, PLAIN_DEPTH, leaves[0]):
                return other(n, t_ns)  # packed by msgpack: the arena's own path
            events = arena._events
            try:
                payload = enc(obj)
            except _MSGSPEC_REFUSALS as exc:
                failure = _msgspec_failure(obj, exc)
                failure.__cause__ = exc
                arena.encode_failed(events, failure)
            except BaseException as exc:
                arena.encode_failed(events, exc)
            if arena._events == events and len(payload) < min_bytes:
                return payload
            return other(n, t_ns, payload, events)

        return encode

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
        if not self._plain(obj, PLAIN_DEPTH, _plain_leaves[0]):
            return self._pack_other(obj)
        try:
            return self._enc.encode(obj)
        except _MSGSPEC_REFUSALS as exc:
            raise _msgspec_failure(obj, exc) from exc

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
