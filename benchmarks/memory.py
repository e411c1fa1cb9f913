"""Memory held for a stalled listener, and given back after it drains.

One listener's handler blocks while N small notifications are distributed to it; the
producer's RSS growth is compared with the encoded bytes its ring holds, then the
handler is released and, once everything is handled and the ring has shrunk, RSS is
compared with where it started. Targets (issue 4): growth <= 1.5x the bytes held,
RSS back within 20% of the start.

    python benchmarks/memory.py [--count 1000000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import fanout
from fanout.bench.payloads import load_payload
from fanout.bench.sessions import BenchHandler


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait(predicate, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.count
    payload = load_payload("small")
    notes = [fanout.Update(*payload.pair(i)) for i in range(256)]
    gate = os.path.join(tempfile.mkdtemp(prefix="fanout-mem-"), "gate")
    with fanout.Distributor() as d:
        reg = d.add_listener(BenchHandler(0.0, gate), name="stalled")
        reg.wait_ready(60)
        start = rss()
        t0 = time.perf_counter()
        for i in range(n):
            d.distribute(notes[i % 256])
        produced = time.perf_counter() - t0
        wait(lambda: reg.stats().pending == n)
        s = reg.stats()
        held = s.pending_bytes
        peak = rss()
        print(
            f"{n:,} pending: ring holds {held:,} B (capacity {s.capacity_bytes:,} B); "
            f"RSS +{peak - start:,} B = {(peak - start) / held:.2f}x the bytes held "
            f"(target <= 1.5x); producer {produced / n * 1e6:.2f} us/notification"
        )
        open(gate, "w").close()
        wait(lambda: reg.stats().pending == 0)
        wait(lambda: reg.stats().capacity_bytes <= 64 * 1024)
        end = rss()
        print(
            f"drained: capacity {reg.stats().capacity_bytes:,} B; RSS {end:,} B vs "
            f"{start:,} B at the start = {end / start:.2f}x (target <= 1.2x)"
        )
    os.unlink(gate)


if __name__ == "__main__":
    main()
