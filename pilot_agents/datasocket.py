"""The client's end of a data socket: a stream's messages, or a port's, on a connection of their
own to the daemon (docs/ipc.md, Data sockets).

A message is a frame in or a frame out. Nothing here waits on the daemon per message: the
writer waits only while its transport holds more than its window (the daemon reads a stream's
data socket no faster than the peer takes), and what comes in is bounded by the application's
window, through the socket's own buffers (a stream) or credit (a port).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from .errors import ConnectionClosedError, DaemonNotRunningError, PilotError, PilotTimeoutError
from .ipc import (
    DATA_CLOSE,
    DATA_CLOSED,
    DATA_DRAIN,
    DATA_DRAINED,
    DATA_ENDED,
    DATA_MESSAGE,
    DATA_SEND,
    PORT_ARRIVAL,
    PORT_ARRIVED,
    PORT_CLOSE,
    PORT_CONFIRMED,
    PORT_CREDIT,
    PORT_MESSAGE,
    PORT_REPLY,
    PORT_REPLY_BOUNDED,
    PORT_REPLY_CONFIRM,
    PORT_SYNC,
    PORT_SYNCED,
    PORT_TAKEN,
    PORT_WAY_CLOSED,
    PORT_WAY_ENDED,
    REQUEST_TIMEOUT,
    FramedProtocol,
    IpcClient,
    check_loop,
    connect_stream_socket,
    error_of,
    not_answering,
    pack_frames,
)
from .transport import Hangups

T = TypeVar("T")  # what a message comes with: nothing on a stream's socket, a port's way
S = TypeVar("S", bound="_Attached[Any]")

_SEND = bytes([DATA_SEND])
_CLOSE = bytes([DATA_CLOSE])
_PORT_CLOSE = bytes([PORT_CLOSE])
_PORT_SYNC = bytes([PORT_SYNC])
_NUMBERED = struct.Struct("!BI")  # a port socket's kind, and its way or count
_REPLY = struct.Struct("!BIB")  # ... and a reply's flags
_CREDIT = struct.Struct("!BII")  # a port socket's credit: messages and bytes
_ATTACH_ID = 1  # the only request a data socket ever makes


class _Attached(FramedProtocol, Generic[T]):
    """What both kinds of data socket share: the attach request, the messages waiting for the
    application, the answers that come in order, and the end."""

    def __init__(self, what: str, window_messages: int, window_bytes: int) -> None:
        super().__init__()
        self._what = what
        self._window_messages = window_messages
        self._window_bytes = window_bytes
        self._attached: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        # Its failure is seen, even with nobody to raise it to: an attach given up on while
        # connecting has asyncio close the connection it had just made.
        self._attached.add_done_callback(_seen)
        self._messages: collections.deque[tuple[T, bytes]] = collections.deque()
        self._queued_bytes = 0
        # Receives waiting for a message, first come first served: several tasks may receive
        # at once (a replier's workers each do).
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._answers: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        self.ended: PilotError | None = None
        """Why the socket is over, once it is: raised by every later call."""

    @classmethod
    async def _open(cls: type[S], home: Path, request: dict[str, Any], make: Callable[[], S],
                    send_window: int) -> tuple[S, dict[str, Any]]:
        """A socket of ``make()``'s kind, attached by ``request``, and the daemon's answer. A
        write waits while more than ``send_window`` bytes are not yet in the socket."""
        what = request.get("stream") or f"port {request.get('port')}"
        try:
            transport, sock = await connect_stream_socket(home, make, REQUEST_TIMEOUT)
        except OSError as exc:
            raise DaemonNotRunningError(f"the daemon's stream socket refused a data socket for "
                                        f"{what}: {exc}") from None
        transport.set_write_buffer_limits(high=send_window)
        transport.writelines(pack_frames([json.dumps({**request, "id": _ATTACH_ID}).encode()]))
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel that comes
            # as the answer does, and a cancelled connect (a ^C) would go on as if opened.
            async with asyncio.timeout(REQUEST_TIMEOUT):
                reply = await sock._attached
        except TimeoutError:
            transport.abort()
            # A bare TimeoutError is an OSError: it would reach the user as one, not as the
            # stuck daemon the IPC client reports for the same silence.
            raise not_answering(
                home, f"the opening of a data socket for {what} within {REQUEST_TIMEOUT:g} s: "
                "it is stuck (stopped?)") from None
        except BaseException:
            transport.abort()
            raise
        if reply.get("ok") is not True:
            transport.abort()
            raise error_of(reply)
        return sock, reply

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._end(DaemonNotRunningError(f"the daemon closed the data socket of {self._what}"))
        if not self._attached.done():
            self._attached.set_exception(cast(PilotError, self.ended))

    def not_framed(self) -> None:
        self._fail("the daemon's data socket sent something that is not a message")

    def messages_received(self, messages: list[list[bytes]]) -> None:
        for frames in messages:
            if not self._attached.done():
                self._attached.set_result(_json(frames[0]))
            elif frames[0][0] == DATA_ENDED:
                self._end(error_of(_json(frames[0][1:])))
            elif not self._frame(frames):
                self._fail(f"the daemon's data socket sent an unexpected frame "
                           f"(kind {frames[0][0]:#04x})")
                return

    def _frame(self, frames: list[bytes]) -> bool:
        """Take one frame of this socket's kind; False if it is not one."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection: the daemon undoes what it held for it at once."""
        self._end(ConnectionClosedError(f"{self._what} was aborted"))
        if self._transport is not None:
            self._transport.abort()

    async def _next(self, timeout: float | None) -> tuple[T, bytes]:
        """The next message, once there is one; the socket's end raised after the last."""
        while not self._messages:
            if self.ended is not None:
                raise self.ended
            check_loop(self._attached.get_loop())  # else nothing would ever wake this
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken for a message, but leaving: it is the next one's
                else:
                    with contextlib.suppress(ValueError):  # unless _wake_one passed it by
                        self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise PilotTimeoutError(
                        f"no message on {self._what} within {timeout:g} s") from None
                raise
        item = self._messages.popleft()
        self._queued_bytes -= len(item[1])
        return item

    def _arrived(self, item: tuple[T, bytes]) -> None:
        self._messages.append(item)
        self._queued_bytes += len(item[1])
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _window_full(self) -> bool:
        return (len(self._messages) >= self._window_messages
                or self._queued_bytes >= self._window_bytes)

    def _below_half(self) -> bool:
        return (2 * len(self._messages) < self._window_messages
                and 2 * self._queued_bytes < self._window_bytes)

    async def _write(self, frames: list[bytes]) -> None:
        if not self._writable.is_set():
            await self._writable.wait()
        self._write_now(frames)

    def _write_now(self, frames: list[bytes]) -> None:
        if self.ended is not None:
            raise self.ended
        assert self._transport is not None  # not ended
        self._transport.writelines(pack_frames(frames))

    async def _ask(self, header: bytes, wait: float | IpcClient) -> dict[str, Any]:
        """Write ``header`` and wait for its answer, which comes in order: ``wait`` seconds at
        most, or as long as the daemon answers ``wait``'s checks that it is alive (see
        IpcClient.outwait); a daemon that does not is stuck: the socket is aborted."""
        check_loop(self._attached.get_loop())
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._write_now([header])
        self._answers.append(answer)
        if not isinstance(wait, float | int):
            try:
                reply = await wait.outwait(f"the close of {self._what}", answer)
            except DaemonNotRunningError as exc:
                if exc is self.ended:
                    raise  # the daemon went away: the answer says so
                answer.cancel()
                self.abort()  # whatever it does once it runs again, this socket is over
                raise
        else:
            try:
                async with asyncio.timeout(wait):  # as in _open
                    reply = await answer
            except TimeoutError:
                raise PilotTimeoutError(f"the daemon did not answer for {self._what}") from None
        if reply.get("ok") is not True:
            raise error_of(reply)
        return reply

    def _answered(self, body: bytes) -> bool:
        if not self._answers:
            return False
        answer = self._answers.popleft()
        if not answer.done():  # else its asker gave up waiting (a timeout, a cancel)
            answer.set_result(_json(body))
        return True

    def _end(self, error: PilotError) -> None:
        if self.ended is None:
            self.ended = error
        while self._answers:
            answer = self._answers.popleft()
            if not answer.done():
                answer.set_exception(self.ended)
        while self._waiters:
            self._wake_one()
        self._writable.set()  # a writer waiting for room hears the end

    def _fail(self, why: str) -> None:
        self._end(ConnectionClosedError(f"{self._what}: {why}"))
        if self._transport is not None:
            self._transport.abort()


