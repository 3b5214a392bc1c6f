"""The beacon core and the node's beacon client together, sans-IO, on a fake clock.

A tiny in-memory network carries datagrams between :class:`BeaconClient` instances and a
:class:`BeaconServer`. Each client sits behind a NAT model that decides which source address the
beacon sees per destination: "open" (none), "cone" (one mapping) or "symmetric" (one per
destination), so NAT classification is tested against the behaviour it infers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from pilot_agents.addressing import parse_beacon_spec
from pilot_agents.beacon.server import BeaconConfig, BeaconServer
from pilot_agents.beacon.store import NameStore
from pilot_agents.errors import ConfigError, NameTakenError
from pilot_agents.identity import node_id_from_key
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.traversal import stun
from pilot_agents.net.traversal.beacon_wire import Address, NatType, Status
from pilot_agents.net.tunnel import crypto, wire

BEACON: Address = ("198.51.100.1", 9000)
ALT: Address = ("198.51.100.1", 9001)
WALL0 = 1_764_000_000 * 10**9
E = TypeVar("E", bound=bc.BeaconEvent)
DATA_PACKET = bytes([wire.DATA]) + b"sealed"  # what an established tunnel relays


@dataclass
class Peer:
    client: bc.BeaconClient
    local: Address
    nat: str  # open, cone, symmetric
    public_ip: str
    events: list[bc.BeaconEvent] = field(default_factory=list)
    mappings: dict[Address, Address] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        return self.client.public_key

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


class Net:
    def __init__(self, tmp: Path, config: BeaconConfig | None = None, *, db: str = "n.db") -> None:
        self.tmp = tmp
        self.now = 0.0
        self.skew_ns = 0  # added to the beacon's wall clock
        self.secret, self.public = crypto.ed25519_keypair()
        self.config = config or BeaconConfig(alt_port=ALT[1])
        self.store = NameStore(tmp / db)
        self.server = self._new_server()
        self.peers: list[Peer] = []
        self.by_public: dict[Address, Peer] = {}
        self.drop_to_beacon = False
        self.drop_from_beacon = False
        self.to_beacon: list[tuple[bytes, Address]] = []  # every datagram the beacon got
        self.port = 40000
        self.rng = random.Random(5)

    def _new_server(self) -> BeaconServer:
        return BeaconServer(
            self.secret,
            self.public,
            self.store,
            self.config,
            now=self.now,
            wall_clock_ns=lambda: WALL0 + int(self.now * 1e9) + self.skew_ns,
        )

    def restart_server(self, *, reopen_store: bool = False) -> None:
        if reopen_store:
            self.store.close()
            self.store = NameStore(self.tmp / "n.db")
        self.server = self._new_server()

    def add(
        self,
        hostname: str | None,
        *,
        nat: str = "cone",
        beacon_key: bytes | None = None,
        config: bc.BeaconClientConfig | None = None,
        clock_offset_s: float = 0.0,
        start: bool = True,
    ) -> Peer:
        secret, public = crypto.ed25519_keypair()
        index = len(self.peers) + 1
        local = (f"10.0.{index}.2", 5000)
        client = bc.BeaconClient(
            secret,
            public,
            hostname,
            BEACON,
            beacon_key=beacon_key,
            config=config,
            wall_clock_ns=lambda: WALL0 + int((self.now + clock_offset_s) * 1e9),
            random_bytes=self.rng.randbytes,
        )
        public_ip = local[0] if nat == "open" else f"203.0.113.{index}"
        peer = Peer(client, local, nat, public_ip)
        client.set_local_candidates([local])
        self.peers.append(peer)
        if start:
            client.start(self.now)
            self.run()
        return peer

    def mapped(self, peer: Peer, destination: Address) -> Address:
        if peer.nat == "open":
            public = peer.local
        else:
            scope = destination if peer.nat == "symmetric" else BEACON
            if scope not in peer.mappings:
                self.port += 1
                peer.mappings[scope] = (peer.public_ip, self.port)
            public = peer.mappings[scope]
        self.by_public[public] = peer
        return public

    def inject(self, data: bytes, source: Address) -> None:
        """A datagram from anyone to the beacon's main port."""
        self.server.receive_datagram(data, source, self.now)
        self.deliver()

    def deliver(self) -> int:
        moved = 0
        for data, address in self.server.datagrams_to_send():
            moved += 1
            peer = self.by_public.get(address)
            if peer is not None and not self.drop_from_beacon:
                peer.client.receive_datagram(data, self.now)
        for data, address in self.server.alt_datagrams_to_send():
            moved += 1
            peer = self.by_public.get(address)
            if peer is not None and not self.drop_from_beacon:
                peer.client.receive_datagram(data, self.now)
        for peer in self.peers:
            event = peer.client.next_event()
            while event is not None:
                peer.events.append(event)
                event = peer.client.next_event()
        return moved

    def run(self) -> None:
        """Move datagrams until nothing is in flight."""
        for _ in range(100):
            moved = 0
            for peer in self.peers:
                for data, destination in peer.client.datagrams_to_send(self.now):
                    moved += 1
                    source = self.mapped(peer, destination)
                    self.to_beacon.append((data, source))
                    if self.drop_to_beacon:
                        continue
                    if destination == BEACON:
                        self.server.receive_datagram(data, source, self.now)
                    elif destination == ALT:
                        self.server.receive_alt_datagram(data, source, self.now)
            moved += self.deliver()
            if not moved:
                return
        raise AssertionError("the network never went quiet")

    def advance(self, seconds: float) -> None:
        """Move the clock, firing every timer on the way."""
        end = self.now + seconds
        while True:
            timers = [p.client.get_timer() for p in self.peers] + [self.server.get_timer()]
            due = min((t for t in timers if t is not None), default=end)
            if due > end:
                break
            self.now = max(self.now, due)
            for peer in self.peers:
                timer = peer.client.get_timer()
                if timer is not None and timer <= self.now:
                    peer.client.handle_timer(self.now)
            self.server.handle_timer(self.now)
            self.run()
        self.now = end
        self.run()


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


def last(peer: Peer, kind: type[E]) -> E:
    found = peer.of(kind)
    assert found, f"no {kind.__name__} in {peer.events}"
    return found[-1]


# -- registration --------------------------------------------------------------------------------


def test_registration_accepted(net: Net) -> None:
    alice = net.add("alice")
    event = last(alice, bc.Registered)
    assert isinstance(event, bc.Registered)
    assert event.reflexive == alice.mappings[BEACON]
    assert event.expires == pytest.approx(net.now + 90)
    assert alice.client.registered
    assert alice.client.beacon_key == net.public  # pinned on first use
    status = net.server.status(net.now)
    assert status["registered_nodes"] == 1 and status["registrations"] == 1
    assert status["names"] == 1
    assert net.store.owner("alice") == alice.key


