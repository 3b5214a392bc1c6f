"""BBR congestion control (version 1: draft-cardwell-iccrg-bbr-congestion-control-00, and
Linux's tcp_bbr.c for the details the draft leaves open), sans-IO.

BBR does not take loss for congestion. It models the path from what the ACKs say: the
bottleneck bandwidth (the highest delivery rate of the last 10 round trips) and the round-trip
propagation time (the lowest RTT of the last 10 seconds). It paces at the bandwidth times a gain
that cycles around 1 (1.25 for a round trip to probe for more, 0.75 to drain the queue the probe
made, then 1 for six) and caps what is in flight at twice the bandwidth-delay product. A
bottleneck queue that overflows shows as a delivery rate that stops growing, and the pacing
follows it; a packet lost at random on a Wi-Fi or mobile hop leaves rate and RTT as they were,
so the sending rate stays (NewReno and CUBIC halve or cut by 30 % for every such loss). Only a
round trip whose losses show an overflowing queue bounds what may be in flight, as BBRv2's
inflight_hi does (see _check_round_loss), so that BBR shares a shallow queue with other flows.

Recovery supplies the delivery-rate samples (:class:`~.congestion.RateSample`).
"""

from __future__ import annotations

import math
from typing import Final

from .congestion import CongestionConfig, CongestionController, RateSample

STARTUP: Final = 0
DRAIN: Final = 1
PROBE_BW: Final = 2
PROBE_RTT: Final = 3
MODE_NAMES = ("startup", "drain", "probe_bw", "probe_rtt")

HIGH_GAIN: Final = 2 / math.log(2)
"""Startup's pacing and window gain: the smallest that doubles the rate every round trip."""
DRAIN_GAIN: Final = 1 / HIGH_GAIN
"""Drain's pacing gain: empties in one round trip the queue startup built."""
CWND_GAIN: Final = 2.0
"""In flight may reach twice the bandwidth-delay product: room for delayed and stretched ACKs."""
PACING_GAINS = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
"""ProbeBW's cycle, one phase per min_rtt. (Not Final: compiled by mypyc 2.4, this Final tuple
read as unset.)"""
CYCLE_LENGTH: Final = 8
BW_WINDOW_ROUNDS: Final = 10
"""The bandwidth estimate is the highest sample of this many round trips."""
MIN_RTT_WINDOW: Final = 10.0
"""Seconds a min_rtt sample stays valid; then ProbeRTT measures it afresh."""
PROBE_RTT_DURATION: Final = 0.2
"""Seconds ProbeRTT holds in flight down to MIN_PIPE_PACKETS."""
MIN_PIPE_PACKETS: Final = 4
"""The window floor in datagrams: enough to keep ACKs flowing with delayed ACKs."""
FULL_BW_GROWTH: Final = 1.25
FULL_BW_ROUNDS: Final = 3
"""Startup ends when the bandwidth grew less than FULL_BW_GROWTH in FULL_BW_ROUNDS rounds."""
EXTRA_ACKED_WINDOW_ROUNDS: Final = 5
"""Each of the two ACK-aggregation slots covers this many round trips."""
MAX_AGGREGATION_TIME: Final = 0.1
"""Seconds of bandwidth the ACK-aggregation allowance may add to the window, at most."""
HIGH_LOSS: Final = 0.1
"""A round trip that lost more than this share of what it sent (and at least
HIGH_LOSS_MIN_PACKETS: fewer, in a small window, is chance) overflowed a queue: random loss on a
link is rarely that high."""
HIGH_LOSS_MIN_PACKETS: Final = 8
QUEUE_LOSS: Final = 0.02
"""A round trip that lost more than this share while even its fastest RTT sample was above
QUEUE_RTT times min_rtt overflowed a standing queue. BBR's own probing raises the RTT to at most
1.25 times min_rtt, so random loss on an uncongested path does not qualify."""
QUEUE_RTT: Final = 1.3
QUEUE_LOSS_MIN_PACKETS: Final = 2
INFLIGHT_BETA: Final = 0.7
"""What an overflowing round trip leaves of the in-flight bound (BBRv2's inflight_hi)."""
NO_BOUND: Final = 1 << 62


