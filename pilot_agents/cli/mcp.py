"""``pilotctl mcp serve|connect``: a stdio MCP server behind NAT, reached by hostname
(:mod:`pilot_agents.integrations.mcp` through the daemon).

``serve`` runs one server process per remote session until stopped; ``connect`` is a stdio MCP
server itself, forwarding every JSON-RPC line to the remote one, so an MCP client configured
with a command (``"command": "pilotctl", "args": ["mcp", "connect", "NAME:PORT"]``) reaches it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import shutil
import sys
import time
from dataclasses import asdict

from ..errors import ConfigError, McpSessionError
from ..integrations.mcp import DEFAULT_MCP_PORT, McpConfig, McpServer, RemoteSession, SessionEvent
from ..sdk import Client
from .context import Context
from .output import EXIT_OK, emit, plural
from .parser import Commands, count, name_port, port, positive
from .stdin import stdin_lines

_DEFAULTS = McpConfig()


def register(commands: Commands) -> None:
    group = commands.group("mcp", "MCP servers through tunnels: serve one behind NAT, connect "
                           "an MCP client to one by hostname")
    sub = group.command(
        "serve", "expose a stdio MCP server to trusted peers: one process of CMD per remote "
        "session (pilotctl mcp serve --port 80 -- CMD ARGS...)", serve_cmd)
    sub.add_argument("--port", type=port, default=DEFAULT_MCP_PORT, metavar="PORT",
                     help=f"the port to serve on (default {DEFAULT_MCP_PORT})")
    sub.add_argument("--max-sessions", type=count, default=_DEFAULTS.max_sessions, metavar="N",
                     help="server processes at once, an ended session's counting until it "
                     "has stopped; more sessions are refused (default "
                     f"{_DEFAULTS.max_sessions})")
    sub.add_argument("--max-sessions-per-peer", type=count, default=None, metavar="N",
                     help="of those, the sessions of one peer node at once, so that one peer "
                     "cannot hold them all (default: half of --max-sessions)")
    sub.add_argument("--idle-timeout", type=positive, default=None, metavar="S",
                     help="end a session after S seconds without a JSON-RPC message either "
                     "way (default: never; a silent client is dropped after "
                     f"{_DEFAULTS.peer_timeout:g} s anyway)")
    sub.add_argument("--max-message-bytes", type=count, default=_DEFAULTS.max_message_bytes,
                     metavar="N", help="the largest JSON-RPC message either way (default "
                     f"{_DEFAULTS.max_message_bytes})")
    sub.add_argument("server", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                     help="the stdio MCP server's command line, after '--'")

    sub = group.command(
        "connect", "be a stdio MCP server that forwards to the one a peer serves (put "
        "'pilotctl mcp connect NAME:PORT' as the command in an MCP client's config)", connect_cmd,
        stdout_is_data=True)
    sub.add_argument("target", type=name_port, metavar="NAME:PORT")
    sub.add_argument("--timeout", type=positive, default=_DEFAULTS.connect_timeout, metavar="S",
                     help="seconds to reach the peer (default "
                     f"{_DEFAULTS.connect_timeout:g})")
    sub.add_argument("--max-message-bytes", type=count, default=_DEFAULTS.max_message_bytes,
                     metavar="N", help="the largest JSON-RPC message either way (default "
                     f"{_DEFAULTS.max_message_bytes})")
    sub.add_argument("--drain-timeout", type=positive, default=_DEFAULTS.drain_timeout,
                     metavar="S", help="once stdin ends, seconds to wait for answers still due; "
                     f"then exit with an error (default {_DEFAULTS.drain_timeout:g})")


# -- serve --------------------------------------------------------------------------------------


def serve_cmd(ctx: Context) -> int:
    args = ctx.args
    argv = list(args.server)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise ConfigError("mcp serve needs the MCP server's command after '--' (e.g. "
                          "pilotctl mcp serve --port 80 -- uvx mcp-server-time)")
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"mcp serve: no command {argv[0]!r} found (not on PATH, or not "
                          "executable)")
    config = McpConfig(max_sessions=args.max_sessions,
                       max_sessions_per_peer=args.max_sessions_per_peer,
                       idle_timeout=args.idle_timeout,
                       max_message_bytes=args.max_message_bytes)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("pilot_agents.integrations.mcp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def on_event(event: SessionEvent) -> None:
        emit({"time": time.time(), **asdict(event)})

    async def body(client: Client) -> int:
        server = McpServer(client, args.port, argv, config=config,
                           on_event=on_event if ctx.json else None)

        def listening() -> None:  # not before: a client reaching the port then was refused
            print(f"Serving MCP server {shlex.join(argv)} on port {args.port} (up to "
                  f"{config.max_sessions} sessions); Ctrl-C stops.", file=sys.stderr,
                  flush=True)

        await server.serve(listening)
        return EXIT_OK

    return ctx.run_client(body, EXIT_OK)


# -- connect ------------------------------------------------------------------------------------


def connect_cmd(ctx: Context) -> int:
    name, number = ctx.args.target
    config = McpConfig(max_message_bytes=ctx.args.max_message_bytes,
                       connect_timeout=ctx.args.timeout, drain_timeout=ctx.args.drain_timeout)
    return ctx.run_client(lambda client: _forward(client, name, number, config), EXIT_OK)


def _write(data: bytes) -> None:
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.buffer.flush()


async def _forward(client: Client, name: str, number: int, config: McpConfig) -> int:
    """stdin's lines to the remote server, its messages to stdout, until stdin ends (the MCP
    client is done) or the session does (an error naming why, exit status 1)."""
    readline = await stdin_lines(config.max_message_bytes, "a message")
    async with RemoteSession(client, name, number, config) as remote:

        async def upstream() -> None:
            while line := await readline():
                if message := line.rstrip(b"\r\n"):
                    await remote.send(message)
            # An MCP client closes stdin to end the session: answers on their way still come.
            try:
                async with asyncio.timeout(config.drain_timeout):
                    await remote.all_answered()
            except TimeoutError:
                raise McpSessionError(
                    f"{plural(remote.unanswered, 'request')} had no answer "
                    f"{config.drain_timeout:g} s after stdin ended") from None

        async def downstream() -> None:
            try:
                while True:
                    _write(await remote.receive())
            except McpSessionError:
                for error in remote.unanswered_errors():
                    _write(error)
                raise

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # raises the session's end, or stdin's error
    return EXIT_OK
