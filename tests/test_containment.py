"""Everything a worker starts ends with it; a forked copy of a worker reads nothing.

Handlers here start processes the usual ways a handler would (``subprocess.Popen``,
a double-forked ``setsid`` daemon that ignores SIGTERM and SIGHUP, 50 plain forks)
and record each one's pid and start time. Whatever ends the worker (``stop()``, a
``handler_timeout`` kill, a crash, the producer's SIGKILL), none may outlive it.
Every recorded process is killed at teardown, so a failing test leaves none behind.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import Recorder, obj, read_calls, wait_calls, wait_for

import fanout
from fanout.wire.protocol import HANDLED
from fanout.worker.warden import OOM_SCORE_BOOST

GONE_WITHIN = 10.0  # the promise is about a second; room for a loaded machine


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2 :].split()[19].decode()


def _note(log: str, pid: int) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{pid} {_start_time(pid)}\n".encode())
    finally:
        os.close(fd)


def _daemon(log: str) -> None:
    """Start ``sleep`` detached as a daemon is: fork, setsid, fork; SIGTERM/SIGHUP ignored."""
    r, w = os.pipe()
    first = os.fork()
    if first == 0:
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                _note(log, os.getpid())
                os.close(w)
                os.execvp("sleep", ["sleep", "1000"])
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(first, 0)
    os.read(r, 1)  # EOF once the daemon noted itself and exec'd
    os.close(r)


def _forks(log: str, n: int) -> None:
    """Fork ``n`` copies of the worker that sleep (look-alike workers)."""
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(1000)
            finally:
                os._exit(0)
        _note(log, pid)


class Starter(Recorder):
    """On ``{"start": [what...], "log": path}``: start processes, then obey the rest.

    ``popen``: ``sleep 1000`` by ``subprocess.Popen``; ``daemon``: see ``_daemon``;
    ``forks``: 50 sleeping forks. Each is noted in ``log`` as ``pid start_time``.
    """

    def _steer(self, o: Any) -> None:
        if isinstance(o, dict) and "start" in o:
            log = o["log"]
            for what in o["start"]:
                if what == "popen":
                    proc = subprocess.Popen(["sleep", "1000"])
                    _note(log, proc.pid)
                    proc.returncode = 0  # never reaped here: let the warden do it
                elif what == "daemon":
                    _daemon(log)
                elif what == "forks":
                    _forks(log, 50)
        super()._steer(o)


def _noted(log: Path) -> list[tuple[int, str]]:
    if not log.exists():
        return []
    return [(int(p), t) for p, t in (line.split() for line in log.read_text().splitlines())]


def _running(pid: int, start: str) -> bool:
    try:
        return _start_time(pid) == start and psutil.Process(pid).status() not in (
            psutil.STATUS_ZOMBIE,
            psutil.STATUS_DEAD,
        )
    except (OSError, psutil.Error):
        return False


def _survivors(log: Path) -> list[int]:
    return [pid for pid, start in _noted(log) if _running(pid, start)]


@pytest.fixture
def started(tmp_path):
    """The log the handlers note their processes in; whatever is left is killed after."""
    log = tmp_path / "started"
    yield log
    for pid, start in _noted(log):
        if _running(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start(log: Path, *what: str, **steer: Any) -> Any:
    return fanout.Add(obj("starter", start=list(what), log=str(log), **steer))


def test_what_a_handler_starts_ends_at_stop(make_dist, tmp_path, start_method, started):
    calls = tmp_path / "calls"
    d = make_dist(start_method=start_method)
    d.add_listener(Starter(calls), workers=2)
    d.start()
    d.distribute(_start(started, "popen", "daemon", "forks"))
    assert len(wait_calls(calls, 1)) == 1
    assert len(_noted(started)) == 52
    assert len(_survivors(started)) == 52  # they run until the worker ends
    assert d.stop(drain=True, timeout=30) is True
    assert wait_for(lambda: not _survivors(started), GONE_WITHIN), _survivors(started)


def test_what_a_killed_worker_started_ends_with_it(make_dist, tmp_path, start_method, started):
    """Each timeout kill ends what that attempt started: no orphan per retry."""
    calls = tmp_path / "calls"
    dead = []
    d = make_dist(start_method=start_method)
    reg = d.add_listener(
        Starter(calls),
        handler_timeout=0.5,
        max_attempts=3,
        on_dead_letter=lambda reg, n, why: dead.append(why),
    )
    d.start()
    d.distribute(_start(started, "popen", "daemon", sleep=1000))
    assert wait_for(lambda: dead, 60), reg.stats()
    assert len(_noted(started)) == 6  # three attempts, two processes each
    assert wait_for(lambda: not _survivors(started), GONE_WITHIN), _survivors(started)
    assert "handler_timeout" in dead[0]
    assert d.stop(drain=True, timeout=30) is True


def test_what_a_crashed_worker_started_ends_with_it(make_dist, tmp_path, start_method, started):
    calls = tmp_path / "calls"
    d = make_dist(start_method=start_method)
    reg = d.add_listener(Starter(calls), max_attempts=1, on_dead_letter=lambda *a: None)
    d.start()
    assert reg.wait_ready(30)
    d.distribute(_start(started, "daemon", "forks", exit="kill"))
    assert wait_for(lambda: reg.stats().dead_lettered == 1, 30), reg.stats()
    assert len(_noted(started)) == 51
    assert wait_for(lambda: not _survivors(started), GONE_WITHIN), _survivors(started)
    # The lane goes on with a new worker.
    d.distribute(fanout.Add(obj("after")))
    assert [c.name for c in wait_calls(calls, 1)] == ["after"]
    assert d.stop(drain=True, timeout=30) is True


def test_a_handler_killing_its_warden_ends_its_own_worker_only(make_dist, tmp_path, start_method):
    """Under both start methods, the worker's parent is its warden, never the producer."""
    calls = tmp_path / "calls"
    d = make_dist(start_method=start_method)
    reg = d.add_listener(ParentKiller(calls), max_attempts=1, on_dead_letter=lambda *a: None)
    d.start()
    assert reg.wait_ready(30)
    (pid,) = reg.worker_pids()
    warden = psutil.Process(pid).ppid()
    assert warden != os.getpid()
    d.distribute(fanout.Add(obj("kill-parent")))
    assert wait_for(lambda: reg.stats().dead_lettered == 1 and reg.ready(), 30), reg.stats()
    assert reg.worker_pids() != [pid]
    d.distribute(fanout.Add(obj("after")))
    assert [c.name for c in wait_calls(calls, 1)] == ["after"]
    assert d.stop(drain=True, timeout=30) is True