class Bbr(CongestionController):
    """BBR's state machine. Public attributes beyond the interface's, for tests and logs:
    ``mode`` (see MODE_NAMES), ``btl_bw`` (bytes/s, 0.0 before the first sample), ``min_rtt``
    (seconds, ``inf`` before the first sample), ``filled_pipe``."""

    __slots__ = (
        "_ack_epoch_acked",
        "_ack_epoch_start",
        "_bw_rounds",
        "_bw_values",
        "_cwnd_gain",
        "_cycle_index",
        "_cycle_stamp",
        "_extra_acked",
        "_extra_acked_index",
        "_extra_acked_rounds",
        "_full_bw",
        "_full_bw_count",
        "_inflight_hi",
        "_initial_window",
        "_lost_since_ack",
        "_min_rtt_stamp",
        "_next_round_delivered",
        "_pacing",
        "_pacing_gain",
        "_prior_cwnd",
        "_probe_rtt_done",
        "_probe_rtt_round_done",
        "_round_acked",
        "_round_count",
        "_round_lost",
        "_round_rtt",
        "_round_start",
        "btl_bw",
        "filled_pipe",
        "min_rtt",
        "mode",
    )

    def __init__(self, config: CongestionConfig | None = None) -> None:
        super().__init__(config)
        self._initial_window = self.congestion_window
        self.mode = STARTUP
        self.btl_bw = 0.0
        self.min_rtt = math.inf
        self.filled_pipe = False
        self._min_rtt_stamp = 0.0
        # The bandwidth filter: the highest sample of each of the last rounds, by round % size.
        self._bw_values = [0.0] * BW_WINDOW_ROUNDS
        self._bw_rounds = [-1] * BW_WINDOW_ROUNDS
        self._round_count = 0
        self._round_start = False
        self._next_round_delivered = 0
        self._full_bw = 0.0
        self._full_bw_count = 0
        self._pacing_gain = HIGH_GAIN
        self._cwnd_gain = HIGH_GAIN
        self._pacing = 0.0  # bytes/s; 0.0 until the first bandwidth sample
        self._cycle_index = 0
        self._cycle_stamp = 0.0
        self._probe_rtt_done = -1.0  # when ProbeRTT may end; -1.0 while in flight drains
        self._probe_rtt_round_done = False
        self._prior_cwnd = 0
        self._lost_since_ack = False
        # After BBRv2's inflight_hi: BBRv1 keeps a shallow queue overflowing and so starves a
        # flow that joins. A round trip whose loss says a queue overflowed (HIGH_LOSS, or
        # QUEUE_LOSS with the RTT showing a standing queue) bounds what may be in flight to
        # INFLIGHT_BETA of it; each round trip that uses the bound raises it by a datagram.
        self._round_acked = 0
        self._round_lost = 0
        self._round_rtt = math.inf  # the lowest RTT sample of the round trip
        self._inflight_hi = NO_BOUND
        # ACK aggregation (Linux's extra_acked): how far ACKs ran ahead of the bandwidth
        # estimate, the highest of two alternating windows of rounds. Added to the window, it
        # keeps a sender whose ACKs come in bursts (delayed ACKs, a busy receiver) from
        # stalling between them.
        self._extra_acked = [0, 0]
        self._extra_acked_index = 0
        self._extra_acked_rounds = 0
        self._ack_epoch_start = 0.0
        self._ack_epoch_acked = 0

    @property
    def minimum_window(self) -> int:
        return MIN_PIPE_PACKETS * self._max_datagram_size

    def pacing_rate(self, smoothed_rtt: float) -> float:
        if self._pacing > 0.0:
            return self._pacing
        return HIGH_GAIN * self.congestion_window / max(smoothed_rtt, 1e-6)

    def on_packets_lost(self, lost_bytes: int, largest_lost_time_sent: float, now: float) -> bool:
        # Not a congestion signal by itself: the model sees congestion in rate and RTT. A loss
        # ends a bandwidth probe early (_advance_cycle) and counts toward the round trip's loss
        # share, which may say a queue overflowed (_check_round_loss).
        self.bytes_in_flight -= lost_bytes
        self._lost_since_ack = True
        self._round_lost += lost_bytes
        return False

    def on_persistent_congestion(self) -> None:
        # Every packet of several PTOs was lost: the path may have changed entirely. Start
        # again from the floor; the model grows the window back as ACKs return.
        self.congestion_window = self.minimum_window

    def on_ack(self, sample: RateSample, now: float) -> None:
        self._update_round(sample)
        if self._round_start:
            self._check_round_loss(self.bytes_in_flight + sample.acked_bytes)
        self._round_acked += sample.acked_bytes
        if 0.0 < sample.latest_rtt < self._round_rtt:
            self._round_rtt = sample.latest_rtt
        self._update_bandwidth(sample)
        self._update_ack_aggregation(sample, now)
        mode = self.mode
        if mode == PROBE_BW:
            self._advance_cycle(now)
        if self._round_start and not self.filled_pipe and not sample.is_app_limited:
            self._check_full_pipe()
        if mode == STARTUP and self.filled_pipe:
            self.mode = DRAIN
            self._pacing_gain = DRAIN_GAIN
            self._cwnd_gain = HIGH_GAIN
        if self.mode == DRAIN and self.bytes_in_flight <= self._inflight(1.0):
            self._enter_probe_bw(now)
        self._update_min_rtt(sample, now)
        self._set_pacing_rate()
        self._set_window(sample.acked_bytes, sample.delivered_total)
        self._lost_since_ack = False

    # -- the model ---------------------------------------------------------------------------

    def _update_round(self, sample: RateSample) -> None:
        # A round trip ends when a packet sent after the previous round's end is acknowledged.
        if sample.prior_delivered >= self._next_round_delivered:
            self._next_round_delivered = sample.delivered_total
            self._round_count += 1
            self._round_start = True
        else:
            self._round_start = False

    def _check_round_loss(self, prior_in_flight: int) -> None:
        lost, acked, rtt = self._round_lost, self._round_acked, self._round_rtt
        self._round_lost = self._round_acked = 0
        self._round_rtt = math.inf
        mds = self._max_datagram_size
        share = 0.0 if lost < QUEUE_LOSS_MIN_PACKETS * mds else lost / (lost + acked)
        # Startup and drain build and empty a queue on purpose: only ProbeBW's is a signal.
        queued = self.mode == PROBE_BW and rtt != math.inf and rtt > QUEUE_RTT * self.min_rtt
        high = share > HIGH_LOSS and lost >= HIGH_LOSS_MIN_PACKETS * mds
        if high or (share > QUEUE_LOSS and queued):
            bound = min(self.congestion_window, self._inflight_hi)
            self._inflight_hi = max(int(bound * INFLIGHT_BETA), self.minimum_window)
            if high:
                self.filled_pipe = True  # startup overshot: the queue is full
        elif self._inflight_hi != NO_BOUND and prior_in_flight + mds >= self._inflight_hi:
            # Only a bound that is in use (what was in flight before this ACK filled it to the
            # last datagram) probes upwards.
            self._inflight_hi += mds

    def _update_bandwidth(self, sample: RateSample) -> None:
        rate = sample.rate
        # An app-limited sample says how fast the application was, not the path; it counts
        # only when it beats the estimate anyway.
        if rate <= 0.0 or (sample.is_app_limited and rate < self.btl_bw):
            return
        rounds = self._round_count
        slot = rounds % BW_WINDOW_ROUNDS
        values = self._bw_values
        if self._bw_rounds[slot] != rounds:
            self._bw_rounds[slot] = rounds
            values[slot] = rate
        elif rate > values[slot]:
            values[slot] = rate
        else:
            return
        oldest = rounds - BW_WINDOW_ROUNDS
        best = 0.0
        for i in range(BW_WINDOW_ROUNDS):
            if self._bw_rounds[i] > oldest and values[i] > best:
                best = values[i]
        self.btl_bw = best

    def _update_ack_aggregation(self, sample: RateSample, now: float) -> None:
        acked = sample.acked_bytes
        if self._round_start:
            self._extra_acked_rounds += 1
            if self._extra_acked_rounds >= EXTRA_ACKED_WINDOW_ROUNDS:
                self._extra_acked_rounds = 0
                self._extra_acked_index = 1 - self._extra_acked_index
                self._extra_acked[self._extra_acked_index] = 0
        expected = self.btl_bw * (now - self._ack_epoch_start)
        if self._ack_epoch_acked <= expected:
            # ACKs fell behind the estimate: a new epoch of measuring how far they run ahead.
            self._ack_epoch_acked = 0
            self._ack_epoch_start = now
            expected = 0.0
        self._ack_epoch_acked += acked
        extra = min(int(self._ack_epoch_acked - expected), self.congestion_window)
        index = self._extra_acked_index
        if extra > self._extra_acked[index]:
            self._extra_acked[index] = extra

    def _check_full_pipe(self) -> None:
        if self.btl_bw >= self._full_bw * FULL_BW_GROWTH:
            self._full_bw = self.btl_bw
            self._full_bw_count = 0
            return
        self._full_bw_count += 1
        if self._full_bw_count >= FULL_BW_ROUNDS:
            self.filled_pipe = True

    def _enter_probe_bw(self, now: float) -> None:
        self.mode = PROBE_BW
        self._cwnd_gain = CWND_GAIN
        # Start anywhere in the cycle but the draining phase, so that flows which started
        # together do not probe in lockstep (Linux draws at random; the round count is as
        # good and keeps runs reproducible).
        index = self._round_count % (CYCLE_LENGTH - 1)
        self._cycle_index = index + 1 if index >= 1 else index
        self._cycle_stamp = now
        self._pacing_gain = PACING_GAINS[self._cycle_index]

    def _advance_cycle(self, now: float) -> None:
        full_length = now - self._cycle_stamp > self.min_rtt
        gain = self._pacing_gain
        if gain == 1.0:
            advance = full_length
        elif gain > 1.0:
            # Probe until a round trip is over and the extra is in flight, or loss says the
            # queue is full.
            advance = full_length and (
                self._lost_since_ack or self.bytes_in_flight >= self._inflight(gain)
            )
        else:
            advance = full_length or self.bytes_in_flight <= self._inflight(1.0)
        if advance:
            self._cycle_index = (self._cycle_index + 1) % CYCLE_LENGTH
            self._cycle_stamp = now
            self._pacing_gain = PACING_GAINS[self._cycle_index]

    def _update_min_rtt(self, sample: RateSample, now: float) -> None:
        rtt = sample.latest_rtt
        expired = now > self._min_rtt_stamp + MIN_RTT_WINDOW
        if rtt > 0.0 and (rtt <= self.min_rtt or expired):
            self.min_rtt = rtt
            self._min_rtt_stamp = now
        if expired and self.mode != PROBE_RTT and self.min_rtt != math.inf:
            self.mode = PROBE_RTT
            self._pacing_gain = 1.0
            self._cwnd_gain = 1.0
            self._prior_cwnd = self.congestion_window
            self._probe_rtt_done = -1.0
        if self.mode != PROBE_RTT:
            return
        if self._probe_rtt_done < 0.0:
            if self.bytes_in_flight <= self.minimum_window:
                self._probe_rtt_done = now + PROBE_RTT_DURATION
                self._probe_rtt_round_done = False
                self._next_round_delivered = sample.delivered_total
            return
        if self._round_start:
            self._probe_rtt_round_done = True
        if self._probe_rtt_round_done and now >= self._probe_rtt_done:
            self._min_rtt_stamp = now
            self.congestion_window = max(self.congestion_window, self._prior_cwnd)
            if self.filled_pipe:
                self._enter_probe_bw(now)
            else:
                self.mode = STARTUP
                self._pacing_gain = HIGH_GAIN
                self._cwnd_gain = HIGH_GAIN

    # -- the controls ------------------------------------------------------------------------

    def _inflight(self, gain: float) -> int:
        """``gain`` times the estimated bandwidth-delay product, in bytes."""
        if self.btl_bw <= 0.0 or self.min_rtt == math.inf:
            return self._initial_window
        return int(gain * self.btl_bw * self.min_rtt)

    def _set_pacing_rate(self) -> None:
        rate = self._pacing_gain * self.btl_bw
        # Startup never slows down on a low sample: the estimate is still climbing.
        if rate > 0.0 and (self.filled_pipe or rate > self._pacing):
            self._pacing = rate

    def _set_window(self, acked: int, delivered: int) -> None:
        mds = self._max_datagram_size
        target = self._inflight(self._cwnd_gain) + 3 * mds
        if self.filled_pipe:
            extra = max(self._extra_acked[0], self._extra_acked[1])
            target += min(extra, int(self.btl_bw * MAX_AGGREGATION_TIME))
        if target > self._inflight_hi:
            target = self._inflight_hi
        cwnd = self.congestion_window
        if self.filled_pipe:
            cwnd = min(cwnd + acked, target)
        elif cwnd < target or delivered < self._initial_window:
            cwnd += acked
        floor = self.minimum_window
        if cwnd < floor:
            cwnd = floor
        if self.mode == PROBE_RTT and cwnd > floor:
            cwnd = floor
        self.congestion_window = cwnd

    def __repr__(self) -> str:
        return (
            f"Bbr({MODE_NAMES[self.mode]}, cwnd={self.congestion_window}, "
            f"in_flight={self.bytes_in_flight}, btl_bw={self.btl_bw:.0f} B/s, "
            f"min_rtt={self.min_rtt:.6f}, pacing={self._pacing:.0f} B/s)"
        )
