"""Ports, streams and messages: ``listen``/``receive``/``reply``, ``connect``/``stream_*``,
``send``. Each listened port and each stream has a pump that moves messages from the Node into
an :class:`Inbox` the IPC clients read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .. import ipc
from ..errors import ConfigError, ConnectionClosedError, PilotError
from ..ipc import encode_data
from ..node.connection import Connection, Listener, Message
from .context import DaemonContext
from .dispatch import DispatchTable, Reply
from .inbox import Inbox, MessageMemory, ReplyFunction
from .requests import (
    ConnectRequest,
    ListenRequest,
    ReceiveRequest,
    ReplyRequest,
    RequeueRequest,
    SendRequest,
    StreamAbortRequest,
    StreamCloseRequest,
    StreamDrainRequest,
    StreamReceiveRequest,
    StreamSendRequest,
    UnlistenRequest,
)

log = logging.getLogger("pilot_agents.daemon")

Publish = Callable[[list[bytes]], None]  # sends one multipart message on the PUB socket


@dataclass
class PortState:
    port: int
    listener: Listener
    inbox: Inbox
    refs: int = 1
    permanent: bool = False
    publish: bool = False
    task: asyncio.Task[None] | None = None
    received: int = 0


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
    busy: int = 0

    @property
    def label(self) -> str:
        return self.hostname or self.peer


class Messaging:
    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        self.ports: dict[int, PortState] = {}
        self.streams: dict[str, StreamState] = {}
        self.memory = MessageMemory(ctx.options.message_memory)
        self.publish: Publish | None = None  # set once the PUB socket is bound

    def register(self, table: DispatchTable) -> None:
        table.add(ConnectRequest, self.connect)
        table.add(StreamSendRequest, self.stream_send)
        table.add(StreamReceiveRequest, self.stream_receive)
        table.add(StreamDrainRequest, self.stream_drain)
        table.add(StreamCloseRequest, self.stream_close)
        table.add(StreamAbortRequest, self.stream_abort)
        table.add(SendRequest, self.send)
        table.add(ListenRequest, self.listen)
        table.add(UnlistenRequest, self.unlisten)
        table.add(ReceiveRequest, self.receive)
        table.add(ReplyRequest, self.reply)
        table.add(RequeueRequest, self.requeue_request)

    def _explain(self, exc: PilotError, stream: StreamState) -> PilotError:
        return self.ctx.explain(exc, stream.peer, stream.label, stream.port)

    # -- commands: streams ------------------------------------------------------------------

    async def connect(self, req: ConnectRequest) -> Reply:
        target = await self.ctx.trusted_target(req.target)
        conn = self.ctx.node.connect(target.node_arg, req.port, req.timeout)
        try:
            await conn.__aenter__()
        except PilotError as exc:
            raise self.ctx.explain(exc, target.node_id, target.label, req.port) from None
        self.ctx.store.confirm(target.node_id)
        stream = StreamState(
            "s" + secrets.token_hex(8), conn, target.node_id, target.hostname, req.port,
            Inbox(f"the connection to {target.label} port {req.port}",
                  self.ctx.options.inbox_messages))
        stream.task = asyncio.create_task(self._pump_stream(stream))
        self.streams[stream.stream_id] = stream
        return {"stream": stream.stream_id, "peer": target.node_id, "hostname": target.hostname,
                "port": req.port, "path": conn.path, "rtt": conn.rtt}

    async def stream_send(self, req: StreamSendRequest) -> Reply:
        stream = self._stream(req.stream)
        data = req.payload()
        with self._using(stream):
            try:
                await stream.conn.send(data)
            except PilotError as exc:
                raise self._explain(exc, stream) from None
        return {"bytes": len(data)}

    async def stream_receive(self, req: StreamReceiveRequest) -> Reply:
        stream = self._stream(req.stream)
        with self._using(stream):
            message = await stream.inbox.get(req.timeout)
        return {"message": self._message_json(message, stream.inbox, stream.conn.send)}

    async def stream_drain(self, req: StreamDrainRequest) -> Reply:
        stream = self._stream(req.stream)
        with self._using(stream):
            try:
                await stream.conn.drain(req.timeout)
            except PilotError as exc:
                raise self._explain(exc, stream) from None
        return {"path": stream.conn.path, "rtt": stream.conn.rtt}

    async def stream_close(self, req: StreamCloseRequest) -> Reply:
        stream = self._stream(req.stream)
        self.drop_stream(stream, abort=False)
        try:
            await stream.conn.close()
        except PilotError as exc:
            await stream.conn.abort()
            raise self._explain(exc, stream) from None
        return {}

    async def stream_abort(self, req: StreamAbortRequest) -> Reply:
        self.drop_stream(self._stream(req.stream), abort=True)
        return {}

    # -- commands: one-shot messages and ports ------------------------------------------------

    async def send(self, req: SendRequest) -> Reply:
        target = await self.ctx.trusted_target(req.target)
        data = req.payload()
        try:
            async with self.ctx.node.connect(target.node_arg, req.port, req.timeout) as conn:
                path, rtt = conn.path, conn.rtt
                await conn.send(data)
        except PilotError as exc:
            raise self.ctx.explain(exc, target.node_id, target.label, req.port) from None
        self.ctx.store.confirm(target.node_id)
        return {"peer": target.node_id, "hostname": target.hostname, "port": req.port,
                "bytes": len(data), "path": path, "rtt": rtt}

    async def listen(self, req: ListenRequest) -> Reply:
        state, created = self.listen_port(req.port, publish=req.publish)
        result: Reply = {"port": req.port, "created": created, "publish": state.publish}
        if state.publish:
            result["pub_endpoint"] = ipc.pub_endpoint(self.ctx.home)
            result["topic"] = f"{req.port:05d}"
        return result

    async def unlisten(self, req: UnlistenRequest) -> Reply:
        state = self.ports.get(req.port)
        if state is None:
            raise ConfigError(f"port {req.port} is not being listened on")
        return {"port": req.port, "closed": self._unlisten(state)}

    async def receive(self, req: ReceiveRequest) -> Reply:
        state = self.ports.get(req.port)
        temporary = state is None
        if state is None:
            state, _ = self.listen_port(req.port)
        elif state.publish:
            raise ConfigError(
                f"port {req.port} is published on {ipc.pub_endpoint(self.ctx.home)}: subscribe "
                f"there (topic {req.port:05d})"
            )
        try:
            message = await state.inbox.get(req.timeout)
        finally:
            if temporary:
                self._unlisten(state)
        return {"message": self._message_json(message, state.inbox, message.reply)}

    async def reply(self, req: ReplyRequest) -> Reply:
        remembered = self.memory.get(req.message)
        if remembered is None:
            raise ConnectionClosedError(f"message {req.message!r} can no longer be replied to")
        data = req.payload()
        try:
            await remembered.reply(data)
        except PilotError as exc:
            sender = remembered.message.sender
            raise self.ctx.explain(exc, sender, self.ctx.label(sender), None) from None
        return {"bytes": len(data)}

    async def requeue_request(self, req: RequeueRequest) -> Reply:
        return {"requeued": await self.requeue(req.message)}

    async def requeue(self, message_id: str) -> bool:
        """Put a handed-out message back at the head of its inbox."""
        remembered = self.memory.pop(message_id)
        if remembered is None:
            return False
        await remembered.inbox.push_front(remembered.message)
        return True

    def _message_json(self, message: Message, inbox: Inbox, reply: ReplyFunction) -> Reply:
        message_id = self.memory.remember(message, inbox, reply)
        text, encoding = encode_data(message.data)
        return {
            "id": message_id, "from": message.sender,
            "hostname": self.ctx.label_or_none(message.sender), "port": message.port,
            "source_port": message.source_port, "data": text, "encoding": encoding,
        }

    # -- ports --------------------------------------------------------------------------------

    def listen_port(self, port: int, *, permanent: bool = False,
                    publish: bool = False) -> tuple[PortState, bool]:
        state = self.ports.get(port)
        if state is not None:
            state.refs += 1
            state.permanent = state.permanent or permanent
            state.publish = state.publish or publish
            return state, False
        listener = self.ctx.node.listen(port)
        state = PortState(port, listener, Inbox(f"port {port}", self.ctx.options.inbox_messages),
                          permanent=permanent, publish=publish)
        state.task = asyncio.create_task(self._pump_port(state))
        self.ports[port] = state
        log.info("listening on port %d%s", port, " (published)" if publish else "")
        return state, True

    def _unlisten(self, state: PortState) -> bool:
        state.refs -= 1
        if state.refs > 0 or state.permanent:
            return False
        self.close_port(state)
        return True

    def close_port(self, state: PortState) -> None:
        if state.task is not None:
            state.task.cancel()
        state.listener.close_now()
        self.ports.pop(state.port, None)
        if len(state.inbox):
            log.info("port %d closed with %d unread messages", state.port, len(state.inbox))
        log.info("stopped listening on port %d", state.port)

    async def _pump_port(self, state: PortState) -> None:
        while True:
            message = await state.listener.receive(timeout=None)
            state.received += 1
            self.ctx.store.confirm(message.sender)  # a tunnel came up: it trusts us
            if state.publish and self.publish is not None:
                meta = {"from": message.sender, "hostname": self.ctx.label_or_none(
                    message.sender), "port": message.port, "source_port": message.source_port}
                self.publish([b"%05d" % state.port, json.dumps(meta).encode(), message.data])
            else:
                await state.inbox.put(message)

    # -- streams ------------------------------------------------------------------------------

    def _stream(self, stream_id: str) -> StreamState:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise ConnectionClosedError(f"no open stream {stream_id!r} (closed or expired)")
        stream.last_used = time.monotonic()
        return stream

    async def _pump_stream(self, stream: StreamState) -> None:
        while True:
            try:
                message = await stream.conn.receive(timeout=None)
            except PilotError as exc:
                await stream.inbox.fail(self._explain(exc, stream))
                return
            await stream.inbox.put(message)

    def drop_stream(self, stream: StreamState, *, abort: bool) -> None:
        self.streams.pop(stream.stream_id, None)
        if stream.task is not None:
            stream.task.cancel()
        if abort:
            with contextlib.suppress(Exception):
                stream.conn.abort_now()

    def drop_streams_to(self, node_id: str) -> None:
        for stream in list(self.streams.values()):
            if stream.peer == node_id:
                self.drop_stream(stream, abort=True)

    def drop_idle_streams(self) -> None:
        now = time.monotonic()
        limit = self.ctx.options.stream_idle_timeout
        for stream in list(self.streams.values()):
            if stream.busy == 0 and now - stream.last_used > limit:
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

    def close_all(self) -> None:
        for stream in list(self.streams.values()):
            self.drop_stream(stream, abort=True)
        for state in list(self.ports.values()):
            self.close_port(state)
