"""Scenario ``schema``: Pods to 4 listeners whose handlers read five fields.

A handler that needs five fields of a Pod (name, namespace, labels, node, phase)
pays, without a schema, for decoding all of it. Contenders, in one run:

* ``fanout-schema``: process listeners with ``schema=PodView`` (default codec, msgspec);
* ``fanout-schema-msgpack``: the same with ``codec="msgpack"`` (dearer encode);
* ``fanout-process`` / ``fanout-msgpack``: no schema, each codec;
* ``pipe+msgpack``: a hand-written batched pipe per listener, msgpack both ways;
* ``thread+deque``: in-process threads, no serialization, no isolation.

Every handler reads the same five fields of the new object. The run also reports
the codec-bound limit of the schema case, ``cores / (encode + L x typed decode)``.
"""

from __future__ import annotations

import collections
import fcntl
import multiprocessing
import os
import threading
import time
import timeit
from typing import Any

import msgpack
import msgspec

import fanout
from fanout.bench.contenders import FanoutProcess
from fanout.bench.model import DELIVERIES, MAX_COUNT, Bench, Case
from fanout.bench.payloads import load_payload
from fanout.bench.sessions import reap
from fanout.core.distributor import CodecName
from fanout.listeners.pipes import F_SETPIPE_SZ, PIPE_SIZE
from fanout.stats import bucket_of
from fanout.wire.codec import get_codec
from fanout.wire.protocol import NBUCKETS
from fanout.worker.main import FdArg

__all__ = ["CONTENDERS", "PodView", "cases"]

LISTENERS = 4
BATCH = 64  # updates the pipe baseline holds before one write per listener


class Meta(msgspec.Struct):
    name: str
    namespace: str
    labels: dict[str, str] = {}


class Spec(msgspec.Struct):
    nodeName: str | None = None


class Status(msgspec.Struct):
    phase: str | None = None


class PodView(msgspec.Struct):
    """The five fields the handlers read; the rest of a Pod is skipped."""

    metadata: Meta
    spec: Spec
    status: Status


def read_dict(pod: dict[str, Any]) -> tuple[Any, ...]:
    """The five fields, from a plain decoded Pod."""
    md, spec, status = pod["metadata"], pod["spec"], pod["status"]
    return md["name"], md["namespace"], md["labels"], spec["nodeName"], status["phase"]


def read_view(pod: PodView) -> tuple[Any, ...]:
    """The five fields, from a ``PodView``."""
    md = pod.metadata
    return md.name, md.namespace, md.labels, pod.spec.nodeName, pod.status.phase


class DictReader(fanout.Handler):
    def on_update(self, old: Any, new: Any) -> None:
        read_dict(new)


class ViewReader(fanout.Handler):
    def on_update(self, old: Any, new: Any) -> None:
        read_view(new)


class _Session:
    """What the suite's runner expects of a contender besides its session calls."""

    name = "?"
    kind = "process"

    @classmethod
    def unavailable(cls) -> str | None:
        """Why it cannot run here: never (msgspec is imported above)."""
        return None

    def flush(self) -> None:
        """Push out what is held back (nothing, unless batching)."""


class _Fanout(FanoutProcess):
    """fanout with process listeners; subclasses pick codec and schema."""

    codec: CodecName = "msgspec"
    schema: Any = None

    def __init__(self, listeners: int, workers: int, work_us: float, gate: Any) -> None:
        # The suite's fanout session, with readers for handlers (no gate, no spin).
        self.d = fanout.Distributor(codec=self.codec)
        handler = DictReader() if self.schema is None else ViewReader()
        self.regs = [
            self.d.add_listener(handler, name=f"schema-{i}", schema=self.schema)
            for i in range(listeners)
        ]
        self.stalled = frozenset()


class FanoutSchema(_Fanout):
    name = "fanout-schema"
    schema = PodView


class FanoutSchemaMsgpack(_Fanout):
    name = "fanout-schema-msgpack"
    codec = "msgpack"
    schema = PodView


class FanoutMsgpack(_Fanout):
    name = "fanout-msgpack"
    codec = "msgpack"


