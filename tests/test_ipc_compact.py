"""Compact headers (docs/ipc.md, Compact headers) as any program could send them, against a real
daemon; the pushed-message header's encoding; and the Node's messages going straight to a
delivery only within the inbox's bounds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from pilot_agents import ipc
from pilot_agents.daemon.inbox import Inbox
from pilot_agents.errors import ConnectionClosedError
from pilot_agents.node.connection import Message
from tests.conftest import DaemonHandle, ipc_call, short_home, start_daemon, stop_daemons


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonHandle]:
    handle = start_daemon(short_home(), "alpha")
    try:
        yield handle
    finally:
        stop_daemons(handle.home)


def compact(verb: int, flags: int, number: int, about: bytes) -> bytes:
    return ipc.COMPACT_REQUEST.pack(verb, flags, number) + about


def send(home: Path, *frames: bytes, wait: float = 10.0) -> dict[str, Any]:
    """One raw multipart request over ZeroMQ (REQ) and its JSON reply."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(wait * 1000))
    sock.connect(f"ipc://{home}/daemon.sock")
    try:
        sock.send_multipart(list(frames))
        return json.loads(sock.recv())  # type: ignore[no-any-return]
    finally:
        sock.close()


def test_a_compact_reply_is_answered_as_its_json_form(daemon: DaemonHandle) -> None:
    reply = send(daemon.home, compact(ipc.COMPACT_REPLY, 0, 42, b"m1.nowhere"), b"hi")
    assert reply["ok"] is False and reply["id"] == 42
    assert reply["error"]["type"] == "ConnectionClosedError"
    # A quiet one's failure names its sink and the message it was about.
    reply = send(daemon.home, compact(ipc.COMPACT_REPLY, ipc.COMPACT_QUIET, 7, b"m2.x"), b"hi")
    assert reply["id"] == "q7.m2.x" and reply["error"]["type"] == "ConnectionClosedError"
    reply = send(daemon.home, compact(ipc.COMPACT_STREAM_SEND, 0, 3, b"s-none"), b"hi")
    assert reply["id"] == 3 and reply["error"]["type"] == "ConnectionClosedError"


@pytest.mark.parametrize(("frames", "says"), [
    ([b"\x01\x01", b"x"], "at least 10 bytes"),
    ([compact(ipc.COMPACT_REPLY, 0x82, 1, b"m1"), b"x"], "unknown compact flags"),
    ([compact(ipc.COMPACT_REPLY, 0, 1, b"\xff\xfe"), b"x"], "not UTF-8"),
    ([compact(ipc.COMPACT_REPLY, 0, 1, b"m1")], "needs its payload frame"),
    ([compact(ipc.COMPACT_REPLY, 0, 1, b"m1"), b"x", b"y"], "at most one payload frame"),
])
def test_a_malformed_compact_header_is_refused_and_the_daemon_goes_on(
        daemon: DaemonHandle, frames: list[bytes], says: str) -> None:
    reply = send(daemon.home, *frames)
    assert reply["ok"] is False and reply["error"]["type"] == "BadRequestError"
    assert says in reply["error"]["message"]
    assert ipc_call(daemon.home, cmd="info")["ok"] is True


def test_a_compact_delivery_needs_an_integer_id(daemon: DaemonHandle) -> None:
    assert ipc_call(daemon.home, cmd="listen", port=3301)["ok"] is True
    reply = ipc_call(daemon.home, cmd="deliver", id="d1", port=3301, compact=True)
    assert reply["ok"] is False and "integer 'id'" in reply["error"]["message"]


@pytest.mark.parametrize("hostname", [None, "beta", "bêta-ünïcode"])
def test_a_pushed_message_header_reads_back_as_its_json_form(hostname: str | None) -> None:
    message = {"id": "m17.abc-3", "from": "f" * 64, "hostname": hostname, "port": 1001,
               "source_port": 52111, "data": b"payload"}
    header = ipc.pack_message(2**64 - 1, message)
    assert header is not None and header[0] == ipc.COMPACT_DELIVERED
    assert ipc.unpack_message(header) == {"ok": True, "id": 2**64 - 1, "message": {
        k: v for k, v in message.items() if k != "data"}}
    with pytest.raises(ValueError):
        ipc.unpack_message(header + b"x")


def test_a_message_with_a_long_field_is_pushed_as_json() -> None:
    message = {"id": "m" * 256, "from": "f", "hostname": None, "port": 1, "source_port": 2}
    assert ipc.pack_message(1, message) is None


def _message(size: int) -> Message:
    return Message(b"x" * size, "peer", 1001, 5000)


def test_the_node_hands_a_message_over_only_within_the_inbox_bounds() -> None:
    inbox = Inbox("port 1001", max_messages=3, max_bytes=100)
    taken: list[Message] = []

    def take(message: Message) -> bool:  # a delivery in ack mode: each message is held
        inbox.hold(len(message.data))
        taken.append(message)
        return True

    assert not inbox.offer(_message(1))  # no delivery yet: the pump takes it
    inbox.add_taker(take)
    assert inbox.offer(_message(1)) and inbox.offer(_message(1))
    # Two held: a third would leave no room for what a waiting pump takes next.
    assert not inbox.offer(_message(1)) and len(taken) == 2
    inbox.release(1)
    assert not inbox.offer(_message(99))  # nor may the bytes run out
    inbox.put(_message(1))  # the pump's message, queued: what comes next waits behind it
    assert not inbox.offer(_message(1))
    inbox.close(ConnectionClosedError("closed"))
    assert not inbox.offer(_message(1))
