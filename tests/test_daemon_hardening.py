"""The daemon's local API against careless and hostile clients (issue #11, items 2 and 10-16):
real daemons, plain ZeroMQ sockets, loopback only, every flood bounded in count and time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from pilot_agents import Client, daemon, ipc
from pilot_agents.daemon import DaemonOptions, start_detached
from pilot_agents.errors import PilotError, PilotTimeoutError
from pilot_agents.identity import Identity
from pilot_agents.trust import TrustStore
from tests.conftest import (
    DaemonHandle,
    assert_one_line_error,
    cli,
    ipc_call,
    named_pair,
    peer_up,
    short_home,
    start_daemon,
    start_daemons,
    stop_daemons,
)
from tests.datasock_helpers import started
from tests.test_ipc import stream_call, stream_send, stream_socket

Pair = tuple[DaemonHandle, DaemonHandle]
MiB = 1024 * 1024


def call(home: Path, **request: Any) -> dict[str, Any]:
    return ipc_call(home, **request)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def start_with(home: Path, hostname: str, **bounds: Any) -> DaemonHandle:
    """A daemon started through the API, so any DaemonOptions field can be set."""
    info = start_detached(DaemonOptions(home=home, hostname=hostname, listen="127.0.0.1:0",
                                        **bounds))
    return DaemonHandle(home, hostname, info["node_id"], info["endpoints"][0], info["pid"])


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def small_pair() -> Iterator[Pair]:
    """alpha (defaults) and beta, whose inboxes hold 1 MiB and whose acks wait 1 s."""
    homes = [short_home(), short_home()]
    try:
        a = start_with(homes[0], "alpha")
        b = start_with(homes[1], "beta", inbox_bytes=MiB, ack_wait=1.0,
                       requeue_memory_bytes=2 * MiB, max_request_bytes=4 * MiB)
        peer_up(a, b)
        yield a, b
    finally:
        stop_daemons(*homes)


def raw(ctx: zmq.Context[Any], home: Path, body: bytes, wait: float = 10.0) -> dict[str, Any]:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(wait * 1000))
    sock.connect(f"ipc://{home}/daemon.sock")
    try:
        sock.send(body)
        return json.loads(sock.recv())  # type: ignore[no-any-return]
    finally:
        sock.close()


def listening(home: Path, port: int) -> dict[str, Any]:
    info = call(home, cmd="info")
    return next(p for p in info["listening"] if p["port"] == port)


# -- item 10: requests that used to kill the IPC server ----------------------------------------


def test_deeply_nested_request_is_refused_and_the_server_goes_on(
        daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    a, _ = daemon_pair
    for body in (b"[" * 100_000, b'{"cmd": "info", "id": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        reply = raw(context, a.home, body)
        assert reply["ok"] is False and reply["error"]["type"] == "BadRequestError", reply
        assert "nests deeper" in reply["error"]["message"]
    assert raw(context, a.home, b'{"cmd": "info"}')["ok"] is True


def test_brackets_inside_strings_do_not_count_as_nesting(
        daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    a, b = daemon_pair
    text = '[[[[[[[[[[{{{{{{{{"\\"]]]]'
    sent = raw(context, a.home, json.dumps({"cmd": "send", "target": "beta", "port": 1001,
                                            "data": text}).encode())
    assert sent["ok"], sent
    got = raw(context, b.home, b'{"cmd": "receive", "port": 1001, "timeout": 5}')
    assert got["message"]["data"] == text


def test_request_over_the_size_bound_is_refused(small_pair: Pair,
                                                context: zmq.Context[Any]) -> None:
    _, b = small_pair
    body = json.dumps({"cmd": "send", "target": "alpha", "port": 1001,
                       "data": "x" * (5 * MiB)}).encode()
    reply = raw(context, b.home, body)
    assert reply["error"]["type"] == "BadRequestError"
    assert f"more than the daemon's limit of {4 * MiB}" in reply["error"]["message"]
    assert raw(context, b.home, b'{"cmd": "info"}')["ok"] is True


# -- item 16: strict types ---------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b'{"cmd": "receive", "port": true, "timeout": 1}',
    b'{"cmd": "listen", "port": "4500"}',
    b'{"cmd": "receive", "port": 1001, "timeout": true}',
    b'{"cmd": "listen", "port": 4500, "publish": 1}',
])
def test_wrong_json_types_are_not_coerced(daemon_pair: Pair, context: zmq.Context[Any],
                                          body: bytes) -> None:
    a, _ = daemon_pair
    reply = raw(context, a.home, body)
    assert reply["ok"] is False and reply["error"]["type"] == "BadRequestError", reply
    assert all(p["port"] not in (1, 4500) for p in call(a.home, cmd="info")["listening"])


# -- item 2: memory bounded in bytes -------------------------------------------------------------


def test_inbox_is_bounded_in_bytes_and_loses_nothing(small_pair: Pair) -> None:
    a, b = small_pair
    chunk = 256 * 1024
    for i in range(12):
        sent = call(a.home, cmd="send", target="beta", port=1001, data=f"{i:02d}" * (chunk // 2))
        assert sent["ok"], sent
    port = listening(b.home, 1001)
    assert port["buffered_bytes"] <= MiB + chunk and port["buffered"] <= 5, port
    got = [call(b.home, cmd="receive", port=1001, timeout=10)["message"]["data"][:2]
           for _ in range(12)]
    assert got == [f"{i:02d}" for i in range(12)]


def test_messages_read_promptly_do_not_stay_in_memory(small_pair: Pair) -> None:
    """The daemon used to keep the payload of each of the last 10,000 handed-out messages."""
    a, b = small_pair
    payload = "y" * MiB
    stream = call(a.home, cmd="connect", target="beta", port=1001)["stream"]
    before = rss_bytes(b.pid)
    for _ in range(120):
        assert call(a.home, cmd="stream_send", stream=stream, data=payload)["ok"]
        got = call(b.home, cmd="receive", port=1001, timeout=10)
        assert len(got["message"]["data"]) == MiB
    grown = rss_bytes(b.pid) - before
    assert grown < 60 * MiB, f"the daemon grew by {grown / MiB:.0f} MiB"
    last = got["message"]["id"]
    assert call(b.home, cmd="reply", message=last, data="thanks")["ok"]  # reply still works
    answer = call(a.home, cmd="stream_receive", stream=stream, timeout=5)
    assert answer["message"]["data"] == "thanks"


# -- item 11: a client that floods without reading ----------------------------------------------


def test_flooding_client_neither_starves_others_nor_grows_the_daemon(
        daemon_pair: Pair, context: zmq.Context[Any]) -> None:
    """One client sends info requests as fast as it can and never reads (bounded: 400k requests
    or 4 s); another client's info must still be answered promptly."""
    a, _ = daemon_pair
    before = rss_bytes(a.pid)
    stop = threading.Event()

    def flood() -> None:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # the flooder queues without limit on its own side
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(f"ipc://{a.home}/daemon.sock")
        body = json.dumps({"cmd": "info"}).encode()
        for _ in range(400):
            if stop.is_set():
                break
            for _ in range(1000):
                sock.send(body)
            time.sleep(0.005)
        stop.wait()
        sock.close()

    flooder = threading.Thread(target=flood)
    flooder.start()
    slowest = 0.0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            reply = raw(context, a.home, b'{"cmd": "info"}', wait=5.0)
            slowest = max(slowest, time.monotonic() - started)
            assert reply["ok"] is True
            time.sleep(0.2)
        grown = rss_bytes(a.pid) - before
    finally:
        stop.set()
        flooder.join()
    assert slowest < 1.5, f"another client waited {slowest:.1f} s"
    assert grown < 50 * MiB, f"the daemon grew by {grown / MiB:.0f} MiB"


