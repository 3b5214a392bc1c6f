"""MCP through tunnels: a stdio MCP server behind NAT, reached by hostname.

The serving side (``pilotctl mcp serve --port 80 -- CMD ARGS...``, or :class:`McpServer`) runs
one server process per remote session: MCP sessions are stateful (the ``initialize`` handshake,
subscriptions, a server's own state), so two clients never share a process. At most
``max_sessions`` run at once; more are refused with a reason the client raises. A session ends
when its client says so, when its client is heard from no more for ``peer_timeout`` seconds
(both sides send heartbeats while idle), when nothing but heartbeats passed for
``idle_timeout`` seconds (if set), or when its server process exits: then the client sees the
error, with the end of the server's stderr. Ending a session stops its process the way the MCP
spec says (stdin closed, then SIGTERM, then SIGKILL, to its whole process group).

The client side:

    async with pilot_agents.integrations.mcp.connect("db-tool-server", port=80) as session:
        tools = await session.list_tools()          # an initialized mcp.ClientSession

    async with mcp.Client(tunnel("db-tool-server", 80)) as client:   # any mcp client
        ...

and ``pilotctl mcp connect db-tool-server:80``, a local stdio MCP server forwarding to the remote
one, for MCP clients configured with a command (desktop apps, IDEs).

On the wire, each session is one tunnel stream (a :class:`~pilot_agents.transport.Connection`)
and each tunnel message carries one JSON-RPC message, its UTF-8 JSON text as the server wrote it
on a line (the line break dropped). JSON-RPC is forwarded without being interpreted, so every
handshake (``initialize``, ``server/discover``) and method passes. A message whose first byte
is 0 is ours (JSON text never starts with 0): byte 1 says which, the rest is UTF-8 text:
``OPEN`` (client, first message), ``READY`` (server: the process runs), ``END`` (either side,
with the reason; empty when the client just leaves), ``HEARTBEAT`` (either side, after
``heartbeat_interval`` seconds with nothing sent). See docs/mcp.md.
"""

from typing import TYPE_CHECKING, Any

from .remote import (
    DEFAULT_MCP_PORT,
    McpConfig,
    McpServer,
    RemoteSession,
    SessionEvent,
    connect,
    remote_session,
    tunnel,
)

if TYPE_CHECKING:
    from .tool import McpTool


def __getattr__(name: str) -> Any:
    # McpTool needs langchain_core, which takes most of a second to import: only on first use,
    # so `pilotctl mcp connect` (and every other command) starts without it.
    if name == "McpTool":
        from .tool import McpTool

        return McpTool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MCP_PORT", "McpConfig", "McpServer", "McpTool", "RemoteSession", "SessionEvent",
    "connect", "remote_session", "tunnel",
]
