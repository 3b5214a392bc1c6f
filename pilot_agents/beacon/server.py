"""The beacon's core, sans-IO: registry, STUN, introductions and relay for one UDP port.

Feed every datagram of the main port to :meth:`BeaconServer.receive_datagram` (and every datagram
of the second, STUN-only port to :meth:`BeaconServer.receive_alt_datagram`), send what
:meth:`BeaconServer.datagrams_to_send` returns, and call :meth:`BeaconServer.handle_timer` at
:meth:`BeaconServer.get_timer`. ``now`` is a monotonic clock in seconds; registration timestamps
are checked against ``wall_clock_ns``.

Who may ask what:

- REGISTER proves itself with the node's signature, a fresh timestamp (within ``max_clock_skew``
  of our clock and newer than the last one we took from that key, so a captured REGISTER can't be
  replayed) and, for a hostname, ownership: the first key to register a name keeps it.
- RESOLVE, INTRODUCE and RELAY are authenticated by their source address: it must be the address
  of a live registration. That address is the one the node's signed REGISTER came from, and it is
  where every answer goes, so an off-path attacker who forges it only makes us send that node
  answers it didn't ask for (rate-limited). Signing each request instead would cost an Ed25519
  verification per relayed packet, which would cap the relay far below what the socket can do;
  TURN authenticates its relayed data the same way, by 5-tuple.

Every refusal is counted by reason; answers that would cost us a signature are rate-limited per
source IP before any work, and per node after the signature is checked (so nobody can spend a
victim's allowance by forging its key).

Floods (issue #11, item 8): a signature check costs ~50 µs, so it is rationed before it is done.
A REGISTER must first pass buckets per source IP and per claimed key (and IP), then a global
budget of checks per second (a BLOCK_RELAY: its node's request allowance, then that budget).
Refreshes of a live registration from its own address draw on a budget of their own
(``known_verify_rate``), so a flood of new or forged keys can't crowd out the nodes already
registered; a new node shares ``verify_rate`` with the flood, but each source IP gets at most
``register_source_rate`` of it. A REGISTER with a bad signature gets no answer.

Names: a key holds at most ``max_names_per_key`` hostnames (claiming another gives up its oldest,
as a rename), one source IP may have claimed at most ``max_names_per_ip`` of the names held, and
a name whose owner has not registered with it for ``name_expiry`` is deleted.

Amplification: no unauthenticated request gets an answer longer than itself (REGISTER and STATUS
are padded by their senders, REFUSED is 6 bytes). STUN is the one exception, for clients we don't
write: a Binding answer (32-52 bytes) is longer than the smallest request (20 bytes). It goes out
when the request was padded to its size (our nodes pad) or came from a live registration's
address; other unpadded requests share a small global budget (``stun_unpadded_rate``), so any
STUN client still learns its address, but the beacon reflects at most that many answers a second
at spoofed sources in all. STUN error answers go out only if they fit in the request.

Relay (items 6 and 9): the first byte of a relayed packet is its tunnel type in clear. Handshakes
and trust requests (anything but a DATA packet) are limited per sending node and per (sender,
receiver) pair with strict buckets; DATA packets only by the sender's packet and byte buckets,
so established tunnels keep flowing while a flood of initiations is dropped. A node can also ask
us (signed BLOCK_RELAY) to stop relaying a key to it for a while.

Keepalives (issue #15): a KEEPALIVE every few seconds per node is the most common message, so it
costs no signature: a keyed BLAKE2b with a key we derive once per registration (X25519, see
:mod:`beacon_wire`), a counter above the last one we took, and an answer (shorter than the
request) carrying the address we saw it from. From the registered address it skips the source
bucket, as relay packets do (a CGNAT puts many nodes behind one IP); from elsewhere (the node's
NAT rebound) it draws on that bucket. Unknown keys, bad MACs and stale counters get no answer.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..errors import ConfigError, WireError
from ..identity import node_id_from_key
from ..net.traversal import beacon_wire as bw
from ..net.traversal import stun
from ..net.traversal.beacon_wire import Address, NatType, Status
from ..net.tunnel import crypto, wire
from ..net.tunnel.ratelimit import TokenBucket
from .store import Claim, Found, NameLimits, Registration, RelayTarget, Store, run_now

log = logging.getLogger("pilot_agents.beacon")

ZERO_KEY = bytes(bw.KEY_SIZE)
RELAY_OVERHEAD = bw.RELAY_OVERHEAD
DATA = wire.DATA
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
STORE_WARNING_INTERVAL = 10.0  # seconds between operator warnings that the store is failing


@dataclass
class BeaconConfig:
    registration_ttl: float = 90.0  # seconds a registration lives without a refresh
    max_clock_skew: float = 60.0  # seconds a REGISTER timestamp may differ from our clock
    alt_port: int = 0  # our second (STUN-only) port, advertised for NAT classification; 0: none
    sweep_interval: float = 5.0  # seconds between purges of expired state
    # Token buckets: rate per second and burst. Per source IP (every message but relayed data):
    source_rate: float = 100.0
    source_burst: float = 200.0
    # Per node, after its signature or registered address is checked:
    register_rate: float = 1.0  # REGISTERs; a node sends one per 25 s plus changes and retries
    register_burst: float = 10.0
    request_rate: float = 20.0  # RESOLVEs, INTRODUCEs and BLOCK_RELAYs
    request_burst: float = 100.0
    relay_packet_rate: float = 20_000.0  # relayed packets per second per sending node
    relay_packet_burst: float = 40_000.0
    relay_byte_rate: float = 16e6  # relayed bytes per second per sending node
    relay_byte_burst: float = 32e6
    max_relay_payload: int = 65_507 - bw.RELAY_OVERHEAD  # bytes; the largest UDP payload
    relay_idle: float = 60.0  # seconds without traffic before a relayed pair counts as new
    max_sources: int = 100_000  # source IPs tracked for rate limiting before all reset
    # Before a signature check, per second and burst:
    register_source_rate: float = 2.0  # signed messages per source IP, unless a known refresh
    register_source_burst: float = 20.0
    claimed_key_rate: float = 2.0  # signed messages claiming one key, per source IP
    claimed_key_burst: float = 20.0
    max_claimed_keys: int = 100_000  # (claimed key, IP) pairs tracked before all reset
    verify_rate: float = 2_000.0  # checks of new keys, moved nodes and BLOCK_RELAYs, in all
    verify_burst: float = 2_000.0
    # Checks for refreshes from a live registration's address: 100k nodes refreshing every 25 s
    # need 4,000/s, and retries come on top.
    known_verify_rate: float = 10_000.0
    known_verify_burst: float = 20_000.0
    # Names:
    max_names_per_key: int = 1  # hostnames one key holds; claiming one more gives up its oldest
    max_names_per_ip: int = 64  # held hostnames claimed from one source IP (a NAT's nodes share it)
    name_expiry: float = 30 * 86_400.0  # seconds a name lives while its owner doesn't use it
    name_touch_interval: float = 86_400.0  # seconds between writes of a name's last use
    # STUN answers longer than their request, to addresses with no live registration, in all:
    stun_unpadded_rate: float = 50.0  # per second
    stun_unpadded_burst: float = 100.0
    # Relayed handshakes and trust requests (every packet but DATA), per second and burst:
    relay_handshake_rate: float = 10.0  # per sending node
    relay_handshake_burst: float = 40.0
    relay_pair_handshake_rate: float = 1.0  # per (sender, receiver) pair
    relay_pair_handshake_burst: float = 10.0
    max_relay_pairs: int = 100_000  # pairs tracked; a new one beyond evicts the oldest
    max_block_duration: float = 3_600.0  # seconds; longer BLOCK_RELAYs are cut to this
    max_blocks_per_node: int = 1_024  # keys one node may have blocked; the soonest to end goes
    # Calls to a store that is not synchronous (Redis), waiting or running; more are refused:
    max_store_calls: int = 10_000
    store_timeout: float = 1.0  # seconds a store call may take before it counts as failed
    # Relaying to a node another worker of this beacon holds (--workers), from the store:
    sibling_ttl: float = 2.0  # seconds a lookup is fresh; then one runs again in the background
    # A node not refreshed here for this long (it refreshes every 25 s) may have moved to another
    # worker (a new port from its NAT): it is then served from the store, which has its latest.
    sibling_refresh_age: float = 35.0
    max_siblings: int = 100_000  # lookups kept before all are forgotten
    # Packets held while a first lookup runs (more are dropped): per target (two GSO runs of a
    # sender), and in all (their memory: 4 MB of 1,200-byte packets).
    sibling_queue: int = 64
    max_sibling_queued: int = 4_096
    # Nodes of other beacons of the fleet attached here (per worker; each is also an entry in a
    # shared store): a new one beyond is refused, as rate limited, until some expire.
    max_guests: int = 10_000

    def __post_init__(self) -> None:
        if self.name_touch_interval >= self.name_expiry:
            # Else a name in use could expire between two writes of its last use.
            raise ConfigError("name_touch_interval must be shorter than name_expiry")


class BucketTable(Generic[K]):
    """A token bucket per key (an IP, a claimed node key), at most ``size`` of them.

    A full table is cleared rather than grown: under a flood from many (likely spoofed) sources
    everyone's history is forgotten, and the global budgets behind it still hold."""

    __slots__ = ("buckets", "burst", "rate", "size")

    def __init__(self, rate: float, burst: float, size: int) -> None:
        self.rate = rate
        self.burst = burst
        self.size = size
        self.buckets: dict[K, TokenBucket] = {}

    def take(self, key: K, now: float) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.size:
                self.buckets.clear()
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def sweep(self, now: float, phase: int) -> None:
        """Forget full buckets (a new one starts full anyway), of slice ``phase``."""
        buckets = self.buckets
        for key in _slice(buckets, phase):
            if buckets[key].full(now):
                del buckets[key]