def test_too_many_requests_in_flight_are_refused(daemon_pair: Pair,
                                                context: zmq.Context[Any]) -> None:
    a, _ = daemon_pair
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(f"ipc://{a.home}/daemon.sock")
    try:
        for i in range(300):  # 256 wait for a message; the rest are refused at once
            sock.send(json.dumps({"cmd": "receive", "port": 4700, "timeout": 30,
                                  "id": i}).encode())
        refused = [json.loads(sock.recv()) for _ in range(300 - 256)]
        assert {r["error"]["type"] for r in refused} == {"BusyError"}
        assert call(a.home, cmd="info")["ok"]  # other clients are served
    finally:
        sock.close()
        time.sleep(0.2)
        for _ in range(3):  # the abandoned receives are cancelled with their client's
            call(a.home, cmd="unlisten", port=4700)


def test_streams_past_max_streams_are_refused_until_one_closes() -> None:
    a, b = started(("alpha", {"max_streams": 3}), ("beta", {}))
    try:
        assert call(b.home, cmd="listen", port=4710)["ok"]
        streams = [call(a.home, cmd="connect", target="beta", port=4710) for _ in range(3)]
        assert all(s["ok"] for s in streams)
        refused = call(a.home, cmd="connect", target="beta", port=4710)
        assert refused["error"]["type"] == "BusyError", refused
        assert "max_streams" in refused["error"]["message"]
        assert call(a.home, cmd="stream_abort", stream=streams[0]["stream"])["ok"]
        assert call(a.home, cmd="connect", target="beta", port=4710)["ok"]
    finally:
        stop_daemons(a.home, b.home)


