"""The beacon's socket I/O in batches: many datagrams per system call, UDP GRO and GSO (Linux).

A relaying beacon spends most of a packet's cost in two system calls, one to read it and one to
send it on. Linux can do both for many datagrams at once (DESIGN.md §8): with ``UDP_GRO`` set,
one ``recvmsg`` returns consecutive datagrams of one flow glued together, with their size in a
control message; with ``UDP_SEGMENT``, one ``sendmsg`` sends a buffer as datagrams of a given
size to one address. Relayed traffic is made of such runs: one sender's packets to one receiver,
all of the tunnel's packet size. The receivers see ordinary datagrams either way (the kernel, or
the NIC, cuts them), and where the kernel lacks either option the beacon reads and sends one
datagram per call as before.

Traffic that does not come in runs (senders sending one datagram per call, many flows
interleaved) still costs two system calls per packet that way. Where the C module
:mod:`pilot_agents.net.io._mmsg` was compiled (Linux), one ``recvmmsg`` reads up to
``MMSG_BATCH`` datagrams (each perhaps a GRO run, cut as above) and one ``sendmmsg`` sends a
flush's datagrams (runs still as one GSO message each); elsewhere the same calls one datagram
at a time.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import sys
from typing import Final

from ..net.io.udp import MAX_DATAGRAM, MMSG, READ_BATCH, DatagramReader, Receive
from ..net.traversal.beacon_wire import Address

if MMSG:
    from ..net.io import _mmsg

log = logging.getLogger("pilot_agents.beacon")

UDP_SEGMENT: Final = 103  # linux/udp.h: send a buffer as datagrams of this size
UDP_GRO: Final = 104  # linux/udp.h: receive coalesced datagrams, their size in a cmsg
MAX_SEGMENTS: Final = 64  # datagrams per GSO send (the kernel's UDP_MAX_SEGMENTS)
MAX_GSO_BYTES: Final = 65_000  # a GSO buffer stays under the largest UDP payload
# Datagrams larger than this go out one by one: a GSO segment must fit the path MTU (1,500
# bytes on Ethernet: 1,452 of UDP payload over IPv6), and relayed tunnel packets are 1,233.
MAX_GSO_SEGMENT: Final = 1_452
_GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
_EXPECTED_SEND_ERRORS = (errno.EAGAIN, errno.ENOBUFS)


def enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced reads on ``sock``; whether the kernel agreed."""
    try:
        sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def read_coalesced(sock: socket.socket, receive: Receive, now: float) -> None:
    """Feed every datagram waiting on ``sock`` (GRO set) to ``receive``, up to a batch of reads."""
    for _ in range(READ_BATCH):
        try:
            data, ancillary, _, source = sock.recvmsg(MAX_DATAGRAM, _GRO_CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # ICMP errors from earlier sends surface here on Linux: nothing to read, go on.
            log.debug("recvmsg: %s", exc)
            continue
        address = (source[0], source[1])
        size = 0
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_UDP and kind == UDP_GRO:
                size = int.from_bytes(value[:4], sys.byteorder)
        if 0 < size < len(data):
            for start in range(0, len(data), size):
                receive(data[start : start + size], address, now)
        else:
            receive(data, address, now)


class Reader:
    """Reads what waits on a socket, a batch per readiness callback: ``recvmmsg`` where it can.

    ``gro``: ask for coalesced reads (relayed runs). ``mmsg``: whether to use the C module (the
    tests turn it off to check the fallback)."""

    def __init__(self, sock: socket.socket, *, gro: bool = True, mmsg: bool = MMSG) -> None:
        self.sock = sock
        self.gro = gro and enable_gro(sock)
        # The node's reader: recvmmsg (which cuts GRO runs too), else one datagram per call.
        self._reader = DatagramReader(sock, mmsg=mmsg)

    def read(self, receive: Receive, now: float) -> None:
        """Feed each datagram waiting, up to ``READ_BATCH``, to ``receive``."""
        if self._reader.receiver is None and self.gro:
            read_coalesced(self.sock, receive, now)
        else:
            self._reader.read(receive, now)


class Sender:
    """Sends a list of datagrams, runs of one size to one address in one ``sendmsg`` each, and
    with ``mmsg`` (the C module) the whole list in one ``sendmmsg`` (or a few: see _mmsg.c)."""

    def __init__(self, sock: socket.socket, *, gso: bool = True, mmsg: bool = MMSG) -> None:
        self.sock = sock
        self.gso = gso
        self.mmsg = mmsg and MMSG
        self.errors = 0  # datagrams lost to a full buffer or a failed send

    def send_all(self, datagrams: list[tuple[bytes, Address]]) -> None:
        if self.mmsg:
            if datagrams:
                self._send_many(datagrams)
            return
        i, n = 0, len(datagrams)
        sendto = self.sock.sendto
        while i < n:
            data, address = datagrams[i]
            size = len(data)
            j = i + 1
            # The run's bounds only when the next one goes to the same address (it mostly
            # doesn't without runs at the sender: a min() per datagram saved).
            if self.gso and j < n and datagrams[j][1] == address and 0 < size <= MAX_GSO_SEGMENT:
                limit = min(n, i + MAX_SEGMENTS, i + MAX_GSO_BYTES // size)
                while j < limit and datagrams[j][1] == address and len(datagrams[j][0]) == size:
                    j += 1
            if j - i == 1:
                # A call less per datagram than _send_one: relayed packets without runs (one
                # sendto each at the sender) go out here, 0.6 us of Python around a 3.4 us send.
                try:
                    sendto(data, address)
                except OSError as exc:
                    self._failed(exc, address)
            else:
                self._send_run(datagrams[i:j], size, address)
            i = j

    def _send_many(self, datagrams: list[tuple[bytes, Address]]) -> None:
        failures = _mmsg.send(
            self.sock.fileno(), self.sock.family, datagrams,
            MAX_GSO_SEGMENT if self.gso else 0, MAX_SEGMENTS, MAX_GSO_BYTES,
        )
        # One failed destination loses its datagrams only; the C module went on with the rest.
        for start, end, error in failures:
            if error == _mmsg.NOT_NUMERIC:
                # An address sendto must resolve (or refuse, with the reason): it is one datagram.
                self._send_one(*datagrams[start])
            elif end - start > 1 and error not in _EXPECTED_SEND_ERRORS:
                self._run_failed(datagrams[start:end], OSError(error, os.strerror(error)))
            else:
                self.errors += end - start
                if error not in _EXPECTED_SEND_ERRORS:
                    log.debug("sendmmsg to %s failed: %s", datagrams[start][1], os.strerror(error))

    def _run_failed(self, run: list[tuple[bytes, Address]], exc: OSError) -> None:
        """A GSO send failed, not for a full buffer: the destination refused (a firewall's EPERM,
        a broadcast address), or the kernel or device can't do GSO. Sent one by one, they tell."""
        errors = self.errors
        for data, address in run:
            self._send_one(data, address)
        if self.errors - errors < len(run):
            log.info("UDP GSO unavailable (%s): sending datagrams one by one", exc)
            self.gso = False

    def _send_one(self, data: bytes, address: Address) -> None:
        try:
            self.sock.sendto(data, address)
        except OSError as exc:
            self._failed(exc, address)

    def _failed(self, exc: OSError, address: Address) -> None:
        # A full buffer loses the datagram; senders recover (tunnels resend, nodes retry).
        self.errors += 1
        if exc.errno not in _EXPECTED_SEND_ERRORS:
            log.debug("sendto %s failed: %s", address, exc)

    def _send_run(self, run: list[tuple[bytes, Address]], size: int, address: Address) -> None:
        segment = [(socket.IPPROTO_UDP, UDP_SEGMENT, struct.pack("H", size))]
        try:
            self.sock.sendmsg([b"".join(data for data, _ in run)], segment, 0, address)
        except OSError as exc:
            if exc.errno in _EXPECTED_SEND_ERRORS:
                self.errors += len(run)
            else:
                self._run_failed(run, exc)
