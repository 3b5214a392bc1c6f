"""Fixtures that give a test two transports that trust each other: embedded Nodes, or Clients
of two daemons. A test that takes ``pair`` runs once on each: import ``kind_fixture`` and
``pair_fixture`` into the test module."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilot_agents import Client, Transport
from tests.conftest import DaemonHandle
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
