"""Big buffers travel once, through the distributor's shared-memory arena.

Arrays and bytes-like objects at or above ``shared_min_bytes`` are copied into one
sealed memfd; frames carry references; workers read read-only views; a block is freed
once no ring holds a frame referring to it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import pickle
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_accounted, wait_for

import fanout
from fanout.buffers.arena import Arena
from fanout.native.pick import Encoder
from fanout.wire.dtypes import dtype_to_wire

KIB = 1024
PAGE = mmap.PAGESIZE

try:
    import msgspec

    class Blob(msgspec.Struct):
        """A schema with a bytes field (module-level: workers import it)."""

        i: int
        data: bytes

except ImportError:  # schema= needs msgspec
    Blob = None  # type: ignore[assignment,misc]


def digest(x: Any) -> str:
    """What identifies an array or buffer: type, dtype (all of it), shape, order and bytes."""
    if isinstance(x, np.ndarray):
        order = "F" if x.ndim > 1 and x.flags.f_contiguous and not x.flags.c_contiguous else "C"
        raw = np.ascontiguousarray(x).tobytes()
        dtype = dtype_to_wire(x.dtype)  # a structured one's fields, not only "|V12"
        return f"ndarray {dtype!r} {x.shape} {order} {hashlib.sha256(raw).hexdigest()}"
    return f"{type(x).__name__} {hashlib.sha256(bytes(x)).hexdigest()}"


def write_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class Digester(fanout.Handler):
    """Records ``index <tab> digest <tab> writeable`` of ``obj["data"]`` per add."""

    def __init__(self, path: str, gate: str | None = None, delay: float = 0.0) -> None:
        self.path = path
        self.gate = gate
        self.delay = delay

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        if self.gate is not None:
            while not os.path.exists(self.gate):
                time.sleep(0.002)
        time.sleep(self.delay)
        data = obj["data"]
        writeable = data.flags.writeable if isinstance(data, np.ndarray) else None
        write_line(self.path, f"{obj['i']}\t{digest(data)}\t{writeable}")


class KilledOnce(fanout.Handler):
    """Records the array's digest, then SIGKILLs its worker the first time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        write_line(self.path, f"{os.getpid()}\t{digest(obj['data'])}")
        marker = self.path + ".killed"
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


class RaisesOrDies(fanout.Handler):
    """Raises on ``{"raise": True}``, SIGKILLs its worker on ``{"die": True}``."""

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        if obj.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        if obj.get("raise"):
            raise ValueError("asked to raise")


class Hostile(fanout.Handler):
    """Tries every way to write into the arena; records how each one failed."""

    def __init__(self, path: str, producer: int, arena_fd: int) -> None:
        self.path = path
        self.producer = producer
        self.arena_fd = arena_fd

    def _try(self, what: str, attack: Any) -> None:
        try:
            attack()
        except Exception as exc:
            write_line(self.path, f"{what}\trefused\t{type(exc).__name__}")
        else:
            write_line(self.path, f"{what}\tSUCCEEDED")

    def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
        data = obj["data"]

        def set_item() -> None:
            data[0] = 99

        def set_writeable() -> None:
            data.flags.writeable = True

        def mprotect() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            addr = data.__array_interface__["data"][0] // PAGE * PAGE
            if libc.mprotect(ctypes.c_void_p(addr), PAGE, mmap.PROT_READ | mmap.PROT_WRITE):
                raise OSError(ctypes.get_errno(), "mprotect")

        def reopen_and_map() -> None:
            fd = os.open(f"/proc/{self.producer}/fd/{self.arena_fd}", os.O_RDWR)
            try:
                mmap.mmap(fd, PAGE)  # shared and writable
            finally:
                os.close(fd)

        def reopen_and_write() -> None:
            fd = os.open(f"/proc/{self.producer}/fd/{self.arena_fd}", os.O_RDWR)
            try:
                os.pwrite(fd, b"\x63" * 64, 0)
            finally:
                os.close(fd)

        for what, attack in (
            ("setitem", set_item),
            ("writeable", set_writeable),
            ("mprotect", mprotect),
            ("reopen-mmap", reopen_and_map),
            ("reopen-write", reopen_and_write),
        ):
            self._try(what, attack)


