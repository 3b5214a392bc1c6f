"""The daemon's local API: JSON requests over ZeroMQ on ``ipc://<home>/daemon.sock``.

The daemon binds a ROUTER socket; a client connects a DEALER (or REQ) and sends one JSON object per
message, ``{"cmd": "...", "id": ..., ...}``, followed by a message's payload as a second frame
where a command carries one; the reply is ``{"ok": true, "id": ..., ...}`` (a received message's
payload in a second frame, when asked for) or ``{"ok": false, "id": ..., "error": {"type": "...",
"message": "..."}}``. Requests run concurrently, so replies may come back out of order: match
them by ``id``. A ``deliver`` request is answered many times, once per message pushed. The hot
data messages (``stream_send``, ``reply``, a compact delivery's pushes) may carry a compact binary
header instead of JSON (``COMPACT_*`` below; docs/ipc.md, Compact headers). The whole
protocol is described in ``docs/ipc.md``; the request models in ``daemon/requests.py`` are its
machine-readable form.

This module has the error mapping, the paths in the home, and the asyncio client the SDK and the
CLI use; the request models (pydantic) are in ``daemon/requests.py``, so clients never load
pydantic.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import fcntl
import itertools
import json
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from .errors import (
    BadRequestError,
    ConfigError,
    DaemonNotRunningError,
    DaemonOutdatedError,
    PilotError,
    from_name,
)
from .home import DAEMON_LOCK, DAEMON_PID
from .identity import default_home
from .version import build

SOCKET_NAME = "daemon.sock"
PUB_SOCKET_NAME = "pub.sock"
STREAM_SOCKET_NAME = "stream.sock"  # the same requests on a plain unix stream socket
BYE = b'{"cmd":"bye"}'  # a client closing on purpose (docs/ipc.md, A client that dies)
LOCK_NAME = DAEMON_LOCK
PID_NAME = DAEMON_PID
LOG_NAME = "daemon.log"
MAX_SOCKET_PATH = 100  # bytes; sun_path holds 108 and ZeroMQ needs a little of it
# Seconds a client waits for the daemon beyond the request's own timeout (or, for a request
# with no timeout, at all) before it asks whether the daemon still answers at all.
REQUEST_TIMEOUT = 10.0
PROTOCOL_VERSION = 1

log = logging.getLogger("pilot_agents.ipc")


# -- errors ------------------------------------------------------------------------------------


# An error's field, on a stream that died because its peer's node restarted: the stream offset
# from which the old node acknowledged nothing (docs/ipc.md, Streams across a peer's restart).
UNSEEN_AFTER_RESTART = "unseen_after_restart"


def error_reply(exc: BaseException, request_id: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc) or repr(exc)}
    unseen = unseen_after_restart(exc)
    if unseen is not None:
        error[UNSEEN_AFTER_RESTART] = unseen
    reply: dict[str, Any] = {"ok": False, "error": error}
    if request_id is not None:
        reply["id"] = request_id
    return reply


def error_from_reply(error: dict[str, Any]) -> PilotError:
    """The exception an error reply stands for (a PilotError subclass found by name)."""
    exc = from_name(str(error.get("type", "PilotError")),
                    str(error.get("message", "the daemon reported an error")))
    unseen = error.get(UNSEEN_AFTER_RESTART)
    if type(unseen) is int and unseen >= 0:
        mark_restarted(exc, unseen)
    return exc


def mark_restarted(exc: PilotError, unseen: int) -> PilotError:
    """``exc``, the error of a stream that died because its peer's node restarted, carrying
    the stream offset from which the old node acknowledged nothing (as
    :meth:`pilot_agents.node.Connection.unseen_after_restart`). An attribute rather than a
    subclass: the error keeps its type, by which clients map it."""
    setattr(exc, UNSEEN_AFTER_RESTART, unseen)
    return exc


def unseen_after_restart(exc: BaseException | None) -> int | None:
    """What :func:`mark_restarted` put on ``exc``; None if it is not such an error."""
    unseen = getattr(exc, UNSEEN_AFTER_RESTART, None)
    return unseen if type(unseen) is int else None


# -- paths and the daemon's lock -------------------------------------------------------------


def resolve_home(home: str | Path | None) -> Path:
    return Path(home).expanduser().absolute() if home is not None else default_home().absolute()


def socket_path(home: Path) -> Path:
    return home / SOCKET_NAME


def endpoint(home: Path) -> str:
    path = str(socket_path(home))
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"the home path is too long for a local socket ({path}: more than "
            f"{MAX_SOCKET_PATH} bytes): use a shorter --home / PILOT_HOME"
        )
    return "ipc://" + path


def pub_endpoint(home: Path) -> str:
    return "ipc://" + str(home / PUB_SOCKET_NAME)


def stream_socket_path(home: Path) -> Path:
    return home / STREAM_SOCKET_NAME


# -- the stream socket's framing -----------------------------------------------------------------

# Each message: the count of its frames (1 or 2), the header's length, the payload's length
# (0 without one), then the frames' bytes (docs/ipc.md, The stream socket).
_PREFIX = struct.Struct("!BII")


class FramingError(Exception):
    """The bytes on a stream socket are not messages: the connection is dropped."""


def compact_json(value: dict[str, Any]) -> bytes:
    """A header's JSON without blanks: what a data socket's kinds carry after their bytes."""
    return json.dumps(value, separators=(",", ":")).encode()


def pack_frames(frames: list[bytes]) -> list[bytes]:
    """A message's frames (a header, and maybe a payload) as the byte strings to write."""
    if len(frames) == 1:
        return [_PREFIX.pack(1, len(frames[0]), 0), frames[0]]
    header, payload = frames
    return [_PREFIX.pack(2, len(header), len(payload)), header, payload]


