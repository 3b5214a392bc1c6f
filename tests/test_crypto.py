from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pilot_agents.errors import CryptoError
from pilot_agents.net.tunnel import crypto
from pilot_agents.net.tunnel.crypto import Aead

KEY = bytes(range(32))


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 1 << bit
    return bytes(changed)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1200, 8192])
def test_aead_round_trip(size: int) -> None:
    aead = Aead(KEY)
    plaintext = os.urandom(size)
    sealed = aead.seal(7, plaintext, b"header")
    assert len(sealed) == size + crypto.TAG_SIZE
    assert aead.open(7, sealed, b"header") == plaintext


def test_aead_matches_an_independent_implementation() -> None:
    # OpenSSL's ChaCha20-Poly1305, with the Noise nonce (4 zero bytes, little-endian counter).
    reference = ChaCha20Poly1305(KEY)
    for counter in (0, 1, 255, 2**32 + 5, 2**64 - 1):
        nonce = bytes(4) + counter.to_bytes(8, "little")
        plaintext = os.urandom(100)
        assert Aead(KEY).seal(counter, plaintext, b"ad") == reference.encrypt(
            nonce, plaintext, b"ad"
        )


def test_aead_accepts_buffer_types() -> None:
    aead = Aead(KEY)
    sealed = aead.seal(1, b"payload")
    assert aead.seal(1, bytearray(b"payload")) == sealed
    assert aead.seal(1, memoryview(b"xpayload")[1:]) == sealed
    assert aead.open(1, bytearray(sealed)) == b"payload"
    assert aead.open(1, memoryview(b"x" + sealed)[1:]) == b"payload"


def test_aead_output_objects_are_independent() -> None:
    aead = Aead(KEY)
    first = aead.seal(0, b"same")
    second = aead.seal(0, b"same")
    assert first == second
    assert first is not second
    assert aead.open(0, first) == aead.open(0, second) == b"same"


def test_aead_rejects_tampering() -> None:
    aead = Aead(KEY)
    sealed = aead.seal(3, b"attack at dawn", b"ad")
    for index in range(len(sealed)):  # ciphertext bytes, then the tag
        with pytest.raises(CryptoError):
            aead.open(3, flip(sealed, index, index % 8), b"ad")
    with pytest.raises(CryptoError):
        aead.open(3, sealed, b"ae")
    with pytest.raises(CryptoError):
        aead.open(3, sealed, b"")
    with pytest.raises(CryptoError):
        aead.open(4, sealed, b"ad")
    with pytest.raises(CryptoError):
        Aead(bytes(32)).open(3, sealed, b"ad")


@pytest.mark.parametrize("size", range(crypto.TAG_SIZE))
def test_aead_rejects_short_input(size: int) -> None:
    with pytest.raises(CryptoError):
        Aead(KEY).open(0, bytes(size))


def test_aead_rejects_bad_key_and_counter() -> None:
    with pytest.raises(CryptoError):
        Aead(bytes(31))
    aead = Aead(KEY)
    for counter in (-1, 2**64):
        with pytest.raises(CryptoError):
            aead.seal(counter, b"")
        with pytest.raises(CryptoError):
            aead.open(counter, bytes(16))


AEAD_BACKENDS = [pytest.param((crypto._ctypes_seal, crypto._ctypes_open), id="ctypes"),
                 pytest.param((crypto._seal, crypto._open), id=crypto.AEAD_BACKEND)]


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1200, 65535])
def test_aead_backends_agree(size: int) -> None:
    """The C module (where built) and the ctypes fallback give the same bytes, either way."""
    counter, plaintext, ad = size * 7919, os.urandom(size), os.urandom(size % 40)
    sealed = crypto._ctypes_seal(KEY, counter, plaintext, ad)
    assert crypto._seal(KEY, counter, plaintext, ad) == sealed
    assert crypto._seal(KEY, counter, bytearray(plaintext), ad) == sealed
    for text in (sealed, bytearray(sealed)):
        assert crypto._open(KEY, counter, text, ad) == plaintext
        assert crypto._ctypes_open(KEY, counter, text, ad) == plaintext


@pytest.mark.parametrize("backend", AEAD_BACKENDS)
def test_aead_backends_reject_forgeries_and_bad_counters(
        backend: tuple[Callable[..., bytes], Callable[..., bytes | None]]) -> None:
    seal, open_ = backend
    sealed = seal(KEY, 0, b"attack at dawn", b"ad")
    assert open_(KEY, 0, flip(sealed, 3), b"ad") is None
    assert open_(KEY, 0, flip(sealed, len(sealed) - 1), b"ad") is None
    assert open_(KEY, 0, sealed, b"ae") is None
    assert open_(KEY, 1, sealed, b"ad") is None
    assert open_(KEY, 0, sealed[:15], b"ad") is None  # shorter than a tag
    for counter in (-1, 2**64):
        with pytest.raises(OverflowError):
            seal(KEY, counter, b"", b"")
        with pytest.raises(OverflowError):
            open_(KEY, counter, sealed, b"ad")


def test_aead_c_module_checks_its_arguments() -> None:
    aead = pytest.importorskip("pilot_agents.net.tunnel._aead", reason="a pure-Python install")
    with pytest.raises(ValueError):
        aead.seal(KEY[:31], 0, b"x", b"")  # libsodium would read past the key's end
    with pytest.raises(TypeError):
        aead.seal(KEY, 0, memoryview(b"x"), b"")
    with pytest.raises(TypeError):
        aead.open(KEY, 0, bytes(32), bytearray())
    with pytest.raises(TypeError):
        aead.seal(KEY, 0.0, b"x", b"")
    with pytest.raises(TypeError):
        aead.seal(KEY, 0, b"x")


