"""A fleet sans-IO, on a fake clock: two beacon cores on one store, nodes' fleet clients.

What the real fleet test (test_beacon_fleet.py) shows with processes, this shows step by step
and to the second: a peer of another beacon is introduced and relayed by its home, where the
node is a guest (and nothing of the guest reaches the store); an ELSEWHERE is followed; a node
fails over within two keepalive intervals (onto a guest's beacon, it takes over what waited for
the guest); a guest is left when no peer needs it, and when it dies, the peers routed through it
are looked up and introduced again.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from pilot_agents.beacon import service
from pilot_agents.beacon.server import BeaconConfig, BeaconServer
from pilot_agents.beacon.store import NameStore, Store, run_now
from pilot_agents.errors import ConfigError, WireError
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.traversal.beacon_wire import Address
from pilot_agents.net.traversal.fleet import MAX_HELD, FleetClient, HomeMoved, RelayDropped
from pilot_agents.net.tunnel import crypto, wire
from pilot_agents.node.node import CONTROL_VIA_RELAY, Node
from tests.test_beacon_store import Deferred

A: Address = ("198.51.100.1", 9000)
B: Address = ("198.51.100.2", 9000)
WALL0 = time.time_ns()  # the store keeps relay blocks until their end on the real clock
INTERVAL = bc.BeaconClientConfig.keepalive_interval
DATA = bytes([wire.DATA]) + b"sealed"
E = TypeVar("E", bound=bc.BeaconEvent)


@dataclass
class Member:
    client: FleetClient
    local: Address
    events: list[bc.BeaconEvent] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.client.home.public_key

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


class FleetNet:
    """Beacons at A and B on one store (one SQLite file, shared as a Redis would be), nodes on
    public addresses. ``down`` beacons neither receive nor send.

    With ``workers_at_b``, B is that many worker cores on one address, as ``--workers`` runs
    them, and the store's calls wait for the network's turn, as Redis's do; a node's datagrams
    to B reach the worker ``add`` was given (the kernel's hash of its address)."""

    def __init__(
        self, tmp: Path, config: BeaconConfig | None = None, workers_at_b: int = 1
    ) -> None:
        self.now = 0.0
        self.rng = random.Random(7)
        secret, public = crypto.ed25519_keypair()
        self.store = NameStore(tmp / "fleet.db")
        shared: Store = self.store
        if workers_at_b > 1:
            shared = Deferred(self.store)  # type: ignore[assignment]
        self.workers = {
            address: [
                BeaconServer(
                    secret,
                    public,
                    shared,
                    config or BeaconConfig(),
                    wall_clock_ns=self._wall,
                    home=name,
                    advertise=address,
                    worker=None if count == 1 else index,
                )
                for index in range(count)
            ]
            for name, address, count in (("a", A, 1), ("b", B, workers_at_b))
        }
        self.beacons = {address: workers[0] for address, workers in self.workers.items()}
        self.lands: dict[Address, int] = {}  # a node's address -> its worker at B
        self.down: set[Address] = set()
        self.members: dict[Address, Member] = {}
        # What each beacon received, and from where.
        self.to: dict[Address, list[tuple[bytes, Address]]] = {A: [], B: []}

    def _wall(self) -> int:
        return WALL0 + int(self.now * 1e9)

    def add(self, hostname: str | None, beacons: list[Address], worker: int = 0) -> Member:
        secret, public = crypto.ed25519_keypair()
        local = (f"203.0.113.{len(self.members) + 1}", 5000)
        return self._start(secret, public, hostname, beacons, local, worker)

    def restart(self, member: Member, beacons: list[Address]) -> Member:
        """The same node (key and name) starts again, from another address, with ``beacons``."""
        old = self.members.pop(member.local).client.home
        local = (f"203.0.113.{200 + len(self.members)}", 5000)
        return self._start(old.secret, old.public_key, old.hostname, beacons, local, 0)

    def _start(self, secret: bytes, public: bytes, hostname: str | None,
               beacons: list[Address], local: Address, worker: int) -> Member:
        self.lands[local] = worker
        client = FleetClient(
            secret, public, hostname, beacons, wall_clock_ns=self._wall,
            random_bytes=self.rng.randbytes,
        )
        client.set_local_candidates([local])
        member = self.members[local] = Member(client, local)
        client.start(self.now)
        self.run()
        return member

    def run(self) -> None:
        for _ in range(100):
            moved = 0
            for member in self.members.values():
                for data, destination in member.client.datagrams_to_send(self.now):
                    moved += 1
                    self.send(member, data, destination)
                self._collect(member)
            for address, server in self.servers():
                for call in server.store_calls():
                    moved += 1
                    server.store_done(call.call_id, run_now(call.coroutine), self.now)
                for data, destination in server.datagrams_to_send():
                    moved += 1
                    member = self.members.get(destination)
                    if member is not None and address not in self.down:
                        member.client.receive_datagram(data, address, self.now)
                        self._collect(member)
            if not moved:
                return
        raise AssertionError("the datagrams never settle")

    def send(self, member: Member, data: bytes, beacon: Address) -> None:
        """A datagram from ``member`` to ``beacon``, at the worker its address lands on."""
        if beacon in self.workers and beacon not in self.down:
            self.to[beacon].append((data, member.local))
            self.worker(beacon, member).receive_datagram(data, member.local, self.now)

    def worker(self, beacon: Address, member: Member) -> BeaconServer:
        workers = self.workers[beacon]
        return workers[self.lands[member.local] % len(workers)]

    def servers(self) -> list[tuple[Address, BeaconServer]]:
        return [(a, server) for a, workers in self.workers.items() for server in workers]

    def _collect(self, member: Member) -> None:
        while (event := member.client.next_event()) is not None:
            member.events.append(event)

    def advance(self, seconds: float, step: float = 0.25) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for _, server in self.servers():
                server.handle_timer(self.now)
            for member in self.members.values():
                member.client.handle_timer(self.now)
                self._collect(member)
            self.run()

    def sent_to(self, beacon: Address, kind: int) -> int:
        return sum(1 for data, _ in self.to[beacon] if data[0] == kind)

    def sent_by(self, member: Member, beacon: Address) -> int:
        return sum(1 for _, source in self.to[beacon] if source == member.local)


@pytest.fixture
def net(tmp_path: Path) -> FleetNet:
    return FleetNet(tmp_path)


def test_a_peer_of_another_beacon_is_introduced_and_relayed_by_its_home(net: FleetNet) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    assert alpha.client.registered and bravo.client.registered

    request = alpha.client.resolve("bravo", net.now)
    net.run()
    [resolved] = alpha.of(bc.Resolved)
    assert resolved.request_id == request and resolved.home == B
    assert alpha.client.route(bravo.key) == B

    # The first relayed packet waits while alpha attaches to B as a guest, then leaves.
    assert alpha.client.relay(bravo.key, DATA, net.now) is None
    alpha.client.introduce(bravo.key, net.now)
    net.run()
    assert bravo.of(bc.Relayed) == [bc.Relayed(alpha.key, DATA)]
    [pushed] = bravo.of(bc.Introduction)
    assert pushed.peer_key == alpha.key and alpha.local in pushed.candidates
    [answer] = alpha.of(bc.Introduction)
    assert answer.peer_key == bravo.key and bravo.local in answer.candidates
    assert alpha.client.addresses == {A, B}

    # Both ways through B: bravo answers through its home, where alpha is now a guest.
    datagram, to = alpha.client.relay(bravo.key, DATA, net.now) or (b"", A)
    assert to == B and datagram == bw.encode_relay(bravo.key, DATA)
    datagram, to = bravo.client.relay(alpha.key, b"\x04reply", net.now) or (b"", A)
    assert to == B
    net.beacons[B].receive_datagram(datagram, bravo.local, net.now)
    net.run()
    assert alpha.of(bc.Relayed) == [bc.Relayed(bravo.key, b"\x04reply")]
    assert net.beacons[B].stats.guests == 1

    # The guest lives in B's memory only (one process on SQLite: nothing for other workers);
    # the store still has alpha at its home.
    found = run_now(net.store.find_key(alpha.key, "b"))
    assert found.registration is not None and found.registration.home == "a"
    assert found.guest is None
    assert found.registration.home_address == A
    # And a lookup at B of alpha leads to A, not to the guest.
    bravo.client.resolve(alpha.client.home.hostname or "", net.now)
    net.run()
    [found_alpha] = bravo.of(bc.Resolved)
    assert found_alpha.home == A


def test_held_packets_are_bounded(net: FleetNet) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    net.down.add(B)
    alpha.client.resolve("bravo", net.now)
    net.run()
    for _ in range(MAX_HELD + 10):
        assert alpha.client.relay(bravo.key, DATA, net.now) is None
    net.down.clear()
    net.advance(2)
    assert len(bravo.of(bc.Relayed)) == MAX_HELD
    assert len(alpha.of(RelayDropped)) == 10  # the oldest, reported


def test_an_introduction_refused_as_elsewhere_is_followed_to_the_peers_home(
    net: FleetNet,
) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    alpha.client.introduce(bravo.key, net.now)  # no lookup first: A says ELSEWHERE, at B
    net.run()
    assert not alpha.of(bc.IntroductionFailed)
    [answer] = alpha.of(bc.Introduction)
    assert answer.peer_key == bravo.key
    assert net.beacons[A].stats.refusals["introduce_elsewhere"] == 1
    assert alpha.client.route(bravo.key) == B


def test_a_silent_home_is_left_for_the_next_within_two_keepalive_intervals(
    net: FleetNet,
) -> None:
    alpha = net.add("alpha", [A, B])
    net.advance(3 * INTERVAL)
    assert alpha.client.beacon == A and net.sent_to(B, bw.REGISTER) == 0
    net.down.add(A)
    died = net.now
    while net.sent_to(B, bw.REGISTER) == 0:
        net.advance(0.25)
        assert net.now <= died + 2 * INTERVAL, "no fail-over within two keepalive intervals"
    net.run()
    assert alpha.client.beacon == B and alpha.client.registered
    assert alpha.of(HomeMoved) == [HomeMoved(A, B)]
    found = run_now(net.store.find_name("alpha"))
    assert found.registration is not None and found.registration.home == "b"
    # It stays at B when A returns: going back would move it twice.
    net.down.clear()
    net.advance(3 * INTERVAL)
    assert alpha.client.beacon == B


def test_a_lookup_waiting_on_a_dead_home_is_answered_by_the_next(net: FleetNet) -> None:
    net.add("bravo", [B])
    alpha = net.add("alpha", [A, B])
    net.advance(INTERVAL)
    net.down.add(A)
    net.advance(2 * INTERVAL - 1)
    # Asked of A, which is gone, a second before alpha gives up on it (a request earlier in
    # those two intervals times out after its three tries, 3 s, and fails as before).
    request = alpha.client.resolve("bravo", net.now)
    net.advance(INTERVAL)
    assert alpha.client.beacon == B
    [resolved] = alpha.of(bc.Resolved)
    assert resolved.request_id == request and resolved.hostname == "bravo"
    assert not alpha.of(bc.ResolveFailed)


def test_a_lost_keepalive_is_not_a_dead_beacon(net: FleetNet) -> None:
    alpha = net.add("alpha", [A, B])
    net.advance(INTERVAL - 0.5)
    net.down.add(A)  # the next keepalive (or its answer) is lost
    net.advance(1.0)
    net.down.clear()
    net.advance(4 * INTERVAL)
    assert alpha.client.beacon == A and not alpha.of(HomeMoved)


def test_a_first_beacon_that_never_answers_is_passed_over(net: FleetNet) -> None:
    net.down.add(A)
    alpha = net.add("alpha", [A, B])
    net.advance(4)
    assert alpha.client.registered and alpha.client.beacon == B
    assert not alpha.of(bc.BeaconUnreachable)
    net.down.add(B)
    bravo = net.add("bravo", [A, B])
    net.advance(10)
    assert bravo.of(bc.BeaconUnreachable)  # once round the list, then it keeps trying


def test_a_guest_is_left_when_no_peer_is_routed_through_it(net: FleetNet) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    alpha.client.introduce(bravo.key, net.now)
    net.advance(1)
    assert B in alpha.client.addresses
    alpha.client.forget_peer(bravo.key)
    net.advance(1)
    assert alpha.client.addresses == {A}
    before = net.sent_by(alpha, B)
    net.advance(3 * INTERVAL)
    assert net.sent_by(alpha, B) == before  # no keepalives, no refreshes


def test_an_elsewhere_naming_our_own_home_brings_the_peer_back_there(net: FleetNet) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    alpha.client.introduce(bravo.key, net.now)
    net.run()
    assert alpha.client.route(bravo.key) == B
    # bravo starts again at A; once B has forgotten it, B answers ELSEWHERE, naming A.
    bravo = net.restart(bravo, [A])
    net.advance(BeaconConfig().registration_ttl + 10)
    alpha.events.clear()
    alpha.client.introduce(bravo.key, net.now)
    net.run()
    assert alpha.client.route(bravo.key) == A
    assert [e.peer_key for e in alpha.of(bc.Introduction)] == [bravo.key]
    assert not alpha.of(bc.IntroductionFailed)  # followed, not reported
    assert alpha.client.relay(bravo.key, DATA, net.now) == (bw.encode_relay(bravo.key, DATA), A)


def test_an_elsewhere_that_comes_after_forget_peer_attaches_no_guest(net: FleetNet) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    alpha.client.introduce(bravo.key, net.now)
    alpha.client.forget_peer(bravo.key)  # the tunnel closed before A answered ELSEWHERE
    net.advance(3 * INTERVAL)
    assert alpha.client.addresses == {A} and alpha.client.route(bravo.key) == A
    assert not alpha.of(bc.IntroductionFailed) and not alpha.of(bc.Introduction)


def test_a_lookup_that_comes_after_forget_peer_attaches_no_guest(net: FleetNet) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    alpha.client.introduce(bravo.key, net.now)
    net.run()
    # alpha's datagrams to B are lost (B is up for everyone else): alpha leaves its guest
    # there and asks A where bravo is; its tunnel closes before A answers.
    net.down.add(B)
    while B in alpha.client.addresses:
        net.now += 0.25
        alpha.client.handle_timer(net.now)
    net.down.discard(B)
    alpha.client.forget_peer(bravo.key)
    alpha.events.clear()
    net.advance(3 * INTERVAL)
    # The answer still says where bravo is (B), but nobody is introduced or attached for it.
    assert alpha.client.addresses == {A}
    assert alpha.client.route(bravo.key) == B and not alpha.of(bc.Introduction)


def test_a_forgotten_route_is_not_taken_as_located(net: FleetNet) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    alpha.client.resolve("bravo", net.now)
    net.run()
    assert alpha.client.located(bravo.key, net.now) and alpha.client.route(bravo.key) == B
    alpha.client.forget_peer(bravo.key)
    # A trust request looks it up again rather than go through our home, which cannot relay it.
    assert not alpha.client.located(bravo.key, net.now)


def test_a_nat_type_learnt_later_reaches_the_guest_beacons_too(net: FleetNet) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    alpha.client.introduce(bravo.key, net.now)
    net.advance(1)
    alpha.client.set_nat_type("symmetric")
    net.advance(2 * INTERVAL)
    bravo.events.clear()
    bravo.client.introduce(alpha.key, net.now)  # through its home, where alpha is a guest
    net.run()
    (introduction,) = bravo.of(bc.Introduction)
    assert introduction.nat_type == "symmetric"


def test_when_a_guests_beacon_dies_its_peers_are_found_where_they_went(net: FleetNet) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B, A])
    alpha.client.introduce(bravo.key, net.now)
    net.advance(1)
    assert alpha.client.route(bravo.key) == B
    net.down.add(B)
    net.advance(3 * INTERVAL)
    # bravo moved to A; alpha left its guest at B, looked bravo up at A and was introduced.
    assert bravo.client.beacon == A and alpha.client.addresses == {A}
    assert alpha.client.route(bravo.key) == A
    assert [e.peer_key for e in alpha.of(bc.Introduction)][-1] == bravo.key
    assert alpha.client.relay(bravo.key, DATA, net.now) == (bw.encode_relay(bravo.key, DATA), A)


