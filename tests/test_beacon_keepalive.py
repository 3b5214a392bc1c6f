"""Keepalives between a node and its beacon (issue #15), sans-IO on the fake clock of
``test_beacon_server``: a rebound NAT is noticed within one keepalive interval, and the beacon
answers only what proves the node's key, never longer than the request."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest

from pilot_agents.beacon.server import BeaconConfig
from pilot_agents.errors import WireError
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.tunnel import crypto
from tests.test_beacon_server import ALT, BEACON, Net, Peer

INTERVAL = 5.0  # the default keepalive interval
UDP_IPV4_HEADERS = 28  # bytes of IPv4 and UDP header per datagram


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path, BeaconConfig(alt_port=ALT[1]))


def sent(net: Net, since: int, kind: int) -> list[tuple[bytes, tuple[str, int]]]:
    return [(d, a) for d, a in net.to_beacon[since:] if d[0] == kind]


def beacon_answers(net: Net, data: bytes, source: tuple[str, int]) -> list[bytes]:
    """What the beacon sends back for one datagram."""
    net.server.receive_datagram(data, source, net.now)
    return [d for d, _ in net.server.datagrams_to_send()]


def keepalive_key(peer: Peer, net: Net) -> bytes:
    key = bw.keepalive_key(crypto.ed25519_sk_to_x25519(peer.client.secret), net.public, peer.key)
    assert key is not None
    return key


def rebind(net: Net, peer: Peer) -> tuple[str, int]:
    """The NAT forgets the peer's mapping to the beacon; the next packet gets a new port."""
    old = peer.mappings.pop(BEACON)
    net.by_public.pop(old)
    return old


def test_wire_round_trip_and_sizes() -> None:
    key = bytes(range(32))
    node = bytes(32)
    message = bw.parse_keepalive_untrusted(bw.encode_keepalive(key, node, 7))
    assert (message.node_key, message.counter) == (node, 7) and message.verify(key)
    assert not message.verify(bytes(32))
    seen = bw.encode_address(("203.0.113.5", 4))
    ack = bw.parse_keepalive_ack_untrusted(bw.encode_keepalive_ack(key, 7, seen))
    assert (ack.counter, ack.reflexive) == (7, ("203.0.113.5", 4)) and ack.verify(key)
    assert bw.KEEPALIVE_ACK_SIZE <= bw.KEEPALIVE_SIZE  # never an amplifier
    assert (bw.KEEPALIVE_SIZE, bw.KEEPALIVE_ACK_SIZE) == (57, 44)
    for bad in (b"", bw.encode_keepalive(key, node, 7)[:-1], bytes([bw.KEEPALIVE_ACK]) * 57):
        with pytest.raises(WireError):
            bw.parse_keepalive_untrusted(bad)


def test_parsers_raise_only_wire_errors() -> None:
    rng = random.Random(7)
    key = bytes(32)
    good = [
        bw.encode_keepalive(key, bytes(32), 9),
        bw.encode_keepalive_ack(key, 9, bw.encode_address(("2001:db8::1", 9))),
    ]
    samples = [rng.randbytes(rng.choice((44, 57, rng.randrange(80)))) for _ in range(3000)]
    for data in good:
        samples += [data[:cut] for cut in range(len(data))]
        samples += [data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :] for i in range(len(data))]
    for data in samples:
        for parse in (bw.parse_keepalive_untrusted, bw.parse_keepalive_ack_untrusted):
            with contextlib.suppress(WireError):  # anything else fails the test
                parse(data)


def test_both_sides_derive_one_key(net: Net) -> None:
    alice = net.add("alice")
    beacon_side = bw.keepalive_key(crypto.ed25519_sk_to_x25519(net.secret), alice.key, alice.key)
    assert beacon_side == keepalive_key(alice, net)


def test_idle_node_sends_a_keepalive_every_interval_and_is_answered(net: Net) -> None:
    alice = net.add("alice")
    since, start = len(net.to_beacon), net.now
    net.advance(100)
    keepalives = sent(net, since, bw.KEEPALIVE)
    # every 5 s, but a REGISTER (every 25 s) resets the count: it holds the mapping too
    assert 15 <= len(keepalives) <= 20, len(keepalives)
    assert net.server.stats.keepalives == len(keepalives)
    assert alice.client.stats.unexpected == alice.client.stats.bad_signature == 0
    assert len(alice.of(bc.Registered)) == 1  # nothing changed, nothing said
    registers = sent(net, since, bw.REGISTER)
    assert len(registers) == 4
    per_second = (
        len(keepalives) * (bw.KEEPALIVE_SIZE + bw.KEEPALIVE_ACK_SIZE + 2 * UDP_IPV4_HEADERS)
        + len(registers) * (bw.REGISTER_MIN_SIZE + bw.REGISTERED_SIZE + 2 * UDP_IPV4_HEADERS)
    ) / (net.now - start)
    assert per_second < 50, per_second  # bytes/s both ways: see benchmarks/RESULTS.md


