"""Req/rep over embedded Nodes with nothing of the pattern's: what ``embedded`` costs beyond it.

Each side answers in the Node's delivery callbacks (``set_taker``): the replier parses the
request's frame and writes the reply frame on the message's stream while the datagram is being
read; the requester keeps a future per request and resolves it from its stream's taker. One
frame each way, as ``patterns.reqrep`` sends, and none of its promises (deadlines, cancels,
bounds on streams and handlers, a peer's restart, a handler in a task). ``embedded`` / this
case is what those cost in a round trip; this case / ``pyzmq`` is what the tunnel costs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pilot_agents
from benchmarks.harness import Control, RttResult, adrive, rtt_session
from benchmarks.pattern_harness import PatternParams, ReqRepCase
from benchmarks.patterns_cases.ours import CORE, PORT, EmbeddedSide
from pilot_agents.node import Connection, Listener, Message
from pilot_agents.patterns.frames import Kind, encode_frame, parse_frame_untrusted

R = TypeVar("R")


class FloorEmbedded(ReqRepCase):
    name = "floor-embedded"
    about = f"embedded Nodes answering in their delivery callbacks, no pattern; uvloop; {CORE}"

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        return pilot_agents.run(main)

    async def replier(self, ctl: Control, p: PatternParams) -> None:
        async with EmbeddedSide(p, "rep") as side:
            await side.meet(ctl.peer())
            async with side.node.listen(PORT) as listener:
                answer_in_delivery(listener)
                ctl.publish(**side.card())
                await ctl.await_stop(p.deadline)

    async def requester(self, ctl: Control, p: PatternParams) -> RttResult:
        async with EmbeddedSide(p, "req") as side:
            ctl.publish(**side.card())
            card = ctl.peer()
            await side.meet(card)
            async with side.node.connect(card["node_id"], PORT) as conn:
                return await adrive(rtt_session(p.rtt), ask_in_delivery(conn))


def answer_in_delivery(listener: Listener) -> None:
    """The replier: each request's reply frame written in the listener's delivery callback."""
    def answer(message: Message) -> bool:
        _, request_id, payload = parse_frame_untrusted(message.data)
        assert message.way_back is not None
        message.way_back.write(encode_frame(Kind.REPLY, request_id, payload))
        return True

    listener.set_taker(answer)


def ask_in_delivery(conn: Connection) -> Callable[[bytes], Awaitable[bytes]]:
    """The requester: a request frame written per call, and a future for it, resolved in the
    stream's delivery callback."""
    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future[bytes]] = {}
    ids = itertools.count()

    def take(message: Message) -> bool:
        _, request_id, payload = parse_frame_untrusted(message.data)
        waiting.pop(request_id).set_result(payload)
        return True

    conn.set_taker(take)

    async def roundtrip(data: bytes) -> bytes:
        request_id = next(ids)
        reply: asyncio.Future[bytes] = loop.create_future()
        waiting[request_id] = reply
        conn.write(encode_frame(Kind.REQUEST, request_id, data))
        return await reply

    return roundtrip


CASE = FloorEmbedded()
