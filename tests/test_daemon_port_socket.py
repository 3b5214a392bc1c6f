"""A port's data socket (docs/ipc.md, A port's messages on a data socket) spoken raw, as a
non-Python program would: a plain unix socket to beta's stream.sock, a ``port_attach`` as its
first request, then the port's messages tagged by way and the replies back, each framed with a
kind byte. The requesters are alpha's streams, driven over plain ZeroMQ."""

from __future__ import annotations

import contextlib
import json
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pilot_agents import ipc
from pilot_agents.daemon import DaemonOptions, start_detached
from tests.conftest import ROOT, DaemonHandle, ipc_call, stop_daemons
from tests.datasock_helpers import (
    WAIT,
    FramedSocket,
    assert_clean_logs,
    connect,
    payload,
    receive,
    started,
)
from tests.test_ipc import stream_call, stream_socket

Pair = tuple[DaemonHandle, DaemonHandle]
MiB = 1024 * 1024
BOUND = 8 * MiB  # the Node's SEND_HIGH_WATER: a stream's unacknowledged bytes with room
QUIET = 0.3  # seconds in which nothing more coming means nothing will (it comes in ms)

_WAY = struct.Struct("!I")
_NUMBERED = struct.Struct("!BI")  # a kind, then a way or a count
_REPLY = struct.Struct("!BIB")  # ... and a reply's flags
_CREDIT = struct.Struct("!BII")  # a kind, then messages and bytes
CLOSE, SYNC = bytes([ipc.PORT_CLOSE]), bytes([ipc.PORT_SYNC])


def reply_header(way: int, flags: int = 0) -> bytes:
    return _REPLY.pack(ipc.PORT_REPLY, way, flags)


def taken_header(count: int) -> bytes:
    return _NUMBERED.pack(ipc.PORT_TAKEN, count)


def credit_header(messages: int, size: int = 4 * MiB) -> bytes:
    return _CREDIT.pack(ipc.PORT_CREDIT, messages, size)


def arrival_header(way: int) -> bytes:
    return _NUMBERED.pack(ipc.PORT_ARRIVAL, way)


class PortSocket(FramedSocket):
    """The listener's end of a port's data socket."""

    def attach(self, port: int, credit_messages: int = 64,
               credit_bytes: int = 4 * MiB) -> dict[str, Any]:
        self.write([json.dumps({"cmd": "port_attach", "id": 1, "port": port,
                                "credit_messages": credit_messages,
                                "credit_bytes": credit_bytes}).encode()])
        return json.loads(self.next()[0])  # type: ignore[no-any-return]

    def message(self) -> tuple[int, dict[str, Any] | None, bytes]:
        """The next message on the port: its way, its meta (on the way's first message on
        this socket, else None), its payload."""
        frames = self.next()
        assert frames[0][0] == ipc.PORT_MESSAGE and len(frames) == 2, frames
        header, data = frames
        (way,) = _WAY.unpack_from(header, 1)
        return way, json.loads(header[5:]) if len(header) > 5 else None, data

    def numbered(self, kind: int) -> tuple[int, dict[str, Any] | None]:
        """The next message, of ``kind`` (way ended, way closed, confirmed): its way, and the
        JSON after it if any."""
        (header,) = self.next()
        assert header[0] == kind, header
        (way,) = _WAY.unpack_from(header, 1)
        return way, json.loads(header[5:]) if len(header) > 5 else None

    def reply(self, way: int, data: bytes, flags: int = 0) -> None:
        self.write([reply_header(way, flags), data])

    def taken(self, count: int) -> None:
        self.write([taken_header(count)])

    def credit(self, messages: int, size: int = 4 * MiB) -> None:
        self.write([credit_header(messages, size)])

    def sync(self) -> None:
        """Every message before the ``synced`` that answers a sync (way ended first)."""
        self.write([SYNC])
        assert self.answer(ipc.PORT_SYNCED) == {"ok": True}

    def assert_dropped(self) -> None:
        """The daemon drops the connection: reset, or closed (after a 'closed' if the client
        sent 'close' first, an 'ended' saying why if it sent what is refused)."""
        assert self._messages == []
        with contextlib.suppress(ConnectionResetError):
            while data := self.sock.recv(1 << 20):
                for m in self._reader.feed(data):
                    assert m == [bytes([ipc.DATA_CLOSED]) + b'{"ok":true}'] or (
                        m[0][0] == ipc.DATA_ENDED
                        and json.loads(m[0][1:])["error"]["type"] == "BadRequestError"), m

    def assert_quiet(self) -> None:
        """Nothing more comes (for QUIET seconds)."""
        self.sock.settimeout(QUIET)
        try:
            with pytest.raises(TimeoutError):
                self.next()
        finally:
            self.sock.settimeout(WAIT)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """alpha, whose streams ask, and beta, whose port socket answers."""
    a, b = started(("alpha", {}), ("beta", {}))
    try:
        yield a, b
        assert_clean_logs(a, b)
    finally:
        stop_daemons(a.home, b.home)


