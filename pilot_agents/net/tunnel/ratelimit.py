"""What a node spends on handshakes, sans-IO: token buckets per source and for the whole node.

A handshake initiation costs the responder a Diffie-Hellman (about 50 µs) before it even knows
who sent it; a flood of them would starve every tunnel. Two budgets bound that work, both checked
before any DH (``Mux`` has the order):

- per source (a ``(host, port)``, or the key a relayed packet names): a token bucket each, in a
  table of bounded size;
- for the node: when its bucket runs dry the node is *under load* and, as WireGuard does,
  processes only initiations that carry a valid cookie MAC (``cookie.py``), answering the others
  with a cookie reply instead.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class HandshakeLimits:
    """Bounds on the handshake work a node does for others (the units are in the names)."""

    # The node's budget: initiations per second that may reach a DH before the node counts itself
    # under load (a trusted one costs about 4 DH, an untrusted one 1), and the burst above it.
    load_rate_per_s: float = 200.0
    load_burst: int = 100
    # Seconds a node stays under load after its budget last ran dry (WireGuard: 1 s).
    under_load_hold_s: float = 1.0
    # Per source: initiations per second that may reach a DH, and the burst. A cookie round trip
    # costs a legitimate initiator two of them.
    source_rate_per_s: float = 10.0
    source_burst: int = 10
    # Sources remembered at once. A full table refuses new sources until entries refill (a
    # refilled entry is forgotten): old sources keep their budget, a spray of new ones gets none.
    max_sources: int = 4096
    # Seconds a cookie secret is used. The responder also accepts the previous secret's cookies,
    # so a cookie stays valid at least this long after it was issued, and an initiator uses one
    # for this long.
    cookie_lifetime_s: float = 120.0


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full. The one token bucket
    of the package: the beacon's limits and the trust store's use it too."""

    __slots__ = ("_burst", "_rate", "_stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self.tokens = burst
        self._stamp = now

    def refill(self, now: float) -> float:
        """The tokens available at ``now``."""
        if now > self._stamp:
            self.tokens = min(self._burst, self.tokens + (now - self._stamp) * self._rate)
            self._stamp = now
        return self.tokens

    def take(self, now: float, amount: float = 1.0) -> bool:
        if self.refill(now) >= amount:
            self.tokens -= amount
            return True
        return False

    def full(self, now: float) -> bool:
        return self.refill(now) >= self._burst


class SourceLimiter:
    """A token bucket per source, at most ``max_sources`` of them."""

    __slots__ = ("_buckets", "_burst", "_max", "_next_purge", "_rate", "refused_new")

    def __init__(self, rate: float, burst: int, max_sources: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max = max_sources
        self._buckets: dict[Hashable, TokenBucket] = {}
        self._next_purge = 0.0
        self.refused_new = 0  # sources refused because the table was full

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: Hashable, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self._max and not self._purge(now):
                self.refused_new += 1
                return False
            bucket = TokenBucket(self._rate, self._burst, now)
            self._buckets[source] = bucket
        return bucket.take(now)

    def exhausted(self, source: Hashable, now: float) -> bool:
        """Whether ``source`` is known and out of budget; a known source with budget left pays a
        token. An unknown source is not added: spoofed sources cannot fill the table."""
        bucket = self._buckets.get(source)
        return bucket is not None and not bucket.take(now)

    def _purge(self, now: float) -> bool:
        """Forget refilled buckets (a new one would be the same); whether room was made. A full
        sweep runs at most once per refill time, so a spray of new sources costs a lookup each."""
        if now < self._next_purge:
            return False
        self._next_purge = now + self._burst / self._rate
        for source in [s for s, b in self._buckets.items() if b.full(now)]:
            del self._buckets[source]
        return len(self._buckets) < self._max


class LoadMeter:
    """Whether the node is under load: its handshake budget ran dry within the hold time."""

    __slots__ = ("_bucket", "_hold", "_until")

    def __init__(self, limits: HandshakeLimits) -> None:
        self._bucket = TokenBucket(limits.load_rate_per_s, float(limits.load_burst), 0.0)
        self._hold = limits.under_load_hold_s
        self._until = -1.0

    def under_load(self, now: float) -> bool:
        return now < self._until or self._bucket.refill(now) < 1.0

    def spend(self, now: float) -> None:
        """One initiation goes on to a DH."""
        if not self._bucket.take(now) or self._bucket.tokens < 1.0:
            self._until = now + self._hold
