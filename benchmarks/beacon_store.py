"""The beacon's two stores side by side (issue #16): store calls per second, and RESOLVE round
trips through beacon processes on SQLite, on Redis, and across two beacons sharing one Redis.

    .venv/bin/python -m benchmarks.beacon_store [--calls 5000] [--resolves 600]

Starts its own redis-server (Debian's, on a free loopback port, files in a temporary directory).
The store calls run from one asyncio task ``--concurrency`` at a time, as a beacon's calls do
when many requests wait on the store at once; the RESOLVEs come from blocking sockets, one at a
time, paced and spread over several registered requesters so that none exceeds an allowance.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks.beacon_flood import Node, start_beacon, summary
from pilot_agents.beacon.store import NameLimits, Registration, Store, open_store
from pilot_agents.identity import Identity
from pilot_agents.net.traversal.beacon_wire import NatType
from tests.redis_server import RedisServer

REQUESTS_PER_REQUESTER = 90  # within a node's RESOLVE burst (100)
RESOLVES_PER_SECOND = 80  # within the beacon's allowance per source IP (100/s), all 127.0.0.1


async def rate(
    label: str, count: int, concurrency: int, call: Callable[[int], Awaitable[object]]
) -> str:
    start = time.perf_counter()
    for first in range(0, count, concurrency):
        await asyncio.gather(*(call(i) for i in range(first, min(count, first + concurrency))))
    seconds = time.perf_counter() - start
    return f"{label}: {count / seconds:,.0f}/s"


async def store_calls(store: Store, count: int, concurrency: int) -> list[str]:
    limits = NameLimits(per_key=1, per_source=count + 1)

    def key(i: int) -> bytes:
        return i.to_bytes(32, "big")

    def registration(i: int) -> Registration:
        candidates = (("203.0.113.9", 40000 + i % 20000), ("10.0.0.9", 5000))
        return Registration(key(i), f"n{i}", candidates, NatType.CONE, "bench")

    now = time.time_ns()
    return [
        await rate(
            "claim_name",
            count,
            concurrency,
            lambda i: store.claim_name(f"n{i}", key(i), now, "192.0.2.1", limits),
        ),
        await rate("publish", count, concurrency, lambda i: store.publish(registration(i), 90.0)),
        await rate("find_name", count, concurrency, lambda i: store.find_name(f"n{i}")),
    ]


def resolves(
    target_beacon: tuple[str, int], ask_beacon: tuple[str, int], key: bytes, count: int
) -> list[float | None]:
    target = Node(target_beacon, key, "target")
    assert target.register() is not None, "the target could not register"
    samples: list[float | None] = []
    while len(samples) < count:
        requester = Node(ask_beacon, key, None)
        assert requester.register() is not None, "a requester could not register"
        for _ in range(min(REQUESTS_PER_REQUESTER, count - len(samples))):
            samples.append(requester.resolve("target"))
            time.sleep(1 / RESOLVES_PER_SECOND)
        requester.sock.close()
    target.sock.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="store calls of each kind")
    parser.add_argument("--concurrency", type=int, default=64, help="store calls at once")
    parser.add_argument("--resolves", type=int, default=600, help="RESOLVEs per setup")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        redis = RedisServer(tmp / "redis")
        redis.start()
        beacons: list[subprocess.Popen[str]] = []
        try:
            for spec in (f"sqlite:{tmp}/bench.sqlite3", redis.url(1)):

                async def calls(spec: str = spec) -> list[str]:
                    store = await open_store(spec, tmp)
                    try:
                        return await store_calls(store, args.calls, args.concurrency)
                    finally:
                        await store.aclose()

                print(
                    f"{spec.split(':')[0]} store, {args.concurrency} calls at once: "
                    + ", ".join(asyncio.run(calls()))
                )
            key_file = tmp / "fleet" / "identity.key"
            Identity.load_or_create(key_file.parent)
            results = []
            for label, stores in (
                ("sqlite, one beacon", [f"sqlite:{tmp}/resolve.sqlite3"]),
                ("redis, one beacon", [redis.url(2)]),
                ("redis, target at beacon A, asked at B", [redis.url(3), redis.url(3)]),
            ):
                started = []
                for i, store in enumerate(stores):
                    options = ["--key-file", str(key_file), "--store", store, "--beacon-id", f"{i}"]
                    process, address, key = start_beacon(str(tmp / "beacon"), *options)
                    beacons.append(process)
                    started.append(address)
                samples = resolves(started[0], started[-1], key, args.resolves)
                results.append(summary(f"resolve, {label}", samples))
                for process in beacons:
                    process.terminate()
                    process.wait(timeout=10)
                beacons.clear()
            print("\n".join(results))
        finally:
            for process in beacons:
                process.kill()
            redis.stop()


if __name__ == "__main__":
    main()
