"""Req/rep and pub/sub when things go wrong, on embedded Nodes and through real daemons: a peer
that restarts mid-stream, a subscriber that never reads while a publisher floods it (memory
measured), and a trusted peer that sends malformed pattern frames.

Each test names the delivery guarantee it backs (the README's table):
- req/rep: a request reaches the replier at most once and is answered at most once; replies are
  matched by id, in any order; a replier that stops fails its waiting requesters at once, and
  new requests succeed once it is back.
- pub/sub: in order per subscriber, at most once; BLOCK loses nothing, DROP_OLDEST counts every
  drop as a gap; a subscriber resumes by itself when its publisher restarts (``resumed`` set);
  a publisher drops a subscriber whose node went away and serves a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilot_agents import Client, PilotError, PilotTimeoutError, Transport, ipc
from pilot_agents.errors import ConfigError, ConnectionClosedError, RemoteError, WireError
from pilot_agents.node import Connection, Node
from pilot_agents.patterns import (
    Overflow,
    Publisher,
    PubSubConfig,
    Replier,
    ReqRepConfig,
    Request,
    Requester,
    Subscriber,
    serving,
)
from pilot_agents.patterns.frames import (
    Kind,
    encode_error,
    encode_frame,
    encode_prefixes,
    encode_publication,
    parse_frame_untrusted,
)
from pilot_agents.transport import Listener
from tests.conftest import (
    ROOT,
    DaemonHandle,
    cli,
    ipc_call,
    named_pair,
    short_home,
    start_daemons,
    stop_daemons,
)
from tests.test_cli import start_beacon
from tests.test_flood import rss
from tests.test_node_converge import PeerProcess
from tests.test_pubsub import until_subscribed
from tests.transport_pairs import Pair, kind_fixture, pair_fixture  # noqa: F401 (fixtures)

log = logging.getLogger("tests.patterns_robust")

PROMPTLY = 5.0  # seconds within which a peer's going away must reach those waiting on it
RESUME = 30.0  # seconds a restarted peer and its patterns have to be serving again


# -- peers that stop and start again, keeping their home (identity, trust, UDP port) -------------


class EmbeddedPeer:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.listen = "127.0.0.1:0"  # the first start picks a port; restarts keep it
        self.node: Node | None = None
        self.others: list[EmbeddedPeer] = []
        self.node_id = ""

    @property
    def transport(self) -> Transport:
        assert self.node is not None
        return self.node

    async def start(self) -> None:
        node = Node(home=self.home, listen=self.listen)
        await node.start()
        self.node, self.node_id = node, node.node_id
        self.listen = f"127.0.0.1:{node.local_endpoint[1]}"
        for other in self.others:
            if other.node is not None:
                node.trust(other.node_id)
                node.add_peer(other.node_id, other.listen)
                other.node.trust(node.node_id)

    async def stop(self) -> None:
        if self.node is not None:
            await self.node.close()
            self.node = None


class DaemonPeer:
    def __init__(self, handle: DaemonHandle) -> None:
        self.handle = handle
        self.node_id = handle.node_id
        self.client: Client | None = None

    @property
    def transport(self) -> Transport:
        assert self.client is not None
        return self.client

    async def start(self) -> None:
        if ipc.daemon_pid(self.handle.home) is None:
            result = await asyncio.to_thread(
                cli, self.handle.home, "--json", "daemon", "start", "--hostname",
                self.handle.hostname, "--listen", self.handle.endpoint)
            assert result.returncode == 0, result.stderr
        self.client = Client(self.handle.home)
        await self.client.__aenter__()

    async def stop(self) -> None:
        """``daemon stop``, as an operator would: the daemon closes its tunnels on the way."""
        if self.client is not None:
            await self.client.close()
            self.client = None
        home = self.handle.home
        await asyncio.to_thread(ipc_call, home, 5.0, cmd="stop")
        deadline = time.monotonic() + 15
        while ipc.daemon_pid(home) is not None:
            assert time.monotonic() < deadline, "the daemon did not stop"
            await asyncio.sleep(0.05)


Peer = EmbeddedPeer | DaemonPeer


@contextlib.asynccontextmanager
async def restartable(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Peer, Peer, str]]:
    """(client side, server side, the server's name at the client), both running."""
    if kind == "embedded":
        a, b = EmbeddedPeer(tmp_path / "a"), EmbeddedPeer(tmp_path / "b")
        a.others, b.others = [b], [a]
        await b.start()
        await a.start()
        try:
            yield a, b, b.node_id
        finally:
            await a.stop()
            await b.stop()
        return
    with named_pair() as (alpha, beta):
        peers = DaemonPeer(alpha), DaemonPeer(beta)
        for peer in peers:
            await peer.start()
        try:
            yield peers[0], peers[1], "beta"
        finally:
            for peer in peers:
                if peer.client is not None:
                    await peer.client.close()


async def within(seconds: float, what: str, condition: Callable[[], bool]) -> float:
    """Wait until ``condition()``; how long that took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not condition():
        assert loop.time() - started < seconds, f"{what}: not within {seconds} s"
        await asyncio.sleep(0.02)
    return loop.time() - started


# -- peer restart mid-stream -----------------------------------------------------------------


async def echo(request: Request) -> object:
    return request.data


async def test_requests_in_flight_fail_at_once_when_the_repliers_node_stops_and_succeed_after(
        kind: str, tmp_path: Path) -> None:
    async with restartable(kind, tmp_path) as (client, server, name):
        holding = 0
        release = asyncio.Event()

        async def stuck(request: Request) -> object:
            nonlocal holding
            holding += 1
            await release.wait()
            return b"never sent"

        async with Requester(client.transport) as requester:
            with contextlib.suppress(PilotError):  # serving's exit: its transport is gone
                async with serving(server.transport, 7101, stuck):
                    waiting = [asyncio.create_task(
                        requester.request(name, 7101, b"%d" % n, timeout=60)) for n in range(20)]
                    await within(10, "20 requests handed to the handler", lambda: holding == 20)
                    loop = asyncio.get_running_loop()
                    stopped = loop.time()
                    await server.stop()
                    outcomes = await asyncio.wait_for(
                        asyncio.gather(*waiting, return_exceptions=True), PROMPTLY)
                    failed_after = loop.time() - stopped
            assert all(isinstance(o, PilotError) and not isinstance(o, PilotTimeoutError)
                       for o in outcomes), outcomes
            log.warning("req/rep (%s): 20 waiting requesters failed %.2f s after the replier's "
                        "node stopped", kind, failed_after)

            await server.start()
            async with serving(server.transport, 7101, echo):
                reply = await requester.request(name, 7101, b"again", timeout=RESUME)
                assert reply.data == b"again"


async def test_a_subscriber_resumes_by_itself_when_its_publishers_node_restarts(
        kind: str, tmp_path: Path) -> None:
    config = PubSubConfig(reconnect_min=0.05, reconnect_max=0.5)
    async with restartable(kind, tmp_path) as (client, server, name):
        first = Publisher(server.transport, 8101)
        await first.__aenter__()
        async with Subscriber(client.transport, name, 8101, ["news"], config) as sub:
            await until_subscribed(first, 1)
            await first.publish("news", "before")
            before = await sub.receive(10)
            assert before.text() == "before" and not before.resumed

            waiting = asyncio.create_task(sub.receive(RESUME))
            await server.stop()
            await first.close()  # what is left of it: its transport is gone
            await server.start()
            async with Publisher(server.transport, 8101) as again:
                loop = asyncio.get_running_loop()
                started = loop.time()
                while not waiting.done():  # until the subscriber is back, publish again
                    await again.publish("news", "after")
                    await asyncio.sleep(0.2)
                    assert loop.time() - started < RESUME
                after = await waiting
                assert after.text() == "after" and after.resumed
                assert sub.reconnections >= 1
                log.warning("pub/sub (%s): resubscribed %.2f s after the publisher's node came "
                            "back", kind, loop.time() - started)


async def test_a_publisher_drops_a_subscriber_whose_node_restarts_and_serves_a_new_one(
        kind: str, tmp_path: Path) -> None:
    async with (
        restartable(kind, tmp_path) as (client, server, name),
        Publisher(server.transport, 8102) as pub,
    ):
        old = Subscriber(client.transport, name, 8102, [""])
        await old.__aenter__()
        await until_subscribed(pub, 1)
        await pub.publish("t", "one")
        assert (await old.receive(10)).text() == "one"

        await client.stop()
        await old.close()

        async def publish() -> None:  # the feed finds the stream gone when it sends
            while True:
                await pub.publish("t", "to nobody")
                await asyncio.sleep(0.05)

        publishing = asyncio.create_task(publish())
        dropped = await within(PROMPTLY, "the subscription dropped",
                               lambda: pub.subscribers == 0)
        publishing.cancel()
        log.warning("pub/sub (%s): publisher dropped the gone subscriber in %.2f s",
                    kind, dropped)

        await client.start()
        async with Subscriber(client.transport, name, 8102, [""]) as new:
            await until_subscribed(pub, 1)
            assert await pub.publish("t", "two") == 1
            publication = await new.receive(10)
            assert publication.text() == "two" and publication.missed == 0


async def test_requests_to_a_crashed_repliers_daemon_time_out_and_succeed_once_it_is_back(
        tmp_path: Path) -> None:
    """A crash (SIGKILL) says nothing to the peer, unlike a stop: waiting requests end at their
    timeout, never later; the first requests after the restart may fail while the tunnel finds
    the old session dead (its probes go unanswered), then requests succeed."""
    async with restartable("daemon", tmp_path) as (client, server, name):
        assert isinstance(server, DaemonPeer)
        hold = asyncio.Event()

        async def stuck(request: Request) -> object:
            await hold.wait()
            return b"never sent"

        async with Requester(client.transport) as requester:
            with contextlib.suppress(PilotError):
                async with serving(server.transport, 7401, stuck):
                    waiting = [asyncio.create_task(
                        requester.request(name, 7401, b"x", timeout=3)) for _ in range(5)]
                    await asyncio.sleep(0.5)
                    os.kill(server.handle.pid, signal.SIGKILL)
                    outcomes = await asyncio.wait_for(
                        asyncio.gather(*waiting, return_exceptions=True), 3 + PROMPTLY)
            assert all(isinstance(o, PilotError) for o in outcomes), outcomes

            assert server.client is not None
            await server.client.close()
            server.client = None
            await within(10, "the killed daemon gone",
                         lambda: ipc.daemon_pid(server.handle.home) is None)
            await server.start()
            async with serving(server.transport, 7401, echo):
                loop = asyncio.get_running_loop()
                started = loop.time()
                failures = []
                while True:
                    try:
                        reply = await requester.request(name, 7401, b"back?", timeout=5)
                        break
                    except PilotError as exc:
                        failures.append(type(exc).__name__)
                        assert loop.time() - started < RESUME, failures
                        await asyncio.sleep(0.2)
                assert reply.data == b"back?"
                log.warning("req/rep: after a crash and restart of the replier's daemon, the "
                            "first reply came %.2f s later (failed first: %s)",
                            loop.time() - started, failures)


async def test_a_request_the_killed_repliers_node_never_saw_goes_to_its_restarted_one(
        tmp_path: Path) -> None:
    """At most once across a crash: on a long-lived stream, requests sent while the replier's
    node was down are sent again on a new stream once it is back, and handled once each; one the
    old node had received (acknowledged) but not answered fails, saying the replier restarted."""
    replier = PeerProcess(tmp_path / "replier", script="restart_replier.py")
    try:
        # One stream per peer: the next request goes on the stream the held one waits on.
        async with Node(home=tmp_path / "me", listen="127.0.0.1:0") as me, \
                Requester(me, ReqRepConfig(streams_per_peer=1)) as requester:
            await replier.start(me.node_id)
            me.trust(replier.node_id)
            me.add_peer(replier.node_id, ("127.0.0.1", replier.port))
            name = replier.node_id
            assert (await requester.request(name, 7501, b"one", timeout=10)).data == b"one"
            assert await replier.line() == {"data": "one"}
            held = asyncio.create_task(requester.request(name, 7501, b"hold", timeout=60))
            assert await replier.line() == {"data": "hold"}
            (stream,) = requester._streams[(name, 7501)]
            conn = stream.conn
            assert isinstance(conn, Connection)
            await within(10, "the held request acknowledged", lambda: conn.written > 0
                         and not conn._stream().undelivered)

            await replier.crash()
            # Sent on the old stream, which still looks alive: the old node is gone, the new
            # one not yet there, so nobody acknowledges them.
            sent = [b"two-%d" % n for n in range(5)]
            waiting = [asyncio.create_task(requester.request(name, 7501, data, timeout=RESUME))
                       for data in sent]
            await within(10, "the requests sent", lambda: len(stream.waiting) == 6
                         and conn._stream().undelivered)
            await replier.start(me.node_id)
            assert [reply.data for reply in await asyncio.gather(*waiting)] == sent
            with pytest.raises(ConnectionClosedError, match="restarted before replying"):
                await asyncio.wait_for(held, PROMPTLY)
            assert (await requester.request(name, 7501, b"three", timeout=10)).data == b"three"
            # The new node handled each once: after them, the next line it printed is "three".
            handled = [(await replier.line())["data"] for _ in range(len(sent) + 1)]
            assert sorted(handled[:-1]) == [data.decode() for data in sent]
            assert handled[-1] == "three"
    finally:
        await replier.stop()


@contextlib.asynccontextmanager
async def daemon_sides(via: str, tmp_path: Path) -> AsyncIterator[tuple[DaemonPeer, DaemonPeer,
                                                                        tuple[str, ...]]]:
    """Two daemons, alpha and beta, that reach each other by static peers or through a real
    beacon, each with a client; (alpha, beta, what else beta's ``daemon start`` needs)."""
    async with contextlib.AsyncExitStack() as stack:
        if via == "static peers":
            alpha, beta = stack.enter_context(named_pair())
            extra: tuple[str, ...] = ()
        else:
            beacon, address = start_beacon(tmp_path / "beacon")
            stack.callback(beacon.wait, 10)
            stack.callback(beacon.terminate)
            homes = short_home(), short_home()
            stack.callback(stop_daemons, *homes)
            extra = ("--beacon", address)
            alpha, beta = start_daemons((homes[0], "alpha"), (homes[1], "beta"), extra=extra)
            for home, other in ((alpha.home, "beta"), (beta.home, "alpha")):
                assert ipc_call(home, cmd="trust_add", target=other)["ok"]
        peers = DaemonPeer(alpha), DaemonPeer(beta)
        try:
            for peer in peers:
                await peer.start()
            yield peers[0], peers[1], extra
        finally:
            for peer in peers:
                if peer.client is not None:
                    await peer.client.close()


@pytest.mark.parametrize("via", ["static peers", "beacon"])
async def test_a_request_the_killed_repliers_daemon_never_saw_goes_to_its_restarted_one(
        via: str, tmp_path: Path) -> None:
    """The same guarantee through two daemons: SIGKILL to the replier's daemon with a request
    in flight that it acknowledged, more requests sent while it is down; once it is back (its
    inbox port buffering requests until a replier comes), each unacknowledged request is
    answered by it, once, and the acknowledged one raises that the replier restarted, all
    within their timeouts."""
    async with daemon_sides(via, tmp_path) as (client, server, restart_args):
        assert client.client is not None
        handled: list[bytes] = []

        async def record(request: Request) -> object:
            handled.append(request.data)
            if request.data == b"hold":
                await asyncio.Event().wait()
            return request.data

        # One stream per peer: the next requests go on the stream the held one waits on.
        async with Requester(client.client, ReqRepConfig(streams_per_peer=1)) as requester:
            with contextlib.suppress(PilotError):  # serving's exit: its daemon is gone
                async with serving(server.transport, 7502, record):
                    one = await requester.request("beta", 7502, b"one", timeout=10)
                    assert one.data == b"one"
                    held = asyncio.create_task(
                        requester.request("beta", 7502, b"hold", timeout=60))
                    await within(10, "the held request handled", lambda: b"hold" in handled)
                    (stream,) = requester._streams[("beta", 7502)]
                    await stream.conn.drain(10)  # the replier's node acknowledged it
                    os.kill(server.handle.pid, signal.SIGKILL)
                    await within(10, "the killed daemon gone",
                                 lambda: ipc.daemon_pid(server.handle.home) is None)
            assert server.client is not None
            await server.client.close()
            server.client = None

            # Sent on the old stream, which the requester's daemon still holds: nobody
            # acknowledges them. One with a short timeout ends at it: no hang.
            written = stream.conn.written
            sent = [b"two-%d" % n for n in range(5)]
            waiting = [asyncio.create_task(requester.request("beta", 7502, data, timeout=RESUME))
                       for data in sent]
            short = asyncio.create_task(requester.request("beta", 7502, b"short", timeout=1))
            await within(10, "the requests handed to the daemon",
                         lambda: stream.conn.written > written and len(stream.waiting) == 7)
            with pytest.raises(PilotTimeoutError):
                await asyncio.wait_for(short, 1 + PROMPTLY)

            handled.clear()
            result = await asyncio.to_thread(
                cli, server.handle.home, "--json", "daemon", "start", "--hostname", "beta",
                "--listen", server.handle.endpoint, "--inbox", "1001,7502", *restart_args)
            assert result.returncode == 0, result.stderr
            await server.start()
            async with serving(server.transport, 7502, record):
                replies = await asyncio.wait_for(asyncio.gather(*waiting), RESUME + PROMPTLY)
                assert [reply.data for reply in replies] == sent
                with pytest.raises(ConnectionClosedError, match="restarted before replying"):
                    await asyncio.wait_for(held, PROMPTLY)
                again = await requester.request("beta", 7502, b"three", timeout=10)
                assert again.data == b"three"
                # The restarted daemon's replier handled each once ("short" was given up on
                # before the restart was known: not resent).
                assert sorted(handled) == sorted([*sent, b"three"])
            # What failed on the stream the requester gave up on went with it: nothing for
            # the application's next flush to raise.
            await client.client.flush()


# -- a subscriber that never reads, flooded: memory stays bounded -------------------------------

RSS_GROWTH_LIMIT = 100 * 2**20  # bytes each process may grow by, as in test_flood.py
STALL = 3.0  # seconds without a completed publish: the publisher waits
DEADLINE = 120.0  # seconds the flood may take to block (1 KB publications through two daemons)
DROP_COUNT = 40_000  # 1 KB publications offered to a subscriber that does not read (drop-oldest)

# The subscriber runs in a process of its own, so its memory is measured alone. It subscribes,
# reads nothing until told, then reads until 3 s of quiet and says what it saw.
SUBSCRIBER = """
import asyncio, json, sys
from pilot_agents import Client, PilotTimeoutError
from pilot_agents.patterns import Subscriber

async def main(home, port):
    async with Client(home) as client, Subscriber(client, "beta", port, [""]) as sub:
        print("subscribed", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        seen = missed = 0
        first_gap = None
        numbers = []
        try:
            while True:
                publication = await sub.receive(3)
                if publication.missed and first_gap is None:
                    first_gap = seen
                seen += 1
                missed += publication.missed
                numbers.append(int(publication.data[:8]))
        except PilotTimeoutError:
            pass
        ordered = numbers == sorted(numbers)
        print(json.dumps({"seen": seen, "missed": missed, "first_gap": first_gap,
                          "ordered": ordered, "last": numbers[-1] if numbers else None}))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@dataclass
class Meter:
    """The peak RSS growth of some processes since it was made."""

    pids: dict[str, int]

    def __post_init__(self) -> None:
        self.before = {name: rss(pid) for name, pid in self.pids.items()}
        self.peak = dict(self.before)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], rss(pid))

    def check(self, what: str) -> None:
        growth = {name: (self.peak[name] - self.before[name]) / 2**20 for name in self.pids}
        log.warning("%s: RSS growth in MB %s", what,
                    {name: round(mb, 1) for name, mb in growth.items()})
        for name, mb in growth.items():
            assert mb * 2**20 < RSS_GROWTH_LIMIT, f"{name} grew {mb:.0f} MB ({what})"


async def test_a_request_too_large_fails_at_once_and_the_next_ones_go_on(
        tmp_path: Path) -> None:
    """A request over the daemon's payload limit (a tunnel message's) raises at once, not at its
    timeout, before it reaches the daemon (which would refuse it); the next requests go on."""
    async with daemon_sides("static peers", tmp_path) as (client, server, _):
        assert client.client is not None
        async with serving(server.transport, 7503, echo), \
                Requester(client.client, ReqRepConfig(streams_per_peer=1)) as requester:
            assert (await requester.request("beta", 7503, b"ok", timeout=5)).data == b"ok"
            started = time.monotonic()
            with pytest.raises(ConfigError, match="largest message a tunnel carries"):
                await requester.request("beta", 7503, b"x" * (64 * 2**20 + 1), timeout=30)
            assert time.monotonic() - started < 10
            for n in range(3):
                reply = await requester.request("beta", 7503, b"next-%d" % n, timeout=5)
                assert reply.data == b"next-%d" % n


async def test_after_the_requesters_own_daemon_restarts_a_new_stream_serves_it(
        tmp_path: Path) -> None:
    """The requester's own daemon stops and starts again: the request that finds its stream
    gone raises at once, and the next one opens a stream on the new daemon."""
    async with daemon_sides("static peers", tmp_path) as (client, server, _):
        assert client.client is not None
        alpha, beta = client.handle, server.handle
        async with serving(server.transport, 7504, echo), Requester(client.client) as requester:
            assert (await requester.request("beta", 7504, b"ok", timeout=30)).data == b"ok"
            await asyncio.to_thread(ipc_call, alpha.home, 5.0, cmd="stop")
            await within(15, "the daemon stopped", lambda: ipc.daemon_pid(alpha.home) is None)
            result = await asyncio.to_thread(
                cli, alpha.home, "--json", "daemon", "start", "--hostname", alpha.hostname,
                "--listen", alpha.endpoint)
            assert result.returncode == 0, result.stderr
            assert ipc_call(alpha.home, cmd="add_peer", node_id=beta.node_id,
                            address=beta.endpoint, hostname=beta.hostname)["ok"]
            assert ipc_call(alpha.home, cmd="trust_add", target=beta.node_id)["ok"]
            with pytest.raises(PilotError):  # its stream was the old daemon's
                await requester.request("beta", 7504, b"lost", timeout=30)
            assert (await requester.request("beta", 7504, b"again", timeout=30)).data == b"again"


@pytest.fixture
def flood_daemons() -> Iterator[tuple[DaemonHandle, DaemonHandle]]:
    with named_pair() as pair:
        yield pair


@pytest.mark.slow
@pytest.mark.parametrize("overflow", [Overflow.BLOCK, Overflow.DROP_OLDEST],
                         ids=["block", "drop-oldest"])
async def test_a_subscriber_that_never_reads_holds_memory_bounded(
        flood_daemons: tuple[DaemonHandle, DaemonHandle], overflow: Overflow) -> None:
    alpha, beta = flood_daemons
    port = 8201
    config = PubSubConfig(overflow=overflow, queue_bytes=1024 * 1024)
    async with Client(beta.home) as client, Publisher(client, port, config) as pub:
        reader = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER, str(alpha.home), str(port)], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert reader.stdout is not None and reader.stdin is not None
            line = await asyncio.wait_for(asyncio.to_thread(reader.stdout.readline), 30)
            assert line.strip() == "subscribed", reader.stderr
            await until_subscribed(pub, 1)
            meter = Meter({"publisher": os.getpid(), "publisher's daemon": beta.pid,
                           "subscriber": reader.pid, "subscriber's daemon": alpha.pid})
            published = 0
            payload = b"x" * 1016

            async def flood() -> None:
                nonlocal published
                for n in range(DROP_COUNT if overflow is Overflow.DROP_OLDEST else 10**7):
                    await pub.publish("t", b"%08d" % n + payload)
                    published += 1
                    if n % 8 == 0:  # drop-oldest never waits: pace it, so the feed fills the
                        await asyncio.sleep(0.001)  # tunnel while the queue overflows

            task = asyncio.create_task(flood())
            loop = asyncio.get_running_loop()
            started = last_change = loop.time()
            seen = 0
            while loop.time() - last_change < STALL:
                await asyncio.sleep(0.25)
                meter.sample()
                if published != seen:
                    seen, last_change = published, loop.time()
                assert loop.time() - started < DEADLINE, f"{published} published, still going"
            meter.check(f"{overflow.value}: {published} publications of 1 KB offered")
            if overflow is Overflow.BLOCK:
                assert not task.done(), "the publisher never waited"
            else:
                assert task.done() and published == DROP_COUNT

            blocked_at = published
            reader.stdin.write("read\n")
            reader.stdin.flush()
            if overflow is Overflow.BLOCK:  # reading lets the publisher go on; then stop it
                await within(DEADLINE, "the publisher going on", lambda: published > blocked_at)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            out, _ = await asyncio.wait_for(asyncio.to_thread(reader.communicate), DEADLINE)
            result = json.loads(out)
            log.warning("%s: the subscriber read %s", overflow.value, result)
            assert result["ordered"]
            assert result["seen"] + result["missed"] == published, (result, published)
            if overflow is Overflow.BLOCK:
                assert result["missed"] == 0
            else:
                assert result["missed"] > 0 and result["first_gap"] is not None
                assert result["last"] == published - 1  # the newest survive
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()


# -- a trusted peer sending malformed pattern frames --------------------------------------------

NO_KIND = b"\xee"  # no such frame kind: random bytes after it stay malformed for every pattern
JUNK = [
    b"", b"\x01", encode_frame(Kind.REQUEST, 1, b"")[:5], os.urandom(3),
    NO_KIND + os.urandom(200), NO_KIND + random.Random(13).randbytes(64 * 1024),
    encode_frame(Kind.REPLY, 1, b"a reply to nobody"),
    encode_frame(Kind.PUBLISH, 2**64 - 1, b"\xff\xff"),
    encode_frame(Kind.GAP, 2**64 - 1, b""),
]


async def test_a_replier_drops_malformed_requests_and_serves_the_rest(pair: Pair) -> None:
    async with serving(pair.server.transport, 7201, echo) as replier:
        async with pair.client.transport.connect(pair.server_name, 7201) as hostile:
            subscribe = encode_frame(Kind.SUBSCRIBE, 1, encode_prefixes(["x"]))
            for junk in [*JUNK, subscribe]:
                await hostile.send(junk)
            # The same stream still gets answers to well-formed requests.
            await hostile.send(encode_frame(Kind.REQUEST, 42, b"fine"))
            answer = parse_frame_untrusted((await hostile.receive(10)).data)
            assert (answer.kind, answer.id, answer.payload) == (Kind.REPLY, 42, b"fine")
        async with Requester(pair.client.transport) as requester:
            assert (await requester.request(pair.server_name, 7201, "ok", timeout=10)).data == b"ok"
        assert replier.malformed == len(JUNK) + 1


async def test_a_requester_drops_a_stream_that_sends_garbage_and_goes_on(pair: Pair) -> None:
    """A hostile replier: the request says what to answer it with."""

    def answers(request_id: int, what: bytes) -> list[bytes]:
        good = encode_frame(Kind.REPLY, request_id, b"good")
        return {
            b"stray": [encode_frame(Kind.REPLY, request_id + 10**6, b"not yours"), good],
            b"garbage": [NO_KIND + os.urandom(100)],
            b"truncated": [encode_frame(Kind.REPLY, request_id, b"")[:5]],
            b"wrong kind": [encode_frame(Kind.PUBLISH, request_id, b"")],
            b"bad error": [encode_frame(Kind.ERROR, request_id, b"\xff" * 50)],
            b"huge error": [encode_frame(Kind.ERROR, request_id,
                                         encode_error(ValueError("x" * 100_000)))],
        }.get(what, [good])

    async def hostile(listener: Listener) -> None:
        while True:
            message = await listener.receive(timeout=None)
            frame = parse_frame_untrusted(message.data)
            for answer in answers(frame.id, frame.payload):
                await message.reply(answer)

    async with pair.server.transport.listen(7202) as listener, \
            Requester(pair.client.transport) as requester:
        server = asyncio.create_task(hostile(listener))
        try:
            async def ask(what: bytes) -> bytes:
                reply = await requester.request(pair.server_name, 7202, what, timeout=10)
                return reply.data

            assert await ask(b"stray") == b"good"  # a reply to an unknown id is ignored
            for what in (b"garbage", b"truncated", b"wrong kind"):
                with pytest.raises(WireError, match="its stream was dropped"):
                    await ask(what)
            with pytest.raises(RemoteError):
                await ask(b"bad error")
            with pytest.raises(RemoteError, match=r"ValueError: x+") as info:
                await ask(b"huge error")
            assert len(str(info.value)) < 5000
            assert await ask(b"plain") == b"good"  # on a new stream
            assert requester.malformed == 3
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError, PilotError):
                await server


async def test_a_publisher_drops_hostile_subscriptions_and_serves_the_rest(pair: Pair) -> None:
    client = pair.client.transport
    many = encode_frame(Kind.SUBSCRIBE, 1, encode_prefixes([f"p{n}" for n in range(3000)]))
    wide = encode_frame(Kind.SUBSCRIBE, 2, encode_prefixes(["x" * 1000] * 20))
    async with Publisher(pair.server.transport, 8301) as pub, \
            Subscriber(client, pair.server_name, 8301, [""]) as good:
        await until_subscribed(pub, 1)
        for junk in [*JUNK, many, wide]:
            await client.send(pair.server_name, 8301, junk, timeout=10)
        # A stream that subscribes, then sends garbage: its subscription goes.
        async with client.connect(pair.server_name, 8301) as hostile:
            await hostile.send(encode_frame(Kind.SUBSCRIBE, 3, encode_prefixes([""])))
            await until_subscribed(pub, 2)
            await hostile.send(NO_KIND + os.urandom(50))
            await within(PROMPTLY, "the hostile subscription dropped",
                         lambda: pub.subscribers == 1)
        # One that subscribes twice on one stream (two feeds, every publication twice): the
        # second is garbage, and the stream's subscription goes.
        async with client.connect(pair.server_name, 8301) as twice:
            await twice.send(encode_frame(Kind.SUBSCRIBE, 4, encode_prefixes([""])))
            await until_subscribed(pub, 2)
            await twice.send(encode_frame(Kind.SUBSCRIBE, 5, encode_prefixes([""])))
            await within(PROMPTLY, "the doubled subscription dropped",
                         lambda: pub.subscribers == 1)
        assert await pub.publish("t", "still here") == 1
        assert (await good.receive(10)).text() == "still here"
        assert pub.malformed == len(JUNK) + 4


async def test_a_subscriber_drops_a_publisher_stream_that_sends_garbage_and_resumes(
        pair: Pair) -> None:
    """A hostile publisher: a listener answering each SUBSCRIBE itself."""
    config = PubSubConfig(reconnect_min=0.05, reconnect_max=0.2)
    async with pair.server.transport.listen(8302) as listener, \
            Subscriber(pair.client.transport, pair.server_name, 8302, [""], config) as sub:
        first = await listener.receive(10)
        assert parse_frame_untrusted(first.data).kind == Kind.SUBSCRIBE
        publication = encode_frame(Kind.PUBLISH, 0, encode_publication(b"t", b"ok"))
        await first.reply(encode_frame(Kind.GAP, 2**64 - 1, b""))  # a huge gap count
        await first.reply(publication)
        got = await sub.receive(10)
        assert got.text() == "ok" and got.missed == 2**64 - 1

        for junk in (NO_KIND + os.urandom(100), encode_frame(Kind.PUBLISH, 0, b"\x10\x00abc"),
                     encode_frame(Kind.REQUEST, 1, b"")):
            receiving = asyncio.create_task(sub.receive(10))
            await first.reply(junk)
            again = await listener.receive(10)  # it subscribed again, on a new stream
            assert parse_frame_untrusted(again.data).kind == Kind.SUBSCRIBE
            assert again.source_port != first.source_port
            first = again
            await first.reply(publication)
            resumed = await receiving
            assert resumed.text() == "ok" and resumed.resumed
        assert sub.malformed == 3


async def test_a_replier_that_closes_fails_every_request_sent_to_it(pair: Pair) -> None:
    """Those it took (answered with an error) and those still queued for it (their streams
    reset): no requester waits for its timeout."""
    async with Requester(pair.client.transport) as requester:
        replier = Replier(pair.server.transport, 7301)
        await replier.__aenter__()
        waiting = [asyncio.create_task(requester.request(pair.server_name, 7301, b"%d" % n,
                                                         timeout=60)) for n in range(10)]
        await replier.receive(timeout=10)
        await asyncio.sleep(0.5)  # the others are queued behind it by now
        await replier.close()
        outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True),
                                          PROMPTLY)
        assert all(isinstance(o, PilotError) and not isinstance(o, PilotTimeoutError)
                   for o in outcomes), outcomes
