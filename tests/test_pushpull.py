"""Push/pull (pilot_agents.patterns.pushpull) on both transports: a pusher and three pullers,
each on its own embedded Node or behind its own daemon."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pilot_agents import Client, DaemonNotRunningError, PilotTimeoutError, Transport, ipc
from pilot_agents.errors import ConfigError, ConnectionClosedError, PortInUseError
from pilot_agents.node import Node
from pilot_agents.patterns import Puller, Pusher, PushPullConfig, WorkItem
from pilot_agents.patterns.frames import Kind, encode_credit, encode_frame
from tests.conftest import (
    DaemonHandle,
    peer_up,
    short_home,
    start_daemon,
    start_daemons,
    stop_daemons,
)
from tests.test_node import server_and_two_clients
from tests.transport_pairs import (  # noqa: F401 (fixtures)
    Pair,
    kind_fixture,
    over_slow_link,
    pair_fixture,
)

FAST = PushPullConfig(heartbeat_interval=0.2, reconnect_min=0.05, reconnect_max=0.3,
                      push_timeout=10.0)


@dataclass
class Cluster:
    hub: Transport  # the pusher's
    workers: list[Transport]  # each puller's, on its own node
    names: list[str]  # how the hub names each worker
    hub_name: str  # how the workers name the hub
    kill: Callable[[int], Awaitable[None]]  # worker i's node goes away
    restart: Callable[[int], Awaitable[Transport]]  # worker i's node, killed, starts again
    binds: bool = False  # the pusher listens and the pullers connect to it

    def pusher(self, port: int, count: int = 3, config: PushPullConfig = FAST) -> Pusher:
        """A pusher to the first ``count`` workers' pullers."""
        if self.binds:
            return Pusher(self.hub, port, config=config)
        return Pusher(self.hub, self.names[:count], port, config)

    def puller(self, worker: int | Transport, port: int, config: PushPullConfig = FAST, *,
               auto_ack: bool = True) -> Puller:
        transport = self.workers[worker] if isinstance(worker, int) else worker
        return Puller(transport, port, config, peer=self.hub_name if self.binds else None,
                      auto_ack=auto_ack)


@contextlib.asynccontextmanager
async def embedded_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with contextlib.AsyncExitStack() as stack:
        hub, *workers = [await stack.enter_async_context(
            Node(home=tmp_path / name, listen="127.0.0.1:0")) for name in ("hub", "w1", "w2", "w3")]
        for worker in workers:
            hub.trust(worker.node_id)
            worker.trust(hub.node_id)
            hub.add_peer(worker.node_id, worker.local_endpoint)
            worker.add_peer(hub.node_id, hub.local_endpoint)

        async def kill(index: int) -> None:
            await workers[index].close()

        ports = [w.local_endpoint[1] for w in workers]

        async def restart(index: int) -> Transport:  # the same home, the same address
            node = await stack.enter_async_context(
                Node(home=tmp_path / f"w{index + 1}", listen=f"127.0.0.1:{ports[index]}"))
            node.trust(hub.node_id)
            node.add_peer(hub.node_id, hub.local_endpoint)
            return node

        yield Cluster(hub, list(workers), [w.node_id for w in workers], hub.node_id, kill,
                      restart)


@contextlib.contextmanager
def daemons(workers: int = 3) -> Iterator[list[DaemonHandle]]:
    """A hub daemon and its workers, each a named static peer of the hub, trusting it."""
    names = ["hub", *(f"w{n}" for n in range(1, workers + 1))]
    homes = [short_home() for _ in names]
    try:
        handles = start_daemons(*zip(homes, names, strict=True))
        for worker in handles[1:]:
            peer_up(handles[0], worker)
        yield handles
    finally:
        stop_daemons(*homes)


@contextlib.asynccontextmanager
async def daemon_cluster(handles: list[DaemonHandle]) -> AsyncIterator[Cluster]:
    async with contextlib.AsyncExitStack() as stack:
        hub, *workers = [await stack.enter_async_context(Client(h.home)) for h in handles]

        async def kill(index: int) -> None:  # no word to anyone: the hub must notice silence
            os.kill(handles[index + 1].pid, signal.SIGKILL)
            await until(lambda: ipc.daemon_pid(handles[index + 1].home) is None, "it died")

        async def restart(index: int) -> Transport:  # the same home, a new UDP port
            old = handles[index + 1]
            new = start_daemon(old.home, old.hostname)
            peer_up(handles[0], new)
            handles[index + 1] = new
            return await stack.enter_async_context(Client(new.home))

        yield Cluster(hub, list(workers), [h.hostname for h in handles[1:]], handles[0].hostname,
                      kill, restart)


@pytest.fixture(name="daemon_cluster", scope="module")
def daemon_cluster_fixture() -> Iterator[list[DaemonHandle]]:
    with daemons() as handles:
        yield handles


