"""Push/pull: work items spread over several workers, over any
:class:`~pilot_agents.transport.Transport`.

    async with Puller(transport, 4001) as puller:            # on each worker
        async for item in puller:
            handle(item.json())          # done when the next item is asked for (auto_ack)

    async with Pusher(transport, ["worker-1", "worker-2"], 4001) as pusher:
        for job in jobs:
            await pusher.push(job)       # waits while every worker is full
        await pusher.join(timeout=60)    # until every item was acknowledged

A pusher keeps a link to each puller it is given (by hostname or node id). Each puller grants
every link a window: at most ``window_items`` items and ``window_bytes`` bytes in flight (sent and
not yet acknowledged by its consumer). ``push`` hands an item to the next puller in round-robin
order whose window has room, skipping full ones, and waits while all are full (back-pressure:
a consumer that stops reading stops its pushers once the windows fill). A push that finds no
room within its timeout raises :class:`~pilot_agents.errors.PilotTimeoutError`: the item was
given to nobody.

An item is done when its consumer acknowledges it: ``await item.ack()``, or, with ``auto_ack``
(the default), when the consumer asks for the next item (or leaves the puller's ``async with``
block without an exception). A consumer that handles items in several tasks at once passes
``auto_ack=False`` and acknowledges each item itself.

Delivery is at least once. While every puller is live, each item goes to one puller, once. When
a puller goes away (its stream breaks, its node stops, it closes, or it is silent for three
heartbeats), the pusher sends the items it had not acknowledged to the other pullers, flagged
:attr:`WorkItem.redelivered` (its consumer may have done it already), and connects to it again,
with backoff, until it is back. Items keep their pusher's order per puller, not overall.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import ConfigError, PilotError, PilotTimeoutError, WireError
from ..transport import (
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    Connection,
    Listener,
    Message,
    Payload,
    Transport,
    encode_payload,
)
from .frames import (
    MAX_HEARTBEAT_MS,
    Frame,
    Kind,
    encode_credit,
    encode_frame,
    parse_credit_untrusted,
    parse_frame_untrusted,
)

log = logging.getLogger("pilot_agents.patterns.pushpull")

T = TypeVar("T")


@dataclass(frozen=True)
class PushPullConfig:
    """The bounds of both ends. A link's window is the smaller of the puller's and the
    pusher's, so a puller never holds more than ``max_pushers`` windows of items, nor a pusher
    more than one window per puller."""

    window_items: int = 64  # items in flight on one link (sent, not yet acknowledged)
    window_bytes: int = 4 * 2**20  # payload bytes in flight on one link; the largest item
    max_pushers: int = 64  # links a puller serves at once; more are told to come back later
    push_timeout: float = 30.0  # seconds push() waits for a puller with room, by default
    send_timeout: float = 10.0  # seconds one frame may take to leave before its link is dropped
    connect_timeout: float = CONNECT_TIMEOUT  # seconds to open a link, its credit included
    # Seconds between a puller's heartbeats on every link. It tells its pushers, which count
    # it gone when they hear nothing for three of them (its node may have died without a word).
    heartbeat_interval: float = 5.0
    reconnect_min: float = 0.2  # seconds a pusher waits before connecting again; doubles
    reconnect_max: float = 10.0  # seconds, the cap of that doubling

    def __post_init__(self) -> None:
        if self.window_items < 1 or self.window_bytes < 1 or self.max_pushers < 1:
            raise ConfigError("PushPullConfig bounds must be at least 1")
        for name in ("push_timeout", "send_timeout", "connect_timeout", "heartbeat_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"PushPullConfig.{name} must be positive")
        if self.heartbeat_interval > MAX_HEARTBEAT_MS / 1000:
            raise ConfigError(f"PushPullConfig.heartbeat_interval: at most "
                              f"{MAX_HEARTBEAT_MS // 1000} s")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("PushPullConfig: need 0 < reconnect_min <= reconnect_max")


async def _send_within(seconds: float, send: Coroutine[Any, Any, None]) -> None:
    """``send``, or :class:`PilotTimeoutError` once it has taken ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            await send
    except TimeoutError:
        raise PilotTimeoutError(f"a frame did not leave within {seconds} s") from None


