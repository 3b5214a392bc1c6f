"""Re-handshakes converge, and a tunnel someone waits on never gives up early (issue #15).

The property, on the simulated network over many seeds: any two live, mutually trusted nodes
that can reach each other have a working tunnel within the caller's deadline, whatever state
each side is in (session kept, lost silently, closed, restarted with a new session nonce),
whichever path they use (a known address, or the relay with introductions and hole punching
through cone NATs), and however their handshakes cross, are lost, reordered or duplicated.

``Nodes`` plays the node layer over the two sans-IO muxes, as ``Node`` does: a new tunnel gets
a path (the peer's address, or the relay and an introduction), a caller's wait holds the tunnel
open (``keep_trying_until``), PeerUnanswered asks the beacon for a fresh introduction, and a
stream moved to the session that replaced a closed one is followed there.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pilot_agents.net.tunnel import events
from pilot_agents.net.tunnel.codes import CloseCode
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.mux import Mux
from pilot_agents.net.tunnel.paths import RelayPath
from pilot_agents.net.tunnel.session import Session
from tests.simnet import Host, LinkProfile, SimNetwork, Source

PORT = 1001
DEADLINE = 40.0  # seconds a caller waits (the issue's `connect` was given 40 s)


@dataclass
class Want:
    """One send(): a stream with one message, and a caller waiting until ``deadline``."""

    host: Host
    peer: Host
    data: bytes
    deadline: float
    session: Session
    stream: int
    failed: str | None = None


@dataclass
class Nodes:
    """The node layer over two simulated hosts (see the module docstring)."""

    net: SimNetwork
    beacon: bool  # paths through the beacon (relay, introductions) rather than known addresses
    config: SessionConfig
    wants: list[Want] = field(default_factory=list)
    restarts: dict[bytes, int] = field(default_factory=dict)
    _seen: dict[bytes, int] = field(default_factory=dict)  # events handled, per host
    _timestamps: dict[bytes, dict[bytes, int]] = field(default_factory=dict)  # "persisted"

    def add_host(self, name: str, nat_kind: str | None = None) -> Host:
        nat = self.net.add_nat(f"nat-{name}", nat_kind) if nat_kind else None
        host = self.net.add_host(name, self.config, nat=nat)
        self._fresh_mux(host)
        return host

    def _fresh_mux(self, host: Host) -> None:
        net = self.net
        host.mux = Mux(
            host.identity.secret_key,
            host.identity.public_key,
            self.config,
            wall_clock_ns=lambda: int(1_700_000_000e9 + net.now * 1e9),
            random_bits=net.rng.getrandbits,
            timestamps=self._timestamps.setdefault(host.key, {}),
        )
        for other in net.hosts.values():
            if other is not host:
                host.mux.trust(other.key)
                other.mux.trust(host.key)
        self._seen[host.key] = len(host.events)

    def restart(self, host: Host) -> None:
        """A crash and restart: same identity and persisted timestamps, no sessions."""
        self.restarts[host.key] = self.restarts.get(host.key, 0) + 1
        self._fresh_mux(host)

    def tunnel(self, host: Host, peer: Host) -> Session:
        session = host.mux.session(peer.key, self.net.now)
        if session.address is None:
            if self.beacon:
                session.address = RelayPath(peer.key)
                self.net.introduce(host, peer)
            else:
                session.address = peer.address
        return session

    def want(self, host: Host, peer: Host, data: bytes, timeout: float = DEADLINE) -> Want:
        session = self.tunnel(host, peer)
        stream = session.open_stream(50000, PORT)
        session.send_message(stream, data)
        want = Want(host, peer, data, self.net.now + timeout, session, stream)
        session.keep_trying_until(want.deadline)
        session.connect(self.net.now)
        self.wants.append(want)
        return want

    def delivered(self, want: Want) -> int:
        return sum(m.data == want.data for m in want.peer.messages)

    def _handle_events(self) -> None:
        for host in self.net.hosts.values():
            new = host.events[self._seen[host.key] :]
            self._seen[host.key] = len(host.events)
            for event in new:
                if isinstance(event, events.SessionClosed):
                    self._on_closed(host, event)
                elif isinstance(event, events.PeerUnanswered) and self.beacon:
                    self.net.reintroduce(host, event.peer)

    def _on_closed(self, host: Host, event: events.SessionClosed) -> None:
        for want in self.wants:
            if want.host is not host or want.peer.key != event.peer or want.failed:
                continue
            if not want.session.closed:
                continue
            successor = host.mux.get_session(event.peer)
            if want.stream in event.moved and successor is not None:
                want.session = successor
            elif self.delivered(want) == 0:
                want.failed = f"{CloseCode(event.code).name}: {event.reason}"

    def run_until(self, condition: Callable[[], bool], max_time: float) -> bool:
        deadline = self.net.now + max_time
        while not condition():
            if self.net.now > deadline or not self.net.step():
                self._handle_events()
                return condition()
            self._handle_events()
        return True

    def run_for(self, duration: float) -> None:
        self.run_until(lambda: False, duration)

    def all_delivered(self) -> bool:
        return all(self.delivered(w) > 0 or w.failed for w in self.wants)


def sessions(a: Host, b: Host) -> tuple[Session | None, Session | None]:
    return a.mux.get_session(b.key), b.mux.get_session(a.key)


def paired(a: Host, b: Host) -> bool:
    """One tunnel: both sides established, each paired with the other's session."""
    sa, sb = sessions(a, b)
    return (
        sa is not None
        and sb is not None
        and sa.established
        and sb.established
        and sa.remote_nonce == sb.nonce
        and sb.remote_nonce == sa.nonce
    )


