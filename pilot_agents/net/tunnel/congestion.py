"""NewReno congestion control (RFC 9002 §7 and Appendix B), sans-IO.

All windows and counters are in bytes of UDP payload (what RFC 9002 calls "bytes in flight":
the datagram payload, without IP/UDP headers). Loss *detection* lives in
:mod:`pilot_agents.net.tunnel.recovery`; this module only reacts to what recovery reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from pilot_agents.errors import ConfigError


@dataclass(slots=True)
class CongestionConfig:
    """Tunables for :class:`NewReno`.

    ``max_datagram_size`` is in bytes; the window sizes are in datagrams and are multiplied by
    the *current* maximum datagram size, so they keep their meaning when path MTU discovery
    raises it later.
    """

    max_datagram_size: int = 1200
    """Largest UDP payload we send, in bytes (RFC 9002 §7.2 "max_datagram_size")."""
    initial_window_packets: int = 10
    """Initial congestion window, in datagrams. Taken literally: we do not apply RFC 9002
    §7.2's 14720-byte cap, which protects Internet paths from jumbo-datagram bursts."""
    minimum_window_packets: int = 2
    """Floor of the congestion window, in datagrams (RFC 9002 §7.2 kMinimumWindow)."""
    loss_reduction_factor: float = 0.5
    """Multiplier applied to the window on a congestion event (RFC 9002 §7.3.2)."""
    persistent_congestion_threshold: int = 3
    """Persistent congestion duration in PTO periods (RFC 9002 §7.6.1); read by recovery."""

    def __post_init__(self) -> None:
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


class NewReno:
    """NewReno window arithmetic (RFC 9002 Appendix B.3 to B.8).

    Public attributes (read them, do not assign): ``congestion_window``, ``bytes_in_flight`` and
    ``ssthresh`` (``None`` until the first congestion event: slow start has no upper bound),
    ``recovery_start_time`` (``None`` when not in a recovery period).

    The window only grows while the sender is *congestion-window limited* (RFC 9002 §7.8): a
    sender that trickles a few packets per RTT must not inflate the window it never used, or
    the first real burst would overrun the path. We approximate "limited" by the state right
    after the most recent send (see :meth:`on_packet_sent`), which costs O(1) per packet.
    """

    __slots__ = (
        "_acked_bytes",
        "_config",
        "_cwnd_limited",
        "_max_datagram_size",
        "bytes_in_flight",
        "congestion_window",
        "recovery_start_time",
        "ssthresh",
    )

    def __init__(self, config: CongestionConfig | None = None) -> None:
        self._config = config if config is not None else CongestionConfig()
        self._max_datagram_size = self._config.max_datagram_size
        self.congestion_window: int = self._config.initial_window_packets * self._max_datagram_size
        self.bytes_in_flight: int = 0
        self.ssthresh: int | None = None
        self.recovery_start_time: float | None = None
        # Bytes acked in congestion avoidance not yet turned into window growth (B.5 does
        # cwnd += mds * acked / cwnd per packet; accumulating keeps the arithmetic integral).
        self._acked_bytes = 0
        self._cwnd_limited = False

    @property
    def config(self) -> CongestionConfig:
        return self._config

    @property
    def max_datagram_size(self) -> int:
        return self._max_datagram_size

    @property
    def minimum_window(self) -> int:
        return self._config.minimum_window_packets * self._max_datagram_size

    @property
    def in_slow_start(self) -> bool:
        return self.ssthresh is None or self.congestion_window < self.ssthresh

    def in_recovery(self, time_sent: float) -> bool:
        """Whether a packet sent at ``time_sent`` is in the current recovery period (§7.3.2)."""
        start = self.recovery_start_time
        return start is not None and time_sent <= start

    def can_send(self, size: int) -> bool:
        """Whether ``size`` more bytes fit in the window (RFC 9002 §7).

        PTO probes must be sent even when this says no (RFC 9002 §7.5).
        """
        return self.bytes_in_flight + size <= self.congestion_window

    def available(self) -> int:
        """Bytes that may still be sent now; 0 when the window is full or overcommitted."""
        room = self.congestion_window - self.bytes_in_flight
        return room if room > 0 else 0

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
        # Congestion avoidance (§7.3.3): one datagram per window of acknowledged bytes.
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
        ssthresh = int(self.congestion_window * self._config.loss_reduction_factor)
        self.ssthresh = ssthresh
        self.congestion_window = max(ssthresh, self.minimum_window)
        self._acked_bytes = 0
        return True

    def on_persistent_congestion(self) -> None:
        """Collapse the window after persistent congestion (RFC 9002 §7.6.2, B.8).

        Recovery is left too, so the next acknowledgements slow-start back up to ``ssthresh``.
        """
        self.congestion_window = self.minimum_window
        self.recovery_start_time = None
        self._acked_bytes = 0

    def on_packet_discarded(self, size: int) -> None:
        """Forget ``size`` in-flight bytes without any congestion reaction.

        For packets whose fate says nothing about congestion: a lost PMTU probe (it was lost
        for being large, RFC 9000 §14.4) or packets abandoned on rekey, path change or close.
        """
        self.bytes_in_flight -= size

    def set_max_datagram_size(self, size: int) -> None:
        """Adopt a new maximum datagram size (e.g. after PMTU discovery raised it).

        The window and ``ssthresh`` are rescaled so they keep the same size in datagrams:
        a window of 10 datagrams stays 10 datagrams, which is what the loss history measured.
        """
        if size < 1:
            raise ConfigError(f"max_datagram_size must be a positive byte count, got {size}")
        old = self._max_datagram_size
        if size == old:
            return
        self._max_datagram_size = size
        self.congestion_window = max(self.congestion_window * size // old, self.minimum_window)
        if self.ssthresh is not None:
            self.ssthresh = self.ssthresh * size // old
        self._acked_bytes = self._acked_bytes * size // old

    def __repr__(self) -> str:
        return (
            f"NewReno(cwnd={self.congestion_window}, in_flight={self.bytes_in_flight}, "
            f"ssthresh={self.ssthresh}, recovery_start={self.recovery_start_time})"
        )
