"""Benchmark pilot-agents' tunnel against raw UDP, ZeroMQ and aioquic, side by side in one run.

.venv/bin/python -m benchmarks.bench [--quick] [--passes N] [--only NAME] [--json] [--write]
    [--congestion newreno,cubic,bbr]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace

from benchmarks import report
from benchmarks.cases import CASES
from benchmarks.harness import Params
from benchmarks.machine import CpuSample, describe, others_share
from benchmarks.runner import run_case
from pilot_agents.net.tunnel.congestion import ALGORITHMS

CONGESTION_CASES = ("tunnel", "tunnel-asyncio")
"""The cases whose tunnel takes Params.congestion (the daemon cases run the default)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="16 MB bulk, 500 round trips (after 50 warm-up)"
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        metavar="N",
        help="measure RTT in N passes, the cases taking turns; the table pools their samples",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(CASES),
        metavar="NAME",
        help=f"run only this case (repeatable): {', '.join(CASES)}",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )
    parser.add_argument("--write", action="store_true", help="also write benchmarks/RESULTS.md")
    parser.add_argument(
        "--congestion",
        metavar="NAMES",
        default="",
        help=f"comma-separated controllers ({','.join(ALGORITHMS)}): the cases "
        f"{', '.join(CONGESTION_CASES)} run once with each, side by side",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.passes < 1:
        print("--passes must be at least 1", file=sys.stderr)
        return 2
    names = args.only or list(CASES)
    controllers = [c for c in args.congestion.split(",") if c]
    if unknown := [c for c in controllers if c not in ALGORITHMS]:
        choose = ", ".join(ALGORITHMS)
        print(f"--congestion: unknown {unknown}; choose from {choose}", file=sys.stderr)
        return 2
    before = CpuSample.now()
    with tempfile.TemporaryDirectory(prefix="pilot-bench-") as workdir:
        params = replace(
            Params.quick() if args.quick else Params(), workdir=workdir, passes=args.passes
        )
        runs = [
            (name, replace(params, congestion=c))
            for name in names
            for c in (controllers if controllers and name in CONGESTION_CASES else [""])
        ]
        rows = [run_case(name, p) for name, p in runs]
        for row, (_, p) in zip(rows, runs, strict=True):
            if p.congestion:
                row.case += f" [{p.congestion}]"
        for _ in range(params.passes - 1):
            for row, (name, p) in zip(rows, runs, strict=True):
                row.add_pass(run_case(name, p, kinds=("rtt",)))
    others = others_share(before, CpuSample.now())
    command = report.command(argv)
    run = report.Run(rows, params, args.quick, command, report.now(), describe(), others)
    if args.json:
        print(json.dumps(run.to_json(), indent=2, ensure_ascii=False))
    else:
        print(f"{run.date} · {run.machine}\n{report.sizes(params)}\n")
        print(report.table(rows))
        print(f"\n{report.interference(run.others_cpu)}")
    if args.write:
        print(f"wrote {report.write_results(run)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
