"""The frames the patterns put inside tunnel messages: a kind byte, a 64-bit id, the payload.

A trusted peer can still send garbage: :func:`parse_frame_untrusted` raises only
:class:`~pilot_agents.errors.WireError`, and the patterns drop such a message (and count it)
rather than fail.
"""

from __future__ import annotations

import enum
import logging
import struct
from dataclasses import dataclass

from ..errors import WireError

_HEADER = struct.Struct("!BQ")
HEADER_SIZE = _HEADER.size


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3  # a reply saying the handler raised: its type's name and its message
    SUBSCRIBE = 4  # the topic prefixes a subscriber wants
    PUBLISH = 5  # id: the publication's number on this subscription; topic and data
    GAP = 6  # id: how many publications the publisher dropped for this subscriber
    HEARTBEAT = 7  # the publisher is alive; sent on a subscription idle for a while
    BYE = 8  # the publisher is closing: subscribe again later


@dataclass(frozen=True, slots=True)
class Frame:
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


def parse_frame_untrusted(data: bytes) -> Frame:
    if len(data) < HEADER_SIZE:
        raise WireError(f"a pattern frame of {len(data)} bytes is shorter than its header")
    kind, frame_id = _HEADER.unpack_from(data)
    try:
        return Frame(Kind(kind), frame_id, data[HEADER_SIZE:])
    except ValueError:
        raise WireError(f"unknown pattern frame kind {kind}") from None


_TOPIC_LENGTH = struct.Struct("!H")
MAX_TOPIC = 1024  # bytes of UTF-8


def encode_publication(topic: bytes, data: bytes) -> bytes:
    return _TOPIC_LENGTH.pack(len(topic)) + topic + data


def parse_publication_untrusted(payload: bytes) -> tuple[str, bytes]:
    if len(payload) < _TOPIC_LENGTH.size:
        raise WireError("a publication shorter than its topic length")
    (length,) = _TOPIC_LENGTH.unpack_from(payload)
    end = _TOPIC_LENGTH.size + length
    if length > MAX_TOPIC or end > len(payload):
        raise WireError(f"a publication's topic of {length} bytes does not fit")
    try:
        topic = payload[_TOPIC_LENGTH.size:end].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("a publication's topic is not UTF-8") from None
    return topic, payload[end:]


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
