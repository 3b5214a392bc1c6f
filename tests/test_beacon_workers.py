"""A beacon with two worker processes (``--workers 2``) on one port and a real redis-server,
with clients bound to source ports the kernel hands to different workers.

Each worker holds in memory only the nodes whose packets reach it; what it is asked about a
node of its beacon that the other worker holds, it serves from that node's registration in the
store: RESOLVE, INTRODUCE, the relay, and the relay blocks. A worker that dies is restarted on
the same socket; a beacon without a shared store refuses to start with more than one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pilot_agents import Node
from pilot_agents.beacon.service import query_status
from pilot_agents.beacon.store import open_store
from pilot_agents.identity import Identity, key_from_node_id, node_id_from_key
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.traversal.beacon_wire import Address
from pilot_agents.net.tunnel.config import PathConfig, SessionConfig
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.test_beacon_fleet import RELAY_ONLY, Fleet
from tests.test_beacon_fleet import _exchange as exchange
from tests.test_beacon_fleet import _published as published
from tests.test_beacon_service import ROOT, BeaconProcess, ClientDriver, make_client
from tests.test_beacon_service import drivers as drivers  # the fixture


@pytest.fixture
def beacon(tmp_path: Path, redis_server: RedisServer) -> Iterator[BeaconProcess]:
    process = BeaconProcess(
        tmp_path / "beacon", "127.0.0.1:0", "--workers", "2", "--store", redis_server.url()
    )
    try:
        yield process
    finally:
        running = process.proc.poll() is None  # some tests end it themselves
        code, log = process.stop()
        assert code == 0 or not running, log


def status_from(beacon: Address, port: int) -> dict[str, Any]:
    """The counters of the worker that datagrams from 127.0.0.1:``port`` reach."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3.0)
        sock.bind(("127.0.0.1", port))
        request_id = secrets.randbits(32)
        sock.sendto(bw.encode_status_request(request_id), beacon)
        while True:
            reply_id, counters = bw.parse_status_reply_untrusted(sock.recv(2048))
            if reply_id == request_id:
                return counters


def worker_of(beacon: Address, port: int) -> int:
    return int(status_from(beacon, port)["worker"])


