"""The first message after ``connect(name)``: a name pinned at trust time costs no beacon lookup
(the initiation leaves with the introduction), and the pin, not the at_beacon, decides which key
the name means. A real beacon on loopback; what it was asked is read from its counters.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pilot_agents import Node
from pilot_agents.beacon import service
from pilot_agents.errors import KeyMismatchError, PeerUnreachableError, PilotTimeoutError
from pilot_agents.identity import Identity
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.paths import PathConfig
from pilot_agents.trust import TrustStore, make_trust_request, parse_trust_request_untrusted
from tests.conftest import ROOT, cli, ipc_call, short_home, start_daemons, stop_daemons
from tests.test_cli import entries, wait_for
from tests.test_node_beacon import beacon as beacon_fixture

at_beacon = beacon_fixture  # the fixture, a beacon in this process; its HOST:PORT

# No punching: the first message must take the relay, the path the issue is about.
RELAY_ONLY = SessionConfig(paths=PathConfig(probes_per_round=0))
CONNECT_TIMEOUT = 10.0  # seconds; the failures below must come long before it
# Each side asks once: the initiator as it sends the initiation, the responder when the relayed
# initiation arrives (its own request, retried, in case the beacon's push to it was lost).
INTRODUCTIONS = 2


def node(tmp_path: Path, name: str, at_beacon: str, hostname: str | None = None) -> Node:
    return Node(tmp_path / name, "127.0.0.1:0", RELAY_ONLY, beacon=at_beacon,
                hostname=hostname or name)


async def asked(at_beacon: str) -> tuple[int, int]:
    """(resolves, introductions) the beacon has answered so far."""
    status = await service.query_status(at_beacon)
    return status["resolves"], status["introductions"]


async def first_message(a: Node, b: Node, name: str) -> None:
    async with b.listen(1001) as listener, a.connect(name, 1001, CONNECT_TIMEOUT) as conn:
        await conn.send(b"first")
        message = await listener.receive(timeout=5)
        assert message.data == b"first" and message.sender == a.node_id


async def test_a_pinned_name_costs_one_introduction_and_no_lookup(
        tmp_path: Path, at_beacon: str) -> None:
    async with node(tmp_path, "alpha", at_beacon) as a, node(tmp_path, "bravo", at_beacon) as b:
        a.trust(b.node_id, hostname="bravo")
        b.trust(a.node_id)
        before = await asked(at_beacon)
        await first_message(a, b, "bravo")
        resolves, introductions = await asked(at_beacon)
        assert (resolves - before[0], introductions - before[1]) == (0, INTRODUCTIONS)
        assert {p.node_id: p.hostname for p in a.peers()} == {b.node_id: "bravo"}


async def test_an_unpinned_name_is_looked_up_first(tmp_path: Path, at_beacon: str) -> None:
    async with node(tmp_path, "alpha", at_beacon) as a, node(tmp_path, "bravo", at_beacon) as b:
        a.trust(b.node_id)  # trusted by key only: the beacon says which key "bravo" is
        b.trust(a.node_id)
        before = await asked(at_beacon)
        await first_message(a, b, "bravo")
        resolves, introductions = await asked(at_beacon)
        assert (resolves - before[0], introductions - before[1]) == (1, INTRODUCTIONS)


async def test_the_pin_not_the_beacon_decides_the_key(tmp_path: Path, at_beacon: str) -> None:
    """The beacon gives "bravo" to another key, one we also trust (by key): the connection
    still goes to the key "bravo" was trusted as."""
    async with (
        node(tmp_path, "alpha", at_beacon) as a,
        node(tmp_path, "pinned", at_beacon, hostname="bravo-now-elsewhere") as pinned,
        node(tmp_path, "other", at_beacon, hostname="bravo") as other,
    ):
        assert (await a.resolve("bravo")).node_id == other.node_id
        a.trust(pinned.node_id, hostname="bravo")
        a.trust(other.node_id)
        pinned.trust(a.node_id)
        other.trust(a.node_id)
        async with other.listen(1001) as elsewhere:
            await first_message(a, pinned, "bravo")
            with pytest.raises(PilotTimeoutError):
                await elsewhere.receive(timeout=0.3)
        assert [p.node_id for p in a.peers()] == [pinned.node_id]


async def test_a_moved_name_whose_pinned_key_is_gone_is_refused(
        tmp_path: Path, at_beacon: str) -> None:
    """The pinned key is not at the beacon and the name now belongs to another key (trusted by
    key, so following the name would connect): KeyMismatchError naming both keys, at once."""
    gone = Node(tmp_path / "gone", "127.0.0.1:0")  # a key that never registered
    async with node(tmp_path, "alpha", at_beacon) as a, node(tmp_path, "bravo", at_beacon) as other:
        a.trust(gone.node_id, hostname="bravo")
        a.trust(other.node_id)
        other.trust(a.node_id)
        started = time.monotonic()
        with pytest.raises(KeyMismatchError) as caught:
            await first_message(a, other, "bravo")
        assert time.monotonic() - started < CONNECT_TIMEOUT / 4
        assert gone.node_id in str(caught.value) and other.node_id in str(caught.value)
        assert "pilotctl trust remove bravo" in str(caught.value)
        assert other.node_id not in [p.node_id for p in a.peers()]
        assert a.node_id not in [p.node_id for p in other.peers()]


async def test_a_pinned_key_that_is_away_fails_fast(tmp_path: Path, at_beacon: str) -> None:
    gone = Node(tmp_path / "gone", "127.0.0.1:0")
    async with node(tmp_path, "alpha", at_beacon) as a:
        a.trust(gone.node_id, hostname="bravo")
        started = time.monotonic()
        with pytest.raises(PeerUnreachableError, match="not at the beacon"):
            async with a.connect("bravo", 1001, CONNECT_TIMEOUT):
                pass
        assert time.monotonic() - started < CONNECT_TIMEOUT / 4


def test_a_claimed_name_approved_by_key_is_not_pinned(tmp_path: Path) -> None:
    """A trust request's name is only a claim; approved by key (the daemon does that when the
    beacon gives the name to another key), the name must not become a pin, or connect(name)
    would go to the claimant without a lookup."""
    claimant, me = Identity.generate(), Identity.generate()
    raw = make_trust_request(claimant, me.node_id, "bravo")
    store = TrustStore.load(tmp_path)
    store.receive_request(parse_trust_request_untrusted(raw, None, me.node_id), raw)
    assert store.add_trusted(claimant.node_id, None).hostname is None
    assert store.pinned("bravo") is None


# -- the daemon and the CLI take the same path ---------------------------------------------


@pytest.mark.beacon
async def test_pilotctl_connect_to_a_trusted_name_asks_the_beacon_nothing_first(
        at_beacon: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon runs detached with cwd "/": without this it would import whichever
    # pilot_agents is installed, not this tree's.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    # Daemons and the CLI block: they run in a thread while this loop serves the beacon.
    await asyncio.to_thread(connect_with_pilotctl, at_beacon)


def connect_with_pilotctl(at_beacon: str) -> None:
    one, two = short_home(), short_home()
    try:
        start_daemons((one, "one"), (two, "two"), extra=("--beacon", at_beacon))
        assert ipc_call(one, cmd="trust_add", target="two")["ok"]
        assert ipc_call(two, cmd="trust_add", target="one")["ok"]
        wait_for(lambda: entries(one)[0]["state"] == "mutual")
        assert ipc_call(two, cmd="listen", port=1001)["ok"]
        before = asyncio.run(asked(at_beacon))
        sent = cli(one, "connect", "two", "--message", "first")
        assert sent.returncode == 0, sent.stderr
        resolves, introductions = asyncio.run(asked(at_beacon))
        assert (resolves - before[0], introductions - before[1]) == (0, INTRODUCTIONS)
        got = ipc_call(two, cmd="receive", port=1001, timeout=5)["message"]
        assert got["data"] == "first"  # type: ignore[index]
    finally:
        stop_daemons(one, two)
