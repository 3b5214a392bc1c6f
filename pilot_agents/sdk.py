"""The daemon-backed :class:`~pilot_agents.transport.Transport`, and module-level calls that
use the daemon of a home unless given another transport.

    import pilot_agents as pilot

    async with pilot.connect("reporter-agent", port=1001) as conn:   # via the daemon (IPC)
        await conn.send({"rows": 1842})
        reply = await conn.receive(timeout=5)
    await pilot.send("reporter-agent", 1001, b"data")
    msg = await pilot.receive(1001, timeout=30)
    async with pilot.listen(1001) as listener:
        async for msg in listener:
            await msg.reply("thanks")

Which daemon: ``home=`` (default ``PILOT_HOME``, else ``~/.pilot-agents``). ``node=`` takes any
transport instead: an embedded :class:`~pilot_agents.node.Node` (``pilot.connect("peer", 1001,
node=node)``), or a :class:`Client` to share one daemon connection between calls. Both implement
the same interface (:mod:`pilot_agents.transport`): :class:`DaemonConnection`,
:class:`DaemonListener` and :class:`DaemonMessage` behave as the Node's connection, listener and
message do; :class:`DaemonMessage` and :class:`DaemonConnection` add the sender's ``hostname``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import ConnectionClosedError, DaemonNotRunningError
from .ipc import IpcClient, decode_data, encode_data
from .transport import (
    CONNECT_TIMEOUT,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    Connection,
    Listener,
    Message,
    Payload,
    Transport,
    encode_payload,
)

if TYPE_CHECKING:
    from .node.node import Node


def _wire(data: bytes | str | Any) -> dict[str, str]:
    text, encoding = encode_data(encode_payload(data))
    return {"data": text, "encoding": encoding}


@dataclass
class DaemonMessage(Payload):
    """A message received through the daemon (the same fields as :class:`Message`)."""

    data: bytes
    sender: str  # node id
    port: int  # our port it arrived on
    source_port: int
    hostname: str | None = None  # the sender's name, if we know it
    message_id: str | None = None  # the daemon's id for it (IPC "reply")
    _reply: Callable[[dict[str, str]], Awaitable[Any]] | None = field(default=None, repr=False)

    async def reply(self, data: bytes | str | Any) -> None:
        """Send a message back on the connection this one came from."""
        if self._reply is None:
            raise ConnectionClosedError("this message cannot be replied to")
        await self._reply(_wire(data))


def _message(fields: dict[str, Any],
             reply: Callable[[dict[str, str]], Awaitable[Any]]) -> DaemonMessage:
    return DaemonMessage(
        data=decode_data(fields["data"], fields["encoding"]), sender=fields["from"],
        port=fields["port"], source_port=fields["source_port"], hostname=fields.get("hostname"),
        message_id=fields.get("id"), _reply=reply,
    )


class Client:
    """A connection to the daemon of ``home``; every call of the SDK goes through one.

        async with pilot.Client() as client:
            print(await client.info())
            async with client.connect("reporter-agent") as conn: ...
    """

    def __init__(self, home: str | Path | None = None) -> None:
        self._ipc = IpcClient(home)

    @property
    def home(self) -> Path:
        return self._ipc.home

    async def __aenter__(self) -> Client:
        await self._ipc.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._ipc.close()

    async def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Any IPC command (docs/ipc.md); the reply's fields, or the error it reports raised."""
        return await self._ipc.request(cmd, **fields)

    # -- messaging ----------------------------------------------------------------------------

    def connect(self, target: str, port: int = DEFAULT_PORT,
                timeout: float = CONNECT_TIMEOUT) -> DaemonConnection:
        return DaemonConnection(self, target, port, timeout)

    async def send(self, target: str, port: int, data: bytes | str | Any,
                   timeout: float = CONNECT_TIMEOUT) -> None:
        await self.call("send", target=target, port=port, timeout=timeout, **_wire(data))

    async def receive(self, port: int, timeout: float | None = DEFAULT_TIMEOUT) -> DaemonMessage:
        reply = await self.call("receive", port=port, timeout=timeout)
        return self._port_message(reply["message"])

    def listen(self, port: int) -> DaemonListener:
        return DaemonListener(self, port)

    def _port_message(self, fields: dict[str, Any]) -> DaemonMessage:
        message_id = fields["id"]

        async def reply(wire: dict[str, str]) -> None:
            await self.call("reply", message=message_id, **wire)

        return _message(fields, reply)

    # -- administration ----------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        return _strip(await self.call("info"))

    async def peers(self) -> list[dict[str, Any]]:
        return list((await self.call("peers"))["peers"])

    async def resolve(self, name: str) -> dict[str, Any]:
        return _strip(await self.call("resolve", name=name))

    async def ping(self, target: str, timeout: float = 5.0) -> dict[str, Any]:
        return _strip(await self.call("ping", target=target, timeout=timeout))

    async def add_peer(self, node_id: str, address: str, hostname: str | None = None) -> None:
        await self.call("add_peer", node_id=node_id, address=address, hostname=hostname)

    async def trust_add(self, target: str, reason: str = "") -> dict[str, Any]:
        return _strip(await self.call("trust_add", target=target, reason=reason))

    async def trust_approve(self, target: str) -> dict[str, Any]:
        return _strip(await self.call("trust_approve", target=target))

    async def trust_reject(self, target: str) -> dict[str, Any]:
        return _strip(await self.call("trust_reject", target=target))

    async def trust_remove(self, target: str) -> dict[str, Any]:
        return _strip(await self.call("trust_remove", target=target))

    async def trust_list(self) -> list[dict[str, Any]]:
        return list((await self.call("trust_list"))["entries"])

    async def trust_pending(self) -> list[dict[str, Any]]:
        return list((await self.call("trust_pending"))["pending"])