class ParentKiller(Recorder):
    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        if obj["metadata"]["name"] == "kill-parent":
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(30)  # the worker dies with its parent, long before this ends
        super().on_add(obj, is_in_initial_list)


def _oom_score_adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


def test_workers_are_the_oom_killers_first_choice(make_dist, tmp_path, start_method):
    mine = _oom_score_adj(os.getpid())
    d = make_dist(start_method=start_method)
    reg = d.add_listener(Recorder(tmp_path / "calls"), workers=2)
    d.start()
    assert reg.wait_ready(30)
    for pid in reg.worker_pids():
        warden = psutil.Process(pid).ppid()
        for p in (pid, warden):
            assert _oom_score_adj(p) == min(1000, mine + OOM_SCORE_BOOST)
    assert _oom_score_adj(os.getpid()) == mine  # never lowered
    assert d.stop(drain=True, timeout=30) is True


class Forker(Recorder):
    """Forks on every call; both copies return into the worker's loop."""

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        pid = os.fork()
        if pid:
            os.waitpid(pid, 0)  # no zombies piling up under the worker
        super().on_add(obj, is_in_initial_list)


class CForker(Recorder):
    """Forks from C on every call (libc's fork() through ctypes): no Python fork hook runs."""

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        import ctypes

        pid = ctypes.CDLL(None, use_errno=True).fork()
        if pid:
            os.waitpid(pid, 0)
        super().on_add(obj, is_in_initial_list)


