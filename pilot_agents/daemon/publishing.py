"""Publishers hosted by the daemon: ``publish``, ``publishers``, ``unpublish``.

``pilotctl publish`` is one command that ends at once, while a publisher must stay up for its
subscribers to find it: so the daemon runs the :class:`~pilot_agents.patterns.pubsub.Publisher`,
on its own Node, from the first ``publish`` on a port until ``unpublish`` or the daemon stops.
As in ZeroMQ and NATS, a publication goes to the subscribers there are at that moment: one sent
while nobody (matching) is subscribed reaches nobody, and ``publish`` says how many it reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ..errors import ConfigError, PilotTimeoutError
from ..patterns.pubsub import Overflow, Publisher, PubSubConfig
from .context import DaemonContext
from .dispatch import DispatchTable, Reply
from .messaging import Messaging
from .requests import PublishersRequest, PublishRequest, UnpublishRequest

log = logging.getLogger("pilot_agents.daemon")


@dataclass
class Hosted:
    """One daemon publisher and what ``publishers`` reports of it."""

    publisher: Publisher
    created_at: float = field(default_factory=time.time)
    published: int = 0  # publish commands it answered
    deliveries: int = 0  # publications queued for a subscriber, summed over those commands


class Publishing:
    def __init__(self, ctx: DaemonContext, messaging: Messaging) -> None:
        self.ctx = ctx
        self.messaging = messaging
        self.hosted: dict[int, Hosted] = {}
        self._creating = asyncio.Lock()  # two first publishes on a port make one publisher

    def register(self, table: DispatchTable) -> None:
        table.add(PublishRequest, self.publish)
        table.add(PublishersRequest, self.publishers)
        table.add(UnpublishRequest, self.unpublish)

    async def publish(self, req: PublishRequest) -> Reply:
        data = req.payload()
        hosted, created = await self._hosted(req.port, req.overflow)
        try:
            async with asyncio.timeout(req.timeout):
                reached = await hosted.publisher.publish(req.topic, data)
        except TimeoutError:
            # Only BLOCK waits: a subscriber's queue stayed full (it does not read).
            raise PilotTimeoutError(
                f"a subscriber of port {req.port} stayed full for {req.timeout:g} s (it does not "
                "read); the publication may have reached some subscribers and not others "
                "(publish with overflow 'drop-oldest' to never wait)") from None
        hosted.published += 1
        hosted.deliveries += reached
        return {"port": req.port, "topic": req.topic, "bytes": len(data), "subscribers": reached,
                "created": created}

    async def publishers(self, req: PublishersRequest) -> Reply:
        return {"publishers": [
            {"port": port, "subscribers": h.publisher.subscribers,
             "overflow": h.publisher.config.overflow.value, "published": h.published,
             "deliveries": h.deliveries, "created_at": h.created_at}
            for port, h in sorted(self.hosted.items())
        ]}

    async def unpublish(self, req: UnpublishRequest) -> Reply:
        hosted = self.hosted.pop(req.port, None)
        if hosted is None:
            raise ConfigError(f"the daemon has no publisher on port {req.port}")
        await hosted.publisher.close()
        log.info("publisher on port %d closed", req.port)
        return {"port": req.port, "closed": True}

    async def close_all(self) -> None:
        """Close every publisher: each tells its subscribers, which subscribe again when a
        daemon publishes on the port once more."""
        hosted, self.hosted = list(self.hosted.values()), {}
        await asyncio.gather(*(h.publisher.close() for h in hosted), return_exceptions=True)

    async def _hosted(self, port: int, overflow: str | None) -> tuple[Hosted, bool]:
        async with self._creating:
            hosted = self.hosted.get(port)
            if hosted is not None:
                current = hosted.publisher.config.overflow.value
                if overflow is not None and overflow != current:
                    raise ConfigError(
                        f"the publisher on port {port} has overflow {current!r}: to change it, "
                        f"'pilotctl unpublish {port}' first")
                return hosted, False
            if port in self.messaging.ports:
                raise ConfigError(
                    f"port {port} is listened on by a client of this daemon (a 'listen', a "
                    "replier, or an inbox port): a publisher needs a port of its own")
            config = PubSubConfig(overflow=Overflow(overflow or Overflow.BLOCK.value))
            publisher = Publisher(self.ctx.node, port, config)
            await publisher.__aenter__()  # the Node refuses a port it listens on already
            hosted = self.hosted[port] = Hosted(publisher)
            log.info("publishing on port %d (overflow %s)", port, config.overflow.value)
            return hosted, True