class _Waiter:
    """Wakes everyone waiting for a condition on the pattern's state whenever it changes."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def until(self, found: Callable[[], T | None]) -> T:
        while (value := found()) is None:
            self._changed.clear()
            await self._changed.wait()
        return value


# -- the puller --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Feed:
    """One pusher's link, as its puller keeps it."""

    key: tuple[str, int]  # (the pusher's node id, its port): names the stream
    way_back: Message  # its HELLO: credit, acks and heartbeats go back on its stream
    in_flight: int = 0
    in_flight_bytes: int = 0
    gone: bool = False


@dataclass
class WorkItem(Payload):
    """One item of work; acknowledge it with :meth:`ack` once done (or let ``auto_ack``)."""

    data: bytes
    sender: str  # the pusher's node id
    id: int  # its number at its pusher: the same when it is sent again
    redelivered: bool  # sent before to a puller that went away, which may have done it
    _puller: Puller = field(repr=False)
    _feed: _Feed = field(repr=False)
    acked: bool = False

    async def ack(self) -> None:
        """The item is done: its pusher forgets it and may send another. Acknowledging twice
        does nothing. If the link to the pusher broke meanwhile, the pusher has already given
        the item to another puller (at least once)."""
        if not self.acked:
            self.acked = True
            await self._puller._ack(self)


