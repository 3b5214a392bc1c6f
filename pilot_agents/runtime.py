"""Running an application's event loop the way the daemon runs its own."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop a command or an agent: Ctrl-C, a supervisor's stop, its terminal closed."""


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


def interruptible(main: Callable[[], Awaitable[T]]) -> Callable[[], Coroutine[Any, Any, T]]:
    """``main`` cancelled (once) by any of :data:`STOPPING`, so that its clean-up runs (stops
    what it started, gives back a listened port); a second signal while it cleans up does
    nothing. A ``main`` that does not catch the cancel ends in CancelledError, out of
    ``asyncio.run`` too."""
    async def wrapped() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(main())
        stopping = False

        def stop() -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                task.cancel()

        for sig in STOPPING:
            loop.add_signal_handler(sig, stop)
        try:
            return await task
        finally:
            for sig in STOPPING:
                loop.remove_signal_handler(sig)
    return wrapped