@pytest.fixture(name="binds", params=[False, True], ids=["pullers-listen", "pusher-listens"])
def binds_fixture(request: pytest.FixtureRequest) -> bool:
    """Which end listens: the pullers (the pusher connects to each), or the pusher."""
    return bool(request.param)


@pytest.fixture
async def cluster(kind: str, binds: bool, tmp_path: Path,
                  request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    if kind == "embedded":
        async with embedded_cluster(tmp_path) as c:
            c.binds = binds
            yield c
    else:
        async with daemon_cluster(request.getfixturevalue("daemon_cluster")) as c:
            c.binds = binds
            yield c


def pair_pusher(pair: Pair, binds: bool, port: int) -> Pusher:
    if binds:
        return Pusher(pair.server.transport, port, config=FAST)
    return Pusher(pair.client.transport, [pair.server_name], port, FAST)


def pair_puller(pair: Pair, binds: bool, port: int, *, auto_ack: bool = True) -> Puller:
    if binds:
        return Puller(pair.client.transport, port, FAST, peer=pair.server_name,
                      auto_ack=auto_ack)
    return Puller(pair.server.transport, port, FAST, auto_ack=auto_ack)


async def until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {seconds} s: {what}")


async def collect(puller: Puller, into: list[WorkItem]) -> None:
    async for item in puller:
        into.append(item)


@contextlib.asynccontextmanager
async def consuming(pullers: list[Puller]) -> AsyncIterator[list[list[WorkItem]]]:
    """Each puller's items as its consumer (auto_ack) takes them, in the background."""
    seen: list[list[WorkItem]] = [[] for _ in pullers]
    tasks = [asyncio.create_task(collect(p, s)) for p, s in zip(pullers, seen, strict=True)]
    try:
        yield seen
    finally:
        # Cancelled until done: a cancel that comes as a daemon call completes can be lost
        # (3.11's wait_for, under the IPC client), and the consumer would wait for ever.
        while not all(task.done() for task in tasks):
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.1)


async def test_three_pullers_share_the_work_and_none_gets_an_item_twice(
        cluster: Cluster) -> None:
    async with (
        cluster.puller(0, 9001) as p1,
        cluster.puller(1, 9001) as p2,
        cluster.puller(2, 9001) as p3,
        cluster.pusher(9001) as pusher,
        consuming([p1, p2, p3]) as seen,
    ):
        await until(lambda: len(pusher.connected) == 3, "three links")
        pushed = [await pusher.push({"n": n}) for n in range(60)]
        await pusher.join(timeout=20)
        ids = [item.id for items in seen for item in items]
        assert sorted(ids) == sorted(pushed)  # each once
        assert sorted(item.json()["n"] for items in seen for item in items) == list(range(60))
        assert [len(items) for items in seen] == [20, 20, 20]  # round robin, all with room
        assert not any(item.redelivered for items in seen for item in items)
        assert pusher.redelivered == 0 and pusher.pending == 0


@contextlib.asynccontextmanager
async def own_cluster(kind: str, binds: bool, tmp_path: Path,
                      workers: int = 3) -> AsyncIterator[Cluster]:
    """A cluster for a test that kills a worker: on daemons, its own."""
    async with contextlib.AsyncExitStack() as stack:
        if kind == "embedded":
            cluster = await stack.enter_async_context(embedded_cluster(tmp_path))
        else:
            handles = stack.enter_context(daemons(workers))
            cluster = await stack.enter_async_context(daemon_cluster(handles))
        cluster.binds = binds
        yield cluster


async def test_a_killed_puller_loses_nothing_its_items_go_to_the_others(
        kind: str, binds: bool, tmp_path: Path) -> None:
    # The third puller's consumer takes items and never finishes one: they stay unacknowledged
    # until its node goes away, and must then be done by the others.
    async with (
        own_cluster(kind, binds, tmp_path) as cluster,
        cluster.puller(0, 9002) as p1,
        cluster.puller(1, 9002) as p2,
        cluster.puller(2, 9002, auto_ack=False) as stuck,
        cluster.pusher(9002) as pusher,
        consuming([p1, p2]) as seen,
    ):
        await until(lambda: len(pusher.connected) == 3, "three links")
        pushed = [await pusher.push(n) for n in range(30)]
        held = [await stuck.receive(5) for _ in range(10)]
        await until(lambda: pusher.pending == 10, "the others' items acknowledged")
        await cluster.kill(2)
        if kind == "daemon":  # its own daemon gone: the puller says so rather than wait
            with pytest.raises(DaemonNotRunningError):
                await stuck.receive(10)
        for n in range(30, 60):
            pushed.append(await pusher.push(n))
        await pusher.join(timeout=20)
        done = [item for items in seen for item in items]
        assert sorted(item.id for item in done) == sorted(pushed)  # none lost, none twice
        # Its items, and any pushed to it before its pusher knew it was gone, were sent again.
        again = {item.id for item in done if item.redelivered}
        assert {item.id for item in held} <= again and pusher.redelivered == len(again)
        assert len(pusher.connected) == 2


