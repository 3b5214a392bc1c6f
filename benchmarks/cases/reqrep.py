"""The req/rep pattern on embedded Nodes (:class:`Requester` / :class:`Replier` over
:class:`pilot_agents.Node`): the ``tunnel`` case with the pattern's correlation, deadlines and
request objects on top, so that ``benchmarks.trace_rtt`` can split its round trip too.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from benchmarks.cases.tunnel import SERVICE_PORT, Requests, Tunnel
from pilot_agents import Node
from pilot_agents.patterns.reqrep import Replier, Requester


class ReqRep(Tunnel):
    name = "reqrep"
    about = "patterns.reqrep Requester/Replier over Node; pilot_agents.run (uvloop)"

    def requests(self, node: Node) -> contextlib.AbstractAsyncContextManager[Requests]:
        return Replier(node, SERVICE_PORT)

    @contextlib.asynccontextmanager
    async def asking(self, node: Node, server_id: str,
                     timeout: float) -> AsyncIterator[Callable[[bytes], Awaitable[bytes]]]:
        async with Requester(node) as requester:

            async def roundtrip(request: bytes) -> bytes:
                reply = await requester.request(server_id, SERVICE_PORT, request,
                                                timeout=timeout)
                return reply.data

            yield roundtrip


CASE = ReqRep()
