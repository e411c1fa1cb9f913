"""Scenario ``ray``: one listener with 2 Ray actors, against Ray used directly.

Contenders, in one run, for the ``small`` and ``pod`` payloads:

* ``fanout-ray``: ``add_listener(executor="ray", workers=2)``: batches of frames
  from the lane rings, one actor call per batch;
* ``ray-call``: Ray the obvious way: one ``actor.handle.remote(t, old, new)`` per
  notification to 2 actors, at most ``CALLS_IN_FLIGHT`` calls unanswered;
* ``ray-batch``: Ray's own batched actor calls, what an expert would write: the
  producer gathers ``BATCH`` notifications into a list and sends it with one
  ``actor.handle_batch.remote(pairs)``, round-robin, at most ``BATCHES_IN_FLIGHT``
  calls unanswered: the most Ray itself carries, so fanout's share of it is what
  its own batching leaves on the table;
* ``ray-queue``: a ``ray.util.queue.Queue`` (``put`` per notification) drained by
  2 actors calling ``get``;
* ``fanout-process``: fanout's process listener with 2 workers, for scale.

The objects cycle through ``VARIANTS`` distinct copies, twice ``BATCH``, where the
other scenarios cycle through 256: pickle, which carries ``ray-batch``'s lists,
writes an object it already wrote in the same call as a 2-byte reference to it. An
informer's notifications are new objects; the one an update shares with the update
before it (its ``old`` is that one's ``new``) is all a batch may share. With 256
copies, a batch of 1,024 updates would carry each object 8 times, and ``ray-batch``
would pickle and unpickle an eighth of what it claims to carry.

A second case times recovery: SIGKILL the only actor of a listener, then the time
until the next notification is handled (Ray restarts it, fanout resends).

Ray starts once for the scenario (about 4 s), bound to loopback. The scenario is
not in the default list: ``fanout bench --scenario ray``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray reads it

import ray
from ray.util.queue import Queue

import fanout
from fanout.bench.contenders import FanoutProcess
from fanout.bench.model import Bench, Case, Metric
from fanout.bench.payloads import load_payload
from fanout.bench.sessions import BenchHandler, Contender
from fanout.stats import NBUCKETS

__all__ = ["CONTENDERS", "cases"]

ACTORS = 2
CALLS_IN_FLIGHT = 256  # ray-call: unanswered calls the producer allows, all actors
BATCH = 1024  # ray-batch: notifications per actor call
BATCHES_IN_FLIGHT = 4  # ray-batch: unanswered calls, all actors (2 per actor)
QUEUE_SIZE = 10_000
VARIANTS = 2 * BATCH  # distinct objects: none repeats within one ray-batch call


def ensure_ray() -> None:
    """Start the scenario's local Ray once (the contenders share it)."""
    if not ray.is_initialized():
        ray.init(
            address="local",  # our own, not another program's cluster on this host
            num_cpus=os.cpu_count() or 2,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )


class FanoutRay(FanoutProcess):
    """fanout, one Ray listener of 2 actors."""

    name = "fanout-ray"
    kind = "process"
    executor = "ray"
    requires = ("ray", "ray")

    def __init__(self, listeners: int, workers: int, work_us: float, gate: str | None) -> None:
        ensure_ray()
        super().__init__(listeners, workers, work_us, gate)


@ray.remote
class _Consumer:
    """ray-call's and ray-queue's actor: the common handler, counted."""

    def __init__(self, work_us: float) -> None:
        self.handler = BenchHandler(work_us)
        self.count = 0

    def handle(self, old: Any, new: Any) -> None:
        self.handler.on_update(old, new)
        self.count += 1

    def handle_batch(self, pairs: list[tuple[Any, Any]]) -> None:
        on_update = self.handler.on_update
        for old, new in pairs:
            on_update(old, new)
        self.count += len(pairs)

    def drain(self, queue: Any) -> int:
        while True:
            item = queue.get()
            if item is None:
                return self.count
            self.handle(*item)

    def result(self) -> int:
        return self.count


class _RaySession(Contender):
    kind = "process"
    requires = ("ray", "ray")

    def __init__(self, listeners: int, workers: int, work_us: float, gate: str | None) -> None:
        ensure_ray()
        self.actors = [_Consumer.remote(work_us) for _ in range(ACTORS)]  # type: ignore[attr-defined]

    def start(self) -> None:
        ray.get([a.result.remote() for a in self.actors])

    def _results(self, counts: list[int]) -> list[dict[str, Any]]:
        return [{"count": sum(counts), "hist": [0] * NBUCKETS}]

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)


