"""The daemon's local API: JSON requests over ZeroMQ on ``ipc://<home>/daemon.sock``.

The daemon binds a ROUTER socket; a client connects a DEALER (or REQ) and sends one JSON object per
message, ``{"cmd": "...", "id": ..., ...}``; the reply is ``{"ok": true, "id": ..., ...}`` or
``{"ok": false, "id": ..., "error": {"type": "...", "message": "..."}}``. Requests run concurrently,
so replies may come back out of order: match them by ``id``. The whole protocol is described in
``docs/ipc.md``; the request models in ``daemon/requests.py`` are its machine-readable form.

This module has the error mapping, the paths in the home, and the asyncio client the SDK and the
CLI use; the request models (pydantic) are in ``daemon/requests.py``, so clients never load
pydantic.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import itertools
import json
import os
from pathlib import Path
from typing import Any

from .errors import (
    BadRequestError,
    ConfigError,
    DaemonNotRunningError,
    PilotError,
    from_name,
)
from .home import DAEMON_LOCK, DAEMON_PID
from .identity import default_home

SOCKET_NAME = "daemon.sock"
PUB_SOCKET_NAME = "pub.sock"
LOCK_NAME = DAEMON_LOCK
PID_NAME = DAEMON_PID
LOG_NAME = "daemon.log"
MAX_SOCKET_PATH = 100  # bytes; sun_path holds 108 and ZeroMQ needs a little of it
REQUEST_TIMEOUT = 10.0  # seconds a client waits for the daemon beyond the request's own timeout
PROTOCOL_VERSION = 1


# -- errors ------------------------------------------------------------------------------------


def error_reply(exc: BaseException, request_id: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "ok": False, "error": {"type": type(exc).__name__, "message": str(exc) or repr(exc)},
    }
    if request_id is not None:
        reply["id"] = request_id
    return reply


def error_from_reply(error: dict[str, Any]) -> PilotError:
    """The exception an error reply stands for (a PilotError subclass found by name)."""
    return from_name(str(error.get("type", "PilotError")),
                     str(error.get("message", "the daemon reported an error")))


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


def daemon_pid(home: Path) -> int | None:
    """The pid of the daemon running for ``home``, or None. Whoever holds the lock file runs it;
    a lock dies with its process, so a crashed daemon never looks alive."""
    try:
        fd = os.open(home / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
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


def _zmq_context() -> Any:
    global _context
    import zmq.asyncio

    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


class IpcClient:
    """One DEALER connection to the daemon; many requests may be in flight at once.

        async with IpcClient(home) as client:
            info = await client.request("info")
    """

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = resolve_home(home)
        self._socket: Any = None
        self._monitor: Any = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._lost: PilotError | None = None

    async def __aenter__(self) -> IpcClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._socket is not None:
            return
        import zmq

        address = endpoint(self.home)
        if daemon_pid(self.home) is None:
            raise not_running(self.home)
        socket = _zmq_context().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        socket.connect(address)
        self._socket = socket
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
        if self._socket is not None:
            with contextlib.suppress(Exception):
                self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = None
        self._fail_all(DaemonNotRunningError("the IPC client was closed"))

    async def request(self, cmd: str, wait: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply's fields; raise the error it reports.
        ``wait``: seconds to wait for the daemon (default: the request's timeout + 10 s)."""
        await self.open()
        if self._lost is not None:
            raise self._lost
        request_id = next(self._ids)
        body = {"cmd": cmd, "id": request_id, **{k: v for k, v in fields.items()}}
        if wait is None:
            timeout = fields.get("timeout", 0.0)
            wait = None if timeout is None else float(timeout or 0.0) + REQUEST_TIMEOUT
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._socket.send(json.dumps(body).encode("utf-8"))
            reply = await asyncio.wait_for(asyncio.shield(future), wait)
        except TimeoutError:
            raise DaemonNotRunningError(
                f"the daemon (home {self.home}) did not answer '{cmd}' within {wait:.0f} s; "
                f"see {self.home / LOG_NAME}"
            ) from None
        except asyncio.CancelledError:
            if not future.done():
                with contextlib.suppress(Exception):
                    await self._socket.send(json.dumps(
                        {"cmd": "cancel", "request": request_id}).encode())
            raise
        finally:
            self._waiting.pop(request_id, None)
        if reply.get("ok") is True:
            return reply
        error = reply.get("error")
        raise error_from_reply(error if isinstance(error, dict) else {})

    async def _read_replies(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                reply = json.loads(frames[-1])
            except ValueError:
                continue
            if not isinstance(reply, dict):
                continue
            future = self._waiting.get(reply.get("id"))  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(reply)
            elif reply.get("ok") and isinstance(reply.get("message"), dict):
                # Its receiver gave up: hand the message back so the next receive gets it.
                message_id = reply["message"].get("id")
                if message_id is not None:
                    await self._socket.send(json.dumps(
                        {"cmd": "requeue", "message": message_id}).encode())

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
