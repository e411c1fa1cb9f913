"""Find a notification's big buffers and swap them for references, before it is encoded.

The shared-memory arena and the Ray object store both keep big buffers beside the
frame: this walk hands each buffer to their ``share`` function and builds the
notification the codec then encodes, with references in the buffers' places.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fanout.notifications import Add, Delete, Update

__all__ = ["swap_buffers"]


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