def test_a_node_whose_home_dies_moves_to_where_it_was_a_guest(net: FleetNet) -> None:
    alpha = net.add("alpha", [A, B])
    bravo = net.add("bravo", [B])
    alpha.client.introduce(bravo.key, net.now)
    net.advance(1)
    assert alpha.client.route(bravo.key) == B and net.beacons[B]._nodes[alpha.key].guest
    net.down.add(A)
    net.advance(3 * INTERVAL)
    # Its guest session at B gave way to its registration there; bravo is now at its home.
    assert alpha.client.beacon == B and alpha.client.addresses == {B}
    assert not net.beacons[B]._nodes[alpha.key].guest and net.beacons[B]._guest_count == 0
    assert alpha.client.relay(bravo.key, DATA, net.now) == (bw.encode_relay(bravo.key, DATA), B)
    found = run_now(net.store.find_name("alpha"))
    assert found.registration is not None and found.registration.home == "b"


def test_a_guest_claims_no_name_and_a_guest_message_is_not_a_register(net: FleetNet) -> None:
    secret, public = crypto.ed25519_keypair()
    guest = bw.encode_register(secret, public, WALL0, bw.NatType.OPEN, None, [], guest=True)
    parsed = bw.parse_register_untrusted(guest)
    assert parsed.guest and parsed.verify()
    # The same body under REGISTER's type fails its signature: GUEST has its own context.
    forged = bw.parse_register_untrusted(bytes([bw.REGISTER]) + guest[1:])
    assert not forged.guest and not forged.verify()
    with pytest.raises(ValueError):
        bw.encode_register(secret, public, WALL0, bw.NatType.OPEN, "name", [], guest=True)


