"""The daemon: one Node per home, its trust store, and the local ZeroMQ API (see ``ipc.py`` and
``docs/ipc.md``).

Process lifecycle. ``pilotctl daemon start`` runs ``python -m pilot_agents.cli daemon start
--foreground --ready-fd N`` in a new session and waits until that child reports on the pipe N
that it is registered and serving (or why it failed). One daemon per home: it holds an exclusive
``flock`` on ``<home>/daemon.lock`` for its whole life; the kernel drops the lock when the process
dies, however it dies, so a stale pid file or socket from a killed daemon never blocks a restart
(the next daemon removes them). Logs go to ``<home>/daemon.log``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import fcntl
import functools
import itertools
import json
import logging
import logging.handlers
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from . import ipc
from .errors import (
    BadRequestError,
    BeaconError,
    ConfigError,
    ConnectionClosedError,
    DaemonRunningError,
    InternalError,
    KeyMismatchError,
    NameTakenError,
    NotTrustedError,
    PeerUnreachableError,
    PilotError,
    PilotTimeoutError,
    PortClosedError,
    TrustRequestError,
    UnknownHostError,
)
from .identity import key_from_node_id
from .ipc import decode_data, encode_data
from .node.node import Node
from .runtime import run
from .trust import (
    TrustEntry,
    TrustStore,
    is_node_id,
    make_trust_request,
    parse_trust_request_untrusted,
)

log = logging.getLogger("pilot_agents.daemon")

VERSION = "0.1.0"
DEFAULT_INBOX_PORTS = (1001,)
START_TIMEOUT = 30.0  # seconds `daemon start` waits for the daemon to be ready
STOP_TIMEOUT = 10.0  # seconds `daemon stop` waits before it kills
INBOX_LIMIT = 1024  # messages buffered per port or stream before the tunnel is back-pressured
STREAM_IDLE_TIMEOUT = 600.0  # seconds an IPC stream may go unused before the daemon aborts it
MESSAGE_MEMORY = 10_000  # received messages remembered for reply/requeue
STATIC_PEERS_FILE = "static-peers.json"
LOG_MAX_BYTES = 5 * 1024 * 1024


@dataclass
class DaemonOptions:
    home: Path
    hostname: str | None = None
    beacon: str | None = None  # "HOST:PORT" or "KEYB32@HOST:PORT"
    listen: str = "0.0.0.0:0"  # UDP address of the tunnel endpoint
    inbox_ports: tuple[int, ...] = DEFAULT_INBOX_PORTS  # listened on from the start


# -- requests (the IPC protocol, docs/ipc.md) --------------------------------------------------

Encoding = Literal["utf-8", "base64"]
Port = Annotated[int, Field(ge=1, le=65535)]
Timeout = Annotated[float, Field(gt=0, le=7 * 86400)]
Name = Annotated[str, Field(min_length=1, max_length=253)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int | str | None = None


class _Payload(_Request):
    data: str
    encoding: Encoding = "utf-8"

    def payload(self) -> bytes:
        return decode_data(self.data, self.encoding)


class InfoRequest(_Request):
    cmd: Literal["info"]


class PeersRequest(_Request):
    cmd: Literal["peers"]


class ResolveRequest(_Request):
    cmd: Literal["resolve"]
    name: Name


class AddPeerRequest(_Request):
    cmd: Literal["add_peer"]
    node_id: Name
    address: Name
    hostname: Name | None = None


class TrustAddRequest(_Request):
    cmd: Literal["trust_add"]
    target: Name
    reason: str = Field(default="", max_length=500)


class TrustApproveRequest(_Request):
    cmd: Literal["trust_approve"]
    target: Name


class TrustRejectRequest(_Request):
    cmd: Literal["trust_reject"]
    target: Name


class TrustRemoveRequest(_Request):
    cmd: Literal["trust_remove"]
    target: Name


class TrustListRequest(_Request):
    cmd: Literal["trust_list"]


class TrustPendingRequest(_Request):
    cmd: Literal["trust_pending"]


class TrustExportRequest(_Request):
    cmd: Literal["trust_export"]
    target: Name
    reason: str = Field(default="", max_length=500)


class TrustImportRequest(_Request):
    cmd: Literal["trust_import"]
    request: str = Field(min_length=1, max_length=8192)


class ConnectRequest(_Request):
    cmd: Literal["connect"]
    target: Name
    port: Port = 1001
    timeout: Timeout = 10.0


class StreamSendRequest(_Payload):
    cmd: Literal["stream_send"]
    stream: str


class StreamReceiveRequest(_Request):
    cmd: Literal["stream_receive"]
    stream: str
    timeout: Timeout | None = 30.0


class StreamDrainRequest(_Request):
    cmd: Literal["stream_drain"]
    stream: str
    timeout: Timeout | None = None


class StreamCloseRequest(_Request):
    cmd: Literal["stream_close"]
    stream: str


class StreamAbortRequest(_Request):
    cmd: Literal["stream_abort"]
    stream: str


class SendRequest(_Payload):
    cmd: Literal["send"]
    target: Name
    port: Port
    timeout: Timeout = 10.0


class ListenRequest(_Request):
    cmd: Literal["listen"]
    port: Port
    publish: bool = False


class UnlistenRequest(_Request):
    cmd: Literal["unlisten"]
    port: Port


class ReceiveRequest(_Request):
    cmd: Literal["receive"]
    port: Port
    timeout: Timeout | None = 30.0


class ReplyRequest(_Payload):
    cmd: Literal["reply"]
    message: str


class RequeueRequest(_Request):
    cmd: Literal["requeue"]
    message: str


class PingRequest(_Request):
    cmd: Literal["ping"]
    target: Name
    timeout: Timeout = 5.0


class CancelRequest(_Request):
    cmd: Literal["cancel"]
    request: int | str


class StopRequest(_Request):
    cmd: Literal["stop"]


Request = Annotated[
    InfoRequest | PeersRequest | ResolveRequest | AddPeerRequest | TrustAddRequest
    | TrustApproveRequest | TrustRejectRequest | TrustRemoveRequest | TrustListRequest
    | TrustPendingRequest | TrustExportRequest | TrustImportRequest | ConnectRequest
    | StreamSendRequest | StreamReceiveRequest | StreamDrainRequest | StreamCloseRequest
    | StreamAbortRequest | SendRequest | ListenRequest | UnlistenRequest | ReceiveRequest
    | ReplyRequest | RequeueRequest | PingRequest | CancelRequest | StopRequest,
    Field(discriminator="cmd"),
]
REQUEST_ADAPTER: TypeAdapter[Any] = TypeAdapter(Request)
COMMANDS: tuple[str, ...] = tuple(
    model.model_fields["cmd"].annotation.__args__[0]
    for model in get_args(get_args(Request)[0])
)


def parse_request_untrusted(body: bytes) -> tuple[Any, Any]:
    """``(request id or None, validated request)``; BadRequestError for anything malformed."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadRequestError("the request is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise BadRequestError("the request must be a JSON object with a 'cmd' field")
    request_id = data.get("id")
    if not isinstance(request_id, int | str) or isinstance(request_id, bool):
        request_id = None
    try:
        return request_id, REQUEST_ADAPTER.validate_python(data)
    except ValidationError as exc:
        error = BadRequestError(_describe(exc, data))
        error.request_id = request_id  # type: ignore[attr-defined]
        raise error from None


