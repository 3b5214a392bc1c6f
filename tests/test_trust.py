"""Signed trust requests and the trust store: real keys, real files."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilot_agents import ipc
from pilot_agents.beacon import service
from pilot_agents.beacon.server import BeaconConfig
from pilot_agents.errors import (
    ConfigError,
    CryptoError,
    KeyMismatchError,
    PilotTimeoutError,
    TrustRequestError,
)
from pilot_agents.identity import Identity, key_from_node_id
from pilot_agents.net.tunnel import crypto
from pilot_agents.node.node import Node
from pilot_agents.trust import (
    REQUEST_MAX_AGE,
    TrustLimits,
    TrustStore,
    is_node_id,
    make_trust_request,
    parse_trust_request_untrusted,
)
from tests.conftest import (
    assert_one_line_error,
    cli,
    cli_json,
    cli_many,
    ipc_call,
    named_pair,
    short_home,
    start_daemon,
    stop_daemons,
)

ALICE = Identity.generate()
BOB = Identity.generate()
MALLORY = Identity.generate()
NOW = 1_800_000_000.0


def request(frm: Identity = ALICE, to: Identity = BOB, **kw: object) -> bytes:
    return make_trust_request(frm, to.node_id, kw.pop("hostname", "alice"),  # type: ignore[arg-type]
                              kw.pop("reason", "pipeline"), now=kw.pop("now", NOW))  # type: ignore[arg-type]


# -- requests ------------------------------------------------------------------------------


def test_request_round_trip() -> None:
    raw = request()
    parsed = parse_trust_request_untrusted(raw, ALICE.public_key, BOB.node_id, now=NOW + 5)
    assert (parsed.sender, parsed.to, parsed.hostname, parsed.reason) == (
        ALICE.node_id, BOB.node_id, "alice", "pipeline")


def test_request_out_of_band_needs_no_transport_sender() -> None:
    parsed = parse_trust_request_untrusted(request(), None, BOB.node_id, now=NOW)
    assert parsed.sender == ALICE.node_id


@pytest.mark.parametrize("flip", [0, 10, 63, 64, 80, -2])
def test_any_flipped_byte_is_refused(flip: int) -> None:
    raw = bytearray(request())
    raw[flip] ^= 0x01
    with pytest.raises(TrustRequestError):
        parse_trust_request_untrusted(bytes(raw), None, BOB.node_id, now=NOW)


def test_request_sent_by_another_key_is_refused() -> None:
    with pytest.raises(TrustRequestError, match="claims to be from"):
        parse_trust_request_untrusted(request(), MALLORY.public_key, BOB.node_id, now=NOW)


def test_forged_sender_is_refused() -> None:
    """Mallory signs a body that claims to come from Alice."""
    raw = request(frm=MALLORY)
    body = json.loads(raw[64:])
    body["from"] = ALICE.node_id
    forged_body = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    forged = MALLORY.sign(b"pilot-agents trust request v1\x00" + forged_body) + forged_body
    with pytest.raises(TrustRequestError, match="bad signature"):
        parse_trust_request_untrusted(forged, None, BOB.node_id, now=NOW)


def test_request_for_someone_else_is_refused() -> None:
    with pytest.raises(TrustRequestError, match="addressed to"):
        parse_trust_request_untrusted(request(to=MALLORY), None, BOB.node_id, now=NOW)


@pytest.mark.parametrize("skew", [REQUEST_MAX_AGE + 1, -(REQUEST_MAX_AGE + 1)])
def test_stale_or_future_request_is_refused(skew: float) -> None:
    with pytest.raises(TrustRequestError, match="clock"):
        parse_trust_request_untrusted(request(), None, BOB.node_id, now=NOW + skew)


def test_too_long_reason_is_refused_when_made() -> None:
    with pytest.raises(ConfigError):
        request(reason="x" * 501)


@given(st.binary(max_size=5000))
@settings(max_examples=150, deadline=None)
def test_parse_raises_only_trust_request_error(data: bytes) -> None:
    with contextlib.suppress(TrustRequestError):
        parse_trust_request_untrusted(data, None, BOB.node_id, now=NOW)


@given(st.dictionaries(st.sampled_from(["v", "from", "to", "hostname", "reason", "ts", "nonce",
                                        "x"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=60), st.floats(),
                                 st.booleans(), st.lists(st.integers(), max_size=2))))
@settings(max_examples=150, deadline=None)
def test_signed_garbage_bodies_raise_only_trust_request_error(fields: dict[str, object]) -> None:
    body = json.dumps(fields).encode()
    raw = ALICE.sign(b"pilot-agents trust request v1\x00" + body) + body
    with contextlib.suppress(TrustRequestError):
        parse_trust_request_untrusted(raw, None, BOB.node_id, now=NOW)


# -- the store -----------------------------------------------------------------------------


def verified(raw: bytes) -> object:
    return parse_trust_request_untrusted(raw, None, BOB.node_id, now=NOW)


def test_store_persists_with_mode_0600(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    store.add_trusted(ALICE.node_id, "alice", "because")
    path = tmp_path / "trust.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = TrustStore.load(tmp_path)
    entry = again.get(ALICE.node_id)
    assert entry is not None and (entry.hostname, entry.state, entry.reason) == (
        "alice", "outgoing", "because")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_outgoing_then_their_request_is_mutual(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    store.add_trusted(ALICE.node_id, "alice")
    raw = request()
    entry = store.receive_request(verified(raw), raw)  # type: ignore[arg-type]
    assert entry.state == "mutual"
    assert TrustStore.load(tmp_path).get(ALICE.node_id).state == "mutual"  # type: ignore[union-attr]


def test_request_first_is_pending_until_approved(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    raw = request()
    entry = store.receive_request(verified(raw), raw)  # type: ignore[arg-type]
    assert entry.state == "incoming" and not entry.trusted
    assert [e.node_id for e in store.pending()] == [ALICE.node_id]
    assert store.trusted() == []
    assert store.find("alice", states=["incoming"]).node_id == ALICE.node_id
    approved = store.add_trusted(ALICE.node_id, "alice")
    assert approved.state == "mutual" and approved.request is None
    assert store.pending() == []


def test_confirm_turns_outgoing_into_mutual_only(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    assert not store.confirm(ALICE.node_id)  # unknown: no change, nothing trusted
    assert store.get(ALICE.node_id) is None
    store.add_trusted(ALICE.node_id, None)
    assert store.confirm(ALICE.node_id)
    assert not store.confirm(ALICE.node_id)
    assert store.get(ALICE.node_id).state == "mutual"  # type: ignore[union-attr]


def test_pinned_name_refuses_a_new_key(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    store.add_trusted(ALICE.node_id, "alice")
    store.check_pin("alice", ALICE.node_id)
    with pytest.raises(KeyMismatchError) as info:
        store.add_trusted(MALLORY.node_id, "alice")
    message = str(info.value)
    assert ALICE.node_id in message and MALLORY.node_id in message
    assert "pilotctl trust remove alice" in message
    assert store.get(MALLORY.node_id) is None


def test_pending_claim_of_a_pinned_name_stays_untrusted(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    store.add_trusted(ALICE.node_id, "alice")
    raw = make_trust_request(MALLORY, BOB.node_id, "alice", "", now=NOW)
    entry = store.receive_request(verified(raw), raw)  # type: ignore[arg-type]
    assert entry.state == "incoming"
    assert store.pinned("alice").node_id == ALICE.node_id  # type: ignore[union-attr]
    assert not store.is_trusted(MALLORY.node_id)


def test_find_by_name_and_id(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    store.add_trusted(ALICE.node_id, "alice")
    assert store.find("alice").node_id == ALICE.node_id
    assert store.find(ALICE.node_id.upper()).node_id == ALICE.node_id
    with pytest.raises(ConfigError, match="not in the trust store"):
        store.find("bob")


def test_remove(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    store.add_trusted(ALICE.node_id, "alice")
    store.remove(ALICE.node_id)
    assert TrustStore.load(tmp_path).entries() == []


@pytest.mark.parametrize("text", ["{", "[]", '{"version": 1, "entries": {}}', '{"version": 2}'])
def test_malformed_store_is_a_config_error(tmp_path: Path, text: str) -> None:
    write_store(tmp_path, text)
    with pytest.raises(ConfigError, match="fix or remove it"):
        TrustStore.load(tmp_path)


def test_node_ids_in_requests_are_real_keys() -> None:
    parsed = parse_trust_request_untrusted(request(), None, BOB.node_id, now=NOW)
    assert key_from_node_id(parsed.sender) == ALICE.public_key


def write_store(home: Path, text: str) -> Path:
    path = home / "trust.json"
    path.write_text(text)
    path.chmod(0o600)
    return path


def typo_of(node_id: str) -> str:
    """``node_id`` with one character changed so that it is no longer a valid key (as most
    typos are): still 52 base32 characters."""
    for i in range(len(node_id)):
        for char in "abcdefghijklmnopqrstuvwxyz234567":
            typo = node_id[:i] + char + node_id[i + 1:]
            try:
                crypto.ed25519_pk_to_x25519(base64.b32decode(typo.upper() + "===="))
            except CryptoError:
                return typo
    raise AssertionError("no typo of that id is an invalid key")


# -- 14: a typo'd node id never reaches trust.json, a bad entry in it is not fatal ------------


TYPO = typo_of(ALICE.node_id)


def test_typod_node_id_is_refused_before_anything_is_saved(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    with pytest.raises(ConfigError, match="not a valid public key"):
        store.add_trusted(TYPO, None)
    assert not (tmp_path / "trust.json").exists()
    assert store.entries() == []
    with pytest.raises(ConfigError, match="not a valid public key"):
        key_from_node_id(TYPO)
    assert is_node_id(TYPO)  # still read as a node id (not a name), so the message says typo


def test_bad_entry_in_the_store_is_skipped_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = {"node_id": ALICE.node_id, "hostname": "alice", "state": "mutual",
            "added_at": NOW, "updated_at": NOW}
    entries = [{**good, "node_id": TYPO}, good, {"node_id": "x"}]
    write_store(tmp_path, json.dumps({"version": 1, "entries": entries}))
    with caplog.at_level(logging.WARNING, logger="pilot_agents.trust"):
        store = TrustStore.load(tmp_path)
    assert [e.node_id for e in store.entries()] == [ALICE.node_id]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and "entry 1" in skipped[0] and "entry 3" in skipped[1], skipped


def test_request_from_a_key_that_is_no_curve_point_is_a_trust_request_error() -> None:
    raw = bytearray(request())
    body = json.loads(raw[64:])
    body["from"] = TYPO
    forged = bytes(64) + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(TrustRequestError):
        parse_trust_request_untrusted(forged, None, BOB.node_id, now=NOW)


# -- 9: trust-request spam is bounded ------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spam_store(tmp_path: Path, **limits: Any) -> tuple[TrustStore, FakeClock]:
    clock = FakeClock()
    return TrustStore.load(tmp_path, TrustLimits(**limits), clock=clock), clock


def receive(store: TrustStore, who: Identity, hostname: str = "x", now: float = NOW,
            reason: str = "") -> object:
    raw = make_trust_request(who, BOB.node_id, hostname, reason, now=now)
    return store.receive_request(verified(raw), raw, now=now)  # type: ignore[arg-type]


def test_spam_keys_do_not_evict_a_real_pending_request(tmp_path: Path) -> None:
    """300 throwaway keys after a real request: the real one stays, the newest spam is
    dropped."""
    store = TrustStore.load(tmp_path)
    assert store.limits.max_pending == TrustLimits().max_pending == 256
    receive(store, ALICE, "alice")
    dropped = 0
    for i in range(300):
        try:
            receive(store, Identity.generate(), f"spam{i}", now=NOW + 1 + i)
        except TrustRequestError as exc:
            assert "pending already" in str(exc)
            dropped += 1
    pending = store.pending()
    assert len(pending) == 256 and dropped == 300 - 255
    assert pending[0].node_id == ALICE.node_id
    assert [e.hostname for e in pending[1:]] == [f"spam{i}" for i in range(255)]
    assert store.get(ALICE.node_id) is not None
    store.flush()
    assert TrustStore.load(tmp_path).get(ALICE.node_id) is not None


def test_expired_pending_requests_make_room(tmp_path: Path) -> None:
    store, _ = spam_store(tmp_path, max_pending=2, pending_max_age_s=100.0)
    receive(store, ALICE, "alice", now=NOW)
    receive(store, MALLORY, "mallory", now=NOW + 50)
    with pytest.raises(TrustRequestError):
        receive(store, Identity.generate(), "late", now=NOW + 60)
    receive(store, Identity.generate(), "later", now=NOW + 120)  # alice's expired
    assert [e.hostname for e in store.pending()] == ["mallory", "later"]


def test_admit_limits_each_key_and_all_keys(tmp_path: Path) -> None:
    store, clock = spam_store(tmp_path, key_rate_per_s=0.5, key_burst=3, total_rate_per_s=10.0,
                              total_burst=20, max_keys=50)
    one = ALICE.public_key
    assert [store.admit(one) for _ in range(5)] == [True, True, True, False, False]
    clock.now += 2.0  # one token back
    assert [store.admit(one) for _ in range(2)] == [True, False]
    keys = [Identity.generate().public_key for _ in range(100)]
    admitted = sum(store.admit(k) for k in keys)
    assert admitted == 19  # the total bucket: refilled to its burst of 20, minus alice's last
    assert len(store._limiter) <= 50  # the table of keys is bounded
    clock.now += 10.0
    assert store.admit(keys[-1])


def test_admit_drops_new_keys_but_not_pending_ones_when_full(tmp_path: Path) -> None:
    store, _ = spam_store(tmp_path, max_pending=1)
    raw = request()
    store.receive_request(verified(raw), raw, now=time.time())  # type: ignore[arg-type]
    assert not store.admit(MALLORY.public_key)  # a new key: no room
    assert store.admit(ALICE.public_key)  # alice may ask again (a refresh)
    store.add_trusted(BOB.node_id, None)
    assert store.admit(BOB.public_key)  # a key we trust may confirm it


def test_repeated_request_refreshes_without_a_write(tmp_path: Path) -> None:
    store, clock = spam_store(tmp_path, save_interval_s=5.0)
    receive(store, ALICE, "alice", now=NOW)
    assert store.saves == 1
    for i in range(50):
        clock.now += 10.0  # well past the interval: a write would be allowed
        entry = receive(store, ALICE, "alice", now=NOW + 1 + i)
    assert store.saves == 1
    assert entry.updated_at == NOW + 50 and entry.added_at == NOW  # type: ignore[attr-defined]
    clock.now += 10.0
    receive(store, ALICE, "alice", reason="new words", now=NOW + 60)
    assert store.saves == 2  # a changed request is a change


def test_network_changes_are_written_at_most_once_per_interval(tmp_path: Path) -> None:
    store, clock = spam_store(tmp_path, save_interval_s=5.0)
    for i in range(20):
        receive(store, Identity.generate(), f"n{i}", now=NOW + i)
        clock.now += 0.1
    assert store.saves == 1  # the first one; the others wait for the interval
    assert len(TrustStore.load(tmp_path).pending()) == 1
    clock.now += 5.0
    receive(store, Identity.generate(), "n20", now=NOW + 20)
    assert store.saves == 2 and len(TrustStore.load(tmp_path).pending()) == 21
    receive(store, Identity.generate(), "n21", now=NOW + 21)
    store.flush()  # at shutdown
    assert store.saves == 3 and len(TrustStore.load(tmp_path).pending()) == 22
    store.flush()
    assert store.saves == 3  # nothing left to write
    store.add_trusted(ALICE.node_id, "alice")  # the user's changes are written at once
    assert store.saves == 4


async def test_batched_changes_are_written_by_a_timer(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path, TrustLimits(save_interval_s=0.2))
    receive(store, ALICE, "alice")
    receive(store, MALLORY, "mallory")
    assert store.saves == 1
    await asyncio.sleep(0.4)
    assert store.saves == 2
    assert len(TrustStore.load(tmp_path).pending()) == 2


# -- 14, with real daemons ---------------------------------------------------------------------


def wait_stopped(home: Path) -> None:
    deadline = time.monotonic() + 10
    while ipc.daemon_pid(home) is not None:
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.05)


def test_daemon_starts_again_after_a_bad_trust_add(fresh_home: Path) -> None:
    start_daemon(fresh_home, "gamma")
    typo = typo_of(Identity.generate().node_id)
    refused = cli(fresh_home, "trust", "add", typo)
    assert_one_line_error(refused, 2, "not a valid public key (a typo?)")
    assert ipc_call(fresh_home, cmd="trust_list")["entries"] == []
    assert ipc_call(fresh_home, cmd="stop")["ok"]
    wait_stopped(fresh_home)
    start_daemon(fresh_home, "gamma")  # asserts that it started


def test_daemon_starts_with_a_bad_entry_in_trust_json(fresh_home: Path) -> None:
    fresh_home.chmod(0o700)
    good = {"node_id": ALICE.node_id, "hostname": "alice", "state": "outgoing",
            "added_at": NOW, "updated_at": NOW}
    write_store(fresh_home, json.dumps({"version": 1, "entries": [{**good, "node_id": TYPO},
                                                                  good]}))
    start_daemon(fresh_home, "gamma")
    entries: Any = ipc_call(fresh_home, cmd="trust_list")["entries"]
    assert [e["node_id"] for e in entries] == [ALICE.node_id]
    log = (fresh_home / "daemon.log").read_text()
    assert "entry 1 skipped" in log and "not a valid public key" in log


def test_daemon_starts_with_a_static_peer_saved_at_a_listen_address(fresh_home: Path) -> None:
    """add-peer now refuses an address a peer cannot be reached at (port 0, any interface);
    one saved before that check must not keep the daemon from starting."""
    fresh_home.chmod(0o700)
    peers = fresh_home / "static-peers.json"
    peers.write_text(json.dumps({"peers": [
        {"node_id": ALICE.node_id, "address": "1.2.3.4:0", "hostname": "alice"},
        {"node_id": MALLORY.node_id, "address": "127.0.0.1:9", "hostname": "mallory"}]}))
    peers.chmod(0o600)
    start_daemon(fresh_home, "gamma")
    log = (fresh_home / "daemon.log").read_text()
    assert f"static peer {ALICE.node_id} skipped" in log and "1.2.3.4:0" in log


def test_trust_remove_works_without_a_daemon(fresh_home: Path) -> None:
    store = TrustStore.load(fresh_home)
    store.add_trusted(ALICE.node_id, "alice")
    store.add_trusted(MALLORY.node_id, "mallory")
    removed = cli(fresh_home, "trust", "remove", "alice")
    assert removed.returncode == 0, removed.stderr
    assert f"Removed alice ({ALICE.node_id})" in removed.stdout
    assert [e.node_id for e in TrustStore.load(fresh_home).entries()] == [MALLORY.node_id]
    as_json = cli_json(fresh_home, "trust", "remove", MALLORY.node_id)
    assert as_json["entry"]["node_id"] == MALLORY.node_id  # type: ignore[index]
    assert TrustStore.load(fresh_home).entries() == []
    assert_one_line_error(cli(fresh_home, "trust", "remove", "alice"), 2,
                          "alice is not in the trust store")
    # several at once: each edits under the lock, none is lost
    names = [f"peer{i}" for i in range(4)]
    store = TrustStore.load(fresh_home)
    for name in names:
        store.add_trusted(Identity.generate().node_id, name)
    results = cli_many([(fresh_home, "trust", "remove", name) for name in names])
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    assert TrustStore.load(fresh_home).entries() == []
    # with a daemon running, the daemon does it (and tears down the peer's tunnels)
    start_daemon(fresh_home, "gamma")
    assert ipc_call(fresh_home, cmd="trust_add", target=ALICE.node_id)["ok"]
    removed = cli(fresh_home, "trust", "remove", ALICE.node_id)
    assert removed.returncode == 0, removed.stderr
    assert ipc_call(fresh_home, cmd="trust_list")["entries"] == []


# -- 9, with a real daemon and beacon ------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_trust_request_flood_through_the_beacon_costs_few_writes(tmp_path: Path) -> None:
    """One key floods a daemon with valid, distinct trust requests through the beacon's relay
    for 2 s: it is pending once, trust.json is written at most twice, the daemon answers."""
    running = await service.start("127.0.0.1:0", tmp_path / "beacon")
    beacon = "{}:{}".format(*running.address)
    home = short_home()
    writes: set[tuple[int, int]] = set()  # each write renames a new file in: (inode, mtime)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(home / "trust.json")
                writes.add((info.st_ino, info.st_mtime_ns))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    try:
        daemon = await asyncio.to_thread(start_daemon, home, "target", "--beacon", beacon)
        async with Node(tmp_path / "spammer", "127.0.0.1:0", beacon=beacon,
                        hostname="spammer") as spammer:
            watcher.start()
            cpu_before, sent = cpu_seconds(daemon.pid), 0
            start = time.monotonic()
            while time.monotonic() - start < 2.0:
                for _ in range(20):
                    await spammer.send_trust_request(daemon.node_id, make_trust_request(
                        spammer.identity, daemon.node_id, "spammer", f"spam {sent}"))
                    sent += 1
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.5)
            cpu = cpu_seconds(daemon.pid) - cpu_before
            done.set()
            watcher.join()
            pending: Any = await asyncio.to_thread(ipc_call, home, cmd="trust_pending")
        print(f"{sent} requests in 2 s: daemon CPU {cpu:.2f} s, {len(writes)} writes")
        assert sent > 500
        assert [p["node_id"] for p in pending["pending"]] == [spammer.node_id]
        assert len(writes) <= 2, len(writes)
    finally:
        done.set()
        await asyncio.to_thread(stop_daemons, home)
        running.close()
        running.server.registry.close()


def test_batched_requests_are_written_when_the_daemon_stops(fresh_home: Path) -> None:
    daemon = start_daemon(fresh_home, "gamma")
    senders = [Identity.generate() for _ in range(3)]
    for who in senders:  # all within one save interval: only the first is written at once
        blob = base64.b64encode(make_trust_request(who, daemon.node_id, None)).decode()
        assert ipc_call(fresh_home, cmd="trust_import", request=blob)["ok"]
    assert ipc_call(fresh_home, cmd="stop")["ok"]
    wait_stopped(fresh_home)
    assert {e.node_id for e in TrustStore.load(fresh_home).pending()} == {
        who.node_id for who in senders}


# -- names are pinned in every case (security.md #37) -------------------------------------------


def test_a_pinned_name_in_another_case_is_the_same_pin(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    store.add_trusted(ALICE.node_id, " Alice ")
    assert store.get(ALICE.node_id).hostname == "alice"  # type: ignore[union-attr]
    for spelling in ("alice", "Alice", "ALICE"):
        assert store.pinned(spelling).node_id == ALICE.node_id  # type: ignore[union-attr]
        assert store.find(spelling).node_id == ALICE.node_id
        with pytest.raises(KeyMismatchError):
            store.check_pin(spelling, MALLORY.node_id)
        with pytest.raises(KeyMismatchError):
            store.add_trusted(MALLORY.node_id, spelling)
    assert store.get(MALLORY.node_id) is None


def test_a_store_pinning_one_name_in_two_cases_keeps_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    tmp_path.chmod(0o700)
    path = tmp_path / "trust.json"
    entry = {"state": "mutual", "reason": "", "updated_at": NOW}
    path.write_text(json.dumps({"version": 1, "entries": [
        {**entry, "node_id": MALLORY.node_id, "hostname": "Alice", "added_at": NOW + 1},
        {**entry, "node_id": ALICE.node_id, "hostname": "alice", "added_at": NOW},
        {**entry, "node_id": BOB.node_id, "hostname": "BOB", "added_at": NOW + 2}]}))
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="pilot_agents.trust"):
        store = TrustStore.load(tmp_path)
    assert [(e.node_id, e.hostname) for e in store.entries()] == [
        (ALICE.node_id, "alice"), (BOB.node_id, "bob")]
    assert MALLORY.node_id in caplog.text and "alice is pinned to key" in caplog.text


async def test_node_never_moves_a_pin_to_another_key(tmp_path: Path) -> None:
    node = Node(tmp_path / "n", "127.0.0.1:0")
    node.trust(ALICE.node_id, "alice")
    node.trust(ALICE.node_id, "Alice")  # the same key again: fine
    with pytest.raises(KeyMismatchError, match=ALICE.node_id):
        node.trust(MALLORY.node_id, "ALICE")
    assert not node.is_trusted(MALLORY.node_id)
    node.untrust(ALICE.node_id)
    node.trust(MALLORY.node_id, "alice")  # untrusted first: a new pin


async def test_a_capital_letter_does_not_get_around_a_pin(tmp_path: Path) -> None:
    """Bob pinned alice; alice renamed and mallory took 'alice' at the beacon. 'trust add
    Alice' and 'send Alice' are 'alice': refused, and nothing reaches mallory."""
    running = await service.start("127.0.0.1:0", tmp_path / "beacon")
    beacon = "{}:{}".format(*running.address)
    home = short_home()
    try:
        bob = await asyncio.to_thread(start_daemon, home, "bob", "--beacon", beacon)
        async with Node(tmp_path / "alice", "127.0.0.1:0", beacon=beacon, hostname="alice"):
            added = await asyncio.to_thread(cli, home, "trust", "add", "alice")
            assert added.returncode == 0, added.stderr
        alice_id = TrustStore.load(home).pinned("alice").node_id  # type: ignore[union-attr]
        async with Node(tmp_path / "alice", "127.0.0.1:0", beacon=beacon, hostname="alice-new"), \
                Node(tmp_path / "mallory", "127.0.0.1:0", beacon=beacon,
                     hostname="alice") as mallory:
            mallory.trust(bob.node_id)
            async with mallory.listen(1001) as inbox:
                refused = await asyncio.to_thread(cli, home, "trust", "add", "Alice")
                assert_one_line_error(refused, 7, mallory.node_id, alice_id)
                sent = await asyncio.to_thread(cli, home, "send", "Alice", "1001", "--data",
                                               "x", "--timeout", "3")
                assert sent.returncode != 0
                assert "trust add" not in sent.stderr or "trust remove" in sent.stderr
                with pytest.raises(PilotTimeoutError):
                    await inbox.receive(timeout=0.5)
        assert [e.node_id for e in TrustStore.load(home).entries()] == [alice_id]
    finally:
        await asyncio.to_thread(stop_daemons, home)
        running.close()
        running.server.registry.close()


