"""Message-bus patterns over tunnels, written once against :mod:`pilot_agents.transport` so
they run on an embedded Node and through the daemon alike.

- :mod:`.reqrep`: request/reply with correlation ids, many requests in flight per tunnel.
- :mod:`.pubsub`: publish/subscribe on topic prefixes, subscriptions sent to the publisher,
  bounded per-subscriber queues with a documented overflow policy, resubscription.
"""

from .pubsub import Overflow, Publication, Publisher, PubSubConfig, Subscriber
from .reqrep import Replier, Reply, ReqRepConfig, Request, Requester, serve, serving

__all__ = ["Overflow", "PubSubConfig", "Publication", "Publisher", "Replier", "Reply",
           "ReqRepConfig", "Request", "Requester", "Subscriber", "serve", "serving"]
