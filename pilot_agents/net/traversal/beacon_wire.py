"""Messages between a node and its beacon: encoding, parsing and signatures, shared by both sides.

Every message is one UDP datagram whose first byte is its type (0x20-0x2F, see :mod:`wire`), then
fixed-width big-endian fields. An *address* is 19 bytes: family (4 or 6), 16 address bytes (an IPv4
address fills the first 4, the other 12 must be zero), port (non-zero). ``sig`` is a 64-byte
Ed25519 signature over everything before it, prefixed by a per-type context string.

======  ============  ===========================================================================
type    name          layout (bytes)
======  ============  ===========================================================================
0x20    REGISTER      type 1 | node key 32 | timestamp ns 8 | nat 1 | name len 1 | name |
                      count 1 | count x address | zero padding | sig (by node key,
                      ``REGISTER_CONTEXT``); padded to at least ``REGISTER_MIN_SIZE``
0x21    REGISTERED    type 1 | status 1 | echoed timestamp ns 8 | ttl s 2 | alt port 2 |
                      reflexive address 19 | beacon key 32 | sig (by beacon)        = 129 bytes
0x22    RESOLVE       type 1 | request id 4 | by 1 (0 name, 1 key) | len 1 | name or key
0x23    RESOLVED      type 1 | status 1 | request id 4 | node key 32 | nat 1 | name len 1 | name |
                      count 1 | count x address | [1 | home address] | sig (by beacon)
0x24    INTRODUCE     type 1 | request id 4 | peer key 32                              = 37 bytes
0x25    INTRODUCTION  type 1 | status 1 | request id 4 (0: pushed) | timestamp ns 8 | peer key 32 |
                      nat 1 | count 1 | count x address | [1 | home address] | sig (by beacon)
0x26    RELAY         type 1 | target key 32 | sealed tunnel packet
0x27    RELAYED       type 1 | source key 32 | sealed tunnel packet
0x28    STATUS        type 1 | request id 4 | zero padding to ``STATUS_REQUEST_SIZE``
0x29    STATUS_REPLY  type 1 | request id 4 | len 2 | JSON object (UTF-8)
0x2A    REFUSED       type 1 | reason 1 | request id 4 (0: a relay packet)               = 6 bytes
0x2B    BLOCK_RELAY   type 1 | node key 32 | timestamp ns 8 | blocked key 32 | seconds 4 |
                      sig (by node key, ``BLOCK_RELAY_CONTEXT``)                     = 141 bytes
0x2C    GUEST         as REGISTER, with no name and ``GUEST_CONTEXT``; answered by REGISTERED
0x2E    KEEPALIVE     type 1 | node key 32 | counter 8 | mac 16 (by keepalive key)    = 57 bytes
0x2F    KEEPALIVE_ACK type 1 | echoed counter 8 | reflexive address 19 | mac 16        = 44 bytes
======  ============  ===========================================================================

Why these choices:

- The beacon signs ``context | recipient key | message`` but does not send the recipient key: the
  recipient knows its own key, and a signed answer can't be replayed to another node for free.
- REGISTERED carries the beacon's key so a node can pin it on first contact; later messages are
  checked against the pinned key.
- RELAY/RELAYED are not signed: their payload is sealed end to end by the tunnel, and a signature
  per relayed packet would cost the beacon an Ed25519 operation per packet.
- STATUS is padded to a size no smaller than its reply, so a spoofed request can't make the beacon
  an amplifier. Its counters are JSON because their set grows (refusals by reason).
- REFUSED is unsigned and only ever prompts a node to register again, which is harmless if forged.
- No unauthenticated request gets an answer longer than itself, so a spoofed source can't turn
  the beacon into an amplifier: REGISTER is padded to the size of REGISTERED (the beacon drops
  shorter ones unanswered), STATUS to the size of its reply. A REGISTER whose signature fails
  gets no answer at all (an answer would cost a signature and tell a real node nothing).
- BLOCK_RELAY asks the beacon to stop relaying one key's packets to the sender for ``seconds``
  (0 lifts the block). It is signed because a forged one would cut a node off its peers; its
  block runs from its own timestamp, so a replay changes nothing, and the beacon takes only
  timestamps newer than the last one it took from that node (an old block can't undo a lift).
  The beacon does not answer it: a node under a flood sends it again if the flood goes on.
- A fleet (several beacons on one store, one key): RESOLVED and INTRODUCTION end with the peer's
  *home* beacon (a count of 1 and the address that beacon advertises) when the peer is
  registered at another beacon of the fleet, and an INTRODUCTION refused with ELSEWHERE says
  where to go. Without one they end as before fleets, so older nodes still parse them.
  A node then attaches to that beacon as a *guest* (GUEST: a signed REGISTER that claims no name
  and that the beacon keeps in its memory only, never in the shared store), so that beacon can
  introduce it to the peer and relay between them, as a Tailscale client talks to a peer's home
  DERP server. GUEST has its own signing context, so a captured GUEST can't pass for a REGISTER
  (it would move the node's home), nor the reverse.
- KEEPALIVE (every few seconds) holds the NAT mapping to the beacon open and asks where the
  beacon sees us: its answer carries our reflexive address, so a node whose NAT rebound (router
  reboot, CGNAT timeout, new network) learns it within one interval and registers again. It
  must be cheap for the beacon (100k nodes at 5 s are 20k a second), so it is not signed: both
  sides share a keepalive key, a BLAKE2b of the X25519 of the node's and the beacon's keys
  (their Ed25519 keys converted, as Noise does), computed once per registration on the beacon
  and never sent; a 16-byte keyed BLAKE2b authenticates each way (``KEEPALIVE_CONTEXT``; the
  type byte is in the MAC'd body, so an answer can't pass for a request). The counter is the
  node's strictly increasing wall clock in ns (shared with REGISTER timestamps): the beacon takes
  only counters above the last one it took from that node (or its registration's timestamp),
  so a replay gets no answer. The answer is shorter than the request and goes only to a source
  that proved the key; an unknown key, a bad MAC or a stale counter gets no answer at all, so a
  spoofed keepalive learns nothing (not even whether the key is registered).

Functions that parse network input end in ``_untrusted`` and raise :class:`WireError` only; they
do not check signatures (verification costs far more than parsing, so the beacon rate-limits
first): call the message's ``verify`` method.
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import json
import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from ...addressing import HostPort
from ...errors import CryptoError, WireError
from ..tunnel import crypto

REGISTER: Final = 0x20
REGISTERED: Final = 0x21
RESOLVE: Final = 0x22
RESOLVED: Final = 0x23
INTRODUCE: Final = 0x24
INTRODUCTION: Final = 0x25
RELAY: Final = 0x26
RELAYED: Final = 0x27
STATUS: Final = 0x28
STATUS_REPLY: Final = 0x29
REFUSED: Final = 0x2A
BLOCK_RELAY: Final = 0x2B
GUEST: Final = 0x2C
KEEPALIVE: Final = 0x2E
KEEPALIVE_ACK: Final = 0x2F

REGISTER_CONTEXT: Final = b"pilot-agents/register/1"
GUEST_CONTEXT: Final = b"pilot-agents/guest/1"
REGISTERED_CONTEXT: Final = b"pilot-agents/registered/1"
RESOLVED_CONTEXT: Final = b"pilot-agents/resolved/1"
INTRODUCTION_CONTEXT: Final = b"pilot-agents/introduction/1"
BLOCK_RELAY_CONTEXT: Final = b"pilot-agents/block-relay/1"
KEEPALIVE_CONTEXT: Final = b"pilot-agents/keepalive/1"
KEEPALIVE_KEY_CONTEXT: Final = b"pilot-agents/keepalive-key/1"

KEY_SIZE: Final = crypto.PUBLIC_KEY_SIZE
SIG_SIZE: Final = crypto.SIGNATURE_SIZE
MAX_LAN_CANDIDATES: Final = 8
MAX_CANDIDATES: Final = MAX_LAN_CANDIDATES + 1  # the LAN ones and the reflexive one
MAX_HOSTNAME: Final = 63
STATUS_REQUEST_SIZE: Final = 1024
MAX_STATUS_JSON: Final = STATUS_REQUEST_SIZE - 7
RELAY_OVERHEAD: Final = 1 + KEY_SIZE

_ADDRESS = struct.Struct("!B16sH")
_REGISTER_HEAD = struct.Struct("!B32sQBB")
_COUNT = struct.Struct("!B")
_REGISTERED = struct.Struct("!BBQHH")
_RESOLVE_HEAD = struct.Struct("!BIBB")
_RESOLVED_HEAD = struct.Struct("!BBI32sBB")
_INTRODUCE = struct.Struct("!BI32s")
_INTRODUCTION_HEAD = struct.Struct("!BBIQ32sBB")
_RELAY_HEAD = struct.Struct("!B32s")
_STATUS = struct.Struct("!BI")
_STATUS_REPLY_HEAD = struct.Struct("!BIH")
_REFUSED = struct.Struct("!BBI")
_BLOCK_RELAY = struct.Struct("!B32sQ32sI")
_KEEPALIVE = struct.Struct("!B32sQ")
_KEEPALIVE_ACK = struct.Struct("!BQ")

REGISTERED_SIZE: Final = _REGISTERED.size + _ADDRESS.size + KEY_SIZE + SIG_SIZE
REFUSED_SIZE: Final = _REFUSED.size
REGISTER_MIN_SIZE: Final = REGISTERED_SIZE  # a REGISTER never gets an answer longer than itself
BLOCK_RELAY_SIZE: Final = _BLOCK_RELAY.size + SIG_SIZE
MAX_BLOCK_SECONDS: Final = 0xFFFFFFFF
INTRODUCE_SIZE: Final = _INTRODUCE.size
KEEPALIVE_MAC_SIZE: Final = 16
KEEPALIVE_SIZE: Final = _KEEPALIVE.size + KEEPALIVE_MAC_SIZE
KEEPALIVE_ACK_SIZE: Final = _KEEPALIVE_ACK.size + _ADDRESS.size + KEEPALIVE_MAC_SIZE

_HOSTNAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NODE_ID_LENGTH = 52  # base32 of a 32-byte key, as identity.node_id_from_key writes it


Address = HostPort  # the name the beacon layers use for a UDP endpoint


class Status(IntEnum):
    OK = 0
    NAME_TAKEN = 1
    BAD_SIGNATURE = 2
    STALE_TIMESTAMP = 3
    BAD_NAME = 4
    RATE_LIMITED = 5
    UNKNOWN = 6  # no such name or key
    OFFLINE = 7  # the name is owned, but its node holds no live registration
    NOT_REGISTERED = 8  # the request came from an address with no live registration
    NAME_LIMIT = 9  # the source address already holds as many names as the beacon allows
    UNAVAILABLE = 10  # the beacon's shared store did not answer: try again later
    ELSEWHERE = 11  # the node is registered at another beacon of the fleet


STATUS_REASONS: Final = {
    Status.OK: "ok",
    Status.NAME_TAKEN: "name taken: another node registered this hostname first",
    Status.BAD_SIGNATURE: "bad signature",
    Status.STALE_TIMESTAMP: (
        "stale timestamp: the node's clock is more than a minute off the beacon's, or the "
        "registration was replayed"
    ),
    Status.BAD_NAME: (
        "bad name: a hostname is 1-63 lowercase letters, digits and hyphens, not starting or "
        "ending with a hyphen, and not a node id"
    ),
    Status.RATE_LIMITED: "rate limited by the beacon",
    Status.UNKNOWN: "unknown: no node has that name or key",
    Status.OFFLINE: "offline: the node is known but not registered now",
    Status.NOT_REGISTERED: "not registered with the beacon",
    Status.NAME_LIMIT: (
        "name limit: nodes at this address already hold as many hostnames as the beacon allows; "
        "register without a name, or reuse one of theirs"
    ),
    Status.UNAVAILABLE: (
        "registry unavailable: the beacon's shared store did not answer; try again later (a "
        "registering node retries by itself)"
    ),
    Status.ELSEWHERE: "registered at another beacon of the fleet, which did not say where",
}


def status_reason(code: int) -> str:
    try:
        return STATUS_REASONS[Status(code)]
    except ValueError:
        return f"status {code}"


class NatType(IntEnum):
    UNKNOWN = 0
    OPEN = 1  # no NAT: the reflexive endpoint is one of our own
    CONE = 2  # endpoint-independent mapping: hole punching works
    SYMMETRIC = 3  # a new mapping per destination: punching works only against open/cone peers

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> NatType:
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(
                f"{label!r} is not a NAT type (unknown, open, cone, symmetric)"
            ) from None


def canonical_name(text: str) -> str:
    """A hostname (or node id) as the beacon compares it: stripped and lower-cased. Every name
    a pin or the trust store keeps goes through this, so ``Alice`` is never a name other than
    ``alice``."""
    return text.strip().lower()


def valid_hostname(name: str) -> bool:
    """1-63 of ``a-z 0-9 -``, no hyphen at either end, and not something a node id could be.

    A 52-character base32 string is refused as a name so that resolving a string is never
    ambiguous between a hostname and a node id.
    """
    if not _HOSTNAME.fullmatch(name):
        return False
    return not looks_like_node_id(name)


def looks_like_node_id(text: str) -> bool:
    if len(text) != _NODE_ID_LENGTH:
        return False
    try:
        return len(base64.b32decode(text.upper() + "====")) == KEY_SIZE
    except ValueError:
        return False


# -- addresses ---------------------------------------------------------------------------------


def encode_address(address: Address) -> bytes:
    """ValueError if the host is not an IP literal or the port is out of range."""
    host, port = address
    family, packed = _packed_ip(host)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not in 1..65535")
    return _ADDRESS.pack(family, packed, port)


@functools.lru_cache(maxsize=16_384)
def _packed_ip(host: str) -> tuple[int, bytes]:
    """``(4 or 6, address bytes)``. Cached: the beacon encodes its nodes' few addresses again in
    every answer, and parsing one costs a tenth of a refresh."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])  # a scope id means nothing to a peer
    return ip.version, ip.packed


