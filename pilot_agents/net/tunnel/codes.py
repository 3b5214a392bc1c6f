"""Numeric codes carried in CLOSE and RESET_STREAM frames, and what they mean to a user."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    IDLE_TIMEOUT = 2  # local only: nothing heard for idle_timeout
    PEER_UNREACHABLE = 3  # local only: probes went unanswered
    HANDSHAKE_TIMEOUT = 4  # local only: no handshake response
    PEER_RESTARTED = 5  # local only: the peer came back with a new session
    KEY_EXPIRED = 6
    NOT_TRUSTED = 7  # local only: trust was withdrawn
    SHUTDOWN = 8


class ResetCode(IntEnum):
    CANCELLED = 0
    PORT_CLOSED = 1
    MESSAGE_TOO_LARGE = 2
    TOO_MANY_STREAMS = 3
    PROTOCOL_ERROR = 4
    UNREAD = 5  # what we sent on it went unread for too long (a replier's stalled requester)
    PORT_BUSY = 6  # the port has as many of our streams as one port may: its reader is behind


CLOSE_REASONS = {
    CloseCode.NORMAL: "closed",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.IDLE_TIMEOUT: "nothing heard from the peer for too long",
    CloseCode.PEER_UNREACHABLE: "the peer stopped answering",
    CloseCode.HANDSHAKE_TIMEOUT: (
        "no handshake answer: the peer is down, unreachable, or does not trust us"
    ),
    CloseCode.PEER_RESTARTED: "the peer restarted",
    CloseCode.KEY_EXPIRED: "session keys expired without a new handshake",
    CloseCode.NOT_TRUSTED: "the peer is no longer trusted",
    CloseCode.SHUTDOWN: "the node is shutting down",
}

RESET_REASONS = {
    ResetCode.CANCELLED: "the connection was cancelled",
    ResetCode.PORT_CLOSED: "nothing listens on that port at the peer",
    ResetCode.MESSAGE_TOO_LARGE: "the message exceeds the peer's maximum message size",
    ResetCode.TOO_MANY_STREAMS: "the peer has too many open connections from us",
    ResetCode.PROTOCOL_ERROR: "protocol error on the stream",
    ResetCode.UNREAD: "the peer gave up on it: what it sent on it went unread for too long",
    ResetCode.PORT_BUSY: (
        "that port has as many messages and connections from us as it takes at once (is it "
        "read there?)"
    ),
}


def close_reason(code: int) -> str:
    try:
        return CLOSE_REASONS[CloseCode(code)]
    except ValueError:
        return f"closed with code {code}"


def reset_reason(code: int) -> str:
    try:
        return RESET_REASONS[ResetCode(code)]
    except ValueError:
        return f"reset with code {code}"