def every_dtype() -> list[np.dtype]:
    """Every dtype the numpy extension type carries (no objects, no structured)."""
    out = []
    for code in np.typecodes["All"]:
        if code == "O":
            continue
        if code in "Mm":
            out += [np.dtype(f"{code}8[ns]"), np.dtype(f"{code}8[D]")]
        elif code in "SUV":
            out.append(np.dtype(f"{code}7"))
        else:
            out.append(np.dtype(code))
    out += [np.dtype(">i4"), np.dtype(">f8")]
    return out


def sample(dtype: np.dtype, n: int, seed: int) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
    arr = raw.view(dtype) if dtype.kind != "b" else (raw % 2).astype(bool)
    if dtype.kind == "f" or dtype.kind == "c":
        arr = np.nan_to_num(arr)  # NaN != NaN: equality would fail for the wrong reason
    return arr


# -- the arena alone ------------------------------------------------------------------


@pytest.fixture(params=["msgspec", "msgpack"])
def codec(request: pytest.FixtureRequest) -> str:
    """Both built-in codecs: the arena encodes and decodes alike under either."""
    return str(request.param)


def test_blocks_are_allocated_lowest_first_and_coalesce_when_freed(no_leaks):
    arena = Arena(1024 * KIB, 1, fanout.MsgpackCodec())
    try:
        a, b, c = (arena._alloc(100 * KIB) for _ in range(3))
        assert a and b and c
        assert [a.offset, b.offset, c.offset] == [0, 100 * KIB, 200 * KIB]
        assert not arena.fits(800 * KIB)
        arena.unhold([b.offset])
        arena.unhold([a.offset])  # merges with b's space
        d = arena._alloc(200 * KIB)
        assert d is not None and d.offset == 0
        arena.unhold([c.offset, d.offset])
        assert arena.stats().held_bytes == 0
        assert arena._free == [(0, 1024 * KIB)]
        assert arena.fits(1024 * KIB)
    finally:
        arena.close()


def test_the_arena_is_sealed_against_writers(no_leaks):
    arena = Arena(PAGE * 4, 1, fanout.MsgpackCodec())
    try:
        fd = os.open(f"/proc/self/fd/{arena.fd}", os.O_RDWR)  # as a worker could
        try:
            with pytest.raises(PermissionError):
                mmap.mmap(fd, PAGE)  # shared, writable
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, PAGE * 8)
            ro = mmap.mmap(fd, PAGE, prot=mmap.PROT_READ)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                # mprotect the read-only mapping to writable: the seal forbids it.
                view = np.frombuffer(ro, dtype=np.uint8)
                page = view.__array_interface__["data"][0]
                rc = libc.mprotect(ctypes.c_void_p(page), PAGE, mmap.PROT_READ | mmap.PROT_WRITE)
                assert rc == -1 and ctypes.get_errno() == errno.EACCES
                del view
            finally:
                ro.close()
            seals = fcntl.fcntl(arena.fd, fcntl.F_GET_SEALS)
            assert seals & 0x10  # F_SEAL_FUTURE_WRITE
        finally:
            os.close(fd)
        arena.buf[:4] = b"mine"  # type: ignore[index]  # the producer's own mapping writes
    finally:
        arena.close()


def test_frame_ring_seqs_show_gaps_left_by_drops(ring_impl):
    ring = ring_impl.FrameRing(4096)
    assert ring.seqs() == []
    for _ in range(5):
        ring.append(b"frame")
    assert ring.seqs() == [1, 2, 3, 4, 5]
    ring.drop_unsent(1)
    assert ring.seqs() == [2, 3, 4, 5]
    ring.take_all()
    assert ring.seqs() == []


# -- through process listeners --------------------------------------------------------


