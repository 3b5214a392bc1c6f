"""The beacon's batched socket I/O (UDP GSO out, GRO in, recvmmsg/sendmmsg where the C module was
compiled) on real loopback sockets: receivers see exactly the datagrams that were sent, in
order, whatever was batched; with the C module and with Python's socket calls alone."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pilot_agents.beacon import udp_batch
from pilot_agents.beacon.udp_batch import MAX_GSO_SEGMENT, UDP_SEGMENT, Reader, Sender
from pilot_agents.net.io.udp import MMSG, MMSG_BATCH
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal.beacon_wire import Address
from pilot_agents.net.tunnel import wire
from tests.test_beacon_service import ClientDriver, make_client, running

# The C module (skipped where it was not compiled), then the fallback.
WAYS = [pytest.param(True, marks=pytest.mark.skipif(not MMSG, reason="_mmsg not compiled")), False]


@pytest.fixture
def socks() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    made = []
    for _ in range(3):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2)
        made.append(sock)
    yield made[0], made[1], made[2]
    for sock in made:
        sock.close()


def receive(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65535) for _ in range(count)]


def read_all(reader: Reader, count: int) -> list[tuple[bytes, Address]]:
    got: list[tuple[bytes, Address]] = []
    reader.sock.setblocking(False)
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        select.select([reader.sock], [], [], 0.5)
        reader.read(lambda data, address, now: got.append((data, address)), 0.0)
    return got


@pytest.mark.parametrize("mmsg", WAYS)
def test_runs_to_one_address_go_out_as_the_same_datagrams(
    socks: tuple[socket.socket, socket.socket, socket.socket], mmsg: bool
) -> None:
    sender, a, b = socks
    to_a, to_b = a.getsockname(), b.getsockname()
    datagrams = [(bytes([i]) * 1200, to_a) for i in range(100)]  # more than one GSO buffer
    datagrams += [(b"short", to_a), (b"x" * 1200, to_b), (b"y" * 1200, to_b)]
    datagrams += [(b"z" * (MAX_GSO_SEGMENT + 1), to_b)] * 2  # too big to batch
    out = Sender(sender, mmsg=mmsg)
    out.send_all(datagrams)
    assert out.errors == 0 and out.gso and out.mmsg == mmsg
    assert receive(a, 101) == [d for d, address in datagrams if address == to_a]
    assert receive(b, 4) == [d for d, address in datagrams if address == to_b]


@pytest.mark.parametrize("mmsg", WAYS)
def test_interleaved_destinations_and_a_long_list(
    socks: tuple[socket.socket, socket.socket, socket.socket], mmsg: bool
) -> None:
    """More datagrams than one sendmmsg takes, alternating between two receivers (no runs)."""
    sender, a, b = socks
    to = [a.getsockname(), b.getsockname()]
    datagrams = [(i.to_bytes(2, "big") * 300, to[i % 2]) for i in range(300)]
    out = Sender(sender, mmsg=mmsg)
    out.send_all(datagrams)
    assert out.errors == 0
    assert receive(a, 150) == [d for d, address in datagrams if address == to[0]]
    assert receive(b, 150) == [d for d, address in datagrams if address == to[1]]


@pytest.mark.parametrize("mmsg", WAYS)
def test_a_failed_destination_loses_only_its_datagrams(
    socks: tuple[socket.socket, socket.socket, socket.socket], mmsg: bool
) -> None:
    """A send refused for one destination (broadcast without SO_BROADCAST: EACCES; port 0:
    EINVAL; a run of them as one GSO message; a datagram too large: EMSGSIZE) costs only what
    went there; a name instead of an address is resolved as socket.sendto does."""
    sender, a, _ = socks
    to_a = a.getsockname()
    by_name = ("localhost", to_a[1])
    datagrams = [
        (b"1", to_a), (b"no", ("255.255.255.255", to_a[1])), (b"2", to_a),
        (b"no", ("127.0.0.1", 0)), (b"3", by_name), (b"4", to_a),
        *[(b"r" * 1000, ("255.255.255.255", to_a[1]))] * 3,
        (b"n" * 70_000, to_a), (b"5", to_a),
    ]
    out = Sender(sender, mmsg=mmsg)
    out.send_all(datagrams)
    assert out.errors == 6
    assert out.gso  # a refused run is not taken for a kernel without GSO
    got = receive(a, 5)
    # The named one may come last: the C module leaves it to socket.sendto after the rest.
    assert sorted(got) == [b"1", b"2", b"3", b"4", b"5"]
    assert [d for d in got if d != b"3"] == [b"1", b"2", b"4", b"5"]


@pytest.mark.parametrize("mmsg", WAYS)
def test_coalesced_reads_are_cut_back_into_their_datagrams(
    socks: tuple[socket.socket, socket.socket, socket.socket], mmsg: bool
) -> None:
    sender, beacon, other = socks
    reader = Reader(beacon, mmsg=mmsg)
    assert reader.gro
    payloads = [bytes([i]) * 1000 for i in range(20)]
    # One GSO send arrives as one coalesced read where the kernel supports it.
    segment = [(socket.IPPROTO_UDP, UDP_SEGMENT, struct.pack("H", 1000))]
    sender.sendmsg([b"".join(payloads)], segment, 0, beacon.getsockname())
    sender.sendto(b"alone", beacon.getsockname())
    other.sendto(b"", beacon.getsockname())  # an empty datagram is one too
    sender.sendmsg([b"".join(payloads[:3])], segment, 0, beacon.getsockname())
    got = read_all(reader, 25)
    assert got == [
        *[(p, sender.getsockname()) for p in payloads],
        (b"alone", sender.getsockname()),
        (b"", other.getsockname()),
        *[(p, sender.getsockname()) for p in payloads[:3]],
    ]


@pytest.mark.parametrize("mmsg", WAYS)
def test_a_reader_takes_more_than_one_batch_of_many_senders(mmsg: bool) -> None:
    """More datagrams than one recvmmsg reads, from more senders (and an IPv6 socket)."""
    beacon = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    senders = [socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        for sock in (beacon, *senders):
            sock.bind(("::1", 0))
        reader = Reader(beacon, gro=False, mmsg=mmsg)
        sent = []
        for i in range(3 * MMSG_BATCH + 7):
            sock = senders[i % len(senders)]
            sock.sendto(i.to_bytes(2, "big"), beacon.getsockname())
            sent.append((i.to_bytes(2, "big"), sock.getsockname()[:2]))
        assert read_all(reader, len(sent)) == sent
    finally:
        for sock in (beacon, *senders):
            sock.close()


@pytest.mark.parametrize("mmsg", WAYS)
async def test_a_beacon_registers_and_relays_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mmsg: bool
) -> None:
    """The beacon (in process) on the C module's calls and on the fallback: two clients register,
    and a burst relayed from one to the other arrives whole and in order."""
    monkeypatch.setattr(udp_batch, "MMSG", mmsg)
    async with running(tmp_path / "beacon") as info:
        a = ClientDriver(make_client(info.address, None))
        b = ClientDriver(make_client(info.address, None))
        try:
            for node in (a, b):
                node.call(node.client.start)
                await node.wait_for(bc.Registered)
            payloads = [bytes([wire.DATA]) + i.to_bytes(2, "big") * 600 for i in range(300)]
            for payload in payloads:
                a.send_raw(a.client.wrap_relay(b.client.public_key, payload), info.address)

            def relayed() -> list[bytes]:
                return [e.packet for e in b.events if isinstance(e, bc.Relayed)]

            deadline = time.monotonic() + 10
            while len(relayed()) < len(payloads) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert relayed() == payloads
        finally:
            a.close()
            b.close()