def test_the_home_field_is_signed_and_absent_without_a_home() -> None:
    secret, public = crypto.ed25519_keypair()
    me = crypto.ed25519_keypair()[1]
    key = bytes(range(32))
    args = (secret, me, bw.Status.OK, 7, key, bw.NatType.CONE, "bravo", [("192.0.2.9", 4000)])
    local = bw.encode_resolved(*args)
    elsewhere = bw.encode_resolved(*args, B)
    assert len(elsewhere) == len(local) + 1 + 19  # a count of 1 and the address
    assert bw.parse_resolved_untrusted(local).home is None
    parsed = bw.parse_resolved_untrusted(elsewhere)
    assert parsed.home == B and parsed.verify(public, me)
    refused = bw.encode_introduction(
        secret, me, bw.Status.ELSEWHERE, 7, WALL0, key, bw.NatType.UNKNOWN, (), B
    )
    introduction = bw.parse_introduction_untrusted(refused)
    assert introduction.home == B and introduction.verify(public, me)
    # A home field must hold its address: a count of 0 there is no message we send.
    body = local[: -bw.SIG_SIZE] + b"\x00"
    with pytest.raises(WireError):
        bw.parse_resolved_untrusted(body + bytes(bw.SIG_SIZE))


def test_a_wildcard_beacon_on_a_shared_store_must_advertise() -> None:
    with pytest.raises(ConfigError, match="--advertise"):
        service._advertised(None, ("0.0.0.0", 9000), alone=False)
    assert service._advertised(None, ("0.0.0.0", 9000), alone=True) is None
    assert service._advertised(None, ("127.0.0.1", 9000), alone=False) == ("127.0.0.1", 9000)
    assert service._advertised("192.0.2.7:9100", ("0.0.0.0", 9000), False) == ("192.0.2.7", 9100)
    with pytest.raises(ConfigError, match="IP:PORT"):
        service._advertised("beacon.example:9000", ("0.0.0.0", 9000), alone=False)


