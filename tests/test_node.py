"""The embedded Node over real UDP sockets on 127.0.0.1: in one process and across two."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pilot_agents import (
    ConfigError,
    IdentityError,
    Node,
    NotTrustedError,
    PeerUnreachableError,
    PilotTimeoutError,
    PortClosedError,
)
from pilot_agents.identity import Identity, key_from_node_id
from pilot_agents.net.tunnel.config import SessionConfig

ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def trusted_pair(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """Two nodes on 127.0.0.1 that trust each other; ``a`` knows where ``b`` is."""
    async with (
        Node(home=tmp_path / "a", listen="127.0.0.1:0") as a,
        Node(home=tmp_path / "b", listen="127.0.0.1:0") as b,
    ):
        a.trust(b.node_id)
        b.trust(a.node_id)
        a.add_peer(b.node_id, b.local_endpoint)
        yield a, b


@contextlib.asynccontextmanager
async def server_and_two_clients(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, Node]]:
    """Three nodes on 127.0.0.1: a server, and two clients that trust it (and it them) and
    know where it is: a hostile one and a good one, for tests of one holding up the other."""
    async with (
        Node(home=tmp_path / "s", listen="127.0.0.1:0") as server,
        Node(home=tmp_path / "h", listen="127.0.0.1:0") as hostile,
        Node(home=tmp_path / "g", listen="127.0.0.1:0") as good,
    ):
        for peer in (hostile, good):
            server.trust(peer.node_id)
            peer.trust(server.node_id)
            peer.add_peer(server.node_id, server.local_endpoint)
        yield server, hostile, good


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    async with trusted_pair(tmp_path) as nodes:
        yield nodes


async def test_issue_example_send_and_receive(pair: tuple[Node, Node]) -> None:
    a, b = pair
    async with b.listen(1001) as listener:
        async with a.connect(b.node_id, port=1001) as conn:
            await conn.send(b"hello")
        msg = await listener.receive(timeout=10)
    assert (msg.data, msg.sender, msg.port) == (b"hello", a.node_id, 1001)


async def test_str_json_and_reply(pair: tuple[Node, Node]) -> None:
    a, b = pair
    async with b.listen(1001) as listener, a.connect(b.node_id, port=1001) as conn:
        await conn.send("text")
        await conn.send({"rows": 1842, "summary": "Q4 up 23%"})
        first = await listener.receive(timeout=5)
        second = await listener.receive(timeout=5)
        assert first.text() == "text"
        assert second.json() == {"rows": 1842, "summary": "Q4 up 23%"}
        await second.reply({"ok": True})
        reply = await conn.receive(timeout=5)
        assert reply.json() == {"ok": True}
        assert reply.sender == b.node_id


async def test_many_messages_in_order_both_directions(pair: tuple[Node, Node]) -> None:
    a, b = pair
    async with b.listen(7) as listener, a.connect(b.node_id, port=7) as conn:
        for i in range(500):
            await conn.send(i.to_bytes(4, "big") * (i % 50))
        for i in range(500):
            msg = await listener.receive(timeout=10)
            assert msg.data == i.to_bytes(4, "big") * (i % 50)
            await msg.reply(str(i))
        for i in range(500):
            assert (await conn.receive(timeout=10)).text() == str(i)


async def test_one_byte_and_empty_messages(pair: tuple[Node, Node]) -> None:
    a, b = pair
    async with b.listen(9) as listener, a.connect(b.node_id, port=9) as conn:
        await conn.send(b"")
        await conn.send(b"x")
        assert (await listener.receive(timeout=5)).data == b""
        assert (await listener.receive(timeout=5)).data == b"x"


async def test_connect_to_closed_port_fails_clearly(pair: tuple[Node, Node]) -> None:
    a, b = pair
    with pytest.raises(PortClosedError, match="nothing listens on that port"):
        async with a.connect(b.node_id, port=4444) as conn:
            await conn.send(b"anyone?")
            await conn.drain(timeout=5)


async def test_untrusted_peer_is_refused_locally_and_remotely(tmp_path: Path) -> None:
    async with (
        Node(home=tmp_path / "a", listen="127.0.0.1:0") as a,
        Node(home=tmp_path / "b", listen="127.0.0.1:0") as b,
    ):
        with pytest.raises(NotTrustedError, match="trust add"):
            async with a.connect(b.node_id, port=1):
                pass
        a.trust(b.node_id)  # but b does not trust a
        a.add_peer(b.node_id, b.local_endpoint)
        with pytest.raises(PeerUnreachableError, match="does not trust us"):
            async with a.connect(b.node_id, port=1, timeout=1.5):
                pass


async def test_a_node_is_told_it_named_itself(tmp_path: Path) -> None:
    """Not "not trusted: run trust add", which would be refused: a node has no tunnel to
    itself."""
    async with Node(home=tmp_path / "a", listen="127.0.0.1:0") as a:
        with pytest.raises(ConfigError, match="is this node itself"):
            async with a.connect(a.node_id, port=1):
                pass
        with pytest.raises(ConfigError, match="own id"):
            a.trust(a.node_id)


async def test_dead_peer_address_times_out(tmp_path: Path) -> None:
    async with Node(home=tmp_path / "a", listen="127.0.0.1:0") as a:
        other = Identity.load_or_create(tmp_path / "ghost")
        a.trust(other.node_id)
        a.add_peer(other.node_id, ("127.0.0.1", 9))
        with pytest.raises(PeerUnreachableError):
            async with a.connect(other.node_id, port=1, timeout=1.0):
                pass


async def test_receive_timeout(pair: tuple[Node, Node]) -> None:
    _, b = pair
    with pytest.raises(PilotTimeoutError):
        await b.receive(1001, timeout=0.2)


async def test_peer_going_away_fails_the_waiter(tmp_path: Path) -> None:
    config = SessionConfig(keepalive_interval=0.2)
    a = Node(home=tmp_path / "a", listen="127.0.0.1:0", config=config)
    b = Node(home=tmp_path / "b", listen="127.0.0.1:0", config=config)
    async with a, b:
        a.trust(b.node_id)
        b.trust(a.node_id)
        a.add_peer(b.node_id, b.local_endpoint)
        async with b.listen(1) as listener, a.connect(b.node_id, port=1) as conn:
            await conn.send(b"x")
            await listener.receive(timeout=5)
            await b.close()
            with pytest.raises(Exception) as info:
                await conn.receive(timeout=20)
            assert "closed" in str(info.value) or "shutting down" in str(info.value)


def test_bad_input_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Node(home=tmp_path, listen="nonsense")
    node = Node(home=tmp_path)
    with pytest.raises(ConfigError, match="not a node id"):
        node.trust("abc")
    with pytest.raises(ConfigError, match="port"):
        node.listen(70000)


def test_identity_is_stable_private_and_checked(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path / "home")
    again = Identity.load_or_create(tmp_path / "home")
    assert first == again
    key_file = tmp_path / "home" / "identity.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_from_node_id(first.node_id) == first.public_key
    assert str(first.virtual_address).startswith("fd")
    os.chmod(key_file, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load_or_create(tmp_path / "home")


def test_pilot_home_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PILOT_HOME", str(tmp_path / "env-home"))
    assert Node().home == tmp_path / "env-home"


async def start_peer_process(home: Path) -> tuple[asyncio.subprocess.Process, str, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "tests" / "echo_peer.py"),
        str(home),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 20)
    info = json.loads(line)
    return process, info["node_id"], info["port"]


@pytest.mark.parametrize("size", [1, 1200, 1_000_000, 64 * 1024 * 1024])
async def test_across_two_processes(tmp_path: Path, size: int) -> None:
    process, peer_id, port = await start_peer_process(tmp_path / "peer")
    try:
        async with Node(home=tmp_path / "me", listen="127.0.0.1:0") as me:
            assert process.stdin is not None
            process.stdin.write(me.node_id.encode() + b"\n")
            await process.stdin.drain()
            me.trust(peer_id)
            me.add_peer(peer_id, ("127.0.0.1", port))
            data = os.urandom(size)
            async with me.connect(peer_id, port=1001, timeout=10) as conn:
                await conn.send(data)
                await conn.send(b"second")
                reply = (await conn.receive(timeout=120)).json()
                assert reply == {"size": size, "sha256": hashlib.sha256(data).hexdigest()}
                assert (await conn.receive(timeout=10)).json()["size"] == 6
    finally:
        process.kill()
        await process.wait()


def test_rtt_samples_are_precise_on_uvloop(tmp_path: Path) -> None:
    """uvloop's loop.time() counts whole milliseconds; the protocol reads the clock itself, so
    RTT samples on loopback (a fraction of a millisecond) stay precise on the daemon's loop."""
    import uvloop

    async def exchange() -> tuple[float, float]:
        async with (
            trusted_pair(tmp_path) as (a, b),
            b.listen(1001) as listener,
            a.connect(b.node_id, port=1001) as conn,
        ):
            for _ in range(50):
                await conn.send(b"ping")
                await (await listener.receive(timeout=5)).reply(b"pong")
                await conn.receive(timeout=5)
            session = a._mux.get_session(key_from_node_id(b.node_id))  # type: ignore[union-attr]
            assert session is not None
            return session._recovery.rtt.min_rtt, session._recovery.rtt.smoothed_rtt

    min_rtt, smoothed = uvloop.run(exchange())
    assert 0 < min_rtt < 0.001 and 0 < smoothed < 0.01