# -- what a pending request can make 'trust pending' show (security.md #38) ----------------------


def signed_request(**changes: object) -> bytes:
    """A request signed by ALICE for BOB whose body has ``changes``, in canonical form."""
    fields: dict[str, object] = {"v": 1, "from": ALICE.node_id, "to": BOB.node_id,
                                 "hostname": "alice", "reason": "", "ts": NOW,
                                 "nonce": "0" * 32, **changes}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()
    return ALICE.sign(b"pilot-agents trust request v1\x00" + body) + body


FORGED_ROW = f"hi\nalice  {MALLORY.node_id}  3 s ago  \x1b[32m(verified)\x1b[0m\x1b]0;pwned\x07"


@pytest.mark.parametrize("changes", [
    {"hostname": "\u0430lice"}, {"hostname": "Alice"}, {"hostname": "al ice"},
    {"hostname": "alice\x1b[0m"}, {"reason": FORGED_ROW}, {"reason": "a\u202eb"},
    {"reason": "tab\there"}, {"reason": "c1\x9b31m"},
])
def test_requests_with_look_alike_names_or_control_characters_are_refused(
    changes: dict[str, object],
) -> None:
    assert verified(signed_request()).hostname == "alice"  # type: ignore[attr-defined]
    with pytest.raises(TrustRequestError, match="malformed"):
        verified(signed_request(**changes))