def test_refresh_every_25_seconds_is_quiet(net: Net) -> None:
    alice = net.add("alice")
    sent = len(net.to_beacon)
    net.advance(100)
    registers = [d for d, _ in net.to_beacon[sent:] if d[0] == bw.REGISTER]
    assert len(registers) == 4  # at 25, 50, 75, 100
    assert len(alice.of(bc.Registered)) == 1  # refreshes that change nothing say nothing
    assert net.server.stats.refreshes == 5  # and one when the NAT type became known
    assert net.server.status(net.now)["registered_nodes"] == 1


def test_name_taken_by_another_key(net: Net) -> None:
    net.add("alice")
    mallory = net.add("alice")
    event = last(mallory, bc.RegistrationFailed)
    assert isinstance(event, bc.RegistrationFailed)
    assert event.code == Status.NAME_TAKEN and event.permanent
    assert "name taken" in event.reason
    assert isinstance(event.to_error(), NameTakenError)
    assert not mallory.client.registered
    assert mallory.client.get_timer() is None  # stops: a new name is needed
    assert net.server.stats.refusals["name_taken"] == 1
    with pytest.raises(Exception, match="name taken"):
        mallory.client.resolve("alice", net.now)


def test_name_ownership_survives_a_store_reopen(net: Net) -> None:
    alice = net.add("alice")
    net.restart_server(reopen_store=True)
    mallory = net.add("alice")
    assert last(mallory, bc.RegistrationFailed).code == Status.NAME_TAKEN
    # The owner gets its name back after the restart.
    alice.events.clear()
    net.advance(26)
    assert alice.client.registered
    assert net.server.status(net.now)["registered_nodes"] == 1


def _claim_names(net: Net, names: list[str], source: Address) -> bytes:
    """One key registers under each name in turn (a second apart); the key."""
    secret, public = crypto.ed25519_keypair()
    for name in names:
        net.now += 1.0
        data = bw.encode_register(
            secret, public, WALL0 + int(net.now * 1e9), NatType.OPEN, name, []
        )
        net.inject(data, source)
    return public


def test_one_key_holds_one_name_and_a_new_one_is_a_rename(net: Net) -> None:
    # Issue #11 item 8: one key claimed 14 names, each held forever.
    names = [f"name-{i}" for i in range(14)]
    public = _claim_names(net, names, ("192.0.2.50", 7))
    assert net.store.names_of(public) == ["name-13"]
    assert net.store.count() == 1
    # The names it gave up are free for anyone.
    other = _claim_names(net, ["name-0"], ("192.0.2.51", 7))
    assert net.store.names_of(other) == ["name-0"]


def test_max_names_per_key_is_a_setting(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(max_names_per_key=3))
    public = _claim_names(net, ["one", "two", "three", "four"], ("192.0.2.50", 7))
    assert net.store.names_of(public) == ["two", "three", "four"]


def _register_bytes(
    net: Net,
    *,
    name: str | None = "carol",
    ts: int | None = None,
    key: tuple[bytes, bytes] | None = None,
) -> tuple[bytes, bytes]:
    secret, public = key or crypto.ed25519_keypair()
    stamp = WALL0 + int(net.now * 1e9) if ts is None else ts
    return bw.encode_register(secret, public, stamp, NatType.CONE, name, []), public


def _answers(net: Net, data: bytes, source: Address) -> list[bytes]:
    net.server.receive_datagram(data, source, net.now)
    return [d for d, a in net.server.datagrams_to_send() if a == source]


def _status_of(reply: bytes) -> Status:
    return bw.parse_registered_untrusted(reply).status


def test_replayed_register_is_refused(net: Net) -> None:
    source = ("192.0.2.9", 1000)
    key = crypto.ed25519_keypair()
    first, _ = _register_bytes(net, key=key)
    assert [_status_of(r) for r in _answers(net, first, source)] == [Status.OK]
    # The same datagram again from the same address: a network duplicate, the same answer.
    again = _answers(net, first, source)
    assert len(again) == 1 and _status_of(again[0]) == Status.OK
    net.now += 1
    second, _ = _register_bytes(net, key=key)
    assert _status_of(_answers(net, second, source)[0]) == Status.OK
    # The first one replayed later, from anywhere: stale.
    for attacker in (source, ("192.0.2.66", 6666)):
        assert _status_of(_answers(net, first, attacker)[0]) == Status.STALE_TIMESTAMP
    # A copy of the latest from another address doesn't move the registration either.
    assert _status_of(_answers(net, second, ("192.0.2.66", 6666))[0]) == Status.STALE_TIMESTAMP
    assert net.server.stats.refusals["stale_timestamp"] == 3


def test_replay_defence_outlives_the_registration(net: Net) -> None:
    # A node whose clock runs 59 s ahead: its REGISTER is still within the skew window after the
    # registration itself expired, so the beacon must remember the timestamp longer.
    source = ("192.0.2.9", 1000)
    data, _ = _register_bytes(net, ts=WALL0 + 59 * 10**9)
    assert _status_of(_answers(net, data, source)[0]) == Status.OK
    net.now = 95.0
    net.server.handle_timer(net.now)
    assert net.server.status(net.now)["registered_nodes"] == 0
    assert _status_of(_answers(net, data, ("192.0.2.66", 1))[0]) == Status.STALE_TIMESTAMP


def test_stale_timestamp_is_refused(net: Net) -> None:
    carol = net.add("carol", clock_offset_s=-61)
    event = last(carol, bc.RegistrationFailed)
    assert event.code == Status.STALE_TIMESTAMP and not event.permanent
    assert "clock" in event.reason
    dave = net.add("dave", clock_offset_s=59)
    assert dave.client.registered


def test_bad_signature_is_refused_without_an_answer(net: Net) -> None:
    # An answer would cost a signature and be longer than the request.
    data, _ = _register_bytes(net)
    forged = data[:-1] + bytes([data[-1] ^ 1])
    assert _answers(net, forged, ("192.0.2.9", 1)) == []
    assert net.server.stats.refusals["bad_signature"] == 1


@pytest.mark.parametrize("name", ["Carol", "-carol", "a" * 64, "car_ol", "x.y"])
def test_bad_name_is_refused(net: Net, name: str) -> None:
    data, _ = _register_bytes(net, name=name[:63])
    (reply,) = _answers(net, data, ("192.0.2.9", 1))
    assert _status_of(reply) == (Status.OK if name == "a" * 64 else Status.BAD_NAME)


