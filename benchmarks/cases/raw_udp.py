"""Blocking UDP sockets, no asyncio: the floor for round trips, an unreliable ceiling for bulk."""

from __future__ import annotations

import socket
from dataclasses import replace

from benchmarks.harness import (
    HOST,
    BulkResult,
    Case,
    Control,
    Kind,
    Params,
    Result,
    Stopwatch,
    bulk_payload,
    client_session,
    drive,
    port_of,
    server_plan,
    udp_socket,
)

DATAGRAM = 1200
"""Payload per blast datagram: the tunnel's default budget per packet."""
RCVBUF = 4 * 1024 * 1024
"""Receive buffer asked for (the kernel caps it at net.core.rmem_max and doubles it)."""
END = b""
"""An empty datagram ends the blast; the server answers it with the byte count it received."""
END_RETRY = 0.005
"""The end marker may be dropped with the blast's tail: resend it this often (seconds)."""


class RawUdp(Case):
    name = "raw-udp"
    about = "blocking sockets; RTT = datagram echo"

    def server(self, ctl: Control, p: Params, kind: Kind) -> None:
        with udp_socket(rcvbuf=RCVBUF) as sock:
            sock.settimeout(p.timeout(kind))
            rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            ctl.publish(port=port_of(sock), rcvbuf=rcvbuf)
            if kind == "bulk":
                _count_blast(sock)
            else:
                _echo(sock, p)
            ctl.wait_stop()

    def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        info = ctl.peer()
        with udp_socket() as sock:
            sock.settimeout(p.wait)
            sock.connect((HOST, info["port"]))
            if kind == "bulk":
                return _blast(sock, p, info["rcvbuf"])

            def roundtrip(request: bytes) -> bytes:
                sock.send(request)
                return sock.recv(65536)

            return drive(client_session(kind, p), roundtrip)


def _echo(sock: socket.socket, p: Params) -> None:
    for responder in server_plan("rtt", p):
        data, addr = sock.recvfrom(65536)
        responder.feed(data)
        sock.sendto(responder.finish(), addr)


def _count_blast(sock: socket.socket) -> None:
    buf = bytearray(65536)
    received = 0
    while True:
        size, addr = sock.recvfrom_into(buf)
        if size == len(END):
            break
        received += size
    sock.sendto(received.to_bytes(8, "big"), addr)


def _blast(sock: socket.socket, p: Params, rcvbuf: int) -> BulkResult:
    data = memoryview(bulk_payload(p))
    datagrams = [data[i : i + DATAGRAM] for i in range(0, len(data), DATAGRAM)]
    watch = Stopwatch()
    for datagram in datagrams:
        sock.send(datagram)
    received = _end_blast(sock, p.wait)
    result = BulkResult(sent=len(data), delivered=received, seconds=watch.elapsed())
    note = f"bulk = UNRELIABLE ceiling: 1200 B datagram blast, {result.loss:.1%} lost"
    return replace(result, note=f"{note} (rcvbuf {rcvbuf >> 20} MiB)")


def _end_blast(sock: socket.socket, wait: float) -> int:
    """Sends the end marker until the server answers with the number of bytes it received."""
    sock.settimeout(END_RETRY)
    watch = Stopwatch()
    while watch.elapsed() < wait:
        sock.send(END)
        try:
            return int.from_bytes(sock.recv(64), "big")
        except TimeoutError:
            continue
    raise TimeoutError(f"server did not answer the end of the blast within {wait} s")


CASE = RawUdp()