@dataclass(slots=True)
class _Limits:
    """A node's allowances; they outlive its registration so re-registering can't reset them."""

    register: TokenBucket
    request: TokenBucket
    relay_packets: TokenBucket
    relay_bytes: TokenBucket
    relay_handshakes: TokenBucket

    def idle(self, now: float) -> bool:
        return all(
            b.full(now)
            for b in (
                self.register,
                self.request,
                self.relay_packets,
                self.relay_bytes,
                self.relay_handshakes,
            )
        )


@dataclass(slots=True)
class _Pair:
    """A relayed (sender, receiver) pair."""

    last: float  # when it last relayed a packet
    handshakes: TokenBucket


@dataclass(slots=True)
class _Node:
    key: bytes
    hostname: str | None
    address: Address  # where its datagrams come from and ours go
    reflexive: Address  # the same, as reported (IPv4-mapped IPv6 shown as IPv4)
    lan: tuple[Address, ...]
    nat_type: NatType
    timestamp_ns: int
    expires: float
    reply: bytes  # the REGISTERED we sent, resent for a duplicate of the same REGISTER
    name_touched: float  # when the store last recorded that its hostname is in use
    relayed_head: bytes  # what starts a RELAYED from it: the type and its key
    keepalive_counter: int = 0  # the newest KEEPALIVE counter taken (at first: the timestamp)
    keepalive_key: bytes | None = None  # derived at its first KEEPALIVE; b"": not derivable
    reflexive_wire: bytes = b""  # reflexive, encoded for KEEPALIVE_ACKs, at the first one
    guest: bool = False  # registered at another beacon of the fleet: here to meet a peer

    @property
    def candidates(self) -> tuple[Address, ...]:
        return (self.reflexive, *(a for a in self.lan if a != self.reflexive))


@dataclass(slots=True)
class _Sibling:
    """A relay target this worker does not hold, as the store described it."""

    address: Address | None  # where its beacon reaches it; None: not registered at this beacon
    label: str  # for log lines
    blocks: dict[bytes, float]  # senders it blocked -> until (now)
    expires: float  # when to ask the store again


@dataclass
class BeaconStats:
    registrations: int = 0  # new registrations (not refreshes)
    refreshes: int = 0
    resolves: int = 0
    introductions: int = 0
    relayed_packets: int = 0
    relayed_bytes: int = 0
    stun_requests: int = 0
    status_requests: int = 0
    keepalives: int = 0
    guests: int = 0  # nodes of other beacons of the fleet that attached here (not refreshes)
    refusals: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class StoreCall:
    """A call for the driver to await on the store (one that is not synchronous); its result
    goes to :meth:`BeaconServer.store_done`, its failure to :meth:`BeaconServer.store_failed`."""

    call_id: int
    coroutine: Coroutine[Any, Any, Any]


@dataclass(frozen=True, slots=True)
class _Waiting:
    """What to do when a store call ends."""

    done: Callable[[Any, float], None]
    failed: Callable[[float], None]


def _nothing(*_: object) -> None:
    pass


def reported_address(address: Address) -> Address:
    """An address as a node should see it: no scope id, IPv4-mapped IPv6 as plain IPv4."""
    host, port = address[0], address[1]
    if ":" not in host:
        # IPv4 as the socket reports it (canonical already): the common case, and parsing it
        # with ipaddress would cost a tenth of a refresh.
        return host, port
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


SWEEP_SLICES = 20  # each timer sweeps one slice of every table, all of them per sweep_interval


