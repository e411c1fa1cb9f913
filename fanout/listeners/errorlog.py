"""Handler errors in the log: each distinct error once in full, then counts of repeats.

A handler that fails on every notification would otherwise print a traceback
per notification. ``ErrorLog.report`` logs the first error of each kind per
listener in full, where the kind is the exception type plus the innermost frame
it was raised from (file, line, function), so one bug is one kind even when its
message names a different object each time. Repeats are counted; once
``interval`` seconds have passed since the kind was last logged, one record says
how many came (``ValueError in listener 'x': 102 more in the last 10 s ...``). A
kind that stays quiet for a whole interval is forgotten, so its next occurrence
is logged in full again.

The summaries are written by whoever comes first: the next report, or the
supervisor thread, which calls ``flush`` on each of its ticks and a final
``flush(..., final=True)`` when its distributor stops. ``on_error`` callbacks are
not affected: the listener calls them for every error.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ErrorLog", "error_kind", "error_log"]

log = logging.getLogger("fanout")

SUMMARY_INTERVAL = 10.0  # seconds between two summaries of one kind of error
REPR_LIMIT = 300  # characters of a notification's repr in a log record

_FRAME = re.compile(r'^\s+File "(?P<file>[^"]*)", line (?P<line>\d+), in (?P<func>.+)$')
_EXCEPTION = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::\s?(?P<message>.*))?$")
_NUMBER = re.compile(r"\d+")


def error_kind(text: str) -> tuple[str, str, str]:
    """Return ``(type, where, last line)`` of an error text, what makes two errors alike.

    For a traceback: the exception type and its innermost frame
    (``file:line in func``). For other text (a worker that could not start, a
    protocol fault): the first line with its numbers blanked, and no place.
    """
    lines = text.strip().splitlines() or [""]
    where, after = "", 0
    for i, line in enumerate(lines):
        frame = _FRAME.match(line)
        if frame:  # the last one wins: innermost frame of the last traceback
            where, after = f"{frame['file']}:{frame['line']} in {frame['func']}", i + 1
    if where:
        # The exception line is the first unindented one after that frame (its
        # source line and carets are indented; a message may go on below it).
        for line in lines[after:]:
            exception = _EXCEPTION.match(line)
            if exception:
                return exception["type"], where, line
            if not line[:1].isspace():
                break
    first = lines[0].strip()
    return _NUMBER.sub("#", first)[:200], "", first


@dataclass
class _Kind:
    """Repeats of one kind of error in one listener since it was last logged."""

    listener: str
    label: str  # the exception type, or the text's first line
    where: str
    since: float
    count: int = 0
    last: str = ""


class ErrorLog:
    """Logs handler errors per listener: first of a kind in full, repeats as counts.

    Thread-safe: listeners report from the supervisor thread and from thread
    listeners' threads. Records are emitted outside the lock.

    Args:
        interval: seconds between summaries of one kind of error.
        clock: monotonic time source, in seconds.
    """

    def __init__(
        self, interval: float = SUMMARY_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        # (owner, listener name, type, where) -> _Kind; owner is the distributor.
        self._kinds: dict[tuple[Any, str, str, str], _Kind] = {}

    def report(
        self,
        owner: object,
        listener: str,
        n: Any,
        text: str,
        wake: Callable[[], None] | None = None,
    ) -> None:
        """Log one handler error of ``listener`` (of distributor ``owner``).

        ``wake`` is called when a summary starts waiting, so that whoever calls
        ``flush`` (the supervisor) knows to look again by ``due_in``.
        """
        label, where, last = error_kind(text)
        key = (owner, listener, label, where)
        now = self.clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                self._kinds[key] = _Kind(listener, label, where, now)
            else:
                kind.count += 1
                kind.last = last
            pending = kind is not None and kind.count == 1
            due = self._take_due(now, owner, final=False)
        if kind is None:
            log.error(
                "listener %r: handler raised on %s:\n%s",
                listener,
                _short_repr(n),
                text.rstrip(),
                extra={"listener": listener},
            )
        self._emit(due, now)
        if pending and wake is not None:
            wake()

    def flush(self, owner: object, final: bool = False) -> None:
        """Log the summaries that are due for ``owner``'s listeners (all, if ``final``).

        ``final`` also forgets every kind of ``owner``: call it when the
        distributor stops.
        """
        now = self.clock()
        with self._lock:
            due = self._take_due(now, owner, final)
        self._emit(due, now)

    def due_in(self, owner: object) -> float | None:
        """Seconds until ``owner``'s next summary is due, or None if none waits."""
        with self._lock:
            times = [k.since for key, k in self._kinds.items() if key[0] is owner and k.count]
        if not times:
            return None
        return max(0.0, min(times) + self.interval - self.clock())

    def _take_due(self, now: float, owner: object, final: bool) -> list[tuple[_Kind, int, float]]:
        """Collect ``(kind, count, since)`` to summarise; reset or forget them (lock held)."""
        due = []
        for key in [key for key in self._kinds if key[0] is owner]:
            kind = self._kinds[key]
            if not final and now - kind.since < self.interval:
                continue
            if kind.count:
                due.append((kind, kind.count, kind.since))
            if kind.count and not final:
                kind.count, kind.since = 0, now
            else:  # quiet for a whole interval, or the distributor stopped
                del self._kinds[key]
        return due

    @staticmethod
    def _emit(due: list[tuple[_Kind, int, float]], now: float) -> None:
        for kind, count, since in due:
            where = f" at {_short_place(kind.where)}" if kind.where else ""
            log.error(
                "%s in listener %r: %d more in the last %.0f s%s (latest: %s)",
                kind.label,
                kind.listener,
                count,
                max(1.0, now - since),
                where,
                kind.last,
                extra={"listener": kind.listener},
            )


def _short_repr(n: Any) -> str:
    """Return ``repr(n)``, cut to ``REPR_LIMIT`` characters."""
    text = repr(n)
    if len(text) > REPR_LIMIT:
        return f"{text[:REPR_LIMIT]}... ({len(text)} characters)"
    return text


def _short_place(where: str) -> str:
    """Shorten ``/long/path/mod.py:12 in f`` to ``mod.py:12 in f``."""
    path, sep, rest = where.partition(":")
    return f"{os.path.basename(path)}{sep}{rest}"


# The one log of the process: every distributor reports here, keyed by itself.
error_log = ErrorLog()
