"""Push/pull: work items spread over several workers, over any
:class:`~pilot_agents.transport.Transport`.

    async with Puller(transport, 4001) as puller:            # on each worker
        async for item in puller:
            handle(item.json())          # done when the next item is asked for (auto_ack)

    async with Pusher(transport, ["worker-1", "worker-2"], 4001) as pusher:
        for job in jobs:
            await pusher.push(job)       # waits while every worker is full
        await pusher.join(timeout=60)    # until every item was acknowledged

Either end may be the one that listens. Above, each puller listens and the pusher connects to
the pullers it is given (by hostname or node id). The other way round, ZeroMQ's "the ventilator
binds", suits a stage whose workers come and go: ``Pusher(transport, 4001)`` listens, and each
``Puller(transport, 4001, peer="ventilator")`` connects to it (and again when the link breaks).

Each puller grants each link a window: at most ``window_items`` items and ``window_bytes`` bytes
in flight (sent and not yet acknowledged by its consumer). ``push`` hands an item to the next
puller in round-robin order whose window has room, skipping full ones, and waits while all are
full (back-pressure: a consumer that stops reading stops its pushers once the windows fill). A
push that finds no room within its timeout raises :class:`~pilot_agents.errors.PilotTimeoutError`,
and then no puller has the item.

An item is done when its consumer acknowledges it: ``await item.ack()``, or, with ``auto_ack``
(the default), when the consumer asks for the next item (or leaves the puller's ``async with``
block without an exception). A consumer that handles items in several tasks at once passes
``auto_ack=False`` and acknowledges each item itself.

Delivery is at least once. While every puller is live, each item goes to one puller, once. When
a puller goes away (its stream breaks, its node stops, it closes, or it is silent for three of
its heartbeats), the pusher sends the items it had not acknowledged to the other pullers, flagged
:attr:`WorkItem.redelivered` (its consumer may have done it already); the link is made again,
with backoff, when the puller is back. Items keep their pusher's order per puller, not overall.
An item to send again that no puller's window has room for lets the others pass.

A puller drops a link on which its pusher said nothing (no item, no bytes of one arriving, no
answer to a heartbeat) for three of its heartbeats: a live pusher answers each, so a peer that
links and falls silent holds no room of a listening puller's ``max_links`` for long. A live
one holds at most ``max_links_per_peer`` of them, so it cannot lock the other peers out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import (
    ConfigError,
    ConnectionClosedError,
    DaemonNotRunningError,
    PilotError,
    PilotTimeoutError,
    WireError,
)
from ..transport import (
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    Connection,
    Listener,
    Message,
    Payload,
    Transport,
    encode_payload,
    receive_unless_silent,
)
from .frames import (
    MAX_HEARTBEAT_MS,
    MAX_PAYLOAD,
    Frame,
    Kind,
    encode_credit,
    encode_frame,
    note_malformed,
    parse_credit_untrusted,
    parse_frame_untrusted,
)
from .shares import PerPeer, check_share, peer_share

log = logging.getLogger("pilot_agents.patterns.pushpull")
MAX_ITEM = MAX_PAYLOAD  # the largest item: its frame is one tunnel message

T = TypeVar("T")
Send = Callable[[bytes], Awaitable[None]]  # one link's way to its other end

_HEARTBEAT = encode_frame(Kind.HEARTBEAT, 0, b"")
# A puller's heartbeat asks to be answered (id 1): a listening puller hears from an idle pusher
# only so. A pusher answers an unasked one (id 0) only on a link the puller made, because a
# listening puller of an earlier version takes any frame but an item as malformed.
_ASKS = 1
_PING = encode_frame(Kind.HEARTBEAT, _ASKS, b"")
_BYE = encode_frame(Kind.BYE, 0, b"")
# Seconds given to the event loop before a pusher counts a link silent: frames that came while
# this process could not run (stopped, its loop blocked) are still unread when the timer that
# was due meanwhile fires first; the loop reads them within this, and they are handled first.
_READ_PENDING = 0.05
# Frames handled so at most, before the links still quiet are judged.
_MAX_PENDING = 1024


async def _last_heard(heard: float, since_arrival: Callable[[], Awaitable[float | None]]
                      ) -> float:
    """When a link's peer was last heard from: ``heard`` (its last frame), or later if bytes of
    its stream arrived since (an item still arriving)."""
    try:
        since = await since_arrival()
    except PilotError:  # the stream is gone, or our daemon: nothing more comes on it
        return heard
    return heard if since is None else max(heard, asyncio.get_running_loop().time() - since)


async def _receive_now(receive: Callable[[float], Awaitable[Message]]) -> Message | None:
    """A message already there, or None."""
    try:
        return await receive(0.0)
    except PilotTimeoutError:
        return None


@dataclass(frozen=True)
class PushPullConfig:
    """The bounds of both ends. A link's window is the smaller of the puller's and the
    pusher's, so a puller holds at most ``max_links`` windows of items, and a pusher one window
    per puller (and, listening, at most ``max_links`` pullers)."""

    window_items: int = 64  # items in flight on one link (sent, not yet acknowledged)
    window_bytes: int = 4 * 2**20  # payload bytes in flight on one link; the largest item
    max_links: int = 64  # links a listening end serves at once; more are told to come back later
    # ... and of one peer node (those of a daemon's clients are all its node's), so that one
    # trusted peer cannot take every link and lock the others out. None: half of max_links
    # (32 of 64): a node running many workers (or pushers), one link each, may still link as
    # many, and whatever one peer holds, the other half stays for the rest.
    max_links_per_peer: int | None = None
    push_timeout: float = 30.0  # seconds push() waits for a puller with room, by default
    send_timeout: float = 10.0  # seconds one frame may take to leave before its link is dropped
    connect_timeout: float = CONNECT_TIMEOUT  # seconds to open a link, its credit included
    # Seconds between a puller's heartbeats on every link. It tells its pusher, which counts it
    # gone when it hears nothing for three of them (its node may have died without a word), and
    # answers each, so the puller notices a pusher gone (or a peer that links and then says
    # nothing, holding a listening puller's room) the same way.
    heartbeat_interval: float = 5.0
    reconnect_min: float = 0.2  # seconds the connecting end waits before linking again; doubles
    reconnect_max: float = 10.0  # seconds, the cap of that doubling

    def __post_init__(self) -> None:
        if self.window_items < 1 or self.window_bytes < 1 or self.max_links < 1:
            raise ConfigError("PushPullConfig bounds must be at least 1")
        check_share(self, "max_links", "max_links_per_peer")
        if self.window_bytes > MAX_ITEM:
            # The largest item: one beyond what a tunnel carries would reset every link it
            # went to, again and again.
            raise ConfigError(f"PushPullConfig.window_bytes: at most {MAX_ITEM} (the largest "
                              "message a tunnel carries, less a frame header)")
        for name in ("push_timeout", "send_timeout", "connect_timeout", "heartbeat_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"PushPullConfig.{name} must be positive")
        if self.heartbeat_interval > MAX_HEARTBEAT_MS / 1000:
            raise ConfigError(f"PushPullConfig.heartbeat_interval: at most "
                              f"{MAX_HEARTBEAT_MS // 1000} s")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("PushPullConfig: need 0 < reconnect_min <= reconnect_max")

    @property
    def links_per_peer(self) -> int:
        """The links of one peer a listening end serves at once: ``max_links_per_peer``, or
        half of ``max_links``."""
        return peer_share(self.max_links_per_peer, self.max_links, 2)


def _refusal(config: PushPullConfig, linked: int, theirs: int) -> bytes | None:
    """None if a listening end with ``linked`` links, ``theirs`` of them the asking peer's,
    takes one more; else the BYE that refuses it, saying which bound is reached."""
    if linked >= config.max_links:
        why = f"max_links: it serves {config.max_links} links already"
    elif theirs >= config.links_per_peer:
        why = f"max_links_per_peer: it serves {theirs} links of your node already"
    else:
        return None
    return encode_frame(Kind.BYE, 0, why.encode())


def _said(bye: Frame) -> str:
    """Why a BYE refused a link (a peer of an earlier version says nothing), to be shown."""
    why = bye.payload[:200].decode("utf-8", "replace")
    return f" ({why})" if why.isprintable() and why else ""


async def _send_within(seconds: float, send: Awaitable[None]) -> None:
    """``send``, or :class:`PilotTimeoutError` once it has taken ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            await send
    except TimeoutError:
        raise PilotTimeoutError(f"a frame did not leave within {seconds} s") from None


