"""A fleet: two beacon processes sharing one registry in a real redis-server and one key, with
real nodes on loopback.

What works across beacons: names are owned fleet-wide (two beacons racing for one name give it
to exactly one key), a node registered at one beacon resolves at the other, and both beacons
sign with the fleet's key, so a node pinning it may use either. What does not (yet): a tunnel
between nodes of different beacons, since introductions and the relay stay within one beacon;
the introduction is refused with ELSEWHERE, and the connection fails at once with a
PeerUnreachableError saying so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilot_agents import Node, PeerUnreachableError
from pilot_agents.beacon import service
from pilot_agents.beacon.store import open_store
from pilot_agents.identity import Identity, node_id_from_key
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal.beacon_wire import Status
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_beacon_service import BeaconProcess, ClientDriver, make_client
from tests.test_beacon_service import drivers as drivers  # the fixture


@dataclass
class Fleet:
    redis: RedisServer
    a: BeaconProcess
    b: BeaconProcess
    key_file: Path

    @property
    def key(self) -> bytes:
        return self.a.key

    def spec(self, beacon: BeaconProcess) -> str:
        host, port = beacon.address
        return f"{node_id_from_key(self.key)}@{host}:{port}"


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
            code, log = beacon.stop()
            assert code == 0, log


async def test_nodes_of_two_beacons_resolve_each_other(tmp_path: Path, fleet: Fleet) -> None:
    assert fleet.a.key == fleet.b.key  # one fleet key: a pinned key fits every beacon
    async with (
        Node(tmp_path / "na", "127.0.0.1:0", beacon=fleet.spec(fleet.a), hostname="alpha") as a,
        Node(tmp_path / "nb", "127.0.0.1:0", beacon=fleet.spec(fleet.b), hostname="bravo") as b,
    ):
        info = await a.resolve("bravo")
        assert info.node_id == b.node_id and info.hostname == "bravo"
        assert b.local_endpoint in info.candidates
        info = await b.resolve(a.node_id)
        assert info.node_id == a.node_id and info.hostname == "alpha"
        assert a.local_endpoint in info.candidates
        with pytest.raises(Exception, match="no node has that name"):
            await a.resolve("charlie")

        # Trust takes the resolved ids; a tunnel between the two beacons' nodes is refused.
        a.trust(b.node_id)
        b.trust(a.node_id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PeerUnreachableError) as failed:
            async with b.listen(1001), a.connect("bravo", 1001, timeout=10.0) as conn:
                await conn.send(b"hello")
        assert str(failed.value).startswith(
            "cannot reach bravo: registered at another beacon of the fleet"
        )
        assert loop.time() - started < 2.0  # at once, not after the timeout

    # The names are in the shared store, with each node's home beacon.
    store = await open_store(fleet.redis.url(), tmp_path)
    try:
        found = await store.find_name("bravo")
        assert found.registration is not None and found.registration.home == "beacon-b"
        assert (await store.find_name("alpha")).key is not None
    finally:
        await store.aclose()


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
