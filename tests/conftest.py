"""Shared fixtures: both ring implementations, and leak checks for process tests."""

from __future__ import annotations

import os
import threading
import types

import pytest

import fanout.native._ring_py
from fanout.native import pick as _impl

try:
    import fanout.native._ring as _native_ring
except ImportError:  # pure-Python install (FANOUT_NO_EXTENSIONS=1 at build time)
    _native_ring = None  # type: ignore[assignment]

# The implementation fanout itself picked: with FANOUT_NO_EXTENSIONS=1 the whole
# suite, distributor included, runs on the pure-Python twins.
RING_IMPLS = [pytest.param(fanout.native._ring_py, id="py")]
if _native_ring is not None and _impl.NATIVE:
    RING_IMPLS.insert(0, pytest.param(_native_ring, id="native"))


@pytest.fixture(params=RING_IMPLS)
def ring_impl(request: pytest.FixtureRequest) -> types.ModuleType:
    """A ring module (``Ring``, ``FrameRing``): the native one and its twin."""
    return request.param


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _helper_fds() -> set[int]:
    """multiprocessing's pipes to its helpers: new ones when a test killed a helper.

    Subtracted at the end only: an fd number a replaced helper gave up may be in
    use again, and was open before the test too, so it is no leak.
    """
    from multiprocessing import forkserver, resource_tracker

    return {forkserver._forkserver._forkserver_alive_fd, resource_tracker._resource_tracker._fd}


def _memfd_maps() -> set[str]:
    """fanout's shared memory mapped in this process (progress slots are memfds).

    Open memfds are in the fd check; this catches a mapping kept after its fd
    was closed, which /dev/shm never shows.
    """
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[-1].strip() for line in f if "/memfd:fanout" in line}


def _children() -> set[int]:
    import psutil

    keep = set()
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        # multiprocessing's own helpers live for the whole run, by design.
        if "forkserver" in cmd or "resource_tracker" in cmd:
            continue
        keep.add(child.pid)
    return keep


@pytest.fixture(scope="session", autouse=True)
def _multiprocessing_helpers():
    """Start multiprocessing's long-lived helpers first, so leak checks ignore them."""
    import multiprocessing
    from multiprocessing import resource_tracker

    from fanout.listeners.procs import ensure_forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(["fanout.worker.main"])
    ensure_forkserver()
    resource_tracker.ensure_running()


@pytest.fixture
def no_leaks():
    """Fail the test if it leaves a child process, thread, fd or shared-memory mapping."""
    import time

    fds, maps, threads = _fds(), _memfd_maps(), set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        extra_children = _children()
        extra_threads = {t for t in threading.enumerate() if t not in threads and t.is_alive()}
        extra_fds = _fds() - fds - _helper_fds()
        extra_maps = _memfd_maps() - maps
        if not (extra_children or extra_threads or extra_fds or extra_maps):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    fd_info = {fd: _describe_fd(fd) for fd in extra_fds}
    pytest.fail(
        f"leaked: children={sorted(extra_children)} threads={[t.name for t in extra_threads]} "
        f"fds={fd_info} memfd mappings={sorted(extra_maps)}"
    )


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture
def make_dist(no_leaks):
    """Build Distributors that are stopped (drain=False) after the test, leak-checked."""
    import fanout

    made: list[fanout.Distributor] = []

    def make(**kwargs):
        d = fanout.Distributor(**kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop(drain=False)


@pytest.fixture(params=["forkserver", "spawn"])
def start_method(request: pytest.FixtureRequest) -> str:
    """Both supported start methods."""
    return request.param