def _strip(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("ok", "id")}


class DaemonConnection:
    """A stream to a port on a peer, held by the daemon (mirrors :class:`Connection`)."""

    def __init__(self, client: Client, target: str, port: int, timeout: float,
                 owns_client: bool = False) -> None:
        self._client = client
        self._target = target
        self._port = port
        self._timeout = timeout
        self._owns_client = owns_client
        self._stream: str | None = None
        self._info: dict[str, Any] = {}

    @property
    def peer_id(self) -> str:
        return str(self._info.get("peer", ""))

    @property
    def hostname(self) -> str | None:
        return self._info.get("hostname")

    @property
    def path(self) -> str:
        return str(self._info.get("path", "none"))

    @property
    def rtt(self) -> float | None:
        return self._info.get("rtt")

    async def __aenter__(self) -> DaemonConnection:
        try:
            reply = await self._client.call("connect", target=self._target, port=self._port,
                                               timeout=self._timeout)
        except BaseException:
            await self._release()
            raise
        self._stream = reply["stream"]
        self._info = reply
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                await self.close()
            else:
                await self.abort()
        finally:
            await self._release()

    def _id(self) -> str:
        if self._stream is None:
            raise ConnectionClosedError("the connection is not open (use 'async with')")
        return self._stream

    async def send(self, data: bytes | str | Any) -> None:
        await self._client.call("stream_send", stream=self._id(), **_wire(data))

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> DaemonMessage:
        stream = self._id()
        reply = await self._client.call("stream_receive", stream=stream, timeout=timeout)

        async def answer(wire: dict[str, str]) -> None:
            await self._client.call("stream_send", stream=stream, **wire)

        return _message(reply["message"], answer)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the peer acknowledged everything sent so far; raise if it never will."""
        reply = await self._client.call("stream_drain", stream=self._id(),
                                           timeout=timeout or self._timeout)
        self._info.update(path=reply.get("path", self.path), rtt=reply.get("rtt", self.rtt))

    async def close(self) -> None:
        """Finish the stream and wait until the peer has every byte."""
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        await self._client.call("stream_close", stream=stream)

    async def abort(self) -> None:
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        with contextlib.suppress(ConnectionClosedError, DaemonNotRunningError):
            await self._client.call("stream_abort", stream=stream)

    async def _release(self) -> None:
        if self._owns_client:
            await self._client.close()


class DaemonListener:
    """Messages arriving on one of our ports, buffered by the daemon (mirrors :class:`Listener`).
    Several listeners (in any process) on one port share its buffer: each message goes to one."""

    def __init__(self, client: Client, port: int, owns_client: bool = False) -> None:
        self._client = client
        self.port = port
        self._owns_client = owns_client
        self._open = False

    async def __aenter__(self) -> DaemonListener:
        try:
            await self._client.call("listen", port=self.port)
        except BaseException:
            if self._owns_client:
                await self._client.close()
            raise
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            if self._open:
                self._open = False
                with contextlib.suppress(DaemonNotRunningError):  # gone, and its ports with it
                    await self._client.call("unlisten", port=self.port)
        finally:
            if self._owns_client:
                await self._client.close()

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> DaemonMessage:
        if not self._open:
            raise ConnectionClosedError("the listener is not open (use 'async with')")
        return await self._client.receive(self.port, timeout)

    def __aiter__(self) -> AsyncIterator[DaemonMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[DaemonMessage]:
        while self._open:
            yield await self.receive(timeout=None)


# -- module-level calls ---------------------------------------------------------------------


def connect(target: str, port: int = DEFAULT_PORT, *, timeout: float = CONNECT_TIMEOUT,
            home: str | Path | None = None, node: Transport | None = None) -> Connection:
    """A connection to ``port`` on ``target`` (a hostname or node id); use with ``async with``."""
    if node is not None:
        return node.connect(target, port, timeout)
    return DaemonConnection(Client(home), target, port, timeout, owns_client=True)


async def send(target: str, port: int, data: bytes | str | Any, *,
               timeout: float = CONNECT_TIMEOUT, home: str | Path | None = None,
               node: Transport | None = None) -> None:
    """Deliver one message and wait until the peer has it."""
    if node is not None:
        await node.send(target, port, data, timeout)
        return
    async with Client(home) as client:
        await client.send(target, port, data, timeout)


async def receive(port: int, timeout: float | None = DEFAULT_TIMEOUT, *,
                  home: str | Path | None = None, node: Transport | None = None) -> Message:
    """One message on ``port``. Through a daemon that already listens on ``port`` (its inbox
    ports, 1001 by default) it is the next buffered one; otherwise the port is listened on just
    for this call."""
    if node is not None:
        return await node.receive(port, timeout)
    async with Client(home) as client:
        message = await client.receive(port, timeout)
    message_id = message.message_id

    async def reply(wire: dict[str, str]) -> None:  # its client is closed: use a new one
        async with Client(home) as replier:
            await replier.call("reply", message=message_id, **wire)

    message._reply = reply
    return message


def listen(port: int, *, home: str | Path | None = None,
           node: Transport | None = None) -> Listener:
    """Messages on ``port``; use with ``async with`` and ``async for``."""
    if node is not None:
        return node.listen(port)
    return DaemonListener(Client(home), port, owns_client=True)


if TYPE_CHECKING:
    def _both_are_transports(node: Node, client: Client) -> list[Transport]:
        """Never called: mypy checks here that both implement the interface."""
        return [node, client]


__all__ = [
    "Client", "DaemonConnection", "DaemonListener", "DaemonMessage", "connect", "listen",
    "receive", "send",
]
