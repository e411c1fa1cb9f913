"""The hand-written baselines fanout competes with, each a contender session.

A pipe per consumer with msgpack (``pipe+msgpack``) or with length-prefixed
msgspec frames (``pipe+msgspec``), ``multiprocessing.Queue``, faster-fifo,
pyzmq PUSH/PULL, and an in-process thread with a deque. Each runs the common
handler (:class:`fanout.bench.sessions.BenchHandler`) in its consumers and
keeps the same counts and latency histogram as fanout's sessions
(``fanout.bench.sessions`` describes the session protocol).
"""

from __future__ import annotations

import collections
import fcntl
import multiprocessing
import os
import select
import shutil
import tempfile
import threading
import time
from typing import Any

import msgpack
import msgspec

from fanout.bench.sessions import BenchHandler, Contender, read_result, reap, say_ready
from fanout.listeners.pipes import F_SETPIPE_SZ, PIPE_SIZE
from fanout.stats import bucket_of
from fanout.wire.protocol import NBUCKETS
from fanout.worker.main import FdArg

__all__ = ["BestPipe", "FasterFifo", "MpQueue", "PipeBaseline", "ThreadDeque", "Zmq"]

BATCH = 64  # notifications a batching baseline holds before writing


class _Tally:
    """The baselines' side of the common handler, with latency bookkeeping."""

    def __init__(self, work_us: float, gate: str | None) -> None:
        self.handler = BenchHandler(work_us, gate)
        self.count = 0
        self.hist = [0] * NBUCKETS
        self.t_last = 0.0

    def handle(self, t_ns: int, old: Any, new: Any) -> None:
        self.hist[bucket_of(time.monotonic_ns() - t_ns)] += 1
        self.handler.on_update(old, new)
        self.count += 1
        self.t_last = time.monotonic()

    def result(self) -> dict[str, Any]:
        return {"count": self.count, "hist": self.hist, "t_last": self.t_last}

    def report(self, fd: int) -> None:
        data = msgpack.packb(self.result())
        while data:
            data = data[os.write(fd, data) :]
        os.close(fd)


