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
def scraped(d: fanout.Distributor) -> Iterator[list[int]]:
    """Serve ``d``'s metrics and GET them every 100 ms until the block ends."""
    done = threading.Event()
    sizes: list[int] = []

    with serve(d, 0) as server:

        def scrape() -> None:
            while not done.wait(SCRAPE_EVERY):
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
