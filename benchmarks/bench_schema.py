"""Typed, partial decoding: Pods to 4 listeners whose handlers read five fields.

The same contenders as ``fanout bench --scenario schema`` (fanout with and without
``schema=``, each codec, the hand-written pipe + msgpack baseline, thread + deque),
one batch of updates per round, plus the decode of one update each way: the worker's
share of the work, which ``schema=`` cuts. Compare within one run; for deliveries per
second see ``extra_info`` (``--benchmark-json``) or divide the batch by the time.
"""

from __future__ import annotations

import time

import pytest

import fanout

msgspec = pytest.importorskip("msgspec")

from fanout.bench import schema  # noqa: E402  (needs msgspec)
from fanout.bench.payloads import load_payload  # noqa: E402

UPDATES = 2000  # per round: 8,000 deliveries to the 4 listeners


@pytest.mark.parametrize("cls", schema.CONTENDERS, ids=[c.name for c in schema.CONTENDERS])
def test_pods_to_four_readers(benchmark, cls):
    payload = load_payload("pod")
    pairs = [payload.pair(i) for i in range(UPDATES)]

    def setup():
        session = cls(schema.LISTENERS, 1, 0.0, None)
        session.start()
        return (session,), {}

    def batch(session):
        try:
            for old, new in pairs:
                session.send(old, new)
            results = session.finish(120.0)
        finally:
            session.close()
        assert sum(r["count"] for r in results) == UPDATES * schema.LISTENERS

    benchmark.group = "pods to 4 listeners reading 5 fields"
    benchmark.pedantic(batch, setup=setup, rounds=3)
    deliveries = UPDATES * schema.LISTENERS
    benchmark.extra_info["deliveries_per_s"] = deliveries / benchmark.stats["median"]


@pytest.mark.parametrize("codec", ["msgpack", "msgspec"])
@pytest.mark.parametrize("how", ["codec.unpack", "worker untyped", "worker schema"])
def test_decode_pod_update(benchmark, codec, how):
    c = fanout.wire.codec.get_codec(codec)
    data = c.encode(fanout.Update(*load_payload("pod").pair(0)), time.monotonic_ns())
    decode = {
        "codec.unpack": c.unpack,
        "worker untyped": c.unpacker(),
        "worker schema": c.unpacker(schema.PodView),
    }[how]
    benchmark.group = "decode one Pod update"
    benchmark(decode, data)
