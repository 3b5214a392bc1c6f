"""A datagram echo on uvloop: the round-trip floor of any asyncio design here, to read the
``tunnel`` row against (the same event loop, a reply that wakes one awaiting task, and nothing
else: no crypto, no protocol). Bulk is ``raw-udp``'s blocking blast, for a complete row."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

import uvloop

from benchmarks.cases.raw_udp import CASE as RAW_UDP
from benchmarks.harness import (
    HOST,
    Case,
    Control,
    Kind,
    Params,
    Result,
    adrive,
    client_session,
    server_plan,
)

R = TypeVar("R")


class _Echo(asyncio.DatagramProtocol):
    """Answers each datagram in the read callback, as the plan says."""

    def __init__(self, p: Params) -> None:
        self._plan = iter(server_plan("rtt", p))
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's UDP transport is not a subclass of asyncio's, only alike)
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        responder = next(self._plan, None)
        if responder is None or self._transport is None:
            return
        responder.feed(data)
        self._transport.sendto(responder.finish(), addr)


class _Replies(asyncio.DatagramProtocol):
    """Hands each datagram to the task waiting for it."""

    def __init__(self) -> None:
        self.waiting: asyncio.Future[bytes] | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(data)


class UdpUvloop(Case):
    name = "udp-uvloop"
    about = "datagram echo on uvloop, a future per reply (the asyncio floor); bulk as raw-udp"

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        return uvloop.run(main)

    def server(self, ctl: Control, p: Params, kind: Kind) -> Coroutine[Any, Any, None] | None:
        if kind == "bulk":
            RAW_UDP.server(ctl, p, kind)
            return None
        return self._serve(ctl, p)

    async def _serve(self, ctl: Control, p: Params) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Echo(p), local_addr=(HOST, 0))
        try:
            ctl.publish(port=transport.get_extra_info("sockname")[1])
            await ctl.await_stop()
        finally:
            transport.close()

    def client(self, ctl: Control, p: Params, kind: Kind
               ) -> Coroutine[Any, Any, Result] | Result:
        if kind == "bulk":
            return RAW_UDP.client(ctl, p, kind)
        return self._ask(ctl, p)

    async def _ask(self, ctl: Control, p: Params) -> Result:
        loop = asyncio.get_running_loop()
        port = ctl.peer()["port"]
        transport, replies = await loop.create_datagram_endpoint(
            _Replies, remote_addr=(HOST, port))
        try:
            async def roundtrip(request: bytes) -> bytes:
                replies.waiting = loop.create_future()
                transport.sendto(request)
                async with asyncio.timeout(p.wait):
                    return await replies.waiting

            return await adrive(client_session("rtt", p), roundtrip)
        finally:
            transport.close()


CASE = UdpUvloop()