class RayCall(_RaySession):
    """One actor call per notification, round-robin, bounded in flight."""

    name = "ray-call"

    def __init__(self, listeners: int, workers: int, work_us: float, gate: str | None) -> None:
        super().__init__(listeners, workers, work_us, gate)
        self.inflight: list[Any] = []
        self.i = 0

    def send(self, old: Any, new: Any) -> None:
        self.i += 1
        self.inflight.append(self.actors[self.i % ACTORS].handle.remote(old, new))
        if len(self.inflight) >= CALLS_IN_FLIGHT:
            _, self.inflight = ray.wait(self.inflight, num_returns=CALLS_IN_FLIGHT // 2)

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        ray.get(self.inflight, timeout=timeout)
        return self._results(ray.get([a.result.remote() for a in self.actors]))


class RayBatch(_RaySession):
    """Ray's batched actor calls: ``BATCH`` notifications per call, round-robin."""

    name = "ray-batch"

    def __init__(self, listeners: int, workers: int, work_us: float, gate: str | None) -> None:
        super().__init__(listeners, workers, work_us, gate)
        self.inflight: list[Any] = []
        self.pending: list[tuple[Any, Any]] = []
        self.i = 0

    def send(self, old: Any, new: Any) -> None:
        self.pending.append((old, new))
        if len(self.pending) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        self.i += 1
        self.inflight.append(self.actors[self.i % ACTORS].handle_batch.remote(self.pending))
        self.pending = []
        if len(self.inflight) >= BATCHES_IN_FLIGHT:
            _, self.inflight = ray.wait(self.inflight, num_returns=1)

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        if self.pending:
            self._flush()
        ray.get(self.inflight, timeout=timeout)
        return self._results(ray.get([a.result.remote() for a in self.actors]))


class RayQueue(_RaySession):
    """A ``ray.util.queue.Queue``, one ``put`` per notification, 2 actors draining it."""

    name = "ray-queue"

    def __init__(self, listeners: int, workers: int, work_us: float, gate: str | None) -> None:
        super().__init__(listeners, workers, work_us, gate)
        self.queue = Queue(maxsize=QUEUE_SIZE)
        self.drains = [a.drain.remote(self.queue) for a in self.actors]

    def start(self) -> None:
        pass

    def send(self, old: Any, new: Any) -> None:
        self.queue.put((old, new))

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        for _ in self.actors:
            self.queue.put(None)
        return self._results(ray.get(self.drains, timeout=timeout))

    def close(self) -> None:
        super().close()
        self.queue.shutdown(force=True)


CONTENDERS: list[Any] = [FanoutRay, RayCall, RayBatch, RayQueue, FanoutProcess]


def _recovery_once() -> dict[str, float]:
    """SIGKILL the only actor of an idle Ray listener; time until it handles again."""
    from ray._private import state

    ensure_ray()
    payload = load_payload("small")
    d = fanout.Distributor()
    reg = d.add_listener(BenchHandler(0.0), executor="ray", name="recovery")
    try:
        d.start()
        for i in range(200):
            d.distribute(fanout.Update(*payload.pair(i)))
        while reg.stats().delivered < 200:
            time.sleep(0.001)
        (actor_id,) = reg.actor_ids()  # type: ignore[attr-defined]
        pid = int(state.actors(actor_id=actor_id)["Pid"])
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        d.distribute(fanout.Update(*payload.pair(200)))
        deadline = time.monotonic() + 60
        while reg.stats().delivered <= 200:
            if time.monotonic() > deadline:
                raise TimeoutError("ray recovery: the actor did not come back in 60 s")
            time.sleep(0.0005)
        return {"sigkill_to_handled": time.perf_counter() - t_kill}
    finally:
        d.stop(drain=False)


def cases(suite: Bench) -> list[Case]:
    """The scenario's cases for ``suite``."""
    wanted = suite.opts.contenders
    chosen = [c for c in CONTENDERS if wanted is None or c.name in wanted]
    out = [
        suite.batch_case(
            "ray",
            {"payload": name, "listeners": 1, "workers": ACTORS},
            f"{name} objects to 1 listener of {ACTORS} Ray actors",
            1,
            ACTORS,
            0.0,
            load_payload(name, VARIANTS),
        )
        for name in suite.opts.payloads
    ]
    for case in out:
        case.contenders = chosen
    out.append(
        Case(
            "ray",
            {"rate": "idle"},
            "Recovery from a SIGKILLed Ray actor",
            [Metric("sigkill_to_handled", "s", "lower", "SIGKILL to next handled")],
            [FanoutRay],
            lambda cls, _: _recovery_once(),
            round_s=3.0,
        )
    )
    return out
