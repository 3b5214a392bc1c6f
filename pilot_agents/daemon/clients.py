"""What the daemon keeps on behalf of each client of its stream socket, undone when the client
goes away without a word (its process killed): a client that dies must not leave a peer waiting
for replies it can no longer send, nor a port listened on for nobody (issue #13: a replier that
dies mid-request gives the requester an error, never a hang).

Only the stream socket tells the daemon that a client is gone (its connection drops); ZeroMQ
says nothing of a peer's death, so a ZeroMQ client's holdings stay as they are
(docs/ipc.md, A client that dies)."""

from __future__ import annotations

import collections
import logging
import weakref
from dataclasses import dataclass, field

from ..node.connection import StreamHandle
from .inbox import WayBack
from .messaging import Messaging, PortState
from .requests import AckRequest, ReplyRequest, RequeueRequest

# What settles a message a client was handed: an answer, giving it back, or an acknowledgement.
Settling = ReplyRequest | RequeueRequest | AckRequest

log = logging.getLogger("pilot_agents.daemon")


@dataclass
class _Holdings:
    # Per stream: how many of its messages the client was handed and has neither replied to
    # nor given back. Weak, so that a client reading many streams and answering none holds
    # an entry per stream still open, not per message.
    owed: weakref.WeakKeyDictionary[WayBack, int] = field(
        default_factory=weakref.WeakKeyDictionary)
    # The streams it opened ('connect'): aborted if it dies. Ids of streams that ended are
    # pruned once there are twice as many as may be open.
    streams: dict[str, None] = field(default_factory=dict)
    # Its 'listen's not undone, by port: a count, however many times it listens.
    ports: collections.Counter[PortState] = field(default_factory=collections.Counter)
    # Messages pushed in ack mode and neither acknowledged nor given back, oldest first: they
    # go back to their inboxes as soon as the client dies (ack_wait is for a client that lives
    # on and forgets). Ids that expired meanwhile stay until the next pruning.
    unacked: dict[str, None] = field(default_factory=dict)


class Clients:
    def __init__(self, messaging: Messaging) -> None:
        self._messaging = messaging
        self._clients: dict[bytes, _Holdings] = {}

    def __len__(self) -> int:
        return len(self._clients)

    def handed(self, client: bytes, message_id: str) -> None:
        """A delivery pushed a message to ``client``."""
        messaging = self._messaging
        # One in ack mode comes back to its inbox unless acknowledged: a client that dies
        # loses nothing, and its stream must stay for whoever gets it next.
        memory = messaging.memory
        if memory.awaits_ack(message_id):
            unacked = self._holdings(client).unacked
            unacked[message_id] = None
            # The memory holds at most `limit` ids awaiting an ack, so pruning at twice that
            # keeps this bounded at a cost per message that stays constant on average.
            if len(unacked) > 2 * memory.limit:
                for stale in [i for i in unacked if not memory.awaits_ack(i)]:
                    del unacked[stale]
            return
        way = messaging.replies.live(message_id)
        if way is not None:
            owed = self._holdings(client).owed
            owed[way] = owed.get(way, 0) + 1

    def settled(self, client: bytes, request: Settling) -> None:
        """``client`` replied to a message or gave it back (requeue): it owes its sender no
        answer. Or it acknowledged it, or gave it back: it is not put back when the client
        dies. Answers are counted per stream, not per message: a client that replies to one
        message many times (a publisher to a subscription) may settle its stream's others
        early, which only spares that stream a reset."""
        holdings = self._clients.get(client)
        if holdings is None:
            return
        message_id = request.message
        if not isinstance(request, ReplyRequest):
            holdings.unacked.pop(message_id, None)
            if isinstance(request, AckRequest):
                return
        way = self._messaging.replies.live(message_id)
        if way is None:
            return
        owed = holdings.owed.get(way, 0)
        if owed > 1:
            holdings.owed[way] = owed - 1
        elif owed == 1:
            del holdings.owed[way]

    def connected(self, client: bytes, stream_id: str) -> None:
        streams = self._holdings(client).streams
        streams[stream_id] = None
        live = self._messaging.streams
        if len(streams) > 2 * self._messaging.ctx.options.max_streams:
            for ended in [s for s in streams if s not in live]:
                del streams[ended]

    def listened(self, client: bytes, port: int) -> None:
        state = self._messaging.ports.get(port)
        if state is not None:
            self._holdings(client).ports[state] += 1

    def unlistened(self, client: bytes, port: int) -> None:
        """``client`` undid a listen: one of its own, if it has one on the port (an unlisten
        of another's, as 'pilotctl unlisten' is, only lowers the port's count)."""
        holdings = self._clients.get(client)
        if holdings is None:
            return
        ports = holdings.ports
        for state, count in ports.items():
            if state.port == port:
                if count > 1:
                    ports[state] = count - 1
                else:
                    del ports[state]
                return

    def leaving(self, client: bytes) -> None:
        """``client`` said it is closing: a reply it did not send is one it chose not to (a
        listener of one-way messages sends none; a replier answers what it gives up on with
        an error), so its streams are not reset when it goes."""
        holdings = self._clients.get(client)
        if holdings is not None:
            holdings.owed.clear()
            # Nor are the streams it left open aborted: what it sent on them may still be on
            # its way. They end when closed, or idle (stream_idle_timeout).
            holdings.streams.clear()

    def gone(self, client: bytes) -> None:
        """``client`` went away: put the messages it had not acknowledged back in their
        inboxes (at least once: another reader gets them now), reset the streams of the
        messages it owed (their senders hear at once, as if its node had died: at most once,
        nobody else will answer them), reset the streams it opened and left (unless it said
        bye), and release the ports it listened on (the last closes a port, and its senders
        hear PortClosedError)."""
        holdings = self._clients.pop(client, None)
        if holdings is None:
            return
        messaging = self._messaging
        # Newest first: each goes to the head of its inbox, so the oldest ends up first again.
        back = sum(messaging.memory.requeue(message_id)
                   for message_id in reversed(holdings.unacked))
        if back:
            log.info("a client went away with %d messages unacknowledged: they were requeued",
                     back)
        ways = [way for way in list(holdings.owed.keys())
                if isinstance(way, StreamHandle) and not way.ended]
        if ways:
            messaging.ctx.node.abandon(ways, "the client it was handed to went away without "
                                             "answering: the stream was reset")
            log.info("a client went away owing replies on %d streams: they were reset",
                     len(ways))
        orphans = [stream for stream_id in holdings.streams
                   if (stream := messaging.streams.get(stream_id)) is not None
                   and stream.attached is None]  # (a data socket's end is the data socket's)
        for stream in orphans:
            messaging.drop_stream(stream, abort=True)
        if orphans:
            log.info("a client went away with %d streams open: they were reset", len(orphans))
        for state, count in holdings.ports.items():
            # A port closed meanwhile (and perhaps listened on anew) is no longer this one.
            if messaging.ports.get(state.port) is state:
                for _ in range(count):
                    if messaging.release_port(state):
                        break  # that closed it

    def _holdings(self, client: bytes) -> _Holdings:
        holdings = self._clients.get(client)
        if holdings is None:
            holdings = self._clients[client] = _Holdings()
        return holdings
