"""The tunnel side of MCP: the control messages, the client (RemoteSession, tunnel, connect)
and the serving side (McpServer). See the package's docstring and docs/mcp.md."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import (
    ConfigError,
    McpSessionError,
    NoMcpServerError,
    PilotError,
    PilotTimeoutError,
    PortClosedError,
    PortInUseError,
    WireError,
)
from ...patterns.frames import MAX_MESSAGE
from ...patterns.shares import PerPeer, check_share, peer_share
from ...sdk import Client
from ...transport import (
    CONNECT_TIMEOUT,
    UNREAD_REPLIES_TIMEOUT,
    Connection,
    Message,
    Transport,
    receive_unless_silent,
)

if TYPE_CHECKING:
    from mcp import ClientSession
    from mcp.client._transport import TransportStreams

log = logging.getLogger("pilot_agents.integrations.mcp")

DEFAULT_MCP_PORT = 80  # the port `serve` listens on and `connect` connects to unless told
MAX_REASON_BYTES = 2048  # of an END message's reason


@dataclass(frozen=True)
class McpConfig:
    """The bounds of MCP sessions through tunnels; both sides read the ones that concern them."""

    max_message_bytes: int = 16 * 2**20  # one JSON-RPC message (a line of the server's stdout)
    heartbeat_interval: float = 10.0  # seconds with nothing sent before a side sends a heartbeat
    peer_timeout: float = 45.0  # seconds of hearing nothing from the other side: session over
    connect_timeout: float = CONNECT_TIMEOUT  # seconds to open the tunnel and the stream
    open_timeout: float = 30.0  # seconds for the server side to start the process and say so
    # seconds `mcp connect` waits, once its stdin ended, for answers to requests still waiting
    drain_timeout: float = 30.0
    # serving side:
    # server processes at once (of open sessions, and of ended ones still stopping); more
    # sessions are refused
    max_sessions: int = 8
    # ... and of one peer node (the clients on a daemon share its node's), so that one trusted
    # peer cannot hold every session and lock the others out. None: half of max_sessions (4 of
    # 8): a node running several MCP clients of this server may still open as many, and
    # whatever one peer holds, the other half stays for the rest.
    max_sessions_per_peer: int | None = None
    idle_timeout: float | None = None  # seconds without JSON-RPC either way: session over
    write_timeout: float = 10.0  # seconds a server process may leave a message unread
    stop_grace: float = 2.0  # seconds after closing stdin, then after SIGTERM, before SIGKILL
    stderr_tail_bytes: int = 1024  # the end of a server's stderr told to its client if it dies

    def __post_init__(self) -> None:
        for name, least in (("max_message_bytes", 1024), ("max_sessions", 1),
                            ("stderr_tail_bytes", 0)):
            if getattr(self, name) < least:
                raise ConfigError(f"McpConfig.{name} must be at least {least}, not "
                                  f"{getattr(self, name)}")
        check_share(self, "max_sessions", "max_sessions_per_peer")
        if self.max_message_bytes > MAX_MESSAGE:
            # A larger message resets its stream in the tunnel, which the serving side could
            # only tell its client as "the client went away".
            raise ConfigError(f"McpConfig.max_message_bytes: at most {MAX_MESSAGE}, the "
                              "largest message a tunnel carries")
        for name in ("heartbeat_interval", "peer_timeout", "connect_timeout", "open_timeout",
                     "drain_timeout", "write_timeout", "stop_grace"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"McpConfig.{name} must be positive")
        if self.peer_timeout <= self.heartbeat_interval:
            raise ConfigError("McpConfig.peer_timeout must be longer than heartbeat_interval")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ConfigError("McpConfig.idle_timeout must be positive (or None: never)")

    @property
    def sessions_per_peer(self) -> int:
        """The server processes of one peer's sessions at once: ``max_sessions_per_peer``, or
        half of ``max_sessions``."""
        return peer_share(self.max_sessions_per_peer, self.max_sessions, 2)


# -- the control messages ----------------------------------------------------------------------


# The first byte of a control message: no JSON text starts with it.
CONTROL_MARK = b"\x00"


class Control(enum.IntEnum):
    OPEN = 1
    READY = 2
    END = 3
    HEARTBEAT = 4


def control(kind: Control, text: str = "") -> bytes:
    raw = text.encode("utf-8")[:MAX_REASON_BYTES]
    return CONTROL_MARK + bytes((kind,)) + raw


def parse_control_untrusted(data: bytes) -> tuple[Control, str] | None:
    """``(kind, text)`` of a control message; None for a JSON-RPC message."""
    if data[:1] != CONTROL_MARK:
        return None
    if len(data) < 2:
        raise WireError("an MCP control message without its kind")
    try:
        kind = Control(data[1])
    except ValueError:
        raise WireError(f"unknown MCP control message kind {data[1]}") from None
    return kind, data[2:2 + MAX_REASON_BYTES].decode("utf-8", "replace")


def _json_object(message: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(message)
    except (ValueError, RecursionError):  # ('[[[[...' from a peer: not one of ours)
        return None
    return parsed if isinstance(parsed, dict) else None


def _response_id(message: bytes) -> Any:
    parsed = _json_object(message)
    return None if parsed is None or "method" in parsed else parsed.get("id")


# -- the client side ---------------------------------------------------------------------------


class RemoteSession:
    """One MCP session with a server behind ``serve``, as raw JSON-RPC messages (bytes).
    ``async with`` opens it (:class:`McpSessionError` if the server side refuses) and leaves it
    (the server process is stopped)."""

    def __init__(self, transport: Transport, peer: str, port: int = DEFAULT_MCP_PORT,
                 config: McpConfig | None = None) -> None:
        self.transport = transport
        self.peer = peer
        self.port = port
        self.config = config or McpConfig()
        self.ended: str | None = None  # why the session ended, once it did
        self._conn: Connection | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_sent = 0.0
        self._pending: set[str] = set()  # ids (as JSON) of our requests still unanswered
        self._all_answered = asyncio.Event()
        self._all_answered.set()

    @property
    def label(self) -> str:
        return f"{self.peer}:{self.port}"

    async def __aenter__(self) -> RemoteSession:
        conn = self.transport.connect(self.peer, self.port, self.config.connect_timeout)
        await conn.__aenter__()
        try:
            await conn.send(control(Control.OPEN))
            try:
                answer = await conn.receive(timeout=self.config.open_timeout)
            except PilotTimeoutError:
                raise McpSessionError(f"{self.label} did not start an MCP server within "
                                      f"{self.config.open_timeout:g} s") from None
            except PortClosedError:
                # Not the daemon's hint for a closed port ("pilotctl listen"): what is missing
                # there is an MCP server.
                raise NoMcpServerError(
                    f"{self.label} serves no MCP server: nothing listens on port {self.port} "
                    f"there (start one: 'pilotctl mcp serve --port {self.port} -- COMMAND')"
                ) from None
            except PilotError as exc:
                raise McpSessionError(f"{self.label} serves no MCP server: {exc}") from None
            reply = parse_control_untrusted(answer.data)
            if reply is not None and reply[0] == Control.END:
                raise McpSessionError(f"{self.label} refused the MCP session: {reply[1]}")
            if reply is None or reply[0] != Control.READY:
                raise McpSessionError(f"{self.label} does not speak MCP through tunnels "
                                      "(its first answer was not READY)")
        except BaseException:
            await conn.abort()
            raise
        self._conn = conn
        self._last_sent = time.monotonic()
        self._heartbeat = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Tell the server side we are done (it stops the process) and close the stream."""
        conn, self._conn = self._conn, None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if conn is None:
            return
        if self.ended is None:
            self.ended = "closed by this side"
            with contextlib.suppress(PilotError):
                await conn.send(control(Control.END))
                await conn.close()
                return
        await conn.abort()

    def _open(self) -> Connection:
        # Once ended, the stream may still be up but nobody reads it: a request sent on it
        # would wait for good, where it must fail with the reason.
        if self._conn is None or self.ended is not None:
            raise McpSessionError(f"the MCP session with {self.label} "
                                  f"{'ended: ' + self.ended if self.ended else 'is not open'}")
        return self._conn

    async def send(self, message: bytes) -> None:
        """One JSON-RPC message to the server; once the session ended, a request sent is
        among :meth:`unanswered_errors`."""
        parsed = _json_object(message)
        if parsed is not None and "method" in parsed:
            if (request_id := parsed.get("id")) is not None:
                self._pending.add(json.dumps(request_id))
                self._all_answered.clear()
            elif parsed["method"] == "notifications/cancelled":
                # A server need not answer a request its client cancelled (the MCP spec):
                # kept, its id would wait for ever, one more per request the client gave up on.
                params = parsed.get("params")
                if isinstance(params, dict):
                    self._pending.discard(json.dumps(params.get("requestId")))
                    if not self._pending:
                        self._all_answered.set()
        conn = self._open()
        try:
            await conn.send(message)
        except PilotError as exc:
            raise self._end(f"the tunnel to {self.label} failed: {exc}") from None
        self._last_sent = time.monotonic()

    async def receive(self) -> bytes:
        """The server's next JSON-RPC message; :class:`McpSessionError` once the session ends."""
        conn = self._open()
        while True:
            try:
                message = await receive_unless_silent(conn, self.config.peer_timeout)
            except PilotTimeoutError:
                raise self._end(f"heard nothing from {self.label} for "
                                f"{self.config.peer_timeout:g} s") from None
            except PilotError as exc:
                raise self._end(f"the tunnel to {self.label} failed: {exc}") from None
            try:
                kind = parse_control_untrusted(message.data)
            except WireError as exc:
                log.warning("%s: %s", self.label, exc)
                continue
            if kind is None:
                if len(message.data) > self.config.max_message_bytes:
                    raise self._end(f"{self.label} sent a message of {len(message.data)} "
                                    f"bytes, more than {self.config.max_message_bytes}")
                if (response_id := _response_id(message.data)) is not None:
                    self._pending.discard(json.dumps(response_id))
                    if not self._pending:
                        self._all_answered.set()
                return message.data
            if kind[0] == Control.END:
                raise self._end(kind[1] or f"{self.label} ended the session")

    @property
    def unanswered(self) -> int:
        """Requests sent that have had no response yet."""
        return len(self._pending)

    async def all_answered(self) -> None:
        """Wait until every request sent has had its response (returned by :meth:`receive`)."""
        await self._all_answered.wait()

    def unanswered_errors(self) -> list[bytes]:
        """Once ended: a JSON-RPC error response for each request still waiting, carrying the
        reason, so the client's calls fail with it instead of a bare "connection closed"."""
        reason = f"MCP server on {self.label}: {self.ended}"
        errors = [b'{"jsonrpc":"2.0","id":%s,"error":{"code":-32000,"message":%s}}'
                  % (request_id.encode(), json.dumps(reason).encode())
                  for request_id in sorted(self._pending)]
        self._pending.clear()
        self._all_answered.set()
        return errors

    def _end(self, reason: str) -> McpSessionError:
        if self.ended is None:
            self.ended = reason
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        return McpSessionError(f"the MCP session with {self.label} ended: {self.ended}")

    async def _beat(self) -> None:
        interval = self.config.heartbeat_interval
        while self._conn is not None:
            await asyncio.sleep(max(self._last_sent + interval - time.monotonic(), 0.0))
            if time.monotonic() - self._last_sent >= interval and self._conn is not None:
                try:
                    await self._conn.send(control(Control.HEARTBEAT))
                except PilotError:
                    return  # the next receive says why
                self._last_sent = time.monotonic()


