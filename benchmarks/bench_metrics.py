"""``distribute`` while Prometheus scrapes the distributor every 100 ms, and without.

The same producer-only measurement as ``bench_distribute.test_distribute``, in
the same run and the same group, once with nothing else running and once with
``fanout.metrics.serve`` answering an HTTP scrape every 100 ms from another
thread. A scrape only reads counters, so the two should differ by noise alone.
Run: ``pytest benchmarks/bench_metrics.py --benchmark-only``.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.request
from collections.abc import Iterator

import bench_distribute
import pytest
from bench_distribute import listeners, pairs, producer_only  # noqa: F401 (fixtures)

import fanout
from fanout.metrics import serve

SCRAPE_EVERY = 0.1


@contextlib.contextmanager
def scraped(d: fanout.Distributor, active: threading.Event | None = None) -> Iterator[list[int]]:
    """Serve ``d``'s metrics and GET them every 100 ms (while ``active`` is set, if given)."""
    done = threading.Event()
    sizes: list[int] = []

    with serve(d, 0) as server:

        def scrape() -> None:
            while not done.wait(SCRAPE_EVERY):
                if active is not None and not active.is_set():
                    continue
                with urllib.request.urlopen(server.url, timeout=10) as response:
                    sizes.append(len(response.read()))

        thread = threading.Thread(target=scrape, name="bench-scraper")
        thread.start()
        try:
            yield sizes
        finally:
            done.set()
            thread.join()


@pytest.mark.parametrize("metrics", ["no-scrape", "scraped-100ms"])
def test_distribute_while_scraped(benchmark, pairs, listeners, producer_only, metrics):  # noqa: F811
    d, _ = producer_only
    if metrics == "no-scrape":
        bench_distribute.test_distribute(benchmark, pairs, listeners, producer_only)
        return
    with scraped(d) as sizes:
        bench_distribute.test_distribute(benchmark, pairs, listeners, producer_only)
    assert sizes, "no scrape happened during the measurement"
    benchmark.extra_info["scrapes"] = len(sizes)


def test_one_scrape(benchmark, listeners, producer_only):  # noqa: F811
    """What one scrape costs the producer's process: collect and format the text."""
    from prometheus_client import CollectorRegistry, generate_latest

    from fanout.metrics import PrometheusCollector

    d, _ = producer_only
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PrometheusCollector(d))
    benchmark.group = f"one scrape, {listeners} listener(s)"
    assert b"fanout_received_total" in benchmark(generate_latest, registry)


def interleaved(count: int = 4, blocks: int = 40, block_seconds: float = 0.5) -> None:
    """Alternate half-second blocks with and without scraping; print per-batch times.

    pytest-benchmark runs one variant's rounds, then the other's: on a shared
    machine a noisy minute can land on one of them only. Here the blocks
    alternate, so noise hits both alike. The mean is the figure that matters:
    a scrape lands on a few batches only, which a median would hide.
    """
    import statistics
    import time

    from fanout.bench.payloads import load_payload

    payload = load_payload("small")
    updates = [payload.pair(i) for i in range(bench_distribute.BATCH)]
    d = fanout.Distributor()
    regs = [d.add_listener(fanout.Handler()) for _ in range(count)]
    d.start()
    for reg in regs:
        reg.wait_ready(60)
    d.pump.stop()  # producer only, as in bench_distribute
    Update, distribute = fanout.Update, d.distribute
    times: dict[bool, list[float]] = {False: [], True: []}
    active = threading.Event()
    try:
        with scraped(d, active) as sizes:
            for block in range(blocks):
                on = block % 2 == 1
                if on:
                    active.set()
                else:
                    active.clear()
                end = time.perf_counter() + block_seconds
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    for old, new in updates:
                        distribute(Update(old, new))
                    times[on].append(time.perf_counter() - t0)
                    for reg in regs:
                        for lane in reg.lanes:
                            lane.ring.rewind()
                            lane.ring.drop_unsent(1 << 62)
    finally:
        d.stop(drain=False)
    print(
        f"distribute x{bench_distribute.BATCH}, {count} listener(s), {blocks} blocks "
        f"of {block_seconds} s, {len(sizes)} scrapes"
    )
    for on, label in ((False, "no scrape"), (True, "scraped every 100 ms")):
        xs = sorted(times[on])
        q1, q3 = xs[len(xs) // 4], xs[3 * len(xs) // 4]
        print(
            f"  {label:22s} batches={len(xs):5d} mean={statistics.fmean(xs) * 1e3:.3f} ms "
            f"median={statistics.median(xs) * 1e3:.3f} ms IQR={(q3 - q1) * 1e3:.3f} ms"
        )


if __name__ == "__main__":
    # python benchmarks/bench_metrics.py: the interleaved comparison, for 1 and 4 listeners.
    for n in (1, 4):
        interleaved(n)