# -- item 12: acknowledged delivery ---------------------------------------------------------------


def test_unacknowledged_message_is_delivered_again(small_pair: Pair,
                                                   context: zmq.Context[Any]) -> None:
    a, b = small_pair
    assert call(a.home, cmd="send", target="beta", port=1001, data="precious")["ok"]
    dying = context.socket(zmq.DEALER)
    dying.setsockopt(zmq.LINGER, 0)
    dying.setsockopt(zmq.RCVTIMEO, 5000)
    dying.connect(f"ipc://{b.home}/daemon.sock")
    dying.send(json.dumps({"cmd": "receive", "port": 1001, "ack": True, "id": 1}).encode())
    taken = json.loads(dying.recv())["message"]
    dying.close()  # dies with the message unacknowledged
    assert taken["data"] == "precious"
    assert listening(b.home, 1001)["unacked"] == 1
    started = time.monotonic()
    again = call(b.home, cmd="receive", port=1001, ack=True, timeout=5)["message"]
    assert again["data"] == "precious", again
    assert 0.5 < time.monotonic() - started < 3.0  # after ack_wait (1 s)
    assert call(b.home, cmd="ack", message=again["id"])["acked"] is True
    assert call(b.home, cmd="ack", message=again["id"])["acked"] is False
    time.sleep(1.5)  # past ack_wait: an acknowledged message never comes back
    port = listening(b.home, 1001)
    assert (port["buffered"], port["unacked"], port["buffered_bytes"]) == (0, 0, 0), port
    assert call(b.home, cmd="receive", port=1001, timeout=0.5)["ok"] is False


def test_without_ack_a_message_is_handed_out_once(small_pair: Pair) -> None:
    a, b = small_pair
    assert call(a.home, cmd="send", target="beta", port=1001, data="once")["ok"]
    assert call(b.home, cmd="receive", port=1001, timeout=5)["message"]["data"] == "once"
    time.sleep(1.5)
    assert call(b.home, cmd="receive", port=1001, timeout=0.5)["ok"] is False


# -- item 13: daemon stop keeps what the tunnel acknowledged ---------------------------------------


def test_stop_keeps_unread_messages_for_the_next_start() -> None:
    homes = [short_home(), short_home()]
    try:
        a, b = start_daemons((homes[0], "alpha"), (homes[1], "beta"))
        peer_up(a, b)
        for i in range(3):
            assert call(a.home, cmd="send", target="beta", port=1001, data=f"m{i}")["ok"]
        assert call(a.home, cmd="send", target="beta", port=4800, data="x")["ok"] is False
        stop_daemons_keep_home(b.home)
        start_daemon(b.home, "beta")
        got = [call(b.home, cmd="receive", port=1001, timeout=5) for _ in range(3)]
        assert [g["message"]["data"] for g in got] == ["m0", "m1", "m2"], got
        assert not (b.home / "unread.jsonl").exists()
    finally:
        stop_daemons(*homes)