def test_a_guest_and_a_node_on_different_workers_meet_and_relay_both_ways(tmp_path: Path) -> None:
    net = FleetNet(tmp_path, workers_at_b=2)
    alpha = net.add("alpha", [A], worker=0)  # at B, as a guest, on worker 0
    bravo = net.add("bravo", [B], worker=1)
    first, second = net.workers[B]
    alpha.client.introduce(bravo.key, net.now)  # ELSEWHERE from A, then at B as a guest
    net.run()
    assert alpha.key in first._nodes and first._nodes[alpha.key].guest
    assert alpha.key not in second._nodes and bravo.key not in first._nodes
    [answer] = alpha.of(bc.Introduction)
    assert answer.peer_key == bravo.key and bravo.local in answer.candidates
    [pushed] = bravo.of(bc.Introduction)  # sent by worker 0, from the store's bravo
    assert pushed.peer_key == alpha.key and alpha.local in pushed.candidates

    # The store has alpha as B's guest, apart from its registration at A.
    found = run_now(net.store.find_key(alpha.key, "b"))
    assert found.registration is not None and found.registration.home == "a"
    assert found.guest is not None and found.guest.observed == alpha.local
    assert found.guest.home == "b" and found.guest.hostname is None

    # Bravo asks for alpha at its home: worker 1 introduces it to B's guest (before, it
    # answered ELSEWHERE, sending bravo to A for a peer that is here).
    request = bravo.client.introduce(alpha.key, net.now)
    net.run()
    introduction = bravo.of(bc.Introduction)[-1]
    assert introduction.request_id == request and introduction.peer_key == alpha.key
    assert alpha.local in introduction.candidates
    assert alpha.of(bc.Introduction)[-1].peer_key == bravo.key
    assert second.stats.refusals["introduce_elsewhere"] == 0
    assert bravo.client.route(alpha.key) == B and bravo.client.addresses == {B}  # no guest at A

    # The relay both ways, each packet relayed by the worker its sender lands on.
    datagram, to = alpha.client.relay(bravo.key, DATA, net.now) or (b"", A)
    assert to == B
    net.send(alpha, datagram, to)
    net.run()
    assert bravo.of(bc.Relayed) == [bc.Relayed(alpha.key, DATA)]
    datagram, to = bravo.client.relay(alpha.key, b"\x04reply", net.now) or (b"", A)
    assert to == B
    net.send(bravo, datagram, to)
    net.run()
    assert alpha.of(bc.Relayed) == [bc.Relayed(bravo.key, b"\x04reply")]
    assert (first.stats.relayed_packets, second.stats.relayed_packets) == (1, 1)
    assert not second.stats.refusals["relay_target_offline"]

    # Alpha blocks bravo at its worker (BLOCK_RELAY to B, which relayed him): worker 1 holds
    # the block once its lookup of alpha (sibling_ttl old) is made again.
    while not alpha.client.report_invalid_relayed(bravo.key, net.now):
        pass
    net.run()
    net.advance(BeaconConfig().sibling_ttl + 1)
    datagram, to = bravo.client.relay(alpha.key, b"\x04blocked", net.now) or (b"", A)
    net.send(bravo, datagram, to)  # looked up again; served the last answer meanwhile
    net.run()
    net.send(bravo, datagram, to)
    net.run()
    assert second.stats.refusals["relay_blocked"] == 1
    assert alpha.of(bc.Relayed).count(bc.Relayed(bravo.key, b"\x04blocked")) == 1