def test_a_reason_with_control_characters_is_refused_when_made() -> None:
    with pytest.raises(ConfigError, match="control characters"):
        request(reason="two\nlines")
    assert verified(request(hostname="Alice", reason="café ✓")).hostname == "alice"  # type: ignore[attr-defined]


def test_trust_pending_shows_a_claim_as_a_claim_and_escapes_what_the_peer_wrote(
    fresh_home: Path,
) -> None:
    """An entry stored before requests were checked (or a hand-edited one) still shows safely."""
    fresh_home.chmod(0o700)
    path = fresh_home / "trust.json"
    path.write_text(json.dumps({"version": 1, "entries": [
        {"node_id": MALLORY.node_id, "hostname": "alice", "state": "incoming",
         "reason": FORGED_ROW + "\u202e", "added_at": time.time(),
         "updated_at": time.time()}]}))
    path.chmod(0o600)
    start_daemon(fresh_home, "bob")
    shown = cli(fresh_home, "trust", "pending")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 3, shown.stdout  # header, one row, the hint
    row = lines[1]
    assert row.startswith(MALLORY.node_id) and "claims alice (unverified)" in row
    assert "\\x1b[32m" in row and "\\n" in row and "\\x07" in row and "\\u202e" in row
    assert not any(ch in shown.stdout for ch in "\x1b\x07\u202e")
    listed = cli(fresh_home, "trust", "list")
    assert "claims alice (unverified)" in listed.stdout


