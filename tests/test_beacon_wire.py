"""Beacon messages and STUN: every message round-trips; hostile bytes raise WireError and nothing
else; a signature only verifies for the key, recipient and bytes it was made for."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilot_agents.errors import WireError
from pilot_agents.identity import node_id_from_key
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.traversal import stun
from pilot_agents.net.traversal.beacon_wire import NatType, Status
from pilot_agents.net.tunnel import crypto

NODE_SK, NODE_PK = crypto.ed25519_keypair()
BEACON_SK, BEACON_PK = crypto.ed25519_keypair()
OTHER_SK, OTHER_PK = crypto.ed25519_keypair()
TS = 1_764_000_000_123_456_789
LAN = (("192.168.1.20", 40000), ("fd00::1", 40000), ("10.0.0.5", 1))
CANDIDATES = (("203.0.113.7", 61000), *LAN)


def register() -> bytes:
    return bw.encode_register(NODE_SK, NODE_PK, TS, NatType.CONE, "alice-1", LAN)


def registered(status: Status = Status.OK) -> bytes:
    return bw.encode_registered(
        BEACON_SK, BEACON_PK, NODE_PK, status, TS, 90, 9001, ("203.0.113.7", 61000)
    )


def resolved() -> bytes:
    return bw.encode_resolved(
        BEACON_SK, NODE_PK, Status.OK, 77, OTHER_PK, NatType.SYMMETRIC, "bob", CANDIDATES
    )


def introduction() -> bytes:
    return bw.encode_introduction(
        BEACON_SK, NODE_PK, Status.OK, 0, TS, OTHER_PK, NatType.OPEN, CANDIDATES
    )


def block_relay() -> bytes:
    return bw.encode_block_relay(NODE_SK, NODE_PK, TS, OTHER_PK, 600)


# Every message with the parser that takes it.
SAMPLES: list[tuple[Callable[[], bytes], Callable[[bytes], Any]]] = [
    (register, bw.parse_register_untrusted),
    (registered, bw.parse_registered_untrusted),
    (lambda: bw.encode_resolve(5, hostname="bob"), bw.parse_resolve_untrusted),
    (lambda: bw.encode_resolve(6, node_key=OTHER_PK), bw.parse_resolve_untrusted),
    (resolved, bw.parse_resolved_untrusted),
    (lambda: bw.encode_introduce(9, OTHER_PK), bw.parse_introduce_untrusted),
    (introduction, bw.parse_introduction_untrusted),
    (lambda: bw.encode_relay(OTHER_PK, b"sealed" * 50), bw.parse_relay_untrusted),
    (lambda: bw.encode_relayed(NODE_PK, b"x"), bw.parse_relay_untrusted),
    (lambda: bw.encode_status_request(3), bw.parse_status_request_untrusted),
    (lambda: bw.encode_status_reply(3, {"a": 1, "b": {"c": 2}}), bw.parse_status_reply_untrusted),
    (lambda: bw.encode_refused(Status.NOT_REGISTERED, 4), bw.parse_refused_untrusted),
    (block_relay, bw.parse_block_relay_untrusted),
    (
        lambda: stun.encode_binding_request(b"p" * 12, pad_to=stun.PADDED_REQUEST_SIZE),
        stun.parse_binding_request_untrusted,
    ),
    (lambda: stun.encode_binding_request(b"t" * 12), stun.parse_binding_request_untrusted),
    (
        lambda: (
            stun.encode_binding_response(
                stun.parse_binding_request_untrusted(stun.encode_binding_request(b"t" * 12)),
                ("198.51.100.1", 5000),
            )
            or b""
        ),
        stun.parse_binding_response_untrusted,
    ),
]
ALL_PARSERS = sorted({id(p): p for _, p in SAMPLES}.values(), key=lambda p: p.__name__)


def test_register_round_trip_and_signature() -> None:
    message = bw.parse_register_untrusted(register())
    assert message.node_key == NODE_PK
    assert message.timestamp_ns == TS
    assert message.nat_type is NatType.CONE
    assert message.hostname == "alice-1"
    assert message.candidates == LAN
    assert message.verify()
    anonymous = bw.parse_register_untrusted(
        bw.encode_register(NODE_SK, NODE_PK, TS, NatType.UNKNOWN, None, ())
    )
    assert anonymous.hostname is None and anonymous.candidates == () and anonymous.verify()


def test_register_signed_by_another_key_fails() -> None:
    forged = bw.encode_register(OTHER_SK, NODE_PK, TS, NatType.CONE, "alice-1", LAN)
    assert not bw.parse_register_untrusted(forged).verify()


def test_register_signature_is_domain_separated() -> None:
    # The same bytes signed without the context (or with another one) don't verify.
    data = register()
    body = data[: -bw.SIG_SIZE]
    for signature in (
        crypto.ed25519_sign(NODE_SK, body),
        crypto.ed25519_sign(NODE_SK, bw.REGISTERED_CONTEXT + body),
    ):
        assert not bw.parse_register_untrusted(body + signature).verify()


def test_registered_round_trip_and_recipient_binding() -> None:
    data = registered(Status.NAME_TAKEN)
    assert len(data) == bw.REGISTERED_SIZE
    reply = bw.parse_registered_untrusted(data)
    assert (reply.status, reply.timestamp_ns, reply.ttl, reply.alt_port) == (
        Status.NAME_TAKEN,
        TS,
        90,
        9001,
    )
    assert reply.reflexive == ("203.0.113.7", 61000)
    assert reply.beacon_key == BEACON_PK
    assert reply.verify(NODE_PK)
    assert not reply.verify(OTHER_PK)  # made for another node: can't be replayed to it


def test_resolve_round_trips() -> None:
    by_name = bw.parse_resolve_untrusted(bw.encode_resolve(5, hostname="bob"))
    assert (by_name.request_id, by_name.hostname, by_name.node_key) == (5, "bob", None)
    by_key = bw.parse_resolve_untrusted(bw.encode_resolve(2**32 - 1, node_key=OTHER_PK))
    assert (by_key.request_id, by_key.hostname, by_key.node_key) == (2**32 - 1, None, OTHER_PK)


def test_resolved_round_trip_and_signature() -> None:
    reply = bw.parse_resolved_untrusted(resolved())
    assert reply.status is Status.OK and reply.request_id == 77
    assert reply.node_key == OTHER_PK and reply.nat_type is NatType.SYMMETRIC
    assert reply.hostname == "bob" and reply.candidates == CANDIDATES
    assert reply.verify(BEACON_PK, NODE_PK)
    assert not reply.verify(OTHER_PK, NODE_PK)  # another beacon key
    assert not reply.verify(BEACON_PK, OTHER_PK)  # another recipient


def test_introduction_round_trip_and_signature() -> None:
    reply = bw.parse_introduction_untrusted(introduction())
    assert (reply.status, reply.request_id, reply.timestamp_ns) == (Status.OK, 0, TS)
    assert reply.peer_key == OTHER_PK and reply.nat_type is NatType.OPEN
    assert reply.candidates == CANDIDATES
    assert reply.verify(BEACON_PK, NODE_PK)
    assert not reply.verify(BEACON_PK, OTHER_PK)
    # Signed as an INTRODUCTION, not valid as anything else: contexts differ per type.
    assert not bw._beacon_verify(
        BEACON_PK, bw.RESOLVED_CONTEXT, NODE_PK, reply.body, reply.signature
    )


def test_small_messages_round_trip() -> None:
    assert bw.parse_introduce_untrusted(bw.encode_introduce(9, OTHER_PK)) == bw.Introduce(
        9, OTHER_PK
    )
    assert bw.parse_relay_untrusted(bw.encode_relay(OTHER_PK, b"abc")) == (
        bw.RELAY,
        OTHER_PK,
        b"abc",
    )
    assert bw.parse_relay_untrusted(bw.encode_relayed(NODE_PK, b"abc")) == (
        bw.RELAYED,
        NODE_PK,
        b"abc",
    )
    request = bw.encode_status_request(3)
    assert len(request) == bw.STATUS_REQUEST_SIZE
    assert bw.parse_status_request_untrusted(request) == 3
    assert bw.parse_status_reply_untrusted(bw.encode_status_reply(3, {"a": [1]})) == (3, {"a": [1]})
    assert bw.parse_refused_untrusted(bw.encode_refused(Status.RATE_LIMITED, 8)) == (
        Status.RATE_LIMITED,
        8,
    )


def test_register_is_padded_to_its_answer_and_the_padding_is_signed() -> None:
    # A REGISTER never gets an answer longer than itself (issue #11 item 8).
    data = bw.encode_register(NODE_SK, NODE_PK, TS, NatType.UNKNOWN, None, ())
    assert len(data) == bw.REGISTER_MIN_SIZE == bw.REGISTERED_SIZE
    assert len(register()) > bw.REGISTER_MIN_SIZE  # long enough already: no padding
    body = data[: -bw.SIG_SIZE]
    dirty = body[:-1] + b"\1"
    with pytest.raises(WireError, match="padding"):
        bw.parse_register_untrusted(
            dirty + crypto.ed25519_sign(NODE_SK, bw.REGISTER_CONTEXT + dirty)
        )
    longer = body + b"\0" * 10
    message = bw.parse_register_untrusted(
        longer + crypto.ed25519_sign(NODE_SK, bw.REGISTER_CONTEXT + longer)
    )
    assert message.verify() and message.hostname is None


def test_block_relay_round_trip_and_signature() -> None:
    data = block_relay()
    assert len(data) == bw.BLOCK_RELAY_SIZE == 141
    message = bw.parse_block_relay_untrusted(data)
    assert (message.node_key, message.timestamp_ns, message.blocked_key, message.seconds) == (
        NODE_PK,
        TS,
        OTHER_PK,
        600,
    )
    assert message.verify()
    assert not bw.parse_block_relay_untrusted(
        bw.encode_block_relay(OTHER_SK, NODE_PK, TS, OTHER_PK, 600)
    ).verify()
    # Domain-separated from REGISTER: the same key's signature over the same bytes won't do.
    body = data[: -bw.SIG_SIZE]
    resigned = body + crypto.ed25519_sign(NODE_SK, bw.REGISTER_CONTEXT + body)
    assert not bw.parse_block_relay_untrusted(resigned).verify()
    with pytest.raises(ValueError):
        bw.encode_block_relay(NODE_SK, NODE_PK, TS, OTHER_PK, -1)
    with pytest.raises(ValueError):
        bw.encode_block_relay(NODE_SK, NODE_PK, TS, b"short", 1)


def test_padded_stun_request_is_never_shorter_than_its_answer() -> None:
    request = stun.encode_binding_request(b"q" * 12, pad_to=stun.PADDED_REQUEST_SIZE)
    assert len(request) == stun.PADDED_REQUEST_SIZE
    parsed = stun.parse_binding_request_untrusted(request)
    assert parsed.attribute(stun.ATTR_SOFTWARE) is not None  # comprehension-optional
    for source in (("198.51.100.1", 5000), ("2001:db8::7", 65535)):
        reply = stun.encode_binding_response(parsed, source)
        assert reply is not None and len(reply) <= len(request)
        assert stun.parse_binding_response_untrusted(reply) == (b"q" * 12, source)


def test_status_request_must_be_padded() -> None:
    with pytest.raises(WireError):
        bw.parse_status_request_untrusted(bw.encode_status_request(3)[:100])


def test_status_reply_never_exceeds_its_request() -> None:
    with pytest.raises(ValueError):
        bw.encode_status_reply(1, {"x": "y" * bw.STATUS_REQUEST_SIZE})


def test_address_encoding_is_strict() -> None:
    # IPv4 with junk in the padding, port 0, family 5: all refused.
    good = bw.encode_register(NODE_SK, NODE_PK, TS, NatType.CONE, None, [("10.0.0.1", 5)])
    pos = good.index(bytes([4, 10, 0, 0, 1]))
    for patched in (
        good[: pos + 5] + b"\x01" + good[pos + 6 :],
        good[: pos + 17] + b"\0\0" + good[pos + 19 :],
        b"%b\x05%b" % (good[:pos], good[pos + 1 :]),
    ):
        with pytest.raises(WireError):
            bw.parse_register_untrusted(patched)
    with pytest.raises(ValueError):
        bw.encode_address(("example.com", 5))
    assert bw.encode_address(("::ffff:1.2.3.4", 5)) == bw.encode_address(("::ffff:1.2.3.4", 5))


def test_too_many_candidates() -> None:
    with pytest.raises(ValueError):
        bw.encode_register(
            NODE_SK, NODE_PK, TS, NatType.CONE, None, [("10.0.0.1", p) for p in range(1, 10)]
        )


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a", True),
        ("alice", True),
        ("a-b-c", True),
        ("x" * 63, True),
        ("0pilot", True),
        ("", False),
        ("x" * 64, False),
        ("-a", False),
        ("a-", False),
        ("Alice", False),
        ("a_b", False),
        ("a.b", False),
        ("héllo", False),
        # Would be ambiguous with a node id. Named: the key is random per process, and
        # pytest-xdist needs the same test ids in every worker.
        pytest.param(node_id_from_key(OTHER_PK), False, id="a-node-id"),
    ],
)
def test_hostname_rules(name: str, ok: bool) -> None:
    assert bw.valid_hostname(name) is ok


# -- hostile input ------------------------------------------------------------------------------


def _only_wire_error(parse: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return parse(data)
    except WireError:
        return None


@pytest.mark.parametrize(("make", "parse"), SAMPLES)
def test_truncation_at_every_length(
    make: Callable[[], bytes], parse: Callable[[bytes], Any]
) -> None:
    data = make()
    assert parse(data) is not None
    for cut in range(len(data)):
        _only_wire_error(parse, data[:cut])
    _only_wire_error(parse, data + b"\0")
    _only_wire_error(parse, data + data)


@pytest.mark.parametrize(("make", "parse"), SAMPLES)
def test_bit_flips_never_raise_and_never_verify(
    make: Callable[[], bytes], parse: Callable[[bytes], Any]
) -> None:
    data = make()
    rng = random.Random(len(data))
    for _ in range(400):
        flipped = bytearray(data)
        bit = rng.randrange(len(data) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
        message = _only_wire_error(parse, bytes(flipped))
        # A flipped signed message may still parse; it must never verify.
        if isinstance(message, bw.Register):
            assert not message.verify()
        elif isinstance(message, bw.Registered):
            assert message.beacon_key != BEACON_PK or not message.verify(NODE_PK)
        elif isinstance(message, bw.Resolved | bw.Introduction):
            assert not message.verify(BEACON_PK, NODE_PK)
        elif isinstance(message, bw.BlockRelay):
            assert not message.verify()


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    for parse in ALL_PARSERS:
        _only_wire_error(parse, data)
        for kind in (*range(0x20, 0x2C), 0, 1):
            _only_wire_error(parse, bytes([kind]) + data)


def test_random_prefixed_messages_raise_only_wire_error() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        kind = rng.choice([*range(0x20, 0x2C), 0, 1, rng.randrange(256)])
        data = bytes([kind]) + rng.randbytes(rng.choice([0, 3, 19, 36, 64, 100, 128, 200, 1100]))
        for parse in ALL_PARSERS:
            _only_wire_error(parse, data)


# -- STUN ---------------------------------------------------------------------------------------


def _response(request: bytes, source: tuple[str, int]) -> bytes:
    reply = stun.encode_binding_response(stun.parse_binding_request_untrusted(request), source)
    assert reply is not None
    return reply


@pytest.mark.parametrize("source", [("198.51.100.1", 5000), ("2001:db8::7", 65535)])
@pytest.mark.parametrize("fingerprint", [True, False])
def test_stun_binding_round_trip(source: tuple[str, int], fingerprint: bool) -> None:
    tid = bytes(range(12))
    request = stun.encode_binding_request(tid, fingerprint=fingerprint)
    assert len(request) == 20 + (8 if fingerprint else 0)
    assert stun.parse_binding_request_untrusted(request).fingerprint is fingerprint
    reply = _response(request, source)
    assert stun.parse_stun_untrusted(reply).fingerprint is fingerprint
    assert stun.parse_binding_response_untrusted(reply) == (tid, source)


def test_stun_reports_ipv4_mapped_as_ipv4() -> None:
    reply = _response(stun.encode_binding_request(b"a" * 12), ("::ffff:192.0.2.1", 7))
    assert stun.parse_binding_response_untrusted(reply)[1] == ("192.0.2.1", 7)


def test_stun_known_vector() -> None:
    # RFC 5769 section 2.2 (IPv4 response): the XOR-MAPPED-ADDRESS value for 192.0.2.1:32853.
    tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
    value = stun._address_value(("192.0.2.1", 32853), tid, True)
    assert value == bytes.fromhex("0001a147e112a643")


def test_stun_fingerprint_mismatch_is_rejected() -> None:
    request = bytearray(stun.encode_binding_request(b"b" * 12))
    request[-1] ^= 1
    with pytest.raises(WireError):
        stun.parse_binding_request_untrusted(bytes(request))


def test_stun_classic_request_gets_mapped_address() -> None:
    tid = b"0123456789abcdef"  # RFC 3489: 16 bytes, no magic cookie
    request = b"\x00\x01\x00\x00" + tid
    message = stun.parse_binding_request_untrusted(request)
    assert message.classic
    reply = stun.encode_binding_response(message, ("198.51.100.9", 1234))
    assert reply is not None
    assert stun.parse_binding_response_untrusted(reply) == (tid, ("198.51.100.9", 1234))
    # Asking for an answer from another address: we have none, so we stay silent.
    change = b"\x00\x01\x00\x08" + tid + b"\x00\x03\x00\x04\x00\x00\x00\x06"
    assert stun.encode_binding_response(stun.parse_stun_untrusted(change), ("1.2.3.4", 5)) is None


def test_stun_unknown_required_attribute_gets_420() -> None:
    body = b"\x00\x03\x00\x04\x00\x00\x00\x02"  # CHANGE-REQUEST, which RFC 5389 servers don't do
    request = b"\x00\x01" + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + b"c" * 12 + body
    reply = stun.encode_binding_response(stun.parse_stun_untrusted(request), ("1.2.3.4", 5))
    assert reply is not None
    message = stun.parse_stun_untrusted(reply)
    assert message.msg_type == stun.BINDING_ERROR
    error = message.attribute(stun.ATTR_ERROR_CODE)
    assert error is not None and error[2:4] == bytes([4, 20])
    assert message.attribute(stun.ATTR_UNKNOWN_ATTRIBUTES) == b"\x00\x03"
    with pytest.raises(WireError):
        stun.parse_binding_response_untrusted(reply)


def test_stun_is_told_apart_from_our_packets() -> None:
    assert stun.looks_like_stun(stun.encode_binding_request(b"d" * 12))
    assert not stun.looks_like_stun(register())
    assert not stun.looks_like_stun(b"\x00" * 19)
