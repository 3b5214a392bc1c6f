"""Which network path a tunnel uses, sans-IO: candidate probing (hole punching), path
validation, migration, and the fall-back to the relay.

A tunnel can start on the beacon's relay at once, so the first message never waits for punching.
Meanwhile both sides send PATH_CHALLENGEs to every candidate address of the other (LAN and
reflexive endpoints from the beacon), which opens their NAT mappings towards each other. The first
candidate whose PATH_RESPONSE comes back is validated and becomes the active path. If the direct
path later stops answering, the tunnel goes back to the relay and probes again with backoff.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ...addressing import HostPort


@dataclass(frozen=True, slots=True)
class RelayPath:
    """Packets for ``peer`` sent through the beacon's relay."""

    peer: bytes  # the peer's Ed25519 key, as the beacon knows it


Address = HostPort | RelayPath  # where a tunnel's packets go: a UDP endpoint, or the relay


def is_relay(address: Address) -> bool:
    return isinstance(address, RelayPath)


@dataclass
class PathConfig:
    probe_interval: float = 0.1  # seconds before the first re-probe of a candidate; doubles
    probes_per_round: int = 7  # probes per candidate per round (about 6 s with doubling)
    retry_interval: float = 15.0  # seconds between rounds while on the relay; doubles
    retry_interval_max: float = 120.0  # seconds, cap of the doubling
    max_candidates: int = 16  # addresses remembered per peer
    # Seconds between asks for a fresh introduction (events.PeerUnanswered) while handshakes
    # go unanswered: a peer whose NAT rebound is reachable again once it re-registered.
    reintroduce_interval: float = 3.0
    # Seconds (and at least two probe timeouts) without a packet from a peer that stopped in the
    # middle of a message before we PING it over the direct path: a receiver sends only ACKs,
    # which nothing acknowledges, so without this it never notices that its side of the path
    # broke (its NAT rebound) and the peer's data is lost until the next keepalive.
    quiet_probe_after: float = 0.2
    # Seconds after falling back to the relay before a silent peer may be declared dead: more
    # than twice the beacon keepalive (BeaconClientConfig.keepalive_interval, 5 s), within
    # which a node whose NAT rebound re-registers its new address, the relay's way to it.
    fallback_patience: float = 12.0


@dataclass(slots=True)
class _Candidate:
    address: Address
    next_probe: float
    interval: float
    probes_left: int
    tokens: set[bytes] = field(default_factory=set)
    validated: bool = False