def _parse_address_untrusted(data: bytes, pos: int) -> Address:
    family, raw, port = _ADDRESS.unpack_from(data, pos)
    if port == 0:
        raise WireError("address with port 0")
    if family == 4:
        if any(raw[4:]):
            raise WireError("IPv4 address with non-zero padding")
        return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}", port  # as IPv4Address shows it
    if family == 6:
        return str(ipaddress.IPv6Address(raw)), port
    raise WireError(f"address family {family}")


def _encode_addresses(addresses: tuple[Address, ...] | list[Address], limit: int) -> bytes:
    if len(addresses) > limit:
        raise ValueError(f"{len(addresses)} addresses, at most {limit}")
    return _COUNT.pack(len(addresses)) + b"".join(encode_address(a) for a in addresses)


def _parse_addresses_untrusted(
    data: bytes, pos: int, limit: int
) -> tuple[tuple[Address, ...], int]:
    (count,) = _COUNT.unpack_from(data, pos)
    pos += 1
    if count > limit:
        raise WireError(f"{count} addresses, at most {limit}")
    addresses = []
    for _ in range(count):
        addresses.append(_parse_address_untrusted(data, pos))
        pos += _ADDRESS.size
    return tuple(addresses), pos


def _encode_home(home: Address | None) -> bytes:
    # Nothing at all without one: an answer about a node of this beacon stays as it was before
    # fleets, which nodes of older versions parse.
    return b"" if home is None else _encode_addresses([home], 1)


