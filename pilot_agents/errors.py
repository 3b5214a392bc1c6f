"""The one exception tree of pilot-agents.

Every error a caller can see derives from :class:`PilotError`, and its message says what to do.
Errors that describe a peer's misbehaviour on the wire (:class:`WireError`, :class:`CryptoError`)
are caught inside the stack and turned into counters or close events; they only reach a caller
when the caller itself handed us the bad bytes.
"""

from __future__ import annotations


class PilotError(Exception):
    """Root of every pilot-agents error."""


class ConfigError(PilotError):
    """A setting, argument or file given by the user is invalid."""


class IdentityError(PilotError):
    """The node's key file is missing, malformed or readable by others."""


class WireError(PilotError):
    """Bytes from the network do not parse as a pilot-agents packet or frame."""


class CryptoError(PilotError):
    """Authentication of a packet or handshake message failed."""


class HandshakeError(CryptoError):
    """A Noise handshake message was malformed, forged or out of order."""


class NotTrustedError(PilotError):
    """The peer is not in the trust set (or we are not in its)."""


class PilotTimeoutError(PilotError, TimeoutError):
    """A network wait ran out of time."""


class PeerUnreachableError(PilotError):
    """No path to the peer answered: it is down, unknown, or does not trust us."""


class ConnectionClosedError(PilotError):
    """The tunnel or stream was closed; ``code`` and ``reason`` say why."""

    def __init__(self, message: str, code: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class PortClosedError(ConnectionClosedError):
    """The peer has no listener on the port we connected to."""


class BeaconError(PilotError):
    """The beacon refused us (a registration, a lookup) or can't be reached."""


class NameTakenError(BeaconError):
    """The hostname belongs to another node's key: the first key to register a name owns it."""


class UnknownHostError(BeaconError):
    """The beacon knows no node by that name (or it is offline)."""


class MessageTooLargeError(PilotError):
    """A message exceeds the configured maximum message size."""
