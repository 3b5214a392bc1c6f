"""``pilot-agents bridge``: plain ZeroMQ programs (scripts that import only ``zmq``, run as
their own processes) take part in the patterns across two real daemons, through the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pilot_agents.errors import PilotTimeoutError, RemoteError
from pilot_agents.patterns import (
    Overflow,
    Publication,
    Publisher,
    PubSubConfig,
    Request,
    Requester,
    Subscriber,
    serving,
)
from pilot_agents.patterns.frames import MAX_MESSAGE
from pilot_agents.sdk import Client
from tests.conftest import (
    ROOT,
    DaemonHandle,
    assert_one_line_error,
    cli,
    cli_many,
    ipc_call,
    named_pair,
    short_home,
    start_daemon,
)
from tests.test_pubsub import until_subscribed

Pair = tuple[DaemonHandle, DaemonHandle]


class BridgeProcess:
    """``pilotctl --json bridge ARGS`` on ``home``, started; its status line read."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pilot_agents.cli", "--home", str(home), "--json", "bridge",
             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.stderr = ""
        self.status = json.loads(self._line(20.0))
        assert self.status["state"] == "running", self.status

    def _line(self, timeout: float) -> str:
        stdout = self.proc.stdout
        assert stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"the bridge printed no status line: {err}")
        return box[0]

    def stop(self, signum: int = signal.SIGTERM) -> dict[str, Any]:
        """Stop it as a user would; its final counts, after checking it stopped cleanly."""
        self.proc.send_signal(signum)
        out, err = self.proc.communicate(timeout=15)
        self.stderr = err
        assert self.proc.returncode == 0, err
        assert "Traceback" not in err, err
        final = json.loads(out.strip().splitlines()[-1])
        assert final["state"] == "stopped"
        # Its ipc:// socket file is gone: only a killed bridge leaves one.
        path = self.status["endpoint"].removeprefix("ipc://")
        assert path.startswith("tcp://") or not Path(path).exists(), path
        return final["stats"]  # type: ignore[no-any-return]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.fixture
def bridges() -> Iterator[list[BridgeProcess]]:
    started: list[BridgeProcess] = []
    yield started
    for bridge in started:
        bridge.kill()


def endpoint(tmp: Path, name: str) -> str:
    return f"ipc://{tmp}/{name}.sock"


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory for ipc:// endpoints (a unix socket path has ~100 bytes)."""
    path = short_home("pz-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


Script = asyncio.subprocess.Process


async def zmq_script(source: str, *args: str, timeout: float = 20.0,
                     when_ready: Callable[[Script], Awaitable[None]] | None = None) -> Any:
    """Run ``source`` (which imports only zmq) in its own python; the JSON it prints last.
    ``when_ready`` runs once the script has printed its first line, ``ready``; it may write to
    the script's stdin."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(source), *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    if when_ready is not None:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), timeout)
        assert ready == b"ready\n", (ready, await proc.stderr.read())  # type: ignore[union-attr]
        await asyncio.wait_for(when_ready(proc), timeout)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.fixture
async def beta_client(daemon_pair: Pair) -> AsyncIterator[Client]:
    async with Client(daemon_pair[1].home) as client:
        yield client


SUB_SCRIPT = """
    import json, sys, zmq
    sock = zmq.Context().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVTIMEO, 15000)
    sock.setsockopt(zmq.SUBSCRIBE, b"sales.")
    sock.setsockopt(zmq.SUBSCRIBE, b"pilot.gap")
    sock.connect(sys.argv[1])
    got = [[f.decode("latin-1") for f in sock.recv_multipart()] for _ in range(int(sys.argv[2]))]
    print(json.dumps(got))
