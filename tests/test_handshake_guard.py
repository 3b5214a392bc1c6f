"""Handshake floods and replays (issue #11, findings 6 and 7), on the sans-IO mux: what an
initiation may cost before a Diffie-Hellman, the cookie round trip under load, the timestamp
memory that outlives sessions, and which path a handshake may pick.

DH work is counted, not timed: ``noise.x25519`` is the one DH of the handshake code (noise is
not compiled, so it can be patched), and each call made with the responder's static key is work
an initiation cost it."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilot_agents.net.tunnel import cookie, crypto, handshake, noise, wire
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.cookie import CookieChecker, PeerMacs
from pilot_agents.net.tunnel.mux import Mux
from pilot_agents.net.tunnel.paths import RelayPath
from pilot_agents.net.tunnel.ratelimit import HandshakeLimits, SourceLimiter
from tests.simnet import Host, SimNetwork

EVIL = ("evil", 6666)
Tap = Callable[[object, object, bytes], "bytes | None"]


class DhCounter:
    """Counts the DH calls each static key makes."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def by(self, host: Host) -> int:
        static = crypto.ed25519_sk_to_x25519(host.identity.secret_key)
        return sum(1 for private in self.calls if private == static)


@pytest.fixture
def dh(monkeypatch: pytest.MonkeyPatch) -> Iterator[DhCounter]:
    counter = DhCounter()
    real = crypto.x25519

    def counting(private: bytes, public: bytes) -> bytes:
        counter.calls.append(private)
        return real(private, public)

    monkeypatch.setattr(noise, "x25519", counting)
    yield counter


def initiation_from(net: SimNetwork, sender: Host, to: Host) -> bytes:
    """A valid initiation from ``sender`` to ``to`` (its mac1 right, no cookie)."""
    sender.mux.trust(to.key)
    session = sender.mux.session(to.key, net.now)
    session.address = to.address
    session.connect(net.now)
    packets = [p for p, _ in sender.mux.datagrams_to_send(net.now) if p[0] == wire.INITIATION]
    assert len(packets) == 1
    return packets[0]


def capture_initiations(into: list[bytes]) -> Tap:
    def tap(source: object, destination: object, data: bytes) -> bytes:
        if data[0] == wire.INITIATION:
            into.append(data)
        return data

    return tap


def steal_first_initiation_to(host: Host, into: list[bytes]) -> Tap:
    """Takes the first initiation to ``host`` off the wire (an attacker on the path)."""

    def tap(source: object, destination: object, data: bytes) -> bytes | None:
        if destination == host.address and data[0] == wire.INITIATION and not into:
            into.append(data)
            return None
        return data

    return tap


def guarded(**limits: float) -> SessionConfig:
    return SessionConfig(handshakes=HandshakeLimits(**limits))  # type: ignore[arg-type]


def test_a_flood_with_bad_mac1_costs_no_dh(dh: DhCounter) -> None:
    net = SimNetwork(1)
    a, b = net.pair()
    other = net.add_host("other")
    attacker = net.add_host("attacker")
    # A genuine initiation, but for another node's key; and random initiation-sized bytes.
    misaddressed = initiation_from(net, attacker, other)
    rng = random.Random(1)
    dh.calls.clear()
    for _ in range(2000):
        b.mux.receive_datagram(misaddressed, EVIL, net.now)
        junk = bytes([wire.INITIATION]) + rng.randbytes(handshake.INITIATION_SIZE - 1)
        b.mux.receive_datagram(junk, EVIL, net.now)
        net.now += 0.0001
    assert dh.by(b) == 0
    assert b.mux.stats.bad_mac1 == 4000
    assert b.mux.datagrams_to_send(net.now) == []  # nothing answers them
    # The real peer is not affected.
    net.start_stream(a, b, 1, b"hello")
    assert net.run_until(lambda: len(b.messages) == 1, 5)