class PathManager:
    """The active path of one tunnel and the candidates being probed."""

    def __init__(
        self, config: PathConfig | None = None, random_token: Callable[[], bytes] | None = None
    ) -> None:
        self.config = config or PathConfig()
        self.active: Address | None = None
        self.relay: RelayPath | None = None
        self.migrations = 0
        self._candidates: dict[Address, _Candidate] = {}
        self._random_token = random_token or (lambda: os.urandom(8))
        self._retry_interval = self.config.retry_interval
        self._next_round: float | None = None

    @property
    def direct(self) -> bool:
        return self.active is not None and not is_relay(self.active)

    @property
    def kind(self) -> str:
        if self.active is None:
            return "none"
        return "relay" if is_relay(self.active) else "direct"

    def set_direct(self, address: Address) -> None:
        """An address known to work (configured by hand): use it without probing."""
        self.active = address

    def set_relay(self, relay: RelayPath) -> None:
        self.relay = relay
        if self.active is None:
            self.active = relay

    def add_candidates(self, addresses: list[Address], now: float) -> None:
        """Start a round of probes to each candidate, now: also to one that worked before, and
        to the active path's own address. The peer punches towards us now (an introduction),
        and a NAT that rebound since, ours or the peer's, has forgotten that the address
        worked: only probes from our side's current mapping open it again (a node whose own NAT
        rebound otherwise sent nothing there until its next keepalive, 15 s)."""
        for address in addresses:
            if is_relay(address):
                continue
            candidate = self._candidates.pop(address, None)
            if candidate is None:
                if len(self._candidates) >= self.config.max_candidates and not self._forget_one():
                    continue
                candidate = _Candidate(address, now, self.config.probe_interval, 0)
            self._candidates[address] = candidate  # named last: the last one forgotten
            self._start_round(candidate, now)

    def _forget_one(self) -> bool:
        """Room for a new candidate: the one named longest ago, but not the active path's. A
        peer whose NAT rebinds again and again names a new address each time; the old ones,
        kept, filled the list, and the tunnel never went direct again."""
        for address in self._candidates:
            if address != self.active:
                del self._candidates[address]
                return True
        return False

    def _start_round(self, candidate: _Candidate, now: float) -> None:
        candidate.next_probe = now
        candidate.interval = self.config.probe_interval
        candidate.probes_left = self.config.probes_per_round
        # Tokens of earlier rounds: their answers are seconds late at least (rounds are apart
        # by retry_interval); kept, a candidate that never answers grew them by a round's worth
        # every round, for the tunnel's life.
        candidate.tokens.clear()

    @property
    def probing(self) -> bool:
        """Candidates to probe or a round to start; without, :meth:`probes_due` has nothing
        to do (the usual case, on every flush)."""
        return bool(self._candidates) or self._next_round is not None

    def probes_due(self, now: float) -> list[tuple[Address, bytes]]:
        """(address, challenge token) pairs to send now."""
        if self._next_round is not None and now >= self._next_round:
            self._next_round = None
            for candidate in self._candidates.values():
                if not candidate.validated:
                    self._start_round(candidate, now)
        due = []
        for candidate in self._candidates.values():
            if candidate.probes_left > 0 and now >= candidate.next_probe:
                token = self._random_token()
                candidate.tokens.add(token)
                candidate.probes_left -= 1
                candidate.next_probe = now + candidate.interval
                candidate.interval *= 2
                due.append((candidate.address, token))
        if (
            not self.direct
            and self._next_round is None
            and self._candidates
            and not any(c.probes_left for c in self._candidates.values())
        ):
            # A round failed: stay on the relay and try again later, less often each time.
            self._next_round = now + self._retry_interval
            self._retry_interval = min(self._retry_interval * 2, self.config.retry_interval_max)
        return due

    def get_timer(self) -> float | None:
        if not self.probing:
            return None
        times = [c.next_probe for c in self._candidates.values() if c.probes_left > 0]
        if self._next_round is not None:
            times.append(self._next_round)
        return min(times) if times else None

    def on_response(self, token: bytes, address: Address) -> bool:
        """A PATH_RESPONSE arrived from ``address``; True if that validates it."""
        for candidate in self._candidates.values():
            if token in candidate.tokens:
                if candidate.address != address:
                    return False  # answered from elsewhere: this candidate isn't proven
                candidate.tokens.clear()
                candidate.probes_left = 0
                candidate.validated = True
                return True
        return False

    def is_validated(self, address: Address) -> bool:
        candidate = self._candidates.get(address)
        return candidate is not None and candidate.validated

    def on_peer_address(self, address: Address, now: float) -> None:
        """An authenticated packet came from ``address``: a candidate if we haven't seen it
        (peer-reflexive, or the peer's NAT rebound)."""
        if address == self.active or is_relay(address):
            return
        if address not in self._candidates:
            self.add_candidates([address], now)

    def on_path_failing(self, now: float) -> bool:
        """The active direct path stopped answering; True if the tunnel fell back to the relay."""
        if not self.direct or self.relay is None or self.active is None:
            return False
        failed = self._candidates.get(self.active)
        if failed is not None:
            failed.validated = False  # probed again in the next round
        self.move_to(self.relay)
        self._retry_interval = self.config.retry_interval
        self._next_round = now + self._retry_interval
        return True

    def move_to(self, address: Address) -> None:
        self.active = address
        self.migrations += 1
        self._next_round = None
        self._retry_interval = self.config.retry_interval
