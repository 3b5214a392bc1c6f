"""Encoding and decoding of every tunnel packet and of the frames inside a data packet.

The first byte of a datagram says what it is. Tunnel packet types live in 0x10-0x1F, beacon
messages in 0x20-0x2F, so neither collides with STUN (first byte 0-3, RFC 7983) and one UDP socket
can carry all three.

Fixed-width big-endian fields rather than QUIC's varints: struct is far cheaper than varint loops in
Python, and the few bytes it costs do not matter at 1200-byte packets.

Functions that parse network input end in ``_untrusted`` and raise :class:`WireError` only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ...errors import WireError

# -- packet types ----------------------------------------------------------------------------

INITIATION: Final = 0x10
RESPONSE: Final = 0x11
DATA: Final = 0x12
COOKIE_REPLY: Final = 0x13

INITIATION_HEADER: Final[struct.Struct] = struct.Struct("!BI")  # type, sender index
RESPONSE_HEADER: Final[struct.Struct] = struct.Struct("!BII")  # type, sender index, receiver index
COOKIE_REPLY_HEADER: Final[struct.Struct] = struct.Struct("!BI")  # type, receiver index
DATA_HEADER: Final[struct.Struct] = struct.Struct("!BIQ")  # type, receiver index, packet number
DATA_HEADER_SIZE: Final[int] = DATA_HEADER.size  # 13

# -- frame types -----------------------------------------------------------------------------

PADDING: Final = 0x00
PING: Final = 0x01
ACK: Final = 0x02
STREAM: Final = 0x03
MAX_DATA: Final = 0x04
MAX_STREAM_DATA: Final = 0x05
RESET_STREAM: Final = 0x06
CLOSE: Final = 0x07
PATH_CHALLENGE: Final = 0x08
PATH_RESPONSE: Final = 0x09
LARGE_MESSAGE: Final = 0x0A

STREAM_FIN: Final = 0x01

_ACK_HEAD = struct.Struct("!BIB")  # type, ack delay (µs), range count
_ACK_RANGE = struct.Struct("!QI")  # start, length
_ACK_ONE = struct.Struct("!BIBQI")  # _ACK_HEAD and one _ACK_RANGE
_STREAM_HEAD = struct.Struct("!BBHHIQH")  # type, flags, src port, dst port, stream, offset, length
_MAX_DATA = struct.Struct("!BQ")
_MAX_STREAM_DATA = struct.Struct("!BIQ")
_RESET_STREAM = struct.Struct("!BIHQ")
_CLOSE_HEAD = struct.Struct("!BHH")
_PATH = struct.Struct("!B8s")
_LARGE_MESSAGE = struct.Struct("!BIQ")

# Bound once: the frames in nearly every packet. From compiled code, Struct.pack(...) is a
# method lookup and a call each time; a bound method is only the call.
_pack_ack_one = _ACK_ONE.pack
pack_data_header = DATA_HEADER.pack
_pack_stream_head = _STREAM_HEAD.pack
_unpack_ack_head = _ACK_HEAD.unpack_from
_unpack_ack_range = _ACK_RANGE.unpack_from
_unpack_stream_head = _STREAM_HEAD.unpack_from

STREAM_FRAME_OVERHEAD: Final[int] = _STREAM_HEAD.size  # 20
_ACK_HEAD_SIZE: Final[int] = _ACK_HEAD.size
_ACK_RANGE_SIZE: Final[int] = _ACK_RANGE.size
_ACK_ONE_SIZE: Final[int] = _ACK_ONE.size
MAX_ACK_RANGES: Final = 32
MAX_CLOSE_REASON: Final = 512


# The two frames of every data packet write their __init__ out (init=False): mypyc leaves a
# generated dataclass __init__ interpreted, several times slower than the rest of parsing.
@dataclass(slots=True, init=False)
class AckFrame:
    ranges: tuple[tuple[int, int], ...]  # half-open [start, stop)
    delay: float  # seconds the receiver held the ACK

    def __init__(self, ranges: tuple[tuple[int, int], ...], delay: float) -> None:
        self.ranges = ranges
        self.delay = delay


@dataclass(slots=True, init=False)
class StreamFrame:
    stream_id: int
    src_port: int
    dst_port: int
    offset: int
    data: bytes
    fin: bool

    def __init__(
        self, stream_id: int, src_port: int, dst_port: int, offset: int, data: bytes, fin: bool
    ) -> None:
        self.stream_id = stream_id
        self.src_port = src_port
        self.dst_port = dst_port
        self.offset = offset
        self.data = data
        self.fin = fin


@dataclass(slots=True)
class MaxDataFrame:
    limit: int


@dataclass(slots=True)
class MaxStreamDataFrame:
    stream_id: int
    limit: int


@dataclass(slots=True)
class LargeMessageFrame:
    """The receiver gave its large-message allowance to the message ending at ``end`` on the
    stream: the stream's limit is at least ``end``, and its bytes go before other streams' new
    bytes until then (docs/protocol.md, "Flow control")."""

    stream_id: int
    end: int


@dataclass(slots=True)
class ResetStreamFrame:
    stream_id: int
    code: int
    final_size: int  # the bytes its sender ever sent on the stream (flow-control accounting)


@dataclass(slots=True)
class CloseFrame:
    code: int
    reason: str


@dataclass(slots=True)
class PingFrame:
    pass


@dataclass(slots=True)
class PathChallengeFrame:
    token: bytes


@dataclass(slots=True)
class PathResponseFrame:
    token: bytes


Frame = (
    AckFrame
    | StreamFrame
    | MaxDataFrame
    | MaxStreamDataFrame
    | LargeMessageFrame
    | ResetStreamFrame
    | CloseFrame
    | PingFrame
    | PathChallengeFrame
    | PathResponseFrame
)

PING_FRAME: Final[PingFrame] = PingFrame()

# -- encoding (our own frames: no validation beyond what struct enforces) --------------------


def encode_ack(ranges: list[tuple[int, int]], delay: float) -> bytes:
    """ACK for the newest ``MAX_ACK_RANGES`` ranges; older ones were acked before or are lost."""
    delay_us = min(int(delay * 1_000_000), 0xFFFFFFFF)
    if len(ranges) == 1:  # nothing lost recently: one pack, no list (an ACK per packet)
        start, stop = ranges[0]
        return _pack_ack_one(ACK, delay_us, 1, start, stop - start)
    newest = ranges[-MAX_ACK_RANGES:]
    out = bytearray(_ACK_HEAD.pack(ACK, delay_us, len(newest)))
    for start, stop in newest:
        out += _ACK_RANGE.pack(start, stop - start)
    return bytes(out)


def encode_stream_header(
    stream_id: int, src_port: int, dst_port: int, offset: int, length: int, fin: bool
) -> bytes:
    return _pack_stream_head(
        STREAM, STREAM_FIN if fin else 0, src_port, dst_port, stream_id, offset, length
    )


def encode_max_data(limit: int) -> bytes:
    return _MAX_DATA.pack(MAX_DATA, limit)


def encode_max_stream_data(stream_id: int, limit: int) -> bytes:
    return _MAX_STREAM_DATA.pack(MAX_STREAM_DATA, stream_id, limit)


def encode_large_message(stream_id: int, end: int) -> bytes:
    return _LARGE_MESSAGE.pack(LARGE_MESSAGE, stream_id, end)


def encode_reset_stream(stream_id: int, code: int, final_size: int) -> bytes:
    return _RESET_STREAM.pack(RESET_STREAM, stream_id, code, final_size)


def encode_close(code: int, reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")[:MAX_CLOSE_REASON]
    return _CLOSE_HEAD.pack(CLOSE, code, len(raw)) + raw


def encode_path_challenge(token: bytes) -> bytes:
    return _PATH.pack(PATH_CHALLENGE, token)


def encode_path_response(token: bytes) -> bytes:
    return _PATH.pack(PATH_RESPONSE, token)


ENCODED_PING: Final[bytes] = bytes([PING])


# -- decoding --------------------------------------------------------------------------------

# The frames of every packet are read a byte at a time: compiled, indexing bytes is native and
# the result an unboxed int, where a struct unpack is a C-API call returning boxed ints (about
# 1 k instructions for a STREAM header, against a few hundred). The caller checks the bounds.


def read_u16(data: bytes, pos: int) -> int:
    return data[pos] << 8 | data[pos + 1]


def read_u32(data: bytes, pos: int) -> int:
    return data[pos] << 24 | data[pos + 1] << 16 | data[pos + 2] << 8 | data[pos + 3]


def read_u64(data: bytes, pos: int) -> int:
    return read_u32(data, pos) << 32 | read_u32(data, pos + 4)


def parse_frames_untrusted(payload: bytes) -> list[Frame]:
    """Every frame of a decrypted payload; PADDING ends the list."""
    frames: list[Frame] = []
    pos = 0
    end = len(payload)
    try:
        while pos < end:
            kind: int = payload[pos]
            if kind == STREAM:
                if pos + STREAM_FRAME_OVERHEAD > end:
                    raise WireError("truncated frame: STREAM header")
                # type, flags, src port, dst port, stream, offset, length (_STREAM_HEAD)
                length = read_u16(payload, pos + 18)
                start = pos + STREAM_FRAME_OVERHEAD
                if start + length > end:
                    raise WireError("STREAM frame runs past the packet")
                frames.append(
                    StreamFrame(
                        read_u32(payload, pos + 6),
                        read_u16(payload, pos + 2),
                        read_u16(payload, pos + 4),
                        read_u64(payload, pos + 10),
                        payload[start : start + length],
                        bool(payload[pos + 1] & STREAM_FIN),
                    )
                )
                pos = start + length
            elif kind == ACK:
                if pos + _ACK_ONE_SIZE <= end and payload[pos + 5] == 1:
                    # One range, as in nearly every ACK (nothing lost recently): type, delay
                    # (µs), count, start, length (_ACK_ONE).
                    start = read_u64(payload, pos + 6)
                    length = read_u32(payload, pos + 14)
                    if length == 0:
                        raise WireError("empty ACK range")
                    delay = read_u32(payload, pos + 1) / 1_000_000
                    frames.append(AckFrame(((start, start + length),), delay))
                    pos += _ACK_ONE_SIZE
                    continue
                _, delay_us, count = _unpack_ack_head(payload, pos)
                pos += _ACK_HEAD_SIZE
                if count == 0 or count > MAX_ACK_RANGES:
                    raise WireError(f"ACK frame with {count} ranges")
                ranges = []
                for _ in range(count):
                    start, length = _unpack_ack_range(payload, pos)
                    pos += _ACK_RANGE_SIZE
                    if length == 0:
                        raise WireError("empty ACK range")
                    ranges.append((start, start + length))
                frames.append(AckFrame(tuple(ranges), delay_us / 1_000_000))
            elif kind == PADDING:
                break
            elif kind == PING:
                frames.append(PING_FRAME)
                pos += 1
            elif kind == MAX_DATA:
                frames.append(MaxDataFrame(_MAX_DATA.unpack_from(payload, pos)[1]))
                pos += _MAX_DATA.size
            elif kind == MAX_STREAM_DATA:
                _, sid, limit = _MAX_STREAM_DATA.unpack_from(payload, pos)
                frames.append(MaxStreamDataFrame(sid, limit))
                pos += _MAX_STREAM_DATA.size
            elif kind == LARGE_MESSAGE:
                _, sid, end_offset = _LARGE_MESSAGE.unpack_from(payload, pos)
                frames.append(LargeMessageFrame(sid, end_offset))
                pos += _LARGE_MESSAGE.size
            elif kind == RESET_STREAM:
                _, sid, code, final_size = _RESET_STREAM.unpack_from(payload, pos)
                frames.append(ResetStreamFrame(sid, code, final_size))
                pos += _RESET_STREAM.size
            elif kind == CLOSE:
                _, code, length = _CLOSE_HEAD.unpack_from(payload, pos)
                pos += _CLOSE_HEAD.size
                if length > MAX_CLOSE_REASON or pos + length > end:
                    raise WireError("CLOSE reason runs past the packet")
                reason = payload[pos : pos + length].decode("utf-8", "replace")
                frames.append(CloseFrame(code, reason))
                pos += length
            elif kind in (PATH_CHALLENGE, PATH_RESPONSE):
                token = _PATH.unpack_from(payload, pos)[1]
                path_frame = PathChallengeFrame if kind == PATH_CHALLENGE else PathResponseFrame
                frames.append(path_frame(token))
                pos += _PATH.size
            else:
                raise WireError(f"unknown frame type 0x{kind:02x}")
    except struct.error as exc:
        raise WireError(f"truncated frame: {exc}") from None
    return frames