@contextlib.asynccontextmanager
async def _transport_for(transport: Transport | None,
                         home: str | Path | None) -> AsyncIterator[Transport]:
    if transport is not None:
        yield transport
        return
    async with Client(home) as client:
        yield client


@contextlib.asynccontextmanager
async def remote_session(peer: str, port: int = DEFAULT_MCP_PORT, *,
                         transport: Transport | None = None, home: str | Path | None = None,
                         config: McpConfig | None = None) -> AsyncIterator[RemoteSession]:
    """An open :class:`RemoteSession` through ``transport`` (default: the daemon of ``home``)."""
    async with (_transport_for(transport, home) as pilot,
                RemoteSession(pilot, peer, port, config) as session):
        yield session


@contextlib.asynccontextmanager
async def tunnel(peer: str, port: int = DEFAULT_MCP_PORT, *, transport: Transport | None = None,
                 home: str | Path | None = None,
                 config: McpConfig | None = None) -> AsyncIterator[TransportStreams]:
    """An MCP client transport to the server ``serve`` exposes on ``port`` of ``peer``: the
    read and write streams of :class:`mcp.shared.message.SessionMessage` that
    ``mcp.ClientSession`` takes, and a value ``mcp.Client(...)`` accepts as its server."""
    import anyio
    import mcp_types
    from mcp.shared.message import SessionMessage

    async with remote_session(peer, port, transport=transport, home=home,
                              config=config) as remote:
        read_in, read_out = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        write_in, write_out = anyio.create_memory_object_stream[SessionMessage](0)

        def parsed(data: bytes) -> SessionMessage | Exception:
            try:
                return SessionMessage(mcp_types.jsonrpc_message_adapter.validate_json(data))
            except ValueError as exc:  # the session logs it and goes on
                return exc

        async def answer_unanswered() -> None:
            for error in remote.unanswered_errors():
                await read_in.send(parsed(error))

        # Once the session ended, read_in stays open: each request waiting then, and each one
        # sent later, is answered at once with an error saying why.
        async def inbound() -> None:
            try:
                while True:
                    await read_in.send(parsed(await remote.receive()))
            except McpSessionError as exc:
                log.info("%s", exc)
                await answer_unanswered()

        async def outbound() -> None:
            async for item in write_out:
                try:
                    await remote.send(item.message.model_dump_json(
                        by_alias=True, exclude_unset=True).encode("utf-8"))
                except McpSessionError:
                    await answer_unanswered()

        async def pump(body: Callable[[], Awaitable[None]]) -> None:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await body()  # the MCP session closed its streams: it is done

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(pump, inbound)
            tasks.start_soon(pump, outbound)
            try:
                yield read_out, write_in
            finally:
                tasks.cancel_scope.cancel()
                for stream in (read_in, read_out, write_in, write_out):
                    stream.close()


