"""Handlers and tools shared by the tests (module-level, so they pickle).

A ``Recorder`` appends one line per handler call to a file with ``O_APPEND``
(small writes are atomic), so calls made by any worker, even one killed a moment
later, can be read back by the test.

Objects are Kubernetes-like dicts; a few keys steer the recorder:
``{"raise": True}`` raises ValueError, ``{"exit": code}`` kills the worker
(``os._exit``; ``"kill"`` sends itself SIGKILL), ``{"sleep": s}`` sleeps, and
``{"gate": path}`` blocks until ``path`` exists.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fanout


def obj(name: str, v: int = 0, ns: str = "default", **extra: Any) -> dict[str, Any]:
    """A small Kubernetes-like object."""
    return {
        "metadata": {"name": name, "namespace": ns, "resourceVersion": str(v)},
        "v": v,
        **extra,
    }


@dataclass(frozen=True)
class Call:
    pid: int
    kind: str
    name: str
    v: int
    initial: bool


class Recorder(fanout.Handler):
    """Record every call to ``path``; obey the steering keys of the object."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)

    def _record(self, kind: str, o: Any, initial: bool = False) -> None:
        # Open per call: a thread-mode recorder keeps no fd the leak check would see.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            name, v = _ident(o)
            os.write(fd, f"{os.getpid()}\t{kind}\t{name}\t{v}\t{int(initial)}\n".encode())
        finally:
            os.close(fd)

    def _steer(self, o: Any) -> None:
        if not isinstance(o, dict):
            return
        if "gate" in o:
            while not os.path.exists(o["gate"]):
                time.sleep(0.005)
        if "sleep" in o:
            time.sleep(o["sleep"])
        if "exit" in o:
            if o["exit"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(int(o["exit"]))
        if o.get("raise"):
            raise ValueError(f"asked to raise by {o['metadata']['name']}")

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        self._steer(obj)
        self._record("add", obj, is_in_initial_list)

    def on_update(self, old: Any, new: Any) -> None:
        self._steer(new)
        self._record("update", new)

    def on_delete(self, obj: Any) -> None:
        self._steer(obj)
        self._record("delete", obj)


def _ident(o: Any) -> tuple[str, int]:
    if isinstance(o, dict) and isinstance(o.get("metadata"), dict):
        return str(o["metadata"].get("name")), int(o.get("v", 0))
    return repr(o), 0


def read_calls(path: str | os.PathLike[str]) -> list[Call]:
    """Every call recorded so far, in file order."""
    p = Path(path)
    if not p.exists():
        return []
    calls = []
    # A worker may be writing a line right now: the text after the last newline is
    # not a call yet.
    for line in p.read_text().split("\n")[:-1]:
        pid, kind, name, v, initial = line.split("\t")
        calls.append(Call(int(pid), kind, name, int(v), initial == "1"))
    return calls


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)


def distribute_behind_gate(d: Any, gate: Any, n: int, versions: bool = False) -> None:
    """Distribute an add of ``slow`` that waits on ``gate``, then ``n`` adds behind it.

    Those are ``o0``, ``o1``, ... at version 0, or at version ``i`` with ``versions``.
    """
    d.distribute(fanout.Add(obj("slow", gate=str(gate))))
    for i in range(n):
        d.distribute(fanout.Add(obj(f"o{i}", i if versions else 0)))


def wait_calls(path: str | os.PathLike[str], count: int, timeout: float = 30.0) -> list[Call]:
    """Wait until at least ``count`` calls were recorded; return them."""
    wait_for(lambda: len(read_calls(path)) >= count, timeout)
    return read_calls(path)


class Noop(fanout.Handler):
    """Does nothing (a factory too: ``Noop`` is a zero-argument class)."""


class FailingFactory:
    """A factory that always raises (a handler that cannot start)."""

    def __call__(self) -> Any:
        raise RuntimeError("factory refuses to build the handler")


