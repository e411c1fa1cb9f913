"""What every contender session shares: the base class, the common handler, pipe helpers.

A session has ``L`` listeners with ``W`` consumers each; ``start()`` spawns them
and waits until they are ready (start-up is not measured), ``send(old, new)``
fans one update out, ``flush()`` pushes out what a batching contender holds,
``finish(timeout)`` closes the inputs, waits for every consumer to handle
everything and returns per-consumer ``{"count", "hist"}`` (handler calls and a
latency histogram, distribute -> handler start, in fanout's buckets), and
``close()`` kills whatever is left. Consumers run the same handler: optional
gate (a stalled listener waits for a file), then ``work_us`` of pure Python.
"""

from __future__ import annotations

import importlib
import os
import select
import time
from typing import Any

import msgpack

import fanout
from fanout.bench.payloads import spin

__all__ = ["BenchHandler", "Contender", "read_result", "reap", "say_ready"]


class BenchHandler(fanout.Handler):
    """fanout's side of the common handler: wait for the gate, then spin."""

    def __init__(self, work_us: float, gate: str | None = None) -> None:
        self.work_us = work_us
        self.gate = gate

    def on_update(self, old: Any, new: Any) -> None:
        if self.gate is not None:
            while not os.path.exists(self.gate):
                time.sleep(0.002)
            self.gate = None
        spin(self.work_us)


def reap(procs: list[Any]) -> None:
    """Kill the consumer processes still alive, then wait for and release each one."""
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
        p.close()


def say_ready(fd: int) -> None:
    """Tell the producer, on a consumer's result pipe, that the consumer is ready."""
    os.write(fd, b"R")


def read_result(fd: int, timeout: float) -> dict[str, Any]:
    """Read a consumer's result (after its ready byte) from a blocking pipe."""
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError("a consumer did not report in time")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    result: dict[str, Any] = msgpack.unpackb(b"".join(chunks), raw=False)
    return result


class Contender:
    """What every contender has; subclasses override what differs."""

    name = "?"
    kind = "process"  # or "thread": where the handlers run
    requires: tuple[str, str] | None = None  # (module, package) it needs, if any

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this contender cannot run here (a package is missing), or None."""
        if cls.requires is None:
            return None
        module, package = cls.requires
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{package} not installed (pip install {package})"
        return None

    def flush(self) -> None:
        """Push out what a batching contender holds (nothing, for most)."""

    def buffered_bytes(self) -> int | None:
        """Bytes held for listeners that have not handled them, if known."""
        return None
