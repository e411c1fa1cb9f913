"""``fanout top URL``: a live table of a running distributor, read from its metrics.

It scrapes the endpoint that ``fanout.metrics.serve`` starts (or any endpoint
that exposes fanout's metrics, such as the user's own with the collector
registered) once per interval and shows one row per listener. Rates (received/s,
delivered/s) and latency percentiles are computed between two consecutive
scrapes, so they describe the last interval; the other columns are the current
figures (pending, workers) or totals since the listener was added (errors, dead
letters, drops, restarts). The percentiles are interpolated within the
endpoint's power-of-two buckets, as Prometheus' ``histogram_quantile`` does, so
they are within a factor of two. When the endpoint also serves ``fanout.kube``'s
informer metrics, a second table shows each informer: events/s, store size, how
long since it last heard from the API server, relists, 410s, restarts, errors.

``--once`` prints one plain-text snapshot and exits: it scrapes twice, one
interval apart, so that its rates are real rates too.

Needs the ``top`` extra: ``pip install 'fanout-informer[top]'`` (rich and prometheus_client).
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import select
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from fanout._version import DISTRIBUTION

try:
    from prometheus_client.parser import text_string_to_metric_families
    from rich.console import Console, Group
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        f"this command needs rich and prometheus_client ({exc.name} is missing): "
        f"pip install '{DISTRIBUTION}[top]'"
    ) from exc

__all__ = [
    "Figures",
    "InformerFigures",
    "InformerRow",
    "Row",
    "Sample",
    "TopError",
    "informer_rows",
    "rows",
    "run",
    "scrape",
]

SCRAPE_TIMEOUT = 5.0  # seconds an endpoint may take to answer
TOTALS = {  # metric family name (as the parser names it) -> Figures field
    "fanout_received": "received",
    "fanout_delivered": "delivered",
    "fanout_handler_errors": "errors",
    "fanout_dead_lettered": "dead_lettered",
    "fanout_dropped": "dropped",
    "fanout_worker_restarts": "restarts",
    "fanout_pending": "pending",
    "fanout_pending_bytes": "pending_bytes",
    "fanout_workers": "workers",
}
LATENCY = "fanout_delivery_latency_seconds"
# fanout.kube.metrics.InformerCollector's families -> InformerFigures field
INFORMER_TOTALS = {
    "fanout_kube_events": "events",
    "fanout_kube_store_objects": "store",
    "fanout_kube_resource_version_age_seconds": "rv_age",
    "fanout_kube_synced": "synced",
    "fanout_kube_relists": "relists",
    "fanout_kube_gone": "gone",
    "fanout_kube_watch_restarts": "watch_restarts",
    "fanout_kube_silent_watches": "silent",
    "fanout_kube_errors": "errors",
}
INFORMER_COLUMNS = (
    "informer",
    "events/s",
    "store",
    "rv age",
    "synced",
    "relists",
    "410s",
    "watch restarts",
    "silent",
    "errors",
)
COLUMNS = (
    "listener",
    "recv/s",
    "dlvr/s",
    "pending",
    "pend bytes",
    "p50",
    "p99",
    "errors",
    "dead",
    "drops",
    "restarts",
    "workers",
)


class TopError(Exception):
    """The endpoint cannot be read, or serves no fanout metrics; the message says why."""


@dataclass
class Figures:
    """One listener's figures in one scrape (counters are totals)."""

    received: float = 0.0
    delivered: float = 0.0
    errors: float = 0.0
    dead_lettered: float = 0.0
    dropped: float = 0.0
    restarts: float = 0.0
    pending: float = 0.0
    pending_bytes: float = 0.0
    workers: float = 0.0
    # (upper bound in seconds, cumulative count), ascending, ending with +inf
    buckets: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class InformerFigures:
    """One informer's figures in one scrape (counters are totals)."""

    events: float = 0.0
    store: float = 0.0
    rv_age: float = math.nan
    synced: float = 0.0
    relists: float = 0.0
    gone: float = 0.0
    watch_restarts: float = 0.0
    silent: float = 0.0
    errors: float = 0.0