@pytest.fixture
def sock(pair: Pair) -> Iterator[PortSocket]:
    """A port socket to beta (to attach)."""
    sock = PortSocket(pair[1])
    yield sock
    sock.close()


_ports = iter(range(7800, 7900))


def new_port() -> int:
    """A port of its own for each test, that nobody listens on yet."""
    return next(_ports)


def ask(a: DaemonHandle, port: int, *texts: str) -> str:
    """A stream from alpha to beta's ``port`` that sends ``texts``."""
    stream = connect(a, port)
    for text in texts:
        send_on(a, stream, text)
    return stream


def send_on(a: DaemonHandle, stream: str, text: str) -> None:
    reply = ipc_call(a.home, cmd="stream_send", stream=stream, data=text)
    assert reply["ok"], reply


def answer(a: DaemonHandle, stream: str) -> bytes:
    """The next message on alpha's stream (a reply from beta's listener)."""
    reply = ipc_call(a.home, cmd="stream_receive", stream=stream, timeout=WAIT)
    assert reply["ok"], reply
    return payload(reply["message"])  # type: ignore[arg-type]


def listening(daemon: DaemonHandle) -> set[int]:
    info = ipc_call(daemon.home, cmd="info")
    return {entry["port"] for entry in info["listening"]}  # type: ignore[attr-defined]


def reset_soon(a: DaemonHandle, stream: str, started_at: float) -> str:
    """alpha's receive on ``stream`` fails, as the stream was reset, long before any idle
    timeout: its error message."""
    reply = ipc_call(a.home, cmd="stream_receive", stream=stream, timeout=WAIT)
    assert not reply["ok"], reply
    error: dict[str, str] = reply["error"]  # type: ignore[assignment]
    assert error["type"] == "ConnectionClosedError", reply
    assert time.monotonic() - started_at < 3.0, "the reset took its time"
    return error["message"]


# -- the port's messages and their replies ---------------------------------------------------------


def test_messages_come_by_way_with_who_sent_them_on_a_ways_first(pair: Pair,
                                                                 sock: PortSocket) -> None:
    a, _ = pair
    port = new_port()
    assert sock.attach(port) == {"ok": True, "id": 1, "port": port, "bounded_replies": True}
    ask(a, port, "one", "two")
    way, meta, data = sock.message()
    assert data == b"one" and way > 0
    assert meta is not None and set(meta) == {"from", "hostname", "source_port"}, meta
    assert meta["from"] == a.node_id and meta["hostname"] == "alpha", meta
    assert isinstance(meta["source_port"], int) and 0 < meta["source_port"] < 65536, meta
    assert sock.message() == (way, None, b"two")  # the same stream: the same way, no meta
    ask(a, port, "three")
    other, meta2, data = sock.message()
    assert data == b"three" and other != way, (way, other)
    assert meta2 is not None and meta2["from"] == a.node_id, meta2


