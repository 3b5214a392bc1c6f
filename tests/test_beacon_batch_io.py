"""The beacon's batched socket I/O (UDP GSO out, GRO in) on real loopback sockets: receivers see
exactly the datagrams that were sent, in order, whatever was batched."""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from pilot_agents.beacon.udp_batch import (
    MAX_GSO_SEGMENT,
    UDP_SEGMENT,
    Sender,
    enable_gro,
    read_coalesced,
)


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


def test_runs_to_one_address_go_out_as_the_same_datagrams(
    socks: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    sender, a, b = socks
    to_a, to_b = a.getsockname(), b.getsockname()
    datagrams = [(bytes([i]) * 1200, to_a) for i in range(100)]  # more than one GSO buffer
    datagrams += [(b"short", to_a), (b"x" * 1200, to_b), (b"y" * 1200, to_b)]
    datagrams += [(b"z" * (MAX_GSO_SEGMENT + 1), to_b)] * 2  # too big to batch
    out = Sender(sender)
    out.send_all(datagrams)
    assert out.errors == 0 and out.gso
    assert receive(a, 101) == [d for d, address in datagrams if address == to_a]
    assert receive(b, 4) == [d for d, address in datagrams if address == to_b]


def test_coalesced_reads_are_cut_back_into_their_datagrams(
    socks: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    sender, beacon, _ = socks
    assert enable_gro(beacon)
    beacon.setblocking(False)
    payloads = [bytes([i]) * 1000 for i in range(20)]
    # One GSO send arrives as one coalesced read where the kernel supports it.
    segment = [(socket.IPPROTO_UDP, UDP_SEGMENT, struct.pack("H", 1000))]
    sender.sendmsg([b"".join(payloads)], segment, 0, beacon.getsockname())
    sender.sendto(b"alone", beacon.getsockname())
    got: list[tuple[bytes, tuple[str, int]]] = []
    deadline = time.monotonic() + 5
    while len(got) < 21 and time.monotonic() < deadline:
        select.select([beacon], [], [], 0.5)
        read_coalesced(beacon, lambda data, address, now: got.append((data, address)), 0.0)
    assert [data for data, _ in got] == [*payloads, b"alone"]
    assert {address for _, address in got} == {sender.getsockname()}