def test_under_load_an_initiation_without_mac2_gets_a_cookie_and_no_dh(dh: DhCounter) -> None:
    net = SimNetwork(2)
    config = guarded(load_rate_per_s=1.0, load_burst=1)
    b = net.add_host("b", config)
    c = net.add_host("c", config)
    attacker = net.add_host("attacker")
    b.mux.trust(c.key)
    # One untrusted initiation spends b's whole budget: b is now under load.
    b.mux.receive_datagram(initiation_from(net, attacker, b), EVIL, net.now)
    assert b.mux.stats.untrusted == 1
    dh.calls.clear()

    first = initiation_from(net, c, b)
    b.mux.receive_datagram(first, c.address, net.now)
    assert dh.by(b) == 0
    assert b.mux.stats.cookie_replies == 1
    [(reply, destination)] = b.mux.datagrams_to_send(net.now)
    assert reply[0] == wire.COOKIE_REPLY and destination == c.address
    assert len(reply) == cookie.COOKIE_REPLY_SIZE < len(first)  # no amplification

    # The initiator answers at once with a new initiation that carries mac2; b processes it.
    c.mux.receive_datagram(reply, b.address, net.now)
    [(second, _)] = c.mux.datagrams_to_send(net.now)
    assert second[0] == wire.INITIATION and second[-16:] != bytes(16)
    b.mux.receive_datagram(second, c.address, net.now)
    assert dh.by(b) > 0
    assert b.mux.stats.cookie_replies == 1
    session = c.mux.get_session(b.key)
    assert session is not None
    assert net.run_until(lambda: session.established, 1)

    # mac2 is bound to the source address: the same initiation from elsewhere gets a cookie.
    dh.calls.clear()
    b.mux.receive_datagram(second, EVIL, net.now)
    assert dh.by(b) == 0 and b.mux.stats.cookie_replies == 2


def test_cookie_replies_cannot_make_the_initiator_loop() -> None:
    net = SimNetwork(3)
    config = guarded(load_rate_per_s=1.0, load_burst=1)
    b = net.add_host("b", config)
    c = net.add_host("c", config)
    attacker = net.add_host("attacker")
    b.mux.receive_datagram(initiation_from(net, attacker, b), EVIL, net.now)  # b under load
    b.mux.receive_datagram(initiation_from(net, c, b), c.address, net.now)
    [(reply, _)] = b.mux.datagrams_to_send(net.now)
    c.mux.receive_datagram(reply, b.address, net.now)
    assert len(c.mux.datagrams_to_send(net.now)) == 1  # the resend with mac2
    # The same reply again, or a forged one, starts nothing.
    c.mux.receive_datagram(reply, b.address, net.now)
    forged = reply[:-1] + bytes([reply[-1] ^ 1])
    c.mux.receive_datagram(forged, b.address, net.now)
    assert c.mux.datagrams_to_send(net.now) == []


def test_a_replayed_initiation_is_limited_per_source(dh: DhCounter) -> None:
    net = SimNetwork(4)
    config = guarded(source_rate_per_s=10.0, source_burst=5, load_burst=1000)
    a = net.add_host("a", config)
    b = net.add_host("b", config)
    a.mux.trust(b.key)
    b.mux.trust(a.key)
    attacker = net.add_host("attacker")
    replayed = initiation_from(net, attacker, b)
    dh.calls.clear()
    for _ in range(10_000):  # 1 s at 10k/s
        b.mux.receive_datagram(replayed, EVIL, net.now)
        net.now += 0.0001
    assert dh.by(b) <= 5 + 10 + 1  # the burst, then 10/s
    assert b.mux.stats.rate_limited >= 9_900
    # Another source is not held back.
    a.mux.session(b.key, net.now).address = b.address
    net.start_stream(a, b, 1, b"through")
    assert net.run_until(lambda: len(b.messages) == 1, 1)


def test_relayed_floods_are_limited_per_relayed_key(dh: DhCounter) -> None:
    """Relayed packets all come from the beacon's address: the budget is per sender key."""
    net = SimNetwork(5)
    config = guarded(source_rate_per_s=10.0, source_burst=5, load_burst=1000)
    a = net.add_host("a", config)
    b = net.add_host("b", config)
    a.mux.trust(b.key)
    b.mux.trust(a.key)
    attacker = net.add_host("attacker")
    replayed = initiation_from(net, attacker, b)
    dh.calls.clear()
    for _ in range(1000):
        b.mux.receive_datagram(replayed, RelayPath(attacker.key), net.now)
    assert dh.by(b) <= 5
    # The trusted peer, relayed too, still gets through at once.
    a.mux.session(b.key, net.now).address = RelayPath(b.key)
    net.start_stream(a, b, 1, b"relayed")
    assert net.run_until(lambda: len(b.messages) == 1, 1)


