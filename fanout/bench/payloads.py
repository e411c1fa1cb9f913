"""Payloads for the benchmarks: small objects, a real Pod, or a user's JSON file."""

from __future__ import annotations

import copy
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["Payload", "load_payload", "spin"]

VARIANTS = 256  # distinct objects cycled through, so names and versions vary


def spin(us: float) -> None:
    """Burn ``us`` microseconds of pure-Python CPU (holding the GIL)."""
    if us <= 0:
        return
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


def _small(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"cm-{i:05d}",
            "namespace": "default",
            "resourceVersion": str(100000 + i),
            "uid": f"0f8e4c1a-1234-5678-9abc-{i:012d}",
        },
        "data": {"key": "value"},
    }


def _variants(template: dict[str, Any], count: int) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        o = copy.deepcopy(template)
        md = o.setdefault("metadata", {}) if isinstance(o, dict) else {}
        base = md.get("name", "obj")
        md["name"] = f"{base}-{i:05d}"
        md["resourceVersion"] = str(100000 + i)
        out.append(o)
    return out


class Payload:
    """A named pool of objects; ``pair(i)`` gives the (old, new) of update ``i``."""

    def __init__(self, name: str, objects: list[Any]) -> None:
        self.name = name
        self.objects = objects

    def pair(self, i: int) -> tuple[Any, Any]:
        """Old and new object of the ``i``-th update."""
        objs = self.objects
        return objs[i % len(objs)], objs[(i + 1) % len(objs)]

    def encoded_size(self) -> int:
        """Bytes of one encoded update (old + new) with msgpack."""
        import msgpack

        old, new = self.pair(0)
        return len(msgpack.packb([1, 0, old, new]))


def load_payload(spec: str, variants: int = VARIANTS) -> Payload:
    """``small``, ``pod`` (a packaged real Pod) or a path to a JSON object file.

    ``variants`` distinct objects are cycled through (each its own copy).
    """
    if variants < 2:
        raise ValueError(f"variants must be at least 2 (an update's old and new), got {variants}")
    if spec == "small":
        return Payload("small", [_small(i) for i in range(variants)])
    if spec == "pod":
        text = resources.files("fanout").joinpath("data/pod.json").read_text()
        return Payload("pod", _variants(json.loads(text), variants))
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"payload must be 'small', 'pod' or a JSON file path; {spec!r} is none")
    try:
        obj = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"payload file {spec} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"payload file {spec} must hold one JSON object, not {type(obj).__name__}"
        )
    return Payload(path.stem, _variants(obj, variants))
