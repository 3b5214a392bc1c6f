"""Publish/subscribe (pilot_agents.patterns.pubsub) on both transports."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from pilot_agents import Client, Message, PilotError, PilotTimeoutError
from pilot_agents.errors import ConfigError, PortInUseError, WireError
from pilot_agents.patterns import Overflow, Publisher, PubSubConfig, Subscriber
from pilot_agents.patterns.frames import (
    HEADER_SIZE,
    MAX_BATCH_FRAMES,
    Kind,
    batch_entries_untrusted,
    encode_batch,
    encode_frame,
    encode_publication,
    parse_frame_untrusted,
)
from tests.conftest import DaemonHandle
from tests.test_node import server_and_two_clients, trusted_pair
from tests.test_pushpull import until
from tests.transport_pairs import (  # noqa: F401 (fixtures)
    Pair,
    kind_fixture,
    over_slow_link,
    pair_fixture,
)


async def until_subscribed(pub: Publisher, count: int) -> None:
    for _ in range(200):
        if pub.subscribers >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{pub.subscribers} of {count} subscriptions arrived")


async def test_subscribers_get_only_their_prefixes(pair: Pair) -> None:
    client = pair.client.transport
    async with (
        Publisher(pair.server.transport, 8001) as pub,
        Subscriber(client, pair.server_name, 8001, ["sales."]) as sales,
        Subscriber(client, pair.server_name, 8001, ["sales.q4", "ops."]) as q4_ops,
        Subscriber(client, pair.server_name, 8001, [""]) as everything,
    ):
        await until_subscribed(pub, 3)
        fanout = [await pub.publish(t, {"t": t})
                  for t in ("sales.q3", "sales.q4", "ops.disk", "hr.leave")]
        assert fanout == [2, 3, 2, 1]
        assert [(await sales.receive(5)).topic for _ in range(2)] == ["sales.q3", "sales.q4"]
        assert [(await q4_ops.receive(5)).topic for _ in range(2)] == ["sales.q4", "ops.disk"]
        got = [await everything.receive(5) for _ in range(4)]
        assert [p.json()["t"] for p in got] == ["sales.q3", "sales.q4", "ops.disk", "hr.leave"]
        assert all(p.sender == pair.server.node_id and p.missed == 0 for p in got)
        with pytest.raises(PilotTimeoutError):
            await sales.receive(0.3)


async def test_drop_oldest_tells_the_subscriber_how_many_it_missed(pair: Pair) -> None:
    config = PubSubConfig(overflow=Overflow.DROP_OLDEST, queue_bytes=2000)
    async with (
        Publisher(pair.server.transport, 8002, config) as pub,
        Subscriber(pair.client.transport, pair.server_name, 8002, ["t"]) as sub,
    ):
        await until_subscribed(pub, 1)
        for n in range(400):  # far faster than a tunnel drains 2 KB of queue
            await pub.publish("t", b"x" * 500 + str(n).encode())
        seen: list[int] = []
        missed = 0
        while len(seen) + missed < 400:
            publication = await sub.receive(5)
            missed += publication.missed
            seen.append(int(publication.data[500:]))
        assert seen == sorted(seen) and seen[-1] == 399
        assert missed > 0 and len(seen) + missed == 400


async def test_block_makes_the_publisher_wait_for_a_subscriber_that_does_not_read(
        pair: Pair) -> None:
    # 32 KB publications: the tunnel and the daemon hold ~24 MB for a subscriber that does not
    # read before the publisher feels it, which takes 1 KB publications through the daemon's
    # IPC round trips tens of seconds (tests/test_patterns_robust.py floods with those).
    config = PubSubConfig(overflow=Overflow.BLOCK, queue_bytes=64 * 1024)
    async with (
        Publisher(pair.server.transport, 8003, config) as pub,
        Subscriber(pair.client.transport, pair.server_name, 8003, [""]) as sub,
    ):
        await until_subscribed(pub, 1)
        published = 0

        async def flood() -> None:
            nonlocal published
            for _ in range(100_000):
                await pub.publish("t", b"y" * 32 * 1024)
                published += 1

        task = asyncio.create_task(flood())
        loop = asyncio.get_running_loop()
        started = last_change = loop.time()
        seen = 0
        while loop.time() - last_change < 2.0:  # two seconds without a publish: blocked
            await asyncio.sleep(0.25)
            if published != seen:
                seen, last_change = published, loop.time()
            assert loop.time() - started < 60, f"{published} publications and still going"
        stalled = published
        assert stalled < 100_000, "the publisher did not wait"
        for _ in range(stalled):  # the windows may take a while to reopen: read until then
            assert (await sub.receive(5)).missed == 0
            if published > stalled:
                break
        assert published > stalled, "reading did not let the publisher go on"
        task.cancel()


async def test_a_subscriber_resubscribes_when_its_publisher_comes_back(pair: Pair) -> None:
    config = PubSubConfig(reconnect_min=0.05, reconnect_max=0.2)
    first = Publisher(pair.server.transport, 8004)
    await first.__aenter__()
    async with Subscriber(pair.client.transport, pair.server_name, 8004, ["news"],
                          config) as sub:
        await until_subscribed(first, 1)
        await first.publish("news", "first")
        assert (await sub.receive(5)).text() == "first"
        await first.close()
        waiting = asyncio.create_task(sub.receive(20))
        await asyncio.sleep(0.5)  # the subscription broke; the publisher is away
        async with Publisher(pair.server.transport, 8004) as pub:
            await until_subscribed(pub, 1)
            await pub.publish("news", "second")
            publication = await waiting
            assert publication.text() == "second" and publication.resumed
            assert sub.reconnections >= 1


async def test_heartbeats_keep_an_idle_subscription_between_publications(pair: Pair) -> None:
    """The publisher says it is alive on a subscription idle for heartbeat_interval, after
    traffic as before any: a subscriber that waits through many intervals never subscribes
    again, and hears the next publication."""
    config = PubSubConfig(heartbeat_interval=0.2)
    async with (
        Publisher(pair.server.transport, 8006, config) as pub,
        Subscriber(pair.client.transport, pair.server_name, 8006, [""], config) as sub,
    ):
        await until_subscribed(pub, 1)
        for n in range(3):
            for m in range(50):  # a burst: the feed sends from its queue without waiting
                await pub.publish("t", f"{n}.{m}")
            assert [(await sub.receive(5)).text() for _ in range(50)] == [
                f"{n}.{m}" for m in range(50)]
            with pytest.raises(PilotTimeoutError):
                await sub.receive(1.5)  # silent for 0.6 s would subscribe again
            assert sub.reconnections == 0 and pub.subscribers == 1


async def test_a_publication_longer_than_three_heartbeats_to_arrive_is_not_silence(
        kind: str, tmp_path: Path) -> None:
    """No heartbeat can pass a publication on its stream: a long one on a slow link (here
    2 MB at 1 MB/s against 0.6 s of silence) still arriving is word from the publisher, so
    the subscription holds and the publication comes whole."""
    config = PubSubConfig(heartbeat_interval=0.2)
    big = bytes(range(256)) * (2_000_000 // 256)
    async with (
        over_slow_link(kind, tmp_path, rate=1_000_000) as pair,
        Publisher(pair.server.transport, 8013, config) as pub,
        Subscriber(pair.client.transport, pair.server_name, 8013, [""], config) as sub,
    ):
        await until_subscribed(pub, 1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await pub.publish("big", big)
        publication = await sub.receive(30)
        assert loop.time() - began > 1.0  # it did take longer than the silence allows
        assert publication.data == big and publication.missed == 0
        assert sub.reconnections == 0
        # And a publisher that then falls silent is still noticed as gone.
        await pub.close()
        with pytest.raises(PilotTimeoutError):
            await sub.receive(1.0)


async def test_a_subscriber_that_stops_reading_holds_up_no_other(pair: Pair) -> None:
    """DROP_OLDEST: one subscriber that never reads costs only itself. Through the daemon it
    stalled every other: the client's one send window waited on the stuck stream."""
    config = PubSubConfig(overflow=Overflow.DROP_OLDEST)
    async with (
        Publisher(pair.server.transport, 8014, config) as pub,
        Subscriber(pair.client.transport, pair.server_name, 8014, ["stuck"], config),
        Subscriber(pair.client.transport, pair.server_name, 8014, [""], config) as reader,
    ):
        await until_subscribed(pub, 2)
        accounted = 0  # received, or reported missed

        async def read() -> None:
            nonlocal accounted
            while accounted < 80:
                publication = await reader.receive(30)
                accounted += 1 + publication.missed

        reading = asyncio.create_task(read())
        for _ in range(80):  # 80 MiB: past what the stuck stream's windows and buffers hold
            await pub.publish("stuck", b"x" * 2**20)
            await asyncio.sleep(0.01)
        async with asyncio.timeout(20):
            await reading


