"""The tunnel case on asyncio's own event loop (``asyncio.run``): an application that embeds a
Node without starting it through ``pilot_agents.run``, which the ``tunnel`` case does (uvloop)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from benchmarks.cases.tunnel import CORE, Tunnel

R = TypeVar("R")


class TunnelAsyncio(Tunnel):
    name = "tunnel-asyncio"
    about = f"as tunnel, on asyncio's own event loop (asyncio.run); {CORE}"

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        return asyncio.run(main)


CASE = TunnelAsyncio()