"""


async def test_a_zmq_sub_receives_from_a_remote_publisher(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "sub")
    async with Publisher(beta_client, 7101) as pub:
        bridges.append(bridge := BridgeProcess(alpha.home, "sub", "beta:7101", "sales.", "ops.",
                                               at, "--gap-topic", "pilot.gap"))
        assert bridge.status | {"endpoint": at} == {
            "bridge": "sub", "endpoint": at, "socket": "XPUB", "hwm": 1000, "remote": "beta",
            "port": 7101, "prefixes": ["sales.", "ops."], "state": "running"}
        await until_subscribed(pub, 1)
        # Published before the local SUB connects: held at the publisher, not lost.
        for topic in ("sales.q1", "hr.leave", "ops.disk", "sales.q2"):
            await pub.publish(topic, f"{topic} data")
        script = asyncio.create_task(zmq_script(SUB_SCRIPT, at, "5"))
        await asyncio.sleep(1.0)
        await pub.publish("sales.q3", b"\x00\xff raw")
        await asyncio.sleep(0.5)  # closing a publisher discards what it has not sent yet
    # The publisher went away (and says so): the bridge subscribes again, and the SUB hears of
    # the gap before the next publication.
    async with Publisher(beta_client, 7101) as pub:
        await until_subscribed(pub, 1)
        await pub.publish("sales.q4", "after")
        got = await script
    assert got[:3] == [["sales.q1", "sales.q1 data"], ["sales.q2", "sales.q2 data"],
                       ["sales.q3", "\x00\xff raw"]]
    assert got[3][0] == "pilot.gap" and json.loads(got[3][1]) == {
        "missed": 0, "resumed": True, "topic": "sales.q4"}
    assert got[4] == ["sales.q4", "after"]
    stats = bridge.stop(signal.SIGINT)
    assert stats["forwarded"] == 4 and stats["unmatched"] == 1 and stats["resumed"] == 1


async def test_what_is_published_while_no_local_sub_is_connected_waits_for_the_next(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "resub")
    async with Publisher(beta_client, 7115) as pub:
        bridges.append(bridge := BridgeProcess(alpha.home, "sub", "beta:7115", "sales.", at))
        await until_subscribed(pub, 1)
        first = asyncio.create_task(zmq_script(SUB_SCRIPT, at, "1"))
        await asyncio.sleep(1.0)  # its subscription reaches the bridge
        await pub.publish("sales.0", "0")
        assert await first == [["sales.0", "0"]]
        await asyncio.sleep(0.5)  # the bridge hears it leave: no local SUB now
        for n in (1, 2, 3):
            await pub.publish(f"sales.{n}", str(n))
        await asyncio.sleep(0.5)
        # Before the fix, sales.1 (read as the SUB left) was counted unmatched and lost.
        assert await zmq_script(SUB_SCRIPT, at, "3") == [
            [f"sales.{n}", str(n)] for n in (1, 2, 3)]
    stats = bridge.stop()
    assert stats["forwarded"] == 4 and stats["unmatched"] == 0, stats


PUB_SCRIPT = """
    import select, sys, zmq
    # An XPUB is a PUB that shows the subscription arriving: nothing is sent before it, so
    # none is lost to ZeroMQ's slow-joiner drop.
    sock = zmq.Context().socket(zmq.XPUB)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.connect(sys.argv[1])
    assert sock.recv() == b"\\x01"  # the bridge's SUB subscribed to everything
    print("ready", flush=True)
    # Until the remote subscriber has heard one (its subscription reached the bridge), a
    # warm-up publication every 50 ms.
    while not select.select([sys.stdin], [], [], 0.05)[0]:
        sock.send_multipart([b"t.warm", b""])
    for n in range(5):
        sock.send_multipart([f"t.{n}".encode(), f"payload {n}".encode()])
    sock.send_multipart([b"x.other", b"nobody wants this one"])
    sock.send_multipart([b"t.bad", b"three", b"frames"])
    sock.send_multipart([b"t.last", b"\\x00\\xff"])
    print("[]")
"""


LATE_PUB_SCRIPT = """
    import time, sys, zmq
    sock = zmq.Context().socket(zmq.XPUB)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(sys.argv[1])
    assert sock.recv() == b"\\x01"
    for n in range(20):
        sock.send_multipart([b"t.late", b"%d" % n])
        time.sleep(0.025)
    print("[]")