async def test_malformed_frames_never_stop_a_publisher(pair: Pair) -> None:
    async with Publisher(pair.server.transport, 8005) as pub:
        for junk in (b"", encode_frame(Kind.SUBSCRIBE, 1, b"\xff\xff"),
                     encode_frame(Kind.SUBSCRIBE, 1, b"\x00\x01\x00\x09abc"),
                     encode_frame(Kind.SUBSCRIBE, 1, b"[" * 100_000),
                     encode_frame(Kind.PUBLISH, 1, b"")):
            await pair.client.transport.send(pair.server_name, 8005, junk, timeout=10)
        async with Subscriber(pair.client.transport, pair.server_name, 8005, [""]) as sub:
            await until_subscribed(pub, 1)
            await pub.publish("ok", "still here")
            assert (await sub.receive(5)).text() == "still here"
        assert pub.malformed == 5


def publication(topic: bytes, data: bytes) -> bytes:
    return encode_frame(Kind.PUBLISH, 0, encode_publication(topic, data))


def test_a_batch_splits_into_the_frames_it_was_made_of() -> None:
    frames = [publication(b"t", b"one"), encode_frame(Kind.GAP, 7, b""), publication(b"", b"")]
    batch = encode_batch(frames)
    assert parse_frame_untrusted(batch)[:2] == (Kind.BATCH, 3)
    assert [batch[a:b] for a, b in batch_entries_untrusted(batch)] == frames