def _parse_home_untrusted(data: bytes, pos: int) -> tuple[Address | None, int]:
    if pos == len(data):
        return None, pos
    homes, pos = _parse_addresses_untrusted(data, pos, 1)
    if not homes:
        raise WireError("a home field with no address")
    return homes[0], pos


def _parse_name_untrusted(data: bytes, pos: int, length: int) -> str | None:
    if length > MAX_HOSTNAME:
        raise WireError(f"name of {length} bytes")
    if pos + length > len(data):
        raise WireError("name runs past the message")
    if length == 0:
        return None
    raw = data[pos : pos + length]
    if not raw.isascii():
        raise WireError("name is not ASCII")
    return raw.decode("ascii")


def _encode_name(name: str | None) -> bytes:
    raw = (name or "").encode("ascii")
    if len(raw) > MAX_HOSTNAME:
        raise ValueError(f"name {name!r} is longer than {MAX_HOSTNAME}")
    return raw


def _nat(value: int) -> NatType:
    try:
        return NatType(value)
    except ValueError:
        raise WireError(f"NAT type {value}") from None


def _status(value: int) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise WireError(f"status {value}") from None


def _split_signature(data: bytes, minimum: int) -> tuple[bytes, bytes]:
    if len(data) < minimum + SIG_SIZE:
        raise WireError(f"message of {len(data)} bytes is too short")
    return data[:-SIG_SIZE], data[-SIG_SIZE:]