def test_a_reply_goes_back_on_its_way_and_confirm_is_answered(pair: Pair,
                                                              sock: PortSocket) -> None:
    a, _ = pair
    port = new_port()
    assert sock.attach(port)["ok"]
    first, second = ask(a, port, "q1"), ask(a, port, "q2")
    way1, _, _ = sock.message()
    way2, _, _ = sock.message()
    sock.reply(way2, b"a2")
    sock.reply(way1, b"\x00binary\xff")
    assert answer(a, first) == b"\x00binary\xff"
    assert answer(a, second) == b"a2"
    sock.reply(way1, b"again", ipc.PORT_REPLY_CONFIRM)
    assert sock.numbered(ipc.PORT_CONFIRMED) == (way1, None)  # the stream has room: at once
    assert answer(a, first) == b"again"
    sock.reply(way1, b"unconfirmed")  # no flag: nothing comes back
    sock.sync()
    assert answer(a, first) == b"unconfirmed"


def test_credit_bounds_the_messages_written_until_taken(pair: Pair, sock: PortSocket) -> None:
    a, _ = pair
    port = new_port()
    assert sock.attach(port, credit_messages=2)["ok"]
    ask(a, port, "m0", "m1", "m2", "m3", "m4")
    assert [sock.message()[2] for _ in range(2)] == [b"m0", b"m1"]
    sock.assert_quiet()
    sock.taken(1)
    assert sock.message()[2] == b"m2"
    sock.assert_quiet()
    sock.taken(2)
    assert [sock.message()[2] for _ in range(2)] == [b"m3", b"m4"]


def test_credit_in_bytes_is_overshot_by_one_message_at_most(pair: Pair,
                                                            sock: PortSocket) -> None:
    a, _ = pair
    port = new_port()
    assert sock.attach(port, credit_bytes=10)["ok"]
    ask(a, port, "8 bytes0", "8 bytes1", "8 bytes2", "8 bytes3")
    # 0 < 10 bytes written: one goes; 8 < 10: one more; 16: no room.
    assert [sock.message()[2] for _ in range(2)] == [b"8 bytes0", b"8 bytes1"]
    sock.assert_quiet()
    sock.taken(1)  # 8 bytes written and not taken: one more
    assert sock.message()[2] == b"8 bytes2"
    sock.assert_quiet()
    sock.taken(2)
    assert sock.message()[2] == b"8 bytes3"


def test_an_attach_without_credit_writes_nothing_until_credit_is_given(
        pair: Pair, sock: PortSocket) -> None:
    a, _ = pair
    port = new_port()
    assert sock.attach(port, credit_messages=0, credit_bytes=0)["ok"]
    ask(a, port, "m0", "m1", "m2", "m3")
    sock.assert_quiet()
    sock.credit(1)
    assert sock.message()[2] == b"m0"
    sock.assert_quiet()
    sock.credit(3)  # in place of the last: one written and not taken, so two more
    assert [sock.message()[2] for _ in range(2)] == [b"m1", b"m2"]
    sock.credit(0, 0)
    sock.taken(3)
    sock.assert_quiet()  # nothing written, nothing owed: still no credit
    sock.credit(64)
    assert sock.message()[2] == b"m3"


def test_the_daemon_holds_no_more_than_max_payload_bytes_for_one_client() -> None:
    """A client that gives 4 GiB of credit and does not read can't make the daemon hold more
    than it would on the requests' path."""
    a, b = started(("alpha", {}), ("beta", {"max_payload_bytes": MiB}))
    sock = PortSocket(b)
    try:
        port = new_port()
        assert sock.attach(port, credit_bytes=2**32 - 1)["ok"]
        big = "x" * (600 * 1024)
        ask(a, port, big, big, big)
        # 0 < 1 MiB: one goes; 600 KiB < 1 MiB: one more; 1.2 MiB: no room.
        assert [len(sock.message()[2]) for _ in range(2)] == [len(big)] * 2
        sock.assert_quiet()
        sock.taken(1)
        assert len(sock.message()[2]) == len(big)
        ask(a, port, big)
        sock.credit(64, 2**32 - 1)  # a credit frame is held to the same bound
        sock.assert_quiet()
        sock.taken(2)
        assert len(sock.message()[2]) == len(big)
    finally:
        sock.close()
        stop_daemons(a.home, b.home)


