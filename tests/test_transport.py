"""One conformance suite for both transports: the embedded Node and the daemon's Client.

Every test here is written against :class:`pilot_agents.transport.Transport` alone and runs
twice, so a layer built on the interface (patterns, integrations, pipelines) behaves the same
whichever transport it is handed.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest

from pilot_agents import (
    ConnectionClosedError,
    NotTrustedError,
    PilotTimeoutError,
    PortClosedError,
)
from pilot_agents.identity import Identity
from tests.transport_pairs import Pair, kind_fixture, pair_fixture  # noqa: F401 (fixtures)

# Ports differ per test: the daemons live for the module and keep a port's unread messages.


async def test_request_and_reply_on_a_connection(pair: Pair) -> None:
    async with (
        pair.server.transport.listen(6001) as listener,
        pair.client.transport.connect(pair.server_name, 6001) as conn,
    ):
        assert conn.peer_id == pair.server.node_id
        assert conn.path == "direct" and (conn.rtt is None or conn.rtt > 0)
        await conn.send({"rows": 1842})
        await conn.send("text")
        await conn.send(b"\x00\xff")
        got = [await listener.receive(timeout=5) for _ in range(3)]
        assert got[0].json() == {"rows": 1842}
        assert got[1].text() == "text"
        assert got[2].data == b"\x00\xff"
        for message in got:
            assert message.sender == pair.client.node_id
            assert message.port == 6001 and message.source_port > 0
        await got[0].reply({"ok": True})
        answer = await conn.receive(timeout=5)
        assert answer.json() == {"ok": True} and answer.sender == pair.server.node_id
        await conn.drain(timeout=5)


async def test_one_shot_send_and_receive(pair: Pair) -> None:
    async def later() -> None:
        await asyncio.sleep(0.2)
        await pair.client.transport.send(pair.server_name, 6002, b"one")

    task = asyncio.create_task(later())
    message = await pair.server.transport.receive(6002, timeout=5)
    await task
    assert message.data == b"one" and message.sender == pair.client.node_id


async def test_listener_iterates_until_closed(pair: Pair) -> None:
    async with pair.server.transport.listen(6003) as listener:
        for n in range(3):
            await pair.client.transport.send(pair.server_name, 6003, {"n": n})
        seen = []
        async for message in listener:
            seen.append(message.json()["n"])
            if len(seen) == 3:
                break
        assert seen == [0, 1, 2]


async def test_timeouts_raise_pilot_timeout_error(pair: Pair) -> None:
    with pytest.raises(PilotTimeoutError):
        await pair.server.transport.receive(6004, timeout=0.2)
    async with pair.server.transport.listen(6005) as listener:
        with pytest.raises(PilotTimeoutError):
            await listener.receive(timeout=0.2)
        async with pair.client.transport.connect(pair.server_name, 6005) as conn:
            with pytest.raises(PilotTimeoutError):
                await conn.receive(timeout=0.2)


async def test_a_closed_port_is_port_closed_error(pair: Pair) -> None:
    with pytest.raises(PortClosedError):
        async with pair.client.transport.connect(pair.server_name, 6099) as conn:
            await conn.send(b"anyone?")
            await conn.drain(timeout=5)


async def test_an_untrusted_peer_is_not_trusted_error(pair: Pair) -> None:
    with pytest.raises(NotTrustedError, match="trust add"):
        await pair.client.transport.send(Identity.generate().node_id, 6006, b"x", timeout=2)


async def test_abort_and_close_are_coroutines_on_both(pair: Pair) -> None:
    async with pair.server.transport.listen(6007) as listener:
        conn = pair.client.transport.connect(pair.server_name, 6007)
        assert inspect.iscoroutinefunction(conn.abort)
        assert inspect.iscoroutinefunction(conn.close)
        assert inspect.iscoroutinefunction(listener.close)
        async with conn:
            await conn.send(b"first")
            assert (await listener.receive(timeout=5)).data == b"first"
            await conn.abort()
            with pytest.raises(ConnectionClosedError):
                await conn.send(b"after abort")


async def test_messages_a_closed_listener_never_gave_out_fail_their_sender(pair: Pair) -> None:
    listener = pair.server.transport.listen(6008)
    await listener.__aenter__()
    conn = pair.client.transport.connect(pair.server_name, 6008)
    await conn.__aenter__()
    await conn.send(b"never read")
    await conn.drain(timeout=5)
    await listener.close()
    with pytest.raises(PortClosedError):
        await conn.receive(timeout=5)
    await conn.abort()
