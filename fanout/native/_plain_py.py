"""Which objects the two MessagePack packages encode alike, in pure Python.

The twins of the native ``plain`` and ``pack_plain`` (compiled from ``_plain.pxi``
and ``_pack.pxi`` into ``fanout.native._ring``); ``fanout.native._ring_py`` names
them beside the other twins.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["pack_plain", "plain"]

_encode = msgspec.msgpack.Encoder().encode


def pack_plain(obj: Any, depth: int) -> bytes | None:
    """MessagePack of ``obj`` when ``plain(obj, depth, ())`` holds, in one pass; else None.

    The bytes msgpack and msgspec both write. None also for what they would
    refuse or write apart: an int outside -2**63 .. 2**64 - 1, a str with a
    lone surrogate, a container with more than 2**32 - 1 items. (Here, the walk
    and then msgspec: two passes.)
    """
    if not plain(obj, depth, ()):
        return None
    try:
        return _encode(obj)
    except (OverflowError, UnicodeEncodeError, ValueError):
        return None


def plain(obj: Any, depth: int, leaves: tuple[type, ...]) -> bool:
    """Whether ``obj`` holds only what msgspec and msgpack encode to the same bytes.

    Exactly dicts (keyed by str, int or bytes), lists, tuples, str, bytes, int,
    float, bool and None, nested at most ``depth`` levels, and instances of the
    types in ``leaves`` (a tuple) anywhere. Anything else (a datetime, a set, a
    subclass) answers False.
    """
    t = type(obj)
    if t in _SCALARS:
        return True
    if t is dict:
        return depth > 0 and all(
            type(k) in _KEYS and plain(v, depth - 1, leaves) for k, v in obj.items()
        )
    if t is list or t is tuple:
        return depth > 0 and all(plain(v, depth - 1, leaves) for v in obj)
    return t in leaves


_SCALARS = frozenset((str, int, float, bool, bytes, type(None)))
_KEYS = frozenset((str, int, bytes))
