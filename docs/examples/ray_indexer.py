"""The Ray fragments of README.md and docs/ray.md, completed, on a local Ray cluster.

Run it with ``python docs/examples/ray_indexer.py`` (extra ``ray``); this directory
must be on the actors' path, as PYTHONPATH or with ``runtime_env``.
"""

import ray

import fanout

from pods import Indexer  # a module the actors can import (see below)


def informer_notifications():
    """Stands in for an informer's stream of notifications."""
    for i in range(10):
        yield fanout.Add({"metadata": {"namespace": "default", "name": f"web-{i}"}})


if __name__ == "__main__":
    ray.init()  # your cluster's address (or $RAY_ADDRESS); without it, a local one

    with fanout.Distributor() as d:
        reg = d.add_listener(
            Indexer(),  # importable by the actors (installed, or shipped with runtime_env)
            executor="ray",
            workers=2,  # 2 actors; key -> actor keeps per-key order
            ray_options={"num_cpus": 0.5, "memory": 256 * 2**20},
            handler_timeout=30.0,
            on_dead_letter=lambda reg, n, why: print("gave up:", why),
        )
        for n in informer_notifications():
            d.distribute(n)
    s = reg.stats()
    assert s.delivered == 10, s
    ray.shutdown()
