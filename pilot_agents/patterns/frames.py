"""The frames the patterns put inside tunnel messages: a kind byte, a 64-bit id, the payload.

A trusted peer can still send garbage: :func:`parse_frame_untrusted` raises only
:class:`~pilot_agents.errors.WireError`, and the patterns drop such a message (and count it)
rather than fail.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import WireError

_HEADER = struct.Struct("!BQ")
HEADER_SIZE = _HEADER.size


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3  # a reply saying the handler raised: JSON {"type": ..., "message": ...}


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    id: int
    payload: bytes


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


def encode_error(exc: BaseException) -> bytes:
    return json.dumps({"type": type(exc).__name__, "message": str(exc) or repr(exc)}).encode()


def parse_error_untrusted(payload: bytes) -> tuple[str, str]:
    """``(type name, message)`` of an error reply; a malformed one still reads as an error."""
    try:
        fields: Any = json.loads(payload)
        return str(fields["type"]), str(fields["message"])
    except (ValueError, TypeError, KeyError):
        return "RemoteError", payload[:200].decode("utf-8", "replace")
