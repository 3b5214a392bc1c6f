from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from pilot_agents.errors import HandshakeError, NotTrustedError
from pilot_agents.net.tunnel import crypto, noise, wire
from pilot_agents.net.tunnel import handshake as packets
from pilot_agents.net.tunnel.cookie import MAC_SIZE, MACS_SIZE, CookieChecker, PeerMacs
from pilot_agents.net.tunnel.crypto import Aead
from pilot_agents.net.tunnel.noise import (
    INITIATION_OVERHEAD,
    PROTOCOL_NAME,
    RESPONSE_OVERHEAD,
    Initiator,
    Responder,
    TransportKeys,
)

PROLOGUE = b"pilot-agents test prologue"
INITIATOR_STATIC = bytes(range(1, 33))
RESPONDER_STATIC = bytes(range(101, 133))
INITIATOR_EPHEMERAL = bytes(range(201, 233))
RESPONDER_EPHEMERAL = bytes(range(33, 65))
INITIATOR_PUBLIC = crypto.x25519_public(INITIATOR_STATIC)
RESPONDER_PUBLIC = crypto.x25519_public(RESPONDER_STATIC)


def trust_all(_: bytes) -> bool:
    return True


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 1 << bit
    return bytes(changed)


def their_responder(ephemeral: bytes | None = None) -> NoiseConnection:
    connection = NoiseConnection.from_name(PROTOCOL_NAME)
    connection.set_as_responder()
    connection.set_keypair_from_private_bytes(Keypair.STATIC, RESPONDER_STATIC)
    if ephemeral is not None:
        connection.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    connection.set_prologue(PROLOGUE)
    connection.start_handshake()
    return connection


def their_initiator(ephemeral: bytes | None = None) -> NoiseConnection:
    connection = NoiseConnection.from_name(PROTOCOL_NAME)
    connection.set_as_initiator()
    connection.set_keypair_from_private_bytes(Keypair.STATIC, INITIATOR_STATIC)
    connection.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, RESPONDER_PUBLIC)
    if ephemeral is not None:
        connection.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
    connection.set_prologue(PROLOGUE)
    connection.start_handshake()
    return connection


def handshake(
    initiation_payload: bytes = b"hello", response_payload: bytes = b"welcome"
) -> tuple[TransportKeys, TransportKeys]:
    initiator = Initiator(INITIATOR_STATIC, RESPONDER_PUBLIC, PROLOGUE)
    responder = Responder(RESPONDER_STATIC, PROLOGUE)
    remote, payload = responder.read_initiation(
        initiator.write_initiation(initiation_payload), trust_all
    )
    assert (remote, payload) == (INITIATOR_PUBLIC, initiation_payload)
    response, responder_keys = responder.write_response(response_payload)
    payload, initiator_keys = initiator.read_response(response)
    assert payload == response_payload
    return initiator_keys, responder_keys


def initiation() -> tuple[Initiator, bytes]:
    initiator = Initiator(INITIATOR_STATIC, RESPONDER_PUBLIC, PROLOGUE, INITIATOR_EPHEMERAL)
    return initiator, initiator.write_initiation(b"initiation payload")


def response() -> tuple[Initiator, bytes]:
    initiator, message = initiation()
    responder = Responder(RESPONDER_STATIC, PROLOGUE, RESPONDER_EPHEMERAL)
    responder.read_initiation(message, trust_all)
    return initiator, responder.write_response(b"response payload")[0]


def test_handshake_between_our_two_sides() -> None:
    initiator_keys, responder_keys = handshake()
    assert initiator_keys == responder_keys
    assert len(initiator_keys.initiator_to_responder) == crypto.KEY_SIZE
    assert len(initiator_keys.responder_to_initiator) == crypto.KEY_SIZE
    assert initiator_keys.initiator_to_responder != initiator_keys.responder_to_initiator
    assert len(initiator_keys.handshake_hash) == 64
    assert handshake()[0] != initiator_keys  # fresh ephemerals, fresh keys


