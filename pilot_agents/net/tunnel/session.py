"""One peer's tunnel, sans-IO: handshakes and rekeys, packet protection, reliable streams.

Driven like aioquic's connection: :meth:`receive_datagram` with each datagram addressed to one of
our indices, :meth:`handle_timer` when :meth:`get_timer` is due, :meth:`datagrams_to_send` to
drain output and :meth:`next_event` for what happened. Time is the caller's ``now`` (seconds,
any monotonic origin). A peer's misbehaviour closes the tunnel with an event; it never raises
into the caller.

Reliability is one packet-number space per direction that survives rekeys: keys change, packet
numbers keep counting, so loss recovery and the replay window never restart.

A session gives up on a silent peer (handshake timeout, probe timeouts, idle timeout) only when
nobody waits on it: :meth:`keep_trying_until` holds it open until a caller's deadline, retrying
handshakes and probes with backoff, on the relay once the direct path fails, and asking the node
for fresh introductions (:class:`~.events.PeerUnanswered`). docs/protocol.md, "Session
lifecycle", has the rules that make crossing and restarted handshakes end in one session.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol

from ...errors import CryptoError, HandshakeError, MessageTooLargeError, WireError
from . import events, handshake, noise, wire
from .codes import CloseCode, ResetCode, close_reason
from .config import SessionConfig
from .cookie import PeerMacs
from .crypto import TAG_SIZE, Aead
from .pacing import Pacer
from .paths import Address, PathManager, RelayPath, is_relay
from .rangeset import RangeSet
from .recovery import Recovery, SentPacket
from .replay import ReplayWindow
from .streams import MESSAGE_HEADER_SIZE, RecvStream, SendStream, StreamChunk

log = logging.getLogger("pilot_agents.session")
# Streams we reset whose peer's final size is still to come (Session._awaiting_final).
MAX_AWAITING_FINAL: Final = 1024
# Our RESET_STREAMs answering the peer's and not yet acknowledged (about 100 bytes each).
MAX_ANSWERS_QUEUED: Final = 16384


class IndexAllocator(Protocol):
    def allocate(self, session: Session) -> int: ...
    def release(self, index: int) -> None: ...


def _earlier(at: float, other: float | None) -> float:
    return other if other is not None and other < at else at


def _probing_only(frames: list[wire.Frame]) -> bool:
    """A path probe or its answer: PATH_CHALLENGE/PATH_RESPONSE (and padding) only."""
    # A loop, not all(generator), and a tuple, not a union (mypyc builds the union object on
    # every call): this runs for every packet.
    for frame in frames:
        if not isinstance(frame, (wire.PathChallengeFrame, wire.PathResponseFrame)):
            return False
    return True


class State(Enum):
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(slots=True)
class SessionStats:
    packets_sent: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    packets_lost: int = 0
    replayed: int = 0  # duplicates and too-old packets dropped
    bad_auth: int = 0  # packets that failed decryption
    handshakes: int = 0


@dataclass(slots=True)
class _Stream:
    stream_id: int
    local_port: int
    remote_port: int
    send: SendStream
    recv: RecvStream


# What a sent packet carried besides stream data, so its loss can be repaired and its
# acknowledgement acted on (StreamChunk, from streams.py, is the stream data's record).


class _MaxData:
    """A MAX_DATA frame (and LARGE_MESSAGE with it): on loss the current ones are sent again."""

    __slots__ = ()


class _Ping:
    """A PING that only elicits an ACK (keepalive, probe): nothing to repair."""

    __slots__ = ()


class _MaxStreamData:
    """A MAX_STREAM_DATA frame: on loss the stream's current limit is sent again."""

    __slots__ = ("limit", "stream_id")

    def __init__(self, stream_id: int, limit: int) -> None:
        self.stream_id = stream_id
        self.limit = limit


class _ResetStream:
    """A RESET_STREAM frame: sent again until acknowledged."""

    __slots__ = ("code", "final_size", "stream_id")

    def __init__(self, stream_id: int, code: int, final_size: int) -> None:
        self.stream_id = stream_id
        self.code = code
        self.final_size = final_size