class Puller:
    """Work items pushed to ``port`` by any trusted pusher; use with ``async with`` and
    ``async for``. A frame that breaks the protocol (malformed, of the wrong kind, beyond
    its link's window) drops that link and is counted in :attr:`malformed`; the others go on."""

    def __init__(self, transport: Transport, port: int, config: PushPullConfig | None = None,
                 *, auto_ack: bool = True) -> None:
        self._transport = transport
        self.port = port
        self.config = config or PushPullConfig()
        self.auto_ack = auto_ack
        self._listener: Listener | None = None
        self._feeds: dict[tuple[str, int], _Feed] = {}
        self._queue: deque[WorkItem] = deque()
        self._waiter = _Waiter()
        self._last: WorkItem | None = None  # handed out, acknowledged by the next receive
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: PilotError | None = None  # why the listener stopped, if it did
        self.malformed = 0
        self.refused = 0

    async def __aenter__(self) -> Puller:
        self._listener = self._transport.listen(self.port)
        await self._listener.__aenter__()
        self._tasks = [asyncio.create_task(self._accept(self._listener)),
                       asyncio.create_task(self._beat())]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._last = None  # the consumer failed on it: let it go to another puller
        await self.close()

    @property
    def pushers(self) -> int:
        """Links from pushers open now."""
        return len(self._feeds)

    @property
    def queued(self) -> int:
        """Items received and not yet handed to the consumer."""
        return len(self._queue)

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> WorkItem:
        """The next item (acknowledging the one before with ``auto_ack``);
        :class:`PilotTimeoutError` after ``timeout`` seconds."""
        if self._listener is None:
            raise ConfigError("the puller is not open (use 'async with')")
        if self._last is not None:
            last, self._last = self._last, None
            await last.ack()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter.until(lambda: True if (
                    self._queue or self._listener is None or self._failure) else None)
        except TimeoutError:
            raise PilotTimeoutError(
                f"no work item on port {self.port} within {timeout} s") from None
        if not self._queue:
            raise self._failure or ConfigError("the puller is closed")
        item = self._queue.popleft()
        if self.auto_ack:
            self._last = item
        return item

    def __aiter__(self) -> AsyncIterator[WorkItem]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[WorkItem]:
        while self._listener is not None:
            yield await self.receive(timeout=None)

    async def close(self) -> None:
        """Stop. Every pusher is told, so it gives what this puller had not acknowledged to
        the others at once rather than after its heartbeat timeout."""
        if self._last is not None:
            last, self._last = self._last, None
            with contextlib.suppress(PilotError):
                await last.ack()
        listener, self._listener = self._listener, None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        feeds, self._feeds = list(self._feeds.values()), {}
        bye = encode_frame(Kind.BYE, 0, b"")
        await asyncio.gather(*(_send_within(1.0, f.way_back.reply(bye)) for f in feeds),
                             return_exceptions=True)
        self._queue.clear()
        self._waiter.changed()
        if listener is not None:
            await listener.close()

    async def _accept(self, listener: Listener) -> None:
        while True:
            try:
                message = await listener.receive(timeout=None)
            except PilotError as exc:  # the daemon went away: nothing more will come
                self._failure = exc
                self._waiter.changed()
                return
            feed = self._feeds.get((message.sender, message.source_port))
            try:
                frame = parse_frame_untrusted(message.data)
                if feed is None and frame.kind == Kind.HELLO:
                    await self._greet(message)
                elif feed is None:
                    raise WireError(f"a {frame.kind.name} frame on no link")
                elif frame.kind in (Kind.ITEM, Kind.ITEM_AGAIN):
                    self._take(feed, frame)
                else:
                    raise WireError(f"a {frame.kind.name} frame sent to a puller")
            except WireError as exc:
                self.malformed += 1
                log.warning("%s sent puller port %d a malformed frame: %s", message.sender,
                            self.port, exc)
                if feed is not None:
                    self._drop(feed)

    async def _greet(self, hello: Message) -> None:
        if len(self._feeds) >= self.config.max_pushers:
            self.refused += 1
            await self._send(None, hello, encode_frame(Kind.BYE, 0, b""))
            return
        feed = _Feed((hello.sender, hello.source_port), hello)
        self._feeds[feed.key] = feed
        credit = encode_credit(self.config.window_bytes, self.config.heartbeat_interval)
        await self._send(feed, hello, encode_frame(Kind.CREDIT, self.config.window_items, credit))

    def _take(self, feed: _Feed, frame: Frame) -> None:
        size = len(frame.payload)
        if (feed.in_flight >= self.config.window_items
                or feed.in_flight_bytes + size > self.config.window_bytes):
            raise WireError("a pusher sent beyond its window")
        feed.in_flight += 1
        feed.in_flight_bytes += size
        self._queue.append(WorkItem(frame.payload, feed.key[0], frame.id,
                                    frame.kind == Kind.ITEM_AGAIN, self, feed))
        self._waiter.changed()

    async def _ack(self, item: WorkItem) -> None:
        feed = item._feed
        feed.in_flight -= 1
        feed.in_flight_bytes -= len(item.data)
        if not feed.gone:
            await self._send(feed, feed.way_back, encode_frame(Kind.ACK, item.id, b""))

    async def _beat(self) -> None:
        heartbeat = encode_frame(Kind.HEARTBEAT, 0, b"")
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            await asyncio.gather(*(self._send(f, f.way_back, heartbeat)
                                   for f in list(self._feeds.values())))

    async def _send(self, feed: _Feed | None, way_back: Message, frame: bytes) -> None:
        """Send ``frame`` back to a pusher; if it cannot leave, drop ``feed``."""
        try:
            await _send_within(self.config.send_timeout, way_back.reply(frame))
        except PilotError as exc:
            log.info("pusher %s left puller port %d: %s", way_back.sender, self.port, exc)
            if feed is not None:
                self._drop(feed)

    def _drop(self, feed: _Feed) -> None:
        """Forget a link, and the items it brought that the consumer has not seen: its pusher
        gives them to another puller, or, if it died, had nobody left to report them to."""
        feed.gone = True
        if self._feeds.get(feed.key) is feed:
            del self._feeds[feed.key]
        kept = [item for item in self._queue if item._feed is not feed]
        if len(kept) != len(self._queue):
            self._queue = deque(kept)