def test_rebound_nat_reregisters_within_one_interval_and_names_the_old_address(
    net: Net,
) -> None:
    alice = net.add("alice")
    net.advance(7)  # between keepalives
    old = rebind(net, alice)
    t_rebind = net.now
    while not len(alice.of(bc.Registered)) > 1:
        net.advance(0.1)
        assert net.now - t_rebind <= INTERVAL + 0.2, "no re-registration within one interval"
    event = alice.of(bc.Registered)[-1]
    assert event.previous == old and event.reflexive == alice.mappings[BEACON] != old
    assert alice.client.reflexive == event.reflexive
    status = net.server.status(net.now)
    assert status["registered_nodes"] == 1
    # the beacon now sends to the new address: a resolve finds it there
    bob = net.add("bob")
    request = bob.client.resolve("alice", net.now)
    net.run()
    resolved = [e for e in bob.of(bc.Resolved) if e.request_id == request]
    assert resolved and resolved[0].candidates[0] == event.reflexive


def test_forgotten_node_registers_again_after_missed_keepalives(net: Net) -> None:
    alice = net.add("alice")
    net.advance(1)
    net.restart_server()  # the beacon forgot every registration
    t_restart = net.now
    registered = net.server.stats.registrations
    while net.server.stats.registrations == registered:
        net.advance(0.5)
        # two unanswered keepalives, then a REGISTER at the third: well before the 25 s refresh
        assert net.now - t_restart <= 3 * INTERVAL + 0.5
    assert alice.client.registered


def test_unanswered_keepalives_do_not_flood_registers(net: Net) -> None:
    net.add("alice")
    net.drop_to_beacon = True
    since = len(net.to_beacon)
    net.advance(60)
    registers = sent(net, since, bw.REGISTER)
    keepalives = sent(net, since, bw.KEEPALIVE)
    # the usual backoff of unanswered REGISTERs; keepalives keep their pace until the
    # registration lapses, and never add a REGISTER while one is unanswered
    assert len(registers) <= 8, len(registers)
    assert len(keepalives) <= 60 / INTERVAL, len(keepalives)


def test_spoofed_replayed_and_forged_keepalives_get_no_answer(net: Net) -> None:
    alice = net.add("alice")
    key = keepalive_key(alice, net)
    home = alice.mappings[BEACON]
    counter = net.server._nodes[alice.key].keepalive_counter + 1
    good = bw.encode_keepalive(key, alice.key, counter)
    assert beacon_answers(net, good, home) and len(good) == bw.KEEPALIVE_SIZE
    refused = dict(net.server.stats.refusals)
    assert beacon_answers(net, good, home) == []  # replayed
    assert beacon_answers(net, good, ("192.0.2.9", 1234)) == []  # replayed from elsewhere
    forged = bw.encode_keepalive(bytes(32), alice.key, counter + 1)
    assert beacon_answers(net, forged, home) == []  # wrong key
    stranger = crypto.ed25519_keypair()[1]
    unknown = bw.encode_keepalive(key, stranger, counter + 2)
    assert beacon_answers(net, unknown, ("192.0.2.9", 1234)) == []  # not registered
    # an answer pretending to be a request (and the reverse) fails the MAC or the parser
    ack = bw.encode_keepalive_ack(key, counter, bw.encode_address(home))
    assert beacon_answers(net, ack, home) == []
    refusals = net.server.stats.refusals
    assert refusals["keepalive_unknown"] - refused.get("keepalive_unknown", 0) == 3
    assert refusals["keepalive_bad_mac"] - refused.get("keepalive_bad_mac", 0) == 1
    assert refusals["malformed"] - refused.get("malformed", 0) == 1


def test_keepalive_from_a_new_address_is_answered_there_with_that_address(net: Net) -> None:
    alice = net.add("alice")
    key = keepalive_key(alice, net)
    counter = net.server._nodes[alice.key].keepalive_counter + 1
    moved = ("203.0.113.77", 40999)
    answers = beacon_answers(net, bw.encode_keepalive(key, alice.key, counter), moved)
    assert len(answers) == 1 and len(answers[0]) <= bw.KEEPALIVE_SIZE
    ack = bw.parse_keepalive_ack_untrusted(answers[0])
    assert ack.verify(key) and ack.reflexive == moved and ack.counter == counter
    # the registration itself moves only with a signed REGISTER
    assert net.server._nodes[alice.key].address == alice.mappings[BEACON]


def test_forged_or_stale_acks_change_nothing(net: Net) -> None:
    alice = net.add("alice")
    net.advance(INTERVAL)  # a keepalive went out and was answered
    client = alice.client
    elsewhere = bw.encode_address(("198.51.100.66", 1))
    fake = bw.encode_keepalive_ack(bytes(32), 1, elsewhere)
    client.receive_datagram(fake, net.now)
    stale = bw.encode_keepalive_ack(keepalive_key(alice, net), 1, elsewhere)
    client.receive_datagram(stale, net.now)
    assert client.stats.unexpected == 2
    since = len(net.to_beacon)
    net.run()
    assert sent(net, since, bw.REGISTER) == []


def test_keepalives_can_be_turned_off(net: Net) -> None:
    net.add("alice", config=bc.BeaconClientConfig(keepalive_interval=0))
    since = len(net.to_beacon)
    net.advance(60)
    assert sent(net, since, bw.KEEPALIVE) == []
