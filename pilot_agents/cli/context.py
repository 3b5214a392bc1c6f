"""What every command handler gets: its arguments, the home, ``--json``, and the daemon."""

from __future__ import annotations

import argparse
import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from .. import ipc
from ..ipc import IpcClient
from .output import Reply

T = TypeVar("T")


class Context:
    """One parsed command line. ``home`` is resolved on first use: a command that needs no home
    (``run``, a usage error) works where none can be found."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json = bool(getattr(args, "json", False))
        self._home_arg: str | None = getattr(args, "home", None)

    @functools.cached_property
    def home(self) -> Path:
        return ipc.resolve_home(self._home_arg)

    def run(self, body: Callable[[IpcClient], Awaitable[T]]) -> T:
        """Run ``body`` with a client of this home's daemon, in an event loop of its own."""
        async def go() -> T:
            async with IpcClient(self.home) as client:
                return await body(client)

        return asyncio.run(go())

    def call(self, cmd: str, **request: object) -> Reply:
        """One request to the daemon: its reply, or the error it reports raised."""
        # wait=None: the client waits for the request's own timeout plus its margin.
        return self.run(lambda client: client.request(cmd, None, **request))


Handler = Callable[[Context], int]
"""A command: runs it with its context and returns the exit status."""
