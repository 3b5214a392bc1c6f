"""The ``publish`` and ``subscribe`` steps, over :mod:`pilot_agents.patterns.pubsub`.

A pipeline runs once, and a publication reaches only the subscribers already subscribed (at
most once, as in ZeroMQ or NATS). So a publish step opens its Publisher, waits (up to its
timeout) until the subscribe steps of the file that want this publication are subscribed,
publishes, and drains its queues into the transport before it closes. Each publish step has a
Publisher of its own: closing tells the subscribers (BYE), and those that want more subscribe
again to the next publish step on the port."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig

from ..errors import ConfigError, PilotTimeoutError
from ..integrations.langgraph import PilotNode
from ..integrations.langgraph.base import read_key
from ..patterns.pubsub import Publication, Publisher, PubSubConfig, Subscriber
from ..transport import Transport
from .schema import PublishCall, SubscribeCall

SUBSCRIBED_POLL = 0.02  # seconds between looks at a publisher's subscriptions while it waits


class PublishNode(PilotNode):
    """Publish the state's ``key`` (as JSON) on ``topic`` once ``subscribers`` subscriptions
    are made; sets ``KEY_published``: the topic and how many subscribers it went to."""

    def __init__(self, call: PublishCall, subscribers: int, *, transport: Transport | None,
                 home: str | Path | None, name: str) -> None:
        super().__init__(transport=transport, home=home, allowed_types=(), delivery=None,
                         name=name)
        self.call, self.subscribers = call, subscribers

    async def run(self, state: Any, config: RunnableConfig,
                  transport: Transport) -> dict[str, Any]:
        call = self.call
        value = read_key(state, call.key, f"step {self.label!r}")
        try:
            data = json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"step {self.label!r}: the state's {call.key!r} is not JSON "
                              f"({exc})") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + call.timeout
        async with Publisher(transport, call.port) as pub:
            while pub.subscribers < self.subscribers:
                if loop.time() >= deadline:
                    raise PilotTimeoutError(
                        f"step {self.label!r}: {pub.subscribers} of {self.subscribers} "
                        f"subscribers subscribed to port {call.port} within {call.timeout:g} s")
                await asyncio.sleep(SUBSCRIBED_POLL)
            reached = await pub.publish(call.topic, data)
            try:
                await pub.drain(max(deadline - loop.time(), 0.0))
            except PilotTimeoutError as exc:
                raise PilotTimeoutError(f"step {self.label!r}: {exc}") from None
        return {f"{call.key}_published": {"topic": call.topic, "subscribers": reached}}


def _value(publication: Publication) -> Any:
    """The data as JSON if it parses, else as text, else as bytes."""
    try:
        return publication.json()
    except ValueError:  # UnicodeDecodeError included
        pass
    try:
        return publication.text()
    except UnicodeDecodeError:
        return publication.data


class SubscribeNode(PilotNode):
    """Subscribe to ``publisher``'s port and take ``count`` publications whose topic starts
    with ``topic``: ``KEY`` (the data) and ``KEY_topic``, each a list in arrival order when
    ``count`` > 1, and ``KEY_from`` (the publisher's hostname)."""

    def __init__(self, call: SubscribeCall, publisher: str, retry_interval: float, *,
                 transport: Transport | None, home: str | Path | None, name: str) -> None:
        super().__init__(transport=transport, home=home, allowed_types=(), delivery=None,
                         name=name)
        self.call, self.publisher = call, publisher
        # A publisher that does not listen yet (its agent is before its publish step) is
        # asked again at this pace, so its wait for us is short.
        self.config = PubSubConfig(reconnect_min=retry_interval, reconnect_max=retry_interval)

    async def run(self, state: Any, config: RunnableConfig,
                  transport: Transport) -> dict[str, Any]:
        call = self.call
        loop = asyncio.get_running_loop()
        deadline = loop.time() + call.timeout
        got: list[Publication] = []
        async with Subscriber(transport, self.publisher, call.port, [call.topic],
                              self.config) as sub:
            while len(got) < call.count:
                try:
                    got.append(await sub.receive(max(deadline - loop.time(), 0.0)))
                except PilotTimeoutError:
                    raise PilotTimeoutError(
                        f"step {self.label!r}: {len(got)} of {call.count} publications from "
                        f"{self.publisher} port {call.port} within {call.timeout:g} s"
                    ) from None
        values, topics = [_value(p) for p in got], [p.topic for p in got]
        if call.count == 1:
            return {call.key: values[0], f"{call.key}_topic": topics[0],
                    f"{call.key}_from": self.publisher}
        return {call.key: values, f"{call.key}_topic": topics, f"{call.key}_from": self.publisher}