@pytest.mark.parametrize("junk", [
    encode_frame(Kind.BATCH, MAX_BATCH_FRAMES + 1, b""),  # more frames than allowed
    encode_frame(Kind.BATCH, 2, b"\x00\x00\x00\x09" + bytes(9)),  # one of two
    encode_frame(Kind.BATCH, 1, b"\x00\x00\x00\x09" + bytes(8)),  # runs past the end
    encode_frame(Kind.BATCH, 1, b"\x00\x00\x00\x01" + bytes(1)),  # shorter than a header
    encode_frame(Kind.BATCH, 1, b"\x00\x00\x00\x09" + bytes(10)),  # a byte after the last
    encode_frame(Kind.BATCH, 1, b"\xff\xff\xff"),  # a length cut short
    b"\x09",
])
def test_a_malformed_batch_raises_wire_error(junk: bytes) -> None:
    with pytest.raises(WireError):
        batch_entries_untrusted(junk)


async def test_a_subscriber_behind_gets_batches_in_order_with_its_gaps(pair: Pair) -> None:
    """While a subscriber does not read, its queue fills and then leaves in BATCH frames:
    every publication arrives once, in order, and those dropped are counted before the next."""
    config = PubSubConfig(overflow=Overflow.DROP_OLDEST, queue_bytes=20_000, batch_bytes=4000)
    async with (
        Publisher(pair.server.transport, 8007, config) as pub,
        Subscriber(pair.client.transport, pair.server_name, 8007, ["t"]) as sub,
    ):
        await until_subscribed(pub, 1)
        for n in range(3000):
            await pub.publish("t", b"%d" % n)
        seen: list[int] = []
        missed = 0
        while not seen or seen[-1] != 2999:
            got = await sub.receive(10)
            missed += got.missed
            seen.append(int(got.data))
        assert seen == sorted(set(seen)) and len(seen) + missed == 3000
        assert pub.batches > 0


