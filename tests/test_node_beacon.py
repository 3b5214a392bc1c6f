"""Nodes with a real beacon on loopback: registration, names, relay first, then direct."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pilot_agents import Node, NotTrustedError, PeerUnreachableError
from pilot_agents.beacon import service
from pilot_agents.errors import NameTakenError, UnknownHostError
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.paths import PathConfig


@pytest.fixture
async def beacon(tmp_path: Path) -> AsyncIterator[str]:
    running = await service.start("127.0.0.1:0", tmp_path / "beacon")
    host, port = running.address
    try:
        yield f"{host}:{port}"
    finally:
        running.close()
        running.server.registry.close()


async def test_connect_by_hostname(tmp_path: Path, beacon: str) -> None:
    async with (
        Node(tmp_path / "a", "127.0.0.1:0", beacon=beacon, hostname="analyst-agent") as a,
        Node(tmp_path / "b", "127.0.0.1:0", beacon=beacon, hostname="reporter-agent") as b,
    ):
        info = await a.resolve("reporter-agent")
        assert info.node_id == b.node_id and info.hostname == "reporter-agent"
        a.trust(b.node_id)
        b.trust(a.node_id)
        async with b.listen(1001) as listener, a.connect("reporter-agent", 1001) as conn:
            await conn.send({"rows": 1842})
            message = await listener.receive(timeout=5)
            assert message.json() == {"rows": 1842} and message.sender == a.node_id
            await message.reply(b"ok")
            assert (await conn.receive(timeout=5)).data == b"ok"
            # Both sit on loopback: punching finds the direct path at once.
            for _ in range(50):
                if conn.path == "direct":
                    break
                await asyncio.sleep(0.05)
            assert conn.path == "direct" and conn.address == b.local_endpoint
        peers = {p.node_id: p for p in a.peers()}
        assert peers[b.node_id].hostname == "reporter-agent"
        assert peers[b.node_id].path == "direct" and peers[b.node_id].bytes_out > 0
        result = await a.ping("reporter-agent")
        assert result.rtt < 1.0 and result.path == "direct"


async def test_relay_carries_the_tunnel_when_no_direct_path(tmp_path: Path, beacon: str) -> None:
    # No probes at all: as if every candidate sat behind a symmetric NAT.
    no_punching = SessionConfig(paths=PathConfig(probes_per_round=0))
    async with (
        Node(tmp_path / "a", "127.0.0.1:0", no_punching, beacon=beacon, hostname="one") as a,
        Node(tmp_path / "b", "127.0.0.1:0", no_punching, beacon=beacon, hostname="two") as b,
    ):
        a.trust(b.node_id)
        b.trust(a.node_id)
        async with b.listen(7) as listener, a.connect("two", 7) as conn:
            payload = bytes(range(256)) * 4000
            await conn.send(payload)
            message = await listener.receive(timeout=10)
            assert message.data == payload
            await message.reply(b"back through the relay")
            assert (await conn.receive(timeout=5)).data == b"back through the relay"
            assert conn.path == "relay"
        status = await service.query_status(beacon)
        assert status["relayed_packets"] > 800


async def test_name_is_owned_by_the_first_key(tmp_path: Path, beacon: str) -> None:
    async with Node(tmp_path / "a", "127.0.0.1:0", beacon=beacon, hostname="taken"):
        with pytest.raises(NameTakenError):
            async with Node(tmp_path / "b", "127.0.0.1:0", beacon=beacon, hostname="taken"):
                pass


async def test_unknown_host_and_untrusted_peer(tmp_path: Path, beacon: str) -> None:
    async with (
        Node(tmp_path / "a", "127.0.0.1:0", beacon=beacon, hostname="lonely") as a,
        Node(tmp_path / "b", "127.0.0.1:0", beacon=beacon, hostname="stranger"),
    ):
        with pytest.raises(UnknownHostError):
            await a.resolve("nobody-here")
        with pytest.raises(NotTrustedError, match="pilotctl trust add stranger"):
            async with a.connect("stranger", 1001):
                pass


async def test_unreachable_beacon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PeerUnreachableError, match="beacon"):
        async with Node(tmp_path / "a", "127.0.0.1:0", beacon="127.0.0.1:9", hostname="x"):
            pass
