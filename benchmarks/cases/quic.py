"""aioquic over loopback: one request per QUIC stream, answered on the same stream (as HTTP/3 does).

The server's certificate is self-signed at start-up; the client does not verify it. All of
aioquic's transport settings are its defaults (1 MB flow-control windows, Reno).
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections import deque
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from benchmarks.harness import (
    HOST,
    Case,
    Control,
    Kind,
    Params,
    Responder,
    Result,
    adrive,
    client_session,
    port_of,
    server_plan,
    udp_socket,
)

ALPN = "bench"


class StreamRpc(QuicConnectionProtocol):
    """Request/reply with one bidirectional stream per request.

    As a client, :meth:`request` opens a stream, sends the request and a FIN, and returns what the
    server sends back on it. As a server (given a plan), it feeds each new stream's data to the
    plan's next responder and answers on that stream when the FIN arrives; ``finished`` resolves
    when the plan is done, or fails with what went wrong.
    """

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        plan: deque[Responder] | None = None,
        finished: asyncio.Future[None] | None = None,
    ) -> None:
        super().__init__(quic, stream_handler)
        self._plan = plan
        self._finished = finished
        self._serving: dict[int, Responder] = {}
        self._replies: dict[int, tuple[asyncio.Future[bytes], bytearray]] = {}

    async def request(self, data: bytes) -> bytes:
        stream_id = self._quic.get_next_available_stream_id()
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[stream_id] = (reply, bytearray())
        self._quic.send_stream_data(stream_id, data, end_stream=True)
        self.transmit()
        return await reply

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            if event.stream_id in self._replies:
                self._on_reply(event)
            else:
                self._on_request(event)
        elif isinstance(event, ConnectionTerminated):
            self._fail(ConnectionError(f"QUIC connection closed: {event.reason_phrase!r}"))

    def _on_reply(self, event: StreamDataReceived) -> None:
        reply, buf = self._replies[event.stream_id]
        buf += event.data
        if event.end_stream:
            del self._replies[event.stream_id]
            if not reply.done():
                reply.set_result(bytes(buf))

    def _on_request(self, event: StreamDataReceived) -> None:
        try:
            responder = self._serving.get(event.stream_id)
            if responder is None:
                responder = self._next_responder(event.stream_id)
            responder.feed(event.data)
            if event.end_stream:
                del self._serving[event.stream_id]
                self._quic.send_stream_data(event.stream_id, responder.finish(), end_stream=True)
                if not self._serving and not self._plan:
                    self._resolve()
        except Exception as exc:  # reported by the server coroutine, not lost in the event loop
            self._fail(exc)

    def _next_responder(self, stream_id: int) -> Responder:
        if not self._plan:
            raise RuntimeError(f"unexpected request on stream {stream_id}")
        responder = self._serving[stream_id] = self._plan.popleft()
        return responder

    def _resolve(self) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def _fail(self, exc: Exception) -> None:
        for reply, _ in self._replies.values():
            if not reply.done():
                reply.set_exception(exc)
        if self._finished is not None and not self._finished.done():
            self._finished.set_exception(exc)


class Aioquic(Case):
    name = "aioquic"
    about = "a stream per request; bulk = one stream; aioquic defaults"

    async def server(self, ctl: Control, p: Params, kind: Kind) -> None:
        plan = deque(server_plan(kind, p))
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        config.certificate, config.private_key = _self_signed()
        sock = udp_socket()
        _, server = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: QuicServer(
                configuration=config,
                create_protocol=partial(StreamRpc, plan=plan, finished=finished),
            ),
            sock=sock,
        )
        try:
            ctl.publish(port=port_of(sock))
            async with asyncio.timeout(p.wait + p.timeout(kind)):
                await finished
            await ctl.await_stop()
        finally:
            server.close()

    async def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        port = ctl.peer()["port"]
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
        async with AsyncExitStack() as stack:
            async with asyncio.timeout(p.wait):
                rpc = await stack.enter_async_context(
                    connect(HOST, port, configuration=config, create_protocol=StreamRpc)
                )
            assert isinstance(rpc, StreamRpc)

            async def roundtrip(request: bytes) -> bytes:
                async with asyncio.timeout(p.timeout(kind)):
                    return await rpc.request(request)

            return await adrive(client_session(kind, p), roundtrip)


def _self_signed() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


CASE = Aioquic()
