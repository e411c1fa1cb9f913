"""A listener's options, checked once at ``add_listener`` into a frozen ``ListenerOptions``.

Every check names the bad value and what to do; nothing is built or changed before
all of them passed, so a refused ``add_listener`` leaves no trace.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Hashable
from typing import Any

from fanout.core.ray_options import check_ray_options, import_ray, pickle_for_ray
from fanout.handlers import pickle_for_workers, resolve_handler
from fanout.wire.codec import Codec, check_schema
from fanout.wire.protocol import HEADER_SIZE

__all__ = [
    "EXECUTORS",
    "MIN_MEMORY_LIMIT",
    "OVERFLOW_POLICIES",
    "ListenerOptions",
    "check_flag",
    "check_name",
    "check_period",
    "listener_options",
]

EXECUTORS = ("process", "thread", "ray")
OVERFLOW_POLICIES = ("block", "drop_oldest", "drop_newest", "error")
_names = itertools.count(1)
# Below this a worker cannot even build its handler (a Python process alone holds
# several MiB of private memory): the limit would kill every start.
MIN_MEMORY_LIMIT = 16 << 20
# A name becomes part of OS object names (memfd "fanout-<name>", at most 249 bytes
# with the prefix) and of thread and process titles.
MAX_NAME_BYTES = 200


@dataclasses.dataclass(frozen=True)
class ListenerOptions:
    """One listener's options after every check (``add_listener`` documents each).

    ``handler_blob`` is the handler pickled for the workers (process and Ray
    listeners); ``schema_blob`` the schema pickled for them, when there is one.
    """

    name: str
    executor: str
    workers: int
    handler: Any
    is_factory: bool
    key: Callable[[Any], Hashable] | None
    resync_period: float | None
    max_pending_bytes: int | None
    overflow: str
    handler_timeout: float | None
    max_attempts: int
    on_error: Callable[..., Any] | None
    on_dead_letter: Callable[..., Any] | None
    schema: Any = None
    schema_blob: bytes | None = None
    handler_blob: bytes = b""
    ray_options: dict[str, Any] | None = None
    memory_limit: int | None = None


def check_period(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """``value`` as seconds (a finite number >= 0), or None when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def check_name(name: Any) -> str:
    """A listener name: a non-empty str of printable characters, at most 200 bytes."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, not {name!r}")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ValueError(
            f"name must be at most {MAX_NAME_BYTES} bytes in UTF-8 (it names the "
            f"listener's shared memory, threads and processes), got {size} bytes: "
            f"{name[:40]!r}..."
        )
    if not name.isprintable():
        raise ValueError(
            f"name must be printable (no NUL, newline or other control character), got {name!r}"
        )
    return name


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def listener_options(
    codec: Codec,
    handler: Any,
    name: Any,
    workers: Any,
    executor: Any,
    key: Any,
    resync_period: Any,
    max_pending_bytes: Any,
    overflow: Any,
    handler_timeout: Any,
    max_attempts: Any,
    on_error: Any,
    on_dead_letter: Any,
    schema: Any = None,
    ray_options: Any = None,
    memory_limit: Any = None,
) -> ListenerOptions:
    """Check every option of ``add_listener``; raise naming the bad one."""
    _check_executor(executor, ray_options)  # first: it may need Ray
    handler, is_factory = resolve_handler(handler)
    if name is None:
        name = f"listener-{next(_names)}"
    else:
        check_name(name)
    _check_int("workers", workers, 1)
    if key is not None and not callable(key):
        raise TypeError(f"key must be a function obj -> hashable, or None, not {key!r}")
    requested = check_period("resync_period", resync_period, allow_none=True)
    _check_sizes(max_pending_bytes, memory_limit)
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(
            f"overflow must be one of {', '.join(map(repr, OVERFLOW_POLICIES))}, got {overflow!r}"
        )
    timeout = _check_handler_timeout(handler_timeout)
    _check_int("max_attempts", max_attempts, 1)
    for opt, func in (("on_error", on_error), ("on_dead_letter", on_dead_letter)):
        if func is not None and not callable(func):
            raise TypeError(f"{opt} must be callable(reg, notification, text), not {func!r}")
    # msgspec decodes into it; refused here if it cannot (workers get it pickled)
    schema_blob = None if schema is None else check_schema(schema, codec, executor != "thread")
    if executor == "thread":
        _check_thread_options(workers, timeout, max_pending_bytes, memory_limit)
    handler_blob = b""
    if executor == "ray":
        ray_options = check_ray_options(ray_options)
        handler_blob = pickle_for_ray(handler)
    elif executor == "process":
        handler_blob = pickle_for_workers(handler)
    return ListenerOptions(
        name=name,
        executor=executor,
        workers=workers,
        handler=handler,
        is_factory=is_factory,
        key=key,
        resync_period=requested,
        max_pending_bytes=max_pending_bytes,
        overflow=overflow,
        handler_timeout=timeout,
        max_attempts=max_attempts,
        on_error=on_error,
        on_dead_letter=on_dead_letter,
        schema=schema,
        schema_blob=schema_blob,
        handler_blob=handler_blob,
        ray_options=ray_options,
        memory_limit=memory_limit,
    )


def _check_executor(executor: Any, ray_options: Any) -> None:
    """Refuse an unknown executor, Ray not installed, or ``ray_options`` without Ray."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be 'process', 'thread' or 'ray', got {executor!r}")
    if executor == "ray":
        import_ray()  # first: without Ray, say so before anything else
    elif ray_options is not None:
        raise ValueError(
            f"ray_options needs executor='ray' (got executor={executor!r}); drop it "
            f"or pass executor='ray'"
        )


