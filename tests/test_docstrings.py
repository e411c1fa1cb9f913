"""Every public parameter, return value and exception of the API is documented.

mkdocstrings renders these docstrings into the API reference, and ``mkdocs build
--strict`` fails on a documented parameter that does not exist, but not on one left
out: this test catches that. Google style: ``Args:``, ``Returns:``, ``Raises:``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import fanout
from fanout import stats
from fanout.listeners.base import Registration
from fanout.native import _ring_py
from fanout.wire import codec

# The documented API, by owner. A class stands for its constructor and its public
# methods; Registration's lifecycle methods are the distributor's business.
CLASSES: list[type] = [
    fanout.Distributor,
    fanout.RawFrame,
    fanout.WorkerStartError,
    fanout.RingClosed,
    fanout.Handler,
    fanout.FuncHandler,
    fanout.Add,
    fanout.Update,
    fanout.Delete,
    fanout.Codec,
    fanout.MsgpackCodec,
    fanout.MsgspecCodec,
    fanout.ListenerStats,
    fanout.FanoutError,
    fanout.RingFull,
    fanout.ListenerFull,
    fanout.DistributorStopped,
    _ring_py.Ring,
    _ring_py.FrameRing,
]
REGISTRATION_METHODS = [
    "has_synced",
    "wait_synced",
    "stats",
    "ready",
    "wait_ready",
    "latency_histogram",
    "worker_pids",
]
FUNCTIONS: list[Callable[..., Any]] = [
    codec.get_codec,
    stats.bucket_of,
    stats.percentile,
    _ring_py.append_all,
]
SECTION = re.compile(r"^(\s*)(Args|Arguments|Returns|Raises|Attributes):\s*$")


def _sections(doc: str) -> dict[str, list[str]]:
    """Map each Google-style section to the names (or types) it documents."""
    found: dict[str, list[str]] = {}
    lines = inspect.cleandoc(doc).splitlines()
    i = 0
    while i < len(lines):
        m = SECTION.match(lines[i])
        i += 1
        if not m:
            continue
        indent = len(m.group(1))
        names: list[str] = []
        item_indent = None
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
            line = lines[i]
            if line.strip():
                if item_indent is None:
                    item_indent = _indent(line)
                if _indent(line) == item_indent:
                    names.append(line.strip().split(":", 1)[0].split(" ", 1)[0])
            i += 1
        found[m.group(2)] = names
    return found


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _callables() -> Iterator[tuple[str, Callable[..., Any], str]]:
    """(name, callable, docstring that must document it) for the whole API."""
    for cls in CLASSES:
        if cls.__init__ is not object.__init__ and not issubclass(cls, BaseException):
            yield f"{cls.__qualname__}()", cls.__init__, cls.__doc__ or ""
        for name, member in vars(cls).items():
            if name.startswith("_") or not inspect.isfunction(member):
                continue
            yield f"{cls.__qualname__}.{name}", member, member.__doc__ or ""
    for name in REGISTRATION_METHODS:
        method = getattr(Registration, name)
        yield f"Registration.{name}", method, method.__doc__ or ""
    for func in FUNCTIONS:
        yield func.__qualname__, func, func.__doc__ or ""


CALLABLES = list(_callables())


@pytest.mark.parametrize(("name", "func", "doc"), CALLABLES, ids=[c[0] for c in CALLABLES])
def test_parameters_and_return_are_documented(
    name: str, func: Callable[..., Any], doc: str
) -> None:
    assert doc.strip(), f"{name} has no docstring"
    sections = _sections(doc)
    sig = inspect.signature(func)
    params = [p for p in sig.parameters if p not in ("self", "cls")]
    documented = sections.get("Args", [])
    if name.endswith("()"):  # a dataclass documents its fields, which are its arguments
        documented = documented + sections.get("Attributes", [])
    missing = [p for p in params if p not in documented]
    assert not missing, f"{name}: parameters missing from its Args section: {missing}"
    returns = sig.return_annotation
    if name.endswith("()") or returns in (None, "None", inspect.Signature.empty):
        return
    assert sections.get("Returns"), f"{name} returns {returns} but has no Returns section"


@pytest.mark.parametrize("cls", [fanout.ListenerStats], ids=lambda c: c.__qualname__)
def test_fields_are_documented(cls: type) -> None:
    documented = _sections(cls.__doc__ or "").get("Attributes", [])
    missing = [f for f in cls.__dataclass_fields__ if f not in documented]  # type: ignore[attr-defined]
    assert not missing, f"{cls.__qualname__}: fields missing from Attributes: {missing}"


def test_the_section_parser_reads_google_style() -> None:
    doc = """Summary.

    Args:
        first: One line.
        second: Two lines, the second
            indented further.

    Returns:
        Something.

    Raises:
        ValueError: When.
    """
    assert _sections(doc) == {
        "Args": ["first", "second"],
        "Returns": ["Something."],
        "Raises": ["ValueError"],
    }