def _describe(exc: ValidationError, data: dict[str, Any]) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "union_tag_invalid" or (err["type"] == "union_tag_not_found"):
        cmd = data.get("cmd")
        if cmd is None:
            return "the request has no 'cmd' field"
        return f"unknown command {cmd!r} (see docs/ipc.md for the list)"
    where = ".".join(loc[1:]) if len(loc) > 1 else ".".join(loc)
    if err["type"] == "extra_forbidden":
        return f"unknown field {where!r} for command {data.get('cmd')!r}"
    if err["type"] == "missing":
        return f"command {data.get('cmd')!r} needs the field {where!r}"
    return f"bad field {where!r} for command {data.get('cmd')!r}: {err['msg']}"


# -- static peers ----------------------------------------------------------------------------


class StaticPeer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node_id: str
    address: str  # HOST:PORT
    hostname: str | None = None


class StaticPeersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    peers: list[StaticPeer] = Field(default_factory=list)


def load_static_peers(home: Path) -> dict[str, StaticPeer]:
    path = home / STATIC_PEERS_FILE
    try:
        data = StaticPeersFile.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValidationError) as exc:
        raise ConfigError(
            f"{path} is not a valid static peers file ({exc}): fix or remove it") from None
    return {p.node_id: p for p in data.peers}


def save_static_peers(home: Path, peers: dict[str, StaticPeer]) -> None:
    path = home / STATIC_PEERS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(StaticPeersFile(peers=list(peers.values())).model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)


# -- buffers -----------------------------------------------------------------------------------


class Inbox:
    """Messages waiting for an IPC client, bounded: a full inbox stops its pump, which stops
    crediting the tunnel, which slows the sender (no message is ever dropped here)."""

    def __init__(self, what: str, limit: int = INBOX_LIMIT) -> None:
        self.what = what
        self.limit = limit
        self._items: collections.deque[Any] = collections.deque()
        self._cond = asyncio.Condition()
        self._error: PilotError | None = None

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Any) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: len(self._items) < self.limit)
            self._items.append(item)
            self._cond.notify_all()

    async def push_front(self, item: Any) -> None:
        async with self._cond:
            self._items.appendleft(item)
            self._cond.notify_all()

    async def fail(self, error: PilotError) -> None:
        """No more items will come: once empty, gets raise ``error``."""
        async with self._cond:
            self._error = error
            self._cond.notify_all()

    async def get(self, timeout: float | None) -> Any:
        async with self._cond:
            try:
                async with asyncio.timeout(timeout):
                    await self._cond.wait_for(lambda: self._items or self._error is not None)
            except TimeoutError:
                raise PilotTimeoutError(f"no message on {self.what} within {timeout:g} s") from None
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            assert self._error is not None
            raise self._error


@dataclass
class PortState:
    port: int
    listener: Any
    inbox: Inbox
    refs: int = 1
    permanent: bool = False
    publish: bool = False
    task: asyncio.Task[None] | None = None
    received: int = 0


@dataclass
class StreamState:
    stream_id: str
    conn: Any
    peer: str
    hostname: str | None
    port: int
    inbox: Inbox
    task: asyncio.Task[None] | None = None
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0


@dataclass
class Remembered:
    """A message handed to a client: how to reply to it and where to put it back."""

    message: Any
    inbox: Inbox
    reply: Callable[[bytes], Awaitable[None]]


# -- the daemon ------------------------------------------------------------------------------


