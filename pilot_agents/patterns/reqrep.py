"""Request/reply over any :class:`~pilot_agents.transport.Transport`.

    requester = Requester(transport)
    reply = await requester.request("db-agent", 2001, {"sql": "..."}, timeout=5)

    async with Replier(transport, 2001) as replier:     # or: await serve(transport, 2001, fn)
        async for request in replier:
            await request.reply({"rows": 3})

Each request carries a 64-bit correlation id, so replies may come back in any order and many
requests are in flight on one stream at once: a slow handler holds up nobody but its own
requester. On a transport that hands each message over as it is delivered (the embedded node),
replies reach their requests there, and :func:`serve` starts a handler there, as the worker
task that finishes it (:mod:`.eager`): no task step comes between a datagram and its answer.
A requester keeps a few streams per peer and port (``streams_per_peer``) and puts a request on
the least busy one, so one large request delays the bytes of small ones only on its
own stream. A stream no request has used for ``idle_timeout`` seconds (60 by default) is
closed, and one that dies is forgotten at once: a long-lived requester (a gateway talking to
many peers and ports) holds only the streams it uses, and a request whose stream was just closed
opens a new one. A reply that does not come within the timeout raises
:class:`~pilot_agents.errors.PilotTimeoutError`; a handler that raises is answered with an error
reply, raised at the requester as :class:`~pilot_agents.errors.RemoteError`; a stream that dies
(the replier's node went away, its tunnel closed) fails every request waiting on it at once, as
does a malformed reply: the stream is dropped and its requests raise
:class:`~pilot_agents.errors.WireError` (a reply to an unknown id is only ignored: it may be a
late one). A request larger than a tunnel message raises :class:`~pilot_agents.errors.ConfigError`
before it is sent, and a handler's return value that cannot be sent (not bytes, str or JSON, or
too large) goes back as an error reply: neither touches the stream the others share.

A requester that gives up on a request (its timeout, or its task cancelled) says so with a
CANCEL frame, sent once and not waited for: the replier marks the request
:attr:`Request.cancelled` and calls its :meth:`Request.on_cancel` callback, :func:`serve`
cancels the handler (or drops the request before it starts), and an answer to it is not sent.
The replier reads a CANCEL while it receives; :func:`serve` keeps one receiving even when every
handler is busy. A replier from before CANCEL counts the frame as malformed and goes on. A
requester that goes away without a word (killed, its tunnel closed) is given up on the same way
once its stream ends (:meth:`~pilot_agents.transport.Message.on_hangup`).

Delivery: a request reaches the replier at most once (after a timeout a requester cannot know
whether the replier saw it, so it never resends one). The one resend: when the replier's node
restarted (a crash, a kill) under a stream, a request its old node never acknowledged goes again
on a new stream to the new one; one it had acknowledged but not answered raises
:class:`~pilot_agents.errors.ConnectionClosedError` saying so. Both transports know which those
are: the embedded one from its stream (:meth:`pilot_agents.node.Connection.
unseen_after_restart`), the daemon's from the stream's error (:meth:`pilot_agents.sdk.
DaemonConnection.unseen_after_restart`, docs/ipc.md "Streams across a peer's restart"). Until a
request's deadline its tunnel keeps trying a silent replier (it may be restarting).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import (
    ConfigError,
    ConnectionClosedError,
    PilotError,
    PilotTimeoutError,
    PortClosedError,
    RemoteError,
    WireError,
)
from ..transport import (
    DEFAULT_TIMEOUT,
    UNREAD_REPLIES_TIMEOUT,
    Connection,
    Listener,
    Message,
    Payload,
    Transport,
)
from . import eager
from .frames import (
    Kind,
    encode_error,
    encode_fitting,
    encode_frame,
    note_malformed,
    parse_error_untrusted,
    parse_frame_untrusted,
)

log = logging.getLogger("pilot_agents.patterns.reqrep")
# Seconds close() gives the CANCELs still on their way through a daemon: a process that ends
# right after a timeout (the CLI's `request`) would end them unsent.
CANCEL_WAIT = 1.0


@dataclass(frozen=True)
class ReqRepConfig:
    streams_per_peer: int = 4  # streams a requester opens to one peer and port, at most
    max_in_flight: int = 1024  # requests waiting for replies on one stream; more wait their turn
    handler_concurrency: int = 64  # requests serve() runs its handler on at once
    # Seconds a requester's stream may go unused before it is closed; under the daemon's own
    # stream_idle_timeout (10 min), after which it aborts a stream nobody uses.
    idle_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("streams_per_peer", "max_in_flight", "handler_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ReqRepConfig.{name} must be at least 1")
        if not 0 < self.idle_timeout < math.inf:  # (a timer can't be armed for ever on uvloop)
            raise ConfigError("ReqRepConfig.idle_timeout must be a positive number of seconds")


@dataclass
class Reply(Payload):
    """The answer to a request."""

    data: bytes
    sender: str  # the replier's node id


class Request(Payload):
    """A request as the replier sees it; answer it once with :meth:`reply` or :meth:`fail`.

    ``cancelled``: its requester gave up on it (timed out, or its task was cancelled) and said
    so, or went away (its stream ended); an answer is then not sent (nobody reads it).
    :meth:`on_cancel` asks to be told: :func:`serve` cancels the handler's work that way."""

    # Not a dataclass: one is made per request, and its generated __init__ sets every field.
    answered = False
    cancelled = False
    _on_cancel: Callable[[], object] | None = None

    def __init__(self, data: bytes, sender: str, port: int, request_id: int, message: Message,
                 replier: Replier | None = None) -> None:
        self.data = data
        self.sender = sender  # the requester's node id
        self.port = port
        self.id = request_id
        self._message = message
        self._replier = replier
        self._key = (sender, message.source_port, request_id)  # what a CANCEL names

    def __repr__(self) -> str:
        return (f"Request(sender={self.sender!r}, port={self.port}, id={self.id}, "
                f"{len(self.data)} bytes, answered={self.answered}, "
                f"cancelled={self.cancelled})")

    def on_cancel(self, callback: Callable[[], object] | None) -> None:
        """Call ``callback`` when the requester gives up on this request (at once if it has);
        it replaces an earlier one, and None removes it. The replier learns of a cancel
        while it receives: :func:`serve` always keeps one receiving."""
        self._on_cancel = callback
        if self.cancelled and callback is not None:
            callback()

    def _given_up(self) -> None:
        self.cancelled = True
        callback = self._on_cancel
        if callback is not None:
            try:
                callback()
            except Exception:  # a handler's: it must not break the delivery that read the CANCEL
                log.exception("the on_cancel callback of request %d on port %d raised",
                              self.id, self.port)

    async def reply(self, data: object) -> None:
        """Answer with ``data``; :class:`ConfigError` (and the request still unanswered) if it
        is not bytes, str or JSON, or is larger than a tunnel message."""
        await self._answer(Kind.REPLY, encode_fitting("a reply", data))

    async def fail(self, error: BaseException) -> None:
        """Answer with an error: the requester raises :class:`RemoteError` naming its type."""
        await self._answer(Kind.ERROR, encode_error(error))

    async def _answer(self, kind: Kind, payload: bytes) -> None:
        if not self._send(kind, payload):
            await self._sent(kind, payload)

    def _send(self, kind: Kind, payload: bytes) -> bool:
        """Answer without waiting if that can be done (the embedded transport's stream takes
        the frame when it has room): False if :meth:`_sent` must finish it."""
        if self.answered:
            raise ConfigError(f"request {self.id} was already answered")
        self.answered = True
        if self.cancelled:
            return True
        if self._replier is not None:
            self._replier._forget(self)
        way_back = getattr(self._message, "way_back", None)
        return way_back is not None and way_back.write(encode_frame(kind, self.id, payload))

    async def _sent(self, kind: Kind, payload: bytes) -> None:
        """What :meth:`_send` left: the frame sent, or its stream's room waited for."""
        way_back = getattr(self._message, "way_back", None)
        if way_back is None:
            await self._message.reply(encode_frame(kind, self.id, payload),
                                      stall=UNREAD_REPLIES_TIMEOUT)
        else:
            await way_back.room(stall=UNREAD_REPLIES_TIMEOUT)


