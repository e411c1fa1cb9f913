"""Every public parameter, return value and field of fanout.kube is documented."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("kubernetes", reason="pip install 'fanout-informer[kube]'")

from test_docstrings import _sections

from fanout.kube import Informer, InformerStats, Store
from fanout.kube.metrics import InformerCollector


def _api() -> list[tuple[str, Callable[..., Any], str]]:
    out = []
    for cls in (Informer, Store, InformerCollector):
        out.append((f"{cls.__qualname__}()", cls.__init__, cls.__doc__ or ""))
        for name, member in vars(cls).items():
            if not name.startswith("_") and inspect.isfunction(member):
                out.append((f"{cls.__qualname__}.{name}", member, member.__doc__ or ""))
    return out


API = _api()


@pytest.mark.parametrize(("name", "func", "doc"), API, ids=[a[0] for a in API])
def test_parameters_and_returns_are_documented(name: str, func: Any, doc: str) -> None:
    assert doc.strip(), f"{name} has no docstring"
    sections = _sections(doc)
    sig = inspect.signature(func)
    params = [p for p in sig.parameters if p not in ("self", "cls")]
    missing = [p for p in params if p not in sections.get("Args", [])]
    assert not missing, f"{name}: parameters missing from its Args section: {missing}"
    if name.endswith("()") or sig.return_annotation in (None, "None", inspect.Signature.empty):
        return
    assert sections.get("Returns"), f"{name} returns {sig.return_annotation} but says nothing"


def test_stats_fields_are_documented() -> None:
    documented = _sections(InformerStats.__doc__ or "").get("Attributes", [])
    missing = [f for f in InformerStats.__dataclass_fields__ if f not in documented]
    assert not missing, missing


def test_importing_without_the_extra_says_how_to_install_it() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['kubernetes'] = None; import fanout.kube"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "pip install 'fanout-informer[kube]'" in proc.stderr
