"""The client's end of a data socket: one stream's messages on a connection of their own to the
daemon (docs/ipc.md, Data sockets).

A message is a frame in or a frame out, and the socket's own buffers are the flow control: the
writer waits while its transport holds more than its window, and the reader stops reading while
the application has a window's worth unread, so the daemon stops taking the stream's messages,
and the tunnel stops the peer. Nothing here waits on the daemon per message.
"""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path
from typing import Any, cast

from .errors import ConnectionClosedError, DaemonNotRunningError, PilotError, PilotTimeoutError
from .ipc import (
    DATA_CLOSE,
    DATA_CLOSED,
    DATA_DRAIN,
    DATA_DRAINED,
    DATA_ENDED,
    DATA_MESSAGE,
    DATA_SEND,
    REQUEST_TIMEOUT,
    FrameReader,
    FramingError,
    error_of,
    pack_frames,
    stream_socket_path,
)

_SEND = bytes([DATA_SEND])
_CLOSE = bytes([DATA_CLOSE])
_ATTACH_ID = 1  # the only request this connection ever makes


class DataSocket(asyncio.Protocol):
    """One attached stream: :meth:`attach` opens it; then :meth:`send`, :meth:`receive`,
    :meth:`drain`, :meth:`close` or :meth:`abort`. ``what`` names the stream in errors; the
    windows are what the application may leave unread before the daemon stops pushing
    (messages, bytes)."""

    def __init__(self, what: str, window_messages: int, window_bytes: int) -> None:
        self._what = what
        self._window_messages = window_messages
        self._window_bytes = window_bytes
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader(2**32)  # what our own daemon sends
        self._attached: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self._messages: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._reading = True
        self._waiter: asyncio.Future[None] | None = None
        self._answers: collections.deque[asyncio.Future[dict[str, Any]]] = collections.deque()
        self._writable = asyncio.Event()
        self._writable.set()
        self.ended: PilotError | None = None
        """Why the stream is over, once it is: raised by every later call."""

    @classmethod
    async def attach(cls, home: Path, stream: str, what: str, window_messages: int,
                     window_bytes: int, send_window: int) -> tuple[DataSocket, dict[str, Any]]:
        """A data socket for ``stream`` (a ``connect``'s), and the daemon's answer (the
        stream's ports, peer and hostname). A send waits while more than ``send_window``
        bytes are not yet written to the socket."""
        loop = asyncio.get_running_loop()
        try:
            transport, sock = await loop.create_unix_connection(
                lambda: cls(what, window_messages, window_bytes), str(stream_socket_path(home)))
        except OSError as exc:
            raise DaemonNotRunningError(f"the daemon's stream socket refused a data socket for "
                                        f"{what}: {exc}") from None
        # The writer waits beyond a window: the daemon reads no faster than the peer takes.
        transport.set_write_buffer_limits(high=send_window)
        request = {"cmd": "stream_attach", "id": _ATTACH_ID, "stream": stream}
        transport.writelines(pack_frames([json.dumps(request).encode()]))
        try:
            reply = await asyncio.wait_for(sock._attached, REQUEST_TIMEOUT)
        except BaseException:
            transport.abort()
            raise
        if reply.get("ok") is not True:
            transport.abort()
            raise error_of(reply)
        return sock, reply

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._end(DaemonNotRunningError(f"the daemon closed the data socket of {self._what}"))
        if not self._attached.done():
            self._attached.set_exception(cast(PilotError, self.ended))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except FramingError:
            self._fail("the daemon's data socket sent something that is not a message")
            return
        for frames in messages:
            if not self._attached.done():
                self._attached.set_result(_json(frames[0]))
            elif frames[0][0] == DATA_MESSAGE and len(frames) == 2:
                self._arrived(frames[1])
            elif frames[0][0] in (DATA_DRAINED, DATA_CLOSED) and self._answers:
                self._answers.popleft().set_result(_json(frames[0][1:]))
            elif frames[0][0] == DATA_ENDED:
                self._end(error_of(_json(frames[0][1:])))
            else:
                self._fail(f"the daemon's data socket sent an unexpected frame "
                           f"(kind {frames[0][0]:#04x})")

    # -- the stream ------------------------------------------------------------------------

    async def send(self, payload: bytes) -> None:
        if not self._writable.is_set():
            await self._writable.wait()
        if self.ended is not None:
            raise self.ended
        assert self._transport is not None  # not ended
        self._transport.writelines(pack_frames([_SEND, payload]))

    async def receive(self, timeout: float | None) -> bytes:
        while not self._messages:
            if self.ended is not None:
                raise self.ended
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise PilotTimeoutError(
                    f"no message on {self._what} within {timeout:g} s") from None
            finally:
                self._waiter = None
        payload = self._messages.popleft()
        self._queued_bytes -= len(payload)
        if not self._reading and self._below_half():
            self._reading = True
            if self._transport is not None:
                self._transport.resume_reading()
        return payload

    async def drain(self, timeout: float) -> dict[str, Any]:
        """The daemon's ``drained`` answer, once the peer acknowledged every message sent."""
        header = bytes([DATA_DRAIN]) + json.dumps({"timeout": timeout}).encode()
        # The daemon answers within ``timeout``; beyond it by a margin, it does not answer.
        return await self._ask(header, timeout + REQUEST_TIMEOUT)

    async def close(self) -> None:
        """Finish the stream once everything sent is out; return once the peer has every byte."""
        await self._ask(_CLOSE, None)

    def abort(self) -> None:
        """Drop the connection: the daemon resets the stream at once."""
        self._end(ConnectionClosedError(f"{self._what} was aborted"))
        if self._transport is not None:
            self._transport.abort()

    async def _ask(self, header: bytes, wait: float | None) -> dict[str, Any]:
        if self.ended is not None:
            raise self.ended
        assert self._transport is not None  # not ended
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._answers.append(answer)
        self._transport.writelines(pack_frames([header]))
        try:
            reply = await asyncio.wait_for(answer, wait)
        except TimeoutError:
            raise PilotTimeoutError(f"the daemon did not answer for {self._what}") from None
        if reply.get("ok") is not True:
            raise error_of(reply)
        return reply

    # -- inside ---------------------------------------------------------------------------

    def _arrived(self, payload: bytes) -> None:
        self._messages.append(payload)
        self._queued_bytes += len(payload)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._reading and (len(self._messages) >= self._window_messages
                              or self._queued_bytes >= self._window_bytes):
            # The application is a window behind: what comes next waits in the daemon, and
            # then in the peer.
            self._reading = False
            if self._transport is not None:
                self._transport.pause_reading()

    def _below_half(self) -> bool:
        return (2 * len(self._messages) < self._window_messages
                and 2 * self._queued_bytes < self._window_bytes)

    def _end(self, error: PilotError) -> None:
        if self.ended is None:
            self.ended = error
        while self._answers:
            answer = self._answers.popleft()
            if not answer.done():
                answer.set_exception(self.ended)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._writable.set()  # a sender waiting for room hears the end

    def _fail(self, why: str) -> None:
        self._end(ConnectionClosedError(f"{self._what}: {why}"))
        if self._transport is not None:
            self._transport.abort()


def _json(header: bytes) -> dict[str, Any]:
    try:
        value = json.loads(header)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return {"ok": False, "error": {"type": "InternalError",
                                       "message": "the daemon sent a header that is not JSON"}}
    return value
