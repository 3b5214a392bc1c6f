"""A deterministic in-memory UDP network and fake clock that drive sans-IO muxes.

Like trio's FakeNet: a seeded RNG decides loss, duplication, reordering and delay jitter, and
time only moves when nothing is due, so a run is exactly reproducible from its seed and takes
milliseconds of real time for seconds of simulated time.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from pilot_agents.identity import Identity
from pilot_agents.net.tunnel import crypto, events
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.events import Event, MessageReceived
from pilot_agents.net.tunnel.mux import Mux
from pilot_agents.net.tunnel.paths import RelayPath
from pilot_agents.net.tunnel.session import Session

Address = tuple[str, int]
Source = Address | RelayPath  # where a datagram comes from: an address, or the relay for a peer


@dataclass
class LinkProfile:
    delay: float = 0.010  # seconds, one way
    jitter: float = 0.0  # seconds, uniform extra delay; order kept, as a FIFO queue does
    reorder: float = 0.0  # probability a datagram is held back one extra delay, overtaken
    loss: float = 0.0  # probability a datagram is dropped
    duplicate: float = 0.0  # probability a datagram arrives twice


@dataclass
class Bottleneck:
    """A router on the way that forwards ``rate`` bytes per second, queues up to
    ``queue_bytes`` waiting datagrams and drops what does not fit (a tail-drop FIFO, as most
    home routers have). Datagrams from ``senders`` pass it (every datagram when None): flows
    that share it compete, as they would for one uplink, and their ACKs coming back do not."""

    rate: float  # bytes per second
    queue_bytes: int  # datagrams waiting beyond this are dropped
    senders: frozenset[Source] | None = None
    free_at: float = 0.0  # when the datagram being forwarded has left
    dropped: int = 0  # datagrams that found the queue full
    forwarded: int = 0  # bytes through

    def admit(self, now: float, size: int) -> float | None:
        """When a datagram of ``size`` bytes arriving at ``now`` has left; None: dropped."""
        start = self.free_at if self.free_at > now else now
        if (start - now) * self.rate + size > self.queue_bytes:
            self.dropped += 1
            return None
        self.free_at = start + size / self.rate
        self.forwarded += size
        return self.free_at


@dataclass
class Host:
    address: Address
    identity: Identity
    mux: Mux
    # Annotated by name: inside the class body, ``events`` is this field, not the module.
    events: list[Event] = field(default_factory=list)
    messages: list[MessageReceived] = field(default_factory=list)
    # Simulated application: take every message at once, releasing flow-control credit.
    auto_consume: bool = True
    nat: SimNat | None = None

    @property
    def key(self) -> bytes:
        return self.identity.public_key


@dataclass
class SimNat:
    """A NAT router: ``cone`` maps one internal address to one public port whatever the
    destination; ``symmetric`` uses a new port per destination. Both filter inbound like a
    home router (port-restricted): only from where the mapping has sent to."""

    name: str
    kind: str  # "cone" | "symmetric"
    blocked: bool = False  # drop everything (a dead path)
    _next_port: int = 20000
    _out: dict[tuple[Address, Address | None], int] = field(default_factory=dict)
    _in: dict[int, Address] = field(default_factory=dict)
    _allowed: dict[int, set[Address]] = field(default_factory=dict)

    def outbound(self, source: Address, destination: Address) -> Address:
        key = (source, destination if self.kind == "symmetric" else None)
        port = self._out.get(key)
        if port is None:
            port = self._next_port
            self._next_port += 1
            self._out[key] = port
            self._in[port] = source
            self._allowed[port] = set()
        self._allowed[port].add(destination)
        return (self.name, port)

    def inbound(self, public: Address, source: Address) -> Address | None:
        port = public[1]
        if self.blocked or port not in self._in or source not in self._allowed[port]:
            return None
        return self._in[port]

    def rebind(self) -> None:
        """Forget every mapping: the next outbound packets get new public ports."""
        self._out.clear()
        self._in.clear()
        self._allowed.clear()


BEACON: Address = ("beacon", 3478)


@dataclass(order=True)
class _InFlight:
    at: float
    seq: int
    source: Source = field(compare=False)
    destination: Address = field(compare=False)
    data: bytes = field(compare=False)


class SimNetwork:
    def __init__(self, seed: int = 0, profile: LinkProfile | None = None) -> None:
        self.rng = random.Random(seed)
        self.profile = profile or LinkProfile()
        self.now = 0.0
        self.hosts: dict[Address, Host] = {}
        self.delivered = 0
        self.dropped = 0
        self.tap: Callable[[Source, Address, bytes], bytes | None] | None = None
        self._queue: list[_InFlight] = []
        self._seq = 0
        self._stalled = 0
        self._link_tail: dict[tuple[object, Address], float] = {}
        self.nats: dict[str, SimNat] = {}
        self.beacon_introductions = True  # answer a fallback to the relay with a new intro
        self.relayed = 0
        # The relay drops what it is given (a node whose NAT rebound and that has not
        # re-registered yet: the beacon relays to its old, dead address).
        self.relay_down = False
        self.bottleneck: Bottleneck | None = None  # a shared bottleneck all datagrams pass

    def add_nat(self, name: str, kind: str) -> SimNat:
        nat = SimNat(name, kind)
        self.nats[name] = nat
        return nat

    def reflexive(self, host: Host) -> Address:
        """The host's address as the beacon sees it (opens the mapping, as registering does)."""
        return host.nat.outbound(host.address, BEACON) if host.nat else host.address

    def introduce(self, a: Host, b: Host) -> None:
        """What the beacon's introduction does: each side learns the other's LAN and current
        reflexive address and starts probing."""
        for one, other in ((a, b), (b, a)):
            session = one.mux.session(other.key, self.now)
            session.address = RelayPath(other.key)
            session.add_candidates([other.address, self.reflexive(other)], self.now)

    def reintroduce(self, host: Host, peer: bytes) -> None:
        """A node whose direct path failed asks the beacon to introduce it again."""
        other = next((h for h in self.hosts.values() if h.key == peer), None)
        if other is not None and self.beacon_introductions:
            self.introduce(host, other)

    def add_host(
        self, name: str, config: SessionConfig | None = None, nat: SimNat | None = None
    ) -> Host:
        identity = Identity(*crypto.ed25519_seed_keypair(self.rng.randbytes(32)))
        address = (name, 4000 + len(self.hosts))
        mux = Mux(
            identity.secret_key,
            identity.public_key,
            config or SessionConfig(),
            wall_clock_ns=lambda: int(1_700_000_000e9 + self.now * 1e9),
            random_bits=self.rng.getrandbits,
        )
        host = Host(address, identity, mux, nat=nat)
        self.hosts[address] = host
        return host

    def pair(self, config: SessionConfig | None = None) -> tuple[Host, Host]:
        """Two hosts that trust each other and know each other's address."""
        a, b = self.add_host("a", config), self.add_host("b", config)
        a.mux.trust(b.key)
        b.mux.trust(a.key)
        a.mux.session(b.key, self.now).address = b.address
        return a, b

    def route(self, host: Host, destination: object, data: bytes) -> None:
        """Send as ``host``: through the beacon's relay for a RelayPath, else through the
        host's NAT unless the destination is on the same LAN."""
        if isinstance(destination, RelayPath):
            target = next((h for h in self.hosts.values() if h.key == destination.peer), None)
            if target is not None and not self.relay_down:
                self.relayed += 1
                # Two crossings (to the beacon and on), labelled as the relay would label it.
                self.send(RelayPath(host.key), target.address, data, hops=2)
            return
        assert isinstance(destination, tuple)
        target = self.hosts.get(destination)
        same_lan = target is not None and target.nat is host.nat
        source = host.address
        if host.nat is not None and not same_lan:
            source = host.nat.outbound(host.address, destination)
        self.send(source, destination, data)

    def _arrive(self, packet: _InFlight) -> tuple[Host, Source] | None:
        destination = packet.destination
        nat = self.nats.get(destination[0])
        if nat is not None and not isinstance(packet.source, RelayPath):
            # No hairpinning, as with Linux NAT: from behind a NAT its own public address is
            # unreachable, so same-LAN peers need their LAN candidates.
            hairpin = packet.source[0] == nat.name
            internal = None if hairpin else nat.inbound(destination, packet.source)
            if internal is None:
                self.dropped += 1
                return None
            destination = internal
        host = self.hosts.get(destination)
        return None if host is None else (host, packet.source)

    def start_stream(self, a: Host, b: Host, port: int, *messages: bytes) -> tuple[Session, int]:
        """a opens a stream to ``port`` on b, queues ``messages`` on it and starts the
        handshake: what a node does on connect() and send()."""
        session = a.mux.session(b.key, self.now)
        stream = session.open_stream(50000, port)
        for message in messages:
            session.send_message(stream, message)
        session.connect(self.now)
        return session, stream

    def send(self, source: Source, destination: Address, data: bytes, hops: int = 1) -> None:
        """Put one datagram on the wire, subject to the link profile."""
        profile = self.profile
        if self.tap is not None:
            tapped = self.tap(source, destination, data)
            if tapped is None:
                return
            data = tapped
        copies = 2 if self.rng.random() < profile.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < profile.loss:
                self.dropped += 1
                continue
            at = self.now + hops * profile.delay + self.rng.random() * profile.jitter
            bottleneck = self.bottleneck
            if bottleneck is not None and (
                bottleneck.senders is None or source in bottleneck.senders
            ):
                left = bottleneck.admit(self.now, len(data))
                if left is None:
                    self.dropped += 1
                    continue
                at += left - self.now
            link = (source, destination)
            if self.rng.random() < profile.reorder:
                at += profile.delay
            else:
                at = max(at, self._link_tail.get(link, 0.0))
                self._link_tail[link] = at
            self._seq += 1
            heapq.heappush(self._queue, _InFlight(at, self._seq, source, destination, data))

    def flush(self, host: Host) -> None:
        # As the node's driver does: a take that let held-back messages out (or queued a window
        # update) is followed by another round of sending and events.
        again = True
        while again:
            again = False
            for data, destination in host.mux.datagrams_to_send(self.now):
                self.route(host, destination, data)
            event = host.mux.next_event()
            while event is not None:
                host.events.append(event)
                if isinstance(event, events.PathChanged) and event.path == "relay":
                    self.reintroduce(host, event.peer)
                if isinstance(event, events.MessageReceived):
                    host.messages.append(event)
                    if host.auto_consume:
                        session = host.mux.get_session(event.peer)
                        if session is not None and session.message_consumed(
                            event.stream_id, len(event.data)
                        ):
                            again = True
                event = host.mux.next_event()

    def flush_all(self) -> None:
        for host in self.hosts.values():
            self.flush(host)

    def step(self) -> bool:
        """Advance to the next packet arrival or timer and process it; False if nothing is due."""
        self.flush_all()
        next_packet = self._queue[0].at if self._queue else None
        timers = [t for h in self.hosts.values() if (t := h.mux.get_timer()) is not None]
        next_timer = min(timers) if timers else None
        candidates = [t for t in (next_packet, next_timer) if t is not None]
        if not candidates:
            return False
        due = max(self.now, min(candidates))
        self._stalled = self._stalled + 1 if due == self.now else 0
        if self._stalled > 100_000:
            raise AssertionError(f"a timer stays due at t={self.now} without progress")
        self.now = due
        while self._queue and self._queue[0].at <= self.now:
            packet = heapq.heappop(self._queue)
            arrival = self._arrive(packet)
            if arrival is not None:
                host, source = arrival
                self.delivered += 1
                host.mux.receive_datagram(packet.data, source, self.now)
        for host in self.hosts.values():
            timer = host.mux.get_timer()
            if timer is not None and timer <= self.now:
                host.mux.handle_timer(self.now)
        self.flush_all()
        return True

    def run_until(self, condition: Callable[[], bool], max_time: float = 60.0) -> bool:
        """Step until ``condition()`` holds (True) or simulated ``max_time`` passes (False)."""
        deadline = self.now + max_time
        while not condition():
            if self.now > deadline or not self.step():
                return condition()
        return True

    def run_for(self, duration: float) -> None:
        deadline = self.now + duration
        while self.now < deadline and self.step():
            pass
