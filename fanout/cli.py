"""The ``fanout`` command: ``fanout bench`` compares fanout with the alternatives;
``fanout top`` watches a running distributor."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _positive_float(text) if text.strip() not in ("0", "0.0") else 0.0
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanout", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="measure fanout against the alternatives on this machine",
        description="Run every scenario against every installed contender, the same way, "
        "and print absolute figures and ratios to fanout.",
    )
    bench.add_argument("--quick", action="store_true", help="a short run (seconds), for CI")
    bench.add_argument("--json", metavar="PATH", help="write every raw figure and the machine")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    bench.add_argument("--listeners", type=_positive_ints, help="listener counts, e.g. 1,4")
    bench.add_argument("--workers", type=_positive_ints, help="workers per listener, e.g. 1,2")
    bench.add_argument(
        "--payload",
        action="append",
        help="small, pod (a real Pod object) or a path to a JSON object; repeatable",
    )
    bench.add_argument("--work-us", type=_non_negative_float, help="handler work (us) in 'cpu'")
    bench.add_argument("--duration", type=_positive_float, help="seconds per measured round")
    bench.add_argument("--rounds", type=_positive_ints, help="measured rounds per figure")
    bench.add_argument(
        "--scenario",
        action="append",
        choices=["throughput", "cpu", "latency", "stalled", "recovery"],
        help="run only these scenarios; repeatable",
    )
    bench.add_argument(
        "--contender", action="append", help="run only these contenders (by name); repeatable"
    )
    _add_top_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return bench(args)
    if args.command == "top":
        return top(args)
    return 2  # pragma: no cover - argparse requires a command


def bench(args: argparse.Namespace) -> int:
    from fanout.bench.payloads import load_payload
    from fanout.bench.report import machine, plot, table, to_json
    from fanout.bench.scenarios import Options, Suite

    opts = Options.quick() if args.quick else Options()
    if args.listeners:
        opts.listeners = args.listeners
    if args.workers:
        opts.workers = args.workers
    if args.payload:
        for spec in args.payload:
            try:
                load_payload(spec)
            except ValueError as exc:
                print(f"fanout bench: {exc}", file=sys.stderr)
                return 2
        opts.payloads = args.payload
    if args.work_us is not None:
        opts.work_us = args.work_us
    if args.duration:
        opts.duration = args.duration
    if args.rounds:
        opts.rounds = args.rounds[0]
    if args.scenario:
        opts.scenarios = args.scenario
    if args.contender:
        opts.contenders = args.contender
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "fanout bench: --plot needs matplotlib: pip install matplotlib "
                "(or pip install 'fanout[plot]')",
                file=sys.stderr,
            )
            return 2
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    progress = _Progress(sys.stderr)
    info = machine()
    progress.line(
        f"fanout bench on {info['cpu_count']} CPUs, Python {info['python']}, "
        f"native={info['fanout_native']}; {'quick' if args.quick else 'full'} run"
    )
    suite = Suite(opts, progress.line, progress.status)
    if opts.contenders is not None:
        unknown = set(opts.contenders) - {c.name for c in suite.contenders} - set(suite.skipped)
        if unknown:
            names = ", ".join(sorted(unknown))
            print(f"fanout bench: unknown contender(s): {names}", file=sys.stderr)
            return 2
    started = time.monotonic()
    try:
        suite.run()
    except KeyboardInterrupt:
        progress.line("interrupted: showing what was measured so far")
    progress.done()
    print(table(suite))
    print(f"\n({time.monotonic() - started:.0f} s)")
    if args.json:
        to_json(suite, args.json, dataclasses.asdict(opts))
        print(f"raw figures: {args.json}")
    if args.plot:
        plot(suite, args.plot)
        print(f"chart: {args.plot}")
    return 0


class _Progress:
    """A live status line on a terminal; plain lines otherwise."""

    def __init__(self, stream: object) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.count = 0

    def status(self, text: str) -> None:
        """Show what runs now: rewrite one line on a terminal, nothing otherwise."""
        if self.tty:
            self.stream.write(f"\r\x1b[2K    ... {text[:110]}")  # type: ignore[attr-defined]
            self.stream.flush()  # type: ignore[attr-defined]

    def line(self, text: str) -> None:
        self.count += 1
        if self.tty:
            self.stream.write(f"\r\x1b[2K[{self.count:3d}] {text}\n")  # type: ignore[attr-defined]
        else:
            self.stream.write(f"[{self.count:3d}] {text}\n")  # type: ignore[attr-defined]
        self.stream.flush()  # type: ignore[attr-defined]

    def done(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")  # type: ignore[attr-defined]
            self.stream.flush()  # type: ignore[attr-defined]


def _metrics_url(text: str) -> str:
    """Accept ``http(s)://host:port/path``, or ``host:port`` (http and /metrics added)."""
    from urllib.parse import urlsplit

    url = text if "://" in text else f"http://{text}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(
            f"expected a metrics URL like http://127.0.0.1:9100/metrics, got {text!r}"
        )
    return url if parts.path else f"{url}/metrics"


def _add_top_parser(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser(
        "top",
        help="live table of a running distributor, from its metrics endpoint",
        description="Show one row per listener of a running distributor, refreshed every "
        "interval, read from the endpoint that fanout.metrics.serve() starts. Rates and "
        "latency percentiles cover the last interval; errors, dead letters, drops and "
        "restarts are totals. Press q or Ctrl-C to quit.",
    )
    top.add_argument("url", type=_metrics_url, help="e.g. http://127.0.0.1:9100/metrics")
    top.add_argument(
        "--once",
        action="store_true",
        help="print one plain-text snapshot (two scrapes one interval apart) and exit",
    )
    top.add_argument(
        "--interval", type=_positive_float, default=1.0, help="seconds between scrapes (1)"
    )


def top(args: argparse.Namespace) -> int:
    """Run ``fanout top``; without its extra, say what to install (status 2)."""
    try:
        from fanout.top import run
    except ImportError as exc:
        print(f"fanout top: {exc}", file=sys.stderr)
        return 2
    return run(args.url, args.interval, args.once)