def test_guests_are_bounded_per_worker(tmp_path: Path) -> None:
    net = FleetNet(tmp_path, BeaconConfig(max_guests=1))
    bravo = net.add("bravo", [B])
    alpha, charlie = net.add("alpha", [A]), net.add("charlie", [A])
    alpha.client.introduce(bravo.key, net.now)
    net.run()
    charlie.client.introduce(bravo.key, net.now)
    net.run()
    b = net.beacons[B]
    assert b._nodes[alpha.key].guest and charlie.key not in b._nodes
    assert b.stats.refusals["guest_limit"] == 1 and b.stats.guests == 1
    # The guest there refreshes; once it has left and expired, the next gets in.
    net.advance(2 * INTERVAL)
    assert b.stats.refusals["guest_limit"] >= 1 and alpha.key in b._nodes
    alpha.client.forget_peer(bravo.key)
    net.advance(BeaconConfig().registration_ttl + 10)
    assert alpha.key not in b._nodes
    charlie.client.introduce(bravo.key, net.now)
    net.advance(5)
    assert b._nodes[charlie.key].guest


def _fail_over_to_a_guest_not_attached_yet(
    net: FleetNet, b_answers: bool = True
) -> tuple[Member, Member, bytes, int]:
    """alpha (at A, then B) fails over to B just after a trust request and an introduction
    for bravo (at B) began to wait for its guest there, which has not attached yet."""
    alpha = net.add("alpha", [A, B])
    bravo = net.add("bravo", [B])
    alpha.client.resolve("bravo", net.now)
    net.run()
    assert alpha.client.route(bravo.key) == B
    net.down.add(A)
    gone = alpha.client.home.last_heard + 2 * INTERVAL
    net.advance(gone - net.now - 0.5)
    assert alpha.client.beacon == A
    request = bytes([CONTROL_VIA_RELAY]) + b"trust me"
    assert alpha.client.relay(bravo.key, request, net.now) is None
    introduction = alpha.client.introduce(bravo.key, net.now)
    if not b_answers:
        net.down.add(B)
    net.now = gone
    alpha.client.handle_timer(net.now)  # before the guest's first GUEST went out
    assert alpha.client.beacon == B
    return alpha, bravo, request, introduction