"""


async def test_a_zmq_pub_feeds_a_remote_subscriber(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "pub")
    bridges.append(bridge := BridgeProcess(alpha.home, "pub", "7102", at))
    assert bridge.status["socket"] == "SUB" and bridge.status["port"] == 7102
    async with Subscriber(beta_client, "alpha", 7102, ["t."], PubSubConfig()) as sub:

        async def warmed_up(script: Script) -> None:
            assert (await sub.receive(10)).topic == "t.warm"
            assert script.stdin is not None
            script.stdin.write(b"go\n")
            await script.stdin.drain()

        await zmq_script(PUB_SCRIPT, at, when_ready=warmed_up)
        got: list[Publication] = []
        while len(got) < 6:
            if (publication := await sub.receive(10)).topic != "t.warm":
                got.append(publication)
    assert [(p.topic, p.data) for p in got] == [
        *((f"t.{n}", f"payload {n}".encode()) for n in range(5)), ("t.last", b"\x00\xff")]
    assert all(p.sender == alpha.node_id and not p.missed for p in got)
    await zmq_script(LATE_PUB_SCRIPT, at)  # to a remote subscriber that has left
    stats = bridge.stop(signal.SIGHUP)  # its terminal closed: as Ctrl-C
    assert stats["forwarded"] >= 8 and stats["malformed"] == 1 and stats["dropped"] == 0
    # The subscriber left before the bridge stopped: nothing for the bridge's user to act on
    # (the SDK's "a reply failed ... Client.flush()" was).
    assert bridge.stderr.splitlines() == [
        f"bridge: a local publication at {at} was not forwarded: 3 frames, not [topic, payload]"]


REQ_SCRIPT = """
    import json, sys, zmq
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 15000)
    req.connect(sys.argv[1])
    out = []
    for data in (b"hello", b"fail", b"slow", b"again"):
        req.send(data)
        out.append([f.decode() for f in req.recv_multipart()])
    # A DEALER keeps many requests in flight; each comes back with its own envelope.
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 15000)
    dealer.connect(sys.argv[1])
    for n in range(50):
        dealer.send_multipart([b"", f"n{n}".encode()])
    replies = sorted(dealer.recv_multipart()[1].decode() for _ in range(50))
    print(json.dumps({"req": out, "dealer": replies}))
"""


async def upper_or_fail(request: Request) -> bytes:
    if request.data == b"fail":
        raise ValueError("no such table")
    if request.data == b"slow":
        await asyncio.sleep(3)
    return request.data.upper()


async def test_a_zmq_req_client_asks_a_remote_replier(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "req")
    async with serving(beta_client, 7103, upper_or_fail):
        bridges.append(bridge := BridgeProcess(alpha.home, "req", "beta:7103", at,
                                               "--timeout", "1"))
        assert bridge.status["socket"] == "ROUTER" and bridge.status["remote"] == "beta"
        got = await zmq_script(REQ_SCRIPT, at)
    hello, fail, slow, again = got["req"]
    assert hello == ["HELLO"] and again == ["AGAIN"]
    assert fail[0] == "pilot-agents.error" and json.loads(fail[1]) == {
        "type": "RemoteError", "remote_type": "ValueError", "message": "ValueError: no such table"}
    assert slow[0] == "pilot-agents.error"
    assert json.loads(slow[1])["type"] == "PilotTimeoutError"
    assert got["dealer"] == sorted(f"N{n}" for n in range(50))
    stats = bridge.stop()
    assert stats["forwarded"] == 52 and stats["errors"] == 2 and stats["dropped"] == 0


def rep_worker(body: str, recv_timeout_ms: int = 15000) -> str:
    """A ZeroMQ REP worker's script: a REP socket ``rep`` connected to the first argument, then
    ``body``, which answers and sets ``result``; then the socket closes with a linger and the
    context ends before ``result`` is printed as JSON. pyzmq does not terminate a context at
    interpreter exit (zmq/sugar/context.py skips it once atexit ran): without that, the last
    answer could still be queued when the process ended."""
    return (f"import json, sys, time, zmq\nctx = zmq.Context()\nrep = ctx.socket(zmq.REP)\n"
            f"rep.setsockopt(zmq.RCVTIMEO, {recv_timeout_ms})\nrep.connect(sys.argv[1])\n"
            f"{textwrap.dedent(body)}\n"
            "rep.close(linger=10000)\nctx.term()\nprint(json.dumps(result))\n")


REP_SCRIPT = rep_worker("""
    print("ready", flush=True)
    result = 0
    while True:
        data = rep.recv()
        result += 1
        if data == b"fail":
            rep.send_multipart([b"pilot-agents.error",
                                json.dumps({"type": "KeyError", "message": "no row"}).encode()])
        elif data == b"quit":
            rep.send(b"bye")
            break
        else:
            rep.send(data[::-1])
