"""The embedded node: identity, trust, peers, ports, and the async API applications use.

async with Node(home=PATH, listen="127.0.0.1:0") as node:
    node.trust(peer_id); node.add_peer(peer_id, ("127.0.0.1", 4000))
    async with node.connect(peer_id, port=1001) as conn:
        await conn.send(b"hello")
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import (
    ConfigError,
    ConnectionClosedError,
    NotTrustedError,
    PeerUnreachableError,
    PilotError,
    PilotTimeoutError,
    PortClosedError,
)
from .identity import Identity, default_home, key_from_node_id, node_id_from_key
from .net import events
from .net.codes import CloseCode, ResetCode, close_reason, reset_reason
from .net.config import SessionConfig
from .net.endpoint import Endpoint, parse_host_port
from .net.mux import Mux
from .net.session import Session

log = logging.getLogger("pilot_agents.node")

EPHEMERAL_PORTS = range(49152, 65536)
SEND_HIGH_WATER = 8 * 1024 * 1024  # bytes unacknowledged on a stream before send() waits
DEFAULT_TIMEOUT = 30.0  # seconds, for every wait without an explicit timeout


def encode_payload(data: bytes | bytearray | memoryview | str | Any) -> bytes:
    """bytes as they are, str as UTF-8, anything else as JSON."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    if isinstance(data, str):
        return data.encode("utf-8")
    try:
        return json.dumps(data, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"cannot send {type(data).__name__}: not bytes, str or JSON ({exc})"
        ) from None


def _check_port(port: int) -> int:
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"port {port!r} is not in 1..65535")
    return port


@dataclass
class Message:
    data: bytes
    sender: str  # node id
    port: int  # our port it arrived on
    source_port: int
    _stream: _StreamHandle | None = field(default=None, repr=False)

    def text(self) -> str:
        return self.data.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.data)

    async def reply(self, data: bytes | str | Any) -> None:
        """Send a message back on the connection this one came from."""
        if self._stream is None:
            raise ConnectionClosedError("this message cannot be replied to")
        await self._stream.send(data)


class _StreamHandle:
    """Our side of one stream: its inbox and the way back into the session."""

    def __init__(
        self, node: Node, session: Session, stream_id: int, local_port: int, remote_port: int
    ) -> None:
        self.node = node
        self.session = session
        self.stream_id = stream_id
        self.local_port = local_port
        self.remote_port = remote_port
        self.inbox: asyncio.Queue[Message | PilotError] = asyncio.Queue()
        self.error: PilotError | None = None
        self.reset = False

    @property
    def undelivered(self) -> bool:
        """Something we sent may not have reached the peer's application."""
        return self.reset or self.session.stream_buffered(self.stream_id) > 0

    @property
    def peer_id(self) -> str:
        return node_id_from_key(self.session.peer)

    def fail(self, error: PilotError, *, reset: bool = False) -> None:
        """The stream is dead: sends and receives raise ``error`` from now on. ``reset``: the
        peer's application never saw what we sent."""
        self.reset = self.reset or reset
        if self.error is None:
            self.error = error
            self.inbox.put_nowait(error)
        self.node._progress_made()

    def end(self) -> None:
        """The peer finished sending: receives raise once the inbox is empty; sends go on."""
        self.inbox.put_nowait(ConnectionClosedError("the peer closed the connection"))

    async def send(self, data: bytes | str | Any) -> None:
        payload = encode_payload(data)
        if self.error is not None:
            raise self.error
        self.session.send_message(self.stream_id, payload)
        self.node._endpoint_wake()
        await self.node._wait_until(
            lambda: (
                self.error is not None
                or self.session.stream_buffered(self.stream_id) < SEND_HIGH_WATER
            ),
            None,
        )
        if self.error is not None:
            raise self.error

    async def receive(self, timeout: float | None) -> Message:
        try:
            item = await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            raise PilotTimeoutError(f"no message within {timeout} s") from None
        if isinstance(item, PilotError):
            self.inbox.put_nowait(item)  # every later receive fails the same way
            raise item
        self.session.message_consumed(self.stream_id, len(item.data))
        self.node._endpoint_wake()
        return item


