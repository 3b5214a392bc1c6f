"""One stream's send and receive halves: buffering, retransmission bookkeeping, reassembly, flow
control and message framing.

A stream carries a sequence of messages, each framed as an 8-byte big-endian length and the bytes.
The sender keeps every byte until it is acknowledged; the receiver reorders by offset, cuts the
byte stream into messages and holds back flow-control credit while the application has not taken
what was delivered, so a slow reader slows the sender instead of growing memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ...errors import MessageTooLargeError, WireError
from .rangeset import RangeSet

_LENGTH = struct.Struct("!Q")
MESSAGE_HEADER_SIZE: Final[int] = _LENGTH.size


@dataclass(slots=True, init=False)
class StreamChunk:
    """What a STREAM frame carried, kept in the sent packet so a loss can be re-queued."""

    stream_id: int
    offset: int
    length: int
    fin: bool

    # Written out on the per-packet path: mypyc leaves a generated __init__ interpreted.
    def __init__(self, stream_id: int, offset: int, length: int, fin: bool) -> None:
        self.stream_id = stream_id
        self.offset = offset
        self.length = length
        self.fin = fin


class SendStream:
    """Bytes written by the application, kept from first write until acknowledged."""

    __slots__ = (
        "_acked",
        "_buffer",
        "_buffer_start",
        "_retransmit",
        "fin_acked",
        "fin_offset",
        "fin_sent",
        "max_data",
        "send_offset",
        "write_offset",
    )

    def __init__(self, max_data: int) -> None:
        self._buffer = bytearray()
        self._buffer_start = 0  # stream offset of _buffer[0]; everything before it is acked
        self._acked = RangeSet()  # acknowledged ranges at or above _buffer_start
        self._retransmit = RangeSet()  # lost ranges to send again, before new data
        self.send_offset = 0  # next never-sent byte
        self.write_offset = 0  # end of what the application wrote
        self.max_data = max_data  # peer's flow-control limit for this stream
        self.fin_offset: int | None = None
        self.fin_sent = False
        self.fin_acked = False

    @property
    def buffered(self) -> int:
        """Bytes written but not yet acknowledged."""
        return self.write_offset - self._buffer_start

    @property
    def finished(self) -> bool:
        return self.fin_offset is not None

    @property
    def acked_until(self) -> int:
        """The stream offset from which the peer acknowledged nothing."""
        return self._acked.stop if self._acked else self._buffer_start

    @property
    def nothing_acked(self) -> bool:
        return self._buffer_start == 0 and not self._acked and not self.fin_acked

    def take_unacknowledged(self, other: SendStream) -> None:
        """Everything written to ``other``, none of it acknowledged, to send from the start
        (on the session that replaced ``other``'s; see Session.take_over)."""
        self._buffer = other._buffer
        self.write_offset = other.write_offset
        self.fin_offset = other.fin_offset

    def write_message(self, data: bytes) -> None:
        self._buffer += _LENGTH.pack(len(data))
        self._buffer += data
        self.write_offset += MESSAGE_HEADER_SIZE + len(data)

    def finish(self) -> None:
        if self.fin_offset is None:
            self.fin_offset = self.write_offset

    def has_data_to_send(self) -> bool:
        if self._retransmit:
            return True
        if self.send_offset < self.write_offset:
            return self.send_offset < self.max_data
        return self.fin_offset is not None and not self.fin_sent

    def next_chunk(
        self, max_length: int, connection_credit: int
    ) -> tuple[int, bytearray, bool] | None:
        """The next (offset, data, fin) to put in a frame of at most ``max_length`` data bytes.

        Retransmissions come first and need no new credit; new data is bounded by the stream's
        and the connection's (``connection_credit``) flow-control limits.
        """
        if self._retransmit:
            first = next(iter(self._retransmit))
            start = first.start
            stop = min(first.stop, start + max_length)
            self._retransmit.subtract(start, stop)
            fin = self.fin_offset == stop and self.fin_sent
            return start, self._slice(start, stop), fin
        start = self.send_offset
        # Comparisons, not min() of four (compiled, min() is a generic call on boxed ints) nor
        # a loop over a tuple of them (which boxes each).
        stop = self.write_offset
        if start + max_length < stop:
            stop = start + max_length
        if self.max_data < stop:
            stop = self.max_data
        if start + connection_credit < stop:
            stop = start + connection_credit
        if stop <= start and not (self.fin_offset == start and not self.fin_sent):
            return None
        self.send_offset = stop
        fin = self.fin_offset == stop
        if fin:
            self.fin_sent = True
        return start, self._slice(start, stop), fin

    def _slice(self, start: int, stop: int) -> bytearray:
        # A copy already: bytes() of it would copy again, through a generic call.
        base = self._buffer_start
        return self._buffer[start - base : stop - base]

    def on_acked(self, offset: int, length: int, fin: bool) -> None:
        if fin:
            self.fin_acked = True
        if length == 0:
            return
        stop = offset + length
        if stop <= self._buffer_start:
            return
        if offset <= self._buffer_start and not self._acked:
            # In order, nothing acknowledged ahead of it: the usual case, without the range set.
            del self._buffer[: stop - self._buffer_start]
            self._buffer_start = stop
            return
        self._acked.add(max(offset, self._buffer_start), stop)
        first = next(iter(self._acked))
        if first.start == self._buffer_start:
            self._acked.shift()
            del self._buffer[: first.stop - self._buffer_start]
            self._buffer_start = first.stop

    def on_lost(self, offset: int, length: int, fin: bool) -> None:
        if fin and not self.fin_acked:
            # Resending the last byte range carries the FIN again; an empty FIN needs its own slot.
            self.fin_sent = length > 0
            if length == 0:
                return
        stop = offset + length
        start = max(offset, self._buffer_start)
        if start >= stop:
            return
        self._retransmit.add(start, stop)
        for acked in self._acked:
            if acked.start >= stop:
                break
            self._retransmit.subtract(acked.start, acked.stop)

    @property
    def all_acked(self) -> bool:
        return self.fin_acked and self._buffer_start == self.write_offset


class RecvStream:
    """One stream's receiving half: reassembly by offset, message framing, and the bookkeeping
    flow control needs.

    Every byte from the start of the first message not yet handed out (``_base``) up to the
    highest offset received sits in one buffer at its own position, so overlapping or repeated
    frames cost nothing twice and the buffer never holds more than the span the window allows.
    Holes not yet filled are zeros; ``_have`` records which ranges above the contiguous prefix
    arrived. Messages leave the buffer only when the session hands them out (:meth:`pop_message`),
    and credit returns only when the application has taken them (:meth:`consumed`): everything
    between the application's read point and the highest offset, including partial messages
    and bytes held back from delivery, counts against the window.
    """

    __slots__ = (
        "_base",
        "_buffer",
        "_have",
        "consumed",
        "delivered",
        "end_reported",
        "final_size",
        "highest",
        "last_arrival",
        "max_data",
        "max_message_size",
        "message_end",
        "unread",
        "unread_bytes",
        "waiting",
        "window",
    )

    def __init__(self, window: int, max_message_size: int) -> None:
        self.window = window
        self.max_data = window  # the limit we advertised
        self.max_message_size = max_message_size
        self.highest = 0  # highest offset+length received
        self.last_arrival: float | None = None  # when a STREAM frame of it last came
        self.delivered = 0  # every byte below this offset has arrived
        self.consumed = 0  # end of the last message the application took
        self.final_size: int | None = None
        self.message_end = -1  # end offset of the message at _base, once its header is in
        self.unread = 0  # messages handed out that the application has not taken yet
        self.unread_bytes = 0  # what they are charged (see Session._hand_out)
        self.waiting = False  # queued for delivery budget at the session
        self.end_reported = False
        self._base = 0  # stream offset of _buffer[0]: the first byte not handed out
        self._buffer = bytearray()  # bytes from _base up to highest; holes are zeros
        self._have = RangeSet()  # ranges received above ``delivered``

    @property
    def gaps(self) -> int:
        """Separate ranges received ahead of the contiguous prefix."""
        return len(self._have)

    @property
    def finished(self) -> bool:
        """Every byte up to the FIN has arrived and every whole message was handed out."""
        return (
            self.final_size is not None
            and self.delivered == self.final_size
            and not self.message_ready
        )

    @property
    def message_ready(self) -> bool:
        """A whole message waits at the front of the buffer."""
        return 0 <= self.message_end <= self.delivered

    @property
    def at_head(self) -> bool:
        """The application has taken everything before the message at the front."""
        return self._base == self.consumed

    @property
    def expecting_data(self) -> bool:
        """A hole, or a message (or its header) only partly received."""
        if self.highest > self.delivered:
            return True
        if self.message_end < 0:
            return self.delivered > self._base
        return self.message_end > self.delivered

    def receive_untrusted(self, offset: int, data: bytes, fin: bool, deliver: bool) -> bytes | None:
        """Store a STREAM frame's bytes.

        Returns the message itself when the frame is exactly one whole message arriving in
        order with nothing buffered and ``deliver`` allows handing it out (the request/reply
        case, kept free of any buffer). Raises WireError on a flow-control or final-size
        violation, MessageTooLargeError on a header declaring an oversized message."""
        stop = offset + len(data)
        if stop > self.max_data:
            raise WireError(f"peer exceeded the stream window ({stop} > {self.max_data})")
        if self.final_size is not None and stop > self.final_size:
            raise WireError("data past the end of the stream")
        if fin:
            if (self.final_size is not None and self.final_size != stop) or stop < self.highest:
                raise WireError("stream final size changed")
            self.final_size = stop
        if stop > self.highest:
            self.highest = stop
        delivered = self.delivered
        if stop <= delivered:
            return None
        buffer = self._buffer
        if offset == delivered and not buffer and len(data) >= MESSAGE_HEADER_SIZE:
            size: int = _LENGTH.unpack_from(data)[0]
            whole = size + MESSAGE_HEADER_SIZE == len(data) and size <= self.max_message_size
            if deliver and whole:
                self.delivered = self._base = stop
                return data[MESSAGE_HEADER_SIZE:]
        if offset < delivered:
            data = data[delivered - offset :]  # the part already held is dropped, not stored
            offset = delivered
        at = offset - self._base
        if at == len(buffer):
            buffer += data
        else:
            end = at + len(data)
            if end > len(buffer):
                buffer += bytes(end - len(buffer))
            buffer[at:end] = data
        if offset > delivered:
            self._have.add(offset, stop)
            return None
        delivered = stop
        have = self._have
        while have and have[0].start <= delivered:
            stop = have.shift().stop
            if stop > delivered:
                delivered = stop
        self.delivered = delivered
        self.parse_header()
        return None

    def parse_header(self) -> None:
        """Read the front message's length as soon as its header is in: an oversized one is
        refused before any of its body is held."""
        if self.message_end < 0 and self.delivered - self._base >= MESSAGE_HEADER_SIZE:
            size: int = _LENGTH.unpack_from(self._buffer)[0]
            if size > self.max_message_size:
                raise MessageTooLargeError(
                    f"peer sent a {size}-byte message; the limit is {self.max_message_size}"
                )
            self.message_end = self._base + MESSAGE_HEADER_SIZE + size

    def pop_message(self) -> bytes:
        """The whole message at the front (check :attr:`message_ready` first)."""
        buffer = self._buffer
        length = self.message_end - self._base
        if length == len(buffer):
            del buffer[:MESSAGE_HEADER_SIZE]  # O(1) at the front of a bytearray
            message = bytes(buffer)
            buffer.clear()
        else:
            message = bytes(buffer[MESSAGE_HEADER_SIZE:length])
            del buffer[:length]
        self._base = self.message_end
        self.message_end = -1
        return message
