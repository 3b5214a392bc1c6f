"""Noise_IK_25519_ChaChaPoly_BLAKE2b handshake (Noise spec rev 34), sans-IO.

IK::

    <- s
    ...
    -> e, es, s, ss
    <- e, ee, se

The initiator knows the responder's static key in advance; the responder learns the initiator's
from the first message and decides whether to trust it before spending a second DH on it.

A failed read (forged, truncated, untrusted) leaves the handshake object exactly as it was, so a
transport can drop the offending datagram and keep waiting for a genuine one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from pilot_agents.errors import CryptoError, HandshakeError, NotTrustedError
from pilot_agents.net.tunnel.crypto import (
    KEY_SIZE,
    PUBLIC_KEY_SIZE,
    TAG_SIZE,
    Aead,
    BytesLike,
    blake2b,
    hkdf,
    random_bytes,
    x25519,
    x25519_public,
)

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2b"
HASH_SIZE = 64

INITIATION_OVERHEAD = PUBLIC_KEY_SIZE + (PUBLIC_KEY_SIZE + TAG_SIZE) + TAG_SIZE
RESPONSE_OVERHEAD = PUBLIC_KEY_SIZE + TAG_SIZE
# Where the encrypted static key ends and the encrypted payload begins in an initiation.
_STATIC_END = PUBLIC_KEY_SIZE + PUBLIC_KEY_SIZE + TAG_SIZE


@dataclass(frozen=True, slots=True)
class TransportKeys:
    """The two ChaChaPoly keys from Split() and the final handshake hash (channel binding)."""

    initiator_to_responder: bytes
    responder_to_initiator: bytes
    handshake_hash: bytes


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return x25519(private, public)
    except CryptoError as exc:
        raise HandshakeError(f"Noise handshake: {exc}") from None


@functools.lru_cache(maxsize=8)
def _static_public(private: bytes) -> bytes:
    # The node builds a Responder per incoming initiation, and a base multiplication costs as
    # much as a DH: without the cache a rejected initiation would cost two, not one.
    return x25519_public(private)


def _require_key(what: str, key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise HandshakeError(f"{what} must be {KEY_SIZE} bytes, got {len(key)}")


class _SymmetricState:
    """SymmetricState with its CipherState folded in: handshake keys never leave it."""

    __slots__ = ("_aead", "_ck", "_h", "_n")

    def __init__(self, ck: bytes, h: bytes, aead: Aead | None = None, n: int = 0) -> None:
        self._ck = ck
        self._h = h
        self._aead = aead
        self._n = n

    @classmethod
    def start(cls, prologue: bytes, responder_static: bytes) -> _SymmetricState:
        """InitializeSymmetric, MixHash(prologue), then the ``<- s`` pre-message."""
        # A name no longer than HASHLEN is used directly, zero-padded, instead of hashed.
        h = PROTOCOL_NAME.ljust(HASH_SIZE, b"\x00")
        state = cls(h, h)
        state.mix_hash(prologue)
        state.mix_hash(responder_static)
        return state

    def copy(self) -> _SymmetricState:
        return _SymmetricState(self._ck, self._h, self._aead, self._n)

    def mix_hash(self, data: bytes) -> None:
        self._h = blake2b(self._h + data)

    def mix_key(self, input_key_material: bytes) -> None:
        self._ck, temp_key = hkdf(self._ck, input_key_material, 2)
        self._aead = Aead(temp_key[:KEY_SIZE])
        self._n = 0

    def _cipher(self) -> Aead:
        # IK performs a DH (MixKey) before its first encrypted token, so a key always exists.
        assert self._aead is not None
        return self._aead

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self._cipher().seal(self._n, plaintext, self._h)
        self._n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            plaintext = self._cipher().open(self._n, ciphertext, self._h)
        except CryptoError:
            raise HandshakeError("Noise handshake message failed authentication") from None
        self._n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> TransportKeys:
        first, second = hkdf(self._ck, b"", 2)
        return TransportKeys(first[:KEY_SIZE], second[:KEY_SIZE], self._h)


def _expect_step(actual: int, expected: int, call: str) -> None:
    if actual != expected:
        raise HandshakeError(f"Noise handshake: {call}() called out of order")


class Initiator:
    """The side that knows the responder's static key and sends the first message."""

    __slots__ = ("_e", "_rs", "_s", "_s_public", "_state", "_step")

    def __init__(
        self,
        static_private: bytes,
        remote_static_public: bytes,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
    ) -> None:
        _require_key("static private key", static_private)
        _require_key("remote static public key", remote_static_public)
        if ephemeral_private is None:
            ephemeral_private = random_bytes(KEY_SIZE)
        _require_key("ephemeral private key", ephemeral_private)
        self._s = static_private
        self._s_public = _static_public(static_private)
        self._rs = remote_static_public
        self._e = ephemeral_private
        self._state = _SymmetricState.start(prologue, remote_static_public)
        self._step = 0

    def write_initiation(self, payload: bytes = b"") -> bytes:
        """``-> e, es, s, ss`` followed by the encrypted ``payload``."""
        _expect_step(self._step, 0, "write_initiation")
        state = self._state.copy()
        e_public = x25519_public(self._e)
        state.mix_hash(e_public)
        state.mix_key(_dh(self._e, self._rs))
        encrypted_static = state.encrypt_and_hash(self._s_public)
        state.mix_key(_dh(self._s, self._rs))
        message = e_public + encrypted_static + state.encrypt_and_hash(payload)
        self._state = state
        self._step = 1
        return message

    def read_response(self, message: BytesLike) -> tuple[bytes, TransportKeys]:
        """``<- e, ee, se``; returns the responder's payload and the transport keys."""
        _expect_step(self._step, 1, "read_response")
        message = bytes(message)
        if len(message) < RESPONSE_OVERHEAD:
            raise HandshakeError(f"Noise response of {len(message)} bytes is too short")
        state = self._state.copy()
        re = message[:PUBLIC_KEY_SIZE]
        state.mix_hash(re)
        state.mix_key(_dh(self._e, re))
        state.mix_key(_dh(self._s, re))
        payload = state.decrypt_and_hash(message[PUBLIC_KEY_SIZE:])
        self._step = 2
        return payload, state.split()


