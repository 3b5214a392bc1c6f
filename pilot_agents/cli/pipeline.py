"""``pilotctl validate FILE`` and ``pilotctl run FILE [--agent NAME --beacon ADDR]``: YAML
pipelines (pilot_agents.pipeline; docs/pipeline.md)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ..addressing import parse_beacon_list
from ..errors import ConfigError
from .context import Context
from .output import EXIT_OK, EXIT_USAGE, emit
from .parser import Commands


def register(commands: Commands) -> None:
    validate = commands.command("validate", "check a YAML pipeline file", validate_cmd)
    validate.add_argument("pipeline", metavar="PIPELINE.yaml")
    run = commands.command(
        "run", "run a YAML pipeline: every agent on this machine, or one with --agent", run_cmd)
    run.add_argument("pipeline", metavar="PIPELINE.yaml")
    run.add_argument("--agent", metavar="NAME",
                     help="run only this agent, with the daemon of --home (started if none "
                     "runs), so the file deploys over several machines")
    run.add_argument("--beacon", default=os.environ.get("PILOT_BEACON") or None,
                     metavar="HOST:PORT", help="the beacon (default: the file's, else "
                     "$PILOT_BEACON; without --agent and none given, one is started)")
    run.add_argument("--homes", default=None, metavar="DIR",
                     help="keep the agents' homes (keys, trust) in DIR/AGENT, so a beacon that "
                     "remembers names sees the same keys next run (default: new homes in a "
                     "temporary directory, removed at the end)")
    run.add_argument("--listen", default=None, metavar="ADDR",
                     help="UDP address of a daemon started by --agent (default 0.0.0.0:0)")


def validate_cmd(ctx: Context) -> int:
    from ..pipeline.load import InvalidPipeline, load

    try:
        loaded = load(ctx.args.pipeline)
    except InvalidPipeline as exc:
        if not ctx.json:
            raise
        # One document, the report: the error object too would make two, which json.load
        # refuses.
        emit({"valid": False, "problems": [p.to_json() for p in exc.problems]})
        return EXIT_USAGE
    spec = loaded.spec
    if ctx.json:
        emit({"valid": True, "name": loaded.name, "agents": {
            name: {"hostname": spec.hostname(name), "steps": agent.node_ids(),
                   "peers": spec.peers_of(name)} for name, agent in spec.agents.items()}})
        return EXIT_OK
    print(f"{ctx.args.pipeline}: valid pipeline {loaded.name!r}")
    for name, agent in spec.agents.items():
        peers = ", ".join(spec.peers_of(name)) or "none"
        print(f"  {name} ({spec.hostname(name)}): {' -> '.join(agent.node_ids())}; "
              f"trusts {peers}")
    return EXIT_OK


def run_cmd(ctx: Context) -> int:
    import asyncio

    from ..pipeline.load import load
    from ..pipeline.progress import Progress
    from ..pipeline.run import AgentRun, run_one, run_pipeline
    from ..runtime import interruptible

    args = ctx.args
    loaded = load(args.pipeline)
    if args.beacon is not None:
        # Checked before anything starts, as the file's beacon: is: each agent's daemon
        # would refuse it, one after the other, once the run had started the rest.
        parse_beacon_list(args.beacon)
    if args.agent is None:
        if args.listen is not None:
            raise ConfigError("--listen is for --agent (a whole run listens on 127.0.0.1)")
        homes = None if args.homes is None else Path(args.homes).resolve()
        progress = Progress(ctx.json)
        try:
            code = asyncio.run(interruptible(
                lambda: run_pipeline(loaded, progress, beacon=args.beacon, homes=homes))())
        finally:
            progress.close()
        return int(code)
    if args.homes is not None:
        raise ConfigError("--homes is for a whole run; --agent uses --home")
    if args.agent not in loaded.spec.agents:
        raise ConfigError(f"{args.pipeline} has no agent {args.agent!r} (it has "
                          f"{', '.join(loaded.spec.agents)})")
    with _stdout_for_events() as out:
        progress = Progress(ctx.json, out)
        try:
            return run_one(AgentRun(loaded, args.agent, Path(ctx.home),
                                    args.beacon or loaded.spec.beacon,
                                    listen=args.listen or "0.0.0.0:0", emit=progress))
        finally:
            progress.close()


@contextlib.contextmanager
def _stdout_for_events() -> Iterator[TextIO]:
    """This process's stdout as a stream of the events' own, while stdout itself (fd 1: print,
    and the programs a step starts) goes to stderr: a step's output would break into the event
    lines, which a whole run reads as JSON."""
    sys.stdout.flush()
    events = os.dup(1)
    os.dup2(2, 1)
    try:
        with os.fdopen(events, "w", buffering=1, closefd=False) as out:
            yield out
    finally:
        sys.stdout.flush()
        os.dup2(events, 1)
        os.close(events)
