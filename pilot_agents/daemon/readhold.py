"""Why a data socket's client is not read now: several reasons may hold at once (its stream is
over its bound, its answers go unread, the socket has stopped), and it is read again only once
none is left."""

from __future__ import annotations

import asyncio


class ReadHold:
    """The reasons for not reading a connection. It starts held for ``"start"``: the data socket
    reads once it has written what must come first."""

    __slots__ = ("_reasons", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._reasons = {"start"}

    def hold(self, reason: str) -> None:
        if not self._reasons and not self._transport.is_closing():
            self._transport.pause_reading()
        self._reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self._reasons:
            return
        self._reasons.remove(reason)
        if not self._reasons and not self._transport.is_closing():
            self._transport.resume_reading()
