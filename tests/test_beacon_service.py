"""The beacon over real UDP sockets on 127.0.0.1: a real process for the end-to-end test (started as
``python -m pilot_agents.beacon.service``), the in-process :func:`serve` for the rest.

Nodes are :class:`BeaconClient` instances driven by :class:`ClientDriver`, a minimal asyncio
loop around one socket written here (the real node's endpoint does the same job).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiostun
import pytest

from pilot_agents import Node
from pilot_agents.beacon import service
from pilot_agents.beacon.server import BeaconConfig
from pilot_agents.errors import PilotTimeoutError
from pilot_agents.identity import Identity, key_from_node_id, node_id_from_key
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.traversal import stun
from pilot_agents.net.traversal.beacon_wire import Address, NatType, Status
from pilot_agents.net.tunnel import wire

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"listening on (\S+):(\d+) alt-port (\d+|off) key (\w+)")


class ClientDriver:
    """One UDP socket on 127.0.0.1, one timer, the client's events collected in order."""

    def __init__(
        self,
        client: bc.BeaconClient,
        *,
        advertise_local: bool = True,
        bind: Address = ("127.0.0.1", 0),
    ) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind(bind)
        self.address: Address = self.sock.getsockname()
        self.events: list[bc.BeaconEvent] = []
        self.other: list[tuple[bytes, Address]] = []  # datagrams not from the beacon
        self._changed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        # A candidate equal to the reflexive address means "no NAT"; leave it out to make the
        # client classify by STUN on the beacon's second port instead.
        client.set_local_candidates([self.address] if advertise_local else [("10.255.0.1", 9)])
        self.loop.add_reader(self.sock.fileno(), self._read)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def call(self, method: Callable[..., Any], *args: Any) -> Any:
        """An API call on the client with ``now``; then flush its output."""
        result = method(*args, self.loop.time())
        self.flush()
        return result

    def send_raw(self, data: bytes, address: Address) -> None:
        self.sock.sendto(data, address)

    def _read(self) -> None:
        while True:
            try:
                data, address = self.sock.recvfrom(65535)
            except BlockingIOError:
                break
            if address in self.client.addresses:
                self.client.receive_datagram(data, self.loop.time())
            else:
                self.other.append((data, address))
        self.flush()

    def _on_timer(self) -> None:
        self._timer = None
        self.client.handle_timer(self.loop.time())
        self.flush()

    def flush(self) -> None:
        for data, address in self.client.datagrams_to_send(self.loop.time()):
            self.sock.sendto(data, address)
        while (event := self.client.next_event()) is not None:
            self.events.append(event)
            self._changed.set()
        if self._timer is not None:
            self._timer.cancel()
        deadline = self.client.get_timer()
        self._timer = None if deadline is None else self.loop.call_at(deadline, self._on_timer)

    async def wait_for(
        self, kind: type[bc.BeaconEvent], where: Callable[[Any], bool] = lambda e: True
    ) -> Any:
        deadline = self.loop.time() + 5.0
        while True:
            for event in self.events:
                if isinstance(event, kind) and where(event):
                    self.events.remove(event)
                    return event
            self._changed.clear()
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {kind.__name__}; events: {self.events}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


def make_client(
    beacon: Address,
    hostname: str | None,
    identity: Identity | None = None,
    beacon_key: bytes | None = None,
) -> bc.BeaconClient:
    identity = identity or Identity.generate()
    return bc.BeaconClient(
        identity.secret_key, identity.public_key, hostname, beacon, beacon_key=beacon_key
    )


# -- the beacon as a process ---------------------------------------------------------------------