@pytest.fixture(params=["native", "py"])
def worker_loop(request, monkeypatch):
    """Both worker loops: the twin is chosen by the environment a spawned worker gets."""
    if request.param == "native" and not fanout.native.pick.NATIVE:
        pytest.skip("native extensions are not built")
    if request.param == "py":
        monkeypatch.setenv("FANOUT_NO_EXTENSIONS", "1")
        return "spawn"  # the forkserver keeps the environment it started with
    return request.param


class LoopNamer(fanout.Handler):
    """Writes the module of the frame loop its worker runs to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        Path(self.path).write_text(fanout.native.pick.serve.__module__)


def test_the_worker_loop_fixture_picks_the_loop(make_dist, tmp_path, worker_loop):
    d = make_dist(start_method="spawn" if worker_loop == "spawn" else "forkserver")
    d.add_listener(LoopNamer(str(tmp_path / "loop")))
    d.start()
    d.distribute(fanout.Add(obj("a")))
    assert wait_for((tmp_path / "loop").exists, 30)
    expected = "fanout.native._worker_py" if worker_loop == "spawn" else "fanout.native._worker"
    assert (tmp_path / "loop").read_text() == expected
    assert d.stop(drain=True, timeout=30) is True


@pytest.mark.parametrize("forker", [Forker, CForker], ids=["os.fork", "C fork"])
def test_a_forked_copy_of_a_worker_reads_nothing(make_dist, tmp_path, worker_loop, forker):
    calls = tmp_path / "calls"
    start_method = "spawn" if worker_loop == "spawn" else "forkserver"
    d = make_dist(start_method=start_method)
    reg = d.add_listener(forker(calls))
    d.start()
    assert reg.wait_ready(30)
    (pid,) = reg.worker_pids()
    n = 300
    for i in range(n):
        d.distribute(fanout.Add(obj("same-key", i)))
    got = wait_calls(calls, n)
    assert wait_for(lambda: reg.stats().delivered == n, 30), reg.stats()
    got = read_calls(calls)
    # Each handled once, by the worker and in order; each call's fork recorded it too.
    worker_calls = [c.v for c in got if c.pid == pid]
    assert worker_calls == list(range(n))
    copies = [c for c in got if c.pid != pid]
    assert sorted(c.v for c in copies) == list(range(n))
    s = reg.stats()
    assert (s.delivered, s.received, s.restarts) == (n, n, 0), s
    assert d.stop(drain=True, timeout=30) is True


class ForkingInit(Recorder):
    """Forks while it is being built in the worker; both copies go on into the loop."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        os.fork()  # the copy is not waited for: it must leave by itself


def test_a_copy_forked_while_the_handler_is_built_reads_nothing(make_dist, tmp_path, worker_loop):
    calls = tmp_path / "calls"
    d = make_dist(start_method="spawn" if worker_loop == "spawn" else "forkserver")
    reg = d.add_listener(functools.partial(ForkingInit, str(calls)))  # a factory
    d.start()
    assert reg.wait_ready(30)
    (pid,) = reg.worker_pids()
    n = 200
    for i in range(n):
        d.distribute(fanout.Add(obj("same-key", i)))
    assert wait_for(lambda: reg.stats().delivered == n, 30), reg.stats()
    got = read_calls(calls)
    assert [c.v for c in got if c.pid == pid] == list(range(n))
    assert [c for c in got if c.pid != pid] == []  # the copy read no frame
    s = reg.stats()
    assert (s.delivered, s.received, s.restarts) == (n, n, 0), s
    assert d.stop(drain=True, timeout=30) is True


class CountForger(Recorder):
    """On ``{"forge": "slot"}`` adds a million to the HANDLED word of its slot."""

    def _steer(self, o: Any) -> None:
        if isinstance(o, dict) and o.get("forge") == "slot":
            frame = sys._getframe()
            while "slot" not in frame.f_locals:
                frame = frame.f_back  # type: ignore[assignment]
            frame.f_locals["slot"][HANDLED] += 1_000_000
        super()._steer(o)


