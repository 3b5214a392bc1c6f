"""pyzmq over tcp://127.0.0.1, blocking sockets: PUB/SUB with multipart ``[topic, payload]``
(PUB's default send high-water mark, 1000 messages per subscriber: beyond it PUB drops, and the
loss shows), and for req/rep the ``zmq-tcp`` case of ``benchmarks.bench`` (REQ/REP)."""

from __future__ import annotations

import zmq

from benchmarks.cases.zmq_tcp import CASE as REQ_REP
from benchmarks.cases.zmq_tcp import limit
from benchmarks.harness import HOST, Control, RttResult, drive
from benchmarks.pattern_harness import (
    TOPIC_PREFIX,
    Item,
    PatternCase,
    PatternParams,
    PubResult,
    SubResult,
    publish_all,
    subscriber_session,
)


class PyZmq(PatternCase):
    name = "pyzmq"
    about = "PUB/SUB (default HWM: drops when full), REQ/REP; blocking sockets, TCP"

    def publisher(self, ctl: Control, p: PatternParams, subscribers: int,
                  messages: int) -> PubResult:
        for _ in range(subscribers):
            ctl.peer()
        with zmq.Context() as context, context.socket(zmq.PUB) as sock:
            limit(sock, p.wait)
            ctl.publish(port=sock.bind_to_random_port(f"tcp://{HOST}"))

            return publish_all(
                ctl, p, subscribers, messages,
                lambda topic, data: sock.send_multipart([topic.encode(), data], copy=False))

    def subscriber(self, ctl: Control, p: PatternParams, messages: int,
                   index: int) -> SubResult:
        ctl.publish()
        port = ctl.peer()["port"]
        with zmq.Context() as context, context.socket(zmq.SUB) as sock:
            limit(sock, p.wait)
            sock.setsockopt(zmq.SUBSCRIBE, TOPIC_PREFIX.encode())
            sock.connect(f"tcp://{HOST}:{port}")

            def step(timeout: float) -> Item | None:
                if not sock.poll(int(timeout * 1000)):
                    return None
                topic, data = sock.recv_multipart()
                return topic.decode(), data

            return drive(subscriber_session(ctl, p, messages), step)

    def replier(self, ctl: Control, p: PatternParams) -> None:
        REQ_REP.server(ctl, p.rtt, "rtt")

    def requester(self, ctl: Control, p: PatternParams) -> RttResult:
        result = REQ_REP.client(ctl, p.rtt, "rtt")
        assert isinstance(result, RttResult)
        return result


CASE = PyZmq()
