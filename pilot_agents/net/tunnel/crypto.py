"""Thin bindings to libsodium: the AEAD, X25519, Ed25519, the BLAKE2b helpers Noise needs, and
the keyed MAC and XChaCha20-Poly1305 of the handshake cookies.

:class:`Aead` is on the path of every packet, so it calls libsodium without pysodium's per-call
wrappers and buffer allocations: through the small C module ``_aead`` where the core is compiled,
else through ctypes bound once at import. Both call the libsodium that pysodium loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import struct
import sys
from collections.abc import Callable
from typing import Final, TypeAlias

import pysodium

from pilot_agents.errors import CryptoError

KEY_SIZE: Final = 32
TAG_SIZE: Final = 16
PUBLIC_KEY_SIZE: Final = 32
ED25519_SECRET_KEY_SIZE: Final = 64
ED25519_SEED_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64

BytesLike: TypeAlias = bytes | bytearray | memoryview

if sys.implementation.name != "cpython":
    # Every output here is written by libsodium straight into a fresh bytes object passed as
    # ctypes.c_char_p; only CPython guarantees that pointer is the object's own storage.
    raise ImportError("pilot_agents.net.tunnel.crypto requires CPython")

# A handle of our own (same shared library) so the argtypes set below never change how
# pysodium's calls through its handle are converted.
_lib = ctypes.CDLL(pysodium.sodium._name)
# Without sodium_init() libsodium never selects its SIMD implementations (about 3x slower).
if _lib.sodium_init() < 0:
    raise ImportError("libsodium failed to initialise")

_ptr = ctypes.c_char_p
_len = ctypes.c_ulonglong


def _bind(name: str, argtypes: tuple[type[_ptr] | type[_len], ...]) -> Callable[..., int]:
    function = getattr(_lib, name)
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


# libsodium's AEAD signatures, the same for both ciphers.
# encrypt(c, clen_p, m, mlen, ad, adlen, nsec, npub, k)
_SEAL_ARGS = (_ptr, _ptr, _ptr, _len, _ptr, _len, _ptr, _ptr, _ptr)
# decrypt(m, mlen_p, nsec, c, clen, ad, adlen, npub, k)
_OPEN_ARGS = (_ptr, _ptr, _ptr, _ptr, _len, _ptr, _len, _ptr, _ptr)
_aead_encrypt = _bind("crypto_aead_chacha20poly1305_ietf_encrypt", _SEAL_ARGS)
_aead_decrypt = _bind("crypto_aead_chacha20poly1305_ietf_decrypt", _OPEN_ARGS)
_xaead_encrypt = _bind("crypto_aead_xchacha20poly1305_ietf_encrypt", _SEAL_ARGS)
_xaead_decrypt = _bind("crypto_aead_xchacha20poly1305_ietf_decrypt", _OPEN_ARGS)
XNONCE_SIZE: Final = 24
_scalarmult = _bind("crypto_scalarmult_curve25519", (_ptr, _ptr, _ptr))
_scalarmult_base = _bind("crypto_scalarmult_curve25519_base", (_ptr, _ptr))
_sign_keypair = _bind("crypto_sign_ed25519_keypair", (_ptr, _ptr))
_sign_seed_keypair = _bind("crypto_sign_ed25519_seed_keypair", (_ptr, _ptr, _ptr))
_sign_detached = _bind("crypto_sign_ed25519_detached", (_ptr, _ptr, _ptr, _len, _ptr))
_verify_detached = _bind("crypto_sign_ed25519_verify_detached", (_ptr, _ptr, _len, _ptr))
_pk_to_curve25519 = _bind("crypto_sign_ed25519_pk_to_curve25519", (_ptr, _ptr))
_sk_to_curve25519 = _bind("crypto_sign_ed25519_sk_to_curve25519", (_ptr, _ptr))

# Noise's ChaChaPoly nonce: 32 zero bits, then the counter as a little-endian 64-bit integer.
_pack_nonce = struct.Struct("<4xQ").pack


# The output of both is written by libsodium directly into a freshly created ``bytes`` object:
# nothing else can reference it yet, so filling it in place is safe and saves a copy.
def _ctypes_seal(key: bytes, counter: int, plaintext: bytes | bytearray, ad: bytes) -> bytes:
    plaintext = bytes(plaintext)  # ctypes passes only bytes as a pointer (a no-op for bytes)
    size = len(plaintext)
    out = bytes(size + TAG_SIZE)
    _aead_encrypt(out, None, plaintext, size, ad, len(ad), None, _ctypes_nonce(counter), key)
    return out


def _ctypes_open(
    key: bytes, counter: int, ciphertext: bytes | bytearray, ad: bytes
) -> bytes | None:
    ciphertext = bytes(ciphertext)
    size = len(ciphertext)
    if size < TAG_SIZE:
        return None
    # For an empty plaintext this is the shared b"" singleton; libsodium writes exactly
    # len(out) bytes, so it stays untouched.
    out = bytes(size - TAG_SIZE)
    nonce = _ctypes_nonce(counter)
    if _aead_decrypt(out, None, None, ciphertext, size, ad, len(ad), nonce, key) != 0:
        return None
    return out


def _ctypes_nonce(counter: int) -> bytes:
    try:
        return _pack_nonce(counter)
    except struct.error:
        raise OverflowError(f"counter {counter} is outside 0..2**64-1") from None


def _address(function: Callable[..., int]) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value or 0  # type: ignore[arg-type]


# (key, counter, text, ad); open returns None if the ciphertext does not authenticate, and both
# raise OverflowError for a counter outside 0..2**64-1.
_seal: Callable[[bytes, int, bytes | bytearray, bytes], bytes] = _ctypes_seal
_open: Callable[[bytes, int, bytes | bytearray, bytes], bytes | None] = _ctypes_open
try:
    # Compiled with the core. A ctypes call converts nine arguments and cost 9 % of a 100-byte
    # round trip, which this module's direct call saves (benchmarks/RESULTS.md).
    from pilot_agents.net.tunnel import _aead
except ImportError:  # a pure-Python install
    AEAD_BACKEND = "ctypes"
else:
    _aead.bind(_address(_aead_encrypt), _address(_aead_decrypt))
    _seal = _aead.seal
    _open = _aead.open
    AEAD_BACKEND = "C"


def _check_size(what: str, value: bytes, size: int) -> None:
    # libsodium reads a fixed number of bytes from each key pointer: a short key is an over-read.
    if len(value) != size:
        raise CryptoError(f"{what} must be {size} bytes, got {len(value)}")


class Aead:
    """ChaCha20-Poly1305 (IETF) under one fixed key, nonces built from a 64-bit counter."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        _check_size("AEAD key", key, KEY_SIZE)
        self._key = bytes(key)

    def seal(self, counter: int, plaintext: BytesLike, ad: bytes = b"") -> bytes:
        """Encrypt ``plaintext`` with nonce ``counter``; returns ciphertext followed by the tag."""
        if type(plaintext) is memoryview:
            plaintext = bytes(plaintext)
        try:
            return _seal(self._key, counter, plaintext, ad)
        except OverflowError:
            raise _bad_counter(counter) from None

    def open(self, counter: int, ciphertext: BytesLike, ad: bytes = b"") -> bytes:
        """Authenticate and decrypt; raises :class:`CryptoError` if anything was tampered with."""
        if type(ciphertext) is memoryview:
            ciphertext = bytes(ciphertext)
        if len(ciphertext) < TAG_SIZE:
            raise CryptoError(
                f"AEAD ciphertext of {len(ciphertext)} bytes is shorter than its tag"
            )
        try:
            out = _open(self._key, counter, ciphertext, ad)
        except OverflowError:
            raise _bad_counter(counter) from None
        if out is None:
            raise CryptoError("AEAD authentication failed")
        return out