@runtime_checkable
class _Resumable(Protocol):
    """A connection that can tell which messages a restarted peer never saw (the embedded
    :class:`~pilot_agents.node.Connection` and the daemon's
    :class:`~pilot_agents.sdk.DaemonConnection`; another transport may add these three).
    ``written`` is read per request: it must cost no more than an attribute."""

    @property
    def written(self) -> int: ...

    def hold_tunnel(self, timeout: float) -> None: ...

    def unseen_after_restart(self) -> int | None: ...


@runtime_checkable
class _Writable(Protocol):
    """A connection that takes a message without a coroutine when it has room (the embedded
    one: two coroutines fewer per request than ``send``)."""

    def write(self, payload: bytes) -> bool: ...

    async def room(self) -> None: ...


@runtime_checkable
class _Takeable(Protocol):
    """A connection or listener that hands each message to a callback as it is delivered
    (the embedded node's, :meth:`~pilot_agents.node.Connection.set_taker`): a reply reaches its
    request, and a request its handler, with no task woken to receive it."""

    def set_taker(self, take: Callable[[Message], bool] | None) -> None: ...


class _Unseen(Exception):
    """A request's replier restarted before it acknowledged the request: send it again."""


class _Stream:
    """One requester stream: its connection, the requests waiting on it, and who reads it.

    Where the connection offers each message as it is delivered (:class:`_Takeable`), replies
    go to their requests from there, and a reader task of the stream's only waits for its end.
    Elsewhere the replies are read by one of the requests waiting for them, in its own task:
    when only one request is in flight (a request/reply loop) its reply wakes it directly,
    where a reader task of the stream's own would wake first and then wake it (a task step more
    per round trip). A reader whose reply is in stops reading; if others still wait, a reader
    task takes over until none does."""

    def __init__(self, conn: Connection, peer: str, port: int, max_in_flight: int,
                 now: float) -> None:
        self.conn = conn
        self.peer = peer
        self.port = port
        # The loop's clock: when a request last took it, or the idle sweep found one on it.
        self.used = now
        self.waiting: dict[int, asyncio.Future[Reply]] = {}
        # Where each waiting request starts in the stream, if the connection can tell which
        # ones a restarted replier never saw.
        self.resumable = conn if isinstance(conn, _Resumable) else None
        self.writable = conn if isinstance(conn, _Writable) else None
        self.starts: dict[int, int] = {}
        self.held_until = 0.0  # the loop's clock: until when the tunnel is held for us
        self.unanswered = 0  # futures in waiting not yet done
        # Requests holding one of the max_in_flight slots, and those waiting for one, in turn.
        # (An asyncio.Semaphore costs three calls and a coroutine per request.)
        self.in_flight = 0
        self.max_in_flight = max_in_flight
        self.turns: deque[asyncio.Future[None]] = deque()
        self.reader: asyncio.Task[Any] | None = None  # the task reading, if any
        self.dead = False
        self.taken = False

    async def take_slot(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for a slot, in turn (the caller bounds the wait)."""
        if self.in_flight < self.max_in_flight and not self.turns:
            self.in_flight += 1
            return
        turn = loop.create_future()
        self.turns.append(turn)
        try:
            await turn  # woken with the slot its holder released: in_flight counts it still
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.release_slot()  # handed the slot, then cancelled: the next one's
            elif turn in self.turns:  # (not if a release popped it, cancelled, meanwhile)
                self.turns.remove(turn)
            raise

    def release_slot(self) -> None:
        """Hand the slot to the next request waiting for one, if any: a request that comes
        meanwhile cannot take it first (it would, between the wake-up and the woken's step,
        and the woken would wait again, at the back)."""
        while self.turns:
            turn = self.turns.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.in_flight -= 1

    def answer(self, future: asyncio.Future[Reply], reply: Reply | BaseException) -> None:
        if future.done():
            return
        self.unanswered -= 1
        if isinstance(reply, BaseException):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def fail(self, error: PilotError, *, resend: bool = True) -> None:
        """The stream is gone: every request waiting on it raises ``error``; or, if the
        replier's node restarted (and ``resend``), goes again (the old node never saw it) or
        raises that it restarted before replying."""
        self.dead = True
        unseen = None
        if resend and self.resumable is not None:
            unseen = self.resumable.unseen_after_restart()
        for request_id, future in self.waiting.items():
            if unseen is None:
                self.answer(future, error)
            elif self.starts.get(request_id, unseen) >= unseen:  # (none: not written yet)
                self.answer(future, _Unseen())
            else:
                self.answer(future, ConnectionClosedError(
                    f"the replier on {self.peer} port {self.port} restarted before replying "
                    "(its node had received the request, so it may have been handled): not "
                    "resent"))


# The longest a stream's opening waits, whatever the request's timeout (a daemon refuses a
# timeout past a week).
MAX_CONNECT_WAIT = 86400.0


def _no_replier(peer: str, port: int, closed: PortClosedError) -> PortClosedError:
    """What is missing there is a replier: the transport's own words suggest a listener."""
    return PortClosedError(f"{peer} has no replier on port {port} (start one there: serve() or "
                           f"'pilotctl serve {port} --exec CMD')", closed.code, closed.reason)


def _expired(peer: str, port: int, timeout: float) -> PilotTimeoutError:
    return PilotTimeoutError(f"no reply from {peer} port {port} within {timeout} s")


def _load(stream: _Stream) -> int:
    return len(stream.waiting)


class _Opening:
    """The requests opening a stream to one peer and port, one at a time: a burst of requests
    shares new streams instead of opening one each. Forgotten once none is left."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holding the lock or waiting for it


class Requester:
    """Sends requests and matches their replies; one per transport is plenty.
    ``async with`` it, or :meth:`close` it, to close its streams."""

    def __init__(self, transport: Transport, config: ReqRepConfig | None = None) -> None:
        self._transport = transport
        self.config = config or ReqRepConfig()
        # Live streams only, and no peer and port without one: a stream that dies, or goes
        # unused for idle_timeout, goes at once, so a long-lived requester (a gateway) holds
        # only what it uses. One timer sweeps out the idle ones.
        self._streams: dict[tuple[str, int], list[_Stream]] = {}
        self._opening: dict[tuple[str, int], _Opening] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # idle streams being aborted
        self._closes = 0  # close() calls: a stream opened across one is not kept
        self._ids = itertools.count(1)
        # Every request's deadline, and one timer for them all that only ever moves earlier
        # (as the node's Mailbox does): arming a timer per request costs about 3 us on uvloop,
        # a few percent of a round trip; this one is armed about once per timeout.
        self._deadlines: dict[int, tuple[float, asyncio.Task[Reply]]] = {}  # (loop's clock)
        self._expired: set[int] = set()  # requests the timer cancelled
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None  # asking costs a getpid on 3.11
        self._telling: set[asyncio.Task[None]] = set()  # CANCELs on their way (daemon's)
        self.malformed = 0  # malformed replies; each dropped the stream it came on

    async def __aenter__(self) -> Requester:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def request(self, peer: str, port: int, data: object,
                      timeout: float = DEFAULT_TIMEOUT) -> Reply:
        """Send ``data`` to the replier on ``port`` of ``peer`` and wait for its reply, up to
        ``timeout`` seconds; :class:`ConfigError` at once if it is larger than a tunnel message,
        or ``timeout`` is not a number (None: a request never waits for ever)."""
        payload = encode_fitting("a request", data)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        try:
            deadline = now + timeout
        except TypeError:  # None: a request to a dead peer would wait for ever
            raise ConfigError(f"request: timeout= takes a number of seconds, not {timeout!r}: "
                              "a request waits a bounded time for its reply") from None
        task: asyncio.Task[Reply] = asyncio.current_task(loop)  # type: ignore[assignment]
        closes = self._closes  # a close() after this fails the request: no new stream for it
        while True:  # more than once only if the replier restarted before it saw the request
            stream = self._reusable(self._streams.get((peer, port)))
            if (stream is None or stream.in_flight >= stream.max_in_flight
                    or stream.turns):  # a stream to open, or a turn to wait for
                opened = False
                try:
                    async with asyncio.timeout_at(deadline):
                        stream = await self._stream_for(peer, port, loop, closes, deadline)
                        opened = True
                        await stream.take_slot(loop)
                except PortClosedError as exc:
                    raise _no_replier(peer, port, exc) from None
                except TimeoutError:
                    if not opened:  # not even a stream: nothing was sent, nothing answered
                        raise PilotTimeoutError(
                            f"{peer} did not answer within {timeout} s (opening a stream to "
                            f"its port {port}): it is down, unreachable, or does not trust "
                            "us") from None
                    raise _expired(peer, port, timeout) from None
                if stream.dead:  # it died (or went idle) while we waited for a turn: not sent,
                    stream.release_slot()  # so try again
                    continue
                stream.used = loop.time()  # (`now` is before its wait)
            else:
                stream.in_flight += 1
                stream.used = now  # what keeps it from the idle sweep: one store per request
            request_id = next(self._ids)
            self._deadlines[request_id] = (deadline, task)
            if deadline < self._timer_at:
                self._arm(loop, deadline)
            future: asyncio.Future[Reply] = loop.create_future()
            stream.waiting[request_id] = future
            stream.unanswered += 1
            try:
                try:
                    frame = encode_frame(Kind.REQUEST, request_id, payload)
                    resumable = stream.resumable
                    if resumable is not None:
                        stream.starts[request_id] = resumable.written
                        if deadline > stream.held_until:
                            # Not given up on before the reply's deadline: the replier's node
                            # may restart meanwhile, and the request then goes again to the new
                            # one. Held for twice as long: a loop of requests does this once
                            # per timeout.
                            resumable.hold_tunnel(2 * timeout)
                            stream.held_until = loop.time() + 2 * timeout
                    writable = stream.writable
                    if writable is None:
                        await stream.conn.send(frame)
                    elif not writable.write(frame):
                        await writable.room()
                except PilotError as exc:
                    # A stream that fails a send is done with (a later send would fail the
                    # same way): it goes, with what waits on it, this request among them,
                    # which goes again on a new stream if its replier restarted before it.
                    await self._drop(stream, exc)
                if stream.reader is None and not future.done():
                    await self._read(stream, future, task)
                return await future
            except _Unseen:
                continue
            except PortClosedError as exc:
                raise _no_replier(peer, port, exc) from None
            except asyncio.CancelledError:
                if request_id in self._expired and task.uncancel() == 0:  # our timer's cancel
                    raise _expired(peer, port, timeout) from None
                error = future.exception() if future.done() and not future.cancelled() else None
                if error is not None and stream.dead and task.uncancel() == 0:  # close()'s
                    raise error from None
                raise
            finally:
                del self._deadlines[request_id]
                if self._expired:
                    self._expired.discard(request_id)
                # Cancelled: our task was, while it awaited the future itself (another request
                # reads the stream), which cancels the future too; unanswered all the same.
                if (stream.waiting.pop(request_id, None) is future
                        and (not future.done() or future.cancelled())):
                    stream.unanswered -= 1
                    if not stream.dead:  # we gave up on it (a timeout, a cancel)
                        self._give_up(stream, request_id)
                if stream.starts:
                    stream.starts.pop(request_id, None)
                if stream.turns:
                    stream.release_slot()
                else:
                    stream.in_flight -= 1  # (release_slot, without its call)

    def _give_up(self, stream: _Stream, request_id: int) -> None:
        """Tell the replier that nobody waits for the request's answer, so that it can stop
        the work (a long model call, say): sent once, never waited for."""
        frame = encode_frame(Kind.CANCEL, request_id, b"")
        writable = stream.writable
        if writable is not None:
            with contextlib.suppress(PilotError):
                writable.write(frame)  # queued even behind a full window
            return
        telling = asyncio.ensure_future(_send_quietly(stream.conn, frame))
        self._telling.add(telling)
        telling.add_done_callback(self._telling.discard)

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the requests past their deadline (each raises PilotTimeoutError, whether it
        was sending or waiting for its reply); re-arm for the earliest still waiting."""
        self._timer = None
        self._timer_at = math.inf
        now = loop.time()
        earliest: float | None = None
        expired = self._expired
        for request_id, (at, task) in self._deadlines.items():
            if request_id in expired:
                continue
            if at <= now:
                expired.add(request_id)
                task.cancel()
            elif earliest is None or at < earliest:
                earliest = at
        if earliest is not None:
            self._arm(loop, earliest)

    async def close(self) -> None:
        if self._telling:  # CANCELs still on their way: the streams they go on close next
            await asyncio.wait(self._telling, timeout=CANCEL_WAIT)
        self._closes += 1
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        streams = [(peer, s) for (peer, _), group in self._streams.items() for s in group]
        self._streams.clear()
        for peer, stream in streams:
            # Nothing goes again, even to a restarted replier: the requester is closed. The
            # request reading raises this once _end cancels its reader.
            stream.fail(ConnectionClosedError(f"the requester's stream to {peer} was closed"),
                        resend=False)
        await self._end([stream for _, stream in streams])
        await asyncio.gather(*self._retiring, return_exceptions=True)

    async def _stream_for(self, peer: str, port: int, loop: asyncio.AbstractEventLoop,
                          closes: int, deadline: float) -> _Stream:
        """A stream for a request begun before the ``closes``-th close(): raises
        ConnectionClosedError, opening none, if a close() came since. Opened within the
        request's ``deadline``, not the transport's connect timeout (10 s): a request that
        may wait a minute waits as long for a peer that comes up meanwhile."""
        key = (peer, port)
        if self._closes != closes:
            raise ConnectionClosedError("the requester was closed")
        if (stream := self._reusable(self._streams.get(key))) is not None:
            return stream
        opening = self._opening.get(key)
        if opening is None:
            opening = self._opening[key] = _Opening()
        opening.users += 1
        try:
            async with opening.lock:
                if self._closes != closes:  # came while we waited for the lock
                    raise ConnectionClosedError("the requester was closed")
                if (stream := self._reusable(self._streams.get(key))) is not None:
                    return stream
                # (A second past it: the request's own deadline ends the wait, with its
                # own words.)
                wait = min(max(deadline - loop.time(), 0.0) + 1, MAX_CONNECT_WAIT)
                conn = self._transport.connect(peer, port, wait)
                await conn.__aenter__()
                if self._closes != closes:  # close() came meanwhile: no stream of ours
                    with contextlib.suppress(PilotError):
                        await conn.abort()
                    raise ConnectionClosedError("the requester was closed")
                stream = _Stream(conn, peer, port, self.config.max_in_flight, loop.time())
                if isinstance(conn, _Takeable):
                    stream.taken = True
                    conn.set_taker(functools.partial(self._take, stream))
                    stream.reader = asyncio.create_task(self._read(stream, None))
                self._streams.setdefault(key, []).append(stream)
                if self._sweeper is None:
                    self._sweeper = loop.call_at(stream.used + self.config.idle_timeout,
                                                 self._sweep, loop)
                return stream
        finally:
            opening.users -= 1
            if not opening.users:
                del self._opening[key]

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the streams no request has used for idle_timeout, and forget them; re-arm
        for the next one due. A stream in use counts as used now: its last request may have
        started long ago. Done at once, in the timer's callback, so that no request can take
        a stream after it was found idle: the next one opens a new stream."""
        self._sweeper = None
        now = loop.time()
        idle = self.config.idle_timeout
        retired: list[_Stream] = []
        due: float | None = None
        for key, group in list(self._streams.items()):
            live = []
            for stream in group:
                if stream.in_flight or stream.turns:
                    stream.used = now
                elif stream.used + idle <= now:
                    # Dead now: a request woken for its turn on it, not yet running, tries
                    # another.
                    stream.dead = True
                    retired.append(stream)
                    continue
                live.append(stream)
                if due is None or stream.used + idle < due:
                    due = stream.used + idle
            if live:
                group[:] = live
            else:
                del self._streams[key]
        if retired:
            retiring = asyncio.ensure_future(self._end(retired))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
        if due is not None:
            # Not sooner than a quarter of idle_timeout from now (as the daemon's janitor):
            # streams falling due one after another are swept in batches, not one sweep each.
            self._sweeper = loop.call_at(max(due, now + idle / 4), self._sweep, loop)

    @staticmethod
    async def _end(streams: list[_Stream]) -> None:
        """Stop the streams' readers and abort the streams (closed, or found idle)."""
        readers = []
        for stream in streams:
            if stream.reader is not None:  # a request's, or one reading late replies
                readers.append(stream.reader)
                stream.reader.cancel()
            # Aborted, not closed: nobody waits for a reply on it any more (an idle stream
            # has nothing unacknowledged but a CANCEL or two, sent once and never waited for),
            # and a close waits for the peer, for up to the connection's timeout if it is down.
            with contextlib.suppress(PilotError):
                await stream.conn.abort()
        await asyncio.gather(*readers, return_exceptions=True)

    def _reusable(self, group: list[_Stream] | None) -> _Stream | None:
        """The least busy stream of ``group``, if it is idle or no more may be opened."""
        if not group:
            return None
        least = group[0] if len(group) == 1 else min(group, key=_load)
        if not least.waiting or len(group) >= self.config.streams_per_peer:
            return least
        return None

    async def _read(self, stream: _Stream, until: asyncio.Future[Reply] | None,
                    task: asyncio.Task[Reply] | None = None) -> None:
        """Read replies and hand each to its request: until ``until`` is done (in ``task``, a
        request reading for itself), or while any request waits (a reader task); for as long
        as the stream lives where a taker hands them over (then only its end comes here)."""
        stream.reader = task or asyncio.current_task()
        error: PilotError | None = None
        try:
            while not stream.dead and (stream.taken or (not until.done() if until is not None
                                                         else stream.unanswered > 0)):
                self._take(stream, await stream.conn.receive(timeout=None))
        except PilotError as exc:
            error = exc
        finally:
            stream.reader = None
            ours = 1 if until is not None and not until.done() else 0
            if error is None and not stream.dead and stream.unanswered > ours:
                # Our reply is in (or we were cancelled): others still wait for theirs.
                stream.reader = asyncio.create_task(self._read(stream, None))
        if error is not None:
            await self._drop(stream, error)

    def _take(self, stream: _Stream, message: Message) -> bool:
        """Hand a reply to the request waiting for it (none: it gave up): the transport's
        delivery callback where it offers one (a taker), else the reader's loop. A malformed
        reply drops the stream, with what waits on it (a request is never resent, so each of
        those requesters hears why now)."""
        try:
            kind, reply_id, payload = parse_frame_untrusted(message.data)
            if kind is not Kind.REPLY and kind is not Kind.ERROR:
                raise WireError(f"a {kind.name} frame sent to a requester")
        except WireError as exc:
            self.malformed += 1
            note_malformed(log, self.malformed, "%s port %d sent a malformed reply: %s",
                           stream.peer, stream.port, exc)
            self._discard(stream, WireError(f"{stream.peer} port {stream.port} sent a malformed "
                                            f"reply ({exc}); its stream was dropped"))
            aborting = asyncio.ensure_future(_abort_quietly(stream.conn))
            self._retiring.add(aborting)
            aborting.add_done_callback(self._retiring.discard)
            return True
        future = stream.waiting.get(reply_id)
        if future is None:
            return True  # its requester gave up (timed out or was cancelled)
        if kind is Kind.REPLY:  # (answer() skips a future already done: given up too)
            stream.answer(future, Reply(payload, message.sender))
        else:
            remote_type, text = parse_error_untrusted(payload)
            stream.answer(future, RemoteError(f"{remote_type}: {text}", remote_type))
        return True

    async def _drop(self, stream: _Stream, error: PilotError) -> None:
        """The stream is dead or useless: fail (or send again) what waits on it, and end it."""
        self._discard(stream, error)
        await _abort_quietly(stream.conn)

    def _discard(self, stream: _Stream, error: PilotError) -> None:
        stream.fail(error)
        # Out of its group now: no request takes it meanwhile, _reusable (on every request)
        # need not look for dead ones, and a port never asked again keeps no entry.
        key = (stream.peer, stream.port)
        group = self._streams.get(key)
        if group is not None and stream in group:
            group.remove(stream)
            if not group:
                del self._streams[key]


async def _abort_quietly(conn: Connection) -> None:
    with contextlib.suppress(PilotError):
        await conn.abort()


async def _send_quietly(conn: Connection, frame: bytes) -> None:
    # Bounded: to a replier that stopped reading, the send would wait as long as it does, and
    # every request that times out meanwhile would leave one more such task behind.
    with contextlib.suppress(PilotError, TimeoutError):
        async with asyncio.timeout(CANCEL_WAIT):
            await conn.send(frame)


async def _fail_quietly(request: Request, error: PilotError) -> None:
    with contextlib.suppress(PilotError):
        await request.fail(error)


class Replier:
    """Requests arriving on ``port``, from any trusted peer; use with ``async with`` and
    ``async for``. A message that is not a request frame is dropped and counted in
    :attr:`malformed`. Closing the replier answers every request it handed out and nobody
    answered with an error (waiting at most ``CANCEL_WAIT``, 1 s, for room to send them), and
    the transport resets the streams of those never handed out:
    no requester waits for its timeout because its replier went away. A requester's CANCEL
    marks its request :attr:`Request.cancelled` (counted in :attr:`cancelled`), and so does the
    end of its stream for every request it left unanswered."""

    def __init__(self, transport: Transport, port: int) -> None:
        self._transport = transport
        self.port = port
        self._listener: Listener | None = None
        # By requester stream (its node and source port) and request id: what a CANCEL names.
        self._unanswered: dict[tuple[str, int, int], Request] = {}
        # Requester streams (node and source port) whose end the replier will hear of: what
        # undoes the asking (None while it is asked).
        self._watched: dict[tuple[str, int], Callable[[], object] | None] = {}
        self.malformed = 0
        self.cancelled = 0  # requests their requesters gave up on before the answer

    async def __aenter__(self) -> Replier:
        self._listener = self._transport.listen(self.port)
        await self._listener.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        unanswered, self._unanswered = list(self._unanswered.values()), {}
        watched, self._watched = list(self._watched.values()), {}
        for unhook in watched:
            if unhook is not None:
                unhook()
        error = ConnectionClosedError(f"the replier on port {self.port} closed before answering")
        # All at once, and not waited for past CANCEL_WAIT: an answer to a requester that
        # stopped reading waits for room in its stream for as long as it does not read.
        failing = [asyncio.ensure_future(_fail_quietly(request, error))
                   for request in unanswered]
        try:
            if failing:
                await asyncio.wait(failing, timeout=CANCEL_WAIT)
        finally:  # (close() cancelled too: none of them is left behind)
            for task in failing:
                task.cancel()
            if listener is not None:
                await listener.close()

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> Request:
        """The next request; :class:`PilotTimeoutError` after ``timeout`` seconds."""
        if self._listener is None:
            raise ConfigError("the replier is not open (use 'async with')")
        if timeout is None:  # no deadline, no clock (asking for the loop costs a getpid)
            loop, deadline = None, 0.0
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
        while True:
            remaining = None if loop is None else max(deadline - loop.time(), 0.0)
            request = self._admit(await self._listener.receive(remaining))
            if request is not None:
                return request

    def _admit(self, message: Message) -> Request | None:
        """The request ``message`` carries, now waiting for its answer; None if it carries
        none (a CANCEL, something malformed) or its requester is gone already."""
        try:
            kind, request_id, payload = parse_frame_untrusted(message.data)
            if kind is Kind.CANCEL:
                self._given_up(message, request_id)
                return None
            if kind is not Kind.REQUEST:
                raise WireError(f"a {kind.name} frame sent to a replier")
        except WireError as exc:
            self.malformed += 1
            note_malformed(log, self.malformed, "%s sent port %d a malformed request: %s",
                           message.sender, self.port, exc)
            return None
        request = Request(payload, message.sender, self.port, request_id, message, self)
        self._unanswered[request._key] = request
        stream = (message.sender, message.source_port)
        if stream not in self._watched:
            self._watch(stream, message)
        return None if request.cancelled else request  # (cancelled: its stream is over)

    def _watch(self, stream: tuple[str, int], message: Message) -> None:
        """A requester that dies (or whose tunnel closes) sends no CANCEL: the end of its
        stream says the same for the requests it left unanswered. Asked once per stream,
        for as long as it lasts (asking per request cost a round trip 6 % more CPU)."""
        self._watched[stream] = None  # (the callback may come at once, and forget it)
        unhook = message.on_hangup(functools.partial(self._hung_up, stream))
        if unhook is None:  # its transport cannot tell: ask again with its next request
            del self._watched[stream]
        elif stream in self._watched:
            self._watched[stream] = unhook

    def _hung_up(self, stream: tuple[str, int]) -> None:
        self._watched.pop(stream, None)
        given_up = [request for key, request in self._unanswered.items() if key[:2] == stream]
        if given_up:
            log.info("%s can no longer take the answers to %d requests on port %d (its stream "
                     "ended): given up", stream[0], len(given_up), self.port)
        for request in given_up:
            self._drop(request)

    def _given_up(self, message: Message, request_id: int) -> None:
        # None: answered already, or never seen (a hostile peer's guess is no one else's:
        # the key holds its own stream).
        request = self._unanswered.get(_key(message, request_id))
        if request is not None:
            self._drop(request)

    def _drop(self, request: Request) -> None:
        self._forget(request)
        self.cancelled += 1
        request._given_up()

    def _forget(self, request: Request) -> None:
        key = request._key
        if self._unanswered.get(key) is request:  # a peer may repeat an id: not another's
            del self._unanswered[key]

    async def serve(self, handler: Handler, config: ReqRepConfig | None = None) -> None:
        """Answer every request with what ``handler`` returns, as :func:`serve` does, until
        cancelled or the replier fails."""
        await _answer_all(self, handler, config or ReqRepConfig())

    def __aiter__(self) -> AsyncIterator[Request]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Request]:
        while self._listener is not None:
            yield await self.receive(timeout=None)