""")


async def test_a_remote_requester_is_served_by_a_zmq_rep_worker(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "rep")
    bridges.append(bridge := BridgeProcess(alpha.home, "rep", "7104", at, "--timeout", "2"))
    assert bridge.status["socket"] == "DEALER" and bridge.status["port"] == 7104
    async with Requester(beta_client) as requester:
        # No worker yet: an error reply after the bridge's timeout, not a hang.
        with pytest.raises(RemoteError) as no_worker:
            await requester.request("alpha", 7104, b"early", timeout=10)
        assert no_worker.value.remote_type == "PilotTimeoutError"

        async def ask(_: Script) -> None:
            assert (await requester.request("alpha", 7104, b"abc", timeout=10)).data == b"cba"
            with pytest.raises(RemoteError, match="KeyError: no row"):
                await requester.request("alpha", 7104, b"fail", timeout=10)
            replies = await asyncio.gather(*(requester.request("alpha", 7104, f"r{n}", timeout=10)
                                             for n in range(10)))
            assert [r.data for r in replies] == [f"r{n}"[::-1].encode() for n in range(10)]
            assert (await requester.request("alpha", 7104, b"quit", timeout=10)).data == b"bye"

        assert await zmq_script(REP_SCRIPT, at, when_ready=ask) == 13
    stats = bridge.stop()
    assert stats["forwarded"] == 12 and stats["errors"] == 2


SLOW_REP_SCRIPT = rep_worker("""
    print("ready", flush=True)
    result = []
    while (data := rep.recv()) != b"quit":
        result.append(data.decode())
        time.sleep(float(sys.argv[2]))
        rep.send(data[::-1])
    rep.send(b"bye")
""")


async def test_requests_their_requesters_gave_up_on_no_longer_hold_the_workers(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "given-up")
    bridges.append(bridge := BridgeProcess(alpha.home, "rep", "7116", at,
                                           "--max-in-flight", "1"))
    async with Requester(beta_client) as requester:

        async def give_up(data: bytes, timeout: float) -> None:
            with pytest.raises(PilotTimeoutError):
                await requester.request("alpha", 7116, data, timeout=timeout)

        async def ask(_: Script) -> None:
            # a0 goes to the worker (1.5 s a request); a1..a3 wait for its slot, and are given
            # up on first. Before the fix, the worker served all four before "fresh", which
            # timed out.
            await asyncio.gather(give_up(b"a0", 0.5),
                                 *(give_up(f"a{n}".encode(), 0.3) for n in (1, 2, 3)))
            assert (await requester.request("alpha", 7116, b"fresh", timeout=5)).data == \
                b"hserf"
            assert (await requester.request("alpha", 7116, b"quit", timeout=5)).data == b"bye"

        assert await zmq_script(SLOW_REP_SCRIPT, at, "1.5", when_ready=ask) == ["a0", "fresh"]
    stats = bridge.stop()
    # a0's answer came after it was given up on (its slot was free at once).
    assert stats["late"] == 1 and stats["forwarded"] == 2, stats


async def test_the_requests_a_rep_bridge_holds_are_bounded_in_bytes(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    # No worker: each request the bridge takes is answered PilotTimeoutError after 1.5 s. It
    # takes no more once it holds 1 MB: the other two wait in the tunnel meanwhile, and are
    # answered 1.5 s later. Before the bound, it took all five at once.
    bridges.append(bridge := BridgeProcess(alpha.home, "rep", "7117", endpoint(sockets, "held"),
                                           "--timeout", "1.5", "--max-held-bytes", "1000000"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with Requester(beta_client) as requester:

        async def answered_after() -> float:
            with pytest.raises(RemoteError) as error:
                await requester.request("alpha", 7117, bytes(400_000), timeout=10)
            assert error.value.remote_type == "PilotTimeoutError"
            return loop.time() - started

        after = sorted(await asyncio.gather(*(answered_after() for _ in range(5))))
    assert after[2] < 2.5 < after[3], after
    assert bridge.stop()["errors"] == 5


async def test_a_rep_bridge_stopped_with_requests_held_counts_its_answers(
        daemon_pair: Pair, beta_client: Client, sockets: Path) -> None:
    alpha, _ = daemon_pair
    # No worker: one request waits for one, the others for its slot, one is given up on.
    bridge = BridgeProcess(alpha.home, "rep", "7118", endpoint(sockets, "held-stop"),
                           "--max-in-flight", "1")
    try:
        async with Requester(beta_client) as requester:

            async def stopped() -> None:
                with pytest.raises(RemoteError) as error:
                    await requester.request("alpha", 7118, b"held", timeout=10)
                assert error.value.remote_type == "ConnectionClosedError"

            held = [asyncio.create_task(stopped()) for _ in range(3)]
            with pytest.raises(PilotTimeoutError):
                await requester.request("alpha", 7118, b"given up", timeout=0.5)
            await asyncio.sleep(0.5)
            stats = await asyncio.to_thread(bridge.stop)
            await asyncio.gather(*held)
    finally:
        bridge.kill()
    # Before the fix: errors 0 (the replier's close answered them, uncounted).
    assert stats["errors"] == 3 and stats["cancelled"] == 1 and stats["forwarded"] == 0, stats


def test_bad_endpoints_and_unknown_peers_are_one_line_errors(
        daemon_pair: Pair, sockets: Path) -> None:
    alpha, _ = daemon_pair
    assert_one_line_error(cli(alpha.home, "bridge", "pub", "7105", "tcp://0.0.0.0:5555"), 2,
                          "tcp://127.0.0.1:PORT")
    assert_one_line_error(cli(alpha.home, "bridge", "rep", "7105", "ipc:///nonexistent/x.sock"),
                          2, "cannot bind")
    assert_one_line_error(cli(alpha.home, "bridge", "req", "nobody:7105",
                              endpoint(sockets, "r")), 5)
    assert_one_line_error(cli(alpha.home, "bridge", "sub", "beta", "x", endpoint(sockets, "s")),
                          2, "NAME:PORT")
    # ZeroMQ takes a high-water mark as a C int: before the bound, an OverflowError (exit 70).
    assert_one_line_error(cli(alpha.home, "bridge", "pub", "7105", endpoint(sockets, "p"),
                              "--hwm", "3000000000"), 2, "--hwm", "more than 1000000")
    assert_one_line_error(cli(alpha.home, "bridge", "rep", "7105", endpoint(sockets, "p"),
                              "--max-in-flight", str(10**20)), 2, "--max-in-flight")


STUCK_SUB_SCRIPT = """
    import sys, time, zmq
    sock = zmq.Context().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(sys.argv[1])
    time.sleep(float(sys.argv[2]))  # subscribed, and never reads
    print("[]")
