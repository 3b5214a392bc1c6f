"""Handshake packets around the Noise IK messages, and the key pairs they produce.

Initiation: ``INITIATION | sender index | Noise(-> e, es, s, ss; payload = timestamp, nonce)
| mac1 | mac2``.
Response:   ``RESPONSE | sender index | receiver index | Noise(<- e, ee, se; payload = nonce)
| mac1 | mac2``.

The MACs (``cookie.py``) wrap standard Noise messages, as in WireGuard; the mux checks them
before any Diffie-Hellman.

The timestamp (wall-clock nanoseconds) lets the responder refuse a replayed initiation, as
WireGuard's TAI64N does: the mux keeps the greatest accepted per peer in a store that outlives
sessions (and, in a node, restarts). The nonce names the sender's session state: a rekey repeats
it, a session that lost its state (a restart, a tunnel that timed out) comes with a greater one,
which tells the other side to drop its stale reliability state; a smaller one than already seen
is a delayed packet of an older session (docs/protocol.md, "Session lifecycle").
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import HandshakeError
from . import noise, wire
from .cookie import MACS_SIZE, PeerMacs
from .crypto import Aead

_INITIATION_PAYLOAD = struct.Struct("!QQ")  # timestamp ns, session nonce
_RESPONSE_PAYLOAD = struct.Struct("!Q")  # session nonce

INITIATION_SIZE = (
    wire.INITIATION_HEADER.size + noise.INITIATION_OVERHEAD + _INITIATION_PAYLOAD.size + MACS_SIZE
)
RESPONSE_SIZE = (
    wire.RESPONSE_HEADER.size + noise.RESPONSE_OVERHEAD + _RESPONSE_PAYLOAD.size + MACS_SIZE
)


@dataclass(slots=True)
class Keypair:
    """The transport keys of one handshake, named by the index each side chose for it."""

    local_index: int
    remote_index: int
    sender: Aead
    receiver: Aead
    created: float  # `now` when the handshake completed
    first_packet_number: int  # our packet number when the keys came into use
    initiator: bool
    confirmed: bool  # a responder may send only after the initiator used the keys once


def write_initiation(
    initiator: noise.Initiator,
    sender_index: int,
    timestamp_ns: int,
    nonce: int,
    macs: PeerMacs,
    now: float,
) -> bytes:
    head = wire.INITIATION_HEADER.pack(wire.INITIATION, sender_index)
    message = initiator.write_initiation(_INITIATION_PAYLOAD.pack(timestamp_ns, nonce))
    return macs.seal_initiation(head + message, now)


@dataclass(frozen=True, slots=True)
class Initiation:
    sender_index: int
    remote_static: bytes  # X25519
    timestamp_ns: int
    nonce: int
    responder: noise.Responder  # ready to write the response


def read_initiation_untrusted(
    data: bytes, static_private: bytes, prologue: bytes, is_trusted: Callable[[bytes], bool]
) -> Initiation:
    """Raises HandshakeError (malformed, forged) or NotTrustedError (unknown initiator). The
    MACs are the caller's to check, first."""
    if len(data) != INITIATION_SIZE:
        raise HandshakeError(f"initiation of {len(data)} bytes")
    sender_index = wire.INITIATION_HEADER.unpack_from(data)[1]
    responder = noise.Responder(static_private, prologue)
    remote_static, payload = responder.read_initiation(
        data[wire.INITIATION_HEADER.size : -MACS_SIZE], is_trusted
    )
    timestamp_ns, nonce = _INITIATION_PAYLOAD.unpack(payload)
    return Initiation(sender_index, remote_static, timestamp_ns, nonce, responder)


def write_response(
    initiation: Initiation, sender_index: int, nonce: int, macs: PeerMacs
) -> tuple[bytes, noise.TransportKeys]:
    message, keys = initiation.responder.write_response(_RESPONSE_PAYLOAD.pack(nonce))
    head = wire.RESPONSE_HEADER.pack(wire.RESPONSE, sender_index, initiation.sender_index)
    return macs.seal_response(head + message), keys


def response_indices_untrusted(data: bytes) -> tuple[int, int]:
    """(sender index, receiver index) of a response, before any crypto."""
    if len(data) != RESPONSE_SIZE:
        raise HandshakeError(f"response of {len(data)} bytes")
    _, sender, receiver = wire.RESPONSE_HEADER.unpack_from(data)
    return sender, receiver


def read_response_untrusted(
    data: bytes, initiator: noise.Initiator
) -> tuple[int, noise.TransportKeys]:
    """(peer's session nonce, keys). Raises HandshakeError. The caller checks mac1 first."""
    payload, keys = initiator.read_response(data[wire.RESPONSE_HEADER.size : -MACS_SIZE])
    if len(payload) != _RESPONSE_PAYLOAD.size:
        raise HandshakeError("response payload has the wrong size")
    return _RESPONSE_PAYLOAD.unpack(payload)[0], keys


@dataclass(frozen=True, slots=True)
class Response:
    """An authenticated answer to one of our initiations, not yet installed: the mux first
    decides which session takes it (the one that initiated, or its successor when the answer
    shows that the peer's state was reset)."""

    local_index: int  # our initiation's index: the peer now sends to it
    remote_index: int
    nonce: int  # the responder's session nonce
    keys: noise.TransportKeys
    initiation_sent: float  # `now` when the initiation it answers left: an RTT sample
