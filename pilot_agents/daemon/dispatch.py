"""The typed dispatch table: one handler per request model."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from .requests import BaseRequest

Reply = dict[str, Any]  # a JSON object: the fields of an ``{"ok": true, ...}`` reply
R = TypeVar("R", bound=BaseRequest)


class DispatchTable:
    def __init__(self) -> None:
        self._handlers: dict[type[BaseRequest], Callable[[BaseRequest], Awaitable[Reply]]] = {}

    def add(self, kind: type[R], handler: Callable[[R], Awaitable[Reply]]) -> None:
        if kind in self._handlers:
            raise ValueError(f"{kind.__name__} has a handler already")
        # Sound: __call__ only ever passes a handler requests of the type it was added for.
        self._handlers[kind] = cast(Callable[[BaseRequest], Awaitable[Reply]], handler)

    def kinds(self) -> set[type[BaseRequest]]:
        return set(self._handlers)

    async def __call__(self, request: BaseRequest) -> Reply:
        return await self._handlers[type(request)](request)
