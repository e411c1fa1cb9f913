"""The package's layout: no import cycles, modules and functions a reader can hold.

Every import counts: at the top, inside a function, under ``TYPE_CHECKING``. The
checks run on the source files, so they hold for the pure-Python and native builds
alike, and each one is first shown to catch what it forbids.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import fanout

PACKAGE = Path(fanout.__file__).parent
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# Which folders a folder may import from. The worker side and the producer side
# meet in wire/ (and the native kernels both run); the public modules at the top
# (notifications, errors, handlers, stats) are everyone's.
FOLDERS = ("core", "listeners", "buffers", "wire", "native", "worker", "tools", "bench", "kube")
PRODUCER = {"core", "listeners", "buffers", "wire", "native", "worker"}
MAY_IMPORT = {
    "core": PRODUCER,
    "listeners": PRODUCER,
    "wire": {"wire", "native"},
    "native": {"native", "wire"},
    "worker": {"worker", "wire", "native"},
    "buffers": {"buffers", "wire", "native", "worker"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the modules of the same package it imports, wherever the import is."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom) and node.module in files:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in files else node.module)
        graph[name] = found - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                found.append(sorted([v, *group]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions(path: Path) -> Iterator[tuple[str, int]]:
    """(name, lines) of every function or method longer than the limit."""
    text = path.read_text()
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    yield node.name, lines
        return
    # Cython: a def / cdef / cpdef runs until the next line indented no deeper.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(\s*)(?:cp?def|def)\s+(?!class\b)[^=(]*?(\w+)\(", line)
        if not m:
            continue
        indent, end = len(m.group(1)), i + 1
        while end < len(lines):
            nxt = lines[end]
            deeper = len(nxt) - len(nxt.lstrip()) > indent
            if nxt.strip() and not deeper and not nxt.lstrip().startswith(")"):
                break
            end += 1
        while not lines[end - 1].strip():
            end -= 1
        if end - i > MAX_FUNCTION_LINES:
            yield m.group(2), end - i


def sources(root: Path) -> Iterable[Path]:
    return sorted(p for ext in ("py", "pyx", "pxd", "pxi") for p in root.rglob(f"*.{ext}"))


def test_no_module_imports_itself_back():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50  # every module was read
    assert cycles(graph) == []


def test_the_cycle_check_sees_local_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.c\n"
    )
    (pkg / "c.py").write_text("from pkg import a\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_modules_fit_a_reader():
    too_long = {
        str(p.relative_to(PACKAGE)): n
        for p in sources(PACKAGE)
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert too_long == {}


def test_functions_fit_a_reader():
    too_long = {
        f"{p.relative_to(PACKAGE)}:{name}": n
        for p in sources(PACKAGE)
        for name, n in long_functions(p)
    }
    assert too_long == {}


def test_the_length_checks_see_python_and_cython_functions(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    nested = body.replace("    x", "        x")
    (tmp_path / "m.py").write_text(
        f"class C:\n    def long(self):\n{nested}\n    def ok(self):\n        pass\n"
    )
    (tmp_path / "k.pyx").write_text(
        "cdef class Ring(object):\n    cdef int a\n\n\n"
        "cdef void short(int a) noexcept nogil:\n    pass\n\n\n"
        f"cdef int loop(\n    int a,\n) noexcept nogil:\n{body}\n\ndef after():\n    pass\n"
    )
    assert dict(long_functions(tmp_path / "m.py")) == {"long": MAX_FUNCTION_LINES + 1}
    assert dict(long_functions(tmp_path / "k.pyx")) == {"loop": MAX_FUNCTION_LINES + 3}


@pytest.mark.parametrize("folder", sorted(MAY_IMPORT))
def test_each_side_imports_only_what_it_may(folder):
    graph = import_graph(PACKAGE)
    crossing = {
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if mod.split(".")[1:2] == [folder]
        for dep in deps
        if dep.split(".")[1:2]
        and dep.split(".")[1] in FOLDERS
        and dep.split(".")[1] not in MAY_IMPORT[folder]
    }
    assert crossing == set()