def _key(message: Message, request_id: int) -> tuple[str, int, int]:
    return message.sender, message.source_port, request_id


Handler = Callable[[Request], Awaitable[object]]


async def serve(transport: Transport, port: int, handler: Handler,
                config: ReqRepConfig | None = None) -> None:
    """Answer every request on ``port`` with what ``handler`` returns (bytes, str or JSON), or
    with an error reply if it raises; runs until cancelled. Up to ``handler_concurrency``
    requests are handled at once; more wait (and so, in the end, do their senders)."""
    async with Replier(transport, port) as replier:
        await replier.serve(handler, config)


@contextlib.asynccontextmanager
async def serving(transport: Transport, port: int, handler: Handler,
                  config: ReqRepConfig | None = None) -> AsyncIterator[Replier]:
    """:func:`serve` in the background for the ``async with`` block; the port is listened on
    before the block starts, so a request sent from inside it finds its replier."""
    async with Replier(transport, port) as replier:
        task = asyncio.create_task(replier.serve(handler, config))
        try:
            yield replier
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # ours, while we waited for it to stop: not to be lost


class _Worker:
    """One of serve()'s tasks, and what it is handed when it is idle: a request, or the rest of
    one whose first step ran in the delivery callback, as this worker (:mod:`.eager`)."""

    __slots__ = ("context", "request", "rest", "task", "wake")

    def __init__(self) -> None:
        self.context = contextvars.copy_context()
        self.task: asyncio.Task[None] | None = None
        self.wake: asyncio.Future[None] | None = None  # set while idle: done when handed one
        self.request: Request | None = None
        self.rest: Awaitable[None] | None = None