def test_the_daemon_holds_no_more_messages_than_their_overhead_fits_in_max_payload_bytes(
        ) -> None:
    """Empty messages cost memory too: the daemon takes as many messages of credit as
    max_payload_bytes holds at the tunnel's 320 bytes a message (here 3200 // 320 = 10)."""
    a, b = started(("alpha", {}), ("beta", {"max_payload_bytes": 3200}))
    sock = PortSocket(b)
    try:
        port = new_port()
        assert sock.attach(port, credit_messages=64, credit_bytes=2**32 - 1)["ok"]
        ask(a, port, *(f"m{i}" for i in range(12)))
        assert [sock.message()[2] for _ in range(10)] == [b"m%d" % i for i in range(10)]
        sock.assert_quiet()
        sock.taken(1)
        assert sock.message()[2] == b"m10"
        sock.credit(2**20, 2**32 - 1)  # a credit frame is held to the same bound
        sock.assert_quiet()
        sock.taken(1)
        assert sock.message()[2] == b"m11"
    finally:
        sock.close()
        stop_daemons(a.home, b.home)


def test_a_client_that_ignores_confirmations_is_held_back_not_buffered() -> None:
    """Replies without the confirm flag to a requester that does not read: once its stream is
    over its bound by more than max_payload_bytes, the daemon stops reading the socket (the
    client's writes wait) until the stream has room, rather than hold whatever comes."""
    a, b = started(("alpha", {"inbox_bytes": MiB}), ("beta", {"max_payload_bytes": MiB}))
    sock, reader = PortSocket(b), FramedSocket(a)
    try:
        port = new_port()
        assert sock.attach(port)["ok"]
        stream = ask(a, port, "q")
        way, _, _ = sock.message()
        # What would all go to alpha: its inbox (1 MiB), its node's stream window (16 MiB),
        # beta's stream bound (8 MiB), and more than the 1 MiB beta lets it be over by.
        count, reply = 48, b"r" * (MiB - 64)
        writer = threading.Thread(
            target=sock.write, args=[[reply_header(way), reply]] * count, daemon=True)
        writer.start()
        writer.join(5.0)
        assert writer.is_alive(), "the daemon took 48 MiB of replies nobody reads"
        reader.write([json.dumps({"cmd": "stream_attach", "id": 1,
                                  "stream": stream}).encode()])
        assert json.loads(reader.next()[0])["ok"]
        for _ in range(count):  # alpha reads: room again, and every reply comes, in order
            kind, data = reader.next()
            assert kind == bytes([ipc.DATA_MESSAGE]) and data == reply
        writer.join(WAIT)
        assert not writer.is_alive()
    finally:
        sock.close()
        reader.close()
        stop_daemons(a.home, b.home)


# -- the end ---------------------------------------------------------------------------------------


def test_close_gives_what_was_not_taken_back_to_the_port_in_order(pair: Pair,
                                                                  sock: PortSocket) -> None:
    a, b = pair
    port = new_port()
    assert ipc_call(b.home, cmd="listen", port=port)["ok"]  # the port stays after the close
    try:
        assert sock.attach(port)["ok"]
        stream = ask(a, port, "m0", "m1", "m2", "m3")
        got = [sock.message() for _ in range(4)]
        assert [data for _, _, data in got] == [b"m0", b"m1", b"m2", b"m3"]
        sock.taken(1)
        sock.write([CLOSE])
        assert sock.answer(ipc.DATA_CLOSED) == {"ok": True}
        sock.assert_closed()
        # Another reader has the three, oldest first; they can still be replied to.
        with contextlib.closing(PortSocket(b)) as other:
            assert other.attach(port)["ok"]
            again = [other.message() for _ in range(3)]
            assert [data for _, _, data in again] == [b"m1", b"m2", b"m3"]
            way, meta, _ = again[0]
            assert meta is not None and meta["from"] == a.node_id  # a new way on this socket
            other.reply(way, b"answered by the other")
            assert answer(a, stream) == b"answered by the other"
            other.taken(3)
            other.write([CLOSE])
            assert other.answer(ipc.DATA_CLOSED) == {"ok": True}
        send_on(a, stream, "m4")
        assert payload(receive(b, port)) == b"m4"
    finally:
        ipc_call(b.home, cmd="unlisten", port=port)


