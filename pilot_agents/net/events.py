"""What the sans-IO core reports to the layer above it. Frozen dataclasses, as h11 does."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    peer: bytes  # the peer's Ed25519 public key (its node id in raw form)


@dataclass(frozen=True, slots=True)
class HandshakeCompleted(Event):
    rekey: bool


@dataclass(frozen=True, slots=True)
class PathChanged(Event):
    """The tunnel moved: ``path`` is "direct" or "relay"."""

    path: str
    address: object


@dataclass(frozen=True, slots=True)
class PingAcked(Event):
    """A PING sent by :meth:`Session.ping` was acknowledged after ``rtt`` seconds."""

    ping_id: int
    rtt: float


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The peer opened a stream to one of our ports."""

    stream_id: int
    src_port: int
    dst_port: int


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    stream_id: int
    src_port: int
    dst_port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer finished sending on the stream (clean FIN after its last message)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """The stream was aborted, by the peer or by us for a protocol reason."""

    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    """The tunnel is gone: every stream on it is dead. ``code`` is a :class:`CloseCode`."""

    code: int
    reason: str
    by_peer: bool
