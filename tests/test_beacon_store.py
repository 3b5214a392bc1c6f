"""The beacon's stores: one conformance suite run on both (SQLite, and Redis on a real
redis-server), then the core's handling of a store whose calls wait (sans-IO, fake clock).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pilot_agents.beacon.server import BeaconConfig
from pilot_agents.beacon.store import (
    Found,
    NameLimits,
    Registration,
    RelayTarget,
    SqliteStore,
    Store,
    open_store,
    run_now,
)
from pilot_agents.beacon.store.redis import RedisStore
from pilot_agents.errors import ConfigError, StoreUnavailableError
from pilot_agents.identity import node_id_from_key
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal.beacon_wire import NatType, Status
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_beacon_server import Net, last

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32
ONE = NameLimits(per_key=1, per_source=64)
NS = 10**9
Opener = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "redis"])
async def open_handle(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Opener]:
    """Opens a handle on one store: each SQLite handle is the same store, each Redis handle a
    client of its own (as each beacon of a fleet has)."""
    opened: list[Store] = []
    if request.param == "sqlite":
        store = SqliteStore(tmp_path / "names.sqlite3")
        opened.append(store)

        async def handle() -> Store:
            return store
    else:
        server: RedisServer = request.getfixturevalue("redis_server")

        async def handle() -> Store:
            opened.append(await open_store(server.url(3), tmp_path))
            return opened[-1]

    yield handle
    for store in opened:
        await store.aclose()


@pytest.fixture
async def store(open_handle: Opener) -> Store:
    return await open_handle()


# -- names ---------------------------------------------------------------------------------------


async def test_first_claim_wins(store: Store) -> None:
    claim = await store.claim_name("alpha", A, 1 * NS, "192.0.2.1", ONE)
    assert (claim.status, claim.owner, claim.released) == (Status.OK, A, ())
    claim = await store.claim_name("alpha", B, 2 * NS, "192.0.2.2", ONE)
    assert (claim.status, claim.owner) == (Status.NAME_TAKEN, A)
    found = await store.find_name("alpha")
    assert (found.key, found.hostname, found.registration) == (A, "alpha", None)
    assert (await store.find_key(A)).hostname == "alpha"
    assert (await store.find_key(B)).hostname is None
    assert await store.name_count() == 1


async def test_unknown_name_and_key(store: Store) -> None:
    found = await store.find_name("nobody")
    assert (found.key, found.hostname, found.registration) == (None, "nobody", None)
    found = await store.find_key(C)
    assert (found.key, found.hostname, found.registration) == (C, None, None)


async def test_a_claim_by_its_owner_records_the_use(store: Store) -> None:
    await store.claim_name("alpha", A, 1 * NS, "192.0.2.1", ONE)
    await store.claim_name("beta", B, 1 * NS, "192.0.2.1", ONE)
    claim = await store.claim_name("alpha", A, 100 * NS, "198.51.100.7", ONE)  # moved: same owner
    assert (claim.status, claim.owner, claim.released) == (Status.OK, A, ())
    assert await store.expire_names(50 * NS) == 1  # beta, unused since 1 s
    assert (await store.find_name("beta")).key is None
    assert (await store.find_name("alpha")).key == A
    assert await store.expire_names(101 * NS) == 1
    assert await store.name_count() == 0


async def test_a_new_name_gives_up_the_oldest(store: Store) -> None:
    await store.claim_name("alpha", A, 1 * NS, "192.0.2.1", ONE)
    claim = await store.claim_name("beta", A, 2 * NS, "192.0.2.1", ONE)
    assert (claim.status, claim.released) == (Status.OK, ("alpha",))
    assert (await store.find_name("alpha")).key is None
    assert (await store.find_key(A)).hostname == "beta"
    two = NameLimits(per_key=2, per_source=64)
    assert (await store.claim_name("gamma", A, 3 * NS, "192.0.2.1", two)).released == ()
    assert (await store.find_key(A)).hostname == "beta"  # the oldest first
    assert (await store.claim_name("delta", A, 4 * NS, "192.0.2.1", two)).released == ("beta",)
    # A released name is free for anyone, with nothing left of its former owner.
    assert (await store.claim_name("alpha", B, 5 * NS, "192.0.2.9", ONE)).owner == B
    assert await store.name_count() == 3


async def test_names_per_source_address(store: Store) -> None:
    limits = NameLimits(per_key=1, per_source=2)
    assert (await store.claim_name("n1", A, 1 * NS, "192.0.2.1", limits)).status is Status.OK
    assert (await store.claim_name("n2", B, 2 * NS, "192.0.2.1", limits)).status is Status.OK
    claim = await store.claim_name("n3", C, 3 * NS, "192.0.2.1", limits)
    assert (claim.status, claim.owner) == (Status.NAME_LIMIT, None)
    assert (await store.claim_name("n3", C, 3 * NS, "192.0.2.2", limits)).status is Status.OK
    # An expired name no longer counts against its address.
    await store.claim_name("n2", B, 10 * NS, "192.0.2.1", limits)
    assert await store.expire_names(5 * NS) == 2  # n1 and n3
    assert (await store.claim_name("n4", C, 11 * NS, "192.0.2.1", limits)).status is Status.OK


async def test_concurrent_claims_of_one_name_have_one_winner(open_handle: Opener) -> None:
    first, second = await open_handle(), await open_handle()
    keys = [bytes([i]) * 32 for i in range(1, 41)]
    claims = await asyncio.gather(
        *(
            (first if i % 2 else second).claim_name("contested", key, NS, f"192.0.2.{i}", ONE)
            for i, key in enumerate(keys)
        )
    )
    winners = [claim for claim in claims if claim.status is Status.OK]
    assert len(winners) == 1
    owner = (await first.find_name("contested")).key
    assert all(claim.owner == owner for claim in claims)
    assert await second.name_count() == 1


# -- live registrations --------------------------------------------------------------------------


def registration(key: bytes, hostname: str | None = "alpha", home: str = "b1") -> Registration:
    candidates = (("203.0.113.5", 40001), ("2001:db8::7", 40002), ("10.0.0.5", 5000))
    return Registration(key, hostname, candidates, NatType.CONE, home)


async def test_registrations_are_found_until_they_expire(store: Store) -> None:
    await store.claim_name("alpha", A, 1 * NS, "192.0.2.1", ONE)
    await store.publish(registration(A), ttl=0.5)
    await store.publish(registration(B, None), ttl=30)
    assert (await store.find_name("alpha")).registration == registration(A)
    found = await store.find_key(B)
    assert (found.hostname, found.registration) == (None, registration(B, None))
    # A refresh from another beacon replaces it.
    await store.publish(registration(A, home="b2"), ttl=0.5)
    assert (await store.find_key(A)).registration == registration(A, home="b2")
    await asyncio.sleep(0.7)
    await store.expire_names(0)  # the SQLite store drops its expired registrations here
    found = await store.find_name("alpha")
    assert (found.key, found.registration) == (A, None)  # the name outlives the registration
    assert (await store.find_key(B)).registration == registration(B, None)


async def test_relay_target_carries_the_observed_address_and_the_blocks(store: Store) -> None:
    mapped = dataclasses.replace(registration(A), address=("::ffff:192.0.2.7", 4000))
    await store.publish(mapped, ttl=30)
    assert (await store.relay_target(A)) == RelayTarget(mapped, {})
    assert mapped.observed == ("::ffff:192.0.2.7", 4000)
    assert registration(B).observed == registration(B).candidates[0]
    now_ns = time.time_ns()
    await store.block_relay(A, B, now_ns + 60 * NS)
    await store.block_relay(A, C, now_ns + 30 * NS)
    assert (await store.relay_target(A)).blocks == {B: now_ns + 60 * NS, C: now_ns + 30 * NS}
    await store.block_relay(A, B, 0)  # lifted
    assert (await store.relay_target(A)).blocks == {C: now_ns + 30 * NS}
    assert (await store.relay_target(B)) == RelayTarget(None, {})


async def test_a_guest_is_kept_per_beacon_apart_from_its_registration(store: Store) -> None:
    await store.claim_name("alpha", A, 1 * NS, "192.0.2.1", ONE)
    home = dataclasses.replace(registration(A), home_address=("192.0.2.10", 9000))
    await store.publish(home, ttl=30)
    at_b2 = dataclasses.replace(registration(A, None, home="b2"), address=("192.0.2.7", 4000))
    await store.publish_guest(at_b2, ttl=0.5)
    await store.publish_guest(registration(A, None, home="b3"), ttl=30)
    # Only the beacon it is a guest of sees it, and only when it asks for guests.
    assert await store.find_key(A, "b2") == Found(A, "alpha", home, at_b2)
    assert (await store.find_key(A, "b3")).guest == registration(A, None, home="b3")
    assert (await store.find_key(A)).guest is None
    assert (await store.find_key(A, "b4")).guest is None
    assert (await store.relay_target(A, "b2")) == RelayTarget(home, {}, at_b2)
    assert (await store.relay_target(A)) == RelayTarget(home, {})
    # Its registration (at its home) and its name are untouched.
    found = await store.find_name("alpha")
    assert (found.key, found.registration, found.guest) == (A, home, None)
    # A guest expires on its own; so, later, does a guest whose node has no registration.
    await store.publish_guest(registration(B, None, home="b2"), ttl=30)
    await asyncio.sleep(0.7)
    await store.expire_names(0)
    assert (await store.find_key(A, "b2")) == Found(A, "alpha", home, None)
    assert (await store.relay_target(B, "b2")).guest == registration(B, None, home="b2")
    assert (await store.find_key(B, "b2")).registration is None


# -- opening -------------------------------------------------------------------------------------


async def test_store_specs(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:{tmp_path}/deep/names.db", tmp_path)
    assert store.synchronous and store.describe() == f"sqlite:{tmp_path}/deep/names.db"
    await store.aclose()
    store = await open_store(None, tmp_path / "data")
    assert (tmp_path / "data" / "names.sqlite3").exists()
    await store.aclose()
    with pytest.raises(ConfigError, match="expected sqlite:PATH or redis://"):
        await open_store("mysql://db", tmp_path)


async def test_an_unreachable_redis_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailableError) as failed:
        await open_store("redis://:pw@127.0.0.1:1/0", tmp_path, timeout=1.0)
    assert "redis://***@127.0.0.1:1/0" in str(failed.value) and "pw" not in str(failed.value)


async def test_a_stopped_redis_fails_each_call_and_comes_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    store = await open_store(redis_server.url(), tmp_path)
    assert isinstance(store, RedisStore) and not store.synchronous
    await store.claim_name("alpha", A, NS, "192.0.2.1", ONE)
    redis_server.stop()
    with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1"):
        await asyncio.wait_for(store.find_name("alpha"), 5)
    redis_server.start()
    # Not persisted (the fixture's redis keeps nothing on disk), but reachable again.
    assert (await store.find_name("alpha")).key is None
    await store.aclose()


# -- the core with a store whose calls wait ------------------------------------------------------


class Deferred:
    """The SQLite store, but its calls wait for the test to run them, as a network store's do."""

    synchronous = False

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def deferred_net(tmp_path: Path) -> Iterator[Callable[..., Net]]:
    """Makes a simulated network whose beacon's store calls wait; closes what is left."""
    made: list[Net] = []

    def make(**config: Any) -> Net:
        made.append(Net(tmp_path, BeaconConfig(alt_port=9001, **config)))
        made[-1].server.registry = Deferred(made[-1].store)  # type: ignore[assignment]
        return made[-1]

    yield make
    for net in made:
        for call in net.server.store_calls():
            call.coroutine.close()


