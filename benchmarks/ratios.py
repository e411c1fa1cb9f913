"""Print the ring ratios worth reporting, measured with timeit-style loops (no pytest).

    python benchmarks/ratios.py

* "Ring / deque": time of one ``write_one`` + ``read_one`` pair over one
  ``deque.append`` + ``popleft`` pair (target for the native ring: <= 1.5).
* "FrameRing / os.write": frames/s of ``append`` + ``send_to`` over frames/s of one
  ``os.write`` per frame, 200-byte frames into a pipe a reader process drains
  (target: >= 5).

Each figure is the best of ``REPEAT`` runs (timeit's advice: the minimum is the run
least disturbed by the rest of the machine).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import sys
import timeit
import types
from collections.abc import Callable
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_rings import (  # the sys.path entry above makes this importable
    FRAME_SIZE,
    FRAMES,
    PAIRS,
    SEND_EVERY,
    deque_pairs,
    drained_pipe,
    frame_ring_round,
    os_write_round,
    ring_pairs,
)

import fanout.native._ring_py

REPEAT = 9
BATCHES = (16, SEND_EVERY, 256)  # appends per send_to: the pump sends what is pending


def best(calls: dict[str, Callable[[], object]], number: int) -> dict[str, float]:
    """Seconds per call of each callable: the best of REPEAT runs of ``number`` calls.

    The runs are interleaved, so a slow spell of the machine hits every contender alike.
    """
    timers = {name: timeit.Timer(call) for name, call in calls.items()}
    for call in calls.values():
        call()  # warm up
    results = {name: float("inf") for name in calls}
    for _ in range(REPEAT):
        for name, timer in timers.items():
            results[name] = min(results[name], timer.timeit(number) / number)
    return results


def implementations() -> list[tuple[str, types.ModuleType]]:
    impls = []
    try:
        impls.append(("native", importlib.import_module("fanout.native._ring")))
    except ImportError:
        print("fanout.native._ring (native) is not built: pure-Python only")
    impls.append(("py", fanout.native._ring_py))
    return impls


def main() -> None:
    impls = implementations()
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

    queue: collections.deque[int] = collections.deque()
    calls: dict[str, Callable[[], object]] = {"deque": partial(deque_pairs, queue)}
    for name, impl in impls:
        calls[name] = partial(ring_pairs, impl.Ring(16))
    pair = {name: t / PAIRS for name, t in best(calls, 300).items()}
    print(f"\nRing write_one+read_one vs deque append+popleft ({PAIRS} pairs a run)")
    print(f"  deque               {pair['deque'] * 1e9:8.1f} ns/pair")
    for name, _ in impls:
        ratio = pair[name] / pair["deque"]
        ns = pair[name] * 1e9
        print(f"  {name:<6} Ring         {ns:8.1f} ns/pair   Ring / deque = {ratio:.2f}")

    print(
        f"\nFrameRing append+send_to vs one os.write per frame ({FRAMES} x {FRAME_SIZE} B a run)"
    )
    with contextlib.ExitStack() as stack:
        fd = stack.enter_context(drained_pipe(blocking=True))
        calls = {"os.write": partial(os_write_round, fd)}
        for name, impl in impls:
            for batch in BATCHES if name == "native" else (SEND_EVERY,):
                ring_fd = stack.enter_context(drained_pipe(blocking=False))
                ring = impl.FrameRing(1 << 16)
                calls[f"{name}/{batch}"] = partial(
                    frame_ring_round, ring, ring_fd, send_every=batch
                )
        rate = {name: FRAMES / t for name, t in best(calls, 5).items()}
    print(f"  os.write per frame  {rate['os.write']:12,.0f} frames/s")
    for name, r in rate.items():
        if name == "os.write":
            continue
        impl, batch = name.split("/")
        ratio = r / rate["os.write"]
        print(
            f"  {impl:<6} FrameRing, send_to every {batch:>3} frames {r:12,.0f} frames/s   "
            f"FrameRing / os.write = {ratio:.2f}"
        )


if __name__ == "__main__":
    main()
