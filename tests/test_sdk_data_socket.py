"""A connection through the daemon on a data socket of its own (docs/ipc.md, Data sockets), as
the SDK uses it: real daemons, the SDK's Client on both ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pilot_agents.sdk as pilot
from pilot_agents import ConnectionClosedError, PilotTimeoutError
from pilot_agents.sdk import ClientOptions
from tests.conftest import DaemonHandle, ipc_call

Pair = tuple[DaemonHandle, DaemonHandle]
MiB = 1024 * 1024


@pytest.mark.parametrize("options", [ClientOptions(), ClientOptions(data_sockets=False),
                                     ClientOptions(stream_socket=False)],
                         ids=["data socket", "requests", "zeromq"])
async def test_a_connection_carries_messages_both_ways_whichever_path(
        daemon_pair: Pair, options: ClientOptions) -> None:
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home, options) as client, \
            server.listen(7201) as listener, client.connect("beta", 7201) as conn:
        assert (conn._data is not None) == (options.data_sockets and options.stream_socket)
        for n in range(3):
            await conn.send({"n": n})
        for n in range(3):
            message = await listener.receive(timeout=5)
            assert message.json() == {"n": n}
            await message.reply({"echo": n})
        for n in range(3):
            reply = await conn.receive(timeout=5)
            assert reply.json() == {"echo": n}
            assert (reply.sender, reply.hostname, reply.source_port) == (b.node_id, "beta", 7201)
        assert (await reply.since_arrival() or 0.0) >= 0.0
        await reply.reply("an answer to a reply goes on the connection")
        assert (await listener.receive(timeout=5)).text().startswith("an answer")
        await conn.drain(timeout=5)
        await server.flush()


async def test_close_delivers_everything_sent_before_it(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home) as client, \
            server.listen(7202) as listener:
        async with client.connect("beta", 7202) as conn:
            for n in range(200):
                await conn.send(b"%d" % n)
        # The close returned once the peer's node had every byte: all of it is there to read.
        got = [(await listener.receive(timeout=5)).data for _ in range(200)]
        assert got == [b"%d" % n for n in range(200)]


async def test_a_receive_times_out_and_the_connection_goes_on(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home) as client, \
            server.listen(7203) as listener, client.connect("beta", 7203) as conn:
        with pytest.raises(PilotTimeoutError, match="no message on the connection to beta"):
            await conn.receive(timeout=0.2)
        await conn.send("still here")
        message = await listener.receive(timeout=5)
        await message.reply("yes")
        assert (await conn.receive(timeout=5)).text() == "yes"


async def test_a_stream_aborted_in_the_daemon_ends_the_connection(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home) as client, \
            server.listen(7204) as listener, client.connect("beta", 7204) as conn:
        await conn.send("first")
        assert (await listener.receive(timeout=5)).text() == "first"
        ipc_call(a.home, cmd="stream_abort", stream=conn._id())
        with pytest.raises(ConnectionClosedError):
            await conn.receive(timeout=5)
        with pytest.raises(ConnectionClosedError):
            await conn.send("after")
        with pytest.raises(ConnectionClosedError):
            await conn.drain(timeout=5)
        with pytest.raises(ConnectionClosedError):  # as on the requests' path
            await conn.close()


async def test_a_reader_a_window_behind_gets_everything_once_it_reads(
        daemon_pair: Pair) -> None:
    """The socket stops reading at a full window and reads again once half of it is taken,
    however the reads come."""
    a, b = daemon_pair
    options = ClientOptions(receive_window_messages=4)
    async with pilot.Client(b.home) as server, pilot.Client(a.home, options) as client, \
            server.listen(7215) as listener, client.connect("beta", 7215) as conn:
        await conn.send("start")
        message = await listener.receive(timeout=5)
        for n in range(40):
            await message.reply(b"%d" % n)
        await asyncio.sleep(0.3)  # the window fills, the rest waits in the daemons
        got = [(await conn.receive(timeout=5)).data for _ in range(40)]
        assert got == [b"%d" % n for n in range(40)]


async def test_the_reason_a_stream_ended_is_read_even_after_a_write_fails(
        daemon_pair: Pair) -> None:
    """The daemon closes its side after its last frame and reads until the client closes its
    own: a client that writes after that frame came and before reading it still reads why,
    where a write failing with EPIPE had asyncio drop the unread frame."""
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home) as client, \
            server.listen(7216), client.connect("beta", 7216) as conn:
        ipc_call(a.home, cmd="stream_abort", stream=conn._id())
        time.sleep(0.3)  # blocking: the loop reads nothing meanwhile, the daemon is done
        with contextlib.suppress(ConnectionClosedError):
            await conn.send("into a connection the daemon is done with")
        with pytest.raises(ConnectionClosedError, match="was closed"):
            await conn.receive(timeout=5)
        await conn.abort()


async def test_a_connect_cancelled_at_any_point_ends_at_once(daemon_pair: Pair) -> None:
    """A cancel (a ^C) that comes as the daemon answers the attach or a close is not lost: the
    task ends, rather than go on with a connection it was told to give up."""
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home) as client, \
            server.listen(7217):

        async def use() -> None:
            async with client.connect("beta", 7217) as conn:
                await conn.send(b"x")
                await asyncio.sleep(60)

        for n in range(100):
            task = asyncio.create_task(use())
            await asyncio.sleep(n * 0.0001)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)  # TimeoutError if the cancel was lost


async def test_a_sender_whose_peer_stops_reading_waits(daemon_pair: Pair) -> None:
    """Nothing grows without bound: the listener never receives, so its daemon's inbox fills,
    the tunnel stops, the sender's daemon stops reading the data socket, and the sends wait."""
    a, b = daemon_pair
    options = ClientOptions(send_window_bytes=MiB)
    chunk = b"x" * MiB
    async with pilot.Client(b.home) as server, pilot.Client(a.home, options) as client, \
            server.listen(7205), client.connect("beta", 7205) as conn:
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await conn.send(chunk)
                sent += 1

        task = asyncio.create_task(flood())
        await asyncio.sleep(3)
        stalled_at = sent
        await asyncio.sleep(1)
        assert sent == stalled_at  # waiting, not sending
        # The listener's inbox (16 MiB), the two streams' windows and the sockets' buffers:
        # well under this, and far from all of a flood.
        assert sent < 64
        task.cancel()
        await conn.abort()