def finish_store_calls(net: Net, *, fail: bool = False) -> int:
    calls = net.server.store_calls()
    for call in calls:
        if fail:
            call.coroutine.close()
            net.server.store_failed(call.call_id, "connection refused", net.now)
        else:
            net.server.store_done(call.call_id, run_now(call.coroutine), net.now)
    net.run()
    return len(calls)


def test_a_registration_waits_for_the_store(deferred_net: Callable[..., Net]) -> None:
    net = deferred_net()
    alice = net.add("alice")
    assert not alice.client.registered and not alice.of(bc.Registered)
    assert finish_store_calls(net) == 1  # the claim
    assert net.store.owner("alice") == alice.key
    # Answered once the store holds its registration too, so that whoever hears back from it
    # (through another worker or beacon) finds it there.
    assert not alice.client.registered
    assert finish_store_calls(net) == 1  # its registration, published
    assert alice.client.registered
    bob = net.add("bob")
    finish_store_calls(net)  # the claim
    finish_store_calls(net)  # the publication
    # A node registered here under a name is resolved from memory, by name or key...
    for name in ("alice", node_id_from_key(alice.key)):
        request = bob.client.resolve(name, net.now)
        net.run()
        assert last(bob, bc.Resolved).request_id == request
    calls = net.server.store_calls()
    assert [c.coroutine.__qualname__ for c in calls] == ["SqliteStore.publish"] * len(calls)
    for call in calls:
        call.coroutine.close()
    # ... any other name or key from the store, when it answers.
    for name in ("carol", node_id_from_key(b"k" * 32)):
        request = bob.client.resolve(name, net.now)
        net.run()
        assert not [e for e in bob.of(bc.ResolveFailed) if e.request_id == request]
        assert finish_store_calls(net) == 1
        assert last(bob, bc.ResolveFailed).request_id == request


