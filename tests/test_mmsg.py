"""The C module _mmsg (recvmmsg/sendmmsg) on its own, on real loopback sockets: what it does with
input it cannot send or buffers too small. Batched I/O through it and through the fallback:
tests/test_beacon_batch_io.py."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

_mmsg = pytest.importorskip("pilot_agents.net.io._mmsg", reason="not compiled, or not Linux")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock in (a, b):
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2)
    yield a, b
    a.close()
    b.close()


def test_bad_arguments_are_errors_not_crashes() -> None:
    for count, size in ((0, 100), (2000, 100), (4, 0), (4, 70_000)):
        with pytest.raises(ValueError):
            _mmsg.Receiver(count, size)
    with pytest.raises(TypeError):
        _mmsg.Receiver(4, 100).read(0, (), 0.0)
    with pytest.raises(TypeError):
        _mmsg.send(0, socket.AF_INET, (), 0, 64, 65_000)
    with pytest.raises(ValueError):
        _mmsg.send(0, socket.AF_UNIX, [], 0, 64, 65_000)


def test_a_datagram_larger_than_the_buffer_is_skipped(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    for data in (b"x" * 200, b"fits"):
        a.sendto(data, b.getsockname())
    out: list[tuple[bytes, tuple[str, int], float]] = []
    b.recv(0, socket.MSG_PEEK)  # both have arrived (loopback delivers in order)
    assert _mmsg.Receiver(4, 100).read(b.fileno(), lambda *args: out.append(args), 1.5) == 2
    assert out == [(b"fits", a.getsockname(), 1.5)]


def test_what_it_cannot_send_is_handed_back(pair: tuple[socket.socket, socket.socket]) -> None:
    """Entries it can't take (not (bytes, (numeric host, port))) come back as NOT_NUMERIC for the
    caller's socket.sendto; the rest go out."""
    a, b = pair
    to_b = b.getsockname()
    datagrams = [
        (b"1", to_b), (bytearray(b"ba"), to_b), (b"n", ("localhost", to_b[1])),
        (b"p", (to_b[0], 70_000)), "junk", (b"2", to_b),
    ]
    failures = _mmsg.send(a.fileno(), a.family, datagrams, 1452, 64, 65_000)
    assert failures == [(i, i + 1, _mmsg.NOT_NUMERIC) for i in (1, 2, 3, 4)]
    assert [b.recv(100) for _ in range(2)] == [b"1", b"2"]


def test_a_closed_socket_fails_every_datagram_without_raising(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    fd = a.fileno()
    a.close()
    datagrams = [(b"x", b.getsockname())] * 3
    assert _mmsg.send(fd, socket.AF_INET, datagrams, 0, 64, 65_000) == [
        (i, i + 1, errno.EBADF) for i in range(3)
    ]
    with pytest.raises(OSError):
        _mmsg.Receiver(4, 100).read(fd, print, 0.0)
