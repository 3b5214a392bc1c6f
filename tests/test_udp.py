"""read_batch on a real socket: a lone datagram, a burst, and an empty datagram."""

from __future__ import annotations

import select
import socket
import time

from pilot_agents.net.udp import open_socket, read_batch


def _wait_readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], 2)[0], "nothing arrived"


def test_a_lone_datagram_then_a_burst_then_nothing() -> None:
    receiver = open_socket("127.0.0.1", 0)
    sender = open_socket("127.0.0.1", 0)
    try:
        address = receiver.getsockname()
        sender.sendto(b"one", address)
        _wait_readable(receiver)
        assert [data for data, _ in read_batch(receiver)] == [b"one"]
        burst = [b"%d" % i for i in range(50)]
        for data in burst:
            sender.sendto(data, address)
        time.sleep(0.05)  # loopback delivers synchronously; this is only a margin
        assert [data for data, _ in read_batch(receiver)] == burst
        assert read_batch(receiver) == []
    finally:
        receiver.close()
        sender.close()


def test_an_empty_datagram_is_read_on_a_later_call() -> None:
    # FIONREAD reports the next datagram's size, 0 for an empty one: the batch may stop short
    # of it, and the next readiness callback (epoll is level-triggered) reads it.
    receiver = open_socket("127.0.0.1", 0)
    sender = open_socket("127.0.0.1", 0)
    try:
        address = receiver.getsockname()
        sender.sendto(b"first", address)
        sender.sendto(b"", address)
        _wait_readable(receiver)
        got = [data for data, _ in read_batch(receiver)]
        if got == [b"first"]:
            _wait_readable(receiver)  # still readable: the empty datagram waits
            got += [data for data, _ in read_batch(receiver)]
        assert got == [b"first", b""]
    finally:
        receiver.close()
        sender.close()