def test_a_failing_store_refuses_clearly_and_warns_once(
    deferred_net: Callable[..., Net], caplog: pytest.LogCaptureFixture
) -> None:
    net = deferred_net()
    alice = net.add("alice")
    caplog.set_level(logging.WARNING, "pilot_agents.beacon")
    failures = finish_store_calls(net, fail=True)
    failed = last(alice, bc.RegistrationFailed)
    assert failed.code == Status.UNAVAILABLE and not failed.permanent
    assert "registry unavailable" in failed.reason
    bob = net.add(None)  # no name: no claim; a publication that fails fails quietly
    failures += finish_store_calls(net, fail=True)
    assert bob.client.registered
    request = bob.client.resolve("alice", net.now)  # not registered here: the store is asked
    net.run()
    failures += finish_store_calls(net, fail=True)
    failed_resolve = last(bob, bc.ResolveFailed)
    assert failed_resolve.request_id == request and failed_resolve.code == Status.UNAVAILABLE
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    store_warnings = [w for w in warnings if "unavailable (connection refused)" in w]
    assert len(store_warnings) == 1, warnings  # one line per interval, not one per call
    assert net.server.stats.refusals["store_unavailable"] == failures
    # The node tries again later; by then the store answers.
    net.advance(26)
    finish_store_calls(net)
    assert alice.client.registered


