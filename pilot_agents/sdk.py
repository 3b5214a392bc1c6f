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

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .datasocket import PortSocket, StreamSocket
from .errors import (
    BadRequestError,
    ConfigError,
    ConnectionClosedError,
    DaemonNotRunningError,
    PilotError,
    PilotTimeoutError,
)
from .ipc import (
    COMPACT_REPLY,
    COMPACT_STREAM_SEND,
    MAX_CREDIT_BYTES,
    MAX_CREDIT_MESSAGES,
    MAX_SEND_WINDOW_BYTES,
    REQUEST_TIMEOUT,
    IpcClient,
    daemon_pid,
    decode_data,
    error_of,
    resolve_home,
    unseen_after_restart,
)
from .node.connection import framed_size
from .transport import (
    CONNECT_TIMEOUT,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    Connection,
    Hangups,
    Listener,
    Message,
    Payload,
    Transport,
    encode_payload,
)

if TYPE_CHECKING:
    from .node.node import Node

log = logging.getLogger("pilot_agents.sdk")
A = TypeVar("A")  # what an attach gives


@dataclass(frozen=True)
class ClientOptions:
    """How a :class:`Client` talks to its daemon."""

    # Seconds to wait for a reply beyond the request's own timeout (or at all, without one)
    # before asking whether the daemon still answers (ipc.IpcClient.margin).
    answer_margin: float = REQUEST_TIMEOUT
    # What the daemon may push ahead of the application's receives on one listener or
    # connection (IPC 'deliver' credit): messages, and payload bytes (overshot by one message
    # at most). A client that stops receiving stops the pushes there, and so its senders.
    receive_window_messages: int = 64
    receive_window_bytes: int = 4 * 1024 * 1024
    # What a client may have sent on one stream (a connection's sends, the replies on the
    # stream a message came on) that the daemon has not yet confirmed taking (IPC "quiet"
    # sends, one confirmed request per half window): messages, and payload bytes (overshot by
    # one message at most). A send beyond it waits, so a peer that stops reading stops the
    # sends on its stream, and those only. At most ipc.MAX_SEND_WINDOW_BYTES (16 MiB): past
    # that the daemon refuses quiet sends.
    send_window_messages: int = 64
    send_window_bytes: int = 4 * 1024 * 1024
    # Talk to the daemon on its plain unix stream socket (stream.sock) when it has one: the
    # same requests at less cost per message than its ZeroMQ socket (docs/ipc.md).
    stream_socket: bool = True
    # On the stream socket, give each connection's messages a connection of their own to the
    # daemon (docs/ipc.md, Data sockets): a frame per message, the socket's buffers for flow
    # control. Its windows are the receive and send windows above.
    data_sockets: bool = True

    def __post_init__(self) -> None:
        if self.answer_margin <= 0:
            raise ConfigError("ClientOptions.answer_margin must be more than 0 seconds")
        for name in ("receive_window_messages", "receive_window_bytes", "send_window_messages",
                     "send_window_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ClientOptions.{name} must be at least 1")
        # What the daemon takes as a listener's credit (docs/ipc.md).
        if (self.receive_window_messages > MAX_CREDIT_MESSAGES
                or self.receive_window_bytes > MAX_CREDIT_BYTES):
            raise ConfigError(f"ClientOptions.receive_window_messages can be at most "
                              f"{MAX_CREDIT_MESSAGES}, and receive_window_bytes at most "
                              f"{MAX_CREDIT_BYTES}")
        if self.send_window_bytes > MAX_SEND_WINDOW_BYTES:  # what the daemon lets a client
            raise ConfigError(f"ClientOptions.send_window_bytes can be at most "
                              f"{MAX_SEND_WINDOW_BYTES}")


