"""pilot-agents' own tunnel, through the embedded Node API (two nodes, two processes, loopback).

Where ``pilot_agents.Node`` can't be imported, neither can this module, and the case reports
itself unavailable with that ImportError.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pilot_agents
from benchmarks.harness import (
    HOST,
    Case,
    Control,
    Kind,
    Params,
    Result,
    adrive,
    client_session,
    server_plan,
)
from pilot_agents import Node
from pilot_agents.net.tunnel import session
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.congestion import CongestionConfig

CORE = "compiled core (mypyc)" if not session.__file__.endswith(".py") else "pure-Python core"
"""Which build of the protocol core ran: setup.py compiles it when a C compiler is at hand."""

R = TypeVar("R")

SERVICE_PORT = 1001
"""The virtual port the server listens on."""


class Request(Protocol):
    data: bytes

    async def reply(self, data: bytes) -> None: ...


class Requests(Protocol):
    """A listener or a replier, as the server role uses either."""

    async def receive(self, timeout: float | None = ...) -> Request: ...


class Tunnel(Case):
    name = "tunnel"
    about = f"Node.connect, conn.send/receive, msg.reply; pilot_agents.run (uvloop); {CORE}"

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        """As the README starts an application that embeds a Node."""
        return pilot_agents.run(main)

    async def server(self, ctl: Control, p: Params, kind: Kind) -> None:
        plan = server_plan(kind, p)
        client_id: str = ctl.peer()["node_id"]
        async with Node(home=_home(p, "server"), listen=f"{HOST}:0", config=_config(p)) as node:
            node.trust(client_id)
            async with self.requests(node) as requests:
                ctl.publish(node_id=node.node_id, port=node.local_endpoint[1])
                for responder in plan:
                    request = await requests.receive(timeout=p.timeout(kind))
                    responder.feed(request.data)
                    await request.reply(responder.finish())
                await ctl.await_stop()

    def requests(self, node: Node) -> contextlib.AbstractAsyncContextManager[Requests]:
        """Where the server's requests come from (listened on when entered)."""
        return node.listen(SERVICE_PORT)

    async def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        node = Node(home=_home(p, "client"), listen=f"{HOST}:0", config=_config(p))
        ctl.publish(node_id=node.node_id)
        server = ctl.peer()
        async with node as a:
            a.trust(server["node_id"])
            a.add_peer(server["node_id"], (HOST, server["port"]))
            async with self.asking(a, server["node_id"], p.timeout(kind)) as roundtrip:
                return await adrive(client_session(kind, p), roundtrip)

    @contextlib.asynccontextmanager
    async def asking(self, node: Node, server_id: str,
                     timeout: float) -> AsyncIterator[Callable[[bytes], Awaitable[bytes]]]:
        """The client's round trip: a request out, its answer's bytes back."""
        async with node.connect(server_id, port=SERVICE_PORT) as conn:

            async def roundtrip(request: bytes) -> bytes:
                await conn.send(request)
                reply = await conn.receive(timeout=timeout)
                return reply.data

            yield roundtrip


def _config(p: Params) -> SessionConfig:
    config = SessionConfig()
    if p.congestion:
        config.congestion = CongestionConfig(algorithm=p.congestion)
    return config


def _home(p: Params, role: str) -> str:
    return str(Path(p.workdir) / f"tunnel-{role}")


CASE = Tunnel()
