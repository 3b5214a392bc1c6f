"""pyzmq REQ/REP over tcp://127.0.0.1 through zmq.asyncio on asyncio's own event loop: what an
asyncio application pays for ZeroMQ, the context for the tunnel's asyncio rows."""

from __future__ import annotations

import zmq
import zmq.asyncio

from benchmarks.cases.zmq_tcp import limit
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


class ZmqAsyncio(Case):
    name = "zmq-asyncio"
    about = "REQ/REP with zmq.asyncio; bulk = one message"

    async def server(self, ctl: Control, p: Params, kind: Kind) -> None:
        plan = server_plan(kind, p)
        with zmq.asyncio.Context() as context, context.socket(zmq.REP) as sock:
            limit(sock, p.timeout(kind))
            ctl.publish(port=sock.bind_to_random_port(f"tcp://{HOST}"))
            for responder in plan:
                frame = await sock.recv(copy=False)
                responder.feed(frame.buffer)
                await sock.send(responder.finish())
            await ctl.await_stop()

    async def client(self, ctl: Control, p: Params, kind: Kind) -> Result:
        port = ctl.peer()["port"]
        with zmq.asyncio.Context() as context, context.socket(zmq.REQ) as sock:
            limit(sock, p.timeout(kind))
            sock.connect(f"tcp://{HOST}:{port}")

            async def roundtrip(request: bytes) -> bytes:
                await sock.send(request, copy=False)
                reply: bytes = await sock.recv()
                return reply

            return await adrive(client_session(kind, p), roundtrip)


CASE = ZmqAsyncio()