def test_an_initiation_relayed_by_another_key_is_dropped() -> None:
    net = SimNetwork(6)
    a, b = net.pair()
    attacker = net.add_host("attacker")
    captured = initiation_from(net, a, b)
    b.mux.receive_datagram(captured, RelayPath(attacker.key), net.now)
    assert b.mux.datagrams_to_send(net.now) == []
    assert b.mux.get_session(a.key) is None
    assert b.mux.stats.wrong_relay_source == 1


def test_the_source_table_is_bounded() -> None:
    limiter = SourceLimiter(rate=1.0, burst=2, max_sources=100)
    for port in range(1000):
        limiter.allow(("10.0.0.1", port), 0.0)
    assert len(limiter) == 100 and limiter.refused_new == 900
    # Refilled entries are forgotten, so new sources get in once old ones are quiet.
    assert limiter.allow(("10.0.0.2", 1), 5.0)
    assert len(limiter) == 1
    # Spoofed sources never enter the table through exhausted().
    assert not limiter.exhausted(("10.0.0.3", 1), 5.0)
    assert len(limiter) == 1


def test_cookies_are_bound_to_the_source_and_expire() -> None:
    rng = random.Random(7)
    _, static_public = crypto.x25519_keypair()
    checker = CookieChecker(static_public, 120.0, rng.randbytes)
    macs = PeerMacs(static_public, 120.0)
    message = b"\x10" + bytes(100)
    first = macs.seal_initiation(message, 0.0)
    assert checker.mac1_ok(first) and not checker.mac2_ok(first, EVIL, 0.0)
    assert not checker.mac1_ok(first[:-33] + b"x" + first[-32:])
    reply = checker.reply(first, 7, EVIL, 0.0)
    assert macs.consume_cookie_reply(reply, 0.0)
    with_cookie = macs.seal_initiation(message, 1.0)
    assert checker.mac2_ok(with_cookie, EVIL, 1.0)
    assert not checker.mac2_ok(with_cookie, ("evil", 6667), 1.0)
    assert not checker.mac2_ok(with_cookie, RelayPath(b"k" * 32), 1.0)
    assert checker.mac2_ok(with_cookie, EVIL, 239.0)  # the previous secret still counts
    assert not checker.mac2_ok(with_cookie, EVIL, 240.0)  # two secrets later
    # The initiator stops using a cookie after its lifetime.
    assert macs.seal_initiation(message, 121.0)[-16:] == bytes(16)


# -- finding 7: replays after a restart or an idle-out, and paths -----------------------------


def restarted(net: SimNetwork, host: Host, timestamps: dict[bytes, int]) -> Host:
    """``host`` as it comes back after a restart: same identity, no sessions, and the
    timestamps it persisted."""
    mux = Mux(
        host.identity.secret_key,
        host.identity.public_key,
        wall_clock_ns=lambda: int(1_700_000_000e9 + net.now * 1e9),
        random_bits=net.rng.getrandbits,
        timestamps=timestamps,
    )
    new = Host(host.address, host.identity, mux)
    net.hosts[host.address] = new
    return new


def test_a_replayed_initiation_after_the_responder_restarts_is_refused() -> None:
    net = SimNetwork(8)
    a = net.add_host("a")
    timestamps: dict[bytes, int] = {}
    b = restarted(net, net.add_host("b"), timestamps)
    a.mux.trust(b.key)
    b.mux.trust(a.key)
    captured: list[bytes] = []
    net.tap = capture_initiations(captured)
    net.start_stream(a, b, 1, b"first")
    a.mux.session(b.key, net.now).address = b.address
    assert net.run_until(lambda: len(b.messages) == 1, 5)
    net.tap = None

    b2 = restarted(net, b, timestamps)
    b2.mux.trust(a.key)
    b2.mux.receive_datagram(captured[0], EVIL, net.now)
    assert b2.mux.datagrams_to_send(net.now) == []  # the replayer learns nothing
    assert b2.mux.get_session(a.key) is None
    assert b2.mux.stats.replayed_initiations == 1