@dataclass
class Sample:
    """One scrape: when it was taken (monotonic seconds) and each listener's figures."""

    at: float
    listeners: dict[str, Figures]
    # Informers' figures, when the endpoint has fanout.kube's collector too.
    informers: dict[str, InformerFigures] = field(default_factory=dict)


@dataclass
class InformerRow:
    """What one line of the informers' table shows."""

    informer: str
    events_rate: float | None
    figures: InformerFigures


@dataclass
class Row:
    """What one line of the table shows; None where there is nothing to show yet."""

    listener: str
    received_rate: float | None
    delivered_rate: float | None
    pending: float
    pending_bytes: float
    p50: float | None
    p99: float | None
    errors: float
    dead_lettered: float
    dropped: float
    restarts: float
    workers: float


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT) -> Sample:
    """Read and parse the metrics at ``url``.

    Args:
        url: the metrics endpoint, e.g. ``http://127.0.0.1:9100/metrics``.
        timeout: seconds to wait for an answer.

    Returns:
        A ``Sample`` with every listener the endpoint reports.

    Raises:
        TopError: the endpoint cannot be reached, answers with an error, or
            serves no fanout metrics.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise TopError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise TopError(
            f"cannot reach {url}: {exc.reason}. Is the distributor serving its metrics "
            "there (fanout.metrics.serve)?"
        ) from None
    except (OSError, http.client.HTTPException) as exc:  # reset, timeout, bad answer
        raise TopError(f"cannot read {url}: {exc or type(exc).__name__}") from None
    at = time.monotonic()
    listeners: dict[str, Figures] = {}
    informers: dict[str, InformerFigures] = {}
    found = False
    try:
        for family in text_string_to_metric_families(body):
            name = family.name
            if name in INFORMER_TOTALS:
                for s in family.samples:
                    if s.name in (name, f"{name}_total"):
                        inf = informers.setdefault(
                            s.labels.get("informer", "?"), InformerFigures()
                        )
                        setattr(inf, INFORMER_TOTALS[name], s.value)
            elif name in TOTALS:
                found = True
                for s in family.samples:
                    if s.name in (name, f"{name}_total"):
                        fig = listeners.setdefault(s.labels.get("listener", "?"), Figures())
                        setattr(fig, TOTALS[name], s.value)
            elif name == LATENCY:
                for s in family.samples:
                    if s.name == f"{LATENCY}_bucket":
                        fig = listeners.setdefault(s.labels.get("listener", "?"), Figures())
                        fig.buckets.append((float(s.labels["le"]), s.value))
    except (ValueError, KeyError, TypeError) as exc:
        raise TopError(f"{url} does not serve Prometheus text: {exc}") from None
    if not found:
        raise TopError(
            f"{url} serves no fanout metrics (no fanout_received_total); point fanout top "
            "at the endpoint of fanout.metrics.serve or one with PrometheusCollector"
        )
    for fig in listeners.values():
        fig.buckets.sort()
    return Sample(at, listeners, informers)


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Estimate quantile ``q`` from cumulative buckets, as Prometheus does.

    Linear interpolation inside the bucket that holds the rank (the first
    bucket starts at 0); a rank in the ``+Inf`` bucket gives the largest finite
    bound.

    Args:
        q: the quantile, 0 to 1 (0.5 for the median).
        buckets: cumulative ``(le, count)`` pairs, ascending, ending with ``+inf``.

    Returns:
        The estimate in the buckets' unit, or None when they count nothing.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower


def _window(now: Figures, before: Figures | None) -> list[tuple[float, float]]:
    """Buckets of what happened between two scrapes (all of ``now`` without ``before``)."""
    if before is None or [le for le, _ in before.buckets] != [le for le, _ in now.buckets]:
        return []
    return [(le, c - b) for (le, c), (_, b) in zip(now.buckets, before.buckets, strict=True)]


def _per_second(new: float, old: float | None, dt: float) -> float | None:
    """A counter's rate between two scrapes; None without the earlier one.

    A counter that went down belongs to a replaced listener (or informer): no rate.
    """
    if old is None or dt <= 0 or new < old:
        return None
    return (new - old) / dt


def _matched(
    before: Sample | None, now: Sample, table: str
) -> Iterator[tuple[str, Any, Any, float]]:
    """``(name, figures now, figures before or None, seconds between)`` of ``table``, by name."""
    dt = now.at - before.at if before is not None else 0.0
    current = getattr(now, table)
    earlier = getattr(before, table) if before is not None else {}
    for name in sorted(current):
        yield name, current[name], earlier.get(name), dt


def rows(before: Sample | None, now: Sample) -> list[Row]:
    """Turn one scrape, and the one before it if any, into table rows.

    Args:
        before: the previous scrape, or None (then rates and percentiles are None).
        now: the latest scrape.

    Returns:
        One ``Row`` per listener of ``now``, sorted by name.
    """
    out = []
    for name, fig, old, dt in _matched(before, now, "listeners"):
        recv = _per_second(fig.received, None if old is None else old.received, dt)
        dlvr = _per_second(fig.delivered, None if old is None else old.delivered, dt)
        window = _window(fig, old)
        out.append(
            Row(
                listener=name,
                received_rate=recv,
                delivered_rate=dlvr,
                pending=fig.pending,
                pending_bytes=fig.pending_bytes,
                p50=quantile(0.5, window),
                p99=quantile(0.99, window),
                errors=fig.errors,
                dead_lettered=fig.dead_lettered,
                dropped=fig.dropped,
                restarts=fig.restarts,
                workers=fig.workers,
            )
        )
    return out


def informer_rows(before: Sample | None, now: Sample) -> list[InformerRow]:
    """Turn one scrape, and the one before it if any, into the informers' rows.

    Args:
        before: the previous scrape, or None (then the event rates are None).
        now: the latest scrape.

    Returns:
        One ``InformerRow`` per informer of ``now``, sorted by name.
    """
    out = []
    for name, fig, old, dt in _matched(before, now, "informers"):
        rate = _per_second(fig.events, None if old is None else old.events, dt)
        out.append(InformerRow(name, rate, fig))
    return out


def informer_cells(row: InformerRow) -> list[str]:
    """The text of each column of ``row``, in ``INFORMER_COLUMNS`` order."""
    fig = row.figures
    return [
        row.informer,
        _rate(row.events_rate),
        _count(fig.store),
        "-" if math.isnan(fig.rv_age) else _seconds(fig.rv_age),
        "yes" if fig.synced else "no",
        _count(fig.relists),
        _count(fig.gone),
        _count(fig.watch_restarts),
        _count(fig.silent),
        _count(fig.errors),
    ]


def _aligned(columns: Sequence[str], lines: list[list[str]]) -> list[str]:
    """Align a header and its lines: the first column to the left, the rest to the right."""
    lines = [list(columns), *lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = []
    for line in lines:
        first = line[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True))
        out.append("  ".join([first, *rest]).rstrip())
    return out


def _count(v: float) -> str:
    v = round(v)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= 10 * size:
            return f"{v / size:.1f}{unit}"
    return str(v)


def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    return _count(v) if v >= 10 or v == 0 else f"{v:.1f}"


def _bytes(v: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if v >= size:
            return f"{v / size:.1f}{unit}"
    return f"{v:.0f}B"


def _seconds(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if v >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v * 1e9:.3g}ns"


def cells(row: Row) -> list[str]:
    """The text of each column of ``row``, in ``COLUMNS`` order."""
    return [
        row.listener,
        _rate(row.received_rate),
        _rate(row.delivered_rate),
        _count(row.pending),
        _bytes(row.pending_bytes),
        _seconds(row.p50),
        _seconds(row.p99),
        _count(row.errors),
        _count(row.dead_lettered),
        _count(row.dropped),
        _count(row.restarts),
        _count(row.workers),
    ]


def plain(table_rows: list[Row]) -> str:
    """Format rows as an aligned plain-text table (for ``--once`` and pipes)."""
    out = _aligned(COLUMNS, [cells(r) for r in table_rows])
    if not table_rows:
        out.append("(no listeners)")
    return "\n".join(out)


def _informer_table(table_rows: list[InformerRow]) -> Table:
    table = Table(title="informers")
    for i, name in enumerate(INFORMER_COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in table_rows:
        texts = informer_cells(row)
        styles = [""] * len(texts)
        if not row.figures.synced:
            styles[4] = "yellow"
        if row.figures.errors:
            styles[9] = "bold red"
        table.add_row(*(Text(c, style=s) for c, s in zip(texts, styles, strict=True)))
    return table


def _view(url: str, before: Sample | None, now: Sample, status: str) -> Table | Group:
    """The listeners' table, with the informers' below it when the endpoint has any."""
    listeners = _table(url, rows(before, now), status)
    if not now.informers:
        return listeners
    return Group(listeners, _informer_table(informer_rows(before, now)))


def _table(url: str, table_rows: list[Row], status: str) -> Table:
    table = Table(
        title=f"fanout top  {url}  {time.strftime('%H:%M:%S')}",
        caption=status,
        caption_justify="left",
    )
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in table_rows:
        styles = [""] * len(COLUMNS)
        for i, value in ((7, row.errors), (8, row.dead_lettered), (9, row.dropped)):
            if value:
                styles[i] = "bold red"
        if row.restarts:
            styles[10] = "yellow"
        table.add_row(*(Text(c, style=s) for c, s in zip(cells(row), styles, strict=True)))
    if not table_rows:
        table.add_row("(no listeners)", *[""] * (len(COLUMNS) - 1))
    return table


@contextlib.contextmanager
def _keys(stream: IO[str]) -> Iterator[int | None]:
    """Put a terminal in cbreak mode (keys arrive at once, Ctrl-C still interrupts).

    Yields the fd to read keys from, or None when ``stream`` is no terminal.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_key(fd: int | None, seconds: float) -> str:
    """Wait ``seconds`` for a key on ``fd``; return it, or "" when none came."""
    if fd is None:
        time.sleep(seconds)
        return ""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 32).decode(errors="replace")
            if not data:  # the terminal went away
                return "q"
            return data
    return ""


