"""What every pattern benchmark case shares: sizes, the pub/sub sessions, results.

A case (``benchmarks/patterns_cases/``) gives four roles, each run in its own process by
:func:`benchmarks.runner.run_roles`: ``publisher`` and ``subscriber`` (one process per subscriber),
``replier`` and ``requester``. The first role of a measurement is the hub: the publisher or the
replier. What is published, timed and checked lives here, so a case supplies only its transport:

- the publisher runs :func:`publisher_session`, which yields what to do (publish a topic and a
  payload, pause, flush) through the case's step function;
- each subscriber runs :func:`subscriber_session`, which yields how long to wait for the next
  publication and is sent it (or None when nothing came in time);
- req/rep is the round trip of :mod:`benchmarks.harness` (:func:`~benchmarks.harness.rtt_session`).

Clocks: every process reads ``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for all the
processes of a machine), so a subscriber's arrival times compare with the publisher's start.
"""

from __future__ import annotations

import asyncio
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from benchmarks.harness import (
    HOST,
    Control,
    Params,
    Roles,
    RttResult,
    VerificationError,
    adrive,
    drive,
)

TOPIC_PREFIX = "bench."
DATA = "bench.data"
"""The measured publications: each carries its sequence number in its first 8 bytes."""
WARM = "bench.warm"
"""Published until every subscriber has heard one, so no subscription is still on its way when
the clock starts (ZeroMQ's "slow joiner", and the same in every other system)."""
END = "bench.end"
"""Published (``end_repeats`` times) after the last measured publication."""


@dataclass(frozen=True)
class PatternParams:
    """Sizes and limits of one pattern benchmark run (the defaults are the full run)."""

    messages: int = 20_000
    """Publications per pub/sub measurement to one subscriber."""
    fanout: int = 10
    """Subscribers of the fan-out measurement, each in its own process."""
    fanout_messages: int = 5_000
    """Publications per fan-out measurement (each goes to every subscriber)."""
    message_bytes: int = 1000
    """Payload of a publication ("1 KB", KB = 10^3 bytes), topic not counted."""
    rtt: Params = field(default_factory=lambda: Params(msg_size=100))
    """The request/reply round trips: ``rtt_count`` timed after ``rtt_warmup``, 100 B each way,
    each round trip limited to ``rtt.wait`` seconds."""
    quiet: float = 2.0
    """Seconds without a publication after which a subscriber stops waiting for more (what
    was lost by then is counted lost)."""
    warmup_interval: float = 0.01
    """Seconds between warm-up publications."""
    end_repeats: int = 3
    """Times the end marker is published (a transport that drops may drop one)."""
    wait: float = 30.0
    """Limit, in seconds, of one setup step (a role's start, address exchange, warm-up)."""
    deadline: float = 180.0
    """Limit, in seconds, of one measurement from the first spawn to the last result."""
    workdir: str = ""
    """Scratch directory of this run (node and daemon homes, servers' files)."""
    service: str = ""
    """Address of the server the case talks through (nats, redis), for this measurement."""

    @classmethod
    def quick(cls) -> PatternParams:
        return cls(messages=2_000, fanout_messages=500, quiet=1.0, deadline=60.0,
                   rtt=Params(msg_size=100, rtt_warmup=50, rtt_count=500))


@dataclass(frozen=True)
class PubResult:
    """The publisher's side of a pub/sub measurement."""

    published: int
    start_ns: int
    """When the first measured publication was handed to the transport (monotonic_ns)."""
    seconds: float
    """Time to hand every measured publication to the transport (and flush it, if it has a
    flush): the publisher's rate, not the delivery rate."""


@dataclass(frozen=True)
class SubResult:
    """One subscriber's side of a pub/sub measurement."""

    received: int
    """Distinct measured publications received."""
    duplicates: int
    reordered: int
    """Publications that came after one with a greater sequence number."""
    last_ns: int
    """When the last measured publication arrived (monotonic_ns; 0 if none did)."""
    ended: bool
    """Whether the end marker came (else the subscriber stopped after ``quiet`` seconds)."""


Publish = tuple[str, bytes]
Step = Publish | float | None
"""What a publisher session asks of its transport: publish ``(topic, payload)``, pause for
``float`` seconds (letting the transport run), or flush (None: hand everything queued to the
network, where the transport has such a call)."""
Item = tuple[str, bytes]
"""A received publication: its topic and payload."""


def payload(p: PatternParams, index: int) -> bytes:
    return index.to_bytes(8, "big").ljust(p.message_bytes, b"\x5a")


