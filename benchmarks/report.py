"""The results table and ``RESULTS.md``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from benchmarks.harness import MB, Params
from benchmarks.runner import BUSY_SHARE, Row

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = ("case", "bulk MB/s", "RTT median µs", "RTT p99 µs", "notes")
MISSING = "—"
NUMERIC = {1, 2, 3}
"""Columns aligned right."""


@dataclass(frozen=True)
class Run:
    """A finished run and the circumstances it ran in."""

    rows: list[Row]
    params: Params
    quick: bool
    command: str
    date: str
    machine: str
    others_cpu: float | None
    """Share of the machine's CPU that other processes used during the run."""

    def to_json(self) -> dict[str, object]:
        return {
            "date": self.date,
            "machine": self.machine,
            "others_cpu": None if self.others_cpu is None else round(self.others_cpu, 3),
            "command": self.command,
            "quick": self.quick,
            "bulk_bytes": self.params.bulk_bytes,
            "rtt_warmup": self.params.rtt_warmup,
            "rtt_count": self.params.rtt_count,
            "msg_size": self.params.msg_size,
            "results": [row.to_json() for row in self.rows],
        }


def now() -> str:
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def interference(others_cpu: float | None) -> str:
    """What other processes took of the CPU during a run (``others_cpu``: a share, or None)."""
    if others_cpu is None:
        return "not measured (no /proc/stat)"
    verdict = "; numbers are suspect" if others_cpu > BUSY_SHARE else ""
    return f"other processes used {others_cpu:.0%} of the CPU during the run{verdict}"


def command(argv: Sequence[str], module: str = "benchmarks.bench") -> str:
    python = os.path.relpath(sys.executable)
    if python.startswith(".."):
        python = sys.executable
    return " ".join([python, "-m", module, *argv])


def sizes(p: Params) -> str:
    passes = (
        f", in {p.passes} passes with the cases taking turns (pooled samples)"
        if p.passes > 1
        else ""
    )
    return (
        f"bulk {p.bulk_bytes / MB:g} MB (MB = 10^6 bytes) client → server; RTT {p.rtt_count} "
        f"round trips of {p.msg_size} B after {p.rtt_warmup} warm-up{passes}"
    )


def table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table."""
    return grid(HEADER, [_cells(row) for row in rows], NUMERIC)


def grid(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """A Markdown table, padded so it also reads well in a terminal; the ``numeric`` columns
    aligned right."""
    cells = [header, *rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        padded = (
            value.rjust(width) if i in numeric else value.ljust(width)
            for i, (value, width) in enumerate(zip(values, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(_rule(width, i in numeric) for i, width in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(c) for c in cells[1:])])


def results_markdown(run: Run) -> str:
    return f"""# Benchmark results

Written by `benchmarks/bench.py --write`, which replaces this part of the file; see
`benchmarks/README.md` for what each number measures.

- Date: {run.date}
- Machine: {run.machine}
- Quiet: {interference(run.others_cpu)}
- Command: `{run.command}`
- Sizes: {sizes(run.params)}
- Every case runs as two processes (server and client) on 127.0.0.1.

{table(run.rows)}
"""


def write_results(run: Run) -> Path:
    """Replace this run's part of RESULTS.md; sections other tools own (between their
    ``<!-- NAME:start -->`` / ``<!-- NAME:end -->`` markers) are kept."""
    kept = ""
    if RESULTS.exists():
        old = RESULTS.read_text(encoding="utf-8")
        start = old.find("<!-- ")
        if start != -1 and ":start -->" in old[start:]:
            kept = "\n" + old[start:]
    RESULTS.write_text(results_markdown(run) + kept, encoding="utf-8")
    return RESULTS


def write_section(name: str, body: str) -> Path:
    """Replace the part of RESULTS.md between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
    with ``body`` (a tool's own section), or append it; the rest of the file is kept."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.rstrip()}\n{end}\n"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + (("\n" + tail) if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text, encoding="utf-8")
    return RESULTS


def _cells(row: Row) -> tuple[str, str, str, str, str]:
    bulk = f"{row.bulk.mb_per_s:.1f}" if row.bulk else MISSING
    median = f"{row.rtt.median_us:.1f}" if row.rtt else MISSING
    p99 = f"{row.rtt.p99_us:.1f}" if row.rtt else MISSING
    return (row.case, bulk, median, p99, "; ".join(row.remarks()))


def _rule(width: int, right: bool) -> str:
    return "-" * (width + 1) + ":" if right else "-" * (width + 2)
