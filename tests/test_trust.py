"""Signed trust requests and the trust store: real keys, real files."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilot_agents.errors import ConfigError
from pilot_agents.identity import Identity, key_from_node_id
from pilot_agents.trust import (
    MAX_PENDING,
    REQUEST_MAX_AGE,
    KeyMismatchError,
    TrustRequestError,
    TrustStore,
    make_trust_request,
    parse_trust_request_untrusted,
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


def test_pending_requests_are_capped(tmp_path: Path) -> None:
    store = TrustStore.load(tmp_path)
    assert store.max_pending == MAX_PENDING
    store.max_pending = 5
    for i in range(store.max_pending + 3):
        who = Identity.generate()
        raw = make_trust_request(who, BOB.node_id, f"n{i}", "", now=NOW)
        store.receive_request(verified(raw), raw, now=NOW + i)  # type: ignore[arg-type]
    pending = store.pending()
    assert len(pending) == 5
    assert pending[0].hostname == "n3"


@pytest.mark.parametrize("text", ["{", "[]", '{"version": 1, "entries": [{"node_id": "x"}]}',
                                  '{"version": 2}'])
def test_malformed_store_is_a_config_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "trust.json").write_text(text)
    with pytest.raises(ConfigError, match="fix or remove it"):
        TrustStore.load(tmp_path)


def test_node_ids_in_requests_are_real_keys() -> None:
    parsed = parse_trust_request_untrusted(request(), None, BOB.node_id, now=NOW)
    assert key_from_node_id(parsed.sender) == ALICE.public_key