"""


async def test_a_local_subscriber_that_stops_reading_holds_back_the_bridge_then_is_counted(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "stuck")
    async with Publisher(beta_client, 7106) as pub:
        bridges.append(bridge := BridgeProcess(alpha.home, "sub", "beta:7106", "", at,
                                               "--hwm", "1", "--send-timeout", "0.2"))
        await until_subscribed(pub, 1)
        script = asyncio.create_task(zmq_script(STUCK_SUB_SCRIPT, at, "6"))
        for _ in range(400):  # 6 MB: more than the socket buffers between bridge and SUB
            await pub.publish("t", bytes(16 * 1024))
        await asyncio.sleep(3)
        await script
    stats = bridge.stop()
    assert stats["dropped"] > 0, stats
    assert stats["forwarded"] + stats["dropped"] <= 400, stats
    assert bridge.stderr.count("a message was dropped: no room") == stats["dropped"]


GAP_SCRIPT = """
    import json, sys, time, zmq
    sock = zmq.Context().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVTIMEO, 15000)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(sys.argv[1])
    time.sleep(0.3)  # the subscription reaches the bridge
    print("ready", flush=True)
    received, missed = 0, 0
    while True:
        topic, payload = sock.recv_multipart()
        if topic == b"gap":
            missed += json.loads(payload)["missed"]
        elif payload == b"end":
            break
        else:
            received += 1
    print(json.dumps({"received": received, "missed": missed}))
