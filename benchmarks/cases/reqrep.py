"""The req/rep pattern on embedded Nodes (:class:`Requester` / :class:`Replier` over
:class:`pilot_agents.Node`): the ``tunnel`` case with the pattern's correlation, deadlines and
request objects on top, so that ``benchmarks.trace_rtt`` can split its round trip too.
"""

from __future__ import annotations

from benchmarks.cases.tunnel import SERVICE_PORT, Tunnel, _config, _home
from benchmarks.harness import (
    HOST,
    Control,
    Kind,
    Params,
    Result,
    adrive,
    client_session,
    server_plan,
)
from pilot_agents import Node
from pilot_agents.patterns.reqrep import Replier, Requester


class ReqRep(Tunnel):
    name = "reqrep"
    about = "patterns.reqrep Requester/Replier over Node; pilot_agents.run (uvloop)"

    async def server(self, ctl: Control, p: Params, kind: Kind) -> None:
        plan = server_plan(kind, p)
        client_id: str = ctl.peer()["node_id"]
        async with Node(home=_home(p, "server"), listen=f"{HOST}:0", config=_config(p)) as node:
            node.trust(client_id)
            async with Replier(node, SERVICE_PORT) as replier:
                ctl.publish(node_id=node.node_id, port=node.local_endpoint[1])
                for responder in plan:
                    request = await replier.receive(timeout=p.timeout(kind))
                    responder.feed(request.data)
                    await request.reply(responder.finish())
                await ctl.await_stop()

    async def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        node = Node(home=_home(p, "client"), listen=f"{HOST}:0", config=_config(p))
        ctl.publish(node_id=node.node_id)
        server = ctl.peer()
        async with node as a, Requester(a) as requester:
            a.trust(server["node_id"])
            a.add_peer(server["node_id"], (HOST, server["port"]))

            async def roundtrip(request: bytes) -> bytes:
                reply = await requester.request(server["node_id"], SERVICE_PORT, request,
                                                timeout=p.timeout(kind))
                return reply.data

            return await adrive(client_session(kind, p), roundtrip)


CASE = ReqRep()
