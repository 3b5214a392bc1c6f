"""A node in its own process for the restart tests (tests/test_node_converge.py): listens on the
UDP port given (so a restart keeps the address), prints its id and port, trusts the node id
given on stdin, then prints every message it receives on port 1001, one JSON line each."""

from __future__ import annotations

import asyncio
import json
import sys

from pilot_agents import Node


async def main(home: str, port: int) -> None:
    async with Node(home=home, listen=f"127.0.0.1:{port}") as node:
        print(json.dumps({"node_id": node.node_id, "port": node.local_endpoint[1]}), flush=True)
        peer = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        node.trust(peer.strip())
        async with node.listen(1001) as listener:
            print(json.dumps({"listening": True}), flush=True)
            async for message in listener:
                print(json.dumps({"data": message.data.decode()}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