def _expect_end(pos: int, end: int) -> None:
    if pos != end:
        raise WireError(f"{end - pos} unexpected bytes at the end of the message")


def _beacon_sign(secret: bytes, context: bytes, recipient: bytes, body: bytes) -> bytes:
    return body + crypto.ed25519_sign(secret, context + recipient + body)


def _beacon_verify(
    beacon_key: bytes, context: bytes, recipient: bytes, body: bytes, signature: bytes
) -> bool:
    return crypto.ed25519_verify(beacon_key, context + recipient + body, signature)


# -- REGISTER ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    node_key: bytes
    timestamp_ns: int  # the node's wall clock
    nat_type: NatType
    hostname: str | None  # as sent: the beacon checks it with valid_hostname
    candidates: tuple[Address, ...]  # the node's LAN endpoints
    signature: bytes = field(repr=False)
    body: bytes = field(repr=False, compare=False)
    guest: bool = False  # a GUEST: no name, kept in the beacon's memory only

    def verify(self) -> bool:
        context = GUEST_CONTEXT if self.guest else REGISTER_CONTEXT
        return crypto.ed25519_verify(self.node_key, context + self.body, self.signature)


def encode_register(
    secret_key: bytes,
    node_key: bytes,
    timestamp_ns: int,
    nat_type: NatType,
    hostname: str | None,
    candidates: tuple[Address, ...] | list[Address],
    *,
    guest: bool = False,
) -> bytes:
    """A REGISTER, or with ``guest`` a GUEST (``hostname`` must then be None)."""
    if guest and hostname is not None:
        raise ValueError("a guest claims no name")
    name = _encode_name(hostname)
    kind = GUEST if guest else REGISTER
    body = (
        _REGISTER_HEAD.pack(kind, node_key, timestamp_ns, nat_type, len(name))
        + name
        + _encode_addresses(candidates, MAX_LAN_CANDIDATES)
    )
    body = body.ljust(REGISTER_MIN_SIZE - SIG_SIZE, b"\0")
    context = GUEST_CONTEXT if guest else REGISTER_CONTEXT
    return body + crypto.ed25519_sign(secret_key, context + body)