def test_every_dtype_0d_strided_and_fortran_arrive_equal_and_read_only(
    make_dist, codec, tmp_path, start_method
):
    out = tmp_path / "out"
    d = make_dist(codec=codec, start_method=start_method, shared_min_bytes=1)
    d.add_listener(Digester(str(out)))
    arrays = [sample(dt, 257, seed) for seed, dt in enumerate(every_dtype())]
    arrays += [
        np.array(3.5),  # 0-d
        np.arange(1000, dtype=np.int64)[::3],  # strided: copied to contiguous once
        np.asfortranarray(np.arange(600, dtype=np.float32).reshape(20, 30)),
        np.arange(24, dtype=np.int16).reshape(2, 3, 4).transpose(2, 0, 1),
        np.zeros((0, 4)),  # empty
    ]
    d.start()
    for i, arr in enumerate(arrays):
        d.distribute(fanout.Add({"i": i, "data": arr}))
    assert wait_for(lambda: len(lines(out)) == len(arrays))
    got = {int(i): (dg, w) for i, dg, w in (line.split("\t") for line in lines(out))}
    for i, arr in enumerate(arrays):
        assert got[i] == (digest(arr), "False"), (i, arr.dtype)
    # Every non-empty one went through the arena (an empty array has nothing to share).
    assert d.shared_stats().shared == len(arrays) - 1
    assert d.stop(drain=True, timeout=30)
    assert d.shared_stats().held_bytes == 0


def test_bytes_like_payloads_arrive_as_bytes_and_thread_listeners_get_the_original(
    make_dist, codec, tmp_path
):
    out = tmp_path / "out"
    seen: list[Any] = []

    class Keep(fanout.Handler):
        def on_add(self, obj: Any, is_in_initial_list: bool) -> None:
            seen.append(obj["data"])

    d = make_dist(codec=codec, shared_min_bytes=64 * KIB)
    d.add_listener(Digester(str(out)))
    d.add_listener(Keep(), executor="thread")
    blob = os.urandom(100 * KIB)
    payloads = [blob, bytearray(blob), memoryview(blob), b"small"]
    d.start()
    for i, p in enumerate(payloads):
        d.distribute(fanout.Add({"i": i, "data": p}))
    assert wait_for(lambda: len(lines(out)) == 4 and len(seen) == 4)
    want = {i: digest(bytes(p)) for i, p in enumerate(payloads)}
    got = {int(i): dg for i, dg, _ in (line.split("\t") for line in lines(out))}
    assert got == want
    assert all(a is b for a, b in zip(seen, payloads, strict=True))
    assert d.shared_stats().shared == 3  # the small one travelled inline


def test_blocks_are_freed_after_drain_and_the_arena_is_empty_at_stop(make_dist, tmp_path):
    out = tmp_path / "out"
    d = make_dist()
    regs = [d.add_listener(Digester(str(out)), name=f"l{k}", workers=2) for k in range(2)]
    d.start()
    arr = np.arange(64 * KIB, dtype=np.float64)  # 512 KiB
    for i in range(20):
        d.distribute(fanout.Update({"i": i, "data": arr}, {"i": i, "data": arr}))
    # One block per notification (old is new: it travels once), shared by both listeners.
    assert d.shared_stats().shared == 20
    assert wait_for(lambda: all(r.stats().pending == 0 for r in regs))
    assert wait_for(lambda: d.shared_stats().held_bytes == 0)
    assert d.shared_stats().blocks == 0
    assert d.stop(drain=True, timeout=30)
    for r in regs:
        assert assert_accounted(r).delivered == 20


def test_initial_lists_travel_inline_and_hold_no_block(make_dist, tmp_path):
    out = tmp_path / "out"
    d = make_dist()
    arr = np.arange(16 * KIB, dtype=np.float64)
    d.add_listener(Digester(str(out)), initial_list=[{"i": 0, "data": arr}])
    d.start()
    assert wait_for(lambda: len(lines(out)) == 1)
    assert lines(out)[0].split("\t")[1] == digest(arr)
    assert d.shared_stats().blocks == 0 and d.shared_stats().shared == 0
    assert d.stop(drain=True, timeout=30)


