"""The embedded node: identity, trust, peers, the beacon, ports, and the async API.

    async with Node(home=PATH, listen="0.0.0.0:0", beacon="beacon.example:9000",
                    hostname="analyst-agent") as node:
        node.trust(peer_id, hostname="reporter-agent")
        async with node.connect("reporter-agent", port=1001) as conn:
            await conn.send(b"hello")

Without a beacon, peers are reached at addresses given with :meth:`Node.add_peer`. With one,
names resolve through it (a name pinned by :meth:`Node.trust` needs no lookup), the first packets
go through its relay at once, and the tunnel moves to a direct path when hole punching succeeds.
``beacon`` may list a fleet's beacons, ``"KEY@A:9000,B:9000"``: the node registers at the first
that answers, fails over to the next when it stops answering, and reaches a peer of another
beacon through the peer's home beacon (:mod:`~pilot_agents.net.traversal.fleet`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..addressing import parse_beacon_list, parse_host_port
from ..errors import (
    BeaconError,
    ConfigError,
    ConnectionClosedError,
    HostOfflineError,
    KeyMismatchError,
    NotTrustedError,
    PeerUnreachableError,
    PilotError,
    PilotTimeoutError,
    PortBusyError,
    PortClosedError,
    PortInUseError,
    TooManyConnectionsError,
    UnknownHostError,
)
from ..home import NodeLock, read_private_text, write_private
from ..identity import Identity, default_home, key_from_node_id, node_id_from_key
from ..net.io.endpoint import Endpoint
from ..net.traversal import beacon_client as bc
from ..net.traversal.beacon_wire import Status, canonical_name, looks_like_node_id
from ..net.traversal.fleet import FleetClient, HomeMoved, RelayDropped
from ..net.tunnel import events
from ..net.tunnel.codes import CloseCode, ResetCode, close_reason, reset_reason
from ..net.tunnel.config import SessionConfig
from ..net.tunnel.mux import Mux
from ..net.tunnel.paths import RelayPath
from ..net.tunnel.session import Session
from ..transport import CONNECT_TIMEOUT, DEFAULT_PORT, DEFAULT_TIMEOUT
from .busy import while_busy
from .connection import (
    Connection,
    Listener,
    Message,
    StreamHandle,
    check_port,
)
from .driver import Driver
from .timestamps import FILE_NAME as TIMESTAMPS_FILE
from .timestamps import TimestampStore

log = logging.getLogger("pilot_agents.node")

EPHEMERAL_PORTS = range(49152, 65536)
# A tunnel that closed for these reasons is not tried again while a caller waits.
_FINAL_CLOSE_CODES = frozenset({CloseCode.NOT_TRUSTED, CloseCode.PROTOCOL_ERROR})
# What a stream's reset raises, when more than ConnectionClosedError tells the user what to do.
_RESET_ERRORS: dict[int, type[ConnectionClosedError]] = {
    ResetCode.PORT_CLOSED: PortClosedError, ResetCode.PORT_BUSY: PortBusyError}
# What the beacon signs about an introduction that makes waiting for the peer pointless.
_UNREACHABLE_VERDICTS = frozenset({Status.OFFLINE, Status.UNKNOWN, Status.ELSEWHERE})
REGISTER_TIMEOUT = 5.0  # seconds start() waits for the beacon to accept us
FAILOVER_ALLOWANCE = 3.0  # seconds more per further beacon of a list (two tries of each)
PIN_CHECK_TIMEOUT = 5.0  # seconds a pinned name's lookup may take after its key did not answer
CONTROL_VIA_RELAY = 0x40  # first byte of node-to-node messages the beacon relays (trust requests)
# seconds a route made for a trust request alone is kept: the guest it may attach registers and
# sends the request well within; then the guest goes, unless a tunnel to the peer came of it
TRUST_REQUEST_ROUTE_TTL = 30.0
BEACON_PINS = "beacons.json"  # beacon keys pinned on first contact, per beacon address


@dataclass(frozen=True)
class PeerInfo:
    node_id: str
    hostname: str | None
    candidates: list[tuple[str, int]]
    nat_type: str


@dataclass(frozen=True)
class PeerStatus:
    node_id: str
    hostname: str | None
    path: str  # "direct", "relay" or "none"
    rtt: float | None  # seconds
    bytes_in: int
    bytes_out: int
    established: bool


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    virtual_address: str
    hostname: str | None
    nat_type: str
    endpoints: list[str]
    beacon: str | None


@dataclass(frozen=True)
class PingResult:
    rtt: float  # seconds
    path: str


class Node:
    def __init__(
        self,
        home: str | Path | None = None,
        listen: str = "0.0.0.0:0",
        config: SessionConfig | None = None,
        *,
        beacon: str | None = None,
        hostname: str | None = None,
        beacon_config: bc.BeaconClientConfig | None = None,
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.identity = Identity.load_or_create(self.home)
        self.config = config or SessionConfig()
        self._listen = parse_host_port(listen)
        # One beacon, or a fleet's (preferred home first): HOST:PORT or KEY@HOST:PORT, by ','.
        self._beacon_spec = parse_beacon_list(beacon) if beacon else None
        self._beacon_text = beacon
        self._beacon_config = beacon_config
        if hostname is not None and beacon is None:
            raise ConfigError("a hostname needs a beacon to register it at (--beacon HOST:PORT)")
        self.hostname = hostname.lower() if hostname else None
        self.on_trust_request: Callable[[bytes, bytes], None] | None = None
        self._mux: Mux | None = None
        self._listeners: dict[int, Listener] = {}
        self._streams: dict[tuple[bytes, int], StreamHandle] = {}
        self._outgoing: set[tuple[bytes, int]] = set()
        self._local_ports: dict[bytes, set[int]] = {}  # per peer, taken by our connections
        self._peer_addresses: dict[bytes, tuple[str, int]] = {}
        self._hostnames: dict[bytes, str] = {}
        # Peers the beacon signed it can't introduce us to (not registered, or registered at
        # another beacon of its fleet), with its reason: a tunnel to them still waiting for its
        # first answer fails at once, saying so, rather than at the caller's deadline.
        self._unreachable: dict[bytes, str] = {}
        self._trusted: set[bytes] = set()
        self._pins: dict[str, bytes] = {}  # name -> key it was trusted as (trust(hostname=))
        self._driver = Driver()
        self._requests: dict[int, asyncio.Future[bc.BeaconEvent]] = {}
        self._registration: asyncio.Future[None] | None = None
        self._pings: dict[tuple[bytes, int], asyncio.Future[float]] = {}
        self._candidates: list[tuple[str, int]] = []  # LAN endpoints told to the beacon
        self._home_lock = NodeLock(self.home)

    @property
    def _endpoint(self) -> Endpoint | None:
        """The running endpoint; the driver holds it, for the connection objects too."""
        return self._driver.endpoint

    # -- identity ---------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def virtual_address(self) -> str:
        return str(self.identity.virtual_address)

    @property
    def local_endpoint(self) -> tuple[str, int]:
        return self._running().local_address

    def info(self) -> NodeInfo:
        endpoint = self._running()
        beacon = endpoint.beacon
        endpoints = [f"{h}:{p}" for h, p in self._candidates or self._local_candidates()]
        if beacon is not None and beacon.reflexive is not None:
            endpoints.insert(0, f"{beacon.reflexive[0]}:{beacon.reflexive[1]}")
        where = self._beacon_text
        if beacon is not None and len(beacon.beacons) > 1:
            # Which one is home changes with fail-over: that is what the user wants to see.
            where = f"{beacon.beacon[0]}:{beacon.beacon[1]} (home, of {len(beacon.beacons)})"
        return NodeInfo(
            node_id=self.node_id,
            virtual_address=self.virtual_address,
            hostname=self.hostname,
            nat_type=beacon.nat_type if beacon is not None else "unknown",
            endpoints=endpoints,
            beacon=where,
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the socket and, with a beacon, register (raises BeaconError, NameTakenError,
        or PeerUnreachableError if the beacon does not answer)."""
        if self._endpoint is not None:
            return
        # One node per home: a second one would take over the first's beacon name and tunnels.
        self._home_lock.acquire()
        # Replay protection of handshakes that survives restarts (the mux checks, we persist).
        self._timestamps = TimestampStore(self.home / TIMESTAMPS_FILE)
        self._mux = Mux(
            self.identity.secret_key,
            self.identity.public_key,
            self.config,
            timestamps=self._timestamps,
        )
        endpoint = Endpoint(self._mux, self._on_event, self._driver.progress_made)
        try:
            endpoint.open(*self._listen)
        except OSError as exc:
            self._home_lock.release()
            raise ConfigError(
                f"cannot listen on {self._listen[0]}:{self._listen[1]}: {exc.strerror}"
            ) from None
        self._driver.endpoint = endpoint
        for peer in self._trusted:
            self._mux.trust(peer)
        if self._beacon_spec is not None:
            try:
                await self._start_beacon(endpoint)
            except BaseException:
                await self.close()
                raise

    async def _start_beacon(self, endpoint: Endpoint) -> None:
        assert self._beacon_spec is not None
        pinned, given = self._beacon_spec
        loop = asyncio.get_running_loop()
        addresses = []
        for host, port in given:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                raise BeaconError(f"cannot resolve beacon host {host!r}: {exc}") from None
            addresses.append((str(infos[0][4][0]), int(infos[0][4][1])))
        pins = self._load_beacon_pins()
        names = [f"{host}:{port}" for host, port in given]
        # A fleet signs with one key: a pin learnt at any of its beacons holds for all.
        known = pinned or next((pins[name] for name in names if name in pins), None)
        client = FleetClient(
            self.identity.secret_key,
            self.identity.public_key,
            self.hostname,
            addresses,
            beacon_key=known,
            config=self._beacon_config,
        )
        self._candidates = self._local_candidates(addresses[0][0])
        client.set_local_candidates(self._candidates)
        endpoint.beacon = client
        endpoint.on_beacon_event = self._on_beacon_event
        self._registration = loop.create_future()
        client.start(endpoint.now())
        endpoint.wake()
        timeout = REGISTER_TIMEOUT + FAILOVER_ALLOWANCE * (len(client.beacons) - 1)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._registration)
        except TimeoutError:
            rejected = client.rejected_key
            if rejected is not None and not client.registered:
                raise BeaconError(
                    f"the beacon at {', '.join(names)} answered with key {rejected.hex()}, not "
                    f"the pinned key {(known or b'').hex()}: refused (the key of a beacon "
                    "changes only if it was replaced, or if someone else answers for it). If "
                    f"the beacon's key really changed, remove its line from "
                    f"{self.home / BEACON_PINS} to pin the new key at the next start"
                ) from None
            where = "the beacon at " + names[0] if len(names) == 1 else "no beacon of " + (
                ", ".join(names))
            raise PeerUnreachableError(
                f"{where} did not answer within {timeout:.0f} s"
            ) from None
        if client.beacon_key is not None and pinned is None:
            pins.update((name, client.beacon_key) for name in names)
            self._save_beacon_pins(pins)

    def _load_beacon_pins(self) -> dict[str, bytes]:
        """The beacon keys pinned so far: none only if the file does not exist. A file that
        can't be read or is damaged is an error: silently dropping it would let whatever
        answers next be pinned in place of the real beacon's key."""
        path = self.home / BEACON_PINS
        try:
            pins = {name: bytes.fromhex(key)
                    for name, key in json.loads(read_private_text(path)).items()}
            if all(len(key) == 32 for key in pins.values()):
                return pins
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError, AttributeError):  # not JSON, nor a mapping to hex keys
            pass
        raise ConfigError(f"{path} is not a valid beacon pin file (expected "
                          '{"HOST:PORT": "64 hex digits", ...}): fix or remove it (removing '
                          "it pins the key the beacon answers with next)")

    def _save_beacon_pins(self, pins: dict[str, bytes]) -> None:
        write_private(self.home / BEACON_PINS,
                      json.dumps({k: v.hex() for k, v in pins.items()}, indent=1))

    def _local_candidates(self, towards: str | None = None) -> list[tuple[str, int]]:
        """Our LAN endpoints: the bound address, or the one the route to the beacon uses."""
        host, port = self._running().local_address
        if host not in ("0.0.0.0", "::"):
            return [(host, port)]
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((towards or "192.0.2.1", 9))  # no packet is sent: only a route lookup
            return [(probe.getsockname()[0], port)]
        except OSError:
            return []
        finally:
            probe.close()

    async def close(self) -> None:
        endpoint, mux = self._endpoint, self._mux
        if endpoint is None or mux is None:
            return
        now = endpoint.now()
        for session in mux.sessions():
            session.close(CloseCode.SHUTDOWN, "", now)
        if endpoint.beacon is not None:
            endpoint.beacon.stop()
        endpoint.flush()
        endpoint.close()
        self._timestamps.flush()
        self._driver.endpoint = None
        self._home_lock.release()
        for listener in list(self._listeners.values()):
            listener.close_now()
        pending: list[asyncio.Future[Any]] = [*self._requests.values(), *self._pings.values()]
        for future in pending:
            if not future.done():
                future.set_exception(ConnectionClosedError("the node was closed"))
        self._driver.progress_made()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _running(self) -> Endpoint:
        if self._endpoint is None:
            raise PilotError("the node is not running (use 'async with Node(...)')")
        return self._endpoint

    # -- trust and peers --------------------------------------------------------------------

    def trust(self, node_id: str, hostname: str | None = None) -> None:
        """Accept tunnels with ``node_id``. With ``hostname``, that name is pinned to the key
        (as ``pilotctl trust add NAME`` does): ``connect(hostname)`` then goes straight to the
        key, without asking the beacon first, and never follows the name to another key.
        KeyMismatchError if ``hostname`` is pinned to another key already (untrust that one
        first): a pin is never moved silently."""
        key = key_from_node_id(node_id)
        if node_id_from_key(key) == self.node_id:
            raise ConfigError("that is this node's own id: a node has no tunnel to itself")
        if hostname:
            name = canonical_name(hostname)
            pinned = self._pins.get(name)
            if pinned is not None and pinned != key:
                # Pins never move silently: that is what makes them pins.
                raise KeyMismatchError(
                    f"{name} is pinned to key {node_id_from_key(pinned)}; refusing to pin it to "
                    f"key {node_id} too. If {name} really has a new key, untrust the old one "
                    f"first ('pilotctl trust remove {name}')"
                )
            self._pins[name] = key
            self._hostnames[key] = name
        self._trusted.add(key)
        if self._mux is not None:
            self._mux.trust(key)
        endpoint = self._endpoint
        # A key we had the beacon block while it was a stranger flooding us.
        beacon = endpoint.beacon if endpoint is not None else None
        if endpoint is not None and beacon is not None and beacon.lift_block(key, endpoint.now()):
            endpoint.wake()

    def untrust(self, node_id: str) -> None:
        """Stop trusting the peer and tear down its tunnel."""
        key = key_from_node_id(node_id)
        self._trusted.discard(key)
        self._pins = {name: pinned for name, pinned in self._pins.items() if pinned != key}
        if self._mux is not None and self._endpoint is not None:
            self._mux.untrust(key, self._endpoint.now())
            self._endpoint.wake()

    def is_trusted(self, node_id: str) -> bool:
        return key_from_node_id(node_id) in self._trusted

    def add_peer(self, node_id: str, address: tuple[str, int] | str) -> None:
        """Reach ``node_id`` directly at ``address`` (no beacon needed)."""
        key = key_from_node_id(node_id)
        if isinstance(address, str):
            address = parse_host_port(address)
        host, port = address
        if not 0 < port <= 65535 or host in ("", "0.0.0.0", "::"):
            # A listen address takes these (any interface, any free port); a peer's cannot,
            # and every packet to it would be lost without a word.
            raise ConfigError(f"{host}:{port} is no address a peer can be reached at: give "
                              "its HOST and a port in 1..65535")
        self._peer_addresses[key] = address

    async def resolve(self, name: str, timeout: float = 5.0) -> PeerInfo:
        """A hostname or node id, looked up at the beacon."""
        endpoint = self._running()
        beacon = endpoint.beacon
        if beacon is None:
            raise ConfigError(f"cannot resolve {name!r}: this node has no beacon")
        request_id = beacon.resolve(name, endpoint.now())
        event = await self._beacon_request(request_id, timeout)
        if isinstance(event, bc.ResolveFailed):
            if event.code == Status.OFFLINE:
                raise HostOfflineError(f"{name}: {event.reason}")
            if event.code == Status.UNKNOWN:
                raise UnknownHostError(f"{name}: {event.reason}")
            # Refused (rate limited, not registered) or unanswered: the name may well exist.
            raise BeaconError(f"the beacon did not resolve {name}: {event.reason}")
        assert isinstance(event, bc.Resolved)
        if event.hostname:
            self._hostnames[event.node_key] = event.hostname
        return PeerInfo(
            node_id_from_key(event.node_key),
            event.hostname,
            [(str(h), int(p)) for h, p in event.candidates],
            event.nat_type,
        )

    async def _beacon_request(self, request_id: int, timeout: float) -> bc.BeaconEvent:
        future: asyncio.Future[bc.BeaconEvent] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        self._running().wake()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise PilotTimeoutError(f"the beacon did not answer within {timeout} s") from None
        finally:
            self._requests.pop(request_id, None)

    async def _peer_key(self, name_or_id: str) -> bytes:
        """The key for a node id, a pinned name, or a hostname resolved through the beacon."""
        text = canonical_name(name_or_id)
        if looks_like_node_id(text):
            return key_from_node_id(text)
        pinned = self._pins.get(text)
        if pinned is not None:
            return pinned
        if self._endpoint is None or self._endpoint.beacon is None:
            raise ConfigError(
                f"{name_or_id!r} is not a node id, and without a beacon names can't be resolved"
            )
        info = await self.resolve(text)
        return key_from_node_id(info.node_id)

    def peers(self) -> list[PeerStatus]:
        mux = self._mux
        if mux is None:
            return []
        return [
            PeerStatus(
                node_id=node_id_from_key(s.peer),
                hostname=self._hostnames.get(s.peer),
                path=s.paths.kind,
                rtt=s.smoothed_rtt,
                bytes_in=s.stats.bytes_received,
                bytes_out=s.stats.bytes_sent,
                established=s.established,
            )
            for s in mux.sessions()
        ]

    async def send_trust_request(self, name_or_id: str, payload: bytes) -> None:
        """Deliver a signed trust request through the relay of the peer's home beacon: the
        one thing a peer that does not trust us yet can receive from us. UnknownHostError if
        the peer is not registered at any beacon of the fleet (it could not be delivered)."""
        endpoint = self._running()
        beacon = endpoint.beacon
        if beacon is None:
            raise ConfigError("trust requests travel through the beacon: this node has none")
        key = await self._peer_key(name_or_id)
        if not beacon.located(key, endpoint.now()):
            # The lookup says where it is registered now (the beacon that relays to it) and
            # that it is: a request to a node that is not would be dropped without a word.
            await self.resolve(node_id_from_key(key))
        message = bytes([CONTROL_VIA_RELAY]) + payload
        relayed = beacon.relay(key, message, endpoint.now())
        if relayed is not None:
            endpoint.send_raw(*relayed)
        endpoint.wake()  # or it waits for us to attach to the peer's home as a guest
        # Only a tunnel's close forgets a peer's route (and the guest kept for it): a request
        # that no tunnel follows must not keep one for the life of the node.
        asyncio.get_running_loop().call_later(TRUST_REQUEST_ROUTE_TTL, self._forget_untunnelled,
                                              key)

    def _forget_untunnelled(self, key: bytes) -> None:
        endpoint, mux = self._endpoint, self._mux
        if endpoint is None or endpoint.beacon is None or mux is None:
            return
        if mux.get_session(key) is None:
            endpoint.beacon.forget_peer(key)

    # -- ports --------------------------------------------------------------------------------

    def listen(self, port: int, *, exclusive: bool = False) -> Listener:
        """A port has one listener here, so every listen is ``exclusive`` (see Transport)."""
        check_port(port)
        if port in self._listeners:
            raise PortInUseError(f"port {port} is already being listened on")
        listener = Listener(port, self._listener_closed)
        self._listeners[port] = listener
        return listener

    def _listener_closed(self, listener: Listener) -> None:
        """Messages the application never took are not lost silently: their streams are
        reset, so their senders hear at once (PortClosedError), not at a timeout."""
        if self._listeners.get(listener.port) is not listener:
            return
        del self._listeners[listener.port]
        self._refuse_streams(listener.take_unread_streams())

    def refuse(self, messages: list[Message]) -> None:
        """Messages taken from a listener that no application will read (the daemon closing a
        port it buffered them for): their streams are reset, so their senders hear
        (PortClosedError), as for the messages a closing listener still holds."""
        handles = {id(m.way_back): m.way_back for m in messages if m.way_back is not None}
        self._refuse_streams(list(handles.values()))

    def abandon(self, handles: list[StreamHandle], why: str) -> None:
        """Streams whose messages went to a reader that is gone without answering them (a
        daemon's client was killed): reset, so their senders hear at once
        (ConnectionClosedError) instead of waiting for replies that cannot come. ``why`` is
        what a late reply on one of them is told."""
        live = [handle for handle in handles if not handle.ended]
        for handle in live:
            handle.fail(ConnectionClosedError(why))
        self._refuse_streams(live, ResetCode.CANCELLED)

    def _refuse_streams(self, handles: list[StreamHandle],
                        code: ResetCode = ResetCode.PORT_CLOSED) -> None:
        for handle in handles:
            handle.session.reset_stream(handle.stream_id, code)
            self._forget(handle)
        self._driver.wake()

    def connect(self, peer: str, port: int = DEFAULT_PORT,
                timeout: float = CONNECT_TIMEOUT) -> Connection:
        """A connection to ``port`` on ``peer`` (a node id, or a hostname with a beacon)."""
        check_port(port)
        return Connection(
            self._driver, lambda: self._open_stream(peer, port, timeout), self._forget, timeout
        )

    async def send(self, peer: str, port: int, data: Any,
                   timeout: float = CONNECT_TIMEOUT) -> None:
        """Deliver one message and wait until the peer has it; while the peer's port is busy
        (:class:`PortBusyError`), try again within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def attempt() -> None:
            async with self.connect(peer, port, deadline - loop.time()) as conn:
                await conn.send(data)

        await while_busy(attempt, deadline)

    async def receive(self, port: int, timeout: float | None = DEFAULT_TIMEOUT) -> Message:
        """One message on ``port`` (listening just for it)."""
        async with self.listen(port) as listener:
            return await listener.receive(timeout)

    async def ping(self, peer: str, timeout: float = 5.0) -> PingResult:
        """One round trip through the tunnel (opened if needed). If the tunnel turns out to
        be to a peer that restarted, the ping goes again on the one that replaced it."""
        endpoint = self._running()
        deadline = endpoint.now() + timeout
        session = await self._session_to(peer, timeout)
        while True:
            try:
                rtt = await self._ping_once(session, deadline - endpoint.now(), timeout)
            except ConnectionClosedError:
                if session.close_code != CloseCode.PEER_RESTARTED or endpoint.now() >= deadline:
                    raise
                session = await self._established_session(
                    session.peer, max(deadline - endpoint.now(), 0.0))
                continue
            return PingResult(rtt, session.paths.kind)

    async def _ping_once(self, session: Session, remaining: float, timeout: float) -> float:
        endpoint = self._running()
        key = session.peer
        ping_id = session.ping(endpoint.now())
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[(key, ping_id)] = future
        endpoint.wake()
        try:
            async with asyncio.timeout(remaining):
                return await future
        except TimeoutError:
            raise PilotTimeoutError(f"no answer to the ping within {timeout} s") from None
        finally:
            self._pings.pop((key, ping_id), None)

    # -- internals: opening tunnels and streams ---------------------------------------------

    async def _established_session(self, key: bytes, timeout: float) -> Session:
        """The tunnel to ``key``, established within ``timeout`` s. Until then the tunnel does
        not give up on a silent peer (it retries, on the relay, asking for introductions), and
        one that closes anyway (the peer shut it down to restart) is replaced by a new one."""
        endpoint = self._running()
        mux = self._mux
        assert mux is not None
        name = self._name_of(key)
        if not mux.is_trusted(key):
            if node_id_from_key(key) == self.node_id:  # trusting it would be refused too
                raise ConfigError(f"{name} is this node itself: name another node (a node "
                                  "has no tunnel to itself)")
            raise NotTrustedError(f"{name} is not trusted: run 'pilotctl trust add {name}'")
        deadline = endpoint.now() + timeout
        while True:
            now = endpoint.now()
            session = mux.session(key, now)
            self._unreachable.pop(key, None)
            if session.address is None:
                self._route(session, key)
            session.keep_trying_until(deadline)
            session.connect(now)
            endpoint.wake()
            try:
                await self._settled(session, deadline - now)
            except PilotTimeoutError:
                raise PeerUnreachableError(
                    f"no answer from {name} within {timeout} s: it is down, unreachable, or "
                    "does not trust us"
                ) from None
            if session.established:
                return session
            if (verdict := self._unreachable.pop(key, None)) is not None:
                raise PeerUnreachableError(f"cannot reach {name}: {verdict}")
            if self._endpoint is None:
                raise ConnectionClosedError("the node was closed")
            if session.close_code in _FINAL_CLOSE_CODES or endpoint.now() >= deadline:
                raise PeerUnreachableError(f"tunnel to {name} failed: {session.close_reason}")
            log.info("tunnel to %s closed (%s): trying again", name, session.close_reason)

    async def _settled(self, session: Session, timeout: float) -> None:
        """Wait until the tunnel is established or closed (PilotTimeoutError after timeout)."""
        await self._driver.wait_until(
            lambda: session.established or session.closed or session.peer in self._unreachable,
            timeout,
        )

    def _name_of(self, key: bytes) -> str:
        """How a peer is shown in messages: its hostname when we know one, else its node id."""
        return self._hostnames.get(key) or node_id_from_key(key)

    def _route(self, session: Session, key: bytes) -> None:
        """A first path for a new tunnel: a configured address, else the beacon's relay at once.
        Moving to the relay is a PathChanged, whose handler asks for the introduction (both
        sides start punching); it leaves in the same flush as the initiation."""
        endpoint = self._running()
        address = self._peer_addresses.get(key)
        if address is not None:
            session.address = address
            return
        if endpoint.beacon is None:
            raise PeerUnreachableError(
                f"no known address for {node_id_from_key(key)}: add_peer() it, or use a beacon"
            )
        session.address = RelayPath(key)

    async def _session_to(self, peer: str, timeout: float) -> Session:
        """The established tunnel to ``peer``. A pinned name leads straight to its key: the
        initiation leaves with the introduction, no lookup first (docs/protocol.md, connection
        set-up). Only when that key does not answer is the beacon asked where the name went."""
        key = await self._peer_key(peer)
        try:
            return await self._established_session(key, timeout)
        except PeerUnreachableError:
            name = canonical_name(peer)
            if self._pins.get(name) == key:
                await self._refuse_moved_name(name, key, timeout)
            raise

    async def _refuse_moved_name(self, name: str, pinned: bytes, timeout: float) -> None:
        """KeyMismatchError if the beacon now gives ``name`` to a key other than the pinned
        one: say so, rather than "unreachable", and never connect to the new key."""
        try:
            info = await self.resolve(name, min(timeout, PIN_CHECK_TIMEOUT))
        except PilotError:
            return  # the beacon can't tell either: the unreachable error stands
        old = node_id_from_key(pinned)
        if info.node_id != old:
            raise KeyMismatchError(
                f"{name} did not answer at key {old}, the key you trusted it as, and the beacon "
                f"now gives the name to key {info.node_id}; refusing the new key. If {name} "
                f"really has a new key, run 'pilotctl trust remove {name}' and then "
                f"'pilotctl trust add {name}'"
            ) from None

    async def _open_stream(self, peer: str, port: int, timeout: float) -> StreamHandle:
        session = await self._session_to(peer, timeout)
        key = session.peer
        local_port = self._ephemeral_port(key)
        stream_id = session.open_stream(local_port, port)
        handle = StreamHandle(self._driver, session, stream_id, local_port, port)
        self._streams[(key, stream_id)] = handle
        self._outgoing.add((key, stream_id))
        self._local_ports.setdefault(key, set()).add(local_port)
        return handle

    def _ephemeral_port(self, peer: bytes) -> int:
        used = self._local_ports.get(peer, set())
        for _ in range(64):
            port = random.choice(EPHEMERAL_PORTS)
            if port not in used:
                return port
        # Nearly all taken (a random draw would have found one otherwise): look at each.
        free = [port for port in EPHEMERAL_PORTS if port not in used]
        if not free:
            name = self._name_of(peer)
            raise TooManyConnectionsError(
                f"all {len(EPHEMERAL_PORTS)} local ports for connections to {name} are in use: "
                "close some of them first"
            )
        return random.choice(free)

    def _forget(self, handle: StreamHandle) -> None:
        key = (handle.session.peer, handle.stream_id)
        handle.forgotten()
        self._streams.pop(key, None)
        if key in self._outgoing:
            self._outgoing.discard(key)
            self._local_ports.get(key[0], set()).discard(handle.local_port)
        handle.discard_unread()

    # -- internals: beacon events -------------------------------------------------------------

    def _on_beacon_event(self, event: bc.BeaconEvent) -> None:
        registration = self._registration
        if isinstance(event, bc.Registered):
            log.info("registered at the beacon as %s (seen as %s)", self.hostname, event.reflexive)
            if registration is not None and not registration.done():
                registration.set_result(None)
            if event.previous is not None and event.previous != event.reflexive:
                self._reintroduce(event.previous, event.reflexive)
        elif isinstance(event, bc.RegistrationFailed | bc.BeaconUnreachable):
            error: PilotError = (
                event.to_error()
                if isinstance(event, bc.RegistrationFailed)
                else PeerUnreachableError(f"beacon unreachable: {event.reason}")
            )
            log.warning("beacon: %s", error)
            if registration is not None and not registration.done():
                registration.set_exception(error)
        elif isinstance(event, bc.Resolved | bc.ResolveFailed):
            future = self._requests.get(event.request_id)
            if future is not None and not future.done():
                future.set_result(event)
        elif isinstance(event, HomeMoved):
            log.warning("our beacon at %s:%d stopped answering: registered at %s:%d instead",
                        *event.previous, *event.beacon)
            self._reintroduce_all(f"our home beacon moved to {event.beacon[0]}:{event.beacon[1]}")
        elif isinstance(event, bc.Introduction):
            self._on_introduction(event)
        elif isinstance(event, bc.IntroductionFailed):
            self._on_introduction_failed(event)
        elif isinstance(event, RelayDropped) and event.packet[:1] == bytes([CONTROL_VIA_RELAY]):
            # Its trust_add reply said sent, and nothing sends it again: the user must know.
            name = self._name_of(event.peer_key)
            log.warning("the trust request to %s was lost (%s): 'pilotctl trust add %s' sends "
                        "another", name, event.reason, name)
        elif (
            isinstance(event, bc.Relayed)
            and event.packet[:1] == bytes([CONTROL_VIA_RELAY])
            and self.on_trust_request is not None
        ):
            self.on_trust_request(event.source_key, event.packet[1:])

    def _reintroduce(self, previous: tuple[str, int], reflexive: tuple[str, int]) -> None:
        """Our NAT rebound: every peer we have a tunnel with still sends to our old address,
        and its NAT lets in only what comes from there. A fresh introduction gives both sides
        each other's current addresses, and both punch again."""
        self._reintroduce_all(f"our address moved from {previous} to {reflexive}")

    def _reintroduce_all(self, why: str) -> None:
        """Ask for a fresh introduction to every peer we have a tunnel with: our address, or
        our home beacon (whose relay a tunnel may use), changed."""
        mux, endpoint = self._mux, self._endpoint
        if mux is None or endpoint is None or endpoint.beacon is None:
            return
        peers = [s.peer for s in mux.sessions() if not s.closed]
        log.info("%s: asking for fresh introductions to %d peers", why, len(peers))
        now = endpoint.now()
        for peer in peers:
            endpoint.beacon.introduce(peer, now)
        endpoint.wake()

    def _on_introduction(self, event: bc.Introduction) -> None:
        """Either side of an introduction: probe every candidate now (the peer does too)."""
        mux, endpoint = self._mux, self._endpoint
        if mux is None or endpoint is None or not mux.is_trusted(event.peer_key):
            return
        now = endpoint.now()
        session = mux.session(event.peer_key, now)
        if session.address is None:
            session.address = RelayPath(event.peer_key)
        session.add_candidates([(str(h), int(p)) for h, p in event.candidates], now)
        endpoint.wake()

    def _on_introduction_failed(self, event: bc.IntroductionFailed) -> None:
        """The beacon signed that the peer is not registered (or is, at another beacon of its
        fleet): a new tunnel waiting for its first answer through the relay would only wait
        out its timeout. It fails now, and a pinned name then learns at once whether it moved
        (_session_to)."""
        log.info("introduction to %s failed: %s", event.peer_key.hex()[:8], event.reason)
        mux, endpoint = self._mux, self._endpoint
        if mux is None or endpoint is None or event.code not in _UNREACHABLE_VERDICTS:
            return
        session = mux.get_session(event.peer_key)
        if session is None or session.established or not isinstance(session.address, RelayPath):
            return
        verdict = event.reason
        if event.code != Status.ELSEWHERE:
            verdict = f"not at the beacon ({verdict})"
        self._unreachable[event.peer_key] = verdict
        name = self._name_of(event.peer_key)
        session.close(CloseCode.PEER_UNREACHABLE, f"{name}: {verdict}", endpoint.now())
        endpoint.wake()

    # -- internals: tunnel events -------------------------------------------------------------

    def _on_event(self, event: events.Event) -> None:
        if isinstance(event, events.MessageReceived):
            self._on_message(event)
        elif isinstance(event, events.StreamOpened):
            self._on_stream_opened(event)
        elif isinstance(event, events.StreamEnded):
            self._on_stream_ended(event)
        elif isinstance(event, events.StreamReset):
            self._on_stream_reset(event)
        elif isinstance(event, events.SessionClosed):
            self._on_session_closed(event)
        elif isinstance(event, events.PathChanged):
            self._on_path_changed(event)
        elif isinstance(event, events.PingAcked):
            future = self._pings.get((event.peer, event.ping_id))
            if future is not None and not future.done():
                future.set_result(event.rtt)
        elif isinstance(event, events.PeerUnanswered):
            self._on_peer_unanswered(event)
        # No progress_made() here: the endpoint calls it (its on_progress) after every burst of
        # events, which is when waiters need to look again; per event it cost a call each.

    def _on_message(self, event: events.MessageReceived) -> None:
        key = (event.peer, event.stream_id)
        handle = self._streams.get(key)
        if handle is None:
            # Nobody will read it: its bytes go back to the peer as credit.
            session = self._mux.get_session(event.peer) if self._mux else None
            if session is not None and session.message_consumed(event.stream_id, len(event.data)):
                self._driver.wake()
            return
        message = Message(event.data, handle.peer_id, event.dst_port, event.src_port, handle)
        if key in self._outgoing:
            handle.inbox.put(message)
            return
        listener = self._listeners.get(handle.local_port)
        if listener is None:
            handle.session.reset_stream(event.stream_id, ResetCode.PORT_CLOSED)
            self._forget(handle)
        else:
            listener._deliver((handle, message))

    def _on_stream_opened(self, event: events.StreamOpened) -> None:
        session = self._mux.get_session(event.peer) if self._mux else None
        if session is None:
            return
        if event.dst_port not in self._listeners:
            session.reset_stream(event.stream_id, ResetCode.PORT_CLOSED)
            return
        self._streams[(event.peer, event.stream_id)] = StreamHandle(
            self._driver, session, event.stream_id, event.dst_port, event.src_port
        )

    def _on_stream_ended(self, event: events.StreamEnded) -> None:
        key = (event.peer, event.stream_id)
        handle = self._streams.get(key)
        if handle is None:
            return
        if key in self._outgoing:
            handle.end()
        else:
            # The client is done sending: close our side once our replies are out.
            handle.session.finish_stream(event.stream_id)
            self._forget(handle)

    def _on_stream_reset(self, event: events.StreamReset) -> None:
        key = (event.peer, event.stream_id)
        handle = self._streams.get(key)
        if handle is None:
            return
        error_type = _RESET_ERRORS.get(event.code, ConnectionClosedError)
        reason = reset_reason(event.code)
        name = self._name_of(event.peer)
        handle.fail(
            error_type(f"{name} port {handle.remote_port}: {reason}", event.code, reason),
            reset=True,
        )
        if key not in self._outgoing:
            self._forget(handle)

    def _on_session_closed(self, event: events.SessionClosed) -> None:
        unreachable = (
            CloseCode.HANDSHAKE_TIMEOUT,
            CloseCode.PEER_UNREACHABLE,
            CloseCode.IDLE_TIMEOUT,
        )
        error_type: type[PilotError] = (
            PeerUnreachableError if event.code in unreachable else ConnectionClosedError
        )
        reason = event.reason or close_reason(event.code)
        name = self._name_of(event.peer)
        successor = self._mux.get_session(event.peer) if self._mux and event.moved else None
        for (peer, stream_id), handle in list(self._streams.items()):
            # Streams on the peer's newer session (opened since) live on.
            if peer != event.peer or not handle.session.closed:
                continue
            if successor is not None and stream_id in event.moved:
                handle.session = successor  # the peer never saw it: it goes on there
                continue
            handle.fail(error_type(f"tunnel to {name} closed: {reason}"))
            if (peer, stream_id) not in self._outgoing:
                self._forget(handle)
        for (peer, _), future in list(self._pings.items()):
            if peer == event.peer and not future.done():
                future.set_exception(error_type(f"tunnel to {name} closed: {reason}"))
        endpoint = self._endpoint
        if successor is None and endpoint is not None and endpoint.beacon is not None:
            endpoint.beacon.forget_peer(event.peer)  # a guest kept for it may go

    def _on_peer_unanswered(self, event: events.PeerUnanswered) -> None:
        """A tunnel's handshakes go unanswered: the peer's NAT may have rebound, or it moved.
        A fresh introduction carries the addresses it registered since, and both sides punch
        again."""
        endpoint = self._endpoint
        if endpoint is not None and endpoint.beacon is not None:
            endpoint.beacon.introduce(event.peer, endpoint.now())

    def _on_path_changed(self, event: events.PathChanged) -> None:
        log.info(
            "tunnel to %s now %s (%s)",
            self._name_of(event.peer)[:12],
            event.path,
            event.address,
        )
        endpoint = self._endpoint
        if event.path == "relay" and endpoint is not None and endpoint.beacon is not None:
            # The direct path broke: a fresh introduction carries both sides' current
            # addresses (a rebound NAT has a new one), and punching starts again.
            endpoint.beacon.introduce(event.peer, endpoint.now())