async def test_an_exclusive_listener_takes_its_port_back_after_a_restart() -> None:
    """A stopped daemon keeps its ports' unread messages, and the next one listens on those
    ports for them, for no client: every exclusive listen of such a port (mcp serve, a
    publisher) was refused for good. The first one now takes them over."""
    homes = [short_home(), short_home()]
    try:
        a, b = start_daemons((homes[0], "alpha"), (homes[1], "beta"))
        peer_up(a, b)
        assert call(b.home, cmd="listen", port=4711, exclusive=True)["ok"]
        assert call(a.home, cmd="send", target="beta", port=4711, data="kept")["ok"]
        stop_daemons_keep_home(b.home)
        start_daemon(b.home, "beta")
        async with Client(b.home) as client, client.listen(4711, exclusive=True) as listener:
            assert (await listener.receive(5)).data == b"kept"
            refused = call(b.home, cmd="listen", port=4711, exclusive=True)
            assert refused["error"]["type"] == "PortInUseError", refused
    finally:
        stop_daemons(*homes)


def stop_daemons_keep_home(home: Path) -> None:
    assert call(home, cmd="stop")["ok"]
    deadline = time.monotonic() + 10
    while ipc.daemon_pid(home) is not None:
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.05)


def test_a_damaged_unread_file_is_set_aside_and_the_daemon_starts(fresh_home: Path) -> None:
    """Before: an unread.jsonl that was not UTF-8 stopped every start with a traceback
    (reported as "did not become ready within 30 s", exit 10), and a record with port 70000
    failed the start with a port error, the good messages lost with the file."""
    unread, damaged = fresh_home / "unread.jsonl", fresh_home / "unread.jsonl.damaged"
    unread.write_bytes(b"\xff\xfe garbage\n")
    unread.chmod(0o600)
    start_daemon(fresh_home, "beta")
    assert damaged.read_bytes() == b"\xff\xfe garbage\n" and not unread.exists()
    stop_daemons_keep_home(fresh_home)
    bad = json.dumps({"port": 70000, "from": "x", "source_port": 1, "data": "aGk="}) + "\n"
    sender = Identity.generate().node_id  # trusted: a kept message of a stranger is dropped
    TrustStore.load(fresh_home).add_trusted(sender, None)
    unread.write_text(json.dumps({"port": 1001, "from": sender, "source_port": 5,
                                  "data": "a2VwdA=="}) + "\n" + bad)
    start_daemon(fresh_home, "beta")
    assert call(fresh_home, cmd="receive", port=1001, timeout=5)["message"]["data"] == "kept"
    assert damaged.read_text() == bad and not unread.exists()
    log = (fresh_home / ipc.LOG_NAME).read_text()
    assert "unread.jsonl is damaged (not UTF-8 text" in log and "Traceback" not in log
    assert "skipped record 2 of unread.jsonl, not a message: port 70000 is not in 1..65535" \
        in log


def test_a_daemon_that_exits_before_it_is_ready_is_reported_as_exited(
        monkeypatch: pytest.MonkeyPatch, fresh_home: Path) -> None:
    """Before: the end of its ready pipe, read before the child was reaped, was reported as
    "did not become ready within 30 s" (a PilotTimeoutError, exit 10)."""
    # Closes the ready pipe (its argv: -m MODULE --ready-fd N ...), then exits.
    fake = fresh_home / "python"
    fake.write_text('#!/bin/bash\neval "exec $4>&-"\nsleep 0.5\necho it broke >&2\nexit 3\n')
    fake.chmod(0o700)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(PilotError, match=r"exited during start \(status 3\): it broke") as info:
        start_detached(DaemonOptions(home=fresh_home))
    assert not isinstance(info.value, PilotTimeoutError)


