"""Cookie MACs around the handshake messages, after WireGuard (paper §5.4, "Cookie MACs").

Every INITIATION and RESPONSE ends in ``mac1 (16) · mac2 (16)``:

- ``mac1 = MAC(HASH("mac1----" · receiver's static public key), packet up to mac1)``. Anyone who
  knows whom they address can write it, so it proves nothing about the sender; it lets the
  receiver drop anything not meant for it (random bytes, a packet for another key) at the cost of
  one keyed BLAKE2b, before any Diffie-Hellman.
- ``mac2 = MAC(cookie, packet up to mac2)``, or zeros without a cookie. A responder under load
  (``ratelimit.py``) processes only initiations whose mac2 is valid, and answers the others with
  a COOKIE_REPLY: ``type · receiver index (4) · nonce (24) · XChaCha20-Poly1305(cookie)``, with
  the initiation's mac1 as associated data and the key ``HASH("cookie--" · responder's static
  public key)``. The cookie is ``MAC(secret, source address)``: only who receives at that address
  learns it, so a valid mac2 proves the source is not spoofed, and per-source limits then hold.

The responder keeps no state per initiator: just a random secret, replaced every
``cookie_lifetime_s`` (cookies of the previous secret stay valid, so one lasts at least that
long). MAC is keyed BLAKE2b-128 and HASH BLAKE2b-256 (WireGuard uses BLAKE2s; we follow Noise's
BLAKE2b here). A cookie reply is 61 bytes, smaller than the 149-byte initiation it answers: no
amplification.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Final

from . import wire
from .crypto import TAG_SIZE, XNONCE_SIZE, keyed_mac, xaead_open, xaead_seal
from .paths import Address, RelayPath

MAC_SIZE: Final = 16
MACS_SIZE: Final = 2 * MAC_SIZE
COOKIE_SIZE: Final = 16
_SECRET_SIZE: Final = 32
_NO_MAC: Final = bytes(MAC_SIZE)
_REPLY_HEAD: Final[int] = wire.COOKIE_REPLY_HEADER.size
COOKIE_REPLY_SIZE: Final[int] = _REPLY_HEAD + XNONCE_SIZE + COOKIE_SIZE + TAG_SIZE


def _derive(label: bytes, static_public: bytes) -> bytes:
    return hashlib.blake2b(label + static_public, digest_size=32).digest()


def _mac1_state(static_public: bytes) -> hashlib.blake2b:
    """A BLAKE2b state that has absorbed the mac1 key: copying it costs half of keying a new
    one, and mac1 is checked on every handshake packet of a flood."""
    return hashlib.blake2b(key=_derive(b"mac1----", static_public), digest_size=MAC_SIZE)


def _mac1(state: hashlib.blake2b, data: bytes) -> bytes:
    mac = state.copy()
    mac.update(data)
    return mac.digest()


def source_bytes(address: Address) -> bytes:
    """What a cookie is bound to: the sender's address, or for a relayed packet the key the
    beacon names as its sender."""
    if isinstance(address, RelayPath):
        return b"relay " + address.peer
    host, port = address
    return f"{host} {port}".encode()


class CookieChecker:
    """The receiving side: checks the MACs of handshake messages addressed to our static key and
    writes cookie replies."""

    __slots__ = ("_cookie_key", "_epoch", "_lifetime", "_mac1", "_previous", "_random_bytes",
                 "_secret")

    def __init__(
        self, static_public: bytes, lifetime: float, random_bytes: Callable[[int], bytes]
    ) -> None:
        self._mac1 = _mac1_state(static_public)
        self._cookie_key = _derive(b"cookie--", static_public)
        self._lifetime = lifetime
        self._random_bytes = random_bytes
        self._epoch = -2  # the secrets are drawn when first needed
        self._secret = b""
        self._previous = b""

    def mac1_ok(self, packet: bytes) -> bool:
        end = len(packet) - MACS_SIZE
        if end < 0:
            return False
        return hmac.compare_digest(_mac1(self._mac1, packet[:end]), packet[end : end + MAC_SIZE])

    def mac2_ok(self, packet: bytes, source: Address, now: float) -> bool:
        end = len(packet) - MAC_SIZE
        mac2 = packet[end:]
        if mac2 == _NO_MAC:
            return False
        self._rotate(now)
        body = packet[:end]
        where = source_bytes(source)
        for secret in (self._secret, self._previous):
            if secret and hmac.compare_digest(keyed_mac(keyed_mac(secret, where), body), mac2):
                return True
        return False

    def reply(self, packet: bytes, receiver_index: int, source: Address, now: float) -> bytes:
        """The COOKIE_REPLY to an initiation we will not process without a valid mac2."""
        self._rotate(now)
        cookie = keyed_mac(self._secret, source_bytes(source))
        nonce = self._random_bytes(XNONCE_SIZE)
        mac1 = packet[-MACS_SIZE:-MAC_SIZE]
        head = wire.COOKIE_REPLY_HEADER.pack(wire.COOKIE_REPLY, receiver_index)
        return head + nonce + xaead_seal(self._cookie_key, nonce, cookie, mac1)

    def _rotate(self, now: float) -> None:
        # Epochs of the clock rather than a timer: a cookie from epoch e is accepted through
        # epoch e + 1, so for at least one lifetime and at most two.
        epoch = int(now // self._lifetime)
        if epoch == self._epoch:
            return
        self._previous = self._secret if epoch == self._epoch + 1 else b""
        self._secret = self._random_bytes(_SECRET_SIZE)
        self._epoch = epoch


class PeerMacs:
    """The sending side towards one peer: writes the MACs of our handshake messages to it and
    keeps the cookie it gave us."""

    __slots__ = ("_cookie", "_cookie_expires", "_cookie_key", "_last_had_cookie", "_last_mac1",
                 "_lifetime", "_mac1")

    def __init__(self, peer_static: bytes, lifetime: float) -> None:
        self._mac1 = _mac1_state(peer_static)
        self._cookie_key = _derive(b"cookie--", peer_static)
        self._lifetime = lifetime
        self._cookie = b""
        self._cookie_expires = float("-inf")
        self._last_mac1 = b""  # of our newest initiation: a cookie reply authenticates it
        self._last_had_cookie = False

    def seal_initiation(self, message: bytes, now: float) -> bytes:
        mac1 = _mac1(self._mac1, message)
        body = message + mac1
        self._last_mac1 = mac1
        self._last_had_cookie = now < self._cookie_expires
        if self._last_had_cookie:
            return body + keyed_mac(self._cookie, body)
        return body + _NO_MAC

    def seal_response(self, message: bytes) -> bytes:
        """A response carries mac1 only: nobody asks for a cookie on one (the initiator reads
        only a response to an initiation of its own, by its random index)."""
        return message + _mac1(self._mac1, message) + _NO_MAC

    def consume_cookie_reply(self, data: bytes, now: float) -> bool:
        """Keep the cookie of a COOKIE_REPLY to our newest initiation. True if that initiation
        carried no cookie, so a new one, with a mac2, is worth sending at once; at most once per
        initiation, so forged replies cannot make us loop."""
        if not self._last_mac1 or len(data) != COOKIE_REPLY_SIZE:
            return False
        nonce = data[_REPLY_HEAD : _REPLY_HEAD + XNONCE_SIZE]
        cookie = xaead_open(
            self._cookie_key, nonce, data[_REPLY_HEAD + XNONCE_SIZE :], self._last_mac1
        )
        if cookie is None:
            return False
        self._cookie = cookie
        self._cookie_expires = now + self._lifetime
        self._last_mac1 = b""
        return not self._last_had_cookie
