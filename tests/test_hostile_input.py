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
from pilot_agents.net.tunnel.crypto import TAG_SIZE
from pilot_agents.net.tunnel.replay import ReplayWindow
from tests.simnet import SimNetwork

PACKET_OVERHEAD = wire.DATA_HEADER_SIZE + TAG_SIZE


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


def hostile_datagram(net: SimNetwork, a: object, b: object, payload: bytes) -> list[bytes]:
    """``payload`` as the frames of one packet that ``a`` (trusted, with the tunnel's real
    keys) sends to ``b``; what b sends back at once."""
    sa = a.mux.get_session(b.key)  # type: ignore[attr-defined]
    packet_number = sa._next_packet_number
    datagram = sa._seal(sa._current, payload)
    sa._recovery.on_untracked_packet_sent(packet_number)  # so that a takes b's ACK of it
    b.mux.receive_datagram(datagram, a.address, net.now)  # type: ignore[attr-defined]
    return [data for data, _ in b.mux.datagrams_to_send(net.now)]  # type: ignore[attr-defined]


def test_a_packet_of_max_data_frames_costs_one_pass_over_the_streams() -> None:
    """An audit: each MAX_DATA frame that raised the limit scheduled every stream, with a
    linear search of the send order for each. With 1023 idle streams opened by the peer, one
    65,000-byte packet of 9-byte MAX_DATA frames took 27 s of the node's only thread. Now
    more credit schedules, once per packet, only the streams that have something to send."""
    net, a, b, first = established_pair()
    sb = b.mux.get_session(a.key)
    # (to four ports: one port takes at most half of the streams a peer may open)
    opening = b"".join(wire.encode_stream_header(first + 2 * n, 50000, 1 + n % 4, 0, 0, False)
                       for n in range(1, 1024))
    for start in range(0, len(opening), 60_000):
        hostile_datagram(net, a, b, opening[start:start + 60_000])
    assert len(sb._streams) == 1024 and not sb.closed
    # b's one stream with something to send, held back by the tunnel's credit
    sb._peer_max_data = sb._sent_new_bytes
    sb.send_message(first, b"reply")
    hostile_datagram(net, a, b, b"")  # (an empty packet: only so that b flushes)
    limit = sb._peer_max_data
    flood = b"".join(wire.encode_max_data(limit + n) for n in range(1, 7000))
    sent = hostile_datagram(net, a, b, flood)
    assert not sb.closed and sb._peer_max_data == limit + 6999
    sa = a.mux.get_session(b.key)
    assert any(isinstance(frame, wire.StreamFrame) and b"reply" in frame.data
               for data in sent for frame in _frames(sa, data))
    assert not sb._send_order and not sb._scheduled  # nobody idle was ever scheduled


def test_path_challenges_get_one_answer_no_larger_than_what_asked() -> None:
    """An audit: every PATH_CHALLENGE (9 bytes) of a packet got its own answer padded to the
    full packet size, sent outside congestion control to the packet's source address, which
    nothing authenticates: a trusted peer spoofing a victim's address reflected 133x the
    bytes it sent. Now the newest challenge from an address is answered, once, in a datagram
    no larger than the one that carried it, whose size still proves the path (a prober pads
    its challenge)."""
    net, a, b, _ = established_pair()
    tokens = [n.to_bytes(8, "big") for n in range(130)]
    many = b"".join(wire.encode_path_challenge(token) for token in tokens)
    sa = a.mux.get_session(b.key)
    answers = _path_responses(sa, hostile_datagram(net, a, b, many))
    assert answers == [(tokens[-1], len(many) + PACKET_OVERHEAD)]
    # one challenge in a small packet: a small answer
    one = wire.encode_path_challenge(tokens[0])
    assert _path_responses(sa, hostile_datagram(net, a, b, one)) == [
        (tokens[0], len(one) + PACKET_OVERHEAD)]


def _path_responses(receiver: object, datagrams: list[bytes]) -> list[tuple[bytes, int]]:
    """(token, size of its datagram) of each PATH_RESPONSE among ``datagrams``."""
    return [(frame.token, len(data)) for data in datagrams for frame in _frames(receiver, data)
            if isinstance(frame, wire.PathResponseFrame)]


def _frames(receiver: object, datagram: bytes) -> list[wire.Frame]:
    """The frames of a datagram sent to the session ``receiver``, opened with its keys without
    the session taking it."""
    header = datagram[:wire.DATA_HEADER_SIZE]
    payload = receiver._current.receiver.open(  # type: ignore[attr-defined]
        wire.read_u64(datagram, 5), datagram[wire.DATA_HEADER_SIZE:], header)
    return wire.parse_frames_untrusted(payload)
