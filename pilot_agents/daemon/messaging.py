"""Ports, streams and messages: ``listen``/``receive``/``reply``, ``connect``/``stream_*``,
``send``. Each listened port and each stream has a pump that moves messages from the Node into
an :class:`Inbox` the IPC clients read."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .. import ipc
from ..errors import (
    BadRequestError,
    BusyError,
    ConfigError,
    ConnectionClosedError,
    DaemonNotRunningError,
    PilotError,
    PilotTimeoutError,
    PortBusyError,
    PortInUseError,
)
from ..node.busy import while_busy
from ..node.connection import Connection, Listener, Message
from .context import DaemonContext
from .dispatch import Credit, DispatchTable, Push, Reply
from .inbox import Inbox, MessageMemory, Refuse, ReplyPaths, WayBack
from .requests import (
    AckRequest,
    ConnectRequest,
    DeliverRequest,
    ListenRequest,
    ReceiveRequest,
    ReplyRequest,
    RequeueRequest,
    SendRequest,
    StreamAbortRequest,
    StreamArrivalRequest,
    StreamCloseRequest,
    StreamDrainRequest,
    StreamHoldRequest,
    StreamReceiveRequest,
    StreamSendRequest,
    UnlistenRequest,
)
from .spool import UNREAD_FILE, save_unread, take_unread

log = logging.getLogger("pilot_agents.daemon")

Publish = Callable[[list[bytes]], None]  # sends one multipart message on the PUB socket


@dataclass(eq=False)  # itself, not its fields: a client's listens are counted by it
class PortState:
    port: int
    listener: Listener
    inbox: Inbox
    refs: int = 1
    permanent: bool = False
    publish: bool = False
    exclusive: bool = False  # its one listen takes every message: no other listen is allowed
    # Listened on by restore_unread for the messages a previous daemon kept, and by no client
    # yet: the first exclusive listen takes that listen over (else none could ever come).
    restored: bool = False
    task: asyncio.Task[None] | None = None
    received: int = 0
    # Its data sockets (daemon/portsock.py): ended when it closes.
    attached: list[Attachment] = field(default_factory=list)


class Attachment(Protocol):
    """The data socket a stream's or a port's messages go through once attached
    (daemon/datasock.py, daemon/portsock.py)."""

    def end(self, error: PilotError) -> None: ...  # the stream or port is gone: say so, close


class StreamAttachment(Attachment, Protocol):
    """A stream's data socket (daemon/datasock.py)."""

    def returned(self, message: Message) -> None: ...  # handed out before it, and given back


@dataclass
class StreamState:
    stream_id: str
    conn: Connection
    peer: str
    hostname: str | None
    port: int
    inbox: Inbox
    task: asyncio.Task[None] | None = None
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # receives, deliveries, drains and waits for room using it now
    attached: Attachment | None = None  # its data socket: its messages go there only

    @property
    def label(self) -> str:
        return self.hostname or self.peer