def add_only(obj: Any, initial: bool) -> None:
    """A module-level function for FuncHandler tests (does nothing)."""


def _return_pipe_fd() -> int:
    """The worker's return-pipe write end: the ``ret_fd`` of a frame up the stack.

    Checked against ``/proc/self/fd``: it must be a pipe open for writing only.
    (Walking every write-only pipe instead would also hit multiprocessing's
    resource-tracker pipe, shared by the whole test session.)
    """
    import fcntl
    import stat
    import sys

    frame = sys._getframe()
    while frame is not None:
        fd = frame.f_locals.get("ret_fd")
        if isinstance(fd, int) and fd > 2:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if stat.S_ISFIFO(st.st_mode) and flags & os.O_ACCMODE == os.O_WRONLY:
                return fd
        frame = frame.f_back
    raise RuntimeError("no return pipe (a write-only pipe named ret_fd) found up the stack")


class GarbageWriter(Recorder):
    """A ``Recorder`` that also obeys ``{"garbage": marker_path}``.

    The first time (per marker file) it handles such an object, it writes bytes
    that are no valid message to its worker's return pipe, then carries on
    (records the call and returns normally).
    """

    def _steer(self, o: Any) -> None:
        if isinstance(o, dict) and "garbage" in o:
            marker = o["garbage"]
            try:
                os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                pass
            else:
                os.write(_return_pipe_fd(), b"\xff\xff\xff\xff garbage on the return pipe")
        super()._steer(o)


class TermIgnorer(Recorder):
    """A ``Recorder`` whose workers ignore SIGTERM (as handlers that trap it do)."""

    def _steer(self, o: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        super()._steer(o)


class SlotScribbler(Recorder):
    """On ``{"scribble": word}``, overwrite that word of the worker's progress slot.

    The slot is found as the ``slot`` local of ``fanout.worker.main.worker_main`` up the
    call stack (the view the worker writes its progress through).
    """

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        if isinstance(obj, dict) and "scribble" in obj:
            import sys

            frame = sys._getframe()
            while frame is not None and "slot" not in frame.f_locals:
                frame = frame.f_back
            assert frame is not None, "no progress slot up the stack"
            word, value = obj["scribble"]
            frame.f_locals["slot"][word] = value
            time.sleep(obj.get("sleep", 0))
            return
        super().on_add(obj, is_in_initial_list)


def _refuse_unpickle() -> Any:
    raise RuntimeError("this handler refuses to be rebuilt in a worker")


class UnpicklableInWorker(fanout.Handler):
    """Pickles fine in the producer; unpickling it (in a worker) raises."""

    def __reduce__(self) -> Any:
        return (_refuse_unpickle, ())


def returns_none() -> None:
    """A factory that returns no handler (as ``add_listener(print)`` does)."""


class Collector:
    """An ``on_error`` / ``on_dead_letter`` callback that keeps what it is given.

    ``items`` holds ``(reg, notification, text)`` per call; ``pids`` the process
    each call ran in, in the same order (callbacks must run in the producer).
    """

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.items: list[tuple[Any, Any, str]] = []
        self.pids: list[int] = []

    def __call__(self, reg: Any, n: Any, text: str) -> None:
        with self.lock:
            self.items.append((reg, n, text))
            self.pids.append(os.getpid())

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)

    def snapshot(self) -> list[tuple[Any, Any, str]]:
        with self.lock:
            return list(self.items)

    def caller_pids(self) -> list[int]:
        with self.lock:
            return list(self.pids)


class FakeClock:
    """A ``clock=`` for a Distributor that stands still until a test sets ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Dumper(fanout.Handler):
    """Pickle ``(kind, args)`` of every call to a file, to compare what arrived."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)

    def _dump(self, item: tuple[Any, ...]) -> None:
        with open(self.path, "ab") as f:
            pickle.dump(item, f, protocol=pickle.HIGHEST_PROTOCOL)  # <5 loses byte order

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        self._dump(("add", obj, is_in_initial_list))

    def on_update(self, old: Any, new: Any) -> None:
        self._dump(("update", old, new))

    def on_delete(self, obj: Any) -> None:
        self._dump(("delete", obj))


