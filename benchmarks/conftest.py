"""Benchmarks: collect ``bench_*.py`` files, and run each over both ring implementations.

Not in the default test path; run ``pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest

import fanout.native._ring_py


def _ring_impls() -> list:
    impls = [pytest.param(fanout.native._ring_py, id="py")]
    try:
        impls.insert(0, pytest.param(importlib.import_module("fanout.native._ring"), id="native"))
    except ImportError:  # built with FANOUT_NO_EXTENSIONS=1
        pass
    return impls


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Collect ``bench_*.py`` like test modules (``python_files`` only matches tests)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)  # named on the command line: collected
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(params=_ring_impls())
def ring_impl(request: pytest.FixtureRequest) -> types.ModuleType:
    """A ring module (``Ring``, ``FrameRing``): the native one and its twin."""
    return request.param
