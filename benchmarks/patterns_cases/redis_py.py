"""redis-py (blocking) against a redis-server the benchmark starts for each measurement.

pub/sub: ``PUBLISH``, pipelined ``PUBLISH_BATCH`` at a time (one write and one read of the
replies per batch, as a client publishing a stream would), ``SUBSCRIBE`` on a
``PubSub`` connection. Redis has no request/reply command; the usual idiom is a request list
and a reply list: the requester sends ``LPUSH bench.request DATA`` and ``BRPOP bench.reply``
in one pipeline (one write), the replier loops on ``BRPOP bench.request`` and answers with
``LPUSH bench.reply DATA`` (one requester, so one reply list)."""

from __future__ import annotations

import time

import redis

from benchmarks.harness import Control, RttResult, drive, rtt_session
from benchmarks.pattern_harness import (
    DATA,
    END,
    WARM,
    Item,
    PatternCase,
    PatternParams,
    PubResult,
    SubResult,
    publish_all,
    subscriber_session,
)

REQUESTS, REPLIES = "bench.request", "bench.reply"
PUBLISH_BATCH = 100
"""PUBLISH commands per pipeline."""
POLL = 0.1
"""Seconds the replier's BRPOP waits before it looks whether it should stop."""


def _connect(p: PatternParams) -> redis.Redis:
    host, port = p.service.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), socket_timeout=p.wait,
                       socket_connect_timeout=p.wait)


class RedisPy(PatternCase):
    name = "redis-py"
    about = (f"redis-py (blocking) via redis-server on 127.0.0.1; PUBLISH pipelined by "
             f"{PUBLISH_BATCH}; req/rep = LPUSH/BRPOP on two lists")
    service = "redis-server"

    def publisher(self, ctl: Control, p: PatternParams, subscribers: int,
                  messages: int) -> PubResult:
        for _ in range(subscribers):
            ctl.peer()
        with _connect(p) as client, client.pipeline(transaction=False) as pipe:
            ctl.publish()

            def publish(topic: str, data: bytes) -> None:
                pipe.publish(topic, data)
                if len(pipe) >= PUBLISH_BATCH:
                    pipe.execute()

            return publish_all(ctl, p, subscribers, messages, publish, pipe.execute)

    def subscriber(self, ctl: Control, p: PatternParams, messages: int,
                   index: int) -> SubResult:
        ctl.publish()
        ctl.peer()
        with _connect(p) as client, client.pubsub(ignore_subscribe_messages=True) as pubsub:
            pubsub.subscribe(DATA, END, WARM)

            def step(timeout: float) -> Item | None:
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    # None also for a subscribe confirmation, before the timeout
                    message = pubsub.get_message(timeout=left)
                    if message is not None:
                        return message["channel"].decode(), message["data"]
                return None

            return drive(subscriber_session(ctl, p, messages), step)

    def replier(self, ctl: Control, p: PatternParams) -> None:
        ctl.peer()
        with _connect(p) as client:
            client.delete(REQUESTS, REPLIES)
            ctl.publish()
            while not ctl.has_news():
                popped = client.brpop([REQUESTS], timeout=POLL)
                if popped is not None:
                    client.lpush(REPLIES, popped[1])
            ctl.wait_stop(p.deadline)

    def requester(self, ctl: Control, p: PatternParams) -> RttResult:
        ctl.publish()
        ctl.peer()
        with _connect(p) as client, client.pipeline(transaction=False) as pipe:

            def roundtrip(data: bytes) -> bytes:
                pipe.lpush(REQUESTS, data)
                pipe.brpop([REPLIES], timeout=p.rtt.wait)
                popped = pipe.execute()[1]
                if popped is None:
                    raise TimeoutError(f"no reply within {p.rtt.wait} s")
                reply: bytes = popped[1]
                return reply

            return drive(rtt_session(p.rtt), roundtrip)


CASE = RedisPy()