def test_a_buffer_larger_than_the_arena_travels_inline(make_dist, tmp_path):
    out = tmp_path / "out"
    d = make_dist(max_shared_bytes=256 * KIB)
    reg = d.add_listener(Digester(str(out)))
    d.start()
    arr = np.arange(50000, dtype=np.float64)  # 400,000 bytes
    d.distribute(fanout.Add({"i": 0, "data": arr}))
    assert d.shared_stats().shared == 0 and d.shared_stats().spilled == 1
    assert d.stop(drain=True, timeout=30)
    assert lines(out)[0].split("\t")[1] == digest(arr)
    assert assert_accounted(reg).delivered == 1


def test_options_are_checked_and_zero_disables_the_arena(make_dist, tmp_path):
    with pytest.raises(TypeError, match="max_shared_bytes must be an int"):
        fanout.Distributor(max_shared_bytes="1G")
    with pytest.raises(ValueError, match="shared_min_bytes must be >= 0"):
        fanout.Distributor(shared_min_bytes=-1)
    out = tmp_path / "out"
    d = make_dist(max_shared_bytes=0)
    d.add_listener(Digester(str(out)))
    d.start()
    arr = np.arange(100 * KIB, dtype=np.uint8)
    d.distribute(fanout.Add({"i": 0, "data": arr}))
    assert wait_for(lambda: len(lines(out)) == 1)
    assert lines(out)[0].split("\t")[1] == digest(arr)
    assert d.shared_stats().max_bytes == 0


class OwnCodec(fanout.Codec):
    """A codec of the user's: pickle, no MessagePack (the arena is not for it)."""

    def pack(self, obj: Any) -> bytes:
        return pickle.dumps(obj)

    def unpack(self, data: Any) -> Any:
        return pickle.loads(data)


def test_the_default_codec_is_msgspec_and_either_built_in_codec_gets_the_arena(make_dist):
    d = make_dist()
    assert type(d.codec) is fanout.MsgspecCodec and d.arena is not None
    assert d.arena.codec._shares is d.arena and d.codec._arena is d.arena
    for codec in ("msgpack", fanout.MsgpackCodec(), fanout.MsgspecCodec()):
        assert make_dist(codec=codec).arena is not None
    assert make_dist(codec=OwnCodec()).arena is None
    # The caller's codec instance is never tied to an arena: it gets a copy.
    mine = fanout.MsgspecCodec()
    assert make_dist(codec=mine).codec is not mine and mine._arena is None


def test_a_worker_killed_mid_handler_gets_the_same_block_again(make_dist, tmp_path, start_method):
    out = tmp_path / "out"
    d = make_dist(start_method=start_method)
    reg = d.add_listener(KilledOnce(str(out)))
    d.start()
    arr = np.random.default_rng(1).random(32 * KIB)
    d.distribute(fanout.Add({"data": arr}))
    assert wait_for(lambda: len(lines(out)) == 2)
    (pid1, dg1), (pid2, dg2) = (line.split("\t") for line in lines(out))
    assert pid1 != pid2 and dg1 == dg2 == digest(arr)
    assert d.stop(drain=True, timeout=30)
    s = assert_accounted(reg)
    assert (s.delivered, s.restarts) == (1, 1)
    assert d.shared_stats().held_bytes == 0


# -- shares of the arena: a listener at its share never paces another --------------------


def arr_no(i: int) -> np.ndarray:
    return np.full(100 * KIB, i % 256, dtype=np.uint8)


def _beside_a_stalled_one(make_dist: Any, tmp_path: Path, blocks: int = 4, **slow: Any) -> Any:
    """A fast listener and a gated (stalled) one sharing an arena of ``blocks`` 100 KiB blocks."""
    fast_out, slow_out, gate = tmp_path / "fast", tmp_path / "slow", tmp_path / "gate"
    d = make_dist(max_shared_bytes=blocks * 100 * KIB)
    fast = d.add_listener(Digester(str(fast_out)), name="fast")
    stalled = d.add_listener(Digester(str(slow_out), str(gate)), name="stalled", **slow)
    d.start()
    return d, fast, stalled, fast_out, slow_out, gate


