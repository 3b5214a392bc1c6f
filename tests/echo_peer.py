"""A node in its own process for tests: prints its id and port, trusts the node id given on
stdin, then answers every message on port 1001 with its length and SHA-256."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys

from pilot_agents import Node


async def main(home: str) -> None:
    async with Node(home=home, listen="127.0.0.1:0") as node:
        print(json.dumps({"node_id": node.node_id, "port": node.local_endpoint[1]}), flush=True)
        peer = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        node.trust(peer.strip())
        async with node.listen(1001) as listener:
            async for message in listener:
                digest = hashlib.sha256(message.data).hexdigest()
                await message.reply({"size": len(message.data), "sha256": digest})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