def publisher_session(ctl: Control, p: PatternParams, subscribers: int,
                      messages: int) -> Generator[Step, None, PubResult]:
    """Warm-up until every subscriber says it heard one, then ``messages`` publications as fast
    as the transport takes them (the clock runs from the first to the flush after the last),
    then the end marker."""
    heard = 0
    warm = payload(p, 0)
    deadline = time.monotonic() + p.wait
    while heard < subscribers:
        yield WARM, warm
        yield p.warmup_interval
        while ctl.has_news():
            ctl.peer()
            heard += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"{subscribers - heard} of {subscribers} subscribers heard no "
                               f"warm-up publication within {p.wait} s")
    start_ns = time.monotonic_ns()
    for index in range(messages):
        yield DATA, payload(p, index)
    yield None
    seconds = (time.monotonic_ns() - start_ns) / 1e9
    for _ in range(p.end_repeats):
        yield END, b""
        yield p.warmup_interval
    yield None
    return PubResult(messages, start_ns, seconds)


def publish_all(ctl: Control, p: PatternParams, subscribers: int, messages: int,
                publish: Callable[[str, bytes], object],
                flush: Callable[[], object] = lambda: None) -> PubResult:
    """Runs :func:`publisher_session` over a blocking ``publish(topic, payload)`` (a pause is a
    sleep), then waits until every subscriber has reported (the transport keeps delivering)."""

    def step(what: Step) -> None:
        if isinstance(what, tuple):
            publish(*what)
        elif what is None:
            flush()
        else:
            time.sleep(what)

    result = drive(publisher_session(ctl, p, subscribers, messages), step)
    ctl.wait_stop(p.deadline)
    return result


async def apublish_all(ctl: Control, p: PatternParams, subscribers: int, messages: int,
                       publish: Callable[[str, bytes], Awaitable[object]],
                       flush: Callable[[], Awaitable[object]] | None = None) -> PubResult:
    """:func:`publish_all` for an asynchronous ``publish`` (a pause lets the event loop run)."""

    async def step(what: Step) -> None:
        if isinstance(what, tuple):
            await publish(*what)
        elif what is None:
            if flush is not None:
                await flush()
        else:
            await asyncio.sleep(what)

    result = await adrive(publisher_session(ctl, p, subscribers, messages), step)
    await ctl.await_stop(p.deadline)
    return result


def subscriber_session(ctl: Control, p: PatternParams,
                       messages: int) -> Generator[float, Item | None, SubResult]:
    """Wait for a warm-up publication and tell the publisher; then count the measured ones
    until the end marker, or until none came for ``quiet`` seconds."""
    if (yield p.wait) is None:
        raise TimeoutError(f"no warm-up publication within {p.wait} s")
    ctl.publish(heard=True)
    seen = bytearray(messages)
    received = duplicates = reordered = last_ns = 0
    greatest = -1
    ended = False
    while (item := (yield p.quiet)) is not None:
        topic, data = item
        if topic == END:
            ended = True
            break
        if topic != DATA:
            continue
        index = int.from_bytes(data[:8], "big")
        if len(data) != p.message_bytes or index >= messages:
            raise VerificationError(f"a {len(data)} B publication numbered {index}")
        if seen[index]:
            duplicates += 1
            continue
        seen[index] = 1
        received += 1
        last_ns = time.monotonic_ns()
        if index < greatest:
            reordered += 1
        greatest = max(greatest, index)
    return SubResult(received, duplicates, reordered, last_ns, ended)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listened on a moment ago, for a program that must be told
    its port (zenoh's listener, the servers); another program could take it meanwhile."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ReqRepCase(Roles, ABC):
    """A system measured for its round trips only. Each method runs in its own process."""

    service: ClassVar[str | None] = None
    """The server the benchmark starts for each of the case's measurements ("nats-server",
    "redis-server"), its address passed as ``p.service``; None: no server."""

    @abstractmethod
    def replier(self, ctl: Control, p: PatternParams) -> Coroutine[Any, Any, None] | None:
        """Reads the requester's :meth:`Control.publish`, publishes its address, echoes every
        request until :meth:`Control.wait_stop`."""

    @abstractmethod
    def requester(self, ctl: Control, p: PatternParams
                  ) -> RttResult | Coroutine[Any, Any, RttResult]:
        """Publishes what the replier needs, reads its address, runs ``rtt_session(p.rtt)``."""


class PatternCase(ReqRepCase):
    """One messaging system under test, pub/sub and req/rep."""

    @abstractmethod
    def publisher(self, ctl: Control, p: PatternParams, subscribers: int, messages: int
                  ) -> PubResult | Coroutine[Any, Any, PubResult]:
        """Reads each subscriber's :meth:`Control.publish` (one each), publishes its address,
        runs :func:`publish_all` or :func:`apublish_all`."""

    @abstractmethod
    def subscriber(self, ctl: Control, p: PatternParams, messages: int, index: int
                   ) -> SubResult | Coroutine[Any, Any, SubResult]:
        """Publishes what the publisher needs (at least an empty message), reads its address,
        subscribes to :data:`TOPIC_PREFIX` and runs :func:`subscriber_session`."""
