"""Scenario ``recovery``: from SIGKILL of a fanout worker to the next handled notification.

Beside it, a worker's cold start, the floor recovery cannot beat. Only fanout
has a supervisor; the other process contenders are listed as skipped.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import fanout
from fanout.bench.contenders import FanoutProcess
from fanout.bench.model import Bench, Case, Metric
from fanout.bench.payloads import Payload, load_payload
from fanout.bench.sessions import BenchHandler

__all__ = ["recovery"]

RECOVERY_METRICS = [
    Metric("sigkill_to_handled", "s", "lower", "SIGKILL to next handled"),
    # The floor recovery cannot beat: a new worker must start. Measured in the
    # same round, so the chart compares recovery with something.
    Metric("cold_start", "s", "lower", "cold start of a worker (reference)"),
]


def recovery(suite: Bench) -> list[Case]:
    """fanout only: SIGKILL a worker, time until its lane handles again."""
    if FanoutProcess not in suite.contenders:
        return []
    for other in suite.contenders:
        if not other.name.startswith("fanout") and other.kind == "process":
            suite.skipped.setdefault(
                f"recovery/{other.name}",
                "no supervisor: a killed consumer is not restarted and its backlog is lost",
            )
    payload = load_payload("small")

    def run_round(cls: Any, _: Any) -> dict[str, Any]:
        log = logging.getLogger("fanout")
        level = log.level
        log.setLevel(logging.ERROR)  # the kills are deliberate: no restart warnings
        try:
            return _recovery_once(payload)
        finally:
            log.setLevel(level)

    def warm_up() -> None:
        # A respawn finds the forkserver running; so must the cold start it is
        # compared with, even when no other scenario started it before.
        run_round(FanoutProcess, None)

    return [
        Case(
            "recovery",
            {"rate": 2000},
            "Recovery from a SIGKILLed worker",
            RECOVERY_METRICS,
            [FanoutProcess],
            run_round,
            before=warm_up,
            round_s=0.2,
        )
    ]


def _wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    """Spin-sleep briefly until ``predicate()``; a fine grain, since it is timed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("recovery: the worker did not come back in time")
        time.sleep(0.0001)


def _recovery_once(payload: Payload) -> dict[str, float]:
    """SIGKILL the only worker of a listener fed at 2,000/s; time to the next handled.

    Also times the listener's first start (``start()`` until its worker is
    ready), which recovery must at least repeat.
    """
    d = fanout.Distributor()
    reg = d.add_listener(BenchHandler(0.0), name="recovery")
    try:
        t_start = time.perf_counter()
        d.start()
        _wait_for(reg.ready)
        cold = time.perf_counter() - t_start
        for i in range(200):  # warm the worker up, then let it go idle
            d.distribute(fanout.Update(*payload.pair(i)))
        _wait_for(lambda: reg.stats().delivered >= 200)
        (pid,) = reg.worker_pids()
        # The worker is idle, so the next notification handled is the new
        # worker's: from the kill, through detection, respawn and resend.
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        d.distribute(fanout.Update(*payload.pair(200)))
        _wait_for(lambda: reg.stats().delivered > 200)
        return {"sigkill_to_handled": time.perf_counter() - t_kill, "cold_start": cold}
    finally:
        d.stop(drain=False)