def test_a_refresh_under_a_recorded_name_needs_no_store(deferred_net: Callable[..., Net]) -> None:
    net = deferred_net()
    alice = net.add("alice")
    finish_store_calls(net)
    for _ in range(4):
        net.advance(25)
        finish_store_calls(net, fail=True)  # the store is down: only publications fail
    assert alice.client.registered and not alice.of(bc.RegistrationFailed)


def test_a_node_that_moved_to_another_worker_is_served_from_the_store(
    deferred_net: Callable[..., Net],
) -> None:
    net = deferred_net()
    alice, bob = net.add(None), net.add(None)  # no names: no claims
    net.advance(5)  # their NAT classification, and its REGISTERs
    finish_store_calls(net)  # their publications
    # His NAT gave bob a port another worker of this beacon answers: he registered there, and
    # refreshes there from now on.
    moved = ("198.51.100.9", 7000)
    home = net.server.home
    run_now(net.store.publish(Registration(bob.key, None, (moved,), NatType.CONE, home), 90))
    net.peers.remove(bob)
    net.advance(15)
    request = alice.client.introduce(bob.key, net.now)
    net.run()
    assert last(alice, bc.Introduction).candidates[0] != moved  # 20 s old: still ours
    net.advance(30)  # 45 s since his last refresh here (at most): he may have moved
    finish_store_calls(net)
    request = alice.client.introduce(bob.key, net.now)
    net.run()
    assert finish_store_calls(net) >= 1  # the lookup
    introduction = last(alice, bc.Introduction)
    assert introduction.request_id == request and introduction.candidates == (moved,)


def test_store_calls_are_bounded(deferred_net: Callable[..., Net]) -> None:
    net = deferred_net(max_store_calls=2)
    first, second = net.add("first"), net.add("second")
    third = net.add("third")
    assert last(third, bc.RegistrationFailed).code == Status.UNAVAILABLE
    finish_store_calls(net)  # the claims
    finish_store_calls(net)  # the publications
    assert first.client.registered and second.client.registered


async def test_a_malformed_registration_in_redis_is_an_error_not_an_answer(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    import redis.asyncio as aioredis

    store = await open_store(redis_server.url(), tmp_path)
    raw = aioredis.Redis.from_url(redis_server.url())
    try:
        for value in (
            "not json",
            '{"hostname": null, "candidates": [["evil.example", 1]], "nat": 2, "home": "x"}',
            '{"hostname": "-bad-", "candidates": [], "nat": 2, "home": "x"}',
        ):
            await raw.set(f"pilot:reg:{A.hex()}", value)
            with pytest.raises(StoreUnavailableError, match="malformed registration"):
                await store.find_key(A)
    finally:
        await raw.aclose()
        await store.aclose()


async def test_concurrent_publications_all_land_or_all_fail(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    store = await open_store(redis_server.url(), tmp_path)
    keys = [bytes([i]) * 32 for i in range(1, 201)]
    await asyncio.gather(*(store.publish(registration(key, None), 30) for key in keys))
    found = await asyncio.gather(*(store.find_key(key) for key in keys))
    assert [f.registration for f in found] == [registration(key, None) for key in keys]
    redis_server.stop()
    results = await asyncio.gather(
        *(asyncio.wait_for(store.publish(registration(k), 30), 5) for k in keys),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreUnavailableError) for r in results), results[:3]
    await store.aclose()