def parse_register_untrusted(data: bytes) -> Register:
    try:
        body, signature = _split_signature(data, _REGISTER_HEAD.size + 1)
        kind, key, timestamp, nat, name_len = _REGISTER_HEAD.unpack_from(body)
        if kind != REGISTER and kind != GUEST:
            raise WireError("not a REGISTER or GUEST")
        pos = _REGISTER_HEAD.size
        name = _parse_name_untrusted(body, pos, name_len)
        if kind == GUEST and name is not None:
            raise WireError("a GUEST with a name")
        candidates, pos = _parse_addresses_untrusted(body, pos + name_len, MAX_LAN_CANDIDATES)
        if body.count(0, pos) != len(body) - pos:
            raise WireError("REGISTER padding is not zero")
        guest = kind == GUEST
        return Register(key, timestamp, _nat(nat), name, candidates, signature, body, guest)
    except struct.error as exc:
        raise WireError(f"truncated REGISTER: {exc}") from None


# -- REGISTERED --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registered:
    status: Status
    timestamp_ns: int  # echoes the REGISTER it answers
    ttl: int  # seconds the registration lives without a refresh
    alt_port: int  # the beacon's second STUN port for NAT classification; 0: none
    reflexive: Address  # the node's address as the beacon saw it
    beacon_key: bytes
    signature: bytes = field(repr=False)
    body: bytes = field(repr=False, compare=False)

    def verify(self, recipient: bytes) -> bool:
        """Signed by the key it carries, for ``recipient``. The caller checks that key's pin."""
        return _beacon_verify(
            self.beacon_key, REGISTERED_CONTEXT, recipient, self.body, self.signature
        )


def encode_registered(
    beacon_secret: bytes,
    beacon_key: bytes,
    recipient: bytes,
    status: Status,
    timestamp_ns: int,
    ttl: int,
    alt_port: int,
    reflexive: Address,
) -> bytes:
    body = (
        _REGISTERED.pack(REGISTERED, status, timestamp_ns, ttl, alt_port)
        + encode_address(reflexive)
        + beacon_key
    )
    return _beacon_sign(beacon_secret, REGISTERED_CONTEXT, recipient, body)


def parse_registered_untrusted(data: bytes) -> Registered:
    if len(data) != REGISTERED_SIZE:
        raise WireError(f"REGISTERED of {len(data)} bytes")
    try:
        kind, status, timestamp, ttl, alt_port = _REGISTERED.unpack_from(data)
        if kind != REGISTERED:
            raise WireError("not a REGISTERED")
        pos = _REGISTERED.size
        reflexive = _parse_address_untrusted(data, pos)
        pos += _ADDRESS.size
        beacon_key = data[pos : pos + KEY_SIZE]
        return Registered(
            _status(status),
            timestamp,
            ttl,
            alt_port,
            reflexive,
            beacon_key,
            data[-SIG_SIZE:],
            data[:-SIG_SIZE],
        )
    except struct.error as exc:
        raise WireError(f"truncated REGISTERED: {exc}") from None


# -- RESOLVE / RESOLVED ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolve:
    request_id: int
    hostname: str | None  # exactly one of hostname and node_key is set
    node_key: bytes | None


def encode_resolve(
    request_id: int, *, hostname: str | None = None, node_key: bytes | None = None
) -> bytes:
    if node_key is not None:
        if len(node_key) != KEY_SIZE:
            raise ValueError("node key must be 32 bytes")
        return _RESOLVE_HEAD.pack(RESOLVE, request_id, 1, KEY_SIZE) + node_key
    name = _encode_name(hostname)
    if not name:
        raise ValueError("resolve needs a hostname or a node key")
    return _RESOLVE_HEAD.pack(RESOLVE, request_id, 0, len(name)) + name


def parse_resolve_untrusted(data: bytes) -> Resolve:
    try:
        kind, request_id, by, length = _RESOLVE_HEAD.unpack_from(data)
    except struct.error as exc:
        raise WireError(f"truncated RESOLVE: {exc}") from None
    if kind != RESOLVE:
        raise WireError("not a RESOLVE")
    pos = _RESOLVE_HEAD.size
    _expect_end(pos + length, len(data))
    if by == 1:
        if length != KEY_SIZE:
            raise WireError(f"RESOLVE by key with {length} bytes")
        return Resolve(request_id, None, data[pos:])
    if by == 0:
        name = _parse_name_untrusted(data, pos, length)
        if name is None:
            raise WireError("RESOLVE of an empty name")
        return Resolve(request_id, name, None)
    raise WireError(f"RESOLVE by {by}")