def pings_both_ways(nodes: Nodes, a: Host, b: Host) -> bool:
    sa, sb = sessions(a, b)
    assert sa is not None and sb is not None
    ids = {a.key: sa.ping(nodes.net.now), b.key: sb.ping(nodes.net.now)}

    def acked(host: Host) -> bool:
        return any(
            isinstance(e, events.PingAcked) and e.ping_id == ids[host.key] for e in host.events
        )

    return nodes.run_until(lambda: acked(a) and acked(b), 10)


def drop_silently(host: Host, peer: Host) -> None:
    """The host's session state is lost without a word to the peer (a local timeout)."""
    session = host.mux.get_session(peer.key)
    if session is not None:
        session._enter_closed(CloseCode.IDLE_TIMEOUT, "", by_peer=False)


def drop_packets(net: SimNetwork, *, relay: bool, direct: bool, until: float) -> None:
    """An outage: the relay (the peer not registered at the beacon) and/or direct paths."""
    previous = net.tap

    def tap(source: Source, destination: tuple[str, int], data: bytes) -> bytes | None:
        if net.now < until:
            through_relay = isinstance(source, RelayPath)
            if (relay and through_relay) or (direct and not through_relay):
                return None
        return previous(source, destination, data) if previous is not None else data

    net.tap = tap


# -- the property over many seeds -------------------------------------------------------------


@dataclass
class Scenario:
    seed: int
    beacon: bool
    profile: LinkProfile
    warm: bool  # a tunnel was up before the trouble
    trouble: list[str]
    outage: float  # seconds without the chosen paths
    wants: list[tuple[str, float]]  # (who sends, seconds after the trouble)

    @classmethod
    def draw(cls, seed: int) -> Scenario:
        rng = random.Random(seed)
        beacon = rng.random() < 0.5
        profile = LinkProfile(
            delay=rng.choice([0.002, 0.01, 0.02, 0.04]),
            jitter=rng.choice([0.0, 0.005]),
            reorder=rng.choice([0.0, 0.0, 0.05]),
            loss=rng.choice([0.0, 0.0, 0.02, 0.1]),
            duplicate=rng.choice([0.0, 0.02]),
        )
        warm = rng.random() < 0.8
        options = ["restart a", "restart b", "drop a", "drop b", "close a", "close b", "outage"]
        if beacon:
            options += ["rebind a", "rebind b", "relay outage"]
        trouble = rng.sample(options, rng.choice([0, 1, 1, 2, 3])) if warm else []
        outage = rng.uniform(1.0, 15.0)
        rtt = 4 * profile.delay
        first = rng.choice(["a", "b"])
        wants = [(first, rng.uniform(0, 0.5))]
        if rng.random() < 0.6:  # the other side sends too, often while handshakes cross
            wants.append(("b" if first == "a" else "a", wants[0][1] + rng.uniform(-rtt, rtt)))
        return cls(seed, beacon, profile, warm, trouble, outage, wants)


