"""pilot-agents: encrypted peer-to-peer tunnels and message-bus patterns for AI agents."""

from .connection import Connection, Listener, Message
from .errors import (
    ConfigError,
    ConnectionClosedError,
    IdentityError,
    MessageTooLargeError,
    NotTrustedError,
    PeerUnreachableError,
    PilotError,
    PilotTimeoutError,
    PortClosedError,
)
from .identity import Identity
from .node import Node, NodeInfo, PeerInfo, PeerStatus, PingResult

__all__ = [
    "ConfigError",
    "Connection",
    "ConnectionClosedError",
    "Identity",
    "IdentityError",
    "Listener",
    "Message",
    "MessageTooLargeError",
    "Node",
    "NodeInfo",
    "NotTrustedError",
    "PeerInfo",
    "PeerStatus",
    "PeerUnreachableError",
    "PilotError",
    "PilotTimeoutError",
    "PingResult",
    "PortClosedError",
]