def _check_sizes(max_pending_bytes: Any, memory_limit: Any) -> None:
    """Refuse a ``max_pending_bytes`` or ``memory_limit`` that is no int or too small."""
    if max_pending_bytes is not None:
        if isinstance(max_pending_bytes, bool) or not isinstance(max_pending_bytes, int):
            raise TypeError(f"max_pending_bytes must be an int or None, not {max_pending_bytes!r}")
        if max_pending_bytes <= HEADER_SIZE:
            raise ValueError(
                f"max_pending_bytes must exceed the {HEADER_SIZE}-byte frame header "
                f"(in practice: room for many notifications), got {max_pending_bytes}"
            )
    if memory_limit is not None:
        if isinstance(memory_limit, bool) or not isinstance(memory_limit, int):
            raise TypeError(f"memory_limit must be an int (bytes) or None, not {memory_limit!r}")
        if memory_limit < MIN_MEMORY_LIMIT:
            raise ValueError(
                f"memory_limit must be at least {MIN_MEMORY_LIMIT} bytes (16 MiB: a worker "
                f"needs that much to start), got {memory_limit}"
            )


def _check_handler_timeout(handler_timeout: Any) -> float | None:
    """``handler_timeout`` as seconds (a finite number > 0), or None for no limit."""
    if isinstance(handler_timeout, (int, float)) and not isinstance(handler_timeout, bool):
        if not (math.isfinite(handler_timeout) and handler_timeout > 0):
            raise ValueError(
                f"handler_timeout must be a finite number of seconds > 0, or None "
                f"for no limit, got {handler_timeout!r}"
            )
    return check_period("handler_timeout", handler_timeout, allow_none=True)


def _check_thread_options(
    workers: int, timeout: float | None, max_pending_bytes: Any, memory_limit: Any
) -> None:
    """Refuse the options only process listeners take, for a thread listener."""
    for opt, value, why in (
        ("workers", workers != 1, "a thread listener runs one thread"),
        ("handler_timeout", timeout is not None, "a thread cannot be stopped"),
        ("max_pending_bytes", max_pending_bytes is not None, "it passes objects, not bytes"),
        ("memory_limit", memory_limit is not None, "a thread shares this process's memory"),
    ):
        if value:
            raise ValueError(f"{opt} needs executor='process' ({why}); drop it or use processes")
