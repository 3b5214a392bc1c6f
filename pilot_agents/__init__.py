"""pilot-agents: encrypted peer-to-peer tunnels and message-bus patterns for AI agents."""

from .errors import (
    BeaconError,
    ConfigError,
    ConnectionClosedError,
    DaemonNotRunningError,
    DaemonOutdatedError,
    IdentityError,
    KeyMismatchError,
    MessageTooLargeError,
    NameTakenError,
    NotTrustedError,
    PeerUnreachableError,
    PilotError,
    PilotTimeoutError,
    PortClosedError,
    UnknownHostError,
)
from .identity import Identity
from .node.node import Node, NodeInfo, PeerInfo, PeerStatus, PingResult
from .runtime import run
from .sdk import Client, connect, listen, receive, send
from .transport import Connection, Listener, Message, Transport

__all__ = [
    "BeaconError",
    "Client",
    "ConfigError",
    "Connection",
    "ConnectionClosedError",
    "DaemonNotRunningError",
    "DaemonOutdatedError",
    "Identity",
    "IdentityError",
    "KeyMismatchError",
    "Listener",
    "Message",
    "MessageTooLargeError",
    "NameTakenError",
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
    "Transport",
    "UnknownHostError",
    "connect",
    "listen",
    "receive",
    "run",
    "send",
]
