"""References in a frame to buffers kept beside it, and the hooks that resolve them.

Two extension codes stand for a buffer that does not travel in the frame:

* ``EXT_SHARED``: a block of the producer's shared-memory arena. Its body is the
  MessagePack array ``[kind, offset, length, serial, dtype, shape, fortran]``:
  kind ``KIND_ARRAY`` (``dtype`` as ``dtype_to_wire`` writes it, the shape, and
  whether the block holds the array in Fortran order) or ``KIND_BYTES`` (``dtype``
  and ``shape`` None). ``serial`` tells a block from a later one at the same offset.
* ``EXT_RAY_REF``: an object in Ray's object store. Its body is a token (an int)
  that the producer's store, and a Ray actor for the batch it handles, map to an
  ``ObjectRef``.

The codecs do not know where those buffers are: the side that holds them adds a
resolver (``add_resolver``): a worker once it mapped the arena, the producer's Ray
store, a Ray actor's batch references. The producer's arena decodes its own
references before any resolver is asked (``Codec._arena``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from fanout.wire.dtypes import array_over, dtype_from_wire
from fanout.wire.protocol import EXT_RAY_REF, EXT_SHARED

__all__ = [
    "KIND_ARRAY",
    "KIND_BYTES",
    "add_resolver",
    "ray_ref",
    "ray_token",
    "read_shared",
    "resolve",
    "shared_key",
    "shared_ref",
]

# What an ``EXT_SHARED`` reference stands for.
KIND_ARRAY, KIND_BYTES = 0, 1

# A resolver: ``body -> object``, or None when the reference is not one it holds.
Resolver = Callable[[bytes], Any]
# ext code -> resolvers, asked in the order they were added. Replaced whole, never
# changed in place, so a decode in another thread reads one consistent tuple.
_resolvers: dict[int, tuple[Resolver, ...]] = {}


def shared_ref(
    kind: int, offset: int, length: int, serial: int, dtype: Any, shape: Any, fortran: bool
) -> msgpack.ExtType:
    """The ``EXT_SHARED`` value that stands for a buffer in an arena block."""
    body = msgpack.packb([kind, offset, length, serial, dtype, shape, fortran])
    return msgpack.ExtType(EXT_SHARED, body)


def shared_key(body: bytes) -> tuple[int, int]:
    """The ``(offset, serial)`` of the block an ``EXT_SHARED`` body refers to."""
    _kind, offset, _length, serial = msgpack.unpackb(body)[:4]
    return offset, serial


def read_shared(body: bytes, view: memoryview, copy: bool, base: int = 0) -> Any:
    """The object an ``EXT_SHARED`` body stands for; ``view`` holds the arena from ``base``.

    A bytes-like buffer comes back as ``bytes``; an array as a read-only view of
    ``view``, or with ``copy`` as a read-only array of its own.
    """
    kind, offset, length, _serial, dtype, shape, fortran = msgpack.unpackb(body)
    raw = view[offset - base : offset - base + length]
    if kind == KIND_BYTES:
        return bytes(raw)
    arr = array_over(raw, dtype_from_wire(dtype), shape, fortran)
    if copy:
        arr = arr.copy(order="K")
        arr.flags.writeable = False
    return arr


def ray_ref(token: int) -> msgpack.ExtType:
    """The ``EXT_RAY_REF`` value that stands for the object store entry ``token``."""
    return msgpack.ExtType(EXT_RAY_REF, msgpack.packb(token))


def ray_token(body: bytes) -> int:
    """The token an ``EXT_RAY_REF`` body carries."""
    token: int = msgpack.unpackb(body)
    return token


def add_resolver(code: int, resolver: Resolver) -> None:
    """Let ``resolver`` find the objects of references with ext ``code`` in this process.

    Adding the same resolver again changes nothing.
    """
    known = _resolvers.get(code, ())
    if resolver not in known:
        _resolvers[code] = (*known, resolver)


def resolve(code: int, body: bytes) -> Any:
    """The object a reference (``EXT_SHARED`` or ``EXT_RAY_REF``) stands for.

    Raises:
        ValueError: No resolver of this process holds it.
    """
    for resolver in _resolvers.get(code, ()):
        obj = resolver(body)
        if obj is not None:
            return obj
    if code == EXT_SHARED:
        raise ValueError(
            "a shared-memory reference arrived, but this process has no arena mapped "
            "(it is not a worker of the distributor that made it)"
        )
    raise ValueError(f"the Ray object of reference {ray_token(body)} is gone")