class FrameReader:
    """Cuts the bytes read from a stream socket into messages; a frame longer than
    ``max_frame`` bytes is a :class:`FramingError` before any of it is held. A payload is
    gathered as views of what was read and joined once: one copy, whatever its size."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._head = bytearray()  # the prefix and header of the next message, so far
        self._size = -1  # the header's length, once the prefix is in
        self._frames = 0
        self._payload = 0
        self._header: bytes | None = None  # once read, while its payload comes
        self._chunks: list[memoryview] = []
        self._have = 0  # payload bytes in _chunks

    def feed(self, data: bytes) -> list[list[bytes]]:
        if self._size < 0 and self._header is None and not self._head \
                and len(data) >= _PREFIX.size:
            # The usual read on a request/reply path: exactly one whole message, cut at once.
            frames, size, payload = _PREFIX.unpack_from(data)
            end = _PREFIX.size + size
            if end + payload == len(data):
                self._check(frames, size, payload)
                if frames == 1:
                    return [[data[_PREFIX.size:]]]
                return [[data[_PREFIX.size:end], data[end:]]]
        messages: list[list[bytes]] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._header is not None:
                take = min(self._payload - self._have, end - pos)
                self._chunks.append(view[pos:pos + take])
                self._have += take
                pos += take
                if self._have == self._payload:
                    messages.append([self._header, b"".join(self._chunks)])
                    self._header, self._chunks, self._have = None, [], 0
                continue
            want = _PREFIX.size if self._size < 0 else _PREFIX.size + self._size
            take = min(want - len(self._head), end - pos)
            self._head += view[pos:pos + take]
            pos += take
            if len(self._head) < want:
                break
            if self._size < 0:
                self._start(*_PREFIX.unpack(self._head))
                if self._size:
                    continue
            header = bytes(self._head[_PREFIX.size:])
            self._head.clear()
            self._size = -1
            if self._frames == 1:
                messages.append([header])
            elif self._payload == 0:
                messages.append([header, b""])
            else:
                self._header = header
        return messages

    def _start(self, frames: int, size: int, payload: int) -> None:
        self._check(frames, size, payload)
        self._frames, self._size, self._payload = frames, size, payload

    def _check(self, frames: int, size: int, payload: int) -> None:
        if frames not in (1, 2) or (frames == 1 and payload) or size == 0 \
                or size > self.max_frame or payload > self.max_frame:
            raise FramingError(f"not a message: {frames} frames of {size} and {payload} bytes")


# -- compact headers: the hot data verbs without JSON (docs/ipc.md, Compact headers) ------------

# A request: verb, flags, a number (the sink of a quiet one, else its id), then the stream or
# message id it is about, UTF-8, to the header's end. Its payload is the second frame.
COMPACT_REQUEST = struct.Struct("!BBQ")
COMPACT_STREAM_SEND = 0x01
COMPACT_REPLY = 0x02
COMPACT_QUIET = 0x01  # flags: answered only if it fails, with the id "q<number>.<about>"
# What a client may have sent quiet on one stream and not had confirmed (docs/ipc.md, Quiet
# sends): the SDK's send window is at most this, and the daemon refuses a quiet send on a
# stream that has taken more than this and one message past its bound.
MAX_SEND_WINDOW_BYTES = 16 * 1024 * 1024
# A message a compact delivery pushes: verb, the delivery's request id, port, source port, and
# the lengths of the message id, the sender's node id and its hostname (0: unknown), which
# follow in that order, UTF-8. Its payload is the second frame.
COMPACT_MESSAGE = struct.Struct("!BQHHBBB")
COMPACT_DELIVERED = 0x81
COMPACT_VERBS = frozenset({COMPACT_STREAM_SEND, COMPACT_REPLY, COMPACT_DELIVERED})
COMPACT_MAX_ID = 2**64 - 1


def pack_message(request_id: int, message: dict[str, Any]) -> bytes | None:
    """A pushed message's compact header; None if a field does not fit it (then it goes as
    JSON)."""
    hostname = message["hostname"] or ""
    texts = [message["id"].encode(), message["from"].encode(), hostname.encode()]
    if max(map(len, texts)) > 255:
        return None
    return b"".join((COMPACT_MESSAGE.pack(COMPACT_DELIVERED, request_id, message["port"],
                                          message["source_port"], *map(len, texts)), *texts))


def unpack_message(header: bytes) -> dict[str, Any]:
    """The reply a compact message header stands for, as its JSON form would be (without the
    payload). Our own daemon wrote it: a malformed one is a ValueError."""
    _, request_id, port, source_port, id_size, from_size, name_size = \
        COMPACT_MESSAGE.unpack_from(header)
    start = COMPACT_MESSAGE.size
    sender = start + id_size
    name = sender + from_size
    if len(header) != name + name_size:
        raise ValueError("not a compact message header")
    return {"ok": True, "id": request_id, "message": {
        "id": header[start:sender].decode(), "from": header[sender:name].decode(),
        "hostname": header[name:].decode() or None, "port": port, "source_port": source_port}}


# -- data sockets: a stream's messages on a connection of their own (docs/ipc.md, Data sockets) --

# The kind of a data socket's message: its header's first byte. The client's kinds, then the
# daemon's (their high bit set).
DATA_SEND = 0x01  # its payload frame is a message to send on the stream
DATA_DRAIN = 0x02  # then JSON {"timeout": seconds}: answer once the peer acked what came before
DATA_CLOSE = 0x03  # finish the stream after what came before; nothing may follow it
DATA_MESSAGE = 0x81  # its payload frame is a message that came on the stream
DATA_DRAINED = 0x82  # then JSON: the answer to a drain, in order
DATA_CLOSED = 0x83  # then JSON: the answer to the close; the connection closes after it
DATA_ENDED = 0x84  # then JSON, an error reply: the stream ended; the connection's last message
# ... and a port's data socket (a way: the number the daemon gives a peer's stream to the port).
PORT_REPLY = 0x21  # a way (u32), flags (u8), then the reply as the payload frame
PORT_TAKEN = 0x22
PORT_CLOSE = 0x23
PORT_SYNC = 0x24
PORT_ARRIVAL = 0x25
PORT_CREDIT = 0x26  # messages (u32), bytes (u32): the credit from now on
# A port socket's credit, in its attach and its 'credit' frames (which give each in 4 bytes).
MAX_CREDIT_MESSAGES = 1 << 20
MAX_CREDIT_BYTES = (1 << 32) - 1
PORT_MESSAGE = 0xA1
PORT_WAY_ENDED = 0xA2  # a reply on the way failed
PORT_CONFIRMED = 0xA3
PORT_SYNCED = 0xA4
PORT_ARRIVED = 0xA5
PORT_WAY_CLOSED = 0xA6  # the way's stream ended: the number is forgotten
PORT_REPLY_CONFIRM = 0x01  # a reply's flag: answer 'confirmed' once its stream has room
# ... and: reset the stream once its peer reads nothing for unread_replies_timeout (a replier's)
PORT_REPLY_BOUNDED = 0x02


def daemon_pid(home: Path) -> int | None:
    """The pid of the daemon running for ``home``, or None. Whoever holds the lock file runs it;
    a lock dies with its process, so a crashed daemon never looks alive. No lock file: none
    runs; a lock file that can't be opened (too many open files, say) is a PilotError naming
    why, not a daemon said not to run."""
    path = home / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PilotError(f"cannot tell whether a daemon runs for {home}: cannot open {path}: "
                         f"{exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int((home / PID_NAME).read_text().strip())
            except (OSError, ValueError):
                return -1  # running, pid file not written yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def start_hint(home: Path) -> str:
    extra = "" if home == default_home().absolute() else f" --home {home}"
    return f"pilotctl daemon start --hostname NAME{extra}"


def not_running(home: Path) -> DaemonNotRunningError:
    return DaemonNotRunningError(
        f"the pilot-agents daemon is not running (home {home}): start it with "
        f"'{start_hint(home)}'"
    )


# -- message payloads --------------------------------------------------------------------------

def encode_data(data: bytes) -> tuple[str, str]:
    """``(text, encoding)`` for a JSON field: UTF-8 text when it is, base64 otherwise."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def decode_data(text: str, encoding: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError("data is not valid base64") from None
    return text.encode("utf-8")


