"""The Distributor: client-go's ``sharedProcessor`` with process-isolated listeners.

``distribute`` encodes a notification once, routes it to one lane of every
target listener and appends the bytes to that lane's ring; the native pump
thread writes rings into worker pipes; the supervisor thread keeps workers
alive. docs/design.md draws the picture.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Literal

from fanout.buffers.arena import (
    DEFAULT_SHARED_MIN_BYTES,
    Arena,
    SharedPayload,
    SharedStats,
    default_max_shared_bytes,
)
from fanout.core.lifecycle import State, require, transition
from fanout.core.options import check_flag, check_period, listener_options
from fanout.core.plan import append_rings, put_lane
from fanout.errors import DistributorStopped, WorkerStartError
from fanout.listeners.base import ListenerContext, Registration
from fanout.listeners.process import Lane, ProcessListener, reap_discarded
from fanout.listeners.procs import preload_in_forkserver
from fanout.listeners.ray import RayListener
from fanout.listeners.supervisor import Supervisor
from fanout.listeners.thread import ThreadListener
from fanout.native.pick import Pump, append_all
from fanout.notifications import NOTIFICATION_TYPES, Add, Notification
from fanout.wire.codec import Codec, MsgpackCodec, MsgspecCodec, get_codec

__all__ = ["Distributor"]

log = logging.getLogger("fanout")

Executor = Literal["process", "thread", "ray"]
Overflow = Literal["block", "drop_oldest", "drop_newest", "error"]
StartMethod = Literal["forkserver", "spawn"]
CodecName = Literal["msgpack", "msgspec"]

MIN_RESYNC_PERIOD = 1.0  # client-go's minimumResyncPeriod
REAP_FALLBACK = 2.0  # stop() reaps workers itself when the supervisor has not
FIRST_START_WAIT = 60.0  # start() waits this long at most for first workers to say ready
START_METHODS = ("forkserver", "spawn")
# Each executor is one listener class behind the Registration interface.
LISTENER_KINDS: dict[str, type[Registration]] = {
    "process": ProcessListener,
    "thread": ThreadListener,
    "ray": RayListener,
}
# Not yet stopped: stopped at interpreter exit if the program forgot to, saying
# what that lost (a forgotten start() or stop() must not lose notifications silently).
_running: weakref.WeakSet[Distributor] = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    for d in list(_running):
        d._stop_at_exit()


def effective_resync(requested: float, check: float) -> float:
    """client-go ``determineResyncPeriod``: 0 stays 0; never below the check period."""
    if requested == 0 or check == 0:
        return 0.0
    return max(requested, check)


class _Plan:
    """How ``distribute`` reaches a set of listeners, worked out once per change.

    ``rings``: the rings of single-lane unbounded process listeners (the
    common case: one native call appends to all of them); ``routed``: listeners that
    take payloads but need a lane picked or room checked (``route``, ``check_room``,
    ``put``); ``puts``: listeners that take the notification objects themselves.
    """

    __slots__ = ("encodes", "fast", "listeners", "puts", "rings", "routed", "wire")

    def __init__(self, listeners: tuple[Registration, ...], started: bool = False) -> None:
        self.listeners = listeners
        payloads = [r for r in listeners if r.takes_payloads]
        direct = [(r, r.direct_ring()) for r in payloads]
        # One encode per distinct encoding the listeners need (almost always one).
        # The direct rings all take the first one (one native call appends to them
        # all); a direct listener needing another encoding is routed instead.
        # ``wire[i]``: the index of routed[i]'s encoding.
        encodes: list[Callable[[Notification, int], bytes]] = []
        for r, ring in direct:
            if ring is not None:
                encodes.append(r.encoder())
                break
        direct = [
            (r, ring if ring is not None and r.encoder() == encodes[0] else None)
            for r, ring in direct
        ]
        self.rings = tuple(ring for _, ring in direct if ring is not None)
        # (put, route and check_room differ by kind: typed Any)
        self.routed: tuple[Any, ...] = tuple(r for r, ring in direct if ring is None)
        wire = []
        for r in self.routed:
            if r.encoder() not in encodes:
                encodes.append(r.encoder())
            wire.append(encodes.index(r.encoder()))
        self.encodes = tuple(encodes)
        self.wire = tuple(wire)
        self.puts: tuple[Any, ...] = tuple(
            r.put  # type: ignore[attr-defined]
            for r in listeners
            if not r.takes_payloads
        )
        # Started, and every listener is a plain single-lane process listener.
        self.fast = (
            started
            and bool(self.rings)
            and not self.routed
            and not self.puts
            and len(encodes) == 1
        )


class Distributor:
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
        if start_method == "fork":
            raise ValueError(
                "start_method='fork' is unsafe: the pump and supervisor threads may hold "
                "locks at fork time; use 'forkserver' (default) or 'spawn'"
            )
        if start_method not in START_METHODS:
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        self.codec = get_codec(codec)
        self.arena = self._make_arena(max_shared_bytes, shared_min_bytes)
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
        self._plan = _Plan(())
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
        self._notify = self.pump.notify
        self._shared_encode: Callable[[Notification, int], bytes] | None = None
        if self.arena is not None:  # one object: listeners' encoders are this very one
            self._shared_encode = self.ctx.shared_encode = self.arena.encode
        self._pump_thread: threading.Thread | None = None
        self.supervisor = Supervisor(self.ctx, self.lock, self.supervised_lanes)
        self.ctx.wake_supervisor = self.supervisor.wake
        self.ctx.listener_failed = self._listener_failed
        _running.add(self)

    def _make_arena(self, max_bytes: Any, min_bytes: Any) -> Arena | None:
        """The shared-memory arena, or None (disabled, or a codec that cannot use it)."""
        for opt, value in (("max_shared_bytes", max_bytes), ("shared_min_bytes", min_bytes)):
            if value is None and opt == "max_shared_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{opt} must be an int (bytes), not {value!r}")
            if value < 0:
                raise ValueError(f"{opt} must be >= 0 bytes, got {value}")
        size = default_max_shared_bytes() if max_bytes is None else max_bytes
        if size == 0 or type(self.codec) not in (MsgspecCodec, MsgpackCodec):
            return None
        arena = Arena(size, max(1, min_bytes), pickle.loads(pickle.dumps(self.codec)))
        # A private copy that decodes references in the producer (dead letters,
        # errors): a codec instance passed to two distributors gets one arena each.
        # It encodes inline for the lanes at their share of the arena.
        codec: Codec = pickle.loads(pickle.dumps(self.codec))
        codec._arena = arena
        arena.inline_encode = codec.encode
        self.codec = codec
        return arena

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

    def _move(self, to: State) -> None:
        """Move the lifecycle forward to ``to`` (lock held): the one place it changes."""
        self.ctx.state = transition(self.ctx.state, to)
        if to is State.STARTED:
            self.ctx.ever_started = True

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

        Args:
            handler: A ``fanout.Handler`` (any object with ``on_add``,
                ``on_update`` and ``on_delete``), or a zero-argument class or
                factory that builds one. For process listeners an instance is
                pickled (each worker gets a copy) and a factory is called once
                in each worker; either must be importable by the workers, so
                not defined in a ``__main__`` without a file.
            name: The listener's name in stats, logs and metrics; default
                ``listener-N``.
            workers: Worker processes (lanes) of a process listener. Order is
                kept per key always, and per listener with ``workers=1``.
            executor: ``"process"`` (default): worker processes fed over pipes,
                isolated by the OS. ``"thread"``: one thread in this process,
                fed the objects themselves (cheap, trusted handlers). ``"ray"``:
                ``workers`` Ray actors, on any node of the Ray cluster, fed in
                batches (``pip install 'fanout-informer[ray]'``); fanout uses the
                cluster ``ray.init`` connected to, or starts a local one for the
                distributor's lifetime.
            key: ``obj -> hashable`` choosing the lane of a notification (of the
                new object for an update); default: ``(namespace, name)`` from
                ``obj["metadata"]`` when present, else round-robin.
            resync_period: Seconds between resyncs of this listener (None: the
                distributor's check period; 0: never). Clamped as client-go
                does; ``Registration.resync_period`` tells the result.
            initial_list: Objects delivered to this listener only, as
                ``Add(obj, is_in_initial_list=True)``, before anything live.
            max_pending_bytes: Bound on the bytes one lane holds (process
                listeners): its frames and the shared-memory blocks they refer
                to; None: unbounded (the ring still shrinks back).
            overflow: What a full bounded lane does: ``"block"`` (distribute
                waits; before ``start()`` it raises ``ListenerFull``),
                ``"drop_oldest"``, ``"drop_newest"`` (counted in ``dropped``)
                or ``"error"`` (``distribute`` raises ``ListenerFull`` and no
                listener gets the notification).
            handler_timeout: Seconds a handler call may run before its worker
                is killed and restarted (process listeners); None: no limit.
            max_attempts: Handler calls a notification may kill its worker in
                before it is dead-lettered.
            on_error: ``f(reg, notification, traceback_text)`` called for every
                handler exception, in fanout's supervisor thread (in the
                listener's own thread for ``executor="thread"``).
            on_dead_letter: ``f(reg, notification, reason)`` called for every
                notification given up on; an undecodable frame arrives as a
                ``fanout.RawFrame``.
            schema: A type msgspec decodes into (a ``msgspec.Struct``, a
                dataclass, a ``TypedDict``): the workers decode each object
                straight into it, skipping the fields it does not declare. An
                object that does not fit is dead-lettered at once. Thread
                listeners get ``msgspec.convert(obj, schema)``.
            ray_options: Ray actor options for each worker of a Ray listener
                (``num_cpus``, ``num_gpus``, ``resources``, ``memory``,
                ``runtime_env``, ``scheduling_strategy``, ...), checked by Ray
                here. fanout sets ``max_restarts=-1`` and no task retries
                itself, so those and the options that would break per-key
                order are refused. Only with ``executor="ray"``.
            memory_limit: Bytes of private resident memory (``RssAnon``) a
                worker of a process or Ray listener may hold, what it started
                included; past it the worker is killed within a second and
                restarted, and its notification counts an attempt (dead-lettered
                after ``max_attempts``, naming ``memory_limit``). At least 16
                MiB, and leave room: a fresh worker holds about 25 MiB. A Ray
                listener's limit counts the whole actor process, Ray's runtime
                included: an actor holding more at rest does not start
                (``WorkerStartError``). None: no limit.

        Returns:
            The listener's ``Registration``: pass it to ``remove_listener``,
            ask it for ``stats()`` or ``has_synced()``.

        Raises:
            TypeError: A bad option, a handler that is no handler or cannot be
                pickled (or serialised by Ray), a handler or schema defined in a
                file-less ``__main__``, or a schema msgspec cannot decode into.
            ValueError: An option out of range, or one the executor cannot
                take (``workers``, ``handler_timeout``, ``max_pending_bytes``,
                ``memory_limit`` with ``executor="thread"``; ``ray_options`` without
                ``executor="ray"``, or a Ray option unknown or owned by fanout).
            ImportError: ``executor="ray"`` without Ray installed.
            ListenerFull: The initial list cannot fit ``max_pending_bytes``.
            WorkerStartError: The distributor runs and the listener's first
                worker could not build its handler (the listener is removed).
                From an ``on_error`` / ``on_dead_letter`` callback run by the
                supervisor, which cannot wait for the start it performs, such a
                failure is reported instead (see ``ListenerStats.start_error``).
            DistributorStopped: The distributor is stopping or stopped (it
                accepts new and started).
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
        items = list(initial_list) if initial_list is not None else []
        # From an on_error / on_dead_letter callback (the supervisor's thread) the
        # wait would hold up the very thread that reads "ready": skip it there, and
        # let the supervisor report a failure as it does for any later start.
        awaited = threading.current_thread() is not self.supervisor
        require("add_listener()", self.state, State.NEW, State.STARTED)
        # Built, routed and encoded with no lock held: the key function and the
        # codec's hooks are user code. Nothing else sees the listener until it
        # is published below.
        reg = LISTENER_KINDS[opts.executor](self.ctx, opts)
        try:
            queue_initial = reg.prepare_initial(
                [Add(obj, True) for obj in items], time.monotonic_ns()
            )
        except BaseException:
            with self.lock:
                self._discard(reg)
            raise
        with self.lock:
            try:
                require("add_listener()", self.state, State.NEW, State.STARTED)
                queue_initial()
            except BaseException:
                self._discard(reg)
                raise
            starting = self.started
            if starting:
                reg.start_awaited = awaited
                self.ctx.begin_start(reg)  # a stop from here on waits for it
            else:
                self._set_resync(reg)
                self._publish((*self._listeners, reg))
        if starting:
            self._start_added(reg)
        self.supervisor.wake()
        self.pump.notify()
        if starting and awaited:
            failure = self._first_start_failure([reg])
            if failure is not None:
                self.shutdown_listener(reg, timeout=self.close_grace)
                raise failure
        return reg

    def _start_added(self, reg: Registration) -> None:
        """Start a listener added to a running distributor, then publish it.

        The start runs with no lock held; a stop that began meanwhile waited for
        it, and the listener is then discarded, never published.
        """
        failure = self._start_unlocked(reg)
        with self.lock:
            if failure is None and not self.state.accepting:
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
            if self.started:
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
        self._plan = _Plan(live, self.started and not self.stopping)
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
        if type(n) not in NOTIFICATION_TYPES:
            raise TypeError(
                f"distribute takes fanout.Add, fanout.Update or fanout.Delete, "
                f"not {type(n).__name__}"
            )
        plan = self._plan
        if plan.fast and not sync:  # the common case, kept short
            t_ns = time.monotonic_ns()
            payload: bytes = plan.encodes[0](n, t_ns)
            if type(payload) is bytes:
                if append_all(plan.rings, payload) < len(plan.rings):
                    self._check_not_stopped()  # a ring was closed under us
                self._notify()
                return
            self._deliver(plan, n, t_ns, [payload])
            return
        if not plan.listeners:
            self._check_not_stopped()
            return
        # Before start() the rings buffer (bounded ones apply their policy), and
        # start() delivers the backlog in order: distribute never waits for it.
        if sync:
            plan = _Plan(tuple(r for r in plan.listeners if r.syncing))
            if not plan.listeners:
                return
        t_ns = time.monotonic_ns()
        payloads: list[bytes] = []
        try:
            for encode in plan.encodes:
                payloads.append(encode(n, t_ns))
        except BaseException:  # a later encoding failed: free what the arena took
            for p in payloads:
                if type(p) is SharedPayload and self.arena is not None:
                    self.arena.unhold(p.blocks)
            raise
        self._deliver(plan, n, t_ns, payloads)

    def _deliver(self, plan: _Plan, n: Notification, t_ns: int, payloads: list[bytes]) -> None:
        """Queue ``n``, encoded once per encoding (``payloads``), for ``plan``'s listeners.

        A ``SharedPayload``'s blocks get one share per ring that takes it (the
        others take it inline: ``fanout.core.plan``), and lose the producer's own
        when this returns.
        """
        shared = [p for p in payloads if type(p) is SharedPayload]
        try:
            routed = plan.routed
            lanes: list[Any] = []
            if routed:
                # Route and check room first: a key function that raises, or a
                # bounded listener without room (overflow="error"), stops the call
                # before any listener got anything, or counted anything.
                lanes = [r.route(n) for r in routed]
                for r, lane, i in zip(routed, lanes, plan.wire, strict=True):
                    if r.max_pending_bytes is not None:
                        r.check_room(lane, payloads[i])
            if plan.rings:
                append_rings(self.arena, plan.rings, payloads[0])
            for r, lane, i in zip(routed, lanes, plan.wire, strict=True):
                put_lane(self.arena, r, lane, payloads[i])
            if plan.puts:
                item = (n, t_ns)
                for put in plan.puts:
                    put(item)
        finally:
            for payload in shared:
                assert self.arena is not None
                self.arena.unhold(payload.blocks)  # a block no ring took is freed here
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
        """Say the producer delivered its initial list, so ``has_synced`` can turn true."""
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
        failure: BaseException | None = None
        for reg in listeners:  # after a failure, the others' starts only end
            failure = self._start_unlocked(reg, run=failure is None) or failure
        if failure is None:
            with self.lock:
                if self.state.accepting:
                    self._publish(self._listeners)
        if failure is None:
            self.supervisor.wake()
            self.pump.notify()
            failure = self._first_start_failure(listeners)
        if failure is not None:  # leave nothing half-started
            reap_discarded()
            self.stop(drain=False)
            raise failure
        return self

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
        deadline = time.monotonic() + FIRST_START_WAIT
        delay = 0.0005
        while any(lane.first_start for lane in lanes):
            if time.monotonic() >= deadline:
                log.warning(
                    "start(): workers still starting after %.0f s; going on without "
                    "waiting for them",
                    FIRST_START_WAIT,
                )
                with self.lock:  # nobody waits now: later failures are reported as usual
                    for lane in lanes:
                        lane.first_start = False
                        # so a start that fails for good later is reported and
                        # dead-lettered by the supervisor, not retried forever
                        lane.listener.start_awaited = False
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
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

    def supervised_lanes(self) -> list[Lane]:
        """List the lanes the supervisor watches (lock held); for fanout's supervisor.

        Returns:
            Every listener's lanes, and removed listeners' lanes until their
            workers are reaped.
        """
        closing = [r for r in self._closing if not r.exited()]
        for reg in self._closing:
            if reg not in closing:
                reg.release()
        self._closing = closing
        lanes: list[Lane] = []
        for reg in (*self._listeners, *closing):
            lanes.extend(reg.supervised_lanes())
        return lanes

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
        grace = self.close_grace
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
        never = "" if self.started else ", as start() was never called"
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
        with self.lock:
            state = self.state
            if state is State.STOPPED:
                return True, []
            was_started = self.started
            resumed = state is State.CLOSING  # an earlier stop() was interrupted midway
            if state.accepting:
                # Nothing new from here on: distribute, add_listener and start()
                # refuse, so a drain ends even while a producer keeps producing.
                self._move(State.DRAINING if was_started and drain else State.CLOSING)
                for reg in self._listeners:
                    reg.close_input()
        if drain and self.state is State.DRAINING:
            self._wait_drained(timeout)
        with self.lock:
            if self.state is State.DRAINING:
                self._move(State.CLOSING)
            # Worker starts run with no lock held: the ones under way end first,
            # and none begins from here on (CLOSING).
            if not self.ctx.wait_starts(self.close_grace if at_exit else None):
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
        calls: list[Callable[[], None]] = []
        if was_started:
            calls += self._reap(listeners, timeout, at_exit)
        # Every listener's queue is final now: count what is left.
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
        with self.lock:
            self._move(State.STOPPED)
            for reg in self._closing:
                reg.release()
            self._closing = []
            if self.arena is not None:  # the workers are gone and the rings settled
                self.arena.close()
        _running.discard(self)
        self._shutdown_threads(was_started, self.close_grace if at_exit else None)
        with self.ctx.ray_lock:
            if self.ctx.ray_cluster is not None:  # after the listeners: their actors are gone
                self.ctx.ray_cluster.detach()
        return lost == 0, calls

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
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        # A listener whose worker keeps failing to start can never drain: do not
        # wait for it forever (its frames are dropped by the stop, and stop says so).
        while not all(r.drained() or r.stuck() for r in self._listeners):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.001)
        return all(r.drained() for r in self._listeners)

    def _reap(
        self, listeners: tuple[Registration, ...], timeout: float | None, at_exit: bool = False
    ) -> list[Callable[[], None]]:
        """Wait for workers and threads to leave; kill workers past the grace.

        A thread cannot be killed: a thread listener's running call is waited
        for (up to ``timeout`` if given), so that what it leaves is counted; at
        exit it is not waited for at all. Returns the reports a fallback reap
        collected, to make after the lock.
        """
        deadline = time.monotonic() + min(1.0, self.close_grace)
        self.supervisor.wake()
        calls: list[Callable[[], None]] = []
        while True:
            with self.lock:
                lanes = [lane for r in self._closing for lane in r.supervised_lanes() if lane.proc]
                if not lanes:
                    break
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
            time.sleep(0.002)
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

    def _shutdown_threads(self, was_started: bool, timeout: float | None = None) -> None:
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