def test_a_client_that_leaves_without_close_resets_the_streams_it_owes(
        pair: Pair, sock: PortSocket) -> None:
    a, b = pair
    port = new_port()
    assert ipc_call(b.home, cmd="listen", port=port)["ok"]  # the port stays after the drop
    try:
        assert sock.attach(port)["ok"]
        answered, owed = ask(a, port, "answered"), ask(a, port, "owed")
        way, _, _ = sock.message()
        sock.message()
        sock.reply(way, b"answer")
        sock.sync()
        assert answer(a, answered) == b"answer"
        ask(a, port, "not taken")
        assert sock.message()[2] == b"not taken"
        left = time.monotonic()
        sock.close()
        message = reset_soon(a, owed, left)
        assert "reset" in message or "cancel" in message, message
        # The stream answered is not reset; what was not taken is not put back (at most once).
        send_on(a, answered, "still here")
        assert payload(receive(b, port)) == b"still here"
        nothing = ipc_call(b.home, cmd="receive", port=port, timeout=QUIET)
        assert nothing["error"]["type"] == "PilotTimeoutError", nothing  # type: ignore[index]
    finally:
        ipc_call(b.home, cmd="unlisten", port=port)


def test_sync_and_arrival_are_answered_in_order_with_close(pair: Pair,
                                                           sock: PortSocket) -> None:
    a, _ = pair
    port = new_port()
    assert sock.attach(port)["ok"]
    ask(a, port, "q")
    way, _, _ = sock.message()
    sock.taken(1)
    sock.write([arrival_header(way)], [SYNC], [arrival_header(way)], [CLOSE])
    arrived = sock.answer(ipc.PORT_ARRIVED)
    assert arrived["ok"] is True and isinstance(arrived["since"], float), arrived
    assert 0 <= arrived["since"] < WAIT, arrived
    assert sock.answer(ipc.PORT_SYNCED) == {"ok": True}
    assert sock.answer(ipc.PORT_ARRIVED)["ok"]
    assert sock.answer(ipc.DATA_CLOSED) == {"ok": True}
    sock.assert_closed()


# -- attaching -------------------------------------------------------------------------------------


def test_a_published_port_or_a_late_attach_is_refused(pair: Pair) -> None:
    b = pair[1]
    port = new_port()
    assert ipc_call(b.home, cmd="listen", port=port, publish=True)["ok"]
    attach = {"cmd": "port_attach", "id": "x", "port": port, "credit_messages": 8,
              "credit_bytes": MiB}
    try:
        with stream_socket(b.home) as raw:
            reply, _ = stream_call(raw, attach)
            assert reply["ok"] is False and reply["id"] == "x", reply
            assert reply["error"]["type"] == "ConfigError", reply
            info, _ = stream_call(raw, {"cmd": "info", "id": 2})  # still an ordinary connection
            assert info["ok"]
    finally:
        ipc_call(b.home, cmd="unlisten", port=port)
    with stream_socket(b.home) as raw:
        assert stream_call(raw, {"cmd": "info", "id": 1})[0]["ok"]
        reply, _ = stream_call(raw, {**attach, "port": new_port()})  # not the first request
        assert reply["error"]["type"] == "BadRequestError", reply
        assert "first request" in reply["error"]["message"], reply
        assert stream_call(raw, {"cmd": "info", "id": 3})[0]["ok"]  # and it goes on
    zeromq = ipc_call(b.home, cmd="port_attach", port=new_port(), credit_messages=8,
                      credit_bytes=MiB)
    assert zeromq["error"]["type"] == "BadRequestError", zeromq  # type: ignore[index]
    with stream_socket(b.home) as raw:
        reply, _ = stream_call(raw, {**attach, "credit_messages": -1})
        assert reply["error"]["type"] == "BadRequestError", reply
    assert not listening(b) & {port, port + 1, port + 2}  # no refusal left a listen behind