@dataclass(frozen=True, slots=True)
class Resolved:
    status: Status
    request_id: int
    node_key: bytes  # zero bytes when status is UNKNOWN
    nat_type: NatType
    hostname: str | None
    candidates: tuple[Address, ...]  # reflexive first, then LAN
    home: Address | None  # the beacon of the fleet it is registered at, if not this one
    signature: bytes = field(repr=False)
    body: bytes = field(repr=False, compare=False)

    def verify(self, beacon_key: bytes, recipient: bytes) -> bool:
        return _beacon_verify(beacon_key, RESOLVED_CONTEXT, recipient, self.body, self.signature)


def encode_resolved(
    beacon_secret: bytes,
    recipient: bytes,
    status: Status,
    request_id: int,
    node_key: bytes,
    nat_type: NatType,
    hostname: str | None,
    candidates: tuple[Address, ...] | list[Address],
    home: Address | None = None,
) -> bytes:
    name = _encode_name(hostname)
    body = (
        _RESOLVED_HEAD.pack(RESOLVED, status, request_id, node_key, nat_type, len(name))
        + name
        + _encode_addresses(candidates, MAX_CANDIDATES)
        + _encode_home(home)
    )
    return _beacon_sign(beacon_secret, RESOLVED_CONTEXT, recipient, body)


def parse_resolved_untrusted(data: bytes) -> Resolved:
    try:
        body, signature = _split_signature(data, _RESOLVED_HEAD.size + 1)
        kind, status, request_id, key, nat, name_len = _RESOLVED_HEAD.unpack_from(body)
        if kind != RESOLVED:
            raise WireError("not a RESOLVED")
        pos = _RESOLVED_HEAD.size
        name = _parse_name_untrusted(body, pos, name_len)
        candidates, pos = _parse_addresses_untrusted(body, pos + name_len, MAX_CANDIDATES)
        home, pos = _parse_home_untrusted(body, pos)
        _expect_end(pos, len(body))
        return Resolved(
            _status(status), request_id, key, _nat(nat), name, candidates, home, signature, body
        )
    except struct.error as exc:
        raise WireError(f"truncated RESOLVED: {exc}") from None


# -- INTRODUCE / INTRODUCTION ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Introduce:
    request_id: int
    peer_key: bytes


def encode_introduce(request_id: int, peer_key: bytes) -> bytes:
    if len(peer_key) != KEY_SIZE:
        raise ValueError("peer key must be 32 bytes")
    return _INTRODUCE.pack(INTRODUCE, request_id, peer_key)


def parse_introduce_untrusted(data: bytes) -> Introduce:
    if len(data) != _INTRODUCE.size:
        raise WireError(f"INTRODUCE of {len(data)} bytes")
    kind, request_id, peer_key = _INTRODUCE.unpack(data)
    if kind != INTRODUCE:
        raise WireError("not an INTRODUCE")
    return Introduce(request_id, peer_key)


@dataclass(frozen=True, slots=True)
class Introduction:
    status: Status
    request_id: int  # the INTRODUCE it answers; 0 when pushed to the introduced side
    timestamp_ns: int  # the beacon's wall clock: a pushed introduction can't be replayed later
    peer_key: bytes
    nat_type: NatType
    candidates: tuple[Address, ...]  # reflexive first, then LAN
    home: Address | None  # with ELSEWHERE: the beacon of the fleet the peer is registered at
    signature: bytes = field(repr=False)
    body: bytes = field(repr=False, compare=False)

    def verify(self, beacon_key: bytes, recipient: bytes) -> bool:
        return _beacon_verify(
            beacon_key, INTRODUCTION_CONTEXT, recipient, self.body, self.signature
        )


def encode_introduction(
    beacon_secret: bytes,
    recipient: bytes,
    status: Status,
    request_id: int,
    timestamp_ns: int,
    peer_key: bytes,
    nat_type: NatType,
    candidates: tuple[Address, ...] | list[Address],
    home: Address | None = None,
) -> bytes:
    body = _INTRODUCTION_HEAD.pack(
        INTRODUCTION, status, request_id, timestamp_ns, peer_key, nat_type, len(candidates)
    )
    if len(candidates) > MAX_CANDIDATES:
        raise ValueError(f"{len(candidates)} candidates, at most {MAX_CANDIDATES}")
    body += b"".join(encode_address(a) for a in candidates) + _encode_home(home)
    return _beacon_sign(beacon_secret, INTRODUCTION_CONTEXT, recipient, body)


