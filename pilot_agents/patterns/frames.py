"""The frames the patterns put inside tunnel messages: a kind byte, a 64-bit id, the payload.

A trusted peer can still send garbage: :func:`parse_frame_untrusted` raises only
:class:`~pilot_agents.errors.WireError`, and the patterns drop such a message (and count it)
rather than fail.
"""

from __future__ import annotations

import enum
import logging
import struct
from typing import NamedTuple

from ..errors import ConfigError, WireError
from ..transport import encode_payload

_HEADER = struct.Struct("!BQ")
HEADER_SIZE = _HEADER.size
# The largest message a tunnel (SessionConfig.max_message_size) and a daemon
# (DaemonOptions.max_payload_bytes) take by default: a larger frame resets its stream.
MAX_MESSAGE = 64 * 2**20
MAX_PAYLOAD = MAX_MESSAGE - HEADER_SIZE  # the most a frame carries in one tunnel message


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3  # a reply saying the handler raised: its type's name and its message
    SUBSCRIBE = 4  # the topic prefixes a subscriber wants
    PUBLISH = 5  # id: the publication's number on this subscription; topic and data
    GAP = 6  # id: how many publications the publisher dropped for this subscriber
    HEARTBEAT = 7  # the publisher is alive; sent on a subscription idle for a while
    BYE = 8  # the publisher is closing: subscribe again later
    BATCH = 9  # id: how many frames (PUBLISH, GAP) follow, each after its 32-bit length
    CANCEL = 10  # id: a request its requester gave up on (timed out, cancelled): stop its work
    # push/pull (from 16 on, leaving room after the kinds above); a puller says HEARTBEAT
    # while alive and BYE when it closes, as a publisher does
    HELLO = 16  # id: a pusher opening a link to a puller, which answers with CREDIT
    CREDIT = 17  # id: items a puller takes in flight on the link; its bytes and heartbeat
    ITEM = 18  # id: the item's number at its pusher; payload: its data
    ITEM_AGAIN = 19  # an ITEM sent once more: the puller it went to first went away
    ACK = 20  # id: the item the puller's consumer finished, which frees its credit


# By value, for parsing: a dict lookup, where Kind(value) goes through the enum machinery on
# every frame of the hot path.
_KINDS = {kind.value: kind for kind in Kind}


class Frame(NamedTuple):  # not a frozen dataclass: that one sets each field through a call
    kind: Kind
    id: int
    payload: bytes


def note_malformed(log: logging.Logger, count: int, text: str, *args: object) -> None:
    """Log a pattern's ``count``-th malformed frame if ``count`` is a power of two: a peer
    sending nothing but garbage cannot flood the log (the pattern counts them all)."""
    if count & (count - 1) == 0:
        log.warning(text + " (%d malformed so far)", *args, count)


def encode_frame(kind: Kind, frame_id: int, payload: bytes) -> bytes:
    return _HEADER.pack(kind, frame_id) + payload


def encode_fitting(what: str, data: object) -> bytes:
    """``data`` encoded (:func:`~pilot_agents.transport.encode_payload`), or :class:`ConfigError`
    if its frame would be larger than a tunnel message: sent, it would reset (or have the
    daemon refuse) a stream that others' frames share."""
    payload = data if type(data) is bytes else encode_payload(data)  # (a call fewer)
    if len(payload) > MAX_PAYLOAD:
        raise ConfigError(f"{what} of {len(payload)} bytes: the largest message a tunnel "
                          f"carries is {MAX_MESSAGE} bytes, {HEADER_SIZE} of them the frame's "
                          "header")
    return payload


_new_tuple = tuple.__new__


def parse_frame_untrusted(data: bytes) -> Frame:
    if len(data) < HEADER_SIZE:
        raise WireError(f"a pattern frame of {len(data)} bytes is shorter than its header")
    kind, frame_id = _HEADER.unpack_from(data)
    known = _KINDS.get(kind)
    if known is None:
        raise WireError(f"unknown pattern frame kind {kind}")
    # Made as a tuple: a NamedTuple's own constructor is a Python function, a call more.
    return _new_tuple(Frame, (known, frame_id, data[HEADER_SIZE:]))


_TOPIC_LENGTH = struct.Struct("!H")
MAX_TOPIC = 1024  # bytes of UTF-8


def encode_publication(topic: bytes, data: bytes) -> bytes:
    return _TOPIC_LENGTH.pack(len(topic)) + topic + data


def parse_publication_untrusted(payload: bytes, start: int = 0,
                                stop: int | None = None) -> tuple[str, bytes]:
    """Topic and data of the publication at ``payload[start:stop]`` (offsets, not a slice:
    the data is copied once)."""
    if stop is None:
        stop = len(payload)
    if stop < start + _TOPIC_LENGTH.size:
        raise WireError("a publication shorter than its topic length")
    (length,) = _TOPIC_LENGTH.unpack_from(payload, start)
    begin = start + _TOPIC_LENGTH.size
    end = begin + length
    if length > MAX_TOPIC or end > stop:
        raise WireError(f"a publication's topic of {length} bytes does not fit")
    try:
        topic = payload[begin:end].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("a publication's topic is not UTF-8") from None
    return topic, payload[end:stop]


