"""What fail-fast start() costs: 4 listeners x 2 workers, waiting vs not waiting.

start() waits until every lane's first worker said ready (or failed for good),
so a handler that cannot be built is reported by start() itself. The baseline,
measured in the same run, is start() without that wait (the workers are then
still starting when it returns). Run: python benchmarks/start_cost.py [rounds]
"""

from __future__ import annotations

import statistics
import sys
import time

import fanout
from fanout.core.distributor import Distributor


class Noop(fanout.Handler):
    pass


def one(wait: bool) -> float:
    d = fanout.Distributor()
    for _ in range(4):
        d.add_listener(Noop(), workers=2)
    original = Distributor._first_start_failure
    if not wait:
        Distributor._first_start_failure = lambda self, listeners: None  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        d.start()
        took = time.perf_counter() - t0
    finally:
        Distributor._first_start_failure = original  # type: ignore[method-assign]
        d.stop()
    return took


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    one(True)  # warm the forkserver
    waits, nowaits = [], []
    for _ in range(rounds):  # interleaved, so noise hits both
        waits.append(one(True))
        nowaits.append(one(False))
    for name, xs in (("start() waiting for ready", waits), ("start() not waiting", nowaits)):
        print(
            f"{name:28s} median {statistics.median(xs) * 1e3:6.1f} ms "
            f"(min {min(xs) * 1e3:.1f}, max {max(xs) * 1e3:.1f}) over {rounds} rounds"
        )
    added = statistics.median(waits) - statistics.median(nowaits)
    print(f"added by the wait: {added * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
