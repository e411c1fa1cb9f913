"""What the codecs say when they cannot encode an object: one message per cause.

Both codecs raise the same ``TypeError`` with the same words for the same object
(tests/test_codec_parity.py), whichever package refused it.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["MSGSPEC_REFUSALS", "encode_failure", "msgspec_failure", "unencodable"]

INT_RANGE = "-2**63 to 2**64-1"
# What msgspec raises for a value MessagePack cannot carry (an integer out of range).
MSGSPEC_REFUSALS = (OverflowError, ValueError, BufferError, msgspec.EncodeError)


def unencodable(obj: Any) -> TypeError:
    """The ``TypeError`` for an object no codec hook could turn into MessagePack."""
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


def msgspec_failure(obj: Any, exc: BaseException) -> TypeError:
    """What ``MsgspecCodec`` raises for what msgspec refused in ``obj`` (``exc``).

    ``obj`` is plain (``PLAIN_DEPTH`` levels at most), so looking through it is safe.
    """
    if not isinstance(exc, BufferError):
        big = _int_out_of_range(obj)  # said as MsgpackCodec says it
        if big is not None:
            return unencodable(big)
    return encode_failure(exc)


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
