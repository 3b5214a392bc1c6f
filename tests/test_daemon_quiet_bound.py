"""Quiet sends (docs/ipc.md, Quiet sends) from a client that never waits for a confirmation, as
any ZeroMQ program could send them: the daemon takes a bounded amount past the stream's bound,
then refuses each further quiet send with an error naming it, and never drops one it took."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from pilot_agents import ipc
from pilot_agents.errors import ConfigError
from pilot_agents.sdk import ClientOptions
from tests.conftest import DaemonHandle, ipc_call, stop_daemons
from tests.datasock_helpers import assert_clean_logs, started

MiB = 1024 * 1024
SIZE = 256 * 1024
COUNT = 256  # 64 MiB: more than all there is room for between the sender and the unread end
PORT = 4077
# What may be taken: the reader's 1 MiB inbox and its node's 16 MiB stream window, the sender's
# 8 MiB bound, the 16 MiB + 1 MiB allowance past it, and a message.
MOST_TAKEN = (1 + 16 + 8 + 17 + 1) * MiB


@pytest.fixture
def pair() -> Iterator[tuple[DaemonHandle, DaemonHandle]]:
    a, b = started(("alpha", {"max_payload_bytes": MiB, "inbox_bytes": MiB}),
                   ("beta", {"max_payload_bytes": MiB, "inbox_bytes": MiB}))
    try:
        yield a, b
        assert_clean_logs(a, b)
    finally:
        stop_daemons(a.home, b.home)


def dealer(daemon: DaemonHandle) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(f"ipc://{daemon.home}/daemon.sock")
    return sock


def call(sock: zmq.Socket[bytes], **request: Any) -> dict[str, Any]:
    sock.send_multipart([json.dumps({"id": 1, **request}).encode()])
    reply: dict[str, Any] = json.loads(sock.recv())
    assert reply["ok"], reply
    return reply


def flood(sock: zmq.Socket[bytes], verb: int, about: str, confirmed: dict[str, Any],
          read: Callable[[], list[int]]) -> None:
    """COUNT quiet sends of ``verb`` on ``about``, nobody reading, then ``confirmed`` (answered
    once there is room): some are refused, each after all those taken, and every one taken is
    what ``read`` then finds, in order."""
    for number in range(COUNT):
        header = ipc.COMPACT_REQUEST.pack(verb, ipc.COMPACT_QUIET, number)
        sock.send_multipart([header + about.encode(), b"%08d" % number + b"x" * (SIZE - 8)])
    sock.send_multipart([json.dumps({"id": 2, "data": "last", **confirmed}).encode()])
    arrived = read()
    refused = []
    while True:
        answer = json.loads(sock.recv())
        if answer["id"] == 2:
            assert answer["ok"], answer
            break
        assert answer["error"]["type"] == "BusyError", answer
        assert "wait for a confirmed send" in answer["error"]["message"]
        number, _, named = answer["id"][1:].partition(".")
        assert named == about
        refused.append(int(number))
    assert refused and refused == list(range(refused[0], COUNT))
    assert arrived == list(range(refused[0]))
    assert refused[0] * SIZE < MOST_TAKEN


def numbers(receive: Callable[[], dict[str, Any]]) -> list[int]:
    """The numbers of the messages ``receive`` gives, up to the one that is "last"."""
    found = []
    while (data := receive()["message"]["data"].encode()) != b"last":
        found.append(int(data[:8]))
    return found


def test_quiet_stream_sends_past_the_allowance_are_refused(
        pair: tuple[DaemonHandle, DaemonHandle]) -> None:
    a, b = pair
    assert ipc_call(b.home, cmd="listen", port=PORT)["ok"]
    with dealer(a) as sock:
        stream = call(sock, cmd="connect", target="beta", port=PORT)["stream"]
        flood(sock, ipc.COMPACT_STREAM_SEND, stream, {"cmd": "stream_send", "stream": stream},
              lambda: numbers(lambda: ipc_call(b.home, cmd="receive", port=PORT, timeout=30)))


def test_quiet_replies_past_the_allowance_are_refused(
        pair: tuple[DaemonHandle, DaemonHandle]) -> None:
    a, b = pair
    assert ipc_call(b.home, cmd="listen", port=PORT)["ok"]
    with dealer(a) as asker, dealer(b) as answerer:
        stream = call(asker, cmd="connect", target="beta", port=PORT)["stream"]
        call(asker, cmd="stream_send", stream=stream, data="ask")
        message = call(answerer, cmd="receive", port=PORT, timeout=30)["message"]["id"]
        flood(answerer, ipc.COMPACT_REPLY, message, {"cmd": "reply", "message": message},
              lambda: numbers(lambda: call(asker, cmd="stream_receive", stream=stream,
                                           timeout=30)))


def test_the_sdk_send_window_is_at_most_what_the_daemon_allows() -> None:
    ClientOptions(send_window_bytes=ipc.MAX_SEND_WINDOW_BYTES)
    with pytest.raises(ConfigError, match="send_window_bytes can be at most"):
        ClientOptions(send_window_bytes=ipc.MAX_SEND_WINDOW_BYTES + 1)
