"""Data sockets (docs/ipc.md, Data sockets): a connection to the stream socket that carries one
stream's messages both ways (a port's: daemon/portsock.py). A message is a frame in and a
stream write, or a stream message and a frame out: no request, reply or task per message, and
the socket's own buffers do the flow control that credit and send windows do for requests."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from typing import Protocol

from .. import ipc
from ..errors import BadRequestError, PilotError
from ..node.connection import Message
from .dispatch import Reply
from .hangup import hang_up
from .messaging import Messaging, StreamState
from .options import DaemonOptions
from .portsock import PortSocket
from .readhold import ReadHold
from .requests import PortAttachRequest, StreamAttachRequest, load_drain_untrusted

log = logging.getLogger("pilot_agents.daemon")

# What a stream's data socket may hold unread for its client (or inbox_bytes, if smaller), plus
# one message. It stands in for the stream's inbox, bounded at inbox_messages (1024): about as
# many small messages, so that a reader that stops is felt as soon as it was there (a
# publisher's drop-oldest starts dropping), and enough to keep a local reader busy (the unix
# socket's own buffer holds as much again).
UNREAD_LIMIT = 2**20
# Drains waiting for the peer's acknowledgements on one data socket: while this many wait, the
# client's next messages wait in its socket.
MAX_WAITING_DRAINS = 16

_SEND = bytes([ipc.DATA_SEND])
_CLOSE = bytes([ipc.DATA_CLOSE])
_MESSAGE = bytes([ipc.DATA_MESSAGE])


class Attached(Protocol):
    """A connection to the stream socket once it is a data socket: daemon/server.py's protocol
    hands it what it reads and the connection's events."""

    def start(self, pending: list[list[bytes]]) -> None: ...  # the attach's reply is written
    def received(self, messages: list[list[bytes]]) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def lost(self) -> None: ...  # the connection is gone


class DataSockets:
    """Hands streams and ports over to the connections that ask for them with
    ``stream_attach`` or ``port_attach``."""

    def __init__(self, messaging: Messaging) -> None:
        self._messaging = messaging

    def attach(self, request: StreamAttachRequest | PortAttachRequest,
               transport: asyncio.Transport) -> tuple[Reply, Attached]:
        """The reply to the request and the data socket ``transport`` becomes; it starts
        (``start``) once that reply is written. PilotError if it can't be attached: the
        connection stays an ordinary one."""
        messaging = self._messaging
        if isinstance(request, PortAttachRequest):
            state = messaging.listen_to_read(request.port, exclusive=request.exclusive)
            port_socket = PortSocket(messaging, state, transport, request.credit_messages,
                                     request.credit_bytes)
            # bounded_replies: it takes the reply flag PORT_REPLY_BOUNDED (a client asks, and
            # sends it only then: a daemon of older code drops a socket that sends it).
            return {"ok": True, "port": request.port, "bounded_replies": True}, port_socket
        stream = messaging.attachable(request.stream)
        reply: Reply = {"ok": True, "port": stream.conn.local_port, "source_port": stream.port,
                        "peer": stream.peer, "hostname": stream.hostname}
        socket = DataSocket(messaging, stream, transport, messaging.ctx.options)
        socket.queued = messaging.attach(stream, socket)
        return reply, socket


