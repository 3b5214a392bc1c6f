"""Tunnels that come back, with real nodes on loopback (issue #15): the first send after the
peer crashed and restarted is delivered, and a caller that waits 40 s outlasts a 15 s outage of
every path (tests/test_converge.py has the same properties on the simulated network)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pilot_agents import Node
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.node.connection import Listener
from pilot_agents.node.node import Node as NodeClass
from tests import test_node_beacon

ROOT = Path(__file__).resolve().parent.parent
beacon = test_node_beacon.beacon  # a real beacon on loopback (the fixture)


class PeerProcess:
    """tests/restart_peer.py (or another ``script`` that starts the same way): a node in its own
    process that can be killed and started again on the same home and port."""

    def __init__(self, home: Path, script: str = "restart_peer.py") -> None:
        self.home = home
        self.script = script
        self.port = 0
        self.node_id = ""
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, trust: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "tests" / self.script), str(self.home),
            str(self.port), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},  # this tree's code
        )
        info = await self.line()
        self.node_id, self.port = info["node_id"], info["port"]
        assert self.process.stdin is not None
        self.process.stdin.write(trust.encode() + b"\n")
        await self.process.stdin.drain()
        assert await self.line() == {"listening": True}

    async def line(self, timeout: float = 20) -> Any:
        assert self.process is not None and self.process.stdout is not None
        return json.loads(await asyncio.wait_for(self.process.stdout.readline(), timeout))

    async def crash(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            await self.crash()


async def test_the_first_send_after_the_peer_crashed_and_restarted_is_delivered(
    tmp_path: Path,
) -> None:
    peer = PeerProcess(tmp_path / "peer")
    try:
        async with Node(home=tmp_path / "me", listen="127.0.0.1:0") as me:
            await peer.start(me.node_id)
            me.trust(peer.node_id)
            me.add_peer(peer.node_id, ("127.0.0.1", peer.port))
            await me.send(peer.node_id, 1001, b"before", timeout=10)
            assert await peer.line() == {"data": "before"}
            await peer.crash()
            await peer.start(me.node_id)
            assert (await me.ping(peer.node_id, timeout=10)).rtt < 1.0  # pinged on again
            await peer.crash()  # no CLOSE: our tunnel still looks established
            await peer.start(me.node_id)
            # Failed with 'tunnel closed: the peer restarted' (exit 12) before.
            await me.send(peer.node_id, 1001, b"after", timeout=10)
            assert await peer.line() == {"data": "after"}
            await me.send(peer.node_id, 1001, b"and on", timeout=10)
            assert await peer.line() == {"data": "and on"}  # "after" came once
    finally:
        await peer.stop()


class Blackhole:
    """Every datagram that reaches the node's socket is dropped, as a NAT that lost its
    mappings drops them: direct packets, relayed ones, the beacon's answers."""

    def __init__(self, node: NodeClass) -> None:
        endpoint = node._endpoint
        assert endpoint is not None and endpoint._sock is not None
        self._endpoint = endpoint
        self._sock: socket.socket = endpoint._sock
        self._loop = asyncio.get_running_loop()
        self.dropped = 0

    def __enter__(self) -> Blackhole:
        self._loop.remove_reader(self._sock.fileno())
        self._loop.add_reader(self._sock.fileno(), self._drop)
        return self

    def _drop(self) -> None:
        while True:
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                return
            self.dropped += 1

    def __exit__(self, *exc: object) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._loop.add_reader(self._sock.fileno(), self._endpoint._read_ready)


async def test_a_caller_waiting_40_s_outlasts_a_15_s_outage(tmp_path: Path, beacon: str) -> None:
    async with (
        Node(tmp_path / "a", "127.0.0.1:0", beacon=beacon, hostname="sender") as a,
        Node(tmp_path / "b", "127.0.0.1:0", beacon=beacon, hostname="receiver") as b,
    ):
        a.trust(b.node_id)
        b.trust(a.node_id)
        async with b.listen(1001) as listener:
            await a.send("receiver", 1001, b"warm-up", timeout=10)
            assert (await listener.receive(timeout=5)).data == b"warm-up"
            with Blackhole(b) as hole:
                started = time.monotonic()
                sending = asyncio.create_task(a.send("receiver", 1001, b"through", timeout=40))
                await asyncio.sleep(15)
                assert not sending.done()  # 8.5 s after the path died, it gave up before
                assert hole.dropped > 0
            await asyncio.wait_for(sending, 30)
            took = time.monotonic() - started
            assert 15 <= took < 40
            assert (await listener.receive(timeout=5)).data == b"through"
            with pytest.raises(Exception, match="no message"):
                await listener.receive(timeout=0.5)  # delivered once


async def test_connect_waits_for_a_peer_that_is_down_until_the_callers_deadline(
    tmp_path: Path,
) -> None:
    """The peer's node is down when we connect and comes back after longer than a handshake
    may take (1 s here): the connection waits for it, up to the caller's timeout."""
    impatient = SessionConfig(handshake_timeout=1.0)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    async with Node(home=tmp_path / "a", listen="127.0.0.1:0", config=impatient) as a:
        b = Node(home=tmp_path / "b", listen=f"127.0.0.1:{port}")
        a.trust(b.node_id)
        a.add_peer(b.node_id, ("127.0.0.1", port))

        async def start_b_later() -> Listener:
            await asyncio.sleep(2.5)
            await b.start()
            b.trust(a.node_id)
            return b.listen(1001)

        starting = asyncio.create_task(start_b_later())
        try:
            await a.send(b.node_id, 1001, b"you're back", timeout=15)
            listener = await starting
            assert (await listener.receive(timeout=5)).data == b"you're back"
        finally:
            await asyncio.gather(starting, return_exceptions=True)
            await b.close()
