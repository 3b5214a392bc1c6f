"""Two nodes on this machine, an encrypted tunnel between them, messages both ways.

.venv/bin/python examples/two_nodes.py
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time

import pilot_agents
from pilot_agents import Node


async def main() -> None:
    homes = tempfile.mkdtemp(prefix="pilot-example-")
    async with (
        Node(home=f"{homes}/analyst", listen="127.0.0.1:0") as analyst,
        Node(home=f"{homes}/reporter", listen="127.0.0.1:0") as reporter,
    ):
        print(f"analyst   {analyst.node_id}  {analyst.virtual_address}")
        print(f"reporter  {reporter.node_id}  {reporter.virtual_address}")

        # Trust is mutual: each side names the key it accepts.
        analyst.trust(reporter.node_id)
        reporter.trust(analyst.node_id)
        analyst.add_peer(reporter.node_id, reporter.local_endpoint)

        async with (
            reporter.listen(1001) as inbox,
            analyst.connect(reporter.node_id, port=1001) as conn,
        ):
            await conn.send({"rows": 1842, "summary": "Q4 up 23%"})
            message = await inbox.receive(timeout=10)
            print(f"reporter got {message.json()} from {message.sender[:12]}...")
            await message.reply({"status": "report queued"})
            reply = await conn.receive(timeout=10)
            print(f"analyst got reply {reply.json()}; RTT {conn.rtt * 1000:.2f} ms, encrypted")

            payload = os.urandom(16 * 1024 * 1024)
            started = time.perf_counter()
            await conn.send(payload)
            big = await inbox.receive(timeout=60)
            elapsed = time.perf_counter() - started
            intact = hashlib.sha256(big.data).digest() == hashlib.sha256(payload).digest()
            print(
                f"16 MiB message delivered intact={intact} in {elapsed:.2f} s "
                f"({len(payload) / elapsed / 1e6:.0f} MB/s, both nodes in one process)"
            )


if __name__ == "__main__":
    pilot_agents.run(main())  # asyncio.run on uvloop
