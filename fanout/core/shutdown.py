"""Stopping a distributor: draining, reaping workers and threads, counting what was lost.

``Shutdown`` is the part of ``Distributor`` behind ``stop()``, the exit hook and
the supervisor's list of lanes; it builds on ``Registry``. The lock is taken for
each change of state and released for every wait: a drain, the workers' exits,
the joins of fanout's threads.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable

from fanout.core.lifecycle import State
from fanout.core.poll import poll_until
from fanout.core.registry import Registry
from fanout.listeners.base import Registration
from fanout.listeners.process import Lane

__all__ = ["REAP_FALLBACK", "Shutdown", "unstopped"]

log = logging.getLogger("fanout")

REAP_FALLBACK = 2.0  # stop() reaps workers itself when the supervisor has not
REAP_NAP = 0.002  # seconds between two looks at the workers stop() waits for
# Not yet stopped: stopped at interpreter exit if the program forgot to, saying
# what that lost (a forgotten start() or stop() must not lose notifications silently).
unstopped: weakref.WeakSet[Shutdown] = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    for d in list(unstopped):
        d._stop_at_exit()


class Shutdown(Registry):
    """``stop()``'s work for a ``Distributor``.

    ``Distributor.__init__`` sets every attribute declared here, and says what each holds.
    """

    _stop_lock: threading.Lock
    _pump_thread: threading.Thread | None
    _stopped_listeners: tuple[Registration, ...]
    _stop_losses: list[tuple[str, int, int]]
    _abandoned: list[str]
    # Defined by Distributor: what the last stop() lost, in words.
    describe_losses: Callable[[], str]

    def supervised_lanes(self) -> list[Lane]:
        """List the lanes the supervisor watches (lock held); changes nothing.

        Returns:
            Every listener's lanes, and removed listeners' lanes until their
            workers are reaped.
        """
        lanes: list[Lane] = []
        for reg in (*self._listeners, *self._closing):
            lanes.extend(reg.supervised_lanes())
        return lanes

    def release_exited(self) -> None:
        """Release the removed listeners whose workers have all exited (lock held)."""
        closing = [r for r in self._closing if not r.exited()]
        for reg in self._closing:
            if reg not in closing:
                reg.release()
        self._closing = closing

    def watch_round(self) -> list[Lane]:
        """The supervisor's round: release what exited, then list the lanes to watch."""
        self.release_exited()
        return self.supervised_lanes()

    def _own_threads(self) -> set[threading.Thread | None]:
        """fanout's threads and every listener's, removed or taken by a running stop.

        A thread handler calling stop() while a stop runs must be refused, not
        left waiting for the stop that waits for it.
        """
        with self.lock:  # add_listener adds to ctx.threads under it
            return {self.supervisor, self._pump_thread, *self.ctx.threads}

    def _stop_at_exit(self) -> None:
        """The exit hook's stop: bounded, and it says what the forgotten stop lost.

        Every listener gets at most ``close_grace`` to leave; a thread listener's
        running handler call cannot be killed and is not waited for.
        """
        grace = self.ctx.close_grace
        if not self._stop_lock.acquire(timeout=grace):
            log.warning(
                "the program exits while a stop() of %r still runs after %.1f s; "
                "leaving it behind",
                self,
                grace,
            )
            return
        try:
            complete, calls = self._stop(False, grace, at_exit=True)
        finally:
            self._stop_lock.release()
        for call in calls:
            call()
        if complete and not self._abandoned:
            return
        never = "" if self.ctx.started else ", as start() was never called"
        left = "; ".join(
            f"listener {name!r}: a handler call still running in its thread was left "
            f"behind (a thread cannot be killed)"
            for name in self._abandoned
        )
        log.warning(
            "the program exits without stop(): %s%s. Call stop(drain=True) before "
            "exiting, or use `with Distributor() as d:`",
            "; ".join(filter(None, (self.describe_losses(), left))),
            never,
        )

    def _stop(
        self, drain: bool, timeout: float | None, at_exit: bool = False
    ) -> tuple[bool, list[Callable[[], None]]]:
        """Stop everything, in order: refuse new work, drain, close, reap, settle, free."""
        with self.lock:
            state = self.ctx.state
            if state is State.STOPPED:
                return True, []
            was_started = self.ctx.started
            resumed = state is State.CLOSING  # an earlier stop() was interrupted midway
            if state.accepting:
                # Nothing new from here on: distribute, add_listener and start()
                # refuse, so a drain ends even while a producer keeps producing.
                self._move(State.DRAINING if was_started and drain else State.CLOSING)
                for reg in self._listeners:
                    reg.close_input()
        if drain and self.ctx.state is State.DRAINING:
            self._wait_drained(timeout)
        listeners, before = self._close_listeners(resumed, at_exit)
        calls: list[Callable[[], None]] = []
        if was_started:
            calls += self._reap(listeners, timeout, at_exit)
        lost = self._settle(listeners, before, drain, timeout, was_started, calls)
        with self.lock:
            self._move(State.STOPPED)
            for reg in self._closing:
                reg.release()
            self._closing = []
            if self.arena is not None:  # the workers are gone and the rings settled
                self.arena.close()
        unstopped.discard(self)
        self._shutdown_threads(was_started, self.ctx.close_grace if at_exit else None)
        with self.ctx.ray_lock:
            if self.ctx.ray_cluster is not None:  # after the listeners: their actors are gone
                self.ctx.ray_cluster.detach()
        return lost == 0, calls

    def _close_listeners(
        self, resumed: bool, at_exit: bool
    ) -> tuple[tuple[Registration, ...], dict[Registration, tuple[int, int, int]]]:
        """Close every listener's rings (past any drain); return them and their counts so far."""
        with self.lock:
            if self.ctx.state is State.DRAINING:
                self._move(State.CLOSING)
            # Worker starts run with no lock held: the ones under way end first,
            # and none begins from here on (CLOSING).
            if not self.ctx.wait_starts(self.ctx.close_grace if at_exit else None):
                log.warning("the program exits while a worker of %r is still starting", self)
            if not resumed:
                self._stopped_listeners = self._listeners
                self._publish(())
            listeners = self._stopped_listeners
            before = {
                reg: (reg.settled_count, reg.dropped, reg.dead_lettered) for reg in listeners
            }
            for reg in listeners:
                reg.mark_removed(by_stop=True)  # settled below, with the stop's reason
                reg.close(drain=False)  # its rings take nothing more from here on
                if reg.supervised_lanes() and reg not in self._closing:
                    self._closing.append(reg)
        return listeners, before

    def _settle(
        self,
        listeners: tuple[Registration, ...],
        before: dict[Registration, tuple[int, int, int]],
        drain: bool,
        timeout: float | None,
        was_started: bool,
        calls: list[Callable[[], None]],
    ) -> int:
        """Count what each listener still holds as dropped or dead-lettered; return how many.

        Every listener's queue is final now. The callbacks to make without the
        lock are added to ``calls``.
        """
        lost = 0
        self._stop_losses = []
        for reg in listeners:
            calls += reg.settle(self._undelivered_reason(reg, drain, timeout, was_started))
            settled, dropped, dead = before[reg]
            if reg.settled_count > settled:  # not the ordinary dead letters
                lost += reg.settled_count - settled
                self._stop_losses.append(
                    (reg.name, reg.dead_lettered - dead, reg.dropped - dropped)
                )
        return lost

    @staticmethod
    def _undelivered_reason(
        reg: Registration, drain: bool, timeout: float | None, was_started: bool
    ) -> str | None:
        """Why ``stop`` dead-letters what ``reg`` still holds; None: it drops it."""
        if not was_started:
            return "the distributor was stopped without ever being started"
        if reg.start_error is not None:
            return reg.start_failure()
        if reg.never_started():
            return "the listener's workers never started, so nothing could deliver it"
        if reg.stuck():
            return "the listener's workers keep failing to start, so nothing could deliver it"
        if drain:
            return f"stop(drain=True, timeout={timeout}) gave up before it was delivered"
        return None

    def _wait_drained(self, timeout: float | None) -> bool:
        """Wait until every listener drained, or is stuck, or ``timeout`` passed."""

        # A listener whose worker keeps failing to start can never drain: do not
        # wait for it forever (its frames are dropped by the stop, and stop says so).
        def caught_up(reg: Registration) -> bool:
            reg.catch_up()
            return reg.drained()

        if not poll_until(
            lambda: all(caught_up(r) or r.stuck() for r in self._listeners),
            timeout,
            longest=0.001,
        ):
            return False
        return all(caught_up(r) for r in self._listeners)

    def _reap(
        self, listeners: tuple[Registration, ...], timeout: float | None, at_exit: bool = False
    ) -> list[Callable[[], None]]:
        """Wait for workers and threads to leave; kill workers past the grace.

        A thread cannot be killed: a thread listener's running call is waited
        for (up to ``timeout`` if given), so that what it leaves is counted; at
        exit it is not waited for at all. Returns the reports a fallback reap
        collected, to make after the lock.
        """
        deadline = time.monotonic() + min(1.0, self.ctx.close_grace)
        self.supervisor.wake()
        calls: list[Callable[[], None]] = []
        poll_until(
            lambda: self._reap_round(deadline, calls), None, first=REAP_NAP, longest=REAP_NAP
        )
        self._abandoned = []
        with self.lock:
            leaving, self._leaving = self._leaving, []
        for reg in (*listeners, *leaving):
            if reg.supervised_lanes():
                continue
            if at_exit and reg.executor == "thread":
                if not reg.wait_exited(0):
                    self._abandoned.append(reg.name)
                continue
            reg.wait_exited(timeout)  # a thread's running call; a Ray sender and actors
        return calls

    def _reap_round(self, deadline: float, calls: list[Callable[[], None]]) -> bool:
        """Kill removed listeners' workers past ``deadline``; True once none is left.

        The supervisor reaps them; when it has not by ``REAP_FALLBACK`` later
        (or it is gone), this does, and adds the reports to ``calls``.
        """
        with self.lock:
            lanes = [lane for r in self._closing for lane in r.supervised_lanes() if lane.proc]
            if not lanes:
                return True
            now = time.monotonic()
            if now >= deadline:
                for lane in lanes:
                    lane.kill()
            fallback = now >= deadline + REAP_FALLBACK or not self.supervisor.is_alive()
        if fallback:
            # The supervisor should have reaped them by now: do it here.
            for lane in lanes:
                calls += self.supervisor.reap(lane)
        self.supervisor.wake()
        return False

    def _shutdown_threads(self, was_started: bool, timeout: float | None = None) -> None:
        """Stop the pump and the supervisor; free what no thread uses any more."""
        self.pump.stop()
        self.supervisor.stop()
        if was_started:
            assert self._pump_thread is not None
            self._pump_thread.join(timeout)
            self.supervisor.join(timeout)  # it may be running a callback
        # Only what no thread uses any more is freed: at exit the joins are
        # bounded, and a thread still running is left with what it uses.
        if not (self._pump_thread is not None and self._pump_thread.is_alive()):
            self.pump.close()
        if not self.supervisor.is_alive():
            self.supervisor.close()