"""


async def test_publications_the_publisher_dropped_are_announced_on_the_gap_topic(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "gap")
    config = PubSubConfig(overflow=Overflow.DROP_OLDEST, queue_bytes=8192)
    async with Publisher(beta_client, 7107, config) as pub:
        bridges.append(bridge := BridgeProcess(alpha.home, "sub", "beta:7107", "t", at,
                                               "--gap-topic", "gap"))
        await until_subscribed(pub, 1)

        async def flood(_: Script) -> None:  # far faster than its small queue drains: it drops
            for n in range(1500):
                await pub.publish("t", f"{n:04d}".encode() * 256)
            await pub.publish("t", "end")

        got = await zmq_script(GAP_SCRIPT, at, when_ready=flood)
    assert got["missed"] > 0 and got["received"] + got["missed"] == 1500, got
    stats = bridge.stop()
    assert stats["missed"] == got["missed"] and stats["forwarded"] == got["received"] + 1


def test_the_bridge_stops_with_its_daemon(fresh_home: Path, sockets: Path) -> None:
    start_daemon(fresh_home, "solo")
    bridge = BridgeProcess(fresh_home, "pub", "7108", endpoint(sockets, "solo"))
    try:
        assert cli(fresh_home, "daemon", "stop").returncode == 0
        _, err = bridge.proc.communicate(timeout=15)
        assert bridge.proc.returncode == 3, err
        assert "Traceback" not in err and "stopped" in err.strip().splitlines()[-1], err
    finally:
        bridge.kill()


def test_a_bridge_whose_daemon_does_not_answer_says_so(fresh_home: Path, sockets: Path) -> None:
    daemon = start_daemon(fresh_home, "solo")
    os.kill(daemon.pid, signal.SIGSTOP)  # it accepts connections, and answers nothing
    try:
        results = cli_many([(fresh_home, "bridge", "rep", "7114", endpoint(sockets, "frozen-rep")),
                            (fresh_home, "bridge", "pub", "7114", endpoint(sockets, "frozen-pub"))],
                           timeout=40)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    for result in results:  # before the fix: "error: OSError", exit 1
        assert_one_line_error(result, 3, "did not answer", "stuck")


HOLD_SCRIPT = """
    import json, sys, time, zmq
    ctx = zmq.Context()
    clients = [ctx.socket(zmq.REQ) for _ in range(int(sys.argv[2]))]
    for req in clients:
        req.connect(sys.argv[1])
        req.send(b"hold")
    print("ready", flush=True)
    deadline = time.monotonic() + 15
    got = [[f.decode() for f in req.recv_multipart()]
           if req.poll(max(deadline - time.monotonic(), 0) * 1000) else None for req in clients]
    print(json.dumps(got))
"""


async def test_req_clients_hear_when_the_bridge_stops_before_their_replies(
        daemon_pair: Pair, beta_client: Client, sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "hold")
    arrived = asyncio.Event()

    async def hold(_: Request) -> bytes:
        arrived.set()
        await asyncio.sleep(30)
        return b"too late"

    async with serving(beta_client, 7109, hold):
        # One request in flight, one read by the bridge and waiting for a slot, two queued on
        # its socket: all four are answered (before the fix, the two queued waited for ever).
        bridge = BridgeProcess(alpha.home, "req", "beta:7109", at, "--max-in-flight", "1")
        try:
            async def stop_the_bridge(_: Script) -> None:
                await asyncio.wait_for(arrived.wait(), 10)
                await asyncio.sleep(0.5)  # the bridge has read the second one
                stats = await asyncio.to_thread(bridge.stop)
                assert stats["errors"] == 4 and stats["dropped"] == 0, stats

            got = await zmq_script(HOLD_SCRIPT, at, "4", when_ready=stop_the_bridge)
        finally:
            bridge.kill()
    for answer in got:
        assert answer is not None and answer[0] == "pilot-agents.error", got
        assert json.loads(answer[1])["type"] == "ConnectionClosedError"
    assert "Warning" not in bridge.stderr, bridge.stderr  # a coroutine never awaited


BIG_REQ_SCRIPT = """
    import json, sys, zmq
    req = zmq.Context().socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 30000)
    req.connect(sys.argv[1])
    out = []
    for data in (bytes(int(sys.argv[2])), b"big reply", b"abc", b"quit"):
        req.send(data)
        out.append([f[:1000].decode() for f in req.recv_multipart()])
    print(json.dumps(out))
"""

BIG_REP_SCRIPT = rep_worker("""
    while (data := rep.recv()) != b"quit":
        rep.send(bytes(int(sys.argv[2])) if data == b"big reply" else data[::-1])
    rep.send(b"bye")
    result = []