class Daemon:
    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.home = options.home
        self.node: Any = None
        self.store: TrustStore | None = None
        self.static: dict[str, StaticPeer] = {}
        self._router: Any = None
        self._pub: Any = None
        self._ports: dict[int, PortState] = {}
        self._streams: dict[str, StreamState] = {}
        self._messages: collections.OrderedDict[str, Remembered] = collections.OrderedDict()
        self._message_ids = itertools.count(1)
        self._tasks: dict[tuple[bytes, Any], asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        self._started = time.time()
        self._seen_nonces: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._handlers: dict[str, Callable[[Any], Awaitable[dict[str, Any]]]] = {
            name: getattr(self, "_cmd_" + name) for name in COMMANDS if name != "cancel"
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, ready: Callable[[dict[str, Any] | PilotError], None]) -> None:
        """Start, call ``ready`` with our info (or the error that stopped us), serve until
        stopped, clean up."""
        try:
            await self._start()
        except PilotError as exc:
            await self._shutdown()
            ready(exc)
            return
        except BaseException:
            await self._shutdown()
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        info = self._info()
        log.info("ready: %s (%s) home %s, udp %s, beacon %s", info["hostname"], info["node_id"],
                 self.home, ",".join(info["endpoints"]), info["beacon"])
        ready(info)
        serve = asyncio.create_task(self._serve())
        janitor = asyncio.create_task(self._janitor())
        try:
            await self._stop.wait()
        finally:
            log.info("stopping")
            for task in (serve, janitor):
                task.cancel()
            for task in list(self._tasks.values()):
                task.cancel()
            await asyncio.gather(serve, janitor, *self._tasks.values(), return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._shutdown()
            log.info("stopped")

    def stop(self) -> None:
        self._stop.set()

    async def _start(self) -> None:
        opts = self.options
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._acquire_lock()
        ipc_address = ipc.endpoint(self.home)  # checks the path length before anything else
        if opts.hostname is not None and is_node_id(opts.hostname):
            raise ConfigError(f"hostname {opts.hostname!r} looks like a node id: choose another")
        self.store = TrustStore.load(self.home)
        self.static = load_static_peers(self.home)
        self.node = Node(home=self.home, listen=opts.listen, **self._node_options())
        self.node.on_trust_request = self._on_trust_request
        for entry in self.store.trusted():
            self.node.trust(entry.node_id)
        for peer in self.static.values():
            self.node.add_peer(peer.node_id, peer.address)
        try:
            await self.node.start()
        except (PeerUnreachableError, PilotTimeoutError) as exc:
            raise BeaconError(f"cannot reach the beacon at {opts.beacon}: {exc}") from None
        except NameTakenError as exc:
            raise NameTakenError(
                f"the hostname {opts.hostname!r} is taken at the beacon {opts.beacon} ({exc}): "
                "choose another --hostname"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot start the node: {exc.strerror or exc}") from None
        for port in opts.inbox_ports:
            await self._listen(port, permanent=True)
        self._bind_sockets(ipc_address)
        pid_path = self.home / ipc.PID_NAME
        pid_path.write_text(f"{os.getpid()}\n")

    def _node_options(self) -> dict[str, Any]:
        """Without a beacon the hostname stays the daemon's own label (the Node registers names
        only at a beacon)."""
        if not self.options.beacon:
            return {}
        return {"beacon": self.options.beacon, "hostname": self.options.hostname}

    def _acquire_lock(self) -> None:
        path = self.home / ipc.LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + 0.5  # a status check may hold a shared lock for a moment
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    pid = ipc.daemon_pid(self.home)
                    raise DaemonRunningError(
                        f"a daemon is already running for {self.home} (pid {pid}); "
                        "stop it with 'pilotctl daemon stop'"
                    ) from None
                time.sleep(0.02)
        self._lock_fd = fd
        for stale in (ipc.SOCKET_NAME, ipc.PUB_SOCKET_NAME, ipc.PID_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self.home / stale).unlink()
                log.info("removed stale %s", stale)

    def _bind_sockets(self, address: str) -> None:
        import zmq

        context = ipc._zmq_context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        old_umask = os.umask(0o177)
        try:
            router.bind(address)
            pub = context.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(ipc.pub_endpoint(self.home))
        finally:
            os.umask(old_umask)
        for name in (ipc.SOCKET_NAME, ipc.PUB_SOCKET_NAME):
            os.chmod(self.home / name, 0o600)
        self._router, self._pub = router, pub

    async def _shutdown(self) -> None:
        for stream in list(self._streams.values()):
            self._drop_stream(stream, abort=True)
        for state in list(self._ports.values()):
            self._close_port(state)
        if self.node is not None:
            with contextlib.suppress(Exception):
                await self.node.close()
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close(linger=0)
        self._router = self._pub = None
        if self._lock_fd is not None:
            for name in (ipc.SOCKET_NAME, ipc.PUB_SOCKET_NAME, ipc.PID_NAME):
                with contextlib.suppress(FileNotFoundError):
                    (self.home / name).unlink()
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # -- serving --------------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) < 2:
                continue
            identity, envelope, body = frames[0], frames[1:-1], frames[-1]
            try:
                request_id, request = parse_request_untrusted(body)
            except BadRequestError as exc:
                log.info("bad request: %s", exc)
                await self._send(identity, envelope,
                                 ipc.error_reply(exc, getattr(exc, "request_id", None)))
                continue
            if request.cmd == "cancel":
                task = self._tasks.get((identity, request.request))
                if task is not None:
                    task.cancel()
                await self._send(identity, envelope, {"ok": True, "cancelled": task is not None})
                continue
            key = (identity, request_id if request_id is not None else object())
            task = asyncio.create_task(self._handle(identity, envelope, request_id, request))
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._forget_task, key))

    def _forget_task(self, key: tuple[bytes, Any], _task: asyncio.Task[None]) -> None:
        self._tasks.pop(key, None)

    async def _handle(self, identity: bytes, envelope: list[bytes], request_id: Any,
                      request: Any) -> None:
        try:
            reply = {"ok": True, **await self._handlers[request.cmd](request)}
        except asyncio.CancelledError:
            return
        except PilotError as exc:
            reply = ipc.error_reply(exc)
        except OSError as exc:
            reply = ipc.error_reply(PilotError(f"{exc.strerror or exc}"))
        except Exception as exc:
            log.exception("internal error in %r", request.cmd)
            reply = ipc.error_reply(InternalError(
                f"internal error in '{request.cmd}': {type(exc).__name__}: {exc} "
                f"(details in {self.home / ipc.LOG_NAME})"
            ))
        if request_id is not None:
            reply["id"] = request_id
        await self._send(identity, envelope, reply)
        if request.cmd == "stop" and reply["ok"]:
            self._stop.set()

    async def _send(self, identity: bytes, envelope: list[bytes], reply: dict[str, Any]) -> None:
        import zmq

        body = json.dumps(reply, separators=(",", ":")).encode("utf-8")
        try:
            await self._router.send_multipart([identity, *envelope, body], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.info("reply not delivered (%s): the client is gone", exc)
            message = reply.get("message")
            if isinstance(message, dict):
                await self._requeue(str(message.get("id")))

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, STREAM_IDLE_TIMEOUT / 4))
            now = time.monotonic()
            for stream in list(self._streams.values()):
                if stream.busy == 0 and now - stream.last_used > STREAM_IDLE_TIMEOUT:
                    log.info("stream %s to %s idle for %.0f s: aborted", stream.stream_id,
                             stream.peer, now - stream.last_used)
                    self._drop_stream(stream, abort=True)

    # -- helpers ----------------------------------------------------------------------------

    @property
    def _has_beacon(self) -> bool:
        return bool(self.options.beacon)

    def _trust(self) -> TrustStore:
        assert self.store is not None
        return self.store

    def _label(self, node_id: str) -> str:
        name = self._trust().name_of(node_id)
        if name is None and node_id in self.static:
            name = self.static[node_id].hostname
        return name or node_id

    def _hostname(self) -> str | None:
        return self.node.hostname or self.options.hostname

    def _static_by_name(self, name: str) -> StaticPeer | None:
        for peer in self.static.values():
            if peer.hostname == name:
                return peer
        return None

    async def _lookup(self, target: str) -> tuple[str, str | None, Any]:
        """``(node id, hostname, resolution)`` of a name or node id, with the pin checked."""
        target = target.strip()
        if is_node_id(target):
            node_id = target.lower()
            return node_id, self._trust().name_of(node_id) or (
                self.static[node_id].hostname if node_id in self.static else None), None
        store = self._trust()
        if self._has_beacon:
            info = await self.node.resolve(target)
            store.check_pin(target, info.node_id)
            return info.node_id, target, info
        pinned = store.pinned(target)
        if pinned is not None:
            return pinned.node_id, target, None
        static = self._static_by_name(target)
        if static is not None:
            return static.node_id, target, None
        raise UnknownHostError(
            f"unknown host {target!r}: no beacon is configured (start the daemon with "
            "--beacon HOST:PORT), and no trusted or static peer has that name"
        )

    async def _target(self, target: str) -> tuple[str, str | None, str]:
        """A peer we may talk to: ``(node id, hostname, what to pass to the Node)``. Refuses
        untrusted peers with the command that fixes it."""
        node_id, hostname, _ = await self._lookup(target)
        entry = self._trust().get(node_id)
        if entry is None or not entry.trusted:
            label = hostname or target
            if entry is not None and entry.state == "incoming":
                raise NotTrustedError(
                    f"{label} asked you to trust it but you have not approved it: run "
                    f"'pilotctl trust approve {label}'"
                )
            raise NotTrustedError(f"{label} is not trusted: run 'pilotctl trust add {label}'")
        by_name = self._has_beacon and not is_node_id(target)
        return node_id, hostname, (target.strip() if by_name else node_id)

    def _explain(self, exc: PilotError, node_id: str, label: str, port: int | None) -> PilotError:
        """The Node's error, reworded for someone at a command line."""
        if isinstance(exc, PortClosedError) and port is not None:
            return PortClosedError(
                f"{label} is not listening on port {port} (it must listen first, e.g. "
                f"'pilotctl listen {port}' on that machine)", exc.code, exc.reason,
            )
        if isinstance(exc, PeerUnreachableError):
            entry = self._trust().get(node_id)
            hint = ""
            if entry is not None and entry.state == "outgoing":
                me = self._hostname() or self.node.node_id
                hint = (f"; if it does not trust you yet, run 'pilotctl trust add {me}' "
                        "on that machine")
            return PeerUnreachableError(f"{label} did not answer: {exc}{hint}")
        return exc

    def _message_json(self, message: Any, inbox: Inbox,
                      reply: Callable[[bytes], Awaitable[None]]) -> dict[str, Any]:
        message_id = f"m{next(self._message_ids)}"
        self._messages[message_id] = Remembered(message, inbox, reply)
        while len(self._messages) > MESSAGE_MEMORY:
            self._messages.popitem(last=False)
        text, encoding = encode_data(message.data)
        return {
            "id": message_id, "from": message.sender, "hostname": self._label_or_none(
                message.sender), "port": message.port, "source_port": message.source_port,
            "data": text, "encoding": encoding,
        }

    def _label_or_none(self, node_id: str) -> str | None:
        label = self._label(node_id)
        return None if label == node_id else label

    async def _requeue(self, message_id: str) -> bool:
        remembered = self._messages.pop(message_id, None)
        if remembered is None:
            return False
        await remembered.inbox.push_front(remembered.message)
        return True

    # -- ports ------------------------------------------------------------------------------

    async def _listen(self, port: int, *, permanent: bool = False,
                      publish: bool = False) -> tuple[PortState, bool]:
        state = self._ports.get(port)
        if state is not None:
            state.refs += 1
            state.permanent = state.permanent or permanent
            state.publish = state.publish or publish
            return state, False
        listener = self.node.listen(port)
        state = PortState(port, listener, Inbox(f"port {port}"), permanent=permanent,
                          publish=publish)
        state.task = asyncio.create_task(self._pump_port(state))
        self._ports[port] = state
        log.info("listening on port %d%s", port, " (published)" if publish else "")
        return state, True

    def _unlisten(self, state: PortState) -> bool:
        state.refs -= 1
        if state.refs > 0 or state.permanent:
            return False
        self._close_port(state)
        return True

    def _close_port(self, state: PortState) -> None:
        if state.task is not None:
            state.task.cancel()
        state.listener.close_now()
        self._ports.pop(state.port, None)
        if len(state.inbox):
            log.info("port %d closed with %d unread messages", state.port, len(state.inbox))
        log.info("stopped listening on port %d", state.port)

    async def _pump_port(self, state: PortState) -> None:
        import zmq

        while True:
            message = await state.listener.receive(timeout=None)
            state.received += 1
            self._trust().confirm(message.sender)  # a tunnel came up: it trusts us
            if state.publish and self._pub is not None:
                meta = {"from": message.sender, "hostname": self._label_or_none(message.sender),
                        "port": message.port, "source_port": message.source_port}
                with contextlib.suppress(zmq.ZMQError):
                    await self._pub.send_multipart(
                        [b"%05d" % state.port, json.dumps(meta).encode(), message.data],
                        flags=zmq.NOBLOCK,
                    )
            else:
                await state.inbox.put(message)

    # -- streams ----------------------------------------------------------------------------

    def _stream(self, stream_id: str) -> StreamState:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ConnectionClosedError(f"no open stream {stream_id!r} (closed or expired)")
        stream.last_used = time.monotonic()
        return stream

    async def _pump_stream(self, stream: StreamState) -> None:
        while True:
            try:
                message = await stream.conn.receive(timeout=None)
            except PilotError as exc:
                await stream.inbox.fail(
                    self._explain(exc, stream.peer, stream.hostname or stream.peer, stream.port))
                return
            await stream.inbox.put(message)

    def _drop_stream(self, stream: StreamState, *, abort: bool) -> None:
        self._streams.pop(stream.stream_id, None)
        if stream.task is not None:
            stream.task.cancel()
        if abort:
            with contextlib.suppress(Exception):
                stream.conn.abort_now()

    @contextlib.contextmanager
    def _using(self, stream: StreamState) -> Any:
        stream.busy += 1
        try:
            yield
        finally:
            stream.busy -= 1
            stream.last_used = time.monotonic()

    # -- trust requests from the network ----------------------------------------------------

    def _on_trust_request(self, sender_key: bytes, payload: bytes) -> None:
        """Called by the Node when the beacon relays a trust request to us."""
        try:
            request = parse_trust_request_untrusted(payload, sender_key, self.node.node_id)
            self._accept_request(request, payload)
        except (TrustRequestError, ConfigError) as exc:
            log.warning("ignored a trust request: %s", exc)
        except Exception:
            log.exception("failed to handle a trust request")

    def _accept_request(self, request: Any, raw: bytes) -> TrustEntry:
        if request.nonce in self._seen_nonces:
            raise TrustRequestError("trust request replayed")
        self._seen_nonces[request.nonce] = None
        while len(self._seen_nonces) > 4096:
            self._seen_nonces.popitem(last=False)
        entry = self._trust().receive_request(request, raw)
        if entry.state == "incoming":
            log.info("trust request from %s (%s): %r; pending", request.hostname,
                     request.sender, request.reason)
        else:
            log.info("trust with %s (%s) is now %s", entry.label, entry.node_id, entry.state)
        return entry

    async def _send_trust_request(self, node_id: str, target: str, reason: str) -> tuple[
            bool, str]:
        """Ask the peer to trust us; ``(sent, note)``."""
        me = self._hostname() or self.node.node_id
        if not self._has_beacon:
            return False, (
                "no beacon, so no trust request was sent: on the peer run "
                f"'pilotctl trust add {self.node.node_id}' (or import the request from "
                f"'pilotctl trust export {node_id}')"
            )
        request = make_trust_request(self.node.identity, node_id, self._hostname(), reason)
        try:
            await self.node.send_trust_request(target, request)
        except PilotError as exc:
            log.info("trust request to %s not delivered: %s", target, exc)
            return False, (f"the trust request was not delivered ({exc}); it is mutual once "
                           f"the peer runs 'pilotctl trust add {me}'")
        return True, f"trust request sent; it is mutual once the peer trusts {me} too"

    # -- commands ------------------------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        node = self.node
        if callable(getattr(node, "info", None)):
            ni = node.info()
            base = {
                "node_id": ni.node_id, "virtual_address": ni.virtual_address,
                "hostname": ni.hostname or self.options.hostname, "nat_type": ni.nat_type,
                "endpoints": list(ni.endpoints), "beacon": ni.beacon,
            }
        else:
            host, port = node.local_endpoint
            base = {
                "node_id": node.node_id, "virtual_address": node.virtual_address,
                "hostname": self._hostname(), "nat_type": "unknown",
                "endpoints": [f"{host}:{port}"], "beacon": self.options.beacon,
            }
        return {
            **base, "home": str(self.home), "pid": os.getpid(), "version": VERSION,
            "protocol": ipc.PROTOCOL_VERSION, "uptime": round(time.time() - self._started, 1),
            "listening": [
                {"port": s.port, "publish": s.publish, "buffered": len(s.inbox),
                 "received": s.received} for s in sorted(self._ports.values(),
                                                          key=lambda s: s.port)
            ],
            "streams": len(self._streams), "pub_endpoint": ipc.pub_endpoint(self.home),
            "static_peers": len(self.static),
            "trusted": len(self._trust().trusted()), "pending": len(self._trust().pending()),
        }

    async def _cmd_info(self, req: InfoRequest) -> dict[str, Any]:
        return self._info()

    async def _cmd_peers(self, req: PeersRequest) -> dict[str, Any]:
        peers = []
        for p in self.node.peers():
            entry = self._trust().get(p.node_id)
            peers.append({
                "node_id": p.node_id, "hostname": p.hostname or self._label_or_none(p.node_id),
                "path": p.path, "rtt": p.rtt, "bytes_in": p.bytes_in, "bytes_out": p.bytes_out,
                "established": p.established, "trust": entry.state if entry else None,
            })
        return {"peers": peers}

    async def _cmd_resolve(self, req: ResolveRequest) -> dict[str, Any]:
        node_id, hostname, info = await self._lookup(req.name)
        entry = self._trust().get(node_id)
        if info is not None:
            candidates = [f"{h}:{p}" for h, p in info.candidates]
            nat_type, source = info.nat_type, "beacon"
        else:
            static = self.static.get(node_id)
            candidates = [static.address] if static else []
            nat_type = "unknown"
            source = "node id" if is_node_id(req.name) else (
                "trust store" if self._trust().pinned(req.name) else "static peers")
        return {"node_id": node_id, "hostname": hostname, "candidates": candidates,
                "nat_type": nat_type, "source": source,
                "trust": entry.state if entry else None}

    async def _cmd_add_peer(self, req: AddPeerRequest) -> dict[str, Any]:
        node_id = req.node_id.strip().lower()
        key_from_node_id(node_id)  # ConfigError if it is not a node id
        if req.hostname is not None and is_node_id(req.hostname):
            raise ConfigError(f"the name {req.hostname!r} looks like a node id")
        self.node.add_peer(node_id, req.address)
        self.static[node_id] = StaticPeer(node_id=node_id, address=req.address,
                                          hostname=req.hostname)
        save_static_peers(self.home, self.static)
        return {"node_id": node_id, "address": req.address, "hostname": req.hostname}

    async def _cmd_trust_add(self, req: TrustAddRequest) -> dict[str, Any]:
        store = self._trust()
        target = req.target.strip()
        try:
            node_id, hostname, _ = await self._lookup(target)
        except UnknownHostError:
            # No beacon knows the name, but a pending request may claim it: approve that one.
            claims = [e for e in store.pending() if e.hostname == target]
            if len(claims) != 1:
                raise
            return await self._approve(claims[0], target)
        if node_id == self.node.node_id:
            raise ConfigError("that is this node's own id")
        if hostname is None and self._has_beacon:
            with contextlib.suppress(PilotError):  # by node id: learn (and pin) its name
                info = await self.node.resolve(node_id)
                if info.node_id == node_id and info.hostname:
                    hostname = info.hostname
        pending = store.get(node_id)
        if pending is not None and pending.state == "incoming":
            return await self._approve(pending, target)
        entry = store.add_trusted(node_id, hostname, req.reason)
        self.node.trust(node_id)
        log.info("trusted %s (%s): %s", entry.label, node_id, entry.state)
        sent, note = await self._send_trust_request(
            node_id, target if self._has_beacon else node_id, req.reason)
        if entry.state == "mutual":
            note = f"trust with {entry.label} is mutual" + (
                "" if sent else "; it sees that once a tunnel between you comes up")
        return {"entry": entry.public(), "request_sent": sent, "note": note}

    async def _cmd_trust_approve(self, req: TrustApproveRequest) -> dict[str, Any]:
        store = self._trust()
        try:
            pending = store.find(req.target, states=["incoming"])
        except ConfigError:
            existing = None
            with contextlib.suppress(ConfigError):
                existing = store.find(req.target)
            if existing is not None:
                return {"entry": existing.public(), "request_sent": False,
                        "note": f"{existing.label} is already trusted ({existing.state})"}
            raise ConfigError(
                f"no pending trust request from {req.target} (see 'pilotctl trust pending')"
            ) from None
        return await self._approve(pending, req.target.strip())

    async def _approve(self, pending: TrustEntry, target: str) -> dict[str, Any]:
        """Trust the sender of a pending request and answer with our own request."""
        hostname = pending.hostname
        if hostname is not None and self._has_beacon:
            # The name in a request is only a claim: the beacon says whose name it is.
            try:
                info = await self.node.resolve(hostname)
            except UnknownHostError:
                info = None
            if info is None or info.node_id != pending.node_id:
                if not is_node_id(target):
                    owner = f"is key {info.node_id}" if info else "does not know it"
                    raise KeyMismatchError(
                        f"the request from key {pending.node_id} claims the name {hostname}, "
                        f"but the beacon {owner}; not approved. To trust that key anyway: "
                        f"'pilotctl trust approve {pending.node_id}'"
                    )
                hostname = None  # approved by key: don't pin a name that isn't its own
        entry = self._trust().add_trusted(pending.node_id, hostname, "")
        self.node.trust(pending.node_id)
        log.info("approved %s (%s): %s", entry.label, entry.node_id, entry.state)
        sent, note = await self._send_trust_request(
            entry.node_id, hostname if (self._has_beacon and hostname) else entry.node_id, "")
        if entry.state == "mutual":
            note = f"trust with {entry.label} is mutual" + (
                "" if sent else "; it sees that once a tunnel between you comes up")
        return {"entry": entry.public(), "request_sent": sent, "note": note}

    async def _cmd_trust_reject(self, req: TrustRejectRequest) -> dict[str, Any]:
        try:
            entry = self._trust().find(req.target, states=["incoming"])
        except ConfigError:
            raise ConfigError(
                f"no pending trust request from {req.target} (see 'pilotctl trust pending')"
            ) from None
        self._trust().remove(entry.node_id)
        log.info("rejected %s (%s)", entry.label, entry.node_id)
        return {"entry": entry.public()}

    async def _cmd_trust_remove(self, req: TrustRemoveRequest) -> dict[str, Any]:
        try:
            entry = self._trust().find(req.target)
        except ConfigError:
            raise ConfigError(f"{req.target} is not in the trust store "
                              "(see 'pilotctl trust list')") from None
        self._trust().remove(entry.node_id)
        if entry.trusted:
            self.node.untrust(entry.node_id)
            for stream in list(self._streams.values()):
                if stream.peer == entry.node_id:
                    self._drop_stream(stream, abort=True)
        log.info("removed %s (%s) from the trust store", entry.label, entry.node_id)
        return {"entry": entry.public()}

    async def _cmd_trust_list(self, req: TrustListRequest) -> dict[str, Any]:
        return {"entries": [e.public() for e in self._trust().entries()]}

    async def _cmd_trust_pending(self, req: TrustPendingRequest) -> dict[str, Any]:
        return {"pending": [e.public() for e in self._trust().pending()]}

    async def _cmd_trust_export(self, req: TrustExportRequest) -> dict[str, Any]:
        node_id, hostname, _ = await self._lookup(req.target)
        if not self._trust().is_trusted(node_id):
            label = hostname or req.target
            raise NotTrustedError(
                f"trust {label} before asking it to trust you: run 'pilotctl trust add {label}'")
        request = make_trust_request(self.node.identity, node_id, self._hostname(), req.reason)
        return {"request": base64.b64encode(request).decode("ascii"), "to": node_id}

    async def _cmd_trust_import(self, req: TrustImportRequest) -> dict[str, Any]:
        try:
            raw = base64.b64decode(req.request.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise TrustRequestError("that is not a trust request (not base64)") from None
        request = parse_trust_request_untrusted(raw, None, self.node.node_id)
        return {"entry": self._accept_request(request, raw).public()}

    async def _cmd_connect(self, req: ConnectRequest) -> dict[str, Any]:
        node_id, hostname, arg = await self._target(req.target)
        label = hostname or node_id
        conn = self.node.connect(arg, req.port, req.timeout)
        try:
            await conn.__aenter__()
        except PilotError as exc:
            raise self._explain(exc, node_id, label, req.port) from None
        self._trust().confirm(node_id)
        stream = StreamState("s" + secrets.token_hex(8), conn, node_id, hostname, req.port,
                             Inbox(f"the connection to {label} port {req.port}"))
        stream.task = asyncio.create_task(self._pump_stream(stream))
        self._streams[stream.stream_id] = stream
        return {"stream": stream.stream_id, "peer": node_id, "hostname": hostname,
                "port": req.port, "path": conn.path, "rtt": conn.rtt}

    async def _cmd_stream_send(self, req: StreamSendRequest) -> dict[str, Any]:
        stream = self._stream(req.stream)
        data = req.payload()
        with self._using(stream):
            try:
                await stream.conn.send(data)
            except PilotError as exc:
                raise self._explain(exc, stream.peer, stream.hostname or stream.peer,
                                    stream.port) from None
        return {"bytes": len(data)}

    async def _cmd_stream_receive(self, req: StreamReceiveRequest) -> dict[str, Any]:
        stream = self._stream(req.stream)
        with self._using(stream):
            message = await stream.inbox.get(req.timeout)
        return {"message": self._message_json(message, stream.inbox, stream.conn.send)}

    async def _cmd_stream_drain(self, req: StreamDrainRequest) -> dict[str, Any]:
        stream = self._stream(req.stream)
        with self._using(stream):
            try:
                await stream.conn.drain(req.timeout)
            except PilotError as exc:
                raise self._explain(exc, stream.peer, stream.hostname or stream.peer,
                                    stream.port) from None
        return {"path": stream.conn.path, "rtt": stream.conn.rtt}

    async def _cmd_stream_close(self, req: StreamCloseRequest) -> dict[str, Any]:
        stream = self._stream(req.stream)
        self._drop_stream(stream, abort=False)
        try:
            await stream.conn.close()
        except PilotError as exc:
            await stream.conn.abort()
            raise self._explain(exc, stream.peer, stream.hostname or stream.peer,
                                stream.port) from None
        return {}

    async def _cmd_stream_abort(self, req: StreamAbortRequest) -> dict[str, Any]:
        self._drop_stream(self._stream(req.stream), abort=True)
        return {}

    async def _cmd_send(self, req: SendRequest) -> dict[str, Any]:
        node_id, hostname, arg = await self._target(req.target)
        label = hostname or node_id
        data = req.payload()
        try:
            async with self.node.connect(arg, req.port, req.timeout) as conn:
                path, rtt = conn.path, conn.rtt
                await conn.send(data)
        except PilotError as exc:
            raise self._explain(exc, node_id, label, req.port) from None
        self._trust().confirm(node_id)
        return {"peer": node_id, "hostname": hostname, "port": req.port, "bytes": len(data),
                "path": path, "rtt": rtt}

    async def _cmd_listen(self, req: ListenRequest) -> dict[str, Any]:
        state, created = await self._listen(req.port, publish=req.publish)
        result: dict[str, Any] = {"port": req.port, "created": created, "publish": state.publish}
        if state.publish:
            result["pub_endpoint"] = ipc.pub_endpoint(self.home)
            result["topic"] = f"{req.port:05d}"
        return result

    async def _cmd_unlisten(self, req: UnlistenRequest) -> dict[str, Any]:
        state = self._ports.get(req.port)
        if state is None:
            raise ConfigError(f"port {req.port} is not being listened on")
        return {"port": req.port, "closed": self._unlisten(state)}

    async def _cmd_receive(self, req: ReceiveRequest) -> dict[str, Any]:
        state = self._ports.get(req.port)
        temporary = state is None
        if state is None:
            state, _ = await self._listen(req.port)
        elif state.publish:
            raise ConfigError(
                f"port {req.port} is published on {ipc.pub_endpoint(self.home)}: subscribe "
                "there (topic %05d)" % req.port
            )
        try:
            message = await state.inbox.get(req.timeout)
        finally:
            if temporary:
                self._unlisten(state)
        return {"message": self._message_json(message, state.inbox, message.reply)}

    async def _cmd_reply(self, req: ReplyRequest) -> dict[str, Any]:
        remembered = self._messages.get(req.message)
        if remembered is None:
            raise ConnectionClosedError(f"message {req.message!r} can no longer be replied to")
        data = req.payload()
        try:
            await remembered.reply(data)
        except PilotError as exc:
            sender = remembered.message.sender
            raise self._explain(exc, sender, self._label(sender), None) from None
        return {"bytes": len(data)}

    async def _cmd_requeue(self, req: RequeueRequest) -> dict[str, Any]:
        return {"requeued": await self._requeue(req.message)}

    async def _cmd_ping(self, req: PingRequest) -> dict[str, Any]:
        node_id, hostname, arg = await self._target(req.target)
        try:
            result = await self.node.ping(arg, req.timeout)
        except PilotError as exc:
            raise self._explain(exc, node_id, hostname or node_id, None) from None
        self._trust().confirm(node_id)
        return {"peer": node_id, "hostname": hostname, "rtt": result.rtt, "path": result.path}

    async def _cmd_stop(self, req: StopRequest) -> dict[str, Any]:
        return {"pid": os.getpid()}


# -- running it ----------------------------------------------------------------------------


def setup_logging(home: Path, *, to_stderr: bool) -> None:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / ipc.LOG_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handler: logging.Handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=LOG_MAX_BYTES, backupCount=2)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if os.environ.get("PILOT_DEBUG") else logging.INFO)
    root.addHandler(handler)
    if to_stderr:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        root.addHandler(console)


