"""The embedded node: identity, trust, peers and listeners over the tunnel, and the connection
and listener objects an application holds."""

from .connection import Connection, Listener, Message
from .node import Node, NodeInfo, PeerInfo, PeerStatus, PingResult

__all__ = ["Connection", "Listener", "Message", "Node", "NodeInfo", "PeerInfo", "PeerStatus",
           "PingResult"]
