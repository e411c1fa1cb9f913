"""Handlers: what a listener calls for each notification."""

from __future__ import annotations

import ast
import inspect
import io
import os
import pickle
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["FuncHandler", "Handler", "build_handler", "pickle_for_workers", "resolve_handler"]

_METHODS = ("on_add", "on_update", "on_delete")


class Handler:
    """Base class of handlers; every method is a no-op until overridden.

    Override the methods for the notifications you care about. Any object with
    these three methods is accepted as a handler; subclassing is a convenience.

    A handler given to a process listener is pickled to each worker (each gets a
    copy), or given as a zero-argument class or factory that each worker calls
    once (for handlers that open connections or hold unpicklable state). Either
    way it must be importable by the workers: defined at module level in a
    module that has a file.

    What a method raises is logged, counted in ``ListenerStats.errors`` and passed
    to the listener's ``on_error``; the notification is not retried.
    """

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        """Handle an object that appeared (client-go ``OnAdd``).

        Args:
            obj: The object, as the codec decoded it.
            is_in_initial_list: True when the object comes from the listener's
                ``initial_list`` (the state when it joined), False for a live add.
        """

    def on_update(self, old: Any, new: Any) -> None:
        """Handle an object that changed (client-go ``OnUpdate``).

        A producer usually distributes a resync as ``Update(obj, obj)``: then
        ``old`` and ``new`` are equal.

        Args:
            old: The object's previous state.
            new: The object's new state.
        """

    def on_delete(self, obj: Any) -> None:
        """Handle an object that went away (client-go ``OnDelete``).

        Args:
            obj: The last known state of the object.
        """


class FuncHandler(Handler):
    """A handler made of plain functions (client-go ``ResourceEventHandlerFuncs``).

    The functions must be defined at module level, so that the handler pickles
    to worker processes; a notification without a function is ignored.

    Args:
        on_add: ``f(obj, is_in_initial_list)``, or None to ignore adds.
        on_update: ``f(old, new)``, or None to ignore updates.
        on_delete: ``f(obj)``, or None to ignore deletes.

    Raises:
        TypeError: One of the arguments is neither callable nor None.
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
        """Call the ``on_add`` function, if any.

        Args:
            obj: The object that appeared.
            is_in_initial_list: True for an item of the listener's initial list.
        """
        if self._on_add is not None:
            self._on_add(obj, is_in_initial_list)

    def on_update(self, old: Any, new: Any) -> None:
        """Call the ``on_update`` function, if any.

        Args:
            old: The object's previous state.
            new: The object's new state.
        """
        if self._on_update is not None:
            self._on_update(old, new)

    def on_delete(self, obj: Any) -> None:
        """Call the ``on_delete`` function, if any.

        Args:
            obj: The last known state of the object.
        """
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
                f"handler {handler!r} takes arguments, but a callable handler is a "
                f"factory called with none to build a handler in each worker. For "
                f"plain functions use fanout.FuncHandler(on_add=..., on_update=..., "
                f"on_delete=...); for a factory that needs arguments, bind them with "
                f"functools.partial"
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


def main_has_no_file() -> bool:
    """Tell whether ``__main__`` cannot be imported again by a worker (stdin, -c, REPL)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return not isinstance(path, str) or not os.path.isfile(path)


def _is_main_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"``, either way round."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    sides = [test.left, test.comparators[0]]
    return (
        isinstance(test.ops[0], ast.Eq)
        and any(isinstance(a, ast.Name) and a.id == "__name__" for a in sides)
        and any(isinstance(a, ast.Constant) and a.value == "__main__" for a in sides)
    )


def _bound_names(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        return {stmt.name}
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    return {
        n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }


def only_under_main_guard(qualnames: Iterable[str]) -> list[str]:
    """Which of these ``__main__`` names the script binds only under its main guard.

    A worker process imports the main script as ``__mp_main__``, which skips the
    ``if __name__ == "__main__":`` block: what is defined only there, it cannot find.
    Read from the script's source; anything bound elsewhere too is given the benefit
    of the doubt.
    """
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        tree = ast.parse(Path(path).read_bytes())  # type: ignore[arg-type]
    except (OSError, SyntaxError, ValueError, TypeError):
        return []
    outside: set[str] = set()
    guarded: set[str] = set()

    def visit(stmts: list[ast.stmt], under_guard: bool) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.If) and _is_main_guard(stmt.test):
                visit(stmt.body, True)
                visit(stmt.orelse, under_guard)
                continue
            blocks = [getattr(stmt, f, []) for f in ("body", "orelse", "finalbody")]
            blocks += [h.body for h in getattr(stmt, "handlers", [])]
            if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                blocks = []  # their bodies bind nothing at module level
            if any(blocks):
                for block in blocks:
                    visit(block, under_guard)
            else:
                (guarded if under_guard else outside).update(_bound_names(stmt))

    visit(tree.body, False)
    return sorted({q for q in qualnames if q.split(".")[0] in guarded - outside})


class _WorkerPickler(pickle.Pickler):
    """Pickles a handler and notes every class or function it names in ``__main__``."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.from_main: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if (isinstance(obj, type) or inspect.isfunction(obj)) and getattr(
            obj, "__module__", None
        ) == "__main__":
            self.from_main.append(getattr(obj, "__qualname__", repr(obj)))
        return NotImplemented  # pickle it the usual way


def pickle_for_workers(handler: Any) -> bytes:
    """Pickle ``handler`` for worker processes, or raise ``TypeError`` saying why not.

    A class or function defined in a ``__main__`` that has no file (a script read
    from stdin, ``python -c``, a REPL, a notebook) pickles by name, but a worker
    process cannot import it again: refused here, naming both ways out.
    """
    buf = io.BytesIO()
    pickler = _WorkerPickler(buf)
    try:
        pickler.dump(handler)
    except Exception as exc:
        raise TypeError(
            f"handler {handler!r:.80} cannot be pickled for the worker processes "
            f"({exc}); pass a zero-argument class or module-level factory that "
            f"builds it in each worker, or use executor='thread'"
        ) from exc
    if pickler.from_main and main_has_no_file():
        names = ", ".join(sorted(set(pickler.from_main)))
        raise TypeError(
            f"handler {handler!r:.80} uses {names}, defined in __main__, but this "
            f"__main__ has no file (stdin, python -c, a REPL or a notebook), so worker "
            f"processes cannot import it. Define it in a module the workers can import "
            f"(a .py file), or pass executor='thread' to run it in this process "
            f"(without workers=, handler_timeout= and max_pending_bytes=, which "
            f"only processes take)"
        )
    guarded = only_under_main_guard(pickler.from_main)
    if guarded:
        raise TypeError(
            f"handler {handler!r:.80} uses {', '.join(guarded)}, defined under "
            f'`if __name__ == "__main__":` in {sys.modules["__main__"].__file__}. Worker '
            f"processes import that script without running that block, so they cannot "
            f"find it. Define it at module level, above the guard (or in a module the "
            f"workers can import)"
        )
    return buf.getvalue()
