"""A replier in its own process for the req/rep restart tests (tests/test_patterns_robust.py):
listens on the UDP port given (so a restart keeps the address), prints its id and port, trusts
the node id given on stdin, then serves port 7501: prints each request, one JSON line, and
echoes it, except a request starting with "hold", which it never answers."""

from __future__ import annotations

import asyncio
import json
import sys

from pilot_agents import Node
from pilot_agents.patterns import Request, serving

PORT = 7501


async def handle(request: Request) -> object:
    print(json.dumps({"data": request.data.decode()}), flush=True)
    if request.data.startswith(b"hold"):
        await asyncio.Event().wait()
    return request.data


async def main(home: str, port: int) -> None:
    async with Node(home=home, listen=f"127.0.0.1:{port}") as node:
        print(json.dumps({"node_id": node.node_id, "port": node.local_endpoint[1]}), flush=True)
        peer = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        node.trust(peer.strip())
        async with serving(node, PORT, handle):
            print(json.dumps({"listening": True}), flush=True)
            await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
