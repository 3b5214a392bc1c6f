"""What applications hold: connections (streams to a peer's port), listeners, and messages.

Each is a thin handle on a stream inside a session; the :class:`~pilot_agents.node.Node` routes
the session's events to them. They reach the running node only through its
:class:`~pilot_agents.node.driver.Driver` and the callbacks it hands them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

from ..errors import (
    ConfigError,
    ConnectionClosedError,
    PeerUnreachableError,
    PilotError,
    PilotTimeoutError,
)
from ..identity import node_id_from_key
from ..net.tunnel.codes import CloseCode, ResetCode
from ..net.tunnel.session import Session
from ..net.tunnel.streams import MESSAGE_HEADER_SIZE
from ..transport import DEFAULT_TIMEOUT, Hangups, Payload, encode_payload
from .driver import Driver

SEND_HIGH_WATER = 8 * 1024 * 1024  # bytes unacknowledged on a stream before send() waits
T = TypeVar("T")


class Mailbox(Generic[T]):
    """A FIFO whose :meth:`get` waits with a deadline. Unbounded itself: the session hands a
    stream's messages to it only within its delivery windows (see docs/protocol.md).

    asyncio.Queue under asyncio.timeout() costs a Timeout object, a cancellation scope and a
    task cancel/uncancel per wait; on the request/reply path that is a measurable share of a
    round trip. Here a wait is one future, and all waits share one timer that only ever moves
    earlier: a wait that ends before its deadline (the common case) leaves it armed, and when it
    fires it expires what is due and re-arms for the earliest deadline still waiting. A
    request/reply loop thus schedules a timer about once per timeout, not once per message.
    """

    __slots__ = ("_items", "_loop", "_taker", "_timer", "_timer_at", "_waiters")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiters: deque[tuple[asyncio.Future[None], float | None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # Looked up at the first wait: asyncio.get_running_loop() is a getpid call on 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None
        # Takes an item as it is put, when nothing is queued (see set_taker); False: queue it.
        self._taker: Callable[[T], bool] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def take_all(self) -> list[T]:
        """Every item, removed, without waiting."""
        items = list(self._items)
        self._items.clear()
        return items

    def put(self, item: T) -> None:
        if self._taker is not None and not self._items and self._taker(item):
            return
        self._items.append(item)
        if self._waiters:
            self._wake_next()

    def set_taker(self, take: Callable[[T], bool] | None) -> None:
        """Offer each item to ``take`` as it is put, while nothing is queued: a consumer that
        can use it at once (the daemon handing a message to its client) gets it without a
        task waking for it; what ``take`` refuses is queued for :meth:`get` as before, and
        so is everything behind it, in order."""
        self._taker = take

    async def get(self, timeout: float | None) -> T:
        """The next item; TimeoutError after ``timeout`` seconds (None: wait for ever)."""
        items = self._items
        if items:
            return items.popleft()
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not items:
            waiter = loop.create_future()
            self._waiters.append((waiter, deadline))
            if deadline is not None and (self._timer is None or deadline < self._timer_at):
                self._arm(loop, deadline)
            try:
                await waiter
            except BaseException:
                # Cancelled after a put woke us: the item must wake another waiter instead.
                if items and waiter.done() and not waiter.cancelled() and not waiter.exception():
                    self._wake_next()
                elif waiter.cancelled():
                    # Else its entry stays until an item or a timer comes, and a wait without
                    # a deadline cancelled on a quiet stream (a request's timeout, each time)
                    # would leave one more behind.
                    with contextlib.suppress(ValueError):
                        self._waiters.remove((waiter, deadline))
                raise
        return items.popleft()

    def _wake_next(self) -> None:
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        earliest: float | None = None
        waiting: deque[tuple[asyncio.Future[None], float | None]] = deque()
        for waiter, deadline in self._waiters:
            if waiter.done():
                continue
            if deadline is not None and deadline <= now:
                waiter.set_exception(TimeoutError())
                continue
            waiting.append((waiter, deadline))
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        self._waiters = waiting
        if earliest is not None:
            self._arm(loop, earliest)


def framed_size(payload_bytes: int) -> int:
    """How far a message of ``payload_bytes`` moves its stream's offsets (:attr:`Connection.
    written`): for a transport that counts them itself, as the daemon's SDK does."""
    return MESSAGE_HEADER_SIZE + payload_bytes


def check_port(port: int) -> int:
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"port {port!r} is not in 1..65535")
    return port


@dataclass
class Message(Payload):
    data: bytes
    sender: str  # node id
    port: int  # our port it arrived on
    source_port: int
    # The stream a reply goes on: one object for all the messages of a stream (none for a
    # message that cannot be replied to). A field, not a property: read for every reply.
    way_back: StreamHandle | None = field(default=None, repr=False)

    async def reply(self, data: bytes | str | Any, *, stall: float | None = None) -> None:
        """Send a message back on the connection this one came from (``stall``: as
        :meth:`StreamHandle.room`'s)."""
        if self.way_back is None:
            raise ConnectionClosedError("this message cannot be replied to")
        await self.way_back.send(data, stall)

    async def since_arrival(self) -> float | None:
        """Seconds since bytes of the stream this message came on last arrived (None: not
        known), whole messages or not."""
        return None if self.way_back is None else self.way_back.since_arrival()

    def on_hangup(self, callback: Callable[[], object]) -> Callable[[], object]:
        """Call ``callback`` once the stream this message came on can carry no reply (it
        failed or ended), at once if it already cannot; returns what undoes this."""
        if self.way_back is None:
            return Hangups(gone=True).add(callback)
        return self.way_back.on_hangup(callback)


class StreamHandle:
    """Our side of one stream: its inbox and the way back into the session."""

    def __init__(
        self, driver: Driver, session: Session, stream_id: int, local_port: int, remote_port: int
    ) -> None:
        self.driver = driver
        self.session = session
        # Computed once: every message received on the stream names its sender.
        self.peer_id = node_id_from_key(session.peer)
        self.stream_id = stream_id
        self.local_port = local_port
        self.remote_port = remote_port
        self.inbox: Mailbox[Message | PilotError] = Mailbox()
        self.error: PilotError | None = None
        self.reset = False
        self.ended = False  # the node forgot it (see forgotten): nothing more can be sent
        self._hangups: Hangups | None = None  # created by the first on_hangup
        # Bytes written past the stream's bound since it last had room (at a write, or when
        # room() returned): what writers that do not wait for room() have added past it (a
        # daemon bounds its clients by this).
        self.overshoot = 0

    @property
    def undelivered(self) -> bool:
        """Something we sent may not have reached the peer's application."""
        return self.reset or self.session.stream_buffered(self.stream_id) > 0

    def since_arrival(self) -> float | None:
        """Seconds since bytes of the peer's side of the stream last arrived (None: none yet)."""
        at = self.session.stream_last_arrival(self.stream_id)
        endpoint = self.driver.endpoint
        return None if at is None or endpoint is None else max(endpoint.now() - at, 0.0)

    def hold_tunnel(self, timeout: float | None) -> None:
        """Someone waits ``timeout`` s on this stream: the tunnel does not give up on a silent
        peer before (Session.keep_trying_until)."""
        endpoint = self.driver.endpoint
        if timeout is not None and endpoint is not None:
            self.session.keep_trying_until(endpoint.now() + timeout)

    def fail(self, error: PilotError, *, reset: bool = False) -> None:
        """The stream is dead: sends and receives raise ``error`` from now on. ``reset``: the
        peer's application never saw what we sent."""
        self.reset = self.reset or reset
        if self.error is None:
            self.error = error
            self.inbox.put(error)
            if self._hangups is not None:
                self._hangups.hang_up()
        self.driver.progress_made()

    def forgotten(self) -> None:
        """The node forgot the stream (it ended or failed): nothing more can be sent on it."""
        self.ended = True
        if self._hangups is not None:
            self._hangups.hang_up()

    def on_hangup(self, callback: Callable[[], object]) -> Callable[[], object]:
        """Call ``callback`` once the stream can carry nothing more to its peer (it failed,
        or the node forgot it), at once if it already cannot; returns what undoes this."""
        if self._hangups is None:
            self._hangups = Hangups(gone=self.error is not None or self.ended)
        return self._hangups.add(callback)

    def discard_unread(self) -> None:
        """Nobody will receive from this handle again: what its inbox holds goes back to the
        peer as flow-control credit (errors stay for a late receive)."""
        for item in self.inbox.take_all():
            if isinstance(item, PilotError):
                self.inbox.put(item)
            else:
                self.consumed(item)

    def end(self) -> None:
        """The peer finished sending: receives raise once the inbox is empty; sends go on."""
        self.inbox.put(ConnectionClosedError("the peer closed the connection"))

    async def send(self, data: bytes | str | Any, stall: float | None = None) -> None:
        if not self.write(encode_payload(data)):
            await self.room(stall)

    def write(self, payload: bytes) -> bool:
        """Queue a message without waiting (it leaves at once on an idle stream); False if
        the stream now holds more unacknowledged bytes than it should: wait for :meth:`room`
        before writing more. Raises the stream's error if it is dead."""
        if self.error is not None:
            raise self.error
        if self.ended:  # a late reply, after the peer closed the stream (or we did)
            raise ConnectionClosedError("the stream has ended: nothing more can be sent on it")
        session, stream_id = self.session, self.stream_id
        idle = session.stream_buffered(stream_id) == 0
        session.send_message(stream_id, payload)
        # On an idle stream the message leaves now (request/reply latency); behind unacked
        # data it waits for the flush at the end of this loop iteration, coalescing with
        # whatever else is written meanwhile.
        endpoint = self.driver.endpoint
        if endpoint is not None:
            if idle:
                endpoint.flush()
            else:
                endpoint.wake()
        if self.error is not None:  # the flush found the stream reset, or its tunnel gone
            raise self.error
        if session.stream_buffered(stream_id) < SEND_HIGH_WATER:
            self.overshoot = 0
            return True
        self.overshoot += len(payload)
        return False

    async def room(self, stall: float | None = None) -> None:
        """Wait until the stream holds fewer unacknowledged bytes than its bound; raise its
        error if it dies meanwhile.

        ``stall``: seconds the peer may take nothing from the stream (what waits on it does not
        shrink) before the stream is reset and :class:`PilotTimeoutError` raised. For a writer
        that many peers share, a replier: one peer that sends requests and reads no replies
        would hold it for ever, and with it everyone else's replies."""
        def has_room() -> bool:
            return (self.error is not None
                    or self.session.stream_buffered(self.stream_id) < SEND_HIGH_WATER)

        taken = self._taken()
        while not await self._room_within(has_room, stall):
            if self._taken() > taken:  # slow, but reading (what others write meanwhile
                taken = self._taken()  # adds to what waits: progress is what it took)
                continue
            waiting = self.session.stream_buffered(self.stream_id)
            self.session.reset_stream(self.stream_id, ResetCode.UNREAD)
            self.driver.wake()
            self.fail(PilotTimeoutError(
                f"{self.peer_id} read nothing on this stream for {stall:g} s, with "
                f"{waiting} bytes waiting for it: the stream was reset"), reset=True)
            break
        if self.error is not None:
            raise self.error
        self.overshoot = 0  # it had room

    def _taken(self) -> int:
        """Bytes of the stream the peer acknowledged: with flow control tied to its reader's
        taking, what moves this moves only as the reader takes."""
        session, stream_id = self.session, self.stream_id
        return session.stream_written(stream_id) - session.stream_buffered(stream_id)

    async def _room_within(self, has_room: Callable[[], bool], seconds: float | None) -> bool:
        try:
            await self.driver.wait_until(has_room, seconds)
        except PilotTimeoutError:
            return False
        return True

    def set_taker(self, take: Callable[[Message], bool] | None) -> None:
        """Messages go to ``take`` as they arrive while none is queued (:meth:`Mailbox.set_taker`);
        one it takes counts as received. Errors are always queued, for :meth:`receive`."""
        self.inbox.set_taker(None if take is None else functools.partial(self._offer, take))

    def _offer(self, take: Callable[[Message], bool], item: Message | PilotError) -> bool:
        if isinstance(item, PilotError) or not take(item):
            return False
        self.consumed(item)
        return True

    def consumed(self, message: Message) -> None:
        """``message`` was taken by its reader: its bytes go back to the peer as credit (a
        flush soon if that is worth a packet)."""
        if self.session.message_consumed(self.stream_id, len(message.data)):
            self.driver.wake()

    async def receive(self, timeout: float | None) -> Message:
        if timeout is not None:
            self.hold_tunnel(timeout)
        try:
            item = await self.inbox.get(timeout)
        except TimeoutError:
            raise PilotTimeoutError(f"no message within {timeout} s") from None
        if isinstance(item, PilotError):
            self.inbox.put(item)  # every later receive fails the same way
            raise item
        self.consumed(item)
        return item


class Connection:
    """A stream to a port on a peer; messages are ordered and delivered exactly once."""

    def __init__(
        self,
        driver: Driver,
        open_stream: Callable[[], Awaitable[StreamHandle]],
        forget: Callable[[StreamHandle], None],
        timeout: float,
    ) -> None:
        """``open_stream`` opens the stream (and the tunnel if needed) when the connection is
        entered; ``forget`` tells the node the stream is no longer ours."""
        self._driver = driver
        self._open_stream = open_stream
        self._forget = forget
        self._timeout = timeout
        self._handle: StreamHandle | None = None

    @property
    def peer_id(self) -> str:
        return self._stream().peer_id

    @property
    def path(self) -> str:
        """ "direct" or "relay": how packets reach the peer right now."""
        return self._stream().session.paths.kind

    @property
    def local_port(self) -> int:
        """Our port that the peer's messages on this stream arrive on (their ``port``)."""
        return self._stream().local_port

    @property
    def address(self) -> tuple[str, int] | None:
        """The peer's address on a direct path (LAN or public); None on the relay."""
        active = self._stream().session.paths.active
        return active if isinstance(active, tuple) else None

    @property
    def rtt(self) -> float | None:
        return self._stream().session.smoothed_rtt

    @property
    def written(self) -> int:
        """The stream offset at which the next message sent starts (see
        :meth:`unseen_after_restart`)."""
        handle = self._stream()
        return handle.session.stream_written(handle.stream_id)

    async def since_arrival(self) -> float | None:
        """Seconds since bytes of the peer's side of the stream last arrived (None: none yet),
        whole messages or not: a long message still arriving is not silence."""
        return self._stream().since_arrival()

    def hold_tunnel(self, timeout: float) -> None:
        """Someone waits ``timeout`` s for an answer on this stream: until then the tunnel
        keeps trying a silent peer (it may be restarting) instead of giving up on it."""
        self._stream().hold_tunnel(timeout)

    def unseen_after_restart(self) -> int | None:
        """If the stream died because the peer's node restarted: the stream offset (as
        :attr:`written`) from which its old node acknowledged nothing, so what was sent from
        there may go again to the new node without being handled twice (but for one whose
        acknowledgement was due, at most ``max_ack_delay``, when the old node died). None if
        the stream lives or died otherwise."""
        handle = self._handle
        if handle is None or handle.error is None or handle.reset:
            return None
        if handle.session.close_code != CloseCode.PEER_RESTARTED:
            return None
        return handle.session.stream_acked_until(handle.stream_id)

    async def __aenter__(self) -> Connection:
        self._handle = await self._open_stream()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

    def _stream(self) -> StreamHandle:
        if self._handle is None:
            raise ConnectionClosedError("the connection is not open (use 'async with')")
        return self._handle

    async def send(self, data: bytes | str | Any) -> None:
        await self._stream().send(data)

    def write(self, payload: bytes) -> bool:
        """:meth:`send` for code that cannot await: see :meth:`StreamHandle.write`."""
        return self._stream().write(payload)

    @property
    def overshoot(self) -> int:
        """Bytes :meth:`write` took past the stream's bound since it last had room (0 when
        not open: a write raises why)."""
        return 0 if self._handle is None else self._handle.overshoot

    async def room(self) -> None:
        """Wait until more may be written: see :meth:`StreamHandle.room`."""
        await self._stream().room()

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> Message:
        return await self._stream().receive(timeout)

    def set_taker(self, take: Callable[[Message], bool] | None) -> None:
        """See :meth:`StreamHandle.set_taker` (nothing once the connection is closed)."""
        if self._handle is not None:
            self._handle.set_taker(take)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until the peer acknowledged everything sent so far; raise if it never will."""
        handle = self._stream()
        timeout = timeout or self._timeout
        handle.hold_tunnel(timeout)
        try:
            await self._driver.wait_until(
                lambda: handle.error is not None or not handle.undelivered, timeout
            )
        except PilotTimeoutError:
            if handle.session.waiting_for_peer:
                raise PeerUnreachableError(
                    f"{handle.peer_id} did not acknowledge the message within {timeout} s: "
                    "it is down or unreachable"
                ) from None
            raise
        if handle.error is not None and handle.undelivered:
            raise handle.error

    async def close(self) -> None:
        """Finish the stream and wait until the peer has every byte."""
        handle = self._handle
        if handle is None:
            return
        handle.session.finish_stream(handle.stream_id)
        self._driver.wake()
        try:
            await self.drain()
        finally:
            self._forget(handle)
            self._handle = None

    async def abort(self) -> None:
        """Drop the stream at once: the peer sees it reset, unsent data is discarded.
        A coroutine, as on every transport (the daemon's has to tell the daemon)."""
        self.abort_now()

    def abort_now(self) -> None:
        """:meth:`abort` for code that cannot await (the daemon dropping a client's stream)."""
        handle = self._handle
        if handle is not None:
            handle.session.reset_stream(handle.stream_id, ResetCode.CANCELLED)
            self._driver.wake()
            # A receive waiting on it (another task's) raises now, not at its timeout.
            handle.fail(ConnectionClosedError("the connection was aborted"))
            self._forget(handle)
            self._handle = None


class Listener:
    """Messages arriving on one of our ports, from any trusted peer."""

    def __init__(self, port: int, on_close: Callable[[Listener], None]) -> None:
        """``on_close`` is called once, when the listener closes."""
        self._on_close = on_close
        self.port = port
        self._inbox: Mailbox[tuple[StreamHandle, Message]] = Mailbox()
        # What the node hands each message to, (stream, message): the inbox's put itself, not
        # a method around it (a call less per message).
        self._deliver = self._inbox.put
        self._closed = False

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening; messages not yet received are dropped (their streams reset when the
        peer sends more). A coroutine, as on every transport."""
        self.close_now()

    def close_now(self) -> None:
        """:meth:`close` for the node's own shutdown, which cannot await."""
        if not self._closed:
            self._closed = True
            self._on_close(self)

    def set_taker(self, take: Callable[[Message], bool] | None) -> None:
        """Messages go to ``take`` as they arrive while none is queued (:meth:`Mailbox.set_taker`);
        one it takes counts as received."""
        self._inbox.set_taker(None if take is None else functools.partial(_offer, take))

    def take_unread_streams(self) -> list[StreamHandle]:
        """Empty the inbox; the streams of the messages that waited there, each once."""
        return list({id(h): h for h, _ in self._inbox.take_all()}.values())

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> Message:
        try:
            handle, message = await self._inbox.get(timeout)
        except TimeoutError:
            raise PilotTimeoutError(f"no message on port {self.port} within {timeout} s") from None
        handle.consumed(message)
        return message

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while not self._closed:
            yield await self.receive(timeout=None)


def _offer(take: Callable[[Message], bool], item: tuple[StreamHandle, Message]) -> bool:
    # StreamHandle._offer, for a listener's items (never errors).
    handle, message = item
    if not take(message):
        return False
    handle.consumed(message)
    return True
