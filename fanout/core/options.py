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
from fanout.wire.codec import Codec
from fanout.wire.protocol import HEADER_SIZE
from fanout.wire.schema import check_schema

__all__ = [
    "EXECUTORS",
    "MIN_MEMORY_LIMIT",
    "OVERFLOW_POLICIES",
    "START_METHODS",
    "ListenerOptions",
    "check_flag",
    "check_name",
    "check_period",
    "check_start_method",
    "listener_options",
]

START_METHODS = ("forkserver", "spawn")
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
    """One listener's options after every check: what each of ``add_listener``'s does.

    Attributes:
        name: The listener's name in stats, logs and metrics; default
            ``listener-N``.
        executor: ``"process"`` (default): worker processes fed over pipes,
            isolated by the OS. ``"thread"``: one thread in this process,
            fed the objects themselves (cheap, trusted handlers). ``"ray"``:
            ``workers`` Ray actors, on any node of the Ray cluster, fed in
            batches (``pip install 'fanout-informer[ray]'``); fanout uses the
            cluster ``ray.init`` connected to, or starts a local one for the
            distributor's lifetime.
        workers: Worker processes (lanes) of a process listener. Order is
            kept per key always, and per listener with ``workers=1``.
        handler: A ``fanout.Handler`` (any object with ``on_add``,
            ``on_update`` and ``on_delete``), or a zero-argument class or
            factory that builds one. For process listeners an instance is
            pickled (each worker gets a copy) and a factory is called once
            in each worker; either must be importable by the workers, so
            not defined in a ``__main__`` without a file.
        is_factory: ``handler`` is a class or factory, called in each worker.
        key: ``obj -> hashable`` choosing the lane of a notification (of the
            new object for an update); default: ``(namespace, name)`` from
            ``obj["metadata"]`` when present, else round-robin.
        resync_period: Seconds between resyncs of this listener (None: the
            distributor's check period; 0: never). Clamped as client-go
            does; ``Registration.resync_period`` tells the result.
        max_pending_bytes: Bound on the bytes one lane holds (process
            listeners): its frames and the shared-memory blocks they refer
            to; None: unbounded (the ring still shrinks back).
        overflow: What a full bounded lane does: ``"block"`` (distribute
            waits; before ``start()`` it raises ``ListenerFull``),
            ``"drop_oldest"``, ``"drop_newest"`` (counted in ``dropped``)
            or ``"error"`` (``distribute`` raises ``ListenerFull`` and no
            listener gets the notification).
        handler_timeout: Seconds a handler call may run before its worker
            is killed and restarted (process listeners); None: no limit.
        max_attempts: Handler calls a notification may kill its worker in
            before it is dead-lettered.
        on_error: ``f(reg, notification, traceback_text)`` called for every
            handler exception, in fanout's supervisor thread (in the
            listener's own thread for ``executor="thread"``).
        on_dead_letter: ``f(reg, notification, reason)`` called for every
            notification given up on; an undecodable frame arrives as a
            ``fanout.RawFrame``.
        schema: A type msgspec decodes into (a ``msgspec.Struct``, a
            dataclass, a ``TypedDict``): the workers decode each object
            straight into it, skipping the fields it does not declare. An
            object that does not fit is dead-lettered at once. Thread
            listeners get ``msgspec.convert(obj, schema)``.
        schema_blob: ``schema`` pickled for the workers, when there is one.
        handler_blob: ``handler`` pickled for the workers (process and Ray
            listeners).
        ray_options: Ray actor options for each worker of a Ray listener
            (``num_cpus``, ``num_gpus``, ``resources``, ``memory``,
            ``runtime_env``, ``scheduling_strategy``, ...), checked by Ray
            here. fanout sets ``max_restarts=-1`` and no task retries
            itself, so those and the options that would break per-key
            order are refused. Only with ``executor="ray"``.
        memory_limit: Bytes of private resident memory (``RssAnon``) a
            worker of a process or Ray listener may hold, what it started
            included; past it the worker is killed within a second and
            restarted, and its notification counts an attempt (dead-lettered
            after ``max_attempts``, naming ``memory_limit``). At least 16
            MiB, and leave room: a fresh worker holds about 25 MiB. A Ray
            listener's limit counts the whole actor process, Ray's runtime
            included: an actor holding more at rest does not start
            (``WorkerStartError``). None: no limit.
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


def check_start_method(start_method: Any) -> None:
    """Refuse a start method other than ``"forkserver"`` and ``"spawn"``, saying why."""
    if start_method == "fork":
        raise ValueError(
            "start_method='fork' is unsafe: the pump and supervisor threads may hold "
            "locks at fork time; use 'forkserver' (default) or 'spawn'"
        )
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")


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