class _ProcessSession(Contender):
    """Shared plumbing of contenders whose consumers are processes."""

    def __init__(
        self,
        listeners: int,
        workers: int,
        work_us: float,
        gate: str | None,
        stalled: frozenset[int] = frozenset(),
    ) -> None:
        self.L, self.W, self.work_us, self.gate, self.stalled = (
            listeners,
            workers,
            work_us,
            gate,
            stalled,
        )
        self.ctx = multiprocessing.get_context("forkserver")
        self.procs: list[Any] = []
        self.result_fds: list[int] = []
        # What batching contenders hold back: per listener, per consumer.
        self.bufs: list[list[list[Any]]] = [[[] for _ in range(workers)] for _ in range(listeners)]
        self.pending = 0

    def _spawn(self, target: Any, listener: int, *args: Any) -> None:
        r, w = os.pipe()
        gate = self.gate if listener in self.stalled else None
        p = self.ctx.Process(
            target=target, args=(*args, FdArg(w), self.work_us, gate), daemon=True
        )
        p.start()
        os.close(w)
        self.procs.append(p)
        self.result_fds.append(r)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        for fd in self.result_fds:
            if not select.select([fd], [], [], timeout)[0] or os.read(fd, 1) != b"R":
                raise RuntimeError(f"{self.name}: a consumer failed to start")

    def _lane(self, new: Any) -> int:
        if self.W == 1:
            return 0
        return hash(new["metadata"]["name"]) % self.W

    def _collect(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        results = [
            read_result(fd, max(0.1, deadline - time.monotonic())) for fd in self.result_fds
        ]
        self.result_fds = []
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
        return results

    def _batch(self, item: Any, new: Any) -> None:
        """Queue ``item`` for every listener's lane of ``new``; write every BATCH."""
        lane = self._lane(new)
        for bufs in self.bufs:
            bufs[lane].append(item)
        self.pending += 1
        if self.pending >= BATCH:
            self.flush()

    def close(self) -> None:
        reap(self.procs)
        self.procs = []
        for fd in self.result_fds:
            os.close(fd)
        self.result_fds = []


# -- hand-written pipe baseline -------------------------------------------------------------


def _pipe_consumer(fd: int, result: int, work_us: float, gate: str | None) -> None:
    tally = _Tally(work_us, gate)
    say_ready(result)
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        unpacker.feed(chunk)
        for t_ns, old, new in unpacker:
            tally.handle(t_ns, old, new)
    tally.report(result)


class PipeBaseline(_ProcessSession):
    """Encode once with msgpack, write batched frames to one pipe per consumer."""

    name = "pipe+msgpack"
    consumer = staticmethod(_pipe_consumer)

    def start(self) -> None:
        self.fds: list[list[int]] = []
        for i in range(self.L):
            row = []
            for _ in range(self.W):
                r, w = os.pipe()
                try:  # the same pipe size fanout asks for: compare like with like
                    fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
                except OSError:
                    pass
                self._spawn(self.consumer, i, FdArg(r))
                os.close(r)
                row.append(w)
            self.fds.append(row)
        self._wait_ready()

    def send(self, old: Any, new: Any) -> None:
        self._batch(msgpack.packb([time.monotonic_ns(), old, new]), new)

    def flush(self) -> None:
        for fds, bufs in zip(self.fds, self.bufs, strict=True):
            for lane, buf in enumerate(bufs):
                if buf:
                    data = memoryview(b"".join(buf))
                    while data:
                        data = data[os.write(fds[lane], data) :]
                    buf.clear()
        self.pending = 0

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        self.flush()
        for row in self.fds:
            for fd in row:
                os.close(fd)
        self.fds = []
        return self._collect(timeout)

    def close(self) -> None:
        for row in getattr(self, "fds", []):
            for fd in row:
                os.close(fd)
        self.fds = []
        super().close()


def _best_pipe_consumer(fd: int, result: int, work_us: float, gate: str | None) -> None:
    tally = _Tally(work_us, gate)
    say_ready(result)
    decode = msgspec.msgpack.Decoder().decode
    rest = b""
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        data = rest + chunk if rest else chunk
        view, pos, end = memoryview(data), 0, len(data)
        while end - pos >= 4:
            stop = pos + 4 + int.from_bytes(data[pos : pos + 4], "little")
            if stop > end:
                break
            t_ns, old, new = decode(view[pos + 4 : stop])
            tally.handle(t_ns, old, new)
            pos = stop
        rest = data[pos:]
    tally.report(result)


class BestPipe(PipeBaseline):
    """What an expert writes: length-prefixed frames, msgspec both ways, batched writes."""

    name = "pipe+msgspec"
    consumer = staticmethod(_best_pipe_consumer)

    def start(self) -> None:
        self._encode = msgspec.msgpack.Encoder().encode
        super().start()

    def send(self, old: Any, new: Any) -> None:
        data = self._encode((time.monotonic_ns(), old, new))
        self._batch(len(data).to_bytes(4, "little") + data, new)


# -- multiprocessing.Queue ------------------------------------------------------------------


def _queue_consumer(q: Any, result: int, work_us: float, gate: str | None) -> None:
    tally = _Tally(work_us, gate)
    say_ready(result)
    while True:
        item = q.get()
        if item is None:
            break
        tally.handle(*item)
    tally.report(result)


class MpQueue(_ProcessSession):
    """One ``multiprocessing.Queue`` per consumer (pickles each put)."""

    name = "mp.Queue"

    def start(self) -> None:
        self.queues = []
        for i in range(self.L):
            row = [self.ctx.Queue() for _ in range(self.W)]
            for q in row:
                self._spawn(_queue_consumer, i, q)
            self.queues.append(row)
        self._wait_ready()

    def send(self, old: Any, new: Any) -> None:
        item = (time.monotonic_ns(), old, new)
        lane = self._lane(new)
        for row in self.queues:
            row[lane].put(item)

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        for row in self.queues:
            for q in row:
                q.put(None)
        results = self._collect(timeout)
        self._close_queues()
        return results

    def _close_queues(self) -> None:
        for row in getattr(self, "queues", []):
            for q in row:
                q.cancel_join_thread()
                q.close()
        self.queues = []

    def close(self) -> None:
        super().close()
        self._close_queues()


# -- faster-fifo ----------------------------------------------------------------------------


def _ff_consumer(q: Any, result: int, work_us: float, gate: str | None) -> None:
    tally = _Tally(work_us, gate)
    say_ready(result)
    while True:
        for item in q.get_many(timeout=1e9, max_messages_to_get=1024):
            if item is None:
                tally.report(result)
                return
            tally.handle(*item)


class FasterFifo(_ProcessSession):
    """One faster-fifo queue per consumer, ``put_many`` in batches."""

    name = "faster-fifo"

    requires = ("faster_fifo", "faster-fifo")

    def start(self) -> None:
        import faster_fifo

        self.queues = []
        for i in range(self.L):
            row = [faster_fifo.Queue(max_size_bytes=64 << 20) for _ in range(self.W)]
            for q in row:
                self._spawn(_ff_consumer, i, q)
            self.queues.append(row)
        self._wait_ready()

    def send(self, old: Any, new: Any) -> None:
        self._batch((time.monotonic_ns(), old, new), new)

    def flush(self) -> None:
        for row, bufs in zip(self.queues, self.bufs, strict=True):
            for q, buf in zip(row, bufs, strict=True):
                if buf:
                    q.put_many(buf, timeout=1e9)
                    buf.clear()
        self.pending = 0

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        self.flush()
        for row in self.queues:
            for q in row:
                q.put(None, timeout=1e9)
        return self._collect(timeout)


# -- pyzmq ----------------------------------------------------------------------------------


def _zmq_consumer(addr: str, result: int, work_us: float, gate: str | None) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.connect(addr)
    tally = _Tally(work_us, gate)
    say_ready(result)
    unpackb = msgpack.unpackb
    while True:
        data = sock.recv()
        if not data:
            break
        t_ns, old, new = unpackb(data, raw=False)
        tally.handle(t_ns, old, new)
    sock.close(0)
    ctx.term()
    tally.report(result)


class Zmq(_ProcessSession):
    """pyzmq PUSH/PULL over ipc://, one socket per consumer, encode once."""

    name = "pyzmq"

    requires = ("zmq", "pyzmq")

    def start(self) -> None:
        import zmq

        self.tmp = tempfile.mkdtemp(prefix="fanout-bench-zmq-")
        self.zctx = zmq.Context()
        self.socks = []
        for i in range(self.L):
            row = []
            for j in range(self.W):
                sock = self.zctx.socket(zmq.PUSH)
                addr = f"ipc://{self.tmp}/{i}-{j}"
                sock.bind(addr)
                self._spawn(_zmq_consumer, i, addr)
                row.append(sock)
            self.socks.append(row)
        self._wait_ready()

    def send(self, old: Any, new: Any) -> None:
        data = msgpack.packb([time.monotonic_ns(), old, new])
        lane = self._lane(new)
        for row in self.socks:
            row[lane].send(data, copy=False)

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        for row in self.socks:
            for sock in row:
                sock.send(b"")
        results = self._collect(timeout)
        self._close_zmq()
        return results

    def _close_zmq(self) -> None:
        for row in getattr(self, "socks", []):
            for sock in row:
                sock.close(0)
        self.socks = []
        if hasattr(self, "zctx"):
            self.zctx.term()
            del self.zctx
            shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> None:
        super().close()
        self._close_zmq()


# -- thread + deque -------------------------------------------------------------------------


class ThreadDeque(Contender):
    """Hand-written in-process listener: a thread, a deque and a Condition each."""

    name = "thread+deque"
    kind = "thread"

    def __init__(
        self,
        listeners: int,
        workers: int,
        work_us: float,
        gate: str | None,
        stalled: frozenset[int] = frozenset(),
    ) -> None:
        self.tallies = [_Tally(work_us, gate if i in stalled else None) for i in range(listeners)]
        self.queues: list[collections.deque[Any]] = [collections.deque() for _ in range(listeners)]
        self.conds = [threading.Condition() for _ in range(listeners)]
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(listeners)
        ]

    def _run(self, i: int) -> None:
        q, cond, tally = self.queues[i], self.conds[i], self.tallies[i]
        while True:
            with cond:
                while not q:
                    cond.wait()
                item = q.popleft()
            if item is None:
                return
            tally.handle(*item)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def send(self, old: Any, new: Any) -> None:
        item = (time.monotonic_ns(), old, new)
        for q, cond in zip(self.queues, self.conds, strict=True):
            with cond:
                q.append(item)
                cond.notify()

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        for q, cond in zip(self.queues, self.conds, strict=True):
            with cond:
                q.append(None)
                cond.notify()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                raise TimeoutError(f"{self.name}: a listener thread did not finish")
        return [t.result() for t in self.tallies]

    def close(self) -> None:
        for q, cond in zip(self.queues, self.conds, strict=True):
            with cond:
                q.append(None)
                cond.notify()
