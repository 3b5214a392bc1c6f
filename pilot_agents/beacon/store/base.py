"""What the beacon keeps in its store, and the one interface both stores implement.

A store holds two things:

- **Names**, owned first-come: the first key to claim a name keeps it while it uses it (a claim
  by its owner records the use; names unused for ``name_expiry`` are deleted by
  :meth:`Store.expire_names`). A claim is atomic in the store, so two beacons sharing one store
  can never give one name to two keys.
- **Live registrations**: a node's key, candidates, NAT type and home beacon, published by the
  beacon it registered with and kept for a TTL (renewed by every refresh), so that any beacon
  sharing the store can resolve it.
- **Guests**: a node attached to a beacon that is not its home (to meet a node of that beacon),
  kept per (beacon, key) apart from its registration, for a TTL, so that the other workers of
  that beacon can introduce it and relay to it. Only that beacon asks for them.

The interface is asynchronous because a shared store is across the network. The SQLite store is
local and answers without ever suspending (``synchronous``): the beacon's core runs its calls on
the spot with :func:`run_now`, so a beacon on SQLite behaves exactly as it did before the
interface existed. A store whose calls suspend (Redis) is run by the service layer instead.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ...errors import StoreUnavailableError
from ...net.traversal.beacon_wire import (
    MAX_CANDIDATES,
    Address,
    NatType,
    Status,
    encode_address,
    valid_hostname,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NameLimits:
    per_key: int  # names one key holds; claiming one more gives up its oldest
    per_source: int  # held names claimed from one source IP


@dataclass(frozen=True, slots=True)
class Claim:
    """How a claim ended: ``OK`` (the name is the claimer's), ``NAME_TAKEN`` or ``NAME_LIMIT``."""

    status: Status
    owner: bytes | None  # the name's owner afterwards (None after NAME_LIMIT)
    released: tuple[str, ...] = ()  # names the claimer gave up to stay within its limit


@dataclass(frozen=True, slots=True)
class Registration:
    """A live registration as every beacon sharing the store sees it."""

    key: bytes
    hostname: str | None
    candidates: tuple[Address, ...]  # reflexive endpoint first
    nat_type: NatType
    home: str  # the beacon it registered with (BeaconServer's ``home``)
    # Where the beacon's socket sees its datagrams come from, when that is not the reflexive
    # candidate (an IPv4-mapped IPv6 address on a dual-stack socket): the address another
    # worker of the beacon sends to.
    address: Address | None = None
    # Where that beacon takes datagrams (its --advertise address): other beacons of the fleet
    # send a node there to be introduced to this one, or relayed to it. None: not advertised.
    home_address: Address | None = None

    @property
    def observed(self) -> Address:
        """The address its beacon's datagrams reach it at."""
        return self.address or self.candidates[0]

    def to_json(self) -> str:
        fields: dict[str, Any] = {
            "hostname": self.hostname,
            "candidates": [[host, port] for host, port in self.candidates],
            "nat": int(self.nat_type),
            "home": self.home,
        }
        if self.address is not None:
            fields["address"] = list(self.address)
        if self.home_address is not None:
            fields["home_address"] = list(self.home_address)
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, key: bytes, text: str | bytes) -> Registration:
        """Raises StoreUnavailableError for what no beacon of ours wrote (the beacon signs what
        it answers from this, so it must be what a REGISTER could have said)."""
        try:
            fields = json.loads(text)
            candidates = tuple((str(host), int(port)) for host, port in fields["candidates"])
            if len(candidates) > MAX_CANDIDATES:
                raise ValueError(f"{len(candidates)} candidates")
            for candidate in candidates:
                encode_address(candidate)  # an IP and a port, or ValueError
            hostname = fields["hostname"]
            if hostname is not None and not valid_hostname(hostname):
                raise ValueError(f"hostname {hostname!r}")
            if not candidates:
                raise ValueError("no candidates")
            address = None
            if "address" in fields:
                host, port = fields["address"]
                address = (str(host), int(port))
            home_address = None
            if fields.get("home_address") is not None:
                host, port = fields["home_address"]
                home_address = (str(host), int(port))
                encode_address(home_address)
            return cls(
                key,
                hostname,
                candidates,
                NatType(fields["nat"]),
                str(fields["home"]),
                address,
                home_address,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreUnavailableError(
                f"the store holds a malformed registration for {key.hex()}: {exc}"
            ) from None


@dataclass(frozen=True, slots=True)
class Found:
    """What the store knows of a name or a key."""

    key: bytes | None  # the name's owner (or the key asked about); None: nobody owns the name
    hostname: str | None  # the name asked about (or the key's oldest name)
    registration: Registration | None  # its live registration, on any beacon
    guest: Registration | None = None  # the key as a guest of the beacon that asked, if it is


@dataclass(frozen=True, slots=True)
class RelayTarget:
    """What a beacon needs to relay to a node another of its workers holds."""

    registration: Registration | None  # its live registration, on any beacon
    blocks: dict[bytes, int]  # senders it asked not to be relayed from -> until (wall ns)
    guest: Registration | None = None  # the key as a guest of the beacon that asked, if it is


class Store(Protocol):
    """Names and live registrations. The ``async`` methods raise StoreUnavailableError when
    the store fails; the caller bounds how long it waits."""

    @property
    def synchronous(self) -> bool:
        """True when no call ever suspends (run them with :func:`run_now`)."""
        ...

    def describe(self) -> str:
        """Where it is, for log lines (no password)."""
        ...

    async def claim_name(
        self, name: str, key: bytes, now_ns: int, source: str, limits: NameLimits
    ) -> Claim:
        """Give ``name`` to ``key`` (claiming from IP ``source``) unless another key owns it;
        for its owner, record that it is in use at ``now_ns`` (wall clock). Atomic."""
        ...

    async def find_name(self, name: str) -> Found: ...

    async def find_key(self, key: bytes, guest_at: str | None = None) -> Found:
        """What the store knows of ``key``; with ``guest_at`` (a beacon id), also the key as a
        guest of that beacon (:meth:`publish_guest`)."""
        ...

    async def publish(self, registration: Registration, ttl: float) -> None:
        """Keep ``registration`` for ``ttl`` seconds, replacing the key's previous one."""
        ...

    async def publish_guest(self, guest: Registration, ttl: float) -> None:
        """Keep ``guest`` (a node attached as a guest to the beacon ``guest.home``) for ``ttl``
        seconds, replacing its previous entry at that beacon. Its registration (at its home)
        and its names are not touched: only ``find_key`` and ``relay_target`` with
        ``guest_at=guest.home`` read it."""
        ...

    async def expire_names(self, unused_since_ns: int) -> int:
        """Delete names last used before ``unused_since_ns``; how many went."""
        ...

    async def block_relay(self, receiver: bytes, sender: bytes, until_ns: int) -> None:
        """``receiver`` asked not to be relayed packets from ``sender`` until ``until_ns`` (wall
        clock); 0 lifts the block. Read by the workers that relay to it (:meth:`relay_target`)."""
        ...

    async def relay_target(self, key: bytes, guest_at: str | None = None) -> RelayTarget:
        """``key``'s live registration and the relay blocks in force for it; with ``guest_at``,
        also the key as a guest of that beacon."""
        ...

    async def name_count(self) -> int: ...

    async def aclose(self) -> None: ...


def run_now(call: Coroutine[Any, Any, T]) -> T:
    """The result of a call to a synchronous store, without an event loop."""
    try:
        call.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    call.close()
    raise RuntimeError("a synchronous store suspended")
