"""A reply path through the daemon lives as long as the stream the message came on, however
many other messages the daemon hands out meanwhile (a daemon whose message memory is small
makes that quick to see), and a reply to a message whose stream is gone says so."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import pilot_agents as pilot
from pilot_agents.errors import ConnectionClosedError
from pilot_agents.patterns import Publisher, Subscriber
from pilot_agents.sdk import ClientOptions
from tests.conftest import DaemonHandle, peer_up, short_home, stop_daemons
from tests.test_daemon_hardening import start_with
from tests.test_pubsub import until_subscribed

# The server's messages by id, through requests and deliveries: the reply paths kept here. A data
# socket's messages come by way instead (tests/test_daemon_port_socket.py).
REQUESTS = ClientOptions(data_sockets=False)

Pair = tuple[DaemonHandle, DaemonHandle]
MEMORY = 50  # messages the daemons remember for requeue and ack
OTHERS = 4 * MEMORY  # messages handed out between a message and its reply


@pytest.fixture(scope="module")
def forgetful_pair() -> Iterator[Pair]:
    homes = [short_home(), short_home()]
    try:
        a = start_with(homes[0], "alpha", message_memory=MEMORY)
        b = start_with(homes[1], "beta", message_memory=MEMORY)
        peer_up(a, b)
        yield a, b
    finally:
        stop_daemons(*homes)


async def hand_out_others(sender: pilot.Client, receiver: pilot.Client, port: int) -> None:
    """``OTHERS`` messages handed out by the receiver's daemon, each on a stream of its own
    (closed at once: a sender that finishes leaves no stream behind)."""
    async with receiver.listen(port) as listener:
        for n in range(OTHERS):
            await sender.send("beta", port, b"%d" % n)
            await listener.receive(timeout=10)


async def test_a_request_is_answered_after_many_others(forgetful_pair: Pair) -> None:
    a, b = forgetful_pair
    async with pilot.Client(b.home, REQUESTS) as server, pilot.Client(a.home) as client, \
            server.listen(7401) as listener, client.connect("beta", 7401) as conn:
        await conn.send("question")
        request = await listener.receive(timeout=10)
        await hand_out_others(client, server, 7402)
        await request.reply("answer")
        assert (await conn.receive(timeout=10)).data == b"answer"
        await conn.send("again")  # and the stream's later messages too
        await (await listener.receive(timeout=10)).reply("again answered")
        assert (await conn.receive(timeout=10)).data == b"again answered"


async def test_a_subscription_keeps_receiving_after_many_others(forgetful_pair: Pair) -> None:
    a, b = forgetful_pair
    async with pilot.Client(b.home, REQUESTS) as server, pilot.Client(a.home) as client, \
            Publisher(server, 7403) as pub, Subscriber(client, "beta", 7403, [""]) as sub:
        await until_subscribed(pub, 1)
        await hand_out_others(client, server, 7404)
        await asyncio.sleep(0.2)  # time for a broken reply path to retire the subscription
        assert await pub.publish("t", b"still there") == 1
        publication = await sub.receive(5)
        assert (publication.data, publication.resumed) == (b"still there", False)


async def reply_fails(server: pilot.Client, message_id: str | None) -> str:
    """The error of a reply to a message whose stream is ending (the daemon hears it soon)."""
    for _ in range(100):
        try:
            await server.call("reply", b"late", message=message_id)
        except ConnectionClosedError as exc:
            return str(exc)
        await asyncio.sleep(0.05)
    raise AssertionError("replies on an ended stream kept succeeding")


async def test_a_stream_that_ended_can_no_longer_be_replied_to(forgetful_pair: Pair) -> None:
    a, b = forgetful_pair
    async with pilot.Client(b.home, REQUESTS) as server, pilot.Client(a.home) as client, \
            server.listen(7405) as listener:
        async with client.connect("beta", 7405) as conn:
            await conn.send("reset")
            reset = await listener.receive(timeout=10)
            await conn.abort()
        await client.send("beta", 7405, "closed")  # a one-shot send closes its stream
        closed = await listener.receive(timeout=10)
        error = await reply_fails(server, reset.message_id)
        assert "the stream it came on has ended" in error and "cancelled" in error, error
        error = await reply_fails(server, closed.message_id)
        assert error.endswith("the stream it came on has ended"), error
        await hand_out_others(client, server, 7406)  # nothing of either stream is kept now
        for message in (reset, closed):
            assert (await reply_fails(server, message.message_id)).startswith(
                f"message {message.message_id!r} can no longer be replied to: the stream it "
                "came on has ended"), message


async def test_an_unknown_message_id_is_not_a_closed_stream(forgetful_pair: Pair) -> None:
    _, b = forgetful_pair
    async with pilot.Client(b.home, REQUESTS) as server:
        for bogus in ("m999999", "nonsense", "m1.abcdef-1", "m1.-"):
            with pytest.raises(ConnectionClosedError, match="did not hand it out"):
                await server.call("reply", b"x", message=bogus)
