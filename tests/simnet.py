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
from pilot_agents.net import crypto, events
from pilot_agents.net.config import SessionConfig
from pilot_agents.net.mux import Mux

Address = tuple[str, int]


@dataclass
class LinkProfile:
    delay: float = 0.010  # seconds, one way
    jitter: float = 0.0  # seconds, uniform extra delay; order kept, as a FIFO queue does
    reorder: float = 0.0  # probability a datagram is held back one extra delay, overtaken
    loss: float = 0.0  # probability a datagram is dropped
    duplicate: float = 0.0  # probability a datagram arrives twice


@dataclass
class Host:
    address: Address
    identity: Identity
    mux: Mux
    events: list[events.Event] = field(default_factory=list)
    messages: list[events.MessageReceived] = field(default_factory=list)
    # Simulated application: take every message at once, releasing flow-control credit.
    auto_consume: bool = True

    @property
    def key(self) -> bytes:
        return self.identity.public_key


@dataclass(order=True)
class _InFlight:
    at: float
    seq: int
    source: Address = field(compare=False)
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
        self.tap: Callable[[Address, Address, bytes], bytes | None] | None = None
        self._queue: list[_InFlight] = []
        self._seq = 0
        self._stalled = 0
        self._link_tail: dict[tuple[Address, Address], float] = {}

    def add_host(self, name: str, config: SessionConfig | None = None) -> Host:
        identity = Identity(*crypto.ed25519_seed_keypair(self.rng.randbytes(32)))
        address = (name, 4000 + len(self.hosts))
        mux = Mux(
            identity.secret_key,
            identity.public_key,
            config or SessionConfig(),
            wall_clock_ns=lambda: int(1_700_000_000e9 + self.now * 1e9),
            random_bits=self.rng.getrandbits,
        )
        host = Host(address, identity, mux)
        self.hosts[address] = host
        return host

    def pair(self, config: SessionConfig | None = None) -> tuple[Host, Host]:
        """Two hosts that trust each other and know each other's address."""
        a, b = self.add_host("a", config), self.add_host("b", config)
        a.mux.trust(b.key)
        b.mux.trust(a.key)
        a.mux.session(b.key, self.now).address = b.address
        return a, b

    def send(self, source: Address, destination: Address, data: bytes) -> None:
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
            at = self.now + profile.delay + self.rng.random() * profile.jitter
            link = (source, destination)
            if self.rng.random() < profile.reorder:
                at += profile.delay
            else:
                at = max(at, self._link_tail.get(link, 0.0))
                self._link_tail[link] = at
            self._seq += 1
            heapq.heappush(self._queue, _InFlight(at, self._seq, source, destination, data))

    def flush(self, host: Host) -> None:
        for data, destination in host.mux.datagrams_to_send(self.now):
            self.send(host.address, destination, data)
        event = host.mux.next_event()
        while event is not None:
            host.events.append(event)
            if isinstance(event, events.MessageReceived):
                host.messages.append(event)
                if host.auto_consume:
                    session = host.mux.get_session(event.peer)
                    if session is not None:
                        session.message_consumed(event.stream_id, len(event.data))
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
            host = self.hosts.get(packet.destination)
            if host is not None:
                self.delivered += 1
                host.mux.receive_datagram(packet.data, packet.source, self.now)
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
