"""``python -m pilot_agents.daemon --ready-fd N --options JSON``: the process
:func:`~pilot_agents.daemon.process.start_detached` starts, with every :class:`DaemonOptions`
field (the command line of ``pilotctl daemon start`` has flags for only some of them)."""

from __future__ import annotations

import argparse
import sys

from ..errors import PilotError
from .options import DaemonOptions
from .process import run_foreground


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot_agents.daemon")
    parser.add_argument("--options", required=True, help="DaemonOptions as JSON")
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args()
    try:
        return run_foreground(DaemonOptions.from_json(args.options), args.ready_fd)
    except PilotError as exc:  # reported on the ready pipe already; this goes to the log
        print(f"pilot-agents daemon: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