def test_a_home_moved_to_a_guests_beacon_takes_over_what_waited_for_the_guest(
    net: FleetNet,
) -> None:
    alpha, bravo, request, introduction = _fail_over_to_a_guest_not_attached_yet(net)
    net.run()
    assert alpha.client.registered and alpha.client.addresses == {B}
    assert alpha.of(HomeMoved) == [HomeMoved(A, B)]
    # Both go out at the new home: HomeMoved has the node introduce its tunnels' peers again,
    # but nothing would send a trust request again.
    assert bravo.of(bc.Relayed) == [bc.Relayed(alpha.key, request)]
    assert [e.request_id for e in alpha.of(bc.Introduction)] == [introduction]
    assert not alpha.of(bc.IntroductionFailed)


def test_packets_held_for_a_home_that_never_answered_are_not_sent_later(net: FleetNet) -> None:
    alpha, bravo, request, introduction = _fail_over_to_a_guest_not_attached_yet(
        net, b_answers=False
    )
    net.down.discard(A)
    net.advance(10)  # B never answers: alpha goes back to A
    assert alpha.client.beacon == A and alpha.client.registered
    [failed] = alpha.of(bc.IntroductionFailed)  # at B, which never registered us
    assert failed.request_id == introduction
    assert alpha.of(RelayDropped) == [
        RelayDropped(bravo.key, request, "the beacon at 198.51.100.2:9000 went silent before it "
                     "registered us")
    ]
    net.down.clear()
    alpha.client.resolve("bravo", net.now)
    net.run()
    later = bytes([CONTROL_VIA_RELAY]) + b"trust me now"
    assert alpha.client.relay(bravo.key, later, net.now) is None
    net.advance(2)
    assert bravo.of(bc.Relayed) == [bc.Relayed(alpha.key, later)]