class Responder:
    """The side whose static key the initiator already knows; it answers the first message.

    Until an initiation is accepted the same object can keep reading candidates: a rejected one
    changes nothing.
    """

    __slots__ = ("_e", "_initial", "_re", "_rs", "_s", "_state", "_step")

    def __init__(
        self,
        static_private: bytes,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
    ) -> None:
        _require_key("static private key", static_private)
        if ephemeral_private is None:
            ephemeral_private = random_bytes(KEY_SIZE)
        _require_key("ephemeral private key", ephemeral_private)
        self._s = static_private
        self._e = ephemeral_private
        self._initial = _SymmetricState.start(prologue, _static_public(static_private))
        self._state = self._initial
        self._re = b""
        self._rs = b""
        self._step = 0

    def read_initiation(
        self, message: BytesLike, is_trusted: Callable[[bytes], bool]
    ) -> tuple[bytes, bytes]:
        """``-> e, es, s, ss``; returns ``(initiator static public key, payload)``.

        ``is_trusted`` sees the initiator's static key as soon as it is decrypted, before the
        ``ss`` DH: an untrusted or forged initiation costs one DH and leaves no state behind.
        """
        _expect_step(self._step, 0, "read_initiation")
        message = bytes(message)
        if len(message) < INITIATION_OVERHEAD:
            raise HandshakeError(f"Noise initiation of {len(message)} bytes is too short")
        state = self._initial.copy()
        re = message[:PUBLIC_KEY_SIZE]
        state.mix_hash(re)
        state.mix_key(_dh(self._s, re))
        rs = state.decrypt_and_hash(message[PUBLIC_KEY_SIZE:_STATIC_END])
        if not is_trusted(rs):
            raise NotTrustedError(f"initiator static key {rs.hex()} is not trusted")
        state.mix_key(_dh(self._s, rs))
        payload = state.decrypt_and_hash(message[_STATIC_END:])
        self._state = state
        self._re = re
        self._rs = rs
        self._step = 1
        return rs, payload

    def write_response(self, payload: bytes = b"") -> tuple[bytes, TransportKeys]:
        """``<- e, ee, se`` followed by the encrypted ``payload``; returns it and the keys."""
        _expect_step(self._step, 1, "write_response")
        state = self._state.copy()
        e_public = x25519_public(self._e)
        state.mix_hash(e_public)
        state.mix_key(_dh(self._e, self._re))
        state.mix_key(_dh(self._e, self._rs))
        message = e_public + state.encrypt_and_hash(payload)
        self._step = 2
        return message, state.split()
