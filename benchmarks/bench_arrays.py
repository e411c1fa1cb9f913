"""Big float64 arrays to process listeners: fanout, a pipe and shared_memory, one run.

The contenders and checks of ``fanout bench --scenario arrays`` (``fanout.bench.arrays``),
but every round sends a fixed payload, ``--total-gb`` per contender, instead of lasting
``--duration``: a long round shows whether the producer's memory stays bounded while
far more than any buffer travels through it. Rounds are interleaved across contenders.
Prints GB/s delivered (payload x listeners / time), fanout's ratio to each baseline,
and each contender's largest producer RSS growth over the rounds; with
``--rss-bound-mb`` it exits 1 when a contender's growth went over the bound.

    python benchmarks/bench_arrays.py [--total-gb 0.5] [--sizes 64K,1M,16M]
        [--listeners 1,4] [--rounds 3] [--contender NAME] [--rss-bound-mb MB]
        [--json PATH]

The 10 GB memory check: ``--total-gb 10 --sizes 1M --listeners 4 --rounds 1
--rss-bound-mb 1024``. Under pytest (``pytest benchmarks/bench_arrays.py
--benchmark-only``) it times 1 MiB arrays to 4 listeners, every contender.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any

import pytest

from fanout.bench import array_contenders, arrays, report
from fanout.bench.model import Case, Options
from fanout.bench.scenarios import Suite

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_sizes(text: str) -> list[int]:
    """``64K,1M,16M`` (binary units, optional ``iB``/``B``) -> bytes."""
    sizes = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", part, re.I)
        if m is None:
            raise argparse.ArgumentTypeError(f"expected sizes like 64K,1M,16M, got {part!r}")
        size = int(m[1]) * UNITS[m[2].upper()]
        if size <= 0 or size % 8:
            raise argparse.ArgumentTypeError(f"{part!r}: a size must be a positive multiple of 8")
        sizes.append(size)
    return sizes


def parse_ints(text: str) -> list[int]:
    """``1,4`` -> ``[1, 4]``, every value >= 1."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def positive(text: str) -> float:
    """A number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


class FixedPayloadSuite(Suite):
    """The arrays cases, each round sending ``total_bytes`` of arrays, no calibration."""

    def __init__(
        self,
        opts: Options,
        sizes: list[int],
        total_bytes: int,
        contenders: list[Any],
        progress: Any,
        status: Any,
    ) -> None:
        super().__init__(opts, progress, status)
        self.sizes, self.total_bytes, self.chosen = sizes, total_bytes, contenders
        self.peak_growth: dict[tuple[int, int, str], int] = {}  # (size, L, name) -> bytes

    def plan(self) -> list[Case]:
        """One case per size and listener count."""
        cases = []
        for nbytes in self.sizes:
            count = max(1, self.total_bytes // nbytes)
            for L in self.opts.listeners:

                def measure(
                    cls: Any, _: Any, L: int = L, nbytes: int = nbytes, count: int = count
                ) -> Any:
                    r = arrays.run_round(cls, L, arrays.cached_pool(nbytes), count)
                    key = (nbytes, L, cls.name)
                    growth = r["producer_rss_growth_bytes"]
                    self.peak_growth[key] = max(self.peak_growth.get(key, 0), growth)
                    return r

                cases.append(
                    Case(
                        "arrays",
                        {"array_bytes": nbytes, "listeners": L, "arrays": count},
                        f"{count:,} float64 arrays of {arrays.size_text(nbytes)} to {L} "
                        f"listener{'s' * (L > 1)}, handlers summing",
                        [arrays.GBPS],
                        self.chosen,
                        measure,
                        round_s=count * nbytes * L / 1e9,  # at about 1 GB/s
                    )
                )
        return cases


def summary(suite: FixedPayloadSuite, bound: int | None) -> tuple[list[str], bool]:
    """Lines with fanout's ratios and the RSS growths; and whether all kept the bound."""
    lines, within = [], True
    medians = {
        (m.params["array_bytes"], m.params["listeners"], m.contender): m.median
        for m in suite.measurements
    }
    for (nbytes, L, name), growth in suite.peak_growth.items():
        fan = medians.get((nbytes, L, array_contenders.FanoutArrays.name))
        ratios = ""
        if name == array_contenders.FanoutArrays.name:
            for base in (array_contenders.PipeArrays.name, array_contenders.ShmArrays.name):
                other = medians.get((nbytes, L, base))
                if fan and other:
                    ratios += f"  fanout/{base} = {fan / other:.2f}x"
        over = bound is not None and growth > bound
        within = within and not over
        lines.append(
            f"{arrays.size_text(nbytes):>7} L={L} {name:<15} producer RSS +{growth / 2**20:,.0f} "
            f"MiB at most{' OVER THE BOUND' if over else ''}{ratios}"
        )
    return lines, within


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--total-gb", type=positive, default=0.5, help="payload GB per round and contender"
    )
    parser.add_argument("--sizes", type=parse_sizes, default=list(arrays.SIZES))
    parser.add_argument("--listeners", type=parse_ints, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--contender",
        action="append",
        choices=[c.name for c in array_contenders.CONTENDERS],
        help="run only this contender; repeatable",
    )
    parser.add_argument(
        "--rss-bound-mb", type=positive, help="exit 1 if a producer's RSS grew more than this"
    )
    parser.add_argument("--json", metavar="PATH", help="write every raw figure and the machine")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    chosen = [
        c for c in array_contenders.CONTENDERS if not args.contender or c.name in args.contender
    ]
    opts = Options(listeners=args.listeners, rounds=args.rounds, scenarios=["arrays"])
    suite = FixedPayloadSuite(
        opts,
        args.sizes,
        int(args.total_gb * 1e9),
        chosen,
        lambda line: print(f"    {line}", file=sys.stderr, flush=True),
        lambda line: print(line, file=sys.stderr, flush=True),
    )
    info = report.machine()
    suite.run()
    doc = report.document(suite, dataclasses.asdict(opts), info)
    doc["contenders"] = [c.name for c in chosen]
    doc["skipped"] = {}  # the suite's list is about other scenarios' contenders
    doc["total_bytes_per_round"] = suite.total_bytes
    print(report.table(doc))
    bound = None if args.rss_bound_mb is None else int(args.rss_bound_mb * 2**20)
    lines, within = summary(suite, bound)
    print("\n" + "\n".join(lines))
    if args.json:
        doc["producer_rss_growth_max"] = [
            {"array_bytes": s, "listeners": L, "contender": n, "bytes": g}
            for (s, L, n), g in suite.peak_growth.items()
        ]
        report.to_json(doc, args.json)
    return 0 if within else 1


@pytest.mark.parametrize(
    "cls", array_contenders.CONTENDERS, ids=[c.name for c in array_contenders.CONTENDERS]
)
def test_1mib_arrays_to_four_listeners(benchmark: Any, cls: Any) -> None:
    pool = arrays.make_pool(1 << 20)
    count = 256
    results: list[dict[str, Any]] = []
    benchmark.group = "1 MiB float64 arrays to 4 listeners summing them"
    benchmark.pedantic(lambda: results.append(arrays.run_round(cls, 4, pool, count)), rounds=3)
    benchmark.extra_info["gbps"] = [r["gbps"] for r in results]
    benchmark.extra_info["producer_rss_growth_bytes"] = [
        r["producer_rss_growth_bytes"] for r in results
    ]


if __name__ == "__main__":
    sys.exit(main())
