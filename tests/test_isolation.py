"""A hostile handler reaches nothing but its own worker.

One listener's handler attacks what it can reach from inside its worker: it scribbles
on every descriptor it holds, kills or freezes its parent (the forkserver), or writes
garbage into its return pipe and progress slot. Another, healthy listener must not
notice: no restart, the same worker, every notification delivered, and fanout still
starts new workers.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

from helpers import Recorder, _return_pipe_fd, obj, read_calls, wait_calls, wait_for

import fanout
from fanout.wire.protocol import HANDLED, SLOT_BYTES, send_message

EXIT_AFTER_ATTACK = 9
SCRIBBLE_BYTES = 64 * 1024


def _first_time(marker: str) -> bool:
    """Create ``marker``; tell whether this call created it (so an attack runs once)."""
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


def _held_fds() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:  # the descriptor that listed the directory, closed since
            continue
        fds.append(int(name))
    return sorted(fds)


def _find_local(name: str) -> Any:
    """The local ``name`` of a frame up the stack (the worker's own variables)."""
    frame = sys._getframe()
    while frame is not None and name not in frame.f_locals:
        frame = frame.f_back
    assert frame is not None, f"no {name!r} up the stack"
    return frame.f_locals[name]


class Hostile(Recorder):
    """A ``Recorder`` that, on ``{"attack": what, "marker": path}``, attacks once.

    Then its worker exits, so the listener needs a new worker (a new start).
    """

    def _steer(self, o: Any) -> None:
        if isinstance(o, dict) and "attack" in o and _first_time(o["marker"]):
            pid = os.getpid()
            getattr(self, "_" + o["attack"])()
            if os.getpid() != pid:  # a forked copy carries on
                return
            os._exit(EXIT_AFTER_ATTACK)
        super()._steer(o)

    def _scribble(self) -> None:
        # Every fd above 2, the return pipe last: the supervisor kills this worker
        # once it reads the garbage there.
        ret = _return_pipe_fd()
        fds = [fd for fd in _held_fds() if fd > 2 and fd != ret] + [ret]
        for fd in fds:
            try:
                os.write(fd, os.urandom(SCRIBBLE_BYTES))
            except OSError:
                pass  # a read end, or a closed pipe

    def _kill_parent(self) -> None:
        os.kill(os.getppid(), signal.SIGKILL)

    def _stop_parent(self) -> None:
        os.kill(os.getppid(), signal.SIGSTOP)

    def _forge_counts(self) -> None:
        # Well-formed lies: a million calls more, and a frame it was never sent.
        _find_local("slot")[HANDLED] += 1_000_000
        msg = {"t": "undecodable", "seq": 10**9, "text": "forged", "payload": b""}
        send_message(_return_pipe_fd(), msg)

    def _fork_and_return(self) -> None:
        # A second copy of the worker, back in its loop while the first exits.
        if os.fork() == 0:
            return

    def _scribble_slot_and_pipe(self) -> None:
        slot = _find_local("slot")
        noise = os.urandom(len(slot) * 8)
        for i in range(len(slot)):
            slot[i] = int.from_bytes(noise[i * 8 : i * 8 + 8], "little")
        os.write(_return_pipe_fd(), os.urandom(SCRIBBLE_BYTES))


class FdReporter(fanout.Handler):
    """Writes what its worker holds to ``<dir>/<pid>``: fds, memfd mappings, lane."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        lines = []
        for fd in _held_fds():
            st = os.fstat(fd)
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            target = os.readlink(f"/proc/self/fd/{fd}")
            lines.append(f"fd\t{fd}\t{target}\t{mode}\t{st.st_ino}\t{stat.S_ISFIFO(st.st_mode)}")
        with open("/proc/self/maps") as f:
            for line in f:
                if "memfd:fanout" in line:
                    span, perms, offset = line.split()[:3]
                    start, end = (int(x, 16) for x in span.split("-"))
                    kind = "arena" if "memfd:fanout:arena" in line else "map"
                    lines.append(f"{kind}\t{int(offset, 16)}\t{end - start}\t{perms}")
        lane = _find_local("spec").lane
        lines.append(f"lane\t{lane}")
        # Complete or absent, never half-written, when the test reads it.
        tmp = Path(self.directory, f"{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, Path(self.directory, str(os.getpid())))


class ErrorLog:
    """An ``on_error`` callback that keeps what it was given."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __call__(self, reg: Any, n: Any, text: str) -> None:
        self.items.append((reg.name, text))


def _attack(make_dist: Any, tmp_path: Path, start_method: str, attack: str, caplog: Any) -> None:
    """Run ``attack`` in one listener's handler while another listener flows."""
    caplog.set_level(logging.ERROR, logger="fanout")
    errors = ErrorLog()
    d = make_dist(start_method=start_method)
    path = tmp_path / "healthy"
    healthy = d.add_listener(Recorder(path), name="healthy", on_error=errors)
    hostile = d.add_listener(Hostile(tmp_path / "hostile"), name="hostile")
    d.start()
    assert wait_for(lambda: healthy.ready() and hostile.ready(), 30)
    (pid,) = healthy.worker_pids()
    (hostile_pid,) = hostile.worker_pids()
    total = 0
    for i in range(20):
        d.distribute(fanout.Add(obj(f"before-{i}", i)))
        total += 1
    marker = tmp_path / "attacked"
    d.distribute(fanout.Add(obj("attack", 0, attack=attack, marker=str(marker))))
    total += 1
    assert wait_for(marker.exists, 30)
    # The hostile listener gets a new worker, and a new listener starts: the next
    # worker starts happen, in bounded time, whatever the attack did to fanout's helpers.
    assert wait_for(
        lambda: hostile.ready() and hostile.worker_pids() not in ([], [hostile_pid]), 30
    ), hostile.stats()
    late = d.add_listener(Recorder(tmp_path / "late"), name="late")
    assert late.wait_ready(30)
    for i in range(20):
        d.distribute(fanout.Add(obj(f"after-{i}", i)))
        total += 1
    assert len(wait_calls(path, total)) == total
    assert wait_for(lambda: healthy.stats().delivered == total, 30), healthy.stats()
    s = healthy.stats()
    assert s.restarts == 0, s
    assert healthy.worker_pids() == [pid]
    assert {c.pid for c in read_calls(path)} == {pid}
    assert [c.name for c in read_calls(path)].count("attack") == 1
    assert errors.items == []
    assert d.stop(drain=True, timeout=30) is True
    assert "unexpected error" not in caplog.text


def test_scribbling_on_every_fd_reaches_no_other_listener(
    make_dist, tmp_path, start_method, caplog
):
    _attack(make_dist, tmp_path, start_method, "scribble", caplog)


def test_garbage_in_slot_and_return_pipe_reaches_no_other_listener(
    make_dist, tmp_path, start_method, caplog
):
    _attack(make_dist, tmp_path, start_method, "scribble_slot_and_pipe", caplog)


def test_forged_counts_reach_no_other_listener(make_dist, tmp_path, start_method, caplog):
    _attack(make_dist, tmp_path, start_method, "forge_counts", caplog)


def test_a_forked_copy_of_a_worker_reaches_no_other_listener(
    make_dist, tmp_path, start_method, caplog
):
    _attack(make_dist, tmp_path, start_method, "fork_and_return", caplog)


def test_a_handler_killing_its_parent_restarts_nobody_else(
    make_dist, tmp_path, start_method, caplog
):
    _attack(make_dist, tmp_path, start_method, "kill_parent", caplog)


def test_a_handler_freezing_its_parent_does_not_stall_worker_starts(
    make_dist, tmp_path, start_method, caplog
):
    _attack(make_dist, tmp_path, start_method, "stop_parent", caplog)


def test_a_worker_holds_its_own_descriptors_and_slot_only(make_dist, tmp_path, start_method):
    d = make_dist(start_method=start_method)
    regs = [
        d.add_listener(FdReporter(str(tmp_path)), name="a", workers=2),
        d.add_listener(FdReporter(str(tmp_path)), name="b"),
    ]
    d.start()
    assert wait_for(lambda: all(r.ready() for r in regs), 30)
    pids = {pid for r in regs for pid in r.worker_pids()}
    for i in range(40):  # no key: round-robin, both lanes of "a" get some
        d.distribute(fanout.Add(i))
    assert wait_for(lambda: {p.name for p in tmp_path.iterdir()} >= {str(p) for p in pids}, 30)

    pipes_seen: dict[int, int] = {}
    page = -(-SLOT_BYTES // os.sysconf("SC_PAGE_SIZE")) * os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        rows = [line.split("\t") for line in (tmp_path / str(pid)).read_text().splitlines()]
        fds = [r for r in rows if r[0] == "fd" and int(r[1]) > 2]
        writable = [r for r in fds if int(r[3]) != os.O_RDONLY]
        pipes = [r for r in fds if r[5] == "True"]
        # Read: the data pipe and the lifeline. Written: the return pipe. Nothing else
        # but /dev/null, which multiprocessing opens as a child's stdin.
        assert len(writable) == 1 and writable[0][5] == "True", fds
        assert len(pipes) == 3, fds
        assert all(r[5] == "True" or r[2] == "/dev/null" for r in fds), fds
        for r in pipes:
            ino = int(r[4])
            assert ino not in pipes_seen, f"pipe {ino} of {pid} is held by {pipes_seen[ino]}"
            pipes_seen[ino] = pid
        # One mapping of the slots' memory: this lane's own page(s).
        (lane,) = (int(r[1]) for r in rows if r[0] == "lane")
        maps = [(int(r[1]), int(r[2])) for r in rows if r[0] == "map"]
        assert maps == [(lane * page, page)], (lane, maps)
        # And the whole shared-memory arena, read-only. The kernel maps whole pages:
        # an arena of RAM/8 bytes is rounded up unless the page count divides by 8.
        arena = [(int(r[1]), int(r[2]), r[3]) for r in rows if r[0] == "arena"]
        arena_pages = -(-d.shared_stats().max_bytes // os.sysconf("SC_PAGE_SIZE"))
        assert arena == [(0, arena_pages * os.sysconf("SC_PAGE_SIZE"), "r--s")], arena
    assert d.stop(drain=True, timeout=30) is True


def test_a_worker_cannot_reach_a_sibling_lanes_slot(make_dist, tmp_path):
    """Garbage written just past a worker's own slot lands in its own page, not a sibling's."""
    path = tmp_path / "calls"
    d = make_dist()
    reg = d.add_listener(SlotOverrunner(path, str(tmp_path / "overran")), workers=2)
    d.start()
    assert reg.wait_ready(30)
    pids = reg.worker_pids()
    for i in range(20):  # no key: round-robin over both lanes
        d.distribute(fanout.Add(i))
    assert len(wait_calls(path, 20)) == 20
    assert (tmp_path / "overran").exists()
    # Each lane's counters are its own: what it handled, no garbage.
    assert wait_for(lambda: reg.stats().delivered == 20, 30), reg.stats()
    assert reg.worker_pids() == pids
    assert reg.stats().restarts == 0
    assert d.stop(drain=True, timeout=30) is True


class SlotOverrunner(Recorder):
    """Lane 0, once per ``marker``, fills a slot's worth of memory past its own slot."""

    def __init__(self, path: str | os.PathLike[str], marker: str) -> None:
        super().__init__(path)
        self.marker = marker

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        if _find_local("spec").lane == 0 and _first_time(self.marker):
            slot = _find_local("slot")
            base = ctypes.addressof(ctypes.c_char.from_buffer(slot.cast("B")))
            # Where lane 1's slot would be if slots were packed.
            for offset in range(SLOT_BYTES, 2 * SLOT_BYTES, 8):
                ctypes.c_uint64.from_address(base + offset).value = 0xFFFF_FFFF_FFFF
        super().on_add(obj, is_in_initial_list)


class SharedMemoryUser(Recorder):
    """Creates, uses and unlinks a ``multiprocessing`` shared-memory block per call."""

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        from multiprocessing import shared_memory

        # Registered with a resource tracker: the worker's own, started on demand.
        block = shared_memory.SharedMemory(create=True, size=64)
        try:
            block.buf[:5] = b"hello"
            assert bytes(block.buf[:5]) == b"hello"
        finally:
            block.close()
            block.unlink()
        super().on_add(obj, is_in_initial_list)


def test_a_handler_can_still_use_multiprocessing(make_dist, tmp_path, start_method):
    path = tmp_path / "calls"
    errors = ErrorLog()
    d = make_dist(start_method=start_method)
    reg = d.add_listener(SharedMemoryUser(path), on_error=errors)
    d.start()
    for i in range(5):
        d.distribute(fanout.Add(obj(f"o{i}", i)))
    assert len(wait_calls(path, 5)) == 5
    assert d.stop(drain=True, timeout=30) is True
    assert errors.items == []
    assert reg.stats().errors == 0