def test_client_refuses_bad_names_locally() -> None:
    secret, public = crypto.ed25519_keypair()
    with pytest.raises(ConfigError, match="bad name"):
        bc.BeaconClient(secret, public, "not_a_name", BEACON)
    client = bc.BeaconClient(secret, public, "MixedCase", BEACON)
    assert client.hostname == "mixedcase"


def test_registration_expires_without_refresh(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob")
    net.drop_to_beacon = True
    net.advance(89)
    assert net.server.status(net.now)["registered_nodes"] == 2
    assert alice.client.registered and not alice.of(bc.BeaconUnreachable)
    net.advance(2)
    assert net.server.status(net.now)["registered_nodes"] == 0
    # Alice's own view: the registration lapsed, the beacon is unreachable.
    assert not alice.client.registered
    assert last(alice, bc.BeaconUnreachable)
    # They come back by themselves (retries back off to 16 s) when the beacon answers again.
    net.drop_to_beacon = False
    net.advance(16)
    assert bob.client.registered and alice.client.registered
    assert len(alice.of(bc.Registered)) == 2


def test_resolve_ok_unknown_offline(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob", nat="symmetric")
    net.advance(2)  # let bob's classification reach the beacon
    ok = alice.client.resolve("bob", net.now)
    unknown = alice.client.resolve("nobody", net.now)
    by_id = alice.client.resolve(node_id_from_key(bob.key), net.now)
    unknown_id = alice.client.resolve(node_id_from_key(crypto.ed25519_keypair()[1]), net.now)
    net.run()
    resolved = {e.request_id: e for e in alice.of(bc.Resolved)}
    failed = {e.request_id: e for e in alice.of(bc.ResolveFailed)}
    assert resolved[ok].node_key == bob.key
    assert resolved[ok].hostname == "bob"
    assert resolved[ok].candidates == (bob.mappings[BEACON], bob.local)
    assert resolved[ok].nat_type == "symmetric"
    assert resolved[by_id].node_key == bob.key and resolved[by_id].hostname == "bob"
    assert failed[unknown].code == Status.UNKNOWN and "unknown" in failed[unknown].reason
    assert failed[unknown_id].code == Status.UNKNOWN
    # Bob goes away: his name is known, he is offline.
    net.peers.remove(bob)
    net.advance(95)
    offline = alice.client.resolve("bob", net.now)
    net.run()
    (event,) = [e for e in alice.of(bc.ResolveFailed) if e.request_id == offline]
    assert event.code == Status.OFFLINE and "offline" in event.reason
    assert net.server.stats.resolves == 5


def test_only_registered_nodes_may_resolve(net: Net) -> None:
    net.add("alice")
    (reply,) = _answers(net, bw.encode_resolve(7, hostname="alice"), ("192.0.2.99", 1))
    assert bw.parse_refused_untrusted(reply) == (Status.NOT_REGISTERED, 7)
    assert net.server.stats.refusals["not_registered"] == 1


def test_resolve_before_registration_waits_for_it(net: Net) -> None:
    net.add("bob")
    alice = net.add("alice", start=False)
    request = alice.client.resolve("bob", net.now)
    net.run()
    assert not alice.events
    alice.client.start(net.now)
    net.run()
    assert [e.request_id for e in alice.of(bc.Resolved)] == [request]


def test_resolve_times_out_after_three_tries(net: Net) -> None:
    alice = net.add("alice")
    net.drop_from_beacon = True
    sent = len(net.to_beacon)
    request = alice.client.resolve("bob", net.now)
    start = net.now
    net.advance(2.9)
    assert not alice.of(bc.ResolveFailed)
    net.advance(0.2)
    event = last(alice, bc.ResolveFailed)
    assert event.request_id == request and event.code is None
    assert "timeout" in event.reason
    resolves = [d for d, _ in net.to_beacon[sent:] if d[0] == bw.RESOLVE]
    assert len(resolves) == 3
    assert net.now - start == pytest.approx(3.1)


def test_beacon_unreachable(net: Net) -> None:
    net.drop_to_beacon = True
    alice = net.add("alice")
    net.advance(6.9)
    assert not alice.of(bc.BeaconUnreachable)
    net.advance(0.2)  # 1 + 2 + 4 s of unanswered REGISTERs
    event = last(alice, bc.BeaconUnreachable)
    assert "no answer" in event.reason
    # It keeps trying (capped backoff) and recovers by itself.
    net.drop_to_beacon = False
    net.advance(17)
    assert alice.client.registered
    assert len(alice.of(bc.BeaconUnreachable)) == 1


def test_beacon_restart_makes_clients_register_again(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob")
    net.now += 5
    net.restart_server()  # live registrations are gone, names are not
    request = alice.client.resolve("bob", net.now)
    net.run()
    # Alice was told she is not registered, registered again, resent: still bob is unknown to
    # the fresh beacon until his refresh.
    assert alice.client.registered
    failed = last(alice, bc.ResolveFailed)
    assert failed.request_id == request and failed.code == Status.OFFLINE
    net.advance(25)
    assert bob.client.registered
    request = alice.client.resolve("bob", net.now)
    net.run()
    assert last(alice, bc.Resolved).request_id == request


# -- pinning -----------------------------------------------------------------------------------


def test_pinned_key_rejects_another_beacon(net: Net) -> None:
    alice = net.add("alice", beacon_key=crypto.ed25519_keypair()[1])
    assert not alice.client.registered
    assert alice.client.stats.bad_signature >= 1
    net.advance(8)
    event = last(alice, bc.BeaconUnreachable)
    assert "unexpected key" in event.reason


def test_first_use_pin_holds_after_the_beacon_changes_key(net: Net) -> None:
    alice = net.add("alice")
    assert alice.client.beacon_key == net.public
    net.secret, net.public = crypto.ed25519_keypair()  # an impostor answers from now on
    net.restart_server()
    net.advance(26)
    assert alice.client.beacon_key != net.public
    assert alice.client.stats.bad_signature >= 1
    assert alice.client.registered  # until its registration lapses


def test_replies_for_someone_else_are_ignored(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob")
    request = bob.client.resolve("alice", net.now)
    net.run()
    # Bob's signed answer replayed to alice under a request id she has outstanding.
    answer = bw.encode_resolved(
        net.secret, bob.key, Status.OK, request, alice.key, NatType.CONE, "alice", ()
    )
    alice.client._next_id = request
    alice.client.resolve("bob", net.now)
    alice.client.receive_datagram(answer, net.now)
    assert alice.client.stats.bad_signature == 1


# -- introductions -----------------------------------------------------------------------------


def test_introduction_reaches_both_sides(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob")
    request = alice.client.introduce(bob.key, net.now)
    net.run()
    to_alice = last(alice, bc.Introduction)
    to_bob = last(bob, bc.Introduction)
    assert isinstance(to_alice, bc.Introduction) and isinstance(to_bob, bc.Introduction)
    assert to_alice.request_id == request and to_bob.request_id == 0
    assert to_alice.peer_key == bob.key and to_bob.peer_key == alice.key
    assert to_alice.candidates == (bob.mappings[BEACON], bob.local)
    assert to_bob.candidates == (alice.mappings[BEACON], alice.local)
    assert to_alice.nat_type == to_bob.nat_type == "cone"
    assert net.server.stats.introductions == 1


def test_introduction_to_an_unknown_or_offline_node_fails(net: Net) -> None:
    alice = net.add("alice")
    stranger = crypto.ed25519_keypair()[1]
    request = alice.client.introduce(stranger, net.now)
    net.run()
    event = last(alice, bc.IntroductionFailed)
    assert event.request_id == request and event.code == Status.UNKNOWN
    assert event.peer_key == stranger
    bob = net.add("bob")
    net.peers.remove(bob)
    net.advance(95)
    alice.client.introduce(bob.key, net.now)
    net.run()
    assert last(alice, bc.IntroductionFailed).code == Status.OFFLINE
    assert net.server.stats.introductions == 0


def test_stale_pushed_introduction_is_ignored(net: Net) -> None:
    alice = net.add("alice")
    old = bw.encode_introduction(
        net.secret,
        alice.key,
        Status.OK,
        0,
        WALL0 - 10**12,
        crypto.ed25519_keypair()[1],
        NatType.CONE,
        (("192.0.2.1", 1),),
    )
    alice.client.receive_datagram(old, net.now)
    assert alice.client.next_event() is None
    assert alice.client.stats.unexpected == 1


# -- relay --------------------------------------------------------------------------------------


def _relay(net: Net, sender: Peer, receiver: Peer, packet: bytes) -> None:
    source = sender.mappings[BEACON]
    net.server.receive_datagram(sender.client.wrap_relay(receiver.key, packet), source, net.now)
    net.deliver()


def test_relay_forwards_both_ways(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob")
    _relay(net, alice, bob, b"sealed from alice")
    _relay(net, bob, alice, b"sealed from bob" * 70)
    assert last(bob, bc.Relayed) == bc.Relayed(alice.key, b"sealed from alice")
    assert last(alice, bc.Relayed) == bc.Relayed(bob.key, b"sealed from bob" * 70)
    stats = net.server.status(net.now)
    assert stats["relayed_packets"] == 2
    assert stats["relayed_bytes"] == len(b"sealed from alice") + 70 * len(b"sealed from bob")
    assert stats["relay_pairs"] == 2


def test_relay_from_unregistered_source_is_refused(net: Net) -> None:
    bob = net.add("bob")
    (reply,) = _answers(net, bw.encode_relay(bob.key, b"x"), ("192.0.2.66", 6666))
    assert bw.parse_refused_untrusted(reply) == (Status.NOT_REGISTERED, 0)
    assert not bob.of(bc.Relayed)
    assert net.server.stats.refusals["relay_not_registered"] == 1


def test_relay_to_offline_target_is_dropped(net: Net) -> None:
    alice = net.add("alice")
    _relay_data = alice.client.wrap_relay(crypto.ed25519_keypair()[1], b"x")
    assert _answers(net, _relay_data, alice.mappings[BEACON]) == []
    assert net.server.stats.refusals["relay_target_offline"] == 1


def test_relay_after_beacon_restart_triggers_reregistration(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob")
    net.restart_server()
    _relay(net, alice, bob, b"lost")
    # The REGISTER just before the restart (its NAT type) was under a second ago: wait for that.
    assert net.server.status(net.now)["registered_nodes"] == 0
    net.advance(1.0)
    assert alice.client.registered
    assert net.server.status(net.now)["registered_nodes"] == 1  # alice, without waiting 25 s
    # A flood of (forged) REFUSEDs makes at most one REGISTER per second.
    sent = len(net.to_beacon)
    for _ in range(100):
        alice.client.receive_datagram(bw.encode_refused(Status.NOT_REGISTERED, 0), net.now)
        net.run()
    assert len(net.to_beacon) - sent <= 1


# -- rate limits and counters ------------------------------------------------------------------


def test_rate_limit_per_source_ip(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(source_rate=10, source_burst=20))
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"s" * 12
    answered = sum(len(_answers(net, request, ("192.0.2.7", p))) for p in range(1, 101))
    assert answered == 20
    assert net.server.stats.refusals["rate_limited"] == 80
    net.now += 1.0  # refills 10
    answered = sum(len(_answers(net, request, ("192.0.2.7", 1))) for _ in range(30))
    assert answered == 10
    # Another IP has its own allowance.
    assert len(_answers(net, request, ("192.0.2.8", 1))) == 1


def test_rate_limit_per_node_registrations(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(register_rate=0.1, register_burst=3))
    key = crypto.ed25519_keypair()
    statuses = []
    for i in range(5):
        net.now += 0.01
        data, _ = _register_bytes(net, key=key, name=None)
        statuses.append(_status_of(_answers(net, data, ("192.0.2.9", 100 + i))[0]))
    assert statuses == [Status.OK] * 3 + [Status.RATE_LIMITED] * 2
    # Forged REGISTERs under the same key don't spend its allowance.
    net.now += 10.0
    for _ in range(20):
        data, _ = _register_bytes(net, key=key, name=None)
        _answers(net, data[:-1] + bytes([data[-1] ^ 1]), ("192.0.2.66", 1))
    data, _ = _register_bytes(net, key=key, name=None)
    assert _status_of(_answers(net, data, ("192.0.2.9", 1))[0]) == Status.OK


def test_rate_limit_per_node_relay(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(relay_packet_rate=100, relay_packet_burst=10))
    alice = net.add("alice")
    bob = net.add("bob")
    for _ in range(15):
        _relay(net, alice, bob, DATA_PACKET)
    assert len(bob.of(bc.Relayed)) == 10
    assert net.server.stats.refusals["relay_rate_limited"] == 5
    net.now += 0.05  # 5 more tokens
    for _ in range(15):
        _relay(net, alice, bob, DATA_PACKET)
    assert len(bob.of(bc.Relayed)) == 15


def test_rate_limit_per_node_bytes(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(relay_byte_rate=1000, relay_byte_burst=3000))
    alice = net.add("alice")
    bob = net.add("bob")
    for _ in range(5):
        _relay(net, alice, bob, DATA_PACKET.ljust(1000, b"x"))
    assert len(bob.of(bc.Relayed)) == 3


def test_status_counters_and_query(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob")
    alice.client.resolve("bob", net.now)
    alice.client.introduce(bob.key, net.now)
    net.run()
    _relay(net, alice, bob, b"abc")
    net.inject(b"\xff garbage", ("192.0.2.1", 1))
    (reply,) = _answers(net, bw.encode_status_request(42), ("192.0.2.200", 5))
    request_id, counters = bw.parse_status_reply_untrusted(reply)
    assert request_id == 42
    assert len(reply) <= bw.STATUS_REQUEST_SIZE
    assert counters["registered_nodes"] == 2
    assert counters["registrations"] == 2
    assert counters["resolves"] == 1
    assert counters["introductions"] == 1
    assert counters["relayed_packets"] == 1 and counters["relayed_bytes"] == 3
    assert counters["stun_requests"] == 2  # the two classification probes
    assert counters["refusals"] == {"malformed": 1}
    assert counters["beacon_key"] == node_id_from_key(net.public)
    assert counters["uptime_s"] >= 0


# -- NAT classification ------------------------------------------------------------------------


@pytest.mark.parametrize("nat", ["open", "cone", "symmetric"])
def test_nat_classification(net: Net, nat: str) -> None:
    peer = net.add("alice", nat=nat)
    assert peer.client.nat_type == nat
    (event,) = peer.of(bc.NatClassified)
    assert event == bc.NatClassified(nat)
    # The beacon learned it from the REGISTER sent right after classification.
    bob = net.add("bob")
    bob.client.resolve("alice", net.now)
    net.run()
    assert last(bob, bc.Resolved).nat_type == nat


def test_without_alt_port_the_type_stays_unknown(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(alt_port=0))
    peer = net.add("alice", nat="symmetric")
    assert peer.client.nat_type == "unknown"
    assert not [d for d, _ in net.to_beacon if d[0] < 4]


def test_manual_nat_type_wins(net: Net) -> None:
    peer = net.add("alice", nat="symmetric", start=False)
    peer.client.set_nat_type("cone")
    peer.client.start(net.now)
    net.run()
    assert peer.client.nat_type == "cone"
    with pytest.raises(ConfigError):
        peer.client.set_nat_type("weird")


def test_candidate_change_reregisters_at_once(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob")
    alice.client.set_local_candidates([("10.9.9.9", 5000), ("fd00::5", 5000)])
    net.advance(0)
    bob.client.resolve("alice", net.now)
    net.run()
    assert last(bob, bc.Resolved).candidates == (
        alice.mappings[BEACON],
        ("10.9.9.9", 5000),
        ("fd00::5", 5000),
    )
    with pytest.raises(ConfigError):
        alice.client.set_local_candidates([("host.example", 1)])


# -- hostile input -----------------------------------------------------------------------------


def test_random_datagrams_never_break_the_beacon(net: Net) -> None:
    alice = net.add("alice")
    bob = net.add("bob")
    rng = random.Random(3)
    valid = [
        # A fixed key: with a random one, whether a mutation leaves the REGISTER valid (a byte
        # "changed" to its own value) varied from run to run, and a valid one from alice's
        # address takes that address over (as a NAT reusing a port would), dropping alice.
        bw.encode_register(
            *crypto.ed25519_seed_keypair(b"\x07" * 32), WALL0, NatType.CONE, "x", []
        ),
        bw.encode_resolve(1, hostname="alice"),
        bw.encode_introduce(1, alice.key),
        bw.encode_relay(bob.key, b"x" * 40),
        bw.encode_status_request(1),
        b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"s" * 12,
    ]
    for i in range(4000):
        base = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        data = bytes(base[: rng.randrange(len(base) + 1)]) if i % 3 == 0 else bytes(base)
        source = alice.mappings[BEACON] if i % 2 else (f"192.0.2.{i % 200}", 1)
        net.server.receive_datagram(data, source, net.now)
        net.server.receive_alt_datagram(data, source, net.now)
        net.deliver()
    assert sum(net.server.stats.refusals.values()) > 1000
    # Still serving.
    request = bob.client.resolve("alice", net.now)
    net.run()
    assert last(bob, bc.Resolved).request_id == request


def test_random_datagrams_never_break_the_client(net: Net) -> None:
    alice = net.add("alice")
    rng = random.Random(4)
    for _ in range(3000):
        kind = rng.choice([*range(0x20, 0x2B), 0, 1, rng.randrange(256)])
        alice.client.receive_datagram(bytes([kind]) + rng.randbytes(rng.randrange(200)), net.now)
    events = []
    while (event := alice.client.next_event()) is not None:
        events.append(event)
    assert all(isinstance(e, bc.Relayed) for e in events)  # unauthenticated by design
    assert alice.client.registered


def test_store_reports_names(tmp_path: Path) -> None:
    store = NameStore(tmp_path / "x.db")
    a, b = b"a" * 32, b"b" * 32
    assert store.claim("alpha", a, 1, "192.0.2.1") == a
    assert store.claim("alpha", b, 2, "192.0.2.2") == a
    assert store.claim("beta", a, 3, "192.0.2.1") == a
    assert store.claimed_from("192.0.2.1") == 2 and store.claimed_from("192.0.2.2") == 0
    assert store.names_of(a) == ["alpha", "beta"] and store.names_of(b) == []
    assert store.count() == 2
    store.close()
    again = NameStore(tmp_path / "x.db")
    assert again.owner("alpha") == a and again.owner("gamma") is None
    again.close()


def test_callable_signature_of_the_spec() -> None:
    # The node constructs the client exactly like this.
    secret, public = crypto.ed25519_keypair()
    client = bc.BeaconClient(secret, public, None, BEACON, beacon_key=None, config=None)
    assert client.get_timer() is None and client.next_event() is None
    fn: Callable[[bytes, bytes], bytes] = client.wrap_relay
    assert fn(public, b"p") == bytes([bw.RELAY]) + public + b"p"


def test_stop_ends_refreshes_and_fails_requests(net: Net) -> None:
    alice = net.add("alice")
    net.drop_from_beacon = True
    request = alice.client.resolve("bob", net.now)
    net.run()
    alice.client.stop()
    net.deliver()
    assert last(alice, bc.ResolveFailed).request_id == request
    assert alice.client.get_timer() is None
    sent = len(net.to_beacon)
    net.advance(100)
    assert len(net.to_beacon) == sent


def test_beacon_spec_parsing() -> None:
    key = crypto.ed25519_keypair()[1]
    node_id = node_id_from_key(key)
    assert parse_beacon_spec(f"{node_id}@198.51.100.1:9000") == (key, ("198.51.100.1", 9000))
    assert parse_beacon_spec(f"{node_id.upper()}@[2001:db8::1]:9000") == (
        key,
        ("2001:db8::1", 9000),
    )
    assert parse_beacon_spec("beacon.example:9000") == (None, ("beacon.example", 9000))
    for bad in ("nokey@1.2.3.4:9000", "1.2.3.4", "1.2.3.4:0", f"{node_id}@:9000", ":9000"):
        with pytest.raises(ConfigError):
            parse_beacon_spec(bad)


# -- floods, names, amplification (issue #11, items 6, 8 and 9) ----------------------------------


def _forged_register(net: Net, name: str | None = None) -> bytes:
    data, _ = _register_bytes(net, name=name)
    return data[:-64] + bytes(64)


def test_register_flood_is_rationed_before_any_signature_check(tmp_path: Path) -> None:
    # Issue #11 item 8: bad-signature REGISTERs from 1,000 addresses, each checked and answered.
    config = BeaconConfig(alt_port=ALT[1], verify_rate=100.0, verify_burst=100.0)
    net = Net(tmp_path, config)
    alice = net.add("alice")
    sent = answers = 0
    for i in range(3000):
        source = (f"10.{i % 1000 // 250}.{i % 250}.1", 4000)
        net.server.receive_datagram(_forged_register(net), source, net.now)
        sent += 1
        answers += len(net.server.datagrams_to_send())
    refusals = net.server.stats.refusals
    assert answers == 0  # no signature spent on answers, nothing reflected
    # Checked: what was left of the budget after alice's registration, no more.
    assert refusals["bad_signature"] == 99
    assert refusals["verify_budget"] == sent - 99
    # The budget is spent: a new key is refused (unanswered) for now...
    net.inject(_register_bytes(net, name="newcomer")[0], ("192.0.2.200", 1))
    assert refusals["verify_budget"] == sent - 99 + 1
    # ... but a registered node's refresh has a budget of its own, at the same instant.
    refreshes = net.server.stats.refreshes
    alice.client.set_local_candidates([("10.9.9.9", 5000)])
    net.run()
    assert net.server.stats.refreshes == refreshes + 1
    assert alice.client.registered


def test_one_source_ip_is_limited_before_any_signature_check(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(register_source_rate=1.0, register_source_burst=5.0))
    for port in range(50):
        net.inject(_forged_register(net), ("192.0.2.77", port + 1))
    refusals = net.server.stats.refusals
    assert refusals["bad_signature"] == 5
    assert refusals["verify_source_limited"] == 45
    net.now += 2.0
    net.inject(_forged_register(net), ("192.0.2.77", 1))
    assert refusals["bad_signature"] == 6


def test_one_claimed_key_is_limited_before_any_signature_check(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(claimed_key_rate=1.0, claimed_key_burst=3.0))
    alice = net.add("alice")
    source = alice.mappings[BEACON]
    forged, _ = _register_bytes(net, name=None, key=(bytes(64), alice.key))
    for _ in range(20):
        net.inject(forged, source)
    refusals = net.server.stats.refusals
    assert refusals["bad_signature"] == 2  # alice's own REGISTER took one of the 3
    assert refusals["verify_key_limited"] == 18


def test_unpadded_register_gets_no_answer(net: Net) -> None:
    # A REGISTER shorter than REGISTERED: answering it would amplify.
    secret, public = crypto.ed25519_keypair()
    body = bw.encode_register(secret, public, WALL0, NatType.CONE, None, [])[:-64]
    body = body.rstrip(b"\0")
    data = body + crypto.ed25519_sign(secret, bw.REGISTER_CONTEXT + body)
    assert len(data) < bw.REGISTERED_SIZE
    assert _answers(net, data, ("192.0.2.9", 1)) == []
    assert net.server.stats.refusals["unpadded"] == 1


def test_every_register_answer_is_no_longer_than_its_request(net: Net) -> None:
    carol = net.add("carol")
    for name in (None, "a", "carol", "Bad_Name"):
        data, _ = _register_bytes(net, name=name)
        for reply in _answers(net, data, ("192.0.2.9", 1)):
            assert len(reply) <= len(data)
    stale, _ = _register_bytes(net, name=None, ts=WALL0 - 10**12, key=(bytes(64), carol.key))
    assert all(len(r) <= len(stale) for r in _answers(net, stale, ("192.0.2.9", 2)))


def test_names_claimed_from_one_address_are_capped(tmp_path: Path) -> None:
    # Issue #11 item 8: one address claimed 1,856 permanent names in 20 s, with many keys.
    net = Net(tmp_path, BeaconConfig(alt_port=ALT[1], max_names_per_ip=5))
    statuses = []
    for i in range(20):
        data, _ = _register_bytes(net, name=f"squat-{i}")
        statuses += [_status_of(r) for r in _answers(net, data, ("192.0.2.80", 1000 + i))]
    assert statuses == [Status.OK] * 5 + [Status.NAME_LIMIT] * 15
    assert net.store.count() == 5
    # Another address is not affected; a node told NAME_LIMIT stops retrying and says why.
    elsewhere = _answers(net, _register_bytes(net, name="x")[0], ("192.0.2.81", 1))
    assert [_status_of(r) for r in elsewhere] == [Status.OK]
    peer = net.add("late", start=False)
    peer.public_ip = "192.0.2.80"
    peer.client.start(net.now)
    net.advance(2.0)
    event = last(peer, bc.RegistrationFailed)
    assert event.code == Status.NAME_LIMIT and event.permanent
    assert "name limit" in event.reason


def test_unused_names_expire_and_the_expiry_survives_a_restart(tmp_path: Path) -> None:
    config = BeaconConfig(alt_port=ALT[1], name_expiry=1000.0, name_touch_interval=100.0)
    net = Net(tmp_path, config)
    kept = net.add("kept")
    gone = net.add("gone")
    net.advance(30.0)
    gone.client.stop()
    net.advance(600.0)
    net.restart_server(reopen_store=True)  # the last use is on disk, not in memory
    net.advance(500.0)
    assert net.store.owner("gone") is None
    assert net.store.owner("kept") == kept.key  # registering keeps it, for any length of time
    net.advance(3000.0)
    assert net.store.owner("kept") == kept.key
    assert kept.client.registered


def test_store_from_before_expiry_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE names (name TEXT PRIMARY KEY, node_key BLOB NOT NULL,"
        " claimed_ns INTEGER NOT NULL)"
    )
    db.execute("INSERT INTO names VALUES ('old', ?, 1)", (b"k" * 32,))
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = NameStore(path)
    assert store.owner("old") == b"k" * 32
    assert store.expire(1) == 0  # counted as used when the new beacon first opened it
    store.close()


def _stun_request(size: int) -> bytes:
    if size == stun.PADDED_REQUEST_SIZE:
        return stun.encode_binding_request(b"t" * 12, pad_to=size)
    return stun.encode_binding_request(b"t" * 12, fingerprint=False)


def test_stun_never_answers_an_unregistered_source_with_more_than_it_sent(
    tmp_path: Path,
) -> None:
    # Issue #11 item 8: some STUN replies were 2.3x the request.
    config = BeaconConfig(alt_port=ALT[1], stun_unpadded_rate=1.0, stun_unpadded_burst=3.0)
    net = Net(tmp_path, config)
    stranger = ("192.0.2.99", 5)
    padded = _stun_request(stun.PADDED_REQUEST_SIZE)
    for source in (stranger, ("2001:db8::1", 5)):
        for _ in range(10):
            (reply,) = _answers(net, padded, source)
            assert len(reply) <= len(padded)
    # An unknown comprehension-required attribute: the 420 answer would be 2.3x; silence.
    body = b"\x00\x03\x00\x04\x00\x00\x00\x02"
    request = b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"c" * 12 + body
    assert _answers(net, request, stranger) == []
    # Unpadded requests (any STUN client's): a small budget, shared by all unknown sources.
    small = _stun_request(20)
    answered = sum(len(_answers(net, small, (f"192.0.2.{i}", 5))) for i in range(10))
    assert answered == 3
    assert net.server.stats.refusals["stun_unpadded"] == 1 + 7
    # A registered node's own address is known: answered whatever the size.
    alice = net.add("alice")
    assert all(len(_answers(net, small, alice.mappings[BEACON])) == 1 for _ in range(10))


def test_node_pads_its_stun_request(net: Net) -> None:
    peer = net.add("sym", nat="symmetric")
    requests = [d for d, _ in net.to_beacon if d[0] < 4]
    assert requests and all(len(d) == stun.PADDED_REQUEST_SIZE for d in requests)
    assert peer.client.nat_type == "symmetric"
    assert net.server.stats.refusals["stun_unpadded"] == 0


# -- relayed handshakes and BLOCK_RELAY ----------------------------------------------------------

INITIATION = bytes([wire.INITIATION]) + b"i" * 116
TRUST_REQUEST = b"\x40" + b"t" * 100  # node.CONTROL_VIA_RELAY: the beacon treats it as a handshake


def test_relayed_handshakes_are_limited_per_pair_while_data_flows(tmp_path: Path) -> None:
    # Issue #11 items 6 and 9: initiations and trust requests flooded through the relay.
    config = BeaconConfig(relay_pair_handshake_rate=1.0, relay_pair_handshake_burst=5.0)
    net = Net(tmp_path, config)
    alice, bob, carol = net.add("alice"), net.add("bob"), net.add("carol")
    for _ in range(100):
        _relay(net, alice, bob, INITIATION)
        _relay(net, alice, bob, TRUST_REQUEST)
        _relay(net, alice, bob, DATA_PACKET)
        _relay(net, carol, bob, DATA_PACKET)
    got = [e.packet[0] for e in bob.of(bc.Relayed) if e.source_key == alice.key]
    assert got.count(wire.DATA) == 100
    assert got.count(wire.INITIATION) + got.count(0x40) == 5
    assert net.server.stats.refusals["relay_handshake_rate_limited"] == 195
    # carol -> bob is another pair: its handshakes are untouched by alice's flood.
    _relay(net, carol, bob, INITIATION)
    assert last(bob, bc.Relayed).packet == INITIATION
    net.now += 1.0
    _relay(net, alice, bob, INITIATION)
    assert last(bob, bc.Relayed) == bc.Relayed(alice.key, INITIATION)


def test_relayed_handshakes_are_limited_per_sender(tmp_path: Path) -> None:
    config = BeaconConfig(relay_handshake_rate=1.0, relay_handshake_burst=6.0)
    net = Net(tmp_path, config)
    alice = net.add("alice")
    targets = [net.add(f"t{i}") for i in range(4)]
    for _ in range(5):
        for target in targets:
            _relay(net, alice, target, INITIATION)
    assert sum(len(t.of(bc.Relayed)) for t in targets) == 6


def _block(
    net: Net, peer: Peer, blocked: bytes, seconds: int, *, stamp: int | None = None
) -> bytes:
    message = bw.encode_block_relay(
        peer.client.secret,
        peer.key,
        WALL0 + int(net.now * 1e9) if stamp is None else stamp,
        blocked,
        seconds,
    )
    net.inject(message, peer.mappings[BEACON])
    return message


def test_block_relay_stops_one_key_for_a_while(net: Net) -> None:
    alice, bob, carol = net.add("alice"), net.add("bob"), net.add("carol")
    block = _block(net, bob, alice.key, 60)
    assert net.server.datagrams_to_send() == []  # not answered
    _relay(net, alice, bob, DATA_PACKET)
    _relay(net, carol, bob, DATA_PACKET)
    _relay(net, bob, alice, DATA_PACKET)  # only the direction bob asked for
    assert [e.source_key for e in bob.of(bc.Relayed)] == [carol.key]
    assert len(alice.of(bc.Relayed)) == 1
    assert net.server.stats.refusals["relay_blocked"] == 1
    assert net.server.status(net.now)["relay_blocks"] == 1
    net.advance(61.0)
    _relay(net, alice, bob, DATA_PACKET)
    assert last(bob, bc.Relayed).source_key == alice.key
    # A replay of the block changes nothing: it ran from its own timestamp.
    net.inject(block, bob.mappings[BEACON])
    _relay(net, alice, bob, DATA_PACKET)
    assert len([e for e in bob.of(bc.Relayed) if e.source_key == alice.key]) == 2


def test_block_relay_is_lifted_and_an_old_block_cannot_undo_the_lift(net: Net) -> None:
    alice, bob = net.add("alice"), net.add("bob")
    block = _block(net, bob, alice.key, 600)
    net.now += 1.0
    _block(net, bob, alice.key, 0)
    net.inject(block, bob.mappings[BEACON])  # replayed: older than the lift
    _relay(net, alice, bob, DATA_PACKET)
    assert len(bob.of(bc.Relayed)) == 1
    assert net.server.stats.refusals["stale_timestamp"] == 1


def test_block_relay_must_be_signed_by_the_registered_node(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(max_block_duration=30.0))
    alice, bob, mallory = net.add("alice"), net.add("bob"), net.add("mallory")
    good = bw.encode_block_relay(bob.client.secret, bob.key, WALL0, alice.key, 600)
    forged = good[:-64] + bytes(64)
    net.inject(forged, bob.mappings[BEACON])
    net.inject(good, mallory.mappings[BEACON])  # bob's message from mallory's address
    _relay(net, alice, bob, DATA_PACKET)
    assert len(bob.of(bc.Relayed)) == 1
    refusals = net.server.stats.refusals
    assert refusals["bad_signature"] == 1 and refusals["block_not_registered"] == 1
    net.inject(good, bob.mappings[BEACON])
    net.advance(31.0)  # cut to max_block_duration
    _relay(net, alice, bob, DATA_PACKET)
    assert len(bob.of(bc.Relayed)) == 2


def test_blocks_per_node_are_bounded(tmp_path: Path) -> None:
    net = Net(tmp_path, BeaconConfig(max_blocks_per_node=3))
    bob = net.add("bob")
    for i in range(10):
        net.now += 0.001
        _block(net, bob, bytes([i]) * 32, 100 + i)
    assert net.server.status(net.now)["relay_blocks"] == 3


def test_node_asks_its_beacon_to_block_a_flooding_key(tmp_path: Path) -> None:
    config = bc.BeaconClientConfig(block_relay_after=5, block_relay_duration=60.0)
    net = Net(tmp_path)
    alice = net.add("alice")
    bob = net.add("bob", config=config)
    calls = [bob.client.report_invalid_relayed(alice.key, net.now) for _ in range(5)]
    assert calls == [False] * 4 + [True]
    net.run()
    _relay(net, alice, bob, INITIATION)
    assert not bob.of(bc.Relayed)
    assert net.server.stats.refusals["relay_blocked"] == 1
    # Reports spread thinner than the window never add up to a block.
    carol = net.add("carol")
    for _ in range(10):
        net.now += config.block_relay_window / 2
        assert not bob.client.report_invalid_relayed(carol.key, net.now)
    with pytest.raises(ConfigError):
        bob.client.block_relay(b"short", 1.0, net.now)


def test_trusting_a_blocked_key_lifts_its_block(tmp_path: Path) -> None:
    config = bc.BeaconClientConfig(block_relay_after=2, block_relay_duration=60.0)
    net = Net(tmp_path)
    alice = net.add("alice")
    bob = net.add("bob", config=config)
    for _ in range(2):
        bob.client.report_invalid_relayed(alice.key, net.now)
    net.run()
    _relay(net, alice, bob, INITIATION)
    assert not bob.of(bc.Relayed)
    net.now += 1.0
    assert bob.client.lift_block(alice.key, net.now)  # what Node.trust() calls
    assert not bob.client.lift_block(alice.key, net.now)  # once
    net.run()
    _relay(net, alice, bob, INITIATION)
    assert bob.of(bc.Relayed)


def test_name_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="name_touch_interval"):
        BeaconConfig(name_expiry=60.0, name_touch_interval=60.0)


def test_a_new_node_keeps_a_share_while_many_addresses_flood(tmp_path: Path) -> None:
    # Per-IP buckets cap what the flood takes of the global budget: 50 addresses at 1 check
    # each leave room in a budget of 100 for a newcomer from elsewhere.
    config = BeaconConfig(
        alt_port=ALT[1],
        verify_rate=1.0,
        verify_burst=100.0,
        register_source_rate=0.1,
        register_source_burst=1.0,
    )
    net = Net(tmp_path, config)
    for _ in range(10):
        for i in range(50):
            net.inject(_forged_register(net), (f"10.0.0.{i + 1}", 4000))
    refusals = net.server.stats.refusals
    assert refusals["bad_signature"] == 50 and refusals["verify_source_limited"] == 450
    newcomer = net.add("newcomer")
    assert newcomer.client.registered


def test_no_answer_to_an_unregistered_source_is_longer_than_its_request(tmp_path: Path) -> None:
    # The invariant behind issue #11 item 8's amplification finding, over every message kind
    # (the STUN budget for short requests set to zero).
    net = Net(tmp_path, BeaconConfig(alt_port=ALT[1], stun_unpadded_burst=0.0))
    bob = net.add("bob")
    rng = random.Random(11)
    secret, public = crypto.ed25519_keypair()
    stun_420 = b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"c" * 12 + b"\x00\x03\x00\x04\x00\x00\x00\x02"
    requests = [
        _register_bytes(net, name="carol")[0],
        _register_bytes(net, name="bob")[0],  # NAME_TAKEN
        _register_bytes(net, name="Bad")[0],
        _register_bytes(net, ts=1)[0],  # stale
        _forged_register(net),
        bw.encode_resolve(1, hostname="bob"),
        bw.encode_introduce(2, bob.key),
        bw.encode_status_request(3),
        bw.encode_relay(bob.key, DATA_PACKET),
        bw.encode_block_relay(secret, public, WALL0, bob.key, 60),
        _stun_request(20),
        _stun_request(stun.PADDED_REQUEST_SIZE),
        b"\x00\x01\x00\x00" + b"c" * 16,  # RFC 3489
        stun_420,
    ]
    requests += [
        bytes([rng.choice([0, 1, *range(0x20, 0x2C)])]) + rng.randbytes(rng.randrange(200))
        for _ in range(2000)
    ]
    for i, request in enumerate(requests):
        source = (f"192.0.2.{i % 200 + 1}", 1000 + i)
        for reply in _answers(net, request, source):
            assert len(reply) <= len(request), (request[:1], len(request), len(reply))


def test_a_node_sending_many_blocks_keeps_its_registration(tmp_path: Path) -> None:
    # A node flooded from many keys blocks each of them; its refreshes must not starve for it.
    net = Net(tmp_path, BeaconConfig(alt_port=ALT[1], claimed_key_burst=5.0))
    bob = net.add("bob")
    for i in range(60):
        net.now += 0.01
        _block(net, bob, bytes([i]) * 32, 600)
    assert net.server.status(net.now)["relay_blocks"] == 60
    net.advance(30.0)
    assert net.server.stats.refusals["verify_key_limited"] == 0
    assert bob.client.registered and net.server.live_nodes(net.now) == 1
