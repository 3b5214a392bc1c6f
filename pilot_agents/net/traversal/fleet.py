"""A node's side of a fleet of beacons, sans-IO: its home beacon, fail-over, and guests.

A fleet is several beacons sharing one store and one key (docs/beacon.md). A node is given a
list of them and registers at one, its *home*: the first of the list that answers. When the
home stops answering (no authenticated answer for ``keepalive_misses`` keepalive intervals, or
two REGISTERs in a row unanswered before it ever answered), the node registers at the next
beacon of the list, and its name moves with it (its key owns the name fleet-wide). It stays
there: going back when the first one returns would move it twice for nothing.

A peer registered at another beacon of the fleet is reached through that beacon, the peer's
home, as a Tailscale client reaches a peer through the peer's home DERP server. The peer's home
comes with a RESOLVED, or with an introduction its beacon refused as ELSEWHERE; the node then
attaches there as a *guest* (a :class:`BeaconClient` with ``guest=True``, kept in that beacon's
memory only), and introductions, relayed packets and trust requests for the peer go there. The
peer answers through its own home, where we now are: beacons never talk to each other. A guest
lives while some peer is routed through it (until :meth:`FleetClient.forget_peer`); relayed
packets for a guest that has not attached yet wait for it (at most ``MAX_HELD``), as do those
for our home while it registers us; one dropped unsent is reported (:class:`RelayDropped`).
When a guest's beacon stops answering, the peers routed through it are looked up again at our
home and introduced wherever they went.

Driven like a :class:`BeaconClient`, except that :meth:`FleetClient.receive_datagram` takes the
datagram's source (one of :attr:`FleetClient.addresses`), and :meth:`FleetClient.relay` says
where a relayed packet goes.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ...errors import ConfigError
from . import beacon_wire as bw
from .beacon_client import (
    BeaconClient,
    BeaconClientConfig,
    BeaconEvent,
    BeaconUnreachable,
    Introduction,
    IntroductionFailed,
    Registered,
    RegistrationFailed,
    Resolved,
    ResolveFailed,
)
from .beacon_wire import Address, Status

log = logging.getLogger("pilot_agents.beacon_client")

LOCATED_FOR = 30.0  # seconds a lookup's answer about a peer's home is taken as current
MAX_LOCATED = 4096  # peers whose lookups are remembered; more start the memory afresh
MAX_ROUTES = 4096  # peers routed to another home; beyond, the oldest route goes (an ELSEWHERE
# from our home brings it back when that peer is introduced again)
MAX_HELD = 64  # relayed packets waiting for one beacon to register us; the oldest go first
MAX_REDIRECTS = 3  # ELSEWHERE answers followed in a row for one peer (a store in flux)
START_TRIES = 2  # unanswered REGISTERs before a beacon that never answered is passed over


@dataclass(frozen=True, slots=True)
class HomeMoved(BeaconEvent):
    """Our home stopped answering; we are now registered at ``beacon``. Peers we have tunnels
    with need a fresh introduction (a relayed tunnel went through the old home)."""

    previous: Address
    beacon: Address


@dataclass(frozen=True, slots=True)
class RelayDropped(BeaconEvent):
    """A relayed packet that waited for a beacon to register us was dropped unsent. A tunnel
    sends its handshakes again; nothing sends a trust request again, so the node says so."""

    peer_key: bytes
    packet: bytes
    reason: str


def _where(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


class FleetClient:
    def __init__(
        self,
        identity_secret: bytes,
        identity_public: bytes,
        hostname: str | None,
        beacons: list[Address],
        *,
        beacon_key: bytes | None = None,
        config: BeaconClientConfig | None = None,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        """``beacons``: the fleet's addresses (IP literals), the preferred home first.
        ``beacon_key``: the fleet's key, pinned; without it the first answer pins it, for every
        beacon of the list (a fleet signs with one key)."""
        if not beacons:
            raise ConfigError("a beacon list needs at least one beacon")
        self._secret = identity_secret
        self._public = identity_public
        self._hostname = hostname
        self.config = config or BeaconClientConfig()
        self._wall_clock_ns = wall_clock_ns
        self._random_bytes = random_bytes
        self.beacons = tuple(dict.fromkeys(beacons))
        self._failover = len(self.beacons) > 1
        # Seconds without an answer after which a registered beacon counts as gone.
        interval = self.config.keepalive_interval
        self._silence = self.config.keepalive_misses * interval if interval > 0 else None
        self._index = 0
        self._pinned = beacon_key
        self.home = self._client(self.beacons[0], hostname, guest=False)
        self._guests: dict[Address, BeaconClient] = {}
        self._routes: dict[bytes, Address] = {}  # peer -> its home, when not ours
        self._held: dict[Address, deque[bytes]] = {}  # relayed datagrams waiting for a beacon
        self._lookups: dict[int, bytes] = {}  # our own RESOLVEs (request id -> peer)
        self._redirects: dict[bytes, int] = {}
        # Peers whose introduction awaits its answer: an ELSEWHERE is followed only for them
        # (one that comes after forget_peer would attach a guest for nobody).
        self._introducing: dict[bytes, None] = {}
        self._located: dict[bytes, float] = {}  # peer -> when a lookup last said where it is
        self._events: deque[BeaconEvent] = deque()
        self._out: list[tuple[bytes, Address]] = []
        self._by_address: dict[Address, BeaconClient] = {}
        self._addresses: frozenset[Address] = frozenset()
        self._readdress()
        self._candidates: list[Address] = []
        self._nat_type: str | None = None  # set by the node (set_nat_type), else classified
        self._moved_from: Address | None = None  # our home before, until the new one answers
        self._failed = 0  # beacons in a row that did not answer
        self._last_from: BeaconClient = self.home  # the client of the datagram just received

    # -- what the node asks ----------------------------------------------------------------------

    @property
    def beacon(self) -> Address:
        """Our home's address."""
        return self.home.beacon

    @property
    def beacon_key(self) -> bytes | None:
        return self.home.beacon_key or self._pinned

    @property
    def rejected_key(self) -> bytes | None:
        """A key other than the pinned one that answered a registration (see BeaconClient)."""
        return next((c.rejected_key for c in self._clients() if c.rejected_key), None)

    @property
    def registered(self) -> bool:
        return self.home.registered

    @property
    def reflexive(self) -> Address | None:
        return self.home.reflexive

    @property
    def nat_type(self) -> str:
        return self.home.nat_type

    @property
    def addresses(self) -> frozenset[Address]:
        """Source addresses whose datagrams belong to the fleet client (home and guests)."""
        return self._addresses

    def route(self, peer_key: bytes) -> Address:
        """The beacon through which ``peer_key`` is introduced and relayed to."""
        return self._routes.get(peer_key, self.home.beacon)

    def located(self, peer_key: bytes, now: float) -> bool:
        """A lookup said where ``peer_key`` is registered within the last ``LOCATED_FOR``
        seconds (so its route is current, and it was registered then)."""
        return now < self._located.get(peer_key, -LOCATED_FOR) + LOCATED_FOR

    def set_local_candidates(self, candidates: list[Address]) -> None:
        self._candidates = list(candidates)
        for client in self._clients():
            client.set_local_candidates(candidates)

    def set_nat_type(self, nat_type: str) -> None:
        """At home and at every guest beacon: each tells the peers it introduces us to."""
        self._nat_type = nat_type
        for client in self._clients():
            client.set_nat_type(nat_type)

    def start(self, now: float) -> None:
        self.home.start(now)

    def stop(self) -> None:
        for client in self._clients():
            client.stop()
            self._drain(client, 0.0)

    def resolve(self, name_or_node_id: str, now: float) -> int:
        """At our home; a peer registered elsewhere in the fleet is routed to its home."""
        return self.home.resolve(name_or_node_id, now)

    def introduce(self, peer_key: bytes, now: float) -> int:
        """At the peer's home (ours unless it resolved elsewhere): both sides get an
        Introduction, or we IntroductionFailed. An ELSEWHERE answer is followed, not reported."""
        introducing = self._introducing
        if peer_key not in introducing and len(introducing) >= MAX_ROUTES:
            del introducing[next(iter(introducing))]  # long unanswered: its beacon went away
        introducing[peer_key] = None
        route = self._routes.get(peer_key)
        client = self.home if route is None else self._guest(route, now)
        return client.introduce(peer_key, now)

    def relay(self, peer_key: bytes, packet: bytes, now: float) -> tuple[bytes, Address] | None:
        """The datagram that has the peer's home relay ``packet`` to it, and where to send it;
        None if it waits for that beacon to register us (it goes out with
        :meth:`datagrams_to_send`)."""
        datagram = bw.encode_relay(peer_key, packet)
        route = self._routes.get(peer_key)
        if route is None:
            # A beacon relays only for a node it has registered: while our home registers us
            # (at start, after a fail-over), the packet waits as it would for a guest.
            route = self.home.beacon
            if not self.home.registering:
                return datagram, route
        elif self._guest(route, now).registered:
            return datagram, route
        held = self._held.get(route)
        if held is None:
            held = self._held[route] = deque()
        elif len(held) >= MAX_HELD:
            self._dropped(held.popleft(), f"{MAX_HELD} newer packets wait for the beacon at "
                          f"{_where(route)} to register us")
        held.append(datagram)
        return None

    def forget_peer(self, peer_key: bytes) -> None:
        """No tunnel to ``peer_key`` any more: its route goes, and with the last peer routed
        through a guest, the guest (at the next timer). An answer still on its way about it
        (a lookup, an ELSEWHERE) routes it nowhere."""
        self._unroute(peer_key)
        self._introducing.pop(peer_key, None)
        self._lookups = {rid: peer for rid, peer in self._lookups.items() if peer != peer_key}

    def report_invalid_relayed(self, source_key: bytes, now: float) -> bool:
        """As :meth:`BeaconClient.report_invalid_relayed`, to the beacon that relayed it."""
        return self._last_from.report_invalid_relayed(source_key, now)

    def lift_block(self, peer_key: bytes, now: float) -> bool:
        lifted = [client.lift_block(peer_key, now) for client in self._clients()]
        return any(lifted)

    # -- driving -------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, source: Address, now: float) -> None:
        client = self._by_address.get(source)
        if client is None:
            return
        self._last_from = client
        client.receive_datagram(data, now)
        self._drain(client, now)

    # The endpoint calls datagrams_to_send and get_timer at every flush, so with one beacon and
    # no guest they cost little more than the home client's own. Silences are checked only when
    # the timer fires: get_timer includes the moment each would count as gone.

    def handle_timer(self, now: float) -> None:
        for client in self._clients():
            client.handle_timer(now)
            self._drain(client, now)
        self._check(now)

    def get_timer(self) -> float | None:
        home = self.home
        deadline = home.get_timer()
        silence = self._silence
        if silence is not None and self._failover and home.registered:
            gone = home.last_heard + silence
            deadline = gone if deadline is None or gone < deadline else deadline
        for guest in self._guests.values():
            timer = guest.get_timer()
            if silence is not None and guest.registered:
                gone = guest.last_heard + silence
                timer = gone if timer is None or gone < timer else timer
            if timer is not None and (deadline is None or timer < deadline):
                deadline = timer
        return deadline

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        home = self.home
        out = home.datagrams_to_send(now)
        self._drain(home, now)
        if self._out:  # relayed packets that waited for a beacon to register us
            out.extend(self._out)
            self._out = []
        if self._guests:
            for guest in list(self._guests.values()):
                out.extend(guest.datagrams_to_send(now))
                self._drain(guest, now)
        return out

    def next_event(self) -> BeaconEvent | None:
        return self._events.popleft() if self._events else None

    # -- clients -------------------------------------------------------------------------------

    def _clients(self) -> list[BeaconClient]:
        return [self.home, *self._guests.values()]

    def _client(self, address: Address, hostname: str | None, *, guest: bool) -> BeaconClient:
        return BeaconClient(
            self._secret,
            self._public,
            hostname,
            address,
            beacon_key=self._pinned,
            config=self.config,
            wall_clock_ns=self._wall_clock_ns,
            random_bytes=self._random_bytes,
            guest=guest,
        )

    def _readdress(self) -> None:
        by_address = {a: guest for guest in self._guests.values() for a in guest.addresses}
        by_address.update((a, self.home) for a in self.home.addresses)
        self._by_address = by_address
        self._addresses = frozenset(by_address)

    def _guest(self, address: Address, now: float) -> BeaconClient:
        guest = self._guests.get(address)
        if guest is None:
            guest = self._guests[address] = self._client(address, None, guest=True)
            guest.set_local_candidates(self._candidates)
            guest.set_nat_type(self._nat_type or self.home.nat_type)
            guest.start(now)
            self._readdress()
            log.info("attaching to the beacon at %s as a guest", _where(address))
        return guest

    def _gone(self, client: BeaconClient, now: float) -> bool:
        if client.registered:
            silence = self._silence
            return silence is not None and now >= client.last_heard + silence
        return client.registering and client.unanswered_registers >= START_TRIES

    def _check(self, now: float) -> None:
        if self._failover and self._gone(self.home, now):
            self._fail_over(now, "it stopped answering")
        routed = set(self._routes.values())
        for address, guest in list(self._guests.items()):
            if address not in routed:
                self._drop_guest(address, "no peer is routed through it any more", now)
            elif self._gone(guest, now):
                self._drop_guest(address, "it stopped answering", now)

    def _fail_over(self, now: float, reason: str) -> None:
        old = self.home
        self._index = (self._index + 1) % len(self.beacons)
        address = self.beacons[self._index]
        log.info(
            "beacon at %s: %s; registering at %s", _where(old.beacon), reason, _where(address)
        )
        # Held for that beacon (as our home, or for a guest we gave way to there), which went
        # silent before it registered us: they are dropped, as a dead guest's are.
        self._drop_held(old.beacon, f"the beacon at {_where(old.beacon)} went silent before "
                        "it registered us")
        guest = self._guests.pop(address, None)  # our new home: no guest there
        self._routes = {peer: at for peer, at in self._routes.items() if at != address}
        self.home = self._client(address, self._hostname, guest=False)
        self.home.set_local_candidates(self._candidates)
        if self._nat_type is not None:
            self.home.set_nat_type(self._nat_type)
        old.hand_over(self.home, now)  # what the node waits for is asked again there
        old.stop(f"the beacon at {_where(old.beacon)} stopped answering")
        self._drain(old, now)
        if guest is not None:
            # And what waited for our guest there: its introductions and lookups are asked of
            # the new home, its held relayed packets go once that registers us.
            guest.hand_over(self.home, now)
            guest.stop(f"our home moved to the beacon at {_where(address)}")
            self._drain(guest, now)
        self._readdress()
        if old.reflexive is not None and self._moved_from is None:
            self._moved_from = old.beacon
        self._failed += 1
        if self._failed == len(self.beacons):  # once per outage; we keep going round
            self._events.append(
                BeaconUnreachable(f"none of the {len(self.beacons)} beacons answers")
            )
        self.home.start(now)

    def _drop_guest(self, address: Address, reason: str, now: float) -> None:
        guest = self._guests.pop(address)
        guest.stop(f"the beacon at {_where(address)}: {reason}")
        self._drain(guest, now)
        self._drop_held(address, f"the beacon at {_where(address)}: {reason}")
        self._readdress()
        log.info("leaving the beacon at %s: %s", _where(address), reason)
        for peer in [peer for peer, at in self._routes.items() if at == address]:
            # Where did it go? Our home knows; then the introduction goes there.
            self._unroute(peer)
            if self.home.registered:
                self._lookups[self.home.resolve_key(peer, now)] = peer

    # -- events --------------------------------------------------------------------------------

    def _drain(self, client: BeaconClient, now: float) -> None:
        while (event := client.next_event()) is not None:
            if client is self.home:
                self._on_home_event(event, now)
            else:
                self._on_guest_event(client, event, now)

    def _on_home_event(self, event: BeaconEvent, now: float) -> None:
        if isinstance(event, Registered):
            self._release(self.home.beacon)  # held while it registered us, or for a guest there
            self._failed = 0
            self._pinned = self._pinned or self.home.beacon_key  # the fleet's, for every beacon
            self._readdress()  # the beacon's STUN port may have come with it
            if self._moved_from is not None:
                self._events.append(HomeMoved(self._moved_from, self.home.beacon))
                self._moved_from = None
        elif isinstance(event, BeaconUnreachable) and len(self.beacons) > 1:
            return  # _check moves on to the next beacon
        elif isinstance(event, Resolved | ResolveFailed):
            peer = self._lookups.pop(event.request_id, None)
            if isinstance(event, Resolved):
                self._learn_home(event.node_key, event.home, now)
            if peer is not None:  # ours, after its guest beacon went away
                if isinstance(event, Resolved):
                    self.introduce(peer, now)
                return
        elif self._followed(event, now):
            return
        self._events.append(event)

    def _on_guest_event(self, guest: BeaconClient, event: BeaconEvent, now: float) -> None:
        if isinstance(event, Registered):
            self._release(guest.beacon)
        elif isinstance(event, RegistrationFailed):
            if event.permanent:
                self._drop_guest(guest.beacon, event.reason, now)
        elif isinstance(event, BeaconUnreachable):
            pass  # _check leaves it
        elif not self._followed(event, now):
            self._events.append(event)

    def _release(self, address: Address) -> None:
        held = self._held.pop(address, None)
        if held:
            self._out.extend((datagram, address) for datagram in held)

    def _drop_held(self, address: Address, reason: str) -> None:
        for datagram in self._held.pop(address, ()):
            self._dropped(datagram, reason)

    def _dropped(self, datagram: bytes, reason: str) -> None:
        # Split as bw.encode_relay joined them: the peer's key, then the packet.
        peer_key, packet = datagram[1:bw.RELAY_OVERHEAD], datagram[bw.RELAY_OVERHEAD:]
        self._events.append(RelayDropped(peer_key, packet, reason))

    def _learn_home(self, peer_key: bytes, home: Address | None, now: float) -> None:
        if len(self._located) >= MAX_LOCATED:
            self._located.clear()
        self._located[peer_key] = now
        if home is None or home == self.home.beacon:
            self._routes.pop(peer_key, None)
        else:
            self._route_to(peer_key, home)

    def _route_to(self, peer_key: bytes, home: Address) -> None:
        routes = self._routes
        if peer_key not in routes and len(routes) >= MAX_ROUTES:
            self._unroute(next(iter(routes)))
        routes[peer_key] = home

    def _unroute(self, peer_key: bytes) -> None:
        """Where ``peer_key`` is registered is no longer known: a trust request for it looks
        it up again rather than take our home for its."""
        self._routes.pop(peer_key, None)
        self._redirects.pop(peer_key, None)
        self._located.pop(peer_key, None)

    def _followed(self, event: BeaconEvent, now: float) -> bool:
        """Whether ``event`` is dealt with here: an introduction refused with ELSEWHERE and the
        peer's home is asked there instead, and dropped if the peer was forgotten meanwhile."""
        if isinstance(event, Introduction):
            self._redirects.pop(event.peer_key, None)
            self._introducing.pop(event.peer_key, None)
            return False
        if not isinstance(event, IntroductionFailed):
            return False
        peer, home = event.peer_key, event.home
        if event.code != Status.ELSEWHERE:
            self._introducing.pop(peer, None)
            return False
        if peer not in self._introducing:
            return True  # forgotten since it was asked for: nobody waits for it
        redirects = self._redirects.get(peer, 0)
        if home is None or redirects >= MAX_REDIRECTS:
            self._introducing.pop(peer, None)
            return False
        if len(self._redirects) >= MAX_ROUTES:
            self._redirects.clear()  # counts of peers long gone: start afresh
        if home == self.home.beacon:
            self._unroute(peer)  # back at our home (restarted there, or moved): asked here
        else:
            self._route_to(peer, home)
        self._redirects[peer] = redirects + 1
        log.info("%s is registered at the beacon at %s: introduced there", peer.hex()[:12],
                 _where(home))
        self.introduce(peer, now)
        return True
