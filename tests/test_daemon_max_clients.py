"""At most ``max_clients`` connections to the daemon's stream socket at once (docs/ipc.md, The
stream socket): one more has its first request answered with a BusyError that says so, and is
closed, so that clients which never close cannot take the daemon's last open files."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import pytest

from pilot_agents import ipc
from pilot_agents.daemon.server import REFUSED_WAIT
from pilot_agents.errors import BusyError
from pilot_agents.sdk import Client
from tests.conftest import DaemonHandle, stop_daemons
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
