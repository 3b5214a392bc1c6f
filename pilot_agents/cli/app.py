"""The entry point: the table of command groups, parsing, dispatch and the exit status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import ConfigError
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
from .parser import Register, UsageError
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
    open_closed_standard_streams()
    ctx: Context | None = None
    try:
        beacon_argv = beacon.own_argv(argv)
        if beacon_argv is not None:
            return beacon.run(beacon_argv)
        check_text(argv)
        args = build_parser().parse_args(argv)
        handler: Handler = args.handler
        ctx = Context(args)
        return handler(ctx)
    except BaseException as exc:
        # Before a Context (a line that did not parse), --json is looked for in the line
        # itself, so that a script's usage error is a JSON error object too.
        as_json = ctx.json if ctx is not None else "--json" in own(argv)
        if isinstance(exc, UsageError):  # of the type a script gets for any wrong argument
            code = exit_status(ConfigError(str(exc)), as_json, exc.stdout_is_data)
        else:
            code = exit_status(exc, as_json, ctx is not None and ctx.stdout_is_data)
        if code is None:
            raise
        return code


def own(argv: list[str]) -> list[str]:
    """The arguments that are ours: those before a lone '--' (after it: another command's)."""
    return argv[:argv.index("--")] if "--" in argv else argv


def check_text(argv: list[str]) -> None:
    """ConfigError for an argument that is not UTF-8: Python hands its bytes over as lone
    surrogates, which fail deep in a command (an internal error) or in the daemon."""
    for arg in own(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"argument {os.fsencode(arg)!r} is not UTF-8 text (binary data "
                              "goes in a file: send --file, push --stdin)") from None


def open_closed_standard_streams() -> None:
    """Put /dev/null on a closed stdin, stdout or stderr (a command started with ``<&-``, or
    by a supervisor that closes them). Left closed, the number is the next one a socket or
    uvloop opens: reading stdin then hung (connect, push --stdin), failed as an internal
    error (send --file -), or aborted the process in uvloop (request, serve, mcp connect)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        opened = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
        if opened != fd:
            os.dup2(opened, fd)
            os.close(opened)
        setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 (open for the process)