def _bad_counter(counter: int) -> CryptoError:
    return CryptoError(f"AEAD counter {counter} is outside 0..2**64-1")


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key of ``private`` (libsodium clamps the scalar)."""
    _check_size("X25519 private key", private, KEY_SIZE)
    public = bytes(PUBLIC_KEY_SIZE)
    _scalarmult_base(public, private)
    return public


def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh ``(private, public)`` X25519 key pair."""
    private = random_bytes(KEY_SIZE)
    return private, x25519_public(private)


def x25519(private: bytes, public: bytes) -> bytes:
    """X25519 shared secret; :class:`CryptoError` if ``public`` is a low-order point."""
    _check_size("X25519 private key", private, KEY_SIZE)
    _check_size("X25519 public key", public, PUBLIC_KEY_SIZE)
    shared = bytes(KEY_SIZE)
    if _scalarmult(shared, private, public) != 0:
        raise CryptoError("X25519 with a low-order public key")
    return shared


def ed25519_keypair() -> tuple[bytes, bytes]:
    """A fresh ``(secret_key, public_key)``; the secret key is libsodium's 64-byte seed+public."""
    public = bytes(PUBLIC_KEY_SIZE)
    secret = bytes(ED25519_SECRET_KEY_SIZE)
    _sign_keypair(public, secret)
    return secret, public


