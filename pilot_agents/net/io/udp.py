"""Opening a non-blocking UDP socket and reading it in batches, shared by the node's endpoint and
the beacon.

asyncio's datagram transport reads one datagram per loop iteration, which caps throughput; a
readiness callback that drains up to a batch instead keeps up with a full window.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import termios
from collections.abc import Callable
from typing import Final

from ...addressing import HostPort as Address

try:
    from . import _mmsg
except ImportError:  # not compiled (a pure-Python install) or not Linux
    MMSG = False
else:
    MMSG = True

log = logging.getLogger("pilot_agents.udp")

MAX_DATAGRAM: Final = 65535
# Bytes; a burst (a full congestion window, or the beacon's relayed traffic) queues here rather
# than being dropped.
SOCKET_BUFFER = 4 * 1024 * 1024
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_PROBE = getattr(socket, "IP_PMTUDISC_PROBE", 3)  # set DF, ignore the PMTU cache
READ_BATCH: Final = 256  # datagrams per readiness callback before yielding to other tasks
# Datagrams per recvmmsg: its buffers are this many times MAX_DATAGRAM (4 MB of address space,
# resident only as far as datagrams filled them: a page each for 1,200-byte tunnel packets).
MMSG_BATCH: Final = 64
# FIONREAD writes its answer here. A bytes object would be read-only: ioctl then first fails to
# get a writable buffer, formats that error message, and only then falls back, on every read.
# Shared by every socket: nodes on loops in two threads racing on it cost at most a read that
# finds nothing or a datagram left for the next loop iteration, never a datagram.
_FIONREAD_BUFFER = bytearray(4)
# Looked up once: from compiled code a module attribute is a generic getattr on every read.
_ioctl = fcntl.ioctl
_FIONREAD: Final[int] = termios.FIONREAD



def open_socket(
    host: str, port: int, *, dont_fragment: bool = False, reuse_port: bool = False
) -> socket.socket:
    """A non-blocking UDP socket bound to ``(host, port)``, IPv6 if ``host`` has a colon.

    ``dont_fragment``: IPv4 datagrams carry DF, so an oversized MTU probe fails instead of
    arriving in pieces. ``reuse_port``: SO_REUSEPORT, so several sockets share the port and the
    kernel spreads senders among them (the beacon's worker processes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        if dont_fragment and family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


Receive = Callable[[bytes, Address, float], object]


class DatagramReader:
    """Feeds what waits on a socket to ``receive(data, address, now)``, up to ``READ_BATCH``
    datagrams per call: with the C module ``_mmsg``, ``MMSG_BATCH`` per ``recvmmsg`` (a lone
    datagram costs one system call, not a read and a FIONREAD); else :func:`read_batch`.
    ``mmsg``: whether to use the module (the tests turn it off to check the fallback)."""

    def __init__(self, sock: socket.socket, *, mmsg: bool = MMSG) -> None:
        self.sock = sock
        self.receiver = _mmsg.Receiver(MMSG_BATCH, MAX_DATAGRAM) if mmsg and MMSG else None

    def read(self, receive: Receive, now: float) -> None:
        if self.receiver is not None:
            read_many(self.receiver, self.sock.fileno(), receive, now)
        else:
            for data, address in read_batch(self.sock):
                receive(data, address, now)


def read_many(receiver: _mmsg.Receiver, fd: int, receive: Receive, now: float) -> None:
    """Up to ``READ_BATCH`` datagrams from ``fd`` into ``receive``, ``MMSG_BATCH`` per call."""
    for _ in range(READ_BATCH // MMSG_BATCH):
        try:
            count = receiver.read(fd, receive, now)
        except OSError as exc:
            # ICMP errors from earlier sends surface here on Linux: nothing to read, go on.
            log.debug("recvmmsg: %s", exc)
            continue
        if count < MMSG_BATCH:
            return  # drained: no further call to find nothing


def read_batch(sock: socket.socket, limit: int = READ_BATCH) -> list[tuple[bytes, Address]]:
    """Up to ``limit`` datagrams waiting on ``sock``, with their (host, port) senders."""
    batch: list[tuple[bytes, Address]] = []
    fd = sock.fileno()
    for _ in range(limit):
        try:
            data, address = sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            # ICMP errors from earlier sends surface here on Linux: nothing to read, go on.
            log.debug("recvfrom: %s", exc)
            continue
        batch.append((data, (address[0], address[1])))
        if len(batch) == 1 and not _pending(fd):
            # A lone datagram (request/reply traffic): asking is cheaper than a read that fails
            # with an exception; epoll is level-triggered, so nothing that races in is missed.
            break
    return batch


def _pending(fd: int) -> bool:
    """Whether a datagram waits to be read (FIONREAD: the size of the next one)."""
    _ioctl(fd, _FIONREAD, _FIONREAD_BUFFER)
    return any(_FIONREAD_BUFFER)