# -- a removed peer's messages reach no application (security.md #39) ---------------------------


def test_trust_remove_drops_the_peers_unread_messages() -> None:
    with named_pair() as (a, b):
        for i in range(3):
            assert ipc_call(a.home, cmd="send", target="beta", port=1001, data=f"m{i}")["ok"]
        assert ipc_call(b.home, cmd="listen", port=2002)["ok"]
        assert ipc_call(a.home, cmd="send", target="beta", port=2002, data="other")["ok"]
        handed: Any = ipc_call(b.home, cmd="receive", port=1001, timeout=5, ack=True)
        assert handed["message"]["data"] == "m0", handed
        removed: Any = ipc_call(b.home, cmd="trust_remove", target=a.node_id)
        assert removed["ok"] and removed["messages_dropped"] == 4, removed
        for port in (1001, 2002):
            got: Any = ipc_call(b.home, cmd="receive", port=port, timeout=0.5)
            assert got["error"]["type"] == "PilotTimeoutError", got
        # the unacked m0 does not come back either
        requeued: Any = ipc_call(b.home, cmd="requeue", message=handed["message"]["id"])
        assert requeued["ok"] and requeued["requeued"] is False, requeued
        got = ipc_call(b.home, cmd="receive", port=1001, timeout=0.5)
        assert got["error"]["type"] == "PilotTimeoutError", got
        assert "4 of its unread messages dropped" in (b.home / "daemon.log").read_text()


