"""What an informer's store keeps per Pod, with and without a ``transform=``.

Decodes N copies of the packaged real Pod (``fanout/data/pod.json``, names
varied) with msgspec, as the informer does, keeps each one whole or through
``fanout.bench.kube.slim`` (five fields), and prints the bytes Python holds per
object (``tracemalloc``: every allocation the kept objects own).

    python benchmarks/kube_store_memory.py [--count 10000]
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc
from collections.abc import Callable
from importlib import resources
from typing import Any

import msgspec

from fanout.bench.kube import slim


def kept_bytes(lines: list[bytes], transform: Callable[[Any], Any]) -> float:
    """Bytes held per object once every line is decoded and transformed."""
    decode = msgspec.json.Decoder().decode
    gc.collect()
    tracemalloc.start()
    try:
        store = [transform(decode(line)) for line in lines]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del store
    return held / len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    pod = json.loads(resources.files("fanout").joinpath("data/pod.json").read_text())
    lines = []
    for i in range(args.count):
        pod["metadata"]["name"] = f"pod-{i}"
        lines.append(json.dumps(pod).encode())
    print(f"{args.count} Pods of {len(lines[0])} JSON bytes each")
    for name, transform in (("whole", lambda obj: obj), ("slim", slim)):
        print(f"  {name:<6} {kept_bytes(lines, transform):>8,.0f} bytes per object kept")


if __name__ == "__main__":
    main()