ReplyFunction = Callable[[bytes], Awaitable[Any]]
SinceFunction = Callable[[], Awaitable[float | None]]
# Messages whose replies failed that a Client remembers, to raise at their next reply.
_REMEMBERED_REPLY_ERRORS = 1024
# What a compact verb is as a confirmed (JSON) request: its command, and the field naming what
# it is about.
_CONFIRMED = {COMPACT_STREAM_SEND: ("stream_send", "stream"), COMPACT_REPLY: ("reply", "message")}
# The longest wait the daemon takes (its requests' bound on a timeout, docs/ipc.md).
_LONGEST_TIMEOUT = 7 * 86400.0
# Streams whose send windows a Client keeps; beyond, the longest unused one is forgotten (its
# next sends start a window afresh: at most half a window more goes unconfirmed).
_MAX_FLOWS = 1024


@dataclass
class DaemonMessage(Payload):
    """A message received through the daemon (the same fields as :class:`Message`)."""

    data: bytes
    sender: str  # node id
    port: int  # our port it arrived on
    source_port: int
    hostname: str | None = None  # the sender's name, if we know it
    message_id: str | None = None  # the daemon's id for it (IPC "reply")
    _reply: ReplyFunction | None = field(default=None, repr=False)
    _since: SinceFunction | None = field(default=None, repr=False)
    # A reply the daemon resets the stream of if its peer reads nothing of it for the daemon's
    # unread_replies_timeout: a port's data socket has one (the ways of reaching the daemon
    # that never wait there for room need none).
    _bounded_reply: ReplyFunction | None = field(default=None, repr=False)
    # Its stream's hang-ups, which only a port's data socket hears of.
    _hangups: Hangups | None = field(default=None, repr=False)

    async def reply(self, data: bytes | str | Any, *, stall: float | None = None) -> None:
        """Send a message back on the connection this one came from. ``stall``: if given, the
        daemon waits for room at most its ``unread_replies_timeout`` for a peer that reads
        nothing (the time is the daemon's, not this value)."""
        if self._reply is None:
            raise ConnectionClosedError("this message cannot be replied to")
        send = self._bounded_reply if stall is not None and self._bounded_reply else self._reply
        await send(encode_payload(data))

    async def since_arrival(self) -> float | None:
        """Seconds since bytes of the stream this message came on last reached the daemon
        (None: not known), whole messages or not."""
        return None if self._since is None else await self._since()

    def on_hangup(self, callback: Callable[[], object]) -> Callable[[], object] | None:
        """Call ``callback`` once the daemon says the stream this message came on can carry
        no reply, at once if it has; returns what undoes this. None: not on a listener's data
        socket, the one way that is told."""
        return None if self._hangups is None else self._hangups.add(callback)


def _message(fields: dict[str, Any], reply: ReplyFunction, client: Client) -> DaemonMessage:
    data = fields["data"]  # bytes when it came as a payload frame
    message_id = fields.get("id")
    return DaemonMessage(
        data=data if isinstance(data, bytes) else decode_data(data, fields["encoding"]),
        sender=fields["from"],
        port=fields["port"], source_port=fields["source_port"], hostname=fields.get("hostname"),
        message_id=message_id, _reply=reply,
        _since=functools.partial(client.arrival, message=message_id),
    )


