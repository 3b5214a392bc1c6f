"""A fleet: two beacon processes sharing one registry in a real redis-server and one key, with
real nodes on loopback.

Names are owned fleet-wide (two beacons racing for one name give it to exactly one key), a node
registered at one beacon resolves at the other, and both beacons sign with the fleet's key, so
a node pinning it may use either. A node reaches a peer of the other beacon through the peer's
home beacon, where it attaches as a guest: introductions, the relay and trust requests go there.
A node given both beacons fails over to the second when its home dies, and its tunnels recover.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilot_agents import Node
from pilot_agents.beacon import service
from pilot_agents.beacon.store import open_store
from pilot_agents.identity import Identity, node_id_from_key
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal.beacon_wire import Status
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.paths import PathConfig
from pilot_agents.node import node as node_module
from tests.conftest import cli, short_home, start_daemon, stop_daemons
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_beacon_service import BeaconProcess, ClientDriver, make_client
from tests.test_beacon_service import drivers as drivers  # the fixture

# No probes at all: as if both nodes sat behind symmetric NATs, so the tunnel stays relayed.
RELAY_ONLY = SessionConfig(paths=PathConfig(probes_per_round=0))


@dataclass
class Fleet:
    redis: RedisServer
    a: BeaconProcess
    b: BeaconProcess
    key_file: Path

    @property
    def key(self) -> bytes:
        return self.a.key

    def spec(self, *beacons: BeaconProcess) -> str:
        key = node_id_from_key(self.key)
        return ",".join(f"{key}@{b.address[0]}:{b.address[1]}" for b in beacons)


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer) -> Iterator[Fleet]:
    key_file = tmp_path / "fleet" / "identity.key"
    Identity.load_or_create(key_file.parent)
    beacons = [
        BeaconProcess(
            tmp_path / name,
            "127.0.0.1:0",
            "--store",
            redis_server.url(),
            "--key-file",
            str(key_file),
            "--beacon-id",
            name,
        )
        for name in ("beacon-a", "beacon-b")
    ]
    try:
        yield Fleet(redis_server, beacons[0], beacons[1], key_file)
    finally:
        for beacon in beacons:
            if beacon.proc.poll() is None:  # not killed by the test
                code, log = beacon.stop()
                assert code == 0, log


async def _published(fleet: Fleet, tmp_path: Path, *names: str) -> None:
    """Wait until the store holds the registrations of ``names``: a beacon answers a REGISTER
    before its write to the store has landed, so another beacon may not know it for a moment.
    (Asked of the store, not of a node, which would learn each peer's home from the answer.)"""
    store = await open_store(fleet.redis.url(), tmp_path)
    try:
        async with asyncio.timeout(10):
            for name in names:
                while (await store.find_name(name)).registration is None:
                    await asyncio.sleep(0.02)
    finally:
        await store.aclose()


async def _exchange(a: Node, b: Node, peer: str, port: int) -> str:
    """A message from a to b on ``port`` and its reply; the path the connection ended on."""
    async with b.listen(port) as listener, a.connect(peer, port, timeout=20.0) as conn:
        await conn.send(b"hello " + peer.encode())
        message = await listener.receive(timeout=20)
        assert message.data == b"hello " + peer.encode() and message.sender == a.node_id
        await message.reply(b"back")
        assert (await conn.receive(timeout=20)).data == b"back"
        return conn.path


async def test_nodes_of_two_beacons_resolve_trust_and_connect(tmp_path: Path, fleet: Fleet) -> None:
    assert fleet.a.key == fleet.b.key  # one fleet key: a pinned key fits every beacon
    async with (
        Node(tmp_path / "na", "127.0.0.1:0", RELAY_ONLY, beacon=fleet.spec(fleet.a),
             hostname="alpha") as a,
        Node(tmp_path / "nb", "127.0.0.1:0", RELAY_ONLY, beacon=fleet.spec(fleet.b),
             hostname="bravo") as b,
    ):
        await _published(fleet, tmp_path, "alpha", "bravo")
        info = await a.resolve("bravo")
        assert info.node_id == b.node_id and info.hostname == "bravo"
        assert b.local_endpoint in info.candidates
        info = await b.resolve(a.node_id)
        assert info.node_id == a.node_id and info.hostname == "alpha"
        assert a.local_endpoint in info.candidates
        with pytest.raises(Exception, match="no node has that name"):
            await a.resolve("charlie")

        # A trust request crosses too: through bravo's home, where alpha attaches as a guest.
        received: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue(4)
        b.on_trust_request = lambda key, payload: received.put_nowait((key, payload))
        await a.send_trust_request("bravo", b"please trust alpha")
        sender, payload = await asyncio.wait_for(received.get(), 10)
        assert node_id_from_key(sender) == a.node_id and payload == b"please trust alpha"

        # A tunnel by name, relayed by bravo's home (alpha is its guest), both ways.
        a.trust(b.node_id)
        b.trust(a.node_id)
        assert await _exchange(a, b, "bravo", 1001) == "relay"
        assert await _exchange(b, a, "alpha", 1002) == "relay"
        status_b = await service.query_status(fleet.b.address)
        assert status_b["guests"] >= 1 and status_b["relayed_packets"] > 0

    # The names are in the shared store, with each node's home beacon and its address.
    store = await open_store(fleet.redis.url(), tmp_path)
    try:
        found = await store.find_name("bravo")
        assert found.registration is not None and found.registration.home == "beacon-b"
        assert found.registration.home_address == fleet.b.address
        assert (await store.find_name("alpha")).key is not None
    finally:
        await store.aclose()


async def test_a_guest_attached_for_a_trust_request_alone_is_left(
    tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_module, "TRUST_REQUEST_ROUTE_TTL", 0.5)
    async with (
        Node(tmp_path / "na", "127.0.0.1:0", beacon=fleet.spec(fleet.a), hostname="alpha") as a,
        Node(tmp_path / "nb", "127.0.0.1:0", beacon=fleet.spec(fleet.b), hostname="bravo") as b,
    ):
        await _published(fleet, tmp_path, "bravo")
        received: asyncio.Queue[bytes] = asyncio.Queue(4)
        b.on_trust_request = lambda key, payload: received.put_nowait(payload)
        await a.send_trust_request("bravo", b"please trust alpha")
        assert await asyncio.wait_for(received.get(), 10) == b"please trust alpha"
        beacons = a._endpoint.beacon if a._endpoint is not None else None
        assert beacons is not None and fleet.b.address in beacons.addresses
        # bravo never answers with a tunnel: the guest at its home goes (at the guest's next
        # timer, within a keepalive interval), rather than refresh for the life of the node.
        async with asyncio.timeout(15):
            while fleet.b.address in beacons.addresses:
                await asyncio.sleep(0.1)
        assert beacons.addresses == beacons.home.addresses  # the home beacon alone


async def test_a_node_id_of_another_beacon_is_followed_to_its_home(
    tmp_path: Path, fleet: Fleet
) -> None:
    # By node id there is no lookup first: our home refuses the introduction as ELSEWHERE,
    # naming the peer's home, and the node goes there. With punching on, the tunnel goes direct.
    async with (
        Node(tmp_path / "na", "127.0.0.1:0", beacon=fleet.spec(fleet.a), hostname="alpha") as a,
        Node(tmp_path / "nb", "127.0.0.1:0", beacon=fleet.spec(fleet.b), hostname="bravo") as b,
    ):
        await _published(fleet, tmp_path, "bravo")
        a.trust(b.node_id)
        b.trust(a.node_id)
        await _exchange(a, b, b.node_id, 1001)
        for _ in range(100):
            if (await a.ping(b.node_id)).path == "direct":
                break
            await asyncio.sleep(0.05)
        assert (await a.ping(b.node_id)).path == "direct"


async def test_a_killed_beacon_moves_its_nodes_and_their_tunnels_recover(
    tmp_path: Path, fleet: Fleet
) -> None:
    fast = bc.BeaconClientConfig(keepalive_interval=1.0)  # fail over within 2 s, not 10
    async with (
        Node(tmp_path / "na", "127.0.0.1:0", RELAY_ONLY, beacon=fleet.spec(fleet.a, fleet.b),
             hostname="alpha", beacon_config=fast) as a,
        Node(tmp_path / "nb", "127.0.0.1:0", RELAY_ONLY, beacon=fleet.spec(fleet.b, fleet.a),
             hostname="bravo", beacon_config=fast) as b,
    ):
        await _published(fleet, tmp_path, "bravo")
        a.trust(b.node_id)
        b.trust(a.node_id)
        async with b.listen(1001) as listener, a.connect("bravo", 1001, timeout=20) as conn:
            await conn.send(b"before")
            assert (await listener.receive(timeout=20)).data == b"before"
            assert conn.path == "relay"

            fleet.b.proc.kill()  # bravo's home, and the relay of the tunnel
            fleet.b.proc.wait()
            await conn.send(b"after")  # waits in the tunnel until a path carries it
            message = await listener.receive(timeout=30)
            assert message.data == b"after"
            await message.reply(b"recovered")
            assert (await conn.receive(timeout=30)).data == b"recovered"
            assert conn.path == "relay"

        host, port = fleet.a.address
        assert b.info().beacon == f"{host}:{port} (home, of 2)"
        # bravo registered at beacon-a, which now resolves it from its own memory.
        store = await open_store(fleet.redis.url(), tmp_path)
        try:
            found = await store.find_name("bravo")
            assert found.registration is not None and found.registration.home == "beacon-a"
        finally:
            await store.aclose()
        status_a = await service.query_status(fleet.a.address)
        assert status_a["registered_nodes"] == 2


async def test_two_beacons_racing_for_names_give_each_to_one_key(
    tmp_path: Path, fleet: Fleet, drivers: list[ClientDriver]
) -> None:
    names = ["contested-1", "contested-2", "contested-3", "contested-4"]
    by_name: dict[str, list[ClientDriver]] = {name: [] for name in names}
    for name in names:
        for beacon in (fleet.a, fleet.b) * 3:
            driver = ClientDriver(make_client(beacon.address, name, beacon_key=fleet.key))
            by_name[name].append(driver)
            drivers.append(driver)
    for driver in drivers:  # all at once: the REGISTERs race at both beacons
        driver.call(driver.client.start)

    async def outcome(driver: ClientDriver) -> bc.BeaconEvent:
        return await driver.wait_for(bc.Registered | bc.RegistrationFailed)  # type: ignore[arg-type]

    store = await open_store(fleet.redis.url(), tmp_path)
    try:
        for name, contenders in by_name.items():
            outcomes = await asyncio.gather(*(outcome(d) for d in contenders))
            pairs = zip(contenders, outcomes, strict=True)
            winners = [d for d, e in pairs if isinstance(e, bc.Registered)]
            assert len(winners) == 1, outcomes
            losers = [e for e in outcomes if isinstance(e, bc.RegistrationFailed)]
            assert all(e.code == Status.NAME_TAKEN and e.permanent for e in losers)
            assert (await store.find_name(name)).key == winners[0].client.public_key
        assert await store.name_count() == len(names)
    finally:
        await store.aclose()


async def test_a_stopped_redis_refuses_names_clearly_and_the_beacon_carries_on(
    tmp_path: Path,
    redis_server: RedisServer,
    drivers: list[ClientDriver],
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = await service.start("127.0.0.1:0", tmp_path / "beacon", store=redis_server.url())
    try:
        first = ClientDriver(make_client(running.address, "first"))
        drivers.append(first)
        first.call(first.client.start)
        await first.wait_for(bc.Registered)

        caplog.set_level(logging.WARNING, "pilot_agents.beacon")
        redis_server.stop()
        late = ClientDriver(make_client(running.address, "late"))
        drivers.append(late)
        late.call(late.client.start)
        failed = await late.wait_for(bc.RegistrationFailed)
        assert failed.code == Status.UNAVAILABLE and not failed.permanent
        request = first.call(first.client.resolve, "late")
        refused = await first.wait_for(bc.ResolveFailed, lambda e: e.request_id == request)
        assert refused.code == Status.UNAVAILABLE
        assert any(
            "unavailable" in r.getMessage() and redis_server.url() in r.getMessage()
            for r in caplog.records
        )
        # What needs no store goes on.
        counters = await service.query_status(running.address)
        assert counters["registered_nodes"] == 1 and counters["refusals"]["store_unavailable"] >= 2
        assert first.client.registered

        redis_server.start()
        again = ClientDriver(make_client(running.address, "again"))
        drivers.append(again)
        again.call(again.client.start)
        await again.wait_for(bc.Registered)
    finally:
        running.close()
        await running.server.registry.aclose()


def test_a_missing_key_file_or_store_stops_the_start_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"), "--alt-port", "off"]
    assert service.main([*base, "--key-file", str(tmp_path / "nope.key")]) == 2
    assert "--key-file" in capsys.readouterr().err
    assert service.main([*base, "--store", "redis://127.0.0.1:1/0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("pilot-agents beacon: the store does not answer: redis://127.0.0.1:1")
    assert "\n" not in error
    assert service.main([*base, "--store", "postgres://x"]) == 2
    assert "expected sqlite:PATH or redis://" in capsys.readouterr().err


async def test_daemons_on_two_beacons_trust_each_other_and_talk_by_name(
    tmp_path: Path, fleet: Fleet
) -> None:
    """The CLI as the README shows it, with a fleet: each daemon given both beacons, its own
    first (one through $PILOT_BEACON); trust requests and messages cross between them."""
    home_a, home_b = short_home(), short_home()
    try:
        await asyncio.to_thread(
            start_daemon, home_a, "alpha", "--beacon", fleet.spec(fleet.a, fleet.b)
        )
        result = await asyncio.to_thread(
            cli, home_b, "daemon", "start", "--hostname", "bravo", "--listen", "127.0.0.1:0",
            env={"PILOT_BEACON": fleet.spec(fleet.b, fleet.a)},
        )
        assert result.returncode == 0, result.stderr
        await _published(fleet, tmp_path, "alpha", "bravo")

        added = await asyncio.to_thread(cli, home_a, "trust", "add", "bravo")
        assert added.returncode == 0 and "Trust request sent" in added.stdout, added
        async with asyncio.timeout(10):  # the request is one datagram: it lands soon after
            while True:
                pending = await asyncio.to_thread(cli, home_b, "--json", "trust", "pending")
                if json.loads(pending.stdout)["pending"]:
                    break
                await asyncio.sleep(0.1)
        assert [p["hostname"] for p in json.loads(pending.stdout)["pending"]] == ["alpha"]
        back = await asyncio.to_thread(cli, home_b, "trust", "add", "alpha")
        assert back.returncode == 0, back

        sent = await asyncio.to_thread(cli, home_a, "send", "bravo", "1001", "--data", "hi")
        assert sent.returncode == 0, sent.stderr
        heard = await asyncio.to_thread(
            cli, home_b, "listen", "1001", "--count", "1", "--timeout", "20"
        )
        assert heard.returncode == 0 and "[alpha] hi" in heard.stdout, heard
    finally:
        await asyncio.to_thread(stop_daemons, home_a, home_b)


def test_a_wildcard_beacon_on_a_shared_store_needs_advertise(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--data-dir", str(tmp_path / "d"), "--alt-port", "off", "--store", redis_server.url()]
    assert service.main([*base, "--listen", "0.0.0.0:0"]) == 2
    error = capsys.readouterr().err.strip()
    assert "needs --advertise IP:PORT" in error and "\n" not in error
    assert service.main([*base, "--listen", "0.0.0.0:0", "--advertise", "example:1"]) == 2
    assert "--advertise 'example:1': expected IP:PORT" in capsys.readouterr().err
