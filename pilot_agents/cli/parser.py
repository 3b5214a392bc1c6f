"""The argparse side: the top-level parser, the argument types, and :class:`Commands`, through
which each command-group module adds its subcommands and their handlers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn, TypeVar

from ..errors import ConfigError
from .context import Handler
from .output import EPILOG

_HOME_HELP = "node home (default: $PILOT_HOME or ~/.pilot-agents)"
_JSON_HELP = "machine-readable output"

N = TypeVar("N", int, float)


class UsageError(ConfigError):
    """A command line that did not parse. ``stdout_is_data``: the command's stdout carries
    another protocol (see :meth:`Commands.command`), so the error must stay off it."""

    def __init__(self, message: str, stdout_is_data: bool) -> None:
        super().__init__(message)
        self.stdout_is_data = stdout_is_data


class _Parser(argparse.ArgumentParser):
    stdout_is_data = False

    def error(self, message: str) -> NoReturn:
        # Reported like any user mistake (exit 2, one line; a JSON error with --json), not
        # argparse's way, which prints only to stderr: a script asking for --json got nothing.
        raise UsageError(f"{message} (see '{self.prog} --help')", self.stdout_is_data)


# -- argument types: a bad value is a usage error naming it ----------------------------------


def _number(text: str, convert: Callable[[str], N], kind: str) -> N:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}") from None


def port(text: str) -> int:
    value = _number(text, int, "port number")
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port {value} is not in 1..65535")
    return value


def positive(text: str) -> float:
    value = _number(text, float, "number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def count(text: str) -> int:
    value = _number(text, int, "whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is less than 1")
    return value


def count_up_to(maximum: int) -> Callable[[str], int]:
    """:func:`count`, and at most ``maximum``: a larger one would overflow where it goes (a C
    int), or ask for more than any machine has."""
    def bounded(text: str) -> int:
        value = count(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{text} is more than {maximum}")
        return value
    return bounded


def name_port(text: str) -> tuple[str, int]:
    """``NAME:PORT``: a peer (hostname or node id) and a pilot port."""
    name, colon, number = text.rpartition(":")
    if not colon or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME:PORT (e.g. db-agent:2001)")
    return name, port(number)


def add_until(parser: argparse.ArgumentParser, items: str) -> None:
    """``--count``/``--timeout`` of a command that prints what arrives until it has enough or
    waited long enough (``context.receive_until`` runs that loop)."""
    parser.add_argument("--count", type=count, default=None, metavar="N",
                        help=f"exit after N {items}")
    parser.add_argument("--timeout", type=positive, default=None, metavar="S",
                        help="give up after S seconds")


def ports(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(port(p) for p in text.split(","))


# -- the command tree ---------------------------------------------------------------------------


class Commands:
    """One level of subcommands (``pilotctl COMMAND``, ``pilotctl trust ACTION``)."""

    def __init__(self, action: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
        self._action = action
        self._common = common

    def command(self, name: str, help_text: str, handler: Handler, *,
                stdout_is_data: bool = False) -> argparse.ArgumentParser:
        """A command run by ``handler``; add its arguments to the parser returned.
        ``stdout_is_data``: its stdout carries another protocol (``mcp connect``'s JSON-RPC),
        which an error object of ours would corrupt: its errors, JSON ones too, go to stderr,
        from a usage error on."""
        sub = self._action.add_parser(
            name, help=help_text, description=help_text, parents=[self._common], epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(handler=handler, stdout_is_data=stdout_is_data)
        sub.stdout_is_data = stdout_is_data
        return sub

    def group(self, name: str, help_text: str) -> Commands:
        """A command whose actions are subcommands of it (``pilotctl NAME ACTION``)."""
        parser = self._action.add_parser(name, help=help_text)
        return Commands(parser.add_subparsers(dest=f"{name}_command", metavar="ACTION",
                                              required=True), self._common)

    def listed(self, name: str, help_text: str) -> None:
        """A command shown in the help but parsed by its own code (see ``beacon``)."""
        self._action.add_parser(name, help=help_text, add_help=False)


Register = Callable[[Commands], None]
"""What a command-group module offers: adds its commands."""


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in ("pilotctl", "pilot-agents") else "pilotctl"


def build_parser(groups: Iterable[Register], prog: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``groups`` add their commands in the order ``--help`` lists
    them."""
    # --home and --json are accepted after the command too; there they only count if given.
    common = _Parser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, metavar="DIR", help=_HOME_HELP)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help=_JSON_HELP)

    parser = _Parser(
        prog=prog or _prog(), description="pilot-agents: encrypted P2P tunnels for AI agents.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--home", default=None, metavar="DIR", help=_HOME_HELP)
    parser.add_argument("--json", action="store_true", default=False, help=_JSON_HELP)
    commands = Commands(
        parser.add_subparsers(dest="command", metavar="COMMAND", required=True), common)
    for register in groups:
        register(commands)
    return parser