def distribute_in_thread(d: Any, notes: list[Any]) -> threading.Thread:
    """Distribute ``notes`` from a thread of their own (a wait would show as a hang)."""

    def run() -> None:
        for n in notes:
            d.distribute(n)

    t = threading.Thread(target=run, name="producer")
    t.start()
    return t


def test_an_unbounded_listener_at_its_share_takes_the_rest_inline_and_paces_nobody(
    make_dist, tmp_path
):
    d, fast, stalled, fast_out, slow_out, gate = _beside_a_stalled_one(make_dist, tmp_path)
    share = d.shared_stats().share_bytes
    assert share == 2 * 100 * KIB  # an equal share each
    count = 20
    t = distribute_in_thread(d, [fanout.Add({"i": i, "data": arr_no(i)}) for i in range(count)])
    # Neither the producer nor the fast listener waits for the stalled one.
    assert wait_for(lambda: len(lines(fast_out)) == count, 60)
    t.join(60)
    assert not t.is_alive()
    held = d.arena.ring_bytes(stalled.lanes[0].ring)
    assert 0 < held <= share  # never more than its share of the arena
    assert d.shared_stats().spilled >= count - 2  # the rest went into its own ring
    # What it holds counts in its pending bytes: the arrays, not the references.
    assert stalled.stats().pending_bytes >= count * 100 * KIB
    gate.touch()
    assert d.stop(drain=True, timeout=60)
    want = {i: digest(arr_no(i)) for i in range(count)}
    for out in (fast_out, slow_out):
        got = {int(i): dg for i, dg, _ in (line.split("\t") for line in lines(out))}
        assert got == want
    assert assert_accounted(stalled).delivered == count
    assert assert_accounted(fast).delivered == count
    assert d.shared_stats().held_bytes == 0


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_a_bounded_listener_drops_for_itself_alone_counting_real_bytes(
    make_dist, tmp_path, overflow
):
    bound = 250 * KIB  # two arrays and their frames, not three
    d, fast, stalled, fast_out, _, gate = _beside_a_stalled_one(
        make_dist, tmp_path, max_pending_bytes=bound, overflow=overflow
    )
    count = 20
    t = distribute_in_thread(d, [fanout.Add({"i": i, "data": arr_no(i)}) for i in range(count)])
    assert wait_for(lambda: len(lines(fast_out)) == count, 60)
    t.join(60)
    assert not t.is_alive()
    s = stalled.stats()
    assert 100 * KIB < s.pending_bytes <= bound  # real bytes, within the bound
    assert s.dropped >= count - 3
    gate.touch()
    assert d.stop(drain=True, timeout=60)
    assert assert_accounted(fast).delivered == count
    s = assert_accounted(stalled)
    assert s.received == count and s.delivered + s.dropped == count
    assert d.shared_stats().held_bytes == 0


def test_a_bounded_error_listener_refuses_when_its_real_bytes_are_full(make_dist, tmp_path):
    d, fast, stalled, _, _, gate = _beside_a_stalled_one(
        make_dist, tmp_path, max_pending_bytes=250 * KIB, overflow="error"
    )
    for i in range(2):
        d.distribute(fanout.Add({"i": i, "data": arr_no(i)}))
    with pytest.raises(fanout.ListenerFull, match=r"stalled.*is full"):
        d.distribute(fanout.Add({"i": 2, "data": arr_no(2)}))
    assert fast.stats().received == 2  # no listener got any part of it
    gate.touch()
    assert wait_for(lambda: stalled.stats().pending_bytes == 0)
    d.distribute(fanout.Add({"i": 3, "data": arr_no(3)}))  # room again
    assert d.stop(drain=True, timeout=30)
    assert assert_accounted(stalled).received == 3