def run_scenario(scenario: Scenario) -> tuple[Nodes, Host, Host]:
    net = SimNetwork(scenario.seed, scenario.profile)
    nodes = Nodes(net, scenario.beacon, SessionConfig())
    kind = "cone" if scenario.beacon else None
    a, b = nodes.add_host("a", kind), nodes.add_host("b", kind)
    hosts = {"a": a, "b": b}
    if scenario.warm:
        warm = nodes.want(a, b, b"warm-up")
        assert nodes.run_until(lambda: nodes.delivered(warm) > 0, DEADLINE), scenario
        nodes.run_for(3.0)  # settle: acknowledgements, punching to the direct path
        nodes.wants.clear()
    for trouble in scenario.trouble:
        verb, who = trouble.rsplit(" ", 1) if " " in trouble else (trouble, "")
        host = hosts.get(who)
        if verb == "restart" and host is not None:
            nodes.restart(host)
        elif verb == "drop" and host is not None:
            drop_silently(host, b if host is a else a)
        elif verb == "close" and host is not None:
            session = host.mux.get_session((b if host is a else a).key)
            if session is not None:
                session.close(CloseCode.SHUTDOWN, "", net.now)
        elif verb == "rebind" and host is not None:
            assert host.nat is not None
            host.nat.rebind()
        elif trouble == "outage":
            drop_packets(net, relay=True, direct=True, until=net.now + scenario.outage)
        elif trouble == "relay outage":
            drop_packets(net, relay=True, direct=False, until=net.now + scenario.outage)
    start = net.now
    for who, after in sorted(scenario.wants, key=lambda w: w[1]):
        nodes.run_until(lambda: False, max(0.0, start + after - net.now))
        sender = hosts[who]
        nodes.want(sender, b if sender is a else a, f"{who} at {after:.4f}".encode())
    return nodes, a, b


@pytest.mark.parametrize("seed", range(300))
def test_two_reachable_trusting_nodes_always_get_a_working_tunnel(seed: int) -> None:
    scenario = Scenario.draw(seed)
    nodes, a, b = run_scenario(scenario)
    assert nodes.run_until(nodes.all_delivered, DEADLINE + 1), (scenario, nodes.wants)
    for want in nodes.wants:
        assert want.failed is None, (scenario, want.failed)
        assert nodes.net.now <= want.deadline, scenario
        copies = nodes.delivered(want)
        # Once; twice only if the receiver restarted after the first copy reached it and
        # before it acknowledged it (Session.take_over says why that one comes again).
        assert copies == 1 or (copies == 2 and nodes.restarts.get(want.peer.key)), scenario
    assert nodes.run_until(lambda: paired(a, b), 10), scenario
    assert pings_both_ways(nodes, a, b), scenario
    assert paired(a, b), scenario


# -- crossing handshakes: one round trip plus the retry delay ----------------------------------


def fresh_pair(delay: float, *, beacon: bool) -> tuple[Nodes, Host, Host]:
    nodes = Nodes(SimNetwork(1, LinkProfile(delay=delay)), beacon, SessionConfig())
    kind = "cone" if beacon else None
    return nodes, nodes.add_host("a", kind), nodes.add_host("b", kind)


def both_send_at_once(nodes: Nodes, a: Host, b: Host) -> float:
    """Both sides send in the same instant; seconds until both messages are in."""
    start = nodes.net.now
    to_b, to_a = nodes.want(a, b, b"to b"), nodes.want(b, a, b"to a")
    assert nodes.run_until(lambda: nodes.delivered(to_b) > 0 and nodes.delivered(to_a) > 0, 10)
    assert not (to_b.failed or to_a.failed)
    return nodes.net.now - start


def warm_up(nodes: Nodes, a: Host, b: Host) -> None:
    want = nodes.want(a, b, b"warm-up")
    assert nodes.run_until(lambda: nodes.delivered(want) > 0, 10)
    nodes.run_for(3.0)
    nodes.wants.clear()


@pytest.mark.parametrize("beacon", [False, True])
@pytest.mark.parametrize(
    "trouble", ["cold", "restart a", "restart b", "restart both", "drop a", "drop b", "drop both"]
)
def test_crossing_initiations_converge_within_a_round_trip_and_the_retry_delay(
    trouble: str, beacon: bool
) -> None:
    delay = 0.02  # per crossing, as in the NAT lab; the relay doubles it
    nodes, a, b = fresh_pair(delay, beacon=beacon)
    if trouble != "cold":
        warm_up(nodes, a, b)
    verb, who = trouble.split(" ") if " " in trouble else (trouble, "")
    for host in {"a": [a], "b": [b], "both": [a, b]}.get(who, []):
        if verb == "restart":
            nodes.restart(host)
        else:
            drop_silently(host, b if host is a else a)
    took = both_send_at_once(nodes, a, b)
    rtt = 2 * (2 if beacon else 1) * delay
    # The winning handshake's round trip, then the winner's first packet (its data, and the
    # confirmation the loser waits for) and the loser's data: two round trips, no retry delay,
    # whatever state each side was in (measured: 80 ms direct, 140 ms through the relay).
    assert took <= 2 * rtt + 0.001, (trouble, took)
    assert nodes.run_until(lambda: paired(a, b), 5)


