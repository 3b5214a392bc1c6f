"""pilot-agents through its daemons: SDK → daemon → tunnel → daemon → SDK.

Each role starts a daemon of its own (``start_detached``, a process of its own) and talks to it
through :class:`pilot_agents.Client`, so a round trip crosses four processes: the client, its
daemon, the server's daemon and the server. Two cases: ``daemon``, a connection's
``send``/``receive`` answered with ``msg.reply``; ``daemon-reqrep``, the req/rep pattern
(:class:`Requester` / :class:`Replier`) over the same SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pilot_agents
from benchmarks.cases.tunnel import Requests
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
from pilot_agents import Client
from pilot_agents.daemon import DaemonOptions, start_detached, stop
from pilot_agents.patterns.reqrep import Replier, Requester

R = TypeVar("R")

SERVICE_PORT = 2001
"""The virtual port the server listens on (not an inbox port: nothing buffers there before)."""


@contextlib.asynccontextmanager
async def daemon_client(ctl: Control, p: Params, role: str) -> AsyncIterator[tuple[Client, str]]:
    """A daemon of this role's own, trusting the other role's; a Client of it and the other
    daemon's node id. The daemon is stopped on the way out."""
    home = Path(tempfile.mkdtemp(prefix=f"{role}-", dir=p.workdir))
    # The runner ends a role with SIGTERM when its pair fails: unwind, so the daemon stops too.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    options = DaemonOptions(home=home, hostname=role, listen=f"{HOST}:0", inbox_ports=())
    info = start_detached(options)
    try:
        ctl.publish(node_id=info["node_id"], endpoint=info["endpoints"][0])
        peer = ctl.peer()
        async with Client(home) as client:
            await client.add_peer(peer["node_id"], peer["endpoint"])
            await client.trust_add(peer["node_id"])
            yield client, peer["node_id"]
    finally:
        await asyncio.to_thread(stop, home)  # stop() runs an event loop of its own


class Daemon(Case):
    name = "daemon"
    about = "two daemons; sdk.Client conn.send/receive, msg.reply; pilot_agents.run (uvloop)"

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        return pilot_agents.run(main)

    def requests(self, client: Client) -> contextlib.AbstractAsyncContextManager[Requests]:
        """Where the server's requests come from (listened on when entered)."""
        return client.listen(SERVICE_PORT)

    async def server(self, ctl: Control, p: Params, kind: Kind) -> None:
        plan = server_plan(kind, p)
        async with daemon_client(ctl, p, "server") as (client, _), \
                self.requests(client) as requests:
            ctl.publish(listening=True)
            for responder in plan:
                request = await requests.receive(timeout=p.timeout(kind))
                responder.feed(request.data)
                await request.reply(responder.finish())
            await ctl.await_stop()

    async def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        async with daemon_client(ctl, p, "client") as (client, server_id):
            ctl.peer()  # the server listens
            async with client.connect(server_id, SERVICE_PORT) as conn:

                async def roundtrip(request: bytes) -> bytes:
                    await conn.send(request)
                    reply = await conn.receive(timeout=p.timeout(kind))
                    return reply.data

                return await adrive(client_session(kind, p), roundtrip)


class DaemonReqRep(Daemon):
    name = "daemon-reqrep"
    about = "two daemons; patterns.reqrep Requester/Replier over sdk.Client; uvloop"

    def requests(self, client: Client) -> contextlib.AbstractAsyncContextManager[Requests]:
        return Replier(client, SERVICE_PORT)

    async def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        async with daemon_client(ctl, p, "client") as (client, server_id):
            ctl.peer()
            async with Requester(client) as requester:

                async def roundtrip(request: bytes) -> bytes:
                    reply = await requester.request(server_id, SERVICE_PORT, request,
                                                    timeout=p.timeout(kind))
                    return reply.data

                return await adrive(client_session(kind, p), roundtrip)


CASE = Daemon()
