"""Message-bus patterns over tunnels, written once against :mod:`pilot_agents.transport` so
they run on an embedded Node and through the daemon alike.

- :mod:`.reqrep`: request/reply with correlation ids, many requests in flight per tunnel.
"""

from .reqrep import Replier, Reply, ReqRepConfig, Request, Requester, serve

__all__ = ["Replier", "Reply", "ReqRepConfig", "Request", "Requester", "serve"]
