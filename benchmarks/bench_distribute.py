"""Producer cost of ``distribute`` per listener, against a stdlib baseline.

fanout: one encode, then one append per listener ring (the pump is stopped, so only
the producer's own work is timed). Baseline: ``pickle.dumps`` once, then one
``deque.append`` per listener: the least a fan-out that serializes once can do.
Target (issue 3): one encode + <= 0.5 us per extra listener.
"""

from __future__ import annotations

import collections
import pickle
import time

import pytest

import fanout
from fanout.bench.payloads import load_payload

BATCH = 1000


@pytest.fixture(scope="module")
def pairs():
    payload = load_payload("small")
    return [payload.pair(i) for i in range(BATCH)]


@pytest.fixture(params=[1, 4], ids=lambda n: f"L={n}")
def listeners(request):
    return request.param


@pytest.fixture(params=["arena", "no-arena"])
def producer_only(listeners, request):
    """A started distributor whose pump is stopped: nothing drains, nothing competes.

    With the shared-memory arena (the default) and without (``max_shared_bytes=0``):
    the difference is what the arena's check for big buffers costs small objects.
    """
    d = fanout.Distributor(max_shared_bytes=0 if request.param == "no-arena" else None)
    regs = [d.add_listener(fanout.Handler()) for _ in range(listeners)]
    d.start()
    for reg in regs:
        reg.wait_ready(60)
    d.pump.stop()
    time.sleep(0.05)
    yield d, regs
    d.stop(drain=False)


def test_distribute(benchmark, pairs, listeners, producer_only):
    d, regs = producer_only
    Update, distribute = fanout.Update, d.distribute

    def batch():
        for old, new in pairs:
            distribute(Update(old, new))
        for reg in regs:  # keep the rings small: forget what was queued
            for lane in reg.lanes:
                lane.ring.rewind()
                lane.ring.drop_unsent(1 << 62)

    benchmark.group = f"distribute x{BATCH}, {listeners} listener(s)"
    benchmark(batch)


def test_baseline_pickle_once_deque_each(benchmark, pairs, listeners):
    queues = [collections.deque() for _ in range(listeners)]
    dumps = pickle.dumps

    def batch():
        for old, new in pairs:
            data = dumps((time.monotonic_ns(), old, new), 5)
            for q in queues:
                q.append(data)
        for q in queues:
            q.clear()

    benchmark.group = f"distribute x{BATCH}, {listeners} listener(s)"
    benchmark(batch)