class BeaconProcess:
    def __init__(self, data_dir: Path, listen: str = "127.0.0.1:0", *options: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pilot_agents.beacon.service",
                "--listen",
                listen,
                "--data-dir",
                str(data_dir),
                "--stats",
                "3600",
                *options,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self._readline(10.0)
        match = READY.search(line)
        assert match, f"unexpected first line {line!r}; stderr: {self.stderr()}"
        self.address: Address = (match[1], int(match[2]))
        self.alt_port = int(match[3])
        self.key = key_from_node_id(match[4])

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise AssertionError(f"beacon did not start; stderr: {self.stderr()}")
        return self.proc.stdout.readline()

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(signum)
        try:
            code = self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


@pytest.fixture
def drivers() -> Any:
    made: list[ClientDriver] = []
    yield made
    for driver in made:
        driver.close()


async def test_two_nodes_through_a_beacon_process(
    tmp_path: Path, drivers: list[ClientDriver]
) -> None:
    data_dir = tmp_path / "beacon"
    beacon = BeaconProcess(data_dir)
    try:
        alice_id = Identity.generate()
        alice = ClientDriver(make_client(beacon.address, "alice", alice_id))
        bob = ClientDriver(make_client(beacon.address, "bob"), advertise_local=False)
        drivers += [alice, bob]
        alice.call(alice.client.start)
        bob.call(bob.client.start)
        registered = await alice.wait_for(bc.Registered)
        assert registered.reflexive == alice.address  # loopback: no NAT in between
        assert (await bob.wait_for(bc.Registered)).reflexive == bob.address
        assert alice.client.beacon_key == beacon.key  # pinned on first use
        # Alice's candidate is her reflexive address: open. Bob's isn't, so he asked the
        # beacon's second port: same mapping from both ports, a cone.
        assert (await alice.wait_for(bc.NatClassified)).nat_type == "open"
        assert (await bob.wait_for(bc.NatClassified)).nat_type == "cone"

        # Resolve each other, by name and by node id.
        request = alice.call(alice.client.resolve, "bob")
        found = await alice.wait_for(bc.Resolved, lambda e: e.request_id == request)
        assert found.node_key == bob.client.public_key and found.hostname == "bob"
        assert found.candidates[0] == bob.address
        request = bob.call(bob.client.resolve, node_id_from_key(alice_id.public_key))
        found = await bob.wait_for(bc.Resolved, lambda e: e.request_id == request)
        assert found.node_key == alice_id.public_key and found.candidates == (alice.address,)
        request = bob.call(bob.client.resolve, "carol")
        failed = await bob.wait_for(bc.ResolveFailed, lambda e: e.request_id == request)
        assert failed.code == Status.UNKNOWN

        # Introduction: both sides hear it.
        request = alice.call(alice.client.introduce, bob.client.public_key)
        to_alice = await alice.wait_for(bc.Introduction)
        to_bob = await bob.wait_for(bc.Introduction)
        assert to_alice.request_id == request and to_alice.peer_key == bob.client.public_key
        assert to_bob.request_id == 0 and to_bob.peer_key == alice_id.public_key
        assert to_bob.candidates == (alice.address,) and to_bob.nat_type == "open"
        assert to_alice.candidates[0] == bob.address and to_alice.nat_type == "cone"

        # Relay both ways: the bytes that arrive are the bytes that were sent.
        to_b = os.urandom(1200)
        to_a = os.urandom(37)
        alice.send_raw(alice.client.wrap_relay(bob.client.public_key, to_b), beacon.address)
        bob.send_raw(bob.client.wrap_relay(alice_id.public_key, to_a), beacon.address)
        assert await bob.wait_for(bc.Relayed) == bc.Relayed(alice_id.public_key, to_b)
        assert await alice.wait_for(bc.Relayed) == bc.Relayed(bob.client.public_key, to_a)

        # STUN: aiostun against the main port, in RFC 5389 and RFC 3489 form.
        async with aiostun.Client(host=beacon.address[0], port=beacon.address[1]) as stun_client:
            local = stun_client.get_local_addr()
            mapped = await stun_client.get_mapped_address()
            assert (mapped["ip"], mapped["port"]) == local[:2]
            mapped = await stun_client.get_mapped_address(use_classicstun=True)
            assert (mapped["ip"], mapped["port"]) == local[:2]
        # ... and a raw request on the second port.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.settimeout(3.0)
            raw.bind(("127.0.0.1", 0))
            raw.sendto(stun.encode_binding_request(b"0123456789ab"), ("127.0.0.1", beacon.alt_port))
            reply, source = await asyncio.to_thread(raw.recvfrom, 2048)
            assert source == ("127.0.0.1", beacon.alt_port)
            assert stun.parse_binding_response_untrusted(reply) == (
                b"0123456789ab",
                raw.getsockname(),
            )
        counters = await service.query_status(beacon.address, timeout=3.0)
        assert counters["registered_nodes"] == 2
        assert counters["names"] == 2
        assert counters["resolves"] == 3
        assert counters["introductions"] == 1
        assert counters["relayed_packets"] == 2
        assert counters["relayed_bytes"] == 1237
        assert counters["stun_requests"] >= 4
        assert counters["beacon_key"] == node_id_from_key(beacon.key)
    finally:
        code, log = beacon.stop()
    assert code == 0, log
    assert "registered alice" in log and "registered bob" in log
    assert "introduced alice" in log
    assert "relay started: alice -> bob" in log and "relay started: bob -> alice" in log
    assert "final status" in log
    key_file = data_dir / "identity.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    # The same data dir, the same port: the same key, the names still owned.
    beacon = BeaconProcess(data_dir, f"{beacon.address[0]}:{beacon.address[1]}")
    try:
        assert beacon.key == alice.client.beacon_key
        mallory = ClientDriver(make_client(beacon.address, "alice"))
        drivers.append(mallory)
        mallory.call(mallory.client.start)
        refused = await mallory.wait_for(bc.RegistrationFailed)
        assert refused.code == Status.NAME_TAKEN and "name taken" in refused.reason
        # Alice's client lost its registration with the restart; asking tells it so, it
        # registers again (the pinned key still matches) and its request goes through.
        request = alice.call(alice.client.introduce, bob.client.public_key)
        failed = await alice.wait_for(bc.IntroductionFailed, lambda e: e.request_id == request)
        assert failed.code == Status.OFFLINE  # bob hasn't refreshed yet
        assert alice.client.registered
    finally:
        code, log = beacon.stop(signal.SIGHUP)  # its terminal closed: a clean stop too
    assert code == 0, log
    assert "refused alice" in log and "final status" in log


# -- in process --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(data_dir: Path, **kwargs: Any) -> AsyncIterator[service.BeaconInfo]:
    stop = asyncio.Event()
    ready: asyncio.Future[service.BeaconInfo] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        service.serve("127.0.0.1:0", data_dir, ready.set_result, stop=stop, **kwargs)
    )
    try:
        yield await asyncio.wait_for(ready, 5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_serve_in_process_and_query_status(
    tmp_path: Path, drivers: list[ClientDriver]
) -> None:
    async with running(tmp_path / "b", alt_port="off") as info:
        assert info.alt_address is None
        assert info.spec == f"{info.node_id}@127.0.0.1:{info.address[1]}"
        node = ClientDriver(make_client(info.address, "solo", beacon_key=info.public_key))
        drivers.append(node)
        node.call(node.client.start)
        await node.wait_for(bc.Registered)
        counters = await service.query_status(f"127.0.0.1:{info.address[1]}")
        assert counters["registered_nodes"] == 1 and counters["registrations"] == 1
        assert counters["refusals"] == {}
    with pytest.raises(PilotTimeoutError):
        await service.query_status(info.address, timeout=0.3)


async def test_pinned_key_mismatch_never_registers(
    tmp_path: Path, drivers: list[ClientDriver]
) -> None:
    async with running(tmp_path / "b") as info:
        wrong = Identity.generate().public_key
        node = ClientDriver(make_client(info.address, "solo", beacon_key=wrong))
        drivers.append(node)
        node.client.config.register_retry = 0.05
        node.call(node.client.start)
        event = await node.wait_for(bc.BeaconUnreachable)
        assert "unexpected key" in event.reason
        assert not node.client.registered


async def test_relay_throughput_on_loopback(tmp_path: Path, drivers: list[ClientDriver]) -> None:
    """Thousands of relayed packets in a row, none lost or corrupted, at a sane rate."""
    async with running(tmp_path / "b") as info:
        a = ClientDriver(make_client(info.address, None))
        b = ClientDriver(make_client(info.address, None))
        drivers += [a, b]
        for node in (a, b):
            node.call(node.client.start)
            await node.wait_for(bc.Registered)
        count = 5000
        window = 200  # packets in flight: loopback loses nothing unless a buffer overflows
        payload = bytes([wire.DATA]) + os.urandom(1199)  # handshakes are limited far lower
        datagram = a.client.wrap_relay(b.client.public_key, payload)

        def received() -> int:
            return sum(1 for e in b.events if isinstance(e, bc.Relayed))

        started = time.perf_counter()
        sent = 0
        while sent < count:
            while sent < count and sent - received() < window:
                a.send_raw(datagram, info.address)
                sent += 1
            await asyncio.sleep(0)  # let the beacon and b read
            assert time.perf_counter() - started < 20, f"stalled at {received()} of {sent}"
        while received() < count and time.perf_counter() - started < 20:
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - started
        relayed = [e for e in b.events if isinstance(e, bc.Relayed)]
        assert len(relayed) == count
        assert all(e.packet == payload and e.source_key == a.client.public_key for e in relayed)
        # One process sends, relays and receives here, on a shared CI machine: the floor only
        # catches pathologies (a timer per packet, say). The beacon process alone forwards
        # about 48,000 packets/s on loopback (see the report / benchmarks).
        assert count / elapsed > 300


def test_main_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert service.main(["--listen", "nonsense", "--data-dir", str(tmp_path)]) == 2
    assert "--listen" in capsys.readouterr().err
    assert (
        service.main(["--listen", "127.0.0.1:0", "--alt-port", "x", "--data-dir", str(tmp_path)])
        == 2
    )


async def test_register_flood_from_many_addresses_gets_no_answer(
    tmp_path: Path, drivers: list[ClientDriver]
) -> None:
    """Issue #11 item 8 over real UDP: forged REGISTERs from 40 loopback addresses are rationed
    before their signatures are checked and never answered; a registered node resolves on."""
    config = BeaconConfig(verify_rate=1.0, verify_burst=100.0)
    async with running(tmp_path / "b", config=config) as info:
        alice = ClientDriver(make_client(info.address, "alice"))
        bob = ClientDriver(make_client(info.address, None))
        drivers += [alice, bob]
        for node in (alice, bob):
            node.call(node.client.start)
            await node.wait_for(bc.Registered)
        flooders = []
        for i in range(40):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind((f"127.0.0.{i + 2}", 0))
            flooders.append(sock)
        try:
            key = Identity.generate().public_key
            signed = bw.encode_register(bytes(64), key, time.time_ns(), NatType.OPEN, "x", [])
            forged = signed[:-64] + bytes(64)
            for _ in range(50):
                for sock in flooders:
                    with contextlib.suppress(BlockingIOError):
                        sock.sendto(forged, info.address)
                await asyncio.sleep(0.001)
            request_id = bob.call(bob.client.resolve, "alice")
            resolved = await bob.wait_for(bc.Resolved)
            assert resolved.request_id == request_id
            counters = await service.query_status(info.address, timeout=3.0)
            refusals = counters["refusals"]
            assert 0 < refusals["bad_signature"] <= 110  # the budget, and what refilled since
            assert refusals["verify_source_limited"] + refusals["verify_budget"] > 1000
            for sock in flooders:
                with pytest.raises(BlockingIOError):
                    sock.recv(2048)
        finally:
            for sock in flooders:
                sock.close()


async def test_node_under_a_relayed_flood_has_its_beacon_block_the_key(
    tmp_path: Path, drivers: list[ClientDriver]
) -> None:
    """Issue #11 item 6: forged initiations relayed from a throwaway registered key. The node
    refuses them; after ``block_relay_after`` it asks the beacon, which then drops that key's
    relayed packets to the node before they cost it anything."""
    async with running(tmp_path / "b") as info:
        host, port = info.address
        config = bc.BeaconClientConfig(block_relay_after=5)
        async with Node(
            tmp_path / "victim", "127.0.0.1:0", beacon=f"{host}:{port}", beacon_config=config
        ) as victim:
            attacker = ClientDriver(make_client(info.address, None))
            drivers.append(attacker)
            attacker.call(attacker.client.start)
            await attacker.wait_for(bc.Registered)
            victim_key = victim.identity.public_key
            initiation = bytes([wire.INITIATION]) + os.urandom(116)
            for i in range(30):
                attacker.send_raw(attacker.client.wrap_relay(victim_key, initiation), info.address)
                await asyncio.sleep(0.02 if i < 10 else 0.001)
            counters = await service.query_status(info.address, timeout=3.0)
            assert counters["relay_blocks"] == 1
            assert counters["refusals"]["relay_blocked"] >= 10
