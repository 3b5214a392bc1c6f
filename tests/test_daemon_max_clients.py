"""At most ``max_clients`` connections to the daemon's stream socket at once (docs/ipc.md, The
stream socket): one more has its first request answered with a BusyError that says so, and is
closed, so that clients which never close cannot take the daemon's last open files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pilot_agents import ipc
from pilot_agents.daemon.server import MAX_REFUSED_OPEN, REFUSED_WAIT
from pilot_agents.errors import BusyError
from pilot_agents.sdk import Client
from tests.conftest import DaemonHandle, ipc_call, stop_daemons
from tests.datasock_helpers import assert_clean_logs, started

LIMIT = 3


@pytest.fixture
def daemon() -> Iterator[DaemonHandle]:
    (d,) = started(("alpha", {"max_clients": LIMIT}))
    try:
        yield d
        assert_clean_logs(d)
    finally:
        stop_daemons(d.home)


def raw_request(daemon: DaemonHandle, request: dict[str, object]) -> list[list[bytes]]:
    """What the daemon answers ``request`` on a new stream socket connection, to its close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(ipc.stream_socket_path(daemon.home)))
        sock.sendall(b"".join(ipc.pack_frames([json.dumps(request).encode()])))
        reader = ipc.FrameReader(1 << 20)
        messages: list[list[bytes]] = []
        while chunk := sock.recv(65536):
            messages += reader.feed(chunk)
    return messages


def test_a_client_past_the_limit_is_told_why_and_one_fits_again_once_another_leaves(
        daemon: DaemonHandle) -> None:
    async def scenario() -> None:
        clients = [Client(daemon.home) for _ in range(LIMIT)]
        for client in clients:
            await client.info()  # connected, each on a stream socket connection of its own
        late = Client(daemon.home)
        with pytest.raises(BusyError, match=f"{LIMIT} clients connected.*max_clients"):
            await late.info()
        await late.close()

        (refusal,) = await asyncio.to_thread(raw_request, daemon, {"cmd": "info", "id": 7})
        reply = json.loads(refusal[0])
        assert reply["id"] == 7 and reply["error"]["type"] == "BusyError", reply

        await clients.pop().close()
        for _ in range(50):  # the daemon hears the close at its next loop turn
            again = Client(daemon.home)
            try:
                assert (await again.info())["node_id"] == daemon.node_id
                break
            except BusyError:
                await asyncio.sleep(0.05)
            finally:
                await again.close()
        else:
            pytest.fail("no room for a client after one closed")
        for client in clients:
            await client.close()

    asyncio.run(scenario())


def test_a_refused_connection_that_says_nothing_is_closed_all_the_same(
        daemon: DaemonHandle) -> None:
    async def scenario() -> None:
        clients = [Client(daemon.home) for _ in range(LIMIT)]
        for client in clients:
            await client.info()
        try:
            await asyncio.to_thread(silent_until_closed, daemon)
        finally:
            for client in clients:
                await client.close()

    asyncio.run(scenario())


def silent_until_closed(daemon: DaemonHandle) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REFUSED_WAIT + 10)
        sock.connect(str(ipc.stream_socket_path(daemon.home)))
        assert sock.recv(65536) == b""  # closed by the daemon, unasked


def test_a_flood_of_refused_connections_holds_few_files(daemon: DaemonHandle) -> None:
    """Each refused connection was held open REFUSED_WAIT to be told why: a client connecting
    in a loop took the files kept for the daemon's own sockets and stores, and with them its
    ZeroMQ socket's accept (libzmq aborts the process on EMFILE there)."""
    path = str(ipc.stream_socket_path(daemon.home))
    fds = Path(f"/proc/{daemon.pid}/fd")
    socks = []
    try:
        for _ in range(LIMIT):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            socks.append(sock)
        time.sleep(0.5)
        before = len(list(fds.iterdir()))
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(OSError):  # (a full backlog: the flood is what counts)
                sock.connect(path)
            socks.append(sock)
        time.sleep(1.0)
        assert len(list(fds.iterdir())) - before <= MAX_REFUSED_OPEN + 8
        assert ipc_call(daemon.home, cmd="info")["ok"]  # its ZeroMQ socket still answers
    finally:
        for sock in socks:
            sock.close()
