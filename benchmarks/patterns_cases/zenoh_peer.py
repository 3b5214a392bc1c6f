"""zenoh-python in peer mode over TCP on 127.0.0.1 (no scouting: the other roles connect to the
publisher's or the replier's listener). pub/sub: a declared ``Publisher``'s ``put`` with
``CongestionControl.BLOCK`` (the default, DROP, drops when zenoh's queues are full; BLOCK makes
it as reliable as ours) to a ``declare_subscriber`` callback; req/rep: a declared ``Querier``'s
``get`` answered by a ``Queryable``."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager

import zenoh

from benchmarks.harness import Control, RttResult, drive, rtt_session
from benchmarks.pattern_harness import (
    DATA,
    END,
    TOPIC_PREFIX,
    WARM,
    Item,
    PatternCase,
    PatternParams,
    PubResult,
    SubResult,
    free_port,
    publish_all,
    subscriber_session,
)

QUERY_KEY = "bench/request"
RECEIVED = 10_000
"""Publications a subscriber's callback queues for the session; when full, the callback waits,
and zenoh's flow control (BLOCK) slows the publisher."""


def _key(topic: str) -> str:
    return topic.replace(".", "/")


def _topic(key: object) -> str:
    return str(key).replace("/", ".")


@contextmanager
def _session(listen: int | None = None, connect: int | None = None) -> Iterator[zenoh.Session]:
    config = zenoh.Config()
    config.insert_json5("mode", '"peer"')
    config.insert_json5("scouting/multicast/enabled", "false")
    config.insert_json5("listen/endpoints",
                        f'["tcp/127.0.0.1:{listen}"]' if listen is not None else "[]")
    if connect is not None:
        config.insert_json5("connect/endpoints", f'["tcp/127.0.0.1:{connect}"]')
    with zenoh.open(config) as session:
        yield session


class ZenohPeer(PatternCase):
    name = "zenoh"
    about = "zenoh-python, peer mode, TCP; put with CongestionControl.BLOCK; get/queryable"

    def publisher(self, ctl: Control, p: PatternParams, subscribers: int,
                  messages: int) -> PubResult:
        for _ in range(subscribers):
            ctl.peer()
        port = free_port()
        with _session(listen=port) as session:
            publishers = {
                topic: session.declare_publisher(_key(topic),
                                                 congestion_control=zenoh.CongestionControl.BLOCK)
                for topic in (DATA, WARM, END)
            }
            ctl.publish(port=port)

            return publish_all(ctl, p, subscribers, messages,
                               lambda topic, data: publishers[topic].put(data))

    def subscriber(self, ctl: Control, p: PatternParams, messages: int,
                   index: int) -> SubResult:
        ctl.publish()
        port = ctl.peer()["port"]
        received: queue.Queue[Item] = queue.Queue(RECEIVED)

        def arrived(sample: zenoh.Sample) -> None:
            received.put((_topic(sample.key_expr), sample.payload.to_bytes()))

        with _session(connect=port) as session:
            session.declare_subscriber(_key(TOPIC_PREFIX) + "**", arrived)

            def step(timeout: float) -> Item | None:
                try:
                    return received.get(timeout=timeout)
                except queue.Empty:
                    return None

            return drive(subscriber_session(ctl, p, messages), step)

    def replier(self, ctl: Control, p: PatternParams) -> None:
        port = free_port()
        with _session(listen=port) as session:

            def answer(query: zenoh.Query) -> None:
                body = query.payload
                query.reply(query.key_expr, body.to_bytes() if body is not None else b"")

            session.declare_queryable(QUERY_KEY, answer)
            ctl.publish(port=port)
            ctl.wait_stop(p.deadline)

    def requester(self, ctl: Control, p: PatternParams) -> RttResult:
        port = ctl.peer()["port"]
        with _session(connect=port) as session:
            querier = session.declare_querier(QUERY_KEY, timeout=p.rtt.wait)
            _await_queryable(querier, p.wait)

            def roundtrip(data: bytes) -> bytes:
                for reply in querier.get(payload=data):
                    if reply.ok is not None:
                        answer: bytes = reply.ok.payload.to_bytes()
                        return answer
                raise TimeoutError(f"no reply within {p.rtt.wait} s")

            return drive(rtt_session(p.rtt), roundtrip)


def _await_queryable(querier: zenoh.Querier, wait: float) -> None:
    """Until the session has connected and learned of the queryable, a get has nobody to ask."""
    deadline = time.monotonic() + wait
    while not any(reply.ok is not None for reply in querier.get(payload=b"")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no queryable answered within {wait} s")
        time.sleep(0.05)


CASE = ZenohPeer()