def test_the_port_is_listened_on_while_attached(pair: Pair, sock: PortSocket) -> None:
    a, b = pair
    port = new_port()
    assert port not in listening(b)
    assert sock.attach(port)["ok"]
    assert port in listening(b)
    sent = ipc_call(a.home, cmd="send", target="beta", port=port, data="one-shot")
    assert sent["ok"], sent
    way, meta, data = sock.message()
    assert data == b"one-shot" and meta is not None
    sock.taken(1)
    # The one-shot's stream ends once it is delivered: said at once, as any way's end is.
    assert sock.numbered(ipc.PORT_WAY_CLOSED)[0] == way
    sock.write([CLOSE])
    assert sock.answer(ipc.DATA_CLOSED) == {"ok": True}
    sock.assert_closed()
    assert port not in listening(b)
    refused = ipc_call(a.home, cmd="send", target="beta", port=port, data="too late", timeout=5)
    assert not refused["ok"], refused
    assert "not listening" in refused["error"]["message"], refused  # type: ignore[index]


# -- ways that end ---------------------------------------------------------------------------------


def test_a_way_whose_stream_ended_is_said_closed_at_once_and_replies_on_it_fail(
        pair: Pair, sock: PortSocket) -> None:
    """The client hears of the end unasked (a replier stops work for a requester that went
    away), and a reply on the way is answered 'way ended'."""
    a, _ = pair
    port = new_port()
    assert sock.attach(port)["ok"]
    gone, alive = ask(a, port, "gone"), ask(a, port, "alive")
    way, _, _ = sock.message()
    live_way, _, _ = sock.message()
    sock.taken(2)
    assert ipc_call(a.home, cmd="stream_abort", stream=gone)["ok"]
    closed_way, closed = sock.numbered(ipc.PORT_WAY_CLOSED)
    assert closed_way == way and closed is not None and closed["ok"] is False, closed
    assert closed["error"]["type"] == "ConnectionClosedError", closed
    assert "cancelled" in closed["error"]["message"], closed  # (stream_abort's reason)
    sock.reply(way, b"too late")
    ended_way, ended = sock.numbered(ipc.PORT_WAY_ENDED)
    assert ended_way == way and ended is not None and ended["ok"] is False, ended
    assert ended["error"]["type"] == "ConnectionClosedError", ended
    sock.sync()  # after the failure it answers for
    # The number is forgotten: a reply on it again fails the same, and the socket goes on.
    sock.reply(way, b"still too late")
    again_way, again = sock.numbered(ipc.PORT_WAY_ENDED)
    assert again_way == way and again is not None and again["ok"] is False, again
    sock.reply(live_way, b"fine")
    assert answer(a, alive) == b"fine"
    ask(a, port, "new")
    new_way, meta, data = sock.message()
    assert data == b"new" and meta is not None and new_way not in (way, live_way)


def test_ways_whose_streams_ended_are_forgotten_and_said_closed(pair: Pair,
                                                                sock: PortSocket) -> None:
    """Past 64 ways known beyond those live at the last look, the daemon forgets the ended
    ones and says 'way closed' for each, before the message that made it look."""
    a, _ = pair
    port = new_port()
    assert sock.attach(port, credit_messages=1000)["ok"]
    streams = [ask(a, port, f"q{n}") for n in range(64)]
    ways = [sock.message()[0] for _ in streams]
    assert len(set(ways)) == 64
    sock.reply(ways[0], b"a0")
    assert answer(a, streams[0]) == b"a0"
    for stream in streams:
        assert ipc_call(a.home, cmd="stream_close", stream=stream)["ok"]
    kept = ask(a, port, "the 65th")
    closed = {}
    while (frames := sock.next())[0][0] == ipc.PORT_WAY_CLOSED:
        (number,) = _WAY.unpack_from(frames[0], 1)
        closed[number] = json.loads(frames[0][5:])
    assert set(closed) == set(ways), sorted(closed)
    assert all(c["error"]["type"] == "ConnectionClosedError" for c in closed.values()), closed
    header, data = frames
    assert header[0] == ipc.PORT_MESSAGE and data == b"the 65th"
    (last,) = _WAY.unpack_from(header, 1)
    # A reply on a forgotten way is answered 'way ended'; arrival knows nothing of it.
    sock.reply(ways[5], b"late")
    assert sock.numbered(ipc.PORT_WAY_ENDED)[0] == ways[5]
    sock.write([arrival_header(ways[5])])
    assert sock.answer(ipc.PORT_ARRIVED) == {"ok": True, "since": None}
    sock.reply(last, b"on time")
    assert answer(a, kept) == b"on time"