def parse_introduction_untrusted(data: bytes) -> Introduction:
    try:
        body, signature = _split_signature(data, _INTRODUCTION_HEAD.size)
        kind, status, request_id, timestamp, key, nat, _ = _INTRODUCTION_HEAD.unpack_from(body)
        if kind != INTRODUCTION:
            raise WireError("not an INTRODUCTION")
        # The count is the head's last byte: parse the list from there.
        candidates, pos = _parse_addresses_untrusted(
            body, _INTRODUCTION_HEAD.size - 1, MAX_CANDIDATES
        )
        home, pos = _parse_home_untrusted(body, pos)
        _expect_end(pos, len(body))
        return Introduction(
            _status(status),
            request_id,
            timestamp,
            key,
            _nat(nat),
            candidates,
            home,
            signature,
            body,
        )
    except struct.error as exc:
        raise WireError(f"truncated INTRODUCTION: {exc}") from None


# -- RELAY / RELAYED ---------------------------------------------------------------------------


def encode_relay(target_key: bytes, packet: bytes) -> bytes:
    return b"%c%b%b" % (RELAY, target_key, packet)


def encode_relayed(source_key: bytes, packet: bytes) -> bytes:
    return b"%c%b%b" % (RELAYED, source_key, packet)


def parse_relay_untrusted(data: bytes) -> tuple[int, bytes, bytes]:
    """``(type, key, packet)`` of a RELAY or RELAYED: the target or the source key."""
    if len(data) <= RELAY_OVERHEAD:
        raise WireError(f"relay message of {len(data)} bytes carries no packet")
    kind = data[0]
    if kind != RELAY and kind != RELAYED:
        raise WireError("not a RELAY or RELAYED")
    return kind, data[1:RELAY_OVERHEAD], data[RELAY_OVERHEAD:]


# -- BLOCK_RELAY -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockRelay:
    node_key: bytes  # who asks: relayed packets to this node are what stops
    timestamp_ns: int  # the node's wall clock; the block runs from here
    blocked_key: bytes  # whose packets stop
    seconds: int  # how long; 0 lifts the block
    signature: bytes = field(repr=False)
    body: bytes = field(repr=False, compare=False)

    def verify(self) -> bool:
        return crypto.ed25519_verify(self.node_key, BLOCK_RELAY_CONTEXT + self.body, self.signature)


def encode_block_relay(
    secret_key: bytes, node_key: bytes, timestamp_ns: int, blocked_key: bytes, seconds: int
) -> bytes:
    if len(blocked_key) != KEY_SIZE:
        raise ValueError("the blocked key must be 32 bytes")
    if not 0 <= seconds <= MAX_BLOCK_SECONDS:
        raise ValueError(f"a block lasts 0..{MAX_BLOCK_SECONDS} seconds, not {seconds}")
    body = _BLOCK_RELAY.pack(BLOCK_RELAY, node_key, timestamp_ns, blocked_key, seconds)
    return body + crypto.ed25519_sign(secret_key, BLOCK_RELAY_CONTEXT + body)


def parse_block_relay_untrusted(data: bytes) -> BlockRelay:
    if len(data) != BLOCK_RELAY_SIZE:
        raise WireError(f"BLOCK_RELAY of {len(data)} bytes")
    kind, key, timestamp, blocked, seconds = _BLOCK_RELAY.unpack_from(data)
    if kind != BLOCK_RELAY:
        raise WireError("not a BLOCK_RELAY")
    return BlockRelay(key, timestamp, blocked, seconds, data[-SIG_SIZE:], data[:-SIG_SIZE])


# -- STATUS / STATUS_REPLY ---------------------------------------------------------------------


def encode_status_request(request_id: int) -> bytes:
    return _STATUS.pack(STATUS, request_id).ljust(STATUS_REQUEST_SIZE, b"\0")


def parse_status_request_untrusted(data: bytes) -> int:
    """The request id; the request must carry its full padding (anti-amplification)."""
    if len(data) < STATUS_REQUEST_SIZE:
        raise WireError(f"STATUS of {len(data)} bytes, padded to {STATUS_REQUEST_SIZE} expected")
    kind, request_id = _STATUS.unpack_from(data)
    if kind != STATUS:
        raise WireError("not a STATUS")
    return int(request_id)