DEFAULT_START_TIMEOUT = 60.0  # seconds for a server to answer 'initialize' (McpTool's timeout)


@contextlib.asynccontextmanager
async def connect(peer: str, port: int = DEFAULT_MCP_PORT, *, transport: Transport | None = None,
                  home: str | Path | None = None, config: McpConfig | None = None,
                  start_timeout: float = DEFAULT_START_TIMEOUT,
                  **session_options: Any) -> AsyncIterator[ClientSession]:
    """An initialized ``mcp.ClientSession`` (the 2025-11-25 ``initialize`` handshake done) with
    the MCP server ``serve`` exposes on ``port`` of ``peer`` (a hostname or node id), through
    ``transport`` (default: the daemon of ``home``). A server that has not answered
    ``initialize`` after ``start_timeout`` seconds is given up (:class:`McpSessionError`).
    ``session_options`` go to ClientSession (``read_timeout_seconds``, ``sampling_callback``,
    ...)."""
    from mcp import ClientSession, MCPError

    if not start_timeout > 0:
        raise ConfigError("connect: start_timeout must be positive")
    try:
        async with (tunnel(peer, port, transport=transport, home=home, config=config) as streams,
                    ClientSession(*streams, **session_options) as session):
            # READY says only that the process runs, and heartbeats keep a session whose
            # server never answers alive: this is the one bound of the wait.
            try:
                async with asyncio.timeout(start_timeout):
                    await session.initialize()
            except TimeoutError:
                raise McpSessionError(
                    f"the MCP server on {peer}:{port} did not answer 'initialize' within "
                    f"{start_timeout:g} s (is its command a stdio MCP server?)") from None
            yield session
    except BaseExceptionGroup as group:
        # The SDK's task group wraps a server that dies (at start, say) in groups of one:
        # the MCPError saying why is what a caller catches (or ours, that it never answered).
        if isinstance(leaf := innermost(group), MCPError | McpSessionError):
            raise leaf from None
        raise