class _MtuProbe:
    """A padded PING testing whether the path carries ``size``-byte datagrams."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _UserPing:
    """A PING asked for by :meth:`Session.ping`, asked at ``asked`` (its RTT counts from there)."""

    __slots__ = ("asked", "ping_id")

    def __init__(self, ping_id: int, asked: float) -> None:
        self.ping_id = ping_id
        self.asked = asked


_MAX_DATA: Final = _MaxData()
_PING: Final = _Ping()
_Control = _MaxStreamData | _ResetStream  # frames queued for the next packet


@dataclass(slots=True)
class _PendingInitiation:
    initiator: noise.Initiator
    local_index: int
    started: float  # the first initiation of this handshake (retries keep it)
    sent: float  # this initiation
    next_retry: float
    retry_interval: float
    attempts: int = 1  # initiations of this handshake sent so far


class Session:
    def __init__(
        self,
        *,
        local_id: bytes,
        peer: bytes,
        peer_static: bytes,
        static_private: bytes,
        prologue: bytes,
        config: SessionConfig,
        indices: IndexAllocator,
        nonce: int,
        wall_clock_ns: Callable[[], int],
        now: float,
        macs: PeerMacs,
    ) -> None:
        """``macs`` writes the cookie MACs of our handshake messages to the peer."""
        self.peer = peer
        self.config = config
        self.state = State.HANDSHAKING
        self.paths = PathManager(config.paths)
        # Where the newest authenticated packet came from.
        self._latest_source: Address | None = None
        self._path_from_handshake = False  # the active path is only where a handshake came from
        # The peer's newest packets arrived over our (direct) active path since we moved to it:
        # until then a relayed packet from it only means it hasn't validated the path yet.
        self._peer_on_active = False
        self._quiet_checked = True  # the silence since the newest packet was looked into
        self.stats = SessionStats()
        self.nonce = nonce
        self.remote_nonce: int | None = None
        self._local_id = local_id
        self._peer_static = peer_static
        self._static_private = static_private
        self._prologue = prologue
        self._indices = indices
        self._wall_clock_ns = wall_clock_ns
        self._macs = macs
        self._created = now
        # Until when someone waits on this tunnel (keep_trying_until): no giving up before.
        self._patient_until = -math.inf
        self.close_code: int | None = None
        # The peer shut down (to restart, perhaps) before it saw some of our streams: the CLOSE
        # reason, until the mux hands those streams to a successor that waits for the peer.
        self.peer_shut_down: str | None = None
        # A responder whose answer is not confirmed by then starts its own initiation if it
        # wants the tunnel: the initiator may have lost its state, and nothing else retries.
        self._confirm_by: float | None = None
        self._last_reintroduction = -math.inf
        self._events: deque[events.Event] = deque()
        self._tag = peer.hex()[:8]

        # Keys: the one we send with, the one before it (still accepted), and a responder's
        # not-yet-confirmed one.
        self._current: handshake.Keypair | None = None
        self._previous: handshake.Keypair | None = None
        self._next: handshake.Keypair | None = None
        self._initiation: _PendingInitiation | None = None
        self._handshake_packets: list[bytes] = []

        # Reliability.
        self._next_packet_number = 0
        self._replay = ReplayWindow(config.replay_window)
        self._received = RangeSet()  # packet numbers to acknowledge
        self._ack_eliciting_unacked = 0
        self._ack_deadline: float | None = None
        self._largest_received_time = now
        self._recovery = Recovery(config.recovery, config.congestion)
        self._pacer = Pacer()
        self._packet_size = config.max_packet_size
        self._mtu_probes = list(config.mtu_probe_sizes)  # sizes still to try, ascending
        self._mtu_probe_in_flight = False
        self._pacing_deadline: float | None = None  # set while pacing holds data back
        self._ping_pending = False
        self._next_ping_id = 0
        self._pings_pending: list[tuple[int, float]] = []  # (id, asked at)
        self._close_reason = ""
        self._probes_pending = 0
        # Where from: (the newest token, the size of the datagram that carried it).
        self._path_responses: dict[Address, tuple[bytes, int]] = {}
        self._close_frame: bytes | None = None
        self._last_received = now
        self._last_data_received = -math.inf  # handshakes count as heard, not as a path
        self._last_ack_eliciting_sent = now

        # Streams. The peer with the lower id opens even stream ids, the other odd ones, so both
        # may open streams at once without asking.
        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 0 if local_id < peer else 1
        # Indices (id // 2) of the peer's streams that are gone: its ids all have one parity,
        # so sequential use leaves one merged range rather than one range per stream.
        self._peer_closed_streams = RangeSet()
        # Streams we reset while the peer may still have been sending: how far its bytes had
        # reached (and the limit we had given), until its RESET_STREAM says how far it sent.
        self._awaiting_final: dict[int, tuple[int, int]] = {}
        self._incoming_open = 0
        self._incoming_by_port: dict[int, int] = {}  # of _incoming_open, by local port
        self._control: deque[_Control] = deque()
        self._max_data_pending = False
        self._send_order: deque[int] = deque()  # streams with data, round robin
        # The same ids, for a membership test that costs nothing with a thousand streams.
        self._scheduled: set[int] = set()
        # The peer's large-message allowance holder (LARGE_MESSAGE): that stream's bytes up to
        # the end go before other streams' new bytes, whose credit the peer counted for it.
        self._priority_stream = -1
        self._priority_end = 0
        # Connection-level flow control (docs/protocol.md, "Flow control").
        self._peer_max_data = config.connection_window
        self._sent_new_bytes = 0
        self._recv_max_data = config.connection_window  # the limit we advertised
        self._recv_highest_total = 0  # sum over streams of the highest offset received
        self._recv_consumed_total = 0  # sum of what the application took (or nobody will)
        self._unread_bytes = 0  # charge of messages handed out and not yet taken
        self._delivery_waiting: deque[int] = deque()  # held back by connection_delivery_window
        # The large-message allowance: one stream at a time may receive the message at its front
        # beyond the windows, up to its end (a message is handed over whole, so one larger than
        # the windows needs it); the stream, the end offset, and the extra connection credit.
        self._large_stream = -1
        self._large_end = 0
        self._large_extra = 0
        self._large_waiting: deque[int] = deque()
        self._reassembly_gaps = 0  # holes in all streams' reassembly buffers

    # -- public API ------------------------------------------------------------------------

    @property
    def address(self) -> Address | None:
        """Where packets go now: the active path (None before one is known)."""
        return self.paths.active

    @address.setter
    def address(self, address: Address) -> None:
        """A known direct address (used at once) or the relay (used until a direct path is
        proven)."""
        before = self.paths.active
        if isinstance(address, RelayPath):
            self.paths.set_relay(address)
        else:
            self.paths.set_direct(address)
        if self.paths.active != before:
            self._on_path_changed()

    def add_candidates(self, addresses: list[Address], now: float) -> None:
        """Addresses the peer may be reached at directly (from the beacon): probe them."""
        self.paths.add_candidates(addresses, now)

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def smoothed_rtt(self) -> float | None:
        return self._recovery.rtt.smoothed_rtt if self._recovery.rtt.has_sample else None

    @property
    def local_indices(self) -> list[int]:
        keys = [k for k in (self._current, self._previous, self._next) if k is not None]
        indices = [k.local_index for k in keys]
        if self._initiation is not None:
            indices.append(self._initiation.local_index)
        return indices

    def ping(self, now: float) -> int:
        """Send a PING; a PingAcked event with the same id reports its round trip."""
        self._next_ping_id += 1
        self._pings_pending.append((self._next_ping_id, now))
        return self._next_ping_id

    @property
    def close_reason(self) -> str:
        return self._close_reason

    def keep_trying_until(self, deadline: float) -> None:
        """Someone waits on this tunnel until ``deadline``: until then a silent peer is not
        declared dead (no handshake, probe or idle timeout). Handshakes and probes go on with
        backoff, on the relay once the direct path failed, with PeerUnanswered events asking
        for fresh introductions; the first answer resumes the tunnel."""
        if deadline > self._patient_until:
            self._patient_until = deadline

    @property
    def waiting_for_peer(self) -> bool:
        """The peer is not answering right now: no keys yet, or probes unanswered."""
        return self.state is not State.ESTABLISHED or self._recovery.pto_count > 0

    def _give_up_at(self, at: float) -> float:
        """``at``, a deadline to declare the peer dead, postponed while someone waits."""
        return at if at >= self._patient_until else self._patient_until

    def next_event(self) -> events.Event | None:
        return self._events.popleft() if self._events else None

    def connect(self, now: float) -> None:
        """Start the handshake if no keys exist and none is under way."""
        if self.state is State.HANDSHAKING and self._initiation is None:
            self._start_initiation(now)

    def open_stream(self, local_port: int, remote_port: int) -> int:
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        self._add_stream(stream_id, local_port, remote_port)
        return stream_id

    def send_message(self, stream_id: int, data: bytes) -> None:
        stream = self._streams[stream_id]
        if stream.send.finished:
            raise ValueError("stream is finished")
        stream.send.write_message(data)
        self._schedule(stream_id)

    def finish_stream(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.send.finished:
            stream.send.finish()
            self._schedule(stream_id)

    def reset_stream(self, stream_id: int, code: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        recv = stream.recv
        if recv.final_size is None or recv.highest < recv.final_size:
            self._await_final(stream_id, recv.highest, recv.max_data)
        self._drop_stream(stream_id)
        self._control.append(_ResetStream(stream_id, code, stream.send.send_offset))

    def stream_buffered(self, stream_id: int) -> int:
        """Bytes written to the stream and not yet acknowledged (0 for a gone stream)."""
        stream = self._streams.get(stream_id)
        return stream.send.buffered if stream is not None else 0

    def stream_written(self, stream_id: int) -> int:
        """The stream offset where the next message written will start (0 for a gone stream)."""
        stream = self._streams.get(stream_id)
        return stream.send.write_offset if stream is not None else 0

    def stream_last_arrival(self, stream_id: int) -> float | None:
        """When bytes of the peer's side of the stream last arrived, whole messages or not
        (None: none yet, or a gone stream): a long message's progress before it is whole."""
        stream = self._streams.get(stream_id)
        return stream.recv.last_arrival if stream is not None else None

    def stream_acked_until(self, stream_id: int) -> int | None:
        """The stream offset from which the peer acknowledged nothing: what was written there
        it never received, unless its acknowledgement was lost or not yet sent (None for a
        gone stream). Kept after the session closes, for a replaced session's streams."""
        stream = self._streams.get(stream_id)
        return stream.send.acked_until if stream is not None else None

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def message_consumed(self, stream_id: int, size: int) -> bool:
        """The application took a message of ``size`` bytes handed out on the stream: its bytes
        become flow-control credit and more held-back messages may be handed out. Messages of
        one stream are taken in the order they were handed out. True if that queued something
        (a window update to send, events): the driver should flush."""
        stream = self._streams.get(stream_id)
        if stream is None or self.state is State.CLOSED:
            return False  # dropped already; its charge was released then
        before = len(self._control), self._max_data_pending, len(self._events)
        recv = stream.recv
        charge = size + MESSAGE_HEADER_SIZE + self.config.message_overhead
        recv.unread -= 1
        recv.unread_bytes -= charge
        self._unread_bytes -= charge
        recv.consumed += size + MESSAGE_HEADER_SIZE
        self._recv_consumed_total += size + MESSAGE_HEADER_SIZE
        if self._large_stream == stream_id and recv.consumed >= self._large_end:
            self._release_large()
        self._deliver(stream)
        self._resume_delivery()
        if stream_id in self._streams:
            self._queue_window_updates(stream)
            self._maybe_forget_stream(stream)
        self._queue_connection_window_update()
        return (len(self._control), self._max_data_pending, len(self._events)) != before

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", now: float = 0.0) -> None:
        """Close the tunnel; the peer is told with one CLOSE frame if keys exist."""
        if self.state is State.CLOSED:
            return
        if self._current is not None:
            self._close_frame = wire.encode_close(code, reason or close_reason(code))
        self._enter_closed(code, reason or close_reason(code), by_peer=False)

    # -- succession: the peer lost its state ----------------------------------------------

    def take_over(self, old: Session) -> tuple[int, ...]:
        """This session replaces ``old``, whose peer lost its session state (it restarted, or
        its tunnel timed out). It keeps ``old``'s paths, and the streams we opened on ``old``
        on which the peer acknowledged and sent nothing move here with all their data: the
        peer's new state never saw them. (One that reached the peer just before it lost its
        state, unacknowledged, is delivered again.) Returns the moved stream ids, which keep
        their numbers."""
        self.paths = old.paths
        # Proven with the peer's old state: its new one may sit elsewhere (a restart behind a
        # NAT gets a new mapping), so its handshakes may move it, as on a new tunnel.
        self._path_from_handshake = True
        self._patient_until = old._patient_until
        self._next_stream_id = old._next_stream_id
        moved = []
        for stream in old._unseen_streams():
            new = self._add_stream(stream.stream_id, stream.local_port, stream.remote_port)
            new.send.take_unacknowledged(stream.send)
            self._schedule(stream.stream_id)
            moved.append(stream.stream_id)
        return tuple(moved)

    def _unseen_streams(self) -> list[_Stream]:
        """Streams we opened of which the peer acknowledged nothing and sent nothing."""
        parity = self._next_stream_id % 2
        return [
            s for s in self._streams.values()
            if s.stream_id % 2 == parity and s.send.nothing_acked and s.recv.highest == 0
        ]

    def hand_over(self, moved: tuple[int, ...], answered_index: int | None) -> None:
        """Close, replaced by a successor that took the ``moved`` streams and, if the peer
        answered our pending initiation (``answered_index``), that index with its keys."""
        pending = self._initiation
        if pending is not None and pending.local_index == answered_index:
            self._initiation = None  # not released: the successor's now
        for stream_id in moved:
            del self._streams[stream_id]
        if self.peer_shut_down is not None:
            code, reason = CloseCode.SHUTDOWN, self.peer_shut_down
        else:
            code, reason = CloseCode.PEER_RESTARTED, ""
        self._enter_closed(code, reason, by_peer=True, moved=moved)

    # -- timers ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        # Runs after every flush: a running minimum, not a list of candidates.
        if self.state is State.CLOSED:
            return None
        at = self._last_received + self.config.idle_timeout
        if at < self._patient_until:
            at = self._patient_until  # no verdict while someone waits
        if self._initiation is not None:
            at = _earlier(at, self._initiation.next_retry)
        if self.state is State.HANDSHAKING:
            at = _earlier(at, self._give_up_at(self._created + self.config.handshake_timeout))
            at = _earlier(at, self._confirm_by)
        if self.state is State.ESTABLISHED:
            if self._recovery.pto_count >= self.config.max_probe_timeouts:
                at = _earlier(at, self._patient_until)  # the verdict waited only for it
            if self._recovery.ack_eliciting_in_flight == 0:
                keepalive = self._last_ack_eliciting_sent + self.config.keepalive_interval
                at = _earlier(at, keepalive)
            at = _earlier(at, self._ack_deadline)
            at = _earlier(at, self._recovery.get_timer())
            at = _earlier(at, self._pacing_deadline)
            at = _earlier(at, self.paths.get_timer())
            at = _earlier(at, self._quiet_deadline())
            at = _earlier(at, self._key_deadline())
        return at

    def handle_timer(self, now: float) -> None:
        if self.state is State.CLOSED:
            return
        if self.state is State.HANDSHAKING and now >= self._give_up_at(
            self._created + self.config.handshake_timeout
        ):
            self._enter_closed(CloseCode.HANDSHAKE_TIMEOUT, "", by_peer=False)
            return
        if now >= self._give_up_at(self._last_received + self.config.idle_timeout):
            self._enter_closed(CloseCode.IDLE_TIMEOUT, "", by_peer=False)
            return
        if self._initiation is not None and now >= self._initiation.next_retry:
            self._retry_initiation(now)
        elif self._confirm_by is not None and now >= self._confirm_by:
            self._confirm_by = None
            # Only for a tunnel we want (streams, a caller waiting): an answer to a replayed
            # initiation must not make us send initiations to whoever replayed it.
            if self._streams or now < self._patient_until:
                log.debug("[%s] our answer was not confirmed: initiating", self._tag)
                self._start_initiation(now)
        if self.state is not State.ESTABLISHED:
            return
        self._check_key_age(now)
        if self.state is not State.ESTABLISHED:
            return
        if (
            self._recovery.pto_count >= self.config.max_probe_timeouts
            and now >= self._patient_until
        ):
            self._enter_closed(CloseCode.PEER_UNREACHABLE, "", by_peer=False)
            return
        timer = self._recovery.get_timer()
        if timer is not None and now >= timer:
            result = self._recovery.on_timeout(now)
            self._on_lost(result.lost)
            if result.probe_packets:
                self._probes_pending = result.probe_packets
                if self._recovery.pto_count == 2 and self.paths.on_path_failing(now):
                    log.info("[%s] direct path stopped answering: back to the relay", self._tag)
                    self._fell_back(now)
                elif (
                    self._recovery.pto_count == 2
                    and self._packet_size > self.config.max_packet_size
                ):
                    # Large datagrams may have stopped getting through (a path change, a
                    # black hole): fall back to the size every path carries.
                    self._packet_size = self.config.max_packet_size
                    self._recovery.cc.set_max_datagram_size(self._packet_size)
                    self._mtu_probes.clear()
                if (
                    self._recovery.pto_count >= self.config.max_probe_timeouts
                    and now >= self._patient_until
                ):
                    self._enter_closed(CloseCode.PEER_UNREACHABLE, "", by_peer=False)
                    return
                # A peer that restarted drops our packets silently; a new handshake finds out.
                if self._recovery.pto_count == 3 and self._initiation is None:
                    self._start_initiation(now)
        quiet = self._quiet_deadline()
        if quiet is not None and now >= quiet:
            self._quiet_checked = True
            if self._expecting_data():
                # The peer went silent mid-message. If our side of the direct path broke, our
                # ACKs vanish unnoticed; an ack-eliciting PING lets the probe timeouts find out
                # (and fall back to the relay). If the path is fine, it costs one round trip.
                self._ping_pending = True
        # With packets in flight the PTO probes keep the path alive; a PING then would only
        # push the probe timer out and delay the dead-peer verdict.
        idle = self._recovery.ack_eliciting_in_flight == 0
        if idle and now >= self._last_ack_eliciting_sent + self.config.keepalive_interval:
            self._ping_pending = True

    # -- receiving ---------------------------------------------------------------------------

    def open_response(self, data: bytes) -> handshake.Response | None:
        """A RESPONSE whose receiver index is our pending initiation's, authenticated but not
        installed (:meth:`complete_handshake` does that); None if it does not authenticate."""
        pending = self._initiation
        if pending is None or self.state is State.CLOSED:
            return None
        try:
            remote_index, _ = handshake.response_indices_untrusted(data)
            remote_nonce, keys = handshake.read_response_untrusted(data, pending.initiator)
        except HandshakeError as exc:
            log.debug("[%s] bad handshake response: %s", self._tag, exc)
            self.stats.bad_auth += 1
            return None
        return handshake.Response(
            pending.local_index, remote_index, remote_nonce, keys, pending.sent
        )

    def complete_handshake(
        self, response: handshake.Response, address: Address, now: float
    ) -> None:
        """Install the keys of an opened response: to our own initiation, or to the one of the
        session this one succeeds (its index now ours: the mux moved it)."""
        if self.state is State.CLOSED:
            return
        if self._initiation is not None and self._initiation.local_index == response.local_index:
            self._initiation = None  # its index lives on in the keypair
        self.remote_nonce = response.nonce
        keys = response.keys
        keypair = handshake.Keypair(
            local_index=response.local_index,
            remote_index=response.remote_index,
            sender=Aead(keys.initiator_to_responder),
            receiver=Aead(keys.responder_to_initiator),
            created=now,
            first_packet_number=self._next_packet_number,
            initiator=True,
            confirmed=True,
        )
        if not self._recovery.rtt.has_sample:
            # The handshake is a round trip (QUIC samples its Initial packets the same way):
            # the tunnel has an RTT before any data has been acknowledged.
            self._recovery.rtt.update(now - response.initiation_sent, 0.0, now)
        self._install(keypair, now)
        self._adopt_handshake_source(address)
        self._last_received = now
        # The responder may not send until it sees these keys in use: confirm at once.
        self._ping_pending = True

    def receive_initiation(
        self, initiation: handshake.Initiation, address: Address, now: float
    ) -> None:
        """An initiation from this peer that passed the Noise checks, the replay check of its
        timestamp and the check of its session nonce, in the mux."""
        if self.state is State.CLOSED:
            return
        if self._initiation is not None and self._local_id > self.peer:
            # Both sides initiated at once: the higher key's initiation wins, so only one
            # handshake completes. The lower side answers ours and keeps its own pending,
            # retried as usual, until our keys reach it: if ours was lost, or was a stale
            # one the peer cannot complete, its retry gets through once we have keys.
            return
        self.remote_nonce = initiation.nonce
        local_index = self._indices.allocate(self)
        packet, keys = handshake.write_response(initiation, local_index, self.nonce, self._macs)
        keypair = handshake.Keypair(
            local_index=local_index,
            remote_index=initiation.sender_index,
            sender=Aead(keys.responder_to_initiator),
            receiver=Aead(keys.initiator_to_responder),
            created=now,
            first_packet_number=self._next_packet_number,
            initiator=False,
            confirmed=False,
        )
        if self._next is not None:
            self._indices.release(self._next.local_index)
        self._next = keypair
        self._handshake_packets.append(packet)
        self._adopt_handshake_source(address)
        self._last_received = now
        self.stats.handshakes += 1
        if self.state is State.HANDSHAKING and self._initiation is None:
            self._confirm_by = now + 2 * self.config.handshake_retry

    def receive_cookie_reply(self, data: bytes, now: float) -> None:
        """A COOKIE_REPLY whose receiver index is our pending initiation's: the peer is under
        load and wants our initiations to prove our address."""
        if self._initiation is None or self.state is State.CLOSED:
            return
        if self._macs.consume_cookie_reply(data, now):
            self._retry_initiation(now)

    def receive_data(self, data: bytes, address: Address, now: float) -> None:
        """A DATA packet whose receiver index is one of ours."""
        if self.state is State.CLOSED or len(data) < wire.DATA_HEADER_SIZE + TAG_SIZE:
            return
        index = wire.read_u32(data, 1)  # DATA_HEADER: type, receiver index, packet number
        packet_number = wire.read_u64(data, 5)
        keypair = self._keypair_for(index)
        if keypair is None:
            return
        if not self._replay.check(packet_number):
            self.stats.replayed += 1
            return
        header = data[: wire.DATA_HEADER_SIZE]
        try:
            payload = keypair.receiver.open(packet_number, data[wire.DATA_HEADER_SIZE :], header)
        except CryptoError:
            self.stats.bad_auth += 1
            return
        self._replay.accept(packet_number)
        if keypair is self._next:
            self._promote_next(now)
        self.stats.packets_received += 1
        self.stats.bytes_received += len(data)
        self._last_received = now
        self._last_data_received = now
        self._quiet_checked = False
        try:
            frames = wire.parse_frames_untrusted(payload)
            if packet_number == self._replay.highest:
                if _probing_only(frames):
                    # A probe says nothing about where the peer sends from now (RFC 9000 §9.3:
                    # only non-probing packets move the path), but it may name a new address.
                    self.paths.on_peer_address(address, now)
                else:
                    self._on_newest_packet_from(address, now)
            self._handle_frames(packet_number, frames, address, len(data), now)
        except WireError as exc:
            log.warning("[%s] protocol error from peer: %s", self._tag, exc)
            self.close(CloseCode.PROTOCOL_ERROR, str(exc), now)

    # -- sending -----------------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Datagrams and where each goes (probes and path responses leave off the active
        path). Nothing goes out while no path is known."""
        active = self.paths.active
        if active is None or self._nothing_due(now):
            return []
        out: list[tuple[bytes, Address]] = []
        self._take_handshake_packets(out, active)
        if self._close_frame is not None:
            if self._current is not None:
                # With a final ACK, as QUIC's CONNECTION_CLOSE may carry one: the peer learns
                # which of its messages arrived before the end.
                payload = self._close_frame
                if self._received:
                    payload = self._encode_ack(now) + payload
                out.append((self._seal(self._current, payload), active))
            self._close_frame = None
            return out
        if self.state is not State.ESTABLISHED:
            return out
        self._check_key_age(now)
        keypair = self._current
        if self.state is not State.ESTABLISHED or keypair is None or not keypair.confirmed:
            return out
        self._take_handshake_packets(out, active)  # a rekey just started
        if self._path_responses:
            for source, (token, size) in self._path_responses.items():
                frame = wire.encode_path_response(token)
                out.append((self._build_unpaced(keypair, frame, size), source))
            self._path_responses.clear()
        if self.paths.probing:
            for address, token in self.paths.probes_due(now):
                frame = wire.encode_path_challenge(token)
                out.append((self._build_unpaced(keypair, frame, self.config.max_packet_size),
                            address))
        if self._mtu_probes and not self._mtu_probe_in_flight:
            out.append((self._build_mtu_probe(keypair, now), active))
        while True:
            packet = self._build_packet(keypair, now)
            if packet is None:
                break
            out.append((packet, active))
        return out

    def _take_handshake_packets(self, out: list[tuple[bytes, Address]], to: Address) -> None:
        # Checked first: nearly every flush has none, and a new list for them each time cost.
        if self._handshake_packets:
            out += [(packet, to) for packet in self._handshake_packets]
            self._handshake_packets = []

    # -- internals: handshakes ----------------------------------------------------------------

    def _start_initiation(self, now: float) -> None:
        initiator = noise.Initiator(self._static_private, self._peer_static, self._prologue)
        local_index = self._indices.allocate(self)
        self._initiation = _PendingInitiation(
            initiator,
            local_index,
            now,
            now,
            now + self.config.handshake_retry,
            self.config.handshake_retry,
        )
        self._handshake_packets.append(
            handshake.write_initiation(
                initiator, local_index, self._wall_clock_ns(), self.nonce, self._macs, now
            )
        )
        self._confirm_by = None
        self.stats.handshakes += 1

    def _retry_initiation(self, now: float) -> None:
        # A fresh initiation each time: the responder refuses a repeated timestamp.
        pending = self._initiation
        assert pending is not None
        self._indices.release(pending.local_index)
        # No data heard since the handshake began (a rekey's initiations may get lost while
        # data flows; the peer's own handshakes may reach us while ours don't reach it): the
        # path may have died, or the peer moved.
        silent = self._last_data_received < pending.started
        if silent and pending.attempts >= 2 and self.paths.on_path_failing(now):
            # The direct path may have died (a NAT rebound) while the relay still reaches
            # the peer. PathChanged makes the node ask for an introduction.
            log.info("[%s] no handshake answer on the direct path: back to the relay", self._tag)
            self._fell_back(now)
        if silent and pending.attempts >= 3:
            self._ask_for_introduction(now)
        interval = min(pending.retry_interval * 2, self.config.handshake_retry_max)
        self._start_initiation(now)
        assert self._initiation is not None
        self._initiation.started = pending.started
        self._initiation.attempts = pending.attempts + 1
        self._initiation.retry_interval = interval
        self._initiation.next_retry = now + interval
        if (
            now - pending.started > self.config.handshake_timeout
            and self.state is State.ESTABLISHED
        ):
            # A rekey that gets no answer: current keys stay until they expire.
            self._initiation.next_retry = now + self.config.handshake_retry_max

    def _ask_for_introduction(self, now: float) -> None:
        """The peer does not answer: its addresses may have changed (a NAT rebound, a
        restart). The node asks the beacon for a fresh introduction, now and then."""
        if now - self._last_reintroduction >= self.config.paths.reintroduce_interval:
            self._last_reintroduction = now
            self._events.append(events.PeerUnanswered(self.peer))

    def _install(self, keypair: handshake.Keypair, now: float) -> None:
        if self._previous is not None:
            self._indices.release(self._previous.local_index)
        if keypair.initiator and self._next is not None:
            # Our handshake completed while we held an answer to one of the peer's (the two
            # crossed): the peer may already send with that one, so it stays for receiving,
            # and our current keys, which both sides are leaving, go (as WireGuard does).
            if self._current is not None:
                self._indices.release(self._current.local_index)
            self._current, self._next = self._next, None
        self._previous = self._current
        self._current = keypair
        rekey = self.state is State.ESTABLISHED
        if self.state is State.HANDSHAKING:
            self.state = State.ESTABLISHED
            self._last_ack_eliciting_sent = now
            self._confirm_by = None
        self._events.append(events.HandshakeCompleted(self.peer, rekey))
        log.debug("[%s] keys installed (rekey=%s)", self._tag, rekey)

    def _promote_next(self, now: float) -> None:
        keypair = self._next
        assert keypair is not None
        self._next = None
        keypair.confirmed = True
        keypair.first_packet_number = self._next_packet_number
        self._install(keypair, now)
        if self._initiation is not None:
            # The peer's handshake completed first (we were the lower key of a crossing, or
            # our rekey raced its): fresh keys are what ours would have made.
            self._indices.release(self._initiation.local_index)
            self._initiation = None

    def _keypair_for(self, index: int) -> handshake.Keypair | None:
        for keypair in (self._current, self._next, self._previous):
            if keypair is not None and keypair.local_index == index:
                return keypair
        return None

    def _key_deadline(self) -> float | None:
        keypair = self._current
        if keypair is None:
            return None
        if keypair.initiator and self._initiation is None:
            return keypair.created + self.config.rekey_after_time
        return keypair.created + self.config.reject_after_time

    def _check_key_age(self, now: float) -> None:
        keypair = self._current
        if keypair is None:
            return
        # Deadlines compared in the form get_timer() computes them, so float rounding can't
        # leave a timer due that does nothing.
        used = self._next_packet_number - keypair.first_packet_number
        expired = now >= keypair.created + self.config.reject_after_time
        if expired or used >= self.config.reject_after_packets:
            self._enter_closed(CloseCode.KEY_EXPIRED, "", by_peer=False)
            return
        # Time-based rekeys are the initiator's, so the two sides don't start them together;
        # either side rekeys when its own packet count runs high.
        due = (keypair.initiator and now >= keypair.created + self.config.rekey_after_time) or (
            used >= self.config.rekey_after_packets
        )
        if due and self._initiation is None:
            self._start_initiation(now)

    def _enter_closed(
        self, code: int, reason: str, *, by_peer: bool, moved: tuple[int, ...] = ()
    ) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_code = code
        self._close_reason = reason or close_reason(code)
        for index in self.local_indices:
            self._indices.release(index)
        self._initiation = None
        self._events.append(
            events.SessionClosed(
                self.peer, int(code), reason or close_reason(code), by_peer, moved
            )
        )
        log.info("[%s] tunnel closed: %s", self._tag, reason or close_reason(code))

    # -- internals: frames in ---------------------------------------------------------------

    def _handle_frames(
        self, packet_number: int, frames: list[wire.Frame], source: Address, size: int,
        now: float,
    ) -> None:
        ack_eliciting = immediate = False
        # Acted on once per packet, after its frames: a packet of a thousand MAX_DATA frames
        # (9 bytes each) must not cost a thousand passes over the streams.
        more_credit = False
        challenge: bytes | None = None
        for frame in frames:
            if isinstance(frame, wire.StreamFrame):
                ack_eliciting = True
                self._on_stream_frame(frame)
            elif isinstance(frame, wire.AckFrame):
                self._on_ack(frame, now)
            elif isinstance(frame, wire.PingFrame):
                # A PING asks for an answer: keepalives, probe timeouts and user pings all
                # want it now rather than after the ACK delay.
                ack_eliciting = immediate = True
            elif isinstance(frame, wire.MaxDataFrame):
                ack_eliciting = True
                if frame.limit > self._peer_max_data:
                    self._peer_max_data = frame.limit
                    more_credit = True
            elif isinstance(frame, wire.MaxStreamDataFrame):
                ack_eliciting = True
                stream = self._streams.get(frame.stream_id)
                if stream is not None and frame.limit > stream.send.max_data:
                    stream.send.max_data = frame.limit
                    self._schedule(frame.stream_id)
            elif isinstance(frame, wire.LargeMessageFrame):
                ack_eliciting = True
                self._on_large_message(frame)
            elif isinstance(frame, wire.ResetStreamFrame):
                ack_eliciting = True
                self._on_reset_stream(frame)
            elif isinstance(frame, wire.CloseFrame):
                # Its final ACK came first: what it does not cover, the peer never saw.
                if frame.code == CloseCode.SHUTDOWN and self._unseen_streams():
                    self.peer_shut_down = frame.reason
                else:
                    self._enter_closed(frame.code, frame.reason, by_peer=True)
                return
            elif isinstance(frame, wire.PathChallengeFrame):
                ack_eliciting = True
                challenge = frame.token
            elif isinstance(frame, wire.PathResponseFrame):
                ack_eliciting = True
                if self.paths.on_response(frame.token, source):
                    self._on_path_validated(source)
        if more_credit:
            self._schedule_all()
        if challenge is not None:
            # Answered on the path it came by (that is what it tests), the newest challenge
            # from each address only, and never larger than the datagram that asked: the
            # source address is not authenticated, and answering every challenge of a packet
            # with a full-size datagram turned one datagram into 133x its bytes towards it.
            self._path_responses[source] = (challenge, size)
        self._record_received(packet_number, ack_eliciting, immediate, now)

    def _record_received(
        self, packet_number: int, ack_eliciting: bool, immediate: bool, now: float
    ) -> None:
        received = self._received
        in_order = not received or packet_number == received.stop
        received.add(packet_number)
        # Bound the ACK state: ranges far below the newest are acknowledged already or lost.
        while len(received) > 4 * wire.MAX_ACK_RANGES:
            received.shift()
        if not ack_eliciting:
            return
        self._ack_eliciting_unacked += 1
        if immediate or self._ack_eliciting_unacked >= self.config.ack_every or not in_order:
            self._ack_deadline = now
        elif self._ack_deadline is None:
            self._ack_deadline = now + self.config.max_ack_delay
        if packet_number == received.stop - 1:
            self._largest_received_time = now

    def _on_stream_frame(self, frame: wire.StreamFrame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            stream = self._accept_stream(frame)
            if stream is None:
                if frame.fin and frame.stream_id in self._awaiting_final:
                    # A FIN that came after we reset the stream says its final size as well as
                    # the peer's answer would: and once it has the FIN acknowledged, and the
                    # rest of its stream done, the peer forgets the stream and never answers.
                    self._settle_final(frame.stream_id, frame.offset + len(frame.data))
                return
        recv = stream.recv
        recv.last_arrival = self._last_data_received
        highest_before, gaps_before = recv.highest, recv.gaps
        try:
            message = recv.receive_untrusted(
                frame.offset, frame.data, frame.fin, self._may_deliver(recv)
            )
            self._count_arrived(recv.highest - highest_before)
            if message is not None:
                self._hand_out(stream, message)
                if recv.final_size is not None:
                    self._deliver(stream)  # reports the end
            else:
                self._reassembly_gaps += recv.gaps - gaps_before
                if self._reassembly_gaps > self.config.max_reassembly_gaps:
                    raise WireError(
                        f"peer left more than {self.config.max_reassembly_gaps} holes in its "
                        "streams"
                    )
                self._deliver(stream)
        except MessageTooLargeError:
            self._reset_oversized(frame.stream_id)
            return
        if stream.stream_id in self._streams:
            self._queue_window_updates(stream)
        self._queue_connection_window_update()

    def _on_large_message(self, frame: wire.LargeMessageFrame) -> None:
        """Our message ending at ``frame.end`` holds the peer's allowance. A late or repeated
        frame for a message we sent whole already says nothing: it must not take the place of
        the holder's."""
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.send.send_offset >= frame.end:
            return
        if frame.end > stream.send.write_offset:
            # No message of ours ends there: obeyed, it would hold our other streams for good.
            raise WireError(f"peer's LARGE_MESSAGE names offset {frame.end} of stream "
                            f"{frame.stream_id}, past what we wrote")
        if frame.end > stream.send.max_data:
            stream.send.max_data = frame.end
        self._priority_stream = frame.stream_id
        self._priority_end = frame.end
        self._schedule(frame.stream_id)

    def _on_reset_stream(self, frame: wire.ResetStreamFrame) -> None:
        """The peer dropped the stream. Every byte it sent on it counts against the tunnel's
        window, arrived or not (bytes in flight are never sent again): so its final size is
        accounted and given back as credit, or the two ends' counts would drift apart until
        the peer could send nothing at all. Ours goes back the same way."""
        stream_id, final = frame.stream_id, frame.final_size
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id not in self._awaiting_final:
                if stream_id % 2 == self._next_stream_id % 2 or (
                    stream_id >> 1 in self._peer_closed_streams
                ):
                    return  # settled already
                # None of its bytes reached us (lost, or overtaken by this frame), and none is
                # sent again: it opens and closes here, late bytes of it are ignored, and the
                # peer, which awaits our final size, gets it.
                self._close_unheld(stream_id, frame.code)
                # Not _await_final: settled at once below, it must not evict another.
                self._awaiting_final[stream_id] = (0, self.config.stream_window)
            self._settle_final(stream_id, final)
            return
        recv = stream.recv
        if final > recv.max_data or final < recv.highest or (
            recv.final_size is not None and final != recv.final_size
        ):
            raise WireError(f"peer reset stream {stream_id} with an inconsistent final size")
        self._count_arrived(final - recv.highest)
        recv.highest = final
        self._drop_stream(stream_id)  # gives back what nobody read, up to the final size
        self._check_closed_ranges()
        self._answer_reset(stream_id, frame.code, stream.send.send_offset)
        self._events.append(events.StreamReset(self.peer, stream_id, frame.code))

    def _close_unheld(self, stream_id: int, code: int) -> None:
        """Close a stream of the peer's that we hold nothing of: its id is closed here, and the
        peer, which awaits our final size for it, gets 0."""
        self._peer_closed_streams.add(stream_id >> 1)
        self._check_closed_ranges()
        self._answer_reset(stream_id, code, 0)

    def _answer_reset(self, stream_id: int, code: int, final_size: int) -> None:
        """Queue our RESET_STREAM for one of the peer's streams. It stays queued until
        acknowledged, so a peer that opens and resets streams in a loop while withholding its
        ACKs would grow the queue for ever. A peer that acknowledges lets ours out as fast as
        its own come (each of its resets costs it a stream), so past a bound honest traffic
        never nears, that is a protocol error."""
        if len(self._control) >= MAX_ANSWERS_QUEUED:
            raise WireError("peer left too many of our stream resets unacknowledged")
        self._control.append(_ResetStream(stream_id, code, final_size))

    def _check_closed_ranges(self) -> None:
        """A peer uses its stream ids in order, with at most max_incoming_streams open: the ids
        it closed stay a few ranges. Skipping ids, it could make each closed stream a range of
        its own, held for the tunnel's life: past a generous bound that is a protocol error."""
        if len(self._peer_closed_streams) > 4 * self.config.max_incoming_streams + 64:
            raise WireError("peer left too many holes among its closed stream ids")

    def _settle_final(self, stream_id: int, final: int) -> None:
        """The peer's final size for a stream gone here that awaits it: what it sent beyond
        what had reached us counts, and comes back as credit at once."""
        highest, limit = self._awaiting_final.pop(stream_id)
        if final > limit:
            raise WireError(f"peer's final size {final} exceeds the stream window")
        if final > highest:
            self._count_arrived(final - highest)
            self._recv_consumed_total += final - highest
            self._queue_connection_window_update()

    def _count_arrived(self, more: int) -> None:
        """``more`` bytes of the peer's streams count against the tunnel's window (new ones
        arrived, or ones a final size says were sent)."""
        self._recv_highest_total += more
        if self._recv_highest_total > self._recv_max_data:
            raise WireError("peer exceeded the connection window")

    def _await_final(self, stream_id: int, highest: int, limit: int) -> None:
        if len(self._awaiting_final) >= MAX_AWAITING_FINAL:
            # A peer that never answers resets only starves itself: the credit is its own.
            del self._awaiting_final[next(iter(self._awaiting_final))]
        self._awaiting_final[stream_id] = (highest, limit)

    def _reset_oversized(self, stream_id: int) -> None:
        self.reset_stream(stream_id, ResetCode.MESSAGE_TOO_LARGE)
        self._events.append(events.StreamReset(self.peer, stream_id, ResetCode.MESSAGE_TOO_LARGE))

    def _may_deliver(self, recv: RecvStream) -> bool:
        """The delivery windows let the stream hand out one more message."""
        return (
            recv.unread_bytes < self.config.stream_delivery_window
            and self._unread_bytes < self.config.connection_delivery_window
        )

    def _hand_out(self, stream: _Stream, message: bytes) -> None:
        # A message handed out costs Python objects beyond its bytes (see message_overhead),
        # so the delivery windows charge it more than its wire size.
        charge = len(message) + MESSAGE_HEADER_SIZE + self.config.message_overhead
        recv = stream.recv
        recv.unread += 1
        recv.unread_bytes += charge
        self._unread_bytes += charge
        self._events.append(
            events.MessageReceived(
                self.peer, stream.stream_id, stream.remote_port, stream.local_port, message
            )
        )

    def _deliver(self, stream: _Stream) -> None:
        """Hand out the stream's whole messages while the delivery windows allow; report the
        end of the stream once all of them are out. A header declaring an oversized message
        resets the stream."""
        recv = stream.recv
        while True:
            try:
                recv.parse_header()
            except MessageTooLargeError:
                self._reset_oversized(stream.stream_id)
                return
            if not recv.message_ready:
                self._claim_large(stream)
                break
            if recv.unread_bytes >= self.config.stream_delivery_window:
                break  # its own reader's next take resumes it
            # The tunnel's window binds only a stream that holds unread messages already: one
            # whose reader took all it was given gets its next message, so streams nobody
            # reads (four at the stream window's 1 MiB fill the tunnel's 4 MiB) cannot stop
            # every other stream of the tunnel. What this adds is a message per stream, whose
            # bytes the flow-control windows bound already.
            if (self._unread_bytes >= self.config.connection_delivery_window
                    and recv.unread > 0):
                if not recv.waiting:
                    recv.waiting = True
                    self._delivery_waiting.append(stream.stream_id)
                break
            self._hand_out(stream, recv.pop_message())
        if recv.finished and not recv.end_reported:
            recv.end_reported = True
            self._events.append(events.StreamEnded(self.peer, stream.stream_id))
            self._maybe_forget_stream(stream)

    def _resume_delivery(self) -> None:
        """Messages handed out were taken or dropped: what waited for the tunnel's delivery
        window goes out, and with nothing left to take, the allowance is claimed."""
        limit = self.config.connection_delivery_window
        while self._delivery_waiting and self._unread_bytes < limit:
            waiting = self._streams[self._delivery_waiting.popleft()]
            waiting.recv.waiting = False
            self._deliver(waiting)
        if self._unread_bytes == 0 and self._large_stream < 0:
            window = self.config.connection_window
            if self._recv_max_data - self._recv_highest_total < window // 2:
                # The application took everything: a stream stuck on a partial message with
                # the tunnel's credit spent gets the allowance now.
                for other in list(self._streams.values()):
                    self._claim_large(other)

    def _claim_large(self, stream: _Stream) -> None:
        """Give the large-message allowance to the message at the stream's front if it cannot
        complete otherwise: it is larger than the stream's credit, or the tunnel's credit is
        spent and nothing handed out is left for the application to take. With the allowance
        taken, queue for it."""
        recv = stream.recv
        end = recv.message_end
        stream_id = stream.stream_id
        if end < 0 or not recv.at_head or self._large_stream == stream_id:
            return
        if end <= recv.max_data:
            room = self._recv_max_data - self._recv_highest_total
            if end - recv.highest <= room or self._unread_bytes > 0:
                return
        if self._large_stream >= 0:
            if stream_id not in self._large_waiting:
                self._large_waiting.append(stream_id)
            return
        # The extra credit covers the message and one more connection window: what the peer
        # had sent on other streams, up to the window, before LARGE_MESSAGE reached it. From
        # then on it sends the holder's new bytes before any other stream's, so the message
        # completes however many other streams hold a partial one.
        window = self.config.connection_window
        self._large_stream = stream_id
        self._large_end = end
        self._large_extra = end - recv.consumed + window
        if end > recv.max_data:
            recv.max_data = end  # LARGE_MESSAGE says so
        limit = self._recv_consumed_total + window + self._large_extra
        if limit > self._recv_max_data:
            self._recv_max_data = limit
        self._max_data_pending = True  # and LARGE_MESSAGE with it

    def _release_large(self) -> None:
        self._large_stream = -1
        self._large_extra = 0
        while self._large_waiting and self._large_stream < 0:
            self._claim_large(self._streams[self._large_waiting.popleft()])

    def _accept_stream(self, frame: wire.StreamFrame) -> _Stream | None:
        stream_id = frame.stream_id
        if stream_id % 2 == self._next_stream_id % 2:
            if stream_id >= self._next_stream_id:
                raise WireError(f"peer used stream {stream_id}, which we never opened")
            return None  # ours, closed already: a late retransmission
        if stream_id >> 1 in self._peer_closed_streams:
            return None
        port = frame.dst_port
        on_port = self._incoming_by_port.get(port, 0)
        refused: ResetCode | None = None
        if self._incoming_open >= self.config.max_incoming_streams:
            refused = ResetCode.TOO_MANY_STREAMS
        elif on_port >= self.config.max_incoming_streams_per_port:
            refused = ResetCode.PORT_BUSY
        if refused is not None:
            self._close_unheld(stream_id, refused)
            self._await_final(stream_id, 0, self.config.stream_window)
            return None
        self._incoming_open += 1
        self._incoming_by_port[port] = on_port + 1
        stream = self._add_stream(stream_id, port, frame.src_port)
        self._events.append(events.StreamOpened(self.peer, stream_id, frame.src_port, port))
        return stream

    def _add_stream(self, stream_id: int, local_port: int, remote_port: int) -> _Stream:
        config = self.config
        stream = _Stream(
            stream_id,
            local_port,
            remote_port,
            SendStream(config.stream_window),
            RecvStream(config.stream_window, config.max_message_size),
        )
        self._streams[stream_id] = stream
        return stream

    def _drop_stream(self, stream_id: int) -> bool:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return False
        # What the peer sent that nobody will read counts as consumed: its credit comes back.
        recv = stream.recv
        self._recv_consumed_total += recv.highest - recv.consumed
        self._unread_bytes -= recv.unread_bytes
        self._reassembly_gaps -= recv.gaps
        if stream_id % 2 != self._next_stream_id % 2:
            self._incoming_open -= 1
            left = self._incoming_by_port[stream.local_port] - 1
            if left:
                self._incoming_by_port[stream.local_port] = left
            else:
                del self._incoming_by_port[stream.local_port]
            self._peer_closed_streams.add(stream_id >> 1)
        # Out of the queues now, not skipped when reached: while they do not move (a reader
        # that takes nothing, an allowance held) a peer opening and resetting streams in a loop
        # would grow them without bound, and each claim scans _large_waiting.
        if recv.waiting:
            self._delivery_waiting.remove(stream_id)
        if stream_id in self._large_waiting:
            self._large_waiting.remove(stream_id)
        if self._large_stream == stream_id:
            self._release_large()
        if self._priority_stream == stream_id:
            self._priority_served()  # the streams it held back are due now, not at a next send
        if recv.unread_bytes:
            # As if the application had taken them: it may have nothing else to take, and what
            # waited for their share of the delivery window would wait for ever.
            self._resume_delivery()
        # Now, not at the next message taken: a stream reset with the tunnel's credit spent on
        # it leaves no message to take, and every other stream would wait for that credit.
        self._queue_connection_window_update()
        return True

    def _maybe_forget_stream(self, stream: _Stream) -> None:
        recv = stream.recv
        if stream.send.all_acked and recv.finished and recv.unread == 0:
            self._drop_stream(stream.stream_id)

    def _queue_window_updates(self, stream: _Stream) -> None:
        """More stream credit once the application has taken half a window's worth."""
        recv = stream.recv
        limit = recv.consumed + recv.window
        if recv.final_size is None and limit - recv.max_data > recv.window // 2:
            recv.max_data = limit
            self._control.append(_MaxStreamData(stream.stream_id, limit))

    def _queue_connection_window_update(self) -> None:
        window = self.config.connection_window
        limit = self._recv_consumed_total + window + self._large_extra
        if limit - self._recv_max_data > window // 2:
            self._recv_max_data = limit
            self._max_data_pending = True

    # -- internals: acknowledgements and loss ----------------------------------------------------

    def _on_ack(self, frame: wire.AckFrame, now: float) -> None:
        result = self._recovery.on_ack_received(frame.ranges, frame.delay, now)
        for packet in result.acked:
            # Typed: a native loop over the list, where iterating an Any makes an iterator.
            items: list[Any] = packet.data
            for item in items:
                if isinstance(item, StreamChunk):
                    stream = self._streams.get(item.stream_id)
                    if stream is not None:
                        stream.send.on_acked(item.offset, item.length, item.fin)
                        self._maybe_forget_stream(stream)
                elif isinstance(item, _MtuProbe):
                    self._on_mtu_probe(item.size, acked=True)
                elif isinstance(item, _UserPing):
                    self._events.append(events.PingAcked(self.peer, item.ping_id, now - item.asked))
        self._on_lost(result.lost)

    def _on_lost(self, lost: list[SentPacket]) -> None:
        for packet in lost:
            self.stats.packets_lost += 1
            for item in packet.data:
                if isinstance(item, StreamChunk):
                    stream = self._streams.get(item.stream_id)
                    if stream is not None:
                        stream.send.on_lost(item.offset, item.length, item.fin)
                        self._schedule(item.stream_id)
                elif isinstance(item, _MaxData):
                    self._max_data_pending = True
                elif isinstance(item, _MaxStreamData):
                    stream = self._streams.get(item.stream_id)
                    if stream is not None:
                        self._control.append(_MaxStreamData(item.stream_id, stream.recv.max_data))
                elif isinstance(item, _ResetStream):
                    self._control.append(item)
                elif isinstance(item, _MtuProbe):
                    self._on_mtu_probe(item.size, acked=False)
                elif isinstance(item, _UserPing):
                    self._pings_pending.append((item.ping_id, item.asked))

    # -- internals: building packets -------------------------------------------------------

    def _schedule(self, stream_id: int) -> None:
        if stream_id not in self._scheduled:
            self._scheduled.add(stream_id)
            self._send_order.append(stream_id)

    def _schedule_all(self) -> None:
        """Those with something to send (more credit came): not the idle rest of them."""
        for stream_id, stream in self._streams.items():
            if stream.send.has_data_to_send():
                self._schedule(stream_id)

    def _seal(self, keypair: handshake.Keypair, payload: bytes | bytearray) -> bytes:
        packet_number = self._next_packet_number
        self._next_packet_number += 1
        header = wire.pack_data_header(wire.DATA, keypair.remote_index, packet_number)
        datagram = header + keypair.sender.seal(packet_number, payload, header)
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(datagram)
        return datagram

    def _build_packet(self, keypair: handshake.Keypair, now: float) -> bytes | None:
        has_payload = self._has_payload_to_send()
        # An ACK rides along whenever something else is going out anyway (a reply, say), so
        # request/reply traffic needs no separate ACK packets.
        ack_due = self._ack_deadline is not None and (has_payload or now >= self._ack_deadline)
        probe = self._probes_pending > 0
        if not (has_payload or ack_due or probe or self._ping_pending):
            self._pacing_deadline = None  # nothing waits for the pacer
            self._recovery.on_app_limited()
            return None  # the common end of the send loop: checked before any allocation
        budget = self._packet_size - wire.DATA_HEADER_SIZE - TAG_SIZE
        payload = bytearray()
        items: list[Any] = []
        if ack_due and self._received:
            payload += self._encode_ack(now)
        if not (probe or self._may_send(now)):
            return self._finish_packet(keypair, payload, items, now, probe=False)
        if self._max_data_pending:
            self._max_data_pending = False
            payload += wire.encode_max_data(self._recv_max_data)
            if self._large_stream >= 0:
                # With every limit that may count the allowance's extra credit, and lost or
                # repeated with it: the peer never has that credit without knowing whose it is.
                payload += wire.encode_large_message(self._large_stream, self._large_end)
            items.append(_MAX_DATA)
        while self._control and len(payload) + 16 < budget:
            control = self._control.popleft()
            if isinstance(control, _ResetStream):
                payload += wire.encode_reset_stream(
                    control.stream_id, control.code, control.final_size
                )
            elif control.stream_id in self._streams:
                payload += wire.encode_max_stream_data(control.stream_id, control.limit)
            else:
                continue
            items.append(control)
        self._fill_streams(payload, items, budget)
        for ping_id, asked in self._pings_pending:
            payload += wire.ENCODED_PING
            items.append(_UserPing(ping_id, asked))
        self._pings_pending.clear()
        if (probe or self._ping_pending) and not items:
            payload += wire.ENCODED_PING
            items.append(_PING)
        self._ping_pending = False
        return self._finish_packet(keypair, payload, items, now, probe=probe)

    def _encode_ack(self, now: float) -> bytes:
        self._ack_deadline = None
        self._ack_eliciting_unacked = 0
        return wire.encode_ack(self._received.pairs(), now - self._largest_received_time)

    # -- internals: paths ---------------------------------------------------------------------

    def _adopt_handshake_source(self, address: Address) -> None:
        """Until a data packet proves a path, answer where the newest handshake came from.

        A handshake alone never moves a path the node gave or a data packet proved: an
        initiation can be replayed, or raced ahead of the genuine one, from any address. A path
        taken from a handshake is only provisional: the peer's next handshake overrules it."""
        if isinstance(address, RelayPath) and address != RelayPath(self.peer):
            return  # the beacon named another sender: not a route to this peer
        if self.paths.active is None or (
            self._path_from_handshake and self.state is State.HANDSHAKING
        ):
            if isinstance(address, RelayPath):
                self.paths.active = None  # set_relay takes the relay only where there is no path
            self.address = address
            self._path_from_handshake = True
        elif isinstance(address, RelayPath):
            self.paths.set_relay(address)

    def _on_newest_packet_from(self, address: Address, now: float) -> None:
        if is_relay(address):
            if address != RelayPath(self.peer):
                return  # the beacon named another sender: not a route to this peer
            self.paths.set_relay(address)
            if self.paths.direct and self._peer_on_active:
                # The peer gave up our direct path (its side of it broke, e.g. its NAT
                # rebound): answer where it now sends, or our ACKs would be lost. Before the
                # peer was ever seen on the direct path, its relayed packets only mean that it
                # hasn't validated the path yet: following them back would make both sides
                # swap paths in turn and end on the relay for good.
                log.debug("[%s] the peer now sends through the relay: following it", self._tag)
                self._migrate(address)
            return
        self._latest_source = address
        if address == self.paths.active:
            self._peer_on_active = True
            return
        if self.paths.is_validated(address):
            log.debug("[%s] the peer now sends from %s: following it", self._tag, address)
            self._migrate(address)  # the peer moved to a path we already proved
            self._peer_on_active = True
        else:
            self.paths.on_peer_address(address, now)

    def _quiet_deadline(self) -> float | None:
        """When a silence on the direct path is worth a look (see handle_timer)."""
        if self._quiet_checked or not self.paths.direct:
            return None
        quiet = max(2 * self._recovery.rtt.pto_period(), self.config.paths.quiet_probe_after)
        return self._last_received + quiet

    def _expecting_data(self) -> bool:
        """Some stream of the peer's stopped in the middle of a message (or has a gap)."""
        return any(s.recv.expecting_data for s in self._streams.values())

    def _on_path_validated(self, address: Address) -> None:
        # Leave the relay for any proven direct path; leave a direct path only when the peer
        # itself now sends from the new one (its NAT rebound or it changed networks).
        if not self.paths.direct or address == self._latest_source:
            log.debug("[%s] path to %s validated", self._tag, address)
            self._migrate(address)

    def _migrate(self, address: Address) -> None:
        if address == self.paths.active:
            return
        log.info("[%s] tunnel moves to %s", self._tag, address)
        self.paths.move_to(address)
        self._on_path_changed()

    def _fell_back(self, now: float) -> None:
        """The direct path died and the tunnel is on the relay. The peer's NAT may have
        rebound: the relay reaches its new address only once it has re-registered (within the
        beacon keepalive's 5 s), so the tunnel is not declared dead before then. Before, on a
        LAN's short probe timeouts, the verdict came first, and the message in flight with it
        was lost."""
        self._on_path_changed()
        self.keep_trying_until(now + self.config.paths.fallback_patience)

    def _on_path_changed(self) -> None:
        """A new path may carry smaller datagrams: start again from the safe size."""
        self._peer_on_active = False
        self._events.append(events.PathChanged(self.peer, self.paths.kind, self.paths.active))
        base = self.config.max_packet_size
        if self._packet_size != base:
            self._packet_size = base
            self._recovery.cc.set_max_datagram_size(base)
        # Relayed datagrams stay small: the beacon pays for every byte.
        self._mtu_probes = [] if not self.paths.direct else list(self.config.mtu_probe_sizes)

    def _build_unpaced(self, keypair: handshake.Keypair, frame: bytes, size: int) -> bytes:
        """A path-validation packet, padded to ``size`` (a challenge to the base size: RFC 9000
        §8.2.1, a path must carry that much; a response to its challenge's, at most that),
        outside congestion control so unreachable candidates cost nothing."""
        size = min(size, self.config.max_packet_size)
        padding = size - wire.DATA_HEADER_SIZE - TAG_SIZE - len(frame)
        packet_number = self._next_packet_number
        datagram = self._seal(keypair, frame + bytes(max(padding, 0)))
        self._recovery.on_untracked_packet_sent(packet_number)
        return datagram

    def _build_mtu_probe(self, keypair: handshake.Keypair, now: float) -> bytes:
        """A PING padded to the next probe size; its ACK proves the path carries that size."""
        size = self._mtu_probes[0]
        self._mtu_probe_in_flight = True
        payload = wire.ENCODED_PING + bytes(size - wire.DATA_HEADER_SIZE - TAG_SIZE - 1)
        packet_number = self._next_packet_number
        datagram = self._seal(keypair, payload)
        self._track(packet_number, datagram, [_MtuProbe(size)], now, is_probe_mtu=True)
        return datagram

    def _on_mtu_probe(self, size: int, *, acked: bool) -> None:
        self._mtu_probe_in_flight = False
        if not acked:
            self._mtu_probes.clear()  # the path stops below this size: stay where we are
            return
        self._mtu_probes = [s for s in self._mtu_probes if s > size]
        if size > self._packet_size:
            self._packet_size = size
            self._recovery.cc.set_max_datagram_size(size)
            log.debug("[%s] path carries %d-byte datagrams", self._tag, size)

    def _may_send(self, now: float) -> bool:
        """Congestion window and pacer both allow an ack-eliciting packet now."""
        self._pacing_deadline = None
        size = self._packet_size
        recovery = self._recovery
        if not recovery.cc.can_send(size):
            return False
        if not self._has_payload_to_send():
            return True  # nothing paced is waiting: don't arm a timer for nothing
        self._pacer.set_rate(recovery.cc.pacing_rate(recovery.rtt.smoothed_rtt))
        at = self._pacer.next_send_time(now, size)
        if at > now:
            self._pacing_deadline = at
            return False
        return True

    def _nothing_due(self, now: float) -> bool:
        """A cheap check that :meth:`datagrams_to_send` would produce nothing: it runs after
        every received datagram, and most of them (ACKs) cause no output."""
        if self._handshake_packets or self._close_frame is not None or self._path_responses:
            return False
        if self.state is not State.ESTABLISHED:
            return True
        if self._ping_pending or self._probes_pending or self._has_payload_to_send():
            return False
        if self._ack_deadline is not None and now >= self._ack_deadline:
            return False
        if self._mtu_probes and not self._mtu_probe_in_flight:
            return False
        probe_at = self.paths.get_timer()
        return probe_at is None or now < probe_at

    def _has_payload_to_send(self) -> bool:
        return bool(
            self._send_order or self._control or self._max_data_pending or self._pings_pending
        )

    def _fill_streams(self, payload: bytearray, items: list[Any], budget: int) -> None:
        order = self._send_order
        scheduled = self._scheduled
        priority = self._priority_stream
        if priority >= 0 and self._priority_served():
            priority = -1
        rotations = len(order)
        while order and rotations > 0:
            room = budget - len(payload) - wire.STREAM_FRAME_OVERHEAD
            if room <= 0:
                return
            stream_id = order[0]
            stream = self._streams.get(stream_id)
            if stream is None or not stream.send.has_data_to_send():
                scheduled.discard(order.popleft())
                rotations -= 1
                continue
            credit = max(self._peer_max_data - self._sent_new_bytes, 0)
            if priority >= 0 and stream_id != priority:
                credit = 0  # retransmissions only: new bytes wait for the holder's
            before = stream.send.send_offset
            chunk = stream.send.next_chunk(room, credit)
            if chunk is None:
                scheduled.discard(order.popleft())
                rotations -= 1
                continue
            self._sent_new_bytes += stream.send.send_offset - before
            offset, data, fin = chunk
            payload += wire.encode_stream_header(
                stream_id, stream.local_port, stream.remote_port, offset, len(data), fin
            )
            payload += data
            items.append(StreamChunk(stream_id, offset, len(data), fin))
            if stream_id == priority and self._priority_served():
                priority = -1
                rotations = len(order)  # the others get this packet's room
            if not stream.send.has_data_to_send():
                scheduled.discard(order.popleft())
                rotations -= 1
            elif len(order) > 1:
                order.rotate(-1)  # round robin between streams with data

    def _priority_served(self) -> bool:
        """The allowance holder's message is sent whole (or its stream gone): the streams passed
        over meanwhile (they had only new bytes) are due again."""
        holder = self._streams.get(self._priority_stream)
        if holder is not None and holder.send.send_offset < self._priority_end:
            return False
        self._priority_stream = -1
        self._schedule_all()
        return True

    def _finish_packet(
        self,
        keypair: handshake.Keypair,
        payload: bytearray,
        items: list[Any],
        now: float,
        *,
        probe: bool,
    ) -> bytes | None:
        if not payload:
            return None
        packet_number = self._next_packet_number
        datagram = self._seal(keypair, payload)
        if not items:
            # ACK only: nothing to resend, but the peer may acknowledge its number.
            self._recovery.on_untracked_packet_sent(packet_number)
            return datagram
        self._pacer.on_sent(len(datagram))
        if probe:
            self._probes_pending -= 1
        self._last_ack_eliciting_sent = now
        self._track(packet_number, datagram, items, now)
        return datagram

    def _track(
        self,
        packet_number: int,
        datagram: bytes,
        items: list[Any],
        now: float,
        *,
        is_probe_mtu: bool = False,
    ) -> None:
        """Hand an ack-eliciting packet to loss recovery; ``items`` say what a loss resends."""
        self._recovery.on_packet_sent(
            SentPacket(
                packet_number=packet_number,
                time_sent=now,
                size=len(datagram),
                ack_eliciting=True,
                in_flight=True,
                is_probe_mtu=is_probe_mtu,
                data=items,
            )
        )
