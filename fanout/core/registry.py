"""The distributor's listeners: how one is added, started and published to ``distribute``.

``Registry`` is the part of ``Distributor`` that keeps the listener snapshot and
the delivery plan ``distribute`` reads without the lock; ``Shutdown``
(``fanout.core.shutdown``) builds on it, and ``Distributor`` on both. Starting
workers and running user code (key functions, codec hooks) happen with no lock
held; only the changes to the snapshot take it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from fanout.buffers.arena import Arena
from fanout.core.lifecycle import State, require, transition
from fanout.core.options import ListenerOptions
from fanout.core.plan import Plan
from fanout.core.poll import poll_until
from fanout.errors import DistributorStopped, WorkerStartError
from fanout.listeners.base import ListenerContext, Registration
from fanout.listeners.process import ProcessListener, reap_discarded
from fanout.listeners.ray import RayListener
from fanout.listeners.supervisor import Supervisor
from fanout.listeners.thread import ThreadListener
from fanout.notifications import Add, Notification

__all__ = ["FIRST_START_WAIT", "LISTENER_KINDS", "MIN_RESYNC_PERIOD", "Registry"]

log = logging.getLogger("fanout")

MIN_RESYNC_PERIOD = 1.0  # client-go's minimumResyncPeriod
FIRST_START_WAIT = 60.0  # start() waits this long at most for first workers to say ready
# Each executor is one listener class behind the Registration interface.
LISTENER_KINDS: dict[str, type[Registration]] = {
    "process": ProcessListener,
    "thread": ThreadListener,
    "ray": RayListener,
}


def effective_resync(requested: float, check: float) -> float:
    """client-go ``determineResyncPeriod``: 0 stays 0; never below the check period."""
    if requested == 0 or check == 0:
        return 0.0
    return max(requested, check)


class Registry:
    """The listener snapshot of a ``Distributor``, and adding and starting listeners.

    ``Distributor.__init__`` sets every attribute declared here, and says what each holds.
    """

    ctx: ListenerContext
    lock: threading.RLock
    clock: Callable[[], float]
    arena: Arena | None
    pump: Any
    supervisor: Supervisor
    _check_period: float
    _listeners: tuple[Registration, ...]
    _plan: Plan
    _closing: list[Registration]
    _leaving: list[Registration]
    _shared_encode: Callable[[Notification, int], bytes] | None
    # distribute's (wake the pump, deliver, check for a stop): what a Plan's feed calls.
    _sink: tuple[Callable[[], Any], Callable[..., Any], Callable[[], Any]]
    # Defined by Distributor: a listener whose first start failed is shut down.
    shutdown_listener: Callable[..., bool]

    def _move(self, to: State) -> None:
        """Move the lifecycle forward to ``to`` (lock held): the one place it changes."""
        self.ctx.state = transition(self.ctx.state, to)
        if to is State.STARTED:
            self.ctx.ever_started = True

    def _add_listener(
        self, opts: ListenerOptions, initial_list: Iterable[Any] | None
    ) -> Registration:
        """Build, queue, register and start a listener: ``add_listener`` past its checks."""
        items = list(initial_list) if initial_list is not None else []
        # From an on_error / on_dead_letter callback (the supervisor's thread) the
        # wait would hold up the very thread that reads "ready": skip it there, and
        # let the supervisor report a failure as it does for any later start.
        awaited = threading.current_thread() is not self.supervisor
        require("add_listener()", self.ctx.state, State.NEW, State.STARTED)
        reg, queue_initial = self._build_listener(opts, items)
        starting = self._register(reg, queue_initial, awaited)
        if starting:
            self._start_added(reg)
        self.supervisor.wake()
        self.pump.notify()
        if starting and awaited:
            failure = self._first_start_failure([reg])
            if failure is not None:
                self.shutdown_listener(reg, timeout=self.ctx.close_grace)
                raise failure
        return reg

    def _build_listener(
        self, opts: ListenerOptions, items: list[Any]
    ) -> tuple[Registration, Callable[[], None]]:
        """Build the listener and encode its initial list; return it and the call that queues it.

        Built, routed and encoded with no lock held: the key function and the
        codec's hooks are user code. Nothing else sees the listener until
        ``_register`` publishes it.
        """
        reg = LISTENER_KINDS[opts.executor](self.ctx, opts)
        try:
            queue_initial = reg.prepare_initial(
                [Add(obj, True) for obj in items], time.monotonic_ns()
            )
        except BaseException:
            with self.lock:
                self._discard(reg)
            raise
        return reg, queue_initial

    def _register(
        self, reg: Registration, queue_initial: Callable[[], None], awaited: bool
    ) -> bool:
        """Queue the initial list and publish ``reg``, or begin its start; True if it starts.

        On a running distributor the listener is published only once its start
        ended (``_start_added``), so ``distribute`` never feeds one that failed.
        """
        with self.lock:
            try:
                require("add_listener()", self.ctx.state, State.NEW, State.STARTED)
                queue_initial()
            except BaseException:
                self._discard(reg)
                raise
            starting = self.ctx.started
            if starting:
                reg.start_awaited = awaited
                self.ctx.begin_start(reg)  # a stop from here on waits for it
            else:
                self._set_resync(reg)
                self._publish((*self._listeners, reg))
        return starting

    def _start_registered(self, listeners: tuple[Registration, ...]) -> BaseException | None:
        """Start the listeners ``start()`` found (``ctx.begin_start`` done), no lock held.

        Publishes them once all started, then waits for their first workers.

        Returns:
            What the first start that failed raised, or None.
        """
        failure: BaseException | None = None
        for reg in listeners:  # after a failure, the others' starts only end
            failure = self._start_unlocked(reg, run=failure is None) or failure
        if failure is None:
            with self.lock:
                if self.ctx.state.accepting:
                    self._publish(self._listeners)
        if failure is None:
            self.supervisor.wake()
            self.pump.notify()
            failure = self._first_start_failure(listeners)
        return failure

    def _start_added(self, reg: Registration) -> None:
        """Start a listener added to a running distributor, then publish it.

        The start runs with no lock held; a stop that began meanwhile waited for
        it, and the listener is then discarded, never published.
        """
        failure = self._start_unlocked(reg)
        with self.lock:
            if failure is None and not self.ctx.state.accepting:
                failure = DistributorStopped(
                    f"add_listener(): the distributor began to stop while listener "
                    f"{reg.name!r} started; it was not added"
                )
            if failure is None:
                self._set_resync(reg)
                self._publish((*self._listeners, reg))
            else:
                reg.mark_removed()
                self._discard(reg)
        if failure is not None:
            reap_discarded()  # a worker it started and killed: waited for without the lock
            raise failure

    def _start_unlocked(self, reg: Registration, run: bool = True) -> BaseException | None:
        """Start ``reg`` (``ctx.begin_start`` done) with no lock held, then end the start.

        Returns:
            What the start raised, or None.
        """
        failure: BaseException | None = None
        if run:
            try:
                reg.start()  # waits for processes, Ray: never under the lock
            except BaseException as exc:
                failure = exc
        with self.lock:
            self.ctx.end_start(reg)  # a removal that came meanwhile is done here
        return failure

    def _set_resync(self, reg: Registration) -> None:
        """client-go ``AddEventHandlerWithOptions`` resync rules (lock held)."""
        requested = reg.requested_resync
        if requested is None:
            requested = self._check_period
        elif requested != 0 and requested < MIN_RESYNC_PERIOD:
            requested = MIN_RESYNC_PERIOD
        reg.requested_resync = requested
        if requested != 0 and requested < self._check_period:
            if self.ctx.started:
                requested = self._check_period
            else:
                self._check_period = requested
                for other in self._listeners:
                    assert other.requested_resync is not None  # set when it was added
                    other.resync_period = effective_resync(other.requested_resync, requested)
        reg.resync_period = effective_resync(requested, self._check_period)
        reg.next_resync = self.clock() + reg.resync_period

    def _publish(self, listeners: tuple[Registration, ...]) -> None:
        """Swap in a new listener snapshot for ``distribute`` (lock held).

        A listener that could not start stays registered (its stats tell why)
        but gets nothing more.
        """
        self._listeners = listeners
        live = tuple(r for r in listeners if r.start_error is None)
        self._plan = Plan(live, self.ctx.started and not self.ctx.stopping, self._sink)
        if self.arena is not None:  # who shares the arena
            self.arena.set_takers(
                tuple(lane.ring for lane in r.lanes)
                for r in live
                if r.takes_payloads and r.encoder() == self._shared_encode
            )

    def _listener_failed(self, reg: Registration, why: str) -> list[Callable[[], None]]:
        """A listener nobody waited for could not start: never silent, never growing.

        It gets nothing more (it stays registered, with ``start_error``, so stats
        and metrics show it), its workers are asked to leave, and the caller
        dead-letters what it holds. fanout does not retry: the same handler
        would fail the same way. Returns the log line to write without the lock.
        """
        with self.lock:
            if reg.start_error is not None or reg.removed:
                return []
            reg.start_error = why
            if reg in self._listeners:
                self._publish(self._listeners)
            reg.close_input()
        return [
            functools.partial(
                log.error,
                "listener %r could not start, and is out of distribution (remove it "
                "and add a fixed one; fanout does not retry): %s",
                reg.name,
                why,
            )
        ]

    def _discard(self, reg: Registration) -> None:
        """Close a listener that is gone for good (lock held)."""
        if reg.discard():  # workers still leaving: released once reaped
            self._closing.append(reg)
        self._leaving = [r for r in (*self._leaving, reg) if not r.exited()]

    def _first_start_failure(
        self, listeners: tuple[Registration, ...] | list[Registration]
    ) -> WorkerStartError | None:
        """Wait until every lane's first worker said ready or failed for good.

        Workers start in parallel, so this costs about one worker start. Returns
        the error of the first listener whose worker cannot start (unpicklable or
        unimportable handler, a factory that raised or returned no handler);
        transient failures are left to the supervisor's retries.
        """
        lanes = [lane for r in listeners for lane in r.lanes]
        if not poll_until(
            lambda: not any(lane.first_start for lane in lanes), FIRST_START_WAIT, longest=0.005
        ):
            log.warning(
                "start(): workers still starting after %.0f s; going on without waiting for them",
                FIRST_START_WAIT,
            )
            with self.lock:  # nobody waits now: later failures are reported as usual
                for lane in lanes:
                    lane.first_start = False
                    # so a start that fails for good later is reported and
                    # dead-lettered by the supervisor, not retried forever
                    lane.listener.start_awaited = False
        failures = [
            (lane.listener.name, lane.start_error)
            for lane in lanes
            if lane.start_error is not None
        ]
        for name, text in failures[1:]:
            log.error("listener %r: its worker could not start:\n%s", name, text)
        if failures:
            return WorkerStartError(*failures[0])
        return None