async def test_a_subscriber_drops_a_stream_that_sends_a_malformed_batch(pair: Pair) -> None:
    """A hostile publisher (a listener answering the SUBSCRIBE itself): a good batch is read
    with its gap, a bad one delivers none of its publications, and the subscriber subscribes
    again on a new stream."""
    config = PubSubConfig(reconnect_min=0.05, reconnect_max=0.2)
    async with pair.server.transport.listen(8008) as listener, \
            Subscriber(pair.client.transport, pair.server_name, 8008, [""], config) as sub:
        first = await listener.receive(10)
        await first.reply(encode_batch([publication(b"a", b"1"), encode_frame(Kind.GAP, 2, b""),
                                        publication(b"b", b"2")]))
        got = [await sub.receive(10) for _ in range(2)]
        assert [(p.topic, p.data, p.missed) for p in got] == [("a", b"1", 0), ("b", b"2", 2)]

        receiving = asyncio.create_task(sub.receive(10))
        await first.reply(encode_batch([publication(b"c", b"lost"),
                                        encode_frame(Kind.REQUEST, 1, bytes(HEADER_SIZE))]))
        again = await listener.receive(10)
        assert parse_frame_untrusted(again.data).kind == Kind.SUBSCRIBE
        assert again.source_port != first.source_port
        await again.reply(publication(b"d", b"after"))
        resumed = await receiving
        assert resumed.data == b"after" and resumed.resumed and sub.malformed == 1


async def test_close_ends_an_iteration_that_waits(pair: Pair) -> None:
    client = pair.client.transport
    async with Publisher(pair.server.transport, 8101):
        sub = Subscriber(client, pair.server_name, 8101, [""])
        await sub.__aenter__()
        received: list[object] = []

        async def read() -> None:
            async for publication in sub:
                received.append(publication)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        await sub.close()
        await asyncio.wait_for(reader, 5)  # ended, not left to its silence timer
        assert received == []


async def test_close_ends_a_receive_waiting_to_subscribe_again(pair: Pair) -> None:
    """A receive paused before subscribing again (its publisher said BYE) ended only when the
    pause did, up to reconnect_max (10 s) after close()."""
    config = PubSubConfig(reconnect_min=5.0, reconnect_max=5.0)
    publisher = Publisher(pair.server.transport, 8103)
    await publisher.__aenter__()
    async with Subscriber(pair.client.transport, pair.server_name, 8103, [""], config) as sub:
        await until_subscribed(publisher, 1)
        receiving = asyncio.create_task(sub.receive(timeout=None))
        await publisher.close()  # BYE: the subscriber drops the stream and pauses 5 s
        await asyncio.sleep(0.5)
        assert not receiving.done()
        await sub.close()
        with pytest.raises(ConfigError, match="closed"):
            await asyncio.wait_for(receiving, 1.0)


async def test_close_while_subscribing_again_leaves_no_subscription(pair: Pair) -> None:
    config = PubSubConfig(reconnect_min=0.5, reconnect_max=0.5)
    publisher = Publisher(pair.server.transport, 8102)
    await publisher.__aenter__()
    sub = Subscriber(pair.client.transport, pair.server_name, 8102, [""], config)
    await sub.__aenter__()
    await until_subscribed(publisher, 1)
    await publisher.close()  # BYE: the subscriber's reader waits to subscribe again
    reader = asyncio.create_task(sub.receive(timeout=30))
    await asyncio.sleep(0.1)
    async with Publisher(pair.server.transport, 8102) as again:
        await sub.close()  # during the pause before subscribing again
        with pytest.raises(ConfigError, match="closed"):
            await asyncio.wait_for(reader, 5)
        await asyncio.sleep(1.0)
        assert again.subscribers == 0


async def test_a_receive_keeps_its_timeout_while_the_publishers_node_is_away(
        tmp_path: Path) -> None:
    config = PubSubConfig(reconnect_min=0.1, reconnect_max=0.1)
    async with trusted_pair(tmp_path) as (a, b):
        async with Publisher(b, 8103, config) as publisher:
            sub = Subscriber(a, b.node_id, 8103, [""], config)
            await sub.__aenter__()
            await until_subscribed(publisher, 1)
        await b.close()  # its node is gone: subscribing again waits on connects
        loop = asyncio.get_running_loop()
        for _ in range(2):
            started = loop.time()
            with pytest.raises(PilotError):
                await sub.receive(timeout=1.0)
            assert loop.time() - started < 3  # not the transport's 10 s connect timeout
        await sub.close()


