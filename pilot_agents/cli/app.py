"""The entry point: the table of command groups, parsing, dispatch and the exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import (
    beacon,
    bridge,
    daemon,
    diagnostics,
    mcp,
    messaging,
    patterns,
    pipeline,
    pushpull,
    trust,
)
from .context import Context, Handler
from .output import exit_status
from .parser import Register
from .parser import build_parser as _build_parser

# In the order `pilotctl --help` lists their commands.
GROUPS: tuple[Register, ...] = (
    daemon.register,
    beacon.register,
    trust.register,
    diagnostics.register_add_peer,
    messaging.register,
    patterns.register,
    pushpull.register,
    mcp.register,
    diagnostics.register,
    bridge.register,
    pipeline.register,
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    return _build_parser(GROUPS, prog)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ctx: Context | None = None
    try:
        beacon_argv = beacon.own_argv(argv)
        if beacon_argv is not None:
            return beacon.run(beacon_argv)
        args = build_parser().parse_args(argv)
        handler: Handler = args.handler
        ctx = Context(args)
        return handler(ctx)
    except BaseException as exc:
        code = exit_status(exc, as_json=ctx is not None and ctx.json)
        if code is None:
            raise
        return code