def test_a_reply_over_the_streams_bound_is_confirmed_once_it_has_room(
        pair: Pair, sock: PortSocket) -> None:
    a, _ = pair
    port = new_port()
    assert sock.attach(port)["ok"]
    stream = ask(a, port, "q")
    way, _, _ = sock.message()
    big = b"x" * (BOUND + 1)  # over the stream's bound at once: 'confirmed' waits for room
    sock.write([reply_header(way, ipc.PORT_REPLY_CONFIRM), big], [SYNC])
    assert sock.answer(ipc.PORT_SYNCED) == {"ok": True}  # handled, not yet confirmed
    assert sock.numbered(ipc.PORT_CONFIRMED) == (way, None)  # alpha's node took it
    assert answer(a, stream) == big


def test_a_third_reply_awaiting_confirmation_is_bad_input_and_not_sent(
        pair: Pair, sock: PortSocket) -> None:
    a, _ = pair
    port = new_port()
    assert sock.attach(port)["ok"]
    stream = ask(a, port, "q")
    way, _, _ = sock.message()
    big = b"x" * (BOUND + 1)
    # In one write, handled before alpha acknowledges any of it: two await confirmation.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.write(*([reply_header(way, ipc.PORT_REPLY_CONFIRM), data]
                     for data in (big, b"second", b"third")))
    sock.assert_dropped()
    assert answer(a, stream) == big and answer(a, stream) == b"second"
    nothing = ipc_call(a.home, cmd="stream_receive", stream=stream, timeout=QUIET)
    assert nothing["error"]["type"] == "PilotTimeoutError", nothing  # type: ignore[index]
    assert ipc_call(a.home, cmd="stream_close", stream=stream)["ok"]


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "resets"), [
    pytest.param(lambda way: [[b"\x2f"]], True, id="unknown-kind"),
    pytest.param(lambda way: [[reply_header(way + 1000), b"x"]], True, id="never-given-way"),
    pytest.param(lambda way: [[taken_header(2)]], True, id="taken-more-than-written"),
    pytest.param(lambda way: [[taken_header(0)]], True, id="taken-none"),
    pytest.param(lambda way: [[reply_header(way, 0x04), b"x"]], True, id="unknown-flags"),
    pytest.param(lambda way: [[reply_header(way)]], True, id="reply-without-payload"),
    pytest.param(lambda way: [[SYNC + b"x"]], True, id="sync-header-too-long"),
    pytest.param(lambda way: [[taken_header(1)[:3]]], True, id="taken-header-too-short"),
    pytest.param(lambda way: [[credit_header(1)[:5]]], True, id="credit-header-too-short"),
    pytest.param(lambda way: [[credit_header(2**20 + 1)]], True, id="credit-too-many"),
    pytest.param(lambda way: [[SYNC, b"payload"]], True, id="sync-with-payload"),
    # After 'close', nothing is owed: the client chose not to reply (the message goes back).
    pytest.param(lambda way: [[CLOSE], [SYNC]], False, id="sync-after-close"),
])
def test_bad_input_drops_the_connection(pair: Pair, sock: PortSocket, bad: Any,
                                        resets: bool) -> None:
    a, b = pair
    port = new_port()
    assert sock.attach(port)["ok"]
    stream = ask(a, port, "q")
    way, _, _ = sock.message()
    dropped = time.monotonic()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # dropped while writing
        sock.write(*bad(way))
    sock.assert_dropped()
    if resets:  # as a client that died: the stream it owed a reply is reset
        reset_soon(a, stream, dropped)
    assert ipc_call(b.home, cmd="info")["ok"]
    assert port not in listening(b)


