"""Trying a one-shot send again while the peer's port refuses it as busy."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import PortBusyError

T = TypeVar("T")
FIRST_PAUSE = 0.05  # seconds before the first try again; doubles
MAX_PAUSE = 1.0


async def while_busy(attempt: Callable[[], Awaitable[T]], deadline: float) -> T:
    """``attempt()``, made again after a pause for as long as the peer refuses it with
    :class:`PortBusyError` (its port holds as many of our streams as one port may: a reader
    behind, whose one-shot messages wait a stream each), until ``deadline`` (the loop's time):
    then that error. The sender slows down to its reader, as a full inbox promises."""
    loop = asyncio.get_running_loop()
    pause = FIRST_PAUSE
    while True:
        try:
            return await attempt()
        except PortBusyError:
            if loop.time() + pause >= deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE)