def test_a_replayed_initiation_after_the_tunnel_idled_out_is_refused() -> None:
    net = SimNetwork(9)
    a, b = net.pair(SessionConfig(idle_timeout=5.0, keepalive_interval=100.0))
    captured: list[bytes] = []
    net.tap = capture_initiations(captured)
    net.start_stream(a, b, 1, b"first")
    assert net.run_until(lambda: len(b.messages) == 1, 5)
    net.tap = None
    assert net.run_until(lambda: b.mux.get_session(a.key) is None, 30)
    b.mux.receive_datagram(captured[0], EVIL, net.now)
    assert b.mux.datagrams_to_send(net.now) == []
    assert b.mux.get_session(a.key) is None
    assert b.mux.stats.replayed_initiations == 1


def test_an_initiation_raced_from_another_address_does_not_hold_the_path() -> None:
    """An attacker on the path delivers the peer's first initiation from its own address ahead
    of the genuine one: the responder answers there, but the peer's next initiation takes the
    path back at once instead of the tunnel staying broken until the handshake times out."""
    net = SimNetwork(10)
    a, b = net.pair()
    stolen: list[bytes] = []
    net.tap = steal_first_initiation_to(b, stolen)
    net.start_stream(a, b, 1, b"hello")
    net.run_for(0.001)
    assert stolen
    b.mux.receive_datagram(stolen[0], EVIL, net.now)
    net.flush(b)
    sb = b.mux.get_session(a.key)
    assert sb is not None and sb.address == EVIL  # a first answer goes where it came from
    assert net.run_until(lambda: len(b.messages) == 1, 1.0)
    assert sb.address == a.address


def test_a_handshake_alone_never_moves_an_established_path() -> None:
    net = SimNetwork(11)
    a, b = net.pair()
    _, stream = net.start_stream(a, b, 1, b"first")
    assert net.run_until(lambda: len(b.messages) == 1, 5)
    sb = b.mux.get_session(a.key)
    assert sb is not None and sb.address == a.address
    # A fresh initiation from a (a rekey), raced to b from elsewhere: accepted, path kept.
    stolen: list[bytes] = []
    net.tap = steal_first_initiation_to(b, stolen)
    a.mux.session(b.key, net.now)._start_initiation(net.now)
    net.run_for(0.05)
    net.tap = None
    assert stolen
    b.mux.receive_datagram(stolen[0], EVIL, net.now)
    net.flush(b)
    assert sb.address == a.address
    a.mux.get_session(b.key).send_message(stream, b"second")  # type: ignore[union-attr]
    assert net.run_until(lambda: len(b.messages) == 2, 5)
    assert sb.address == a.address


def test_a_relayed_initiator_under_load_gets_its_cookie_through_the_relay() -> None:
    net = SimNetwork(12)
    config = guarded(load_rate_per_s=1.0, load_burst=1)
    b = net.add_host("b", config)
    c = net.add_host("c", config)
    attacker = net.add_host("attacker")
    b.mux.trust(c.key)
    c.mux.trust(b.key)
    b.mux.receive_datagram(initiation_from(net, attacker, b), EVIL, net.now)  # b under load
    session = c.mux.session(b.key, net.now)
    session.address = RelayPath(b.key)
    net.start_stream(c, b, 1, b"via the relay")
    assert net.run_until(lambda: len(b.messages) == 1, 1)
    assert b.mux.stats.cookie_replies == 1  # sent back through the relay, to c's key


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_cookie_checks_take_any_bytes(data: bytes) -> None:
    _, static_public = crypto.x25519_keypair()
    checker = CookieChecker(static_public, 120.0, bytes)
    assert not checker.mac1_ok(data)
    assert not checker.mac2_ok(data, EVIL, 0.0)
    macs = PeerMacs(static_public, 120.0)
    macs.seal_initiation(b"\x10" + bytes(116), 0.0)
    assert not macs.consume_cookie_reply(data, 0.0)
