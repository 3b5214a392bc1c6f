"""What ``pilot-agents run`` shows while a pipeline runs: a live table per agent (rich) on a
terminal, one line per event otherwise, one JSON object per event with ``--json``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

Event = dict[str, Any]


def describe(event: Event) -> str | None:
    """One event as a line a person reads (None: nothing to say)."""
    kind = event.get("event")
    if kind == "pipeline":
        return f"pipeline {event['name']}: beacon {event['beacon']}, agents " \
               f"{', '.join(event['agents'])}"
    if kind == "daemon":
        how = "started" if event.get("started") else "already running"
        return f"daemon {how} (node {str(event.get('node_id'))[:12]}, pid {event.get('pid')})"
    if kind == "service":
        return f"service {event['service']} {event['status']}" + \
            (f" (pid {event['pid']})" if event.get("pid") else "")
    if kind == "trust":
        return f"trust with {event['peer']} is mutual"
    if kind == "agent":
        return str(event["status"])
    if kind == "step":
        return _step(event)
    if kind == "done":
        error = f": {event['error']}" if event.get("error") else ""
        return f"{event['status']} after {event.get('duration', 0):.1f} s{error}"
    return None


def _step(event: Event) -> str:
    text = f"{event['step']} ({event['kind']}) {event['status']}"
    if event["status"] == "failed":
        return f"{text}: {event.get('error')}"
    if event["status"] == "done":
        text += f" in {event.get('duration', 0):.2f} s"
        if event.get("to"):
            text += f", {event.get('bytes')} B to {event['to']}:{event.get('port')} " \
                    f"({event.get('path')})"
        elif event.get("from"):
            text += f", {event.get('bytes')} B from {event['from']}"
        elif event.get("subscribers") is not None:
            text += f", {event.get('topic')!r} to {event['subscribers']} subscribers"
    return text


@dataclass
class _Row:
    status: str = "starting"
    step: str = ""
    last: str = ""


class Progress:
    """Takes the events of a run (``__call__``) and shows them; ``close`` prints the summary."""

    def __init__(self, as_json: bool, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.as_json = as_json
        self.rows: dict[str, _Row] = {}
        self.gone = False  # the output's reader (a pipe, a terminal) has closed it
        self.live: Live | None = None
        if not as_json and self.out.isatty():
            self.live = Live(self._table(), console=Console(file=self.out),
                             refresh_per_second=8, transient=False)
            self.live.start()

    def __call__(self, event: Event) -> None:
        if self.as_json:
            self._print(json.dumps(event, separators=(",", ":"), default=str))
            return
        if event.get("event") == "summary":
            self._summary(event)
            return
        agent, text = event.get("agent"), describe(event)
        if agent is not None:
            row = self.rows.setdefault(agent, _Row())
            if event["event"] in ("agent", "done"):
                row.status = str(event["status"])
            if event["event"] == "step":
                row.step = f"{event['step']} ({event['status']})"
            if text:
                row.last = text
        if self.live is not None:
            self.live.update(self._table())
        elif text:
            prefix = f"[{agent}] " if agent else ""
            self._print(prefix + text)

    def _table(self) -> Table:
        table = Table(title="pipeline", expand=False)
        for column in ("agent", "status", "step", "last"):
            table.add_column(column)
        for name, row in self.rows.items():
            table.add_row(name, row.status, row.step, row.last)
        return table

    def _summary(self, event: Event) -> None:
        self.close()
        verdict = "interrupted" if event.get("interrupted") else \
            ("ok" if event["ok"] else "FAILED")
        self._print(f"pipeline {verdict} in {event['duration']:.1f} s")
        for name, agent in event["agents"].items():
            error = f": {agent['error']}" if agent.get("error") else ""
            self._print(f"  {name}: {agent['status']}{error}")
        if event.get("logs"):
            self._print(f"stderr of each agent: {event['logs']}/NAME.log")
        for warning in event.get("warnings", []):
            self._print(f"warning: {warning}")

    def _print(self, line: str) -> None:
        # The run goes on without its reader (`| head`, a closed terminal): an error here would
        # end it before its clean-up, leaving its beacon and services running.
        if self.gone:
            return
        try:
            print(line, file=self.out, flush=True)
        except OSError:
            self.gone = True

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