def test_a_stop_that_cannot_keep_the_unread_messages_says_so_and_still_stops() -> None:
    """Before: when unread.jsonl could not be written (a full disk), the daemon died with a
    traceback, skipping the rest of its shutdown (pid and socket files stayed), and `daemon
    stop` said "Daemon stopped", exit 0: the messages were lost silently. (Here the file's
    path is a directory: the same OSError as ENOSPC, without root.)"""
    with named_pair() as (a, b):
        assert call(a.home, cmd="send", target="beta", port=1001, data="m0")["ok"]
        assert call(a.home, cmd="send", target="beta", port=1001, data="m1")["ok"]
        (b.home / "unread.jsonl").mkdir()
        result = cli(b.home, "daemon", "stop")
        assert_one_line_error(result, 1, f"the daemon stopped (pid {b.pid}), but lost 2 unread "
                              "messages: cannot write unread.jsonl in", "Is a directory")
        assert ipc.daemon_pid(b.home) is None
        left = {p.name for p in b.home.iterdir()}
        assert not left & {ipc.PID_NAME, ipc.SOCKET_NAME, ipc.STREAM_SOCKET_NAME}, left
        log = (b.home / ipc.LOG_NAME).read_text()
        assert "ERROR pilot_agents.daemon: lost 2 unread messages" in log
        assert "Traceback" not in log and log.rstrip().endswith("stopped"), log[-500:]


def test_a_daemon_stop_that_ends_in_a_kill_says_so(fresh_home: Path) -> None:
    """Before: a stuck daemon (SIGSTOP) was killed after the stop's timeout, and `daemon stop`
    printed "Daemon stopped", exit 0, as if it had kept its unread messages."""
    pid = start_daemon(fresh_home, "beta").pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(PilotTimeoutError, match=rf"the daemon \(pid {pid}\) did not stop "
                           r"within 1 s of being asked .*killed it \(SIGKILL\), so the messages "
                           "no client had read are lost"):
            daemon.stop(fresh_home, timeout=1.0)
        assert ipc.daemon_pid(fresh_home) is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_stop_keeps_what_the_node_held_beyond_a_full_inbox(small_pair: Pair) -> None:
    """beta's inbox holds 1 MiB: the rest of what alpha sent waits in beta's Node, acknowledged
    to alpha all the same. Stopping beta keeps both, in order."""
    a, b = small_pair
    chunk = 256 * 1024
    for i in range(8):
        assert call(a.home, cmd="send", target="beta", port=1001, data=f"{i}" * chunk)["ok"]
    assert listening(b.home, 1001)["buffered"] < 8
    stop_daemons_keep_home(b.home)
    start_with(b.home, "beta", inbox_bytes=MiB)
    got = [call(b.home, cmd="receive", port=1001, timeout=5)["message"]["data"]
           for _ in range(8)]
    assert [g[0] for g in got] == [str(i) for i in range(8)]
    assert all(len(g) == chunk for g in got)


# -- the stream socket: a client that leaves, and a request id used twice -----------------------


def listened(home: Path) -> set[int]:
    return {p["port"] for p in call(home, cmd="info")["listening"]}


def test_a_stream_client_that_leaves_ends_its_requests(daemon_pair: Pair) -> None:
    """Its requests in flight end with it: a receive waiting for ever gives its port up, as a
    delivery stops (the daemon learns of it at once on this socket)."""
    a, _ = daemon_pair
    clients = [stream_socket(a.home) for _ in range(5)]
    for port, sock in enumerate(clients, start=7100):
        stream_send(sock, {"cmd": "receive", "id": 1, "port": port, "timeout": None})
    deadline = time.monotonic() + 10
    while not listened(a.home) >= set(range(7100, 7105)):
        assert time.monotonic() < deadline, "the receives never started"
        time.sleep(0.05)
    for sock in clients:
        sock.close()
    while listened(a.home) & set(range(7100, 7105)):
        assert time.monotonic() < deadline + 10, "the receives outlived their clients"
        time.sleep(0.05)


def test_a_request_id_in_flight_is_not_taken_by_another(daemon_pair: Pair) -> None:
    a, _ = daemon_pair
    with stream_socket(a.home) as sock:
        stream_send(sock, {"cmd": "receive", "id": 9, "port": 7110, "timeout": 30})
        refused, _ = stream_call(sock, {"cmd": "receive", "id": 9, "port": 7111, "timeout": 30})
        assert refused["id"] == 9 and refused["error"]["type"] == "BadRequestError", refused
        assert "in use by a request still in flight" in refused["error"]["message"]
        cancelled, _ = stream_call(sock, {"cmd": "cancel", "id": 10, "request": 9})
        assert cancelled == {"ok": True, "cancelled": True, "id": 10}  # the first is still its own