async def test_pullers_that_stop_reading_make_push_wait(cluster: Cluster) -> None:
    async with (  # one window bounded by its items, the other by its bytes
        cluster.puller(0, 9003, PushPullConfig(window_items=3)) as idle,
        cluster.puller(1, 9003, PushPullConfig(window_bytes=4000)) as small,
        cluster.pusher(9003, count=2) as pusher,
    ):
        await until(lambda: len(pusher.connected) == 2, "two links")
        for _ in range(7):
            await pusher.push(b"b" * 1000)
        with pytest.raises(PilotTimeoutError, match=r"had room.*2( of 2)? pullers connected"):
            await pusher.push(b"b" * 1000, timeout=0.5)
        assert pusher.pending == 7  # what the pusher holds is bounded by the windows too
        await until(lambda: idle.queued == 3 and small.queued == 4, "windows full")
        # A full puller is skipped: the one that reads takes everything after.
        async with consuming([small]) as seen:
            for _ in range(20):
                await pusher.push(b"b" * 1000, timeout=5)
            await until(lambda: len(seen[0]) == 24, "the reader's items")
        assert idle.queued == 3 and pusher.pending >= 3  # the idle one held no more
        async with consuming([idle]):
            await pusher.join(timeout=10)


async def test_a_push_nobody_takes_says_why_a_named_puller_is_not_linked(pair: Pair) -> None:
    """A named puller whose port nobody listens on: the push waited out its timeout and said
    only "0 of 1 pullers connected", where the link's own error says what is wrong."""
    async with pair_pusher(pair, False, 9005) as pusher:
        with pytest.raises(PilotTimeoutError,
                           match=rf"0 of 1 pullers connected; {pair.server_name}.*port 9005"):
            await pusher.push("anyone?", timeout=2)


async def test_a_puller_that_comes_back_gets_work_again(pair: Pair, binds: bool) -> None:
    async with pair_pusher(pair, binds, 9004) as pusher:
        async with pair_puller(pair, binds, 9004) as first:
            await pusher.push("before")
            assert (await first.receive(5)).text() == "before"
        await until(lambda: not pusher.connected, "the link dropped")
        with pytest.raises(PilotTimeoutError, match=r"0( of 1)? pullers connected"):
            await pusher.push("nobody", timeout=0.3)
        async with pair_puller(pair, binds, 9004) as second:
            await pusher.push("after", timeout=10)
            item = await second.receive(5)
            assert item.text() == "after" and not item.redelivered
            await item.ack()  # auto_ack would at the next receive
            await pusher.join(timeout=5)