class Client:
    """A connection to the daemon of ``home``; every call of the SDK goes through one.

        async with pilot.Client() as client:
            print(await client.info())
            async with client.connect("reporter-agent") as conn: ...
    """

    def __init__(self, home: str | Path | None = None,
                 options: ClientOptions | None = None) -> None:
        self.options = options or ClientOptions()
        self._ipc = IpcClient(home, self.options.answer_margin, self.options.stream_socket)
        self._pipeline = _Pipeline(self._ipc, self.options)
        self._reply_error: PilotError | None = None  # of a quiet reply, for flush()
        # The first error of each message's replies, by its id (of the latest that failed):
        # the next reply to the message raises it. One sink for every reply, not one each.
        self._path_errors: collections.OrderedDict[str, PilotError] = collections.OrderedDict()
        self._replies_sink = self._ipc.add_sink(self._reply_failed)
        self._ipc.orphan_errors = self._late_failure
        self._port_sockets: set[PortSocket] = set()  # the open listeners' data sockets

    @property
    def home(self) -> Path:
        return self._ipc.home

    async def __aenter__(self) -> Client:
        await self._ipc.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._pipeline.closed = True  # what it still waits for fails with the connection
        await self._ipc.close()

    async def flush(self) -> None:
        """Wait until the daemon has taken every reply (:meth:`DaemonMessage.reply`) sent so
        far, and raise the first error of a reply that failed since the last flush. A reply
        does not wait for the daemon (IPC ``quiet``): its error comes back later, so this is
        where an application that must know hears of it (it is logged in any case)."""
        await self._pipeline.settle()
        for sock in list(self._port_sockets):  # their replies do not pass the barrier below
            with contextlib.suppress(PilotError):  # a socket ended: its listener says why
                await sock.sync()
        # A barrier: the daemon starts a client's requests in order, and answers this one
        # (a requeue of no message) after every earlier reply had its go.
        await self.call("requeue", message="")
        error, self._reply_error = self._reply_error, None
        if error is not None:
            raise error

    def _reply_failed(self, error: PilotError, message_id: str) -> None:
        log.warning("a reply failed (raised by the next reply to that message, and by the "
                    "next Client.flush()): %s", error)
        if message_id and message_id not in self._path_errors:
            self._path_errors[message_id] = error
            if len(self._path_errors) > _REMEMBERED_REPLY_ERRORS:
                self._path_errors.popitem(last=False)
        if self._reply_error is None:
            self._reply_error = error

    async def _reply(self, flow: tuple[str, int, int], message_id: str, data: bytes) -> None:
        """A message's reply, sent without waiting for the daemon (IPC ``quiet``): one that
        fails there (the stream it came on has ended) is known only later, so the next reply
        to the same message raises it. A publisher answering a subscriber on its subscription
        message, again and again, so hears that the subscriber is gone."""
        error = self._path_errors.get(message_id)
        if error is not None:
            raise error
        await self._pipeline.send(COMPACT_REPLY, message_id, data, self._replies_sink, flow)

    def _late_failure(self, error: PilotError, about: str = "") -> None:
        """A quiet send or reply whose sender is gone (a message dropped after its reply, a
        connection closed): nobody is left to raise it to but :meth:`flush`."""
        log.warning("a send or reply failed after its sender was gone (raised by the next "
                    "Client.flush()): %s", error)
        if self._reply_error is None:
            self._reply_error = error

    async def _attached(self, attaching: Awaitable[A]) -> A:
        """A data socket's attach; refused, with the refusal explained as a request's is
        (:meth:`IpcClient.explain_refusal`): a daemon of older code may not know it."""
        try:
            return await attaching
        except BadRequestError as exc:
            raise await self._ipc.explain_refusal(exc) from None

    async def call(self, cmd: str, payload: bytes | None = None, **fields: Any) -> dict[str, Any]:
        """Any IPC command (docs/ipc.md); the reply's fields, or the error it reports raised.
        ``payload``: the message a command carries (``send``, ``stream_send``, ``reply``,
        ``publish``)."""
        if payload is None:
            return await self._ipc.request(cmd, **fields)
        return await self._ipc.carry(cmd, payload, **fields)

    # -- messaging ----------------------------------------------------------------------------

    def connect(self, target: str, port: int = DEFAULT_PORT,
                timeout: float = CONNECT_TIMEOUT) -> DaemonConnection:
        return DaemonConnection(self, target, port, timeout)

    async def send(self, target: str, port: int, data: bytes | str | Any,
                   timeout: float = CONNECT_TIMEOUT) -> None:
        await self.call("send", encode_payload(data), target=target, port=port, timeout=timeout)

    async def receive(self, port: int, timeout: float | None = DEFAULT_TIMEOUT) -> DaemonMessage:
        reply = await self.call("receive", port=port, timeout=timeout, data_frame=True)
        return self._port_message(reply["message"])

    def listen(self, port: int, *, exclusive: bool = False) -> DaemonListener:
        return DaemonListener(self, port, exclusive=exclusive)

    def _port_message(self, fields: dict[str, Any]) -> DaemonMessage:
        # A peer's stream to one of our ports is its node, our port and its source port.
        flow = (fields["from"], fields["port"], fields["source_port"])
        return _message(fields, functools.partial(self._reply, flow, fields["id"]), self)

    async def arrival(self, stream: str | None = None,
                      message: str | None = None) -> float | None:
        """IPC ``stream_arrival``: seconds since bytes of a ``stream`` of ours, or of the one
        a received ``message`` (its id) came on, last arrived; None if none did (or the
        message has no id)."""
        if stream is not None:
            reply = await self.call("stream_arrival", stream=stream)
        elif message is not None:
            reply = await self.call("stream_arrival", message=message)
        else:
            return None
        return None if reply["since"] is None else float(reply["since"])

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