async def _abort(conn: Connection) -> None:
    with contextlib.suppress(PilotError):
        await conn.abort()


async def _finish(conn: Connection) -> None:
    """End the stream after what was sent on it, waiting at most a second for the peer."""
    with contextlib.suppress(PilotError):
        await _send_within(1.0, conn.close())


async def _open(transport: Transport, peer: str, port: int, first: bytes,
                config: PushPullConfig) -> Connection:
    """A connection to ``port`` on ``peer`` with ``first`` sent on it, within the timeout."""
    conn = transport.connect(peer, port, timeout=config.connect_timeout)
    await conn.__aenter__()
    try:
        await _send_within(config.connect_timeout, conn.send(first))
    except BaseException:
        await _abort(conn)
        raise
    return conn


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


class _Redial:
    """The pause before the connecting end links again: doubles while attempts lead nowhere,
    back to the least once a link was made."""

    def __init__(self, config: PushPullConfig) -> None:
        self._config = config
        self._pause = config.reconnect_min

    def linked(self) -> None:
        self._pause = self._config.reconnect_min

    async def wait(self) -> None:
        await asyncio.sleep(self._pause)
        self._pause = min(self._pause * 2, self._config.reconnect_max)


class _Tasks:
    """The background tasks of one end; all cancelled, and waited for, at its close."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def cancel(self) -> None:
        # Cancelled again until done: Python 3.11's wait_for (under the daemon's IPC calls) can
        # swallow a cancellation that comes as its future completes. A task cancelled may spawn
        # another (an abort): that one is waited for too.
        while self._running:
            for task in self._running:
                task.cancel()
            await asyncio.wait(self._running, timeout=0.1)


# -- the puller --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Feed:
    """One pusher's link, as its puller keeps it."""

    key: tuple[str, int]  # (the pusher's node id, its port): names the stream
    send: Send  # credit, acks and heartbeats go back this way
    heard: float  # when it last said something (loop time)
    # Seconds since bytes of the stream last arrived, on a link the pusher made (the one we
    # made is watched by its reader): an item still arriving is not silence.
    since_arrival: Callable[[], Awaitable[float | None]] | None = None
    in_flight: int = 0
    in_flight_bytes: int = 0
    gone: bool = False

    @property
    def sender(self) -> str:
        return self.key[0]


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
        the item to another puller (at least once). Cancelled while the acknowledgement leaves,
        it drops the link: the pusher sends what it had not heard acknowledged again."""
        if not self.acked:
            self.acked = True
            await self._puller._ack(self)


class Puller:
    """Work items from pushers, for ``async for``, opened with ``async with``: pushed to
    ``port`` by any trusted pusher, or, given ``peer``, from the pusher listening on ``port``
    of ``peer`` (linked again, with backoff, whenever the link breaks). A frame that breaks
    the protocol (malformed, of the wrong kind, beyond its link's window) drops that link and
    is counted in :attr:`malformed`; the others go on."""

    def __init__(self, transport: Transport, port: int, config: PushPullConfig | None = None,
                 *, peer: str | None = None, auto_ack: bool = True) -> None:
        self._transport = transport
        self.port = port
        self.peer = peer
        self.config = config or PushPullConfig()
        self.auto_ack = auto_ack
        self._open = False
        self._listener: Listener | None = None
        self._feeds: dict[tuple[str, int], _Feed] = {}
        self._per_peer = PerPeer()  # links in _feeds, by pusher
        self._queue: deque[WorkItem] = deque()
        self._waiter = _Waiter()
        self._last: WorkItem | None = None  # handed out, acknowledged by the next receive
        self._tasks = _Tasks()
        self._failure: PilotError | None = None  # why it can get no more items, if it cannot
        self.malformed = 0
        self.refused = 0

    async def __aenter__(self) -> Puller:
        if self.peer is None:
            # Exclusive: a link is a stream, all of whose frames must come here (as a
            # Publisher's subscriptions).
            self._listener = self._transport.listen(self.port, exclusive=True)
            await self._listener.__aenter__()
            self._tasks.spawn(self._accept(self._listener))
        else:
            self._tasks.spawn(self._keep_linked(self.peer))
        self._tasks.spawn(self._beat())
        self._open = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._last = None  # the consumer failed on it: let it go to another puller
        await self.close()

    @property
    def pushers(self) -> int:
        """Links to pushers open now."""
        return len(self._feeds)

    @property
    def queued(self) -> int:
        """Items received and not yet handed to the consumer."""
        return len(self._queue)

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> WorkItem:
        """The next item (acknowledging the one before with ``auto_ack``);
        :class:`PilotTimeoutError` after ``timeout`` seconds."""
        if not self._open:
            raise ConfigError("the puller is not open (use 'async with')")
        if self._last is not None:
            last, self._last = self._last, None
            await last.ack()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter.until(
                    lambda: True if self._queue or not self._open or self._failure else None)
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
        while self._open:
            try:
                item = await self.receive(timeout=None)
            except ConfigError:
                if not self._open and self._failure is None:
                    return  # closed while it waited: the iteration ends, as a Subscriber's
                raise
            yield item

    async def close(self) -> None:
        """Stop. Every pusher is told, so it gives what this puller had not acknowledged to
        the others at once rather than after its heartbeat timeout."""
        if self._last is not None:
            last, self._last = self._last, None
            await last.ack()
        self._open = False
        # BYE while the links still stand: the links we dialled end with their tasks, and
        # must carry the last acknowledgement and the BYE out first (see _keep_linked).
        feeds, self._feeds = list(self._feeds.values()), {}
        self._per_peer.clear()
        await asyncio.gather(*(_send_within(1.0, f.send(_BYE)) for f in feeds),
                             return_exceptions=True)
        await self._tasks.cancel()
        self._queue.clear()
        self._waiter.changed()
        listener, self._listener = self._listener, None
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
                if feed is not None:
                    self._take(feed, frame)
                elif frame.kind == Kind.HELLO:
                    await self._greet(message)
                else:
                    raise WireError(f"a {frame.kind.name} frame on no link")
            except WireError as exc:
                self._malformed(message.sender, exc, feed)

    def _malformed(self, sender: str, exc: WireError, feed: _Feed | None) -> None:
        self.malformed += 1
        note_malformed(log, self.malformed, "pusher %s sent puller port %d a malformed frame: %s",
                       sender, self.port, exc)
        if feed is not None:
            self._drop(feed)

    async def _greet(self, hello: Message) -> None:
        bye = _refusal(self.config, len(self._feeds), self._per_peer[hello.sender])
        if bye is not None:
            self.refused += 1
            await self._send(None, hello.reply, bye)
            return
        feed = _Feed((hello.sender, hello.source_port), hello.reply,
                     asyncio.get_running_loop().time(), hello.since_arrival)
        self._link(feed)
        await self._send(feed, feed.send, self._credit())

    def _link(self, feed: _Feed) -> None:
        self._feeds[feed.key] = feed
        self._per_peer.add(feed.sender)

    def _credit(self) -> bytes:
        config = self.config
        return encode_frame(Kind.CREDIT, config.window_items,
                            encode_credit(config.window_bytes, config.heartbeat_interval))

    async def _keep_linked(self, peer: str) -> None:
        redial = _Redial(self.config)
        while True:
            feed: _Feed | None = None
            conn: Connection | None = None
            try:
                conn = await _open(self._transport, peer, self.port, self._credit(),
                                   self.config)
                feed = _Feed((conn.peer_id, 0), conn.send, asyncio.get_running_loop().time())
                self._link(feed)
                await self._read(conn, feed, redial)
            except WireError as exc:
                self._malformed(peer, exc, feed)
            except DaemonNotRunningError as exc:  # our own daemon, not the link: give up
                self._failure = exc
                self._waiter.changed()
                return
            except PilotError as exc:
                log.info("link to pusher %s port %d: %s", peer, self.port, exc)
            finally:
                if feed is not None:
                    self._drop(feed)
                if conn is not None:
                    # Closing, a reset would discard what was written last (the final
                    # acknowledgement, the BYE) before it left: finish the stream instead.
                    await (_abort(conn) if self._open else _finish(conn))
            await redial.wait()

    async def _read(self, conn: Connection, feed: _Feed, redial: _Redial) -> None:
        """Items from a pusher we connected to, until it says BYE or falls silent. The pause
        before linking again goes back to the least only once the pusher said something else
        than BYE (one that serves enough pullers answers each link so, at once)."""
        silence = 3 * self.config.heartbeat_interval
        while not feed.gone:
            message = await receive_unless_silent(conn, silence)
            frame = parse_frame_untrusted(message.data)
            if frame.kind == Kind.BYE:
                log.info("pusher %s port %d said BYE%s", feed.sender, self.port, _said(frame))
                return
            redial.linked()
            self._take(feed, frame)

    def _take(self, feed: _Feed, frame: Frame) -> None:
        feed.heard = asyncio.get_running_loop().time()
        if frame.kind == Kind.HEARTBEAT:
            return  # the pusher's answer to ours
        if frame.kind not in (Kind.ITEM, Kind.ITEM_AGAIN):
            raise WireError(f"a {frame.kind.name} frame sent to a puller")
        size = len(frame.payload)
        if (feed.in_flight >= self.config.window_items
                or feed.in_flight_bytes + size > self.config.window_bytes):
            raise WireError("a pusher sent beyond its window")
        feed.in_flight += 1
        feed.in_flight_bytes += size
        self._queue.append(WorkItem(frame.payload, feed.sender, frame.id,
                                    frame.kind == Kind.ITEM_AGAIN, self, feed))
        self._waiter.changed()

    async def _ack(self, item: WorkItem) -> None:
        feed = item._feed
        feed.in_flight -= 1
        feed.in_flight_bytes -= len(item.data)
        if not feed.gone:
            try:
                await self._send(feed, feed.send, encode_frame(Kind.ACK, item.id, b""))
            except asyncio.CancelledError:
                # Cancelled while its frame waited to leave (the daemon's SDK may wait before
                # handing it over): one the pusher never hears holds the item's room on the
                # link for good, and its join waits for it. The link goes, with a BYE, and the
                # pusher sends what it did not hear acknowledged again (at least once).
                self._drop(feed)
                self._tasks.spawn(self._send(None, feed.send, _BYE))
                raise

    async def _beat(self) -> None:
        silence = 3 * self.config.heartbeat_interval
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            feeds = list(self._feeds.values())
            await asyncio.gather(*(self._send(f, f.send, _PING) for f in feeds),
                                 *(self._unless_silent(f, silence) for f in feeds
                                   if f.since_arrival is not None))

    async def _unless_silent(self, feed: _Feed, silence: float) -> None:
        """Drop, with a BYE, a link a pusher made that has said nothing for ``silence``
        seconds. A live pusher answers every heartbeat, so it is gone without a word, or it
        holds the room of ``max_links`` that real pushers wait for. An earlier version's
        pusher answers none: idle that long, it is dropped too and links again at once."""
        assert feed.since_arrival is not None
        loop = asyncio.get_running_loop()
        if loop.time() - feed.heard < silence:
            return
        feed.heard = await _last_heard(feed.heard, feed.since_arrival)
        if loop.time() - feed.heard < silence or feed.gone:
            return
        log.info("pusher %s silent for %.1f s on puller port %d", feed.sender, silence,
                 self.port)
        self._drop(feed)
        await self._send(None, feed.send, _BYE)

    async def _send(self, feed: _Feed | None, send: Send, frame: bytes) -> None:
        """Send ``frame`` to a pusher; if it cannot leave, drop ``feed``."""
        try:
            await _send_within(self.config.send_timeout, send(frame))
        except PilotError as exc:
            log.info("a pusher left puller port %d: %s", self.port, exc)
            if feed is not None:
                self._drop(feed)

    def _drop(self, feed: _Feed) -> None:
        """Forget a link, and the items it brought that the consumer has not seen: its pusher
        sends them to another puller (and if the pusher died, nobody waits for them)."""
        feed.gone = True
        if self._feeds.get(feed.key) is feed:
            del self._feeds[feed.key]
            self._per_peer.remove(feed.sender)
        kept = [item for item in self._queue if item._feed is not feed]
        if len(kept) != len(self._queue):
            self._queue = deque(kept)


# -- the pusher --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Link:
    """One puller's link, as its pusher keeps it."""

    key: object  # the peer named, or (node id, port) of a puller that connected
    peer: str
    send: Send
    window_items: int
    window_bytes: int
    silence: float  # seconds without a word after which the puller counts as gone
    heard: float  # when it last said something (loop time)
    since_arrival: Callable[[], Awaitable[float | None]]  # of its stream's bytes (_last_heard)
    conn: Connection | None = None  # ours, if we connected
    unacked: dict[int, bytes] = field(default_factory=dict)  # by item id, in the order sent
    unacked_bytes: int = 0
    gone: bool = False
    answering: bool = False  # a heartbeat's answer is on its way: more asked meanwhile share it

    def fits(self, size: int) -> bool:
        return (not self.gone and len(self.unacked) < self.window_items
                and self.unacked_bytes + size <= self.window_bytes)


class Pusher:
    """Work items for pullers: those on ``port`` of each of ``peers`` (hostnames or node ids),
    or, given a port alone (``Pusher(transport, 4001)``), those that connect to that port."""

    def __init__(self, transport: Transport, peers: list[str] | int, port: int | None = None,
                 config: PushPullConfig | None = None) -> None:
        if isinstance(peers, int) and port is None:
            self.peers: list[str] = []
            self.port = peers
        elif isinstance(peers, int) or not peers or port is None:
            raise ConfigError("a pusher takes a list of pullers and their port, "
                              "or a port to listen on")
        elif len(set(peers)) != len(peers):
            raise ConfigError(f"a puller is listed twice in {peers}")
        else:
            self.peers, self.port = list(peers), port
        self._transport = transport
        self.config = config or PushPullConfig()
        self._listener: Listener | None = None
        self._links: dict[object, _Link] = {}
        self._per_peer = PerPeer()  # links in _links, by puller
        self._next = 0  # where the round-robin looks first
        self._again: deque[tuple[int, bytes]] = deque()  # items of pullers that went away
        self._waiter = _Waiter()
        self._ids = itertools.count(1)
        self._tasks = _Tasks()
        self._open = False
        self._failure: PilotError | None = None  # why it can reach no puller, if it cannot
        # Why each named puller is not linked, while it is not: said when nobody has room.
        self._unlinked: dict[str, PilotError] = {}
        self.redelivered = 0
        self.malformed = 0
        self.refused = 0
        # Items acknowledged, by puller (as in ``connected``): how the work was spread.
        self.acknowledged: Counter[str] = Counter()

    async def __aenter__(self) -> Pusher:
        if not self.peers:
            self._listener = self._transport.listen(self.port, exclusive=True)  # as a Puller's
            await self._listener.__aenter__()
            self._tasks.spawn(self._accept(self._listener))
        for peer in self.peers:
            self._tasks.spawn(self._keep_linked(peer))
        self._tasks.spawn(self._redeliver())
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> list[str]:
        """The pullers linked now: as named in ``peers``, or by node id if they connected."""
        return [link.peer for link in self._links.values()]

    @property
    def pending(self) -> int:
        """Items pushed and not yet acknowledged (in flight, or waiting to be sent again)."""
        return len(self._again) + sum(len(link.unacked) for link in self._links.values())

    async def push(self, data: object, timeout: float | None = None) -> int:
        """Hand ``data`` (bytes, str or JSON) to a puller with room; its item id. Waits while
        every puller is full or away; :class:`PilotTimeoutError` after ``timeout`` seconds
        (default ``config.push_timeout``), and then no puller has the item. Cancelled while
        the item leaves, its link is dropped and the item goes to another puller."""
        if not self._open:
            raise ConfigError("the pusher is not open (use 'async with')")
        payload = encode_payload(data)
        if len(payload) > self.config.window_bytes:
            raise ConfigError(f"an item of {len(payload)} bytes: a link takes at most "
                              f"{self.config.window_bytes} (PushPullConfig.window_bytes)")
        timeout = self.config.push_timeout if timeout is None else timeout
        def room() -> _Link | PilotError | None:
            if self._failure is not None:
                return self._failure
            if self._next_again() is not None:
                return None  # items to send again go first (they are older)
            return self._pick(len(payload))

        try:
            async with asyncio.timeout(timeout):
                link: _Link | PilotError = await self._waiter.until(room)
        except TimeoutError:
            raise PilotTimeoutError(f"no puller on port {self.port} had room for the item "
                                    f"within {timeout} s ({self._state()}"
                                    f"{self._too_wide(len(payload))})") from None
        if isinstance(link, PilotError):
            raise link
        item_id = next(self._ids)
        await self._send(link, Kind.ITEM, item_id, payload)
        return item_id

    async def join(self, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Wait until every item pushed so far was acknowledged; :class:`PilotTimeoutError`
        saying how many were not after ``timeout`` seconds."""
        def done() -> bool | PilotError | None:
            if not self._open:
                return self._failure  # close()'s
            if self.pending == 0:
                return True
            return self._failure or self._stuck()

        try:
            async with asyncio.timeout(timeout):
                outcome = await self._waiter.until(done)
        except TimeoutError:
            why = self._stranded()[1]
            why = f"; {why}" if why else ""
            raise PilotTimeoutError(f"{self.pending} of the items pushed to port {self.port} "
                                    f"were not acknowledged within {timeout} s "
                                    f"({self._state()}){why}") from None
        if isinstance(outcome, PilotError):
            raise outcome

    async def close(self) -> None:
        """Stop, dropping the links. Items not yet acknowledged are reported in the log (call
        :meth:`join` first to wait for them): their pullers may still finish them. A push or
        join waiting meanwhile raises ConnectionClosedError."""
        self._open = False
        self._failure = ConnectionClosedError(f"the pusher on port {self.port} was closed")
        self._waiter.changed()
        listener, self._listener = self._listener, None
        await self._tasks.cancel()
        links, self._links = list(self._links.values()), {}
        self._per_peer.clear()
        await asyncio.gather(*(_send_within(1.0, link.send(_BYE)) for link in links
                               if link.conn is None), return_exceptions=True)
        await asyncio.gather(*(_abort(link.conn) for link in links if link.conn is not None))
        if listener is not None:
            await listener.close()
        unacked = len(self._again) + sum(len(link.unacked) for link in links)
        if unacked:
            log.warning("pusher on port %d closed with %d items not acknowledged", self.port,
                        unacked)

    def _state(self) -> str:
        wanted = f" of {len(self.peers)}" if self.peers else ""
        why = "".join(f"; {exc}" for exc in self._unlinked.values())  # (each names its peer)
        return f"{len(self._links)}{wanted} pullers connected{why}"

    def _next_again(self) -> int | None:
        """Where the oldest item to send again that a puller has room for now is in the
        queue: one that fits no window now holds up neither those behind it nor new items.
        Items sent again keep no order (they come after later ones anyway)."""
        room = max((link.window_bytes - link.unacked_bytes for link in self._links.values()
                    if not link.gone and len(link.unacked) < link.window_items), default=-1)
        if room < 0:
            return None
        return next((index for index, (_, data) in enumerate(self._again)
                     if len(data) <= room), None)

    def _widest(self) -> int | None:
        """The widest window of a puller linked now (None: none is)."""
        return max((link.window_bytes for link in self._links.values()), default=None)

    def _stranded(self) -> tuple[int, str]:
        """How many of the items to send again no puller linked now could ever take (too large
        for its window, empty or not), and a word on them ("" if none). With no puller
        linked, none is counted: every item waits for one."""
        widest = self._widest()
        sizes = {item_id: len(data) for item_id, data in self._again
                 if widest is not None and len(data) > widest}
        if not sizes:
            return 0, ""
        largest = max(sizes, key=sizes.__getitem__)
        return len(sizes), (f"{len(sizes)} item(s) to send again fit no linked puller's window, "
                            f"the largest (id {largest}) of {sizes[largest]} bytes where a "
                            f"window takes at most {widest}")

    def _too_wide(self, size: int) -> str:
        """Why no puller linked now could ever take a ``size``-byte item, if none could: a
        puller's own window may be narrower than the pusher's."""
        widest = self._widest()
        if widest is None or size <= widest:
            return ""
        return (f"; the item is {size} bytes, and no puller linked takes more than {widest} "
                "in its window (its PushPullConfig.window_bytes)")

    def _stuck(self) -> ConfigError | None:
        """Why join cannot end, if all it waits for is items no linked puller can take while
        every puller named is linked: none that could take them is still to come."""
        if not self.peers or len(self._links) < len(self.peers):
            return None
        count, stranded = self._stranded()
        if not count or count < self.pending:
            return None
        return ConfigError(f"{stranded}: they stay queued for a puller that can take them; "
                           "give the pullers a larger PushPullConfig.window_bytes, or push "
                           "smaller items")

    def _pick(self, size: int) -> _Link | None:
        """The next puller in round-robin order with room for ``size`` bytes."""
        links = list(self._links.values())
        for step in range(len(links)):
            index = (self._next + step) % len(links)
            if links[index].fits(size):
                self._next = index + 1
                return links[index]
        return None

    async def _send(self, link: _Link, kind: Kind, item_id: int, data: bytes) -> None:
        # Counted before the first await, so no other push takes the same room.
        link.unacked[item_id] = data
        link.unacked_bytes += len(data)
        try:
            await _send_within(self.config.send_timeout,
                               link.send(encode_frame(kind, item_id, data)))
        except PilotError as exc:
            log.info("puller %s port %d is gone: %s", link.peer, self.port, exc)
            self._lose(link)  # the item goes to another puller with the rest
        except asyncio.CancelledError:
            # Cancelled while its frame waited to leave (the daemon's SDK may wait before
            # handing it over): whether it reached the puller is unknown, and one counted on
            # the link that never did would hold its room for good. The link goes, its items
            # to the other pullers, as when a puller leaves (at least once).
            self._lose(link)
            raise

    async def _redeliver(self) -> None:
        while True:
            index = await self._waiter.until(self._next_again)
            item_id, data = self._again[index]
            del self._again[index]
            link = self._pick(len(data))
            assert link is not None  # _next_again saw its room, and nothing ran since
            self._waiter.changed()  # pushes wait while items to send again are queued
            self.redelivered += 1
            await self._send(link, Kind.ITEM_AGAIN, item_id, data)

    def _lose(self, link: _Link) -> None:
        """The link is gone: its unacknowledged items go to the others, oldest first."""
        if link.gone:
            return
        link.gone = True
        if self._links.get(link.key) is link:
            del self._links[link.key]
            self._per_peer.remove(link.peer)
        self._again.extend(sorted(link.unacked.items()))
        link.unacked.clear()
        link.unacked_bytes = 0
        self._waiter.changed()
        if link.conn is not None:
            self._tasks.spawn(_abort(link.conn))

    def _add(self, key: object, peer: str, send: Send,
             since_arrival: Callable[[], Awaitable[float | None]], credit: Frame,
             conn: Connection | None = None) -> _Link:
        """The link a puller's CREDIT opens."""
        if credit.kind == Kind.BYE:
            raise PilotError(f"puller {peer} port {self.port} serves enough pushers"
                             f"{_said(credit)}")
        if credit.kind != Kind.CREDIT:
            raise WireError(f"a {credit.kind.name} frame where a credit belongs")
        if credit.id < 1:
            raise WireError("a credit of no items")
        window_bytes, heartbeat = parse_credit_untrusted(credit.payload)
        link = _Link(key, peer, send, min(credit.id, self.config.window_items),
                     min(window_bytes, self.config.window_bytes), 3 * heartbeat,
                     asyncio.get_running_loop().time(), since_arrival, conn)
        self._links[key] = link
        self._per_peer.add(peer)
        self._waiter.changed()
        return link

    def _heard(self, link: _Link, frame: Frame) -> bool:
        """Handle a frame from a puller; False when it said BYE."""
        link.heard = asyncio.get_running_loop().time()
        if frame.kind == Kind.ACK:
            data = link.unacked.pop(frame.id, None)
            if data is None:
                raise WireError(f"an ACK of item {frame.id}, which it does not have")
            link.unacked_bytes -= len(data)
            self.acknowledged[link.peer] += 1
            self._waiter.changed()
        elif frame.kind == Kind.HEARTBEAT:
            # It waits to hear that we are alive: a puller that connected, always; one that
            # listens, when it asks (see _ASKS).
            if (link.conn is None or frame.id == _ASKS) and not link.answering:
                # One answer at a time: a puller that floods heartbeats to a link whose stream
                # is full would otherwise have a task waiting per heartbeat.
                link.answering = True
                self._tasks.spawn(self._answer(link))
        elif frame.kind == Kind.BYE:
            return False  # the puller closed: what it had goes to the others
        else:
            raise WireError(f"a {frame.kind.name} frame sent to a pusher")
        return True

    async def _answer(self, link: _Link) -> None:
        try:
            await _send_within(self.config.send_timeout, link.send(_HEARTBEAT))
        except PilotError as exc:
            log.info("puller %s port %d is gone: %s", link.peer, self.port, exc)
            self._lose(link)
        finally:
            link.answering = False

    def _malformed(self, peer: str, exc: WireError) -> None:
        self.malformed += 1
        note_malformed(log, self.malformed, "puller %s sent pusher port %d a malformed frame: %s",
                       peer, self.port, exc)

    async def _keep_linked(self, peer: str) -> None:
        """Link to ``peer`` and read its frames; link again when the link breaks."""
        redial = _Redial(self.config)
        while True:
            link: _Link | None = None
            try:
                link = await self._link(peer)
                redial.linked()
                self._unlinked.pop(peer, None)
                await self._read(link)
            except WireError as exc:
                self._malformed(peer, exc)
            except DaemonNotRunningError as exc:  # our own daemon, not the link: give up
                self._fail(exc)
                return
            except PilotError as exc:
                log.info("link to puller %s port %d: %s", peer, self.port, exc)
                if link is None:
                    self._unlinked[peer] = exc
            finally:
                if link is not None:
                    self._lose(link)
            await redial.wait()

    async def _link(self, peer: str) -> _Link:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.connect_timeout
        hello = encode_frame(Kind.HELLO, secrets.randbits(63), b"")
        conn = await _open(self._transport, peer, self.port, hello, self.config)
        try:
            answer = await conn.receive(timeout=max(deadline - loop.time(), 0.0))
            return self._add(peer, peer, conn.send, conn.since_arrival,
                             parse_frame_untrusted(answer.data), conn)
        except BaseException:
            await _abort(conn)
            raise

    async def _read(self, link: _Link) -> None:
        """Frames from a puller we connected to, until it goes or falls silent."""
        conn = link.conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        while not link.gone:
            message: Message | None
            try:
                message = await conn.receive(
                    timeout=max(link.heard + link.silence - loop.time(), 0.0))
            except PilotTimeoutError:
                await asyncio.sleep(_READ_PENDING)
                message = await _receive_now(conn.receive)
            if message is None:
                if await self._silent(link):
                    raise PilotTimeoutError(f"silent for {link.silence:.1f} s")
                continue
            if not self._heard(link, parse_frame_untrusted(message.data)):
                return

    async def _silent(self, link: _Link) -> bool:
        """Whether the puller said nothing for its silence (what came was read already)."""
        link.heard = await _last_heard(link.heard, link.since_arrival)
        return asyncio.get_running_loop().time() - link.heard > link.silence

    async def _accept(self, listener: Listener) -> None:
        """Pullers that connect to us, and their frames; drops those that fall silent."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                message = await listener.receive(timeout=self._shortest_silence() / 3)
            except PilotTimeoutError:
                message = None
            except PilotError as exc:  # the daemon went away: nothing more will come
                self._fail(exc)
                return
            if message is not None:
                await self._from_puller(message)
            now = loop.time()
            if not any(now - k.heard > k.silence for k in self._links.values()):
                continue
            await asyncio.sleep(_READ_PENDING)
            for _ in range(_MAX_PENDING):  # what the quiet ones may have said meanwhile
                try:
                    message = await _receive_now(listener.receive)
                except PilotError as exc:
                    self._fail(exc)
                    return
                if message is None:
                    break
                await self._from_puller(message)
            now = loop.time()
            quiet = [k for k in self._links.values() if now - k.heard > k.silence]
            for link, silent in zip(quiet, await asyncio.gather(*map(self._silent, quiet)),
                                    strict=True):
                if silent and not link.gone:
                    log.info("puller %s port %d silent for %.1f s", link.peer, self.port,
                             link.silence)
                    self._lose(link)

    def _fail(self, error: PilotError) -> None:
        log.warning("pusher on port %d can reach no puller: %s", self.port, error)
        self._failure = error
        self._waiter.changed()

    def _shortest_silence(self) -> float:
        # Floored so that a puller announcing a tiny heartbeat cannot make us spin.
        return max(min((k.silence for k in self._links.values()), default=1.0), 0.03)

    async def _from_puller(self, message: Message) -> None:
        key = (message.sender, message.source_port)
        link = self._links.get(key)
        try:
            frame = parse_frame_untrusted(message.data)
            if link is not None:
                if not self._heard(link, frame):
                    self._lose(link)
            elif frame.kind in (Kind.ACK, Kind.HEARTBEAT, Kind.BYE):
                pass  # on a link dropped already: the puller will link again
            elif (bye := _refusal(self.config, len(self._links),
                                  self._per_peer[message.sender])) is not None:
                self.refused += 1
                await _send_within(self.config.send_timeout, message.reply(bye))
            else:
                self._add(key, message.sender, message.reply, message.since_arrival, frame)
        except WireError as exc:
            self._malformed(message.sender, exc)
            if link is not None:
                self._lose(link)
        except PilotError as exc:
            log.info("puller %s port %d: %s", message.sender, self.port, exc)