class Messaging:
    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        self.ports: dict[int, PortState] = {}
        self.streams: dict[str, StreamState] = {}
        self._opening = 0  # connects under way: streams too, for max_streams
        opts = ctx.options
        # What a stream may hold past its bound before a quiet send on it is refused: what a
        # client that waits for its confirmed sends can have put there, one window and one
        # confirmed message (docs/ipc.md, Quiet sends).
        self._quiet_allowance = ipc.MAX_SEND_WINDOW_BYTES + opts.max_payload_bytes
        self.memory = MessageMemory(opts.message_memory, opts.requeue_memory_bytes, opts.ack_wait)
        self.replies = ReplyPaths()
        self.publish: Publish | None = None  # set once the PUB socket is bound

    def register(self, table: DispatchTable) -> None:
        table.add(ConnectRequest, self.connect)
        table.add_immediate(StreamSendRequest, self.stream_send)
        table.add(StreamReceiveRequest, self.stream_receive)
        table.add(StreamDrainRequest, self.stream_drain)
        table.add(StreamCloseRequest, self.stream_close)
        table.add(StreamAbortRequest, self.stream_abort)
        table.add(StreamHoldRequest, self.stream_hold)
        table.add(StreamArrivalRequest, self.stream_arrival)
        table.add(SendRequest, self.send)
        table.add(ListenRequest, self.listen)
        table.add(UnlistenRequest, self.unlisten)
        table.add(ReceiveRequest, self.receive)
        table.add_immediate(ReplyRequest, self.reply)
        table.add(RequeueRequest, self.requeue_request)
        table.add(AckRequest, self.ack)
        table.add_delivery(DeliverRequest, self.deliver)

    def _inbox(self, what: str, refuse: Refuse | None = None) -> Inbox:
        opts = self.ctx.options
        return Inbox(what, opts.inbox_messages, opts.inbox_bytes, refuse)

    def explain_stream(self, exc: PilotError, stream: StreamState) -> PilotError:
        """The Node's error for the client; if the stream died because the peer's node
        restarted, it says from where the old node acknowledged nothing, so that the client
        may send that again on a new stream (docs/ipc.md, Streams across a peer's restart)."""
        explained = self.ctx.explain(exc, stream.peer, stream.label, stream.port)
        unseen = stream.conn.unseen_after_restart()
        return explained if unseen is None else ipc.mark_restarted(explained, unseen)

    # -- commands: streams ------------------------------------------------------------------

    async def connect(self, req: ConnectRequest) -> Reply:
        limit = self.ctx.options.max_streams
        if len(self.streams) + self._opening >= limit:
            raise BusyError(f"this daemon has {limit} streams open (DaemonOptions.max_streams): "
                            "close one first (stream_close, or close a connection)")
        self._opening += 1
        try:
            return await self._connect(req)
        finally:
            self._opening -= 1

    async def _connect(self, req: ConnectRequest) -> Reply:
        target = await self.ctx.trusted_target(req.target)
        conn = self.ctx.node.connect(target.node_arg, req.port, req.timeout)
        try:
            await conn.__aenter__()
        except PilotError as exc:
            raise self.ctx.explain(exc, target.node_id, target.label, req.port) from None
        self.ctx.store.confirm(target.node_id)
        stream = StreamState(
            "s" + secrets.token_hex(8), conn, target.node_id, target.hostname, req.port,
            self._inbox(f"the connection to {target.label} port {req.port}"))
        stream.task = asyncio.create_task(self._pump_stream(stream))
        conn.set_taker(functools.partial(_offer, stream.inbox))
        self.streams[stream.stream_id] = stream
        return {"stream": stream.stream_id, "peer": target.node_id, "hostname": target.hostname,
                "port": req.port, "path": conn.path, "rtt": conn.rtt}

    def stream_send(self, req: StreamSendRequest) -> Reply | Awaitable[Reply]:
        """Sent at once; if the stream's send buffer is full, what the reply waits for."""
        stream = self._unattached(req.stream)
        data = req.payload()
        if req.quiet:
            self._check_overshoot(stream.conn.overshoot, f"the stream {req.stream}")
        try:
            # A quiet one is not waited for: its data is queued all the same, and the client's
            # confirmed sends on the stream (one per half window) wait for room instead. A task
            # per quiet send would count against the client's requests in flight, and one
            # stuck stream would use them up for all the client's others.
            if stream.conn.write(data) or req.quiet:
                return {"bytes": len(data)}
        except PilotError as exc:
            raise self.explain_stream(exc, stream) from None
        return self._stream_room(stream, len(data))

    def _check_overshoot(self, overshoot: int, what: str) -> None:
        """Refuse a quiet send on a stream that holds more past its bound than the allowance:
        else a client that never waited would grow it without bound."""
        allowed = self._quiet_allowance
        if overshoot > allowed:
            raise BusyError(
                f"{what} already holds {overshoot} bytes past its bound, more than the "
                f"{allowed} a client may add without waiting: this quiet send was not taken; "
                "wait for a confirmed send on the stream before sending more (docs/ipc.md, "
                "Quiet sends)")

    async def _stream_room(self, stream: StreamState, size: int) -> Reply:
        with self._using(stream):
            try:
                await stream.conn.room()
            except PilotError as exc:
                raise self.explain_stream(exc, stream) from None
        return {"bytes": size}

    async def stream_receive(self, req: StreamReceiveRequest) -> Reply:
        stream = self._unattached(req.stream)
        with self._using(stream):
            message = await stream.inbox.get(req.timeout)
        return {"message": self._message_fields(message, stream.inbox, ack=req.ack)}

    async def stream_drain(self, req: StreamDrainRequest) -> Reply:
        stream = self._unattached(req.stream)
        with self._using(stream):
            try:
                await stream.conn.drain(req.timeout)
            except PilotError as exc:
                raise self.explain_stream(exc, stream) from None
        return {"path": stream.conn.path, "rtt": stream.conn.rtt}

    async def stream_close(self, req: StreamCloseRequest) -> Reply:
        stream = self._unattached(req.stream)
        self.drop_stream(stream, abort=False)
        try:
            await stream.conn.close()
        except PilotError as exc:
            await stream.conn.abort()
            raise self.explain_stream(exc, stream) from None
        return {}

    async def stream_abort(self, req: StreamAbortRequest) -> Reply:
        self.drop_stream(self._stream(req.stream), abort=True)
        return {}

    async def stream_hold(self, req: StreamHoldRequest) -> Reply:
        """The client waits up to ``timeout`` s for an answer on the stream: until then its
        tunnel keeps trying a silent peer (it may be restarting) instead of giving up."""
        self._stream(req.stream).conn.hold_tunnel(req.timeout)
        return {}

    async def stream_arrival(self, req: StreamArrivalRequest) -> Reply:
        if req.stream is not None and req.message is None:
            return {"since": await self._stream(req.stream).conn.since_arrival()}
        if req.message is not None and req.stream is None:
            return {"since": self.replies.find(req.message).since_arrival()}
        raise BadRequestError("'stream_arrival' needs either a 'stream' or a 'message'")

    # -- commands: one-shot messages and ports ------------------------------------------------

    async def send(self, req: SendRequest) -> Reply:
        target = await self.ctx.trusted_target(req.target)
        data = req.payload()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.timeout
        # The timeout bounds the delivery too: a peer whose port's inbox is full takes no more
        # until that port is read there (one-shot messages wait meanwhile, and past the port's
        # share of them it refuses more: while_busy tries again until the timeout).
        unread = PilotTimeoutError(
            f"{target.label} port {req.port} did not take the message within {req.timeout:g} s "
            "(is its inbox full? it takes more once that port is read there)")

        async def attempt() -> tuple[str, float | None]:
            async with self.ctx.node.connect(target.node_arg, req.port,
                                             deadline - loop.time()) as conn:
                path, rtt = conn.path, conn.rtt
                try:
                    async with asyncio.timeout_at(deadline):
                        await conn.send(data)
                        await conn.close()  # delivered: the peer's node has every byte
                except TimeoutError:
                    raise unread from None
                return path, rtt

        try:
            try:
                path, rtt = await while_busy(attempt, deadline)
            except PortBusyError:
                raise unread from None
        except PilotError as exc:
            raise self.ctx.explain(exc, target.node_id, target.label, req.port) from None
        self.ctx.store.confirm(target.node_id)
        return {"peer": target.node_id, "hostname": target.hostname, "port": req.port,
                "bytes": len(data), "path": path, "rtt": rtt}

    async def listen(self, req: ListenRequest) -> Reply:
        state, created = self.listen_port(req.port, publish=req.publish, exclusive=req.exclusive)
        result: Reply = {"port": req.port, "created": created, "publish": state.publish,
                         "exclusive": state.exclusive}
        if state.publish:
            result["pub_endpoint"] = ipc.pub_endpoint(self.ctx.home)
            result["topic"] = f"{req.port:05d}"
        return result

    async def unlisten(self, req: UnlistenRequest) -> Reply:
        state = self.ports.get(req.port)
        if state is None:
            raise ConfigError(f"port {req.port} is not being listened on")
        if state.exclusive and state.attached:
            # Its one listen is a data socket's, which gives it back as it closes: an unlisten
            # is another client's, and would close the port under it (mcp serve's, say).
            raise _held(req.port, "stop it to close the port")
        return {"port": req.port, "closed": self.release_port(state)}

    async def receive(self, req: ReceiveRequest) -> Reply:
        # A reference of its own for the call: a port nobody listens on is listened on just
        # for it, and closes when the last such call ends.
        state = self.listen_port(req.port)[0]
        try:
            self._receivable(req.port)
            message = await state.inbox.get(req.timeout)
        finally:
            self.release_port(state)
        return {"message": self._message_fields(message, state.inbox, ack=req.ack)}

    async def deliver(self, req: DeliverRequest, push: Push, credit: Credit) -> Reply:
        """Push the messages of a port or a stream to the client as they come, within its
        credit, until it cancels the request (or the port or stream goes away)."""
        if (req.port is None) == (req.stream is None):
            raise BadRequestError("'deliver' needs either a 'port' or a 'stream'")
        if req.stream is not None:
            stream = self._unattached(req.stream)
            with self._using(stream):
                return await self._push_all(stream.inbox, push, credit, ack=req.ack)
        state = self._receivable(req.port)
        if state.exclusive and state.attached:
            # Its data socket is the one reader it allows: another client's delivery would take
            # messages from under it (an MCP session's, each of its stream).
            raise _held(state.port, "stop it, or use another port")
        return await self._push_all(state.inbox, push, credit, ack=req.ack)

    async def _push_all(self, inbox: Inbox, push: Push, credit: Credit, *, ack: bool) -> Reply:
        ended = False

        def take(message: Message) -> bool:  # the inbox hands over a message as it comes
            nonlocal ended
            if ended or not credit.available():
                return False  # it stays queued
            if not self._hand_out(message, inbox, push, credit, ack=ack):
                ended = True
                inbox.changed()  # wakes the loop below, to end the delivery
            return True

        inbox.add_taker(take)
        try:
            while not ended:
                await credit.wait()
                message = inbox.get_nowait()
                if message is None:  # new messages come through take()
                    await inbox.wait_until(lambda: ended or inbox.ready())
                elif not self._hand_out(message, inbox, push, credit, ack=ack):
                    break
            return {"done": True}
        finally:
            inbox.remove_taker(take)

    def _hand_out(self, message: Message, inbox: Inbox, push: Push, credit: Credit, *,
                  ack: bool) -> bool:
        """Push one message to the client; False if it could not be (the client is gone or
        does not read): the message goes back, even if its payload was too large for the
        requeue memory."""
        credit.take(len(message.data))
        handed = self._message_fields(message, inbox, ack=ack)
        if push({"message": handed}):
            return True
        if not self.memory.requeue(handed["id"]):
            inbox.push_front(message)
        return False

    def reply(self, req: ReplyRequest) -> Reply | Awaitable[Reply]:
        """Sent at once, as :meth:`stream_send`."""
        way = self.replies.find(req.message)
        data = req.payload()
        if req.quiet:
            self._check_overshoot(way.overshoot, f"the stream message {req.message} came on")
        try:
            if way.write(data) or req.quiet:  # as in stream_send
                return {"bytes": len(data)}
        except PilotError as exc:
            raise self.explain_way(exc, way) from None
        return self._way_room(way, len(data))

    async def _way_room(self, way: WayBack, size: int) -> Reply:
        try:
            await way.room()
        except PilotError as exc:
            raise self.explain_way(exc, way) from None
        return {"bytes": size}

    def explain_way(self, exc: PilotError, way: WayBack) -> PilotError:
        """The Node's error on a way back, for the client that replied."""
        return self.ctx.explain(exc, way.peer_id, self.ctx.label(way.peer_id), None)

    async def requeue_request(self, req: RequeueRequest) -> Reply:
        return {"requeued": self.memory.requeue(req.message)}

    async def ack(self, req: AckRequest) -> Reply:
        return {"acked": self.memory.ack(req.message)}

    def requeue(self, message_id: str) -> bool:
        """A reply carrying this message could not be handed to its client: it goes back."""
        return self.memory.requeue(message_id)

    def _receivable(self, port: int | None) -> PortState:
        state = self.ports.get(port) if port is not None else None
        if state is None:
            raise ConfigError(f"port {port} is not being listened on: send 'listen' first")
        if state.publish:
            raise self._published(state.port)
        return state

    def _published(self, port: int) -> ConfigError:
        return ConfigError(f"port {port} is published on {ipc.pub_endpoint(self.ctx.home)}: "
                           f"subscribe there (topic {port:05d})")

    def listen_to_read(self, port: int, *, exclusive: bool = False) -> PortState:
        """Listen on ``port`` for a reader of its messages (a port's data socket): not on a
        published port, whose messages go to subscribers. Undone by :meth:`release_port`."""
        state = self.ports.get(port)
        if state is not None and state.publish:
            raise self._published(port)
        return self.listen_port(port, exclusive=exclusive)[0]

    def _message_fields(self, message: Message, inbox: Inbox, *, ack: bool) -> Reply:
        """A handed-out message as the reply's ``message``; its payload stays bytes, for the
        server to send as a frame or as JSON text."""
        way = message.way_back
        message_id = self.memory.remember(message, inbox, ack=ack,
                                          stream=None if way is None else self.replies.key(way))
        return {
            "id": message_id, "from": message.sender,
            "hostname": self.ctx.label_or_none(message.sender), "port": message.port,
            "source_port": message.source_port, "data": message.data,
        }

    # -- ports --------------------------------------------------------------------------------

    def listen_port(self, port: int, *, permanent: bool = False, publish: bool = False,
                    exclusive: bool = False) -> tuple[PortState, bool]:
        state = self.ports.get(port)
        if state is not None:
            if exclusive and state.restored and state.refs == 1:
                state.restored = False
                state.exclusive = True
                return state, False
            # Listens of a port share its messages, each to one of them: a listener whose
            # messages belong together (an MCP server's sessions, each a stream) would lose
            # some to the other, silently, so it asks to be alone, and is alone.
            if exclusive:
                raise PortInUseError(
                    f"port {port} is already listened on by another listener of this daemon "
                    "(another server?): stop it, or use another port")
            if state.exclusive:
                raise _held(port, "stop it, or use another port")
            state.refs += 1
            state.permanent = state.permanent or permanent
            state.publish = state.publish or publish
            return state, False
        listener = self.ctx.node.listen(port)
        state = PortState(port, listener, self._inbox(f"port {port}", self.ctx.node.refuse),
                          permanent=permanent, publish=publish, exclusive=exclusive)
        state.task = asyncio.create_task(self._pump_port(state))
        listener.set_taker(functools.partial(self._offered, state))
        self.ports[port] = state
        log.info("listening on port %d%s", port, " (published)" if publish else "")
        return state, True

    def release_port(self, state: PortState) -> bool:
        """One user of the port fewer (an unlisten, a receive ending, a client gone); the last
        closes it, unless it is permanent. True if it closed."""
        state.refs -= 1
        if state.refs > 0 or state.permanent:
            return False
        self.close_port(state)
        return True

    def close_port(self, state: PortState, why: PilotError | None = None) -> None:
        """Stop listening. Messages nobody read have their streams reset, so their senders
        hear (PortClosedError), as a closing listener of the embedded Node tells them. Its
        data sockets end with ``why`` (by default: the port was closed)."""
        if state.task is not None:
            state.task.cancel()
        closed = ConnectionClosedError(f"port {state.port} was closed")
        unread = state.inbox.close(closed)
        state.listener.close_now()
        self.ports.pop(state.port, None)
        # Now, not on a later turn of the loop: a stopping daemon closes the connections
        # right after, and a data socket without credit would not look at its inbox.
        for socket in list(state.attached):
            socket.end(why or closed)
        if unread:
            log.info("port %d closed with %d unread messages: their senders were told",
                     state.port, unread)
        log.info("stopped listening on port %d", state.port)

    async def _pump_port(self, state: PortState) -> None:
        while True:
            # Room first, then take: a message is never held outside an inbox's bounds, and
            # cancelling the pump never loses one.
            await state.inbox.wait_for_room()
            message = await state.listener.receive(timeout=None)
            if not self.ctx.store.is_trusted(message.sender):
                # Queued in the Node before 'trust remove': not handed to anyone.
                log.info("dropped a message on port %d from %s, no longer trusted",
                         state.port, message.sender)
                continue
            self._arrived(state, message)
            if state.publish and self.publish is not None:
                meta = {"from": message.sender, "hostname": self.ctx.label_or_none(
                    message.sender), "port": message.port, "source_port": message.source_port}
                self.publish([b"%05d" % state.port, json.dumps(meta).encode(), message.data])
            else:
                state.inbox.put(message)

    def _offered(self, state: PortState, message: Message) -> bool:
        """A message as the Node receives it: straight to a delivery that takes it now, or
        False, and the pump takes it as it comes (published ports always go the pump's way)."""
        if state.publish or not _offer(state.inbox, message):
            return False
        self._arrived(state, message)
        return True

    def _arrived(self, state: PortState, message: Message) -> None:
        state.received += 1
        self.ctx.store.confirm(message.sender)  # a tunnel came up: it trusts us

    # -- streams ------------------------------------------------------------------------------

    def _stream(self, stream_id: str) -> StreamState:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise ConnectionClosedError(f"no open stream {stream_id!r} (closed or expired)")
        stream.last_used = time.monotonic()
        return stream

    def _unattached(self, stream_id: str) -> StreamState:
        """A stream whose messages go through requests: not one with a data socket."""
        stream = self._stream(stream_id)
        if stream.attached is not None:
            raise BadRequestError(
                f"stream {stream_id!r} has a data socket: send, receive, drain and close it "
                "there (docs/ipc.md, Data sockets)")
        return stream

    def attachable(self, stream_id: str) -> StreamState:
        """The stream, if a data socket may take it over (docs/ipc.md, Data sockets)."""
        stream = self._stream(stream_id)
        if stream.attached is not None:
            raise BadRequestError(f"stream {stream_id!r} has a data socket already: a stream "
                                  "has one (close it, or open another stream with 'connect')")
        if stream.busy:
            raise BadRequestError(
                f"stream {stream_id!r} is in use by a receive, deliver, drain or a send waiting "
                "for room: attach it once those have ended (or before they start)")
        return stream

    def attach(self, stream: StreamState, socket: StreamAttachment) -> list[Message]:
        """Make ``socket`` (for an :meth:`attachable` stream) the stream's only way in and
        out; the messages its inbox held, in order, which go out on it first, as does a
        message handed out before and given back after. The caller then sets the stream's
        taker: from now on the Node's messages wait there, not here."""
        if stream.task is not None:
            # Cancelling loses nothing: a message the pump was woken for stays in the Node.
            stream.task.cancel()
            stream.task = None
        stream.attached = socket
        return stream.inbox.hand_over(socket.returned)

    async def _pump_stream(self, stream: StreamState) -> None:
        while True:
            await stream.inbox.wait_for_room()
            try:
                message = await stream.conn.receive(timeout=None)
            except PilotError as exc:
                stream.inbox.fail(self.explain_stream(exc, stream))
                return
            stream.inbox.put(message)

    def drop_stream(self, stream: StreamState, *, abort: bool,
                    why: PilotError | None = None) -> None:
        self.streams.pop(stream.stream_id, None)
        if stream.task is not None:
            stream.task.cancel()
        stream.conn.set_taker(None)  # as its pump, it takes nothing more
        # Its receives, deliveries and data socket end now rather than wait for a message that
        # can't come.
        closed = ConnectionClosedError(f"stream {stream.stream_id} was closed")
        stream.inbox.fail(closed)
        if stream.attached is not None:
            stream.attached.end(why or closed)
        if abort:
            with contextlib.suppress(Exception):
                stream.conn.abort_now()

    def drop_streams_to(self, node_id: str) -> None:
        for stream in list(self.streams.values()):
            if stream.peer == node_id:
                self.drop_stream(stream, abort=True)

    def drop_messages_from(self, node_id: str) -> int:
        """At 'trust remove': the peer's messages waiting in the port inboxes, or handed out and
        awaiting an ack, are dropped, never handed to an application after it (streams to the
        peer go with :meth:`drop_streams_to`). How many."""
        dropped = self.memory.forget_from(node_id)
        for state in self.ports.values():
            dropped += state.inbox.purge(lambda m: m.sender == node_id)
        return dropped

    def drop_idle_streams(self) -> None:
        now = time.monotonic()
        limit = self.ctx.options.stream_idle_timeout
        for stream in list(self.streams.values()):
            # An attached stream is used by its data socket, which the daemon does not watch
            # message by message: it lives as long as that connection.
            if stream.busy == 0 and stream.attached is None and now - stream.last_used > limit:
                log.info("stream %s to %s idle for %.0f s: aborted", stream.stream_id,
                         stream.peer, now - stream.last_used)
                self.drop_stream(stream, abort=True)

    @contextlib.contextmanager
    def _using(self, stream: StreamState) -> Iterator[None]:
        stream.busy += 1
        try:
            yield
        finally:
            stream.busy -= 1
            stream.last_used = time.monotonic()

    async def close_all(self) -> str | None:
        """Stop taking messages, and keep the port messages no client has read (nor acked) in
        the home for the next daemon: the Node already acknowledged them to their senders.
        What was lost if they could not be kept (the file could not be written: a full disk,
        say), logged; None if nothing was."""
        # Data sockets hear what a client of a stopping daemon hears on its own socket.
        stopping = DaemonNotRunningError(
            f"the daemon (home {self.ctx.home}) went away: it is stopping")
        for stream in list(self.streams.values()):
            self.drop_stream(stream, abort=True, why=stopping)
        ports = list(self.ports.values())
        for state in ports:
            state.listener.set_taker(None)
            if state.task is not None:
                state.task.cancel()
        await asyncio.gather(*(s.task for s in ports if s.task), return_exceptions=True)
        unacked = self.memory.unacked()
        unread: list[Message] = []
        for state in ports:
            if not state.publish:
                unread += [m for inbox, m in unacked if inbox is state.inbox]
                unread += state.inbox.drain()
                # Taken before the listener closes (a close resets the streams of messages
                # still in the Node, telling their senders they were not delivered); from the
                # close on, the Node refuses new messages for the port.
                unread += await _taken_from(state.listener)
            self.close_port(state, stopping)
        if not unread:
            return None
        try:
            save_unread(self.ctx.home, unread)
        except OSError as exc:
            # The stop goes on all the same (the node, the trust store, the sockets, the lock).
            lost = (f"lost {len(unread)} unread messages: cannot write {UNREAD_FILE} in "
                    f"{self.ctx.home}: {exc.strerror or exc}")
            log.error("%s", lost)
            return lost
        return None

    def restore_unread(self) -> None:
        """Put the messages a previous daemon kept back into their ports' inboxes, ahead of
        anything new (beyond the inboxes' bounds if need be: they were accepted already).
        Those of senders no longer trusted (removed from trust.json while it was stopped) are
        dropped: a removed peer's words reach no application."""
        untrusted = 0
        for message in take_unread(self.ctx.home):
            if not self.ctx.store.is_trusted(message.sender):
                untrusted += 1
                continue
            state = self.ports.get(message.port)
            if state is None:
                state = self.listen_port(message.port)[0]
                state.restored = True
            state.inbox.put(message)
        if untrusted:
            log.warning("dropped %d kept unread messages from senders no longer trusted",
                        untrusted)


def _offer(inbox: Inbox, message: Message) -> bool:
    """:meth:`Inbox.offer`, called by the Node as a datagram's events are dispatched: an error
    must not reach that dispatch (the rest of the events, the timers), so it is logged, and the
    message counts as taken (at most once: it may have gone out already)."""
    try:
        return inbox.offer(message)
    except Exception:
        log.exception("failed to hand a message to its delivery (the daemon carries on)")
        return True


async def _taken_from(listener: Listener) -> list[Message]:
    """What the Node still holds for a listener. The last (empty) wait returns with nothing more
    queued, so a close right after it leaves nothing behind."""
    messages = []
    while True:
        try:
            messages.append(await listener.receive(timeout=0))
        except PilotError:
            return messages


def _held(port: int, remedy: str) -> PortInUseError:
    return PortInUseError(f"port {port} is held by a listener that takes all its messages (a "
                          f"server such as 'pilotctl mcp serve'): {remedy}")
