"""The beacon as a process: the asyncio driver of :class:`BeaconServer` and its command line.

    pilot-agents beacon --listen 0.0.0.0:9000 [--alt-port auto|off|PORT] [--data-dir DIR] [--stats]
                        [--store sqlite:PATH|redis://HOST:PORT/DB] [--key-file PATH]
                        [--metrics HOST:PORT] [--workers N]
    python -m pilot_agents.beacon.service --listen 127.0.0.1:0 --data-dir DIR

``--workers N`` runs N such processes on one port under a supervisor (:mod:`.workers`).
When the sockets are bound it prints one line to stdout,
``listening on HOST:PORT alt-port PORT key NODE_ID``, which scripts and tests wait for.

The driver mirrors the node's endpoint: non-blocking sockets read in batches from one reader
callback per socket, output flushed once per batch, exactly one timer armed. Calls to a store
that is not synchronous (Redis) run as tasks, each bounded by ``BeaconConfig.store_timeout``; how
they end goes back to the server, and what it answers then is flushed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import logging
import os
import secrets
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ..addressing import parse_host_port
from ..errors import ConfigError, PilotError, PilotTimeoutError, StoreUnavailableError, WireError
from ..identity import Identity, default_home, node_id_from_key
from ..net.io.udp import open_socket
from ..net.traversal import beacon_wire as bw
from ..net.traversal.beacon_wire import Address
from ..runtime import STOPPING
from . import metrics as beacon_metrics
from . import workers
from .server import BeaconConfig, BeaconServer, StoreCall, reported_address
from .store import Store, open_store
from .udp_batch import Reader, Sender

log = logging.getLogger("pilot_agents.beacon")

DEFAULT_LISTEN = "0.0.0.0:9000"


@dataclass(frozen=True)
class BeaconInfo:
    """What a started beacon tells its caller."""

    address: Address
    alt_address: Address | None  # the STUN-only second port, if any
    public_key: bytes

    @property
    def node_id(self) -> str:
        return node_id_from_key(self.public_key)

    @property
    def spec(self) -> str:
        """``KEY@HOST:PORT``, the form nodes take with ``--beacon``."""
        host, port = self.address
        return f"{self.node_id}@{f'[{host}]' if ':' in host else host}:{port}"

    def ready_line(self) -> str:
        host, port = self.address
        alt = "off" if self.alt_address is None else str(self.alt_address[1])
        return f"listening on {host}:{port} alt-port {alt} key {self.node_id}"


class BeaconService:
    """Sockets and timer around a :class:`BeaconServer`; ``close()`` releases them."""

    def __init__(
        self,
        server: BeaconServer,
        sock: socket.socket,
        alt_sock: socket.socket | None,
    ) -> None:
        self.server = server
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._alt_sock = alt_sock
        self._timer: asyncio.TimerHandle | None = None
        self._store_tasks: set[asyncio.Task[None]] = set()
        # Set by a beacon process (not one embedded in a test): see _on_timer.
        self.freeze_gc = False
        # Relayed traffic comes and goes in runs of one flow, and in any case many datagrams at a
        # time: read and send them in batches (udp_batch). The STUN-only socket has no runs.
        self._reader = Reader(sock)
        self._sender = Sender(sock)
        self._alt_reader = Reader(alt_sock, gro=False) if alt_sock is not None else None
        self._alt_sender = Sender(alt_sock, gso=False) if alt_sock is not None else None
        self._loop.add_reader(sock.fileno(), self._read_ready)
        if alt_sock is not None:
            self._loop.add_reader(alt_sock.fileno(), self._alt_read_ready)
        self._arm()

    @property
    def send_errors(self) -> int:
        """Datagrams lost to a full send buffer or a failed send."""
        alt = self._alt_sender.errors if self._alt_sender is not None else 0
        return self._sender.errors + alt

    @property
    def address(self) -> Address:
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def alt_address(self) -> Address | None:
        if self._alt_sock is None:
            return None
        host, port = self._alt_sock.getsockname()[:2]
        return host, port

    def status(self) -> dict[str, Any]:
        """The counters, as STATUS answers them."""
        return self.server.status(self._loop.time())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._store_tasks:
            task.cancel()
        for call in self.server.store_calls():
            call.coroutine.close()
        for sock in (self._sock, self._alt_sock):
            if sock is not None:
                self._loop.remove_reader(sock.fileno())
                sock.close()
        self._sock = self._alt_sock = None

    def _read_ready(self) -> None:
        if self._sock is not None:
            self._reader.read(self.server.receive_datagram, self._loop.time())
            self._flush()

    def _alt_read_ready(self) -> None:
        if self._alt_sock is not None and self._alt_reader is not None and self._alt_sender:
            self._alt_reader.read(self.server.receive_alt_datagram, self._loop.time())
            self._alt_sender.send_all(self.server.alt_datagrams_to_send())

    def _flush(self) -> None:
        if self._sock is not None:
            for call in self.server.store_calls():
                task = self._loop.create_task(self._run_store_call(call))
                self._store_tasks.add(task)
                task.add_done_callback(self._store_tasks.discard)
            self._sender.send_all(self.server.datagrams_to_send())

    async def _run_store_call(self, call: StoreCall) -> None:
        timeout = self.server.config.store_timeout
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the cancel that
            # close() sends, leaving the call running past the beacon (as in ipc.py).
            async with asyncio.timeout(timeout):
                result = await call.coroutine
        except StoreUnavailableError as exc:
            self.server.store_failed(call.call_id, str(exc), self._loop.time())
        except TimeoutError:
            self.server.store_failed(
                call.call_id, f"no answer within {timeout} s", self._loop.time()
            )
        except Exception:  # a bug; the request waiting for the call still gets an answer
            log.exception("store call failed")
            self.server.store_failed(call.call_id, "internal error, logged", self._loop.time())
        else:
            self.server.store_done(call.call_id, result, self._loop.time())
        self._flush()

    def _on_timer(self) -> None:
        self._timer = None
        self.server.handle_timer(self._loop.time())
        self._flush()
        if self.freeze_gc:
            # The cyclic collector's full passes walk every object the beacon holds, hundreds of
            # milliseconds at 100k nodes while answers wait. Its records hold no cycles
            # (reference counting frees them), so what outlived a sweep is frozen: a pass walks
            # only what is younger than the last sweep (benchmarks/RESULTS.md).
            gc.freeze()
        self._arm()

    def _arm(self) -> None:
        if self._sock is not None:
            self._timer = self._loop.call_at(self.server.get_timer(), self._on_timer)


def _alt_port_for(alt_port: int | str | None, port: int) -> int | None:
    """The port to bind the STUN-only socket on: None for none, 0 for any."""
    if alt_port is None or alt_port == "off":
        return None
    if alt_port == "auto":
        return port + 1 if 0 < port < 65535 else 0
    try:
        value = int(alt_port)
    except ValueError:
        raise ConfigError(f"--alt-port {alt_port!r}: expected auto, off or a port") from None
    if not 0 <= value < 65536:
        raise ConfigError(f"--alt-port {value} is not a port")
    return value


def _identity(data_dir: Path, key_file: Path | None) -> Identity:
    """The beacon's key: its own in ``data_dir`` (created on first use), or the fleet's."""
    if key_file is None:
        return Identity.load_or_create(data_dir)
    try:
        return Identity.load(key_file)
    except FileNotFoundError:
        raise ConfigError(
            f"--key-file {key_file}: no such file; copy the fleet's key there (the identity.key "
            "of the first beacon's data directory), mode 600"
        ) from None


def _advertised(
    advertise: str | None, bound: tuple[str, int], alone: bool
) -> tuple[str, int] | None:
    """Where nodes of other beacons of the fleet are sent to reach this one: ``advertise``, or
    the bound address unless it is a wildcard. A beacon on a shared store (not ``alone``) must
    have one, or its nodes could not be reached from the rest of the fleet."""
    if advertise is None:
        host = bound[0]
        if host not in ("0.0.0.0", "::"):
            return reported_address((host, bound[1]))
        if alone:
            return None
        raise ConfigError(
            f"--listen {host}:{bound[1]} on a shared store needs --advertise IP:PORT, the "
            "address nodes reach this beacon at (the other beacons of the fleet send nodes there)"
        )
    try:
        address = parse_host_port(advertise)
        ipaddress.ip_address(address[0])
    except (ConfigError, ValueError):
        raise ConfigError(f"--advertise {advertise!r}: expected IP:PORT") from None
    return address


async def start(
    listen: str,
    data_dir: Path,
    *,
    alt_port: int | str | None = "auto",
    config: BeaconConfig | None = None,
    store: str | None = None,
    key_file: Path | None = None,
    beacon_id: str | None = None,
    worker: Worker | None = None,
    advertise: str | None = None,
) -> BeaconService:
    """A running beacon (sockets bound, key and store opened); close() it, then ``aclose()``
    its ``server.registry``, when done.

    ``store``: ``sqlite:PATH`` or ``redis://HOST:PORT/DB``; None: SQLite in ``data_dir``.
    ``key_file``: the fleet's shared key instead of the beacon's own. ``beacon_id``: its name
    among the beacons sharing the store (default HOSTNAME:PORT). ``worker``: this process is
    one of a beacon's workers, on the sockets its supervisor bound (``listen`` and ``alt_port``
    are then not used). ``advertise``: IP:PORT where nodes reach it, which the other beacons of
    a fleet send nodes to (default: the listen address, which must then not be a wildcard on a
    shared store)."""
    if worker is not None:
        return await _start_worker(worker, data_dir, config, store, key_file, beacon_id, advertise)
    try:
        host, port = parse_host_port(listen)
    except ConfigError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    # A listen port of 0 (tests) takes any free second port too.
    wanted = _alt_port_for(alt_port, port)
    identity = _identity(data_dir, key_file)
    config = config or BeaconConfig()
    registry = await open_store(store, data_dir, timeout=config.store_timeout)
    try:
        (sock,), alt = _bind(listen, host, port, wanted, alt_port == "auto", _one_socket)
    except ConfigError:
        await registry.aclose()
        raise
    alt_sock = alt[0] if alt is not None else None
    return await _service(identity, registry, config, sock, alt_sock, beacon_id, advertise)


def _one_socket(host: str, port: int) -> list[socket.socket]:
    return [open_socket(host, port)]


def _bind(
    listen: str,
    host: str,
    port: int,
    wanted: int | None,
    auto: bool,
    bind: Callable[[str, int], list[socket.socket]],
) -> tuple[list[socket.socket], list[socket.socket] | None]:
    """``bind``'s sockets on the listen port and on the alt port ``wanted`` (None: not wanted,
    or taken while ``auto``); ConfigError if the listen port, or an alt port asked for by
    number, cannot be had."""
    try:
        sockets = bind(host, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}") from None
    if wanted is None:
        return sockets, None
    try:
        return sockets, bind(host, wanted)
    except OSError as exc:
        if not auto:
            for sock in sockets:
                sock.close()
            raise ConfigError(f"cannot listen on alt port {wanted}: {exc.strerror}") from None
        # The second port only refines NAT classification: run without it.
        log.warning("alt port %d unavailable (%s): NAT type detection off", wanted, exc)
        return sockets, None


async def _service(
    identity: Identity,
    registry: Store,
    config: BeaconConfig,
    sock: socket.socket,
    alt_sock: socket.socket | None,
    beacon_id: str | None,
    advertise: str | None,
    worker: int | None = None,
) -> BeaconService:
    config = dataclasses.replace(
        config,
        alt_port=0 if alt_sock is None else alt_sock.getsockname()[1],
    )
    try:
        advertised = _advertised(advertise, sock.getsockname()[:2], registry.synchronous)
    except ConfigError:
        sock.close()
        if alt_sock is not None:
            alt_sock.close()
        await registry.aclose()
        raise
    loop = asyncio.get_running_loop()
    server = BeaconServer(
        identity.secret_key,
        identity.public_key,
        registry,
        config,
        now=loop.time(),
        home=beacon_id or f"{socket.gethostname()}:{sock.getsockname()[1]}",
        worker=worker,
        advertise=advertised,
    )
    log.info("store %s, beacon id %s", registry.describe(), server.home)
    return BeaconService(server, sock, alt_sock)


@dataclass(frozen=True)
class Worker:
    """One of a beacon's worker processes (:mod:`.workers`): its index and inherited sockets."""

    index: int
    fd: int
    alt_fd: int | None

    @classmethod
    def parse(cls, text: str) -> Worker:
        """``INDEX:FD[,ALT_FD]``, as the supervisor writes it."""
        try:
            index, fds = text.split(":")
            numbers = [int(fd) for fd in fds.split(",")]
            return cls(int(index), numbers[0], numbers[1] if len(numbers) > 1 else None)
        except (ValueError, IndexError):
            raise ConfigError(f"--worker {text!r}: expected INDEX:FD[,ALT_FD]") from None


