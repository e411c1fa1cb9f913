"""Pure-Python pump: the twin of the native ``fanout.native._pump`` (same API).

One thread drains every lane's FrameRing into that lane's non-blocking pipe.
``FrameRing.send_to`` releases the GIL around its ``writev``.
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from typing import Any

from fanout.native._ring_common import check_fd, check_pump_ring
from fanout.native._ring_py import FrameRing

__all__ = ["NATIVE", "Pump"]

NATIVE = False


class Pump:
    """Drains lanes' FrameRings into their pipes from one thread.

    ``add(key, ring, fd)`` attaches (or re-attaches) a lane, ``remove(key)``
    detaches it, ``notify()`` wakes the loop after appends, ``run()`` is the loop
    (call it in a thread), ``stop()`` ends it, ``close()`` frees the eventfd.
    ``notify`` costs a syscall only when the loop sleeps.
    """

    def __init__(self) -> None:
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Closed by close(), or when a pump never closed is collected (the native
        # twin closes it in __dealloc__).
        self._close_efd = weakref.finalize(self, os.close, self._efd)
        self._close_efd.atexit = False  # at exit, stop() closes it after run() returned
        # key -> [ring, fd, blocked, broken_errno]; replaced whole on change so the
        # loop can iterate a snapshot. _table_lock is held for one send pass.
        self._lanes: dict[Any, list[Any]] = {}
        self._table_lock = threading.Lock()
        self._sleeping = False
        self._running = True

    def add(self, key: Any, ring: Any, fd: int) -> None:
        """Attach ``ring`` to be drained into ``fd`` (replacing ``key``'s lane)."""
        check_pump_ring(ring, FrameRing)
        fd = check_fd(fd)
        with self._table_lock:
            lanes = dict(self._lanes)
            old = lanes.get(key)
            if old is None or old[0] is not ring or old[1] != fd:
                lanes[key] = [ring, fd, False, 0]
            self._lanes = lanes
        self._wake()

    def remove(self, key: Any) -> None:
        """Detach ``key``'s lane; on return the loop no longer uses its fd."""
        with self._table_lock:
            if key in self._lanes:
                lanes = dict(self._lanes)
                del lanes[key]
                self._lanes = lanes
        self._wake()

    def broken(self) -> dict[Any, int]:
        """Return ``{key: errno}`` of lanes whose fd failed since they were added."""
        with self._table_lock:
            return {key: lane[3] for key, lane in self._lanes.items() if lane[3]}

    def _wake(self) -> None:
        if self._efd < 0:
            return  # closed after stop(): nothing left to wake
        try:
            os.eventfd_write(self._efd, 1)
        except OSError:
            pass  # (closed by a racing close())

    def notify(self) -> None:
        """Wake the loop if it sleeps (call after appending to a ring)."""
        if self._sleeping:
            self._sleeping = False
            self._wake()

    def stop(self) -> None:
        """Make ``run()`` return soon."""
        self._running = False
        self._wake()

    def close(self) -> None:
        """Free the eventfd (after ``run()`` returned)."""
        if self._efd >= 0:
            self._efd = -1
            self._close_efd()

    def run(self) -> None:
        """Drain rings into their fds until ``stop()``; call in a dedicated thread."""
        poller = select.poll
        while self._running:
            watch = poller()
            watch.register(self._efd, select.POLLIN)
            timeout = None
            with self._table_lock:
                lanes = list(self._lanes.values())
                for lane in lanes:
                    ring, fd, _, broken = lane
                    lane[2] = False
                    if broken or not ring.unsent_bytes:
                        continue
                    try:
                        ring.send_to(fd)
                    except OSError as exc:
                        lane[3] = exc.errno or 1
                        continue
                    if ring.unsent_bytes:
                        lane[2] = True
                        if ring.capped():
                            # Waiting for the reader to finish frames, which no
                            # fd announces: look again in a millisecond.
                            timeout = 1
                        else:
                            watch.register(fd, select.POLLOUT)
            # Announce the nap, then look once more: an append that raced with
            # the pass either shows up here or sees _sleeping and wakes us.
            self._sleeping = True
            if (
                not self._running
                or any(not lane[3] and not lane[2] and lane[0].unsent_bytes for lane in lanes)
                or len(lanes) != len(self._lanes)
            ):
                self._sleeping = False
                continue
            watch.poll(timeout)
            self._sleeping = False
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