@pytest.mark.parametrize("sender_is_higher", [False, True])
def test_the_issues_sequence_ends_in_one_tunnel(sender_is_higher: bool) -> None:
    """From the NAT lab: the sender's tunnel closed (its peer stopped answering), the
    receiver's is still up with a rekey of its own under way when the sender's new session
    initiates; both go through the relay at the same moment. Before: the receiver took the new
    nonce for a restart, both ended as responders waiting for each other, and both timed out
    ('no handshake answer') with the message never delivered."""
    nodes, x, y = fresh_pair(0.02, beacon=True)
    sender, receiver = (x, y) if (x.key > y.key) == sender_is_higher else (y, x)
    warm_up(nodes, sender, receiver)
    drop_silently(sender, receiver)  # 'tunnel closed: the peer stopped answering'
    old = receiver.mux.get_session(sender.key)
    assert old is not None
    old._start_initiation(nodes.net.now)  # the receiver's own re-handshake, at the same moment
    want = nodes.want(sender, receiver, b"the message")
    assert nodes.run_until(lambda: nodes.delivered(want) > 0, 5)
    assert want.failed is None
    assert nodes.run_until(lambda: paired(sender, receiver), 5)
    codes = [e.code for e in sender.events + receiver.events if isinstance(e, events.SessionClosed)]
    assert CloseCode.HANDSHAKE_TIMEOUT not in codes


# -- restarts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beacon", [False, True])
def test_the_first_send_after_the_peer_restarted_is_delivered(beacon: bool) -> None:
    """The sender's tunnel is established and idle; the peer crashed and came back. The send
    goes out on stale keys, the probe timeouts start a handshake, its answer shows the new
    session nonce: the successor session takes the answer's keys and the unacknowledged
    stream, and the message arrives once (it failed with 'the peer restarted' before)."""
    nodes, a, b = fresh_pair(0.005, beacon=beacon)
    warm_up(nodes, a, b)
    nodes.restart(b)
    want = nodes.want(a, b, b"after the restart")
    assert nodes.run_until(lambda: nodes.delivered(want) > 0, 5)
    assert want.failed is None and nodes.delivered(want) == 1
    assert a.mux.stats.successions == 1
    closed = [e for e in a.events if isinstance(e, events.SessionClosed)]
    assert [(e.code, e.moved) for e in closed] == [(CloseCode.PEER_RESTARTED, (want.stream,))]
    assert nodes.run_until(lambda: paired(a, b), 5)


def test_a_message_sent_as_the_peer_shuts_down_waits_for_it_to_come_back() -> None:
    """The peer's node stops (to restart) just as we send: its CLOSE carries a final ACK, so
    what it does not cover the peer never saw, and it goes to a successor session that waits
    for the peer (it failed with 'the node is shutting down' before)."""
    nodes, a, b = fresh_pair(0.01, beacon=False)
    warm_up(nodes, a, b)
    session = b.mux.get_session(a.key)
    assert session is not None
    session.close(CloseCode.SHUTDOWN, "", nodes.net.now)
    want = nodes.want(a, b, b"as it stops")  # crosses the CLOSE
    nodes.run_for(0.015)
    closed = [e for e in a.events if isinstance(e, events.SessionClosed)]
    assert [(e.code, e.moved) for e in closed] == [(CloseCode.SHUTDOWN, (want.stream,))]
    nodes.restart(b)
    assert nodes.run_until(lambda: nodes.delivered(want) > 0, 5)
    assert want.failed is None and nodes.delivered(want) == 1


def test_a_delayed_handshake_of_an_older_session_is_ignored() -> None:
    """An initiation the peer sent just before it restarted arrives late, after its new
    session answered us: it is neither taken for a restart (which would reset the live
    tunnel) nor counted as refused (the relay reports refused handshakes to the beacon)."""
    nodes, a, b = fresh_pair(0.005, beacon=False)
    warm_up(nodes, a, b)
    old = b.mux.get_session(a.key)
    assert old is not None
    old._start_initiation(nodes.net.now)  # a rekey, held up in the network
    delayed = [data for data, _ in b.mux.datagrams_to_send(nodes.net.now)]
    assert [data[0] for data in delayed] == [0x10]
    nodes.restart(b)
    want = nodes.want(a, b, b"after")
    assert nodes.run_until(lambda: nodes.delivered(want) > 0 and paired(a, b), 5)
    session = a.mux.get_session(b.key)
    refused = a.mux.stats.refused()
    a.mux.receive_datagram(delayed[0], b.address, nodes.net.now)
    assert a.mux.get_session(b.key) is session and not session.closed  # type: ignore[union-attr]
    assert a.mux.stats.refused() == refused
    assert a.mux.stats.stale_handshakes == 1