async def _start_worker(
    worker: Worker,
    data_dir: Path,
    config: BeaconConfig | None,
    store: str | None,
    key_file: Path | None,
    beacon_id: str | None,
    advertise: str | None,
) -> BeaconService:
    # The supervisor created the key before starting any worker: loading it races with nobody.
    identity = _identity(data_dir, key_file)
    config = config or BeaconConfig()
    registry = await open_store(store, data_dir, timeout=config.store_timeout)
    sock = _inherited(worker.fd)
    alt_sock = _inherited(worker.alt_fd) if worker.alt_fd is not None else None
    return await _service(
        identity, registry, config, sock, alt_sock, beacon_id, advertise, worker.index
    )


def _inherited(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


async def serve(
    listen: str,
    data_dir: Path,
    ready: Callable[[BeaconInfo], Any] | None = None,
    *,
    alt_port: int | str | None = "auto",
    config: BeaconConfig | None = None,
    stats_interval: float | None = None,
    stop: asyncio.Event | None = None,
    store: str | None = None,
    key_file: Path | None = None,
    beacon_id: str | None = None,
    metrics: str | None = None,
    worker: Worker | None = None,
    freeze_gc: bool = False,
    advertise: str | None = None,
) -> None:
    """Run a beacon until ``stop`` is set (or the task is cancelled).

    ``ready`` gets the bound addresses and key once the sockets listen. ``stats_interval``:
    seconds between log lines of the counters; None for none. ``metrics``: HOST:PORT to serve
    Prometheus metrics on; None for none. ``freeze_gc``: keep what outlives start-up and each
    sweep out of the cyclic garbage collector's passes (``gc.freeze``), for a beacon that is
    its own process. The rest as :func:`start`."""
    service = await start(
        listen,
        data_dir,
        alt_port=alt_port,
        config=config,
        store=store,
        key_file=key_file,
        beacon_id=beacon_id,
        worker=worker,
        advertise=advertise,
    )
    try:
        exporter = await beacon_metrics.serve(metrics, service) if metrics else None
    except ConfigError:
        service.close()
        await service.server.registry.aclose()
        raise
    if freeze_gc:
        gc.collect()  # what start-up left over, once; the rest outlives the beacon anyway
        gc.freeze()
        service.freeze_gc = True
    loop = asyncio.get_running_loop()
    info = BeaconInfo(service.address, service.alt_address, service.server.public_key)
    log.info("beacon %s listening on %s:%d", info.node_id, *info.address)
    stop = stop or asyncio.Event()
    try:
        if ready is not None:
            ready(info)
        while not stop.is_set():
            try:
                async with asyncio.timeout(stats_interval):
                    await stop.wait()
            except TimeoutError:
                log.info("status %s", service.server.status(loop.time()))
    finally:
        if stats_interval is not None:
            log.info("final status %s", service.server.status(loop.time()))
        if exporter is not None:
            exporter.close()
        service.close()
        await service.server.registry.aclose()


def run(
    listen: str,
    data_dir: Path,
    *,
    alt_port: int | str | None = "auto",
    stats_interval: float | None = None,
    ready: Callable[[BeaconInfo], Any] | None = None,
    config: BeaconConfig | None = None,
    store: str | None = None,
    key_file: Path | None = None,
    beacon_id: str | None = None,
    metrics: str | None = None,
    worker: Worker | None = None,
    advertise: str | None = None,
) -> int:
    """Serve until SIGINT, SIGTERM or SIGHUP; the exit status."""

    async def main() -> None:
        stop = _stop_on_signals()
        if worker is not None:
            _stop_when_orphaned(stop)
        await serve(
            listen,
            data_dir,
            ready,
            alt_port=alt_port,
            config=config,
            stats_interval=stats_interval,
            stop=stop,
            store=store,
            key_file=key_file,
            beacon_id=beacon_id,
            metrics=metrics,
            worker=worker,
            freeze_gc=True,
            advertise=advertise,
        )

    return _exit_status(main)


def _exit_status(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    try:
        asyncio.run(main())
    except PilotError as exc:  # a bad setting, an unsafe key file: the message says what to do
        print(f"pilot-agents beacon: {exc}", file=sys.stderr)
        # 1: it ran, then failed (a worker kept dying); 2: it could not start.
        return 1 if isinstance(exc, workers.WorkerFailedError) else 2
    except KeyboardInterrupt:
        pass
    return 0


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOPPING:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    return stop


def _stop_when_orphaned(stop: asyncio.Event, interval: float = 1.0) -> None:
    """A worker whose supervisor is gone (killed) stops rather than serve on unsupervised."""
    loop = asyncio.get_running_loop()
    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent:
            log.error("the beacon's supervisor is gone: stopping")
            stop.set()
        elif not stop.is_set():
            loop.call_later(interval, check)

    loop.call_later(interval, check)


def run_workers(
    count: int,
    listen: str,
    data_dir: Path,
    worker_argv: list[str],
    *,
    alt_port: int | str | None = "auto",
    store: str | None = None,
    key_file: Path | None = None,
    advertise: str | None = None,
    ready: Callable[[str], Any] | None = None,
) -> int:
    """Serve with ``count`` worker processes (:mod:`.workers`) until SIGINT, SIGTERM or
    SIGHUP; the exit status. ``worker_argv``: every worker's options but its sockets."""

    async def main() -> None:
        workers.require_shared_store(store, count)
        # Created here, once: N workers creating it at once would each write a different key.
        _identity(data_dir, key_file)
        try:
            host, port = parse_host_port(listen)
        except ConfigError as exc:
            raise ConfigError(f"--listen: {exc}") from None
        # Checked here too: each worker would refuse it, N times, after the sockets were bound.
        _advertised(advertise, (host, port), alone=False)
        wanted = _alt_port_for(alt_port, port)
        sockets, alt_sockets = _bind(
            listen, host, port, wanted, alt_port == "auto",
            lambda host, port: workers.bind_group(host, port, count),
        )
        supervisor = workers.Supervisor(worker_argv, sockets, alt_sockets)
        await supervisor.run(_stop_on_signals(), ready or _nothing)

    return _exit_status(main)


def _nothing(*_: object) -> None:
    pass


# -- the status client -------------------------------------------------------------------------


class _StatusProtocol(asyncio.DatagramProtocol):
    def __init__(self, request_id: int) -> None:
        self.request_id = request_id
        self.reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            request_id, counters = bw.parse_status_reply_untrusted(data)
        except WireError:
            return
        if request_id == self.request_id and not self.reply.done():
            self.reply.set_result(counters)


async def query_status(beacon_addr: Address | str, timeout: float = 3.0) -> dict[str, Any]:
    """The counters of the beacon at ``beacon_addr`` (``(host, port)`` or ``"host:port"``).

    Tries three times within ``timeout`` seconds; PilotTimeoutError if no answer came."""
    if isinstance(beacon_addr, str):
        beacon_addr = parse_host_port(beacon_addr)
    loop = asyncio.get_running_loop()
    request_id = secrets.randbits(32)
    protocol = _StatusProtocol(request_id)
    transport, _ = await loop.create_datagram_endpoint(lambda: protocol, remote_addr=beacon_addr)
    try:
        request = bw.encode_status_request(request_id)
        for _ in range(3):
            transport.sendto(request)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout / 3):
                    return await asyncio.shield(protocol.reply)
        raise PilotTimeoutError(
            f"no status from the beacon at {beacon_addr[0]}:{beacon_addr[1]} within {timeout} s"
        )
    finally:
        transport.close()


# -- command line ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every other command's mistakes: argparse's usage block buries it.
        print(f"{self.prog}: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def build_parser(prog: str = "pilot-agents beacon") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Run a beacon: registry, STUN, hole-punch coordination and relay.",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT to listen on (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the beacon's key and name registry live (default $PILOT_HOME/beacon)",
    )
    parser.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="where names and live registrations are kept: sqlite:PATH (default: a file in the "
        "data directory) for one beacon, or redis://[:PASSWORD@]HOST:PORT/DB shared by a fleet "
        "of beacons (docs/beacon.md)",
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="sign with this key (every beacon of a fleet loads the same one, so nodes pinning "
        "it can use any of them) instead of DATA_DIR/identity.key",
    )
    parser.add_argument(
        "--beacon-id",
        default=None,
        metavar="NAME",
        help="this beacon's name in the shared store, recorded as its nodes' home beacon "
        "(default HOSTNAME:PORT)",
    )
    parser.add_argument(
        "--advertise",
        default=None,
        metavar="IP:PORT",
        help="where nodes reach this beacon; the other beacons of a fleet send nodes here to "
        "meet its nodes (default: the --listen address; required with a wildcard --listen on "
        "a shared store)",
    )
    parser.add_argument(
        "--alt-port",
        default="auto",
        help="second UDP port answering STUN, for NAT type detection: auto (listen port + 1), "
        "off, or a port number (default auto)",
    )
    parser.add_argument(
        "--stats",
        nargs="?",
        const=60.0,
        type=float,
        default=None,
        metavar="SECONDS",
        help="log the counters every SECONDS (default 60) and on exit",
    )
    parser.add_argument(
        "--relay-rate",
        type=float,
        default=BeaconConfig.relay_byte_rate / 1e6,
        metavar="MB_PER_S",
        help="relayed megabytes per second allowed per node, 0 for no limit (default %(default)g)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP on HOST:PORT (GET /metrics; docs/metrics.md)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="answer from N processes sharing the port (SO_REUSEPORT), one per core; needs a "
        "redis:// store (default 1; docs/beacon.md, Workers)",
    )
    # Set by the supervisor of --workers on each worker's command line: INDEX:FD[,ALT_FD].
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        worker = Worker.parse(args.worker) if args.worker is not None else None
    except ConfigError as exc:
        print(f"pilot-agents beacon: {exc}", file=sys.stderr)
        return 2
    name = "%(name)s" if worker is None else f"%(name)s[worker {worker.index}]"
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s {name} %(levelname)s %(message)s"
    )
    data_dir = args.data_dir if args.data_dir is not None else default_home() / "beacon"

    def ready(info: BeaconInfo) -> None:
        print(info.ready_line(), flush=True)

    def printed(line: str) -> None:
        print(line, flush=True)

    if args.relay_rate < 0:
        print("pilot-agents beacon: --relay-rate must be >= 0", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("pilot-agents beacon: --workers must be >= 1", file=sys.stderr)
        return 2
    if args.workers > 1 and worker is None:
        return run_workers(
            args.workers,
            args.listen,
            data_dir,
            _worker_argv(args, data_dir),
            alt_port=args.alt_port,
            store=args.store,
            key_file=args.key_file,
            advertise=args.advertise,
            ready=printed,
        )
    config = BeaconConfig()
    if args.relay_rate:
        config.relay_byte_rate = args.relay_rate * 1e6
        config.relay_byte_burst = 2 * config.relay_byte_rate
    else:
        # No limit: buckets so large they never run dry.
        config.relay_byte_rate = config.relay_packet_rate = 1e15
        config.relay_byte_burst = config.relay_packet_burst = 2e15
    return run(
        args.listen,
        data_dir,
        alt_port=args.alt_port,
        stats_interval=args.stats,
        ready=ready,
        config=config,
        store=args.store,
        key_file=args.key_file,
        beacon_id=args.beacon_id,
        metrics=_metrics_of(args.metrics, worker),
        worker=worker,
        advertise=args.advertise,
    )


def _worker_argv(args: argparse.Namespace, data_dir: Path) -> list[str]:
    """A worker's options: the beacon's, but for the sockets (the supervisor adds its own)."""
    argv = ["--data-dir", str(data_dir), "--relay-rate", str(args.relay_rate)]
    argv += ["--log-level", args.log_level]
    for option, value in (
        ("--store", args.store),
        ("--key-file", args.key_file),
        ("--beacon-id", args.beacon_id),
        ("--advertise", args.advertise),
        ("--stats", args.stats),
        ("--metrics", args.metrics),
    ):
        if value is not None:
            argv += [option, str(value)]
    return argv


def _metrics_of(listen: str | None, worker: Worker | None) -> str | None:
    """Worker I serves its metrics on PORT + I (each worker its own Prometheus target)."""
    if listen is None or worker is None or worker.index == 0:
        return listen
    try:
        host, port = parse_host_port(listen)
    except ConfigError:
        return listen  # the exporter says what is wrong with it
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + worker.index if port else 0}"


if __name__ == "__main__":
    sys.exit(main())
