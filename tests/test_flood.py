"""A daemon inbox nobody reads must stop its sender, not grow without bound (issue #11).

A peer offers up to 2 GB in 1 KB or 1 MB messages to a daemon's inbox port that nobody reads:
the receiving daemon's memory grows by less than 100 MB, the sender blocks, and it resumes
once the receiver reads. Empty messages: 50,000 of them (each IPC call costs the sending
application ~0.1 ms, and the sender's stream holds a million 8-byte headers before it blocks,
so blocking is shown embedded, in test_node_flow.py); here the receiver's memory stays bounded.
Real daemons, real tunnels on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pilot_agents import Client
from pilot_agents.errors import PilotTimeoutError
from tests.conftest import DaemonHandle, named_pair

OFFERED_BYTES = 2 * 10**9
EMPTY_MESSAGES = 50_000
RSS_GROWTH_LIMIT = 100 * 2**20
STALL = 3.0  # seconds without a completed send: the sender is blocked
DEADLINE = 90.0  # seconds a case may take to block at all


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
def flood_pair() -> Iterator[tuple[DaemonHandle, DaemonHandle]]:
    """Daemons of their own: a flood leaves a tunnel and inboxes no other test should share."""
    with named_pair() as pair:
        yield pair


@pytest.mark.slow
@pytest.mark.parametrize("size", [0, 1024, 2**20], ids=["0B", "1KB", "1MB"])
async def test_an_unread_daemon_inbox_stops_its_sender(
        flood_pair: tuple[DaemonHandle, DaemonHandle], size: int) -> None:
    sender, receiver = flood_pair
    before = rss(receiver.pid)
    count = OFFERED_BYTES // size if size else EMPTY_MESSAGES
    sent = 0
    payload = b"\x00" * size

    async with Client(sender.home) as client, client.connect("beta", 1001) as conn:
        async def flood() -> None:
            nonlocal sent
            for _ in range(count):
                await conn.send(payload)
                sent += 1

        task = asyncio.create_task(flood())
        loop = asyncio.get_running_loop()
        started = last_change = loop.time()
        seen = 0
        peak = before
        try:
            while not task.done():
                await asyncio.sleep(0.25)
                peak = max(peak, rss(receiver.pid))
                if sent != seen:
                    seen, last_change = sent, loop.time()
                elif loop.time() - last_change > STALL:
                    break
                assert not size or loop.time() - started < DEADLINE, (
                    f"{sent} sends and not blocked yet")
            assert peak - before < RSS_GROWTH_LIMIT, (
                f"receiver grew {(peak - before) / 2**20:.0f} MB holding {sent} messages")
            if not size:
                return
            assert not task.done(), f"all {count} messages of {size} B went out: nothing blocked"

            # Reading at the receiver lets the sender go on (once a window's worth is read).
            blocked_at = sent
            async with Client(receiver.home) as reader:
                for _ in range(blocked_at):
                    await reader.receive(1001, timeout=10)
                    if sent > blocked_at:
                        break
            assert sent > blocked_at, "the sender stayed blocked after the receiver read"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await conn.abort()  # what is still unread need not arrive


async def test_one_unread_port_leaves_the_peers_other_ports_reachable(
        flood_pair: tuple[DaemonHandle, DaemonHandle]) -> None:
    """An audit: one-shot messages to a port nobody read filled its inbox (1024), then waited
    in the receiver's node, a stream each, until they held all 1024 streams a peer may open:
    every new stream of the sender was then refused, to any port ("too many open connections
    from us", exit 12). Now one port holds at most its share of them (512), the sends past it
    wait and time out saying the inbox is full, and the peer's other ports answer."""
    sender, receiver = flood_pair
    async with Client(receiver.home) as server, Client(sender.home) as client:
        listener = server.listen(5001)
        async with listener:
            sent = 0
            with pytest.raises(PilotTimeoutError, match="is its inbox full"):
                for sent in range(5000):  # noqa: B007 (counted for the assertion)
                    await client.send("beta", 1001, b"unread", timeout=2)
            assert 1024 + 512 <= sent < 5000
            async with client.connect("beta", 5001) as conn:
                await conn.send(b"still here")
                assert (await listener.receive(timeout=10)).data == b"still here"