def _pipe_reader(fd: int, result: int) -> None:
    """A baseline consumer: stream-decode msgpack, read five fields, report."""
    os.write(result, b"R")
    count = 0
    hist = [0] * NBUCKETS
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        unpacker.feed(chunk)
        for t_ns, _old, new in unpacker:
            hist[bucket_of(time.monotonic_ns() - t_ns)] += 1
            read_dict(new)
            count += 1
    os.write(result, msgpack.packb({"count": count, "hist": hist}))
    os.close(result)


class PipeMsgpack(_Session):
    """Encode once with msgpack, batched writes to one pipe per listener."""

    name = "pipe+msgpack"

    def __init__(self, listeners: int, workers: int, work_us: float, gate: Any) -> None:
        self.L = listeners
        self.ctx = multiprocessing.get_context("forkserver")
        self.procs: list[Any] = []
        self.fds: list[int] = []
        self.results: list[int] = []
        self.buf: list[bytes] = []

    def start(self) -> None:
        for _ in range(self.L):
            r, w = os.pipe()
            rr, rw = os.pipe()
            try:  # the pipe size fanout asks for: like with like
                fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
            p = self.ctx.Process(target=_pipe_reader, args=(FdArg(r), FdArg(rw)), daemon=True)
            p.start()
            os.close(r)
            os.close(rw)
            self.procs.append(p)
            self.fds.append(w)
            self.results.append(rr)
        for fd in self.results:
            if os.read(fd, 1) != b"R":
                raise RuntimeError(f"{self.name}: a consumer failed to start")

    def send(self, old: Any, new: Any) -> None:
        self.buf.append(msgpack.packb([time.monotonic_ns(), old, new]))
        if len(self.buf) >= BATCH:
            self.flush()

    def flush(self) -> None:
        data = b"".join(self.buf)
        self.buf = []
        for fd in self.fds:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        self.flush()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        out = []
        for fd in self.results:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            out.append(msgpack.unpackb(b"".join(chunks), raw=False))
        for p in self.procs:
            p.join(timeout)
        return out

    def close(self) -> None:
        for fd in self.fds + self.results:
            os.close(fd)
        self.fds, self.results = [], []
        reap(self.procs)
        self.procs = []


class ThreadDeque(_Session):
    """In-process listeners: a thread, a deque and a Condition each."""

    name = "thread+deque"
    kind = "thread"

    def __init__(self, listeners: int, workers: int, work_us: float, gate: Any) -> None:
        self.queues: list[collections.deque[Any]] = [collections.deque() for _ in range(listeners)]
        self.conds = [threading.Condition() for _ in range(listeners)]
        self.results: list[dict[str, Any]] = [
            {"count": 0, "hist": [0] * NBUCKETS} for _ in range(listeners)
        ]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(listeners)]

    def _run(self, i: int) -> None:
        q, cond, result = self.queues[i], self.conds[i], self.results[i]
        hist = result["hist"]
        while True:
            with cond:
                while not q:
                    cond.wait()
                item = q.popleft()
            if item is None:
                return
            t_ns, _old, new = item
            hist[bucket_of(time.monotonic_ns() - t_ns)] += 1
            read_dict(new)
            result["count"] += 1

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def send(self, old: Any, new: Any) -> None:
        self._put((time.monotonic_ns(), old, new))

    def _put(self, item: Any) -> None:
        for q, cond in zip(self.queues, self.conds, strict=True):
            with cond:
                q.append(item)
                cond.notify()

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        self._put(None)
        for t in self.threads:
            t.join(timeout)
            if t.is_alive():
                raise TimeoutError(f"{self.name}: a listener thread did not finish")
        return self.results

    def close(self) -> None:
        if any(t.is_alive() for t in self.threads):
            self._put(None)
            for t in self.threads:
                t.join(5)


CONTENDERS: list[Any] = [
    FanoutSchema,
    FanoutSchemaMsgpack,
    _Fanout,
    FanoutMsgpack,
    PipeMsgpack,
    ThreadDeque,
]


