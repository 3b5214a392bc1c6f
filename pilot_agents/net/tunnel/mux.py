"""All tunnels of one node, sans-IO: routes datagrams to sessions by receiver index and answers
handshakes from trusted peers.

Before an initiation costs a Diffie-Hellman it must pass, in this order: its size; its mac1
(``cookie.py``: one keyed hash, which drops random bytes and packets for another key); when the
node is under load, its mac2 (else the sender gets a cookie reply, unless it is a source already
out of budget); and its source's budget (``ratelimit.py``). After the Noise checks, its timestamp
must be newer than the greatest accepted from that peer, which the injected ``timestamps`` store
keeps across sessions (a node's store also survives restarts).

The mux also decides which session a handshake belongs to (docs/protocol.md, "Session
lifecycle"). Session nonces are ordered (wall-clock ns, strictly increasing): a handshake with a
smaller nonce than the greatest seen from its peer is a delayed packet of an older session and
is dropped; a greater one than the session is paired with means the peer lost its state, and a
successor session takes over, with the same nonce of ours (so the peer's fresh state, which holds
nothing of ours, does not reset in turn) and the streams the peer never saw.

The asyncio endpoint feeds it every tunnel datagram with :meth:`receive_datagram`, fires
:meth:`handle_timer` at :meth:`get_timer`, sends what :meth:`datagrams_to_send` returns and hands
:meth:`next_event` results to the node.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from ...errors import HandshakeError, NotTrustedError
from . import crypto, events, handshake, wire
from .codes import CloseCode
from .config import SessionConfig
from .cookie import COOKIE_REPLY_SIZE, CookieChecker, PeerMacs
from .paths import Address, RelayPath
from .ratelimit import LoadMeter, SourceLimiter
from .session import Session

log = logging.getLogger("pilot_agents.mux")

PROLOGUE = b"pilot-agents/1"
_CLOCK_SKEW_NS = 3600 * 10**9  # a peer's clock ahead of ours by more: its nonces don't order


@dataclass(slots=True)
class MuxStats:
    datagrams_received: int = 0
    malformed: int = 0  # too short, unknown type
    unknown_index: int = 0
    bad_handshakes: int = 0  # forged or corrupted initiations
    untrusted: int = 0  # well-formed initiations from keys we don't trust
    bad_mac1: int = 0  # handshake packets not addressed to our key (dropped before any DH)
    cookie_replies: int = 0  # initiations answered with a cookie while under load
    rate_limited: int = 0  # initiations over their source's budget (dropped before any DH)
    replayed_initiations: int = 0  # timestamp not newer than the peer's last accepted one
    wrong_relay_source: int = 0  # relayed initiations whose sender is not their Noise key
    # Genuine handshakes of an older session of the peer, delayed: not refused (not counted
    # in refused(), so never reported to the beacon), only ignored.
    stale_handshakes: int = 0
    successions: int = 0  # sessions replaced because the peer lost its state

    def refused(self) -> int:
        """Datagrams dropped for what they are or who sent them; not cookie replies, which a
        genuine initiator gets too when we are under load."""
        return (self.malformed + self.bad_handshakes + self.untrusted + self.bad_mac1
                + self.rate_limited + self.replayed_initiations + self.wrong_relay_source)


class Mux:
    def __init__(
        self,
        signing_secret: bytes,
        public_key: bytes,
        config: SessionConfig | None = None,
        *,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        random_bits: Callable[[int], int] = secrets.randbits,
        timestamps: MutableMapping[bytes, int] | None = None,
    ) -> None:
        """``signing_secret``/``public_key``: the node's Ed25519 identity; its X25519 form is
        the Noise static key. ``wall_clock_ns`` stamps initiations and session nonces.
        ``random_bits`` picks indices and cookie secrets (tests seed it). ``timestamps`` maps a
        peer's Ed25519 key to the greatest initiation timestamp accepted from it (an in-memory
        dict by default)."""
        self.public_key = public_key
        self.config = config or SessionConfig()
        self.stats = MuxStats()
        self._static_private = crypto.ed25519_sk_to_x25519(signing_secret)
        self._wall_clock_ns = wall_clock_ns
        self._random_bits = random_bits
        self._timestamps: MutableMapping[bytes, int] = {} if timestamps is None else timestamps
        self._last_stamp = 0
        self._peer_nonces: dict[bytes, int] = {}  # the greatest session nonce seen per peer
        limits = self.config.handshakes
        self._cookies = CookieChecker(
            crypto.x25519_public(self._static_private), limits.cookie_lifetime_s, self._random
        )
        self._load = LoadMeter(limits)
        self._sources = SourceLimiter(
            limits.source_rate_per_s, limits.source_burst, limits.max_sources
        )
        self._peer_macs: dict[bytes, PeerMacs] = {}  # Ed25519 node key -> our MACs to it
        self._replies: list[tuple[bytes, Address]] = []  # cookie replies, sent statelessly
        self._sessions: dict[bytes, Session] = {}
        self._by_index: dict[int, Session] = {}
        self._trusted: dict[bytes, bytes] = {}  # X25519 static -> Ed25519 node key
        self._trusted_static: dict[bytes, bytes] = {}  # Ed25519 node key -> X25519 static
        self._events: deque[events.Event] = deque()

    # -- trust and peers ---------------------------------------------------------------------

    def trust(self, peer: bytes) -> None:
        static = crypto.ed25519_pk_to_x25519(peer)
        self._trusted[static] = peer
        self._trusted_static[peer] = static

    def untrust(self, peer: bytes, now: float) -> None:
        static = self._trusted_static.pop(peer, None)
        if static is not None:
            del self._trusted[static]
        self._peer_macs.pop(peer, None)
        self._peer_nonces.pop(peer, None)
        session = self._sessions.get(peer)
        if session is not None:
            session.close(CloseCode.NOT_TRUSTED, "", now)

    def is_trusted(self, peer: bytes) -> bool:
        return peer in self._trusted_static

    def session(self, peer: bytes, now: float) -> Session:
        """The tunnel to ``peer``, created (not yet connected) if there is none."""
        session = self._sessions.get(peer)
        if session is None or session.closed:
            # A new nonce: the peer may still hold the state of our last session.
            session = self._new_session(peer, self._stamp(), now)
        return session

    def _new_session(self, peer: bytes, nonce: int, now: float) -> Session:
        static = self._trusted_static.get(peer)
        if static is None:
            raise NotTrustedError("peer is not trusted")
        session = Session(
            local_id=self.public_key,
            peer=peer,
            peer_static=static,
            static_private=self._static_private,
            prologue=PROLOGUE,
            config=self.config,
            indices=self,
            nonce=nonce,
            wall_clock_ns=self._stamp,
            now=now,
            macs=self._macs_to(peer, static),
        )
        self._sessions[peer] = session
        return session

    def _stamp(self) -> int:
        """Wall-clock ns, strictly increasing (a coarse clock must not make a retry look like
        a replay, nor two sessions share a nonce)."""
        stamp = max(self._wall_clock_ns(), self._last_stamp + 1)
        self._last_stamp = stamp
        return stamp

    def _macs_to(self, peer: bytes, static: bytes) -> PeerMacs:
        # Kept per peer, not per session: a cookie outlives a restarted session.
        macs = self._peer_macs.get(peer)
        if macs is None:
            macs = PeerMacs(static, self.config.handshakes.cookie_lifetime_s)
            self._peer_macs[peer] = macs
        return macs

    def _random(self, size: int) -> bytes:
        return self._random_bits(8 * size).to_bytes(size, "big")

    def get_session(self, peer: bytes) -> Session | None:
        return self._sessions.get(peer)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    # -- IndexAllocator ----------------------------------------------------------------------

    def allocate(self, session: Session) -> int:
        while True:
            index = self._random_bits(32)
            if index not in self._by_index:
                self._by_index[index] = session
                return index

    def release(self, index: int) -> None:
        self._by_index.pop(index, None)

    # -- driving -------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, address: Address, now: float) -> None:
        self.stats.datagrams_received += 1
        if not data:
            self.stats.malformed += 1
            return
        kind = data[0]
        if kind == wire.DATA:
            if len(data) < wire.DATA_HEADER_SIZE:
                self.stats.malformed += 1
                return
            session = self._by_index.get(wire.read_u32(data, 1))
            if session is None:
                self.stats.unknown_index += 1
                return
            session.receive_data(data, address, now)
            if session.peer_shut_down is not None:
                # The peer's node shuts down, maybe to restart: a successor waits for it with
                # the streams it never saw (and gives up as any new tunnel does).
                session = self._succeed(session, None, now)
                session.connect(now)
            # The per-packet path: only this session can have news (not every peer's).
            self._collect_events_of(session)
            return
        # A handshake: only the session it reached can have news, and its answer (or a cookie
        # reply) goes out at once. Dropped packets touch nothing: a flood of them must not cost
        # a pass over every session.
        if kind == wire.INITIATION:
            session = self._on_initiation(data, address, now)
        elif kind == wire.RESPONSE:
            session = self._on_response(data, address, now)
        elif kind == wire.COOKIE_REPLY:
            session = self._on_cookie_reply(data, now)
        else:
            self.stats.malformed += 1
            return
        if session is not None:
            self._collect_events_of(session)

    def _on_initiation(self, data: bytes, address: Address, now: float) -> Session | None:
        if len(data) != handshake.INITIATION_SIZE:
            self.stats.malformed += 1
            return None
        if not self._admit(data, address, now):
            return None
        try:
            initiation = handshake.read_initiation_untrusted(
                data, self._static_private, PROLOGUE, self._trusted.__contains__
            )
        except NotTrustedError:
            self.stats.untrusted += 1
            return None
        except HandshakeError:
            self.stats.bad_handshakes += 1
            return None
        peer = self._trusted[initiation.remote_static]
        if isinstance(address, RelayPath) and address.peer != peer:
            # Relayed by another key than the one inside: a captured initiation sent on.
            self.stats.wrong_relay_source += 1
            return None
        if initiation.timestamp_ns <= self._timestamps.get(peer, 0):
            self.stats.replayed_initiations += 1
            return None
        self._timestamps[peer] = initiation.timestamp_ns
        if self._is_stale(peer, initiation.nonce):
            self.stats.stale_handshakes += 1
            return None
        session = self._sessions.get(peer)
        if session is not None and self._peer_was_reset(session, initiation.nonce):
            session = self._succeed(session, None, now)
        else:
            session = self.session(peer, now)
        session.receive_initiation(initiation, address, now)
        return session

    def _on_response(self, data: bytes, address: Address, now: float) -> Session | None:
        if len(data) != handshake.RESPONSE_SIZE:
            self.stats.malformed += 1
            return None
        session = self._by_index.get(int.from_bytes(data[5:9], "big"))
        if session is None:
            self.stats.unknown_index += 1
            return None
        if not self._cookies.mac1_ok(data):
            self.stats.bad_mac1 += 1
            return None
        response = session.open_response(data)
        if response is None:
            return None
        # Never stale: it answers our pending initiation, and a newer session of the peer's
        # would have replaced ours (and its index) when its own handshake arrived.
        self._is_stale(session.peer, response.nonce)
        if self._peer_was_reset(session, response.nonce):
            # The answer already holds keys the peer's fresh state accepts: the successor
            # installs them, no second round trip.
            session = self._succeed(session, response.local_index, now)
            self._by_index[response.local_index] = session
        session.complete_handshake(response, address, now)
        return session

    def _on_cookie_reply(self, data: bytes, now: float) -> Session | None:
        if len(data) != COOKIE_REPLY_SIZE:
            self.stats.malformed += 1
            return None
        session = self._by_index.get(wire.read_u32(data, 1))
        if session is None:
            self.stats.unknown_index += 1
            return None
        session.receive_cookie_reply(data, now)
        return session

    def _admit(self, data: bytes, address: Address, now: float) -> bool:
        """Whether an initiation may cost a DH (the order is in the module docstring)."""
        cookies = self._cookies
        if not cookies.mac1_ok(data):
            self.stats.bad_mac1 += 1
            return False
        if self._load.under_load(now) and not cookies.mac2_ok(data, address, now):
            if self._sources.exhausted(address, now):
                self.stats.rate_limited += 1
            else:
                sender_index = wire.INITIATION_HEADER.unpack_from(data)[1]
                self._replies.append((cookies.reply(data, sender_index, address, now), address))
                self.stats.cookie_replies += 1
            return False
        if not self._sources.allow(address, now):
            self.stats.rate_limited += 1
            return False
        self._load.spend(now)
        return True

    def _is_stale(self, peer: bytes, nonce: int) -> bool:
        """A handshake of an older session of the peer's (else its nonce is now the newest).

        Only a newest nonce that reads as a time, not in the future, orders: a build before
        ordered nonces drew them at random (mostly "in the future"), and a peer's clock may run
        ahead; for those any other nonce means a reset, as it did before."""
        known = self._peer_nonces.get(peer)
        if known is not None and nonce < known <= self._wall_clock_ns() + _CLOCK_SKEW_NS:
            return True
        if known is None or nonce > known:
            self._peer_nonces[peer] = nonce
        return False

    @staticmethod
    def _peer_was_reset(session: Session, nonce: int) -> bool:
        """The peer's session nonce changed under a live session: it lost its state."""
        paired = session.remote_nonce
        return not session.closed and paired is not None and paired != nonce

    def _succeed(self, old: Session, answered_index: int | None, now: float) -> Session:
        """The successor of a session whose peer lost its state: our nonce stays (our state
        is as fresh as the peer's now), the paths and the streams the peer never saw move."""
        self.stats.successions += 1
        successor = self._new_session(old.peer, old.nonce, now)
        old.hand_over(successor.take_over(old), answered_index)
        self._collect_events_of(old)
        return successor

    def handle_timer(self, now: float) -> None:
        for session in list(self._sessions.values()):
            timer = session.get_timer()
            if timer is not None and now >= timer:
                session.handle_timer(now)
        self._collect_events()

    def get_timer(self) -> float | None:
        earliest: float | None = None
        for session in self._sessions.values():
            timer = session.get_timer()
            if timer is not None and (earliest is None or timer < earliest):
                earliest = timer
        return earliest

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out = self._replies
        self._replies = []
        closed = []
        # No copy of the sessions per flush: the closed ones go after the loop.
        for session in self._sessions.values():
            out += session.datagrams_to_send(now)
            if session.closed:
                closed.append(session)
        for session in closed:
            self._collect_events_of(session)
            if self._sessions.get(session.peer) is session:
                del self._sessions[session.peer]
        self._collect_events()
        return out

    def next_event(self) -> events.Event | None:
        return self._events.popleft() if self._events else None

    def _collect_events(self) -> None:
        for session in self._sessions.values():
            self._collect_events_of(session)

    def _collect_events_of(self, session: Session) -> None:
        event = session.next_event()
        while event is not None:
            self._events.append(event)
            event = session.next_event()
