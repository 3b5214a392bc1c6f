"""CUBIC congestion control (RFC 9438), sans-IO.

Slow start, recovery periods and the window-limited rule are NewReno's (RFC 9438 §4.8 and
§4.10 keep them); what differs is congestion avoidance, which follows a cubic function of the
time since the last congestion event (so the window climbs back to where loss struck within a
few seconds whatever the RTT), and the reduction, which keeps 70 % of the window. Fast
convergence (§4.7) lets a newcomer take bandwidth from an established flow.

CUBIC still reads every loss as congestion: under random loss it does better than NewReno
(smaller cuts, faster regrowth) but far worse than BBR.
"""

from __future__ import annotations

from typing import Final

from .congestion import CongestionConfig, NewReno, RateSample

C: Final = 0.4
"""RFC 9438 §5.1 C, in datagrams per second cubed."""
BETA: Final = 0.7
"""RFC 9438 §4.6 beta_cubic: the window kept on a congestion event."""
ALPHA: Final = 3 * (1 - BETA) / (1 + BETA)
"""RFC 9438 §4.3 alpha_cubic: the Reno-friendly estimate's growth per window acknowledged."""


class Cubic(NewReno):
    """CUBIC window arithmetic. Windows in bytes; the cubic function in bytes too (C scaled by
    the datagram size)."""

    __slots__ = ("_avoidance_acked", "_epoch_start", "_k", "_w", "_w_est", "_w_max")

    def __init__(self, config: CongestionConfig | None = None) -> None:
        super().__init__(config)
        self._w_max = 0.0  # bytes: the window when the last congestion event struck
        self._epoch_start: float | None = None  # when this avoidance epoch began (None: not yet)
        self._k = 0.0  # seconds from the epoch start until the cubic reaches _w_max again
        self._w = 0.0  # the window with its fraction, during an epoch
        self._w_est = 0.0  # bytes: what Reno would have by now (§4.3)
        self._avoidance_acked = 0  # bytes acked in avoidance during this ACK frame

    def _grow_in_avoidance(self, size: int) -> None:
        # The growth depends on the time of the ACK, which on_ack gets: gather till then.
        self._avoidance_acked += size

    def on_ack(self, sample: RateSample, now: float) -> None:
        acked = self._avoidance_acked
        if not acked:
            return
        self._avoidance_acked = 0
        mds = self._max_datagram_size
        c = C * mds
        if self._epoch_start is None:
            self._epoch_start = now
            self._w = float(self.congestion_window)
            self._w_est = self._w
            if self._w_max < self._w:  # left slow start without a loss: plateau at once
                self._w_max = self._w
            self._k = ((self._w_max - self._w) / c) ** (1 / 3)
        w = self._w
        t = now - self._epoch_start
        rtt = sample.smoothed_rtt
        offset = t + rtt - self._k
        target = c * offset * offset * offset + self._w_max
        target = min(max(target, w), 1.5 * w)  # §4.2: between cwnd and 1.5 cwnd per RTT
        self._w_est += ALPHA * acked * mds / w
        offset = t - self._k
        if c * offset * offset * offset + self._w_max < self._w_est:
            w = self._w_est  # Reno-friendly region (§4.3)
        else:
            w += (target - w) * acked / w  # concave or convex region (§4.4, §4.5)
        self._w = w
        self.congestion_window = int(w)

    def _reduced_window(self) -> int:
        cwnd = float(self.congestion_window)
        # §4.7 fast convergence: a flow that loses before regaining its old peak releases
        # bandwidth to newer flows.
        self._w_max = cwnd * (1 + BETA) / 2 if cwnd < self._w_max else cwnd
        self._epoch_start = None
        self._avoidance_acked = 0
        return int(cwnd * BETA)

    def on_persistent_congestion(self) -> None:
        super().on_persistent_congestion()
        self._epoch_start = None
        self._avoidance_acked = 0

    def _rescale(self, new: int, old: int) -> None:
        super()._rescale(new, old)
        self._w_max = self._w_max * new / old
        self._epoch_start = None
