"""Frame encodings read back by the parser every received packet goes through."""

from __future__ import annotations

import pytest

from pilot_agents.errors import WireError
from pilot_agents.net.tunnel import wire


@pytest.mark.parametrize("count", [1, 2, wire.MAX_ACK_RANGES, wire.MAX_ACK_RANGES + 5])
def test_ack_round_trip(count: int) -> None:
    ranges = [(10 * i, 10 * i + 3 + i) for i in range(count)]
    (frame,) = wire.parse_frames_untrusted(wire.encode_ack(ranges, 0.0125))
    assert isinstance(frame, wire.AckFrame)
    assert list(frame.ranges) == ranges[-wire.MAX_ACK_RANGES:]  # only the newest fit
    assert frame.delay == 0.0125


def test_ack_delay_saturates() -> None:
    (frame,) = wire.parse_frames_untrusted(wire.encode_ack([(0, 1)], 10_000.0))
    assert isinstance(frame, wire.AckFrame)
    assert frame.delay == 0xFFFFFFFF / 1_000_000


def _stream_and_ack() -> bytes:
    # Every field at its widest, so that each byte the parser reads is checked.
    header = wire.encode_stream_header(2**32 - 1, 65535, 1, 2**64 - 2, 3, True)
    return header + b"abc" + wire.encode_ack([(2**63, 2**63 + 2**32 - 1)], 0.5)


def test_stream_and_ack_round_trip() -> None:
    stream, ack = wire.parse_frames_untrusted(_stream_and_ack())
    assert isinstance(stream, wire.StreamFrame)
    assert (stream.stream_id, stream.src_port, stream.dst_port) == (2**32 - 1, 65535, 1)
    assert (stream.offset, stream.data, stream.fin) == (2**64 - 2, b"abc", True)
    assert isinstance(ack, wire.AckFrame)
    assert ack.ranges == ((2**63, 2**63 + 2**32 - 1),)
    assert ack.delay == 0.5


def test_reset_stream_round_trip() -> None:
    (frame,) = wire.parse_frames_untrusted(wire.encode_reset_stream(2**32 - 1, 65535, 2**64 - 1))
    assert frame == wire.ResetStreamFrame(2**32 - 1, 65535, 2**64 - 1)


def test_large_message_round_trip_and_truncation() -> None:
    encoded = wire.encode_large_message(2**32 - 1, 2**64 - 1)
    assert wire.parse_frames_untrusted(encoded) == [wire.LargeMessageFrame(2**32 - 1, 2**64 - 1)]
    with pytest.raises(WireError, match="truncated"):
        wire.parse_frames_untrusted(encoded[:-1])


def test_every_truncation_is_a_wire_error() -> None:
    packet = _stream_and_ack()
    for size in range(1, len(packet)):
        cut = packet[:size]
        if size == wire.STREAM_FRAME_OVERHEAD + 3:
            assert len(wire.parse_frames_untrusted(cut)) == 1  # the STREAM frame alone
            continue
        with pytest.raises(WireError):
            wire.parse_frames_untrusted(cut)


def test_empty_ack_range_is_refused() -> None:
    frame = bytearray(wire.encode_ack([(5, 6)], 0.0))
    frame[-4:] = bytes(4)  # the range's length
    with pytest.raises(WireError, match="empty ACK range"):
        wire.parse_frames_untrusted(bytes(frame))
