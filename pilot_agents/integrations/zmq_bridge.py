"""Bridges between the message-bus patterns and plain ZeroMQ sockets on this machine, so a
program that only speaks ZeroMQ takes part without importing pilot-agents.

Each bridge binds one local socket and runs one pattern over a
:class:`~pilot_agents.transport.Transport` (the daemon's :class:`~pilot_agents.sdk.Client` from
``pilot-agents bridge``):

- :class:`SubBridge` (``bridge sub NAME:PORT PREFIX... ENDPOINT``): an XPUB local SUB sockets
  connect to; it republishes what the remote publisher sends as ``[topic, payload]``.
- :class:`PubBridge` (``bridge pub PORT ENDPOINT``): a SUB, subscribed to everything, that local
  PUB sockets connect to; each ``[topic, payload]`` they send is published on pilot port PORT.
- :class:`ReqBridge` (``bridge req NAME:PORT ENDPOINT``): a ROUTER local REQ/DEALER clients
  connect to; each request goes to the remote replier, its reply back to the client that asked.
- :class:`RepBridge` (``bridge rep PORT ENDPOINT``): a DEALER local REP (or ROUTER) workers
  connect to; requests arriving on pilot port PORT go to them, their replies back.

A reply that cannot be had (the remote replier raised, timed out, is unreachable) still
answers the local REQ client, whose socket would otherwise wait for ever: with the two frames
``[ERROR_MARKER, JSON {"type", "message"[, "remote_type"]}]``, where a reply is one frame. A
local worker answers a remote request with an error the same way.

Bounds: every local socket has its send and receive high-water marks at ``BridgeConfig.hwm``
messages. Nothing is dropped silently at them: the XPUB has ``XPUB_NODROP`` and the ROUTER
``ROUTER_MANDATORY``, so a full queue makes the bridge wait (and stop reading its side of the
tunnel, which carries the back-pressure on to the peer), for at most ``send_timeout`` seconds;
a message still stuck then is dropped, counted in :class:`BridgeStats` and logged. The
req and rep bridges forward at most ``max_in_flight`` requests at once; more wait in the
queues behind them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import socket
import stat
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

import zmq
import zmq.asyncio

from ..errors import (
    ConfigError,
    ConnectionClosedError,
    MessageTooLargeError,
    PilotError,
    PilotTimeoutError,
    RemoteError,
)
from ..patterns import (
    Publication,
    Publisher,
    PubSubConfig,
    Replier,
    ReqRepConfig,
    Request,
    Requester,
    Subscriber,
)
from ..patterns.frames import HEADER_SIZE, MAX_MESSAGE, MAX_TOPIC, encode_publication
from ..patterns.reqrep import CANCEL_WAIT
from ..transport import Transport

log = logging.getLogger("pilot_agents.integrations.zmq_bridge")

ERROR_MARKER = b"pilot-agents.error"
"""First of the two frames of an error reply; the second is a JSON object."""

MAX_DATA = MAX_MESSAGE - HEADER_SIZE - len(encode_publication(bytes(MAX_TOPIC), b""))
"""The most bytes of a request, a reply or a publication's payload a local program may send:
with its header (and topic) it is one tunnel message. A larger one is refused here, since past
the bridge it fails out of sight: the daemon refuses it, or drops the bridge's connection."""

_SOCKET_NAMES = {zmq.XPUB: "XPUB", zmq.SUB: "SUB", zmq.ROUTER: "ROUTER", zmq.DEALER: "DEALER"}


MAX_COUNT = 1_000_000
"""The most ``hwm`` and ``max_in_flight`` may be: ZeroMQ takes a high-water mark as a C int,
and a million messages or requests is far past what a bridge needs to keep up."""


