"""What connection objects need from the running node, and nothing more.

Streams and connections flush :attr:`Driver.endpoint` after a send, call :meth:`Driver.wake`
when they changed a session outside a datagram (a finish, a reset, credit returned), and
:meth:`Driver.wait_until` to block on the network; the node calls :meth:`progress_made` after
every burst of events. Keeping this apart from :class:`~pilot_agents.node.node.Node` lets the
objects an application holds import downward only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ..errors import ConnectionClosedError, PilotTimeoutError
from ..net.io.endpoint import Endpoint


class Driver:
    """The node's asyncio endpoint (``None`` when not running) and the tasks waiting on it."""

    __slots__ = ("_waiters", "endpoint")

    def __init__(self) -> None:
        self.endpoint: Endpoint | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        """Have the endpoint look at the sessions again (and send what is due) soon."""
        if self.endpoint is not None:
            self.endpoint.wake()

    def progress_made(self) -> None:
        """Re-check every :meth:`wait_until` condition."""
        if not self._waiters:
            return  # the usual case, after every flush and event
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_until(self, condition: Callable[[], bool], timeout: float | None) -> None:
        """Wait for ``condition()`` to hold, re-checked after every burst of network progress."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not condition():
            if self.endpoint is None:
                raise ConnectionClosedError("the node was closed")
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise PilotTimeoutError(f"timed out after {timeout} s")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await waiter
