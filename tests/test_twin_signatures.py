"""Each native module and its pure-Python twin expose the same callables, taking the same
parameters (names, kinds, defaults) as ``inspect.signature`` reports them.

The behaviour tables (test_frame_ring_twins.py, test_ring.py, test_pump.py,
test_worker_loop.py) compare what the twins do; this one compares what a caller and
the API reference see: a parameter only one twin takes, or one it names differently,
or a callable without a signature, shows here.
"""

from __future__ import annotations

import importlib
import inspect
import types
from typing import Any

import pytest
from helpers import twin_cases

import fanout

TWINS = {
    "fanout.native._ring": "fanout.native._ring_py",
    "fanout.native._pump": "fanout.native._pump_py",
    "fanout.native._worker": "fanout.native._worker_py",
}


def _native(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:  # pure-Python build
        return None


def _callables(mod: types.ModuleType) -> dict[str, Any]:
    """``{"Class": cls, "Class.method": method, "function": function}`` of ``__all__``."""
    found: dict[str, Any] = {}
    for name in mod.__all__:
        obj = getattr(mod, name)
        if isinstance(obj, type):
            found[name] = obj
            for attr in dir(obj):
                member = getattr(obj, attr)
                if not attr.startswith("_") and callable(member):
                    found[f"{name}.{attr}"] = member
        elif callable(obj):
            found[name] = obj
    return found


def _cases() -> dict[str, tuple[str, str]]:
    """Case id -> (native module, twin module, callable's name), over both twins."""
    cases = {}
    for native_name, py_name in TWINS.items():
        names = set(_callables(importlib.import_module(py_name)))
        native = _native(native_name)
        if native is not None:
            names |= set(_callables(native))
        for name in names:
            cases[f"{native_name.rsplit('.', 1)[1]}:{name}"] = (native_name, py_name, name)
    return cases


CASES = _cases()

# Known differences, kept so a fix shows (a strict xfail fails once both agree).
DIVERGENT: dict[str, str] = {}


def _parameters(obj: Any) -> Any:
    """The parameters a caller sees (name, kind, default), ``self`` left out."""
    if obj is None:
        return "missing"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError) as exc:
        return f"no signature ({exc})"
    return [(p.name, p.kind.name, p.default) for p in sig.parameters.values() if p.name != "self"]


@pytest.mark.parametrize("case", twin_cases(CASES, DIVERGENT))
def test_twins_take_the_same_parameters(case):
    native_name, py_name, name = CASES[case]
    native = _native(native_name)
    if native is None or not fanout.NATIVE:
        pytest.skip(f"{native_name} (native) is not built")
    py = importlib.import_module(py_name)
    assert _parameters(_callables(native).get(name)) == _parameters(_callables(py).get(name))
