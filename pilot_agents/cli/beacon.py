"""``pilot-agents beacon``: the beacon server's own command line, handed its arguments whole.

Its options are parsed by :mod:`pilot_agents.beacon.service`, so the dispatcher picks this
command out before argparse sees the line; the parser only lists it in the help.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, NotAvailableError
from .parser import Commands


def register(commands: Commands) -> None:
    commands.listed("beacon", "run a beacon server (pilot-agents beacon --listen ADDR "
                    "[--data-dir DIR]; its own --help has the rest)")


def own_argv(argv: list[str]) -> list[str] | None:
    """The beacon's own arguments if the command is ``beacon`` (it parses them itself). A
    global ``--home`` before it sets where its data directory defaults to (HOME/beacon, as
    ``$PILOT_HOME`` does); ``--json`` is refused rather than ignored: a server prints no
    documents (its numbers are in ``--stats`` and ``--metrics``)."""
    home: str | None = None
    as_json = False
    i = 0
    while i < len(argv):
        if argv[i] == "--json":
            as_json = True
            i += 1
        elif argv[i].startswith("--home="):
            home = argv[i].removeprefix("--home=")
            i += 1
        elif argv[i] == "--home":
            home = argv[i + 1] if i + 1 < len(argv) else None
            i += 2
        elif argv[i] != "beacon":
            return None
        else:
            own = argv[i + 1:]
            if as_json:
                raise ConfigError("the beacon prints no JSON (it is a server): its numbers are "
                                  "in --stats (a line per interval) and --metrics "
                                  "(Prometheus)")
            given = any(a == "--data-dir" or a.startswith("--data-dir=") for a in own)
            if home is not None and not given:
                own += ["--data-dir", str(Path(home) / "beacon")]
            return own
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