class Connection:
    """A stream to a port on a peer; messages are ordered and delivered exactly once."""

    def __init__(self, node: Node, peer: bytes, port: int, timeout: float) -> None:
        self._node = node
        self._peer = peer
        self._port = port
        self._timeout = timeout
        self._handle: _StreamHandle | None = None

    @property
    def peer_id(self) -> str:
        return node_id_from_key(self._peer)

    @property
    def path(self) -> str:
        return "direct"

    @property
    def rtt(self) -> float | None:
        return self._stream().session.smoothed_rtt

    async def __aenter__(self) -> Connection:
        self._handle = await self._node._open_stream(self._peer, self._port, self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            self.abort()

    def _stream(self) -> _StreamHandle:
        if self._handle is None:
            raise ConnectionClosedError("the connection is not open (use 'async with')")
        return self._handle

    async def send(self, data: bytes | str | Any) -> None:
        await self._stream().send(data)

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> Message:
        return await self._stream().receive(timeout)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the peer acknowledged everything sent so far; raise if it never will."""
        handle = self._stream()
        await self._node._wait_until(
            lambda: handle.error is not None or not handle.undelivered,
            timeout or self._timeout,
        )
        if handle.error is not None and handle.undelivered:
            raise handle.error

    async def close(self) -> None:
        """Finish the stream and wait until the peer has every byte."""
        handle = self._handle
        if handle is None:
            return
        handle.session.finish_stream(handle.stream_id)
        self._node._endpoint_wake()
        try:
            await self.drain()
        finally:
            self._node._forget(handle)
            self._handle = None

    def abort(self) -> None:
        handle = self._handle
        if handle is not None:
            handle.session.reset_stream(handle.stream_id, ResetCode.CANCELLED)
            self._node._endpoint_wake()
            self._node._forget(handle)
            self._handle = None


class Listener:
    """Messages arriving on one of our ports, from any trusted peer."""

    def __init__(self, node: Node, port: int) -> None:
        self._node = node
        self.port = port
        self._inbox: asyncio.Queue[tuple[_StreamHandle, Message]] = asyncio.Queue()
        self._closed = False

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._node._listeners.pop(self.port, None)

    def _deliver(self, handle: _StreamHandle, message: Message) -> None:
        self._inbox.put_nowait((handle, message))

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> Message:
        try:
            handle, message = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            raise PilotTimeoutError(f"no message on port {self.port} within {timeout} s") from None
        handle.session.message_consumed(handle.stream_id, len(message.data))
        self._node._endpoint_wake()
        return message

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while not self._closed:
            yield await self.receive(timeout=None)


class Node:
    def __init__(
        self,
        home: str | Path | None = None,
        listen: str = "0.0.0.0:0",
        config: SessionConfig | None = None,
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.identity = Identity.load_or_create(self.home)
        self.config = config or SessionConfig()
        try:
            self._listen = parse_host_port(listen)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._mux: Mux | None = None
        self._endpoint: Endpoint | None = None
        self._listeners: dict[int, Listener] = {}
        self._streams: dict[tuple[bytes, int], _StreamHandle] = {}
        self._outgoing: set[tuple[bytes, int]] = set()
        self._peer_addresses: dict[bytes, tuple[str, int]] = {}
        self._trusted: set[bytes] = set()
        self._waiters: list[asyncio.Future[None]] = []

    # -- identity -------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def virtual_address(self) -> str:
        return str(self.identity.virtual_address)

    @property
    def local_endpoint(self) -> tuple[str, int]:
        return self._running().local_address

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._endpoint is not None:
            return
        self._mux = Mux(self.identity.secret_key, self.identity.public_key, self.config)
        endpoint = Endpoint(self._mux, self._on_event, self._progress_made)
        try:
            endpoint.open(*self._listen)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self._listen[0]}:{self._listen[1]}: {exc.strerror}"
            ) from None
        self._endpoint = endpoint
        for peer in self._trusted:
            self._mux.trust(peer)

    async def close(self) -> None:
        endpoint, mux = self._endpoint, self._mux
        if endpoint is None or mux is None:
            return
        now = endpoint.now()
        for session in mux.sessions():
            session.close(CloseCode.SHUTDOWN, "", now)
        endpoint._flush()
        endpoint.close()
        self._endpoint = None
        for listener in list(self._listeners.values()):
            listener.close()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _running(self) -> Endpoint:
        if self._endpoint is None:
            raise PilotError("the node is not running (use 'async with Node(...)')")
        return self._endpoint

    # -- trust and peers -------------------------------------------------------------------

    def trust(self, node_id: str) -> None:
        key = key_from_node_id(node_id)
        self._trusted.add(key)
        if self._mux is not None:
            self._mux.trust(key)

    def untrust(self, node_id: str) -> None:
        """Stop trusting the peer and tear down its tunnel."""
        key = key_from_node_id(node_id)
        self._trusted.discard(key)
        if self._mux is not None and self._endpoint is not None:
            self._mux.untrust(key, self._endpoint.now())
            self._endpoint.wake()

    def add_peer(self, node_id: str, address: tuple[str, int] | str) -> None:
        key = key_from_node_id(node_id)
        if isinstance(address, str):
            try:
                address = parse_host_port(address)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self._peer_addresses[key] = address

    # -- ports -------------------------------------------------------------------------------

    def listen(self, port: int) -> Listener:
        _check_port(port)
        if port in self._listeners:
            raise ConfigError(f"port {port} is already being listened on")
        listener = Listener(self, port)
        self._listeners[port] = listener
        return listener

    def connect(self, node_id: str, port: int, timeout: float = 10.0) -> Connection:
        return Connection(self, key_from_node_id(node_id), _check_port(port), timeout)

    async def send(
        self, node_id: str, port: int, data: bytes | str | Any, timeout: float = 10.0
    ) -> None:
        """Deliver one message and wait until the peer has it."""
        async with self.connect(node_id, port, timeout) as conn:
            await conn.send(data)

    async def receive(self, port: int, timeout: float | None = DEFAULT_TIMEOUT) -> Message:
        """One message on ``port`` (listening just for it)."""
        async with self.listen(port) as listener:
            return await listener.receive(timeout)

    # -- internals -----------------------------------------------------------------------

    async def _open_stream(self, peer: bytes, port: int, timeout: float) -> _StreamHandle:
        endpoint = self._running()
        mux = self._mux
        assert mux is not None
        if not mux.is_trusted(peer):
            raise NotTrustedError(
                f"{node_id_from_key(peer)} is not trusted: run 'pilot-agents trust add' for it"
            )
        address = self._peer_addresses.get(peer)
        session = mux.session(peer, endpoint.now())
        if session.address is None:
            if address is None:
                raise PeerUnreachableError(
                    f"no known address for {node_id_from_key(peer)}: add_peer() it first"
                )
            session.address = address
        local_port = self._ephemeral_port(peer)
        stream_id = session.open_stream(local_port, port)
        handle = _StreamHandle(self, session, stream_id, local_port, port)
        self._streams[(peer, stream_id)] = handle
        self._outgoing.add((peer, stream_id))
        session.connect(endpoint.now())
        endpoint.wake()
        try:
            await self._wait_until(lambda: session.established or session.closed, timeout)
        except PilotTimeoutError:
            self._forget(handle)
            raise PeerUnreachableError(
                f"no answer from {node_id_from_key(peer)} within {timeout} s: "
                "it is down, unreachable, or does not trust us"
            ) from None
        if handle.error is not None:
            self._forget(handle)
            raise handle.error
        return handle

    def _ephemeral_port(self, peer: bytes) -> int:
        used = {h.local_port for (p, _), h in self._streams.items() if p == peer}
        while True:
            port = random.choice(EPHEMERAL_PORTS)
            if port not in used:
                return port

    def _forget(self, handle: _StreamHandle) -> None:
        key = (handle.session.peer, handle.stream_id)
        self._streams.pop(key, None)
        self._outgoing.discard(key)

    def _endpoint_wake(self) -> None:
        if self._endpoint is not None:
            self._endpoint.wake()

    def _progress_made(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_until(self, condition: Any, timeout: float | None) -> None:
        """Wait for ``condition()`` to hold, re-checked after every burst of network progress."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not condition():
            if self._endpoint is None:
                raise ConnectionClosedError("the node was closed")
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise PilotTimeoutError(f"timed out after {timeout} s")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, remaining)

    def _on_event(self, event: events.Event) -> None:
        peer = event.peer
        if isinstance(event, events.MessageReceived):
            handle = self._streams.get((peer, event.stream_id))
            if handle is None:
                return
            message = Message(
                event.data, node_id_from_key(peer), event.dst_port, event.src_port, handle
            )
            if (peer, event.stream_id) in self._outgoing:
                handle.inbox.put_nowait(message)
            else:
                listener = self._listeners.get(handle.local_port)
                if listener is None:
                    handle.session.reset_stream(event.stream_id, ResetCode.PORT_CLOSED)
                    self._forget(handle)
                else:
                    listener._deliver(handle, message)
        elif isinstance(event, events.StreamOpened):
            session = self._mux.get_session(peer) if self._mux else None
            if session is None:
                return
            if event.dst_port not in self._listeners:
                session.reset_stream(event.stream_id, ResetCode.PORT_CLOSED)
                return
            self._streams[(peer, event.stream_id)] = _StreamHandle(
                self, session, event.stream_id, event.dst_port, event.src_port
            )
        elif isinstance(event, events.StreamEnded):
            handle = self._streams.get((peer, event.stream_id))
            if handle is None:
                return
            if (peer, event.stream_id) in self._outgoing:
                handle.end()
            else:
                # The client is done sending: close our side once our replies are out.
                handle.session.finish_stream(event.stream_id)
                self._forget(handle)
        elif isinstance(event, events.StreamReset):
            handle = self._streams.get((peer, event.stream_id))
            if handle is not None:
                reset_error = (
                    PortClosedError
                    if event.code == ResetCode.PORT_CLOSED
                    else ConnectionClosedError
                )
                handle.fail(
                    reset_error(
                        f"{node_id_from_key(peer)} port {handle.remote_port}: "
                        f"{reset_reason(event.code)}",
                        event.code,
                        reset_reason(event.code),
                    ),
                    reset=True,
                )
                if (peer, event.stream_id) not in self._outgoing:
                    self._forget(handle)
        elif isinstance(event, events.SessionClosed):
            closed_error: type[PilotError] = (
                PeerUnreachableError
                if event.code
                in (CloseCode.HANDSHAKE_TIMEOUT, CloseCode.PEER_UNREACHABLE, CloseCode.IDLE_TIMEOUT)
                else ConnectionClosedError
            )
            reason = event.reason or close_reason(event.code)
            for (p, _), handle in list(self._streams.items()):
                if p == peer:
                    error = closed_error(f"tunnel to {node_id_from_key(peer)} closed: {reason}")
                    handle.fail(error)
                    if (p, handle.stream_id) not in self._outgoing:
                        self._forget(handle)
        self._progress_made()
