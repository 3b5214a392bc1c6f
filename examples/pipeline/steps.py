"""The example's own steps, between the MCP tool calls: plain functions of the state (a dict)
that return the keys they set. pipeline.yaml names them as ``steps:FUNCTION``.

The tools answer in text (mcp-server-fetch: the page after a "Contents of URL:" line;
mcp-alchemy: rows as "N. row" then "column: value" lines, or "Error: ..."), so these read it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

COLUMNS = ("date", "order_id", "region", "product", "units", "unit_price")


def text_of(value: Any) -> str:
    """A tool's result as text: a structured ``{"result": TEXT}`` or the text itself."""
    if isinstance(value, dict) and isinstance(value.get("result"), str):
        return str(value["result"])
    return value if isinstance(value, str) else json.dumps(value)


def sql_ok(value: Any, what: str) -> str:
    text = text_of(value)
    if text.startswith("Error:"):
        raise RuntimeError(f"{what}: {text}")
    return text


def csv_from_page(state: dict[str, Any]) -> dict[str, Any]:
    """The scraper: the CSV out of mcp-server-fetch's answer (after a "Contents of URL:" line;
    a truncated page says so at its end)."""
    page = text_of(state["page"])
    start = re.search(r"^Contents of \S+:\n", page, re.MULTILINE)
    if start is None or "<error>Content truncated." in page:
        raise RuntimeError(f"unexpected answer from fetch: {page[:200]!r}")
    body = page[start.end():]
    if not body.startswith(",".join(COLUMNS)):
        raise RuntimeError(f"the page is not the sales CSV: {body[:100]!r}")
    return {"csv": body}


def insert_statement(state: dict[str, Any]) -> dict[str, Any]:
    """The analyzer: one INSERT of every row, its values as bound parameters (never pasted into
    the SQL)."""
    rows = list(csv.DictReader(io.StringIO(state["csv"])))
    values, params = [], {}
    for i, row in enumerate(rows):
        values.append("(" + ", ".join(f":{c}_{i}" for c in COLUMNS) + ")")
        params.update({f"{c}_{i}": row[c] for c in COLUMNS})
        params[f"units_{i}"] = int(row["units"])
        params[f"unit_price_{i}"] = float(row["unit_price"])
    query = f"INSERT INTO sales ({', '.join(COLUMNS)}) VALUES " + ", ".join(values)
    return {"insert_sql": query, "insert_params": params, "rows": len(rows)}


def rows_of(value: Any, what: str) -> list[dict[str, str]]:
    """mcp-alchemy's rows ("1. row", then "column: value" lines) as dicts."""
    rows: list[dict[str, str]] = []
    for line in sql_ok(value, what).splitlines():
        if re.fullmatch(r"\d+\. row", line):
            rows.append({})
        elif rows and ": " in line:
            column, _, cell = line.partition(": ")
            rows[-1][column] = cell
    if not rows:
        raise RuntimeError(f"{what}: no rows ({text_of(value)[:200]!r})")
    return rows


def insights(state: dict[str, Any]) -> dict[str, Any]:
    """The analyzer: the query results as numbers, checked, for the reporter."""
    for key in ("dropped", "created"):
        sql_ok(state[key], key)
    inserted = sql_ok(state["inserted"], "insert")
    if f"{state['rows']} rows affected" not in inserted:
        raise RuntimeError(f"insert: {inserted!r}, expected {state['rows']} rows")
    by_region: dict[str, dict[str, float]] = {}
    for row in rows_of(state["region_rows"], "totals by quarter and region"):
        by_region.setdefault(row["quarter"], {})[row["region"]] = float(row["total"])
    by_quarter, growth = {}, {}
    for row in rows_of(state["quarter_rows"], "totals by quarter"):
        by_quarter[row["quarter"]] = float(row["total"])
        if row["growth_percent"] != "NULL":
            growth[row["quarter"]] = float(row["growth_percent"])
    return {"insights": {"by_quarter_region": by_region, "by_quarter": by_quarter,
                         "growth_percent": growth, "rows": state["rows"],
                         "source": state.get("csv_from")}}


def chart(insights: dict[str, Any], path: Path) -> None:
    """Sales by quarter, one bar per region (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quarters = list(insights["by_quarter_region"])
    regions = sorted({r for q in insights["by_quarter_region"].values() for r in q})
    width = 0.8 / max(len(regions), 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, region in enumerate(regions):
        ax.bar([q + (i - (len(regions) - 1) / 2) * width for q in range(len(quarters))],
               [insights["by_quarter_region"][q].get(region, 0.0) for q in quarters],
               width, label=region)
    ax.set_xticks(range(len(quarters)), quarters)
    ax.set_ylabel("sales")
    ax.set_title("Sales by quarter and region")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(state: dict[str, Any], path: str) -> dict[str, Any]:
    """The reporter: report.md with chart.png, report.json with the numbers, and the summary
    (its subject and text) for the sinks."""
    data = state["insights"]
    report = Path(path).resolve()
    png = report.with_name("chart.png")
    chart(data, png)
    regions = sorted({r for q in data["by_quarter_region"].values() for r in q})
    best = max(data["by_quarter"], key=data["by_quarter"].get)
    total = sum(data["by_quarter"].values())
    summary = (f"{data['rows']} sales, {total:,.2f} in all; the best quarter is {best} "
               f"({data['by_quarter'][best]:,.2f}).")
    lines = ["# Sales report", "", summary, "",
             f"Fetched by {data.get('source')}, analyzed in SQL by {state.get('insights_from')}.",
             "", f"![Sales by quarter and region]({png.name})", "",
             "| quarter | " + " | ".join(regions) + " | total | growth |",
             "|---" * (len(regions) + 3) + "|"]
    for q, by_region in data["by_quarter_region"].items():
        growth = data["growth_percent"].get(q)
        cells = [f"{by_region.get(r, 0.0):,.2f}" for r in regions]
        lines.append(f"| {q} | " + " | ".join(cells) + f" | {data['by_quarter'][q]:,.2f} | "
                     + ("-" if growth is None else f"{growth:+.1f}%") + " |")
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report.with_suffix(".json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    body = "\n".join([summary, "", *lines[8:], "", f"The full report: {report}"])
    return {"report": str(report), "subject": f"Sales report: {best} best, {total:,.2f} in all",
            "summary": body, "attachments": [str(png)], "chat_text": f"{summary} {report}"}
