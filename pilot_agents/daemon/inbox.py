"""Messages waiting in the daemon for an IPC client, and what it remembers of handed-out ones."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import PilotError, PilotTimeoutError
from ..node.connection import Message


class Inbox:
    """Messages waiting for an IPC client, bounded: a full inbox stops its pump, which stops
    crediting the tunnel, which slows the sender (no message is ever dropped here)."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        self._items: collections.deque[Message] = collections.deque()
        self._cond = asyncio.Condition()
        self._error: PilotError | None = None

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Message) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: len(self._items) < self.limit)
            self._items.append(item)
            self._cond.notify_all()

    async def push_front(self, item: Message) -> None:
        async with self._cond:
            self._items.appendleft(item)
            self._cond.notify_all()

    async def fail(self, error: PilotError) -> None:
        """No more items will come: once empty, gets raise ``error``."""
        async with self._cond:
            self._error = error
            self._cond.notify_all()

    async def get(self, timeout: float | None) -> Message:
        async with self._cond:
            try:
                async with asyncio.timeout(timeout):
                    await self._cond.wait_for(lambda: bool(self._items) or self._error is not None)
            except TimeoutError:
                raise PilotTimeoutError(f"no message on {self.what} within {timeout:g} s") from None
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            assert self._error is not None
            raise self._error


ReplyFunction = Callable[[bytes], Awaitable[None]]


@dataclass
class Remembered:
    """A message handed to a client: how to reply to it and where to put it back."""

    message: Message
    inbox: Inbox
    reply: ReplyFunction


class MessageMemory:
    """The last ``limit`` handed-out messages by the id their client knows them by."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._messages: collections.OrderedDict[str, Remembered] = collections.OrderedDict()
        self._count = 0

    def remember(self, message: Message, inbox: Inbox, reply: ReplyFunction) -> str:
        self._count += 1
        message_id = f"m{self._count}"
        self._messages[message_id] = Remembered(message, inbox, reply)
        while len(self._messages) > self.limit:
            self._messages.popitem(last=False)
        return message_id

    def get(self, message_id: str) -> Remembered | None:
        return self._messages.get(message_id)

    def pop(self, message_id: str) -> Remembered | None:
        return self._messages.pop(message_id, None)
