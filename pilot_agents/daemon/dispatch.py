"""The typed dispatch table: one handler per request model.

Most handlers answer once (a :data:`Reply`). An *immediate* handler (``stream_send``,
``reply``) is a plain function, so the server runs it as the request arrives, without a task of
its own: it returns the reply, or, when it must wait (a stream's send buffer is full), an
awaitable the server finishes in a task. A *delivery* handler (``deliver``) answers many
times: it is handed a :data:`Push` to send each message with, and the :class:`Credit` its
client grants, and returns the last reply when the delivery ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from .requests import BaseRequest

Reply = dict[str, Any]  # a JSON object: the fields of an ``{"ok": true, ...}`` reply
Push = Callable[[Reply], bool]  # sends one more reply to the request; False: it could not
R = TypeVar("R", bound=BaseRequest)
Handler = Callable[[BaseRequest], Awaitable[Reply]]
Immediate = Callable[[BaseRequest], "Reply | Awaitable[Reply]"]
Delivery = Callable[[BaseRequest, Push, "Credit"], Awaitable[Reply]]


class Credit:
    """What a client lets the daemon push to it before it grants more: a number of messages
    and of payload bytes (the last message may overshoot the bytes, as an inbox's does)."""

    def __init__(self, messages: int, size: int) -> None:
        self.messages = messages
        self.bytes = size
        self._waiter: asyncio.Future[None] | None = None

    def available(self) -> bool:
        return self.messages > 0 and self.bytes > 0

    def take(self, size: int) -> None:
        self.messages -= 1
        self.bytes -= size

    def grant(self, messages: int, size: int) -> None:
        self.messages += messages
        self.bytes += size
        if self._waiter is not None and not self._waiter.done() and self.available():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        while not self.available():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class DispatchTable:
    def __init__(self) -> None:
        self._handlers: dict[type[BaseRequest], Handler] = {}
        self._deliveries: dict[type[BaseRequest], Delivery] = {}
        self._immediates: dict[type[BaseRequest], Immediate] = {}

    def add(self, kind: type[R], handler: Callable[[R], Awaitable[Reply]]) -> None:
        self._check_new(kind)
        # Sound: __call__ only ever passes a handler requests of the type it was added for.
        self._handlers[kind] = cast(Handler, handler)

    def add_immediate(self, kind: type[R],
                      handler: Callable[[R], Reply | Awaitable[Reply]]) -> None:
        self._check_new(kind)
        self._immediates[kind] = cast(Immediate, handler)

    def add_delivery(self, kind: type[R],
                     handler: Callable[[R, Push, Credit], Awaitable[Reply]]) -> None:
        self._check_new(kind)
        self._deliveries[kind] = cast(Delivery, handler)

    def _check_new(self, kind: type[BaseRequest]) -> None:
        if kind in self._handlers or kind in self._deliveries or kind in self._immediates:
            raise ValueError(f"{kind.__name__} has a handler already")

    def kinds(self) -> set[type[BaseRequest]]:
        return set(self._handlers) | set(self._deliveries) | set(self._immediates)

    def delivers(self, request: BaseRequest) -> bool:
        return type(request) in self._deliveries

    def immediate(self, request: BaseRequest) -> Immediate | None:
        return self._immediates.get(type(request))

    async def __call__(self, request: BaseRequest) -> Reply:
        return await self._handlers[type(request)](request)

    async def deliver(self, request: BaseRequest, push: Push, credit: Credit) -> Reply:
        return await self._deliveries[type(request)](request, push, credit)