def read_dumps(path: str | os.PathLike[str]) -> list[Any]:
    """Every ``(kind, args)`` a ``Dumper`` wrote to ``path``, in order."""
    out = []
    with open(path, "rb") as f:
        while True:
            try:
                out.append(pickle.load(f))
            except EOFError:
                return out


def twin_cases(cases: Any, divergent: dict[str, str]) -> list[Any]:
    """Sorted case names for a twin table; those in ``divergent`` as strict xfails.

    A known difference between the twins stays in the table with its reason, and
    the strict xfail fails the run once they agree, so the entry is removed.
    """
    import pytest  # here: spawned workers import this module and need no pytest

    return [
        pytest.param(c, marks=pytest.mark.xfail(reason=divergent[c], strict=True))
        if c in divergent
        else c
        for c in sorted(cases)
    ]


def outcome(call: Callable[..., Any], *args: Any) -> tuple[Any, str]:
    """``call(*args)`` as something to compare between twins.

    ``("ok", repr(result))``, or the exception's type and message.
    """
    try:
        result = call(*args)
    except Exception as exc:  # compared, not swallowed
        return type(exc), str(exc)
    return "ok", repr(result)


class PickyCodec(fanout.MsgpackCodec):
    """The msgpack codec, except that it cannot decode an object with ``"undecodable"``."""

    def unpack(self, data: Any) -> Any:
        value = super().unpack(data)
        objs = value[2:] if isinstance(value, list) and len(value) == 4 else []
        if any(isinstance(o, dict) and "undecodable" in o for o in objs):
            raise ValueError("this codec cannot decode that object")
        return value


def assert_accounted(reg: Any) -> Any:
    """Assert the accounting invariant on ``reg.stats()``; return the stats."""
    s = reg.stats()
    assert s.received == s.delivered + s.dead_lettered + s.dropped, s
    assert s.pending == 0, s
    return s


class ReprWriter(fanout.Handler):
    """Appends ``repr(obj)`` of every add to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        with open(self.path, "a") as f:
            f.write(repr(obj) + "\n")


class FailsAfterFirst:
    """A factory that builds a ``Recorder`` once (per marker file), then always raises.

    The first worker starts; a restarted one cannot (a handler whose database went
    away, say), which only the restart back-off can deal with.
    """

    def __init__(self, path: str | os.PathLike[str], marker: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.marker = str(marker)

    def __call__(self) -> Any:
        try:
            os.close(os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise RuntimeError("factory refuses to build the handler") from None
        return Recorder(self.path)


class BufferProbe(fanout.Handler):
    """Record, per call, what a big buffer looked like to the handler (JSON lines).

    ``obj``: ``{"name": str, "data": array or bytes}``, plus the steering keys
    ``started`` (a file to create when the call begins), ``gate`` (wait for it,
    unless ``obey_gate`` is False) and ``raise``.
    """

    def __init__(self, path: str | os.PathLike[str], obey_gate: bool = True) -> None:
        self.path = str(path)
        self.obey_gate = obey_gate

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        import json

        import numpy as np

        if "started" in obj:
            open(obj["started"], "a").close()
        if "gate" in obj and self.obey_gate:
            while not os.path.exists(obj["gate"]):
                time.sleep(0.005)
        if obj.get("raise"):
            raise ValueError(f"asked to raise by {obj['name']}")
        data = obj["data"]
        rec: dict[str, Any] = {"name": obj["name"], "pid": os.getpid()}
        rec["type"] = type(data).__name__
        if isinstance(data, np.ndarray):
            rec.update(
                sum=float(data.sum()),
                shape=list(data.shape),
                dtype=data.dtype.str,
                writeable=bool(data.flags.writeable),
            )
            try:
                data[(0,) * data.ndim] = 0  # in place, whatever the layout
                rec["write"] = "allowed"
            except ValueError:
                rec["write"] = "refused"
        else:
            rec.update(sum=sum(data), len=len(data))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(rec) + "\n").encode())
        finally:
            os.close(fd)

    def on_update(self, old: Any, new: Any) -> None:
        self.on_add(new, False)

    def on_delete(self, obj: Any) -> None:
        self.on_add(obj, False)


def read_probes(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records ``BufferProbe`` wrote to ``path`` (none if it does not exist)."""
    import json

    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Raiser(fanout.Handler):
    """Raises for an object with ``"raise"``."""

    def on_add(self, o: Any, initial: bool) -> None:
        if o.get("raise"):
            raise ValueError("asked to raise")


