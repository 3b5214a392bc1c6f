"""Why a data socket's client is not read now: several reasons may hold at once (its stream is
over its bound, its answers go unread, the socket has stopped), and it is read again only once
none is left."""

from __future__ import annotations

import asyncio


class ReadHold:
    """The reasons for not reading a connection. It starts held for ``"start"``: the data socket
    reads once it has written what must come first. ``unread_room``: the most the client may
    leave unread, the messages written to it at their bound; more is answers it asked for and
    does not read (see :meth:`check_unread`)."""

    __slots__ = ("_reasons", "_transport", "_unread_room")

    def __init__(self, transport: asyncio.Transport, unread_room: int) -> None:
        self._transport = transport
        self._unread_room = unread_room
        self._reasons = {"start"}

    def check_unread(self) -> None:
        """After the client's messages were handled: a client that leaves more unread than
        ``unread_room`` is not read either until it has read (:meth:`drained`)."""
        if self._transport.get_write_buffer_size() > self._unread_room:
            self.hold("unread")

    def drained(self) -> None:
        """The client read what was written (the protocol's resume_writing)."""
        self.release("unread")

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
