"""The codec: encode / decode of one update (old + new), against stdlib pickle and json.

The process-mode limit is ``cores / (encode + L x decode)`` per notification, so these
two numbers bound what any process fan-out can do with a given payload.
"""

from __future__ import annotations

import json
import pickle

import pytest

import fanout
from fanout.bench.payloads import load_payload

PAYLOADS = ["small", "pod"]


def _update(name: str) -> fanout.Update:
    return fanout.Update(*load_payload(name).pair(0))


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("codec", ["msgpack", "msgspec"])
def test_encode(benchmark, payload, codec):
    pytest.importorskip(codec)
    c = fanout.Distributor(codec=codec).codec
    n = _update(payload)
    benchmark.group = f"encode {payload}"
    benchmark(c.encode, n, 0)


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("codec", ["msgpack", "msgspec"])
def test_decode(benchmark, payload, codec):
    pytest.importorskip(codec)
    c = fanout.Distributor(codec=codec).codec
    data = c.encode(_update(payload), 0)
    benchmark.group = f"decode {payload}"
    benchmark(c.decode, data)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_encode_stdlib_pickle(benchmark, payload):
    n = _update(payload)
    benchmark.group = f"encode {payload}"
    benchmark(pickle.dumps, (n.old, n.new), pickle.HIGHEST_PROTOCOL)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_decode_stdlib_pickle(benchmark, payload):
    n = _update(payload)
    data = pickle.dumps((n.old, n.new), pickle.HIGHEST_PROTOCOL)
    benchmark.group = f"decode {payload}"
    benchmark(pickle.loads, data)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_encode_stdlib_json(benchmark, payload):
    n = _update(payload)
    benchmark.group = f"encode {payload}"
    benchmark(json.dumps, [n.old, n.new])
