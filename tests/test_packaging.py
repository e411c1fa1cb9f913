"""What an install tells its user: why the native extensions are not in use, and metadata.

The builds themselves (a wheel installed where no compiler works, an install that
falls back to the twins) run in .ci/run, which installs for real.
"""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata
from pathlib import Path

import pytest

import fanout
from fanout.native import pick as _impl

REPO = Path(__file__).resolve().parent.parent


def _why(monkeypatch, tmp_path, *, present: bool, note: str | None) -> str:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if present else None)
    path = tmp_path / "note.txt"
    if note is not None:
        path.write_text(note + "\n")
    monkeypatch.setattr(_impl, "NATIVE_BUILD_NOTE", path)
    return _impl.why_not_native(
        ImportError("cannot import name '_pump' from partially initialized module 'fanout'")
    )


def test_a_failed_build_is_named_with_the_way_to_the_native_build(monkeypatch, tmp_path):
    why = _why(monkeypatch, tmp_path, present=False, note="the C compiler '/bin/false' failed")
    assert why.startswith("fanout's native extensions (_ring, _pump, _worker) are missing")
    assert "compiling them failed when fanout was installed" in why
    assert "the C compiler '/bin/false' failed" in why
    assert "pure-Python twins" in why and "apt-get install gcc python3-dev" in why
    assert "partially initialized" not in why and "circular" not in why


def test_extensions_never_built_are_told_apart_from_a_failed_build(monkeypatch, tmp_path):
    why = _why(monkeypatch, tmp_path, present=False, note=None)
    assert "FANOUT_NO_EXTENSIONS=1" in why and "build_ext --inplace" in why
    assert "partially initialized" not in why


def test_extensions_that_do_not_load_say_so(monkeypatch, tmp_path):
    why = _why(monkeypatch, tmp_path, present=True, note=None)
    assert "installed but do not load" in why and "rebuild them" in why


def test_setup_and_the_import_agree_on_the_notes_name():
    setup = (REPO / "setup.py").read_text()
    (name,) = re.findall(r'^NATIVE_BUILD_NOTE = "([^"]+)"', setup, re.MULTILINE)
    assert _impl.NATIVE_BUILD_NOTE.name == name
    assert f"fanout/{name}" in (REPO / ".gitignore").read_text()


def test_the_running_implementation_explains_itself():
    if fanout.NATIVE:
        assert fanout.IMPORT_ERROR is None
    else:
        assert fanout.IMPORT_ERROR and "pure-Python twins" in fanout.IMPORT_ERROR


def test_the_metadata_names_license_versions_and_platform():
    try:
        meta = metadata.metadata("fanout-informer")
    except metadata.PackageNotFoundError:
        pytest.skip("fanout-informer is not installed (run from PYTHONPATH)")
    assert meta["License-Expression"] == "Apache-2.0"
    classifiers = meta.get_all("Classifier") or []
    versions = {c.rsplit(":: ", 1)[1] for c in classifiers if re.search(r":: 3\.\d+$", c)}
    assert versions == {"3.10", "3.11", "3.12", "3.13"}  # what .ci/run tests
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert meta["Requires-Python"] == ">=3.10"
