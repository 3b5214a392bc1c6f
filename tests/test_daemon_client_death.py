"""A process that serves requests through its daemon and is killed mid-request leaves no
requester waiting for its timeout (issue #13): the daemon hears its client go, resets the
streams of the requests it held unanswered, and releases the ports it listened on, so a request
sent afterwards is refused at once unless another client of the daemon still serves the port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pilot_agents import Client, ipc
from pilot_agents.errors import ConnectionClosedError, PortClosedError
from pilot_agents.patterns import Request, Requester, serving
from pilot_agents.sdk import ClientOptions
from tests.conftest import ROOT, DaemonHandle, ipc_call, named_pair
from tests.test_ipc import stream_socket

# A reader that takes nothing before it receives (a listener on a data socket takes its window
# at once, and would share the dead client's messages before it dies).
REQUESTS = ClientOptions(data_sockets=False)

Pair = tuple[DaemonHandle, DaemonHandle]
TIMEOUT = 30.0  # far longer than the daemons take to report a dead replier

# Serves a port through the daemon of the home given; prints each request and never answers.
HOLDING_REPLIER = """
import asyncio, sys
from pilot_agents import Client, ipc
from pilot_agents.patterns import serving

async def hold(request):
    print(request.data.decode(), flush=True)
    await asyncio.Event().wait()

async def main(home, port):
    async with Client(home) as client, serving(client, port, hold):
        print("listening", flush=True)
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with named_pair() as daemons:
        yield daemons


