"""read_batch and DatagramReader (recvmmsg, and its fallback) on a real socket: a lone datagram,
a burst, an empty datagram, and more than one call's worth."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

from pilot_agents.net.io.udp import (
    MMSG,
    MMSG_BATCH,
    READ_BATCH,
    DatagramReader,
    open_socket,
    read_batch,
)


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A receiver and a sender on 127.0.0.1; the sender is connected to the receiver."""
    receiver = open_socket("127.0.0.1", 0)
    sender = open_socket("127.0.0.1", 0)
    sender.connect(receiver.getsockname())
    yield receiver, sender
    receiver.close()
    sender.close()


def _payloads(sock: socket.socket) -> list[bytes]:
    assert select.select([sock], [], [], 2)[0], "nothing arrived"
    return [data for data, _ in read_batch(sock)]


def test_a_lone_datagram_then_a_burst_then_nothing(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    receiver, sender = sockets
    sender.send(b"one")
    assert _payloads(receiver) == [b"one"]
    burst = [b"%d" % i for i in range(50)]
    for data in burst:
        sender.send(data)
    time.sleep(0.05)  # loopback delivers synchronously; this is only a margin
    assert _payloads(receiver) == burst
    assert read_batch(receiver) == []


def test_an_empty_datagram_is_read_on_a_later_call(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    # FIONREAD reports the next datagram's size, 0 for an empty one: the batch may stop short
    # of it, and the next readiness callback (epoll is level-triggered) reads it.
    receiver, sender = sockets
    sender.send(b"first")
    sender.send(b"")
    got = _payloads(receiver)
    if got == [b"first"]:
        got += _payloads(receiver)  # still readable: the empty datagram waits
    assert got == [b"first", b""]


@pytest.mark.parametrize(
    "mmsg",
    [pytest.param(True, marks=pytest.mark.skipif(not MMSG, reason="_mmsg not compiled")), False],
    ids=["recvmmsg", "fallback"],
)
def test_the_reader_hands_over_what_waits_in_order_and_its_senders(
    sockets: tuple[socket.socket, socket.socket], mmsg: bool,
) -> None:
    receiver, sender = sockets
    reader = DatagramReader(receiver, mmsg=mmsg)
    got: list[tuple[bytes, tuple[str, int], float]] = []

    def read() -> list[bytes]:
        assert select.select([receiver], [], [], 2)[0], "nothing arrived"
        got.clear()
        reader.read(lambda data, address, now: got.append((data, address, now)), 7.0)
        return [data for data, _, _ in got]

    sender.send(b"one")
    assert read() == [b"one"]
    assert got == [(b"one", sender.getsockname(), 7.0)]
    # More than a recvmmsg takes at once, less than a readiness callback reads; then the rest.
    burst = [b"%d" % i for i in range(READ_BATCH + MMSG_BATCH)]
    for data in burst:
        sender.send(data)
    time.sleep(0.05)
    first = read()
    assert first == burst[:READ_BATCH]
    assert first + read() == burst
    sender.send(b"")
    assert read() == [b""]