def test_message_sizes() -> None:
    _, message = initiation()
    assert len(message) == INITIATION_OVERHEAD + len(b"initiation payload") == 96 + 18
    _, message = response()
    assert len(message) == RESPONSE_OVERHEAD + len(b"response payload") == 48 + 16


def test_empty_payloads() -> None:
    initiator_keys, responder_keys = handshake(b"", b"")
    assert initiator_keys == responder_keys


def assert_transport_interop(
    keys: TransportKeys, their_side: NoiseConnection, we_are_initiator: bool
) -> None:
    outgoing = keys.initiator_to_responder if we_are_initiator else keys.responder_to_initiator
    incoming = keys.responder_to_initiator if we_are_initiator else keys.initiator_to_responder
    for counter in range(3):
        message = b"theirs %d" % counter
        assert Aead(incoming).open(counter, their_side.encrypt(message)) == message
        message = b"ours %d" % counter
        assert their_side.decrypt(Aead(outgoing).seal(counter, message)) == message


def test_our_initiator_with_noiseprotocol_responder() -> None:
    initiator = Initiator(INITIATOR_STATIC, RESPONDER_PUBLIC, PROLOGUE)
    responder = their_responder()
    assert responder.read_message(initiator.write_initiation(b"from us")) == b"from us"
    payload, keys = initiator.read_response(responder.write_message(b"from them"))
    assert payload == b"from them"
    assert responder.handshake_finished
    assert keys.handshake_hash == responder.get_handshake_hash()
    assert_transport_interop(keys, responder, we_are_initiator=True)


def test_noiseprotocol_initiator_with_our_responder() -> None:
    initiator = their_initiator()
    responder = Responder(RESPONDER_STATIC, PROLOGUE)
    seen: list[bytes] = []

    def is_trusted(key: bytes) -> bool:
        seen.append(key)
        return True

    remote, payload = responder.read_initiation(initiator.write_message(b"from them"), is_trusted)
    assert seen == [INITIATOR_PUBLIC]
    assert (remote, payload) == (INITIATOR_PUBLIC, b"from them")
    message, keys = responder.write_response(b"from us")
    assert initiator.read_message(message) == b"from us"
    assert initiator.handshake_finished
    assert keys.handshake_hash == initiator.get_handshake_hash()
    assert_transport_interop(keys, initiator, we_are_initiator=False)


@pytest.mark.filterwarnings("ignore:One of ephemeral keypairs is already set")
def test_messages_are_byte_identical_to_noiseprotocol() -> None:
    _, initiation_message = initiation()
    theirs = their_initiator(INITIATOR_EPHEMERAL)
    assert theirs.write_message(b"initiation payload") == initiation_message
    responder = Responder(RESPONDER_STATIC, PROLOGUE, RESPONDER_EPHEMERAL)
    responder.read_initiation(initiation_message, trust_all)
    their_side = their_responder(RESPONDER_EPHEMERAL)
    their_side.read_message(initiation_message)
    assert responder.write_response(b"response payload")[0] == their_side.write_message(
        b"response payload"
    )


def test_the_cookie_macs_wrap_a_standard_noise_message() -> None:
    """Our handshake packets are a header, a standard Noise message and the two MACs (as in
    WireGuard): noiseprotocol reads the middle of each, and mac1 is what cookie.py says."""
    initiator = Initiator(INITIATOR_STATIC, RESPONDER_PUBLIC, PROLOGUE)
    packet = packets.write_initiation(
        initiator, 7, 123, 456, PeerMacs(RESPONDER_PUBLIC, 120.0), 0.0
    )
    assert len(packet) == packets.INITIATION_SIZE
    assert packet[-MAC_SIZE:] == bytes(MAC_SIZE)  # no cookie: mac2 is zero
    assert CookieChecker(RESPONDER_PUBLIC, 120.0, bytes).mac1_ok(packet)
    their_side = their_responder()
    payload = their_side.read_message(packet[wire.INITIATION_HEADER.size : -MACS_SIZE])
    assert payload == (123).to_bytes(8, "big") + (456).to_bytes(8, "big")
    response = their_side.write_message(b"\x00" * 8)
    wrapped = wire.RESPONSE_HEADER.pack(wire.RESPONSE, 9, 7) + response + bytes(MACS_SIZE)
    nonce, keys = packets.read_response_untrusted(wrapped, initiator)
    assert nonce == 0 and keys.handshake_hash == their_side.get_handshake_hash()