@dataclass(frozen=True)
class BridgeConfig:
    hwm: int = 1000  # messages: send and receive high-water mark of the local socket
    send_timeout: float = 5.0  # seconds a message waits for room in a full local queue
    max_in_flight: int = 256  # requests the req and rep bridges forward at once
    request_timeout: float = 30.0  # seconds for a reply: the remote's (req), a worker's (rep)
    # rep: bytes of the requests held (parked, or with the workers) past which the bridge
    # takes no more until some are answered; those wait in the tunnel meanwhile.
    max_held_bytes: int = 256 * 2**20
    gap_topic: str | None = None  # sub: topic of the notice sent locally after a gap
    # Seconds closing may take: the peer is told, the requests in flight are answered.
    close_timeout: float = 5.0
    linger: float = 1.0  # seconds the socket has at stop to send what is queued, then it drops
    pubsub: PubSubConfig = field(default_factory=PubSubConfig)
    reqrep: ReqRepConfig = field(default_factory=ReqRepConfig)

    def __post_init__(self) -> None:
        if not (1 <= self.hwm <= MAX_COUNT and 1 <= self.max_in_flight <= MAX_COUNT):
            raise ConfigError(f"BridgeConfig: hwm and max_in_flight must be 1..{MAX_COUNT}")
        if self.max_held_bytes < 1:
            raise ConfigError("BridgeConfig.max_held_bytes must be at least 1")
        if min(self.send_timeout, self.request_timeout, self.close_timeout) <= 0:
            raise ConfigError("BridgeConfig: the timeouts must be positive")
        if self.linger < 0:
            raise ConfigError("BridgeConfig.linger must not be negative")


@dataclass
class BridgeStats:
    forwarded: int = 0  # publications that crossed the bridge; requests answered with a reply
    dropped: int = 0  # given up on: the local queue stayed full, or the local client left
    malformed: int = 0  # local publications of the wrong shape or too large, logged, dropped
    errors: int = 0  # requests answered with an error reply (to local clients, or remote ones)
    missed: int = 0  # sub: publications the remote publisher dropped for us (drop-oldest)
    resumed: int = 0  # sub: subscriptions renewed after the tunnel or the publisher went away
    unmatched: int = 0  # sub: publications no local subscriber wanted
    late: int = 0  # rep: worker replies after their request timed out or was given up on
    cancelled: int = 0  # rep: requests their remote requesters gave up on before the answer


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if the bridge may bind it: a local one only, since the bridge's socket is
    neither encrypted nor authenticated and speaks for this node to its trusted peers."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc" and rest:
        return endpoint
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and host in ("127.0.0.1", "[::1]") and (
            port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
        return endpoint
    raise ConfigError(f"cannot bind {endpoint!r}: a bridge binds ipc://PATH or "
                      "tcp://127.0.0.1:PORT only (its socket is not encrypted)")


def _check_ipc_path(endpoint: str) -> None:
    """ZeroMQ deletes whatever is at an ipc:// path before it binds there: a file, or the socket
    of a program listening on it (another bridge, the daemon), whose clients would then reach
    the bridge instead without a word. Only a socket nobody listens on (left by a program that
    died) may be replaced."""
    path = endpoint.removeprefix("ipc://")
    if path.startswith("@"):  # abstract: nothing on disk, and a bind there fails if it is taken
        return
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # nothing there, or nothing we may look at: the bind says which
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"cannot bind {endpoint}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return
        except OSError as exc:
            raise ConfigError(f"cannot bind {endpoint}: {exc.strerror or exc}") from None
    raise ConfigError(f"cannot bind {endpoint}: address in use (a program listens there)")


def _socket_file(endpoint: str) -> tuple[str, int, int] | None:
    """The file a bind at ``endpoint`` made, and its device and inode, if it made one."""
    path = endpoint.removeprefix("ipc://")
    if path == endpoint or path.startswith("@"):  # tcp://, or an abstract socket
        return None
    try:
        status = os.lstat(path)
    except OSError:
        return None
    return path, status.st_dev, status.st_ino


def _remove_socket_file(bound: tuple[str, int, int]) -> None:
    """Remove the file of a socket this bridge bound, and closed: ZeroMQ leaves it behind. Not
    if it is another's by now (a bridge that took the path once ours had closed)."""
    path, device, inode = bound
    with contextlib.suppress(OSError):  # gone already, or not ours to remove
        status = os.lstat(path)
        if (status.st_dev, status.st_ino) == (device, inode):
            os.unlink(path)


def error_frames(exc: PilotError) -> list[bytes]:
    """The error reply a local client gets instead of the reply ``exc`` stood in for."""
    body: dict[str, str] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, RemoteError):
        body["remote_type"] = exc.remote_type
    return [ERROR_MARKER, json.dumps(body).encode("utf-8")]


