"""Loss detection and RTT estimation (RFC 9002 §5, §6 and Appendix A), sans-IO.

Simpler than QUIC: one packet number space (the handshake runs separately, so there are no
Initial/Handshake spaces and the handshake is always "confirmed" here), and packet numbers
increase strictly from 0. Every entry point takes ``now`` in seconds from the caller's
monotonic clock; nothing here reads a clock, sleeps or does I/O.

Per-packet cost is O(1) amortised. The trick is the *ack frontier* (``largest_acked``):

* packets above the frontier sit only in ``_sent``; an ACK that moves the frontier up walks
  each newly covered packet number exactly once over the connection's life;
* packets below the frontier that are still unacknowledged are also kept in ``_pending``.
  After loss detection at most ``packet_threshold - 1`` of them survive (anything older is
  lost by the packet threshold, §6.1.1), so re-checking them on every ACK is O(1).

So an ACK whose ranges cover 10 000 packet numbers that were already acknowledged costs a
handful of operations, not 10 000 dictionary lookups.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pilot_agents.errors import ConfigError, WireError
from pilot_agents.net.tunnel.bbr import Bbr
from pilot_agents.net.tunnel.congestion import (
    CongestionConfig,
    CongestionController,
    NewReno,
    RateSample,
)
from pilot_agents.net.tunnel.cubic import Cubic


@dataclass(slots=True, eq=False, init=False)
class SentPacket:
    """What recovery remembers about one sent packet.

    ``size`` counts toward bytes in flight when ``in_flight`` is true. ``data`` is opaque here:
    the session stores whatever it needs to retransmit. ``eq=False`` keeps identity semantics
    (and hashability): two packets are never "equal" just because their fields match.

    The last four fields are the connection's delivery state when the packet left, stamped by
    :meth:`Recovery.on_packet_sent` for in-flight packets; its ACK turns them into a delivery
    rate sample (draft-cheng-iccrg-delivery-rate-estimation).
    """

    packet_number: int
    time_sent: float
    size: int
    ack_eliciting: bool
    in_flight: bool
    is_probe_mtu: bool
    data: Any  # not `object`: mypyc fails at import on a dataclass field of type object
    delivered: int  # bytes acknowledged before it left
    delivered_time: float  # when the most recent of those was acknowledged
    first_sent_time: float  # when the packet acknowledged then had left
    is_app_limited: bool  # the sender ran out of data to send while this one flew

    # Written out (init=False) on the per-packet path: mypyc leaves a generated dataclass
    # __init__ interpreted, and it cost more than the rest of the object's life.
    def __init__(
        self,
        packet_number: int,
        time_sent: float,
        size: int,
        ack_eliciting: bool,
        in_flight: bool,
        is_probe_mtu: bool = False,
        data: Any = None,
    ) -> None:
        self.packet_number = packet_number
        self.time_sent = time_sent
        self.size = size
        self.ack_eliciting = ack_eliciting
        self.in_flight = in_flight
        self.is_probe_mtu = is_probe_mtu
        self.data = data
        self.delivered = 0
        self.delivered_time = 0.0
        self.first_sent_time = 0.0
        self.is_app_limited = False


@dataclass(slots=True)
class RecoveryConfig:
    """Loss-detection tunables. Times are in seconds."""

    initial_rtt: float = 0.1
    """RTT assumed before the first sample. RFC 9002 §6.2.2 recommends 333 ms for the Internet;
    we use 100 ms on purpose because agents mostly talk over LANs and a large initial RTT makes
    the first lost packet take a second to recover (the first PTO is ~3x this value)."""
    max_ack_delay: float = 0.025
    """Longest the peer delays an ACK (RFC 9000 max_ack_delay); clamps reported ack delays."""
    packet_threshold: int = 3
    """Reordering tolerance in packets (RFC 9002 §6.1.1 kPacketThreshold)."""
    time_threshold: float = 9 / 8
    """Reordering tolerance as a multiple of the RTT (RFC 9002 §6.1.2 kTimeThreshold)."""
    granularity: float = 0.001
    """Timer granularity (RFC 9002 §6.1.2 kGranularity)."""
    max_pto_backoff_exponent: int = 6
    """Cap on the PTO backoff exponent, so the probe timer stops doubling at 2**6 times the PTO
    period. ``pto_count`` itself keeps counting, for the session's dead-peer decision."""

    def __post_init__(self) -> None:
        for name in ("initial_rtt", "granularity"):
            value = getattr(self, name)
            if not value > 0.0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")
        if not self.max_ack_delay >= 0.0:
            raise ConfigError(
                f"max_ack_delay must be zero or more seconds, got {self.max_ack_delay}"
            )
        if self.packet_threshold < 1:
            raise ConfigError(f"packet_threshold must be at least 1, got {self.packet_threshold}")
        if not self.time_threshold >= 1.0:
            raise ConfigError(f"time_threshold must be at least 1.0, got {self.time_threshold}")
        if self.max_pto_backoff_exponent < 0:
            raise ConfigError(
                f"max_pto_backoff_exponent must be 0 or more, got {self.max_pto_backoff_exponent}"
            )