class DataSocket:
    """One stream's data socket. Both ways stop when the other side can't keep up: the client's
    sends are not read while the stream is over its bound (``Connection.write`` said so), and
    the stream's messages stay in the Node, unacknowledged as read, while the client has more
    than :data:`UNREAD_LIMIT` unread (the tunnel's flow control then stops the peer)."""

    def __init__(self, messaging: Messaging, stream: StreamState, transport: asyncio.Transport,
                 options: DaemonOptions) -> None:
        self._messaging = messaging
        self._stream = stream
        self._conn = stream.conn
        self._transport = transport
        self._options = options
        self._limit = min(options.inbox_bytes, UNREAD_LIMIT)
        self.queued: list[Message] = []  # what the stream's inbox held: out first
        self._started = False  # the attach's reply is written: frames may follow it
        self._writable = asyncio.Event()  # the client has at most _limit bytes unread
        self._writable.set()
        self._forwarding: asyncio.Task[None] | None = None
        self._room: asyncio.Task[None] | None = None
        # Drains (their timeout) and the close (DATA_CLOSED), answered in the order they came.
        self._answers: collections.deque[tuple[int, float | None]] = collections.deque()
        self._answering: asyncio.Task[None] | None = None
        self._closing = False  # the client sent close: nothing may follow it
        # Not read while: the stream is over its bound ("room"), too many drains wait
        # ("drains"), the client leaves more answers unread than messages can explain
        # ("unread"), or for good ("stopped": closing, or the stream failed or ended).
        # Unread: at most _limit of messages, and one more (up to max_payload_bytes).
        self._hold = ReadHold(transport, self._limit + options.max_payload_bytes)
        self._error: PilotError | None = None  # why the stream ended, once it did
        self._over = False  # the last message is written, or the client is gone

    # -- the connection's side (daemon/server.py's protocol calls these) -----------------------

    def start(self, pending: list[list[bytes]]) -> None:
        """The reply to ``stream_attach`` is written: what the stream's inbox held goes out,
        then whatever comes; ``pending``, the messages the client wrote right after the
        attach, are taken as if just read."""
        transport = self._transport
        # pause_writing is the sign to stop taking the stream's messages (see _forward).
        transport.set_write_buffer_limits(high=self._limit)
        self._started = True
        for message in self.queued:
            transport.writelines(ipc.pack_frames([_MESSAGE, message.data]))
        self.queued = []
        self._conn.set_taker(self._take)
        self._forwarding = asyncio.create_task(self._forward())
        self.received(pending)
        self._hold.release("start")

    def received(self, messages: list[list[bytes]]) -> None:
        """Messages the client wrote, as the stream socket's reader cut them."""
        if self._over:
            return
        try:
            for frames in messages:
                if self._closing:
                    raise BadRequestError("a message after 'close' (nothing may follow it)")
                if frames[0] == _SEND and len(frames) == 2:
                    if not self._send(frames[1]):
                        return
                else:
                    self._control(frames)
            self._hold.check_unread()  # drains it does not read the answers of
        except BadRequestError as exc:
            log.debug("data socket of stream %s dropped: %s", self._stream.stream_id, exc)
            self._closing = False  # a close before it counts no more: the stream is reset
            # Told why first (a payload over the limit read as "the daemon closed the data
            # socket", as if it had stopped); the stream is reset, as for a client that dies.
            self.end(exc)
            self._messaging.drop_stream(self._stream, abort=True)
            if not self._over:  # still answering a drain: it goes, untold
                self._transport.abort()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()
        self._hold.drained()

    def lost(self) -> None:
        """The connection is gone. A client that left without 'close' (killed, or aborting)
        has its stream reset now: its peer hears at once rather than at the idle timeout."""
        if self._over:
            return
        self._over = True
        self._conn.set_taker(None)
        self._cancel(self._forwarding, self._room)
        if not self._closing:
            self._cancel(self._answering)
            # Soon, not now: what the client wrote before it went goes out first (the flush
            # its writes asked for comes before this), as its sends did before an IPC
            # stream_abort; a requester's CANCEL that its close then aborts, say.
            asyncio.get_running_loop().call_soon(
                functools.partial(self._messaging.drop_stream, self._stream, abort=True))
        # A close goes on: the client asked for it, and the stream ends as it would have.

    # -- the stream's side ----------------------------------------------------------------------

    def end(self, error: PilotError) -> None:
        """The stream is gone (aborted, its peer gone, the daemon stopping) or failed: the
        drains and close waiting are answered, then ``ended``, and the connection closes."""
        if self._error is not None or self._over:
            return
        self._error = error
        self._stop_reading()
        if self._answering is None:  # else it writes ``ended`` after its last answer
            self._write(ipc.DATA_ENDED, ipc.error_reply(error))
            self._finish()

    def returned(self, message: Message) -> None:
        """A message ``stream_receive`` handed out before the attach came back (a requeue, an
        ack that never came): it goes out next, ahead of what still waits in the Node, even
        past the unread bound (by one message). Once the stream is over there is nobody to
        read it, as for a message that arrives then."""
        if self._over or self._error is not None:
            log.debug("stream %s: a message given back after its end was dropped",
                      self._stream.stream_id)
        elif not self._started:
            self.queued.insert(0, message)
        else:
            self._transport.writelines(ipc.pack_frames([_MESSAGE, message.data]))

    def _take(self, message: Message) -> bool:
        """The Node's message as it arrives, written at once if the client's unread bytes stay
        within the bound with it; refused otherwise, and then _forward writes it once they
        have room (so the bound is overshot by one message at most)."""
        data = message.data
        transport = self._transport
        if transport.get_write_buffer_size() + len(data) > self._limit:
            return False
        transport.writelines(ipc.pack_frames([_MESSAGE, data]))
        return True

    async def _forward(self) -> None:
        """The messages the taker refused, in order, whenever the client has room for one; and
        the stream's end (an error the Node queues behind its last message)."""
        conn, writable = self._conn, self._writable
        while True:
            await writable.wait()
            try:
                message = await conn.receive(timeout=None)
            except PilotError as exc:
                # After a close, the peer's end is the stream's normal one: the close answers.
                if not self._closing:
                    self.end(self._messaging.explain_stream(exc, self._stream))
                    self._messaging.drop_stream(self._stream, abort=True)
                return
            self._transport.writelines(ipc.pack_frames([_MESSAGE, message.data]))

    # -- the client's messages ------------------------------------------------------------------

    def _send(self, payload: bytes) -> bool:
        """False if no more of what the client wrote may be taken now."""
        if len(payload) > self._options.max_payload_bytes:
            raise BadRequestError(f"a payload of {len(payload)} bytes, more than the daemon's "
                                  f"limit of {self._options.max_payload_bytes}")
        try:
            if self._conn.write(payload):
                return True
        except PilotError:
            # The stream failed: _forward hears it after the messages that came before it.
            self._stop_reading()
            return False
        # Over the stream's bound: the client's next messages wait in its socket.
        self._hold.hold("room")
        if self._room is None:
            self._room = asyncio.create_task(self._wait_for_room())
        return True

    def _control(self, frames: list[bytes]) -> None:
        header = frames[0]
        if len(frames) == 1 and header == _CLOSE:
            self._closing = True
            self._stop_reading()
            self._answer(ipc.DATA_CLOSED, None)
        elif len(frames) == 1 and header[0] == ipc.DATA_DRAIN:
            opts = self._options
            drain = load_drain_untrusted(header[1:], opts.max_request_bytes,
                                         opts.max_request_depth)
            self._answer(ipc.DATA_DRAINED, drain.timeout)
        else:
            raise BadRequestError(f"not a data socket message: kind {header[0]:#04x} in "
                                  f"{len(frames)} frames (docs/ipc.md, Data sockets)")

    async def _wait_for_room(self) -> None:
        try:
            await self._conn.room()
        except PilotError:
            return  # the stream failed: _forward ends the socket
        finally:
            self._room = None
        self._hold.release("room")

    # -- drains and the close, in order ---------------------------------------------------------

    def _answer(self, kind: int, timeout: float | None) -> None:
        self._answers.append((kind, timeout))
        if len(self._answers) >= MAX_WAITING_DRAINS:
            self._hold.hold("drains")
        if self._answering is None:
            self._answering = asyncio.create_task(self._answer_all())

    async def _answer_all(self) -> None:
        answers = self._answers
        while answers:
            kind, timeout = answers[0]
            if kind == ipc.DATA_CLOSED:
                await self._close()
                return
            reply = await self._drain(timeout)
            answers.popleft()
            self._write(kind, reply)
            if len(answers) < MAX_WAITING_DRAINS:
                self._hold.release("drains")
        self._answering = None
        if self._error is not None:
            self._write(ipc.DATA_ENDED, ipc.error_reply(self._error))
            self._finish()

    async def _drain(self, timeout: float | None) -> Reply:
        if self._error is not None:
            return ipc.error_reply(self._error)
        conn = self._conn
        try:
            await conn.drain(timeout)
            return {"ok": True, "path": conn.path, "rtt": conn.rtt}
        except PilotError as exc:
            return ipc.error_reply(self._error or self._messaging.explain_stream(exc, self._stream))

    async def _close(self) -> None:
        """Finish the stream once the peer has every byte sent before; then the connection.
        ``closed`` is the last message, but for ``ended`` after it if the stream failed."""
        stream = self._stream
        error = self._error
        if error is None:
            try:
                await stream.conn.close()
            except PilotError as exc:
                error = self._error or self._messaging.explain_stream(exc, stream)
        if error is None:
            self._write(ipc.DATA_CLOSED, {"ok": True})
        else:
            self._write(ipc.DATA_CLOSED, ipc.error_reply(error))
            self._write(ipc.DATA_ENDED, ipc.error_reply(error))
        self._finish()
        self._messaging.drop_stream(stream, abort=error is not None)

    # -- the end ----------------------------------------------------------------------------------

    def _write(self, kind: int, reply: Reply) -> None:
        if not self._over and not self._transport.is_closing():
            self._transport.writelines(ipc.pack_frames([bytes([kind]) + ipc.compact_json(reply)]))

    def _finish(self) -> None:
        """The last message is written: the connection closes once the client has read it."""
        self._over = True
        self._conn.set_taker(None)
        self._cancel(self._forwarding, self._room)
        hang_up(self._transport)

    def _stop_reading(self) -> None:
        self._hold.hold("stopped")

    @staticmethod
    def _cancel(*tasks: asyncio.Task[None] | None) -> None:
        current = asyncio.current_task()
        for task in tasks:
            if task is not None and task is not current:
                task.cancel()
