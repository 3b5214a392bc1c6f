"""nats-py (asyncio) against a nats-server the benchmark starts for each measurement:
``publish``/``subscribe`` (``flush`` after the last publication), ``request``/``respond``
(a reply subject per request, the client's default)."""

from __future__ import annotations

import nats
import nats.errors
from nats.aio.msg import Msg

from benchmarks.harness import Control, RttResult, adrive, rtt_session
from benchmarks.pattern_harness import (
    TOPIC_PREFIX,
    Item,
    PatternCase,
    PatternParams,
    PubResult,
    SubResult,
    apublish_all,
    subscriber_session,
)

SUBJECT = "bench.request"


class NatsPy(PatternCase):
    name = "nats-py"
    about = "nats-py (asyncio) via nats-server on 127.0.0.1; core NATS, no JetStream"
    service = "nats-server"

    async def publisher(self, ctl: Control, p: PatternParams, subscribers: int,
                        messages: int) -> PubResult:
        for _ in range(subscribers):
            ctl.peer()
        nc = await nats.connect(p.service, connect_timeout=p.wait, allow_reconnect=False)
        try:
            ctl.publish()

            return await apublish_all(ctl, p, subscribers, messages, nc.publish,
                                      lambda: nc.flush(timeout=int(p.wait)))
        finally:
            await nc.close()

    async def subscriber(self, ctl: Control, p: PatternParams, messages: int,
                         index: int) -> SubResult:
        ctl.publish()
        ctl.peer()
        nc = await nats.connect(p.service, connect_timeout=p.wait, allow_reconnect=False)
        try:
            sub = await nc.subscribe(TOPIC_PREFIX + ">")

            async def step(timeout: float) -> Item | None:
                try:
                    msg = await sub.next_msg(timeout)
                except nats.errors.TimeoutError:
                    return None
                return msg.subject, msg.data

            return await adrive(subscriber_session(ctl, p, messages), step)
        finally:
            await nc.close()

    async def replier(self, ctl: Control, p: PatternParams) -> None:
        ctl.peer()
        nc = await nats.connect(p.service, connect_timeout=p.wait, allow_reconnect=False)
        try:
            async def answer(msg: Msg) -> None:
                await msg.respond(msg.data)

            await nc.subscribe(SUBJECT, cb=answer)
            await nc.flush(timeout=int(p.wait))  # the subscription is at the server
            ctl.publish()
            await ctl.await_stop(p.deadline)
        finally:
            await nc.close()

    async def requester(self, ctl: Control, p: PatternParams) -> RttResult:
        ctl.publish()
        ctl.peer()
        nc = await nats.connect(p.service, connect_timeout=p.wait, allow_reconnect=False)
        try:
            async def roundtrip(data: bytes) -> bytes:
                reply = await nc.request(SUBJECT, data, timeout=p.rtt.wait)
                answer: bytes = reply.data
                return answer

            return await adrive(rtt_session(p.rtt), roundtrip)
        finally:
            await nc.close()


CASE = NatsPy()