def test_a_forged_progress_count_restarts_the_worker(make_dist, tmp_path, worker_loop):
    calls = tmp_path / "calls"
    errors: list[str] = []
    start_method = "spawn" if worker_loop == "spawn" else "forkserver"
    d = make_dist(start_method=start_method)
    reg = d.add_listener(CountForger(calls), on_error=lambda r, n, text: errors.append(text))
    d.start()
    assert reg.wait_ready(30)
    d.distribute(fanout.Add(obj("forger", forge="slot")))
    for i in range(10):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    for _ in range(200):
        s = reg.stats()
        assert s.delivered <= s.received, s
        time.sleep(0.005)
    assert wait_for(lambda: reg.stats().restarts == 1, 30), reg.stats()
    assert wait_for(lambda: reg.stats().pending == 0, 30), reg.stats()
    s = reg.stats()
    assert s.received == 11 and s.delivered <= 11, s
    assert any("progress slot" in e for e in errors), errors
    assert d.stop(drain=True, timeout=30) is True


class MessageForger(Recorder):
    """On ``{"forge": kind}`` writes a well-formed return-pipe message of that kind."""

    def _steer(self, o: Any) -> None:
        forge = o.get("forge") if isinstance(o, dict) else None
        if forge in ("undecodable", "ready", "worker") and not os.path.exists(o["marker"]):
            Path(o["marker"]).touch()  # once: a retry must not lie again
            from helpers import _return_pipe_fd

            from fanout.wire.protocol import send_message

            msg = {"t": o["forge"], "seq": 10**6, "pid": os.getpid(), "text": "forged"}
            send_message(_return_pipe_fd(), msg)
        super()._steer(o)


@pytest.mark.parametrize("kind", ["undecodable", "ready", "worker"])
def test_a_forged_message_restarts_the_worker(make_dist, tmp_path, kind):
    calls = tmp_path / "calls"
    dead: list[str] = []
    errors: list[str] = []
    d = make_dist()
    reg = d.add_listener(
        MessageForger(calls),
        on_error=lambda r, n, text: errors.append(text),
        on_dead_letter=lambda r, n, why: dead.append(why),
    )
    d.start()
    assert reg.wait_ready(30)
    d.distribute(fanout.Add(obj("forger", forge=kind, marker=str(tmp_path / "forged"))))
    assert wait_for(lambda: reg.stats().restarts == 1, 30), reg.stats()
    for i in range(5):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    assert wait_for(lambda: reg.stats().pending == 0, 30), reg.stats()
    s = reg.stats()
    assert s.dead_lettered == 0 and dead == [], (s, dead)
    assert s.delivered <= s.received == 6, s
    assert any("return pipe" in e for e in errors), errors
    assert d.stop(drain=True, timeout=30) is True


PRODUCER = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
import fanout
from helpers import obj
from test_containment import Starter

if __name__ == "__main__":
    d = fanout.Distributor(start_method=sys.argv[1])
    reg = d.add_listener(Starter(sys.argv[2] + ".calls"), name="starter")
    d.start()
    d.distribute(fanout.Add(obj("s", start=["popen", "daemon"], log=sys.argv[2])))
    calls = sys.argv[2] + ".calls"
    while not (os.path.exists(calls) and open(calls).read()):
        time.sleep(0.01)
    print("started", flush=True)
    if sys.argv[4] == "stop":
        d.stop(drain=True)
        sys.exit(0)
    time.sleep(3600)