_ENTRY_LENGTH = struct.Struct("!I")
MAX_BATCH_FRAMES = 1024


def encode_batch(frames: list[bytes]) -> bytes:
    """Several frames in one message: a publisher sends what queued up meanwhile at once, so
    a subscriber that keeps up costs one message per publication, and one that falls behind
    costs the tunnel (and every process on a daemon path) one message per batch."""
    parts = [_HEADER.pack(Kind.BATCH, len(frames))]
    for frame in frames:
        parts += (_ENTRY_LENGTH.pack(len(frame)), frame)
    return b"".join(parts)


def batch_entries_untrusted(data: bytes) -> list[tuple[int, int]]:
    """``(start, stop)`` of each frame in the BATCH frame ``data``, each at least a header
    long; the frames themselves are for the caller to parse, in place."""
    if len(data) < HEADER_SIZE:
        raise WireError(f"a batch of {len(data)} bytes is shorter than its header")
    count = _HEADER.unpack_from(data)[1]
    if count > MAX_BATCH_FRAMES:
        raise WireError(f"a batch of {count} frames, more than {MAX_BATCH_FRAMES}")
    entries, pos, size = [], HEADER_SIZE, _ENTRY_LENGTH.size
    for _ in range(count):
        if pos + size > len(data):
            raise WireError("a batched frame's length runs past the batch")
        (length,) = _ENTRY_LENGTH.unpack_from(data, pos)
        pos += size
        if length < HEADER_SIZE or pos + length > len(data):
            raise WireError(f"a batched frame of {length} bytes does not fit")
        entries.append((pos, pos + length))
        pos += length
    if pos != len(data):
        raise WireError("bytes after the last batched frame")
    return entries


def _encode_strings(items: list[str]) -> bytes:
    out = [_TOPIC_LENGTH.pack(len(items))]
    for item in items:
        raw = item.encode("utf-8")
        out += [_TOPIC_LENGTH.pack(len(raw)), raw]
    return b"".join(out)


def _parse_strings_untrusted(payload: bytes, limit: int, longest: int) -> list[str]:
    """Length-prefixed strings (not JSON: a hostile peer's deep nesting would recurse)."""
    size = _TOPIC_LENGTH.size
    if len(payload) < size:
        raise WireError("a list of strings shorter than its count")
    (count,) = _TOPIC_LENGTH.unpack_from(payload)
    if count > limit:
        raise WireError(f"{count} strings where at most {limit} are allowed")
    items, pos = [], size
    for _ in range(count):
        if pos + size > len(payload):
            raise WireError("a string's length runs past the frame")
        (length,) = _TOPIC_LENGTH.unpack_from(payload, pos)
        pos += size
        if length > longest or pos + length > len(payload):
            raise WireError(f"a string of {length} bytes does not fit")
        try:
            items.append(payload[pos:pos + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise WireError("a string that is not UTF-8") from None
        pos += length
    if pos != len(payload):
        raise WireError("bytes after the last string")
    return items


def encode_prefixes(prefixes: list[str]) -> bytes:
    return _encode_strings(prefixes)


def parse_prefixes_untrusted(payload: bytes, limit: int) -> list[str]:
    """At most ``limit`` prefixes of at most :data:`MAX_TOPIC` bytes each."""
    return _parse_strings_untrusted(payload, limit, MAX_TOPIC)


MAX_ERROR_TEXT = 4096  # bytes of an error reply's message that are kept


def encode_error(exc: BaseException) -> bytes:
    text = (str(exc) or repr(exc)).encode("utf-8")[:MAX_ERROR_TEXT].decode("utf-8", "ignore")
    return _encode_strings([type(exc).__name__[:MAX_TOPIC], text])


def parse_error_untrusted(payload: bytes) -> tuple[str, str]:
    """``(type name, message)`` of an error reply; a malformed one still reads as an error."""
    try:
        remote_type, message = _parse_strings_untrusted(payload, 2, MAX_ERROR_TEXT)
    except (WireError, ValueError):
        return "RemoteError", payload[:200].decode("utf-8", "replace")
    return remote_type, message


_CREDIT = struct.Struct("!QI")
MAX_HEARTBEAT_MS = 3_600_000  # an hour: a longer heartbeat interval is not believed


def encode_credit(window_bytes: int, heartbeat_interval: float) -> bytes:
    return _CREDIT.pack(window_bytes, max(1, round(heartbeat_interval * 1000)))


def parse_credit_untrusted(payload: bytes) -> tuple[int, float]:
    """A CREDIT frame's payload: the bytes a puller takes in flight (at least 1), and the
    seconds between its heartbeats (its pusher counts it gone after three of them)."""
    if len(payload) != _CREDIT.size:
        raise WireError(f"a credit of {len(payload)} bytes, not {_CREDIT.size}")
    window_bytes, heartbeat_ms = _CREDIT.unpack(payload)
    if window_bytes < 1 or not 1 <= heartbeat_ms <= MAX_HEARTBEAT_MS:
        raise WireError(f"a credit of {window_bytes} bytes, heartbeat {heartbeat_ms} ms")
    return int(window_bytes), heartbeat_ms / 1000
