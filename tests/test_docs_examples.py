"""Every Python block in the README and docs/ runs as written, or is a marked fragment.

A block is a whole program unless an HTML comment right above its fence marks it
``<!-- fragment: docs/examples/NAME.py -->``: then its lines (blank and ``...`` lines
aside) appear in that order in the named example, which completes it and runs here.
Blocks of one page whose first line is ``# NAME.py`` are written under that name
first, so a page's ``main.py`` can import its ``pods.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!-- fragment: (?P<example>\S+) -->\n)?"
    r"^(?P<indent>[ ]*)```python\n(?P<code>.*?)^(?P=indent)```",
    re.MULTILINE | re.DOTALL,
)
FILE_HEADER = re.compile(r"# (\w+\.py)\n")
# What an example may need beyond fanout's core, by import name.
NEEDS = {"msgspec": "schema", "prometheus_client": "prometheus", "ray": "ray"}
pytestmark = pytest.mark.timeout(300)


def blocks(page: Path) -> list[tuple[str, str | None]]:
    """``(code, example or None)`` for each Python block of ``page``."""
    return [(textwrap.dedent(m["code"]), m["example"]) for m in FENCE.finditer(page.read_text())]


def _ids(items: list[tuple[Path, int]]) -> list[str]:
    return [f"{page.relative_to(REPO)}#{n}" for page, n in items]


ALL = [(page, n) for page in PAGES for n in range(len(blocks(page)))]
EXAMPLES = sorted({ex for page in PAGES for _, ex in blocks(page) if ex})


def _meaningful(code: str) -> list[str]:
    return [s for s in (line.strip() for line in code.splitlines()) if s and s != "..."]


def _run(script: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    text = script.read_text()
    for module, extra in NEEDS.items():
        if re.search(rf"^\s*(import|from) {module}\b", text, re.MULTILINE):
            pytest.importorskip(module, reason=f"the example needs the {extra!r} extra")
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    # The example's own directory first (its modules), then wherever fanout came from.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(script)]
    if not re.search(r"^\s*(import|from) fanout\.kube\b", text, re.MULTILINE):
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=240)
    # An informer example reads the cluster from the kubeconfig, as the client does:
    # give it one naming the loopback API server.
    pytest.importorskip("kubernetes", reason="the example needs the 'kube' extra")
    from kube_server import KubeServer, kubeconfig

    server = KubeServer()
    with tempfile.TemporaryDirectory() as home:  # never in the repo's docs/examples
        try:
            server.create("pods", "web-0", namespace="default")
            server.create("pods", "api-0", namespace="prod")
            config = Path(home) / "kubeconfig"
            config.write_text(kubeconfig(server.url, "    token: docs-example"))
            env["KUBECONFIG"] = str(config)
            return subprocess.run(
                cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=240
            )
        finally:
            server.close()


def test_the_pages_have_python_blocks():
    assert len(ALL) >= 10, ALL  # the extraction still finds them
    assert EXAMPLES


@pytest.mark.parametrize(("page", "n"), ALL, ids=_ids(ALL))
def test_a_block_runs_as_written_or_its_example_holds_it(page, n, tmp_path):
    code, example = blocks(page)[n]
    if example:
        path = REPO / example
        assert path.is_file(), f"{page.name} names a missing example {example}"
        lines = iter(_meaningful(path.read_text()))
        missing = [line for line in _meaningful(code) if not any(line == x for x in lines)]
        assert not missing, f"{example} does not complete this fragment of {page.name}: {missing}"
        return
    for other, _ in blocks(page):  # the page's named modules, for its imports
        if m := FILE_HEADER.match(other):
            (tmp_path / m[1]).write_text(other)
    m = FILE_HEADER.match(code)
    script = tmp_path / (m[1] if m else "block.py")
    script.write_text(code)
    proc = _run(script, tmp_path)
    assert proc.returncode == 0, f"{page.name} block {n}:\n{code}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_an_example_that_completes_fragments_runs(example):
    path = REPO / example
    proc = _run(path, path.parent)
    assert proc.returncode == 0, f"{example}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
