"""What every kind of listener is toward its distributor, and what it may see of it.

A ``Registration`` is the handle ``Distributor.add_listener`` returns and the one
interface the distributor drives: ``start``, ``close_input``, ``close``,
``discard``, ``settle``, ``release`` and the questions ``drained``, ``exited``,
``stuck``. Each kind lives in its own module of this folder: ``process`` (worker
processes fed over pipes), ``thread`` (one thread in this process) and ``ray``
(Ray actors); the first and the last share ``lanes`` (lanes of frame rings and
their overflow policies).

A listener sees its distributor only through a ``ListenerContext``: the codec,
the pump, how workers start, and a few flags the distributor sets. Nothing here
imports the distributor, so dependencies run one way.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from fanout.core.lifecycle import State
from fanout.core.options import ListenerOptions, check_period
from fanout.core.poll import poll_until
from fanout.listeners.errorlog import error_log
from fanout.notifications import Add, Notification, RawFrame
from fanout.stats import ListenerStats, percentile
from fanout.wire.codec import Codec

__all__ = ["ListenerContext", "Registration", "decode_or_raw"]

log = logging.getLogger("fanout")


class ListenerContext:
    """What a listener may use of its distributor.

    The distributor builds one and hands it to each listener it creates; it
    alone sets the flags (``started``, ``stopping``, ``producer_synced``).
    ``pump`` feeds process lanes' pipes; ``ray_cluster`` and ``ray_store`` are
    what the distributor's Ray listeners share (the Ray cluster handle, and the
    big buffers put into Ray's object store), made by the first Ray listener
    that needs them; the distributor's stop detaches the cluster. ``lock`` is
    the distributor's lock (a fresh one when None), which worker starts take
    only to attach what they started.
    """

    def __init__(
        self,
        codec: Codec,
        codec_blob: bytes,
        start_method: str,
        mp_context: Any,
        pump: Any,
        close_grace: float,
        wake_supervisor: Callable[[], None] = lambda: None,
        arena: Any = None,
        listener_failed: Callable[[Registration, str], list[Callable[[], None]]] | None = None,
        lock: Any = None,
    ) -> None:
        self.codec = codec
        # How the distributor encodes a notification for the listeners that take
        # payloads (one encode for all of them); a kind with its own wire says so
        # in ``Registration.encoder``.
        self.encode: Callable[[Notification, int], bytes] = codec.encode
        self.codec_blob = codec_blob  # the codec pickled once, for every worker
        self.start_method = start_method
        self.mp_context = mp_context
        self.pump = pump
        self.wake_supervisor = wake_supervisor
        # ``(reg, why) -> calls``: a listener nobody waited for could not start;
        # the distributor takes it out of distribution (its lock held by the caller
        # or taken), and returns the reports to make without any lock.
        self.listener_failed = listener_failed or (lambda reg, why: [])
        self.close_grace = close_grace  # seconds a closed worker gets to leave
        # The distributor's lifecycle state (``fanout.core.lifecycle``); only the
        # distributor moves it, listeners read it through the properties below.
        self.state = State.NEW
        self.ever_started = False
        self.producer_synced = False
        self.ray_cluster: Any = None
        # The shared-memory arena (``fanout.buffers.arena.Arena``) big buffers travel
        # through to listeners that map it, or None when disabled.
        self.arena = arena
        # The distributor's encode with big buffers moved into the arena (None
        # without one): the encoding of listeners that map it.
        self.shared_encode: Callable[[Notification, int], bytes] | None = None
        self.ray_store: Any = None  # big buffers in Ray's object store (fanout.buffers.ray_store)
        # Guards ray_cluster and ray_store: listeners are built, and Ray started,
        # with no distributor lock held (ray.init takes seconds).
        self.ray_lock = threading.Lock()
        # The distributor's lock, and the starts in flight under none: a worker
        # start (a process start, ray.init, creating actors) is a blocking wait,
        # so it runs with no lock held. ``begin_start`` / ``end_start`` bracket
        # it (lock held); a removal meanwhile is finished by ``end_start``, and
        # a stop waits for ``starts`` to reach 0 before it closes anything.
        self.lock: Any = threading.RLock() if lock is None else lock
        self.starts = 0
        self.starts_done = threading.Condition(self.lock)
        self.discard_removed: Callable[[Registration], None] = lambda reg: None
        # Every thread fanout started for the distributor (its own, and the
        # listeners', removed ones too): they run handlers and callbacks, and a
        # stop() from one of them is refused rather than left to wait for itself.
        self.threads: weakref.WeakSet[threading.Thread] = weakref.WeakSet()

    @property
    def started(self) -> bool:
        """``start()`` ran (true after ``stop()`` too)."""
        return self.ever_started

    @property
    def stopping(self) -> bool:
        """Workers are being (or were) stopped: no restarts, nothing waits for them."""
        return self.state in (State.CLOSING, State.STOPPED)

    def begin_start(self, reg: Registration) -> None:
        """Note a start of ``reg``'s workers about to run with no lock held (lock held)."""
        reg.starting += 1
        self.starts += 1

    def end_start(self, reg: Registration) -> None:
        """Note that start ended (lock held); a removal that came meanwhile is done now."""
        reg.starting -= 1
        self.starts -= 1
        if not reg.starting and reg.discard_pending:
            reg.discard_pending = False
            self.discard_removed(reg)
        self.starts_done.notify_all()

    def wait_starts(self, timeout: float | None = None) -> bool:
        """Wait (lock held, released meanwhile) until no start runs; False on timeout."""
        return self.starts_done.wait_for(lambda: self.starts == 0, timeout)


