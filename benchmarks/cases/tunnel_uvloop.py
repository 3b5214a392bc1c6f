"""The tunnel case on uvloop, the C event loop the daemon runs on (``uvloop.run``)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from benchmarks.cases.tunnel import CORE, Tunnel

R = TypeVar("R")


class TunnelUvloop(Tunnel):
    name = "tunnel-uvloop"
    about = f"as tunnel, on uvloop (as the daemon runs); {CORE}"

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        return uvloop.run(main)


CASE = TunnelUvloop()
