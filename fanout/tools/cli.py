"""The ``fanout`` command: ``fanout bench`` compares fanout with the alternatives;
``fanout top`` watches a running distributor."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fanout._version import DISTRIBUTION
from fanout.bench.model import UNSTABLE_SPREAD

if TYPE_CHECKING:
    from fanout.bench.model import Options

__all__ = ["main"]

UNSTABLE_PERCENT = round(UNSTABLE_SPREAD * 100)


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


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _listing(heading: str, items: dict[str, Any]) -> str:
    """A help section: each name with the first line of its docstring."""
    width = max(len(name) for name in items) + 2
    lines = [f"{heading}:"]
    for name, obj in items.items():
        # Docstrings are written for the API reference: drop their code markup.
        summary = (obj.__doc__ or "").strip().splitlines()[0].replace("``", "")
        lines.append(f"  {name:<{width}}{summary}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``fanout`` command's parser: one subcommand each for ``bench`` and ``top``."""
    parser = argparse.ArgumentParser(
        prog="fanout", description="Command-line tools of the fanout library."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench_parser(sub)
    _add_top_parser(sub)
    return parser


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``fanout bench``: its description, the scenarios and contenders, its options."""
    from fanout.bench.contenders import CONTENDERS
    from fanout.bench.scenarios import SCENARIOS

    bench = sub.add_parser(
        "bench",
        help="measure fanout against the alternatives on this machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Run every scenario against every installed contender, the same way, with "
            "the rounds of each figure interleaved across contenders, and print each "
            "figure's median, its spread over the rounds, and its ratio to fanout. "
            f"Figures whose spread exceeds {UNSTABLE_PERCENT}% of the median are marked "
            "unstable."
        ),
        epilog=_listing("scenarios (--scenario NAME)", SCENARIOS)
        + "\n\n"
        + _listing("contenders (--contender NAME)", {c.name: c for c in CONTENDERS}),
    )
    _add_bench_outputs(bench)
    _add_bench_sizes(bench)
    bench.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help="run only this scenario (names below); repeatable",
    )
    bench.add_argument(
        "--contender",
        action="append",
        choices=[c.name for c in CONTENDERS],
        metavar="NAME",
        help="run only this contender (names below); repeatable",
    )


def _add_bench_outputs(bench: argparse.ArgumentParser) -> None:
    """Add ``fanout bench``'s options for the kind of run and where its figures go."""
    bench.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    bench.add_argument(
        "--json",
        metavar="PATH",
        help="write every raw figure, and a description of the machine, as JSON",
    )
    bench.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    bench.add_argument(
        "--markdown", metavar="PATH", help="write the figures as a markdown table ('-': stdout)"
    )
    bench.add_argument(
        "--from-json",
        metavar="PATH",
        help="measure nothing: show a run saved with --json (table, --plot, --markdown)",
    )
    bench.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions per distribute and per worker frame under "
        "valgrind's callgrind (about a minute more; needs valgrind)",
    )