def ports_by_worker(beacon: Address) -> dict[int, int]:
    """A free local port per worker, found by asking from fresh ports."""
    found: dict[int, int] = {}
    while len(found) < 2:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        found.setdefault(worker_of(beacon, port), port)
    return found


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_nodes_on_two_workers_resolve_introduce_relay_and_block(
    beacon: BeaconProcess, drivers: list[ClientDriver]
) -> None:
    ports = ports_by_worker(beacon.address)
    alice_id = Identity.generate()
    alice = ClientDriver(
        make_client(beacon.address, "alice", alice_id), bind=("127.0.0.1", ports[0])
    )
    bob = ClientDriver(make_client(beacon.address, "bob"), bind=("127.0.0.1", ports[1]))
    drivers += [alice, bob]
    alice.call(alice.client.start)
    bob.call(bob.client.start)
    await alice.wait_for(bc.Registered)
    await bob.wait_for(bc.Registered)

    # Bob is held by worker 1 only: worker 0 answers alice from his registration in Redis.
    request = alice.call(alice.client.resolve, "bob")
    found = await alice.wait_for(bc.Resolved, lambda e: e.request_id == request)
    assert found.node_key == bob.client.public_key and found.candidates[0] == bob.address

    # Introductions both ways across the workers: each side hears of the other.
    request = alice.call(alice.client.introduce, bob.client.public_key)
    to_alice = await alice.wait_for(bc.Introduction, lambda e: e.request_id == request)
    to_bob = await bob.wait_for(bc.Introduction)
    assert to_alice.peer_key == bob.client.public_key and to_alice.candidates[0] == bob.address
    assert to_bob.peer_key == alice_id.public_key and to_bob.candidates[0] == alice.address
    request = bob.call(bob.client.introduce, alice_id.public_key)
    await bob.wait_for(bc.Introduction, lambda e: e.request_id == request)
    await alice.wait_for(bc.Introduction, lambda e: e.request_id == 0)

    # The relay both ways: the first packet waits for the store's answer, none is lost.
    to_b, to_a = os.urandom(1200), os.urandom(37)
    alice.send_raw(alice.client.wrap_relay(bob.client.public_key, to_b), beacon.address)
    bob.send_raw(bob.client.wrap_relay(alice_id.public_key, to_a), beacon.address)
    assert await bob.wait_for(bc.Relayed) == bc.Relayed(alice_id.public_key, to_b)
    assert await alice.wait_for(bc.Relayed) == bc.Relayed(bob.client.public_key, to_a)

    # Bob blocks alice at his worker; worker 1 tells the store, and worker 0, relaying from
    # alice, reads the block with bob's address once its cached lookup is gone.
    bob.call(bob.client.block_relay, alice_id.public_key, 600)
    store = await open_store(redis_url(beacon), Path())
    try:
        for _ in range(100):
            if (await store.relay_target(bob.client.public_key)).blocks:
                break
            await asyncio.sleep(0.05)
        assert alice_id.public_key in (await store.relay_target(bob.client.public_key)).blocks
    finally:
        await store.aclose()
    # Worker 0 serves its last lookup of bob until it is sibling_ttl (2 s) old, then looks him
    # up again: his block holds from then on. It counts the refusals; ask it from another port.
    port = ports_by_worker(beacon.address)[0]
    blocked = alice.client.wrap_relay(bob.client.public_key, b"x" * 50)
    for _ in range(200):
        alice.send_raw(blocked, beacon.address)
        refusals = status_from(beacon.address, port)["refusals"]
        if refusals.get("relay_blocked", 0):
            break
        await asyncio.sleep(0.05)
    bob.events.clear()
    for _ in range(3):
        alice.send_raw(blocked, beacon.address)
    for _ in range(100):
        if status_from(beacon.address, port)["refusals"]["relay_blocked"] >= 4:
            break
        await asyncio.sleep(0.05)
    assert status_from(beacon.address, port)["refusals"]["relay_blocked"] == 4
    assert not [e for e in bob.events if isinstance(e, bc.Relayed)]