def churn_stress(
    d: fanout.Distributor,
    executors: list[str],
    kill_targets: Callable[[Any], list[int]],
    kills: int,
    notifications: int,
    max_extra: int = 6,
    kill_every: float = 0.02,
) -> tuple[list[Any], list[str], int, int]:
    """Callbacks add, remove and stop listeners while notifications flow, with kills.

    Three listeners first: two of ``executors[-1]`` (its callbacks churn) and a
    thread one, never removed. Each callback calls ``stop()`` (refused), then
    removes a listener it added, and adds one of a random executor of
    ``executors`` (up to ``max_extra``). A thread SIGKILLs a random pid of
    ``kill_targets(reg)`` every ``kill_every`` s. It sends at least
    ``notifications``, until ``kills`` kills (at most 100,000), then stops,
    draining. Returns every listener ever added, the refusals, kills and sent.
    """
    rng = random.Random(19)
    lock = threading.Lock()
    every: list[Any] = []  # every listener ever added, removed or not
    refused: list[str] = []

    def churn(reg: Any, n: Any, text: str) -> None:
        try:
            d.stop()
        except RuntimeError as exc:
            with lock:
                refused.append(str(exc))
        reg.stats()
        with lock:
            extra = [r for r in every[3:] if d.is_registered(r)]
            victim = rng.choice(extra) if extra and rng.random() < 0.6 else None
            executor = rng.choice(executors)
        if victim is not None:
            d.remove_listener(victim)
        if len(extra) >= max_extra:  # each added listener adds more: keep it bounded
            return
        try:
            new = d.add_listener(Raiser(), executor=executor, on_error=churn)
        except fanout.DistributorStopped:
            return  # the final stop began: refused, clearly
        with lock:
            every.append(new)

    base = executors[-1]
    every.append(
        d.add_listener(Raiser(), executor=base, workers=2, on_error=churn, max_attempts=2)
    )
    every.append(
        d.add_listener(
            Raiser(), executor=base, on_dead_letter=churn, on_error=churn, max_attempts=1
        )
    )
    every.append(d.add_listener(Raiser(), executor="thread", on_error=churn))
    d.start()
    stop_killing = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        while not stop_killing.wait(kill_every):
            with lock:
                regs = [r for r in every if d.is_registered(r)]
            pids = [p for r in regs for p in kill_targets(r)]
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    killed.append(1)
                except ProcessLookupError:
                    pass

    killing = threading.Thread(target=killer)
    killing.start()
    sent = 0
    try:
        while sent < notifications or (len(killed) < kills and sent < 100_000):
            for _ in range(100):
                d.distribute(fanout.Add({"i": sent, "raise": int(sent % 50 == 0)}))
                sent += 1
            wait_for(lambda: every[2].stats().pending < 200, 30)  # keep it flowing
    finally:
        stop_killing.set()
        killing.join(30)
    d.stop(drain=True, timeout=120)
    return every, refused, len(killed), sent