async def test_an_item_longer_than_three_heartbeats_to_arrive_is_not_silence(
        tmp_path: Path) -> None:
    """No heartbeat can pass an item on its link: a long one on a slow link (2 MB at 1 MB/s
    against 0.6 s of silence) still arriving is word from the pusher, so the puller keeps the
    link and gets the item once, not again and again on links it drops."""
    big = bytes(range(256)) * (2_000_000 // 256)
    async with (
        over_slow_link("embedded", tmp_path, rate=1_000_000) as pair,
        pair_pusher(pair, True, 9013) as pusher,
        pair_puller(pair, True, 9013) as puller,
    ):
        await pusher.push(big, timeout=10)
        item = await puller.receive(30)
        assert item.data == big and not item.redelivered
        await item.ack()
        await pusher.join(timeout=10)
        assert pusher.redelivered == 0


async def test_close_ends_an_iteration_that_waits(pair: Pair, binds: bool) -> None:
    """As a Subscriber's: `async for` over a puller closed meanwhile ends; it raised
    ConfigError."""
    async with pair_pusher(pair, binds, 9014):
        puller = pair_puller(pair, binds, 9014)
        await puller.__aenter__()
        received: list[WorkItem] = []
        reader = asyncio.create_task(collect(puller, received))
        await asyncio.sleep(0.2)
        await puller.close()
        await asyncio.wait_for(reader, 5)
        assert received == []


async def test_unacknowledged_items_of_a_closed_puller_go_to_the_next(pair: Pair,
                                                                     binds: bool) -> None:
    async with pair_pusher(pair, binds, 9005) as pusher:
        async with pair_puller(pair, binds, 9005, auto_ack=False) as first:
            await pusher.push("one")
            await pusher.push("two")
            assert (await first.receive(5)).text() == "one"
        async with pair_puller(pair, binds, 9005) as second:
            got = [await second.receive(10) for _ in range(2)]
            assert [(i.text(), i.redelivered) for i in got] == [("one", True), ("two", True)]
            await got[1].ack()
            await pusher.join(timeout=5)


async def test_a_puller_whose_node_restarts_gets_work_again(kind: str, binds: bool,
                                                            tmp_path: Path) -> None:
    async with (
        own_cluster(kind, binds, tmp_path, workers=1) as cluster,
        cluster.pusher(9008, count=1) as pusher,
    ):
        async with cluster.puller(0, 9008, auto_ack=False) as before:
            await pusher.push("one")
            await pusher.push("two")
            assert (await before.receive(5)).text() == "one"  # and never finished
            await cluster.kill(0)
        await until(lambda: not pusher.connected, "the pusher noticed")
        with pytest.raises(PilotTimeoutError):  # a puller gone gets no more work
            await pusher.push("three", timeout=0.2)
        worker = await cluster.restart(0)
        async with cluster.puller(worker, 9008, auto_ack=False) as after:
            await pusher.push("three", timeout=15)
            got = [await after.receive(10) for _ in range(3)]
            assert [(i.text(), i.redelivered) for i in got] == [
                ("one", True), ("two", True), ("three", False)]
            for item in got:
                await item.ack()
            await pusher.join(timeout=5)


async def test_malformed_frames_never_stop_a_puller(pair: Pair) -> None:
    config = PushPullConfig(window_items=2, heartbeat_interval=0.2)
    client = pair.client.transport
    async with Puller(pair.server.transport, 9006, config) as puller:
        for junk in (b"", b"\x12", b"\xff" * 64, encode_frame(Kind.ITEM, 1, b"no link"),
                     bytes([99]) + bytes(8), encode_frame(Kind.CREDIT, 2**64 - 1, b"\xff" * 12)):
            await client.send(pair.server_name, 9006, junk, timeout=10)
        async with client.connect(pair.server_name, 9006) as conn:  # beyond its window
            await conn.send(encode_frame(Kind.HELLO, 7, b""))
            assert (await conn.receive(5)).data[0] == Kind.CREDIT
            for n in range(3):
                await conn.send(encode_frame(Kind.ITEM, n, b"x"))
            await conn.send(encode_frame(Kind.ACK, 1, b""))  # on a link dropped already
            await until(lambda: puller.malformed == 8, "malformed counted")
            assert puller.pushers == 0 and puller.queued == 0  # its items went with it
        async with Pusher(client, [pair.server_name], 9006, config) as pusher:
            await pusher.push("still here")
            item = await puller.receive(5)
            assert item.text() == "still here"
            await item.ack()
            await pusher.join(timeout=5)
        assert puller.malformed == 8


@pytest.mark.parametrize("kind", ["embedded"], indirect=True)
@pytest.mark.parametrize("binds", [False], indirect=True)
async def test_malformed_frames_never_stop_a_pusher(cluster: Cluster) -> None:
    """The first 'puller' answers each link with another kind of garbage; the pusher drops
    those links and gives everything to the real one."""
    credit = encode_credit(2**64 - 1, 0.001)
    answers = [b"\xff" * 40, b"\x11", encode_frame(Kind.CREDIT, 0, credit),
               encode_frame(Kind.CREDIT, 5, b"\x00"), encode_frame(Kind.ITEM, 1, b"?"),
               encode_frame(Kind.CREDIT, 2**64 - 1, encode_credit(2**64 - 1, 3600)),
               encode_frame(Kind.CREDIT, 1, credit)]  # then silent: a link that hears
    # nothing for three of the heartbeats it announced drops

    async def fake_puller() -> None:
        async with cluster.workers[0].listen(9007) as listener:
            async for message in listener:
                if message.data[0] == Kind.HELLO and answers:
                    await message.reply(answers.pop(0))
                elif message.data[0] == Kind.ITEM:  # on a link its credit opened
                    await message.reply(encode_frame(Kind.ACK, 12345, b""))

    fake = asyncio.create_task(fake_puller())
    try:
        async with (
            Puller(cluster.workers[1], 9007, FAST) as real,
            Pusher(cluster.hub, cluster.names[:2], 9007, FAST) as pusher,
            consuming([real]) as seen,
        ):
            pushed: list[int] = []
            loop = asyncio.get_running_loop()
            started = loop.time()
            while answers or len(pushed) < 20:  # while the pusher links to the fake, again
                assert loop.time() - started < 15, f"answers left: {answers}"
                pushed.append(await pusher.push(len(pushed)))
                await asyncio.sleep(0.01)
            await pusher.join(timeout=20)
            assert sorted(item.id for item in seen[0]) == sorted(pushed)
            assert pusher.malformed == 6  # the 5 malformed answers and the unknown ACK
            assert pusher.redelivered >= 1  # what went to the link its huge credit opened
    finally:
        fake.cancel()
        await asyncio.gather(fake, return_exceptions=True)


async def test_malformed_frames_never_stop_a_listening_pusher(pair: Pair) -> None:
    client = pair.client.transport
    credit = encode_credit(1000, 0.2)
    async with Pusher(pair.server.transport, 9009, config=FAST) as pusher:
        for junk in (b"", b"\x11", b"\xff" * 64, encode_frame(Kind.ITEM, 1, b"wrong way"),
                     encode_frame(Kind.CREDIT, 0, credit), encode_frame(Kind.CREDIT, 4, b"\x00"),
                     encode_frame(Kind.CREDIT, 4, struct.pack("!QI", 1000, 0))):  # no heartbeat
            await client.send(pair.server_name, 9009, junk, timeout=10)
        async with client.connect(pair.server_name, 9009) as conn:
            await conn.send(encode_frame(Kind.CREDIT, 4, credit))
            await until(lambda: len(pusher.connected) == 1, "the link its credit opened")
            await conn.send(encode_frame(Kind.ACK, 99, b""))  # of an item it never had
            await until(lambda: not pusher.connected, "the link dropped")
        assert pusher.malformed == 8
        async with Puller(client, 9009, FAST, peer=pair.server_name) as puller:
            await pusher.push("still here", timeout=10)
            item = await puller.receive(5)
            assert item.text() == "still here"
            await item.ack()
            await pusher.join(timeout=5)


async def test_malformed_frames_never_stop_a_connecting_puller(pair: Pair) -> None:
    """The 'pusher' answers each link the puller makes with another kind of garbage; then a
    real pusher takes its port, and the puller links to it."""
    answers = [b"", b"\xff" * 20, encode_frame(Kind.CREDIT, 5, b""), encode_frame(Kind.ACK, 1, b""),
               *[encode_frame(Kind.ITEM, n, b"x") for n in range(3)]]
    config = PushPullConfig(window_items=2, heartbeat_interval=0.2, reconnect_min=0.05,
                            reconnect_max=0.2)
    async with Puller(pair.client.transport, 9010, config, peer=pair.server_name) as puller:
        async with pair.server.transport.listen(9010) as listener:
            for answer in answers[:4]:  # one link each
                credit = await listener.receive(timeout=10)
                assert credit.data[0] == Kind.CREDIT
                await credit.reply(answer)
            credit = await listener.receive(timeout=10)
            for answer in answers[4:]:  # one link: two items fit its window, the third not
                await credit.reply(answer)
            await until(lambda: puller.malformed == 5, "malformed counted")
            assert puller.queued == 0  # the two items went with their link
        async with Pusher(pair.server.transport, 9010, config=FAST) as pusher:
            await pusher.push("real", timeout=10)
            item = await puller.receive(5)
            assert item.text() == "real"
            await item.ack()
            await pusher.join(timeout=5)


def test_an_item_larger_than_a_tunnel_message_is_refused_by_the_config() -> None:
    # Pushed, it would reset every link it went to, and go to the next, for ever.
    with pytest.raises(ConfigError, match="window_bytes: at most"):
        PushPullConfig(window_bytes=64 * 2**20 + 1)


@pytest.mark.parametrize("listening", ["puller", "pusher"])
async def test_one_peer_cannot_take_every_link(tmp_path: Path, listening: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A listening end's links (max_links) went to whoever linked first, all of them to one
    peer if it linked enough times (each link kept by its heartbeats): the others were refused
    for as long as it liked. Now each peer has at most max_links_per_peer of them, and a link
    refused so is told which bound refused it."""
    caplog.set_level(logging.INFO, "pilot_agents.patterns.pushpull")
    config = dataclasses.replace(FAST, max_links=3, max_links_per_peer=2)
    async with (
        server_and_two_clients(tmp_path) as (server, greedy, other),
        contextlib.AsyncExitStack() as stack,
    ):
        if listening == "puller":
            puller = await stack.enter_async_context(Puller(server, 9800, config))
            for _ in range(3):
                await stack.enter_async_context(Pusher(greedy, [server.node_id], 9800, config))
            await until(lambda: puller.pushers == 2 and puller.refused >= 1,
                        "the greedy peer's third link refused")
            pusher = await stack.enter_async_context(Pusher(other, [server.node_id], 9800, config))
            await pusher.push("job", timeout=10)
            item = await puller.receive(5)
            assert (item.text(), item.sender) == ("job", other.node_id)
        else:
            pusher = await stack.enter_async_context(Pusher(server, 9800, config=config))
            for _ in range(3):
                await stack.enter_async_context(Puller(greedy, 9800, config, peer=server.node_id))
            await until(lambda: len(pusher.connected) == 2 and pusher.refused >= 1,
                        "the greedy peer's third link refused")
            puller = await stack.enter_async_context(
                Puller(other, 9800, config, peer=server.node_id))
            await until(lambda: len(pusher.connected) == 3, "the other peer linked")
            for n in range(3):  # round robin: one to each link
                await pusher.push(f"job {n}", timeout=10)
            assert (await puller.receive(5)).sender == server.node_id
        assert "max_links_per_peer: it serves 2 links of your node already" in caplog.text


async def test_an_item_to_send_again_that_no_puller_can_take_holds_up_no_push(
        tmp_path: Path) -> None:
    async with embedded_cluster(tmp_path) as cluster:
        big = PushPullConfig(heartbeat_interval=0.2, window_bytes=10_000)
        small = PushPullConfig(heartbeat_interval=0.2, window_bytes=1_000)
        async with cluster.puller(0, 9100, big, auto_ack=False) as large, \
                cluster.puller(1, 9100, small) as little, cluster.pusher(9100, 2) as pusher:
            await until(lambda: len(pusher.connected) == 2, "both linked")
            await pusher.push(b"x" * 5000)  # only the large puller's window takes it
            assert len((await large.receive(5)).data) == 5000
            await large.close()  # unacknowledged: it waits for a puller that can take it
            await until(lambda: len(pusher.connected) == 1, "the large puller gone")
            await pusher.push(b"small", timeout=5)  # the little one takes new items meanwhile
            assert (await little.receive(5)).data == b"small"
            assert pusher.pending == 2  # the large item still waiting, the small one unacked


async def test_close_wakes_a_push_and_a_join_that_wait(tmp_path: Path) -> None:
    async with embedded_cluster(tmp_path) as cluster:
        one = PushPullConfig(heartbeat_interval=0.2, window_items=1)
        async with cluster.puller(0, 9300, one, auto_ack=False):
            pusher = cluster.pusher(9300, 1)
            await pusher.__aenter__()
            await until(lambda: bool(pusher.connected), "linked")
            await pusher.push("a")  # the window of one is full now
            waiting = [asyncio.create_task(pusher.push("b", timeout=30)),
                       asyncio.create_task(pusher.join(timeout=30))]
            await asyncio.sleep(0.2)
            await pusher.close()
            for task in waiting:
                with pytest.raises(ConnectionClosedError, match="was closed"):
                    await asyncio.wait_for(task, 5)


async def test_a_puller_refused_by_a_full_pusher_backs_off(tmp_path: Path) -> None:
    async with embedded_cluster(tmp_path) as cluster:
        cluster.binds = True
        config = PushPullConfig(heartbeat_interval=0.2, reconnect_min=0.05, reconnect_max=1.0,
                                max_links=1)
        async with cluster.pusher(9400, config=config) as pusher, \
                cluster.puller(0, 9400, config):
            await until(lambda: len(pusher.connected) == 1, "the first puller linked")
            async with cluster.puller(1, 9400, config):
                await asyncio.sleep(3)
            # Doubling from 0.05 s to 1 s: about 7 tries in 3 s (without it, dozens).
            assert 1 <= pusher.refused <= 12, pusher.refused


def delayed(send: Callable[[bytes], Awaitable[None]]) -> Callable[[bytes], Awaitable[None]]:
    """``send``, 0.3 s late: a frame that waits to leave, as the daemon's SDK can make it."""
    async def slow(frame: bytes) -> None:
        await asyncio.sleep(0.3)
        await send(frame)

    return slow


@contextlib.asynccontextmanager
async def one_link(tmp_path: Path, port: int,
                   window_items: int) -> AsyncIterator[tuple[Puller, Pusher]]:
    """A pusher linked to one puller (``auto_ack`` off), on embedded nodes."""
    async with embedded_cluster(tmp_path) as cluster:
        config = PushPullConfig(heartbeat_interval=0.2, reconnect_min=0.05, reconnect_max=0.3,
                                window_items=window_items)
        async with cluster.puller(0, port, config, auto_ack=False) as puller, \
                cluster.pusher(port, 1, config) as pusher:
            await until(lambda: bool(pusher.connected), "linked")
            yield puller, pusher


async def test_a_push_cancelled_while_its_item_leaves_holds_no_room(tmp_path: Path) -> None:
    """Cancelled while its frame waits to leave (as the daemon's SDK can make it wait), the
    item may or may not have reached its puller: its link goes, and the item with the rest to
    a puller, rather than hold its room on the link for good."""
    async with one_link(tmp_path, 9500, 2) as (puller, pusher):
        link = next(iter(pusher._links.values()))
        link.send = delayed(link.send)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pusher.push("job"), 0.05)
        await pusher.push("next", timeout=10)
        received = []
        for _ in range(2):
            item = await puller.receive(10)
            received.append(item.data)
            await item.ack()
        assert sorted(received) == [b"job", b"next"]  # the cancelled one was not lost
        await pusher.join(10)  # nor is its room held


async def test_an_acknowledgement_cancelled_as_it_leaves_holds_no_credit(tmp_path: Path) -> None:
    """An ack cancelled while its frame waits to leave may never reach the pusher, which then
    held that item's room on the link for good, and its join waited for an item long done.
    The link goes instead: the pusher sends what it had not heard acknowledged again (at
    least once), and the work goes on."""
    async with one_link(tmp_path, 9600, 1) as (puller, pusher):
        await pusher.push("job")
        item = await puller.receive(10)
        item._feed.send = delayed(item._feed.send)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(item.ack(), 0.05)
        pushing = asyncio.create_task(pusher.push("next", timeout=10))
        again = await puller.receive(10)  # on a new link: the one window is free again
        assert (again.data, again.redelivered) == (b"job", True)
        await again.ack()
        last = await puller.receive(10)
        assert last.data == b"next"
        await pushing
        await last.ack()
        await pusher.join(10)  # nothing is held for the ack that never left


async def test_a_listening_puller_drops_a_silent_link_so_no_pusher_is_locked_out(
        pair: Pair) -> None:
    """A trusted peer that opens links and then says nothing held each of them, and so the
    puller's room for pushers, for good: silent for three heartbeats, such a link is dropped
    (with a BYE), and a real pusher links in its place."""
    config = PushPullConfig(heartbeat_interval=0.2, max_links=1)
    client = pair.client.transport
    async with (
        Puller(pair.server.transport, 9700, config) as puller,
        client.connect(pair.server_name, 9700) as squatter,
    ):
        await squatter.send(encode_frame(Kind.HELLO, 1, b""))
        assert (await squatter.receive(5)).data[0] == Kind.CREDIT
        await until(lambda: puller.pushers == 1, "the squatter linked")
        async with Pusher(client, [pair.server_name], 9700, FAST) as pusher:
            await pusher.push("real", timeout=10)
            item = await puller.receive(5)
            assert item.text() == "real"
            await item.ack()
            await pusher.join(timeout=5)
        assert puller.refused >= 1  # it was locked out until the silent link went
        kinds = set()
        while Kind.BYE not in kinds:  # heartbeats it never answered, then the BYE
            kinds.add((await squatter.receive(5)).data[0])


async def test_an_idle_pusher_keeps_its_link_to_a_listening_puller(pair: Pair) -> None:
    """A pusher with nothing to send, whose item the consumer holds for many heartbeats, says
    it is alive (it answers the puller's heartbeats): its link stays, and nothing is sent
    again."""
    async with (
        pair_puller(pair, False, 9701, auto_ack=False) as puller,
        pair_pusher(pair, False, 9701) as pusher,
    ):
        await pusher.push("slow job", timeout=10)
        item = await puller.receive(5)
        await asyncio.sleep(2.0)  # ten heartbeats, more than three times the silence
        assert puller.pushers == 1 and puller.queued == 0
        await item.ack()
        await pusher.join(timeout=5)
        await pusher.push("next", timeout=5)
        item = await puller.receive(5)
        assert (item.text(), item.redelivered) == ("next", False)
        assert pusher.redelivered == 0 and puller.refused == 0


async def test_a_pusher_answers_only_the_heartbeats_that_ask_on_links_it_made(
        pair: Pair) -> None:
    """A listening puller of an earlier version takes any frame but an item as malformed (and
    drops the link): a pusher that connected answers only a heartbeat that asks for it."""
    async with (
        pair.server.transport.listen(9702) as listener,
        Pusher(pair.client.transport, [pair.server_name], 9702, FAST) as pusher,
    ):
        hello = await listener.receive(timeout=10)
        assert hello.data[0] == Kind.HELLO
        await hello.reply(encode_frame(Kind.CREDIT, 4, encode_credit(1000, 5.0)))
        await until(lambda: bool(pusher.connected), "linked")
        await hello.reply(encode_frame(Kind.HEARTBEAT, 0, b""))  # as an earlier puller does
        with pytest.raises(PilotTimeoutError):
            await listener.receive(timeout=0.5)
        await hello.reply(encode_frame(Kind.HEARTBEAT, 1, b""))  # asks for an answer
        answer = await listener.receive(timeout=5)
        assert answer.data == encode_frame(Kind.HEARTBEAT, 0, b"")


async def test_a_burst_of_heartbeats_is_answered_once_not_once_each(pair: Pair) -> None:
    """Heartbeats that ask while the answer to an earlier one is on its way share it: a puller
    flooding them to a link whose stream is full would otherwise have the pusher keep a task
    waiting per heartbeat."""
    async with (
        pair.server.transport.listen(9703) as listener,
        Pusher(pair.client.transport, [pair.server_name], 9703, FAST) as pusher,
    ):
        hello = await listener.receive(timeout=10)
        await hello.reply(encode_frame(Kind.CREDIT, 4, encode_credit(1000, 5.0)))
        await until(lambda: bool(pusher.connected), "linked")
        asks = 200
        for _ in range(asks):
            await hello.reply(encode_frame(Kind.HEARTBEAT, 1, b""))
        answers = 0
        with contextlib.suppress(PilotTimeoutError):
            while True:
                answer = await listener.receive(timeout=0.5)
                assert answer.data == encode_frame(Kind.HEARTBEAT, 0, b"")
                answers += 1
        assert 1 <= answers < asks // 2
        await hello.reply(encode_frame(Kind.HEARTBEAT, 1, b""))  # and later ones get theirs
        assert (await listener.receive(timeout=5)).data == encode_frame(Kind.HEARTBEAT, 0, b"")


async def test_items_to_send_again_behind_one_no_puller_can_take_still_go(
        tmp_path: Path) -> None:
    """The large puller leaves with a large item and small ones behind it: the small ones go
    to the small puller (the large item held them up until join timed out), and once every
    puller named is linked and none can hold the large item, join says so at once."""
    large = PushPullConfig(heartbeat_interval=0.2, window_bytes=10_000)
    small = PushPullConfig(heartbeat_interval=0.2, window_bytes=1_000)
    async with (
        embedded_cluster(tmp_path) as cluster,
        cluster.pusher(9800, 2) as pusher,
        cluster.puller(0, 9800, large, auto_ack=False) as first,
    ):
        await until(lambda: len(pusher.connected) == 1, "the large puller linked")
        pushed = [await pusher.push(data) for data in (b"x" * 5000, b"a", b"b", b"c")]
        assert [(await first.receive(5)).id for _ in pushed] == pushed
        async with cluster.puller(1, 9800, small) as little, consuming([little]) as seen:
            await until(lambda: len(pusher.connected) == 2, "the small puller linked")
            await first.close()  # none acknowledged: all four are to be sent again
            await until(lambda: len(seen[0]) == 3, "the small items sent again")
            assert [(i.data, i.redelivered) for i in seen[0]] == [
                (b"a", True), (b"b", True), (b"c", True)]
            with pytest.raises(PilotTimeoutError, match=r"5000 bytes.*1000"):
                await pusher.join(timeout=0.5)
            async with cluster.puller(0, 9800, small):  # back, with a small window
                await until(lambda: len(pusher.connected) == 2, "both linked")
                started = asyncio.get_running_loop().time()
                with pytest.raises(ConfigError, match=r"5000 bytes.*1000"):
                    await pusher.join(timeout=10)
                assert asyncio.get_running_loop().time() - started < 1
                assert pusher.pending == 1  # still kept, for a puller that can take it
                # A new item no linked puller's window can hold says so when it times out.
                with pytest.raises(PilotTimeoutError, match=r"2000 bytes.*more than 1000"):
                    await pusher.push(b"y" * 2000, timeout=0.5)


STALL_PULLER = textwrap.dedent("""
    import asyncio, sys
    import pilot_agents.sdk as pilot
    from pilot_agents.patterns import Puller, PushPullConfig

    async def main() -> None:
        config = PushPullConfig(heartbeat_interval=0.2, reconnect_min=0.05, reconnect_max=0.3)
        async with pilot.Client(sys.argv[1]) as client, \\
                Puller(client, int(sys.argv[2]), config, peer=sys.argv[3] or None) as puller:
            print("ready", flush=True)
            async for item in puller:  # each acknowledged at the next receive
                print(item.text(), item.redelivered, flush=True)

    asyncio.run(main())
""")


async def test_a_pusher_that_stalls_reads_the_acknowledgements_that_came_meanwhile(
        daemon_pair: tuple[DaemonHandle, DaemonHandle], binds: bool) -> None:
    """A pusher whose process could not run for longer than its pullers' silence (stopped,
    its loop blocked) counted a live puller silent as it resumed, before reading the ACKs
    that had come meanwhile, and sent all that work again. What came is read first now."""
    a, b = daemon_pair
    port = 9030 + binds
    puller = subprocess.Popen(
        [sys.executable, "-c", STALL_PULLER, str(b.home), str(port), "alpha" if binds else ""],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert puller.stdout is not None
        assert await asyncio.to_thread(puller.stdout.readline) == "ready\n"
        async with Client(a.home) as client:
            pusher = (Pusher(client, port, config=FAST) if binds
                      else Pusher(client, ["beta"], port, FAST))
            async with pusher:
                await until(lambda: bool(pusher.connected), "the puller linked", 20)
                for n in range(5):
                    await pusher.push(f"item {n}")
                time.sleep(1.5)  # the stall: 2.5 times the puller's silence (3 x 0.2 s)
                await pusher.join(timeout=10)
                assert pusher.redelivered == 0
    finally:
        os.killpg(puller.pid, signal.SIGKILL)
        out, _ = puller.communicate()
    assert out.splitlines() == [f"item {n} False" for n in range(5)]


@pytest.mark.parametrize("end", ["puller", "pusher"])
async def test_a_second_listening_end_on_a_port_is_refused(
        daemon_pair: tuple[DaemonHandle, DaemonHandle], end: str) -> None:
    """Through a daemon, two listening pullers (or pushers) on one port each took some of
    every link's frames: a pusher's items went to one, its HELLO or ACKs to the other."""
    _, b = daemon_pair
    def listening(client: Client) -> Puller | Pusher:
        return Puller(client, 9040, FAST) if end == "puller" else Pusher(client, 9040, config=FAST)

    async with Client(b.home) as first, Client(b.home) as second, listening(first):
        with pytest.raises(PortInUseError, match="port 9040"):
            async with listening(second):
                pass
