"""pilot-agents: encrypted peer-to-peer tunnels and message-bus patterns for AI agents."""

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
from .node import Connection, Listener, Message, Node

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
    "NotTrustedError",
    "PeerUnreachableError",
    "PilotError",
    "PilotTimeoutError",
    "PortClosedError",
]
