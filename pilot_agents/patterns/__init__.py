"""Message-bus patterns over tunnels, written once against :mod:`pilot_agents.transport` so
they run on an embedded Node and through the daemon alike.

- :mod:`.reqrep`: request/reply with correlation ids, many requests in flight per tunnel.
- :mod:`.pubsub`: publish/subscribe on topic prefixes, subscriptions sent to the publisher,
  bounded per-subscriber queues with a documented overflow policy, resubscription.
- :mod:`.pushpull`: work items spread over pullers by round robin, with credit-based
  back-pressure and at-least-once redelivery when a puller goes away.
"""

from .pubsub import Overflow, Publication, Publisher, PubSubConfig, Subscriber
from .pushpull import Puller, Pusher, PushPullConfig, WorkItem
from .reqrep import Replier, Reply, ReqRepConfig, Request, Requester, serve, serving

__all__ = ["Overflow", "PubSubConfig", "Publication", "Publisher", "Puller", "PushPullConfig",
           "Pusher", "Replier", "Reply", "ReqRepConfig", "Request", "Requester", "Subscriber",
           "WorkItem", "serve", "serving"]