async def test_a_subscriber_polling_briefly_notices_a_silent_publisher(pair: Pair) -> None:
    config = PubSubConfig(heartbeat_interval=0.5)
    async with Publisher(pair.server.transport, 8104, config) as publisher, \
            Subscriber(pair.client.transport, pair.server_name, 8104, [""], config) as sub:
        await until_subscribed(publisher, 1)
        # Its publisher falls silent without a word (a process behind a daemon that keeps the
        # stream): its feed stops, the stream stays.
        for task in list(publisher._tasks):
            if task.get_coro().__name__ == "_feed":  # type: ignore[union-attr]
                task.cancel()
        loop = asyncio.get_running_loop()
        end = loop.time() + 4  # 1.5 s of silence counts as gone
        while loop.time() < end and sub.reconnections == 0:
            with contextlib.suppress(PilotTimeoutError):
                await sub.receive(timeout=0.5)  # each poll shorter than the silence
        assert sub.reconnections >= 1


def test_prefixes_the_publisher_would_refuse_are_refused_at_once() -> None:
    many = [f"topic-{n:04d}-" + "x" * 90 for n in range(200)]  # 20 KB, over 16 KiB
    with pytest.raises(ConfigError, match="max_prefix_bytes"):
        Subscriber(None, "peer", 8105, many)  # type: ignore[arg-type]


class GatedStream:
    """A subscriber's way back that sends nothing until ``gate`` is set: its queue at the
    publisher stays as full as the test makes it."""

    def __init__(self, way_back: Message, gate: asyncio.Event) -> None:
        self._way_back = way_back
        self._gate = gate

    async def reply(self, data: object) -> None:
        await self._gate.wait()
        await self._way_back.reply(data)


async def fill_while_gated(pub: Publisher, prefix: str, topic: str) -> asyncio.Event:
    """Hold the feed of the subscription to ``prefix`` on its first publication (X) and queue
    a second (Y): 512 of its 1000 queue bytes taken, until the gate returned is set."""
    gate = asyncio.Event()
    (held,) = [s for s in pub._subscriptions.values() if s.prefixes == (prefix.encode(),)]
    held.way_back = GatedStream(held.way_back, gate)  # type: ignore[assignment]
    await pub.publish(topic, b"X" * 500)
    await asyncio.sleep(0.1)  # its feed took X and waits at the gate
    await pub.publish(topic, b"Y" * 500)
    return gate


async def received(sub: Subscriber, count: int) -> list[bytes]:
    return [(await sub.receive(5)).data[:1] for _ in range(count)]


async def test_a_publish_does_not_overtake_one_that_waits(pair: Pair) -> None:
    """A waits for room (Y fills its subscriber's queue); C, published after it and small
    enough to fit, waits behind it rather than reach the subscriber first."""
    config = PubSubConfig(queue_bytes=1000)
    async with (
        Publisher(pair.server.transport, 8107, config) as pub,
        Subscriber(pair.client.transport, pair.server_name, 8107, [""]) as sub,
    ):
        await until_subscribed(pub, 1)
        gate = await fill_while_gated(pub, "", "t")
        first = asyncio.create_task(pub.publish("t", b"A" * 500))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(pub.publish("t", b"C"))
        await asyncio.sleep(0.1)
        assert not first.done()
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [1, 1]
        assert await received(sub, 4) == [b"X", b"Y", b"A", b"C"]


async def test_every_subscriber_sees_concurrent_publishes_in_one_order(pair: Pair) -> None:
    """A waits for the full subscriber to "a" after reaching the first subscriber; B (for the
    other two) must not reach the third before A does."""
    config = PubSubConfig(queue_bytes=1000)
    client, server = pair.client.transport, pair.server_name
    async with contextlib.AsyncExitStack() as stack:
        pub = await stack.enter_async_context(Publisher(pair.server.transport, 8108, config))
        subs = []
        for count, prefix in enumerate(["", "a", ""], 1):  # in this order at the publisher
            subs.append(await stack.enter_async_context(
                Subscriber(client, server, 8108, [prefix])))
            await until_subscribed(pub, count)
        gate = await fill_while_gated(pub, "a", "a")
        first = asyncio.create_task(pub.publish("a", b"A" * 500))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(pub.publish("b", b"B"))
        await asyncio.sleep(0.1)
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [3, 2]
        everything, only_a, also_everything = subs
        assert await received(everything, 4) == [b"X", b"Y", b"A", b"B"]
        assert await received(also_everything, 4) == [b"X", b"Y", b"A", b"B"]
        assert await received(only_a, 3) == [b"X", b"Y", b"A"]


