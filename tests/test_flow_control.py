"""Receive-side flow control on the sans-IO tunnel (simnet, fake clock): what a receiver holds
for an application that does not read stays bounded whatever a trusted peer sends, and the
sender blocks instead (issue #11, items 1, 3 and 5)."""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from pilot_agents.errors import WireError
from pilot_agents.net.tunnel import events, wire
from pilot_agents.net.tunnel.codes import ResetCode
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.session import Session
from tests.simnet import Host, LinkProfile, SimNetwork

KiB = 1024


def established(config: SessionConfig, net: SimNetwork | None = None, *, reading: bool = False
                ) -> tuple[SimNetwork, Host, Host, Session, Session, int]:
    """A tunnel (on ``net``, by default a perfect one) whose receiver ``b`` does not read
    unless ``reading``; a stream from ``a`` to b's port 1."""
    net = net or SimNetwork(7)
    a, b = net.pair(config)
    b.auto_consume = reading
    sa, stream = net.start_stream(a, b, 1, b"first")
    assert net.run_until(lambda: len(b.messages) == 1, 10)
    sb = b.mux.get_session(a.key)
    assert sb is not None
    return net, a, b, sa, sb, stream


def inject(session: Session, stream_id: int, offset: int, data: bytes, fin: bool = False) -> None:
    """A STREAM frame as if it had arrived in an authenticated packet."""
    session._on_stream_frame(wire.StreamFrame(stream_id, 50000, 1, offset, data, fin))


