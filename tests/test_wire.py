"""Frame encodings read back by the parser every received packet goes through."""

from __future__ import annotations

import pytest

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