def run_foreground(options: DaemonOptions, ready_fd: int | None = None) -> int:
    """Run the daemon in this process until stopped. With ``ready_fd``, write one JSON line to it
    once ready (or failed) and close it. Returns the exit status."""
    failure: list[PilotError] = []

    def ready(result: dict[str, Any] | PilotError) -> None:
        if isinstance(result, PilotError):
            failure.append(result)
            log.error("failed to start: %s", result)
            line = ipc.error_reply(result)
        else:
            line = {"ok": True, "info": result}
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, (json.dumps(line) + "\n").encode())
                os.close(ready_fd)
        elif not isinstance(result, PilotError):
            print(f"pilot-agents daemon ready: {result['hostname'] or result['node_id']} "
                  f"(pid {result['pid']})", file=sys.stderr, flush=True)

    setup_logging(options.home, to_stderr=ready_fd is None)
    log.info("starting (pid %d): hostname %s, beacon %s, listen %s", os.getpid(),
             options.hostname, options.beacon, options.listen)
    with contextlib.suppress(KeyboardInterrupt):
        run(Daemon(options).run(ready))
    if failure:
        if ready_fd is None:
            raise failure[0]
        return 1
    return 0


def start_detached(options: DaemonOptions, timeout: float = START_TIMEOUT) -> dict[str, Any]:
    """Start a daemon in the background and return its info once it is ready; raise the
    PilotError that stopped it otherwise."""
    home = options.home
    ipc.endpoint(home)  # a home too long for a socket path fails here, before anything starts
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid = ipc.daemon_pid(home)
    if pid is not None:
        raise DaemonRunningError(
            f"a daemon is already running for {home} (pid {pid}); stop it with "
            "'pilotctl daemon stop'"
        )
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "pilot_agents.cli", "daemon", "start", "--foreground",
           "--home", str(home), "--listen", options.listen, "--ready-fd", str(write_fd),
           "--inbox", ",".join(map(str, options.inbox_ports)) or "none"]
    if options.hostname:
        cmd += ["--hostname", options.hostname]
    if options.beacon:
        cmd += ["--beacon", options.beacon]
    log_path = home / ipc.LOG_NAME
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, pass_fds=(write_fd,),
            start_new_session=True, cwd="/", close_fds=True,
        )
    finally:
        os.close(fd)
        os.close(write_fd)
    try:
        line = _read_line(read_fd, timeout)
    finally:
        os.close(read_fd)
    if line is None:
        if proc.poll() is None:
            proc.terminate()
            raise PilotTimeoutError(
                f"the daemon did not become ready within {timeout:g} s (stopped it); "
                f"see {log_path}"
            )
        raise PilotError(
            f"the daemon exited during start (status {proc.returncode}): "
            f"{_last_log_line(log_path)} (see {log_path})"
        )
    try:
        reply = json.loads(line)
    except ValueError:
        raise PilotError(f"the daemon said something unexpected: {line[:200]!r}") from None
    if not reply.get("ok"):
        proc.wait(timeout=10)
        raise ipc.error_from_reply(reply.get("error") or {})
    info: dict[str, Any] = reply["info"]
    return info


def _read_line(fd: int, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _last_log_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


def stop(home: Path, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop the daemon of ``home``; its pid, or None if none ran. Asks over IPC, then SIGTERM,
    then SIGKILL."""
    pid = ipc.daemon_pid(home)
    if pid is None:
        return None

    async def ask() -> None:
        async with ipc.IpcClient(home) as client:
            await client.request("stop", wait=min(5.0, timeout))

    try:
        asyncio.run(ask())
    except PilotError:
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while ipc.daemon_pid(home) is not None:
        if time.monotonic() > deadline:
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
            break
        time.sleep(0.05)
    while pid > 0 and time.monotonic() < deadline + 2.0 and process_alive(pid):
        time.sleep(0.02)  # let it finish exiting
    return pid


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


__all__ = [
    "Daemon", "DaemonOptions", "decode_data", "run_foreground", "start_detached", "stop",
]
