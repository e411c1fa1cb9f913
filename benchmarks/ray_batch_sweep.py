"""Where batching stops paying for ``executor="ray"``: a sweep of the batch byte budget.

One Ray listener with 2 actors, no-op handlers, updates of the ``small`` or ``pod``
payload. For each budget (bytes of frames per actor call) it prints deliveries/s
(first distribute until drained) and latency p50 / p99 (distribute until the
completion is acknowledged). The defaults in ``fanout.listeners.ray`` come from it.

    python benchmarks/ray_batch_sweep.py [--payload small|pod] [-n 200000]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

import ray

import fanout
from fanout.bench.payloads import load_payload
from fanout.bench.sessions import BenchHandler

BUDGETS = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]


def one(payload, n: int, budget: int, inflight: int) -> tuple[float, float, float]:
    d = fanout.Distributor()
    reg = d.add_listener(BenchHandler(0.0), executor="ray", workers=2)
    reg.batch_bytes = budget
    reg.max_inflight = inflight
    d.start()
    reg.wait_ready(60)
    pair = payload.pair
    t0 = time.perf_counter()
    for i in range(n):
        d.distribute(fanout.Update(*pair(i)))
    assert d.stop(drain=True)
    elapsed = time.perf_counter() - t0
    s = reg.stats()
    assert s.delivered == n, s
    return n / elapsed, s.latency_p50 or 0.0, s.latency_p99 or 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--payload", default="small")
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--inflight", type=int, nargs="*", default=[2])
    args = ap.parse_args()
    payload = load_payload(args.payload)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    one(payload, 2000, 64 << 10, 2)  # warm up the workers' imports
    print(f"payload={args.payload} n={args.n}  (budget = bytes of frames per actor call)")
    print(f"{'budget':>8} {'inflight':>8} {'deliveries/s':>13} {'p50 ms':>8} {'p99 ms':>8}")
    for inflight in args.inflight:
        for budget in BUDGETS:
            rate, p50, p99 = one(payload, args.n, budget, inflight)
            ms = f"{p50 * 1e3:>8.1f} {p99 * 1e3:>8.1f}"
            print(f"{budget >> 10:>7}K {inflight:>8} {rate:>13,.0f} {ms}")
    ray.shutdown()


if __name__ == "__main__":
    main()