class RttEstimator:
    """RTT estimate per RFC 9002 §5.

    Before the first sample ``smoothed_rtt`` is the initial RTT and ``rttvar`` half of it
    (§5.3), so PTO and loss delays computed from them are already meaningful.
    """

    __slots__ = (
        "first_sample_time",
        "granularity",
        "latest_rtt",
        "max_ack_delay",
        "min_rtt",
        "rttvar",
        "smoothed_rtt",
    )

    def __init__(
        self, initial_rtt: float = 0.1, max_ack_delay: float = 0.025, granularity: float = 0.001
    ) -> None:
        self.latest_rtt = 0.0
        self.smoothed_rtt = initial_rtt
        self.rttvar = initial_rtt / 2
        self.min_rtt = 0.0
        self.first_sample_time: float | None = None
        self.max_ack_delay = max_ack_delay
        self.granularity = granularity

    @property
    def has_sample(self) -> bool:
        return self.first_sample_time is not None

    def update(self, latest_rtt: float, ack_delay: float, now: float) -> None:
        """Take one RTT sample (§5.2, §5.3). ``ack_delay`` is the peer-reported delay in seconds."""
        # A caller clock that stepped backwards must not poison the estimate with a negative.
        if latest_rtt < 0.0:
            latest_rtt = 0.0
        self.latest_rtt = latest_rtt
        if self.first_sample_time is None:
            # §5.3: the first sample ignores ack_delay entirely.
            self.first_sample_time = now
            self.min_rtt = latest_rtt
            self.smoothed_rtt = latest_rtt
            self.rttvar = latest_rtt / 2
            return
        # §5.2: min_rtt uses the raw sample, never one adjusted by the peer's claim.
        if latest_rtt < self.min_rtt:
            self.min_rtt = latest_rtt
        # §5.3: the peer may not claim more delay than it advertised (we are always past the
        # handshake here); a negative claim is nonsense and counts as none.
        if ack_delay > self.max_ack_delay:
            ack_delay = self.max_ack_delay
        elif not ack_delay > 0.0:
            ack_delay = 0.0
        adjusted = latest_rtt
        # §5.3: subtracting ack_delay must never take the sample below min_rtt.
        if latest_rtt >= self.min_rtt + ack_delay:
            adjusted = latest_rtt - ack_delay
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.smoothed_rtt - adjusted)
        self.smoothed_rtt = 0.875 * self.smoothed_rtt + 0.125 * adjusted

    def pto_period(self) -> float:
        """One unbacked-off PTO period (§6.2.1), max_ack_delay included (application space)."""
        return self.smoothed_rtt + max(4.0 * self.rttvar, self.granularity) + self.max_ack_delay

    def loss_delay(self, time_threshold: float) -> float:
        """How long after a packet's send time it is declared lost by time (§6.1.2)."""
        delay = time_threshold * max(self.latest_rtt, self.smoothed_rtt)
        return delay if delay > self.granularity else self.granularity

    def __repr__(self) -> str:
        return (
            f"RttEstimator(latest={self.latest_rtt:.6f}, smoothed={self.smoothed_rtt:.6f}, "
            f"rttvar={self.rttvar:.6f}, min={self.min_rtt:.6f})"
        )