class Bridge(abc.ABC):
    """One local socket bound at ``endpoint`` and the pattern behind it. ``async with`` binds
    and opens; :meth:`run` forwards until cancelled (or the transport fails)."""

    kind: ClassVar[str]
    socket_type: ClassVar[zmq.SocketType]
    options: ClassVar[tuple[tuple[int, int | bytes], ...]] = ()  # set before the bind

    def __init__(self, transport: Transport, endpoint: str,
                 config: BridgeConfig | None = None) -> None:
        self._transport = transport
        self.endpoint = check_endpoint(endpoint)
        self.config = config or BridgeConfig()
        self.stats = BridgeStats()
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._socket_file: tuple[str, int, int] | None = None  # see _socket_file

    async def __aenter__(self) -> Bridge:
        self._context = zmq.asyncio.Context()
        self._socket = sock = self._context.socket(self.socket_type)
        try:
            sock.setsockopt(zmq.SNDHWM, self.config.hwm)
            sock.setsockopt(zmq.RCVHWM, self.config.hwm)
            if self.endpoint.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            for option, value in self.options:
                sock.setsockopt(option, value)
            if self.endpoint.startswith("ipc://"):
                _check_ipc_path(self.endpoint)
            try:
                sock.bind(self.endpoint)
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot bind {self.endpoint}: {exc.strerror}") from None
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._socket_file = _socket_file(self.endpoint)
            await self._open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pattern, then the socket, which has ``linger`` seconds to send what is
        queued (then the rest is discarded), and remove its ipc:// file."""
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await self._close()
        except TimeoutError:
            log.warning("closing the %s bridge took over %g s; it stops without waiting more",
                        self.kind, self.config.close_timeout)
        except PilotError as exc:
            log.info("closing the %s bridge: %s", self.kind, exc)
        sock, self._socket = self._socket, None
        context, self._context = self._context, None
        if sock is not None:
            sock.close(linger=int(self.config.linger * 1000))
        if context is not None:
            context.term()
        bound, self._socket_file = self._socket_file, None
        if bound is not None:
            _remove_socket_file(bound)

    def status(self) -> dict[str, Any]:
        """What runs where, for the status line."""
        return {"bridge": self.kind, "endpoint": self.endpoint,
                "socket": _SOCKET_NAMES[self.socket_type], "hwm": self.config.hwm,
                **self._remote()}

    @abc.abstractmethod
    async def run(self) -> None:
        """Forward until cancelled."""

    # -- for the bridges ------------------------------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> None:
        """Open the pattern (the socket is bound)."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Close the pattern, if it was opened."""

    @abc.abstractmethod
    def _remote(self) -> dict[str, Any]:
        """The pilot side, for :meth:`status`."""

    @property
    def sock(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            raise ConfigError("the bridge is not open (use 'async with')")
        return self._socket

    async def _send_local(self, frames: list[bytes], timeout: float) -> bool:
        """Send ``frames`` on the local socket, waiting up to ``timeout`` seconds while it has no
        room (its queue is full, or no peer is connected); False if it never had.
        Non-blocking sends and a backoff, since an XPUB at its HWM still polls writable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.001
        while True:
            try:
                await self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
                return True
            except zmq.Again:
                if loop.time() >= deadline:
                    return False
                await asyncio.sleep(min(pause, max(deadline - loop.time(), 0.0)))
                pause = min(pause * 2, 0.05)

    async def _deliver(self, frames: list[bytes]) -> bool:
        """:meth:`_send_local` within ``send_timeout``; a message it gives up on, or whose
        client has left (a ROUTER's EHOSTUNREACH), is counted and logged."""
        try:
            if await self._send_local(frames, self.config.send_timeout):
                return True
            why = f"no room at {self.endpoint} for {self.config.send_timeout:g} s"
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            why = f"its client at {self.endpoint} left"
        self.stats.dropped += 1
        log.warning("a message was dropped: %s (%d so far)", why, self.stats.dropped)
        return False


async def run_together(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines until one ends; cancel the others and raise what it raised (a bare
    exception, not a TaskGroup's ExceptionGroup, so the CLI reports it in one line)."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        await cancel_all(tasks)


async def cancel_all(tasks: Collection[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended, cancelling again any that goes on:
    Python 3.11's ``wait_for`` (under every IPC request) swallows a cancel that lands as its
    inner future completes, and the task would carry on for ever."""
    pending = [task for task in tasks if not task.done()]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
        pending = [task for task in pending if not task.done()]


class _Spawner:
    """At most ``limit`` tasks at once: :meth:`spawn` waits for a slot."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    async def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work()`` as a task once there is a slot. The coroutine is made only then: one
        made before, and never run because the wait was cancelled (the bridge stopping),
        would be reported as never awaited."""
        await self._slots.acquire()
        task = asyncio.create_task(work())
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        _log_failure(task)

    async def cancel(self) -> None:
        await cancel_all(list(self._tasks))


def _log_failure(task: asyncio.Task[None]) -> None:
    """A task nobody awaits: its failure is logged, not left for asyncio to report at exit."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("a bridge task failed: %r", exc)


# -- pub/sub ------------------------------------------------------------------------------------


class SubBridge(Bridge):
    """The remote publisher's topics, republished on a local XPUB as ``[topic, payload]``.

    The bridge reads from the tunnel only while a local subscriber wants something, so what is
    published before the first one connects, or after the last one left, waits at the
    publisher (its overflow policy applies) instead of vanishing; the bridge holds the one
    publication it had read as the last left. Publications no local subscription matches are
    counted in ``unmatched``. A gap (the publisher dropped publications for us, or the
    subscription was renewed after the tunnel dropped) is logged as a warning, counted, and,
    with ``gap_topic``, announced locally before the publication after it as ``[gap_topic,
    JSON {"missed": N, "resumed": bool, "topic": the next publication's topic}]``."""

    kind = "sub"
    socket_type = zmq.XPUB
    options = ((zmq.XPUB_NODROP, 1),)

    def __init__(self, transport: Transport, peer: str, port: int, prefixes: list[str],
                 endpoint: str, config: BridgeConfig | None = None) -> None:
        super().__init__(transport, endpoint, config)
        self.peer = peer
        self.port = port
        self.prefixes = prefixes
        self._subscriber: Subscriber | None = None
        self._local: set[bytes] = set()  # the prefixes local SUB sockets subscribed to
        self._wanted = asyncio.Event()

    async def _open(self) -> None:
        subscriber = Subscriber(self._transport, self.peer, self.port, self.prefixes,
                                self.config.pubsub)
        await subscriber.__aenter__()
        self._subscriber = subscriber

    async def _close(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.close()

    def _remote(self) -> dict[str, Any]:
        return {"remote": self.peer, "port": self.port, "prefixes": self.prefixes}

    async def run(self) -> None:
        await run_together(self._track_local_subscriptions(), self._forward())

    async def _track_local_subscriptions(self) -> None:
        while True:
            event = (await self.sock.recv_multipart())[0]
            if event[:1] == b"\x01":
                self._local.add(event[1:])
            elif event[:1] == b"\x00":
                self._local.discard(event[1:])
            if self._local:
                self._wanted.set()
            else:
                self._wanted.clear()

    async def _forward(self) -> None:
        assert self._subscriber is not None
        while True:
            await self._wanted.wait()
            publication = await self._subscriber.receive(timeout=None)
            # The last local SUB may have left while the bridge waited for it: it waits for the
            # next, as those behind it in the tunnel do (it alone is held: nothing is read
            # meanwhile).
            await self._wanted.wait()
            if publication.missed or publication.resumed:
                await self._gap(publication)
            topic = publication.topic.encode("utf-8")
            if not any(topic.startswith(prefix) for prefix in self._local):
                self.stats.unmatched += 1
                continue
            if await self._deliver([topic, publication.data]):
                self.stats.forwarded += 1

    async def _gap(self, publication: Publication) -> None:
        self.stats.missed += publication.missed
        self.stats.resumed += publication.resumed
        if publication.missed:
            log.warning("the publisher on %s port %d dropped %d publication(s) for us before "
                        "%r", self.peer, self.port, publication.missed, publication.topic)
        if publication.resumed:
            log.warning("subscribed again to %s port %d: what it published meanwhile was "
                        "missed", self.peer, self.port)
        if self.config.gap_topic is not None:
            notice = {"missed": publication.missed, "resumed": publication.resumed,
                      "topic": publication.topic}
            await self._deliver([self.config.gap_topic.encode("utf-8"),
                                 json.dumps(notice).encode("utf-8")])


class PubBridge(Bridge):
    """What local PUB sockets send as ``[topic, payload]``, published on pilot port ``port``.

    A publish waits while a remote subscriber's queue is full (the publisher's overflow policy,
    ``block`` by default); meanwhile the bridge reads nothing, its SUB queue fills to its HWM,
    then the local PUB's own. A PUB drops at its HWM without a word, inside the local program:
    a program that must not lose publications uses an XPUB with ``XPUB_NODROP`` instead."""

    kind = "pub"
    socket_type = zmq.SUB
    options = ((zmq.SUBSCRIBE, b""),)

    def __init__(self, transport: Transport, port: int, endpoint: str,
                 config: BridgeConfig | None = None) -> None:
        super().__init__(transport, endpoint, config)
        self.port = port
        self._publisher: Publisher | None = None

    async def _open(self) -> None:
        publisher = Publisher(self._transport, self.port, self.config.pubsub)
        await publisher.__aenter__()
        self._publisher = publisher

    async def _close(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()

    def _remote(self) -> dict[str, Any]:
        return {"remote": None, "port": self.port,
                "overflow": self.config.pubsub.overflow.value}

    async def run(self) -> None:
        assert self._publisher is not None
        while True:
            frames = await self.sock.recv_multipart()
            try:
                if len(frames) != 2:
                    raise ConfigError(f"{len(frames)} frames, not [topic, payload]")
                if len(frames[1]) > MAX_DATA:
                    raise _too_large("the payload", frames[1])
                await self._publisher.publish(frames[0].decode("utf-8"), frames[1])
            except (ConfigError, MessageTooLargeError, UnicodeDecodeError) as exc:
                self.stats.malformed += 1
                log.warning("a local publication at %s was not forwarded: %s", self.endpoint,
                            exc)
                continue
            self.stats.forwarded += 1


# -- req/rep ------------------------------------------------------------------------------------


class ReqBridge(Bridge):
    """Requests from local REQ (or DEALER) clients, sent to the replier on ``port`` of
    ``peer``; each reply goes back to the client that asked, as one frame, or an error reply
    (:func:`error_frames`). The request is the last frame a client sends; the frames before it
    (a DEALER's own envelope) come back unchanged before the reply."""

    kind = "req"
    socket_type = zmq.ROUTER
    options = ((zmq.ROUTER_MANDATORY, 1),)

    def __init__(self, transport: Transport, peer: str, port: int, endpoint: str,
                 config: BridgeConfig | None = None) -> None:
        super().__init__(transport, endpoint, config)
        self.peer = peer
        self.port = port
        self._requester: Requester | None = None
        self._in_flight = _Spawner(self.config.max_in_flight)
        self._unanswered: dict[int, list[bytes]] = {}  # the envelopes of requests in flight
        self._keys = itertools.count()

    async def _open(self) -> None:
        # Fail now, not at the first request, if the peer is unknown, untrusted or unreachable.
        conn = self._transport.connect(self.peer, self.port)
        await conn.__aenter__()
        await conn.abort()
        self._requester = Requester(self._transport, self.config.reqrep)

    async def _close(self) -> None:
        await self._in_flight.cancel()
        # Their clients would wait for ever for these replies (REQ has no timeout of its own):
        # the requests in flight, then those still queued on the socket behind max_in_flight.
        stopped = error_frames(ConnectionClosedError("the bridge stopped before the reply came"))
        unanswered, self._unanswered = list(self._unanswered.values()), {}
        for envelope in unanswered:
            await self._answer_at_stop(envelope, stopped)
        if self._requester is not None:
            await self._requester.close()
        if self._socket is not None:
            await self._answer_queued(stopped)

    async def _answer_queued(self, stopped: list[bytes]) -> None:
        """Answer every request queued on the socket with ``stopped``, reading without waiting:
        the queues hold at most ``hwm`` messages a client, and a client that sends on and on
        (a DEALER) is cut short by ``close_timeout``."""
        while True:
            try:
                frames = await self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) >= 2:
                await self._answer_at_stop(frames[:-1], stopped)
            await asyncio.sleep(0)  # where the close_timeout can end it

    async def _answer_at_stop(self, envelope: list[bytes], stopped: list[bytes]) -> None:
        """Answer a client with ``stopped`` if there is room at once: the socket is closing."""
        with contextlib.suppress(zmq.ZMQError):  # this client has gone
            if await self._send_local([*envelope, *stopped], 0.0):
                self.stats.errors += 1
                return
        self.stats.dropped += 1
        log.warning("a client at %s was not told that the bridge stopped: it has gone, or has "
                    "no room (%d so far)", self.endpoint, self.stats.dropped)

    def _remote(self) -> dict[str, Any]:
        return {"remote": self.peer, "port": self.port}

    async def run(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) < 2:
                self.stats.malformed += 1  # a ROUTER always prefixes the client's identity
                continue
            key = next(self._keys)
            self._unanswered[key] = frames[:-1]
            await self._in_flight.spawn(functools.partial(self._answer, key, frames[-1]))

    async def _answer(self, key: int, payload: bytes) -> None:
        assert self._requester is not None
        try:
            if len(payload) > MAX_DATA:
                raise _too_large("the request", payload)
            reply = await self._requester.request(self.peer, self.port, payload,
                                                  timeout=self.config.request_timeout)
        except PilotError as exc:
            log.info("request to %s port %d failed: %s", self.peer, self.port, exc)
            if await self._deliver([*self._unanswered.pop(key), *error_frames(exc)]):
                self.stats.errors += 1
        else:
            if await self._deliver([*self._unanswered.pop(key), reply.data]):
                self.stats.forwarded += 1


class RepBridge(Bridge):
    """Requests arriving on pilot port ``port``, served by local REP (or ROUTER) workers
    connected to a DEALER, which deals them out in turn. Each goes out as ``[id, b"",
    request]`` (the id is the bridge's, and a REP sends it back with its reply). A worker
    answers with one frame, or with an error reply (:func:`error_frames`' shape), which the
    remote requester raises as :class:`~pilot_agents.errors.RemoteError`. A request no worker
    answers within ``request_timeout`` (none connected, all busy, one died) is answered with a
    :class:`~pilot_agents.errors.PilotTimeoutError` error; a late answer is counted and
    dropped.

    At most ``max_in_flight`` requests are with the workers at once; up to ``hwm`` more are
    parked (and none is taken while those held come to ``max_held_bytes``), so that the bridge
    goes on receiving, and so reads what the remote requesters give up on (their CANCEL, or the
    end of their stream): a parked request given up on never reaches a worker, and one given up
    on while a worker has it is no longer waited for (the worker's answer is then late)."""

    kind = "rep"
    socket_type = zmq.DEALER

    def __init__(self, transport: Transport, port: int, endpoint: str,
                 config: BridgeConfig | None = None) -> None:
        super().__init__(transport, endpoint, config)
        self.port = port
        self._replier: Replier | None = None
        self._parked: dict[int, Request] = {}  # received, in order, waiting for a slot
        self._keys = itertools.count()
        self._serving: dict[asyncio.Task[None], Request] = {}  # with the workers
        self._held = 0  # bytes of the requests parked and served
        self._room = asyncio.Event()  # set while fewer than hwm are parked, and bytes allow
        self._room.set()
        self._stopping = False
        self._waiting: dict[bytes, asyncio.Future[list[bytes]]] = {}
        self._ids = itertools.count(1)

    async def _open(self) -> None:
        replier = Replier(self._transport, self.port)
        await replier.__aenter__()
        self._replier = replier

    async def _close(self) -> None:
        self._stopping = True  # no parked request starts as those served are cancelled
        held = [*self._serving.values(), *self._parked.values()]
        await cancel_all(list(self._serving))
        self._parked.clear()
        # Answered here rather than by the replier's close, to be counted as error replies.
        stopped = ConnectionClosedError(f"the bridge on port {self.port} stopped before a "
                                        "local worker answered")
        failing = [asyncio.ensure_future(self._fail_at_stop(request, stopped))
                   for request in held if not (request.answered or request.cancelled)]
        try:
            if failing:  # bounded as the replier's close bounds its own
                await asyncio.wait(failing, timeout=CANCEL_WAIT)
        finally:
            for task in failing:
                task.cancel()
            if self._replier is not None:
                await self._replier.close()  # answers any other it handed out

    def _remote(self) -> dict[str, Any]:
        return {"remote": None, "port": self.port}

    async def run(self) -> None:
        await run_together(self._accept(), self._read_replies())

    async def _accept(self) -> None:
        assert self._replier is not None
        while True:
            await self._room.wait()
            request = await self._replier.receive(timeout=None)
            key = next(self._keys)
            self._parked[key] = request
            self._held += len(request.data)
            request.on_cancel(functools.partial(self._unpark, key))
            self._start_parked()

    def _unpark(self, key: int) -> None:
        """Drop a parked request its requester gave up on: no worker need see it."""
        request = self._parked.pop(key, None)
        if request is not None:
            log.info("%s gave up on a request to port %d before a local worker had it",
                     request.sender, self.port)
            self.stats.cancelled += 1
            self._held -= len(request.data)
            self._start_parked()

    def _start_parked(self) -> None:
        """Hand the parked requests, oldest first, to the workers while there are slots."""
        while (self._parked and not self._stopping
               and len(self._serving) < self.config.max_in_flight):
            request = self._parked.pop(next(iter(self._parked)))
            task = asyncio.create_task(self._serve(request))
            self._serving[task] = request
            request.on_cancel(task.cancel)
            task.add_done_callback(self._served)
        # Checked before a request is received, whose size is not known yet: the bridge holds
        # at most one request (at most MAX_DATA) past max_held_bytes.
        if len(self._parked) < self.config.hwm and self._held < self.config.max_held_bytes:
            self._room.set()
        else:
            self._room.clear()

    def _served(self, task: asyncio.Task[None]) -> None:
        request = self._serving.pop(task)
        request.on_cancel(None)
        self._held -= len(request.data)
        if request.cancelled:  # (if so, no answer went: see Request._answer)
            self.stats.cancelled += 1
        _log_failure(task)
        self._start_parked()

    async def _read_replies(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) < 3 or frames[1] != b"":
                self.stats.malformed += 1
                log.warning("a local worker at %s sent a reply without its envelope",
                            self.endpoint)
                continue
            future = self._waiting.get(frames[0])
            if future is None or future.done():
                self.stats.late += 1
                continue
            future.set_result(frames[2:])

    async def _serve(self, request: Request) -> None:
        request_id = next(self._ids).to_bytes(8, "big")
        future: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        timeout = self.config.request_timeout
        try:
            try:
                async with asyncio.timeout(timeout):
                    if not await self._send_local([request_id, b"", request.data], timeout):
                        raise TimeoutError
                    frames = await future
            except TimeoutError:
                log.warning("no local worker at %s answered a request from %s within %g s",
                            self.endpoint, request.sender, timeout)
                await self._fail(request, PilotTimeoutError(
                    f"no local worker at {self.endpoint} answered within {timeout:g} s"))
                return
            if len(frames) != 1:
                await self._fail(request, _worker_error(frames))
            elif len(frames[0]) > MAX_DATA:
                await self._fail(request, _too_large("the local worker's reply", frames[0]))
            else:
                # Counted before the send, which the stop may cut short; not if nobody waits
                # for it (then nothing is sent).
                if not request.cancelled:
                    self.stats.forwarded += 1
                await request.reply(frames[0])
        except PilotError as exc:
            log.info("could not answer %s on port %d: %s", request.sender, self.port, exc)
        except asyncio.CancelledError:
            # Its requester gave up (request.on_cancel cancelled this task): the worker's
            # answer, if it comes, is late. Any other cancel is the bridge stopping.
            me = asyncio.current_task()
            assert me is not None
            if not request.cancelled or me.uncancel() > 0:
                raise
            log.info("%s gave up on a request to port %d while a local worker had it",
                     request.sender, self.port)
        finally:
            self._waiting.pop(request_id, None)

    async def _fail(self, request: Request, error: PilotError) -> None:
        if not request.cancelled:  # as forwarded
            self.stats.errors += 1
        await request.fail(error)

    async def _fail_at_stop(self, request: Request, error: PilotError) -> None:
        with contextlib.suppress(PilotError):  # its requester has gone
            await self._fail(request, error)


def _too_large(what: str, data: bytes) -> MessageTooLargeError:
    return MessageTooLargeError(f"{what} is {len(data)} bytes: a bridge forwards at most "
                                f"{MAX_DATA}, what one tunnel message carries")


def _worker_error(frames: list[bytes]) -> RemoteError:
    """The error a worker's multi-frame answer stands for (its own, or a malformed answer)."""
    if len(frames) == 2 and frames[0] == ERROR_MARKER:
        try:
            body = json.loads(frames[1])
            return RemoteError(f"{body['type']}: {body['message']}", str(body["type"]))
        except (ValueError, TypeError, KeyError):
            pass
    return RemoteError(f"the local worker sent {len(frames)} frames, not a reply of one frame "
                       f"or an error reply [{ERROR_MARKER.decode()}, JSON]")


__all__ = ["ERROR_MARKER", "MAX_COUNT", "MAX_DATA", "Bridge", "BridgeConfig", "BridgeStats",
           "PubBridge", "RepBridge", "ReqBridge", "SubBridge", "cancel_all", "check_endpoint",
           "error_frames", "run_together"]
