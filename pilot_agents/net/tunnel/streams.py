"""One stream's send and receive halves: buffering, retransmission bookkeeping, reassembly, flow
control and message framing.

A stream carries a sequence of messages, each framed as an 8-byte big-endian length and the bytes.
The sender keeps every byte until it is acknowledged; the receiver reorders by offset, cuts the
byte stream into messages and holds back flow-control credit while the application has not taken
what was delivered, so a slow reader slows the sender instead of growing memory.
"""

from __future__ import annotations

import heapq
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

    def blocked_by_flow_control(self) -> bool:
        return self.send_offset < self.write_offset and self.send_offset >= self.max_data

    def next_chunk(self, max_length: int, connection_credit: int) -> tuple[int, bytes, bool] | None:
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
        # Comparisons, not min() of four: compiled, min() is a generic call on boxed ints.
        stop = self.write_offset
        for limit in (start + max_length, self.max_data, start + connection_credit):
            if limit < stop:
                stop = limit
        if stop <= start and not (self.fin_offset == start and not self.fin_sent):
            return None
        self.send_offset = stop
        fin = self.fin_offset == stop
        if fin:
            self.fin_sent = True
        return start, self._slice(start, stop), fin

    def _slice(self, start: int, stop: int) -> bytes:
        base = self._buffer_start
        return bytes(self._buffer[start - base : stop - base])

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


class MessageReader:
    """Cuts a reassembled byte stream into length-prefixed messages."""

    __slots__ = ("_body", "_header", "_remaining", "max_message_size")

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._header = b""
        self._body = bytearray()
        self._remaining = -1  # -1: reading a header

    @property
    def in_message(self) -> bool:
        return self._remaining >= 0 or bool(self._header)

    def feed(self, data: bytes) -> list[bytes]:
        if self._remaining < 0 and not self._header and len(data) >= MESSAGE_HEADER_SIZE:
            # One whole message in one frame, the request/reply case: no views, one copy.
            size: int = _LENGTH.unpack_from(data)[0]
            if size + MESSAGE_HEADER_SIZE == len(data) and size <= self.max_message_size:
                return [data[MESSAGE_HEADER_SIZE:]]
        messages: list[bytes] = []
        view = memoryview(data)
        while view:
            if self._remaining < 0:
                need = MESSAGE_HEADER_SIZE - len(self._header)
                self._header += view[:need]
                view = view[need:]
                if len(self._header) < MESSAGE_HEADER_SIZE:
                    break
                size = _LENGTH.unpack(self._header)[0]
                self._header = b""
                if size > self.max_message_size:
                    raise MessageTooLargeError(
                        f"peer sent a {size}-byte message; the limit is {self.max_message_size}"
                    )
                if len(view) >= size and not self._body:
                    # Whole message in this chunk: the common case for small messages.
                    messages.append(bytes(view[:size]))
                    view = view[size:]
                    continue
                self._remaining = size
            take = view[: self._remaining]
            self._body += take
            self._remaining -= len(take)
            view = view[len(take) :]
            if self._remaining == 0:
                messages.append(bytes(self._body))
                self._body = bytearray()
                self._remaining = -1
        return messages


class RecvStream:
    """Reorders STREAM frames by offset and hands contiguous bytes to a :class:`MessageReader`."""

    __slots__ = (
        "_chunk_offsets",
        "_chunks",
        "delivered",
        "final_size",
        "highest",
        "max_data",
        "queued",
        "reader",
        "window",
    )

    def __init__(self, window: int, max_message_size: int) -> None:
        self.window = window
        self.max_data = window  # the limit we advertised
        self.delivered = 0  # contiguous bytes handed to the reader
        self.highest = 0  # highest offset+length received: what counts against flow control
        self.queued = 0  # bytes of delivered messages the application has not taken yet
        self.final_size: int | None = None
        self.reader = MessageReader(max_message_size)
        self._chunks: dict[int, bytes] = {}
        self._chunk_offsets: list[int] = []  # heap of the keys of _chunks

    @property
    def finished(self) -> bool:
        """Every byte up to the FIN has been delivered."""
        return self.final_size is not None and self.delivered == self.final_size

    def receive_untrusted(self, offset: int, data: bytes, fin: bool) -> list[bytes]:
        """Messages completed by this frame. Raises WireError on a flow-control or final-size
        violation, MessageTooLargeError on an oversized message."""
        stop = offset + len(data)
        if stop > self.max_data:
            raise WireError(f"peer exceeded the stream window ({stop} > {self.max_data})")
        if self.final_size is not None and stop > self.final_size:
            raise WireError("data past the end of the stream")
        if fin:
            if (self.final_size is not None and self.final_size != stop) or stop < self.highest:
                raise WireError("stream final size changed")
            self.final_size = stop
        self.highest = max(self.highest, stop)
        if stop <= self.delivered:
            return []
        if offset > self.delivered:
            known = self._chunks.get(offset)
            if known is None or len(known) < len(data):
                if known is None:
                    heapq.heappush(self._chunk_offsets, offset)
                self._chunks[offset] = data
            return []
        messages = self._deliver(data[self.delivered - offset :])
        while self._chunk_offsets and self._chunk_offsets[0] <= self.delivered:
            start = heapq.heappop(self._chunk_offsets)
            chunk = self._chunks.pop(start)
            if start + len(chunk) > self.delivered:
                messages += self._deliver(chunk[self.delivered - start :])
        return messages

    def _deliver(self, data: bytes) -> list[bytes]:
        self.delivered += len(data)
        messages = self.reader.feed(data)
        for message in messages:
            self.queued += len(message)
        return messages

    def consumed(self, size: int) -> None:
        """The application took a message of ``size`` bytes."""
        self.queued -= size

    def window_update(self) -> int | None:
        """A new limit to advertise once half the window is used, else None."""
        consumed = self.delivered - self.queued
        if self.final_size is None and self.max_data - consumed < self.window // 2:
            self.max_data = consumed + self.window
            return self.max_data
        return None
