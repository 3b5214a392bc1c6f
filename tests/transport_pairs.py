"""Fixtures that give a test two transports that trust each other: embedded Nodes, or Clients
of two daemons. A test that takes ``pair`` runs once on each: import ``kind_fixture`` and
``pair_fixture`` into the test module."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilot_agents import Client, Node, Transport
from tests.conftest import DaemonHandle, short_home, start_daemons, stop_daemons
from tests.slow_link import slow_link
from tests.test_node import trusted_pair


@dataclass
class Side:
    transport: Transport
    node_id: str


@dataclass
class Pair:
    client: Side
    server: Side
    server_name: str  # how the client names the server


@contextlib.asynccontextmanager
async def embedded(tmp_path: Path) -> AsyncIterator[Pair]:
    async with trusted_pair(tmp_path) as (a, b):
        yield Pair(Side(a, a.node_id), Side(b, b.node_id), b.node_id)


@contextlib.asynccontextmanager
async def through_daemons(daemons: tuple[DaemonHandle, DaemonHandle]) -> AsyncIterator[Pair]:
    a, b = daemons
    async with Client(a.home) as client, Client(b.home) as server:
        yield Pair(Side(client, a.node_id), Side(server, b.node_id), "beta")


@contextlib.asynccontextmanager
async def over_slow_link(kind: str, tmp_path: Path, rate: float) -> AsyncIterator[Pair]:
    """A pair of ``kind`` whose packets cross a :class:`~tests.slow_link.SlowLink` of ``rate``
    bytes a second each way."""
    if kind == "embedded":
        async with (
            Node(home=tmp_path / "a", listen="127.0.0.1:0") as a,
            Node(home=tmp_path / "b", listen="127.0.0.1:0") as b,
            slow_link(b.local_endpoint, rate) as link,
        ):
            a.trust(b.node_id)
            b.trust(a.node_id)
            a.add_peer(b.node_id, link.toward_b)
            b.add_peer(a.node_id, link.toward_a)
            yield Pair(Side(a, a.node_id), Side(b, b.node_id), b.node_id)
        return
    homes = (short_home(), short_home())
    try:
        da, db = start_daemons((homes[0], "slow-a"), (homes[1], "slow-b"))
        host, port = db.endpoint.rsplit(":", 1)
        async with (slow_link((host, int(port)), rate) as link,
                    Client(da.home) as client, Client(db.home) as server):
            await client.add_peer(db.node_id, link.toward_b)
            await server.add_peer(da.node_id, link.toward_a)
            await client.trust_add(db.node_id)
            await server.trust_add(da.node_id)
            yield Pair(Side(client, da.node_id), Side(server, db.node_id), db.node_id)
    finally:
        stop_daemons(*homes)


@pytest.fixture(name="kind", params=["embedded", "daemon"])
def kind_fixture(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.param


@pytest.fixture(name="pair")
async def pair_fixture(kind: str, tmp_path: Path,
                       request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    if kind == "embedded":
        async with embedded(tmp_path) as p:
            yield p
    else:
        daemons = request.getfixturevalue("daemon_pair")
        async with through_daemons(daemons) as p:
            yield p
