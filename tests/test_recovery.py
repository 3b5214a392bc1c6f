"""Loss detection, RTT estimation and NewReno, driven by a fake clock that starts at 0.0."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from pilot_agents.errors import ConfigError, WireError
from pilot_agents.net.tunnel.congestion import CongestionConfig, NewReno
from pilot_agents.net.tunnel.rangeset import RangeSet
from pilot_agents.net.tunnel.recovery import (
    Recovery,
    RecoveryConfig,
    RttEstimator,
    SentPacket,
)

MDS = 1200
INITIAL_WINDOW = 10 * MDS


def send(
    rec: Recovery,
    pn: int,
    t: float,
    size: int = MDS,
    *,
    ack_eliciting: bool = True,
    in_flight: bool = True,
    probe_mtu: bool = False,
) -> SentPacket:
    packet = SentPacket(pn, t, size, ack_eliciting, in_flight, probe_mtu, data=("payload", pn))
    rec.on_packet_sent(packet)
    return packet


def pns(packets: list[SentPacket]) -> list[int]:
    return [p.packet_number for p in packets]


# ---------------------------------------------------------------------------- RTT estimation


def test_first_rtt_sample_ignores_ack_delay() -> None:
    rec = Recovery()
    send(rec, 0, 0.0)
    result = rec.on_ack_received([(0, 1)], ack_delay=0.02, now=0.05)
    assert result.rtt_sampled and result.newly_acked_largest
    rtt = rec.rtt
    assert rtt.has_sample and rtt.first_sample_time == 0.05
    assert rtt.latest_rtt == pytest.approx(0.05)
    assert rtt.min_rtt == pytest.approx(0.05)
    assert rtt.smoothed_rtt == pytest.approx(0.05)
    assert rtt.rttvar == pytest.approx(0.025)
    assert rec.smoothed_rtt == rtt.smoothed_rtt


def test_initial_estimate_before_any_sample() -> None:
    rtt = RttEstimator(initial_rtt=0.1, max_ack_delay=0.025, granularity=0.001)
    assert not rtt.has_sample
    assert rtt.smoothed_rtt == 0.1
    assert rtt.rttvar == 0.05
    # §6.2.1: smoothed + 4 * rttvar + max_ack_delay
    assert rtt.pto_period() == pytest.approx(0.1 + 0.2 + 0.025)
    # §6.1.2 before a sample: 9/8 of the initial RTT
    assert rtt.loss_delay(9 / 8) == pytest.approx(0.1125)


def test_smoothed_rtt_follows_rfc_formulas() -> None:
    rtt = RttEstimator(initial_rtt=0.1, max_ack_delay=0.025)
    rtt.update(0.1, 0.0, now=1.0)
    # adjusted = 0.14 - 0.02 since 0.14 >= min_rtt + ack_delay
    rtt.update(0.14, 0.02, now=2.0)
    assert rtt.latest_rtt == pytest.approx(0.14)
    assert rtt.min_rtt == pytest.approx(0.1)
    assert rtt.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * abs(0.1 - 0.12))
    assert rtt.smoothed_rtt == pytest.approx(7 / 8 * 0.1 + 1 / 8 * 0.12)
    # a new minimum: min_rtt takes the raw sample, and ack_delay cannot be subtracted
    smoothed, rttvar = rtt.smoothed_rtt, rtt.rttvar
    rtt.update(0.08, 0.01, now=3.0)
    assert rtt.min_rtt == pytest.approx(0.08)
    assert rtt.rttvar == pytest.approx(0.75 * rttvar + 0.25 * abs(smoothed - 0.08))
    assert rtt.smoothed_rtt == pytest.approx(7 / 8 * smoothed + 1 / 8 * 0.08)
    assert rtt.first_sample_time == 1.0


def test_ack_delay_is_clamped_to_max_ack_delay() -> None:
    rtt = RttEstimator(initial_rtt=0.1, max_ack_delay=0.025)
    rtt.update(0.1, 0.0, now=0.0)
    rtt.update(0.2, 1.0, now=1.0)  # the peer claims 1 s; only 25 ms count
    assert rtt.smoothed_rtt == pytest.approx(7 / 8 * 0.1 + 1 / 8 * 0.175)
    assert rtt.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.075)


def test_ack_delay_never_takes_sample_below_min_rtt() -> None:
    rtt = RttEstimator(initial_rtt=0.1, max_ack_delay=0.025)
    rtt.update(0.1, 0.0, now=0.0)
    rtt.update(0.11, 0.02, now=1.0)  # 0.11 - 0.02 < min_rtt: use 0.11 unadjusted
    assert rtt.smoothed_rtt == pytest.approx(7 / 8 * 0.1 + 1 / 8 * 0.11)


def test_negative_ack_delay_and_negative_sample_are_ignored() -> None:
    rtt = RttEstimator(initial_rtt=0.1, max_ack_delay=0.025)
    rtt.update(0.1, 0.0, now=0.0)
    rtt.update(0.12, -5.0, now=1.0)
    assert rtt.smoothed_rtt == pytest.approx(7 / 8 * 0.1 + 1 / 8 * 0.12)
    rtt.update(-1.0, 0.0, now=2.0)  # a clock that stepped back
    assert rtt.latest_rtt == 0.0
    assert rtt.min_rtt == 0.0


def test_rtt_sample_uses_largest_acked_send_time() -> None:
    rec = Recovery()
    send(rec, 0, 0.0)
    send(rec, 1, 0.03)
    rec.on_ack_received([(0, 2)], 0.0, now=0.1)
    assert rec.rtt.latest_rtt == pytest.approx(0.07)


def test_no_rtt_sample_when_only_non_ack_eliciting_packets_are_acked() -> None:
    rec = Recovery()
    send(rec, 0, 0.0, 50, ack_eliciting=False, in_flight=False)
    result = rec.on_ack_received([(0, 1)], 0.0, now=0.5)
    assert pns(result.acked) == [0]
    assert result.newly_acked_largest and not result.rtt_sampled
    assert not rec.rtt.has_sample


def test_no_rtt_sample_when_largest_is_not_newly_acked() -> None:
    rec = Recovery()
    for pn in range(3):
        send(rec, pn, 0.0)
    first = rec.on_ack_received([(1, 3)], 0.0, now=0.1)
    assert first.rtt_sampled
    assert pns(rec.sent_packets.values()) == [0]  # type: ignore[arg-type]
    second = rec.on_ack_received([(0, 3)], 0.0, now=0.2)
    assert pns(second.acked) == [0]
    assert not second.newly_acked_largest and not second.rtt_sampled
    assert rec.rtt.latest_rtt == pytest.approx(0.1)


# ---------------------------------------------------------------------------- loss detection


def test_packet_threshold_then_time_threshold_via_timer() -> None:
    rec = Recovery()
    for pn in range(5):
        send(rec, pn, 0.0)
    result = rec.on_ack_received([(4, 5)], 0.0, now=0.01)
    assert pns(result.acked) == [4]
    # §6.1.1: 0 and 1 have three later packets acknowledged; 2 and 3 are only suspicious.
    assert pns(result.lost) == [0, 1]
    assert [p.data for p in result.lost] == [("payload", 0), ("payload", 1)]
    assert list(rec.sent_packets) == [2, 3]
    assert rec.bytes_in_flight == 2 * MDS
    # §6.1.2: first sample 10 ms -> lost 9/8 * 10 ms after being sent
    assert rec.loss_time == pytest.approx(0.01125)
    assert rec.get_timer() == rec.loss_time

    early = rec.on_timeout(0.011)
    assert early.lost == [] and early.probe_packets == 0
    assert list(rec.sent_packets) == [2, 3]

    timer = rec.get_timer()
    assert timer is not None
    fired = rec.on_timeout(timer)
    assert pns(fired.lost) == [2, 3]
    assert fired.probe_packets == 0
    assert rec.bytes_in_flight == 0
    assert rec.loss_time is None
    assert rec.get_timer() is None  # nothing ack-eliciting left in flight


@pytest.mark.parametrize(
    "ranges",
    [
        [(0, 2), (4, 6), (8, 10)],
        [(8, 10), (4, 6), (0, 2)],  # wire order: largest first
        [range(8, 10), range(0, 2), range(4, 6)],
        [(0, 1), (1, 2), (4, 6), (8, 9), (8, 10), (5, 5)],  # overlapping, touching, empty
        RangeSet([(0, 2), (4, 6), (8, 10)]),
    ],
)
def test_ack_ranges_with_gaps(ranges: Any) -> None:
    rec = Recovery()
    for pn in range(10):
        send(rec, pn, 0.0)
    result = rec.on_ack_received(ranges, 0.0, now=0.05)
    assert pns(result.acked) == [0, 1, 4, 5, 8, 9]
    assert pns(result.lost) == [2, 3, 6]  # <= largest - 3
    assert list(rec.sent_packets) == [7]
    assert rec.largest_acked == 9
    assert rec.bytes_in_flight == MDS
    assert rec.ack_eliciting_in_flight == 1


def test_duplicate_and_stale_acks_are_harmless() -> None:
    rec = Recovery()
    for pn in range(6):
        send(rec, pn, 0.0)
    first = rec.on_ack_received([(0, 6)], 0.0, now=0.1)
    assert pns(first.acked) == list(range(6))
    cwnd, rtt = rec.congestion_window, rec.rtt.smoothed_rtt
    for ranges in ([(0, 6)], [(0, 3)], [(5, 6)]):
        again = rec.on_ack_received(ranges, 0.0, now=0.2)
        assert again.acked == [] and again.lost == []
        assert not again.rtt_sampled
    assert rec.bytes_in_flight == 0
    assert rec.congestion_window == cwnd
    assert rec.rtt.smoothed_rtt == rtt


def test_empty_ack_is_a_no_op() -> None:
    rec = Recovery()
    send(rec, 0, 0.0)
    result = rec.on_ack_received([], 0.0, now=1.0)
    assert result.acked == [] and result.lost == []
    assert rec.bytes_in_flight == MDS


def test_ack_of_never_sent_packet_is_a_wire_error() -> None:
    rec = Recovery()
    with pytest.raises(WireError):
        rec.on_ack_received([(0, 1)], 0.0, now=0.0)
    send(rec, 0, 0.0)
    with pytest.raises(WireError):
        rec.on_ack_received([(0, 2)], 0.0, now=0.0)
    with pytest.raises(WireError):
        rec.on_ack_received([(-3, 1)], 0.0, now=0.0)
    assert rec.bytes_in_flight == MDS


def test_packet_numbers_must_increase() -> None:
    rec = Recovery()
    send(rec, 5, 0.0)
    with pytest.raises(ValueError):
        send(rec, 5, 0.0)
    with pytest.raises(ValueError):
        send(rec, 3, 0.0)
    rec.on_untracked_packet_sent(6)
    with pytest.raises(ValueError):
        rec.on_untracked_packet_sent(6)
    with pytest.raises(ValueError):
        send(rec, 6, 0.0)


def test_untracked_packet_numbers_are_tolerated() -> None:
    # The session need not register pure-ACK packets: their numbers are simply absent.
    rec = Recovery()
    send(rec, 0, 0.0)
    send(rec, 2, 0.0)
    send(rec, 4, 0.0)
    result = rec.on_ack_received([(0, 5)], 0.0, now=0.1)
    assert pns(result.acked) == [0, 2, 4]
    for pn in (5, 6, 7):
        send(rec, pn, 0.2)
    # Only an untracked packet (8, never registered) is acknowledged above the frontier:
    # the frontier still moves, so 5 falls to the packet threshold.
    rec.on_untracked_packet_sent(8)  # e.g. a pure ACK the session does not track
    result = rec.on_ack_received([(8, 9)], 0.0, now=0.3)
    assert result.acked == []
    assert pns(result.lost) == [5]
    assert list(rec.sent_packets) == [6, 7]
    assert rec.loss_time is not None


# ---------------------------------------------------------------------------- probe timeout


def test_pto_timer_value_and_exponential_backoff() -> None:
    rec = Recovery()
    send(rec, 0, 1.0)
    period = 0.1 + 4 * 0.05 + 0.025  # initial RTT 100 ms, rttvar 50 ms, max_ack_delay 25 ms
    assert rec.get_timer() == pytest.approx(1.0 + period)

    assert rec.on_timeout(1.0 + period - 0.005).probe_packets == 0  # early: no-op
    assert rec.pto_count == 0

    timer = rec.get_timer()
    assert timer is not None
    fired = rec.on_timeout(timer)
    assert fired.probe_packets == 1  # a single packet outstanding: one probe suffices
    assert fired.lost == []  # §6.2.4: a PTO declares nothing lost
    assert rec.pto_count == 1
    assert rec.bytes_in_flight == MDS and list(rec.sent_packets) == [0]
    assert rec.get_timer() == pytest.approx(1.0 + 2 * period)

    send(rec, 1, 1.7)  # the probe restarts the timer from its send time
    assert rec.get_timer() == pytest.approx(1.7 + 2 * period)
    timer = rec.get_timer()
    assert timer is not None
    assert rec.on_timeout(timer).probe_packets == 2
    assert rec.pto_count == 2
    assert rec.get_timer() == pytest.approx(1.7 + 4 * period)


def test_pto_period_uses_measured_rtt() -> None:
    rec = Recovery()
    send(rec, 0, 0.0)
    rec.on_ack_received([(0, 1)], 0.0, now=0.05)  # smoothed 50 ms, rttvar 25 ms
    send(rec, 1, 1.0)
    assert rec.get_timer() == pytest.approx(1.0 + 0.05 + 0.1 + 0.025)


def test_pto_backoff_exponent_is_capped_but_count_is_not() -> None:
    rec = Recovery(RecoveryConfig(max_pto_backoff_exponent=2))
    send(rec, 0, 0.0)
    period = rec.rtt.pto_period()
    for _ in range(5):
        timer = rec.get_timer()
        assert timer is not None
        assert rec.on_timeout(timer).probe_packets == 1
    assert rec.pto_count == 5
    assert rec.get_timer() == pytest.approx(4 * period)


def test_pto_count_resets_on_ack_but_not_on_stale_ack() -> None:
    rec = Recovery()
    send(rec, 0, 0.0)
    send(rec, 1, 0.0)
    for _ in range(2):
        timer = rec.get_timer()
        assert timer is not None
        rec.on_timeout(timer)
    assert rec.pto_count == 2
    send(rec, 2, 1.0)
    rec.on_ack_received([(0, 3)], 0.0, now=1.1)
    assert rec.pto_count == 0

    send(rec, 3, 2.0)
    timer = rec.get_timer()
    assert timer is not None
    assert timer == pytest.approx(2.0 + rec.rtt.pto_period())
    rec.on_timeout(timer)
    assert rec.pto_count == 1
    rec.on_ack_received([(0, 3)], 0.0, now=3.0)  # repeats old news: no sign of life
    assert rec.pto_count == 1


def test_no_timer_without_ack_eliciting_packets_in_flight() -> None:
    rec = Recovery()
    assert rec.get_timer() is None
    send(rec, 0, 0.0, 40, ack_eliciting=False, in_flight=False)
    assert rec.get_timer() is None
    result = rec.on_timeout(100.0)
    assert result.lost == [] and result.probe_packets == 0
    assert rec.pto_count == 0


# ---------------------------------------------------------------------------- congestion control


def test_slow_start_grows_by_acked_bytes() -> None:
    rec = Recovery()
    for pn in range(10):  # fill the initial window
        send(rec, pn, 0.0)
    assert not rec.can_send(MDS)
    rec.on_ack_received([(0, 10)], 0.0, now=0.1)
    assert rec.congestion_window == 2 * INITIAL_WINDOW
    assert rec.cc.ssthresh is None
    assert rec.bytes_in_flight == 0
    assert rec.cc.available() == 2 * INITIAL_WINDOW


def test_window_does_not_grow_when_application_limited() -> None:
    rec = Recovery()
    send(rec, 0, 0.0)  # one packet in a ten-packet window (RFC 9002 §7.8)
    rec.on_ack_received([(0, 1)], 0.0, now=0.1)
    assert rec.congestion_window == INITIAL_WINDOW


def test_congestion_avoidance_adds_one_datagram_per_window() -> None:
    cc = NewReno()
    for _ in range(10):
        cc.on_packet_sent(MDS)
    assert cc.on_packets_lost(MDS, largest_lost_time_sent=0.0, now=1.0)
    assert cc.congestion_window == cc.ssthresh == INITIAL_WINDOW // 2
    assert not cc.in_slow_start
    cc.on_packet_sent(MDS)  # window-limited: 10 800 in flight > 6 000
    for _ in range(4):
        cc.on_packet_acked(MDS, time_sent=2.0)
    assert cc.congestion_window == 6000
    cc.on_packet_acked(MDS, time_sent=2.0)  # a full window acknowledged
    assert cc.congestion_window == 6000 + MDS
    for _ in range(4):
        cc.on_packet_acked(MDS, time_sent=2.0)
    assert cc.congestion_window == 6000 + MDS
    assert cc.bytes_in_flight == MDS


def test_acks_of_packets_sent_before_recovery_do_not_grow_window() -> None:
    cc = NewReno()
    for _ in range(10):
        cc.on_packet_sent(MDS)
    cc.on_packets_lost(MDS, largest_lost_time_sent=0.5, now=1.0)
    for _ in range(9):
        cc.on_packet_acked(MDS, time_sent=0.9)
    assert cc.congestion_window == 6000
    assert cc.in_recovery(1.0) and not cc.in_recovery(1.1)


def test_one_reduction_per_recovery_period() -> None:
    cc = NewReno()
    for _ in range(10):
        cc.on_packet_sent(MDS)
    assert cc.on_packets_lost(MDS, largest_lost_time_sent=0.0, now=1.0)
    assert cc.congestion_window == 6000
    # Sent before recovery began: the same congestion event.
    assert not cc.on_packets_lost(2 * MDS, largest_lost_time_sent=0.9, now=1.2)
    assert not cc.on_packets_lost(MDS, largest_lost_time_sent=1.0, now=1.3)
    assert cc.congestion_window == 6000
    # Sent after: a new event.
    assert cc.on_packets_lost(MDS, largest_lost_time_sent=1.5, now=2.0)
    assert cc.congestion_window == 3000
    assert cc.recovery_start_time == 2.0
    assert cc.on_packets_lost(MDS, largest_lost_time_sent=2.5, now=3.0)
    assert cc.congestion_window == cc.minimum_window == 2 * MDS
    assert cc.bytes_in_flight == 10 * MDS - 6 * MDS


def test_recovery_reduces_once_for_losses_found_by_ack_and_timer() -> None:
    rec = Recovery()
    for pn in range(5):
        send(rec, pn, 0.0)
    rec.on_ack_received([(4, 5)], 0.0, now=0.01)
    assert rec.congestion_window == INITIAL_WINDOW // 2
    timer = rec.get_timer()
    assert timer is not None
    assert len(rec.on_timeout(timer).lost) == 2
    assert rec.congestion_window == INITIAL_WINDOW // 2


def _persistent_congestion_setup() -> Recovery:
    rec = Recovery()
    send(rec, 0, 0.0)
    rec.on_ack_received([(0, 1)], 0.0, now=0.1)  # first RTT sample: 100 ms
    # Persistent-congestion duration is about 3 PTO periods (< 1 s here); these span 1.5 s.
    for pn, t in zip(range(1, 5), (1.0, 1.5, 2.0, 2.5), strict=True):
        send(rec, pn, t)
    send(rec, 5, 2.6)
    return rec


def test_persistent_congestion_collapses_window_to_minimum() -> None:
    rec = _persistent_congestion_setup()
    result = rec.on_ack_received([(5, 6)], 0.0, now=2.7)
    assert pns(result.lost) == [1, 2, 3, 4]
    assert result.persistent_congestion
    assert rec.congestion_window == rec.cc.minimum_window == 2 * MDS
    assert rec.cc.ssthresh == INITIAL_WINDOW // 2
    assert rec.cc.recovery_start_time is None  # §7.6.2 / B.8: slow start again
    assert rec.bytes_in_flight == 0


def test_no_persistent_congestion_when_a_packet_in_between_was_acked() -> None:
    rec = _persistent_congestion_setup()
    result = rec.on_ack_received([(3, 4), (5, 6)], 0.0, now=2.7)
    assert pns(result.lost) == [1, 2, 4]
    assert not result.persistent_congestion
    assert rec.congestion_window == INITIAL_WINDOW // 2


def test_no_persistent_congestion_before_first_rtt_sample() -> None:
    rec = Recovery()
    for pn, t in enumerate((0.0, 0.5, 1.0, 1.5, 2.0, 2.1)):
        send(rec, pn, t)
    result = rec.on_ack_received([(5, 6)], 0.0, now=2.2)
    assert pns(result.lost) == [0, 1, 2, 3, 4]
    assert not result.persistent_congestion
    assert rec.congestion_window == INITIAL_WINDOW // 2


def test_mtu_probe_loss_does_not_shrink_window() -> None:
    rec = Recovery()
    send(rec, 0, 0.0, 1500, probe_mtu=True)
    for pn in (1, 2, 3):
        send(rec, pn, 0.0)
    result = rec.on_ack_received([(1, 4)], 0.0, now=0.05)
    assert pns(result.lost) == [0] and result.lost[0].is_probe_mtu
    assert rec.congestion_window == INITIAL_WINDOW
    assert rec.cc.ssthresh is None and rec.cc.recovery_start_time is None
    assert rec.bytes_in_flight == 0


def test_mtu_probe_lost_by_timer_does_not_shrink_window() -> None:
    rec = Recovery()
    send(rec, 0, 0.0, 1500, probe_mtu=True)
    send(rec, 1, 0.0)
    rec.on_ack_received([(1, 2)], 0.0, now=0.05)
    timer = rec.loss_time
    assert timer is not None
    result = rec.on_timeout(timer)
    assert pns(result.lost) == [0]
    assert rec.congestion_window == INITIAL_WINDOW
    assert rec.bytes_in_flight == 0
    assert rec.ack_eliciting_in_flight == 0


def test_mtu_probe_lost_with_real_losses_only_real_ones_count() -> None:
    rec = Recovery()
    send(rec, 0, 0.0, 1500, probe_mtu=True)
    send(rec, 1, 0.0)
    for pn in (2, 3, 4):
        send(rec, pn, 0.0)
    result = rec.on_ack_received([(2, 5)], 0.0, now=0.05)
    assert pns(result.lost) == [0, 1]
    assert rec.congestion_window == INITIAL_WINDOW // 2
    assert rec.bytes_in_flight == 0


def test_set_max_datagram_size_rescales_windows() -> None:
    cc = NewReno()
    cc.set_max_datagram_size(1500)
    assert cc.congestion_window == 10 * 1500
    assert cc.minimum_window == 2 * 1500
    cc.on_packet_sent(1500)
    cc.on_packets_lost(1500, 0.0, now=1.0)
    assert cc.ssthresh == 7500
    cc.set_max_datagram_size(3000)
    assert cc.ssthresh == 15000 and cc.congestion_window == 15000
    with pytest.raises(ConfigError):
        cc.set_max_datagram_size(0)


def test_can_send_and_available() -> None:
    cc = NewReno(CongestionConfig(initial_window_packets=2))
    assert cc.can_send(2 * MDS) and not cc.can_send(2 * MDS + 1)
    cc.on_packet_sent(2 * MDS)
    assert cc.available() == 0 and not cc.can_send(1)
    cc.on_packet_sent(MDS)  # a PTO probe may overcommit the window
    assert cc.available() == 0


def test_discard_all_forgets_without_congestion_reaction() -> None:
    rec = Recovery()
    send(rec, 0, 0.0)
    send(rec, 1, 0.0, 30, ack_eliciting=False, in_flight=False)
    send(rec, 2, 0.0)
    rec.on_ack_received([(2, 3)], 0.0, now=0.01)  # 0 pending, loss timer armed
    timer = rec.get_timer()
    assert timer is not None
    rec.on_timeout(timer + 10)  # and whatever fires next...
    send(rec, 3, 1.0)
    send(rec, 4, 1.0)
    timer = rec.get_timer()
    assert timer is not None
    rec.on_timeout(timer)
    assert rec.pto_count == 1
    cwnd = rec.congestion_window
    dropped = rec.discard_all()
    assert pns(dropped) == [3, 4]
    assert rec.bytes_in_flight == 0
    assert rec.ack_eliciting_in_flight == 0
    assert rec.get_timer() is None and rec.loss_time is None and rec.pto_count == 0
    assert rec.congestion_window == cwnd
    assert rec.on_ack_received([(3, 5)], 0.0, now=1.5).acked == []
    send(rec, 5, 2.0)  # the packet number space carries on
    assert pns(rec.on_ack_received([(5, 6)], 0.0, now=2.1).acked) == [5]


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        RecoveryConfig(initial_rtt=0.0)
    with pytest.raises(ConfigError):
        RecoveryConfig(packet_threshold=0)
    with pytest.raises(ConfigError):
        RecoveryConfig(time_threshold=0.5)
    with pytest.raises(ConfigError):
        CongestionConfig(loss_reduction_factor=1.0)
    with pytest.raises(ConfigError):
        CongestionConfig(initial_window_packets=1, minimum_window_packets=2)


# ---------------------------------------------------------------------------- scale


def test_cumulative_acks_of_100k_packets_are_linear() -> None:
    # Every ACK repeats the full range [0, n): a per-packet-number walk would be quadratic
    # (5 * 10**9 steps) and hang; the frontier makes each ACK touch only new packets.
    rec = Recovery()
    n = 100_000
    t = 0.0
    acked = 0
    for pn in range(n):
        t += 0.00001
        send(rec, pn, t)
        if pn % 2 == 1:
            acked += len(rec.on_ack_received([(0, pn + 1)], 0.0, now=t + 0.001).acked)
    assert acked == n
    assert rec.bytes_in_flight == 0 and not rec.sent_packets


def test_single_range_ack_of_10k_packets() -> None:
    rec = Recovery()
    for pn in range(10_000):
        send(rec, pn, 0.0)
    result = rec.on_ack_received([(0, 10_000)], 0.0, now=0.1)
    assert len(result.acked) == 10_000 and result.lost == []
    assert rec.bytes_in_flight == 0
    for pn in range(10_000, 10_010):
        send(rec, pn, 0.2)
    for _ in range(1000):  # huge, mostly stale ranges: cheap and harmless
        assert rec.on_ack_received([(0, 10_000)], 0.0, now=0.3).acked == []
    assert rec.bytes_in_flight == 10 * MDS


# ---------------------------------------------------------------------------- random model


class RecoveryMachine(RuleBasedStateMachine):
    """Random sends, ACKs, clock steps and timeouts against a model of what is outstanding."""

    def __init__(self) -> None:
        super().__init__()
        self.rec = Recovery()
        self.now = 0.0
        self.next_pn = 0
        self.outstanding: dict[int, SentPacket] = {}

    def _resolve(self, packets: list[SentPacket]) -> None:
        for packet in packets:
            # Each packet is reported once, and only while it is outstanding.
            assert self.outstanding.pop(packet.packet_number) is packet

    @rule(
        size=st.integers(1, 1500),
        ack_eliciting=st.booleans(),
        in_flight=st.booleans(),
        probe_mtu=st.booleans(),
        skip=st.sampled_from([0, 0, 0, 1, 3]),
        count=st.integers(1, 8),
    )
    def send(
        self,
        size: int,
        ack_eliciting: bool,
        in_flight: bool,
        probe_mtu: bool,
        skip: int,
        count: int,
    ) -> None:
        for _ in range(skip):  # untracked packet numbers (e.g. pure ACKs not registered)
            self.rec.on_untracked_packet_sent(self.next_pn)
            self.next_pn += 1
        in_flight = in_flight or ack_eliciting
        for _ in range(count):
            packet = SentPacket(
                self.next_pn, self.now, size, ack_eliciting, in_flight, probe_mtu and in_flight
            )
            self.rec.on_packet_sent(packet)
            self.outstanding[self.next_pn] = packet
            self.next_pn += 1

    @rule(dt=st.floats(0.0, 0.3))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.rec.largest_sent is not None)
    @rule(data=st.data(), ack_delay=st.floats(-0.01, 0.1))
    def ack_ranges(self, data: st.DataObject, ack_delay: float) -> None:
        top = self.rec.largest_sent
        assert top is not None
        raw = data.draw(
            st.lists(st.tuples(st.integers(0, top), st.integers(0, 12)), min_size=1, max_size=6)
        )
        ranges = [(start, min(start + length, top + 1)) for start, length in raw]
        self._ack(ranges, ack_delay)

    @precondition(lambda self: self.rec.largest_sent is not None)
    @rule(ack_delay=st.floats(0.0, 0.03))
    def ack_everything(self, ack_delay: float) -> None:
        top = self.rec.largest_sent
        assert top is not None
        self._ack([(0, top + 1)], ack_delay)

    def _ack(self, ranges: list[tuple[int, int]], ack_delay: float) -> None:
        before = self.rec.largest_acked
        result = self.rec.on_ack_received(ranges, ack_delay, self.now)
        largest = self.rec.largest_acked
        if any(e > s for s, e in ranges):
            assert largest is not None
            assert before is None or largest >= before
        else:
            assert largest == before and not result.acked
            return
        assert largest is not None
        for packet in result.acked:
            assert any(s <= packet.packet_number < e for s, e in ranges)
        for packet in result.lost:
            # Only packets older than an acknowledged one can be lost (§6.1).
            assert packet.packet_number < largest
            assert not any(s <= packet.packet_number < e for s, e in ranges)
        assert pns(result.acked) == sorted(pns(result.acked))
        self._resolve(result.acked)
        self._resolve(result.lost)
        for pn in self.outstanding:
            # Nothing the ACK covers may stay outstanding...
            assert not any(s <= pn < e for s, e in ranges)
        # RFC 9002 A.7 runs loss detection only for an ACK that acknowledges something new (a
        # repeated one returns early); older packets past a threshold then wait for the loss timer.
        if result.acked or largest != before:
            self._check_loss_detection_complete()
        if result.acked:
            assert self.rec.pto_count == 0

    def _check_loss_detection_complete(self) -> None:
        # ...and right after loss detection no older packet may be past either threshold.
        largest = self.rec.largest_acked
        if largest is None:
            return
        delay = self.rec.rtt.loss_delay(self.rec.config.time_threshold)
        for pn, packet in self.outstanding.items():
            if pn < largest:
                assert packet.time_sent + delay > self.now

    @rule()
    def fire_timer(self) -> None:
        timer = self.rec.get_timer()
        if timer is None:
            return
        self.now = max(self.now, timer)
        pto_before = self.rec.pto_count
        result = self.rec.on_timeout(self.now)
        assert result.probe_packets in (0, 1, 2)
        if result.probe_packets:
            assert result.lost == []
            assert self.rec.pto_count == pto_before + 1
        self._resolve(result.lost)
        if self.rec.loss_time is None or self.rec.loss_time > self.now:
            self._check_loss_detection_complete()

    @rule()
    def discard_all(self) -> None:
        self._resolve(self.rec.discard_all())
        assert not self.outstanding

    @invariant()
    def accounting(self) -> None:
        rec = self.rec
        assert rec.bytes_in_flight == sum(p.size for p in self.outstanding.values() if p.in_flight)
        assert rec.ack_eliciting_in_flight == sum(
            1 for p in self.outstanding.values() if p.ack_eliciting
        )
        assert list(rec.sent_packets) == sorted(self.outstanding)
        assert rec.congestion_window >= rec.cc.minimum_window
        largest = rec.largest_acked
        if largest is not None:
            # §6.1.1: the packet threshold leaves at most threshold - 1 older packets waiting.
            threshold = rec.config.packet_threshold
            assert all(pn > largest - threshold for pn in self.outstanding if pn < largest)
        timer = rec.get_timer()
        if rec.loss_time is not None:
            assert timer == rec.loss_time
            # Something below the frontier is still waiting out the time threshold.
            largest = rec.largest_acked
            assert largest is not None
            assert any(pn < largest for pn in self.outstanding)
        else:
            assert (timer is None) == (rec.ack_eliciting_in_flight == 0)


TestRecoveryMachine = RecoveryMachine.TestCase
TestRecoveryMachine.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
