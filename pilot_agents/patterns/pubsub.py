"""Publish/subscribe with topic prefixes over any :class:`~pilot_agents.transport.Transport`.

    async with Publisher(transport, 3001) as pub:
        await pub.publish("sales.q4", {"total": 1842})

    async with Subscriber(transport, "scraper", 3001, ["sales."]) as sub:
        async for publication in sub:
            print(publication.topic, publication.json(), publication.missed)

Subscriptions travel to the publisher (as with ZeroMQ's XPUB/XSUB), so a publication crosses the
network only to the trusted subscribers whose prefix matches its topic. Each subscriber has a
queue at the publisher, bounded in bytes; what happens when it is full is the publisher's
documented choice (:class:`Overflow`), and never a silent loss:

- ``BLOCK`` (the default): ``publish`` waits until every matching subscriber has room, so the
  slowest subscriber sets the pace (and the tunnel's flow control carries that back from a
  subscriber that stops reading); a publish called meanwhile waits behind it, even for
  subscribers with room, so that none overtakes another;
- ``DROP_OLDEST``: the oldest queued publications for that subscriber are dropped, and the next
  one it receives says how many it missed (:attr:`Publication.missed`).

A subscriber whose stream breaks (the publisher's node restarted, the tunnel closed) connects
again with backoff and subscribes again; the first publication after that has
:attr:`Publication.resumed` set, since what was published meanwhile never reached it.

A stream that sends a malformed frame is dropped: the publisher stops feeding that subscription,
the subscriber subscribes again on a new stream. A subscriber back on a new stream (same
subscription id) replaces its old subscription at once.

Delivery: in the order ``publish`` was called in, the same for every subscriber (concurrent
publishes too), at most once; none while a subscriber is reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, DaemonNotRunningError, PilotError, PilotTimeoutError, WireError
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
    HEADER_SIZE,
    MAX_BATCH_FRAMES,
    MAX_TOPIC,
    Kind,
    batch_entries_untrusted,
    encode_batch,
    encode_frame,
    encode_prefixes,
    encode_publication,
    note_malformed,
    parse_frame_untrusted,
    parse_prefixes_untrusted,
    parse_publication_untrusted,
)
from .shares import PerPeer, check_share, peer_share

log = logging.getLogger("pilot_agents.patterns.pubsub")
_PUBLISH = int(Kind.PUBLISH)
_BATCH = int(Kind.BATCH)
_GAP = int(Kind.GAP)


class Overflow(enum.Enum):
    BLOCK = "block"
    DROP_OLDEST = "drop-oldest"


@dataclass(frozen=True)
class PubSubConfig:
    overflow: Overflow = Overflow.BLOCK
    queue_bytes: int = 4 * 2**20  # per subscriber, at the publisher
    max_prefixes: int = 256  # per subscription
    max_prefix_bytes: int = 16 * 1024  # per subscription: its prefixes' UTF-8 bytes, summed
    max_subscribers: int = 1024  # per publisher; more are refused until one leaves
    # ... and per subscribing node (the clients of a daemon share theirs), so that one peer
    # cannot take every subscriber slot from the others. None: a quarter of max_subscribers
    # (256 of 1024), so that a max_subscribers set lower keeps a share below it.
    max_subscribers_per_peer: int | None = None
    reconnect_min: float = 0.2  # seconds a subscriber waits before connecting again; doubles
    reconnect_max: float = 10.0  # seconds, the cap of that doubling
    # Seconds a subscription may stay idle before the publisher says it is still there; a
    # subscriber that hears nothing for three of them subscribes again (the publisher may
    # have gone without a word: its process died while its daemon and tunnel lived on).
    heartbeat_interval: float = 5.0
    # The most bytes of a subscriber's queued publications that leave as one message (a
    # BATCH frame) when it has fallen behind; 0 sends each on its own.
    batch_bytes: int = 64 * 1024
    # Seconds a subscriber waits for the publisher's node when it subscribes (again).
    connect_timeout: float = CONNECT_TIMEOUT

    def __post_init__(self) -> None:
        bounds = (self.queue_bytes, self.max_prefixes, self.max_prefix_bytes, self.max_subscribers)
        if min(bounds) < 1:
            raise ConfigError("PubSubConfig bounds must be at least 1")
        check_share(self, "max_subscribers", "max_subscribers_per_peer")
        if self.batch_bytes < 0:
            raise ConfigError("PubSubConfig.batch_bytes must be 0 or more")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("PubSubConfig: need 0 < reconnect_min <= reconnect_max")
        if self.heartbeat_interval <= 0:
            raise ConfigError("PubSubConfig.heartbeat_interval must be positive")
        if self.connect_timeout <= 0:
            raise ConfigError("PubSubConfig.connect_timeout must be positive")

    @property
    def subscribers_per_peer(self) -> int:
        """The subscriptions of one node a publisher takes at once:
        ``max_subscribers_per_peer``, or a quarter of ``max_subscribers``."""
        return peer_share(self.max_subscribers_per_peer, self.max_subscribers, 4)


@dataclass
class Publication(Payload):
    topic: str
    data: bytes
    sender: str  # the publisher's node id
    missed: int = 0  # publications dropped for us just before this one (DROP_OLDEST)
    resumed: bool = False  # the first after a reconnection: some may have been published


def _topic_bytes(topic: str) -> bytes:
    raw = topic.encode("utf-8")
    if len(raw) > MAX_TOPIC:
        raise ConfigError(f"topic of {len(raw)} bytes: at most {MAX_TOPIC}")
    return raw


@dataclass
class _Subscription:
    """One subscriber, as the publisher keeps it: its prefixes and its bounded queue."""

    sender: str
    id: int  # the subscriber's name for it, the same on every stream it subscribes on
    source_port: int  # its stream's port at the subscriber: names the stream
    prefixes: tuple[bytes, ...]
    way_back: Message  # its SUBSCRIBE message: replies go back on its stream
    queue: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0
    dropped: int = 0
    room: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False

    def matches(self, topic: bytes) -> bool:
        return topic.startswith(self.prefixes)  # one call: the prefixes are a tuple


class Publisher:
    """Publications on ``port`` to the subscribers that want their topic."""

    def __init__(self, transport: Transport, port: int,
                 config: PubSubConfig | None = None) -> None:
        self._transport = transport
        self.port = port
        self.config = config or PubSubConfig()
        self._listener: Listener | None = None
        self._subscriptions: dict[tuple[str, int], _Subscription] = {}  # by (sender, its id)
        self._by_stream: dict[tuple[str, int], _Subscription] = {}  # by (sender, source port)
        self._per_peer = PerPeer()  # subscriptions, by subscriber
        self._tasks: set[asyncio.Task[None]] = set()
        # Publishes waiting for room (BLOCK), or for their turn behind one that does: while
        # there is one, each publish takes its turn, so none overtakes another.
        self._waiting = 0
        self._turn = asyncio.Lock()
        self.malformed = 0
        self.refused = 0
        self.batches = 0  # messages that carried several frames to a subscriber behind

    async def __aenter__(self) -> Publisher:
        # Exclusive: a subscription is a stream, every frame of which must come here; through
        # a daemon another listener of the port would take some (and two publishers on one
        # port would each hear half of every subscriber).
        self._listener = self._transport.listen(self.port, exclusive=True)
        await self._listener.__aenter__()
        self._spawn(self._accept(self._listener))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    async def publish(self, topic: str, data: object) -> int:
        """Queue ``data`` under ``topic`` for every matching subscriber; how many that was."""
        if self._listener is None:
            raise ConfigError("the publisher is not open (use 'async with')")
        raw_topic = _topic_bytes(topic)
        # The header and topic first, then the data: its bytes are copied once.
        frame = encode_frame(Kind.PUBLISH, 0, encode_publication(raw_topic, b"")) + encode_payload(
            data)
        size, limit = len(frame), self.config.queue_bytes
        matching = [s for s in self._subscriptions.values() if raw_topic.startswith(s.prefixes)]
        for index, sub in enumerate(matching):
            if self._waiting or sub.queued_bytes + size > limit or sub.gone:
                await self._enqueue_in_turn(matching[index:], frame)
                break
            sub.queue.append(frame)  # room, and no publish before this one waits
            sub.queued_bytes += size
            sub.ready.set()
        return len(matching)

    async def drain(self, timeout: float, poll_interval: float = 0.01) -> None:
        """Wait until every subscriber's queue is empty and its last publication handed to the
        transport, so a ``close`` that follows loses none; :class:`PilotTimeoutError` after
        ``timeout`` seconds, naming how many are still queued. A subscriber that leaves
        meanwhile takes its queue with it (at most once). Polls every ``poll_interval`` seconds:
        the feeds signal room, not completion."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # A feed clears `ready` only once it finds its queue empty after its last send.
            busy = [s for s in self._subscriptions.values()
                    if s.queue or s.dropped or s.ready.is_set()]
            if not busy:
                return
            if loop.time() >= deadline:
                queued = sum(len(s.queue) for s in busy)  # besides one being sent to each
                raise PilotTimeoutError(
                    f"publisher port {self.port}: {queued} publications still queued for "
                    f"{len(busy)} subscribers after {timeout:g} s")
            await asyncio.sleep(poll_interval)

    async def close(self) -> None:
        """Stop; each subscriber is told, so it subscribes again at once rather than after
        its heartbeat timeout."""
        listener, self._listener = self._listener, None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        subscriptions, self._subscriptions = list(self._subscriptions.values()), {}
        self._by_stream.clear()
        self._per_peer.clear()
        # At once, within a second in all: one by one, each subscriber whose stream is full
        # would hold close() a second (with a thousand of them, a quarter of an hour).
        bye = encode_frame(Kind.BYE, 0, b"")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(*(sub.way_back.reply(bye) for sub in subscriptions),
                                     return_exceptions=True)
        if listener is not None:
            await listener.close()

    async def _enqueue_in_turn(self, subs: list[_Subscription], frame: bytes) -> None:
        """Queue ``frame`` for ``subs`` after every publish waiting before this one. Had each
        waited on its own, a later publish could reach a subscriber first (one that fits where
        an earlier one does not yet, or one for subscribers an earlier one has not reached), and
        subscribers would see different orders. A publish that finds none waiting takes the
        turn at once (``publish`` queued ``frame`` for the subscribers before ``subs`` without
        waiting), so no later publication reaches those first either."""
        self._waiting += 1
        try:
            async with self._turn:  # FIFO: a publish called later cannot take it first
                for sub in subs:
                    await self._enqueue(sub, frame)
        finally:
            self._waiting -= 1

    async def _enqueue(self, sub: _Subscription, frame: bytes) -> None:
        limit = self.config.queue_bytes
        if self.config.overflow is Overflow.BLOCK:
            while sub.queued_bytes and sub.queued_bytes + len(frame) > limit and not sub.gone:
                sub.room.clear()
                await sub.room.wait()
        else:
            while sub.queue and sub.queued_bytes + len(frame) > limit:
                sub.queued_bytes -= len(sub.queue.popleft())
                sub.dropped += 1
        if sub.gone:
            return
        sub.queue.append(frame)
        sub.queued_bytes += len(frame)
        sub.ready.set()

    async def _accept(self, listener: Listener) -> None:
        try:
            while True:
                self._take(await listener.receive(timeout=None))
        except PilotError as exc:  # the transport went away (its daemon stopped)
            log.warning("publisher port %d takes no more subscriptions: %s", self.port, exc)

    def _take(self, message: Message) -> None:
        stream = (message.sender, message.source_port)
        try:
            frame = parse_frame_untrusted(message.data)
            if frame.kind != Kind.SUBSCRIBE:
                raise WireError(f"a {frame.kind.name} frame sent to a publisher")
            prefixes = parse_prefixes_untrusted(frame.payload, self.config.max_prefixes)
            raw = tuple(p.encode() for p in prefixes)
            if sum(map(len, raw)) > self.config.max_prefix_bytes:
                raise WireError(f"prefixes of more than {self.config.max_prefix_bytes} bytes")
            on_stream = self._by_stream.get(stream)
            if on_stream is not None and on_stream.id != frame.id:
                # One stream, one feed: a second would send each publication twice on it, and
                # one stream could take every subscriber slot.
                raise WireError("a second subscription on one stream")
        except WireError as exc:
            self.malformed += 1
            note_malformed(log, self.malformed, "%s sent publisher port %d a malformed frame: %s",
                           message.sender, self.port, exc)
            # Whatever that stream subscribed to, it speaks garbage now: no more publications.
            self._retire(self._by_stream.get(stream))
            return
        key = (message.sender, frame.id)
        known = self._subscriptions.get(key)
        if known is not None and known.source_port == message.source_port:
            known.prefixes = raw  # a new SUBSCRIBE on the same stream replaces the prefixes
            return
        # The same subscriber on a new stream: the old one broke (or is breaking) and is done.
        self._retire(known)
        config = self.config
        if (len(self._subscriptions) >= config.max_subscribers
                or self._per_peer[message.sender] >= config.subscribers_per_peer):
            # Not told: it hears nothing, and subscribes again after three heartbeats.
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # 1, 2, 4...: no log flood
                log.warning("publisher port %d refused a subscription of %s (%d subscribers, "
                            "%d of them its; %d refused so far)", self.port, message.sender,
                            len(self._subscriptions), self._per_peer[message.sender],
                            self.refused)
            return
        sub = _Subscription(message.sender, frame.id, message.source_port, raw, message)
        self._subscriptions[key] = self._by_stream[stream] = sub
        self._per_peer.add(message.sender)
        self._spawn(self._feed(sub))

    def _retire(self, sub: _Subscription | None) -> None:
        """Stop feeding ``sub``: its feed ends and a publish waiting for its room goes on."""
        if sub is None or sub.gone:
            return
        sub.gone = True
        sub.room.set()
        sub.ready.set()
        if self._subscriptions.get((sub.sender, sub.id)) is sub:
            del self._subscriptions[sub.sender, sub.id]
            self._per_peer.remove(sub.sender)
        if self._by_stream.get((sub.sender, sub.source_port)) is sub:
            del self._by_stream[sub.sender, sub.source_port]

    async def _feed(self, sub: _Subscription) -> None:
        """Send one subscriber's queue down its stream, in order, until the stream breaks or
        the subscription is retired."""
        heartbeat = encode_frame(Kind.HEARTBEAT, 0, b"")
        try:
            while not sub.gone:
                if not sub.queue and not sub.dropped:
                    # Idle: wait for a publication, or say we are alive. The heartbeat's timer
                    # is armed only here, not for each publication (it cost a fifth of the CPU
                    # of one).
                    sub.ready.clear()
                    try:
                        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                        # that comes as the event is set, and close() would wait a heartbeat.
                        async with asyncio.timeout(self.config.heartbeat_interval):
                            await sub.ready.wait()
                    except TimeoutError:
                        await sub.way_back.reply(heartbeat)
                    continue
                await sub.way_back.reply(self._next_message(sub))
        except PilotError as exc:
            log.info("subscriber %s left publisher port %d: %s", sub.sender, self.port, exc)
        finally:
            if self._listener is not None:  # close() forgets every subscription itself
                self._retire(sub)
            sub.gone = True
            sub.room.set()

    def _next_message(self, sub: _Subscription) -> bytes:
        """What ``sub`` is sent next: its first queued publication, or a BATCH of those that
        fit in ``batch_bytes`` (a GAP first if publications were dropped before them)."""
        frames = [encode_frame(Kind.GAP, sub.dropped, b"")] if sub.dropped else []
        sub.dropped = 0
        size, limit = 0, self.config.batch_bytes
        queue = sub.queue
        while queue and len(frames) < MAX_BATCH_FRAMES and (
                not size or size + len(queue[0]) <= limit):
            frame = queue.popleft()
            size += len(frame)
            frames.append(frame)
        sub.queued_bytes -= size
        sub.room.set()
        if len(frames) == 1:
            return frames[0]
        self.batches += 1
        return encode_batch(frames)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Subscriber:
    """Publications from the publisher on ``port`` of ``peer`` whose topic starts with one of
    ``prefixes`` (``[""]``: all). Subscribes again by itself when its stream breaks, while the
    application is receiving (no task runs behind its back: a subscriber nobody reads from
    holds nothing but its stream). Open it once the publisher runs; if it is not running yet,
    the first ``receive`` subscribes again until it is."""

    def __init__(self, transport: Transport, peer: str, port: int, prefixes: list[str],
                 config: PubSubConfig | None = None) -> None:
        self._transport = transport
        self.peer = peer
        self.port = port
        self.config = config or PubSubConfig()
        if len(prefixes) > self.config.max_prefixes:
            raise ConfigError(f"{len(prefixes)} prefixes: at most {self.config.max_prefixes}")
        size = sum(len(_topic_bytes(prefix)) for prefix in prefixes)
        if size > self.config.max_prefix_bytes:
            # The publisher would take the SUBSCRIBE for garbage and never answer it.
            raise ConfigError(f"prefixes of {size} bytes in all: at most "
                              f"{self.config.max_prefix_bytes} (PubSubConfig.max_prefix_bytes)")
        self.prefixes = list(prefixes)
        # Names this subscription at the publisher: one node may hold several.
        self._id = secrets.randbits(63)
        self._conn: Connection | None = None
        self._closed = False
        self._closing = asyncio.Event()  # ends a receive's pause before it subscribes again
        self._missed = 0
        self._resumed = False
        self._stream_done = False  # BYE, or garbage: subscribe again on a new stream
        self._batched: deque[Publication] = deque()  # the rest of a BATCH, to hand out first
        # Grows while subscribing again leads nowhere (the port is closed, the stream is reset
        # at once); back to reconnect_min when the publisher is heard from.
        self._backoff = self.config.reconnect_min
        self._heard = 0.0  # the loop's clock: when the publisher last said anything
        self.reconnections = 0
        self.malformed = 0

    async def __aenter__(self) -> Subscriber:
        await self._connect(self.config.connect_timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        self._closing.set()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(PilotError):
                await conn.abort()

    async def receive(self, timeout: float | None = DEFAULT_TIMEOUT) -> Publication:
        """The next publication; :class:`PilotTimeoutError` after ``timeout`` seconds."""
        if self._batched and not self._closed:  # the rest of a batch, without the loop's time
            return self._batched.popleft()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._closed:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            if self._conn is None:
                await self._reconnect(deadline)
                continue
            # Silent since it was last heard from, over any number of receive calls: a
            # subscriber that polls with short timeouts still notices a publisher gone.
            silence = 3 * self.config.heartbeat_interval
            gone_at = self._heard + silence
            wait = gone_at - loop.time()
            if remaining is not None and remaining < wait:
                wait = remaining
            try:
                message = await self._conn.receive(max(wait, 0.0))
            except PilotTimeoutError:
                if loop.time() < gone_at:
                    break  # the caller's deadline came first
                since = await self._since_arrival()
                if since is not None and since < silence:
                    self._heard = loop.time() - since  # a long publication, still arriving
                    continue
                log.info("no word from %s port %d for %.0f s; subscribing again", self.peer,
                         self.port, silence)
                await self._drop_connection()
                continue
            except DaemonNotRunningError:
                raise  # our own daemon is gone, not the stream: no subscribing again
            except PilotError as exc:
                log.info("subscription to %s port %d broke (%s); reconnecting", self.peer,
                         self.port, exc)
                await self._drop_connection()
                continue
            self._heard = loop.time()
            publication = self._read(message)
            if publication is not None:
                return publication
            if self._stream_done:
                self._stream_done = False
                await self._drop_connection()
        if self._closed:
            raise ConfigError("the subscriber is closed")
        raise PilotTimeoutError(f"no publication from {self.peer} port {self.port} "
                                f"within {timeout} s")

    async def _since_arrival(self) -> float | None:
        """Seconds since bytes of the subscription's stream last arrived; None if never, or
        if the stream is gone (the receive that follows says how)."""
        assert self._conn is not None
        try:
            return await self._conn.since_arrival()
        except DaemonNotRunningError:
            raise
        except PilotError:
            return None

    def __aiter__(self) -> AsyncIterator[Publication]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Publication]:
        while not self._closed:
            try:
                publication = await self.receive(timeout=None)
            except ConfigError:
                if self._closed:  # closed while it waited: the iteration ends
                    return
                raise
            yield publication

    def _read(self, message: Message) -> Publication | None:
        data = message.data
        try:
            if len(data) >= HEADER_SIZE and data[0] == _PUBLISH:  # the usual one: in place
                topic, body = parse_publication_untrusted(data, HEADER_SIZE)
                return self._publication(topic, body, message.sender)
            if len(data) >= HEADER_SIZE and data[0] == _BATCH:
                self._read_batch(data, message.sender)
                return self._batched.popleft() if self._batched else None
            frame = parse_frame_untrusted(data)
            if frame.kind == Kind.GAP:
                self._missed += frame.id
                return None
            if frame.kind == Kind.HEARTBEAT:
                self._backoff = self.config.reconnect_min
                return None
            if frame.kind == Kind.BYE:
                self._stream_done = True  # an orderly close: subscribe again (backoff)
                return None
            raise WireError(f"a {frame.kind.name} frame sent to a subscriber")
        except WireError as exc:
            self.malformed += 1
            note_malformed(log, self.malformed, "%s port %d sent a malformed publication: %s",
                           self.peer, self.port, exc)
            self._stream_done = True  # not a publisher we understand: a new stream, after a pause
            return None

    def _read_batch(self, data: bytes, sender: str) -> None:
        """Queue a BATCH's publications; its GAPs count as missed for the one after them.
        Checked whole before any is queued, so a malformed batch delivers none of it."""
        entries = batch_entries_untrusted(data)
        items: list[tuple[str, bytes] | int] = []
        for start, stop in entries:
            kind = data[start]
            if kind == _PUBLISH:
                items.append(parse_publication_untrusted(data, start + HEADER_SIZE, stop))
            elif kind == _GAP:
                items.append(parse_frame_untrusted(data[start:stop]).id)
            else:
                raise WireError(f"a batched frame of kind {kind}, not PUBLISH or GAP")
        for item in items:
            if isinstance(item, int):
                self._missed += item
            else:
                self._batched.append(self._publication(*item, sender))

    def _publication(self, topic: str, data: bytes, sender: str) -> Publication:
        self._backoff = self.config.reconnect_min
        publication = Publication(topic, data, sender, self._missed, self._resumed)
        self._missed, self._resumed = 0, False
        return publication

    async def _connect(self, timeout: float) -> None:
        conn = self._transport.connect(self.peer, self.port, timeout)
        await conn.__aenter__()
        try:
            await conn.send(encode_frame(Kind.SUBSCRIBE, self._id,
                                         encode_prefixes(self.prefixes)))
            if self._closed:  # close() came meanwhile: this stream is nobody's
                raise ConfigError("the subscriber is closed")
        except BaseException:
            with contextlib.suppress(PilotError):
                await conn.abort()
            raise
        self._conn = conn
        self._heard = asyncio.get_running_loop().time()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(PilotError):
                await conn.abort()

    async def _reconnect(self, deadline: float | None) -> None:
        """Subscribe again after a pause that doubles while attempts lead nowhere."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            pause = self._backoff
            if deadline is not None:
                pause = min(pause, max(deadline - loop.time(), 0.0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._closing.wait()
            self._backoff = min(self._backoff * 2, self.config.reconnect_max)
            if deadline is not None and loop.time() >= deadline:
                return
            if self._closed:
                return
            try:
                limit = self.config.connect_timeout
                await self._connect(limit if deadline is None
                                    else min(limit, deadline - loop.time()))
            except DaemonNotRunningError:
                raise
            except PilotError as exc:
                log.info("subscribing to %s port %d again failed: %s", self.peer, self.port,
                         exc)
                continue
            self.reconnections += 1
            self._resumed = True
            return
