"""Which objects the two MessagePack packages encode alike, in pure Python.

The twin of the native ``plain`` (compiled from ``_plain.pxi`` into
``fanout.native._ring``); ``fanout.native._ring_py`` names it beside the other twins.
"""

from __future__ import annotations

from typing import Any

__all__ = ["plain"]


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
