"""Pacing (RFC 9002 §7.7): spread a congestion window over a round trip instead of sending it in
one burst, so a receiver's socket buffer is not overrun by a window's worth at once."""

from __future__ import annotations


class Pacer:
    """A token bucket refilled at the congestion controller's pacing rate."""

    __slots__ = ("_last", "_rate", "_tokens", "burst_packets", "granularity")

    def __init__(self, burst_packets: int = 16, granularity: float = 0.001) -> None:
        self.burst_packets = burst_packets  # packets that may leave back to back
        self.granularity = granularity  # seconds; the event loop's useful timer resolution
        self._rate = 0.0  # bytes per second; 0 means not yet known: no pacing
        self._tokens = 0.0
        self._last = 0.0

    def _capacity(self, packet_size: int) -> float:
        # At least one timer tick's worth, or a timer could never release a whole tick's rate.
        return max(self.burst_packets * packet_size, 2 * self._rate * self.granularity)

    def set_rate(self, rate: float) -> None:
        """Bytes per second from now on."""
        self._rate = rate

    def _refill(self, now: float, packet_size: int) -> None:
        if now > self._last:
            self._tokens = min(
                self._tokens + (now - self._last) * self._rate, self._capacity(packet_size)
            )
            self._last = now

    def next_send_time(self, now: float, packet_size: int) -> float:
        """``now`` if a packet of this size may go, else when it may."""
        if self._rate <= 0:
            return now
        self._refill(now, packet_size)
        if self._tokens >= packet_size:
            return now
        wait = (packet_size - self._tokens) / self._rate
        return now + max(wait, self.granularity)

    def on_sent(self, packet_size: int) -> None:
        if self._rate > 0:
            self._tokens = max(self._tokens - packet_size, 0.0)