def ed25519_seed_keypair(seed: bytes) -> tuple[bytes, bytes]:
    """The ``(secret_key, public_key)`` derived from a 32-byte seed."""
    _check_size("Ed25519 seed", seed, ED25519_SEED_SIZE)
    public = bytes(PUBLIC_KEY_SIZE)
    secret = bytes(ED25519_SECRET_KEY_SIZE)
    _sign_seed_keypair(public, secret, seed)
    return secret, public


def ed25519_sign(secret_key: bytes, message: bytes) -> bytes:
    """A detached 64-byte signature."""
    _check_size("Ed25519 secret key", secret_key, ED25519_SECRET_KEY_SIZE)
    signature = bytes(SIGNATURE_SIZE)
    _sign_detached(signature, None, message, len(message), secret_key)
    return signature


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is valid; malformed keys or signatures are just invalid."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    return _verify_detached(signature, message, len(message), public_key) == 0


def ed25519_pk_to_x25519(public_key: bytes) -> bytes:
    """The X25519 public key of an Ed25519 key; :class:`CryptoError` if it is not a valid point."""
    _check_size("Ed25519 public key", public_key, PUBLIC_KEY_SIZE)
    out = bytes(PUBLIC_KEY_SIZE)
    if _pk_to_curve25519(out, public_key) != 0:
        raise CryptoError("Ed25519 public key is not a valid curve point")
    return out


def ed25519_sk_to_x25519(secret_key: bytes) -> bytes:
    """The X25519 private key matching :func:`ed25519_pk_to_x25519` of the same key pair."""
    _check_size("Ed25519 secret key", secret_key, ED25519_SECRET_KEY_SIZE)
    out = bytes(KEY_SIZE)
    _sk_to_curve25519(out, secret_key)
    return out


def blake2b(data: bytes) -> bytes:
    """BLAKE2b-512."""
    return hashlib.blake2b(data).digest()


def keyed_mac(key: bytes, data: bytes, size: int = 16) -> bytes:
    """Keyed BLAKE2b of ``size`` bytes (key at most 64 bytes): the handshake MACs."""
    return hashlib.blake2b(data, digest_size=size, key=key).digest()


def xaead_seal(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 (IETF): ciphertext followed by the tag. The 24-byte nonce may be
    random."""
    _check_size("XChaCha20 key", key, KEY_SIZE)
    _check_size("XChaCha20 nonce", nonce, XNONCE_SIZE)
    out = bytes(len(plaintext) + TAG_SIZE)
    _xaead_encrypt(out, None, plaintext, len(plaintext), ad, len(ad), None, nonce, key)
    return out


def xaead_open(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    """The plaintext, or None if the ciphertext does not authenticate."""
    _check_size("XChaCha20 key", key, KEY_SIZE)
    _check_size("XChaCha20 nonce", nonce, XNONCE_SIZE)
    if len(ciphertext) < TAG_SIZE:
        return None
    out = bytes(len(ciphertext) - TAG_SIZE)
    if _xaead_decrypt(out, None, None, ciphertext, len(ciphertext), ad, len(ad), nonce, key):
        return None
    return out


def hmac_blake2b(key: bytes, data: bytes) -> bytes:
    """RFC 2104 HMAC over BLAKE2b-512 (block length 128), as Noise's HMAC-HASH."""
    # The constructor is faster than the "blake2b" name, which detours through OpenSSL.
    return hmac.digest(key, data, hashlib.blake2b)


def hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF: ``outputs`` 64-byte blocks (Noise uses 2 or 3; callers truncate keys)."""
    temp_key = hmac_blake2b(chaining_key, ikm)
    blocks: list[bytes] = []
    previous = b""
    for index in range(1, outputs + 1):
        previous = hmac_blake2b(temp_key, previous + bytes((index,)))
        blocks.append(previous)
    return tuple(blocks)
