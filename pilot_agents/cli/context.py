"""What every command handler gets: its arguments, the home, ``--json``, and the daemon."""

from __future__ import annotations

import argparse
import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from .. import ipc
from ..errors import PilotTimeoutError
from ..ipc import IpcClient
from ..runtime import interruptible, run
from ..sdk import Client
from .output import EXIT_INTERRUPTED, Reply, interrupted

T = TypeVar("T")


class Context:
    """One parsed command line. ``home`` is resolved on first use: a command that needs no home
    (``run``, a usage error) works where none can be found."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json = bool(getattr(args, "json", False))
        # A command whose stdout carries another protocol (parser.Commands.command).
        self.stdout_is_data = bool(getattr(args, "stdout_is_data", False))
        self._home_arg: str | None = getattr(args, "home", None)

    @functools.cached_property
    def home(self) -> Path:
        return ipc.resolve_home(self._home_arg)

    def run(self, body: Callable[[IpcClient], Awaitable[T]]) -> T:
        """Run ``body`` with a client of this home's daemon, in an event loop of its own.
        SIGINT, SIGTERM and SIGHUP cancel it (what it opened in the daemon, such as a listened
        port, is closed) and raise KeyboardInterrupt, which the command reports as
        interrupted."""
        async def go() -> T:
            async with IpcClient(self.home) as client:
                return await body(client)

        try:
            return asyncio.run(interruptible(go)())
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None

    def run_client(self, body: Callable[[Client], Awaitable[int]], stopped_status: int) -> int:
        """Run ``body`` with an SDK client of the home's daemon, on uvloop. A signal cancels
        it, as in :meth:`run`, and the command ends with ``stopped_status``
        (EXIT_INTERRUPTED: reported as :func:`.output.interrupted`, as Ctrl-C is in any
        command)."""
        async def go() -> int:
            async with Client(self.home) as client:
                return await body(client)

        try:
            return run(interruptible(go)())
        except asyncio.CancelledError:
            if stopped_status == EXIT_INTERRUPTED:
                return interrupted(self.json, self.stdout_is_data)
            return stopped_status

    def call(self, cmd: str, **request: object) -> Reply:
        """One request to the daemon: its reply, or the error it reports raised."""
        # wait=None: the client waits for the request's own timeout plus its margin.
        return self.run(lambda client: client.request(cmd, None, **request))


Handler = Callable[[Context], int]
"""A command: runs it with its context and returns the exit status."""


async def receive_until(receive: Callable[[float | None], Awaitable[T]],
                        each: Callable[[T], None], *, count: int | None, timeout: float | None,
                        what: str, source: str) -> None:
    """Hand ``each`` what ``receive(remaining seconds)`` returns until ``count`` items came (None:
    no end) or ``timeout`` seconds passed. Running out of time is PilotTimeoutError ("no
    {what} {source} within ...", or "received k of n {what}s ..."), unless there is no
    ``count`` and something came: then it is the end the user asked for."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    received = 0
    while count is None or received < count:
        remaining = None if deadline is None else deadline - loop.time()
        try:
            if remaining is not None and remaining <= 0:
                raise PilotTimeoutError("out of time")
            item = await receive(remaining)
        except PilotTimeoutError:
            if received and count is None:
                return
            raise PilotTimeoutError(
                f"received {received} of {count} {what}s {source} within {timeout:g} s"
                if count else f"no {what} {source} within {timeout:g} s") from None
        received += 1
        each(item)
