"""The daemon's local API spoken raw, as a non-Python program would: plain ZeroMQ sockets and JSON.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from pilot_agents import daemon, ipc
from pilot_agents.errors import ConnectionClosedError
from tests.conftest import DaemonHandle

Pair = tuple[DaemonHandle, DaemonHandle]


@pytest.fixture(scope="module")
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def req_socket(ctx: zmq.Context[Any], home: Path) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 15000)
    sock.connect(f"ipc://{home}/daemon.sock")
    return sock


def call(ctx: zmq.Context[Any], home: Path, request: dict[str, Any] | bytes) -> dict[str, Any]:
    """One request on a fresh REQ socket, exactly like the example in docs/ipc.md."""
    sock = req_socket(ctx, home)
    try:
        sock.send(request if isinstance(request, bytes) else json.dumps(request).encode())
        return json.loads(sock.recv())  # type: ignore[no-any-return]
    finally:
        sock.close()


def dealer(ctx: zmq.Context[Any], home: Path) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 15000)
    sock.connect(f"ipc://{home}/daemon.sock")
    return sock


def test_info_over_a_plain_req_socket(daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    a, _ = daemon_pair
    reply = call(context, a.home, {"cmd": "info", "id": 7})
    assert reply["ok"] is True and reply["id"] == 7
    assert reply["node_id"] == a.node_id and reply["hostname"] == "alpha"
    assert reply["pid"] == a.pid
    assert {"port": 1001, "publish": False, "buffered": 0, "received": 0} in reply["listening"] \
        or any(p["port"] == 1001 for p in reply["listening"])


def test_socket_and_home_are_owner_only(daemon_pair: Pair) -> None:
    a, _ = daemon_pair
    for name in ("daemon.sock", "pub.sock", "stream.sock"):
        mode = stat.S_IMODE((a.home / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert stat.S_IMODE(a.home.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe\x00", "not valid UTF-8 JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "no 'cmd' field"),
        (b'{"cmd": "launch_missiles"}', "unknown command 'launch_missiles'"),
        (b'{"cmd": 5}', "unknown command"),
        (b'{"cmd": "send", "target": "beta"}', "needs the field"),
        (b'{"cmd": "send", "target": "beta", "port": 70000, "data": "x"}', "port"),
        (b'{"cmd": "receive", "port": "many"}', "port"),
        (b'{"cmd": "info", "extra": 1}', "unknown field 'extra'"),
        (b'{"cmd": "send", "target": "beta", "port": 1, "data": "%%%", "encoding": "base64"}',
         "base64"),
        (b'{"cmd": "stream_send", "stream": "nope", "data": "x"}', "no open stream"),
        (b'{"cmd": "reply", "message": "m999999", "data": "x"}', "can no longer be replied"),
        (b'{"cmd": "trust_import", "request": "AAAA"}', "bad size"),
        (b"", "not valid UTF-8 JSON"),
    ],
)
def test_malformed_requests_get_error_replies(daemon_pair: Pair, context: zmq.Context[Any],
                                              body: bytes, fragment: str) -> None:
    a, _ = daemon_pair
    reply = call(context, a.home, body)
    assert reply["ok"] is False, reply
    assert set(reply["error"]) == {"type", "message"}
    assert fragment in reply["error"]["message"], reply
    assert call(context, a.home, {"cmd": "info"})["ok"] is True  # still alive


def test_bad_request_keeps_its_id(daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    a, _ = daemon_pair
    reply = call(context, a.home, {"cmd": "nope", "id": "abc"})
    assert reply == {"ok": False, "id": "abc", "error": {
        "type": "BadRequestError",
        "message": "unknown command 'nope' (see docs/ipc.md for the list)"}}


def test_garbage_frames_never_kill_the_daemon(daemon_pair: Pair,
                                              context: zmq.Context[Any]) -> None:
    a, _ = daemon_pair
    sock = dealer(context, a.home)
    try:
        sock.send_multipart([b"a", b"b", b"c", b"\x00" * 100])  # odd envelope
        sock.send(os.urandom(1 << 16))
        sock.send_multipart([b"", b'{"cmd": "info", "id": 1}'])  # REQ-style envelope on DEALER
        replies = [json.loads(sock.recv_multipart()[-1]) for _ in range(3)]
    finally:
        sock.close()
    assert [r["ok"] for r in replies].count(True) == 1
    assert call(context, a.home, {"cmd": "info"})["ok"] is True


def test_long_receive_does_not_block_other_requests(daemon_pair: Pair,
                                                    context: zmq.Context[Any]) -> None:
    a, _ = daemon_pair
    sock = dealer(context, a.home)
    try:
        sock.send(json.dumps({"cmd": "receive", "port": 4100, "timeout": 0.8, "id": 1}).encode())
        started = time.monotonic()
        sock.send(json.dumps({"cmd": "info", "id": 2}).encode())  # same socket, behind it
        first = json.loads(sock.recv())
        assert first["id"] == 2 and time.monotonic() - started < 0.6
        assert call(context, a.home, {"cmd": "trust_list"})["ok"]  # another client
        second = json.loads(sock.recv())
        assert second["id"] == 1
        assert second["error"]["type"] == "PilotTimeoutError"
    finally:
        sock.close()


def test_cancel_a_waiting_request(daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    a, _ = daemon_pair
    sock = dealer(context, a.home)
    try:
        sock.send(json.dumps({"cmd": "receive", "port": 4101, "timeout": 30, "id": 5}).encode())
        time.sleep(0.2)
        sock.send(json.dumps({"cmd": "cancel", "request": 5}).encode())
        assert json.loads(sock.recv()) == {"ok": True, "cancelled": True}
        info = call(context, a.home, {"cmd": "info"})
        assert all(p["port"] != 4101 for p in info["listening"])  # the temporary listen ended
    finally:
        sock.close()


def test_an_id_is_free_again_as_soon_as_its_answer_came(daemon_pair: Pair,
                                                        context: zmq.Context[Any]) -> None:
    """A client that reuses one id, each request sent once the last one's answer came: none is
    refused as still in flight (its task's clean-up may not have run yet when the next comes)."""
    a, b = daemon_pair
    count = 200
    assert call(context, a.home, {"cmd": "listen", "port": 4102})["ok"]
    sender, receiver = dealer(context, b.home), dealer(context, a.home)
    try:
        sender.send(json.dumps({"cmd": "connect", "target": "alpha", "port": 4102,
                                "id": 0}).encode())
        stream = json.loads(sender.recv())["stream"]
        for number in range(1, count + 1):
            sender.send(json.dumps({"cmd": "stream_send", "stream": stream, "data": str(number),
                                    "id": number}).encode())
        assert all(json.loads(sender.recv())["ok"] for _ in range(count))
        for number in range(1, count + 1):  # each answered by a task of its own, at once
            sent = {"cmd": "receive", "port": 4102, "timeout": 5, "id": 1}
            receiver.send(json.dumps(sent).encode())
            answer = json.loads(receiver.recv())
            assert answer["ok"] and answer["message"]["data"] == str(number), answer
    finally:
        sender.close()
        receiver.close()
        call(context, a.home, {"cmd": "unlisten", "port": 4102})


def test_messages_streams_and_replies_raw(daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    a, b = daemon_pair
    assert call(context, b.home, {"cmd": "listen", "port": 4200})["created"] is True
    opened = call(context, a.home, {"cmd": "connect", "target": "beta", "port": 4200})
    assert opened["ok"], opened
    assert (opened["peer"], opened["hostname"], opened["path"]) == (b.node_id, "beta", "direct")
    stream = opened["stream"]
    assert call(context, a.home, {"cmd": "stream_send", "stream": stream,
                                  "data": "question"})["bytes"] == 8
    got = call(context, b.home, {"cmd": "receive", "port": 4200, "timeout": 5})
    message = got["message"]
    assert (message["data"], message["encoding"], message["from"], message["hostname"],
            message["port"]) == ("question", "utf-8", a.node_id, "alpha", 4200)
    assert call(context, b.home, {"cmd": "reply", "message": message["id"],
                                  "data": "AAEC/w==", "encoding": "base64"})["bytes"] == 4
    answer = call(context, a.home, {"cmd": "stream_receive", "stream": stream, "timeout": 5})
    assert (answer["message"]["data"], answer["message"]["encoding"]) == ("AAEC/w==", "base64")
    assert call(context, a.home, {"cmd": "stream_drain", "stream": stream})["ok"]
    assert call(context, a.home, {"cmd": "stream_hold", "stream": stream, "timeout": 30})["ok"]
    assert call(context, a.home, {"cmd": "stream_close", "stream": stream})["ok"]
    closed = call(context, a.home, {"cmd": "stream_send", "stream": stream, "data": "x"})
    assert closed["error"]["type"] == "ConnectionClosedError"
    assert "unseen_after_restart" not in closed["error"]  # closed by us, not a restart
    held = call(context, a.home, {"cmd": "stream_hold", "stream": stream, "timeout": 30})
    assert held["error"]["type"] == "ConnectionClosedError"
    assert call(context, b.home, {"cmd": "unlisten", "port": 4200})["closed"] is True


def test_one_shot_send_and_inbox_buffering(daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    """Port 1001 is listened on from the start: messages wait there until someone reads."""
    a, b = daemon_pair
    for i in range(3):
        sent = call(context, a.home, {"cmd": "send", "target": b.node_id, "port": 1001,
                                      "data": f"m{i}"})
        assert sent["ok"] and sent["bytes"] == 2, sent
    got = [call(context, b.home, {"cmd": "receive", "port": 1001, "timeout": 5})["message"]
           ["data"] for _ in range(3)]
    assert got == ["m0", "m1", "m2"]


def test_message_is_requeued_when_its_receiver_vanished(daemon_pair: Pair,
                                                        context: zmq.Context[Any]) -> None:
    a, b = daemon_pair
    assert call(context, b.home, {"cmd": "listen", "port": 4300})["ok"]
    try:
        gone = dealer(context, b.home)
        gone.send(json.dumps({"cmd": "receive", "port": 4300, "timeout": 30, "id": 1}).encode())
        time.sleep(0.2)
        gone.close()  # the client dies while the daemon waits for a message for it
        time.sleep(0.1)
        assert call(context, a.home, {"cmd": "send", "target": "beta", "port": 4300,
                                      "data": "precious"})["ok"]
        got = call(context, b.home, {"cmd": "receive", "port": 4300, "timeout": 5})
        assert got["ok"] and got["message"]["data"] == "precious", got
    finally:
        call(context, b.home, {"cmd": "unlisten", "port": 4300})


def test_published_port_reaches_a_plain_sub_socket(daemon_pair: Pair,
                                                   context: zmq.Context[Any]) -> None:
    a, b = daemon_pair
    listened = call(context, b.home, {"cmd": "listen", "port": 4400, "publish": True})
    assert listened["pub_endpoint"] == f"ipc://{b.home}/pub.sock"
    assert listened["topic"] == "04400"
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, 10000)
    sub.setsockopt(zmq.SUBSCRIBE, b"04400")
    sub.connect(listened["pub_endpoint"])
    try:
        time.sleep(0.2)  # a SUB misses what is published before it is connected
        assert call(context, a.home, {"cmd": "send", "target": "beta", "port": 4400,
                                      "data": "broadcast"})["ok"]
        topic, meta, data = sub.recv_multipart()
        assert (topic, data) == (b"04400", b"broadcast")
        assert json.loads(meta)["from"] == a.node_id
        refused = call(context, b.home, {"cmd": "receive", "port": 4400, "timeout": 1})
        assert refused["error"]["type"] == "ConfigError" and "subscribe" in \
            refused["error"]["message"]
    finally:
        sub.close()
        call(context, b.home, {"cmd": "unlisten", "port": 4400})


def test_untrusted_and_unknown_targets(daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    a, _ = daemon_pair
    from pilot_agents.identity import Identity

    stranger = Identity.generate().node_id
    reply = call(context, a.home, {"cmd": "send", "target": stranger, "port": 1001, "data": "x"})
    assert reply["error"]["type"] == "NotTrustedError"
    assert f"pilotctl trust add {stranger}" in reply["error"]["message"]
    reply = call(context, a.home, {"cmd": "resolve", "name": "nobody"})
    assert reply["error"]["type"] == "UnknownHostError"


def test_a_restarted_peers_stream_error_says_what_it_never_acknowledged() -> None:
    """The field travels with the error, which keeps its type; a bad value is ignored."""
    error = ipc.mark_restarted(ConnectionClosedError("the peer restarted"), 2154)
    reply = ipc.error_reply(error, 7)
    assert reply["error"]["unseen_after_restart"] == 2154
    back = ipc.error_of(json.loads(json.dumps(reply)))
    assert type(back) is ConnectionClosedError and ipc.unseen_after_restart(back) == 2154
    for bad in (-1, "12", True, None):
        reply["error"]["unseen_after_restart"] = bad
        assert ipc.unseen_after_restart(ipc.error_of(reply)) is None
    assert "unseen_after_restart" not in ipc.error_reply(ConnectionClosedError("x"))["error"]


def test_commands_table_matches_the_docs() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "ipc.md").read_text()
    for cmd in daemon.COMMANDS:
        assert f"`{cmd}`" in doc, f"docs/ipc.md does not document {cmd!r}"


def frames_call(ctx: zmq.Context[Any], home: Path, request: dict[str, Any],
                *payload: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """One request of a JSON header and payload frames, as docs/ipc.md (Framing) shows; the
    reply's header and the frames after it."""
    sock = req_socket(ctx, home)
    try:
        sock.send_multipart([json.dumps(request).encode(), *payload])
        header, *rest = sock.recv_multipart()
        return json.loads(header), rest
    finally:
        sock.close()


def test_payloads_as_frames_raw(daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    a, b = daemon_pair
    binary = bytes(range(256)) * 1000
    assert call(context, b.home, {"cmd": "listen", "port": 4201})["ok"]
    stream = call(context, a.home, {"cmd": "connect", "target": "beta", "port": 4201})["stream"]
    sent, extra = frames_call(context, a.home, {"cmd": "stream_send", "stream": stream}, binary)
    assert sent["bytes"] == len(binary) and extra == []
    got, frames = frames_call(context, b.home, {"cmd": "receive", "port": 4201, "timeout": 5,
                                                "data_frame": True})
    assert frames == [binary] and "data" not in got["message"]
    replied, _ = frames_call(context, b.home, {"cmd": "reply", "message": got["message"]["id"]},
                             b"")  # an empty payload is a payload
    assert replied["bytes"] == 0, replied
    answer, frames = frames_call(context, a.home, {"cmd": "stream_receive", "stream": stream,
                                                   "timeout": 5, "data_frame": True})
    assert answer["ok"] and frames == [b""]
    assert call(context, a.home, {"cmd": "stream_close", "stream": stream})["ok"]


@pytest.mark.parametrize(("request_", "payload", "fragment"), [
    ({"cmd": "info"}, [b"x"], "takes no payload frame"),
    ({"cmd": "send", "target": "beta", "port": 1, "data": "x"}, [b"x"], "both"),
    ({"cmd": "send", "target": "beta", "port": 1}, [], "needs its payload"),
    ({"cmd": "send", "target": "beta", "port": 1}, [b"x", b"y"], "at most one payload frame"),
])
def test_bad_frames_are_bad_requests(daemon_pair: Pair, context: zmq.Context[Any],
                                     request_: dict[str, Any], payload: list[bytes],
                                     fragment: str) -> None:
    reply, _ = frames_call(context, daemon_pair[0].home, {**request_, "id": 3}, *payload)
    assert reply["id"] == 3 and reply["error"]["type"] == "BadRequestError", reply
    assert fragment in reply["error"]["message"]


def test_deliver_pushes_within_credit_raw(daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    a, b = daemon_pair
    assert call(context, b.home, {"cmd": "listen", "port": 4202})["ok"]
    for n in range(3):
        assert call(context, a.home, {"cmd": "send", "target": "beta", "port": 4202,
                                      "data": f"m{n}"})["ok"]
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(f"ipc://{b.home}/daemon.sock")
    try:
        dealer.send_json({"cmd": "deliver", "id": 9, "port": 4202, "credit_messages": 2})
        pushed = [dealer.recv_multipart() for _ in range(2)]
        assert [frames[1] for frames in pushed] == [b"m0", b"m1"]
        assert all(json.loads(frames[0])["id"] == 9 for frames in pushed)
        assert not dealer.poll(300)  # credit spent: the third waits
        dealer.send_json({"cmd": "credit", "id": 10, "request": 9, "messages": 1, "bytes": 2})
        replies = [dealer.recv_multipart() for _ in range(2)]
        by_id = {json.loads(frames[0])["id"]: frames for frames in replies}
        assert json.loads(by_id[10][0])["granted"] is True and by_id[9][1] == b"m2"
        dealer.send_json({"cmd": "cancel", "id": 11, "request": 9})
        assert json.loads(dealer.recv_multipart()[0]) == {"ok": True, "cancelled": True, "id": 11}
    finally:
        dealer.close()


def stream_call(sock: socket.socket, header: dict[str, Any], payload: bytes | None = None,
                ) -> tuple[dict[str, Any], bytes | None]:
    """One request on the stream socket, framed by hand as docs/ipc.md says."""
    stream_send(sock, header, payload)
    return stream_read(sock)


def stream_send(sock: socket.socket, header: dict[str, Any], payload: bytes | None = None,
                ) -> None:
    body = json.dumps(header).encode()
    if payload is None:
        sock.sendall(struct.pack("!BII", 1, len(body), 0) + body)
    else:
        sock.sendall(struct.pack("!BII", 2, len(body), len(payload)) + body + payload)


def stream_read(sock: socket.socket) -> tuple[dict[str, Any], bytes | None]:
    """The next message the daemon sends on the stream socket: its header and payload."""
    count, size, length = struct.unpack("!BII", recv_exactly(sock, 9))
    reply = json.loads(recv_exactly(sock, size))
    return reply, recv_exactly(sock, length) if count == 2 else None


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the daemon closed the stream socket"
        data += chunk
    return data


def stream_socket(home: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(str(home / "stream.sock"))
    return sock


def test_the_stream_socket_speaks_the_same_requests(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    with stream_socket(a.home) as sock:
        reply, frame = stream_call(sock, {"cmd": "info", "id": 1})
        assert reply["ok"] and reply["id"] == 1 and reply["node_id"] == a.node_id
        assert frame is None
        reply, _ = stream_call(sock, {"cmd": "send", "id": 2, "target": "beta", "port": 1001},
                               b"\xff\x00 framed")
        assert reply["ok"] and reply["bytes"] == 9, reply
    with stream_socket(b.home) as sock:
        reply, frame = stream_call(sock, {"cmd": "receive", "id": "r", "port": 1001,
                                          "timeout": 10, "data_frame": True})
        assert reply["ok"] and reply["message"]["from"] == a.node_id
        assert frame == b"\xff\x00 framed"


@pytest.mark.parametrize("garbage", [
    b"\x07" + b"\x00" * 8,  # seven frames
    struct.pack("!BII", 1, 2**31, 0),  # a header far over the bounds
    struct.pack("!BII", 1, 3, 5) + b"abc",  # one frame, with a payload length
    struct.pack("!BII", 1, 0, 0),  # an empty header
], ids=["frames", "oversize", "inconsistent", "empty"])
def test_garbage_on_the_stream_socket_drops_only_that_client(daemon_pair: Pair,
                                                             garbage: bytes) -> None:
    a, _ = daemon_pair
    with stream_socket(a.home) as sock:
        sock.sendall(garbage)
        assert sock.recv(1) == b""  # dropped
    with stream_socket(a.home) as sock:
        assert stream_call(sock, {"cmd": "info"})[0]["ok"] is True


def test_the_stream_framing_survives_any_split() -> None:
    from pilot_agents.ipc import FrameReader, pack_frames

    messages = [[b'{"a":1}'], [b'{"b":2}', b"payload" * 1000], [b'{"c":3}', b""], [b"{}"]]
    wire = b"".join(b"".join(pack_frames(m)) for m in messages)
    for step in (1, 2, 7, 9, 100, 4096, len(wire)):
        reader = FrameReader(1 << 20)
        got = []
        for at in range(0, len(wire), step):
            got += reader.feed(wire[at:at + step])
        assert got == messages, step


def test_the_late_failures_of_an_abandoned_sink_are_dropped(tmp_path: Path) -> None:
    """A sender that aborted its stream gave up what it sent: failures that come back after
    are not the application's (they would make its next Client.flush() raise); those of a
    sender merely closed still reach the client's orphan handler."""
    client = ipc.IpcClient(tmp_path)
    orphans: list[str] = []
    client.orphan_errors = lambda error, about="": orphans.append(about)
    closed, aborted = client.add_sink(print), client.add_sink(print)
    client.remove_sink(closed)
    client.remove_sink(aborted, abandoned=True)
    client.fail_sink(closed, ConnectionClosedError("the peer restarted"), "s1")
    client.fail_sink(aborted, ConnectionClosedError("the peer restarted"), "s2")
    assert orphans == ["s1"]
