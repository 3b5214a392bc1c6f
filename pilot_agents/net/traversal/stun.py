"""STUN Binding (RFC 5389) as the beacon answers it and as a node asks it: encode and parse.

Header (20 bytes): type 2 | length 2 (of the attributes) | magic cookie 0x2112A442 4 |
transaction id 12. Attributes: type 2 | length 2 | value, padded to 4 bytes. The first byte of
any STUN message is 0-3 (RFC 7983), so STUN shares the beacon's and the node's sockets with our
own packets (0x10-0x2F).

The responder is what any STUN client needs: a success response with XOR-MAPPED-ADDRESS (and
FINGERPRINT when the request had one). Requests in the old RFC 3489 format (no magic cookie, 16-byte
transaction id) get MAPPED-ADDRESS, which is all those clients read. A request with an attribute we
must understand but don't gets a 420 error, as RFC 5389 section 7.3.1 requires; a classic request
asking us to answer from another address or port (CHANGE-REQUEST) gets no answer, since we have no
other address to answer from and silence is what tells the client so.

Amplification: the smallest Binding request (20 bytes) is smaller than any valid answer (32
bytes for IPv4, 44 for IPv6, 8 more with FINGERPRINT), so a server that answers every request
reflects more bytes at a spoofed source than it received. Our node pads its request with a
SOFTWARE attribute (comprehension-optional: any STUN server ignores it) to
``PADDED_REQUEST_SIZE``, at least the largest answer, so the beacon never answers it with more
than it got; RFC 5780's PADDING attribute would do the same but is comprehension-required, and a
server without RFC 5780 would answer it with a 420 error. What the beacon does with unpadded
requests from other clients is its policy (see :mod:`pilot_agents.beacon.server`).

Functions that parse network input end in ``_untrusted`` and raise :class:`WireError` only.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from ...addressing import HostPort as Address
from ...errors import WireError

MAGIC_COOKIE: Final = 0x2112A442
HEADER_SIZE: Final = 20
TRANSACTION_ID_SIZE: Final = 12

BINDING_REQUEST: Final = 0x0001
BINDING_SUCCESS: Final = 0x0101
BINDING_ERROR: Final = 0x0111

ATTR_MAPPED_ADDRESS: Final = 0x0001
ATTR_CHANGE_REQUEST: Final = 0x0003
ATTR_USERNAME: Final = 0x0006
ATTR_MESSAGE_INTEGRITY: Final = 0x0008
ATTR_ERROR_CODE: Final = 0x0009
ATTR_UNKNOWN_ATTRIBUTES: Final = 0x000A
ATTR_XOR_MAPPED_ADDRESS: Final = 0x0020
ATTR_SOFTWARE: Final = 0x8022
ATTR_FINGERPRINT: Final = 0x8028
FINGERPRINT_XOR: Final = 0x5354554E

_HEADER = struct.Struct("!HHI12s")
_ATTR = struct.Struct("!HH")
_ADDR_HEAD = struct.Struct("!xBH")
_U32 = struct.Struct("!I")
_FINGERPRINT_SIZE = _ATTR.size + 4
# Comprehension-required attributes we know and may ignore: credentials (we ask for none, so a
# server without authentication ignores them) and ICE's connectivity-check attributes (PRIORITY,
# USE-CANDIDATE), so an ICE agent pointed at the beacon still learns its address.
_IGNORED_REQUIRED: Final = frozenset(
    {ATTR_USERNAME, ATTR_MESSAGE_INTEGRITY, 0x001C, 0x0024, 0x0025}
)
# The largest Binding success we send: XOR-MAPPED-ADDRESS of an IPv6 address and FINGERPRINT.
PADDED_REQUEST_SIZE: Final = HEADER_SIZE + _ATTR.size + _ADDR_HEAD.size + 16 + _FINGERPRINT_SIZE
SOFTWARE_NAME: Final = b"pilot-agents"
MAX_ATTRIBUTES: Final = 32  # nobody needs more in a Binding message; bounds the parser's work


@dataclass(frozen=True, slots=True)
class StunMessage:
    msg_type: int
    transaction_id: bytes  # 12 bytes, or 16 for an RFC 3489 message
    attributes: tuple[tuple[int, bytes], ...]
    fingerprint: bool  # carried a valid FINGERPRINT

    @property
    def classic(self) -> bool:
        """An RFC 3489 message: no magic cookie."""
        return len(self.transaction_id) == 16

    def attribute(self, attr_type: int) -> bytes | None:
        for kind, value in self.attributes:
            if kind == attr_type:
                return value
        return None


def looks_like_stun(data: bytes) -> bool:
    """The cheap demultiplexing test of RFC 7983 plus the header size."""
    return len(data) >= HEADER_SIZE and data[0] < 4


def parse_stun_untrusted(data: bytes) -> StunMessage:
    if len(data) < HEADER_SIZE:
        raise WireError(f"STUN message of {len(data)} bytes")
    msg_type, length, cookie, tid_tail = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise WireError("not a STUN message (top bits set)")
    if length % 4 or HEADER_SIZE + length != len(data):
        raise WireError(f"STUN length {length} does not match the datagram")
    classic = cookie != MAGIC_COOKIE
    transaction_id = data[4:20] if classic else tid_tail
    attributes: list[tuple[int, bytes]] = []
    pos = HEADER_SIZE
    fingerprint = False
    while pos < len(data):
        if len(attributes) >= MAX_ATTRIBUTES:
            raise WireError("too many STUN attributes")
        if fingerprint:
            raise WireError("STUN attribute after FINGERPRINT")
        if pos + _ATTR.size > len(data):
            raise WireError("truncated STUN attribute header")
        kind, size = _ATTR.unpack_from(data, pos)
        start = pos + _ATTR.size
        end = start + size
        if end > len(data):
            raise WireError("STUN attribute runs past the message")
        value = data[start:end]
        if kind == ATTR_FINGERPRINT and not classic:
            if size != 4:
                raise WireError("FINGERPRINT of the wrong size")
            expected = (zlib.crc32(data[:pos]) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
            if _U32.unpack(value)[0] != expected:
                raise WireError("STUN FINGERPRINT mismatch")
            fingerprint = True
        else:
            attributes.append((kind, value))
        pos = end + (-size % 4)
    if pos != len(data):
        raise WireError("STUN attribute padding runs past the message")
    return StunMessage(msg_type, transaction_id, tuple(attributes), fingerprint)


def _encode(
    msg_type: int,
    transaction_id: bytes,
    attributes: list[tuple[int, bytes]],
    fingerprint: bool,
) -> bytes:
    body = b"".join(
        _ATTR.pack(kind, len(value)) + value + b"\0" * (-len(value) % 4)
        for kind, value in attributes
    )
    if len(transaction_id) == 16:  # RFC 3489: the id takes the cookie's place
        head = struct.pack("!HH", msg_type, len(body)) + transaction_id
        return head + body
    if len(transaction_id) != TRANSACTION_ID_SIZE:
        raise ValueError("a STUN transaction id is 12 bytes (16 for RFC 3489)")
    length = len(body) + (_FINGERPRINT_SIZE if fingerprint else 0)
    message = _HEADER.pack(msg_type, length, MAGIC_COOKIE, transaction_id) + body
    if fingerprint:
        # The CRC covers the header with the length already counting the FINGERPRINT itself.
        crc = (zlib.crc32(message) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        message += _ATTR.pack(ATTR_FINGERPRINT, 4) + _U32.pack(crc)
    return message


def _address_value(address: Address, transaction_id: bytes, xor: bool) -> bytes:
    host, port = address
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 client: report the IPv4
    raw = ip.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        key = _U32.pack(MAGIC_COOKIE) + transaction_id
        raw = bytes(a ^ b for a, b in zip(raw, key, strict=False))
    return _ADDR_HEAD.pack(1 if ip.version == 4 else 2, port) + raw


def _parse_address_untrusted(value: bytes, transaction_id: bytes, xor: bool) -> Address:
    if len(value) < _ADDR_HEAD.size:
        raise WireError("truncated STUN address")
    family, port = _ADDR_HEAD.unpack_from(value)
    raw = value[_ADDR_HEAD.size :]
    if (family, len(raw)) not in ((1, 4), (2, 16)):
        raise WireError(f"STUN address family {family} with {len(raw)} bytes")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        key = _U32.pack(MAGIC_COOKIE) + transaction_id
        raw = bytes(a ^ b for a, b in zip(raw, key, strict=False))
    ip = ipaddress.IPv4Address(raw) if family == 1 else ipaddress.IPv6Address(raw)
    return str(ip), port


# -- the client side ---------------------------------------------------------------------------


def encode_binding_request(
    transaction_id: bytes, *, fingerprint: bool = True, pad_to: int = 0
) -> bytes:
    """``pad_to``: the least size, reached with a SOFTWARE attribute (``PADDED_REQUEST_SIZE``
    makes sure no answer is larger than the request)."""
    size = HEADER_SIZE + (_FINGERPRINT_SIZE if fingerprint else 0)
    if pad_to <= size:
        return _encode(BINDING_REQUEST, transaction_id, [], fingerprint)
    room = max(len(SOFTWARE_NAME), pad_to - size - _ATTR.size)
    software = SOFTWARE_NAME.ljust(room + (-room % 4), b" ")
    return _encode(BINDING_REQUEST, transaction_id, [(ATTR_SOFTWARE, software)], fingerprint)


def parse_binding_response_untrusted(data: bytes) -> tuple[bytes, Address]:
    """``(transaction id, mapped address)`` of a Binding success response."""
    message = parse_stun_untrusted(data)
    if message.msg_type == BINDING_ERROR:
        raise WireError("STUN Binding error response")
    if message.msg_type != BINDING_SUCCESS:
        raise WireError(f"STUN message type 0x{message.msg_type:04x} is not a Binding response")
    value = message.attribute(ATTR_XOR_MAPPED_ADDRESS)
    if value is not None and not message.classic:
        return message.transaction_id, _parse_address_untrusted(
            value, message.transaction_id, xor=True
        )
    value = message.attribute(ATTR_MAPPED_ADDRESS)
    if value is None:
        raise WireError("STUN Binding response without a mapped address")
    return message.transaction_id, _parse_address_untrusted(value, message.transaction_id, False)


# -- the server side ---------------------------------------------------------------------------


def parse_binding_request_untrusted(data: bytes) -> StunMessage:
    message = parse_stun_untrusted(data)
    if message.msg_type != BINDING_REQUEST:
        raise WireError(f"STUN message type 0x{message.msg_type:04x} is not a Binding request")
    return message


def encode_binding_response(request: StunMessage, source: Address) -> bytes | None:
    """The answer to ``request`` from ``source``; None when the right answer is silence."""
    tid = request.transaction_id
    if request.classic:
        change = request.attribute(ATTR_CHANGE_REQUEST)
        if change is not None and len(change) == 4 and _U32.unpack(change)[0] & 0x6:
            return None
        return _encode(
            BINDING_SUCCESS, tid, [(ATTR_MAPPED_ADDRESS, _address_value(source, tid, False))], False
        )
    # Comprehension-required attributes are 0x0000-0x7FFF; a Binding request needs none of them.
    unknown = [
        kind for kind, _ in request.attributes if kind < 0x8000 and kind not in _IGNORED_REQUIRED
    ]
    if unknown:
        reason = b"Unknown Attribute"
        error = struct.pack("!HBB", 0, 4, 20) + reason
        listed = b"".join(struct.pack("!H", kind) for kind in unknown[:16])
        return _encode(
            BINDING_ERROR,
            tid,
            [(ATTR_ERROR_CODE, error), (ATTR_UNKNOWN_ATTRIBUTES, listed)],
            request.fingerprint,
        )
    return _encode(
        BINDING_SUCCESS,
        tid,
        [(ATTR_XOR_MAPPED_ADDRESS, _address_value(source, tid, True))],
        request.fingerprint,
    )