def test_a_bounded_block_listener_waits_for_its_own_handler(make_dist, tmp_path):
    d, _, _, _, slow_out, gate = _beside_a_stalled_one(
        make_dist, tmp_path, max_pending_bytes=250 * KIB, overflow="block"
    )
    for i in range(2):
        d.distribute(fanout.Add({"i": i, "data": arr_no(i)}))
    t = distribute_in_thread(d, [fanout.Add({"i": 2, "data": arr_no(2)})])
    t.join(0.5)
    assert t.is_alive()  # it waits: nothing was handled, nothing was freed
    gate.touch()
    t.join(60)
    assert not t.is_alive()
    assert d.stop(drain=True, timeout=30)
    assert [line.split("\t")[0] for line in lines(slow_out)] == ["0", "1", "2"]


def test_a_full_bounded_block_listener_before_start_raises_instead_of_blocking(
    make_dist, tmp_path
):
    out = tmp_path / "out"
    d = make_dist()
    reg = d.add_listener(Digester(str(out)), max_pending_bytes=250 * KIB)
    for i in range(2):
        d.distribute(fanout.Add({"i": i, "data": arr_no(i)}))
    with pytest.raises(fanout.ListenerFull, match="nothing drains until start"):
        d.distribute(fanout.Add({"i": 2, "data": arr_no(2)}))
    d.start()
    assert d.stop(drain=True, timeout=30)
    assert assert_accounted(reg).delivered == 2


def test_a_notification_larger_than_a_bound_is_refused_or_dropped_by_policy(make_dist, tmp_path):
    d = make_dist()
    strict = d.add_listener(Digester(str(tmp_path / "a")), max_pending_bytes=64 * KIB)
    d.start()
    with pytest.raises(fanout.ListenerFull, match="can never fit max_pending_bytes=65536"):
        d.distribute(fanout.Add({"i": 0, "data": arr_no(0)}))
    d.remove_listener(strict)
    lossy = d.add_listener(
        Digester(str(tmp_path / "b")), max_pending_bytes=64 * KIB, overflow="drop_newest"
    )
    d.distribute(fanout.Add({"i": 1, "data": arr_no(1)}))
    assert d.stop(drain=True, timeout=30)
    s = assert_accounted(lossy)
    assert (s.received, s.dropped) == (1, 1)


# -- hostile handlers and crashes ------------------------------------------------------


def test_a_hostile_handler_cannot_write_and_others_see_the_original(
    make_dist, tmp_path, start_method
):
    attacks, out = tmp_path / "attacks", tmp_path / "out"
    d = make_dist(start_method=start_method)
    assert d.arena is not None
    d.add_listener(Hostile(str(attacks), os.getpid(), d.arena.fd), name="hostile")
    d.add_listener(Digester(str(out), str(tmp_path / "gate")), name="victim")
    d.start()
    arr = np.arange(16 * KIB, dtype=np.float64)
    d.distribute(fanout.Add({"i": 0, "data": arr}))
    assert wait_for(lambda: len(lines(attacks)) == 5)
    (tmp_path / "gate").touch()  # the victim reads after every attack ran
    assert wait_for(lambda: len(lines(out)) == 1)
    results = dict(line.split("\t", 1) for line in lines(attacks))
    assert results == {
        "setitem": "refused\tValueError",
        "writeable": "refused\tValueError",
        "mprotect": "refused\tPermissionError",
        "reopen-mmap": "refused\tPermissionError",
        "reopen-write": "refused\tPermissionError",
    }
    assert lines(out)[0].split("\t")[1] == digest(arr)
    assert d.stop(drain=True, timeout=30)