@contextlib.asynccontextmanager
async def holding_replier(daemon: DaemonHandle, port: int) -> AsyncIterator[
        asyncio.subprocess.Process]:
    """The replier in a process of its own, listening when this yields; killed on the way
    out if the test did not kill it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDING_REPLIER, str(daemon.home), str(port),
        stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        assert await printed(proc) == "listening"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def printed(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)).decode().strip()


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def test_requests_held_by_a_killed_replier_fail_and_its_port_closes(pair: Pair) -> None:
    a, b = pair
    async with Client(a.home) as client, Requester(client) as requester, \
            holding_replier(b, 7601) as replier:
        # Two requests in flight on one stream, both in the replier's hands.
        waiting = [asyncio.create_task(requester.request("beta", 7601, name, timeout=TIMEOUT))
                   for name in ("first", "second")]
        assert {await printed(replier), await printed(replier)} == {"first", "second"}
        await kill(replier)
        for task in waiting:
            with pytest.raises(ConnectionClosedError) as failed:
                await task
            assert not isinstance(failed.value, PortClosedError)  # reset, not refused
        # Nobody serves the port any more: a later request is refused, not left to wait.
        with pytest.raises(PortClosedError):
            await requester.request("beta", 7601, "third", timeout=TIMEOUT)


async def test_another_replier_on_the_port_serves_on_after_one_is_killed(pair: Pair) -> None:
    a, b = pair

    async def answer(request: Request) -> object:
        return b"answered " + request.data

    async with Client(a.home) as client, Requester(client) as requester, \
            holding_replier(b, 7602) as replier:
        held = asyncio.create_task(requester.request("beta", 7602, "held", timeout=TIMEOUT))
        assert await printed(replier) == "held"
        async with Client(b.home) as other, serving(other, 7602, answer):
            await kill(replier)
            with pytest.raises(ConnectionClosedError):
                await held
            # The port stays open for the replier still there, and the requester's next
            # request (on a new stream: the old one was reset) reaches it.
            assert (await requester.request("beta", 7602, "next", timeout=TIMEOUT)).data == \
                b"answered next"


def test_a_cli_request_to_a_killed_cli_server_fails_at_once(pair: Pair, tmp_path: Path) -> None:
    """``pilotctl request`` gets an error, not its timeout, when the ``pilotctl serve --exec``
    running its request is killed."""
    a, b = pair
    started = tmp_path / "started"  # the command's pid, once it runs (it then waits for ever)
    command = f"sh -c 'echo $$ > {started}.tmp && mv {started}.tmp {started} && exec sleep 600'"
    server = subprocess.Popen(
        [sys.executable, "-m", "pilot_agents.cli", "--home", str(b.home), "serve", "7603",
         "--exec", command], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    request = None
    try:
        assert server.stderr is not None
        assert server.stderr.readline().startswith("Serving port 7603")
        request = subprocess.Popen(
            [sys.executable, "-m", "pilot_agents.cli", "--home", str(a.home), "request", "beta",
             "7603", "--data", "question", "--timeout", str(TIMEOUT)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        while not started.exists():
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        _, err = request.communicate(timeout=2 * TIMEOUT)
        assert request.returncode == 12, err  # connection closed (10 would be its timeout)
    finally:
        for proc in (server, request):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if started.exists():  # the command, in a process group of its own, outlives serve
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(started.read_text()), signal.SIGKILL)


async def test_messages_a_killed_client_had_not_acknowledged_come_back_at_once(
        pair: Pair) -> None:
    """A client taking messages with ``"ack": true`` that dies gives them back to the port's
    other readers at once, not after ``ack_wait`` (30 s here)."""
    a, b = pair
    reader, writer = await asyncio.open_unix_connection(ipc.stream_socket_path(b.home))
    frames = ipc.FrameReader(1 << 20)

    async def next_reply() -> list[bytes]:
        while True:
            if got := frames.feed(await asyncio.wait_for(reader.read(65536), TIMEOUT)):
                return got[0]

    for request in ({"cmd": "listen", "port": 7604, "id": 1},
                    {"cmd": "deliver", "port": 7604, "ack": True, "id": 2}):
        writer.writelines(ipc.pack_frames([json.dumps(request).encode()]))
    assert json.loads((await next_reply())[0])["ok"] is True  # the listen
    async with Client(a.home) as sender, sender.connect("beta", 7604) as conn, \
            Client(b.home, REQUESTS) as other, other.listen(7604) as listener:
        for data in (b"first", b"second"):
            await conn.send(data)
            pushed = await next_reply()
            assert json.loads(pushed[0])["message"]["port"] == 7604 and pushed[1] == data
        writer.close()  # dies with both unacknowledged
        started = time.monotonic()
        again = [(await listener.receive(timeout=TIMEOUT)).data for _ in range(2)]
        assert again == [b"first", b"second"]  # in the order they first came
        assert time.monotonic() - started < 5.0


async def test_a_listener_that_closes_leaves_its_senders_streams_alone(pair: Pair) -> None:
    """A client that reads one-way messages and closes owes no replies: the sender's
    connection goes on to the port's next reader (it was reset, and the next message lost,
    when the daemon counted every unanswered message as owed)."""
    a, b = pair
    async with Client(a.home) as sender, sender.connect("beta", 7605) as conn:
        for data in (b"first", b"second"):
            async with Client(b.home) as reader, reader.listen(7605) as listener:
                await conn.send(data)
                assert (await listener.receive(timeout=TIMEOUT)).data == data
        await conn.drain()  # no reset came back


def test_a_client_that_listened_many_times_releases_them_all_when_it_goes(pair: Pair) -> None:
    """A client's listens are a count per port (not an entry each): one that listens 500
    times and unlistens once holds the port until it goes, then gives all 499 back."""
    b = pair[1]
    port = 4601

    def listening() -> bool:
        info = ipc_call(b.home, cmd="info")
        return any(entry["port"] == port for entry in info["listening"])

    sock = stream_socket(b.home)
    try:
        reader = ipc.FrameReader(1 << 20)
        requests = [{"cmd": "listen", "id": n, "port": port} for n in range(500)]
        requests.append({"cmd": "unlisten", "id": 500, "port": port})
        for request in requests:
            sock.sendall(b"".join(ipc.pack_frames([json.dumps(request).encode()])))
            while not (answers := reader.feed(sock.recv(1 << 16))):
                pass
            assert all(json.loads(a[0])["ok"] for a in answers)
        assert listening()
    finally:
        sock.close()  # gone without 'bye'
    deadline = time.monotonic() + TIMEOUT
    while listening():
        assert time.monotonic() < deadline, "the port stayed open after its client went"
        time.sleep(0.05)



def test_the_streams_of_a_client_that_dies_are_reset_at_once(pair: Pair) -> None:
    """Streams a client opened and left open end when it dies, not after the idle timeout;
    one that said bye first leaves them to it (what it sent may still be on its way)."""
    a, b = pair
    port = 4602
    assert ipc_call(b.home, cmd="listen", port=port)["ok"]

    def streams() -> int:
        return int(ipc_call(a.home, cmd="info")["streams"])

    def opened(bye: bool) -> None:
        sock = stream_socket(a.home)
        try:
            reader = ipc.FrameReader(1 << 20)
            for request in ({"cmd": "connect", "id": 1, "target": "beta", "port": port},
                            {"cmd": "connect", "id": 2, "target": "beta", "port": port}):
                sock.sendall(b"".join(ipc.pack_frames([json.dumps(request).encode()])))
                while not (answers := reader.feed(sock.recv(1 << 16))):
                    pass
                assert json.loads(answers[0][0])["ok"]
            if bye:
                sock.sendall(b"".join(ipc.pack_frames([b'{"cmd": "bye"}'])))
        finally:
            sock.close()

    before = streams()
    opened(bye=False)
    deadline = time.monotonic() + TIMEOUT
    while streams() != before:
        assert time.monotonic() < deadline, "the dead client's streams stayed open"
        time.sleep(0.05)
    opened(bye=True)
    time.sleep(0.5)
    assert streams() == before + 2
    ipc_call(b.home, cmd="unlisten", port=port)