def test_x25519_agreement() -> None:
    a_private, a_public = crypto.x25519_keypair()
    b_private, b_public = crypto.x25519_keypair()
    assert len(a_private) == len(a_public) == crypto.PUBLIC_KEY_SIZE
    assert crypto.x25519_public(a_private) == a_public
    shared = crypto.x25519(a_private, b_public)
    assert shared == crypto.x25519(b_private, a_public)
    assert len(shared) == crypto.KEY_SIZE


def test_x25519_rfc7748_vector() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert crypto.x25519_public(alice) == bytes.fromhex(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert crypto.x25519(alice, bob_public) == bytes.fromhex(
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )


@pytest.mark.parametrize(
    "low_order",
    [
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
)
def test_x25519_rejects_low_order_points(low_order: bytes) -> None:
    private, _ = crypto.x25519_keypair()
    with pytest.raises(CryptoError):
        crypto.x25519(private, low_order)


def test_x25519_rejects_wrong_sizes() -> None:
    private, public = crypto.x25519_keypair()
    with pytest.raises(CryptoError):
        crypto.x25519(private[:31], public)
    with pytest.raises(CryptoError):
        crypto.x25519(private, public + b"\x00")
    with pytest.raises(CryptoError):
        crypto.x25519_public(b"")


def test_ed25519_sign_verify() -> None:
    secret, public = crypto.ed25519_keypair()
    assert len(secret) == 64
    assert len(public) == 32
    signature = crypto.ed25519_sign(secret, b"message")
    assert len(signature) == 64
    assert crypto.ed25519_verify(public, b"message", signature)
    assert not crypto.ed25519_verify(public, b"messagf", signature)
    assert not crypto.ed25519_verify(public, b"message", flip(signature, 10))
    _, other_public = crypto.ed25519_keypair()
    assert not crypto.ed25519_verify(other_public, b"message", signature)


def test_ed25519_verify_never_raises() -> None:
    secret, public = crypto.ed25519_keypair()
    signature = crypto.ed25519_sign(secret, b"m")
    for bad_key in (b"", public[:31], public + b"\x00", bytes(32), b"\xff" * 32):
        assert not crypto.ed25519_verify(bad_key, b"m", signature)
    for bad_signature in (b"", signature[:63], signature + b"\x00", bytes(64), b"\xff" * 64):
        assert not crypto.ed25519_verify(public, b"m", bad_signature)


def test_ed25519_seed_keypair_rfc8032_vector() -> None:
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    secret, public = crypto.ed25519_seed_keypair(seed)
    assert public == bytes.fromhex(
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    )
    assert secret == seed + public
    assert crypto.ed25519_sign(secret, b"") == bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    with pytest.raises(CryptoError):
        crypto.ed25519_seed_keypair(seed[:31])


def test_ed25519_to_x25519_conversion_agrees() -> None:
    secret_a, public_a = crypto.ed25519_keypair()
    secret_b, public_b = crypto.ed25519_keypair()
    x_secret_a = crypto.ed25519_sk_to_x25519(secret_a)
    x_public_a = crypto.ed25519_pk_to_x25519(public_a)
    assert crypto.x25519_public(x_secret_a) == x_public_a
    assert crypto.x25519(x_secret_a, crypto.ed25519_pk_to_x25519(public_b)) == crypto.x25519(
        crypto.ed25519_sk_to_x25519(secret_b), x_public_a
    )


def test_ed25519_pk_to_x25519_rejects_invalid_points() -> None:
    # The identity point (small order) and a y-coordinate with no x on the curve.
    for bad in ((1).to_bytes(32, "little"), (2).to_bytes(32, "little"), b"\x00" * 31):
        with pytest.raises(CryptoError):
            crypto.ed25519_pk_to_x25519(bad)


def test_blake2b_and_hmac() -> None:
    assert crypto.blake2b(b"abc") == hashlib.blake2b(b"abc").digest()
    key = os.urandom(64)
    assert crypto.hmac_blake2b(key, b"data") == hmac.new(key, b"data", "blake2b").digest()


def _reference_hmac(key: bytes, data: bytes) -> bytes:
    # RFC 2104 spelled out, so the check does not share code with the module under test.
    block = 128
    key = key.ljust(block, b"\x00")
    inner = hashlib.blake2b(bytes(k ^ 0x36 for k in key) + data).digest()
    return hashlib.blake2b(bytes(k ^ 0x5C for k in key) + inner).digest()


def test_hkdf_matches_the_noise_definition() -> None:
    chaining_key = bytes(range(64))
    ikm = b"input key material"
    temp = _reference_hmac(chaining_key, ikm)
    out1 = _reference_hmac(temp, b"\x01")
    out2 = _reference_hmac(temp, out1 + b"\x02")
    out3 = _reference_hmac(temp, out2 + b"\x03")
    assert crypto.hkdf(chaining_key, ikm, 2) == (out1, out2)
    assert crypto.hkdf(chaining_key, ikm, 3) == (out1, out2, out3)
    assert crypto.hkdf(chaining_key, b"", 2)[0] == _reference_hmac(
        _reference_hmac(chaining_key, b""), b"\x01"
    )


def test_random_bytes() -> None:
    assert len(crypto.random_bytes(32)) == 32
    assert crypto.random_bytes(32) != crypto.random_bytes(32)