class Registration:
    """One listener of a ``Distributor``: the handle ``add_listener`` returns.

    Not built directly. Pass it to ``remove_listener`` / ``shutdown_listener``;
    it stays usable after both and after ``stop()`` (``stats()`` then shows the
    final counts). It cannot be pickled: it belongs to the producer's process.

    Attributes:
        name: The listener's name (given to ``add_listener``, or generated).
        executor: ``"process"``, ``"thread"`` or ``"ray"``.
        workers: Number of worker processes (1 for a thread listener).
        resync_period: The resync period in force, in seconds, after client-go's
            clamping rules; 0 means never.
        opts: The options ``add_listener`` checked, as a frozen
            ``fanout.core.options.ListenerOptions``.
    """

    executor = "?"

    thread: threading.Thread | None = None  # one that runs handlers or feeds them
    lanes: Sequence[Any] = ()  # what start() waits for: each has first_start, start_error

    def __init__(self, ctx: ListenerContext, opts: ListenerOptions) -> None:
        self.ctx = ctx
        self.opts = opts
        self.name = opts.name
        self.workers = opts.workers
        self.requested_resync: float | None = opts.resync_period
        self.resync_period: float = 0.0
        self.next_resync = 0.0
        self.syncing = True  # client-go: a new listener is a syncing listener
        self.key: Callable[[Any], Hashable] | None = opts.key
        self.on_error = opts.on_error
        self.on_dead_letter = opts.on_dead_letter
        self.max_attempts = opts.max_attempts
        self.handler_timeout = opts.handler_timeout
        self.max_pending_bytes = opts.max_pending_bytes
        self.overflow = opts.overflow
        self.removed = False
        self.dropped = 0
        self.dead_lettered = 0
        # The producer, the supervisor, a stop and a listener's own thread count
        # for it at once: += is no atomic step, so every count takes this lock.
        self._count_lock = threading.Lock()
        self.restarts = 0
        # Accepted but never queued (dropped on arrival): received counts them too.
        self.unqueued = 0
        # Set by stop() for the listeners it settles itself (with its reason).
        self.stop_settles = False
        self.settled_count = 0  # notifications settle() dropped or dead-lettered
        # Someone waits for the first start (start(), add_listener) and raises its
        # failure; otherwise the distributor reports it (``ctx.listener_failed``).
        self.start_awaited = True
        # Why the listener could not start, when nobody waited for it: it is out
        # of distribution and what it held is dead-lettered with this reason.
        self.start_error: str | None = None
        # Starts of its workers running with no lock held (``ListenerContext.begin_start``),
        # and a removal that waits for them to end before it closes the listener.
        self.starting = 0
        self.discard_pending = False

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"<Registration {self.name!r} {self.executor} workers={self.workers} {state}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Registration belongs to its Distributor's process; it cannot be pickled"
        )

    # -- sync ------------------------------------------------------------------------

    def has_synced(self) -> bool:
        """Tell whether this listener has caught up with the initial state.

        Returns:
            True once the producer called ``Distributor.mark_synced()`` and the
            handler returned from every initial-list add it was given (one that
            raised or was dead-lettered counts as finished). A removed listener
            counts as finished too.
        """
        if not self.ctx.producer_synced:
            return False
        if self._initial_done():
            return True
        self.catch_up()  # what the workers finished since: only then can the answer change
        return self._initial_done()

    def mark_initial(self) -> None:
        """Count everything this listener was given so far as initial list (``mark_synced``).

        The producer's initial list may come through ``distribute`` (as an
        informer's does): ``has_synced`` then waits for the handler to return
        from all of it, as from an ``initial_list`` given to ``add_listener``.
        """

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until ``has_synced()`` is true.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            True when synced, False when the timeout passed first.

        Raises:
            TypeError: ``timeout`` is not a number or None.
            ValueError: A negative or infinite ``timeout``.
        """
        return poll_until(self.has_synced, check_period("timeout", timeout, allow_none=True))

    def _initial_done(self) -> bool:
        raise NotImplementedError

    def ready(self) -> bool:
        """Tell whether the listener runs.

        Returns:
            True when every worker (or the thread) has started and loaded its
            handler; False before ``start()``, while a worker restarts, and after
            the listener stopped.
        """
        raise NotImplementedError

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until ``ready()`` is true.

        Args:
            timeout: Seconds to wait at most; None waits as long as it takes.

        Returns:
            True when ready, False when the timeout passed first.

        Raises:
            TypeError: ``timeout`` is not a number or None.
            ValueError: A negative or infinite ``timeout``.
        """
        return poll_until(self.ready, check_period("timeout", timeout, allow_none=True))

    def latency_histogram(self) -> list[int]:
        """Return the latency histogram behind the ``stats()`` percentiles.

        Returns:
            Counts of handler calls per bucket of time from ``distribute`` to
            handler start, all workers summed; ``fanout.stats.bucket_of`` maps a
            latency in nanoseconds to its bucket (4 buckets per octave).
        """
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """The executor-specific part of ``stats()``, as of the last ``catch_up``."""
        raise NotImplementedError

    def catch_up(self) -> None:
        """Let go of what the consumers finished; the reads (``counters``, ``drained``) see it.

        A kind whose progress needs no collecting keeps this no-op.
        """

    def worker_pids(self) -> list[int]:
        """Return the process ids of the running workers.

        Returns:
            One pid per running worker; empty for a thread listener.
        """
        return []

    def stuck(self) -> bool:
        """Tell whether a worker keeps failing to start (so nothing drains)."""
        return False

    # -- producer side, driven by distribute -----------------------------------------

    # True: the listener takes encoded payloads, routed to a lane (``route``,
    # ``check_room``, ``put(lane, payload)``); False: it takes the notification
    # objects themselves (``put((n, t_ns))``).
    takes_payloads = True
    # True: its workers map the distributor's shared-memory arena, so payloads may
    # refer to blocks in it; False: it gets big buffers inline.
    maps_shared_memory = False

    def encoder(self) -> Callable[[Notification, int], bytes]:
        """The encoding this listener's payloads need; listeners sharing one share the bytes."""
        # A schema decodes fields by their declared type (a bytes field refuses a
        # reference), so schema listeners get big buffers inline.
        if self.maps_shared_memory and self.opts.schema is None:
            if self.ctx.shared_encode is not None:
                return self.ctx.shared_encode
        return self.ctx.encode

    def direct_ring(self) -> Any:
        """The one ring every payload goes to as is, or None (route and ``put`` instead)."""
        return None

    def feed_route(self) -> tuple[tuple[Any, ...], Any, Any] | None:
        """``(rings, router, after)`` for ``fanout.native.pick.Feed`` to route and put as this
        listener does, or None when only its own ``route`` and ``put`` will do."""
        return None

    def queue_initial(self, adds: list[Add], t_ns: int) -> None:
        """Queue the initial list before anything live (distributor lock held).

        Raises:
            TypeError: The codec cannot encode an item (nothing was queued).
            ListenerFull: It cannot fit the listener's bound.
        """
        raise NotImplementedError

    def prepare_initial(self, adds: list[Add], t_ns: int) -> Callable[[], None]:
        """Do the initial list's user code now, with no lock held; queue it later.

        A kind that runs a key function or codec hooks on the items does so
        here (the listener is not published yet, so nothing else touches it).

        Returns:
            What queues the prepared items, called with the distributor's lock
            held; it runs no user code.

        Raises:
            TypeError: The codec cannot encode an item (nothing was queued).
            ListenerFull: It cannot fit the listener's bound.
        """
        return lambda: self.queue_initial(adds, t_ns)

    # -- lifecycle, driven by the distributor (its lock held, but for start) --------

    def start(self) -> None:
        """Start the workers or the thread, with no lock held.

        The distributor brackets it with ``ctx.begin_start`` / ``ctx.end_start``:
        meanwhile nothing closes, discards or stops the listener. What it
        changes that others read (lanes, threads) it changes under ``ctx.lock``.
        """
        raise NotImplementedError

    def mark_removed(self, by_stop: bool = False) -> None:
        """Record that the listener is no longer registered.

        ``by_stop``: the distributor's stop settles it, with the stop's reason.
        """
        self.removed = True
        if by_stop:
            self.stop_settles = True

    def discard(self) -> bool:
        """Close the listener for good after its removal, dropping what it holds.

        Returns:
            True when workers are still leaving: the distributor calls
            ``release`` once ``exited`` (the supervisor reaps them meanwhile).
        """
        self.close(drain=False)
        self.settle(None)  # what it had not handled is dropped, as client-go does
        return False

    def wait_exited(self, timeout: float | None) -> bool:
        """Wait until every worker or the thread has ended; False if ``timeout`` passed."""
        return self.exited()

    def supervised_lanes(self) -> list[Any]:
        """The lanes whose worker processes fanout's supervisor keeps alive."""
        return []

    def close(self, drain: bool = False) -> None:
        """Stop taking notifications and ask the workers or the thread to leave."""
        raise NotImplementedError

    def close_input(self) -> None:
        """Take no more notifications; what is queued is still handled."""
        raise NotImplementedError

    def exited(self) -> bool:
        """Tell whether every worker or the thread has ended."""
        raise NotImplementedError

    def release(self) -> None:
        """Free what outlives the workers (shared memory)."""

    def drained(self) -> bool:
        """Tell whether everything queued was handled."""
        raise NotImplementedError

    def never_started(self) -> bool:
        """Tell whether no worker of this listener ever became ready."""
        return False

    def settle(self, reason: str | None) -> list[Callable[[], None]]:
        """Account for what is still queued once nothing handles it any more.

        With ``reason`` None it is dropped (counted in ``dropped``); otherwise it
        is dead-lettered with that reason. ``settled_count`` grows by how many.
        Returns the ``on_dead_letter`` calls to make, outside the distributor's
        lock.
        """
        raise NotImplementedError

    def _count(self, dropped: int = 0, dead_lettered: int = 0, unqueued: int = 0) -> None:
        """Add to the listener's counts, from any thread."""
        with self._count_lock:
            self.dropped += dropped
            self.dead_lettered += dead_lettered
            self.unqueued += unqueued

    def _settle_items(self, items: list[Any], reason: str | None) -> list[Callable[[], None]]:
        """Count ``items`` (payloads or notifications) as dropped or dead-lettered."""
        if not items:
            return []
        self.settled_count += len(items)
        if reason is None:
            self._count(dropped=len(items))
            return []
        self._count(dead_lettered=len(items))
        # One log line for them all (not one per item); on_dead_letter per item.
        log.warning(
            "listener %r: %d notifications dead-lettered: %s", self.name, len(items), reason
        )
        return [
            functools.partial(self.dead_letter_item, item, reason, quiet=True) for item in items
        ]

    def dead_letter_item(self, item: Any, reason: str, quiet: bool = False) -> None:
        """Report ``item`` (a notification or an encoded payload) as dead-lettered.

        ``quiet``: call ``on_dead_letter`` only (the caller logged a summary).
        """
        item = self.decoded(item)
        if quiet:
            self._callback(self.on_dead_letter, item, reason)
        else:
            self.report_dead_letter(item, reason)

    def decoded(self, item: Any) -> Any:
        """``item`` as a notification: a payload decoded (a ``RawFrame`` if it cannot be)."""
        if isinstance(item, (bytes, bytearray)):
            kept = getattr(item, "kept", None)  # a KeptPayload: its arena blocks copied
            if kept is not None and self.ctx.arena is not None:
                with self.ctx.arena.reading(kept):
                    return decode_or_raw(self.ctx.codec, item)
            return decode_or_raw(self.ctx.codec, item)
        return item

    def start_failure(self) -> str:
        """Why what this listener holds is dead-lettered once it could not start."""
        return f"the listener could not start: {self.start_error}"

    def stats(self) -> ListenerStats:
        """Return a snapshot of this listener's counters.

        Cheap (no system call), safe from any thread, and valid after ``stop()``.

        Returns:
            The counters and latency percentiles at the time of the call.
        """
        hist = self.latency_histogram()
        self.catch_up()
        return ListenerStats(
            name=self.name,
            executor=self.executor,
            workers=self.workers,
            dropped=self.dropped,
            dead_lettered=self.dead_lettered,
            restarts=self.restarts,
            latency_p50=percentile(hist, 0.5),
            latency_p99=percentile(hist, 0.99),
            latency_max=percentile(hist, 1.0),
            start_error=self.start_error,
            **self.counters(),
        )

    # -- reporting (called outside the distributor's lock) ---------------------------

    def report_error(self, n: Notification | RawFrame | None, text: str) -> None:
        """Log a handler exception (repeats summarised) and pass it to ``on_error``."""
        error_log.report(self.ctx, self.name, n, text, self.ctx.wake_supervisor)
        self._callback(self.on_error, n, text)

    def report_dead_letter(self, n: Notification | RawFrame | None, reason: str) -> None:
        """Log a dead-lettered notification and pass it to ``on_dead_letter``."""
        log.warning("listener %r: dead-lettered %r: %s", self.name, n, reason)
        self._callback(self.on_dead_letter, n, reason)

    def _callback(self, func: Callable[..., Any] | None, n: Any, text: str) -> None:
        if func is None:
            return
        try:
            func(self, n, text)
        except BaseException:  # even SystemExit: the supervisor must go on
            log.exception("listener %r: callback %r raised", self.name, func)


def decode_or_raw(codec: Codec, payload: bytes | bytearray) -> Notification | RawFrame:
    """Decode ``payload`` with ``codec``, or wrap it in a ``RawFrame`` saying why it cannot be.

    The codec may run user code (a custom unpack, an ext_hook): call it with no
    lock held.
    """
    try:
        n: Notification = codec.decode(payload)[0]
    except Exception as exc:
        return RawFrame(bytes(payload), f"cannot be decoded: {exc!r}")
    return n
