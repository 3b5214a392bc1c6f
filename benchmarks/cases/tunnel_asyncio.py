"""The tunnel case on asyncio's own event loop (``asyncio.run``): an application that embeds a
Node without starting it through ``pilot_agents.run``, which the ``tunnel`` case does (uvloop)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from benchmarks.cases.tunnel import CORE, Tunnel
from benchmarks.harness import Case

R = TypeVar("R")


class TunnelAsyncio(Tunnel):
    name = "tunnel-asyncio"
    about = f"as tunnel, on asyncio's own event loop (asyncio.run); {CORE}"

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        return Case.run_async(self, main)  # the harness's default: asyncio.run


CASE = TunnelAsyncio()