class StreamSocket(_Attached[None]):
    """A stream's data socket (a ``connect``'s): :meth:`send`, :meth:`receive`,
    :meth:`drain`, :meth:`close`, or :meth:`abort`. When the application is a window behind,
    it stops reading: what comes next waits in the daemon, then in the peer."""

    _paused = False  # not reading: the window is full, until it is half empty

    @classmethod
    async def attach(cls, home: Path, stream: str, what: str, window_messages: int,
                     window_bytes: int, send_window: int) -> tuple[StreamSocket, dict[str, Any]]:
        """The stream's data socket, and the daemon's answer (its ports, peer, hostname)."""
        return await cls._open(home, {"cmd": "stream_attach", "stream": stream},
                               lambda: cls(what, window_messages, window_bytes), send_window)

    def _frame(self, frames: list[bytes]) -> bool:
        kind = frames[0][0]
        if kind == DATA_MESSAGE and len(frames) == 2:
            self._arrived((None, frames[1]))
            if self._window_full() and self._transport is not None and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            return True
        return kind in (DATA_DRAINED, DATA_CLOSED) and self._answered(frames[0][1:])

    async def send(self, payload: bytes) -> None:
        await self._write([_SEND, payload])

    async def receive(self, timeout: float | None) -> bytes:
        payload = (await self._next(timeout))[1]
        if self._paused and self._below_half() and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return payload

    async def drain(self, timeout: float) -> dict[str, Any]:
        """The daemon's ``drained`` answer, once the peer acknowledged every message sent."""
        header = bytes([DATA_DRAIN]) + json.dumps({"timeout": timeout}).encode()
        # The daemon answers within ``timeout``; beyond it by a margin, it does not answer.
        return await self._ask(header, timeout + REQUEST_TIMEOUT)

    async def close(self, alive: IpcClient) -> None:
        """Finish the stream once everything sent is out; return once the peer has every byte.
        That takes as long as the peer does, so there is no timeout: the wait goes on while the
        daemon answers ``alive``'s checks (IpcClient.outwait), and a stuck one aborts the
        socket and is raised (DaemonNotRunningError)."""
        await self._ask(_CLOSE, alive)