""", recv_timeout_ms=30000)


async def test_requests_and_replies_too_large_for_a_tunnel_are_error_replies(
        daemon_pair: Pair, bridges: list[BridgeProcess], sockets: Path) -> None:
    alpha, beta = daemon_pair
    at_rep, at_req = endpoint(sockets, "bigrep"), endpoint(sockets, "bigreq")
    # Plain ZeroMQ at both ends: a REQ on alpha asks a REP worker on beta, through two bridges.
    bridges.append(rep := BridgeProcess(beta.home, "rep", "7110", at_rep, "--timeout", "10"))
    bridges.append(req := BridgeProcess(alpha.home, "req", "beta:7110", at_req,
                                        "--timeout", "15"))
    too_large = str(MAX_MESSAGE)  # a tunnel message carries less, and so does the daemon
    worker = asyncio.create_task(zmq_script(BIG_REP_SCRIPT, at_rep, too_large, timeout=40))
    got = await zmq_script(BIG_REQ_SCRIPT, at_req, too_large, timeout=40)
    await worker
    big_request, big_reply, abc, quit_ = got
    assert big_request[0] == "pilot-agents.error", big_request
    assert json.loads(big_request[1])["type"] == "MessageTooLargeError"
    assert big_reply[0] == "pilot-agents.error", big_reply
    assert json.loads(big_reply[1])["remote_type"] == "MessageTooLargeError"
    assert abc == ["cba"] and quit_ == ["bye"]
    assert req.stop()["errors"] == 2 and rep.stop()["errors"] == 1


BIG_PUB_SCRIPT = """
    import select, sys, zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.connect(sys.argv[1])
    assert sock.recv() == b"\\x01"
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], 0.05)[0]:
        sock.send_multipart([b"t.warm", b""])
    sock.send_multipart([b"t.big", bytes(int(sys.argv[2]))])
    sock.send_multipart([b"t.after", b"small"])
    sock.close(linger=10000)  # the big one takes a while to leave
    ctx.term()
    print("[]")
"""


async def test_a_local_publication_too_large_for_a_tunnel_is_counted_not_sent(
        daemon_pair: Pair, beta_client: Client, bridges: list[BridgeProcess],
        sockets: Path) -> None:
    alpha, _ = daemon_pair
    at = endpoint(sockets, "bigpub")
    bridges.append(bridge := BridgeProcess(alpha.home, "pub", "7111", at))
    async with Subscriber(beta_client, "alpha", 7111, ["t."], PubSubConfig()) as sub:

        async def warmed_up(script: Script) -> None:
            assert (await sub.receive(10)).topic == "t.warm"
            assert script.stdin is not None
            script.stdin.write(b"go\n")
            await script.stdin.drain()

        await zmq_script(BIG_PUB_SCRIPT, at, str(MAX_MESSAGE), when_ready=warmed_up)
        # The subscription outlives it: what comes next still arrives, with no gap.
        while (publication := await sub.receive(10)).topic == "t.warm":
            pass
    assert (publication.topic, publication.data) == ("t.after", b"small")
    assert not publication.missed and not publication.resumed
    stats = bridge.stop()
    assert stats["malformed"] == 1 and stats["forwarded"] >= 2, stats


def test_an_ipc_path_in_use_or_not_a_socket_is_refused_not_taken_over(
        fresh_home: Path, sockets: Path) -> None:
    daemon = start_daemon(fresh_home, "solo")
    # ZeroMQ would delete the daemon's own socket and take its clients.
    in_use = f"ipc://{fresh_home}/daemon.sock"
    assert_one_line_error(cli(fresh_home, "bridge", "pub", "7112", in_use, timeout=10), 2,
                          "address in use")
    assert cli(fresh_home, "--json", "daemon", "status").returncode == 0
    precious = sockets / "notes.txt"
    precious.write_text("keep me")
    assert_one_line_error(cli(fresh_home, "bridge", "pub", "7112", f"ipc://{precious}",
                              timeout=10), 2, "not a socket")
    assert precious.read_text() == "keep me"
    # A socket nobody listens on, left by a bridge that was killed, is taken.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sockets / "stale.sock"))
    bridge = BridgeProcess(daemon.home, "pub", "7112", endpoint(sockets, "stale"))
    bridge.stop()


def test_ctrl_c_while_the_peer_is_being_reached_stops_the_bridge_at_once(
        sockets: Path) -> None:
    with named_pair() as (alpha, beta):
        assert ipc_call(beta.home, cmd="stop")["ok"]  # reaching it takes a handshake's timeout
        proc = subprocess.Popen(
            [sys.executable, "-m", "pilot_agents.cli", "--home", str(alpha.home), "--json",
             "bridge", "req", "beta:7113", endpoint(sockets, "early")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            time.sleep(2.0)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert json.loads(out.strip().splitlines()[-1])["state"] == "stopped"