async def test_a_guest_and_a_node_on_different_workers_connect_both_ways(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Beacon B runs two workers, beacon A one, on one Redis: alpha (home A) is B's guest on
    worker 0, bravo (home B) is on worker 1. Worker 1 relays to alpha and introduces it from
    alpha's guest entry in the store; worker 0 relays to bravo from his registration."""
    key_file = tmp_path / "fleet" / "identity.key"
    Identity.load_or_create(key_file.parent)
    common = ("--store", redis_server.url(), "--key-file", str(key_file))
    a = BeaconProcess(tmp_path / "a", "127.0.0.1:0", *common, "--beacon-id", "beacon-a")
    b = BeaconProcess(
        tmp_path / "b", "127.0.0.1:0", *common, "--beacon-id", "beacon-b", "--workers", "2"
    )
    try:
        ports = ports_by_worker(b.address)
        key = node_id_from_key(a.key)
        spec_a, spec_b = (f"{key}@{x.address[0]}:{x.address[1]}" for x in (a, b))
        async with (
            Node(tmp_path / "na", f"127.0.0.1:{ports[0]}", RELAY_ONLY, beacon=spec_a,
                 hostname="alpha") as alpha,
            Node(tmp_path / "nb", f"127.0.0.1:{ports[1]}", RELAY_ONLY, beacon=spec_b,
                 hostname="bravo") as bravo,
        ):
            await published(Fleet(redis_server, a, b, key_file), tmp_path, "alpha", "bravo")
            alpha.trust(bravo.node_id)
            bravo.trust(alpha.node_id)
            assert await exchange(alpha, bravo, "bravo", 1001) == "relay"
            # Bravo answered alpha through his own home: he did not have to be a guest at A.
            assert (await query_status(a.address))["guests"] == 0
            assert await exchange(bravo, alpha, "alpha", 1002) == "relay"
            # Alpha is B's guest in the store too, for worker 1; bravo, since guest at A
            # (which has one process), is not A's there.
            store = await open_store(redis_server.url(), tmp_path)
            try:
                found = await store.find_key(key_from_node_id(alpha.node_id), "beacon-b")
                assert found.guest is not None and found.guest.home == "beacon-b"
                assert found.registration is not None and found.registration.home == "beacon-a"
                bravo_key = key_from_node_id(bravo.node_id)
                assert (await store.find_key(bravo_key, "beacon-a")).guest is None
            finally:
                await store.aclose()
        # A port of each worker, free again now that the nodes are gone.
        workers = [status_from(b.address, port) for port in ports_by_worker(b.address).values()]
        first, second = sorted(workers, key=lambda counters: int(counters["worker"]))
        assert first["guests"] >= 1 and second["guests"] == 0
        assert first["relayed_packets"] > 0 and second["relayed_packets"] > 0
        assert not second["refusals"].get("relay_target_offline")
        assert not second["refusals"].get("introduce_elsewhere")
    finally:
        for beacon in (a, b):
            code, log = beacon.stop()
            assert code == 0, log


def redis_url(beacon: BeaconProcess) -> str:
    args = beacon.proc.args
    assert isinstance(args, list)
    return str(args[args.index("--store") + 1])


@pytest.mark.parametrize("path", ["direct", "relay"])
async def test_nodes_on_two_workers_connect(
    tmp_path: Path, beacon: BeaconProcess, path: str
) -> None:
    ports = ports_by_worker(beacon.address)
    spec = f"{node_id_from_key(beacon.key)}@{beacon.address[0]}:{beacon.address[1]}"
    # "relay": no probes at all, as if both sat behind symmetric NATs.
    probes = 0 if path == "relay" else PathConfig().probes_per_round
    config = SessionConfig(paths=PathConfig(probes_per_round=probes))
    async with (
        Node(tmp_path / "a", f"127.0.0.1:{ports[0]}", config, beacon=spec, hostname="one") as a,
        Node(tmp_path / "b", f"127.0.0.1:{ports[1]}", config, beacon=spec, hostname="two") as b,
    ):
        a.trust(b.node_id)
        b.trust(a.node_id)
        async with b.listen(7) as listener, a.connect("two", 7) as conn:
            await conn.send(b"across the workers")
            message = await listener.receive(timeout=10)
            assert message.data == b"across the workers" and message.sender == a.node_id
            await message.reply(b"back")
            assert (await conn.receive(timeout=5)).data == b"back"
            if path == "relay":
                assert conn.path == "relay"


async def test_a_killed_worker_is_restarted_on_its_socket(beacon: BeaconProcess) -> None:
    ports = ports_by_worker(beacon.address)
    workers = children(beacon.proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    # The supervisor starts another on the same socket: the same source port still reaches
    # worker 1, which answers (the STATUS queued meanwhile, or the retry).
    for _ in range(200):
        if len(set(children(beacon.proc.pid)) - set(workers)) == 1:
            break
        await asyncio.sleep(0.05)
    assert worker_of(beacon.address, ports[1]) == 1
    assert worker_of(beacon.address, ports[0]) == 0


def test_more_than_one_worker_needs_a_shared_store(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pilot_agents.beacon.service", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path), "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "--workers 2 needs --store redis://" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_worker_that_keeps_dying_stops_the_beacon(beacon: BeaconProcess) -> None:
    killed: set[int] = set()
    for _ in range(400):  # bounded: each restart takes a fraction of a second
        if beacon.proc.poll() is not None:
            break
        running = [pid for pid in children(beacon.proc.pid) if pid not in killed]
        if len(running) == 2:
            # The newest worker 1 dies each time it is up (worker 0 keeps serving).
            victim = max(running)
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
        await asyncio.sleep(0.05)
    assert beacon.proc.wait(10) == 1
    assert "died 6 times within 60 s" in beacon.stderr()
    assert not [pid for pid in killed if Path(f"/proc/{pid}").exists()]


async def test_workers_stop_when_their_supervisor_is_killed(beacon: BeaconProcess) -> None:
    workers = children(beacon.proc.pid)
    beacon.proc.kill()
    beacon.proc.wait()
    for _ in range(100):
        if not [pid for pid in workers if Path(f"/proc/{pid}").exists() and not zombie(pid)]:
            break
        await asyncio.sleep(0.05)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and not zombie(pid)]


def zombie(pid: int) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False