@dataclass(slots=True, init=False)
class AckResult:
    """What one ACK frame changed.

    ``acked`` and ``lost`` are in packet-number order and disjoint; every packet handed to
    :meth:`Recovery.on_packet_sent` shows up in exactly one ``acked`` or ``lost`` list over its
    life (or in :meth:`Recovery.discard_all`). ``lost`` includes failed MTU probes
    (``is_probe_mtu``), which did not count as congestion.
    """

    acked: list[SentPacket]
    lost: list[SentPacket]
    newly_acked_largest: bool
    """The frame's largest acknowledged packet was acknowledged for the first time."""
    rtt_sampled: bool
    """The frame produced an RTT sample (§5.1)."""
    persistent_congestion: bool
    """Losses in this frame amounted to persistent congestion; the window collapsed (§7.6)."""

    def __init__(self, acked: list[SentPacket] | None = None) -> None:  # see SentPacket
        self.acked = [] if acked is None else acked
        self.lost = []
        self.newly_acked_largest = False
        self.rtt_sampled = False
        self.persistent_congestion = False


@dataclass(slots=True)
class TimeoutResult:
    """What :meth:`Recovery.on_timeout` decided.

    Either ``lost`` is non-empty (the time-threshold loss timer fired: retransmit their data),
    or ``probe_packets`` is 1 or 2 (the PTO fired: send that many ack-eliciting packets now,
    even if the congestion window is full, RFC 9002 §6.2.4 and §7.5), or both are empty
    (called early or with no timer armed: nothing to do).
    """

    lost: list[SentPacket] = field(default_factory=list)
    probe_packets: int = 0


AckRange = tuple[int, int] | range


def new_controller(config: CongestionConfig | None = None) -> CongestionController:
    """The controller ``config.algorithm`` names: the one place that maps names to classes."""
    config = config if config is not None else CongestionConfig()
    if config.algorithm == "newreno":
        return NewReno(config)
    if config.algorithm == "cubic":
        return Cubic(config)
    return Bbr(config)