CHILD = textwrap.dedent("""
    import asyncio, sys
    import pilot_agents.sdk as pilot

    async def main() -> None:
        async with pilot.Client(sys.argv[1]) as client, \\
                client.connect("beta", 7206) as conn:
            await conn.send("hello")
            print("sent", flush=True)
            await asyncio.sleep(300)

    asyncio.run(main())
""")


async def test_a_killed_clients_stream_is_reset_at_once(daemon_pair: Pair) -> None:
    """A data socket is the stream's: when its client dies, the stream goes with it, rather
    than at the daemon's idle timeout (10 minutes)."""
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, server.listen(7206) as listener:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(a.home)],
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert child.stdout is not None
            assert await asyncio.to_thread(child.stdout.readline) == "sent\n"
            message = await listener.receive(timeout=5)
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while True:
            try:  # the reply fails at once once the daemon said the way closed; else flush
                await message.reply("anyone?")
                await server.flush()
            except ConnectionClosedError:
                break
            assert loop.time() < deadline, "the dead client's stream is still open"
            await asyncio.sleep(0.1)


# -- a port's messages on a listener's data socket ---------------------------------------------


async def test_a_listeners_messages_come_with_their_senders_and_take_replies(
        daemon_pair: Pair) -> None:
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home) as client, \
            server.listen(7211) as listener, client.connect("beta", 7211) as first, \
            client.connect("beta", 7211) as second:
        assert listener._socket is not None
        await first.send("one")
        await second.send("two")
        got = {}
        for _ in range(2):
            message = await listener.receive(timeout=5)
            assert (message.sender, message.hostname, message.port) == (a.node_id, "alpha", 7211)
            assert (await message.since_arrival() or 0.0) >= 0.0
            got[message.text()] = message
        assert got["one"].source_port != got["two"].source_port  # two streams, two ways
        for text, message in got.items():
            await message.reply(text.upper())
        assert (await first.receive(timeout=5)).text() == "ONE"
        assert (await second.receive(timeout=5)).text() == "TWO"
        await server.flush()


