"""What the sans-IO core reports to the layer above it: dataclasses, as h11 does.

Not frozen: this module is compiled with the core, and a frozen dataclass's generated __init__
sets each field through ``object.__setattr__``, interpreted, on the per-message path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Event:
    peer: bytes  # the peer's Ed25519 public key (its node id in raw form)


@dataclass(slots=True)
class HandshakeCompleted(Event):
    rekey: bool


@dataclass(slots=True)
class PathChanged(Event):
    """The tunnel moved: ``path`` is "direct" or "relay"."""

    path: str
    address: Any  # not `object`: mypyc fails at import on a dataclass field of type object


@dataclass(slots=True)
class PingAcked(Event):
    """A PING sent by :meth:`Session.ping` was acknowledged after ``rtt`` seconds."""

    ping_id: int
    rtt: float


@dataclass(slots=True)
class StreamOpened(Event):
    """The peer opened a stream to one of our ports."""

    stream_id: int
    src_port: int
    dst_port: int


@dataclass(slots=True, init=False)
class MessageReceived(Event):
    stream_id: int
    src_port: int
    dst_port: int
    data: bytes

    # Written out: one per message, and mypyc leaves a generated __init__ interpreted.
    def __init__(
        self, peer: bytes, stream_id: int, src_port: int, dst_port: int, data: bytes
    ) -> None:
        self.peer = peer
        self.stream_id = stream_id
        self.src_port = src_port
        self.dst_port = dst_port
        self.data = data


@dataclass(slots=True)
class StreamEnded(Event):
    """The peer finished sending on the stream (clean FIN after its last message)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """The stream was aborted, by the peer or by us for a protocol reason."""

    stream_id: int
    code: int


@dataclass(slots=True)
class SessionClosed(Event):
    """The tunnel is gone: every stream on it is dead, but the ``moved`` ones, which go on (same
    ids) in the session that replaced it (the peer restarted before it saw them). ``code`` is a
    :class:`CloseCode`."""

    code: int
    reason: str
    by_peer: bool
    moved: tuple[int, ...] = ()


@dataclass(slots=True)
class PeerUnanswered(Event):
    """The tunnel's handshakes go unanswered: the peer's addresses may have changed. A node
    with a beacon asks it for a fresh introduction."""