def encode_status_reply(request_id: int, counters: dict[str, Any]) -> bytes:
    """ValueError if the counters don't fit (they must stay under the request's size)."""
    raw = json.dumps(counters, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(raw) > MAX_STATUS_JSON:
        raise ValueError(f"status of {len(raw)} bytes exceeds {MAX_STATUS_JSON}")
    return _STATUS_REPLY_HEAD.pack(STATUS_REPLY, request_id, len(raw)) + raw


def parse_status_reply_untrusted(data: bytes) -> tuple[int, dict[str, Any]]:
    try:
        kind, request_id, length = _STATUS_REPLY_HEAD.unpack_from(data)
    except struct.error as exc:
        raise WireError(f"truncated STATUS_REPLY: {exc}") from None
    if kind != STATUS_REPLY:
        raise WireError("not a STATUS_REPLY")
    _expect_end(_STATUS_REPLY_HEAD.size + length, len(data))
    try:
        counters = json.loads(data[_STATUS_REPLY_HEAD.size :].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("STATUS_REPLY is not JSON") from None
    if not isinstance(counters, dict):
        raise WireError("STATUS_REPLY is not a JSON object")
    return int(request_id), counters


# -- REFUSED -----------------------------------------------------------------------------------


def encode_refused(reason: Status, request_id: int) -> bytes:
    return _REFUSED.pack(REFUSED, reason, request_id)


def parse_refused_untrusted(data: bytes) -> tuple[Status, int]:
    if len(data) != REFUSED_SIZE:
        raise WireError(f"REFUSED of {len(data)} bytes")
    kind, reason, request_id = _REFUSED.unpack(data)
    if kind != REFUSED:
        raise WireError("not a REFUSED")
    return _status(reason), int(request_id)


# -- KEEPALIVE / KEEPALIVE_ACK -----------------------------------------------------------------


def keepalive_key(own_x25519_secret: bytes, other_key: bytes, node_key: bytes) -> bytes | None:
    """The key a node and its beacon share for keepalives: either side's X25519 secret (its
    Ed25519 key converted) with the other's Ed25519 public key. None if ``other_key`` is not a
    usable curve point (such a node gets no keepalive answers, only registrations)."""
    try:
        shared = crypto.x25519(own_x25519_secret, crypto.ed25519_pk_to_x25519(other_key))
    except CryptoError:
        return None
    return crypto.keyed_mac(shared, KEEPALIVE_KEY_CONTEXT + node_key, 32)


def _keepalive_mac(key: bytes, body: bytes) -> bytes:
    return crypto.keyed_mac(key, KEEPALIVE_CONTEXT + body, KEEPALIVE_MAC_SIZE)


@dataclass(frozen=True, slots=True)
class Keepalive:
    node_key: bytes
    counter: int  # the node's wall clock in ns, strictly increasing
    mac: bytes = field(repr=False)
    body: bytes = field(repr=False, compare=False)

    def verify(self, key: bytes) -> bool:
        return hmac.compare_digest(_keepalive_mac(key, self.body), self.mac)


def encode_keepalive(key: bytes, node_key: bytes, counter: int) -> bytes:
    body = _KEEPALIVE.pack(KEEPALIVE, node_key, counter)
    return body + _keepalive_mac(key, body)


def parse_keepalive_untrusted(data: bytes) -> Keepalive:
    if len(data) != KEEPALIVE_SIZE:
        raise WireError(f"KEEPALIVE of {len(data)} bytes")
    kind, node_key, counter = _KEEPALIVE.unpack_from(data)
    if kind != KEEPALIVE:
        raise WireError("not a KEEPALIVE")
    return Keepalive(node_key, counter, data[-KEEPALIVE_MAC_SIZE:], data[:-KEEPALIVE_MAC_SIZE])


@dataclass(frozen=True, slots=True)
class KeepaliveAck:
    counter: int  # echoes the KEEPALIVE it answers
    reflexive: Address  # where the beacon saw that KEEPALIVE come from
    mac: bytes = field(repr=False)
    body: bytes = field(repr=False, compare=False)

    def verify(self, key: bytes) -> bool:
        return hmac.compare_digest(_keepalive_mac(key, self.body), self.mac)


def encode_keepalive_ack(key: bytes, counter: int, reflexive: bytes) -> bytes:
    """``reflexive`` as :func:`encode_address` wrote it (the beacon keeps it per node: parsing
    the IP string again would cost half of what answering a keepalive costs)."""
    body = _KEEPALIVE_ACK.pack(KEEPALIVE_ACK, counter) + reflexive
    return body + _keepalive_mac(key, body)


def parse_keepalive_ack_untrusted(data: bytes) -> KeepaliveAck:
    if len(data) != KEEPALIVE_ACK_SIZE:
        raise WireError(f"KEEPALIVE_ACK of {len(data)} bytes")
    kind, counter = _KEEPALIVE_ACK.unpack_from(data)
    if kind != KEEPALIVE_ACK:
        raise WireError("not a KEEPALIVE_ACK")
    reflexive = _parse_address_untrusted(data, _KEEPALIVE_ACK.size)
    return KeepaliveAck(counter, reflexive, data[-KEEPALIVE_MAC_SIZE:], data[:-KEEPALIVE_MAC_SIZE])