# -- the client ----------------------------------------------------------------------------------

_context: Any = None
_monitors = itertools.count()  # names the inproc endpoints of the clients' monitor sockets


def _zmq_context() -> Any:
    global _context
    import zmq.asyncio

    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


OnReply = Callable[[dict[str, Any]], None]  # called with each reply of a delivery
# Told the error of a quiet request, and the stream or message id it was about ("": unknown).
OnError = Callable[[PilotError, str], None]
ABANDONED_SINKS = 1024  # aborted senders whose late failures are dropped, newest kept
QUIET = "q"  # a quiet request's id is "q<sink>.<about>": its error reply names where it goes
_DELIVERED = bytes([COMPACT_DELIVERED])


def not_answering(home: Path, what: str) -> DaemonNotRunningError:
    """A daemon that runs and did not answer ``what`` (a request, with how long it waited)."""
    return DaemonNotRunningError(f"the daemon (home {home}) did not answer {what}; see "
                                 f"{home / LOG_NAME}")


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


async def connect_stream_socket(home: Path, protocol: Callable[[], _P], patience: float,
                                ) -> tuple[asyncio.Transport, _P]:
    """A connection to the daemon's stream socket. A non-blocking connect finding its listen
    queue full fails with EAGAIN, which asyncio takes for a connect under way and, at once, for
    one made: the socket is not connected, and its first write fails as if the daemon had gone
    away. So a connection is checked (it has a peer), and one refused so is tried again, for
    ``patience`` seconds at most: a burst of clients waits its turn. Other failures raise
    their OSError, as ``create_unix_connection``'s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    pause = 0.001
    while True:
        transport, made = await loop.create_unix_connection(protocol, str(stream_socket_path(home)))
        try:
            transport.get_extra_info("socket").getpeername()
        except OSError:
            transport.abort()  # refused: its protocol hears it lost, before anyone uses it
        else:
            return transport, made
        if loop.time() + pause > deadline:
            raise not_answering(home, f"a connection to its stream socket within {patience:g} s "
                                "(its listen queue stayed full)")
        await asyncio.sleep(pause)
        pause = min(2 * pause, 0.05)


def check_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """ConfigError unless the running event loop is ``loop``, a connection's."""
    if asyncio.get_running_loop() is not loop:
        raise ConfigError("a Client belongs to the event loop that opened it; open one per loop "
                          "(or per thread)")