"""


def _producer(tmp_path: Path, start_method: str, log: Path, end: str) -> subprocess.Popen[bytes]:
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    tests_dir = str(Path(__file__).parent)
    paths = [str(Path(fanout.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.Popen(
        [sys.executable, str(script), start_method, str(log), tests_dir, end],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def test_what_a_handler_started_ends_at_the_producers_sigkill(
    tmp_path, start_method, started, no_leaks
):
    producer = _producer(tmp_path, start_method, started, "sleep")
    try:
        assert producer.stdout is not None
        line = producer.stdout.readline()
        assert line == b"started\n", producer.stderr.read() if producer.stderr else ""
        assert len(_survivors(started)) == 2
        producer.kill()
        producer.wait()
        assert wait_for(lambda: not _survivors(started), GONE_WITHIN), _survivors(started)
    finally:
        if producer.poll() is None:
            producer.kill()
        producer.communicate()


def test_a_piped_producer_reaches_eof_when_it_exits(tmp_path, start_method, started, no_leaks):
    """``python app.py | tail`` ends: nothing a handler started keeps the pipe open."""
    producer = _producer(tmp_path, start_method, started, "stop")
    try:
        out, err = producer.communicate(timeout=60)
        assert producer.returncode == 0, err.decode()
        assert out == b"started\n"
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.communicate()
    assert wait_for(lambda: not _survivors(started), GONE_WITHIN), _survivors(started)


def test_the_warden_reports_its_worker_first(make_dist, tmp_path, start_method):
    """The pid the producer signals is the handler's own process, child of a warden."""
    calls = tmp_path / "calls"
    d = make_dist(start_method=start_method)
    reg = d.add_listener(Recorder(calls))
    d.start()
    d.distribute(fanout.Add(obj("a")))
    (call,) = wait_calls(calls, 1)
    assert reg.worker_pids() == [call.pid]
    warden = psutil.Process(call.pid).parent()
    assert warden is not None and warden.pid != os.getpid()
    assert psutil.Process(os.getpid()) in warden.parents()
    assert d.stop(drain=True, timeout=30) is True


LIMIT = 64 << 20
HOG = 160 << 20


class Hog(Recorder):
    """On ``{"hog": "self"}`` holds 160 MiB, on ``{"hog": "child"}`` starts a process
    that does; then sleeps far longer than any test waits."""

    def _steer(self, o: Any) -> None:
        if isinstance(o, dict) and o.get("hog") == "self":
            held = b"x" * o.get("size", HOG)
            time.sleep(1000)
            del held
        elif isinstance(o, dict) and o.get("hog") == "child":
            code = f"import time; held = b'x' * {HOG}; time.sleep(1000)"
            child = subprocess.Popen([sys.executable, "-c", code])
            _note(o["log"], child.pid)
            time.sleep(1000)
        super()._steer(o)


@pytest.mark.parametrize("where", ["self", "child"])
def test_a_worker_past_its_memory_limit_is_killed_and_its_item_dead_lettered(
    make_dist, tmp_path, start_method, started, where
):
    calls = tmp_path / "calls"
    dead: list[str] = []
    d = make_dist(start_method=start_method)
    reg = d.add_listener(
        Hog(calls),
        memory_limit=LIMIT,
        max_attempts=2,
        on_dead_letter=lambda r, n, why: dead.append(why),
    )
    d.start()
    assert reg.wait_ready(30)
    d.distribute(fanout.Add(obj("hog", hog=where, log=str(started))))
    d.distribute(fanout.Add(obj("after")))
    assert wait_for(lambda: dead, 60), reg.stats()
    assert f"memory_limit={LIMIT} bytes exceeded" in dead[0], dead
    assert "2 times" in dead[0], dead
    assert [c.name for c in wait_calls(calls, 1)] == ["after"]
    s = reg.stats()
    assert (s.dead_lettered, s.restarts) == (1, 2), s
    assert wait_for(lambda: not _survivors(started), GONE_WITHIN), _survivors(started)
    assert d.stop(drain=True, timeout=30) is True


def test_memory_limit_is_checked_at_add_listener(make_dist, tmp_path):
    d = make_dist()
    for bad in ("64M", 1.5e8, True):
        with pytest.raises(TypeError, match="memory_limit must be an int"):
            d.add_listener(Recorder(tmp_path / "c"), memory_limit=bad)
    with pytest.raises(ValueError, match="memory_limit must be at least 16777216 bytes"):
        d.add_listener(Recorder(tmp_path / "c"), memory_limit=1 << 20)
    with pytest.raises(ValueError, match="memory_limit needs executor='process'"):
        d.add_listener(Recorder(tmp_path / "c"), executor="thread", memory_limit=LIMIT)
    assert d.listeners == ()
