"""The version has one source, and the installed metadata agrees with the package."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import fanout
from fanout import _version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _distribution_of_fanout() -> metadata.Distribution:
    # Found through the package, not by name: the test holds whatever the
    # distribution is called.
    names = metadata.packages_distributions().get("fanout")
    assert names, "the fanout package is not installed (pip install -e .)"
    assert len(set(names)) == 1, f"several distributions provide fanout: {names}"
    return metadata.distribution(names[0])


def test_version_equals_installed_metadata() -> None:
    assert fanout.__version__ == _distribution_of_fanout().version


def test_version_is_defined_once() -> None:
    assert fanout.__version__ is _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.?(a|b|rc|dev|post)\d+)*", fanout.__version__)
    text = PYPROJECT.read_text()
    project = text[text.index("[project]") : text.index("\n[", text.index("[project]") + 1)]
    # pyproject.toml reads it from fanout/_version.py instead of repeating it.
    assert not re.search(r"^version\s*=", project, re.MULTILINE), project
    assert re.search(r'^dynamic\s*=\s*\[[^\]]*"version"', project, re.MULTILINE), project
    assert 'version = { attr = "fanout._version.__version__" }' in text


def test_distribution_has_a_name_of_its_own() -> None:
    # PyPI's "fanout" is an unrelated project: extras hints must name ours.
    from fanout._version import DISTRIBUTION

    assert DISTRIBUTION != "fanout"
    assert _distribution_of_fanout().metadata["Name"] == DISTRIBUTION