def test_a_trust_request_sent_while_the_new_home_registers_us_waits_for_it(
    tmp_path: Path,
) -> None:
    net = FleetNet(tmp_path, workers_at_b=2)  # B's store answers in its turn, as Redis does
    alpha = net.add("alpha", [A, B])
    bravo = net.add("bravo", [B])
    net.down.add(A)
    gone = alpha.client.home.last_heard + 2 * INTERVAL
    net.advance(gone - net.now - 0.5)
    net.now = gone
    alpha.client.handle_timer(net.now)
    assert alpha.client.beacon == B and not alpha.client.registered
    for data, to in alpha.client.datagrams_to_send(net.now):  # the REGISTER at B
        net.send(alpha, data, to)
    # Sent before B has registered us (its store has not answered the claim of our name yet):
    # B would drop it, and nothing sends a trust request again.
    request = bytes([CONTROL_VIA_RELAY]) + b"trust me"
    relayed = alpha.client.relay(bravo.key, request, net.now)
    if relayed is not None:
        net.send(alpha, *relayed)
    net.run()
    assert alpha.client.registered
    assert bravo.of(bc.Relayed) == [bc.Relayed(alpha.key, request)]


def test_a_trust_request_held_for_a_guest_that_never_attached_is_reported_lost(
    net: FleetNet, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alpha = net.add("alpha", [A])
    bravo = net.add("bravo", [B])
    alpha.client.resolve("bravo", net.now)
    net.run()
    net.down.add(B)  # before alpha's GUEST there is answered
    request = bytes([CONTROL_VIA_RELAY]) + b"trust me"
    assert alpha.client.relay(bravo.key, request, net.now) is None
    net.advance(4)  # two GUESTs unanswered: alpha leaves B, and what waited for it
    net.down.clear()
    net.advance(2)
    assert not bravo.of(bc.Relayed)
    # The node sent it once and its trust_add reply said so: it must hear of the loss.
    [dropped] = alpha.of(RelayDropped)
    assert dropped == RelayDropped(
        bravo.key, request, "the beacon at 198.51.100.2:9000: it stopped answering"
    )
    node = Node(tmp_path / "alpha")
    with caplog.at_level(logging.WARNING, logger="pilot_agents.node"):
        node._on_beacon_event(dropped)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("the trust request to ") and "stopped answering" in warning