# -- the daemon stops ------------------------------------------------------------------------------


@pytest.mark.parametrize("credit", [8, 1], ids=["with-credit", "without-credit"])
def test_a_daemon_that_stops_ends_its_port_sockets(credit: int) -> None:
    a, b = started(("alpha", {}), ("beta", {}))
    sock = PortSocket(b)
    try:
        port = new_port()
        assert sock.attach(port, credit_messages=credit)["ok"]
        ask(a, port, "before")
        assert sock.message()[2] == b"before"  # not taken: with credit 1, none is left
        assert ipc_call(b.home, cmd="stop")["ok"]
        ended = sock.answer(ipc.DATA_ENDED)
        assert ended["ok"] is False and ended["error"]["type"] == "DaemonNotRunningError", ended
        assert "went away" in ended["error"]["message"]  # as its other clients hear
        sock.assert_closed()
    finally:
        sock.close()
        stop_daemons(a.home, b.home)


def test_a_port_closed_under_its_socket_ends_it(pair: Pair, sock: PortSocket) -> None:
    """Another client undoes the socket's listen (an unlisten undoes any): the port closes,
    and the socket hears it even without credit to write more."""
    a, b = pair
    port = new_port()
    assert sock.attach(port, credit_messages=1)["ok"]
    ask(a, port, "before")
    assert sock.message()[2] == b"before"
    assert ipc_call(b.home, cmd="unlisten", port=port)["closed"] is True
    ended = sock.answer(ipc.DATA_ENDED)
    assert ended["error"]["type"] == "ConnectionClosedError", ended
    assert f"port {port}" in ended["error"]["message"], ended
    sock.assert_closed()
    assert port not in listening(b)


def test_a_message_a_previous_daemon_kept_comes_on_a_way_that_names_no_stream() -> None:
    """beta stops with two messages unread on its port and keeps them; the next beta hands
    them out with nothing to reply on: each on a way of its own, a reply on it 'way ended'."""
    a, b = started(("alpha", {}), ("beta", {}))
    sock = None
    try:
        port = new_port()
        assert ipc_call(b.home, cmd="listen", port=port)["ok"]
        for text in ("kept 1", "kept 2"):
            assert ipc_call(a.home, cmd="send", target="beta", port=port, data=text)["ok"]
        assert ipc_call(b.home, cmd="stop")["ok"]
        deadline = time.monotonic() + WAIT
        while ipc.daemon_pid(b.home) is not None:
            assert time.monotonic() < deadline, "beta did not stop"
            time.sleep(0.02)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PYTHONPATH", str(ROOT))
            start_detached(DaemonOptions(home=b.home, hostname="beta", listen="127.0.0.1:0"))
        sock = PortSocket(b)
        assert sock.attach(port)["ok"]
        (way1, meta1, data1), (way2, meta2, data2) = sock.message(), sock.message()
        assert (data1, data2) == (b"kept 1", b"kept 2") and way1 != way2
        assert meta1 is not None and meta1["from"] == a.node_id, meta1
        assert meta2 is not None and meta2["from"] == a.node_id, meta2
        sock.reply(way1, b"nobody to hear it")
        ended_way, ended = sock.numbered(ipc.PORT_WAY_ENDED)
        assert ended_way == way1 and ended is not None, ended
        assert ended["error"]["type"] == "ConnectionClosedError", ended
        sock.taken(2)
        sock.write([CLOSE])
        assert sock.answer(ipc.DATA_CLOSED) == {"ok": True}
    finally:
        if sock is not None:
            sock.close()
        stop_daemons(a.home, b.home)
