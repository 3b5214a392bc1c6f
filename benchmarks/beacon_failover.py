"""How long a node takes to leave a dead beacon of its fleet, and its relayed tunnel to recover.

Two beacon processes on one redis-server (tests/redis_server.py) and one key; two embedded
nodes on loopback, alpha given ``A,B`` and bravo ``B,A`` (each its own home first), with the
default keepalive interval (5 s), a tunnel relayed through bravo's home (no punching). Each
round kills bravo's home with SIGKILL at a random moment of the keepalive cycle and measures
from the kill: when bravo is registered at the other beacon (``HomeMoved``), and when a message
and its reply cross the tunnel again. The bound to compare against is two keepalive intervals.

    PYTHONPATH=. .venv/bin/python -m benchmarks.beacon_failover --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.beacon_flood import start_beacon
from pilot_agents import Node
from pilot_agents.identity import Identity, node_id_from_key
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal.fleet import HomeMoved
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.paths import PathConfig
from tests.redis_server import RedisServer

RELAY_ONLY = SessionConfig(paths=PathConfig(probes_per_round=0))


async def one_round(
    tmp: Path, store: str, rng: random.Random
) -> tuple[float, float]:
    key_file = tmp / "fleet" / "identity.key"
    Identity.load_or_create(key_file.parent)
    beacons: list[subprocess.Popen[str]] = []
    spec = []
    for name in ("a", "b"):
        proc, address, key = start_beacon(
            str(tmp / name), "--store", store, "--key-file", str(key_file),
            "--beacon-id", name,
        )
        beacons.append(proc)
        spec.append(f"{node_id_from_key(key)}@{address[0]}:{address[1]}")
    moved: list[float] = []  # when bravo's HomeMoved came
    try:
        async with (
            Node(tmp / "na", "127.0.0.1:0", RELAY_ONLY, beacon=",".join(spec), hostname="alpha")
            as a,
            Node(tmp / "nb", "127.0.0.1:0", RELAY_ONLY, beacon=",".join(reversed(spec)),
                 hostname="bravo") as b,
        ):
            handler = b._on_beacon_event

            def watch(event: bc.BeaconEvent) -> None:
                if isinstance(event, HomeMoved):
                    moved.append(time.monotonic())
                handler(event)

            assert b._endpoint is not None
            b._endpoint.on_beacon_event = watch
            while True:  # until bravo's registration is in the store, for alpha's beacon
                try:
                    await a.resolve("bravo")
                    break
                except Exception:
                    await asyncio.sleep(0.02)
            a.trust(b.node_id)
            b.trust(a.node_id)
            async with b.listen(1001) as listener, a.connect("bravo", 1001, timeout=20) as conn:
                await conn.send(b"before")
                await listener.receive(timeout=20)
                await asyncio.sleep(rng.uniform(0, 5))  # anywhere in the keepalive cycle
                killed = time.monotonic()
                beacons[1].kill()
                await conn.send(b"after")
                message = await listener.receive(timeout=60)
                await message.reply(b"back")
                await conn.receive(timeout=60)
                recovered = time.monotonic() - killed
                return moved[0] - killed, recovered
    finally:
        for proc in beacons:
            proc.kill()
            proc.wait()


async def main(rounds: int) -> None:
    rng = random.Random(16)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp) / "redis")
        redis.start()
        try:
            for i in range(rounds):
                round_dir = Path(tmp) / f"r{i}"
                round_dir.mkdir()
                # A Redis DB per round: the names of the last round's keys are still held.
                results.append(await one_round(round_dir, redis.url(db=i), rng))
                print(f"round {i}: bravo registered elsewhere after {results[-1][0]:.2f} s, "
                      f"the tunnel carried a round trip again after {results[-1][1]:.2f} s")
        finally:
            redis.stop()
    for label, values in (("moved", [m for m, _ in results]),
                          ("tunnel recovered", [r for _, r in results])):
        print(f"{label} after the kill: median {statistics.median(values):.2f} s, "
              f"max {max(values):.2f} s")
    print("(bound for moving: 2 keepalive intervals = 10 s; the tunnel adds its retransmission "
          "backoff)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, 17))
    asyncio.run(main(parser.parse_args().rounds))
