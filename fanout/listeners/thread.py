"""Thread listeners: a handler in one thread of the producer's process.

The notification objects themselves are queued (no codec, no copy) in an object
``Ring`` that the listener's thread empties in batches: for cheap, trusted
handlers. A schema, when given, is applied with ``msgspec.convert``.
"""

from __future__ import annotations

import operator
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from fanout.core.options import ListenerOptions
from fanout.handlers import build_handler
from fanout.listeners.base import ListenerContext, Registration
from fanout.native.pick import Ring
from fanout.notifications import Add, Delete, Notification, Update
from fanout.stats import bucket_of
from fanout.wire.protocol import NBUCKETS
from fanout.wire.schema import misfit_text, schema_converter

__all__ = ["ThreadListener"]


class ThreadListener(Registration):
    """A listener whose handler runs in one in-process thread fed from a ``Ring``.

    The notification objects themselves are passed (no copy, no codec): for
    cheap, trusted handlers.
    """

    executor = "thread"

    takes_payloads = False

    def __init__(self, ctx: ListenerContext, opts: ListenerOptions) -> None:
        super().__init__(ctx, opts)
        self.handler = build_handler(opts.handler, opts.is_factory)
        self.schema = opts.schema
        self.to_schema: Callable[[Any], Any] | None = None
        self.misfit: type[Exception] = Exception
        if self.schema is not None:
            import msgspec  # add_listener checked it is installed

            self.to_schema = schema_converter(self.schema)
            self.misfit = msgspec.ValidationError
        self.ring = Ring(0, 16)
        self.cond = threading.Condition(threading.Lock())
        self.waiting = False
        self.stopping = False
        self.discarding = False  # stopping without a drain: handle nothing more
        self.leftover: list[Any] = []  # taken from the ring, then discarded: for settle
        self.settled = False  # settle() ran: the thread accounts for what it still holds
        self.final_reason: str | None = None
        # The batch the thread works through. Each item is taken exactly once,
        # by the thread or by settle(): next() on a list iterator is atomic.
        self.batch_it: Iterator[tuple[Notification, int]] = iter(())
        self.in_call = False  # the thread is inside a handler call
        self.received = 0
        self.delivered = 0
        self.errors = 0
        # Items finished (handled, raised or refused by the schema), and how many
        # of the items received must be finished for the initial list (mark_initial).
        self.finished = 0
        self.sync_target = 0
        self.hist = [0] * NBUCKETS
        self.thread = None

    def put(self, item: tuple[Notification, int]) -> None:
        """Queue ``(notification, t_ns)`` for the thread (nothing once it is closed)."""
        with self.cond:
            if self.stopping:
                return
            self.ring.write_one(item)
            self.received += 1
            if self.waiting:
                self.cond.notify()

    def queue_initial(self, adds: list[Add], t_ns: int) -> None:
        """Queue the initial list (counted for ``has_synced``)."""
        for n in adds:
            self.put((n, t_ns))
        self.mark_initial()  # queued before anything live: all it received so far

    def start(self) -> None:
        """Start the thread (no lock held)."""
        thread = threading.Thread(target=self._run, name=f"fanout-{self.name}", daemon=True)
        with self.ctx.lock:  # stop() reads them to refuse a call from its own threads
            self.thread = thread
            self.ctx.threads.add(thread)
        thread.start()

    def close(self, drain: bool = False) -> None:
        """Take nothing more; the thread leaves after what is queued, if ``drain``.

        Without ``drain`` it leaves after the call it is in; what it leaves
        behind is counted by ``settle``.
        """
        with self.cond:
            self.stopping = True
            self.discarding = not drain
            self.cond.notify()

    def close_input(self) -> None:
        """Take no more notifications; the thread handles those queued, then leaves."""
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def settle(self, reason: str | None) -> list[Callable[[], None]]:
        """Account for the notifications still queued."""
        with self.cond:
            self.stopping = self.discarding = True
            self.settled, self.final_reason = True, reason
            left, self.leftover = self.leftover, []
            left += [item[0] for item in self.batch_it]  # what the thread has not taken
            while True:
                item, ok = self.ring.read_one()
                if not ok:
                    break
                left.append(item[0])
            self.cond.notify()
        return self._settle_items(left, reason)

    def exited(self) -> bool:
        """Tell whether the thread has ended (or never started)."""
        return self.thread is None or not self.thread.is_alive()

    def wait_exited(self, timeout: float | None) -> bool:
        """Wait for the thread: the call it is in cannot be stopped, only awaited."""
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        return self.exited()

    def drained(self) -> bool:
        """Tell whether everything queued was handled."""
        with self.cond:
            return (
                len(self.ring) == 0
                and operator.length_hint(self.batch_it) == 0
                and not self.in_call
            )

    def _initial_done(self) -> bool:
        if self.removed:  # nothing more comes
            return True
        return self.finished >= self.sync_target

    def mark_initial(self) -> None:
        """Every item received so far belongs to the initial list (handled in order)."""
        with self.cond:
            self.sync_target = max(self.sync_target, self.received)

    def ready(self) -> bool:
        """Tell whether the thread has started."""
        return self.thread is not None and self.thread.is_alive()

    def latency_histogram(self) -> list[int]:
        """Counts per latency bucket (``fanout.stats.bucket_of``)."""
        return list(self.hist)

    def _run(self) -> None:
        ring, cond, handler = self.ring, self.cond, self.handler
        on_add, on_update, on_delete = handler.on_add, handler.on_update, handler.on_delete
        hist = self.hist
        monotonic_ns = time.monotonic_ns
        while True:
            batch: list[tuple[Any, int]] = []  # (notification, t_ns)
            with cond:
                while not len(ring) or self.discarding:
                    if self.stopping:
                        return
                    self.waiting = True
                    cond.wait()
                    self.waiting = False
                while len(batch) < 256:
                    item, ok = ring.read_one()
                    if not ok:
                        break
                    batch.append(item)
                self.batch_it = it = iter(batch)
            while True:
                # Flagged before the item is taken, so drained() never sees an
                # item that is neither in the batch nor in a call.
                self.in_call = True
                item = next(it, None)
                if item is None:
                    self.in_call = False
                    break
                n, t_ns = item
                if self.discarding:  # stopped: n and the rest are settled, not handled
                    self._give_back(n)
                    self.in_call = False
                    break
                hist[bucket_of(monotonic_ns() - t_ns)] += 1
                typed = n if self.to_schema is None else self._typed(n)
                if typed is not None:
                    cls = type(typed)
                    try:
                        if cls is Update:
                            on_update(typed.old, typed.new)  # type: ignore[union-attr]
                        elif cls is Add:
                            on_add(typed.obj, typed.is_in_initial_list)  # type: ignore[union-attr]
                        else:
                            on_delete(typed.obj)  # type: ignore[union-attr]
                    except BaseException:  # even SystemExit: the listener must go on
                        self.errors += 1
                        self.report_error(n, traceback.format_exc())
                    self.delivered += 1
                self.finished += 1  # this thread alone writes it
                self.in_call = False

    def _give_back(self, n: Notification) -> None:
        """Account for ``n`` and the rest of the batch: settle() did or will."""
        with self.cond:
            rest = [n, *(item[0] for item in self.batch_it)]
            if self.settled:
                calls = self._settle_items(rest, self.final_reason)
            else:
                self.leftover.extend(rest)
                calls = []
        for call in calls:
            call()

    def _typed(self, n: Notification) -> Notification | None:
        """``n`` with its objects converted to the schema; None (dead-lettered) on a misfit.

        As in a worker: an object that does not fit never will, so it is not retried.
        """
        convert = self.to_schema
        assert convert is not None
        role = "object"
        try:
            if type(n) is Update:
                if n.old is n.new:
                    obj = convert(n.new)
                    return Update(obj, obj)
                role = "old object"
                old = convert(n.old)
                role = "new object"
                return Update(old, convert(n.new))
            if type(n) is Add:
                return Add(convert(n.obj), n.is_in_initial_list)
            return Delete(convert(n.obj))  # type: ignore[union-attr]
        except self.misfit as exc:
            self._count(dead_lettered=1)
            self.report_dead_letter(n, misfit_text(self.schema, role, str(exc)))
            return None
        except Exception as exc:  # the schema's own code raised (__post_init__, ...)
            self._count(dead_lettered=1)
            self.report_dead_letter(
                n, misfit_text(self.schema, role, f"building it raised {exc!r}")
            )
            return None

    def counters(self) -> dict[str, int]:
        """Pending items, handled and failed calls (no bytes: objects are passed)."""
        return {
            "received": self.received,
            "pending": len(self.ring) + operator.length_hint(self.batch_it) + self.in_call,
            "pending_bytes": 0,
            "capacity_bytes": 0,
            "delivered": self.delivered,
            "errors": self.errors,
        }