def codec_limit(codec: Any, listeners: int = LISTENERS, number: int = 2000) -> dict[str, Any]:
    """``cores / (encode + L x typed decode)`` for a Pod update, measured now."""
    old, new = load_payload("pod").pair(0)
    n = fanout.Update(old, new)
    data = codec.encode(n, time.monotonic_ns())
    decode = codec.unpacker(PodView)

    def best(stmt: Any) -> float:
        return min(timeit.repeat(stmt, number=number, repeat=3)) / number

    enc = best(lambda: codec.encode(n, 0))
    dec = best(lambda: decode(data))
    cores = os.cpu_count() or 1
    return {
        "payload": f"pod, schema=PodView, codec={codec.name}",
        "listeners": listeners,
        "encode_s": enc,
        "decode_s": dec,
        "cores": cores,
        "limit_deliveries_per_s": cores / (enc + listeners * dec) * listeners,
    }


def _stat_ticks(pid: int, children: bool) -> int:
    """CPU clock ticks of ``pid`` from /proc (with its reaped children's, if asked)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # it just exited: its time is in its parent's children's now
        return 0
    # Fields 14-17 of proc(5): utime, stime, cutime, cstime (index 11 = field 14).
    return sum(int(x) for x in fields[11 : 15 if children else 13])


def cpu_seconds() -> float:
    """CPU used so far by this process, the forkserver and every worker it forked.

    Live workers are read one by one; exited ones count in the forkserver's
    reaped-children time, so a worker is counted once whether it lives or not.
    """
    from multiprocessing import forkserver

    ticks = _stat_ticks(os.getpid(), True)
    server = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if server:
        ticks += _stat_ticks(server, True)
        try:
            with open(f"/proc/{server}/task/{server}/children") as f:
                live = [int(pid) for pid in f.read().split()]
        except OSError:
            live = []
        ticks += sum(_stat_ticks(pid, False) for pid in live)
    return ticks / os.sysconf("SC_CLK_TCK")


def _round(suite: Any, cls: Any, n: int) -> tuple[float, float]:
    """One measured batch of ``n`` updates: (deliveries/s, CPU seconds per delivery)."""
    payload = load_payload("pod")
    session = cls(LISTENERS, 1, 0.0, None)
    try:
        session.start()  # not measured: neither its time nor its CPU
        pair, send = payload.pair, session.send
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        for i in range(n):
            send(*pair(i))
        results = session.finish(120.0)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
    finally:
        session.close()
    delivered = sum(r["count"] for r in results)
    if delivered != n * LISTENERS:
        raise RuntimeError(f"{cls.name} delivered {delivered} of {n * LISTENERS}")
    return delivered / elapsed, cpu / delivered


def cases(suite: Bench) -> list[Case]:
    """The scenario's one case for ``suite``.

    Besides deliveries/s, each round measures the CPU every process spent per
    delivery, which other load on the machine does not change: ``cores / that``
    is the rate on an idle machine. The codec-bound limits of the schema case
    (both codecs) are measured before the rounds.
    """
    wanted = suite.opts.contenders
    chosen = [
        c
        for c in CONTENDERS
        if wanted is None or c.name in wanted or c.name.startswith("fanout-schema")
    ]

    def calibrate(cls: Any) -> int:  # a small probe, then a fifth of a round
        n = 50
        for share in (0.2, 1.0):
            rate, _ = _round(suite, cls, n)
            n = int(min(MAX_COUNT, max(50, rate / LISTENERS * suite.opts.duration * share)))
        return n

    def run_round(cls: Any, n: int) -> dict[str, Any]:
        rate, cost = _round(suite, cls, n)
        return {"deliveries": rate, "cpu_s_per_delivery": cost}

    def limits() -> None:
        for codec in ("msgpack", "msgspec"):
            suite.codec_limits.append(codec_limit(get_codec(codec)))

    return [
        Case(
            "schema",
            {"payload": "pod", "listeners": LISTENERS, "reads": 5},
            f"Pods to {LISTENERS} listeners whose handlers read five fields",
            [DELIVERIES],
            chosen,
            run_round,
            calibrate=calibrate,
            before=limits,
            round_s=suite.opts.duration,
            calibrate_s=0.3 * suite.opts.duration + 0.25,
        )
    ]