def _add_bench_sizes(bench: argparse.ArgumentParser) -> None:
    """Add ``fanout bench``'s options for the load: counts, payloads, work and durations."""
    bench.add_argument(
        "--listeners", type=_positive_ints, help="listener counts (default 1,4; --quick: 2)"
    )
    bench.add_argument(
        "--workers", type=_positive_ints, help="workers per listener (default 1,2; --quick: 1)"
    )
    bench.add_argument(
        "--payload",
        action="append",
        help="small, pod (a real Pod object) or a path to a JSON object; repeatable",
    )
    bench.add_argument(
        "--work-us", type=_non_negative_float, help="handler work (us) in 'cpu'; 0 allowed"
    )
    bench.add_argument(
        "--duration",
        type=_positive_float,
        help="seconds per measured round (default 0.5; --quick: 0.05)",
    )
    bench.add_argument(
        "--rounds", type=_positive_int, help="measured rounds per figure (default 5; --quick: 3)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return bench(args)
    if args.command == "top":
        return top(args)
    return 2  # pragma: no cover - argparse requires a command


def bench(args: argparse.Namespace) -> int:
    from fanout.bench import report

    if args.from_json:
        try:
            doc = report.load(args.from_json)
        except ValueError as exc:
            print(f"fanout bench: {exc}", file=sys.stderr)
            return 2
        return _show(doc, args)
    if args.plot and _no_matplotlib():
        return 2
    opts = _options(args)
    if opts is None:
        return 2
    from fanout.bench.scenarios import Suite

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    progress = _Progress(sys.stderr)
    info = report.machine()
    progress.line(
        f"fanout bench on {info['cpu_count']} CPUs, Python {info['python']}, "
        f"native={info['fanout_native']}; {'quick' if args.quick else 'full'} run, "
        f"{opts.rounds} rounds per figure"
    )
    warning = report.busy_warning()
    if warning:
        progress.line(warning)
    suite = Suite(opts, progress.line, progress.status)
    started = time.monotonic()
    try:
        suite.run()
    except KeyboardInterrupt:
        progress.line("interrupted: showing what was measured so far")
    progress.done()
    doc = report.document(suite, dataclasses.asdict(opts), info)
    if args.instructions:
        from fanout.bench import instructions

        progress.status("counting instructions under callgrind")
        try:
            doc["instructions"] = instructions.measure(native=info["fanout_native"])
        except RuntimeError as exc:  # recorded as such: never a figure made up
            doc["instructions"] = {"error": str(exc)}
        progress.done()
    report.with_targets(doc)
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"fanout bench: measured for {minutes} min {seconds} s\n")
    if args.json:
        report.to_json(doc, args.json)
    return _show(doc, args)


def _options(args: argparse.Namespace) -> Options | None:
    """The run's options: quick or full defaults, overridden by the flags given."""
    from fanout.bench.model import Options
    from fanout.bench.payloads import load_payload

    opts = Options.quick() if args.quick else Options()
    for spec in args.payload or ():
        try:
            load_payload(spec)
        except ValueError as exc:
            print(f"fanout bench: {exc}", file=sys.stderr)
            return None
    overrides = {
        "listeners": args.listeners,
        "workers": args.workers,
        "payloads": args.payload,
        "work_us": args.work_us,
        "duration": args.duration,
        "rounds": args.rounds,
        "scenarios": args.scenario,
        "contenders": args.contender,
    }
    return dataclasses.replace(opts, **{k: v for k, v in overrides.items() if v is not None})


def _no_matplotlib() -> bool:
    """Tell (and say so) when --plot cannot work, before measuring anything."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "fanout bench: --plot needs matplotlib: pip install matplotlib "
            f"(or pip install '{DISTRIBUTION}[plot]')",
            file=sys.stderr,
        )
        return True
    return False


def _show(doc: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the table and write the --markdown and --plot outputs of a run."""
    from fanout.bench import report

    print(report.table(doc))
    if "instructions" in doc:
        from fanout.bench.instructions import table

        print("\n" + table(doc["instructions"]))
    if args.json and not args.from_json:
        print(f"raw figures: {args.json}")
    if args.markdown == "-":
        print("\n" + report.markdown(doc))
    elif args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(doc) + "\n")
        print(f"markdown table: {args.markdown}")
    if args.plot:
        if _no_matplotlib():
            return 2
        report.plot(doc, args.plot)
        print(f"chart: {args.plot}")
    return 0


class _Progress:
    """Progress on stderr: a live status line on a terminal, plain lines otherwise."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def status(self, text: str) -> None:
        """Show the step that starts now (``[i/N] ETA ...``)."""
        if self.tty:
            self.stream.write(f"\r\x1b[2K{text[:120]}")
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        """Print a line that stays (a finished figure, a warning)."""
        prefix = "\r\x1b[2K" if self.tty else ""
        self.stream.write(f"{prefix}    {text}\n")
        self.stream.flush()

    def done(self) -> None:
        """Clear the status line."""
        if self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


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
        from fanout.tools.top import run
    except ImportError as exc:
        print(f"fanout top: {exc}", file=sys.stderr)
        return 2
    return run(args.url, args.interval, args.once)