async def test_a_cancelled_or_closed_publish_holds_up_none_behind_it(pair: Pair) -> None:
    """A publish cancelled while it waits lets the one behind it go on when room comes; close()
    ends every publish still waiting, for room or for its turn."""
    config = PubSubConfig(queue_bytes=1000)
    pub = Publisher(pair.server.transport, 8109, config)
    await pub.__aenter__()
    async with Subscriber(pair.client.transport, pair.server_name, 8109, [""]) as sub:
        await until_subscribed(pub, 1)
        gate = await fill_while_gated(pub, "", "t")
        cancelled = asyncio.create_task(pub.publish("t", b"A" * 500))
        await asyncio.sleep(0.1)
        behind = asyncio.create_task(pub.publish("t", b"C"))
        await asyncio.sleep(0.1)
        assert not behind.done()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        gate.set()
        assert await asyncio.wait_for(behind, 5) == 1
        assert await received(sub, 3) == [b"X", b"Y", b"C"]

        await fill_while_gated(pub, "", "t")
        waiting = [asyncio.create_task(pub.publish("t", b"%d" % n * 500)) for n in range(3)]
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in waiting)
        await pub.close()
        assert await asyncio.wait_for(asyncio.gather(*waiting), 5) == [1, 1, 1]


async def test_close_says_bye_to_every_subscriber_at_once(pair: Pair) -> None:
    """Subscribers that do not read: each BYE waits for room; close() waits a second in all,
    not one each."""
    config = PubSubConfig(overflow=Overflow.DROP_OLDEST)
    async with contextlib.AsyncExitStack() as stack:
        publisher = Publisher(pair.server.transport, 8106, config)
        await publisher.__aenter__()
        for _ in range(3):
            await stack.enter_async_context(
                Subscriber(pair.client.transport, pair.server_name, 8106, [""], config))
        await until_subscribed(publisher, 3)
        for _ in range(60):  # 60 MiB to each: past what the windows and send buffers hold
            await publisher.publish("t", b"x" * 2**20)
            await asyncio.sleep(0.02)
        await asyncio.sleep(1)
        assert all(sub.queue for sub in publisher._subscriptions.values())  # streams full
        loop = asyncio.get_running_loop()
        started = loop.time()
        await publisher.close()
        assert loop.time() - started < 2.5

    # Those streams held the tunnel's credit when they were reset: it comes back, and the
    # same tunnel carries a new subscription at once (it stalled for over a minute).
    async with (
        Publisher(pair.server.transport, 8115) as pub,
        Subscriber(pair.client.transport, pair.server_name, 8115, [""]) as sub,
    ):
        await until_subscribed(pub, 1)
        await pub.publish("after", b"x")
        assert (await sub.receive(5)).topic == "after"


async def test_one_peer_cannot_take_every_subscriber_slot(tmp_path: Path) -> None:
    """A publisher's slots (max_subscribers) went to whoever came first, all of them to one
    peer if it subscribed enough times; now each peer has at most max_subscribers_per_peer."""
    config = PubSubConfig(max_subscribers=3, max_subscribers_per_peer=2)
    async with (
        server_and_two_clients(tmp_path) as (server, greedy, other),
        contextlib.AsyncExitStack() as stack,
    ):
        pub = await stack.enter_async_context(Publisher(server, 8030, config))
        for _ in range(3):
            await stack.enter_async_context(
                Subscriber(greedy, server.node_id, 8030, [""], config))
        await until_subscribed(pub, 2)
        await until(lambda: pub.refused == 1, "the greedy peer's third refused")
        latecomer = await stack.enter_async_context(
            Subscriber(other, server.node_id, 8030, [""], config))
        await until_subscribed(pub, 3)
        assert await pub.publish("news", b"hello") == 3
        assert (await latecomer.receive(5)).data == b"hello"


async def test_a_second_publisher_on_a_port_is_refused(
        daemon_pair: tuple[DaemonHandle, DaemonHandle]) -> None:
    """Through a daemon, two publishers on one port each took some of every subscription's
    frames, and a subscriber heard one of them, or neither for long."""
    _, b = daemon_pair
    async with (
        Client(b.home) as first_client, Client(b.home) as second_client,
        Publisher(first_client, 8031),
    ):
        with pytest.raises(PortInUseError, match="port 8031"):
            async with Publisher(second_client, 8031):
                pass
