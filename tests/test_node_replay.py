"""A node keeps the greatest initiation timestamp of each peer in its home, so a captured
initiation is refused after the node restarts (issue #11, finding 7). Real UDP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
from pathlib import Path

import pytest

from pilot_agents import Node
from pilot_agents.identity import Identity, key_from_node_id
from pilot_agents.net.tunnel import wire
from pilot_agents.net.tunnel.mux import Mux
from pilot_agents.node.timestamps import FILE_NAME, TimestampStore

KEY = bytes(range(32))


def captured_initiation(sender: Identity, to_node_id: str, to: tuple[str, int]) -> bytes:
    """What an eavesdropper records: one genuine initiation of ``sender``'s."""
    mux = Mux(sender.secret_key, sender.public_key)
    peer = key_from_node_id(to_node_id)
    mux.trust(peer)
    session = mux.session(peer, 0.0)
    session.address = to
    session.connect(0.0)
    return mux.datagrams_to_send(0.0)[0][0]


async def answer_to(sock: socket.socket, packet: bytes, to: tuple[str, int]) -> bytes | None:
    sock.sendto(packet, to)
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 2048), 1.0)
    except TimeoutError:
        return None


async def test_a_replayed_initiation_after_a_node_restart_is_refused(tmp_path: Path) -> None:
    initiator = Identity.load_or_create(tmp_path / "a")
    replayer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    replayer.bind(("127.0.0.1", 0))
    replayer.setblocking(False)
    with replayer:
        async with Node(home=tmp_path / "b", listen="127.0.0.1:0") as b:
            b.trust(initiator.node_id)
            packet = captured_initiation(initiator, b.node_id, b.local_endpoint)
            answer = await answer_to(replayer, packet, b.local_endpoint)
            assert answer is not None and answer[0] == wire.RESPONSE  # fresh: accepted
        async with Node(home=tmp_path / "b", listen="127.0.0.1:0") as b2:
            b2.trust(initiator.node_id)
            assert await answer_to(replayer, packet, b2.local_endpoint) is None
    saved = tmp_path / "b" / FILE_NAME
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert initiator.public_key.hex() in json.loads(saved.read_text())


async def test_timestamps_are_written_in_batches(tmp_path: Path) -> None:
    store = TimestampStore(tmp_path / FILE_NAME, flush_delay=0.05)
    for value in range(1, 101):
        store[KEY] = value
    assert store.writes == 0
    await asyncio.sleep(0.2)
    assert store.writes == 1
    assert TimestampStore(tmp_path / FILE_NAME)[KEY] == 100
    store.flush()  # nothing changed: nothing written
    assert store.writes == 1


@pytest.mark.parametrize(
    "content", ["not json", "[1, 2]", json.dumps({"zz": 5, KEY.hex(): "x", "00" * 31: 9})]
)
def test_a_bad_timestamp_file_is_skipped_with_a_warning(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / FILE_NAME
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        store = TimestampStore(path)
    assert dict(store) == {}
    store[KEY] = 7  # outside an event loop: written at once
    assert json.loads(path.read_text()) == {KEY.hex(): 7}
