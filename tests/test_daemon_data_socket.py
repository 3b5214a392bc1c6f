"""Data sockets (docs/ipc.md, Data sockets) spoken raw, as a non-Python program would: a plain
unix socket to stream.sock, a ``stream_attach`` as its first request, then the stream's
messages framed with a kind byte. The peer is a second daemon, driven over plain ZeroMQ."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pilot_agents import ipc
from tests.conftest import DaemonHandle, ipc_call, stop_daemons
from tests.datasock_helpers import (
    WAIT,
    FramedSocket,
    assert_clean_logs,
    connect,
    payload,
    receive,
    started,
)
from tests.test_ipc import stream_call, stream_read, stream_send, stream_socket

Pair = tuple[DaemonHandle, DaemonHandle]
KiB, MiB = 1024, 1024 * 1024
LIMIT = MiB  # alpha's max_payload_bytes: what a data socket's client may leave unread
ACK_WAIT = 2.0  # alpha's seconds before a message received with "ack" comes back


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """alpha, whose data sockets hold at most 1 MiB unread, and beta, whose inboxes hold
    1 MiB: small bounds, so that flow control shows within a few MiB. alpha waits 2 s for an
    ack."""
    a, b = started(("alpha", {"max_payload_bytes": LIMIT, "ack_wait": ACK_WAIT}),
                   ("beta", {"inbox_bytes": MiB}))
    try:
        yield a, b
        assert_clean_logs(a, b)
    finally:
        stop_daemons(a.home, b.home)


_ports = iter(range(7700, 7800))


def listened(daemon: DaemonHandle) -> int:
    """A port of its own for each test, listened on at ``daemon`` (nobody reads it yet)."""
    port = next(_ports)
    assert ipc_call(daemon.home, cmd="listen", port=port)["ok"]
    return port


class DataSocket(FramedSocket):
    """The client's end of a stream's data socket."""

    def attach(self, stream: str, *then: list[bytes]) -> dict[str, Any]:
        """``then``: messages written in the same write as the attach, before its reply."""
        request = json.dumps({"cmd": "stream_attach", "id": 1, "stream": stream}).encode()
        self.write([request], *then)
        return json.loads(self.next()[0])  # type: ignore[no-any-return]

    def send(self, *payloads: bytes) -> None:
        self.write(*([bytes([ipc.DATA_SEND]), p] for p in payloads))

    def message(self) -> bytes:
        header, payload = self.next()
        assert header == bytes([ipc.DATA_MESSAGE])
        return payload


@pytest.fixture
def data(pair: Pair) -> Iterator[DataSocket]:
    sock = DataSocket(pair[0])
    yield sock
    sock.close()


def drain(sock: DataSocket, timeout: float = WAIT) -> dict[str, Any]:
    sock.write([bytes([ipc.DATA_DRAIN]) + json.dumps({"timeout": timeout}).encode()])
    return sock.answer(ipc.DATA_DRAINED)


def close(sock: DataSocket) -> dict[str, Any]:
    sock.write([bytes([ipc.DATA_CLOSE])])
    return sock.answer(ipc.DATA_CLOSED)


def gone(daemon: DaemonHandle, stream: str) -> bool:
    reply = ipc_call(daemon.home, cmd="stream_hold", stream=stream, timeout=1)
    return not reply["ok"] and "no open stream" in reply["error"]["message"]


# -- the stream's messages both ways ---------------------------------------------------------------


def test_messages_go_both_ways_and_close_delivers_every_byte(pair: Pair,
                                                              data: DataSocket) -> None:
    a, b = pair
    port = listened(b)
    stream = connect(a, port)
    sent = [b"ping", b"", bytes(range(256)) * 1000]
    # A client need not wait for the attach's answer: what follows it is the data socket's.
    attached = data.attach(stream, [bytes([ipc.DATA_SEND]), sent[0]])
    assert attached["ok"] and attached["id"] == 1, attached
    assert attached["source_port"] == port and attached["peer"] == b.node_id
    assert attached["hostname"] == "beta" and isinstance(attached["port"], int)
    data.send(*sent[1:])
    got = [receive(b, port) for _ in sent]
    assert [payload(m) for m in got] == sent
    for message, answer in zip(got, ("pong", "second", "third"), strict=True):
        assert ipc_call(b.home, cmd="reply", message=message["id"], data=answer)["ok"]
    assert [data.message() for _ in range(3)] == [b"pong", b"second", b"third"]
    drained = drain(data)
    assert drained["ok"] and drained["path"] == "direct", drained
    last = bytes(300 * KiB)
    data.send(*[last] * 8)
    assert close(data) == {"ok": True}
    data.assert_closed()
    # Closed once beta's node had every byte: all eight are there to read.
    assert all(payload(receive(b, port)) == last for _ in range(8))
    assert gone(a, stream)
    replied = ipc_call(b.home, cmd="reply", message=got[0]["id"], data="late")
    assert not replied["ok"] and "ended" in replied["error"]["message"], replied


def test_messages_waiting_in_the_inbox_go_out_first(pair: Pair, data: DataSocket) -> None:
    a, b = pair
    port = listened(b)
    stream = connect(a, port)
    assert ipc_call(a.home, cmd="stream_send", stream=stream, data="hello")["ok"]
    message = receive(b, port)["id"]
    for answer in ("one", "two", "three"):
        assert ipc_call(b.home, cmd="reply", message=message, data=answer)["ok"]
    first = ipc_call(a.home, cmd="stream_receive", stream=stream, timeout=WAIT)
    assert first["message"]["data"] == "one"  # the others came with it, into the inbox
    assert data.attach(stream)["ok"]
    assert ipc_call(b.home, cmd="reply", message=message, data="four")["ok"]
    assert [data.message() for _ in range(3)] == [b"two", b"three", b"four"]


def _two_replies_one_taken(pair: Pair, data: DataSocket) -> tuple[str, str]:
    """A stream to beta with "one" handed out by stream_receive and "two" in the inbox when
    the data socket attaches; the stream and the id "one" was handed out with."""
    a, b = pair
    port = listened(b)
    stream = connect(a, port)
    assert ipc_call(a.home, cmd="stream_send", stream=stream, data="hello")["ok"]
    message = receive(b, port)["id"]
    for answer in ("one", "two"):
        assert ipc_call(b.home, cmd="reply", message=message, data=answer)["ok"]
    taken = ipc_call(a.home, cmd="stream_receive", stream=stream, timeout=WAIT)["message"]
    assert taken["data"] == "one"
    assert data.attach(stream)["ok"]
    assert data.message() == b"two"
    return message, str(taken["id"])


def test_a_message_given_back_after_the_attach_goes_out_on_the_data_socket(
        pair: Pair, data: DataSocket) -> None:
    a, b = pair
    message, one = _two_replies_one_taken(pair, data)
    assert ipc_call(a.home, cmd="requeue", message=one)["requeued"]
    assert data.message() == b"one"  # it waited in an inbox nobody reads any more
    assert ipc_call(b.home, cmd="reply", message=message, data="three")["ok"]
    assert data.message() == b"three"


def test_a_message_never_acknowledged_comes_back_on_the_data_socket(
        pair: Pair, data: DataSocket) -> None:
    a, b = pair
    port = listened(b)
    stream = connect(a, port)
    assert ipc_call(a.home, cmd="stream_send", stream=stream, data="hello")["ok"]
    message = receive(b, port)["id"]
    assert ipc_call(b.home, cmd="reply", message=message, data="one")["ok"]
    asked_at = time.monotonic()  # the ack_wait starts after it, as the message is handed out
    taken = ipc_call(a.home, cmd="stream_receive", stream=stream, timeout=WAIT, ack=True)
    assert taken["message"]["data"] == "one"
    assert data.attach(stream)["ok"]
    assert data.message() == b"one"  # after ack_wait, to the stream's one reader now
    assert time.monotonic() - asked_at >= ACK_WAIT - 0.1  # (the event loop's clock: ms)


# -- attaching -------------------------------------------------------------------------------------


def test_a_refused_attach_leaves_an_ordinary_connection(pair: Pair) -> None:
    a, b = pair
    stream = connect(a, listened(b))

    def refused(sock: socket.socket, stream_id: str, kind: str, *words: str) -> None:
        reply, _ = stream_call(sock, {"cmd": "stream_attach", "id": "x", "stream": stream_id})
        assert reply["ok"] is False and reply["id"] == "x", reply
        assert reply["error"]["type"] == kind, reply
        assert all(w in reply["error"]["message"] for w in words), reply
        info, _ = stream_call(sock, {"cmd": "info", "id": 2})  # still answers requests
        assert info["ok"] and info["node_id"] == a.node_id

    with stream_socket(a.home) as sock:
        refused(sock, "s0000000000000000", "ConnectionClosedError", "no open stream")
    with stream_socket(a.home) as sock:
        stream_call(sock, {"cmd": "info", "id": 1})
        refused(sock, stream, "BadRequestError", "first request")
    zeromq = ipc_call(a.home, cmd="stream_attach", stream=stream)
    assert zeromq["error"]["type"] == "BadRequestError" and "first request" in str(zeromq)
    with stream_socket(a.home) as busy:
        # A receive waiting on the stream: nobody else may take its messages meanwhile.
        stream_send(busy, {"cmd": "stream_receive", "id": 7, "stream": stream, "timeout": 30})
        stream_call(busy, {"cmd": "info", "id": 1})  # started after the receive: it waits
        with stream_socket(a.home) as sock:
            refused(sock, stream, "BadRequestError", "in use")
        reply, _ = stream_call(busy, {"cmd": "cancel", "id": 8, "request": 7})
        assert reply["cancelled"] is True
    first = DataSocket(a)
    try:
        assert first.attach(stream)["ok"]
        with stream_socket(a.home) as sock:
            refused(sock, stream, "BadRequestError", "has a data socket already")
    finally:
        first.close()


def test_an_attached_stream_refuses_the_commands_of_its_data_socket(pair: Pair,
                                                                    data: DataSocket) -> None:
    a, b = pair
    stream = connect(a, listened(b))
    assert data.attach(stream)["ok"]
    for request in ({"cmd": "stream_send", "data": "x"}, {"cmd": "stream_receive"},
                    {"cmd": "deliver"}, {"cmd": "stream_drain"}, {"cmd": "stream_close"}):
        reply = ipc_call(a.home, stream=stream, **request)
        assert reply["error"]["type"] == "BadRequestError", reply
        assert "has a data socket" in reply["error"]["message"], reply
    assert ipc_call(a.home, cmd="stream_hold", stream=stream, timeout=5)["ok"]
    assert ipc_call(a.home, cmd="stream_arrival", stream=stream)["ok"]
    data.send(b"still works")
    assert drain(data)["ok"]


# -- the end ---------------------------------------------------------------------------------------


def test_an_abort_ends_the_data_socket(pair: Pair, data: DataSocket) -> None:
    a, b = pair
    stream = connect(a, listened(b))
    assert data.attach(stream)["ok"]
    assert ipc_call(a.home, cmd="stream_abort", stream=stream)["ok"]
    ended = data.answer(ipc.DATA_ENDED)
    assert ended["ok"] is False and ended["error"]["type"] == "ConnectionClosedError", ended
    data.assert_closed()


def test_a_peer_that_resets_the_stream_ends_the_data_socket(pair: Pair,
                                                             data: DataSocket) -> None:
    """beta's reader is handed the message and dies without answering: beta resets the
    stream (docs/ipc.md, A client that dies), and alpha's client hears it on its data
    socket."""
    a, b = pair
    port = next(_ports)
    with stream_socket(b.home) as reader:
        for request in ({"cmd": "listen", "port": port, "id": 1},
                        {"cmd": "deliver", "port": port, "id": 2}):
            stream_send(reader, request)
        assert stream_read(reader)[0]["ok"]  # the listen
        stream = connect(a, port)
        assert data.attach(stream)["ok"]
        data.send(b"question")
        pushed, payload = stream_read(reader)
        assert payload == b"question", pushed
    ended = data.answer(ipc.DATA_ENDED)
    assert ended["error"]["type"] == "ConnectionClosedError", ended
    data.assert_closed()
    assert gone(a, stream)


def test_a_stream_that_failed_before_the_attach_ends_after_what_came_before(
        pair: Pair, data: DataSocket) -> None:
    """beta's reader answers one of the two messages it was handed and dies: the stream is
    reset (docs/ipc.md, A client that dies) behind the answer, both waiting at alpha."""
    a, b = pair
    port = next(_ports)
    stream = connect(a, port)
    with stream_socket(b.home) as reader:
        for request in ({"cmd": "listen", "port": port, "id": 1},
                        {"cmd": "deliver", "port": port, "id": 2}):
            stream_send(reader, request)
        assert stream_read(reader)[0]["ok"]  # the listen
        for text in ("first", "second"):
            assert ipc_call(a.home, cmd="stream_send", stream=stream, data=text)["ok"]
        pushed = [stream_read(reader)[0]["message"]["id"] for _ in range(2)]
        stream_send(reader, {"cmd": "reply", "id": 3, "message": pushed[0]}, b"answer")
        assert stream_read(reader)[0]["ok"]
    deadline = time.monotonic() + 5.0
    while ipc_call(a.home, cmd="stream_send", stream=stream, data="probe")["ok"]:
        assert time.monotonic() < deadline, "alpha never heard of the reset"
        time.sleep(0.02)
    assert data.attach(stream)["ok"]
    assert data.message() == b"answer"
    ended = data.answer(ipc.DATA_ENDED)
    assert ended["error"]["type"] == "ConnectionClosedError", ended
    data.assert_closed()


def test_a_client_that_leaves_without_close_resets_the_stream_at_once(
        pair: Pair, data: DataSocket) -> None:
    a, b = pair
    port = listened(b)
    stream = connect(a, port)
    assert data.attach(stream)["ok"]
    data.send(b"question")
    message = receive(b, port)["id"]
    data.close()
    deadline = time.monotonic() + 5.0  # the idle timeout is ten minutes
    while (reply := ipc_call(b.home, cmd="reply", message=message, data="answer"))["ok"]:
        assert time.monotonic() < deadline, "beta never heard of the reset"
        time.sleep(0.02)
    assert reply["error"]["type"] == "ConnectionClosedError", reply
    assert gone(a, stream)


def test_a_daemon_that_stops_ends_its_data_sockets() -> None:
    a, b = started(("alpha", {}), ("beta", {}))
    data = DataSocket(a)
    try:
        stream = connect(a, listened(b))
        assert data.attach(stream)["ok"]
        assert ipc_call(a.home, cmd="stop")["ok"]
        ended = data.answer(ipc.DATA_ENDED)
        assert ended["error"]["type"] == "DaemonNotRunningError", ended
        assert "went away" in ended["error"]["message"]  # as its other clients hear
        data.assert_closed()
    finally:
        data.close()
        stop_daemons(a.home, b.home)


SEND, DRAIN, CLOSE = bytes([ipc.DATA_SEND]), bytes([ipc.DATA_DRAIN]), bytes([ipc.DATA_CLOSE])


@pytest.mark.parametrize("bad", [
    pytest.param([[b"\x09"]], id="unknown-kind"),
    pytest.param([[SEND]], id="send-without-payload"),
    pytest.param([[SEND + b"x", b"data"]], id="send-header-too-long"),
    pytest.param([[DRAIN + b"[1]"]], id="drain-not-an-object"),
    pytest.param([[DRAIN + b'{"timeout": "5"}']], id="drain-timeout-a-string"),
    pytest.param([[DRAIN + b"[" * 100_000]], id="drain-nested-deep"),
    pytest.param([[CLOSE], [SEND, b"after"]], id="send-after-close"),
    pytest.param([[SEND, bytes(LIMIT + 1)]], id="payload-over-the-bound"),
    pytest.param(b"\x07" + bytes(8), id="junk-framing"),
    pytest.param(struct.pack("!BII", 1, 2**31, 0), id="oversize-frame"),
])
def test_bad_input_drops_the_connection_and_resets_the_stream(
        pair: Pair, data: DataSocket, bad: list[list[bytes]] | bytes) -> None:
    """The connection is dropped; a payload over the limit is told why first ('ended')."""
    a, b = pair
    stream = connect(a, listened(b))
    assert data.attach(stream)["ok"]
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # dropped while writing
        if isinstance(bad, bytes):
            data.sock.sendall(bad)
        else:
            data.write(*bad)
    told: list[dict[str, Any]] = []
    with pytest.raises((ConnectionResetError, AssertionError)):  # reset, or closed
        while True:
            told.append(data.answer(ipc.DATA_ENDED))
    if bad == [[SEND, bytes(LIMIT + 1)]]:  # the one a user meets: it read as the daemon gone
        assert told[0]["error"]["message"] == (
            f"a payload of {LIMIT + 1} bytes, more than the daemon's limit of {LIMIT}")
    assert gone(a, stream)
    assert ipc_call(a.home, cmd="info")["ok"]


# -- flow control ----------------------------------------------------------------------------------


def test_a_client_that_does_not_read_stops_the_peer(pair: Pair, data: DataSocket) -> None:
    """beta floods alpha's stream while alpha's client reads nothing: alpha keeps about
    LIMIT unread for it, the tunnel's windows fill, and beta's replies wait."""
    a, b = pair
    port = listened(b)
    stream = connect(a, port)
    assert data.attach(stream)["ok"]
    data.send(b"flood me")
    message = receive(b, port)["id"]
    size, sent = 256 * KiB, [0]
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            reply = ipc_call(b.home, wait=60.0, cmd="reply", message=message, data="x" * size)
            if not reply["ok"]:
                return
            sent[0] += 1

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        # Stalled: no reply taken for half a second.
        before, deadline = -1, time.monotonic() + 20.0
        while sent[0] != before:
            assert time.monotonic() < deadline, f"beta sent {sent[0] * size / MiB:.0f} MiB"
            before = sent[0]
            time.sleep(0.5)
        # alpha's node holds at most its stream window (16 MiB), beta's at most its send
        # bound (8 MiB), alpha's data socket about LIMIT: the rest waits in beta's client.
        assert sent[0] * size < 40 * MiB, f"beta sent {sent[0] * size / MiB:.0f} MiB"
    finally:
        stop.set()
        # Read, and beta's last reply waiting for room goes too.
        data.sock.settimeout(0.5)
        got, deadline = 0, time.monotonic() + 30.0
        while (flooder.is_alive() or got < sent[0]) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                assert data.message() == b"x" * size
                got += 1
        flooder.join()
    assert got == sent[0]


def test_a_client_that_writes_to_a_peer_that_does_not_read_is_stopped(
        pair: Pair, data: DataSocket) -> None:
    """Nobody reads beta's port: its inbox (1 MiB), then beta's node's stream window, then
    alpha's send bound fill, and alpha stops reading the data socket: the client's writes
    block rather than the daemon buffering them."""
    a, b = pair
    stream = connect(a, listened(b))
    assert data.attach(stream)["ok"]
    chunk = b"".join(ipc.pack_frames([SEND, bytes(256 * KiB)]))
    data.sock.settimeout(1.0)
    written, rest = 0, chunk
    with pytest.raises(TimeoutError):
        while written < 200 * MiB:
            sent = data.sock.send(rest)
            written += sent
            rest = rest[sent:] or chunk
    assert written < 48 * MiB, f"the client wrote {written / MiB:.0f} MiB"
    assert ipc_call(a.home, cmd="stream_abort", stream=stream)["ok"]
