"""Running an application's event loop the way the daemon runs its own."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop where it is installed (a dependency on Linux and macOS).

    uvloop's C event loop takes about an eighth off a tunnel round trip (benchmarks/RESULTS.md);
    the daemon runs on it. A Node works on any asyncio loop: plain ``asyncio.run`` is fine too.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
