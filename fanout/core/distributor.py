"""The Distributor: client-go's ``sharedProcessor`` with process-isolated listeners.

``distribute`` encodes a notification once, routes it to one lane of every
target listener and appends the bytes to that lane's ring; the native pump
thread writes rings into worker pipes; the supervisor thread keeps workers
alive. docs/design.md draws the picture. This module is the public face: the
delivery plan lives in ``fanout.core.plan``, adding and starting listeners in
``fanout.core.registry``, stopping in ``fanout.core.shutdown``.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Literal

from fanout.buffers.arena import DEFAULT_SHARED_MIN_BYTES, SharedStats
from fanout.core.lifecycle import State, require
from fanout.core.options import check_flag, check_period, check_start_method, listener_options
from fanout.core.plan import Plan, deliver, encode_all, make_arena
from fanout.core.shutdown import Shutdown, unstopped
from fanout.errors import DistributorStopped
from fanout.listeners.base import ListenerContext, Registration
from fanout.listeners.process import reap_discarded
from fanout.listeners.procs import preload_in_forkserver
from fanout.listeners.supervisor import Supervisor
from fanout.native.pick import Pump
from fanout.notifications import NOTIFICATION_TYPES, Notification
from fanout.wire.codec import Codec, get_codec

__all__ = ["Distributor"]

log = logging.getLogger("fanout")

Executor = Literal["process", "thread", "ray"]
Overflow = Literal["block", "drop_oldest", "drop_newest", "error"]
StartMethod = Literal["forkserver", "spawn"]
CodecName = Literal["msgpack", "msgspec"]


class Distributor(Shutdown):
    """Fans notifications out to listeners, each in its own workers or thread.

    ``with Distributor() as d:`` starts on enter and ``stop(drain=True)`` on exit,
    even when the block raised an exception (what was accepted is delivered); only
    an interruption (``KeyboardInterrupt``, ``SystemExit``) leaves with
    ``stop(drain=False)``. Leaving a block whose stop lost notifications logs a
    warning naming the listeners and counts.
    Thread safety: every method may be called from any thread, ``distribute``
    from several at once (notifications of one key keep their order for each
    producing thread), and from handlers and callbacks (``stop`` and
    ``shutdown_listener`` refuse where they would wait for themselves).

    Lifecycle: ``new -> started -> stopping -> stopped`` (``state`` tells which;
    stopping is ``draining`` then ``closing``). Each method says which states it
    accepts; a refusal names the state.

    Args:
        resync_check_period: Seconds between the producer's resync checks
            (client-go's ``resyncCheckPeriod``); 0 disables resync.
        clock: ``() -> seconds``, used for resync decisions (inject a fake one
            in tests).
        start_method: ``"forkserver"`` (default) or ``"spawn"``; ``"fork"`` is
            refused because the pump thread makes forking unsafe.
        codec: ``"msgspec"`` (default), ``"msgpack"`` or a ``fanout.Codec``
            instance; it encodes each notification once for every process
            listener. Both names write the same MessagePack; ``"msgspec"`` is
            the faster, ``"msgpack"`` (``MsgpackCodec``) takes ``default`` and
            ``ext_hook`` hooks for your own types.
        max_shared_bytes: Size of the shared-memory arena through which big
            buffers reach process listeners (default: an eighth of the RAM;
            memory is used only as blocks are filled); 0 sends everything
            inline in the frames. Each process listener may hold an equal share
            of it; one at its share takes big buffers inline in its own ring.
            The two built-in codecs use it (not a ``Codec`` subclass of yours).
        shared_min_bytes: A numpy array, ``bytes``, ``bytearray`` or
            ``memoryview`` of at least this many bytes travels through the
            arena: copied once, read zero-copy by every worker.

    Raises:
        TypeError: ``clock`` is not callable, a period or size is not a number,
            or a codec instance does not survive pickling.
        ValueError: A bad period, size, start method or codec name.
        OSError: The shared-memory arena could not be created.
    """

    CLOSE_GRACE = 5.0  # a removed listener's worker gets this long to leave

    def __init__(
        self,
        resync_check_period: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        start_method: StartMethod = "forkserver",
        codec: CodecName | Codec = "msgspec",
        max_shared_bytes: int | None = None,
        shared_min_bytes: int = DEFAULT_SHARED_MIN_BYTES,
    ) -> None:
        check = check_period("resync_check_period", resync_check_period)
        assert check is not None
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, not {clock!r}")
        check_start_method(start_method)
        self.arena, self.codec = make_arena(get_codec(codec), max_shared_bytes, shared_min_bytes)
        mp_context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            preload_in_forkserver("fanout.worker.main")  # beside the program's own preloads
        self.start_method = start_method
        self.lock = threading.RLock()
        # All a listener sees of its distributor.
        self.ctx = ListenerContext(
            lock=self.lock,
            codec=self.codec,
            codec_blob=pickle.dumps(self.codec, protocol=pickle.HIGHEST_PROTOCOL),
            start_method=start_method,
            mp_context=mp_context,
            pump=Pump(),
            close_grace=self.CLOSE_GRACE,
            arena=self.arena,
        )
        self.clock = clock
        self._check_period = check
        self.ctx.discard_removed = self._discard
        self._stop_lock = threading.Lock()
        self._listeners: tuple[Registration, ...] = ()
        # Swapped whole, so distribute() reads one consistent plan without the lock.
        self._plan = Plan(())
        self._stopped_listeners: tuple[Registration, ...] = ()
        # (name, dead-lettered, dropped) of each listener the last stop() lost from.
        self._stop_losses: list[tuple[str, int, int]] = []
        # Thread listeners whose running call the exit hook left behind.
        self._abandoned: list[str] = []
        self._closing: list[Registration] = []  # removed, workers not yet reaped
        # Removed thread and Ray listeners whose thread had not ended: stop()
        # waits for them too, so nothing of this distributor outlives it.
        self._leaving: list[Registration] = []
        self.pump: Any = self.ctx.pump
        self._sink = (self.pump.notify, self._deliver, self._check_not_stopped)
        self._shared_encode: Callable[[Notification, int], bytes] | None = None
        if self.arena is not None:  # one object: listeners' encoders are this very one
            self._shared_encode = self.ctx.shared_encode = self.arena.encode
        self._pump_thread: threading.Thread | None = None
        self.supervisor = Supervisor(self.ctx, self.lock, self.watch_round)
        self.ctx.wake_supervisor = self.supervisor.wake
        self.ctx.listener_failed = self._listener_failed
        unstopped.add(self)

    def shared_stats(self) -> SharedStats:
        """Return a snapshot of the shared-memory arena big buffers travel through.

        Returns:
            Its size, the bytes and blocks still held by frames not yet handled,
            and totals; all zero when the arena is disabled. After ``stop()``
            nothing is held.
        """
        if self.arena is None:
            return SharedStats(0, 0, 0, 0, 0)
        self.arena.reconcile()  # free what the rings let go, so the snapshot counts the rest
        return self.arena.stats()

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Distributor cannot be pickled or sent to a worker process; handlers run "
            "in workers and cannot add, remove or distribute"
        )

    def __repr__(self) -> str:
        return f"<Distributor {self.state.value} listeners={len(self._listeners)}>"

    # -- introspection -------------------------------------------------------------------

    @property
    def close_grace(self) -> float:
        """Seconds a removed listener's worker gets to leave before it is killed."""
        return self.ctx.close_grace

    @close_grace.setter
    def close_grace(self, seconds: float) -> None:
        grace = check_period("close_grace", seconds)
        assert grace is not None
        self.ctx.close_grace = grace

    @property
    def state(self) -> State:
        """Where the distributor is in its life (``fanout.core.lifecycle.State``)."""
        return self.ctx.state

    @property
    def started(self) -> bool:
        """True once ``start()`` ran (it stays true after ``stop()``)."""
        return self.ctx.started

    @property
    def stopped(self) -> bool:
        """True once ``stop()`` finished: nothing of the distributor runs."""
        return self.state is State.STOPPED

    @property
    def accepting(self) -> bool:
        """True until ``stop()`` begins: notifications and listeners are taken."""
        return self.state.accepting

    @property
    def stopping(self) -> bool:
        """True while and after ``stop()`` stops the workers (past any drain)."""
        return self.ctx.stopping

    @property
    def resync_check_period(self) -> float:
        """Seconds between resync checks (may be lowered by ``add_listener``)."""
        return self._check_period

    @property
    def listener_count(self) -> int:
        """The number of registered listeners."""
        return len(self._listeners)

    def is_registered(self, reg: Any) -> bool:
        """Tell whether a handle is a listener of this distributor, not removed.

        Args:
            reg: Any object, typically a ``Registration``.

        Returns:
            True for a registered, not removed listener of this distributor.
        """
        return reg in self._listeners

    @property
    def listeners(self) -> tuple[Registration, ...]:
        """The registered listeners, in the order they were added."""
        return self._listeners

    # -- listeners -----------------------------------------------------------------------

    def add_listener(
        self,
        handler: Any,
        name: str | None = None,
        workers: int = 1,
        executor: Executor = "process",
        key: Callable[[Any], Hashable] | None = None,
        resync_period: float | None = None,
        initial_list: Iterable[Any] | None = None,
        max_pending_bytes: int | None = None,
        overflow: Overflow = "block",
        handler_timeout: float | None = None,
        max_attempts: int = 3,
        on_error: Callable[[Registration, Notification | None, str], Any] | None = None,
        on_dead_letter: Callable[[Registration, Notification | None, str], Any] | None = None,
        schema: Any = None,
        ray_options: dict[str, Any] | None = None,
        memory_limit: int | None = None,
    ) -> Registration:
        """Register a handler as a new listener; on a running distributor it starts at once.

        Each option in full: ``ListenerOptions`` (``fanout.core.options``).

        Args:
            handler: A ``fanout.Handler``, or a zero-argument class or factory building
                one in each worker; importable by the workers.
            name: The listener's name in stats, logs and metrics; default ``listener-N``.
            workers: Worker processes (lanes); order is kept per key, and per listener
                with 1.
            executor: ``"process"`` (default), ``"thread"`` or ``"ray"``.
            key: ``obj -> hashable`` choosing a notification's lane.
            resync_period: Seconds between resyncs (None: the check period; 0: never).
            initial_list: Objects delivered to this listener only, before anything
                live, as ``Add(obj, is_in_initial_list=True)``.
            max_pending_bytes: Bound on the bytes one lane holds; None: unbounded.
            overflow: ``"block"``, ``"drop_oldest"``, ``"drop_newest"`` or ``"error"``.
            handler_timeout: Seconds a handler call may run; None: no limit.
            max_attempts: Handler calls a notification may kill its worker in.
            on_error: ``f(reg, notification, traceback_text)`` for each handler exception.
            on_dead_letter: ``f(reg, notification, reason)`` for each one given up on.
            schema: A type msgspec decodes each object into.
            ray_options: Ray actor options for each worker (``executor="ray"``).
            memory_limit: Bytes of private memory a worker may hold; None: no limit.

        Returns:
            The listener's ``Registration``.

        Raises:
            TypeError: A bad option, a handler that is no handler or cannot be
                pickled (or serialised by Ray), a handler or schema defined in a
                file-less ``__main__``, or a schema msgspec cannot decode into.
            ValueError: An option out of range, or one the executor cannot take
                (see ``ListenerOptions``), or a Ray option unknown or owned by fanout.
            ImportError: ``executor="ray"`` without Ray installed.
            ListenerFull: The initial list cannot fit ``max_pending_bytes``.
            WorkerStartError: The distributor runs and the listener's first worker
                could not build its handler (the listener is removed; from a
                supervisor callback, ``ListenerStats.start_error`` tells instead).
            DistributorStopped: The distributor is stopping or stopped.
        """
        opts = listener_options(
            self.codec,
            handler,
            name,
            workers,
            executor,
            key,
            resync_period,
            max_pending_bytes,
            overflow,
            handler_timeout,
            max_attempts,
            on_error,
            on_dead_letter,
            schema,
            ray_options,
            memory_limit,
        )
        return self._add_listener(opts, initial_list)

    def remove_listener(self, reg: Any) -> None:
        """Stop delivering to a listener, without waiting for its workers.

        What it had not handled is dropped (counted in its ``dropped``), as
        client-go does. Idempotent; a foreign or removed handle is a no-op; it
        works after ``stop()`` too.

        Args:
            reg: The ``Registration`` that ``add_listener`` returned.
        """
        with self.lock:
            if reg not in self._listeners:
                return
            reg.mark_removed()
            self._publish(tuple(r for r in self._listeners if r is not reg))
            if reg.starting:  # its workers are being started: done when they are
                reg.discard_pending = True
            else:
                self._discard(reg)  # what it had not handled is dropped, as client-go does
        self.supervisor.wake()

    def shutdown_listener(self, reg: Any, timeout: float | None = None) -> bool:
        """Remove a listener, then wait until its workers (or thread) have exited.

        Args:
            reg: The ``Registration`` that ``add_listener`` returned.
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            True once every worker exited; False if ``timeout`` passed first.

        Raises:
            TypeError: ``timeout`` is not a number or None.
            ValueError: A negative or infinite ``timeout``.
            RuntimeError: Called from that listener's own handler, or from an
                ``on_error`` / ``on_dead_letter`` callback (it would wait for
                itself); call ``remove_listener`` there.
        """
        check_period("timeout", timeout, allow_none=True)
        current = threading.current_thread()
        if isinstance(reg, Registration) and reg.thread is not None and current is reg.thread:
            raise RuntimeError(
                f"shutdown_listener({reg.name!r}) called from its own handler or "
                f"callback would wait for itself; call remove_listener() there instead"
            )
        if current is self.supervisor:
            raise RuntimeError(
                "shutdown_listener() called from an on_error / on_dead_letter callback "
                "would wait for the supervisor running it; call remove_listener() there"
            )
        self.remove_listener(reg)
        if not isinstance(reg, Registration) or reg.ctx is not self.ctx:
            return True
        return reg.wait_exited(timeout)

    # -- producer ------------------------------------------------------------------------

    def distribute(self, n: Notification, sync: bool = False) -> None:
        """Deliver a notification to every listener.

        The notification is encoded once (for the process listeners) and
        appended to one lane of each listener; this never waits for handlers,
        except on a full ``overflow="block"`` lane. Before ``start()`` it is
        buffered and ``start()`` delivers the backlog in order. With no
        listeners it does nothing.

        Args:
            n: A ``fanout.Add``, ``fanout.Update`` or ``fanout.Delete``.
            sync: True for a resync: only listeners due for resync (see
                ``should_resync``) get it.

        Raises:
            TypeError: ``n`` is no notification, or the codec cannot encode an
                object in it (no listener gets any part of it).
            ListenerFull: A bounded listener with ``overflow="error"`` (or a
                full ``"block"`` one before ``start()``) has no room; no
                listener got it.
            DistributorStopped: After ``stop()`` (during a concurrent stop,
                what reached a listener is counted by that stop).
        """
        plan = self._plan
        if plan.feed is not None and not sync and plan.feed(n):
            return  # the common case, in one native call (fanout.core.plan.Plan.feed)
        if type(n) not in NOTIFICATION_TYPES:
            raise TypeError(
                f"distribute takes fanout.Add, fanout.Update or fanout.Delete, "
                f"not {type(n).__name__}"
            )
        if not plan.listeners:
            self._check_not_stopped()
            return
        # Before start() the rings buffer (bounded ones apply their policy), and
        # start() delivers the backlog in order: distribute never waits for it.
        if sync:
            plan = Plan(tuple(r for r in plan.listeners if r.syncing))
            if not plan.listeners:
                return
        t_ns = time.monotonic_ns()
        self._deliver(plan, n, t_ns, encode_all(self.arena, plan, n, t_ns))

    def _deliver(self, plan: Plan, n: Notification, t_ns: int, payloads: list[bytes]) -> None:
        """Queue ``n`` for ``plan``'s listeners (``fanout.core.plan.deliver``), wake the pump."""
        deliver(self.arena, plan, n, t_ns, payloads)
        self.pump.notify()
        # A stop() that ran meanwhile closed the listeners: whatever reached a
        # ring before that is counted by the stop; the caller learns the rest.
        self._check_not_stopped()

    def _check_not_stopped(self) -> None:
        state = self.state
        if not state.accepting:
            raise DistributorStopped(
                f"distribute() after stop() (the distributor is {state.value}): the "
                f"notification was not delivered (a stop() running at the same time "
                f"accounts for any part it took); build a new Distributor to go on"
            )

    def should_resync(self) -> bool:
        """Recompute which listeners are due for resync, from the clock.

        A listener is due when its resync period is not 0 and its next resync
        time has come; a due listener's next resync moves one period on.

        Returns:
            True if any listener is due (then call ``distribute(n, sync=True)``).
        """
        now = self.clock()
        due = False
        with self.lock:
            for reg in self._listeners:
                reg.syncing = reg.resync_period != 0 and now >= reg.next_resync
                if reg.syncing:
                    due = True
                    reg.next_resync = now + reg.resync_period
        return due

    def mark_synced(self) -> None:
        """Say the producer delivered its initial list, so ``has_synced`` can turn true.

        What each listener was given until now, ``distribute``-d or an
        ``add_listener`` ``initial_list``, is its initial list: its ``has_synced``
        turns true once the handler returned from all of it.
        """
        with self.lock:
            for reg in self._listeners:
                reg.mark_initial()
            self.ctx.producer_synced = True

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Distributor:
        """Start the pump, the supervisor and every listener's workers or thread.

        Waits until every worker's first start succeeded or failed for good
        (they start in parallel), so a handler the workers cannot build is
        reported here.

        Returns:
            This distributor (so ``d = Distributor().start()`` works).

        Accepts the states new (starts) and started (returns at once).

        Raises:
            WorkerStartError: A listener's worker could not build its handler;
                the distributor is stopped.
            DistributorStopped: The distributor is stopping or stopped.
        """
        with self.lock:
            require("start()", self.state, State.NEW, State.STARTED)
            if self.state is State.STARTED:
                return self
            self._pump_thread = threading.Thread(
                target=self.pump.run, name="fanout-pump", daemon=True
            )
            self._pump_thread.start()
            self.supervisor.start()
            self._move(State.STARTED)  # from here on, stop() cleans up whatever started
            listeners = self._listeners
            for reg in listeners:
                self.ctx.begin_start(reg)  # a stop or a removal meanwhile waits for it
        failure = self._start_registered(listeners)
        if failure is not None:  # leave nothing half-started
            reap_discarded()
            self.stop(drain=False)
            raise failure
        return self

    def stop(self, drain: bool = False, timeout: float | None = None) -> bool:
        """Stop every listener and account for every notification.

        Afterwards no worker process, thread, fd or shared memory of this
        distributor remains, and for every listener ``received == delivered +
        dead_lettered + dropped``. Accepts every state: a second call returns
        True at once, and a call made while another runs waits for it.

        Args:
            drain: False drops what is pending (counted in ``dropped``); True
                delivers it first.
            timeout: With ``drain=True``, seconds to wait at most; what is then
                still pending is dead-lettered (``on_dead_letter`` is called).
                What a listener whose workers never started holds is
                dead-lettered either way. A thread cannot be stopped: a thread
                listener's running handler call is waited for, up to
                ``timeout`` if given; one still running then is counted when it
                returns.

        Returns:
            True when nothing pending was dropped or dead-lettered by the stop.

        Raises:
            TypeError: ``drain`` is not a bool or ``timeout`` not a number
                (checked before anything stops).
            ValueError: A negative or infinite ``timeout``.
            RuntimeError: Called from a handler, a callback or fanout's own
                threads (it would wait for itself).
        """
        check_flag("drain", drain)
        check_period("timeout", timeout, allow_none=True)
        if threading.current_thread() in self._own_threads():
            raise RuntimeError(
                f"stop() called from a handler, an on_error / on_dead_letter callback or "
                f"fanout's own threads would wait for itself (the distributor is "
                f"{self.state.value}); call it from another thread, or call "
                f"remove_listener() there"
            )
        with self._stop_lock:  # a second caller waits for the first to finish
            complete, calls = self._stop(drain, timeout)
        # on_dead_letter, in the caller's thread, with no lock held: a callback
        # that calls stop() again gets True at once.
        for call in calls:
            call()
        return complete

    def __enter__(self) -> Distributor:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Drain, even when the block raised an error: what was accepted is
        # delivered. Only an interruption (Ctrl-C, SystemExit) stops at once.
        interrupted = exc_type is not None and not issubclass(exc_type, Exception)
        try:
            complete = self.stop(drain=not interrupted)
        except Exception:
            if exc_type is None:
                raise
            # Never mask the exception that ended the block.
            log.exception("stop() failed while leaving a with block that raised")
            return
        if not complete:
            log.warning(
                "leaving the with block: not every notification was delivered (%s); "
                "see each listener's stats() and on_dead_letter",
                self.describe_losses(),
            )

    def describe_losses(self) -> str:
        """Say what the last ``stop()`` dropped or dead-lettered, per listener.

        Returns:
            ``'name': N dead-lettered, M dropped`` for each listener that lost
            notifications, comma-separated; empty if none did.
        """
        return ", ".join(
            f"listener {name!r}: {dead} dead-lettered, {dropped} dropped"
            for name, dead, dropped in self._stop_losses
        )
