"""Contenders: fanout's own sessions, and the list of every one ``fanout bench`` compares.

fanout with process listeners (msgspec, and msgpack) and with thread listeners,
then the hand-written baselines of ``fanout.bench.baselines``. Every one is a
session as ``fanout.bench.sessions`` describes, driven the same way.
"""

from __future__ import annotations

from typing import Any

import fanout
from fanout.bench.baselines import BestPipe, FasterFifo, MpQueue, PipeBaseline, ThreadDeque, Zmq
from fanout.bench.sessions import BenchHandler, Contender
from fanout.core.distributor import CodecName, Executor

__all__ = ["CONTENDERS", "FanoutMsgpack", "FanoutProcess", "FanoutThread"]


class FanoutProcess(Contender):
    """fanout, process listeners, the default codec (msgspec)."""

    name = "fanout-process"
    kind = "process"
    codec: CodecName = "msgspec"
    executor: Executor = "process"

    def __init__(
        self,
        listeners: int,
        workers: int,
        work_us: float,
        gate: str | None,
        stalled: frozenset[int] = frozenset(),
    ) -> None:
        self.d = fanout.Distributor(codec=self.codec)
        self.regs = [
            self.d.add_listener(
                BenchHandler(work_us, gate if i in stalled else None),
                name=f"bench-{i}",
                workers=1 if self.executor == "thread" else workers,  # one thread
                executor=self.executor,
            )
            for i in range(listeners)
        ]
        self.stalled = stalled

    def start(self) -> None:
        self.d.start()
        for reg in self.regs:
            if not reg.wait_ready(60):
                raise RuntimeError(f"{self.name}: workers did not start")

    def send(self, old: Any, new: Any) -> None:
        self.d.distribute(fanout.Update(old, new))

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        if not self.d.stop(drain=True, timeout=timeout):
            raise TimeoutError(f"{self.name}: not drained in {timeout} s")
        out = []
        for reg in self.regs:
            s = reg.stats()
            out.append({"count": s.delivered, "hist": reg.latency_histogram()})
        return out

    def buffered_bytes(self) -> int | None:
        return sum(reg.stats().pending_bytes for reg in self.regs)

    def close(self) -> None:
        self.d.stop(drain=False)


class FanoutMsgpack(FanoutProcess):
    """fanout, process listeners, ``codec="msgpack"`` (the same bytes, encoded slower)."""

    name = "fanout-msgpack"
    codec = "msgpack"


class FanoutThread(FanoutProcess):
    """fanout, thread listeners (objects passed in process, no isolation)."""

    name = "fanout-thread"
    kind = "thread"
    executor = "thread"


CONTENDERS: list[Any] = [
    FanoutProcess,
    FanoutMsgpack,
    FanoutThread,
    PipeBaseline,
    BestPipe,
    MpQueue,
    FasterFifo,
    Zmq,
    ThreadDeque,
]
