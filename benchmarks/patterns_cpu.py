"""CPU time per publication and per round trip of the embedded patterns, both sides in one
process on uvloop, so a loaded machine changes the number far less than it changes a rate.

    .venv/bin/python -m benchmarks.patterns_cpu            # pub/sub and req/rep
    .venv/bin/python -m benchmarks.patterns_cpu --repeat 5 # the median of 5
    .venv/bin/python -m benchmarks.patterns_cpu --only reqrep --only reqrep-floor

``reqrep-floor`` is the least any request/reply pattern over the Node can cost (both sides
answering in its delivery callbacks, nothing kept per request but a future): ``reqrep`` less
``reqrep-floor`` is what the pattern's promises cost (deadlines, cancels, bounds, restarts).

Each measurement is the difference between a long and a short run (process user + system time,
``getrusage``), divided by the difference in counts: start-up, handshakes and warm-up cancel
out. Publications are 1000 B to one subscriber (overflow BLOCK), round trips 100 B.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pilot_agents
from benchmarks.patterns_cases.floor_embedded import answer_in_delivery, ask_in_delivery
from pilot_agents import Node
from pilot_agents.patterns import Publisher, Request, Requester, Subscriber, serving

PORT = 2001
HOST = "127.0.0.1"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _pair(home: Path) -> tuple[Node, Node]:
    a = Node(home=str(home / "a"), listen=f"{HOST}:0")
    b = Node(home=str(home / "b"), listen=f"{HOST}:0")
    await a.__aenter__()
    await b.__aenter__()
    a.trust(b.node_id)
    b.trust(a.node_id)
    a.add_peer(b.node_id, b.local_endpoint)
    b.add_peer(a.node_id, a.local_endpoint)
    return a, b


async def pubsub(count: int) -> float:
    """CPU seconds for ``count`` publications received (after the subscription is up)."""
    with tempfile.TemporaryDirectory() as home:
        pub_node, sub_node = await _pair(Path(home))
        try:
            async with (Publisher(pub_node, PORT) as pub,
                        Subscriber(sub_node, pub_node.node_id, PORT, ["bench."]) as sub):
                while await pub.publish("bench.warm", b"w") == 0:
                    await asyncio.sleep(0.01)
                await sub.receive(10)
                data = b"x" * 1000

                async def publish_all() -> None:
                    for _ in range(count):
                        await pub.publish("bench.data", data)

                start = _cpu()
                task = asyncio.create_task(publish_all())
                for _ in range(count):
                    await sub.receive(10)
                await task
                return _cpu() - start
        finally:
            await sub_node.__aexit__(None, None, None)
            await pub_node.__aexit__(None, None, None)


async def _echo(request: Request) -> bytes:
    return request.data


async def reqrep(count: int) -> float:
    """CPU seconds for ``count`` sequential round trips (after a warm one)."""
    with tempfile.TemporaryDirectory() as home:
        req_node, rep_node = await _pair(Path(home))
        try:
            async with serving(rep_node, PORT, _echo), Requester(req_node) as requester:
                data = b"r" * 100
                await requester.request(rep_node.node_id, PORT, data, timeout=10)
                start = _cpu()
                for _ in range(count):
                    await requester.request(rep_node.node_id, PORT, data, timeout=10)
                return _cpu() - start
        finally:
            await rep_node.__aexit__(None, None, None)
            await req_node.__aexit__(None, None, None)


async def reqrep_floor(count: int) -> float:
    """As :func:`reqrep`, with the least a request/reply pattern over the Node can do: both
    sides answer in the Node's delivery callbacks (``set_taker``), a frame each way, a future
    per request, and nothing else (no deadlines, cancels, bounds, Request objects or handler
    task). What the patterns' own work is measured against."""
    with tempfile.TemporaryDirectory() as home:
        req_node, rep_node = await _pair(Path(home))
        try:
            async with (rep_node.listen(PORT) as listener,
                        req_node.connect(rep_node.node_id, PORT) as conn):
                answer_in_delivery(listener)
                request = ask_in_delivery(conn)
                data = b"r" * 100
                await request(data)
                start = _cpu()
                for _ in range(count):
                    await request(data)
                return _cpu() - start
        finally:
            await rep_node.__aexit__(None, None, None)
            await req_node.__aexit__(None, None, None)


def per_item(run: Callable[[int], Coroutine[Any, Any, float]], short: int, long: int) -> float:
    """Microseconds of CPU per item: (long run - short run) / (long - short)."""
    small = pilot_agents.run(run(short))
    large = pilot_agents.run(run(long))
    return (large - small) / (long - short) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="measurements; the median is shown")
    parser.add_argument("--only", choices=("pubsub", "reqrep", "reqrep-floor"), action="append")
    args = parser.parse_args()
    cases = {"pubsub": (pubsub, 5000, 25000), "reqrep": (reqrep, 1000, 5000),
             "reqrep-floor": (reqrep_floor, 1000, 5000)}
    for name in args.only or list(cases):
        run, short, long = cases[name]
        values = [per_item(run, short, long) for _ in range(args.repeat)]
        shown = " ".join(f"{v:.1f}" for v in values)
        unit = "publication" if name == "pubsub" else "round trip"
        print(f"{name}: {statistics.median(values):.1f} µs of CPU per {unit} "
              f"(both sides; runs: {shown})")


if __name__ == "__main__":
    main()