def test_a_sigkill_storm_loses_nothing_and_leaks_no_arena_space(make_dist, tmp_path):
    out = tmp_path / "out"
    d = make_dist(max_shared_bytes=4 * 1024 * KIB)
    reg = d.add_listener(Digester(str(out), delay=0.005), workers=2, max_attempts=1000)
    d.start()
    killed: set[int] = set()
    storm_over = threading.Event()

    def storm() -> None:
        rng = random.Random(14)
        while not storm_over.wait(0.1):
            pids = reg.worker_pids()
            if pids and reg.ready():  # killed while starting, a worker backs off
                pid = rng.choice(pids)
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)

    killer = threading.Thread(target=storm, name="sigkill-storm")
    killer.start()
    count = 0
    deadline = time.monotonic() + 90
    try:
        # At least 150 arrays, and on until the storm killed 5 workers (a loaded
        # machine starts workers slowly), 256 KiB each: the 4 MiB arena fills and waits.
        while count < 150 or (len(killed) < 5 and time.monotonic() < deadline):
            d.distribute(
                fanout.Add({"i": count, "data": np.full(32 * KIB, count, dtype=np.float64)})
            )
            count += 1
            if count % 10 == 0:
                time.sleep(0.05)  # spread the run so the storm overlaps all of it
    finally:
        storm_over.set()
        killer.join()
    assert len(killed) >= 5, f"the storm barely happened: {len(killed)} kills"
    assert wait_for(lambda: reg.stats().restarts >= len(killed), 60), reg.stats()
    assert d.stop(drain=True, timeout=60)
    s = assert_accounted(reg)
    assert s.delivered == count and s.dead_lettered == 0
    got = {int(line.split("\t")[0]): line.split("\t")[1] for line in lines(out)}
    want = {i: digest(np.full(32 * KIB, i, dtype=np.float64)) for i in range(count)}
    assert got == want
    assert d.shared_stats().held_bytes == 0