class Recovery:
    """Loss detection, RTT estimation and congestion control for one tunnel.

    Use: call :meth:`on_packet_sent` for every packet that should be tracked (pure-ACK packets
    may be tracked too, with ``ack_eliciting=False, in_flight=False``, to learn when they
    arrived) and :meth:`on_untracked_packet_sent` for every other packet number used;
    :meth:`on_ack_received` for every ACK frame; and arm one timer at :meth:`get_timer` that
    calls :meth:`on_timeout`. Re-read :meth:`get_timer` after each of these calls.
    """

    __slots__ = (
        "_ack_eliciting_in_flight",
        "_app_limited_until",
        "_config",
        "_delivered",
        "_delivered_time",
        "_first_sent_time",
        "_largest_acked",
        "_largest_sent",
        "_loss_time",
        "_pending",
        "_pto_count",
        "_sample",
        "_sent",
        "_time_of_last_ack_eliciting",
        "cc",
        "rtt",
    )

    def __init__(
        self,
        config: RecoveryConfig | None = None,
        congestion: CongestionConfig | None = None,
    ) -> None:
        self._config = config if config is not None else RecoveryConfig()
        cfg = self._config
        self.rtt = RttEstimator(cfg.initial_rtt, cfg.max_ack_delay, cfg.granularity)
        self.cc = new_controller(congestion)
        # Delivery-rate estimation (draft-cheng-iccrg-delivery-rate-estimation): in-flight bytes
        # acknowledged so far, when the latest of them was, when the packet it acknowledged
        # left, and the delivered count below which samples are app-limited (0: none are).
        self._delivered = 0
        self._delivered_time = 0.0
        self._first_sent_time = 0.0
        self._app_limited_until = 0
        self._sample = RateSample()
        # Every unacknowledged, not-yet-lost packet, keyed by packet number; insertion order is
        # packet-number order because numbers only grow.
        self._sent: dict[int, SentPacket] = {}
        # The subset of _sent below the ack frontier: the only loss candidates (§6.1).
        self._pending: dict[int, SentPacket] = {}
        self._largest_acked = -1
        self._largest_sent = -1
        self._loss_time: float | None = None
        self._pto_count = 0
        self._time_of_last_ack_eliciting: float | None = None
        self._ack_eliciting_in_flight = 0

    # ----------------------------------------------------------------- read-only state

    @property
    def config(self) -> RecoveryConfig:
        return self._config

    @property
    def bytes_in_flight(self) -> int:
        return self.cc.bytes_in_flight

    @property
    def congestion_window(self) -> int:
        return self.cc.congestion_window

    @property
    def smoothed_rtt(self) -> float:
        return self.rtt.smoothed_rtt

    @property
    def largest_acked(self) -> int | None:
        """Largest packet number the peer has acknowledged, or None before the first ACK."""
        return self._largest_acked if self._largest_acked >= 0 else None

    @property
    def largest_sent(self) -> int | None:
        return self._largest_sent if self._largest_sent >= 0 else None

    @property
    def loss_time(self) -> float | None:
        """When the earliest pending packet crosses the time threshold (§6.1.2), if any."""
        return self._loss_time

    @property
    def pto_count(self) -> int:
        """Consecutive PTOs without an acknowledgement; the session's dead-peer signal."""
        return self._pto_count

    @property
    def ack_eliciting_in_flight(self) -> int:
        return self._ack_eliciting_in_flight

    @property
    def time_of_last_ack_eliciting(self) -> float | None:
        return self._time_of_last_ack_eliciting

    @property
    def sent_packets(self) -> Mapping[int, SentPacket]:
        """Outstanding packets by packet number, oldest first (read-only: for choosing what
        to resend in PTO probes)."""
        return self._sent

    def can_send(self, size: int) -> bool:
        return self.cc.can_send(size)

    # ----------------------------------------------------------------- events

    def on_packet_sent(self, packet: SentPacket) -> None:
        """Record a packet just sent (RFC 9002 A.5).

        Raises ValueError if packet numbers do not strictly increase: that is a session bug.
        """
        pn = packet.packet_number
        if pn <= self._largest_sent:
            raise ValueError(
                f"packet number {pn} sent after {self._largest_sent}: numbers must increase"
            )
        self._largest_sent = pn
        self._sent[pn] = packet
        if packet.in_flight:
            cc = self.cc
            if cc.bytes_in_flight == 0:
                # After a quiet spell, a rate sample starts from now, not from the last ACK.
                self._first_sent_time = self._delivered_time = packet.time_sent
            packet.delivered = self._delivered
            packet.delivered_time = self._delivered_time
            packet.first_sent_time = self._first_sent_time
            packet.is_app_limited = self._app_limited_until != 0
            cc.on_packet_sent(packet.size)
        if packet.ack_eliciting:
            self._ack_eliciting_in_flight += 1
            self._time_of_last_ack_eliciting = packet.time_sent

    def on_app_limited(self) -> None:
        """The sender has nothing more to send now. Delivery-rate samples of packets in flight
        until then measure the application, not the path, and say so (``is_app_limited``)."""
        cc = self.cc
        if cc.bytes_in_flight < cc.congestion_window:
            in_flight = self._delivered + cc.bytes_in_flight
            self._app_limited_until = in_flight if in_flight > 0 else 1

    def on_untracked_packet_sent(self, packet_number: int) -> None:
        """Note a packet number used by a packet not given to :meth:`on_packet_sent`.

        Call it for every packet you do not track (typically pure-ACK packets): ACKs are
        validated against the largest packet number sent, and an ACK covering a number
        recovery never heard of is treated as the peer lying about what it received
        (WireError). Costs O(1) and allocates nothing.
        """
        if packet_number <= self._largest_sent:
            raise ValueError(
                f"packet number {packet_number} sent after {self._largest_sent}: "
                "numbers must increase"
            )
        self._largest_sent = packet_number

    def on_ack_received(
        self, ranges: Iterable[AckRange], ack_delay: float, now: float
    ) -> AckResult:
        """Process one ACK frame (RFC 9002 A.7).

        ``ranges`` are half-open ``(start, stop)`` tuples or ``range`` objects in any order
        (a :class:`~pilot_agents.net.tunnel.rangeset.RangeSet` works as is); overlaps are tolerated.
        ``ack_delay`` is the peer-reported delay in seconds. Stale and duplicate ACKs are
        harmless no-ops.

        Raises WireError if the frame acknowledges a negative packet number or one never sent:
        that is a protocol violation by the peer.
        """
        spans = _normalise(ranges)
        if not spans:
            return AckResult()
        top = spans[-1][1] - 1
        if spans[0][0] < 0:
            raise WireError(f"ACK frame acknowledges negative packet number {spans[0][0]}")
        if top > self._largest_sent:
            raise WireError(
                f"ACK frame acknowledges packet {top} but the largest sent is {self._largest_sent}"
            )
        sent = self._sent
        pending = self._pending
        acked: list[SentPacket] = []
        ack_eliciting = 0

        # Candidates below the frontier: a short list (see module docstring). Merge-walk them
        # against the sorted spans.
        if pending:
            n_spans = len(spans)
            si = 0
            for pn in pending:
                while si < n_spans and spans[si][1] <= pn:
                    si += 1
                if si == n_spans:
                    break
                if spans[si][0] <= pn:
                    acked.append(pending[pn])
            for packet in acked:
                pn = packet.packet_number
                del pending[pn]
                del sent[pn]
                if packet.ack_eliciting:
                    ack_eliciting += 1

        # Packet numbers above the old frontier: each is visited once in the connection's life.
        # Gaps become loss candidates; gap boundaries are kept for persistent congestion.
        frontier = self._largest_acked
        gaps: list[tuple[int, int]] = []
        frontier_moved = top > frontier
        if frontier_moved:
            cursor = frontier + 1
            for start, stop in spans:
                if stop <= cursor:
                    continue
                if start > cursor:
                    for pn in range(cursor, start):
                        gap_packet = sent.get(pn)
                        if gap_packet is not None:
                            pending[pn] = gap_packet
                    gaps.append((cursor, start))
                else:
                    start = cursor
                for pn in range(start, stop):
                    # get and del, not pop(pn, None): compiled, both are native dict operations.
                    packet_or_none = sent.get(pn)
                    if packet_or_none is not None:
                        del sent[pn]
                        acked.append(packet_or_none)
                        if packet_or_none.ack_eliciting:
                            ack_eliciting += 1
                cursor = stop
            self._largest_acked = top

        if not acked and not frontier_moved:
            return AckResult()
        self._ack_eliciting_in_flight -= ack_eliciting

        result = AckResult(acked)
        if acked:
            largest = acked[-1]
            if largest.packet_number == top:
                result.newly_acked_largest = True
                # §5.1: sample only when the largest is new and something ack-eliciting was
                # newly acknowledged (a pure-ACK packet's ack can be delayed arbitrarily).
                if ack_eliciting:
                    self.rtt.update(now - largest.time_sent, ack_delay, now)
                    result.rtt_sampled = True

        # A.7 order: losses first, then acks, so that acks in the same frame as a new loss do
        # not grow the window that the loss just cut (they were sent before recovery began).
        lost = self._detect_lost(now)
        result.lost = lost
        if lost:
            result.persistent_congestion = self._on_lost(lost, now, gaps)
        cc = self.cc
        acked_bytes = 0
        newest: SentPacket | None = None
        for packet in acked:
            if packet.in_flight:
                size = packet.size
                acked_bytes += size
                cc.on_packet_acked(size, packet.time_sent)
                newest = packet  # acked is in sending order
        if newest is not None:
            cc.on_ack(self._rate_sample(newest, acked_bytes, result.rtt_sampled, now), now)

        # §6.2.1: an acknowledgement resets the backoff. (A peer that only repeats old ranges
        # acknowledges nothing new and so does not reset it.)
        self._pto_count = 0
        return result

    def on_timeout(self, now: float) -> TimeoutResult:
        """The timer from :meth:`get_timer` fired (RFC 9002 A.9).

        Calling it early is a harmless no-op, so callers need not worry about timers firing a
        hair before their deadline: re-arm from :meth:`get_timer` and call again.
        """
        loss_time = self._loss_time
        if loss_time is not None:
            if now < loss_time:
                return TimeoutResult()
            lost = self._detect_lost(now)
            if lost:
                # Persistent congestion is only judged on ACK-triggered batches (see _on_lost).
                self._on_lost(lost, now, ())
            return TimeoutResult(lost=lost)
        deadline = self._pto_deadline()
        if deadline is None or now < deadline:
            return TimeoutResult()
        # §6.2.4: a PTO declares nothing lost; it asks for probes. Two let one loss of a probe
        # not cost another full backoff, but with a single packet outstanding one is enough.
        self._pto_count += 1
        return TimeoutResult(probe_packets=1 if self._ack_eliciting_in_flight == 1 else 2)

    def get_timer(self) -> float | None:
        """Absolute time at which :meth:`on_timeout` should run, or None for no timer (A.8).

        The loss-time timer takes precedence over the PTO when armed, as in A.8; it is nearly
        always the earlier of the two anyway.
        """
        if self._loss_time is not None:
            return self._loss_time
        return self._pto_deadline()

    def discard_all(self) -> list[SentPacket]:
        """Forget every outstanding packet without any congestion reaction.

        For rekeying, path changes and close. Returns the packets, oldest first, so the
        session can requeue their data. The packet number space and RTT estimate are kept.
        """
        packets = list(self._sent.values())
        cc = self.cc
        for packet in packets:
            if packet.in_flight:
                cc.on_packet_discarded(packet.size)
        self._sent.clear()
        self._pending.clear()
        self._loss_time = None
        self._ack_eliciting_in_flight = 0
        self._pto_count = 0
        return packets

    # ----------------------------------------------------------------- internals

    def _rate_sample(
        self, newest: SentPacket, acked_bytes: int, rtt_sampled: bool, now: float
    ) -> RateSample:
        """Account ``acked_bytes`` delivered now; the delivery rate since ``newest`` left."""
        delivered = self._delivered + acked_bytes
        self._delivered = delivered
        self._delivered_time = now
        self._first_sent_time = newest.time_sent
        if self._app_limited_until and delivered > self._app_limited_until:
            self._app_limited_until = 0
        sample = self._sample
        sample.acked_bytes = acked_bytes
        sample.delivered_total = delivered
        sample.prior_delivered = newest.delivered
        sample.delivered = delivered - newest.delivered
        sample.is_app_limited = newest.is_app_limited
        # The longer of the send and the ACK intervals: neither a burst sent at once nor
        # ACKs compressed on the way back may inflate the rate.
        send_elapsed = newest.time_sent - newest.first_sent_time
        ack_elapsed = now - newest.delivered_time
        interval = send_elapsed if send_elapsed > ack_elapsed else ack_elapsed
        sample.interval = interval
        # Shorter than a round trip, an interval says more about bursts than about the path.
        if interval > 0.0 and interval >= self.rtt.min_rtt:
            sample.rate = sample.delivered / interval
        else:
            sample.rate = 0.0
        sample.latest_rtt = self.rtt.latest_rtt if rtt_sampled else 0.0
        sample.smoothed_rtt = self.rtt.smoothed_rtt
        return sample

    def _pto_deadline(self) -> float | None:
        last = self._time_of_last_ack_eliciting
        if self._ack_eliciting_in_flight <= 0 or last is None:
            # §6.2.1: no PTO without ack-eliciting packets in flight (the handshake, which is
            # the exception, is not ours).
            return None
        exponent = self._pto_count
        cap = self._config.max_pto_backoff_exponent
        if exponent > cap:
            exponent = cap
        return last + self.rtt.pto_period() * (1 << exponent)

    def _detect_lost(self, now: float) -> list[SentPacket]:
        """Remove and return pending packets lost by packet or time threshold (§6.1, A.10).

        Also re-arms ``_loss_time`` for the survivors.
        """
        self._loss_time = None
        pending = self._pending
        if not pending:
            return []
        cfg = self._config
        loss_delay = self.rtt.loss_delay(cfg.time_threshold)
        packet_limit = self._largest_acked - cfg.packet_threshold
        lost: list[SentPacket] = []
        loss_time: float | None = None
        for pn, packet in pending.items():
            # The deadline is computed the same way as the armed timer, so a timer firing at
            # exactly loss_time always finds its packet lost (no float round-off re-arm loop).
            deadline = packet.time_sent + loss_delay
            if pn <= packet_limit or deadline <= now:
                lost.append(packet)
            elif loss_time is None or deadline < loss_time:
                loss_time = deadline
        self._loss_time = loss_time
        sent = self._sent
        for packet in lost:
            del pending[packet.packet_number]
            del sent[packet.packet_number]
        return lost

    def _on_lost(
        self, lost: list[SentPacket], now: float, gaps: list[tuple[int, int]] | tuple[()]
    ) -> bool:
        """Account for lost packets; returns whether persistent congestion was declared."""
        cc = self.cc
        lost_bytes = 0
        congestion_loss = False
        largest_time_sent = 0.0
        ack_eliciting = 0
        for packet in lost:
            if packet.ack_eliciting:
                ack_eliciting += 1
            if not packet.in_flight:
                continue
            if packet.is_probe_mtu:
                # A probe lost for its size says nothing about congestion (RFC 9000 §14.4).
                cc.on_packet_discarded(packet.size)
                continue
            congestion_loss = True
            lost_bytes += packet.size
            if packet.time_sent > largest_time_sent:
                largest_time_sent = packet.time_sent
        self._ack_eliciting_in_flight -= ack_eliciting
        if not congestion_loss:
            return False
        cc.on_packets_lost(lost_bytes, largest_time_sent, now)
        if gaps and self._in_persistent_congestion(lost, gaps):
            cc.on_persistent_congestion()
            return True
        return False

    def _in_persistent_congestion(
        self, lost: list[SentPacket], gaps: list[tuple[int, int]]
    ) -> bool:
        """Simplified §7.6.2 check on one ACK's losses.

        §7.6.2 asks for two lost ack-eliciting packets, both sent after the first RTT sample,
        more than the persistent-congestion duration apart, with nothing sent between them
        acknowledged. We only look for such pairs inside a single gap of the ACK that just
        moved the frontier: a gap is by construction a run with no acknowledged packet in it.
        Pairs straddling older pending packets are ignored (there are at most
        ``packet_threshold - 1`` of those), which errs toward not collapsing the window.
        MTU probes are excluded: their loss is not congestion.
        """
        first_sample = self.rtt.first_sample_time
        if first_sample is None:
            return False
        duration = self.rtt.pto_period() * self.cc.config.persistent_congestion_threshold
        n_gaps = len(gaps)
        gi = 0
        run_start: float | None = None
        for packet in lost:
            if not packet.ack_eliciting or packet.is_probe_mtu or packet.time_sent < first_sample:
                continue
            pn = packet.packet_number
            while gi < n_gaps and gaps[gi][1] <= pn:
                gi += 1
                run_start = None
            if gi == n_gaps:
                break
            if pn < gaps[gi][0]:
                continue
            if run_start is None:
                run_start = packet.time_sent
            elif packet.time_sent - run_start > duration:
                return True
        return False

    def __repr__(self) -> str:
        return (
            f"Recovery(outstanding={len(self._sent)}, largest_sent={self._largest_sent}, "
            f"largest_acked={self._largest_acked}, pto_count={self._pto_count}, "
            f"{self.rtt!r}, {self.cc!r})"
        )


def _normalise(ranges: Iterable[AckRange]) -> list[tuple[int, int]]:
    """ACK ranges as ascending, merged, non-empty ``(start, stop)`` tuples."""
    if type(ranges) is tuple and len(ranges) == 1 and type(ranges[0]) is tuple:
        # A frame's one range (nearly every ACK): no loop over a generic iterable.
        start, stop = ranges[0]
        return [(start, stop)] if stop > start else []
    spans: list[tuple[int, int]] = []
    for r in ranges:
        if isinstance(r, range):
            start, stop = r.start, r.stop
        else:
            start, stop = r
        if stop > start:
            spans.append((start, stop))
    if len(spans) < 2:
        return spans
    # Frames list ranges largest first; Timsort turns a descending run around in O(n).
    spans.sort()
    merged = [spans[0]]
    for start, stop in spans[1:]:
        last_start, last_stop = merged[-1]
        if start <= last_stop:
            if stop > last_stop:
                merged[-1] = (last_start, stop)
        else:
            merged.append((start, stop))
    return merged