def innermost(exc: BaseException) -> BaseException:
    """The one error inside the MCP SDK's task groups (ExceptionGroups of one), which say only
    'unhandled errors in a TaskGroup'."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# -- the serving side --------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionEvent:
    """What :class:`McpServer` tells its ``on_event`` callback: a session opened, was refused,
    or ended (``reason`` says why)."""

    kind: str  # "open", "refused" or "end"
    peer: str  # node id of the client
    hostname: str | None
    source_port: int
    reason: str = ""
    messages_in: int = 0  # JSON-RPC messages from the client
    messages_out: int = 0  # and from the server
    seconds: float = 0.0  # how long the session lasted

    @property
    def label(self) -> str:
        return f"{self.hostname or self.peer[:12]}:{self.source_port}"


@dataclass(eq=False)
class _Session:
    key: tuple[str, int]
    hostname: str | None
    proc: asyncio.subprocess.Process
    way_back: Message  # the latest message from the client: replies go on its stream
    started: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)
    last_sent: float = field(default_factory=time.monotonic)
    last_traffic: float = field(default_factory=time.monotonic)  # JSON-RPC either way
    messages_in: int = 0
    messages_out: int = 0
    stderr_tail: bytearray = field(default_factory=bytearray)
    # The client's messages its process has yet to be given (by _write_to_server), and their
    # size, which max_message_bytes bounds.
    to_server: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    to_server_bytes: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    ended: bool = False

    @property
    def label(self) -> str:
        return f"{self.hostname or self.key[0][:12]}:{self.key[1]}"


TELL_AT_STOP = 1.0  # seconds McpServer.serve waits, once stopped, for what it still tells


async def _reply_quietly(message: Message, data: bytes) -> None:
    with contextlib.suppress(PilotError):
        await message.reply(data, stall=UNREAD_REPLIES_TIMEOUT)


class McpServer:
    """Exposes the stdio MCP server ``argv`` on ``port`` of ``transport`` to its trusted peers:
    one process per remote session (environment: ours, updated with ``env``). :meth:`serve`
    runs until cancelled, then ends every session and stops every process."""

    def __init__(self, transport: Transport, port: int, argv: Sequence[str], *,
                 env: dict[str, str] | None = None, config: McpConfig | None = None,
                 on_event: Callable[[SessionEvent], None] | None = None) -> None:
        if not argv:
            raise ConfigError("an MCP server needs a command to run")
        self.transport = transport
        self.port = port
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.config = config or McpConfig()
        self.on_event = on_event
        self.sessions: dict[tuple[str, int], _Session] = {}
        # Ended sessions whose processes still stop: they count against max_sessions, or a
        # client closing and opening sessions in a loop would hold more processes than that.
        self.stopping: set[_Session] = set()
        # Sessions being opened, by peer: waiting for room, or starting their process.
        self._opening = PerPeer()
        self._stopped = asyncio.Event()  # set (and replaced) each time a process has stopped
        self._open_tasks: set[asyncio.Task[None]] = set()
        self._end_tasks: set[asyncio.Task[None]] = set()
        self._telling: dict[tuple[str, int], asyncio.Task[None]] = {}  # see _tell

    async def serve(self, listening: Callable[[], None] | None = None) -> None:
        """Serve until cancelled; ``listening`` is called once the port is listened on."""
        try:
            # Exclusive: a session is a stream, whose messages must all come here; another
            # listener of the port would take some of them.
            async with self.transport.listen(self.port, exclusive=True) as listener:
                try:
                    if listening is not None:
                        listening()
                    while True:
                        await self._dispatch(await listener.receive(timeout=None))
                finally:
                    # Within the listen: the ENDs go back on its streams, which its close
                    # resets, and a client would hear only that nothing listens any more.
                    await self._end_all("the MCP server side is stopping")
        except PortInUseError as exc:  # (nothing in the loop listens: the listen's own)
            raise PortInUseError(f"cannot serve MCP on port {self.port}: {exc}") from None

    async def _end_all(self, reason: str) -> None:
        """End every session, telling its client ``reason``, and stop every process."""
        for task in self._open_tasks:
            task.cancel()
        await asyncio.gather(*self._open_tasks, return_exceptions=True)
        ending = [asyncio.create_task(self._end(s, reason)) for s in list(self.sessions.values())]
        await asyncio.shield(asyncio.gather(*ending, *self._end_tasks, return_exceptions=True))
        # What is still being told (a client that reads nothing) is not waited for long.
        if telling := list(self._telling.values()):
            await asyncio.wait(telling, timeout=TELL_AT_STOP)
            for task in telling:
                task.cancel()
            await asyncio.gather(*telling, return_exceptions=True)

    async def _dispatch(self, message: Message) -> None:
        key = (message.sender, message.source_port)
        session = self.sessions.get(key)
        try:
            kind = parse_control_untrusted(message.data)
        except WireError as exc:
            log.warning("%s:%d sent a malformed message: %s", message.sender[:12],
                        message.source_port, exc)
            return
        if session is None:
            if kind is not None and kind[0] == Control.OPEN:
                await self._open(message)
            elif kind is None or kind[0] != Control.END:  # the server restarted, or ended it
                self._tell(message, control(Control.END, "no such MCP session (ended)"))
            return
        session.way_back = message
        session.last_heard = time.monotonic()
        if kind is None:
            self._queue_to_server(session, message.data)
        elif kind[0] == Control.END:
            self._end_soon(session, kind[1] or "the client closed the session", tell=False)

    def _in_use(self, peer: str | None = None, *, stopping: bool = True) -> int:
        """Server processes running or about to: the ones max_sessions bounds, or, of ``peer``,
        max_sessions_per_peer; those of ended sessions still stopping only if ``stopping``."""
        held = list(self.sessions.values())
        if stopping:
            held += self.stopping
        if peer is None:
            return len(held) + self._opening.total
        return sum(session.key[0] == peer for session in held) + self._opening[peer]

    def _no_room(self, peer: str, *, stopping: bool = True, counted: int = 0) -> str | None:
        """Why a session of ``peer`` cannot start now, naming the bound in the way (None if it
        can); ``counted``: sessions of ``peer`` being opened that are this one."""
        config = self.config
        if self._in_use(stopping=stopping) - counted >= config.max_sessions:
            return f"all {config.max_sessions} sessions of the MCP server are in use"
        theirs = self._in_use(peer, stopping=stopping) - counted
        if theirs >= config.sessions_per_peer:
            return (f"your node has {theirs} sessions of the MCP server already, as many as one "
                    "node may (McpConfig.max_sessions_per_peer)")
        return None

    async def _open(self, message: Message) -> None:
        peer = message.sender
        if self._no_room(peer) is None:
            self._opening.add(peer)
            try:
                await self._start(message)
            finally:
                self._opening.remove(peer)
        elif (why := self._no_room(peer, stopping=False)) is None:
            # Only ended sessions still stopping are in the way, gone within 3 x stop_grace:
            # a client that closed a session and opens the next waits for that, where a
            # refusal would fail it for a moment's overlap. In a task: the other sessions'
            # messages go on meanwhile.
            self._opening.add(peer)
            task = asyncio.create_task(self._open_when_stopped(message))
            self._open_tasks.add(task)
            task.add_done_callback(self._open_tasks.discard)
        else:
            self._refuse(message, f"{why}; try again later")

    async def _open_when_stopped(self, message: Message) -> None:
        peer = message.sender
        try:
            try:
                async with asyncio.timeout(self.config.open_timeout):
                    while (why := self._no_room(peer, counted=1)) is not None:
                        await self._stopped.wait()
            except TimeoutError:
                self._refuse(message, f"{why} ({len(self.stopping)} still stopping); try "
                             "again later")
                return
            await self._start(message)
        finally:
            self._opening.remove(peer)

    def _refuse(self, message: Message, reason: str) -> None:
        self._event("refused", (message.sender, message.source_port),
                    getattr(message, "hostname", None), reason)
        self._tell(message, control(Control.END, reason))

    def _tell(self, message: Message, data: bytes) -> None:
        """Send ``data`` back on ``message``'s stream in a task of its own, one at a time per
        stream: the loop that reads every session's messages must not wait on a client that
        reads none (a reply waits at most UNREAD_REPLIES_TIMEOUT for one; then its stream is
        reset, which tells it too)."""
        key = (message.sender, message.source_port)
        if key not in self._telling:
            task = asyncio.create_task(_reply_quietly(message, data))
            self._telling[key] = task
            task.add_done_callback(lambda _: self._telling.pop(key, None))

    async def _start(self, message: Message) -> None:
        """The session's server process, and the session, told READY."""
        key = (message.sender, message.source_port)
        hostname = getattr(message, "hostname", None)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=self.env, start_new_session=True,
                limit=self.config.max_message_bytes)
        except OSError as exc:
            self._refuse(message, f"cannot run {self.argv[0]}: {exc.strerror or exc}")
            return
        session = _Session(key, hostname, proc, message)
        self.sessions[key] = session
        # READY from a task of the session's own, the first (so the first thing written on
        # its stream): not in the loop that reads every session's messages, which an OPEN
        # again on a stream full of unread replies held for UNREAD_REPLIES_TIMEOUT each time.
        session.tasks = [asyncio.create_task(self._ready(session)),
                         asyncio.create_task(self._from_server(session)),
                         asyncio.create_task(self._write_to_server(session)),
                         asyncio.create_task(self._read_stderr(session)),
                         asyncio.create_task(self._watch(session)),
                         asyncio.create_task(self._reap(session))]
        self._event("open", key, hostname)

    async def _ready(self, session: _Session) -> None:
        if not await self._reply(session, control(Control.READY)):
            self._end_soon(session, "the client went away", tell=False)

    def _queue_to_server(self, session: _Session, data: bytes) -> None:
        """``data`` for the session's process, written by the session's own writer: this loop
        reads every session's messages, and a process that reads none must hold up only its
        own session (a single-threaded server busy with a long call reads nothing)."""
        limit = self.config.max_message_bytes
        if len(data) > limit:
            self._end_soon(session, f"the client sent a message of {len(data)} bytes, more "
                           f"than {limit}")
            return
        # Bounded: a client may send on while its server reads nothing (for up to
        # write_timeout), and all it sent would wait here. One message always fits.
        if session.to_server_bytes and session.to_server_bytes + len(data) > limit:
            self._end_soon(session, f"the MCP server reads too slowly: more than {limit} bytes "
                           "of its client's messages waited for it")
            return
        session.messages_in += 1
        session.last_traffic = time.monotonic()
        session.to_server.put_nowait(data)
        session.to_server_bytes += len(data)

    async def _write_to_server(self, session: _Session) -> None:
        while True:
            data = await session.to_server.get()
            session.to_server_bytes -= len(data)
            if not await self._to_server(session, data):
                return

    async def _to_server(self, session: _Session, data: bytes) -> bool:
        """Write one message to the process's stdin; False once the session is over for it
        (the process read nothing for write_timeout)."""
        stdin = session.proc.stdin
        assert stdin is not None
        # JSON text holds line breaks only as whitespace (in a string they are escaped): as
        # spaces they keep its meaning, and the message stays the one line a stdio server
        # reads as one message.
        data = data.replace(b"\r", b" ").replace(b"\n", b" ")
        if stdin.is_closing():
            return True  # it exited (writing would raise RuntimeError on uvloop): as below
        try:
            stdin.write(data + b"\n")
            async with asyncio.timeout(self.config.write_timeout):
                await stdin.drain()
        except TimeoutError:
            self._end_soon(session, f"the MCP server read nothing for "
                           f"{self.config.write_timeout:g} s")
            return False
        except (BrokenPipeError, ConnectionResetError):
            pass  # it exited: _from_server sees its stdout end and says so
        return True

    async def _from_server(self, session: _Session) -> None:
        stdout = session.proc.stdout
        assert stdout is not None
        try:
            while line := await stdout.readline():
                message = line.rstrip(b"\r\n")
                if not message:
                    continue
                if message[:1] == CONTROL_MARK:
                    # Forwarded, the line would be read as one of our control messages (an
                    # END its client never had, say).
                    log.warning("%s: dropped a line of the server's stdout starting with a NUL "
                                "byte (not JSON-RPC): %r", session.label, message[:80])
                    continue
                session.messages_out += 1
                session.last_traffic = time.monotonic()
                if not await self._reply(session, message):
                    self._end_soon(session, "the client went away", tell=False)
                    return
        except ValueError:  # asyncio's StreamReader: a line longer than its limit
            self._end_soon(session, f"the MCP server wrote a message of more than "
                           f"{self.config.max_message_bytes} bytes")
            return
        try:
            async with asyncio.timeout(self.config.stop_grace):
                status = await session.proc.wait()
        except TimeoutError:
            self._end_soon(session, "the MCP server closed its stdout")
            return
        tail = session.stderr_tail.decode("utf-8", "replace").strip()
        self._end_soon(session, f"the MCP server process exited with status {status}"
                       + (f": {tail}" if tail else ""))

    async def _read_stderr(self, session: _Session) -> None:
        stderr = session.proc.stderr
        assert stderr is not None
        keep = self.config.stderr_tail_bytes
        while chunk := await stderr.read(65536):
            for line in chunk.decode("utf-8", "replace").splitlines():
                log.info("%s: %s", session.label, line)
            session.stderr_tail += chunk
            del session.stderr_tail[:max(len(session.stderr_tail) - keep, 0)]

    async def _reap(self, session: _Session) -> None:
        await session.proc.wait()
        # What the server started may hold its stdout open, and _from_server would wait for
        # that end for good, its client's requests with it: their end makes the exit seen.
        _kill_group(session.proc.pid)

    async def _watch(self, session: _Session) -> None:
        """Heartbeats while we send nothing; the end of a silent or idle session."""
        config = self.config
        while True:
            now = time.monotonic()
            if now - session.last_heard > config.peer_timeout and not await self._arriving(
                    session):
                self._end_soon(session, f"heard nothing from the client for "
                               f"{config.peer_timeout:g} s", tell=False)
                return
            if config.idle_timeout is not None and now - session.last_traffic > config.idle_timeout:
                self._end_soon(session, f"idle for {config.idle_timeout:g} s")
                return
            if (now - session.last_sent >= config.heartbeat_interval
                    and not await self._reply(session, control(Control.HEARTBEAT))):
                self._end_soon(session, "the client went away", tell=False)
                return
            await asyncio.sleep(min(config.heartbeat_interval, config.peer_timeout) / 4)

    async def _arriving(self, session: _Session) -> bool:
        """Whether bytes of the client's stream arrived within ``peer_timeout``: a long
        message still arriving is word from the client, since no heartbeat can pass it on
        its stream, and on a slow link it may take longer than any heartbeat interval."""
        try:
            since = await session.way_back.since_arrival()
        except PilotError:  # the stream is gone: nothing more can arrive on it
            return False
        if since is None or since >= self.config.peer_timeout:
            return False
        session.last_heard = max(session.last_heard, time.monotonic() - since)
        return True

    async def _reply(self, session: _Session, data: bytes) -> bool:
        try:
            # Bounded: a client that reads nothing would hold its session (and its slot of
            # max_sessions) for ever.
            await session.way_back.reply(data, stall=UNREAD_REPLIES_TIMEOUT)
        except PilotError as exc:
            log.info("%s: %s", session.label, exc)
            return False
        session.last_sent = time.monotonic()
        return True

    def _end_soon(self, session: _Session, reason: str, *, tell: bool = True) -> None:
        """End ``session`` in a task of its own: it waits for the process to stop, and may be
        called from one of the session's own tasks, which it cancels."""
        if session.ended:
            return
        task = asyncio.create_task(self._end(session, reason, tell=tell))
        self._end_tasks.add(task)
        task.add_done_callback(self._end_tasks.discard)

    async def _end(self, session: _Session, reason: str, *, tell: bool = True) -> None:
        if session.ended:
            return
        session.ended = True
        self.sessions.pop(session.key, None)
        self.stopping.add(session)
        current = asyncio.current_task()
        others = [task for task in session.tasks if task is not current]
        for task in others:
            task.cancel()
        if tell:  # while the process stops: not after, nor holding its stop up
            self._tell(session.way_back, control(Control.END, reason))
        try:
            # Ended before the stop reads what is left in the pipes they read.
            await asyncio.gather(*others, return_exceptions=True)
            await self._stop(session.proc)
        finally:
            self.stopping.discard(session)
            self._stopped.set()
            self._stopped = asyncio.Event()
        self._event("end", session.key, session.hostname, reason, session)

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """The MCP spec's shutdown: close stdin, wait; SIGTERM, wait; SIGKILL (the group)."""
        grace = self.config.stop_grace
        if proc.stdin is not None:
            proc.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if proc.returncode is not None:
                break
            if sig is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await proc.wait()
                    break
        # The server gone, what it started in its group (a wrapper's child, a helper) would
        # outlive the session, orphaned: nothing of it may serve anyone any more.
        _kill_group(proc.pid)
        # What it wrote and nobody read (its reader cancelled, a client that read nothing)
        # holds its pipe, and with it the process's transport, open until garbage collected:
        # read to the end, now that nobody writes.
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(TimeoutError, OSError):
                    async with asyncio.timeout(grace):
                        while await pipe.read(1 << 16):
                            pass

    def _event(self, kind: str, key: tuple[str, int], hostname: str | None, reason: str = "",
               session: _Session | None = None) -> None:
        event = SessionEvent(
            kind, key[0], hostname, key[1], reason,
            session.messages_in if session else 0, session.messages_out if session else 0,
            time.monotonic() - session.started if session else 0.0)
        log.info("session %s %s%s", event.label, kind, f": {reason}" if reason else "")
        if self.on_event is not None:
            self.on_event(event)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


__all__ = [
    "DEFAULT_MCP_PORT", "Control", "McpConfig", "McpServer", "RemoteSession", "SessionEvent",
    "connect", "control", "parse_control_untrusted", "remote_session", "tunnel",
]
