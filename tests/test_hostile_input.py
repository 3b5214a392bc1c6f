"""Whatever arrives from the network, the core never raises, never crashes, never delivers forged
data; each kind of bad packet is counted."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilot_agents.errors import WireError
from pilot_agents.net.tunnel import wire
from pilot_agents.net.tunnel.replay import ReplayWindow
from tests.simnet import SimNetwork


def established_pair(seed: int = 0) -> tuple[SimNetwork, object, object, int]:
    net = SimNetwork(seed)
    a, b = net.pair()
    _, stream = net.start_stream(a, b, 1, b"first")
    assert net.run_until(lambda: len(b.messages) == 1, 5)
    return net, a, b, stream


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_parse_frames_raises_only_wire_error(payload: bytes) -> None:
    with contextlib.suppress(WireError):
        wire.parse_frames_untrusted(payload)


def test_parse_frames_byte_by_byte_truncation() -> None:
    frames = (
        wire.encode_ack([(0, 5), (7, 9)], 0.001)
        + wire.encode_stream_header(4, 1, 2, 0, 3, True)
        + b"abc"
        + wire.encode_max_data(10)
        + wire.encode_max_stream_data(4, 10)
        + wire.encode_reset_stream(4, 1, 2**64 - 1)
        + wire.encode_path_challenge(b"12345678")
        + wire.encode_close(0, "bye")
    )
    assert len(wire.parse_frames_untrusted(frames)) == 7
    for cut in range(len(frames)):
        with contextlib.suppress(WireError):
            wire.parse_frames_untrusted(frames[:cut])


def test_random_datagrams_are_dropped_and_counted() -> None:
    net, a, b, stream = established_pair()
    rng = random.Random(1)
    before = list(b.messages)
    for _ in range(3000):
        kind = rng.choice(
            [wire.INITIATION, wire.RESPONSE, wire.DATA, wire.COOKIE_REPLY, rng.randrange(256)]
        )
        size = rng.choice([0, 1, 5, 13, 29, 60, 96, 100, 116, 148, 1200, 70000 % 65536])
        data = bytes([kind]) + rng.randbytes(size) if size else b""
        b.mux.receive_datagram(data, ("evil", 6666), net.now)
        net.flush(b)
    assert b.messages == before
    stats = b.mux.stats
    assert stats.malformed + stats.unknown_index + stats.bad_handshakes + stats.bad_mac1 > 2000
    # The tunnel still works afterwards.
    a.mux.get_session(b.key).send_message(stream, b"still fine")
    assert net.run_until(lambda: len(b.messages) == 2, 5)


def test_bit_flipped_and_truncated_packets_never_deliver() -> None:
    net, a, b, stream = established_pair(2)
    held: list[bytes] = []

    def hold(source: object, destination: object, data: bytes) -> bytes | None:
        if destination == b.address and data[0] == wire.DATA:
            held.append(data)
            return None
        return data

    net.tap = hold
    a.mux.session(b.key, net.now).send_message(stream, b"genuine")
    net.run_for(0.05)
    net.tap = None
    sb = b.mux.get_session(a.key)
    assert sb is not None and held
    packet = held[0]
    rng = random.Random(3)
    for position in range(len(packet)):
        flipped = bytearray(packet)
        flipped[position] ^= 1 << rng.randrange(8)
        b.mux.receive_datagram(bytes(flipped), a.address, net.now)
    for cut in range(len(packet)):
        b.mux.receive_datagram(packet[:cut], a.address, net.now)
    net.flush(b)
    assert [m.data for m in b.messages] == [b"first"]
    # A flip in the type or index misroutes the packet; anywhere else it fails authentication.
    assert sb.stats.bad_auth >= len(packet) - 5
    for data in held:
        b.mux.receive_datagram(data, a.address, net.now)
    net.flush(b)
    assert [m.data for m in b.messages] == [b"first", b"genuine"]


def test_replayed_packets_are_dropped_and_counted() -> None:
    net, a, b, stream = established_pair(4)
    captured: list[bytes] = []
    net.tap = lambda s, d, data: (captured.append(data) if d == b.address else None) or data
    a.mux.session(b.key, net.now).send_message(stream, b"once")
    assert net.run_until(lambda: len(b.messages) == 2, 5)
    sb = b.mux.get_session(a.key)
    assert sb is not None
    before = sb.stats.replayed
    for data in captured * 3:
        b.mux.receive_datagram(data, a.address, net.now)
    net.flush(b)
    assert [m.data for m in b.messages] == [b"first", b"once"]
    assert sb.stats.replayed - before >= len(captured) * 3 - 3  # handshake packets aside


def test_replayed_initiation_is_refused() -> None:
    net = SimNetwork(5)
    a, b = net.pair()
    initiations: list[bytes] = []
    net.tap = lambda s, d, data: (
        (initiations.append(data) if data[0] == wire.INITIATION else None) or data
    )
    sa = a.mux.session(b.key, net.now)
    sa.connect(net.now)
    assert net.run_until(lambda: sa.established, 5)
    net.run_for(1)
    sb = b.mux.get_session(a.key)
    assert sb is not None
    handshakes = sb.stats.handshakes
    b.mux.receive_datagram(initiations[0], ("evil", 1), net.now)
    net.flush(b)
    assert sb.stats.handshakes == handshakes
    assert b.mux.stats.replayed_initiations >= 1
    assert sb.established and sb.address == a.address


def test_replay_window() -> None:
    window = ReplayWindow(64)
    for n in (0, 1, 2, 5, 70):
        assert window.check(n)
        window.accept(n)
    assert not window.check(5)  # duplicate
    assert not window.check(6)  # older than the window below 70
    assert window.check(69) and window.check(7)
    window.accept(69)
    assert not window.check(69)
    window.accept(1000)
    assert not window.check(70) and window.check(999)


@pytest.mark.parametrize("seed", range(20))
def test_replay_window_matches_a_model(seed: int) -> None:
    """Against the definition: new above the highest; within the window, new if never accepted;
    below it, refused. Numbers arrive in bursts, with duplicates, reordering and long jumps."""
    rng = random.Random(seed)
    size = rng.choice([1, 2, 8, 64, 100])
    window, accepted, highest = ReplayWindow(size), set(), -1
    number = 0
    for _ in range(3000):
        number = max(0, number + rng.choice([1, 1, 1, -1, -3, 2, 5, -size, size, 3 * size]))
        expected = number > highest or (highest - number < size and number not in accepted)
        assert window.check(number) == expected, (size, number, highest)
        if expected and rng.random() < 0.9:  # some fail authentication and are never accepted
            window.accept(number)
            accepted.add(number)
            highest = max(highest, number)
        assert window.highest == highest
