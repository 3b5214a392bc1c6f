"""One peer's share of what a listening end serves at once (a listening puller's or pusher's
links, say): besides the bound on them all, each peer node holds at most its share, so that
one trusted peer cannot take every slot and lock the others out. The clients of a daemon share
their node's id, and so its share."""

from __future__ import annotations

from collections import Counter

from ..errors import ConfigError


def peer_share(per_peer: int | None, total: int, divisor: int) -> int:
    """A peer's share of ``total`` slots: ``per_peer`` if set, else ``total // divisor`` (at
    least one)."""
    return max(total // divisor, 1) if per_peer is None else per_peer


def check_share(config: object, total: str, per_peer: str) -> None:
    """:class:`ConfigError` naming ``config``'s ``per_peer`` field unless it is unset (None) or
    from 1 to its ``total`` field (which its caller has checked is at least 1)."""
    share, bound = getattr(config, per_peer), getattr(config, total)
    if share is not None and not 1 <= share <= bound:
        raise ConfigError(f"{type(config).__name__}.{per_peer} must be at least 1 and at most "
                          f"{total} ({bound}), not {share}")


class PerPeer:
    """How many slots each peer holds now, and all of them; a peer that holds none is
    forgotten, so peers coming and going leave nothing behind."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()
        self.total = 0

    def __getitem__(self, peer: str) -> int:
        return self._held[peer]

    def add(self, peer: str) -> None:
        self._held[peer] += 1
        self.total += 1

    def remove(self, peer: str) -> None:
        self._held[peer] -= 1
        self.total -= 1
        if self._held[peer] <= 0:
            del self._held[peer]

    def clear(self) -> None:
        self._held.clear()
        self.total = 0
