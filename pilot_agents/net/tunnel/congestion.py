"""Congestion control, sans-IO: the interface every controller implements, and NewReno.

All windows and counters are in bytes of UDP payload (what RFC 9002 calls "bytes in flight":
the datagram payload, without IP/UDP headers). Loss *detection* lives in
:mod:`pilot_agents.net.tunnel.recovery`; a controller only reacts to what recovery reports, and
recovery is its only caller (the session asks it just whether and how fast it may send).

Controllers: :class:`NewReno` (RFC 9002 §7, here), :class:`~.cubic.Cubic` (RFC 9438) and
:class:`~.bbr.Bbr` (BBR, the default: random loss is not congestion to it). Recovery builds the
one ``CongestionConfig.algorithm`` names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Final

from pilot_agents.errors import ConfigError

ALGORITHMS = ("bbr", "cubic", "newreno")
"""The names ``CongestionConfig.algorithm`` accepts."""

PACING_HEADROOM: Final = 1.25
"""A window-based controller's pacing rate is this times cwnd/srtt, so that pacing smooths
bursts without ever capping the window's growth (RFC 9002 §7.7)."""


@dataclass(slots=True)
class CongestionConfig:
    """Which controller, and its tunables.

    ``max_datagram_size`` is in bytes; the window sizes are in datagrams and are multiplied by
    the *current* maximum datagram size, so they keep their meaning when path MTU discovery
    raises it later.
    """

    algorithm: str = "newreno"
    """One of :data:`ALGORITHMS`. NewReno here, as RFC 9002 specifies; a tunnel's
    ``SessionConfig`` picks BBR, which paces at the bottleneck rate it measures and does not
    take random loss for congestion, so a lossy Wi-Fi or mobile link keeps its throughput
    (docs/protocol.md, "Congestion control", has the measurements)."""
    max_datagram_size: int = 1200
    """Largest UDP payload we send, in bytes (RFC 9002 §7.2 "max_datagram_size")."""
    initial_window_packets: int = 10
    """Initial congestion window, in datagrams. Taken literally: we do not apply RFC 9002
    §7.2's 14720-byte cap, which protects Internet paths from jumbo-datagram bursts."""
    minimum_window_packets: int = 2
    """Floor of the congestion window, in datagrams (RFC 9002 §7.2 kMinimumWindow)."""
    loss_reduction_factor: float = 0.5
    """NewReno: multiplier applied to the window on a congestion event (RFC 9002 §7.3.2).
    CUBIC uses its own (RFC 9438 beta_cubic, 0.7); BBR does not cut on loss."""
    persistent_congestion_threshold: int = 3
    """Persistent congestion duration in PTO periods (RFC 9002 §7.6.1); read by recovery."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"unknown congestion control algorithm {self.algorithm!r}: "
                f"choose one of {', '.join(ALGORITHMS)}"
            )
        if self.max_datagram_size < 1:
            raise ConfigError(
                f"max_datagram_size must be a positive byte count, got {self.max_datagram_size}"
            )
        if self.minimum_window_packets < 1:
            raise ConfigError(
                f"minimum_window_packets must be at least 1, got {self.minimum_window_packets}"
            )
        if self.initial_window_packets < self.minimum_window_packets:
            raise ConfigError(
                f"initial_window_packets ({self.initial_window_packets}) must be at least "
                f"minimum_window_packets ({self.minimum_window_packets})"
            )
        if not 0.0 < self.loss_reduction_factor < 1.0:
            raise ConfigError(
                "loss_reduction_factor must be strictly between 0 and 1, "
                f"got {self.loss_reduction_factor}"
            )
        if self.persistent_congestion_threshold < 1:
            raise ConfigError(
                "persistent_congestion_threshold must be at least 1, "
                f"got {self.persistent_congestion_threshold}"
            )


class RateSample:
    """What one ACK frame delivered, for rate-based controllers (the delivery rate estimation
    of draft-cheng-iccrg-delivery-rate-estimation). Recovery fills one instance in place per
    ACK frame that acknowledges in-flight packets and hands it to
    :meth:`CongestionController.on_ack`."""

    __slots__ = (
        "acked_bytes",
        "delivered",
        "delivered_total",
        "interval",
        "is_app_limited",
        "latest_rtt",
        "prior_delivered",
        "rate",
        "smoothed_rtt",
    )

    def __init__(self) -> None:
        self.acked_bytes = 0  # in-flight bytes this frame newly acknowledged
        self.delivered_total = 0  # bytes acknowledged over the connection's life
        # Of the newest packet acknowledged: delivered_total when it was sent, and bytes
        # delivered since then over `interval` seconds, which is a rate sample.
        self.prior_delivered = 0
        self.delivered = 0
        self.interval = 0.0
        self.rate = 0.0  # delivered / interval in bytes/s; 0.0 when the interval is too short
        self.is_app_limited = False  # the sender had nothing to send while that packet flew
        self.latest_rtt = 0.0  # this frame's RTT sample in seconds; 0.0 when it gave none
        self.smoothed_rtt = 0.0  # seconds, after this frame's sample


class CongestionController(ABC):
    """What recovery calls; every controller implements it.

    Public attributes (read them, do not assign): ``congestion_window`` and ``bytes_in_flight``,
    in bytes. Per packet: :meth:`on_packet_sent` and then exactly one of
    :meth:`on_packet_acked`, :meth:`on_packets_lost` (batched) or :meth:`on_packet_discarded`.
    Per ACK frame that acknowledged in-flight packets, after the per-packet calls,
    :meth:`on_ack` with its rate sample.
    """

    __slots__ = ("_config", "_max_datagram_size", "bytes_in_flight", "congestion_window")

    def __init__(self, config: CongestionConfig | None = None) -> None:
        self._config = config if config is not None else CongestionConfig()
        self._max_datagram_size = self._config.max_datagram_size
        self.congestion_window: int = self._config.initial_window_packets * self._max_datagram_size
        self.bytes_in_flight: int = 0

    @property
    def config(self) -> CongestionConfig:
        return self._config

    @property
    def max_datagram_size(self) -> int:
        return self._max_datagram_size

    @property
    def minimum_window(self) -> int:
        return self._config.minimum_window_packets * self._max_datagram_size

    def can_send(self, size: int) -> bool:
        """Whether ``size`` more bytes fit in the window (RFC 9002 §7).

        PTO probes must be sent even when this says no (RFC 9002 §7.5).
        """
        return self.bytes_in_flight + size <= self.congestion_window

    def available(self) -> int:
        """Bytes that may still be sent now; 0 when the window is full or overcommitted."""
        room = self.congestion_window - self.bytes_in_flight
        return room if room > 0 else 0

    def pacing_rate(self, smoothed_rtt: float) -> float:
        """Bytes per second the pacer lets out."""
        return PACING_HEADROOM * self.congestion_window / max(smoothed_rtt, 1e-6)

    def on_packet_sent(self, size: int) -> None:
        """An in-flight packet of ``size`` bytes left."""
        self.bytes_in_flight += size

    def on_packet_acked(self, size: int, time_sent: float) -> None:
        """An in-flight packet of ``size`` bytes sent at ``time_sent`` was acknowledged."""
        self.bytes_in_flight -= size

    def on_ack(self, sample: RateSample, now: float) -> None:  # noqa: B027 - optional hook
        """An ACK frame's acknowledgements are all reported; ``sample`` sums them up."""

    @abstractmethod
    def on_packets_lost(self, lost_bytes: int, largest_lost_time_sent: float, now: float) -> bool:
        """In-flight packets totalling ``lost_bytes`` were declared lost; ``largest_lost_time_sent``
        is the send time of the most recently sent of them. Returns whether the controller took
        it as a new congestion event."""

    @abstractmethod
    def on_persistent_congestion(self) -> None:
        """RFC 9002 §7.6: every packet over several PTOs was lost; start again from the floor."""

    def on_packet_discarded(self, size: int) -> None:
        """Forget ``size`` in-flight bytes without any congestion reaction.

        For packets whose fate says nothing about congestion: a lost PMTU probe (it was lost
        for being large, RFC 9000 §14.4) or packets abandoned on rekey, path change or close.
        """
        self.bytes_in_flight -= size

    def set_max_datagram_size(self, size: int) -> None:
        """Adopt a new maximum datagram size (e.g. after PMTU discovery raised it).

        Windows are rescaled so they keep the same size in datagrams: a window of 10 datagrams
        stays 10 datagrams, which is what the loss history measured.
        """
        if size < 1:
            raise ConfigError(f"max_datagram_size must be a positive byte count, got {size}")
        old = self._max_datagram_size
        if size == old:
            return
        self._max_datagram_size = size
        self.congestion_window = max(self.congestion_window * size // old, self.minimum_window)
        self._rescale(size, old)

    def _rescale(self, new: int, old: int) -> None:  # noqa: B027 - optional hook
        """Rescale the controller's own byte counts by ``new / old`` (see set_max_datagram_size)."""


class NewReno(CongestionController):
    """NewReno window arithmetic (RFC 9002 Appendix B.3 to B.8).

    Public attributes beyond the interface's: ``ssthresh`` (``None`` until the first congestion
    event: slow start has no upper bound), ``recovery_start_time`` (``None`` when not in a
    recovery period).

    The window only grows while the sender is *congestion-window limited* (RFC 9002 §7.8): a
    sender that trickles a few packets per RTT must not inflate the window it never used, or
    the first real burst would overrun the path. We approximate "limited" by the state right
    after the most recent send (see :meth:`on_packet_sent`), which costs O(1) per packet.

    :class:`~.cubic.Cubic` keeps all of this and replaces the two hooks
    :meth:`_grow_in_avoidance` and :meth:`_reduced_window`.
    """

    __slots__ = ("_acked_bytes", "_cwnd_limited", "recovery_start_time", "ssthresh")

    def __init__(self, config: CongestionConfig | None = None) -> None:
        super().__init__(config)
        self.ssthresh: int | None = None
        self.recovery_start_time: float | None = None
        # Bytes acked in congestion avoidance not yet turned into window growth (B.5 does
        # cwnd += mds * acked / cwnd per packet; accumulating keeps the arithmetic integral).
        self._acked_bytes = 0
        self._cwnd_limited = False

    @property
    def in_slow_start(self) -> bool:
        return self.ssthresh is None or self.congestion_window < self.ssthresh

    def in_recovery(self, time_sent: float) -> bool:
        """Whether a packet sent at ``time_sent`` is in the current recovery period (§7.3.2)."""
        start = self.recovery_start_time
        return start is not None and time_sent <= start

    def on_packet_sent(self, size: int) -> None:
        """An in-flight packet of ``size`` bytes left (RFC 9002 B.4)."""
        in_flight = self.bytes_in_flight + size
        self.bytes_in_flight = in_flight
        cwnd = self.congestion_window
        # §7.8: count as window-limited when less than a small burst of room is left, or in
        # slow start when more than half the window is used (slow start doubles per RTT, so
        # half a window in flight is enough to justify the doubling).
        self._cwnd_limited = cwnd - in_flight < 3 * self._max_datagram_size or (
            (self.ssthresh is None or cwnd < self.ssthresh) and 2 * in_flight > cwnd
        )

    def on_packet_acked(self, size: int, time_sent: float) -> None:
        """An in-flight packet of ``size`` bytes sent at ``time_sent`` was acknowledged (B.5)."""
        self.bytes_in_flight -= size
        start = self.recovery_start_time
        # §7.3.2: packets sent before the recovery period began do not grow the window; the
        # first ack of a packet sent after it ends recovery.
        if start is not None and time_sent <= start:
            return
        if not self._cwnd_limited:
            return
        ssthresh = self.ssthresh
        if ssthresh is None or self.congestion_window < ssthresh:
            self.congestion_window += size
            return
        self._grow_in_avoidance(size)

    def _grow_in_avoidance(self, size: int) -> None:
        """Congestion avoidance (§7.3.3): one datagram per window of acknowledged bytes."""
        acked = self._acked_bytes + size
        cwnd = self.congestion_window
        if acked >= cwnd:
            acked -= cwnd
            self.congestion_window = cwnd + self._max_datagram_size
        self._acked_bytes = acked

    def on_packets_lost(self, lost_bytes: int, largest_lost_time_sent: float, now: float) -> bool:
        """In-flight packets totalling ``lost_bytes`` were declared lost (B.6, B.8).

        ``largest_lost_time_sent`` is the send time of the most recently sent of them. Returns
        whether this started a new congestion event: losses of packets sent before the current
        recovery period began are the same event and do not reduce the window again (§7.3.2).
        """
        self.bytes_in_flight -= lost_bytes
        start = self.recovery_start_time
        if start is not None and largest_lost_time_sent <= start:
            return False
        self.recovery_start_time = now
        ssthresh = self._reduced_window()
        self.ssthresh = ssthresh
        self.congestion_window = max(ssthresh, self.minimum_window)
        self._acked_bytes = 0
        return True

    def _reduced_window(self) -> int:
        """The slow-start threshold after a congestion event (§7.3.2)."""
        return int(self.congestion_window * self._config.loss_reduction_factor)

    def on_persistent_congestion(self) -> None:
        """Collapse the window after persistent congestion (RFC 9002 §7.6.2, B.8).

        Recovery is left too, so the next acknowledgements slow-start back up to ``ssthresh``.
        """
        self.congestion_window = self.minimum_window
        self.recovery_start_time = None
        self._acked_bytes = 0

    def _rescale(self, new: int, old: int) -> None:
        if self.ssthresh is not None:
            self.ssthresh = self.ssthresh * new // old
        self._acked_bytes = self._acked_bytes * new // old

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cwnd={self.congestion_window}, "
            f"in_flight={self.bytes_in_flight}, ssthresh={self.ssthresh}, "
            f"recovery_start={self.recovery_start_time})"
        )
