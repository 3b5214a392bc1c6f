"""A node in its own process for the flood test: prints its id and port, trusts the node id
given on stdin, listens on port 1001 and reads nothing until a second line ("read") arrives on
stdin; from then on it takes every message."""

from __future__ import annotations

import asyncio
import json
import sys

from pilot_agents import Node


async def main(home: str) -> None:
    loop = asyncio.get_running_loop()
    async with Node(home=home, listen="127.0.0.1:0") as node:
        print(json.dumps({"node_id": node.node_id, "port": node.local_endpoint[1]}), flush=True)
        peer = await loop.run_in_executor(None, sys.stdin.readline)
        node.trust(peer.strip())
        async with node.listen(1001) as listener:
            await loop.run_in_executor(None, sys.stdin.readline)  # "read"
            async for _ in listener:
                pass


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
