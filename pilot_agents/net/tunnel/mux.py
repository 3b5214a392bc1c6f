"""All tunnels of one node, sans-IO: routes datagrams to sessions by receiver index and answers
handshakes from trusted peers.

The asyncio endpoint feeds it every tunnel datagram with :meth:`receive_datagram`, fires
:meth:`handle_timer` at :meth:`get_timer`, sends what :meth:`datagrams_to_send` returns and hands
:meth:`next_event` results to the node.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import HandshakeError, NotTrustedError
from . import crypto, events, handshake, wire
from .codes import CloseCode
from .config import SessionConfig
from .paths import Address
from .session import Session

log = logging.getLogger("pilot_agents.mux")

PROLOGUE = b"pilot-agents/1"


@dataclass(slots=True)
class MuxStats:
    datagrams_received: int = 0
    malformed: int = 0  # too short, unknown type
    unknown_index: int = 0
    bad_handshakes: int = 0  # forged or corrupted initiations
    untrusted: int = 0  # well-formed initiations from keys we don't trust


class Mux:
    def __init__(
        self,
        signing_secret: bytes,
        public_key: bytes,
        config: SessionConfig | None = None,
        *,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        random_bits: Callable[[int], int] = secrets.randbits,
    ) -> None:
        """``signing_secret``/``public_key``: the node's Ed25519 identity; its X25519 form is
        the Noise static key. ``random_bits`` picks indices and session nonces (tests seed it)."""
        self.public_key = public_key
        self.config = config or SessionConfig()
        self.stats = MuxStats()
        self._static_private = crypto.ed25519_sk_to_x25519(signing_secret)
        self._wall_clock_ns = wall_clock_ns
        self._random_bits = random_bits
        self._sessions: dict[bytes, Session] = {}
        self._by_index: dict[int, Session] = {}
        self._trusted: dict[bytes, bytes] = {}  # X25519 static -> Ed25519 node key
        self._trusted_static: dict[bytes, bytes] = {}  # Ed25519 node key -> X25519 static
        self._events: deque[events.Event] = deque()
        # What received datagrams may have made due, for output_due().
        self._touched: set[Session] = set()
        self._output_due = False

    # -- trust and peers ---------------------------------------------------------------------

    def trust(self, peer: bytes) -> None:
        static = crypto.ed25519_pk_to_x25519(peer)
        self._trusted[static] = peer
        self._trusted_static[peer] = static

    def untrust(self, peer: bytes, now: float) -> None:
        static = self._trusted_static.pop(peer, None)
        if static is not None:
            del self._trusted[static]
        session = self._sessions.get(peer)
        if session is not None:
            session.close(CloseCode.NOT_TRUSTED, "", now)

    def is_trusted(self, peer: bytes) -> bool:
        return peer in self._trusted_static

    def session(self, peer: bytes, now: float) -> Session:
        """The tunnel to ``peer``, created (not yet connected) if there is none."""
        session = self._sessions.get(peer)
        if session is None or session.closed:
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
                nonce=self._random_bits(64),
                wall_clock_ns=self._wall_clock_ns,
                now=now,
            )
            self._sessions[peer] = session
        return session

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
            session = self._by_index.get(int.from_bytes(data[1:5], "big"))
            if session is None:
                self.stats.unknown_index += 1
                return
            session.receive_data(data, address, now)
            # The per-packet path: only this session can have news (not every peer's).
            self._collect_events_of(session)
            self._touched.add(session)
            return
        self._output_due = True  # a handshake: its answer goes out at once
        if kind == wire.INITIATION:
            self._on_initiation(data, address, now)
        elif kind == wire.RESPONSE:
            if len(data) != handshake.RESPONSE_SIZE:
                self.stats.malformed += 1
                return
            session = self._by_index.get(int.from_bytes(data[5:9], "big"))
            if session is None:
                self.stats.unknown_index += 1
                return
            session.receive_response(data, address, now)
            if session.closed:
                self._replace_restarted(session, now).connect(now)
        else:
            self.stats.malformed += 1
        self._collect_events()

    def _on_initiation(self, data: bytes, address: Address, now: float) -> None:
        try:
            initiation = handshake.read_initiation_untrusted(
                data, self._static_private, PROLOGUE, self._trusted.__contains__
            )
        except NotTrustedError:
            self.stats.untrusted += 1
            return
        except HandshakeError:
            self.stats.bad_handshakes += 1
            return
        peer = self._trusted[initiation.remote_static]
        session = self.session(peer, now)
        session.receive_initiation(initiation, address, now)
        if session.closed:
            self._replace_restarted(session, now).receive_initiation(initiation, address, now)

    def _replace_restarted(self, old: Session, now: float) -> Session:
        """A session the peer abandoned by restarting; its successor starts from nothing."""
        self._collect_events_of(old)
        del self._sessions[old.peer]
        return self.session(old.peer, now)

    def output_due(self, now: float) -> bool:
        """Whether the datagrams received since the last call made something due to send now
        (an immediate ACK, data the peer's ACKs let out, a handshake answer), as against
        only a delayed ACK, which :meth:`get_timer` covers."""
        due = self._output_due or any(s.sending_due(now) for s in self._touched)
        self._output_due = False
        self._touched.clear()
        return due

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
        out: list[tuple[bytes, Address]] = []
        for session in list(self._sessions.values()):
            out += session.datagrams_to_send(now)
            if session.closed:
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
