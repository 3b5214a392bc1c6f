"""``pilotctl run PIPELINE.yaml``: named in the help already; pipelines are not available yet."""

from __future__ import annotations

from ..errors import NotAvailableError
from .context import Context
from .parser import Commands


def register(commands: Commands) -> None:
    sub = commands.command("run", "run a YAML pipeline (not available yet)", run_cmd)
    sub.add_argument("pipeline", metavar="PIPELINE.yaml")


def run_cmd(ctx: Context) -> int:
    raise NotAvailableError(f"cannot run {ctx.args.pipeline}: pipelines are not available yet")
