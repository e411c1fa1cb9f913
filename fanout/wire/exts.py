"""fanout's own MessagePack extension values: what both codecs write and read alike.

``datetime`` and ``date`` travel as ISO 8601 text, a numpy array as
``[dtype, shape, raw bytes]`` (decoded read-only without a second copy); references
to buffers kept beside the frame are resolved by ``fanout.wire.refs``. Tuples
travel as arrays, except as map keys, which decode as tuples again.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import msgpack

from fanout.wire.dtypes import dtype_from_wire, dtype_to_wire
from fanout.wire.protocol import EXT_DATE, EXT_DATETIME, EXT_NDARRAY, EXT_RAY_REF, EXT_SHARED
from fanout.wire.refs import resolve

__all__ = ["builtin_from_ext", "builtin_to_ext", "tuple_keys"]


def builtin_to_ext(obj: Any) -> Any:
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


def builtin_from_ext(code: int, data: bytes) -> Any:
    """Return the object of one of fanout's extension codes, or None for another code."""
    if code == EXT_NDARRAY:
        import numpy as np

        dtype, shape, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=dtype_from_wire(dtype)).reshape(shape)
    if code == EXT_DATETIME:
        return _dt.datetime.fromisoformat(data.decode())
    if code == EXT_DATE:
        return _dt.date.fromisoformat(data.decode())
    if code == EXT_SHARED or code == EXT_RAY_REF:
        return resolve(code, data)
    return None


def tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Build a map whose array keys (tuples when sent) become tuples again."""
    return {_hashable(k): v for k, v in pairs}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if type(key) is list else key