@dataclass
class Way:
    """A peer's stream to the port, as a port socket knows it."""

    number: int  # the daemon's for it, on this socket
    sender: str
    hostname: str | None
    source_port: int
    error: PilotError | None = None  # why replies on it fail, once they do
    messages: int = 0  # replies since the last confirmed one
    bytes: int = 0
    confirmations: collections.deque[asyncio.Future[None]] = field(
        default_factory=collections.deque)
    # Its messages' on_hangup callbacks: called when the daemon says the way ended (or the
    # socket does), so a replier stops work whose requester went away.
    hangups: Hangups = field(default_factory=Hangups)


class PortSocket(_Attached[Way]):
    """A port's data socket: :meth:`receive` a port's messages (each with its :class:`Way`),
    :meth:`reply` on a way, :meth:`close`. The daemon writes nothing before the first
    :meth:`receive`, which grants the window as credit, and then within the credit this gives
    back as the application takes messages: a listener that opens and never receives takes
    none of the port's messages from its other readers. Replies are confirmed once per half
    send window of a way, and a reply finding two confirmations of its way outstanding waits
    for the older."""

    def __init__(self, what: str, window_messages: int, window_bytes: int,
                 send_messages: int, send_bytes: int,
                 on_failed: Callable[[PilotError], None]) -> None:
        super().__init__(what, window_messages, window_bytes)
        self._send_messages = send_messages
        self._send_bytes = send_bytes
        self._on_failed = on_failed
        self.ways: dict[int, Way] = {}
        self._taken_messages = 0  # since the last 'taken'
        self._taken_bytes = 0
        self._granted = False  # the window, at the first receive
        self._bounded = False  # the daemon takes bounded replies (see attach)

    @classmethod
    async def attach(cls, home: Path, port: int, window_messages: int, window_bytes: int,
                     send_messages: int, send_bytes: int,
                     on_failed: Callable[[PilotError], None], *,
                     exclusive: bool = False) -> PortSocket:
        """The port's data socket; ``on_failed`` hears of each reply that failed;
        ``exclusive``: the port's messages to it alone (docs/ipc.md)."""
        request: dict[str, Any] = {"cmd": "port_attach", "port": port, "credit_messages": 0,
                                   "credit_bytes": 0}
        if exclusive:  # only then: a daemon of older code refuses a field it does not know
            request["exclusive"] = True
        sock, reply = await cls._open(
            home, request, lambda: cls(f"port {port}", window_messages, window_bytes,
                                       send_messages, send_bytes, on_failed), send_bytes)
        sock._bounded = reply.get("bounded_replies") is True
        return sock

    def _frame(self, frames: list[bytes]) -> bool:
        header = frames[0]
        kind = header[0]
        if kind in (DATA_CLOSED, PORT_SYNCED, PORT_ARRIVED):
            return self._answered(header[1:])
        if len(header) < _NUMBERED.size:
            return False
        number = _NUMBERED.unpack_from(header)[1]
        if kind == PORT_MESSAGE and len(frames) == 2:
            if len(header) > _NUMBERED.size:
                meta = _json(header[_NUMBERED.size:])
                self.ways[number] = Way(number, str(meta.get("from")), meta.get("hostname"),
                                        int(meta.get("source_port", 0)))
            way = self.ways.get(number)
            if way is None:
                return False
            self._arrived((way, frames[1]))
            return True
        way = self.ways.get(number)
        if kind in (PORT_WAY_ENDED, PORT_WAY_CLOSED):
            error = error_of(_json(header[_NUMBERED.size:]))
            if way is not None:
                # Its messages still waiting here keep the way, and its replies fail.
                way.error = error
                for waiting in way.confirmations:
                    if not waiting.done():
                        waiting.set_result(None)
                del self.ways[number]
                way.hangups.hang_up()
            # A reply failed (perhaps one sent before the way's close came): the application
            # hears. A way that closed with no reply failing is no failure.
            if kind == PORT_WAY_ENDED:
                self._on_failed(error)
            return True
        if kind == PORT_CONFIRMED and way is not None and way.confirmations:
            way.confirmations.popleft().set_result(None)
            return True
        return False

    def _end(self, error: PilotError) -> None:
        super()._end(error)
        for way in self.ways.values():  # no reply can go now
            way.hangups.hang_up()

    async def receive(self, timeout: float | None) -> tuple[Way, bytes]:
        if not self._granted:
            self._granted = True
            if self.ended is None:
                self._write_now([_CREDIT.pack(PORT_CREDIT, self._window_messages,
                                              self._window_bytes)])
        item = await self._next(timeout)
        self._taken_messages += 1
        self._taken_bytes += len(item[1])
        if (2 * self._taken_messages >= self._window_messages
                or 2 * self._taken_bytes >= self._window_bytes):
            self._report_taken()
        return item

    def _report_taken(self) -> None:
        if self._taken_messages and self.ended is None:
            self._write_now([_NUMBERED.pack(PORT_TAKEN, self._taken_messages)])
        self._taken_messages = self._taken_bytes = 0

    async def reply(self, way: Way, payload: bytes, bounded: bool = False) -> None:
        """Send ``payload`` on ``way``; raise why it can't be, once the daemon said so.
        ``bounded``: the daemon resets the way's stream once its peer reads nothing of it for
        the daemon's unread_replies_timeout (a replier's), rather than wait for it."""
        if way.error is not None:
            raise way.error
        while len(way.confirmations) >= 2:
            # Left in place for 'confirmed' to take, and not cancelled with this task.
            await asyncio.wait((way.confirmations[0],))
            if way.error is not None:
                raise way.error
        way.messages += 1
        way.bytes += len(payload)
        # (A daemon of older code knows no such flag: a reply to it is not bounded.)
        flags = PORT_REPLY_BOUNDED if bounded and self._bounded else 0
        if 2 * way.messages >= self._send_messages or 2 * way.bytes >= self._send_bytes:
            way.messages = way.bytes = 0
            flags |= PORT_REPLY_CONFIRM
            way.confirmations.append(asyncio.get_running_loop().create_future())
        await self._write([_REPLY.pack(PORT_REPLY, way.number, flags), payload])

    async def sync(self) -> None:
        """Return once the daemon has handled every reply written before (its failures are
        with ``on_failed`` by then)."""
        await self._ask(_PORT_SYNC, REQUEST_TIMEOUT)

    async def since_arrival(self, way: Way) -> float | None:
        """Seconds since bytes of ``way``'s stream last reached the daemon (None: not known)."""
        if way.error is not None:
            return None
        reply = await self._ask(_NUMBERED.pack(PORT_ARRIVAL, way.number), REQUEST_TIMEOUT)
        since = reply.get("since")
        return since if isinstance(since, float | int) else None

    async def close(self, alive: IpcClient) -> None:
        """Stop reading: what the daemon wrote that was not received goes back to the port. A
        daemon that went away is no failure (its port went with it); one that is stuck (it
        answers neither the close nor ``alive``'s checks) aborts the socket and is raised."""
        if self.ended is None:
            self._report_taken()
            try:
                await self._ask(_PORT_CLOSE, alive)
            except PilotError as exc:
                if exc is not self.ended:  # the socket's own end: the daemon went
                    raise
        # What this socket still holds went back with the rest: the daemon counted it as not
        # taken (only messages returned by receive() were reported). An ended socket has
        # nothing to give back: its port closed (the daemon stopped, say), and with it that.
        self._messages.clear()


def _seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _json(header: bytes) -> dict[str, Any]:
    try:
        value = json.loads(header)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return {"ok": False, "error": {"type": "InternalError",
                                       "message": "the daemon sent a header that is not JSON"}}
    return value