def test_dead_letters_at_stop_carry_the_array(make_dist, codec, tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    letters: list[Any] = []
    d = make_dist(codec=codec)
    d.add_listener(
        Digester(str(out), str(gate)),
        on_dead_letter=lambda reg, n, why: letters.append(n),
    )
    d.start()
    arrs = [np.full(16 * KIB, i, dtype=np.float64) for i in range(3)]
    for i, arr in enumerate(arrs):
        d.distribute(fanout.Add({"i": i, "data": arr}))
    assert d.stop(drain=True, timeout=0.2) is False
    assert len(letters) == 3
    for n, arr in zip(letters, arrs, strict=True):
        assert isinstance(n, fanout.Add)
        assert digest(n.obj["data"]) == digest(arr)
    assert d.shared_stats().held_bytes == 0


def test_on_error_and_poison_dead_letters_carry_the_array_after_its_block_is_reused(
    make_dist, codec, tmp_path
):
    errors: list[Any] = []
    letters: list[Any] = []
    d = make_dist(codec=codec, max_shared_bytes=512 * KIB)  # four blocks: reused at once
    d.add_listener(
        RaisesOrDies(),
        max_attempts=1,
        on_error=lambda reg, n, text: errors.append(n),
        on_dead_letter=lambda reg, n, why: letters.append(n),
    )
    d.start()
    bad, poison = arr_no(7), arr_no(9)
    d.distribute(fanout.Add({"raise": True, "data": bad}))
    d.distribute(fanout.Add({"die": True, "data": poison}))
    for i in range(20):
        d.distribute(fanout.Add({"data": arr_no(i)}))
    assert d.stop(drain=True, timeout=30)
    assert [digest(n.obj["data"]) for n in errors] == [digest(bad)]
    assert [digest(n.obj["data"]) for n in letters] == [digest(poison)]


@pytest.mark.parametrize(
    ("arena", "sizes"),
    [
        (100_000, [99_990]),  # fits raw, not once aligned to 64 bytes
        (131_072, [80_000, 80_000]),  # each fits, both together do not
    ],
)
def test_what_can_never_fit_the_arena_travels_inline(make_dist, tmp_path, arena, sizes):
    out = tmp_path / "out"
    d = make_dist(max_shared_bytes=arena)
    reg = d.add_listener(Digester(str(out)))
    d.start()
    data = [np.ones(size, dtype=np.uint8) for size in sizes]
    d.distribute(fanout.Add({"i": 0, "data": data[0], "more": data[1:]}))
    assert d.stop(drain=True, timeout=30)
    assert lines(out)[0].split("\t")[1] == digest(data[0])
    assert assert_accounted(reg).delivered == 1
    assert d.shared_stats().held_bytes == 0


def test_a_fragmented_arena_never_makes_a_notification_wait(make_dist, tmp_path):
    # The case: a 448-byte block held, then 448 + 512 bytes (960 <= 1024).
    # The first buffer takes a block, the second finds no hole: it goes inline.
    out, gate = tmp_path / "out", tmp_path / "gate"
    d = make_dist(max_shared_bytes=1024, shared_min_bytes=1)
    reg = d.add_listener(Digester(str(out), str(gate)))
    d.start()
    held = np.ones(448, dtype=np.uint8)
    d.distribute(fanout.Add({"i": 0, "data": held}))
    a, b = np.full(448, 2, dtype=np.uint8), np.full(512, 3, dtype=np.uint8)
    t = distribute_in_thread(d, [fanout.Add({"i": 1, "data": a, "b": b})])
    t.join(30)
    assert not t.is_alive()
    gate.touch()
    assert d.stop(drain=True, timeout=30)
    assert [line.split("\t")[1] for line in lines(out)] == [digest(held), digest(a)]
    assert assert_accounted(reg).delivered == 2
    assert d.shared_stats().held_bytes == 0


def test_a_schema_listener_gets_big_bytes_inline(make_dist, codec, tmp_path):
    if Blob is None:
        pytest.skip("schema= needs msgspec")
    got: list[Any] = []
    d = make_dist(codec=codec)
    reg = d.add_listener(Digester(str(tmp_path / "plain")))
    typed = d.add_listener(
        fanout.FuncHandler(), schema=Blob, on_dead_letter=lambda r, n, why: got.append(why)
    )
    d.start()
    blob = bytes(range(256)) * 512  # 128 KiB
    d.distribute(fanout.Add({"i": 0, "data": blob}))
    assert d.stop(drain=True)
    assert got == []
    assert assert_accounted(typed).delivered == 1 and assert_accounted(reg).delivered == 1


def test_frames_dropped_by_max_pending_bytes_give_their_blocks_back_at_once(make_dist, tmp_path):
    gate = tmp_path / "gate"
    d = make_dist()
    reg = d.add_listener(
        Digester(str(tmp_path / "out"), str(gate)),
        max_pending_bytes=200 * KIB,
        overflow="drop_oldest",
    )
    d.start()
    for i in range(40):
        d.distribute(fanout.Add({"i": i, "data": np.full(8 * KIB, i, dtype=np.float64)}))
    held = d.shared_stats().blocks
    pending = reg.stats().pending
    assert reg.stats().dropped > 0
    # One block per frame a ring still holds, or its worker is in: none for dropped ones.
    assert held <= pending + 1, (held, pending)
    assert reg.stats().pending_bytes <= 200 * KIB
    gate.touch()
    assert d.stop(drain=True)
    assert d.shared_stats().held_bytes == 0


class CountingCodec(fanout.MsgspecCodec):
    """The default codec with an encode of its own, which the arena must call."""

    calls = 0

    def encode(self, n, t_ns):
        CountingCodec.calls += 1
        return super().encode(n, t_ns)


def test_an_arena_for_a_codec_with_its_own_encode_calls_it():
    from fanout.buffers.arena import Arena

    arena = Arena(1 << 20, 4096, CountingCodec())  # the distributor makes none: be safe
    try:
        before = CountingCodec.calls
        assert isinstance(arena.encode(fanout.Add({"i": 1}), 0), bytes)
        assert CountingCodec.calls == before + 1
    finally:
        arena.close()


def test_the_folded_encode_is_the_arenas_for_the_default_codec(make_dist):
    d = make_dist()
    assert d.arena is not None
    assert d.ctx.shared_encode is d.arena.encode  # one object for every listener
    if fanout.NATIVE:
        assert type(d.arena.encode) is Encoder  # the native encode, with the check folded in
    else:  # twins: no native walk to fold
        assert d.arena.encode.__qualname__.startswith("Arena._encode_shared")
    with pytest.raises(TypeError):
        d.arena.encode(fanout.Add({"x": object()}), 0)  # refused, as encode refuses it
    assert d.shared_stats().blocks == 0