@pytest.fixture
def dh_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []

    def counting(name: str, function: Callable[..., bytes]) -> Callable[..., bytes]:
        def wrapper(*args: bytes) -> bytes:
            calls.append(name)
            return function(*args)

        return wrapper

    monkeypatch.setattr(noise, "x25519", counting("dh", crypto.x25519))
    monkeypatch.setattr(noise, "x25519_public", counting("base", crypto.x25519_public))
    yield calls


def test_untrusted_initiator_costs_one_dh_and_leaves_no_state(dh_calls: list[str]) -> None:
    _, message = initiation()
    responder = Responder(RESPONDER_STATIC, PROLOGUE)
    dh_calls.clear()
    seen: list[bytes] = []

    def refuse(key: bytes) -> bool:
        seen.append(key)
        return False

    with pytest.raises(NotTrustedError):
        responder.read_initiation(message, refuse)
    assert seen == [INITIATOR_PUBLIC]
    assert dh_calls == ["dh"]
    # The refusal changed nothing: the same responder completes a genuine handshake.
    assert responder.read_initiation(message, trust_all) == (
        INITIATOR_PUBLIC,
        b"initiation payload",
    )
    assert responder.write_response()[1].handshake_hash


def test_forged_static_costs_one_dh_and_skips_trust_check(dh_calls: list[str]) -> None:
    _, message = initiation()
    responder = Responder(RESPONDER_STATIC, PROLOGUE)
    dh_calls.clear()
    seen: list[bytes] = []

    def is_trusted(key: bytes) -> bool:
        seen.append(key)
        return True

    with pytest.raises(HandshakeError):
        responder.read_initiation(flip(message, 40), is_trusted)
    assert seen == []
    assert dh_calls == ["dh"]


def test_every_bit_flipped_initiation_is_rejected() -> None:
    _, message = initiation()
    responder = Responder(RESPONDER_STATIC, PROLOGUE)
    seen: list[bytes] = []

    def is_trusted(key: bytes) -> bool:
        seen.append(key)
        return True

    for index in range(len(message)):
        seen.clear()
        with pytest.raises(HandshakeError):
            responder.read_initiation(flip(message, index, index % 8), is_trusted)
        # The static key is authenticated before anyone is asked to trust it.
        assert seen == ([] if index < noise.INITIATION_OVERHEAD - 16 else [INITIATOR_PUBLIC])
    # Rejections left the responder untouched.
    assert responder.read_initiation(message, trust_all)[0] == INITIATOR_PUBLIC


def test_every_bit_flipped_response_is_rejected() -> None:
    initiator, message = response()
    for index in range(len(message)):
        with pytest.raises(HandshakeError):
            initiator.read_response(flip(message, index, 7 - index % 8))
    # A forged response does not spoil the wait for the genuine one.
    assert initiator.read_response(message)[0] == b"response payload"


def test_truncated_initiations_are_rejected() -> None:
    _, message = initiation()
    responder = Responder(RESPONDER_STATIC, PROLOGUE)
    for length in range(len(message)):
        with pytest.raises(HandshakeError):
            responder.read_initiation(message[:length], trust_all)
    with pytest.raises(HandshakeError):
        responder.read_initiation(message + b"\x00", trust_all)


def test_truncated_responses_are_rejected() -> None:
    initiator, message = response()
    for length in range(len(message)):
        with pytest.raises(HandshakeError):
            initiator.read_response(message[:length])
    with pytest.raises(HandshakeError):
        initiator.read_response(message + b"\x00")


