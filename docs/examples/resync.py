"""docs/concepts.md's resync loop, completed: a producer re-announces its cache.

Run it with ``python docs/examples/resync.py``; it stops by itself after a few checks.
"""

import time

import fanout


class Printer(fanout.Handler):
    def on_update(self, old, new):
        print("resync of", new["metadata"]["name"])


class Checks:
    """True for the first ``n`` tests: a stand-in for the producer's "still running"."""

    def __init__(self, n):
        self.n = n

    def __bool__(self):
        self.n -= 1
        return self.n >= 0


if __name__ == "__main__":
    cache = {name: {"metadata": {"namespace": "default", "name": name}} for name in ("a", "b")}
    running = Checks(3)
    with fanout.Distributor(resync_check_period=1.0) as d:
        reg = d.add_listener(Printer(), resync_period=1.0)
        while running:
            time.sleep(d.resync_check_period)
            if d.should_resync():
                for obj in cache.values():
                    d.distribute(fanout.Update(obj, obj), sync=True)
    print(reg.stats())
