"""A node's side of the beacon protocol, sans-IO: registration, resolution, introductions, relay.

Driven like :class:`~pilot_agents.net.tunnel.mux.Mux`: feed every datagram that came from one of
:attr:`BeaconClient.addresses` to :meth:`receive_datagram`, call :meth:`handle_timer` at
:meth:`get_timer`, send what :meth:`datagrams_to_send` returns (each with its destination: the
beacon, or its second STUN port), and act on :meth:`next_event`. ``now`` is any monotonic clock in
seconds; wall-clock time (for signed timestamps) comes from ``wall_clock_ns``.

What the client trusts: a reply counts only if it is signed by the beacon's key (given, or pinned
on the first signed REGISTERED: trust on first use) for our own key, and answers something we
asked (an echoed timestamp or request id). Pushed introductions must be fresh. Anything else is
counted in :attr:`BeaconClient.stats` and dropped; nothing a peer sends raises into the caller.

NAT classification: REGISTERED tells us our reflexive endpoint as seen by the beacon's main port.
If it is one of our own endpoints there is no NAT ("open"). Otherwise, if the beacon advertises a
second port, we send a STUN Binding request there from the same socket: the same mapped endpoint
means the NAT maps independently of the destination ("cone": punching works), a different one
means a mapping per destination ("symmetric"). One beacon address can't tell the two apart, which
is why the second port exists.

Keepalives: between registrations a KEEPALIVE goes to the beacon every ``keepalive_interval``
(MAC'd with a key derived from our key and the beacon's, see :mod:`beacon_wire`). It holds the
NAT mapping open, and its answer says where the beacon saw it come from: when that is not our
reflexive address any more (the NAT rebound or forgot us), we register again at once, and the
Registered event that follows names the previous address, so the node can have the beacon
introduce it again to every peer it has a tunnel with. ``keepalive_misses`` unanswered
keepalives in a row (the beacon restarted and forgot us, or our mapping broke) also send a
REGISTER at once rather than at the next refresh. After one unanswered keepalive the next goes
after ``request_timeout`` rather than a whole interval, so that :attr:`BeaconClient.last_heard`
tells a dead beacon from a lost datagram within two intervals (the fleet's fail-over,
:mod:`fleet`).

A *guest* client (``guest=True``) attaches to a beacon of the fleet other than our home with
GUEST instead of REGISTER: no name, nothing in the shared store, only so that beacon can
introduce us to its nodes and relay between us.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ...errors import BeaconError, ConfigError, NameTakenError, WireError
from ..tunnel import crypto
from . import beacon_wire as bw
from . import stun
from .beacon_wire import Address, NatType, Status, canonical_name

log = logging.getLogger("pilot_agents.beacon_client")

PERMANENT_REFUSALS = frozenset(
    {Status.NAME_TAKEN, Status.BAD_NAME, Status.BAD_SIGNATURE, Status.NAME_LIMIT}
)


@dataclass
class BeaconClientConfig:
    refresh_interval: float = 25.0  # seconds between REGISTERs; also holds the NAT mapping open
    # seconds between KEEPALIVEs while registered (0: none): how soon we notice that our NAT
    # mapping changed. 44 + 57 bytes of UDP payload a round, ~31 bytes/s with IPv4 headers at 5 s.
    keepalive_interval: float = 5.0
    keepalive_misses: int = 2  # unanswered KEEPALIVEs in a row before registering again
    register_retry: float = 1.0  # seconds before resending an unanswered REGISTER; doubles
    register_retry_max: float = 16.0  # seconds, cap of that doubling
    unreachable_after: int = 3  # unanswered REGISTERs in a row before BeaconUnreachable
    request_timeout: float = 1.0  # seconds per try of a RESOLVE or INTRODUCE
    request_tries: int = 3  # tries before the request fails with "timeout"
    stun_timeout: float = 0.5  # seconds per try of the classification STUN request
    stun_tries: int = 3
    classify_nat: bool = True  # find our NAT type ourselves (set_nat_type turns it off)
    introduction_max_age: float = 120.0  # seconds; older pushed introductions are replays
    # When the node reports refused relayed handshakes (report_invalid_relayed): after this many
    # from one key within block_relay_window seconds, ask the beacon to stop relaying that key
    # to us for block_relay_duration seconds. At most max_block_tracked keys are counted at once.
    block_relay_after: int = 20
    block_relay_window: float = 10.0
    block_relay_duration: float = 600.0
    max_block_tracked: int = 1024


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BeaconEvent:
    pass


@dataclass(frozen=True, slots=True)
class Registered(BeaconEvent):
    """First registration, or one after a failure, or our reflexive endpoint changed.

    Quiet refreshes that change nothing produce no event."""

    reflexive: Address
    expires: float  # on the caller's clock: the registration lapses then without a refresh
    previous: Address | None = None  # the reflexive address before; None at the first one


@dataclass(frozen=True, slots=True)
class RegistrationFailed(BeaconEvent):
    reason: str
    code: Status
    permanent: bool  # the client stopped registering: change the name (or key) and start anew

    def to_error(self) -> BeaconError:
        if self.code == Status.NAME_TAKEN:
            return NameTakenError(self.reason)
        return BeaconError(f"beacon refused the registration: {self.reason}")


@dataclass(frozen=True, slots=True)
class BeaconUnreachable(BeaconEvent):
    reason: str


@dataclass(frozen=True, slots=True)
class NatClassified(BeaconEvent):
    nat_type: str  # unknown, open, cone, symmetric


@dataclass(frozen=True, slots=True)
class Resolved(BeaconEvent):
    request_id: int
    node_key: bytes
    hostname: str | None
    candidates: tuple[Address, ...]  # reflexive first, then LAN
    nat_type: str
    home: Address | None = None  # the beacon of the fleet it is registered at, if not ours


@dataclass(frozen=True, slots=True)
class ResolveFailed(BeaconEvent):
    request_id: int
    reason: str
    code: Status | None  # None: no answer (timeout)


@dataclass(frozen=True, slots=True)
class Introduction(BeaconEvent):
    """Start punching towards ``candidates`` now: the peer got the same message about us."""

    peer_key: bytes
    candidates: tuple[Address, ...]  # reflexive first, then LAN
    nat_type: str
    request_id: int  # ours when we asked; 0 when the peer asked for us


@dataclass(frozen=True, slots=True)
class IntroductionFailed(BeaconEvent):
    request_id: int
    peer_key: bytes
    reason: str
    code: Status | None  # None: no answer (timeout)
    home: Address | None = None  # with ELSEWHERE: the beacon of the fleet the peer is at


@dataclass(frozen=True, slots=True)
class Relayed(BeaconEvent):
    source_key: bytes  # as the beacon claims it; the tunnel authenticates the packet itself
    packet: bytes


@dataclass(slots=True)
class BeaconClientStats:
    malformed: int = 0
    bad_signature: int = 0  # bad signatures and replies signed by another beacon key
    unexpected: int = 0  # well-formed replies to nothing we asked, or stale pushes
    refused: int = 0
    relayed_received: int = 0


class _State(Enum):
    IDLE = "idle"
    REGISTERING = "registering"
    REGISTERED = "registered"
    FAILED = "failed"  # refused for good


@dataclass(slots=True)
class _Request:
    message: bytes
    peer_key: bytes | None  # introductions only
    deadline: float
    tries_left: int
    sent: bool
    refusal: Status | None = None  # what an (unsigned) REFUSED said about it


def _check_candidate(candidate: Address) -> Address:
    host, port = candidate
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        raise ConfigError(f"candidate {host!r} is not an IP address") from None
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"candidate port {port!r} is not in 1..65535")
    return str(ip), port


class BeaconClient:
    def __init__(
        self,
        identity_secret: bytes,
        identity_public: bytes,
        hostname: str | None,
        beacon: Address,
        *,
        beacon_key: bytes | None = None,
        config: BeaconClientConfig | None = None,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        guest: bool = False,
    ) -> None:
        """``beacon`` must be an IP literal and port (the driver resolves names), since
        :attr:`addresses` is matched against datagram source addresses. ``beacon_key`` pins the
        beacon's Ed25519 key; without it the first signed REGISTERED pins it. ``guest``: attach
        with GUEST (``hostname`` must be None), at a beacon of the fleet other than our home."""
        if guest and hostname is not None:
            raise ConfigError("a guest registration claims no name")
        if hostname is not None:
            hostname = hostname.lower()
            if not bw.valid_hostname(hostname):
                raise ConfigError(f"{hostname!r}: {bw.STATUS_REASONS[Status.BAD_NAME]}")
        if beacon_key is not None and len(beacon_key) != bw.KEY_SIZE:
            raise ConfigError("the beacon key must be 32 bytes")
        self.secret = identity_secret
        self.public_key = identity_public
        self.hostname = hostname
        self.guest = guest
        self.beacon = _check_candidate(beacon)
        # When an authenticated answer last came (the fleet fails over on silence).
        self.last_heard = -math.inf
        self.config = config or BeaconClientConfig()
        self.stats = BeaconClientStats()
        self._beacon_key = beacon_key
        # A key other than the pinned one that signed a REGISTERED for us (its signature checks
        # out with that key): the beacon's key changed, or someone else answers for it.
        self.rejected_key: bytes | None = None
        self._wall_clock_ns = wall_clock_ns
        self._random_bytes = random_bytes
        self._events: deque[BeaconEvent] = deque()
        self._out: list[tuple[bytes, Address]] = []
        self._candidates: tuple[Address, ...] = ()
        self._nat_type = NatType.UNKNOWN
        self._nat_manual = False
        # registration
        self._state = _State.IDLE
        self._outstanding: set[int] = set()  # timestamps of unanswered REGISTERs
        self._last_timestamp = 0
        self._last_register_sent = float("-inf")
        self._register_at: float | None = None  # when the next REGISTER goes out
        self._unanswered = 0
        self._unreachable_reported = False
        self._last_failure = "no answer from the beacon"
        self._expires: float | None = None
        self.reflexive: Address | None = None
        self.alt_port = 0
        # keepalives
        self._keepalive_key: bytes | None = None  # derived once the beacon's key is known
        self._keepalive_at: float | None = None
        self._keepalives_out: deque[int] = deque(maxlen=8)  # counters sent, unanswered
        # requests
        self._next_id = int.from_bytes(random_bytes(4), "big") or 1
        self._requests: dict[int, _Request] = {}
        self._resolves: set[int] = set()
        # classification by STUN to the beacon's second port
        self._stun_tid: bytes | None = None
        self._stun_at: float | None = None
        self._stun_tries_left = 0
        self._classified_for: tuple[Address, tuple[Address, ...]] | None = None
        # refused relayed handshakes per source key: (count, since)
        self._invalid_relayed: dict[bytes, tuple[int, float]] = {}
        self._blocked_until: dict[bytes, float] = {}  # keys our reports had blocked, to when

    # -- what the node asks ----------------------------------------------------------------------

    @property
    def beacon_key(self) -> bytes | None:
        """The pinned beacon key (persist it to keep the pin across restarts)."""
        return self._beacon_key

    @property
    def registered(self) -> bool:
        return self._state is _State.REGISTERED

    @property
    def nat_type(self) -> str:
        return self._nat_type.label

    @property
    def addresses(self) -> frozenset[Address]:
        """Source addresses whose datagrams belong to this client."""
        if self.alt_port:
            return frozenset({self.beacon, (self.beacon[0], self.alt_port)})
        return frozenset({self.beacon})

    def set_local_candidates(self, candidates: list[Address]) -> None:
        """Our LAN endpoints (at most 8 are sent; the first ones win). ConfigError if one is not
        an IP literal and port."""
        checked = tuple(dict.fromkeys(_check_candidate(c) for c in candidates))
        checked = checked[: bw.MAX_LAN_CANDIDATES]
        if checked != self._candidates:
            self._candidates = checked
            self._register_soon()

    def set_nat_type(self, nat_type: str) -> None:
        """Our NAT type as the node knows it; turns our own classification off."""
        try:
            value = NatType.from_label(nat_type)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._nat_manual = True
        self._stun_tid = self._stun_at = None
        self._set_nat(value)

    @property
    def registering(self) -> bool:
        """Started, and not (or no longer) registered: REGISTERs are going out."""
        return self._state is _State.REGISTERING

    @property
    def unanswered_registers(self) -> int:
        """REGISTERs in a row that went unanswered."""
        return self._unanswered

    def start(self, now: float) -> None:
        """Register now (and again every ``refresh_interval`` seconds)."""
        if self._state is _State.IDLE or self._state is _State.FAILED:
            self._state = _State.REGISTERING
            self._unanswered = 0
            self.last_heard = now  # silence counts from here
            self._send_register(now)

    def stop(self, reason: str = "the beacon client was stopped") -> None:
        """Stop registering (the beacon forgets us when the registration expires); requests
        still pending fail with ``reason``."""
        self._state = _State.IDLE
        self._register_at = self._expires = self._keepalive_at = None
        self._outstanding.clear()
        self._keepalives_out.clear()
        self._stun_tid = self._stun_at = None
        self._fail_requests(None, reason)

    def hand_over(self, successor: BeaconClient, now: float) -> None:
        """Give our pending RESOLVEs and INTRODUCEs to ``successor`` (the next home of a fleet,
        as we stop answering), under the same request ids: they go out once it registers us,
        within the time their tries allow, and their answers reach whoever waits on the ids."""
        config = successor.config
        for request_id in list(self._requests):
            if request_id in successor._requests:
                continue  # the same random id drawn twice: that one fails here
            request = self._requests.pop(request_id)
            successor._requests[request_id] = _Request(
                request.message,
                request.peer_key,
                now + config.request_timeout * config.request_tries,
                config.request_tries,
                False,
            )
            if request_id in self._resolves:
                self._resolves.discard(request_id)
                successor._resolves.add(request_id)

    def resolve(self, name_or_node_id: str, now: float) -> int:
        """Look up a hostname or node id; the answer is a Resolved or ResolveFailed event with
        the returned request id. ConfigError if the string is neither; BeaconError if the
        beacon refused our registration for good (a request could never be answered)."""
        text = canonical_name(name_or_node_id)
        if bw.looks_like_node_id(text):
            return self.resolve_key(base64.b32decode(text.upper() + "===="), now)
        if not bw.valid_hostname(text):
            raise ConfigError(f"{name_or_node_id!r} is neither a hostname nor a node id")
        return self._add_resolve(bw.encode_resolve(0, hostname=text), now)

    def resolve_key(self, node_key: bytes, now: float) -> int:
        """As :meth:`resolve`, by key."""
        if len(node_key) != bw.KEY_SIZE:
            raise ConfigError("a node key is 32 bytes")
        return self._add_resolve(bw.encode_resolve(0, node_key=node_key), now)

    def _add_resolve(self, message: bytes, now: float) -> int:
        request_id = self._add_request(message, None, now)
        self._resolves.add(request_id)
        return request_id

    def introduce(self, peer_key: bytes, now: float) -> int:
        """Ask the beacon to introduce us to ``peer_key``: both sides get an Introduction at
        once, or we get IntroductionFailed with the returned request id."""
        if len(peer_key) != bw.KEY_SIZE:
            raise ConfigError("a node key is 32 bytes")
        return self._add_request(bw.encode_introduce(0, peer_key), peer_key, now)

    def block_relay(self, peer_key: bytes, seconds: float, now: float) -> None:
        """Ask the beacon to stop relaying ``peer_key``'s packets to us for ``seconds`` (0 lifts
        a block; the beacon cuts long ones to its own maximum). The beacon does not answer:
        call again if the packets keep coming. ConfigError on a bad key or duration."""
        if len(peer_key) != bw.KEY_SIZE:
            raise ConfigError("a node key is 32 bytes")
        if not 0 <= seconds <= bw.MAX_BLOCK_SECONDS:
            raise ConfigError(f"a relay block lasts 0..{bw.MAX_BLOCK_SECONDS} s, not {seconds}")
        message = bw.encode_block_relay(
            self.secret, self.public_key, self._next_timestamp(), peer_key, math.ceil(seconds)
        )
        log.info("asking the beacon to stop relaying %s for %g s", peer_key.hex()[:12], seconds)
        self._out.append((message, self.beacon))

    def report_invalid_relayed(self, source_key: bytes, now: float) -> bool:
        """The node refused a handshake the beacon relayed from ``source_key`` (untrusted or
        forged). Too many of them in a while (``block_relay_after`` within
        ``block_relay_window``) ask the beacon to block the key; True when this call did."""
        config = self.config
        count, since = self._invalid_relayed.get(source_key, (0, now))
        if now - since > config.block_relay_window:
            count, since = 0, now
        count += 1
        if count >= config.block_relay_after:
            self._invalid_relayed.pop(source_key, None)
            self.block_relay(source_key, config.block_relay_duration, now)
            if len(self._blocked_until) >= config.max_block_tracked:
                self._blocked_until = {k: t for k, t in self._blocked_until.items() if t > now}
            if len(self._blocked_until) < config.max_block_tracked:
                self._blocked_until[source_key] = now + config.block_relay_duration
            return True
        if source_key not in self._invalid_relayed and (
            len(self._invalid_relayed) >= config.max_block_tracked
        ):
            self._invalid_relayed.clear()  # many keys at once: start counting afresh
        self._invalid_relayed[source_key] = (count, since)
        return False

    def lift_block(self, peer_key: bytes, now: float) -> bool:
        """The user now trusts ``peer_key``: if our reports had it blocked at the beacon, lift
        the block, else its first packets would wait out the block. True if it asked."""
        until = self._blocked_until.pop(peer_key, None)
        self._invalid_relayed.pop(peer_key, None)
        if until is None or until <= now:
            return False
        self.block_relay(peer_key, 0, now)
        return True

    def wrap_relay(self, peer_key: bytes, packet: bytes) -> bytes:
        """The datagram to send to :attr:`beacon` so that it forwards ``packet`` to ``peer_key``."""
        return bw.encode_relay(peer_key, packet)

    # -- driving -------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float) -> None:
        if not data:
            self.stats.malformed += 1
            return
        kind = data[0]
        try:
            if kind == bw.RELAYED:
                _, source, packet = bw.parse_relay_untrusted(data)
                self.stats.relayed_received += 1
                self._events.append(Relayed(source, packet))
            elif kind == bw.REGISTERED:
                self._on_registered(bw.parse_registered_untrusted(data), now)
            elif kind == bw.RESOLVED:
                self._on_resolved(bw.parse_resolved_untrusted(data), now)
            elif kind == bw.INTRODUCTION:
                self._on_introduction(bw.parse_introduction_untrusted(data), now)
            elif kind == bw.REFUSED:
                self._on_refused(*bw.parse_refused_untrusted(data), now)
            elif kind == bw.KEEPALIVE_ACK:
                self._on_keepalive_ack(bw.parse_keepalive_ack_untrusted(data), now)
            elif kind < 4:
                self._on_stun(data, now)
            else:
                self.stats.malformed += 1
        except WireError as exc:
            self.stats.malformed += 1
            log.debug("malformed datagram from the beacon: %s", exc)

    def handle_timer(self, now: float) -> None:
        self._poll(now)

    def get_timer(self) -> float | None:
        deadlines = [r.deadline for r in self._requests.values()]
        if self._expires is not None and self._state is _State.REGISTERED:
            deadlines.append(self._expires)
            if self._keepalive_at is not None:
                deadlines.append(self._keepalive_at)
        if self._register_at is not None:
            deadlines.append(self._register_at)
        if self._stun_at is not None:
            deadlines.append(self._stun_at)
        return min(deadlines) if deadlines else None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Everything due, each with its destination (the beacon, or its second STUN port)."""
        self._poll(now)
        out, self._out = self._out, []
        return out

    def next_event(self) -> BeaconEvent | None:
        return self._events.popleft() if self._events else None

    # -- registration ----------------------------------------------------------------------------

    def _register_soon(self) -> None:
        # Changes (candidates, NAT type) go to the beacon at the next poll, not at the refresh.
        if self._state is _State.REGISTERED or self._state is _State.REGISTERING:
            self._register_at = float("-inf")

    def _next_timestamp(self) -> int:
        # A fresh timestamp every time: the beacon accepts only timestamps newer than the last
        # one it took from us, so a resend must never reuse one.
        # Strictly increasing even if the clock is coarse or stands still between two sends.
        timestamp = max(self._wall_clock_ns(), self._last_timestamp + 1)
        self._last_timestamp = timestamp
        return timestamp

    def _send_register(self, now: float) -> None:
        timestamp = self._next_timestamp()
        self._last_register_sent = now
        self._outstanding.add(timestamp)
        self._out.append(
            (
                bw.encode_register(
                    self.secret,
                    self.public_key,
                    timestamp,
                    self._nat_type,
                    self.hostname,
                    self._candidates,
                    guest=self.guest,
                ),
                self.beacon,
            )
        )
        config = self.config
        backoff = min(config.register_retry * 2**self._unanswered, config.register_retry_max)
        self._register_at = now + backoff

    def _on_registered(self, reply: bw.Registered, now: float) -> None:
        if reply.timestamp_ns not in self._outstanding:
            self.stats.unexpected += 1
            return
        if self._beacon_key is not None and reply.beacon_key != self._beacon_key:
            self.stats.bad_signature += 1
            self._last_failure = "the beacon's replies are signed by an unexpected key"
            log.warning("REGISTERED signed by key %s, not the pinned one", reply.beacon_key.hex())
            if reply.verify(self.public_key):
                self.rejected_key = reply.beacon_key
            return
        if not reply.verify(self.public_key):
            self.stats.bad_signature += 1
            self._last_failure = "the beacon's replies carry bad signatures"
            return
        if self._beacon_key is None:
            self._beacon_key = reply.beacon_key
            log.info("pinned beacon key %s (first use)", reply.beacon_key.hex())
        self.last_heard = now
        self._outstanding.clear()
        self._unanswered = 0
        self._unreachable_reported = False
        if reply.status != Status.OK:
            self._on_refusal(reply.status, now)
            return
        was_registered = self._state is _State.REGISTERED
        previous = self.reflexive
        changed = reply.reflexive != previous
        self._state = _State.REGISTERED
        self._expires = now + reply.ttl
        self._register_at = now + min(self.config.refresh_interval, reply.ttl / 2)
        self.reflexive = reply.reflexive
        self.alt_port = reply.alt_port
        if self.config.keepalive_interval > 0:
            self._keepalive_at = now + self.config.keepalive_interval
        self._keepalives_out.clear()
        if changed or not was_registered:
            self._events.append(Registered(reply.reflexive, self._expires, previous))
        if (reply.reflexive, self._candidates) != self._classified_for:
            self._classify(now)
        for request in self._requests.values():
            if not request.sent or request.refusal == Status.NOT_REGISTERED:
                # Held back until now, or refused because the beacon had lost us: send now.
                request.deadline = now
                request.refusal = None
        self._poll_requests(now)

    def _on_refusal(self, status: Status, now: float) -> None:
        permanent = status in PERMANENT_REFUSALS
        reason = bw.status_reason(status)
        log.warning("beacon refused our registration: %s", reason)
        self._events.append(RegistrationFailed(reason, status, permanent))
        self._last_failure = reason
        if permanent:
            self._state = _State.FAILED
            self._register_at = None
            self._expires = None
            self._fail_requests(None, f"not registered with the beacon: {reason}")
        else:
            # Rate limits pass and clocks get fixed: try again at the refresh interval.
            self._register_at = now + self.config.refresh_interval

    def _on_refused(self, reason: Status, request_id: int, now: float) -> None:
        # REFUSED is unsigned, so it may only make us do what is harmless if forged: register
        # once more, or note why a request is (for now) unanswered. It never fails a request.
        self.stats.refused += 1
        request = self._requests.get(request_id)
        if request is not None:
            request.refusal = reason
        if reason != Status.NOT_REGISTERED or self._state is not _State.REGISTERED:
            return
        # The beacon lost our registration (it restarted, or we were away too long): register
        # again now, or as soon as register_retry has passed since the last REGISTER (a flood
        # of forged REFUSEDs must not become a flood of REGISTERs). Refused requests go out
        # again when the registration is confirmed.
        soon = self._last_register_sent + self.config.register_retry
        if self._register_at is None or soon < self._register_at:
            self._register_at = soon
        if now >= soon:
            self._send_register(now)

    def _poll(self, now: float) -> None:
        if self._state is _State.REGISTERED and self._expires is not None and now >= self._expires:
            # Refreshes went unanswered for the whole lifetime: the beacon has forgotten us.
            self._state = _State.REGISTERING
            self._expires = None
            log.warning("beacon registration lapsed: %s", self._last_failure)
        if (
            self._keepalive_at is not None
            and now >= self._keepalive_at
            and self._state is _State.REGISTERED
        ):
            self._send_keepalive(now)
        if self._register_at is not None and now >= self._register_at:
            if self._outstanding:
                self._unanswered += 1
                self._outstanding = set(sorted(self._outstanding)[-4:])  # bounded
            self._send_register(now)
        if (
            self._unanswered >= self.config.unreachable_after
            and not self._unreachable_reported
            and self._state is _State.REGISTERING
        ):
            self._unreachable_reported = True
            self._events.append(BeaconUnreachable(self._last_failure))
            self._fail_requests(None, f"beacon unreachable: {self._last_failure}")
        if self._stun_at is not None and now >= self._stun_at:
            self._send_stun(now)
        self._poll_requests(now)

    # -- keepalives ------------------------------------------------------------------------------

    def _send_keepalive(self, now: float) -> None:
        self._keepalive_at = now + self.config.keepalive_interval
        if len(self._keepalives_out) >= self.config.keepalive_misses and not self._outstanding:
            # The beacon forgot us (it restarted) or our mapping broke: a REGISTER finds out,
            # and moves our registration if we have a new address.
            log.info("%d keepalives unanswered: registering again", len(self._keepalives_out))
            self._keepalives_out.clear()
            self._register_at = now
            return
        key = self._keepalive_key
        if key is None:
            if self._beacon_key is None:
                return
            key = bw.keepalive_key(
                crypto.ed25519_sk_to_x25519(self.secret), self._beacon_key, self.public_key
            )
            if key is None:
                log.warning("the beacon's key is not a curve point: no keepalives")
                self._keepalive_at = None
                return
            self._keepalive_key = key
        counter = self._next_timestamp()
        self._keepalives_out.append(counter)
        if len(self._keepalives_out) == 1:
            # Unless answered within request_timeout, ask once more then (the answer puts the
            # usual pace back): a dead beacon is told from a lost datagram within two intervals.
            self._keepalive_at = now + min(self.config.keepalive_interval,
                                           self.config.request_timeout)
        self._out.append((bw.encode_keepalive(key, self.public_key, counter), self.beacon))

    def _on_keepalive_ack(self, reply: bw.KeepaliveAck, now: float) -> None:
        key = self._keepalive_key
        if reply.counter not in self._keepalives_out or key is None:
            self.stats.unexpected += 1
            return
        if not reply.verify(key):
            self.stats.bad_signature += 1
            return
        self.last_heard = now
        self._keepalives_out.clear()
        if self._keepalive_at is not None:
            self._keepalive_at = now + self.config.keepalive_interval
        if reply.reflexive != self.reflexive and self._state is _State.REGISTERED:
            log.info(
                "our NAT mapping changed: the beacon sees us at %s, not %s; registering again",
                reply.reflexive,
                self.reflexive,
            )
            self._register_at = float("-inf")

    # -- requests --------------------------------------------------------------------------------

    def _add_request(self, message: bytes, peer_key: bytes | None, now: float) -> int:
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1  # 0 marks pushed introductions
        # The id sits right after the type byte in RESOLVE and INTRODUCE.
        message = message[:1] + request_id.to_bytes(4, "big") + message[5:]
        config = self.config
        if self._state is _State.FAILED:
            raise BeaconError(f"not registered with the beacon: {self._last_failure}")
        request = _Request(message, peer_key, now, config.request_tries, False)
        if self._state is not _State.REGISTERED:
            # Held until we are registered, within the time the tries would have taken.
            request.deadline = now + config.request_timeout * config.request_tries
        self._requests[request_id] = request
        return request_id

    def _poll_requests(self, now: float) -> None:
        registered = self._state is _State.REGISTERED
        for request_id, request in list(self._requests.items()):
            if now < request.deadline:
                continue
            if not registered:
                self._fail_request(request_id, "not registered with the beacon", None)
            elif request.tries_left > 0:
                request.tries_left -= 1
                request.sent = True
                request.deadline = now + self.config.request_timeout
                self._out.append((request.message, self.beacon))
            elif request.refusal is not None:
                self._fail_request(request_id, bw.status_reason(request.refusal), request.refusal)
            else:
                self._fail_request(request_id, "timeout: the beacon did not answer", None)

    def _fail_request(self, request_id: int, reason: str, code: Status | None) -> None:
        request = self._requests.pop(request_id)
        if request_id in self._resolves:
            self._resolves.discard(request_id)
            self._events.append(ResolveFailed(request_id, reason, code))
        else:
            assert request.peer_key is not None
            self._events.append(IntroductionFailed(request_id, request.peer_key, reason, code))

    def _fail_requests(self, code: Status | None, reason: str) -> None:
        for request_id in list(self._requests):
            self._fail_request(request_id, reason, code)

    def _on_resolved(self, reply: bw.Resolved, now: float) -> None:
        if reply.request_id not in self._resolves:
            self.stats.unexpected += 1
            return
        if self._beacon_key is None or not reply.verify(self._beacon_key, self.public_key):
            self.stats.bad_signature += 1
            return
        self.last_heard = now
        del self._requests[reply.request_id]
        self._resolves.discard(reply.request_id)
        if reply.status == Status.OK:
            self._events.append(
                Resolved(
                    reply.request_id,
                    reply.node_key,
                    reply.hostname,
                    reply.candidates,
                    reply.nat_type.label,
                    reply.home,
                )
            )
        else:
            self._events.append(
                ResolveFailed(reply.request_id, bw.status_reason(reply.status), reply.status)
            )

    def _on_introduction(self, reply: bw.Introduction, now: float) -> None:
        if self._beacon_key is None or not reply.verify(self._beacon_key, self.public_key):
            self.stats.bad_signature += 1
            return
        self.last_heard = now
        if reply.request_id == 0:
            age = abs(self._wall_clock_ns() - reply.timestamp_ns) / 1e9
            if age > self.config.introduction_max_age or reply.status != Status.OK:
                self.stats.unexpected += 1
                return
        else:
            request = self._requests.get(reply.request_id)
            if (
                request is None
                or reply.request_id in self._resolves
                or request.peer_key != reply.peer_key
            ):
                self.stats.unexpected += 1
                return
            del self._requests[reply.request_id]
            if reply.status != Status.OK:
                self._events.append(
                    IntroductionFailed(
                        reply.request_id,
                        reply.peer_key,
                        bw.status_reason(reply.status),
                        reply.status,
                        reply.home,
                    )
                )
                return
        self._events.append(
            Introduction(reply.peer_key, reply.candidates, reply.nat_type.label, reply.request_id)
        )

    # -- NAT classification ----------------------------------------------------------------------

    def _set_nat(self, value: NatType) -> None:
        if value != self._nat_type:
            self._nat_type = value
            self._events.append(NatClassified(value.label))
            self._register_soon()

    def _classify(self, now: float) -> None:
        if (
            self._nat_manual
            or self.guest  # our home classifies; a guest's NAT type is our home's
            or not self.config.classify_nat
            or self.reflexive is None
        ):
            return
        self._classified_for = (self.reflexive, self._candidates)
        if self.reflexive in self._candidates:
            self._stun_tid = self._stun_at = None
            self._set_nat(NatType.OPEN)
        elif self.alt_port:
            self._stun_tries_left = self.config.stun_tries
            self._send_stun(now)
        # Without a second beacon port we can't tell cone from symmetric: the type stays.

    def _send_stun(self, now: float) -> None:
        if self._stun_tries_left <= 0:
            self._stun_tid = self._stun_at = None
            log.debug("no answer from the beacon's STUN port %d: NAT type unknown", self.alt_port)
            return
        self._stun_tries_left -= 1
        self._stun_tid = self._random_bytes(stun.TRANSACTION_ID_SIZE)
        self._stun_at = now + self.config.stun_timeout
        destination = (self.beacon[0], self.alt_port)
        # Padded: the beacon answers unpadded requests from unregistered sources only within a
        # small budget, and a symmetric NAT sends this one from an unregistered mapping.
        request = stun.encode_binding_request(self._stun_tid, pad_to=stun.PADDED_REQUEST_SIZE)
        self._out.append((request, destination))

    def _on_stun(self, data: bytes, now: float) -> None:
        tid, mapped = stun.parse_binding_response_untrusted(data)
        if self._stun_tid is None or tid != self._stun_tid:
            self.stats.unexpected += 1
            return
        self._stun_tid = self._stun_at = None
        self._set_nat(NatType.CONE if mapped == self.reflexive else NatType.SYMMETRIC)