# -- patience -----------------------------------------------------------------------------------


@pytest.mark.parametrize("beacon", [False, True])
def test_a_waiting_caller_outlasts_a_15_s_outage(beacon: bool) -> None:
    """The path dies for 15 s while a message waits (the receiver's NAT rebound and it
    re-registers later): the tunnel keeps trying until the caller's 40 s deadline instead of
    declaring the peer dead after 8 probe timeouts (8.5 s in the issue)."""
    nodes, a, b = fresh_pair(0.02, beacon=beacon)
    warm_up(nodes, a, b)
    drop_packets(nodes.net, relay=True, direct=True, until=nodes.net.now + 15.0)
    if beacon:
        assert b.nat is not None
        b.nat.rebind()
    want = nodes.want(a, b, b"through the outage")
    assert nodes.run_until(lambda: nodes.delivered(want) > 0, DEADLINE)
    assert want.failed is None
    assert nodes.net.now - (want.deadline - DEADLINE) < 15.0 + 5.0  # soon after it ends
    if beacon:
        unanswered = [e for e in a.events if isinstance(e, events.PeerUnanswered)]
        assert 2 <= len(unanswered) <= 15.0 / nodes.config.paths.reintroduce_interval + 2


def test_without_a_caller_a_dead_peer_is_still_declared_dead() -> None:
    config = SessionConfig(keepalive_interval=1.0)
    nodes = Nodes(SimNetwork(5), False, config)
    a, b = nodes.add_host("a"), nodes.add_host("b")
    want = nodes.want(a, b, b"x", timeout=1.0)
    assert nodes.run_until(lambda: nodes.delivered(want) > 0, 5)
    drop_packets(nodes.net, relay=True, direct=True, until=1e9)
    session = want.session
    session.send_message(want.stream, b"y")  # nobody waits on this one
    assert nodes.run_until(lambda: session.closed, 60)
    assert session.close_code == CloseCode.PEER_UNREACHABLE


def test_the_verdict_waits_for_the_caller_and_comes_at_its_deadline() -> None:
    nodes, a, b = fresh_pair(0.01, beacon=False)
    warm_up(nodes, a, b)
    drop_packets(nodes.net, relay=True, direct=True, until=1e9)
    want = nodes.want(a, b, b"never", timeout=30.0)
    assert nodes.run_until(lambda: want.session.closed, 60)
    assert want.session.close_code == CloseCode.PEER_UNREACHABLE
    assert want.deadline <= nodes.net.now <= want.deadline + 0.01
    assert nodes.delivered(want) == 0 and want.session.stream_buffered(want.stream) > 0


def test_a_handshake_nobody_answers_gives_up_at_the_callers_deadline() -> None:
    nodes, a, b = fresh_pair(0.01, beacon=False)
    b.mux.untrust(a.key, nodes.net.now)
    want = nodes.want(a, b, b"never", timeout=25.0)
    assert nodes.run_until(lambda: want.session.closed, 60)
    assert want.session.close_code == CloseCode.HANDSHAKE_TIMEOUT
    assert want.deadline <= nodes.net.now <= want.deadline + 0.01


def test_a_peer_whose_nonces_do_not_read_as_times_is_still_followed_across_restarts() -> None:
    """A build before ordered nonces drew them at random, mostly beyond any clock: such a
    nonce orders nothing, and the peer's next session (a smaller nonce) is a reset, not a
    stale handshake to ignore."""
    nodes, a, b = fresh_pair(0.005, beacon=False)
    nodes.tunnel(b, a).nonce = 0x9E3779B97F4A7C15  # drawn at random by the older build
    warm_up(nodes, b, a)
    nodes.restart(b)  # a clock-based nonce now, far below the last one
    want = nodes.want(b, a, b"after")
    assert nodes.run_until(lambda: nodes.delivered(want) > 0 and paired(a, b), 5)
    assert a.mux.stats.stale_handshakes == 0 and a.mux.stats.successions == 1
