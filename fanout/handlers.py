"""Handlers: what a listener calls for each notification."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["FuncHandler", "Handler", "build_handler", "resolve_handler"]

_METHODS = ("on_add", "on_update", "on_delete")


class Handler:
    """Base class of handlers; every method is a no-op until overridden.

    A handler given to a process listener is pickled to each worker (each gets a
    copy), or given as a zero-argument class or factory that each worker calls
    once (for handlers that open connections or hold unpicklable state).
    """

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        """Handle an object that appeared."""

    def on_update(self, old: Any, new: Any) -> None:
        """Handle an object that changed."""

    def on_delete(self, obj: Any) -> None:
        """Handle an object that went away."""


class FuncHandler(Handler):
    """A handler made of plain functions (module-level, so it pickles).

    Options:
        on_add: ``f(obj, is_in_initial_list)`` or None.
        on_update: ``f(old, new)`` or None.
        on_delete: ``f(obj)`` or None.
    """

    __slots__ = ("_on_add", "_on_delete", "_on_update")

    def __init__(
        self,
        on_add: Callable[[Any, bool], Any] | None = None,
        on_update: Callable[[Any, Any], Any] | None = None,
        on_delete: Callable[[Any], Any] | None = None,
    ) -> None:
        for name, func in (("on_add", on_add), ("on_update", on_update), ("on_delete", on_delete)):
            if func is not None and not callable(func):
                raise TypeError(f"FuncHandler {name} must be callable or None, not {func!r}")
        self._on_add = on_add
        self._on_update = on_update
        self._on_delete = on_delete

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        """Call the ``on_add`` function, if any."""
        if self._on_add is not None:
            self._on_add(obj, is_in_initial_list)

    def on_update(self, old: Any, new: Any) -> None:
        """Call the ``on_update`` function, if any."""
        if self._on_update is not None:
            self._on_update(old, new)

    def on_delete(self, obj: Any) -> None:
        """Call the ``on_delete`` function, if any."""
        if self._on_delete is not None:
            self._on_delete(obj)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FuncHandler, (self._on_add, self._on_update, self._on_delete))


def is_handler(obj: Any) -> bool:
    """Tell whether ``obj`` has the three handler methods."""
    return not isinstance(obj, type) and all(callable(getattr(obj, m, None)) for m in _METHODS)


def resolve_handler(handler: Any) -> tuple[Any, bool]:
    """Return ``(handler, is_factory)`` or raise ``TypeError`` saying what is accepted."""
    if is_handler(handler):
        return handler, False
    if isinstance(handler, type) or (callable(handler) and not is_handler(handler)):
        try:
            sig = inspect.signature(handler)
            sig.bind()
        except TypeError:
            raise TypeError(
                f"handler factory {handler!r} must be callable with no arguments; "
                f"wrap it (functools.partial) or pass a handler instance"
            ) from None
        except ValueError:
            pass  # no signature to inspect (a builtin): it will be called and checked
        return handler, True
    raise TypeError(
        f"handler must be a fanout.Handler (an object with on_add, on_update and "
        f"on_delete) or a zero-argument class or factory that returns one, "
        f"not {type(handler).__name__} ({handler!r:.80})"
    )


def build_handler(handler: Any, is_factory: bool) -> Any:
    """Call a factory once and check what it returned (instances pass through)."""
    if not is_factory:
        return handler
    made = handler()
    if not is_handler(made):
        raise TypeError(
            f"handler factory {handler!r} returned {type(made).__name__}, which has no "
            f"on_add / on_update / on_delete methods"
        )
    return made
