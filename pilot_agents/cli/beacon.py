"""``pilot-agents beacon``: the beacon server's own command line, handed its arguments whole.

Its options are parsed by :mod:`pilot_agents.beacon.service`, so the dispatcher picks this
command out before argparse sees the line; the parser only lists it in the help.
"""

from __future__ import annotations

from ..errors import NotAvailableError
from .parser import Commands


def register(commands: Commands) -> None:
    commands.listed("beacon", "run a beacon server (pilot-agents beacon --listen ADDR "
                    "[--data-dir DIR]; its own --help has the rest)")


def own_argv(argv: list[str]) -> list[str] | None:
    """The beacon's own arguments if the command is ``beacon`` (it parses them itself)."""
    i = 0
    while i < len(argv):
        if argv[i] == "--json" or argv[i].startswith("--home="):
            i += 1
        elif argv[i] == "--home":
            i += 2
        else:
            return argv[i + 1:] if argv[i] == "beacon" else None
    return None


def run(argv: list[str]) -> int:
    try:
        from ..beacon import service
    except ImportError as exc:
        raise NotAvailableError(
            f"the beacon is not available in this installation ({exc})"
        ) from None
    result = service.main(argv)
    return int(result or 0)
