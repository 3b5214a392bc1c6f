"""The one interface every layer above the network is written against.

An application, a message-bus pattern, a LangGraph node or an MCP bridge talks to a
:class:`Transport`; two implement it:

- :class:`pilot_agents.node.Node`, the embedded node (the tunnel runs in this process), and
- :class:`pilot_agents.sdk.Client`, the daemon of a home reached over its local ZeroMQ API.

Both give the same calls with the same shapes (every wait is a coroutine, ``close`` and
``abort`` included), so code written once runs on either::

    async def hello(t: Transport) -> None:
        async with t.connect("reporter-agent", 1001) as conn:
            await conn.send({"rows": 1842})
            print((await conn.receive(timeout=5)).json())

This module imports nothing of the package but its errors; the layers above it may
import it, :mod:`pilot_agents.errors` and the SDK, and nothing else.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, Protocol, Self

from .errors import ConfigError, PilotTimeoutError

log = logging.getLogger("pilot_agents")

DEFAULT_PORT = 1001  # the port `connect`, `send` and the daemon's inbox use unless told
DEFAULT_TIMEOUT = 30.0  # seconds, for every receive without an explicit timeout
# Seconds a reply may wait for room on a stream whose peer reads none of it before the stream
# is reset (ResetCode.UNREAD): a replier is shared, and one requester that stops reading its
# replies must not hold it (its handlers, the daemon's confirmations) for ever.
UNREAD_REPLIES_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0  # seconds to open a tunnel and a stream (resolution included)


def encode_payload(data: object) -> bytes:
    """What ``send`` puts on the wire: bytes as they are, str as UTF-8, anything else as JSON."""
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


class Payload:
    """How a received message's bytes read; a base of every transport's message class."""

    data: bytes

    def text(self) -> str:
        return self.data.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.data)


class Message(Protocol):
    """One message as it arrived: its bytes, who sent it, and the way to answer it."""

    data: bytes
    sender: str  # the sender's node id
    port: int  # our port it arrived on
    source_port: int  # the sender's port (ephemeral for a connection)

    def text(self) -> str:
        """The bytes as UTF-8."""
        ...

    def json(self) -> Any:
        """The bytes as JSON (any JSON value)."""
        ...

    async def reply(self, data: object, *, stall: float | None = None) -> None:
        """Send ``data`` back on the stream this message came from. ``stall``: bound the wait
        for a peer that reads nothing of the stream, its bound reached: after ``stall``
        seconds embedded, after the daemon's ``unread_replies_timeout`` on a port's data socket
        (the SDK's listeners), the stream is reset and the reply fails (for a replier many
        peers share: see UNREAD_REPLIES_TIMEOUT). None, or another way of reaching a daemon:
        wait as long as it takes."""
        ...

    async def since_arrival(self) -> float | None:
        """As :meth:`Connection.since_arrival`, for the stream this message came on (None:
        not known): how a listener tells a peer sending a long message from a silent one."""
        ...

    def on_hangup(self, callback: Callable[[], object]) -> Callable[[], object] | None:
        """Call ``callback`` once the stream this message came on can no longer carry a reply
        (its sender reset it, died or closed it, or its tunnel closed), at once if it already
        cannot: a replier stops work nobody will read. Returns what undoes this, or None if
        this message's transport cannot tell: through a daemon only a listener's data socket
        hears of it (the SDK's listeners, by default)."""
        ...


def _nothing_to_undo() -> None:
    pass


class Hangups:
    """The callbacks :meth:`Message.on_hangup` registered for one stream, until it hangs up."""

    __slots__ = ("_callbacks", "gone")

    def __init__(self, gone: bool = False) -> None:
        self._callbacks: dict[object, Callable[[], object]] = {}
        self.gone = gone

    def add(self, callback: Callable[[], object]) -> Callable[[], object]:
        if self.gone:
            callback()
            return _nothing_to_undo
        token = object()
        self._callbacks[token] = callback
        return functools.partial(self._callbacks.pop, token, None)

    def hang_up(self) -> None:
        """Call each callback, once: the stream can no longer carry a reply."""
        self.gone = True
        callbacks = list(self._callbacks.values())
        self._callbacks.clear()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one callback's bug must not keep the others from being told
                log.exception("a hang-up callback raised")


class Connection(Protocol):
    """A stream to a port on a peer: messages both ways, ordered, each delivered once.
    Opened by ``async with``; leaving the block closes it (or aborts it on an exception)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def path(self) -> str:
        """``"direct"`` or ``"relay"``: how packets reach the peer now."""
        ...

    @property
    def rtt(self) -> float | None:
        """The smoothed round-trip time in seconds, once measured."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None: ...

    async def send(self, data: object) -> None:
        """Queue a message (bytes as they are, str as UTF-8, anything else as JSON); waits
        while the peer is slower than us."""
        ...

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> Message:
        """The next message from the peer; :class:`~pilot_agents.errors.PilotTimeoutError`
        after ``timeout`` seconds (``None``: wait for ever)."""
        ...

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the peer has acknowledged everything sent so far."""
        ...

    async def since_arrival(self) -> float | None:
        """Seconds since bytes of the peer's side of the stream last arrived (None: none yet),
        whole messages or not: a long message still arriving is not silence."""
        ...

    async def close(self) -> None:
        """Finish the stream and wait until the peer has every byte."""
        ...

    async def abort(self) -> None:
        """Drop the stream at once; the peer sees it reset."""
        ...


async def receive_unless_silent(conn: Connection, silence: float) -> Message:
    """The peer's next message; :class:`~pilot_agents.errors.PilotTimeoutError` once nothing
    of the stream has arrived for ``silence`` seconds. A message whose bytes are still
    arriving counts as word from the peer: no heartbeat can pass it on its stream, and a
    large one on a slow link may take longer than any heartbeat interval."""
    timeout = silence
    while True:
        try:
            return await conn.receive(timeout=timeout)
        except PilotTimeoutError:
            since = await conn.since_arrival()
            if since is None or since >= silence:
                raise PilotTimeoutError(f"silent for {silence:.1f} s") from None
            timeout = silence - since


class Listener(Protocol):
    """Messages arriving on one of our ports, from any trusted peer."""

    port: int

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> Message: ...

    def __aiter__(self) -> AsyncIterator[Message]: ...

    async def close(self) -> None: ...


class Transport(Protocol):
    """Reliable messages to ports on trusted peers, named by hostname or node id."""

    def connect(self, peer: str, port: int = DEFAULT_PORT,
                timeout: float = CONNECT_TIMEOUT) -> Connection:
        """A connection to ``port`` on ``peer``; use with ``async with``."""
        ...

    def listen(self, port: int, *, exclusive: bool = False) -> Listener:
        """Messages on ``port``; use with ``async with`` and ``async for``. ``exclusive``: every
        message of the port to this listener, for as long as it is open: PortInUseError if the
        port is listened on already, and for any other listen of it meanwhile (an embedded
        Node's listens always are)."""
        ...

    async def send(self, peer: str, port: int, data: object,
                   timeout: float = CONNECT_TIMEOUT) -> None:
        """Deliver one message and wait until the peer has it."""
        ...

    async def receive(self, port: int, timeout: float | None = DEFAULT_TIMEOUT) -> Message:
        """One message on ``port``."""
        ...