def test_empty_messages_stop_the_sender_and_resume_when_read() -> None:
    """Item 1: 8-byte empty messages used to be free (only payload bytes counted), so a reader
    that took nothing received every one of them as a Python object."""
    config = SessionConfig(
        stream_window=64 * KiB,
        connection_window=128 * KiB,
        stream_delivery_window=16 * KiB,
        connection_delivery_window=32 * KiB,
    )
    net, _, b, sa, sb, stream = established(config)
    total = 40_000  # 320 kB on the wire: five stream windows
    for _ in range(total):
        sa.send_message(stream, b"")
    net.run_for(5)
    handed_out = len(b.messages)
    charge = 8 + config.message_overhead
    assert handed_out <= 1 + config.stream_delivery_window // charge + 1
    recv = sb._streams[stream].recv
    assert len(recv._buffer) <= config.stream_window
    assert sa.stream_buffered(stream) >= (total - config.stream_window // 8) * 8  # blocked
    # Reading resumes it: every message arrives, in order, none twice.
    b.auto_consume = True
    for message in b.messages:
        sb.message_consumed(message.stream_id, len(message.data))
    assert net.run_until(
        lambda: len(b.messages) == total + 1 and sa.stream_buffered(stream) == 0, 60
    )


def test_held_bytes_count_against_the_connection_window_across_streams() -> None:
    """Whole messages the application has not taken hold the tunnel's credit; a reader that
    takes them releases it and the held-back ones follow."""
    config = SessionConfig(stream_window=64 * KiB, connection_window=96 * KiB)
    net, _, b, sa, sb, first = established(config)
    streams = [first] + [sa.open_stream(50001 + i, 1) for i in range(3)]
    for stream in streams:
        for _ in range(64):
            sa.send_message(stream, bytes(1000))
    net.run_for(5)
    assert sa._sent_new_bytes <= config.connection_window
    b.auto_consume = True
    for message in b.messages:
        sb.message_consumed(message.stream_id, len(message.data))
    assert net.run_until(lambda: len(b.messages) == 1 + 4 * 64, 60)


@pytest.mark.parametrize("who_resets", ["receiver", "sender"])
def test_a_reset_stream_gives_its_unread_bytes_back_to_the_tunnel(who_resets: str) -> None:
    """A stream whose reader never read, reset with the tunnel's credit spent on it: that credit
    comes back at once, so a new stream's messages flow (they waited for ever before)."""
    config = SessionConfig(stream_window=64 * KiB, connection_window=96 * KiB)
    net, _, b, sa, sb, first = established(config)
    streams = [first, sa.open_stream(50001, 1)]
    for stream in streams:
        for _ in range(64):
            sa.send_message(stream, bytes(1000))
    net.run_for(5)
    assert sa._sent_new_bytes >= config.connection_window * 0.9  # the tunnel's credit is spent
    for stream in streams:
        if who_resets == "receiver":
            sb.reset_stream(stream, ResetCode.CANCELLED)
        else:
            sa.reset_stream(stream, ResetCode.CANCELLED)
    b.messages.clear()
    b.auto_consume = True
    fresh = sa.open_stream(50003, 1)
    sa.send_message(fresh, b"after")
    assert net.run_until(lambda: [m.data for m in b.messages] == [b"after"], 10)


@pytest.mark.parametrize("who_resets", ["receiver", "sender"])
def test_bytes_in_flight_at_a_reset_are_accounted_by_its_final_size(who_resets: str) -> None:
    """Streams abandoned mid-transfer on a lossy link, again and again: the bytes in flight at
    each reset never arrive, and without the final size in RESET_STREAM both ends' counts of the
    tunnel's credit drifted apart until the sender could send nothing (the receiver's resets
    stopped this tunnel within 30). Both ends now agree on every byte sent."""
    net, _, b, sa, sb, _ = established(
        SessionConfig(stream_window=64 * KiB, connection_window=96 * KiB),
        SimNetwork(11, LinkProfile(delay=0.01, loss=0.1)), reading=True)
    for i in range(30):
        stream = sa.open_stream(50001 + i, 1)
        for _ in range(64):
            sa.send_message(stream, bytes(1000))
        net.run_for(0.015)  # part of it on its way
        (sa if who_resets == "sender" else sb).reset_stream(stream, ResetCode.CANCELLED)
        net.run_for(0.3)
    assert sb._recv_highest_total == sa._sent_new_bytes
    fresh = sa.open_stream(60000, 1)
    sa.send_message(fresh, b"after")
    assert net.run_until(lambda: b.messages[-1].data == b"after", 20)


@pytest.mark.parametrize("who_resets", ["receiver", "sender"])
def test_messages_held_back_for_a_reset_streams_share_of_the_delivery_window_go_out(
    who_resets: str,
) -> None:
    """Two streams' unread messages fill the tunnel's delivery window and a third stream's wait
    for it; then the two are reset. Their share of the window came back, but only a message
    taken handed out what waited for it: with nothing left to take, the third stream's messages
    waited for ever though the application read."""
    config = SessionConfig(
        stream_window=64 * KiB,
        connection_window=256 * KiB,
        stream_delivery_window=16 * KiB,
        connection_delivery_window=32 * KiB,
    )
    net, _, b, sa, sb, first = established(config)
    unread = [first, sa.open_stream(50001, 1)]
    for stream in unread:
        for _ in range(20):
            sa.send_message(stream, bytes(1000))
    net.run_for(2)
    later = sa.open_stream(50002, 1)
    expected = [b"later %d" % i for i in range(5)]
    for message in expected:
        sa.send_message(later, message)
    net.run_for(2)
    assert later in sb._delivery_waiting
    for stream in unread:
        (sb if who_resets == "receiver" else sa).reset_stream(stream, ResetCode.CANCELLED)
    b.auto_consume = True
    assert net.run_until(
        lambda: [m.data for m in b.messages if m.stream_id == later] == expected, 10
    )


@pytest.mark.parametrize("who_resets", ["receiver", "sender"])
def test_a_reset_of_the_only_unread_message_lets_a_partial_message_claim_the_allowance(
    who_resets: str,
) -> None:
    """Two partial messages spend the tunnel's credit while the application holds one unread
    message, so neither may claim the large-message allowance (taking that message would
    return credit). Its stream is reset instead, returning too little to send MAX_DATA: with
    nothing left to take, the allowance was never claimed and both messages waited for ever."""
    config = SessionConfig(stream_window=64 * KiB, connection_window=96 * KiB)
    net, _, b, sa, sb, first = established(config)
    for port in (50001, 50002):
        sa.send_message(sa.open_stream(port, 1), bytes(60 * KiB))
    net.run_for(3)
    assert sa._sent_new_bytes == sb._recv_max_data and sb._large_stream < 0  # credit spent
    (sb if who_resets == "receiver" else sa).reset_stream(first, ResetCode.CANCELLED)
    b.auto_consume = True
    assert net.run_until(lambda: len(b.messages) == 3, 10)


@pytest.mark.parametrize("seed", range(6))
def test_a_stream_reset_before_any_of_its_bytes_arrived_is_settled(seed: int) -> None:
    """Streams reset at once after a write, on a lossy and reordering link: a RESET_STREAM often
    reaches the receiver before any of the stream's bytes (all lost, or overtaken). It was
    ignored there, so those bytes were never counted (the ends drifted apart, the resetting end
    awaited an answer for ever) and a late frame of the stream opened it again, for good."""
    net, a, b, sa, sb, first = established(
        SessionConfig(stream_window=64 * KiB, connection_window=96 * KiB),
        SimNetwork(seed, LinkProfile(delay=0.01, loss=0.3, reorder=0.2)), reading=True)
    for i in range(20):
        stream = sa.open_stream(50001 + i, 1)
        sa.send_message(stream, bytes(3000))
        net.flush(a)  # on its way
        sa.reset_stream(stream, ResetCode.CANCELLED)
        net.run_for(0.5)
    net.run_for(3)
    assert sb._recv_highest_total == sa._sent_new_bytes
    assert list(sb._streams) == [first] and not sa._awaiting_final
    fresh = sa.open_stream(60000, 1)
    sa.send_message(fresh, b"after")
    assert net.run_until(lambda: b.messages[-1].data == b"after", 20)


@pytest.mark.parametrize("queue", ["delivery", "large"])
def test_streams_opened_and_reset_in_a_loop_leave_nothing_queued(queue: str) -> None:
    """A hostile peer opens streams whose first message must wait (for the delivery window a
    reader that takes nothing keeps full, or for the large-message allowance another stream
    holds) and resets each. Their ids stayed queued until the queue moved, which it need never
    do: memory without bound, and each new claim scanned every stale id (20,000 took 4 s)."""
    config = SessionConfig(
        stream_window=64 * KiB,
        connection_window=96 * KiB,
        max_message_size=1024 * KiB,
        connection_delivery_window=1,
    )
    _, _, _, _, sb, first = established(config)
    if queue == "delivery":
        message, waiting = struct.pack("!Q", 1) + b"x", sb._delivery_waiting
    else:
        message, waiting = struct.pack("!Q", 200 * KiB), sb._large_waiting
        inject(sb, first + 2, 0, message)  # takes the allowance, and keeps it
        assert sb._large_stream == first + 2
    for i in range(2, 2000):
        stream = first + 2 * i
        inject(sb, stream, 0, message)
        sent = len(message)
        if queue == "delivery":  # its first is handed out whatever the window (a stream
            inject(sb, stream, sent, message)  # holding none gets one): its second waits
            sent += len(message)
        assert list(waiting) == [stream]
        sb._on_reset_stream(wire.ResetStreamFrame(stream, ResetCode.CANCELLED, sent))
    assert not waiting


@pytest.mark.parametrize("opener", ["sender", "resetter"])
def test_a_fin_that_crosses_a_reset_settles_the_final_size(opener: str) -> None:
    """b resets a stream while a's last bytes and FIN are on their way, and b's RESET_STREAM is
    lost. a has its FIN acknowledged, has b's side of the stream finished too, and forgets the
    stream; b's RESET_STREAM, sent again, finds nothing to answer. The FIN was ignored at b as
    a frame of a gone stream, so b never counted those bytes (its counts drifted from a's) and
    awaited a's final size for ever."""
    net = SimNetwork(5)
    a, b = net.pair(SessionConfig(stream_window=64 * KiB, connection_window=96 * KiB))
    sa, _ = net.start_stream(a, b, 1, b"first")
    assert net.run_until(lambda: len(b.messages) == 1, 5)
    sb = b.mux.get_session(a.key)
    assert sb is not None
    if opener == "sender":
        stream = sa.open_stream(50001, 1)
        sa.send_message(stream, b"hello")
        assert net.run_until(lambda: b.messages[-1].data == b"hello", 5)
    else:
        stream = sb.open_stream(1, 50001)
        sb.send_message(stream, b"hello")
        assert net.run_until(lambda: a.messages and a.messages[-1].data == b"hello", 5)
    sb.finish_stream(stream)  # b's side ends
    net.run_for(0.5)
    sa.send_message(stream, bytes(3000))
    sa.finish_stream(stream)
    net.flush(a)  # on its way
    sb.reset_stream(stream, ResetCode.CANCELLED)
    net.tap = lambda source, destination, data: None  # b's RESET_STREAM is lost
    net.flush(b)
    net.tap = None
    net.run_for(2)
    assert not sa.has_stream(stream) and not sb.has_stream(stream)
    assert sb._recv_highest_total == sa._sent_new_bytes
    assert not sb._awaiting_final
    fresh = sa.open_stream(60000, 1)
    sa.send_message(fresh, b"after")
    assert net.run_until(lambda: b.messages[-1].data == b"after", 5)


def test_overlapping_out_of_order_frames_are_stored_once() -> None:
    """Item 3: every overlapping chunk used to be kept (1.2 GB from 20k frames of 60 kB)."""
    config = SessionConfig(stream_window=1024 * KiB, connection_window=1024 * KiB)
    _, _, _, _, sb, stream = established(config)
    base = sb._streams[stream].recv.delivered
    size = 60_000
    tracemalloc.start()
    try:
        for i in range(2000):
            # Out of order (nothing at ``base``), each overlapping its neighbours; each frame's
            # bytes are an object of their own, as parsed from a packet.
            inject(sb, stream, base + 1 + (i * 7919) % (1000 * KiB - size), bytes(size))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * config.stream_window
    assert not sb.closed


def test_declared_length_above_the_limit_resets_at_the_header() -> None:
    config = SessionConfig(max_message_size=64 * KiB)
    _, _, _, _, sb, stream = established(config)
    base = sb._streams[stream].recv.delivered
    inject(sb, stream, base, struct.pack("!Q", 1 << 30) + bytes(100))
    resets = [e for e in sb._events if isinstance(e, events.StreamReset)]
    assert [r.code for r in resets] == [ResetCode.MESSAGE_TOO_LARGE]
    assert not sb.has_stream(stream)


def test_partial_bodies_count_against_the_window() -> None:
    """Item 3: headers declaring large messages let each stream hold a whole message's worth of
    partial body with no credit counted. Now the tunnel holds at most its window plus the one
    message the large-message allowance admits and one more window for the other streams."""
    config = SessionConfig(
        stream_window=64 * KiB, connection_window=128 * KiB, max_message_size=1024 * KiB
    )
    net, _, b, sa, sb, first = established(config)
    streams = [first] + [sa.open_stream(50001 + i, 1) for i in range(3)]
    for stream in streams:
        sa.send_message(stream, bytes(1000 * KiB))
    net.run_for(10)
    # The message with the allowance and what the others may hold (two connection windows).
    bound = 2 * config.connection_window + config.max_message_size + 8 * len(streams)
    assert sa._sent_new_bytes <= bound
    # The one that got the allowance is whole; the reader takes it and the next one follows.
    assert len(b.messages) == 2
    b.auto_consume = True
    for message in b.messages:
        sb.message_consumed(message.stream_id, len(message.data))
    assert net.run_until(lambda: len(b.messages) == 1 + len(streams), 60)
    assert all(len(m.data) == 1000 * KiB for m in b.messages[1:])


def test_scattered_holes_close_the_tunnel() -> None:
    config = SessionConfig(max_reassembly_gaps=100)
    _, _, _, _, sb, stream = established(config)
    base = sb._streams[stream].recv.delivered
    for i in range(100):
        inject(sb, stream, base + 2 + 2 * i, b"x")
    # One more hole is a protocol error, which closes the tunnel (receive_data's handling).
    with pytest.raises(WireError, match="holes"):
        inject(sb, stream, base + 2 + 2 * 100, b"x")


def test_closed_stream_ids_stay_one_range() -> None:
    """Item 5: ids of one side step by 2, so a set of ids never merged: one range per stream."""
    net = SimNetwork(9)
    a, b = net.pair()
    sa = a.mux.session(b.key, net.now)
    sa.connect(net.now)
    for i in range(300):
        stream = sa.open_stream(50000, 1)
        sa.send_message(stream, i.to_bytes(2, "big"))
        sa.finish_stream(stream)
    assert net.run_until(lambda: len(b.messages) == 300, 30)
    sb = b.mux.get_session(a.key)
    assert sb is not None
    for stream_id in list(sb._streams):
        sb.finish_stream(stream_id)
    assert net.run_until(lambda: not sb._streams, 30)
    assert len(sb._peer_closed_streams) == 1


def test_oversized_header_behind_a_held_back_message_resets_when_reached() -> None:
    config = SessionConfig(max_message_size=64 * KiB, stream_delivery_window=1)
    _, _, b, _, sb, stream = established(config)
    base = sb._streams[stream].recv.delivered
    oversized = struct.pack("!Q", 1 << 30) + bytes(10)
    inject(sb, stream, base, struct.pack("!Q", 1) + b"x" + oversized)
    assert not [e for e in sb._events if isinstance(e, events.MessageReceived)]  # held back
    sb.message_consumed(stream, len(b.messages[0].data))  # "first" taken: "x" goes out
    kinds = [(type(e), getattr(e, "code", None)) for e in sb._events]
    assert kinds[-2:] == [
        (events.MessageReceived, None),
        (events.StreamReset, ResetCode.MESSAGE_TOO_LARGE),
    ]
    assert not sb.has_stream(stream)


def test_many_streams_of_messages_larger_than_their_window_all_arrive() -> None:
    """Ten streams each send one message larger than the stream window to a reader that takes
    everything. The allowance goes to one of them, with one more connection window; the sender
    spread that credit over every stream, the other nine held a partial message each (nothing
    the reader can take), the holder's message could not complete, and nothing ever moved
    again (eight completed). LARGE_MESSAGE makes the sender serve the holder first."""
    config = SessionConfig(
        stream_window=64 * KiB, connection_window=256 * KiB, max_message_size=1024 * KiB
    )
    net = SimNetwork(1)
    a, b = net.pair(config)
    sa, _ = net.start_stream(a, b, 1, b"first")
    assert net.run_until(lambda: len(b.messages) == 1, 5)
    for i in range(10):
        sa.send_message(sa.open_stream(50001 + i, 1), bytes(96 * KiB))
    assert net.run_until(lambda: len(b.messages) == 11, 30)


def test_a_late_large_message_frame_does_not_take_the_holders_place() -> None:
    """A repeated or late LARGE_MESSAGE names a message sent whole long ago: were it obeyed, the
    real holder would lose its turn and wait behind streams that wait for it."""
    config = SessionConfig(stream_window=64 * KiB, connection_window=256 * KiB)
    _, _, _, sa, _, first = established(config)
    holder = sa.open_stream(50001, 1)
    sa.send_message(holder, bytes(96 * KiB))
    sa._on_large_message(wire.LargeMessageFrame(holder, 96 * KiB + 8))
    sa._on_large_message(wire.LargeMessageFrame(first, 5 + 8))  # "first", sent whole
    assert (sa._priority_stream, sa._priority_end) == (holder, 96 * KiB + 8)
    with pytest.raises(WireError, match="past what we wrote"):
        sa._on_large_message(wire.LargeMessageFrame(holder, 2**64 - 1))


@pytest.mark.parametrize("seed", range(4))
def test_large_messages_on_many_streams_both_ways_arrive_over_a_lossy_link(seed: int) -> None:
    """Both ends send messages of one to four stream windows on 24 streams each, over a link
    that loses, reorders and duplicates: a lost LARGE_MESSAGE (with the MAX_DATA that carries
    the extra credit) must not let other streams spend that credit first."""
    config = SessionConfig(
        stream_window=32 * KiB, connection_window=128 * KiB, max_message_size=1024 * KiB
    )
    profile = LinkProfile(delay=0.005, loss=0.05, reorder=0.1, duplicate=0.02)
    net, a, b, sa, sb, _ = established(config, SimNetwork(seed, profile), reading=True)
    a.auto_consume = True
    sizes = [(i % 4 + 1) * 32 * KiB + i for i in range(24)]
    for size in sizes:
        sa.send_message(sa.open_stream(50001, 1), bytes(size))
        sb.send_message(sb.open_stream(1, 50001), bytes(size))
    assert net.run_until(lambda: len(b.messages) == 25 and len(a.messages) == 24, 120)
    assert sorted(len(m.data) for m in a.messages) == sorted(sizes)


def test_a_peer_scattering_closed_stream_ids_is_a_protocol_error() -> None:
    """Bare RESET_STREAMs for every other id of the peer's would each leave a range of closed
    ids held for the tunnel's life; ids closed in order stay one range, however many."""
    config = SessionConfig(max_incoming_streams=8)
    _, _, _, _, sb, first = established(config)
    for n in range(1, 200):  # in order: one range
        sb._on_reset_stream(wire.ResetStreamFrame(first + 2 * n, 0, 0))
    assert len(sb._peer_closed_streams) <= 2
    with pytest.raises(WireError, match="too many holes"):
        for n in range(200, 400):
            sb._on_reset_stream(wire.ResetStreamFrame(first + 4 * n, 0, 0))


def test_a_peer_flooding_resets_while_withholding_acks_is_a_protocol_error() -> None:
    """Each bare RESET_STREAM is answered with ours, queued until a packet may carry it. A peer
    that never acknowledges keeps the congestion window shut: its resets for streams in order
    (one range of closed ids, however many) grew the queue without bound."""
    _, _, _, _, sb, first = established(SessionConfig())
    with pytest.raises(WireError, match="unacknowledged"):
        for n in range(1, 100_000):
            sb._on_reset_stream(wire.ResetStreamFrame(first + 2 * n, 0, 0))
    assert len(sb._control) <= 16384


def test_streams_held_back_for_the_holder_go_when_its_stream_is_reset() -> None:
    """While the peer's allowance holder is served first, other streams' new bytes wait, and
    a stream with nothing else leaves the send order. Reset the holder, and they must be due
    again at once: nothing else would bring them back."""
    config = SessionConfig(stream_window=64 * KiB, connection_window=256 * KiB)
    net, a, _, sa, _, _ = established(config, reading=True)
    holder = sa.open_stream(50001, 1)
    sa.send_message(holder, bytes(96 * KiB))
    other = sa.open_stream(50002, 1)
    sa.send_message(other, b"after")
    sa._on_large_message(wire.LargeMessageFrame(holder, 96 * KiB + 8))
    sa._peer_max_data = sa._sent_new_bytes  # no credit: nothing goes
    net.flush(a)
    assert not sa._send_order
    sa.reset_stream(holder, ResetCode.CANCELLED)
    assert other in sa._send_order


def test_one_port_holds_at_most_its_share_of_the_peers_streams() -> None:
    """Streams a reader has not got to (one-shot messages, a stream each) count against the
    streams a peer may open; one port's share of them is bounded, so that the peer's streams
    to our other ports are still taken (an audit: one unread port refused them all)."""
    config = SessionConfig(max_incoming_streams=8, max_incoming_streams_per_port=4)
    net, a, b, *_ = established(config)  # b reads nothing: the streams stay open
    to_one = [net.start_stream(a, b, 1, b"unread")[1] for _ in range(5)]
    for _ in range(3):
        net.start_stream(a, b, 2, b"other")
    net.run_for(1.0)
    resets = {e.stream_id: e.code for e in a.events if isinstance(e, events.StreamReset)}
    # port 1 had the first stream already: three more, then the port is busy
    assert resets == {to_one[3]: ResetCode.PORT_BUSY, to_one[4]: ResetCode.PORT_BUSY}
    assert sorted(m.data for m in b.messages).count(b"other") == 3
    # the tunnel's own bound still stands above the ports' shares: 7 open, room for one
    late = [net.start_stream(a, b, 3, b"late")[1] for _ in range(2)]
    net.run_for(1.0)
    resets = {e.stream_id: e.code for e in a.events if isinstance(e, events.StreamReset)}
    assert late[0] not in resets and resets[late[1]] == ResetCode.TOO_MANY_STREAMS