def test_kept_unread_messages_of_a_peer_removed_meanwhile_are_dropped() -> None:
    with named_pair() as (a, b):
        for i in range(2):
            assert ipc_call(a.home, cmd="send", target="beta", port=1001, data=f"m{i}")["ok"]
        assert ipc_call(b.home, cmd="stop")["ok"]
        wait_stopped(b.home)
        assert (b.home / "unread.jsonl").exists()
        removed = cli(b.home, "trust", "remove", a.node_id)  # no daemon: edits trust.json
        assert removed.returncode == 0, removed.stderr
        start_daemon(b.home, "beta")
        got: Any = ipc_call(b.home, cmd="receive", port=1001, timeout=0.5)
        assert got["error"]["type"] == "PilotTimeoutError", got
        assert "dropped 2 kept unread messages from senders no longer trusted" in (
            b.home / "daemon.log").read_text()


# -- a registered name whose node is offline is not free for a claim (security.md #40) -----------


async def test_trust_add_of_an_offline_name_does_not_fall_back_to_a_claim(tmp_path: Path) -> None:
    """The real alice is registered but offline; mallory's pending request claims 'alice'.
    'trust add alice' says the name belongs to a node that is offline, and suggests approving
    no key; approving by the claimed name is refused the same way."""
    config = BeaconConfig(registration_ttl=8.0, sweep_interval=0.5)
    running = await service.start("127.0.0.1:0", tmp_path / "beacon", config=config)
    beacon = "{}:{}".format(*running.address)
    home = short_home()
    try:
        bob = await asyncio.to_thread(start_daemon, home, "bob", "--beacon", beacon)
        async with Node(tmp_path / "alice", "127.0.0.1:0", beacon=beacon, hostname="alice"):
            pass
        async with Node(tmp_path / "mallory", "127.0.0.1:0", beacon=beacon,
                        hostname="mallory") as mallory:
            await mallory.send_trust_request(bob.node_id, make_trust_request(
                mallory.identity, bob.node_id, "alice", "it's me, on a new laptop"))
            deadline = time.monotonic() + 20
            while "offline" not in (await asyncio.to_thread(cli, home, "resolve", "alice")).stderr:
                assert time.monotonic() < deadline, "alice's registration did not lapse"
                await asyncio.sleep(0.5)
            pending: Any = await asyncio.to_thread(ipc_call, home, cmd="trust_pending")
            assert [p["node_id"] for p in pending["pending"]] == [mallory.node_id]
            added = await asyncio.to_thread(cli, home, "trust", "add", "alice")
            line = assert_one_line_error(added, 5, "alice belongs to a node that is offline now")
            assert "approve" not in line and mallory.node_id not in line
            approved = await asyncio.to_thread(cli, home, "trust", "approve", "alice")
            line = assert_one_line_error(approved, 7, "offline now", "not approved")
            assert f"approve {mallory.node_id}" not in line
        assert not TrustStore.load(home).is_trusted(mallory.node_id)
    finally:
        await asyncio.to_thread(stop_daemons, home)
        running.close()
        running.server.registry.close()