def _ignore_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception never retrieved" at exit


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
        self._delivery: _Delivery | None = None
        self._sink: int | None = None  # where the daemon's errors of our quiet sends go
        self._failed: PilotError | None = None  # the first of those
        # The stream offset at which our next message starts in the daemon's stream, counted
        # here (no IPC per message) by the framing rule of the Node's own streams.
        self._written = 0
        self._holding: asyncio.Task[None] | None = None  # a stream_hold on its way
        self._hold_next: float | None = None  # the longest hold asked for meanwhile
        # On the stream socket: the stream's data socket, and the ports its messages carry
        # (ours, the peer's). Else its messages are requests and a delivery.
        self._data: StreamSocket | None = None
        self._ports = (0, port)

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

    @property
    def written(self) -> int:
        """The stream offset at which the next message sent starts, as the daemon's stream
        counts it (see :meth:`unseen_after_restart`). A message counts once it is handed to
        the daemon, which writes a client's messages to the stream in the order it gets them:
        so a position read before a send is never past where that send's message starts."""
        return self._written

    def hold_tunnel(self, timeout: float) -> None:
        """Someone waits ``timeout`` s for an answer on this stream: until then the daemon's
        tunnel keeps trying a silent peer (it may be restarting) instead of giving up on it.
        One small request (``stream_hold``), not waited for; its error, if any (the stream
        is gone), is of no use to anyone and is dropped. One at a time: a hold asked for while
        one is on its way goes after it (the longest of them), so none is lost."""
        if self._stream is None:
            return
        timeout = min(timeout, _LONGEST_TIMEOUT)
        if self._holding is not None and not self._holding.done():
            self._hold_next = max(self._hold_next or 0.0, timeout)
            return
        self._post_hold(self._stream, timeout)

    def _post_hold(self, stream: str, timeout: float) -> None:
        self._holding = asyncio.get_running_loop().create_task(
            self._client._ipc.post("stream_hold", stream=stream, timeout=timeout))
        self._holding.add_done_callback(self._held)

    def _held(self, task: asyncio.Task[None]) -> None:
        _ignore_outcome(task)
        timeout, self._hold_next = self._hold_next, None
        if timeout is not None and self._stream is not None:
            self._post_hold(self._stream, timeout)

    def unseen_after_restart(self) -> int | None:
        """If the stream died because the peer's node restarted: the stream offset (as
        :attr:`written`) from which its old node acknowledged nothing, as the daemon reported
        it with the stream's error (docs/ipc.md). None if the stream lives or died otherwise,
        or if a send of ours failed for another reason first (the count may be off then)."""
        error = self._failed
        if error is None and self._delivery is not None:
            error = self._delivery.error
        if error is None and self._data is not None:
            error = self._data.ended
        return unseen_after_restart(error)

    async def __aenter__(self) -> DaemonConnection:
        try:
            reply = await self._client.call("connect", target=self._target, port=self._port,
                                               timeout=self._timeout)
        except BaseException:
            await self._release()
            raise
        self._stream = reply["stream"]
        self._info = reply
        self._failed = None
        self._written = 0
        what = f"the connection to {self._target}"
        opts = self._client.options
        if opts.data_sockets and self._client._ipc.on_stream_socket:
            try:
                self._data, attached = await self._client._attached(StreamSocket.attach(
                    self._client.home, self._stream, what, opts.receive_window_messages,
                    opts.receive_window_bytes, opts.send_window_bytes))
            except BaseException:
                await self.abort()
                await self._release()
                raise
            self._ports = (attached["port"], attached["source_port"])
            return self
        self._sink = self._client._ipc.add_sink(self._send_failed)
        self._delivery = _Delivery(self._client, what, self._stream_message, stream=self._stream)
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
        """Hand a message to the daemon without waiting for it (see :class:`ClientOptions`
        ``send_window_*``). A send that fails in the daemon is raised by this connection's
        next :meth:`send`, :meth:`drain` or :meth:`close`."""
        stream = self._id()
        payload = encode_payload(data)
        if self._data is not None:
            await self._data.send(payload)
            self._written += framed_size(len(payload))
            return
        self._raise_failed()
        assert self._sink is not None
        await self._client._pipeline.send(COMPACT_STREAM_SEND, stream, payload, self._sink,
                                          stream)
        # Counted here: nothing awaits between handing the message to the daemon and this.
        self._written += framed_size(len(payload))

    def _send_failed(self, error: PilotError, _stream: str) -> None:
        if self._failed is None:
            self._failed = error
            # What the peer gets is no longer what was sent: the stream is done, for receives
            # too (a request waiting for the reply to a refused message would wait out its
            # timeout).
            if self._delivery is not None:
                self._delivery.fail(error)

    def _raise_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> DaemonMessage:
        stream = self._id()
        if self._data is not None:
            payload = await self._data.receive(timeout)
            return DaemonMessage(
                data=payload, sender=self.peer_id, port=self._ports[0],
                source_port=self._ports[1], hostname=self.hostname, _reply=self._answer,
                _since=functools.partial(self._client.arrival, stream=stream))
        assert self._delivery is not None
        return await self._delivery.receive(timeout)

    def _stream_message(self, fields: dict[str, Any]) -> DaemonMessage:
        # Called by the IPC client's reader for a message the daemon pushed: it must not raise
        # there (that ends the reader and the whole Client) when the connection has just been
        # aborted; answering such a message fails instead.
        return _message(fields, self._answer, self._client)

    async def _answer(self, data: bytes) -> None:
        if self._stream is None:
            raise ConnectionClosedError("the connection was closed")
        await self.send(data)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the peer acknowledged everything sent so far; raise if it never will."""
        stream = self._id()
        if self._data is not None:
            reply = await self._data.drain(timeout or self._timeout)
        else:
            try:
                reply = await self._client.call("stream_drain", stream=stream,
                                                   timeout=timeout or self._timeout)
            finally:
                self._raise_failed()
        self._info.update(path=reply.get("path", self.path), rtt=reply.get("rtt", self.rtt))

    async def since_arrival(self) -> float | None:
        """Seconds since bytes of the peer's side of the stream last reached the daemon (None:
        none yet), whole messages or not: a long message still arriving is not silence."""
        return await self._client.arrival(stream=self._id())

    async def close(self) -> None:
        """Finish the stream and wait until the peer has every byte."""
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        if self._data is not None:
            await self._data.close(self._client._ipc)
            return
        self._forget_delivery()
        try:
            await self._client.call("stream_close", stream=stream)
        finally:
            self._forget_sink()
            self._raise_failed()

    async def abort(self) -> None:
        """Reset the stream at once. What was sent on it is given up: a send failing in the
        daemon after this is dropped (logged), not raised by the client's next flush."""
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        if self._data is not None:
            self._data.abort()  # the daemon resets the stream as the socket drops
            return
        self._forget_delivery()
        self._forget_sink(abandoned=True)
        with contextlib.suppress(ConnectionClosedError, DaemonNotRunningError):
            await self._client.call("stream_abort", stream=stream)

    def _forget_sink(self, abandoned: bool = False) -> None:
        if self._sink is not None:
            self._client._ipc.remove_sink(self._sink, abandoned=abandoned)
            self._sink = None

    def _forget_delivery(self) -> None:
        """The stream goes, and what its delivery still holds with it (as a closed connection
        of the embedded Node drops its unread messages); the daemon ends the delivery."""
        if self._delivery is not None:
            self._delivery.forget()
            self._delivery = None

    async def _release(self) -> None:
        if self._owns_client:
            await self._client.close()