def _carried(reply: dict[str, Any]) -> str | None:
    """The id of the message a successful reply hands out, if it carries one."""
    message = reply.get("message")
    if reply.get("ok") and isinstance(message, dict) and message.get("id") is not None:
        return str(message["id"])
    return None


class IpcClient:
    """One connection to the daemon; many requests may be in flight at once. It is the
    daemon's stream socket where there is one (``stream_socket``), else a ZeroMQ DEALER.

        async with IpcClient(home) as client:
            info = await client.request("info")

    ``margin``: seconds to wait for a reply beyond the request's own ``timeout`` (or, without
    one, at all) before asking whether the daemon answers at all; only a daemon that does not
    answer that question within ``margin`` is reported as not answering, so a request that
    legitimately waits long (a ``stream_close`` on a slow peer) is never misreported.
    """

    def __init__(self, home: str | Path | None = None, margin: float = REQUEST_TIMEOUT,
                 stream_socket: bool = True) -> None:
        self.home = resolve_home(home)
        self.margin = margin
        self.stream_socket = stream_socket
        self._channel: _Channel | None = None  # on the stream socket
        self._opening = asyncio.Lock()
        self._requeues: set[asyncio.Task[None]] = set()
        # A plain DEALER, read and written without waiting (NOBLOCK): cheaper per message than
        # zmq.asyncio's futures. ``_readable`` is set by the event loop when ZeroMQ's
        # descriptor signals, and by a send that finds replies waiting.
        self._socket: Any = None
        self._fd: int | None = None
        self._readable = asyncio.Event()
        self._monitor: Any = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._deliveries: dict[int, OnReply] = {}
        self._sinks: dict[int, OnError] = {}  # where the errors of quiet requests go
        # ... and those whose sink is gone (its sender was closed or dropped meanwhile)
        self.orphan_errors: OnError | None = None
        # Sinks of senders that gave up their stream (an abort): what still fails there was
        # given up with it. The newest only: a failure comes back within the daemon's answer.
        self._abandoned: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._sink_ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._lost: PilotError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the connection's, once opened

    async def __aenter__(self) -> IpcClient:
        await self.open()
        return self

    @property
    def on_stream_socket(self) -> bool:
        """Whether this client talks to the daemon on its stream socket (not ZeroMQ)."""
        return self._channel is not None

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._socket is not None or self._channel is not None:
            self._check_loop()
            return
        async with self._opening:
            if self._socket is None and self._channel is None:
                await self._connect()

    def _check_loop(self) -> None:
        """A connection is its event loop's (its reads are callbacks there): from another one,
        a request would be written and its answer never seen, as a silent daemon's."""
        check_loop(self._loop)

    async def _connect(self) -> None:
        import zmq

        self._loop = asyncio.get_running_loop()

        address = endpoint(self.home)
        if daemon_pid(self.home) is None:
            raise not_running(self.home)
        path = stream_socket_path(self.home)
        if self.stream_socket and path.exists():
            try:
                _, self._channel = await connect_stream_socket(
                    self.home, lambda: _Channel(self), self.margin)
            except OSError:
                pass  # a daemon too old to have one, or going away: ZeroMQ tells
            else:
                self._lost = None
                return
        context = _zmq_context()
        socket = zmq.Socket(context, zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        self._monitor = context.socket(zmq.PAIR)
        monitor_address = f"inproc://pilot-ipc-monitor-{id(self)}-{next(_monitors)}"
        socket.monitor(monitor_address, zmq.EVENT_DISCONNECTED)
        self._monitor.connect(monitor_address)
        socket.connect(address)
        self._socket = socket
        self._fd = fd = cast(int, socket.getsockopt(zmq.FD))
        asyncio.get_running_loop().add_reader(fd, self._readable.set)
        self._lost = None
        self._tasks = [
            asyncio.create_task(self._read_replies()),
            asyncio.create_task(self._watch_connection()),
        ]
        for task in self._tasks:
            task.add_done_callback(self._helper_done)

    def _helper_done(self, task: asyncio.Task[None]) -> None:
        """Without its reader nothing would ever answer: fail the waiting requests now."""
        if self._lost is None:
            self._lost = DaemonNotRunningError(
                f"the connection to the daemon (home {self.home}) was closed")
        self._fail_all(self._lost)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._channel is not None:
            # Said only where the daemon hears a client go (the stream socket): without it,
            # the daemon resets the streams of the messages this client was handed and did not
            # reply to, as for a client killed mid-request. Not waited for: if the socket's
            # buffer is full it goes unsaid, and that reset is the safe side.
            self._channel.write_now([BYE])
            self._channel.close()
            self._channel = None
        if self._socket is not None:
            if self._fd is not None:
                asyncio.get_running_loop().remove_reader(self._fd)
                self._fd = None
            with contextlib.suppress(Exception):
                self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = None
        self._fail_all(DaemonNotRunningError("the IPC client was closed"))

    async def request(self, cmd: str, wait: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply's fields; raise the error it reports. A
        message in the reply whose payload came as a frame has it as bytes in its ``data``.
        ``wait``: seconds to wait for the daemon, at most (default: see :attr:`margin`)."""
        return await self._request(cmd, wait, None, fields)

    async def carry(self, cmd: str, payload: bytes, **fields: Any) -> dict[str, Any]:
        """:meth:`request` for a command that carries a message (``send``, ``stream_send``,
        ``reply``, ``publish``): ``payload`` goes as a frame of its own."""
        return await self._request(cmd, None, payload, fields)

    async def begin(self, cmd: str, payload: bytes, **fields: Any,
                    ) -> asyncio.Task[dict[str, Any]]:
        """:meth:`carry` without waiting: the request is written now, and the task returned
        waits for its reply."""
        request_id, future = await self._send(cmd, payload, fields)
        return asyncio.create_task(self._finish(cmd, request_id, future, None, fields))

    def add_sink(self, on_error: OnError) -> int:
        """Somewhere for the errors of quiet requests to go (:meth:`quiet`)."""
        sink = next(self._sink_ids)
        self._sinks[sink] = on_error
        return sink

    def remove_sink(self, sink: int, *, abandoned: bool = False) -> None:
        """``abandoned``: its sender gave up what it sent (aborted its stream), so the errors
        still to come back for it are dropped instead of going to :attr:`orphan_errors`."""
        self._sinks.pop(sink, None)
        if abandoned:
            self._abandoned[sink] = None
            if len(self._abandoned) > ABANDONED_SINKS:
                self._abandoned.popitem(last=False)

    async def quiet(self, verb: int, about: str, payload: bytes, sink: int) -> None:
        """Send a ``stream_send`` (``verb`` COMPACT_STREAM_SEND, ``about`` the stream) or a
        ``reply`` (COMPACT_REPLY, the message) quiet, with a compact header: the daemon
        answers only if it fails, and then its error goes to ``sink``'s ``on_error``."""
        if self._lost is not None:
            raise self._lost
        if self._channel is None and self._socket is None:
            await self.open()
        else:
            self._check_loop()
        header = COMPACT_REQUEST.pack(verb, COMPACT_QUIET, sink) + about.encode()
        await self._send_frames([header, payload])

    def _quiet_failed(self, request_id: str, reply: dict[str, Any]) -> None:
        sink, _, about = request_id[1:].partition(".")
        self.fail_sink(int(sink or 0), error_of(reply), about)

    def fail_sink(self, sink: int, error: PilotError, about: str = "") -> None:
        """``about``: the stream or message id the failed request was about, if known."""
        on_error = self._sinks.get(sink, self.orphan_errors)
        if sink in self._abandoned:
            log.debug("a quiet request of an aborted stream failed: %s", error)
        elif on_error is None:  # its sender was closed meanwhile: nobody left to raise it to
            log.warning("a quiet request failed after its sender closed: %s", error)
        else:
            on_error(error, about)

    async def _request(self, cmd: str, wait: float | None, payload: bytes | None,
                       fields: dict[str, Any]) -> dict[str, Any]:
        request_id, future = await self._send(cmd, payload, fields)
        return await self._finish(cmd, request_id, future, wait, fields)

    async def _finish(self, cmd: str, request_id: int, future: asyncio.Future[dict[str, Any]],
                      wait: float | None, fields: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = await self._answer(cmd, future, wait, fields)
        except asyncio.CancelledError:
            # From now on its reply is a late one, whose message _dispatch hands back.
            self._waiting.pop(request_id, None)
            if not future.done():
                with contextlib.suppress(Exception):
                    await self.post("cancel", request=request_id)
            elif (not future.cancelled() and future.exception() is None
                  and (message_id := _carried(future.result())) is not None):
                # It came, and we were cancelled before taking it: back to its inbox, as a
                # late one's (else a receive cancelled then lost its message).
                self._requeue_later(message_id)
            raise
        finally:
            self._waiting.pop(request_id, None)
        if reply.get("ok") is True:
            return reply
        error = error_of(reply)
        if isinstance(error, BadRequestError) and cmd != "info":
            raise await self.explain_refusal(error)
        raise error

    async def explain_refusal(self, error: BadRequestError) -> PilotError:
        """``error``; or, when the daemon runs other code than this program (an upgrade it was
        not restarted after: it may not know what it refused), an error that says so. Asked
        only when a request is refused, so it costs nothing otherwise."""
        try:
            info = await self.request("info")
        except PilotError:
            return error
        if info.get("build") == build():
            return error
        return DaemonOutdatedError(
            f"{error}; the daemon (pid {info.get('pid')}) runs other code than this program "
            "(pilot-agents was upgraded, reinstalled or changed since it started): restart it "
            "with 'pilot-agents daemon stop', then 'pilot-agents daemon start'")

    async def deliver(self, on_reply: OnReply, **fields: Any) -> int:
        """Start a ``deliver`` request: ``on_reply`` gets each of its replies, the last one an
        error or ``"done"``. Its id, for :meth:`post` (``credit``) and :meth:`end_delivery`."""
        return await self._post("deliver", None, fields, on_reply=on_reply)

    async def end_delivery(self, request_id: int) -> None:
        """Cancel a delivery; returns once every message it pushed has been handed to its
        ``on_reply`` (the daemon answers the cancel after its last push)."""
        if request_id not in self._deliveries:
            return
        try:
            await self.request("cancel", request=request_id)
        finally:
            self._deliveries.pop(request_id, None)

    async def post(self, cmd: str, **fields: Any) -> None:
        """Send a request without waiting for (or matching) its reply."""
        await self._post(cmd, None, fields)

    async def _post(self, cmd: str, payload: bytes | None, fields: dict[str, Any], *,
                    future: asyncio.Future[dict[str, Any]] | None = None,
                    on_reply: OnReply | None = None) -> int:
        """Send a request; its replies go to ``future`` (the first) or ``on_reply`` (all)."""
        await self.open()
        if self._lost is not None:
            raise self._lost
        request_id = next(self._ids)
        if future is not None:
            self._waiting[request_id] = future
        if on_reply is not None:
            self._deliveries[request_id] = on_reply
        header = json.dumps({"cmd": cmd, "id": request_id, **fields}).encode("utf-8")
        await self._send_frames([header] if payload is None else [header, payload])
        return request_id

    async def _send_frames(self, frames: list[bytes]) -> None:
        if self._channel is not None:
            if not self._channel.write_now(frames):
                await self._channel.write(frames)
            return
        import zmq

        while True:
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                # Our queue to the daemon is full (client_queue_messages unread requests):
                # rare, so a short sleep rather than a second kind of wake-up.
                await asyncio.sleep(0.001)
            finally:
                # Sending may have consumed the signal of a reply that arrived meanwhile.
                if self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._readable.set()

    async def _send(self, cmd: str, payload: bytes | None, fields: dict[str, Any],
                    ) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        return await self._post(cmd, payload, fields, future=future), future

    async def _answer(self, cmd: str, future: asyncio.Future[dict[str, Any]],
                      wait: float | None, fields: dict[str, Any]) -> dict[str, Any]:
        if wait is not None:
            return await self._within(cmd, future, wait)
        timeout = fields.get("timeout")
        return await self.outwait(
            f"'{cmd}'", future, self.margin + (float(timeout) if timeout is not None else 0.0))

    async def outwait(self, what: str, future: asyncio.Future[dict[str, Any]],
                      patience: float | None = None) -> dict[str, Any]:
        """``future``'s result (an answer of the daemon's), however long it takes while the
        daemon still answers: past ``patience`` seconds (default :attr:`margin`), it is waited
        for on only while the daemon answers an 'info' within the margin, each margin; else
        DaemonNotRunningError, saying the daemon did not answer ``what`` and is stuck."""
        patience = self.margin if patience is None else patience
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for returns the reply when it comes
                # in the same step as a cancel, and the cancel is lost (a task that must stop
                # runs on: Publisher.close waited for ever on a feed task so spared).
                async with asyncio.timeout(patience):
                    return await asyncio.shield(future)
            except TimeoutError:
                pass
            # Still working, or hung? Only a daemon that does not answer a question as short
            # as 'info' is reported; one that does goes on with the request.
            probe_id, probe = await self._send("info", None, {})
            try:
                await self._within("info", probe, self.margin)
            except DaemonNotRunningError:
                # The whole wait, which the request's own timeout is only part of.
                raise not_answering(
                    self.home, f"{what} in {loop.time() - started:.1f} s, nor within "
                    f"{self.margin:g} s a check that it is alive: it is stuck (stopped?)"
                ) from None
            finally:
                self._waiting.pop(probe_id, None)
            patience = self.margin

    async def _within(self, cmd: str, future: asyncio.Future[dict[str, Any]],
                      wait: float) -> dict[str, Any]:
        try:
            async with asyncio.timeout(wait):  # not wait_for: see _answer
                return await asyncio.shield(future)
        except TimeoutError:
            raise not_answering(self.home, f"'{cmd}' within {wait:g} s") from None

    async def _read_replies(self) -> None:
        import zmq

        while True:
            try:
                frames = self._socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                # ZeroMQ's descriptor signals a change, not readiness: look before waiting.
                self._readable.clear()
                if not self._socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    await self._readable.wait()
                continue
            requeue = self._dispatch(frames)
            if requeue is not None:
                await self.post("requeue", message=requeue)

    def _dispatch(self, frames: list[bytes]) -> str | None:
        """Hand a reply to whoever waits for it; a message nobody waits for any more: its id,
        to be requeued."""
        try:
            if frames[0][:1] == _DELIVERED:
                reply = unpack_message(frames[0])
            else:
                reply = json.loads(frames[0].decode("utf-8"))
        except (ValueError, struct.error):
            return None
        if not isinstance(reply, dict):
            return None
        message = reply.get("message")
        if len(frames) > 1 and isinstance(message, dict):
            message["data"] = frames[1]
        request_id = reply.get("id")
        if type(request_id) is str and request_id[:1] == QUIET:
            with contextlib.suppress(ValueError):
                self._quiet_failed(request_id, reply)
            return None
        on_reply = self._deliveries.get(request_id)  # type: ignore[arg-type]
        if on_reply is not None:
            if reply.get("ok") is not True or reply.get("done"):
                del self._deliveries[request_id]  # type: ignore[arg-type]  # its last
            on_reply(reply)
            return None
        future = self._waiting.get(request_id)  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(reply)
            return None
        return _carried(reply)  # its receiver gave up: the next receive gets the message


    def _requeue_later(self, message_id: str) -> None:
        task = asyncio.create_task(self.post("requeue", message=message_id))
        self._requeues.add(task)
        task.add_done_callback(self._requeues.discard)

    def _channel_lost(self, channel: _Channel) -> None:
        if channel is not self._channel:
            return  # closed by us
        self._channel = None
        self._lost = DaemonNotRunningError(
            f"the daemon (home {self.home}) went away; see {self.home / LOG_NAME}")
        self._fail_all(self._lost)

    async def _watch_connection(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            frames = await self._monitor.recv_multipart()
            event = parse_monitor_message(frames)
            if event["event"]:
                self._lost = DaemonNotRunningError(
                    f"the daemon (home {self.home}) went away; see {self.home / LOG_NAME}"
                )
                self._fail_all(self._lost)

    def _fail_all(self, error: PilotError) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        deliveries, self._deliveries = self._deliveries, {}
        for on_reply in deliveries.values():
            on_reply(error_reply(error))


def error_of(reply: dict[str, Any]) -> PilotError:
    """The exception an ``{"ok": false}`` reply reports."""
    error = reply.get("error")
    return error_from_reply(error if isinstance(error, dict) else {})


class FramedProtocol(asyncio.Protocol):
    """A client's connection to the daemon's stream socket, in its framing (docs/ipc.md): what
    it reads goes to :meth:`messages_received` as whole messages, and a writer waits for
    ``_writable`` while the transport holds more than its high-water mark."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader(2**32)  # what our own daemon sends
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except FramingError:
            self.not_framed()
            return
        self.messages_received(messages)

    def messages_received(self, messages: list[list[bytes]]) -> None:
        raise NotImplementedError

    def not_framed(self) -> None:
        """The daemon sent something that is not a message: the connection can't go on."""
        raise NotImplementedError


class _Channel(FramedProtocol):
    """The client's end of the daemon's stream socket."""

    def __init__(self, client: IpcClient) -> None:
        super().__init__()
        self._client = client

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._writable.set()
        self._client._channel_lost(self)

    def not_framed(self) -> None:
        self.close()

    def messages_received(self, messages: list[list[bytes]]) -> None:
        for frames in messages:
            requeue = self._client._dispatch(frames)
            if requeue is not None:
                self._client._requeue_later(requeue)

    def write_now(self, frames: list[bytes]) -> bool:
        """:meth:`write` if it need not wait (the usual case): no coroutine; False if not."""
        if self._transport is None or not self._writable.is_set():
            return False
        self._transport.writelines(pack_frames(frames))
        return True

    async def write(self, frames: list[bytes]) -> None:
        # The daemon not reading makes the kernel's buffer and then the transport's fill:
        # wait for room, as a full ZeroMQ queue makes the DEALER wait.
        if not self._writable.is_set():
            await self._writable.wait()
        if self._transport is None:
            raise self._client._lost or DaemonNotRunningError("the daemon went away")
        self._transport.writelines(pack_frames(frames))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