async def _answer_all(replier: Replier, handler: Handler, config: ReqRepConfig) -> None:
    """``handler_concurrency`` workers, each handed the next request when it is free: the
    bound on concurrent handlers, without a task (3 us) and a semaphore per request.

    Where the transport offers each message as it is delivered (a taker: the embedded node's),
    requests are handed to the workers from there, and a request's first step runs there at
    once, as its worker (:mod:`.eager`); a handler that answers without waiting has its reply
    sent before the delivery callback goes on. A receiving task takes the rest (all of them on
    another transport). While every worker is busy, up to ``handler_concurrency`` requests are
    parked for the first one free, and a CANCEL for a running request is still read; beyond
    that nothing more is taken (and so, in the end, their senders wait). A request its
    requester gave up on has its handler cancelled, or is dropped before it starts."""
    port = replier.port
    limit = config.handler_concurrency
    loop = asyncio.get_running_loop()
    parked: deque[Request] = deque()
    idle: list[_Worker] = []  # the most recently idle last: its code and data are warm
    room = asyncio.Event()  # fewer than `limit` requests parked: more may be taken
    room.set()
    stopping = False

    async def answer(request: Request, me: asyncio.Task[None]) -> None:
        try:
            try:
                result = await handler(request)
                if request.answered:
                    return
                # Encoded here, so that a value that cannot be sent (not JSON, larger than a
                # tunnel message) is an error reply too: else its requester waits for its
                # timeout.
                payload = encode_fitting("a reply", result)
            except Exception as exc:  # the handler's failure is the requester's to see
                log.info("handler for port %d raised %s: %s", port, type(exc).__name__, exc)
                await request.fail(exc)
            else:
                if not request._send(Kind.REPLY, payload):  # (_answer, a coroutine fewer)
                    await request._sent(Kind.REPLY, payload)
        except asyncio.CancelledError:
            if stopping or not request.cancelled or me.uncancel() > 0:
                raise  # the server stops (its cancel, not the request's)
            log.info("%s gave up on request %d on port %d: its handler was cancelled",
                     request.sender, request.id, port)
        except PilotError as exc:  # the requester went away before its answer
            log.info("could not answer %s on port %d: %s", request.sender, port, exc)
        else:
            if request.cancelled and me.cancelling():  # a handler that ignored it
                me.uncancel()
        finally:
            request._on_cancel = None

    def feed(request: Request) -> None:
        if not idle:
            parked.append(request)
            if len(parked) >= limit:
                room.clear()
            return
        worker = idle.pop()
        assert worker.task is not None and worker.wake is not None
        rest: Awaitable[None] | None = None
        if eager.AVAILABLE and asyncio.current_task(loop) is None:
            # Its first step, now, as the worker. A cancel of the worker meanwhile (the
            # handler's own, a timeout's, the request's CANCEL read in the reply's flush) lands
            # on its idle wait: work() hands it on to what the step started.
            request._on_cancel = worker.task.cancel  # (before: the handler may replace it)
            try:
                rest = eager.start_as(worker.task, worker.context, answer(request, worker.task))
            except BaseException as exc:  # not the handler's (answer() takes those): ours
                rest = _raising(exc)
            if rest is None:  # answered: the worker is idle still (unless the step woke it
                if not worker.wake.done():  # with a cancel: then it comes back by itself)
                    idle.append(worker)
                return
        worker.request, worker.rest = request, rest
        if not worker.wake.done():
            worker.wake.set_result(None)

    def take(message: Message) -> bool:
        if len(parked) >= limit:  # (room is clear: no call to ask it)
            return False  # it waits in the transport, for receive_all once there is room
        request = replier._admit(message)
        if request is not None:
            feed(request)
        return True

    async def receive_all() -> None:
        while True:
            if not room.is_set():  # (a coroutine fewer per request when it is)
                await room.wait()
            feed(await replier.receive(timeout=None))

    async def work(worker: _Worker) -> None:
        me = worker.task = asyncio.current_task()
        assert me is not None
        while not stopping:  # (a handler that took the stop's cancel for its own returned)
            if parked:
                request, rest = parked.popleft(), None
                if len(parked) < limit:
                    room.set()
            else:
                worker.wake = loop.create_future()
                idle.append(worker)
                try:
                    await worker.wake
                except asyncio.CancelledError:
                    # A cancel of ours while idle, or while a handler started in the delivery
                    # (as us) was handed to us: that handler hears it where it waits. Without
                    # one, the stop's ends us; another (a handler that cancelled itself and
                    # returned) is over.
                    if worker.rest is not None:
                        me.cancel()  # again, for the handler; this wait took the first
                    elif stopping:
                        raise
                    me.uncancel()
                if worker.request is None:
                    continue
                request, rest = worker.request, worker.rest
                worker.request = worker.rest = None
            if rest is None:
                if request.cancelled:
                    continue
                request._on_cancel = me.cancel
                rest = answer(request, me)
            await rest

    workers = [_Worker() for _ in range(limit)]
    receiving = asyncio.create_task(receive_all())
    tasks = [receiving, *(asyncio.create_task(work(w), context=w.context) for w in workers)]
    listener = replier._listener
    taker = listener if isinstance(listener, _Takeable) else None
    if taker is not None:
        taker.set_taker(take)
    try:
        # A task ends only when the replier does (its transport failed, or it closed), or
        # with a failure of ours.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        stopping = True
        if taker is not None:
            taker.set_taker(None)
        for task in tasks:
            task.cancel()
        # Their handlers' work (a command run, say) is stopped before the replier closes and
        # answers what they held with an error.
        await asyncio.gather(*tasks, return_exceptions=True)


async def _raising(error: BaseException) -> None:
    raise error
