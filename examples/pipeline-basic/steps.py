"""The example pipeline's own steps: plain functions of the state (a dict) that return the keys
they set. pipeline.yaml names them as ``steps:FUNCTION``."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def load_sales(state: dict[str, Any], path: str) -> dict[str, Any]:
    """The scraper: the CSV as text (sent as it is)."""
    return {"csv": Path(path).read_text(encoding="utf-8")}


def quarter(date: str) -> str:
    return f"Q{(int(date[5:7]) - 1) // 3 + 1}"


def totals(text: str) -> dict[str, dict[str, float]]:
    """Sales (units x unit price) by quarter, then region, rounded to cents."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in csv.DictReader(io.StringIO(text)):
        out[quarter(row["date"])][row["region"]] += int(row["units"]) * float(row["unit_price"])
    return {q: {r: round(v, 2) for r, v in sorted(regions.items())}
            for q, regions in sorted(out.items())}


def analyze(state: dict[str, Any]) -> dict[str, Any]:
    """The analyzer: totals by quarter and region, each quarter's total, and its growth over the
    quarter before."""
    by_region = totals(state["csv"])
    by_quarter = {q: round(sum(regions.values()), 2) for q, regions in by_region.items()}
    quarters = list(by_quarter)
    growth = {q: round(100.0 * (by_quarter[q] / by_quarter[p] - 1.0), 1)
              for p, q in itertools.pairwise(quarters)}
    return {"insights": {"by_quarter_region": by_region, "by_quarter": by_quarter,
                         "growth_percent": growth, "source": state.get("csv_from")}}


def write_report(state: dict[str, Any], path: str) -> dict[str, Any]:
    """The reporter: a Markdown report, and its numbers as JSON next to it."""
    insights = state["insights"]
    regions = sorted({r for q in insights["by_quarter_region"].values() for r in q})
    lines = ["# Sales report", "", f"Data from {insights.get('source')}, analyzed by "
             f"{state.get('insights_from')}.", "",
             "| quarter | " + " | ".join(regions) + " | total | growth |",
             "|---" * (len(regions) + 3) + "|"]
    for q, by_region in insights["by_quarter_region"].items():
        growth = insights["growth_percent"].get(q)
        cells = [f"{by_region.get(r, 0.0):,.2f}" for r in regions]
        lines.append(f"| {q} | " + " | ".join(cells) + f" | {insights['by_quarter'][q]:,.2f} | "
                     + ("-" if growth is None else f"{growth:+.1f}%") + " |")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path(path).with_suffix(".json").write_text(json.dumps(insights, indent=1), encoding="utf-8")
    return {"report": str(Path(path).resolve())}