# -- the pusher --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Link:
    """One puller's link, as its pusher keeps it."""

    peer: str
    conn: Connection
    window_items: int
    window_bytes: int
    silence: float  # seconds without a word after which the puller counts as gone
    unacked: dict[int, bytes] = field(default_factory=dict)  # by item id, in the order sent
    unacked_bytes: int = 0
    gone: bool = False

    def fits(self, size: int) -> bool:
        return (not self.gone and len(self.unacked) < self.window_items
                and self.unacked_bytes + size <= self.window_bytes)


class Pusher:
    """Work items for the pullers on ``port`` of each of ``peers`` (hostnames or node ids)."""

    def __init__(self, transport: Transport, peers: list[str], port: int,
                 config: PushPullConfig | None = None) -> None:
        if not peers:
            raise ConfigError("a pusher needs at least one puller to push to")
        if len(set(peers)) != len(peers):
            raise ConfigError(f"a puller is listed twice in {peers}")
        self._transport = transport
        self.peers = list(peers)
        self.port = port
        self.config = config or PushPullConfig()
        self._links: dict[str, _Link] = {}
        self._next = 0  # where the round-robin looks first
        self._again: deque[tuple[int, bytes]] = deque()  # items of pullers that went away
        self._waiter = _Waiter()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = False
        self.redelivered = 0
        self.malformed = 0

    async def __aenter__(self) -> Pusher:
        self._open = True
        for peer in self.peers:
            self._spawn(self._keep_linked(peer))
        self._spawn(self._redeliver())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> list[str]:
        """The peers with a live link now."""
        return [peer for peer in self.peers if peer in self._links]

    @property
    def pending(self) -> int:
        """Items pushed and not yet acknowledged (in flight, or waiting to be sent again)."""
        return len(self._again) + sum(len(link.unacked) for link in self._links.values())

    async def push(self, data: object, timeout: float | None = None) -> int:
        """Hand ``data`` (bytes, str or JSON) to a puller with room; its item id. Waits while
        every puller is full or away; :class:`PilotTimeoutError` after ``timeout`` seconds
        (default ``config.push_timeout``), and then no puller has the item."""
        if not self._open:
            raise ConfigError("the pusher is not open (use 'async with')")
        payload = encode_payload(data)
        if len(payload) > self.config.window_bytes:
            raise ConfigError(f"an item of {len(payload)} bytes: a link takes at most "
                              f"{self.config.window_bytes} (PushPullConfig.window_bytes)")
        timeout = self.config.push_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                # Items sent again go first: they were pushed earlier.
                link = await self._waiter.until(
                    lambda: None if self._again else self._pick(len(payload)))
        except TimeoutError:
            raise PilotTimeoutError(f"no puller on port {self.port} had room for the item "
                                    f"within {timeout} s ({self._state()})") from None
        item_id = next(self._ids)
        await self._send(link, Kind.ITEM, item_id, payload)
        return item_id

    async def join(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Wait until every item pushed so far was acknowledged; :class:`PilotTimeoutError`
        saying how many were not after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._waiter.until(lambda: True if self.pending == 0 else None)
        except TimeoutError:
            raise PilotTimeoutError(f"{self.pending} items pushed to port {self.port} were not "
                                    f"acknowledged within {timeout} s ({self._state()})") from None

    async def close(self) -> None:
        """Stop, dropping the links. Items not yet acknowledged are reported in the log (call
        :meth:`join` first to wait for them): their pullers may still finish them."""
        self._open = False
        while self._tasks:  # losing a link starts the abort of its stream: wait for that too
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.pending:
            log.warning("pusher on port %d closed with %d items not acknowledged", self.port,
                        self.pending)

    def _state(self) -> str:
        if not self._links:
            return f"no puller connected of {', '.join(self.peers)}"
        return f"{len(self._links)} of {len(self.peers)} pullers connected"

    def _pick(self, size: int) -> _Link | None:
        """The next puller in round-robin order with room for ``size`` bytes."""
        count = len(self.peers)
        for step in range(count):
            index = (self._next + step) % count
            link = self._links.get(self.peers[index])
            if link is not None and link.fits(size):
                self._next = index + 1
                return link
        return None

    async def _send(self, link: _Link, kind: Kind, item_id: int, data: bytes) -> None:
        # Counted before the first await, so no other push takes the same room.
        link.unacked[item_id] = data
        link.unacked_bytes += len(data)
        try:
            await _send_within(self.config.send_timeout,
                               link.conn.send(encode_frame(kind, item_id, data)))
        except PilotError as exc:
            log.info("puller %s port %d is gone: %s", link.peer, self.port, exc)
            self._lose(link)  # the item goes to another puller with the rest

    async def _redeliver(self) -> None:
        while True:
            link = await self._waiter.until(
                lambda: self._pick(len(self._again[0][1])) if self._again else None)
            item_id, data = self._again.popleft()
            self._waiter.changed()  # pushes wait while items to send again are queued
            self.redelivered += 1
            await self._send(link, Kind.ITEM_AGAIN, item_id, data)

    def _lose(self, link: _Link) -> None:
        """The link is gone: its unacknowledged items go to the others, oldest first."""
        if link.gone:
            return
        link.gone = True
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
        self._again.extend(sorted(link.unacked.items()))
        link.unacked.clear()
        link.unacked_bytes = 0
        self._waiter.changed()
        # The link's reader is waiting on the stream: aborting it ends that wait now.
        self._spawn(self._abort(link.conn))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _abort(conn: Connection) -> None:
        with contextlib.suppress(PilotError):
            await conn.abort()

    async def _keep_linked(self, peer: str) -> None:
        """Link to ``peer`` and read its frames; when the link breaks, link again after a
        pause that doubles while attempts lead nowhere."""
        backoff = self.config.reconnect_min
        while True:
            link: _Link | None = None
            try:
                link = await self._link(peer)
                backoff = self.config.reconnect_min
                await self._read(link)
            except PilotError as exc:
                if isinstance(exc, WireError):
                    self.malformed += 1
                log.info("link to puller %s port %d: %s", peer, self.port, exc)
            finally:
                if link is not None:
                    self._lose(link)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.reconnect_max)

    async def _link(self, peer: str) -> _Link:
        config = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.connect_timeout
        conn = self._transport.connect(peer, self.port, timeout=config.connect_timeout)
        await conn.__aenter__()
        try:
            await _send_within(config.connect_timeout,
                               conn.send(encode_frame(Kind.HELLO, secrets.randbits(63), b"")))
            answer = await conn.receive(timeout=max(deadline - loop.time(), 0.0))
            frame = parse_frame_untrusted(answer.data)
            if frame.kind == Kind.BYE:
                raise PilotError(f"puller {peer} port {self.port} serves enough pushers")
            if frame.kind != Kind.CREDIT or frame.id < 1:
                raise WireError(f"a {frame.kind.name} frame where a credit belongs")
            window_bytes, heartbeat = parse_credit_untrusted(frame.payload)
        except BaseException:
            await self._abort(conn)
            raise
        link = _Link(peer, conn, min(frame.id, config.window_items),
                     min(window_bytes, config.window_bytes), 3 * heartbeat)
        self._links[peer] = link
        self._waiter.changed()
        return link

    async def _read(self, link: _Link) -> None:
        while not link.gone:
            try:
                message = await link.conn.receive(timeout=link.silence)
            except PilotTimeoutError:
                raise PilotTimeoutError(f"silent for {link.silence:.1f} s") from None
            frame = parse_frame_untrusted(message.data)
            if frame.kind == Kind.ACK:
                data = link.unacked.pop(frame.id, None)
                if data is None:
                    raise WireError(f"an ACK of item {frame.id}, which it does not have")
                link.unacked_bytes -= len(data)
                self._waiter.changed()
            elif frame.kind == Kind.BYE:
                return  # the puller closed: what it had goes to the others
            elif frame.kind != Kind.HEARTBEAT:
                raise WireError(f"a {frame.kind.name} frame sent to a pusher")