def test_response_from_a_different_responder_is_rejected() -> None:
    initiator, _ = initiation()
    other_static, other_public = crypto.x25519_keypair()
    # Same initiator keys, ephemeral included: only the responder's static key differs.
    decoy = Initiator(INITIATOR_STATIC, other_public, PROLOGUE, INITIATOR_EPHEMERAL)
    impostor = Responder(other_static, PROLOGUE, RESPONDER_EPHEMERAL)
    impostor.read_initiation(decoy.write_initiation(b"initiation payload"), trust_all)
    with pytest.raises(HandshakeError):
        initiator.read_response(impostor.write_response(b"response payload")[0])


def test_initiation_for_a_different_responder_is_rejected() -> None:
    _, message = initiation()
    other_static, _ = crypto.x25519_keypair()
    with pytest.raises(HandshakeError):
        Responder(other_static, PROLOGUE).read_initiation(message, trust_all)


def test_prologue_mismatch_is_rejected() -> None:
    _, message = initiation()
    with pytest.raises(HandshakeError):
        Responder(RESPONDER_STATIC, b"other prologue").read_initiation(message, trust_all)


def test_low_order_keys_are_rejected() -> None:
    _, message = initiation()
    with pytest.raises(HandshakeError):
        Responder(RESPONDER_STATIC, PROLOGUE).read_initiation(bytes(32) + message[32:], trust_all)
    initiator, reply = response()
    with pytest.raises(HandshakeError):
        initiator.read_response(bytes(32) + reply[32:])
    with pytest.raises(HandshakeError):
        Initiator(INITIATOR_STATIC, bytes(32)).write_initiation()


def test_wrong_key_sizes_are_rejected() -> None:
    with pytest.raises(HandshakeError):
        Initiator(INITIATOR_STATIC[:31], RESPONDER_PUBLIC)
    with pytest.raises(HandshakeError):
        Initiator(INITIATOR_STATIC, RESPONDER_PUBLIC + b"\x00")
    with pytest.raises(HandshakeError):
        Initiator(INITIATOR_STATIC, RESPONDER_PUBLIC, ephemeral_private=b"")
    with pytest.raises(HandshakeError):
        Responder(b"")
    with pytest.raises(HandshakeError):
        Responder(RESPONDER_STATIC, ephemeral_private=bytes(33))


def test_initiator_calls_out_of_order() -> None:
    initiator = Initiator(INITIATOR_STATIC, RESPONDER_PUBLIC, PROLOGUE)
    with pytest.raises(HandshakeError):
        initiator.read_response(bytes(RESPONSE_OVERHEAD))
    initiation_message = initiator.write_initiation()
    with pytest.raises(HandshakeError):
        initiator.write_initiation()
    responder = Responder(RESPONDER_STATIC, PROLOGUE)
    responder.read_initiation(initiation_message, trust_all)
    reply, _ = responder.write_response()
    initiator.read_response(reply)
    with pytest.raises(HandshakeError):
        initiator.read_response(reply)
    with pytest.raises(HandshakeError):
        initiator.write_initiation()


def test_responder_calls_out_of_order() -> None:
    _, message = initiation()
    responder = Responder(RESPONDER_STATIC, PROLOGUE)
    with pytest.raises(HandshakeError):
        responder.write_response()
    responder.read_initiation(message, trust_all)
    with pytest.raises(HandshakeError):
        responder.read_initiation(message, trust_all)
    responder.write_response()
    with pytest.raises(HandshakeError):
        responder.write_response()
    with pytest.raises(HandshakeError):
        responder.read_initiation(message, trust_all)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_initiations_only_raise_handshake_error(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        Responder(RESPONDER_STATIC, PROLOGUE).read_initiation(data, trust_all)


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_random_responses_only_raise_handshake_error(data: bytes) -> None:
    initiator = Initiator(INITIATOR_STATIC, RESPONDER_PUBLIC, PROLOGUE, INITIATOR_EPHEMERAL)
    initiator.write_initiation()
    with pytest.raises(HandshakeError):
        initiator.read_response(data)