def live(url: str, interval: float, console: Console, keys: IO[str]) -> int:
    """Show the table, refreshed every ``interval`` seconds, until q or Ctrl-C."""
    before = scrape(url)
    status = f"every {interval:g} s; rates and percentiles over the last interval. q quits"
    with (
        _keys(keys) as key_fd,
        Live(_view(url, None, before, status), console=console, auto_refresh=False) as view,
    ):
        try:
            while "q" not in _wait_key(key_fd, interval).lower():
                try:
                    now = scrape(url)
                except TopError as exc:
                    failed = f"[{time.strftime('%H:%M:%S')}] {exc}; retrying"
                    view.update(_view(url, None, before, failed), refresh=True)
                    continue
                view.update(_view(url, before, now, status), refresh=True)
                before = now
        except KeyboardInterrupt:
            pass
    return 0


def once(url: str, interval: float, out: IO[str]) -> int:
    """Print one plain-text snapshot: two scrapes ``interval`` seconds apart."""
    before = scrape(url)
    time.sleep(interval)
    now = scrape(url)
    out.write(f"fanout top {url}: rates and percentiles over {now.at - before.at:.1f} s\n")
    out.write(plain(rows(before, now)) + "\n")
    if now.informers:
        lines = [informer_cells(r) for r in informer_rows(before, now)]
        out.write("\n" + "\n".join(_aligned(INFORMER_COLUMNS, lines)) + "\n")
    return 0


def run(url: str, interval: float = 1.0, once_only: bool = False) -> int:
    """Run ``fanout top``; return the exit status.

    Args:
        url: the metrics endpoint.
        interval: seconds between scrapes (and the window of rates).
        once_only: print one plain-text snapshot instead of the live view.

    Returns:
        0 when the user quit (q, Ctrl-C) or the snapshot was printed; 1 when
        the endpoint could not be read at start (the reason goes to stderr).
    """
    try:
        if once_only:
            return once(url, interval, sys.stdout)
        return live(url, interval, Console(), sys.stdin)
    except TopError as exc:
        print(f"fanout top: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the live view was up
        return 0
