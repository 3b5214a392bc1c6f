"""Messages waiting in the daemon for an IPC client, what it remembers of handed-out ones, and
the way back to the streams they came on.

Back-pressure: a pump moves messages from the Node into an :class:`Inbox` only while the inbox
has room (:meth:`Inbox.wait_for_room`, then take one message, then :meth:`Inbox.put` with no
wait in between). A full inbox therefore leaves messages in the Node, whose flow control credits
the sender only as messages are taken: the sender slows down, nothing is dropped, and the daemon
holds at most its bounds.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConnectionClosedError, PilotError, PilotTimeoutError
from ..node.connection import Message

Refuse = Callable[[list[Message]], None]  # tells the senders of messages nobody will read
Taker = Callable[[Message], bool]  # a delivery taking a message as it comes; False: not now


class Inbox:
    """Bounded by message count and payload bytes; messages handed out for acknowledgement
    (:meth:`hold`) count until :meth:`release`\\ d. Once :meth:`close`\\ d, what it held and
    whatever comes back to it is refused (``refuse``), never dropped unsaid."""

    def __init__(self, what: str, max_messages: int, max_bytes: int,
                 refuse: Refuse | None = None) -> None:
        self.what = what
        self._refuse = refuse
        self._closed = False
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: collections.deque[Message] = collections.deque()
        self._bytes = 0  # payload bytes of the items and of the held messages
        self._held = 0  # messages handed out and not yet acknowledged
        self._error: PilotError | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._takers: collections.deque[Taker] = collections.deque()
        self._returned: Callable[[Message], None] | None = None  # set by hand_over

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def held(self) -> int:
        return self._held

    def has_room(self) -> bool:
        return (len(self._items) + self._held < self.max_messages
                and self._bytes < self.max_bytes)

    def put(self, item: Message) -> None:
        """Append without waiting: the pump checked :meth:`has_room` before taking ``item``.
        With nothing queued, a delivery that can take it now (:meth:`add_taker`) gets it
        directly: no task of its own wakes to pass it on."""
        if self._closed:
            self._refused([item])
            return
        if not self._items and self._takers and self._hand(item):
            return
        self._items.append(item)
        self._bytes += len(item.data)
        self._wake()

    def offer(self, item: Message) -> bool:
        """Hand ``item`` to a delivery that takes it now, without it ever being queued: the
        Node offers each message as it arrives (``Listener.set_taker``), so no pump task wakes
        to move it. Only with nothing queued (order), and only while the inbox would still have
        room with it held (a delivery in ack mode holds it): a pump waiting for the Node's next
        message checked for room before it waited, and must not find less when it comes."""
        if self._closed or self._items or not self._takers:
            return False
        if self._held + 1 >= self.max_messages or self._bytes + len(item.data) >= self.max_bytes:
            return False
        return self._hand(item)

    def add_taker(self, take: Taker) -> None:
        self._takers.append(take)

    def remove_taker(self, take: Taker) -> None:
        self._takers.remove(take)

    def _hand(self, item: Message) -> bool:
        """The next taker in turn that takes ``item`` (several deliveries of one port share
        its messages)."""
        takers = self._takers
        for _ in range(len(takers)):
            take = takers.popleft()
            takers.append(take)
            if take(item):
                return True
        return False

    def push_front(self, item: Message) -> None:
        """A handed-out message comes back: it is the next one out."""
        if self._returned is not None:
            self._returned(item)
            return
        if self._closed:
            self._refused([item])
            return
        self._items.appendleft(item)
        self._bytes += len(item.data)
        self._wake()

    def hold(self, size: int) -> None:
        """A message of ``size`` bytes was handed out and awaits its ack: it keeps its room."""
        self._held += 1
        self._bytes += size

    def release(self, size: int) -> None:
        self._held -= 1
        self._bytes -= size
        self._wake()

    def fail(self, error: PilotError) -> None:
        """No more items will come: once empty, gets raise ``error``."""
        self._error = error
        self._wake()

    def close(self, error: PilotError) -> int:
        """Nobody will read this inbox again: gets raise ``error``, and the messages it holds
        are refused, as are those that come back to it later. Returns how many it held."""
        self._closed = True
        self.fail(error)
        items = self.drain()
        self._refused(items)
        return len(items)

    def _refused(self, items: list[Message]) -> None:
        if items and self._refuse is not None:
            self._refuse(items)

    def hand_over(self, returned: Callable[[Message], None]) -> list[Message]:
        """Another reader takes over (a stream's data socket): the messages waiting, in order,
        for it to send first. Nobody reads this inbox after it, so a handed-out message that
        comes back (a requeue, an ack that never came) goes to ``returned`` instead."""
        self._returned = returned
        return self.drain()

    def purge(self, unwanted: Callable[[Message], bool]) -> int:
        """Remove the waiting messages ``unwanted`` picks (from a peer no longer trusted); how
        many. Their senders are not told: they have no tunnel to be told on any more."""
        kept = collections.deque(m for m in self._items if not unwanted(m))
        purged = len(self._items) - len(kept)
        if purged:
            self._bytes -= sum(len(m.data) for m in self._items) - sum(len(m.data) for m in kept)
            self._items = kept
            self._wake()
        return purged

    def drain(self) -> list[Message]:
        """Every waiting message, removed (the daemon is stopping)."""
        items = list(self._items)
        self._items.clear()
        self._bytes -= sum(len(m.data) for m in items)
        return items

    async def wait_for_room(self) -> None:
        await self._wait(self.has_room, None)

    async def get(self, timeout: float | None) -> Message:
        if not await self._wait(self.ready, timeout):
            raise PilotTimeoutError(f"no message on {self.what} within {timeout:g} s")
        item = self.get_nowait()
        assert item is not None
        return item

    def ready(self) -> bool:
        """A get would return at once: a message is queued, or the inbox failed."""
        return bool(self._items) or self._error is not None

    def get_nowait(self) -> Message | None:
        """The next message, None if none is queued; the inbox's error once it failed and
        is empty."""
        if not self._items:
            if self._error is not None:
                raise self._error
            return None
        item = self._items.popleft()
        self._bytes -= len(item.data)
        self._wake()
        return item

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()``, looked at again whenever the inbox changes (or
        :meth:`changed` is called)."""
        await self._wait(ready, None)

    def changed(self) -> None:
        self._wake()

    async def _wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``ready()``; False if ``timeout`` seconds passed first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not ready():
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:
                if deadline is None:  # a deliver's wait: no timer to arm and disarm each time
                    await waiter
                else:
                    async with asyncio.timeout_at(deadline):
                        await waiter
            except TimeoutError:
                return ready()
            finally:
                self._waiters.discard(waiter)
        return True

    def _wake(self) -> None:
        """Something changed: every waiter looks again (getters and the pump alike)."""
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class WayBack(Protocol):
    """The stream a message came on, as far as a reply needs it (a Node's stream handle)."""

    @property
    def peer_id(self) -> str: ...

    @property
    def ended(self) -> bool: ...  # the Node forgot the stream: it closed or broke

    @property
    def error(self) -> PilotError | None: ...  # why it broke, if it did

    def write(self, payload: bytes) -> bool: ...  # sent; False: wait for room() before more

    @property
    def overshoot(self) -> int: ...  # bytes written past the bound since it last had room

    async def room(self, stall: float | None = None) -> None: ...

    def since_arrival(self) -> float | None: ...  # seconds since the peer's bytes last came

    def on_hangup(self, callback: Callable[[], object]) -> Callable[[], object]: ...


class ReplyPaths:
    """How to reply to a handed-out message: the way back of the stream it came on, one entry
    per stream however many messages it brings, found by a key that each message's id carries.

    Entries are held weakly, so a reply path lasts as long as its stream does, whatever else
    the daemon hands out meanwhile: the Node holds a stream's handle until the stream ends
    (closed, reset, its tunnel gone), and a message of it still queued or kept for ``requeue``
    keeps it a little longer (marked ended: a reply says so). So this holds at most one
    entry per stream the Node has open (at most ``TunnelConfig.max_incoming_streams`` per
    peer's tunnel, plus the IPC clients' ``connect`` streams) and per stream of a message the
    daemon still holds (within the inboxes' and the message memory's bounds)."""

    def __init__(self) -> None:
        # Keys of an earlier daemon (a client that outlived a restart) never name a new stream.
        self._run = secrets.token_hex(3)
        self._issued = 0
        self._keys: weakref.WeakKeyDictionary[WayBack, str] = weakref.WeakKeyDictionary()
        self._ways: weakref.WeakValueDictionary[str, WayBack] = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        return len(self._ways)

    def key(self, way: WayBack) -> str:
        """The key of ``way``'s stream: the same for all its messages."""
        key = self._keys.get(way)
        if key is None:
            self._issued += 1
            key = f"{self._run}-{self._issued}"
            self._keys[way] = key
            self._ways[key] = way
        return key

    def live(self, message_id: str) -> WayBack | None:
        """The way back for a message id while its stream lasts; None once it ended (or if
        there never was one)."""
        way = self._ways.get(message_id.partition(".")[2])
        return None if way is None or way.ended else way

    def find(self, message_id: str) -> WayBack:
        """The way back for a message id; ConnectionClosedError saying why there is none."""
        way = self.live(message_id)
        if way is not None:
            return way
        key = message_id.partition(".")[2]
        way = self._ways.get(key)
        run, _, number = key.partition("-")
        if way is not None or (
                run == self._run and number.isdigit() and 0 < int(number) <= self._issued):
            why = "" if way is None or way.error is None else f" ({way.error})"
            raise ConnectionClosedError(f"message {message_id!r} can no longer be replied to: "
                                        f"the stream it came on has ended{why}")
        raise ConnectionClosedError(
            f"message {message_id!r} can no longer be replied to: this daemon did not hand it "
            "out (message ids do not outlive a daemon restart)")


@dataclass
class Handed:
    """A message handed to a client, remembered by the id the client knows it by for
    ``requeue`` and ``ack``."""

    inbox: Inbox
    # The message itself while it may still go back to its inbox: until acked (ack mode), or
    # while the requeue budget has room for it.
    message: Message | None
    ack_timer: asyncio.TimerHandle | None = None  # ack mode: redelivers it when it fires

    @property
    def size(self) -> int:
        return 0 if self.message is None else len(self.message.data)


class MessageMemory:
    """Handed-out messages (the last ``limit``), for ``requeue`` and ``ack``: the payloads of
    the recent ones (at most ``requeue_bytes``), and those awaiting an ack (counted in their
    inbox, redelivered after ``ack_wait`` seconds). Replies do not depend on it
    (:class:`ReplyPaths`)."""

    def __init__(self, limit: int, requeue_bytes: int, ack_wait: float) -> None:
        self.limit = limit
        self.requeue_bytes = requeue_bytes
        self.ack_wait = ack_wait
        self._handed: collections.OrderedDict[str, Handed] = collections.OrderedDict()
        self._requeueable: collections.OrderedDict[str, Handed] = collections.OrderedDict()
        self._requeueable_bytes = 0
        self._count = 0

    @property
    def payload_bytes(self) -> int:
        """Payload bytes kept for requeue (acked-mode messages count in their inbox instead)."""
        return self._requeueable_bytes

    def remember(self, message: Message, inbox: Inbox, *, ack: bool, stream: str | None) -> str:
        """The message's id: ``m<n>``, then ``.<stream>``, the key of the stream it came on
        (none for a message that cannot be replied to)."""
        self._count += 1
        message_id = f"m{self._count}" if stream is None else f"m{self._count}.{stream}"
        handed = Handed(inbox, message)
        self._handed[message_id] = handed
        if ack:
            inbox.hold(handed.size)
            handed.ack_timer = asyncio.get_running_loop().call_later(
                self.ack_wait, self._ack_expired, message_id)
        else:
            self._requeueable[message_id] = handed
            self._requeueable_bytes += handed.size
            while self._requeueable_bytes > self.requeue_bytes:
                self._forget_payload(next(iter(self._requeueable)))
        while len(self._handed) > self.limit:
            oldest = next(iter(self._handed))
            if self._handed[oldest].ack_timer is not None:
                self.requeue(oldest)  # an unacked message goes back rather than vanish
            self._forget_payload(oldest)
            del self._handed[oldest]
        return message_id

    def ack(self, message_id: str) -> bool:
        """The client has the message: it will not come back. False if it was not awaiting one."""
        handed = self._handed.get(message_id)
        if handed is None or handed.ack_timer is None:
            return False
        handed.ack_timer.cancel()
        handed.ack_timer = None
        handed.inbox.release(handed.size)
        handed.message = None
        return True

    def requeue(self, message_id: str) -> bool:
        """Put a handed-out message back at the head of its inbox, if it still can be."""
        handed = self._handed.get(message_id)
        if handed is None or handed.message is None:
            return False
        message = handed.message
        if handed.ack_timer is not None:
            handed.ack_timer.cancel()
            handed.ack_timer = None
            handed.inbox.release(handed.size)
        else:
            self._forget_payload(message_id)
        handed.message = None
        handed.inbox.push_front(message)
        return True

    def forget_from(self, sender: str) -> int:
        """Handed-out messages of ``sender`` (no longer trusted) never come back, acked or
        not; how many were awaiting an ack."""
        forgotten = 0
        for message_id, handed in self._handed.items():
            if handed.message is None or handed.message.sender != sender:
                continue
            if handed.ack_timer is not None:
                handed.ack_timer.cancel()
                handed.ack_timer = None
                handed.inbox.release(handed.size)
                forgotten += 1
            self._forget_payload(message_id)
            handed.message = None
        return forgotten

    def awaits_ack(self, message_id: str) -> bool:
        """Handed out in ack mode and not acknowledged yet: it comes back unless acked."""
        handed = self._handed.get(message_id)
        return handed is not None and handed.ack_timer is not None

    def unacked(self) -> list[tuple[Inbox, Message]]:
        """Messages handed out and not acknowledged, oldest first (the daemon is stopping)."""
        return [(h.inbox, h.message) for h in self._handed.values()
                if h.ack_timer is not None and h.message is not None]

    def _ack_expired(self, message_id: str) -> None:
        handed = self._handed.get(message_id)
        if handed is not None:
            handed.ack_timer = None
            handed.inbox.release(handed.size)
            if handed.message is not None:
                handed.inbox.push_front(handed.message)
                handed.message = None

    def _forget_payload(self, message_id: str) -> None:
        handed = self._requeueable.pop(message_id, None)
        if handed is not None:
            self._requeueable_bytes -= handed.size
            handed.message = None
