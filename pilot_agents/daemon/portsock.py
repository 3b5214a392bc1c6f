"""A port's data socket (docs/ipc.md, A port's messages on a data socket): a listener's
connection to the stream socket that takes the port's messages, each tagged with its **way** (a
number for the peer's stream it came on), and carries the replies back. A message is a frame
out and a reply a frame in: no request, message id or task per message; credit the client
gives back (``taken``) bounds what is written to it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .. import ipc
from ..errors import BadRequestError, ConnectionClosedError, PilotError
from ..net.tunnel.config import SessionConfig
from ..node.connection import Message, StreamHandle
from .dispatch import Reply
from .hangup import hang_up
from .inbox import WayBack
from .messaging import Messaging, PortState
from .readhold import ReadHold

log = logging.getLogger("pilot_agents.daemon")

_NUMBERED = struct.Struct("!BI")  # a kind, then a way or a count
_REPLY = struct.Struct("!BIB")  # ... and a reply's flags
_CREDIT = struct.Struct("!BII")  # a kind, then messages and bytes
_CLOSE = bytes([ipc.PORT_CLOSE])
_SYNC = bytes([ipc.PORT_SYNC])
# Ways that ended are forgotten (and the client told) once this many more are known than were
# live at the last look: a look costs one pass over them, so on average a constant per way.
_PRUNE_SLACK = 64

# What the tunnel charges a message beside its payload (SessionConfig.message_overhead).
_MESSAGE_COST = SessionConfig().message_overhead


@dataclass(eq=False)
class _Way:
    back: WayBack
    owed: int = 0  # messages written to the client and not replied to
    confirming: int = 0  # replies whose 'confirmed' waits for the stream's room
    bounded: bool = False  # a reply on it asked to be bounded (see _stall)
    task: asyncio.Task[None] | None = None  # the one that waits for it
    unhook: Callable[[], object] | None = None  # undoes its on_hangup


class PortSocket:
    """One listener's data socket for a port, for as long as the connection lasts; it holds one
    of the port's listens."""

    def __init__(self, messaging: Messaging, state: PortState, transport: asyncio.Transport,
                 credit_messages: int, credit_bytes: int) -> None:
        self._messaging = messaging
        self._state = state
        self._inbox = state.inbox
        self._transport = transport
        # What the daemon holds written and not taken for one client is at most
        # max_payload_bytes (and one message), whatever credit the client gives: as much as it
        # lets a client leave unread on the requests' path.
        self._max_credit_bytes = messaging.ctx.options.max_payload_bytes
        # ... and as many messages as that many bytes are in the tunnel's reckoning, where
        # each costs message_overhead beside its payload: empty ones cost memory too.
        self._max_credit_messages = self._max_credit_bytes // _MESSAGE_COST
        self._credit_messages = min(credit_messages, self._max_credit_messages)
        self._credit_bytes = min(credit_bytes, self._max_credit_bytes)
        # Written and not reported taken, oldest first: they go back to the port on 'close'.
        self._written: collections.deque[Message] = collections.deque()
        self._written_bytes = 0
        self._numbers: dict[WayBack, int] = {}
        self._ways: dict[int, _Way] = {}
        self._issued = 0  # the last way number given out
        self._pruned_at = 0  # how many ways were live after the last pruning
        self._forwarding: asyncio.Task[None] | None = None
        self._room: asyncio.Task[None] | None = None  # reading stopped until a way has room
        # Not read while: a way's stream is too far over its bound ("room"), the client leaves
        # more answers unread than the messages its credit lets through can be ("unread"),
        # or for good ("stopped").
        # Unread: at most the credit's bytes of messages, and one more.
        self._hold = ReadHold(transport,
                              self._max_credit_bytes + messaging.ctx.options.max_payload_bytes)
        self._over = False  # closed, ended, or the client is gone
        self._hung_up = False  # the last frame is written

    # -- the connection's side (daemon/server.py's protocol calls these) -----------------------

    def start(self, pending: list[list[bytes]]) -> None:
        self._inbox.add_taker(self._take)
        self._state.attached.append(self)  # so that the port's close ends it (end)
        self._forwarding = asyncio.create_task(self._forward())
        self.received(pending)
        self._hold.release("start")

    def received(self, messages: list[list[bytes]]) -> None:
        try:
            for frames in messages:
                if self._over:
                    return  # the connection is over: what the client wrote meanwhile is moot
                self._handle(frames)
            self._hold.check_unread()  # syncs and arrivals it does not read the answers of
        except BadRequestError as exc:
            log.debug("data socket of port %d dropped: %s", self._state.port, exc)
            # Told why ('ended'; a reply over the limit read as the daemon gone), then as a
            # client that died: the streams it owed replies to are reset.
            self._write(ipc.DATA_ENDED, ipc.error_reply(exc))
            self.lost()
            self._hang_up()

    def end(self, error: PilotError) -> None:
        """The port closed (the daemon is stopping, or its last listen was undone): ``ended``,
        and the connection closes. Called as it closes: _forward, which saw the inbox fail
        on a later turn of the loop and only with credit left, missed it when the daemon
        stopped (its connections were closed first) or when the client had no credit."""
        if self._over:
            return
        self._write(ipc.DATA_ENDED, ipc.error_reply(error))
        self._stop()
        self._hang_up()

    def pause_writing(self) -> None:
        """Credit bounds the messages written; what is unread is checked as the client's
        messages are read."""

    def resume_writing(self) -> None:
        self._hold.drained()

    def lost(self) -> None:
        """The connection is gone without 'close' (the client died, or sent bad input): the
        streams it owed replies to are reset, so their requesters hear at once."""
        if self._over:
            return
        owed = [w.back for w in self._ways.values()
                if w.owed and isinstance(w.back, StreamHandle) and not w.back.ended]
        self._stop()
        if owed:
            self._messaging.ctx.node.abandon(
                owed, "the listener it was handed to went away without answering: the stream "
                      "was reset")
            log.info("a listener of port %d went away owing replies on %d streams: they were "
                     "reset", self._state.port, len(owed))

    # -- the port's messages --------------------------------------------------------------------

    def _has_credit(self) -> bool:
        return (len(self._written) < self._credit_messages
                and self._written_bytes < self._credit_bytes)

    def _take(self, message: Message) -> bool:
        """The inbox's message as it comes, written at once while the client has credit."""
        if self._over or not self._has_credit():
            return False
        self._write_message(message)
        return True

    async def _forward(self) -> None:
        """What the inbox queued meanwhile, whenever there is credit for it; and the port's
        end (the daemon is stopping, or the port was closed under the listener)."""
        inbox = self._inbox
        while True:
            await inbox.wait_until(lambda: inbox.ready() and self._has_credit())
            try:
                message = inbox.get_nowait()
            except PilotError as exc:  # the port closed (close_port ends us first: a fallback)
                self.end(exc)
                return
            if message is not None:
                self._write_message(message)

    def _write_message(self, message: Message) -> None:
        self._written.append(message)
        self._written_bytes += len(message.data)
        back = message.way_back
        number = None if back is None else self._numbers.get(back)
        new_way = None
        if number is not None:
            self._ways[number].owed += 1
            header = _NUMBERED.pack(ipc.PORT_MESSAGE, number)
        else:
            # A new way; a message that can't be replied to (one a previous daemon kept) gets
            # a number of its own that names no stream, so a reply to it fails.
            self._issued += 1
            number = self._issued
            if back is not None:
                self._numbers[back] = number
                self._ways[number] = new_way = _Way(back, owed=1)
                if len(self._ways) > self._pruned_at + _PRUNE_SLACK:
                    self._prune()
            sender = message.sender
            meta = {"from": sender, "hostname": self._messaging.ctx.label_or_none(sender),
                    "source_port": message.source_port}
            header = _NUMBERED.pack(ipc.PORT_MESSAGE, number) + ipc.compact_json(meta)
        self._transport.writelines(ipc.pack_frames([header, message.data]))
        if new_way is not None:  # after its message: the client knows the way it closes
            new_way.unhook = new_way.back.on_hangup(functools.partial(self._way_over, number))

    def _way_over(self, number: int) -> None:
        """The way's stream can carry no more replies: the client hears at once (a replier
        stops work nobody will read). One waiting for room hears from that wait instead,
        which tells the client why its reply failed."""
        way = self._ways.get(number)
        if way is not None and way.task is None:
            self._forget(number, ipc.PORT_WAY_CLOSED, _ended(way.back))

    def _prune(self) -> None:
        for number, way in list(self._ways.items()):
            if way.back.ended and way.task is None:
                self._forget(number, ipc.PORT_WAY_CLOSED, _ended(way.back))
        self._pruned_at = len(self._ways)

    # -- the client's messages ------------------------------------------------------------------

    def _handle(self, frames: list[bytes]) -> None:
        header = frames[0]
        kind = header[0]
        if kind == ipc.PORT_REPLY and len(frames) == 2 and len(header) == _REPLY.size:
            _, number, flags = _REPLY.unpack(header)
            if flags & ~(ipc.PORT_REPLY_CONFIRM | ipc.PORT_REPLY_BOUNDED):
                raise BadRequestError(f"a reply with unknown flags {flags:#04x}")
            self._reply(number, bool(flags & ipc.PORT_REPLY_CONFIRM), frames[1],
                        bool(flags & ipc.PORT_REPLY_BOUNDED))
        elif len(frames) != 1:
            raise BadRequestError(f"kind {kind:#04x} takes no payload frame")
        elif kind == ipc.PORT_TAKEN and len(header) == _NUMBERED.size:
            self._taken(_NUMBERED.unpack(header)[1])
        elif kind == ipc.PORT_CREDIT and len(header) == _CREDIT.size:
            self._credit(*_CREDIT.unpack(header)[1:])
        elif kind == ipc.PORT_ARRIVAL and len(header) == _NUMBERED.size:
            way = self._way(_NUMBERED.unpack(header)[1])
            since = None if way is None else way.back.since_arrival()
            self._write(ipc.PORT_ARRIVED, {"ok": True, "since": since})
        elif header == _SYNC:
            # Replies are handed to their streams as they are read: every one before is.
            self._write(ipc.PORT_SYNCED, {"ok": True})
        elif header == _CLOSE:
            self._close()
        else:
            raise BadRequestError(f"not a port data socket message: kind {kind:#04x} in "
                                  f"{len(frames)} frames (docs/ipc.md, Data sockets)")

    def _way(self, number: int) -> _Way | None:
        """The live way ``number``; None if it was given out and has since been forgotten;
        BadRequestError if it never was."""
        if not 0 < number <= self._issued:
            raise BadRequestError(f"way {number} was never given out on this socket")
        return self._ways.get(number)

    def _reply(self, number: int, confirm: bool, payload: bytes, bounded: bool) -> None:
        limit = self._messaging.ctx.options.max_payload_bytes
        if len(payload) > limit:
            raise BadRequestError(f"a reply of {len(payload)} bytes, more than the daemon's "
                                  f"limit of {limit}")
        way = self._way(number)
        if way is None:
            self._write_numbered(ipc.PORT_WAY_ENDED, number, ConnectionClosedError(
                "the stream the message came on has ended (or it could not be replied to)"))
            return
        way.bounded = way.bounded or bounded
        if confirm and way.confirming >= 2:
            # Refused before it is sent, as other bad input is: the reply must not go out
            # on a connection that is dropped for it.
            raise BadRequestError(f"a third reply awaiting confirmation on way {number}")
        if way.owed:
            way.owed -= 1
        try:
            room = way.back.write(payload)
        except PilotError as exc:
            self._forget(number, ipc.PORT_WAY_ENDED, self._messaging.explain_way(exc, way.back))
            return
        if way.back.overshoot > limit and self._room is None:
            # Replies go out over a stream's bound so that one slow requester holds up no
            # other, and a client that waits for its confirmations (the SDK) adds at most its
            # send window there. One that ignores them would grow the stream without bound:
            # it is held back instead, all its ways with it, until this one has room.
            self._hold.hold("room")
            self._room = asyncio.create_task(self._wait_for_room(way))
        if not confirm:
            return
        if room and not way.confirming:
            self._send(_NUMBERED.pack(ipc.PORT_CONFIRMED, number))
            return
        way.confirming += 1
        if way.task is None:
            way.task = asyncio.create_task(self._confirm(number, way))

    def _stall(self, way: _Way) -> float | None:
        """How long a way's replies wait for a peer that reads none of them: a replier's
        (bounded replies), the daemon's unread_replies_timeout; else as long as it takes (a
        publisher's, whose subscribers set its pace)."""
        return self._messaging.ctx.options.unread_replies_timeout if way.bounded else None

    async def _wait_for_room(self, way: _Way) -> None:
        with contextlib.suppress(PilotError):  # a stream that failed holds nothing back
            await way.back.room(self._stall(way))
        self._room = None
        self._hold.release("room")

    async def _confirm(self, number: int, way: _Way) -> None:
        """'confirmed' for each reply waiting for it, in order, as the stream has room."""
        try:
            while way.confirming:
                await way.back.room(self._stall(way))
                way.confirming -= 1
                self._send(_NUMBERED.pack(ipc.PORT_CONFIRMED, number))
        except PilotError as exc:
            self._forget(number, ipc.PORT_WAY_ENDED, self._messaging.explain_way(exc, way.back))
        finally:
            way.task = None

    def _taken(self, count: int) -> None:
        written = self._written
        if not 0 < count <= len(written):
            raise BadRequestError(f"'taken' of {count} messages, with {len(written)} written "
                                  "and not taken")
        had_credit = self._has_credit()
        for _ in range(count):
            self._written_bytes -= len(written.popleft().data)
        if not had_credit:
            self._inbox.changed()  # wakes _forward, now that there is credit

    def _credit(self, messages: int, size: int) -> None:
        """The client's credit from now on (0 stops writing); a smaller one than what it has
        been written and not taken only holds what comes next back until it takes more."""
        if messages > ipc.MAX_CREDIT_MESSAGES:
            raise BadRequestError(f"a credit of {messages} messages, over the limit of "
                                  f"{ipc.MAX_CREDIT_MESSAGES}")
        had_credit = self._has_credit()
        self._credit_messages = min(messages, self._max_credit_messages)
        self._credit_bytes = min(size, self._max_credit_bytes)
        if not had_credit and self._has_credit():
            self._inbox.changed()  # wakes _forward

    def _close(self) -> None:
        """The client stops reading: what it did not take goes back to the head of the port,
        oldest first, for its other readers; the replies it owes it chose not to send."""
        back = list(self._written)
        self._written.clear()
        self._stop()
        for message in reversed(back):
            self._inbox.push_front(message)
        self._write(ipc.DATA_CLOSED, {"ok": True})
        self._hang_up()

    # -- the end ----------------------------------------------------------------------------------

    def _forget(self, number: int, kind: int, error: PilotError) -> None:
        way = self._ways.pop(number, None)
        if way is not None:
            self._numbers.pop(way.back, None)
            if way.unhook is not None:
                way.unhook()
            if way.task is not None and way.task is not asyncio.current_task():
                way.task.cancel()
        self._write_numbered(kind, number, error)

    def _write_numbered(self, kind: int, number: int, error: PilotError) -> None:
        self._send(_NUMBERED.pack(kind, number) + ipc.compact_json(ipc.error_reply(error)))

    def _write(self, kind: int, reply: Reply) -> None:
        self._send(bytes([kind]) + ipc.compact_json(reply))

    def _send(self, header: bytes) -> None:
        if not self._hung_up and not self._transport.is_closing():
            self._transport.writelines(ipc.pack_frames([header]))

    def _hang_up(self) -> None:
        self._hung_up = True  # nothing may be written after it
        hang_up(self._transport)

    def _stop(self) -> None:
        """Take nothing more, and give back the port's listen."""
        self._over = True
        self._hold.hold("stopped")
        self._inbox.remove_taker(self._take)
        self._state.attached.remove(self)
        current = asyncio.current_task()
        for task in [self._forwarding, self._room, *(w.task for w in self._ways.values())]:
            if task is not None and task is not current:
                task.cancel()
        for way in self._ways.values():
            if way.unhook is not None:
                way.unhook()
        messaging, state = self._messaging, self._state
        if messaging.ports.get(state.port) is state:  # not closed (and listened on anew)
            messaging.release_port(state)


def _ended(back: WayBack) -> PilotError:
    why = "" if back.error is None else f" ({back.error})"
    return ConnectionClosedError(f"the stream the message came on has ended{why}")