async def test_a_listener_takes_nothing_from_the_port_before_it_receives(
        daemon_pair: Pair) -> None:
    """Listeners sharing a port share its messages: one that opened and has not received yet
    holds none of them back from the one that reads."""
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home) as client, \
            server.listen(7218) as idle, server.listen(7218) as reader, \
            client.connect("beta", 7218) as conn:
        for n in range(10):
            await conn.send(b"%d" % n)
        got = [(await reader.receive(timeout=5)).data for _ in range(10)]
        assert got == [b"%d" % n for n in range(10)]
        await reader.close()  # (the reader still has credit: "10" would be its)
        await conn.send(b"10")
        assert (await idle.receive(timeout=5)).data == b"10"  # it takes once it receives


async def test_several_tasks_receive_from_one_listener_at_once(daemon_pair: Pair) -> None:
    """A replier's workers each wait on the listener: every message wakes one of them, and
    one that gives up (its timeout) hands its turn on rather than leave a message unread."""
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home) as client, \
            server.listen(7214) as listener, client.connect("beta", 7214) as conn:
        with pytest.raises(PilotTimeoutError):
            await listener.receive(timeout=0.1)
        waiting = [asyncio.create_task(listener.receive(timeout=10)) for _ in range(4)]
        await asyncio.sleep(0.1)
        for n in range(4):
            await conn.send(b"%d" % n)
        got = await asyncio.gather(*waiting)
        assert sorted(m.data for m in got) == [b"0", b"1", b"2", b"3"]


async def test_a_reply_on_an_ended_stream_is_raised_by_the_next_reply_and_by_flush(
        daemon_pair: Pair) -> None:
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, pilot.Client(a.home) as client, \
            server.listen(7212) as listener:
        async with client.connect("beta", 7212) as conn:
            await conn.send("hello")
            message = await listener.receive(timeout=5)
            await conn.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        with pytest.raises(ConnectionClosedError):
            while loop.time() < deadline:  # until the reset reached the listener's daemon
                await message.reply("anyone?")
                await server.flush()
                await asyncio.sleep(0.05)
        with pytest.raises(ConnectionClosedError):
            await message.reply("still?")
        await server.flush()  # raised once


REPLIER = textwrap.dedent("""
    import asyncio, sys
    import pilot_agents.sdk as pilot

    async def main() -> None:
        async with pilot.Client(sys.argv[1]) as client, client.listen(7213) as listener:
            print("listening", flush=True)
            await listener.receive(timeout=30)
            print("got it", flush=True)
            await asyncio.sleep(300)

    asyncio.run(main())
""")


async def test_a_replier_killed_mid_request_fails_its_requester_at_once(
        daemon_pair: Pair) -> None:
    a, b = daemon_pair
    child = subprocess.Popen([sys.executable, "-c", REPLIER, str(b.home)],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout is not None
        assert await asyncio.to_thread(child.stdout.readline) == "listening\n"
        async with pilot.Client(a.home) as client, client.connect("beta", 7213) as conn:
            await conn.send("please answer")
            assert await asyncio.to_thread(child.stdout.readline) == "got it\n"
            os.killpg(child.pid, signal.SIGKILL)
            with pytest.raises(ConnectionClosedError, match="cancelled"):
                await conn.receive(timeout=5)
            await conn.abort()  # it is over: a close would raise why
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


async def test_another_clients_unlisten_cannot_close_an_exclusive_listeners_port(
        daemon_pair: Pair) -> None:
    """Any client's unlisten took back a listen of the port, and the one an exclusive listener
    (mcp serve, a publisher) held through its data socket closed the port under it. Nor may
    another client's raw 'deliver' take its messages."""
    a, b = daemon_pair
    async with pilot.Client(b.home) as server, server.listen(7231, exclusive=True) as listener:
        refused = ipc_call(b.home, cmd="unlisten", port=7231)
        assert refused["error"]["type"] == "PortInUseError", refused
        refused = ipc_call(b.home, cmd="deliver", port=7231)
        assert refused["error"]["type"] == "PortInUseError", refused
        await pilot.send("beta", 7231, "still here", home=a.home)
        assert (await listener.receive(timeout=5)).data == b"still here"
