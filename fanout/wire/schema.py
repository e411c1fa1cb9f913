"""Listener schemas: typed decoders, the checks a schema passes, and what a misfit says.

A listener's ``schema`` makes its workers decode each payload's objects as instances
of a type (msgspec does the decoding); a thread listener converts the objects it is
handed instead. An object that does not fit is reported by its role in the
notification (the object, the old or the new one), not by its place in the payload.
"""

from __future__ import annotations

import pickle
import typing
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from fanout.wire.protocol import ADD, DELETE, UPDATE, UPDATE_SAME

__all__ = [
    "check_schema",
    "describe_misfit",
    "misfit_text",
    "schema_converter",
    "schema_name",
    "typed_decoder",
]


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


def check_schema(schema: Any, codec: Any, in_process: bool) -> bytes | None:
    """Refuse a schema the listener could not decode into; pickle it for workers.

    ``codec`` is the distributor's ``Codec``: a process listener needs a MessagePack one.

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