class DaemonListener:
    """Messages arriving on one of our ports, buffered by the daemon (mirrors :class:`Listener`).
    Several listeners (in any process) on one port share its buffer: each message goes to one;
    an ``exclusive`` one takes them all (no other listen of the port is allowed meanwhile, and
    it is refused with PortInUseError if the port is listened on already).
    On the stream socket they come on a data socket of the listener's own (docs/ipc.md), and
    its messages' replies go back on it: once the listener is closed, they fail. It takes
    nothing from the port before its first receive, then up to its receive window; closing it
    gives back what it did not receive."""

    def __init__(self, client: Client, port: int, owns_client: bool = False, *,
                 exclusive: bool = False) -> None:
        self._client = client
        self.port = port
        self._owns_client = owns_client
        self._exclusive = exclusive
        self._open = False
        self._socket: PortSocket | None = None
        self._delivery = _Delivery(client, f"port {port}", client._port_message, port=port)

    async def __aenter__(self) -> DaemonListener:
        client = self._client
        try:
            await client._ipc.open()
            opts = client.options
            if opts.data_sockets and client._ipc.on_stream_socket:
                self._socket = await client._attached(PortSocket.attach(
                    client.home, self.port, opts.receive_window_messages,
                    opts.receive_window_bytes, opts.send_window_messages, opts.send_window_bytes,
                    # The next reply on its way raises it (the socket keeps it), and flush().
                    functools.partial(client._reply_failed, message_id=""),
                    exclusive=self._exclusive))
                client._port_sockets.add(self._socket)
            else:
                # The field only when asked: a daemon of older code refuses one it does not know.
                exclusive: dict[str, Any] = {"exclusive": True} if self._exclusive else {}
                await client.call("listen", port=self.port, **exclusive)
        except BaseException:
            if self._owns_client:
                await client.close()
            raise
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            if self._open:
                self._open = False
                if self._socket is not None:
                    self._client._port_sockets.discard(self._socket)
                    # The daemon puts back what it wrote and we did not receive, and undoes
                    # the listen; gone, its ports went with it; stuck, this is raised.
                    await self._socket.close(self._client._ipc)
                    return
                with contextlib.suppress(DaemonNotRunningError):  # gone, and its ports with it
                    # What was pushed and not received goes back, in order, for another
                    # listener; if none is left, unlisten tells the senders.
                    for message in reversed(await self._delivery.stop()):
                        await self._client.call("requeue", message=message.message_id)
                    await self._client.call("unlisten", port=self.port)
        finally:
            if self._owns_client:
                await self._client.close()

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> DaemonMessage:
        if not self._open:
            raise ConnectionClosedError("the listener is not open (use 'async with')")
        if self._socket is None:
            return await self._delivery.receive(timeout)
        way, payload = await self._socket.receive(timeout)
        return DaemonMessage(
            data=payload, sender=way.sender, port=self.port, source_port=way.source_port,
            hostname=way.hostname, _reply=functools.partial(self._socket.reply, way),
            _bounded_reply=functools.partial(self._socket.reply, way, bounded=True),
            _since=functools.partial(self._socket.since_arrival, way), _hangups=way.hangups)

    def __aiter__(self) -> AsyncIterator[DaemonMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[DaemonMessage]:
        while self._open:
            yield await self.receive(timeout=None)


@dataclass
class _Flow:
    """One stream's send window in the :class:`_Pipeline`."""

    messages: int = 0  # since the last confirmed request
    bytes: int = 0
    confirmations: collections.deque[asyncio.Task[dict[str, Any]]] = field(
        default_factory=collections.deque)


class _Pipeline:
    """Commands that carry a message (``stream_send``, ``reply``) sent without waiting for the
    daemon: each goes ``"quiet"`` (answered only if it fails, the error to the sender's sink),
    except one per half window (``ClientOptions.send_window_*``) of its stream, answered as
    usual. A send that finds two of those unanswered on its stream waits for the older: so at
    most about one window per stream is unconfirmed, and a daemon that cannot pass messages
    on (the peer stopped reading) stops the sends on that stream. One window for the whole
    client would stop them all: one subscriber that stops reading would stall a publisher's
    feeds to every other."""

    def __init__(self, ipc: IpcClient, options: ClientOptions) -> None:
        self._ipc = ipc
        self._max_messages = options.send_window_messages
        self._max_bytes = options.send_window_bytes
        self._flows: collections.OrderedDict[object, _Flow] = collections.OrderedDict()
        self.closed = False

    async def send(self, verb: int, about: str, payload: bytes, sink: int,
                   flow: object) -> None:
        """``verb``: COMPACT_STREAM_SEND (``about`` the stream) or COMPACT_REPLY (the message
        replied to); ``flow`` names the stream the message goes on."""
        state = self._flow(flow)
        while len(state.confirmations) >= 2:
            await self._settled(state.confirmations.popleft())
        state.messages += 1
        state.bytes += len(payload)
        if 2 * state.messages < self._max_messages and 2 * state.bytes < self._max_bytes:
            await self._ipc.quiet(verb, about, payload, sink)
            return
        state.messages = state.bytes = 0
        cmd, field_name = _CONFIRMED[verb]
        task = await self._ipc.begin(cmd, payload, **{field_name: about})
        task.add_done_callback(functools.partial(self._confirmed, sink, about))
        state.confirmations.append(task)

    def _flow(self, flow: object) -> _Flow:
        flows = self._flows
        state = flows.get(flow)
        if state is not None:
            flows.move_to_end(flow)
            return state
        if len(flows) >= _MAX_FLOWS:
            # The longest unused with nothing to wait for: settle() waits for the others.
            idle = next((key for key, old in flows.items() if not old.confirmations), None)
            if idle is not None:
                del flows[idle]
        state = flows[flow] = _Flow()
        return state

    def _confirmed(self, sink: int, about: str, task: asyncio.Task[dict[str, Any]]) -> None:
        if task.cancelled() or self.closed:
            return
        error = task.exception()
        if isinstance(error, PilotError):
            self._ipc.fail_sink(sink, error, about)

    async def settle(self) -> None:
        """Wait for every confirmation requested so far."""
        for state in list(self._flows.values()):
            while state.confirmations:
                await self._settled(state.confirmations.popleft())

    @staticmethod
    async def _settled(task: asyncio.Task[dict[str, Any]]) -> None:
        with contextlib.suppress(Exception):  # its error went to its sink
            await task


class _Delivery:
    """The messages the daemon pushes for one port or stream (IPC ``deliver``), kept until the
    application receives them. Started by the first receive. Bounded: the daemon pushes only
    within the credit granted here, and credit comes back only as the application takes
    messages, so an application that stops receiving stops the pushes, then the daemon's inbox
    fills, then the tunnel's flow control stops the sender."""

    def __init__(self, client: Client, what: str,
                 make: Callable[[dict[str, Any]], DaemonMessage], **target: Any) -> None:
        self._client = client
        self._what = what
        self._make = make
        self._target = target
        self._queue: collections.deque[DaemonMessage] = collections.deque()
        self._error: PilotError | None = None
        self._request: int | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._taken_messages = 0  # since credit was last granted
        self._taken_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def error(self) -> PilotError | None:
        """Why the delivery ended, once it did."""
        return self._error

    async def receive(self, timeout: float | None) -> DaemonMessage:
        if self._request is None and self._error is None:
            opts = self._client.options
            self._loop = asyncio.get_running_loop()
            self._request = await self._client._ipc.deliver(
                self._on_reply, credit_messages=opts.receive_window_messages,
                credit_bytes=opts.receive_window_bytes, compact=True, **self._target)
        if not self._queue and self._error is None:
            await self._wait(timeout)
        if not self._queue:
            assert self._error is not None
            raise self._error
        message = self._queue.popleft()
        if self._taken(len(message.data)):
            try:
                await self._grant()
            except asyncio.CancelledError:
                self._queue.appendleft(message)  # the caller's still, at its next receive
                self._taken_messages -= 1  # (counted again then)
                self._taken_bytes -= len(message.data)
                raise
            except PilotError:
                pass  # the daemon went away: the next receive says so; this one is delivered
        return message

    async def _wait(self, timeout: float | None) -> None:
        # The loop the delivery started on (each get_running_loop() is a getpid() on 3.11).
        loop = self._loop or asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._queue and self._error is None:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                if deadline is None:  # no timer to arm and disarm per message
                    await waiter
                else:
                    async with asyncio.timeout_at(deadline):
                        await waiter
            except TimeoutError:
                raise PilotTimeoutError(
                    f"no message on {self._what} within {timeout:g} s") from None
            finally:
                if waiter in self._waiters:  # not woken: _on_reply empties the list
                    self._waiters.remove(waiter)

    def _taken(self, size: int) -> bool:
        """Count a message taken; True once half a window was: time to :meth:`_grant` (one
        small request per half window)."""
        self._taken_messages += 1
        self._taken_bytes += size
        opts = self._client.options
        return self._request is not None and (
            2 * self._taken_messages >= opts.receive_window_messages
            or 2 * self._taken_bytes >= opts.receive_window_bytes)

    async def _grant(self) -> None:
        messages, size = self._taken_messages, self._taken_bytes
        self._taken_messages = self._taken_bytes = 0
        try:
            await self._client._ipc.post("credit", request=self._request, messages=messages,
                                         bytes=size)
        except BaseException:
            # Granted again with the next: credit never granted would stop the deliveries
            # for good (granted twice, the daemon may send past the window once).
            self._taken_messages += messages
            self._taken_bytes += size
            raise

    def _on_reply(self, reply: dict[str, Any]) -> None:
        message = reply.get("message")
        if reply.get("ok") is True and isinstance(message, dict):
            self._queue.append(self._make(message))
        else:  # the last reply: the delivery ended
            self._request = None
            self._error = error_of(reply) if reply.get("ok") is not True else (
                ConnectionClosedError(f"the daemon stopped delivering {self._what}"))
        self._wake()

    def fail(self, error: PilotError) -> None:
        """Receives raise ``error`` once the messages already pushed are taken."""
        if self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def stop(self) -> list[DaemonMessage]:
        """End the delivery; the messages it pushed that nobody received, oldest first."""
        if self._request is not None:
            await self._client._ipc.end_delivery(self._request)
        self._request = None
        self.forget()
        unread = list(self._queue)
        self._queue.clear()
        return unread

    def forget(self) -> None:
        """Receive nothing more here (the daemon ends the delivery with its stream)."""
        self._request = None
        self.fail(ConnectionClosedError(f"{self._what} was closed"))


# -- module-level calls ---------------------------------------------------------------------


def daemon_running(home: str | Path | None = None) -> bool:
    """Whether a daemon runs for ``home`` now (default: $PILOT_HOME, else ~/.pilot-agents)."""
    return daemon_pid(resolve_home(home)) is not None


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

    async def reply(data: bytes) -> None:  # its client is closed: use a new one
        async with Client(home) as replier:
            await replier.call("reply", data, message=message_id)

    async def since() -> float | None:
        async with Client(home) as asker:
            return await asker.arrival(message=message_id)

    message._reply = reply
    message._since = since
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
    "Client", "ClientOptions", "DaemonConnection", "DaemonListener", "DaemonMessage", "connect",
    "listen", "receive", "send",
]