def _slice(table: dict[K, Any], phase: int) -> list[K]:
    """Slice ``phase`` of ``table``'s keys. Keys move between slices as others are deleted,
    so one may wait a turn longer: what the sweep frees is checked where it is used anyway."""
    return list(table)[phase::SWEEP_SLICES]


def _short(key: bytes) -> str:
    return node_id_from_key(key)[:12]


class BeaconServer:
    def __init__(
        self,
        secret_key: bytes,
        public_key: bytes,
        registry: Store,
        config: BeaconConfig | None = None,
        *,
        now: float = 0.0,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        home: str = "",
        worker: int | None = None,
        advertise: Address | None = None,
    ) -> None:
        """``secret_key``/``public_key``: the beacon's Ed25519 identity; ``now``: the start;
        ``home``: this beacon's name among the beacons sharing ``registry``; ``worker``: which
        of the beacon's worker processes this is (None: the only one); ``advertise``: where
        nodes reach it, told to the other beacons with every registration it publishes."""
        self.secret_key = secret_key
        self.worker = worker
        self.public_key = public_key
        self.home = home
        self.advertise = advertise
        self.config = config or BeaconConfig()
        self.registry = registry
        self._name_limits = NameLimits(self.config.max_names_per_key, self.config.max_names_per_ip)
        self._store_calls: list[StoreCall] = []
        self._waiting: dict[int, _Waiting] = {}
        self._next_call_id = 0
        self._store_warned = -math.inf
        self._name_count = 0  # as the last sweep counted them (a store that is not synchronous)
        self.stats = BeaconStats()
        self._wall_clock_ns = wall_clock_ns
        self._started = now
        self._next_sweep = now + self.config.sweep_interval
        self._sweep_phase = 0
        self._nodes: dict[bytes, _Node] = {}
        self._by_address: dict[Address, bytes] = {}
        self._by_name: dict[str, bytes] = {}  # hostname -> key, of the nodes in _nodes
        self._guest_count = 0  # nodes in _nodes that are guests
        self._last_timestamp: dict[bytes, int] = {}  # replay defence, outlives registrations
        self._limits: dict[bytes, _Limits] = {}
        c = self.config
        self._sources: BucketTable[str] = BucketTable(c.source_rate, c.source_burst, c.max_sources)
        self._register_sources: BucketTable[str] = BucketTable(
            c.register_source_rate, c.register_source_burst, c.max_sources
        )
        self._claimed_keys: BucketTable[tuple[bytes, str]] = BucketTable(
            c.claimed_key_rate, c.claimed_key_burst, c.max_claimed_keys
        )
        self._verify = TokenBucket(c.verify_rate, c.verify_burst, now)
        self._known_verify = TokenBucket(c.known_verify_rate, c.known_verify_burst, now)
        self._stun_unpadded = TokenBucket(c.stun_unpadded_rate, c.stun_unpadded_burst, now)
        self._relay_pairs: dict[tuple[bytes, bytes], _Pair] = {}
        self._blocks: dict[bytes, dict[bytes, float]] = {}  # receiver -> sender -> until (now)
        self._block_stamps: dict[bytes, int] = {}  # newest BLOCK_RELAY timestamp per node
        self._max_relay_payload = self.config.max_relay_payload
        self._siblings: dict[bytes, _Sibling] = {}  # relay targets held by other workers
        self._sibling_waiting: dict[bytes, list[tuple[bytes, Address]]] = {}  # their packets
        self._sibling_queued = 0  # packets in _sibling_waiting
        self._out: list[tuple[bytes, Address]] = []
        self._alt_out: list[tuple[bytes, Address]] = []
        self._x25519_secret = crypto.ed25519_sk_to_x25519(secret_key)  # for keepalive keys

    @property
    def registry(self) -> Store:
        return self._registry

    @registry.setter
    def registry(self, store: Store) -> None:
        """(A setter: the metrics wrap the store in a timing one after the start.)"""
        self._registry = store
        # How much longer than now a registration we hold must live to be served from memory:
        # see sibling_refresh_age. 0 for a synchronous store (one process: nobody else has it).
        self._stale_margin = (
            0.0
            if store.synchronous
            else max(0.0, self.config.registration_ttl - self.config.sibling_refresh_age)
        )

    # -- driving -------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, address: Address, now: float) -> None:
        if not data:
            self._refuse("malformed")
            return
        kind = data[0]
        if kind == bw.RELAY:  # first: it is most of the traffic
            self._on_relay(data, address, now)
            return
        if kind == bw.KEEPALIVE:  # checks the source bucket itself, only for moved nodes
            self._on_keepalive(data, address, now)
            return
        if not self._source_allows(address, now):
            self._refuse("rate_limited")
            return
        try:
            if kind < 4:
                self._on_stun(data, address, self._out, now)
            elif kind == bw.REGISTER or kind == bw.GUEST:
                self._on_register(data, address, now)
            elif kind == bw.RESOLVE:
                self._on_resolve(bw.parse_resolve_untrusted(data), address, now)
            elif kind == bw.INTRODUCE:
                self._on_introduce(bw.parse_introduce_untrusted(data), address, now)
            elif kind == bw.BLOCK_RELAY:
                self._on_block_relay(bw.parse_block_relay_untrusted(data), address, now)
            elif kind == bw.STATUS:
                request_id = bw.parse_status_request_untrusted(data)
                self.stats.status_requests += 1
                self._out.append((self._status_reply(request_id, now), address))
            else:
                self._refuse("malformed")
        except WireError as exc:
            self._refuse("malformed")
            log.debug("malformed datagram from %s: %s", address, exc)

    def receive_alt_datagram(self, data: bytes, address: Address, now: float) -> None:
        """A datagram on the second port: only STUN is answered there (from that port)."""
        if not data or data[0] >= 4:
            self._refuse("malformed")
            return
        if not self._source_allows(address, now):
            self._refuse("rate_limited")
            return
        try:
            self._on_stun(data, address, self._alt_out, now)
        except WireError:
            self._refuse("malformed")

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        return out

    def alt_datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """What to send from the second port."""
        out, self._alt_out = self._alt_out, []
        return out

    def get_timer(self) -> float:
        return self._next_sweep

    # -- the store -----------------------------------------------------------------------------
    # A synchronous store (SQLite) is called on the spot. Any other store's calls wait here,
    # at most max_store_calls of them, for the driver to await them and report how they ended.
    # Nothing waits for them but the request that needs the answer: relay, STUN and refreshes
    # under a name already recorded go on while the store is slow or down.

    def store_calls(self) -> list[StoreCall]:
        calls, self._store_calls = self._store_calls, []
        return calls

    def store_done(self, call_id: int, result: Any, now: float) -> None:
        waiting = self._waiting.pop(call_id, None)
        if waiting is not None:
            waiting.done(result, now)

    def store_failed(self, call_id: int, reason: str, now: float) -> None:
        """The call raised StoreUnavailableError, or the driver gave up waiting for it."""
        waiting = self._waiting.pop(call_id, None)
        if waiting is not None:
            self._store_unavailable(reason, now)
            waiting.failed(now)

    def _call_store(
        self,
        call: Coroutine[Any, Any, T],
        done: Callable[[T, float], None],
        failed: Callable[[float], None],
        now: float,
    ) -> None:
        if self.registry.synchronous:
            done(run_now(call), now)
            return
        if len(self._waiting) >= self.config.max_store_calls:
            call.close()
            self._store_unavailable(f"{len(self._waiting)} calls waiting", now)
            failed(now)
            return
        self._next_call_id += 1
        self._waiting[self._next_call_id] = _Waiting(done, failed)
        self._store_calls.append(StoreCall(self._next_call_id, call))

    def _store_unavailable(self, reason: str, now: float) -> None:
        self._refuse("store_unavailable")
        if now >= self._store_warned + STORE_WARNING_INTERVAL:
            self._store_warned = now
            log.warning(
                "store %s unavailable (%s): refusing new names and lookups of other beacons' "
                "nodes until it answers",
                self.registry.describe(),
                reason,
            )

    def handle_timer(self, now: float) -> None:
        """Purge expired state. Walking every table at once took 236 ms at 100k nodes, while
        answers waited; so each call walks one slice of each, all of them per sweep_interval."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.config.sweep_interval / SWEEP_SLICES
        phase = self._sweep_phase
        self._sweep_phase = (phase + 1) % SWEEP_SLICES
        nodes = self._nodes
        for key in _slice(nodes, phase):
            node = nodes[key]
            if node.expires <= now:
                self._drop(node)
                log.debug("registration of %s expired", node.hostname or _short(key))
        horizon = self._wall_clock_ns() - int(self.config.max_clock_skew * 1e9)
        for stamps in (self._last_timestamp, self._block_stamps):
            # Any REGISTER older than the skew window is stale anyway: no need to remember.
            for key in _slice(stamps, phase):
                if stamps[key] < horizon:
                    del stamps[key]
        limits = self._limits
        for key in _slice(limits, phase):
            if key not in nodes and limits[key].idle(now):
                del limits[key]
        for table in (self._sources, self._register_sources, self._claimed_keys):
            table.sweep(now, phase)
        idle = now - self.config.relay_idle
        pairs = self._relay_pairs
        for pair in _slice(pairs, phase):
            if pairs[pair].last < idle:
                del pairs[pair]
        siblings = self._siblings
        stale = now - self.config.sibling_ttl  # a target in use is looked up again before this
        for key in _slice(siblings, phase):
            if siblings[key].expires <= stale:
                del siblings[key]
        for receiver in _slice(self._blocks, phase):
            blocks = self._blocks[receiver]
            for sender, until in list(blocks.items()):
                if until <= now:
                    del blocks[sender]
            if not blocks:
                del self._blocks[receiver]
        if phase:
            return
        unused_since = self._wall_clock_ns() - int(self.config.name_expiry * 1e9)
        self._call_store(
            self.registry.expire_names(unused_since), self._names_expired, _nothing, now
        )

    def _names_expired(self, expired: int, now: float) -> None:
        if expired:
            log.info("%d names expired unused", expired)
        if not self.registry.synchronous:
            self._call_store(self.registry.name_count(), self._names_counted, _nothing, now)

    def _names_counted(self, count: int, now: float) -> None:
        self._name_count = count

    # -- status --------------------------------------------------------------------------------

    def live_nodes(self, now: float) -> int:
        return sum(1 for node in self._nodes.values() if node.expires > now)

    def status(self, now: float) -> dict[str, Any]:
        stats = self.stats
        return {
            "beacon_key": node_id_from_key(self.public_key),
            "uptime_s": round(now - self._started, 3),
            "registered_nodes": self.live_nodes(now),
            "names": (
                run_now(self.registry.name_count())
                if self.registry.synchronous
                else self._name_count
            ),
            "registrations": stats.registrations,
            "refreshes": stats.refreshes,
            "resolves": stats.resolves,
            "introductions": stats.introductions,
            "relayed_packets": stats.relayed_packets,
            "relayed_bytes": stats.relayed_bytes,
            "relay_pairs": len(self._relay_pairs),
            "relay_blocks": sum(len(blocks) for blocks in self._blocks.values()),
            "stun_requests": stats.stun_requests,
            "status_requests": stats.status_requests,
            "keepalives": stats.keepalives,
            "guests": stats.guests,
            "refusals": dict(stats.refusals),
            **({} if self.worker is None else {"worker": self.worker}),
        }

    def _status_reply(self, request_id: int, now: float) -> bytes:
        counters = self.status(now)
        try:
            return bw.encode_status_reply(request_id, counters)
        except ValueError:
            # Too long to answer without amplifying (about 860 bytes is the most today's
            # counters reach): the refusal breakdown goes, its total stays.
            counters["refusals"] = {"total": sum(self.stats.refusals.values())}
            return bw.encode_status_reply(request_id, counters)

    # -- helpers -------------------------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        self.stats.refusals[reason] += 1

    def _source_allows(self, address: Address, now: float) -> bool:
        return self._sources.take(address[0], now)

    def _may_verify(self, key: bytes, address: Address, now: float) -> bool:
        """Whether a message from ``address`` claiming ``key`` may cost a signature check."""
        node = self._live_at(address, now)
        if node is not None and node.key == key:
            # The node refreshing from where it is: a budget that floods of other keys (or of
            # the same key from elsewhere) can't drain.
            budget = self._known_verify
        elif self._register_sources.take(address[0], now):
            budget = self._verify
        else:
            self._refuse("verify_source_limited")
            return False
        # Per key and IP: forgeries of a key from elsewhere don't spend its allowance here.
        if not self._claimed_keys.take((key, address[0]), now):
            self._refuse("verify_key_limited")
            return False
        if not budget.take(now):
            self._refuse("verify_budget")
            return False
        return True

    def _limits_of(self, key: bytes, now: float) -> _Limits:
        limits = self._limits.get(key)
        if limits is None:
            c = self.config
            limits = _Limits(
                TokenBucket(c.register_rate, c.register_burst, now),
                TokenBucket(c.request_rate, c.request_burst, now),
                TokenBucket(c.relay_packet_rate, c.relay_packet_burst, now),
                TokenBucket(c.relay_byte_rate, c.relay_byte_burst, now),
                TokenBucket(c.relay_handshake_rate, c.relay_handshake_burst, now),
            )
            self._limits[key] = limits
        return limits

    def _live_at(self, address: Address, now: float) -> _Node | None:
        key = self._by_address.get(address)
        if key is None:
            return None
        node = self._nodes.get(key)
        if node is None or node.expires <= now:
            return None
        return node

    def _live(self, key: bytes, now: float) -> _Node | None:
        node = self._nodes.get(key)
        return node if node is not None and node.expires > now else None

    def _fresh(self, key: bytes, now: float) -> _Node | None:
        """The node if we hold it and may answer for it from memory (see _stale_margin)."""
        node = self._nodes.get(key)
        return node if node is not None and node.expires > now + self._stale_margin else None

    def _drop(self, node: _Node) -> None:
        del self._nodes[node.key]
        self._guest_count -= node.guest
        if self._by_address.get(node.address) == node.key:
            del self._by_address[node.address]
        self._forget_name(node)

    def _forget_name(self, node: _Node) -> None:
        if node.hostname is not None and self._by_name.get(node.hostname) == node.key:
            del self._by_name[node.hostname]

    def _on_stun(
        self, data: bytes, address: Address, out: list[tuple[bytes, Address]], now: float
    ) -> None:
        request = stun.parse_binding_request_untrusted(data)
        self.stats.stun_requests += 1
        reply = stun.encode_binding_response(request, reported_address(address))
        if reply is None:
            return
        if len(reply) > len(data):
            # Longer than the request: only a success answer, and only to a registered node's
            # address or within the small budget kept for STUN clients that don't pad.
            success = int.from_bytes(reply[:2], "big") == stun.BINDING_SUCCESS
            if not success or (
                self._live_at(address, now) is None and not self._stun_unpadded.take(now)
            ):
                self._refuse("stun_unpadded")
                return
        out.append((reply, address))

    # -- REGISTER ------------------------------------------------------------------------------

    def _on_register(self, data: bytes, address: Address, now: float) -> None:
        if len(data) < bw.REGISTER_MIN_SIZE:
            self._refuse("unpadded")  # any answer would be longer than the request
            return
        message = bw.parse_register_untrusted(data)
        if not self._may_verify(message.node_key, address, now):
            return
        if not message.verify():
            # No answer: it would cost a signature, and a real node's signatures don't fail.
            self._refuse("bad_signature")
            return
        key = message.node_key
        if not self._limits_of(key, now).register.take(now):
            self._answer_register(message, address, Status.RATE_LIMITED)
            return
        wall = self._wall_clock_ns()
        if abs(message.timestamp_ns - wall) > self.config.max_clock_skew * 1e9:
            self._answer_register(message, address, Status.STALE_TIMESTAMP)
            return
        last = self._last_timestamp.get(key)
        if last is not None and message.timestamp_ns <= last:
            node = self._nodes.get(key)
            if (
                message.timestamp_ns == last
                and node is not None
                and node.address == address
                and node.expires > now
            ):
                # The network duplicated it (or our answer was lost): say the same again.
                self._out.append((node.reply, address))
                return
            self._answer_register(message, address, Status.STALE_TIMESTAMP)
            return
        if message.guest:
            self._accept_guest(message, address, now)
            return
        name = message.hostname
        touched = now
        if name is not None:
            if not bw.valid_hostname(name):
                self._answer_register(message, address, Status.BAD_NAME)
                return
            previous = self._nodes.get(key)
            if (
                previous is not None
                and previous.hostname == name
                and now < previous.name_touched + self.config.name_touch_interval
            ):
                # A refresh under the same name needs no trip to the store.
                touched = previous.name_touched
            else:
                # Take the name for the key (or record that the key still uses it).
                self._call_store(
                    self.registry.claim_name(
                        name, key, wall, reported_address(address)[0], self._name_limits
                    ),
                    lambda claim, at: self._claimed(claim, message, address, at),
                    lambda at: self._answer_register(message, address, Status.UNAVAILABLE),
                    now,
                )
                return
        self._accept(message, address, now, touched)

    def _claimed(self, claim: Claim, message: bw.Register, address: Address, now: float) -> None:
        key, name = message.node_key, message.hostname
        for old in claim.released:
            log.info("%s gives up %s for %s", _short(key), old, name)
        if claim.status is Status.OK:
            last = self._last_timestamp.get(key)
            if last is None or message.timestamp_ns > last:
                self._accept(message, address, now, now)
            # Else a newer REGISTER (or this one's duplicate) was accepted while the store
            # answered: that one's reply went out.
            return
        if claim.owner is not None:
            log.info("refused %s to %s: owned by %s", name, _short(key), _short(claim.owner))
        else:
            ip = reported_address(address)[0]
            log.info("refused %s to %s: %s holds too many names", name, _short(key), ip)
        self._answer_register(message, address, claim.status)

    def _answer_register(self, message: bw.Register, address: Address, status: Status) -> None:
        self._refuse(status.name.lower())
        self._out.append((self._registered(message, address, status), address))

    def _registered(
        self,
        message: bw.Register,
        address: Address,
        status: Status,
        reflexive: Address | None = None,  # reported_address(address), if known
    ) -> bytes:
        return bw.encode_registered(
            self.secret_key,
            self.public_key,
            message.node_key,
            status,
            message.timestamp_ns,
            math.ceil(self.config.registration_ttl),
            self.config.alt_port,
            reflexive or reported_address(address),
        )

    def _accept(
        self, message: bw.Register, address: Address, now: float, name_touched: float
    ) -> None:
        key = message.node_key
        self._last_timestamp[key] = message.timestamp_ns
        previous = self._nodes.get(key)
        other = self._by_address.get(address)
        if other is not None and other != key and other in self._nodes:
            # The address now belongs to another node (a NAT reused the port): the old
            # registration can't be reached there any more.
            log.info("%s took over %s from %s", _short(key), address, _short(other))
            self._drop(self._nodes[other])
        if (
            previous is not None
            and previous.address != address
            and self._by_address.get(previous.address) == key
        ):
            del self._by_address[previous.address]
        if previous is not None and previous.address == address:
            reflexive = previous.reflexive
        else:
            reflexive = reported_address(address)
        reply = self._registered(message, address, Status.OK, reflexive)
        self._guest_count += message.guest - (previous is not None and previous.guest)
        self._nodes[key] = _Node(
            key,
            message.hostname,
            address,
            reflexive,
            message.candidates,
            message.nat_type,
            message.timestamp_ns,
            now + self.config.registration_ttl,
            reply,
            name_touched,
            bytes([bw.RELAYED]) + key,
            guest=message.guest,
        )
        node = self._nodes[key]
        node.keepalive_counter = message.timestamp_ns
        if previous is not None:
            node.keepalive_key = previous.keepalive_key
            if previous.address == address:
                node.reflexive_wire = previous.reflexive_wire
        self._by_address[address] = key
        if previous is not None and previous.hostname != message.hostname:
            self._forget_name(previous)
        if message.hostname is not None:
            self._by_name[message.hostname] = key
        if message.guest and (self.worker is None or self.registry.synchronous):
            # One process holds all our guests: nothing to tell the store.
            self._out.append((reply, address))
            return
        registration = Registration(
            key,
            message.hostname,
            self._nodes[key].candidates,
            message.nat_type,
            self.home,
            address if address != reflexive else None,
            self.advertise,
        )
        ttl = self.config.registration_ttl
        if message.guest:
            # For our other workers, which introduce and relay to it from the nodes they hold;
            # its registration in the store stays its home's.
            publish = self.registry.publish_guest(registration, ttl)
        else:
            publish = self.registry.publish(registration, ttl)
        if (previous is None or previous.address != address) and not self.registry.synchronous:
            # A node new here (or moved) answered at once could be asked for, through another
            # worker or beacon, before the store has it: answer when it does (or gave up).
            def answer(*_: object) -> None:
                self._out.append((reply, address))

            self._call_store(publish, answer, answer, now)
        else:
            self._out.append((reply, address))
            self._call_store(publish, _nothing, _nothing, now)
        if message.guest:
            return  # counted and logged by _accept_guest
        label = message.hostname or "(no name)"
        if previous is None or previous.expires <= now:
            self.stats.registrations += 1
            log.info(
                "registered %s %s at %s, nat %s, %d LAN candidates",
                label,
                _short(key),
                address,
                message.nat_type.label,
                len(message.candidates),
            )
        elif previous.address != address:
            self.stats.refreshes += 1
            log.info("%s %s moved from %s to %s", label, _short(key), previous.address, address)
        else:
            self.stats.refreshes += 1
            if log.isEnabledFor(logging.DEBUG):  # the node id costs a base32 encoding
                log.debug("refreshed %s %s at %s", label, _short(key), address)

    # -- GUEST ---------------------------------------------------------------------------------

    def _accept_guest(self, message: bw.Register, address: Address, now: float) -> None:
        """A node registered at another beacon of the fleet attaches here to be introduced to a
        node of ours and relayed to and from it (its home sent it: RESOLVED and ELSEWHERE name
        us). It lives in our memory as a registration without a name that expires unless
        refreshed; in a shared store, only as a guest of ours (for our other workers), apart
        from its home's registration. A GUEST from a node registered here changes nothing: only
        a REGISTER moves a node."""
        key = message.node_key
        node = self._live(key, now)
        if node is not None and not node.guest:
            self._last_timestamp[key] = message.timestamp_ns
            self._out.append((self._registered(message, address, Status.OK), address))
            return
        held = self._nodes.get(key)  # live or not: replacing a guest keeps the count
        if (held is None or not held.guest) and self._guest_count >= self.config.max_guests:
            self._refuse("guest_limit")
            self._out.append((self._registered(message, address, Status.RATE_LIMITED), address))
            return
        if node is None:
            self.stats.guests += 1
            log.info("guest %s at %s", _short(key), address)
        self._accept(message, address, now, now)

    # -- KEEPALIVE -----------------------------------------------------------------------------

    def _on_keepalive(self, data: bytes, address: Address, now: float) -> None:
        try:
            message = bw.parse_keepalive_untrusted(data)
        except WireError:
            self._refuse("malformed")
            return
        node = self._nodes.get(message.node_key)
        if node is None or node.expires <= now or message.counter <= node.keepalive_counter:
            self._refuse("keepalive_unknown")  # no answer: it would tell who is registered
            return
        if node.address != address and not self._source_allows(address, now):
            self._refuse("rate_limited")
            return
        key = node.keepalive_key
        if key is None:
            key = node.keepalive_key = (
                bw.keepalive_key(self._x25519_secret, node.key, node.key) or b""
            )
        if not key or not message.verify(key):
            self._refuse("keepalive_bad_mac")
            return
        node.keepalive_counter = message.counter
        self.stats.keepalives += 1
        if node.address == address:
            seen = node.reflexive_wire or bw.encode_address(node.reflexive)
            node.reflexive_wire = seen
        else:
            seen = bw.encode_address(reported_address(address))
            log.info(
                "%s sends keepalives from %s, registered at %s: its NAT rebound",
                node.hostname or _short(node.key),
                address,
                node.address,
            )
        self._out.append((bw.encode_keepalive_ack(key, message.counter, seen), address))

    # -- RESOLVE -------------------------------------------------------------------------------

    def _requester(self, address: Address, request_id: int, now: float) -> _Node | None:
        """The live registration asking, within its allowance; or None, refused."""
        node = self._live_at(address, now)
        if node is None:
            self._refuse("not_registered")
            self._out.append((bw.encode_refused(Status.NOT_REGISTERED, request_id), address))
            return None
        if not self._limits_of(node.key, now).request.take(now):
            self._refuse("rate_limited")
            self._out.append((bw.encode_refused(Status.RATE_LIMITED, request_id), address))
            return None
        return node

    def _on_resolve(self, message: bw.Resolve, address: Address, now: float) -> None:
        requester = self._requester(address, message.request_id, now)
        if requester is None:
            return
        self.stats.resolves += 1
        asker = requester.key

        def answer(found: Found, at: float) -> None:
            self._resolved(found, message, asker, address, at)

        def unavailable(at: float) -> None:
            self._resolved(Found(None, None, None), message, asker, address, at, Status.UNAVAILABLE)

        # A node registered here under a name answers from memory; the rest asks the store
        # (not for guests: a lookup leads to a node's home).
        if message.node_key is not None:
            target = self._fresh(message.node_key, now)
            if target is not None and target.hostname is not None:
                answer(Found(target.key, target.hostname, None), now)
            else:
                self._call_store(self.registry.find_key(message.node_key), answer, unavailable, now)
        elif message.hostname is not None and bw.valid_hostname(message.hostname):
            key = self._by_name.get(message.hostname)
            if key is not None and self._fresh(key, now) is not None:
                answer(Found(key, message.hostname, None), now)
            else:
                self._call_store(
                    self.registry.find_name(message.hostname), answer, unavailable, now
                )
        else:
            answer(Found(None, message.hostname, None), now)

    def _resolved(
        self,
        found: Found,
        message: bw.Resolve,
        asker: bytes,
        address: Address,
        now: float,
        failure: Status | None = None,
    ) -> None:
        key, hostname = found.key, found.hostname
        target: _Node | Registration | None = self._registered_here(key, now)
        elsewhere = self._elsewhere(found)
        target = target or elsewhere or self._at_sibling(found)
        if target is not None:
            answer = bw.encode_resolved(
                self.secret_key,
                asker,
                Status.OK,
                message.request_id,
                target.key,
                target.nat_type,
                hostname if message.hostname is not None else target.hostname or hostname,
                target.candidates,
                elsewhere.home_address if target is elsewhere else None,
            )
        else:
            # Offline: the name (or key's name) is owned, its node is away. Unknown otherwise.
            known = hostname is not None and key is not None
            status = failure or (Status.OFFLINE if known else Status.UNKNOWN)
            self._refuse(f"resolve_{status.name.lower()}")
            answer = bw.encode_resolved(
                self.secret_key,
                asker,
                status,
                message.request_id,
                key or ZERO_KEY,
                NatType.UNKNOWN,
                hostname if status == Status.OFFLINE else message.hostname,
                (),
            )
        self._out.append((answer, address))

    def _elsewhere(self, found: Found) -> Registration | None:
        """The live registration ``found`` carries, if another beacon holds it (ours are in
        ``_nodes``, fresher than the store's copy). Its ``home_address`` is where the asking
        node goes to be introduced to it (as a guest there)."""
        registration = found.registration
        return registration if registration is not None and registration.home != self.home else None

    def _registered_here(self, key: bytes | None, now: float) -> _Node | None:
        """The registration of ``key`` at this beacon, if we may answer for it from memory; not
        a guest's, whose home (in the store) is where lookups must lead."""
        node = self._fresh(key, now) if key is not None else None
        return node if node is not None and not node.guest else None

    # -- INTRODUCE -----------------------------------------------------------------------------

    def _on_introduce(self, message: bw.Introduce, address: Address, now: float) -> None:
        requester = self._requester(address, message.request_id, now)
        if requester is None:
            return
        wall = self._wall_clock_ns()
        target = self._fresh(message.peer_key, now)
        if target is None or target.key == requester.key:
            asker = requester.key

            def refuse(status: Status, home: Address | None = None) -> None:
                self._refuse(f"introduce_{status.name.lower()}")
                answer = bw.encode_introduction(
                    self.secret_key,
                    asker,
                    status,
                    message.request_id,
                    wall,
                    message.peer_key,
                    NatType.UNKNOWN,
                    (),
                    home,
                )
                self._out.append((answer, address))

            def found(found: Found, at: float) -> None:
                sibling = self._at_sibling(found)
                elsewhere = self._elsewhere(found)
                if sibling is not None:
                    # Sent from this worker's socket, which has the address of the target's
                    # worker: its NAT lets it through as it does the beacon's other answers.
                    self._introduce(
                        requester, sibling, sibling.observed, message.request_id, wall, address
                    )
                elif elsewhere is not None:
                    # Its home introduces it: the asker attaches there as a guest.
                    refuse(Status.ELSEWHERE, elsewhere.home_address)
                else:
                    refuse(Status.OFFLINE if found.hostname is not None else Status.UNKNOWN)

            # An expired registration may live on at another worker (the node moved there).
            expired = message.peer_key in self._nodes and self.registry.synchronous
            if target is not None or expired:
                refuse(Status.OFFLINE)
            else:
                self._call_store(
                    self.registry.find_key(message.peer_key, self.home),
                    found,
                    lambda at: refuse(Status.UNAVAILABLE),
                    now,
                )
            return
        self._introduce(requester, target, target.address, message.request_id, wall, address)

    def _introduce(
        self,
        requester: _Node,
        target: _Node | Registration,
        target_address: Address,
        request_id: int,
        wall: int,
        address: Address,
    ) -> None:
        self.stats.introductions += 1
        # The target first: it has no reason to expect this, the requester is waiting anyway.
        self._out.append(
            (
                bw.encode_introduction(
                    self.secret_key,
                    target.key,
                    Status.OK,
                    0,
                    wall,
                    requester.key,
                    requester.nat_type,
                    requester.candidates,
                ),
                target_address,
            )
        )
        self._out.append(
            (
                bw.encode_introduction(
                    self.secret_key,
                    requester.key,
                    Status.OK,
                    request_id,
                    wall,
                    target.key,
                    target.nat_type,
                    target.candidates,
                ),
                address,
            )
        )
        log.info(
            "introduced %s (%s, %s) and %s (%s, %s)",
            requester.hostname or _short(requester.key),
            requester.reflexive,
            requester.nat_type.label,
            target.hostname or _short(target.key),
            target.candidates[0],
            target.nat_type.label,
        )

    # -- RELAY ---------------------------------------------------------------------------------

    def _on_relay(self, data: bytes, address: Address, now: float) -> None:
        # Most of the beacon's traffic: every lookup here runs per packet (hence the locals).
        size = len(data) - RELAY_OVERHEAD
        if size <= 0 or size > self._max_relay_payload:
            self._refuse("malformed")
            return
        nodes = self._nodes
        key = self._by_address.get(address)
        source = nodes.get(key) if key is not None else None
        if source is None or source.expires <= now:
            self._refuse("relay_not_registered")
            # Tells a node whose registration we lost (we restarted) to register again; costs
            # no signature and is smaller than what triggered it.
            if self._source_allows(address, now):
                self._out.append((bw.encode_refused(Status.NOT_REGISTERED, 0), address))
            return
        target_key = data[1:RELAY_OVERHEAD]
        if self._blocks:
            blocks = self._blocks.get(target_key)
            if blocks is not None and blocks.get(source.key, 0.0) > now:
                self._refuse("relay_blocked")
                return
        limits = self._limits.get(source.key) or self._limits_of(source.key, now)
        if not limits.relay_packets.take(now) or not limits.relay_bytes.take(now, size):
            self._refuse("relay_rate_limited")
            return
        target = nodes.get(target_key)
        if target is not None and target.expires > now + self._stale_margin:
            target_address = target.address
        else:
            sibling = self._sibling_address(data, address, source.key, target_key, now)
            if sibling is None:
                return
            target_address = sibling
        pair = self._relay_pairs.get((source.key, target_key))
        pair = pair or self._pair(source, target_key, now)
        # The tunnel packet's type is in clear: a handshake or a trust request costs its
        # receiver far more than a data packet of an established tunnel does.
        if data[RELAY_OVERHEAD] != DATA and not (
            pair.handshakes.take(now) and limits.relay_handshakes.take(now)
        ):
            self._refuse("relay_handshake_rate_limited")
            return
        pair.last = now
        # RELAYED is RELAY with the source's key where the target's was (bw.encode_relayed).
        self._out.append((source.relayed_head + data[RELAY_OVERHEAD:], target_address))
        stats = self.stats
        stats.relayed_packets += 1
        stats.relayed_bytes += size

    def _pair(self, source: _Node, target_key: bytes, now: float) -> _Pair:
        key = (source.key, target_key)
        pair = self._relay_pairs.get(key)
        if pair is None:
            c = self.config
            if len(self._relay_pairs) >= c.max_relay_pairs:
                del self._relay_pairs[next(iter(self._relay_pairs))]
            pair = self._relay_pairs[key] = _Pair(
                now, TokenBucket(c.relay_pair_handshake_rate, c.relay_pair_handshake_burst, now)
            )
            target = self._nodes.get(target_key)
            sibling = self._siblings.get(target_key)
            log.info(
                "relay started: %s -> %s",
                source.hostname or _short(source.key),
                (target and target.hostname) or (sibling and sibling.label) or _short(target_key),
            )
        return pair

    # -- nodes another worker of this beacon holds (--workers) ---------------------------------
    # The workers share one port, one beacon id and the store. The kernel keeps each node's
    # packets on one worker, which holds it in memory; what a worker is asked about a node of
    # its beacon that it does not hold, it takes from the node's registration in the store (or,
    # for a guest of the beacon, from its guest entry there).

    def _at_sibling(self, found: Found | RelayTarget) -> Registration | None:
        """The live registration ``found`` carries if it is of this beacon, else the key as a
        guest of this beacon (looked up with ``guest_at``): another worker holds it (ours are in
        ``_nodes``, and fresher than the store's copy)."""
        if self.registry.synchronous:
            return None  # a synchronous store serves one process: what it holds, we hold
        registration = found.registration
        if registration is not None and registration.home == self.home:
            return registration
        return found.guest

    def _sibling_address(
        self, data: bytes, address: Address, sender: bytes, target_key: bytes, now: float
    ) -> Address | None:
        """Where a relayed packet goes to a node this worker does not hold: its address at
        another worker of this beacon, from the store and cached for ``sibling_ttl``. None: the
        packet was refused, or waits for the store (and is relayed when it answers)."""
        if self.registry.synchronous:  # one process: no other worker holds nodes of ours
            self._refuse("relay_target_offline")
            return None
        sibling = self._siblings.get(target_key)
        if sibling is not None:
            if sibling.expires <= now and target_key not in self._sibling_waiting:
                # Looked up again while the last answer serves: a flow is never held up.
                self._look_up_sibling(target_key, now)
            if sibling.address is None:
                self._refuse("relay_target_offline")
                return None
            # Its blocks live at its worker, which told the store (_on_block_relay).
            if sibling.blocks and sibling.blocks.get(sender, 0.0) > now:
                self._refuse("relay_blocked")
                return None
            return sibling.address
        waiting = self._sibling_waiting.get(target_key)
        if waiting is None:
            waiting = self._sibling_waiting[target_key] = []
            self._look_up_sibling(target_key, now)
        if (
            len(waiting) >= self.config.sibling_queue
            or self._sibling_queued >= self.config.max_sibling_queued
            or target_key not in self._sibling_waiting  # the lookup failed at once
        ):
            self._refuse("relay_lookup_queue_full")
            return None
        waiting.append((data, address))
        self._sibling_queued += 1
        return None

    def _look_up_sibling(self, key: bytes, now: float) -> None:
        self._sibling_waiting.setdefault(key, [])
        self._call_store(
            self.registry.relay_target(key, self.home),
            lambda found, at: self._sibling_found(key, found, at),
            lambda at: self._sibling_failed(key),
            now,
        )

    def _sibling_found(self, key: bytes, found: RelayTarget, now: float) -> None:
        registration = found.registration
        ours = self._at_sibling(found)
        wall = self._wall_clock_ns()
        if len(self._siblings) >= self.config.max_siblings:
            self._siblings.clear()
        self._siblings[key] = _Sibling(
            ours.observed if ours is not None else None,
            (registration and registration.hostname) or _short(key),
            {s: now + (until - wall) / 1e9 for s, until in found.blocks.items() if until > wall},
            now + self.config.sibling_ttl,
        )
        waiting = self._sibling_waiting.pop(key, [])
        self._sibling_queued -= len(waiting)
        for data, address in waiting:
            self._on_relay(data, address, now)  # checked again: the sender may have gone

    def _sibling_failed(self, key: bytes) -> None:
        # The last answer, if any, goes too: packets wait for the next lookup rather than go
        # on to an address (and blocks) the store could not confirm.
        self._siblings.pop(key, None)
        waiting = self._sibling_waiting.pop(key, [])
        self._sibling_queued -= len(waiting)
        for _ in waiting:
            self._refuse("relay_store_unavailable")

    # -- BLOCK_RELAY ---------------------------------------------------------------------------

    def _on_block_relay(self, message: bw.BlockRelay, address: Address, now: float) -> None:
        node = self._live_at(address, now)
        if node is None or node.key != message.node_key:
            self._refuse("block_not_registered")
            return
        key = node.key
        if not self._limits_of(key, now).request.take(now):
            self._refuse("rate_limited")
            return
        # Not the budget of refreshes: a node flooded from many keys sends many of these, and
        # its own REGISTERs must still get through.
        if not self._verify.take(now):
            self._refuse("verify_budget")
            return
        if not message.verify():
            self._refuse("bad_signature")
            return
        wall = self._wall_clock_ns()
        if message.timestamp_ns <= self._block_stamps.get(key, 0) or (
            abs(message.timestamp_ns - wall) > self.config.max_clock_skew * 1e9
        ):
            self._refuse("stale_timestamp")
            return
        self._block_stamps[key] = message.timestamp_ns
        # The block runs from the message's own time: a replay of it changes nothing.
        age = max(0.0, (wall - message.timestamp_ns) / 1e9)
        until = now + min(float(message.seconds), self.config.max_block_duration) - age
        blocks = self._blocks.setdefault(key, {})
        blocked = message.blocked_key
        if not self.registry.synchronous:
            # For the other workers, which relay to this node from senders they hold.
            until_ns = 0 if until <= now else wall + int((until - now) * 1e9)
            self._call_store(
                self.registry.block_relay(key, blocked, until_ns), _nothing, _nothing, now
            )
        if until <= now:
            blocks.pop(blocked, None)
            log.info("%s lifted its relay block of %s", _short(key), _short(blocked))
        else:
            if blocked not in blocks and len(blocks) >= self.config.max_blocks_per_node:
                del blocks[min(blocks, key=blocks.__getitem__)]
            blocks[blocked] = until
            log.info(
                "%s blocked relaying from %s for %.0f s", _short(key), _short(blocked), until - now
            )
        if not blocks:
            del self._blocks[key]
