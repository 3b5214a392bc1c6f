"""NAT rebinding while a tunnel is idle, on the simulated network (issue #15): the rebound node
re-registers and has the beacon introduce it again (``SimNetwork.introduce``, as the node does
on a Registered event naming a previous address); both sides must then punch again, even
towards addresses that worked before the rebinding, and the tunnel goes direct again."""

from __future__ import annotations

import pytest

from pilot_agents.net.tunnel.paths import PathManager, RelayPath
from tests.simnet import Host
from tests.test_traversal import direct_cone_pair


def both_direct(a: Host, b: Host) -> bool:
    sa, sb = a.mux.get_session(b.key), b.mux.get_session(a.key)
    return sa is not None and sb is not None and sa.paths.kind == sb.paths.kind == "direct"


@pytest.mark.parametrize("rebound", ["receiver", "both"])
@pytest.mark.parametrize("seed", range(4))
def test_idle_rebinding_then_reintroduction_goes_direct_again(rebound: str, seed: int) -> None:
    net, a, b, stream = direct_cone_pair(20 + seed)
    net.beacon_introductions = False  # only the rebound node's own re-introduction, below
    net.run_for(40)  # idle: tunnel keepalives only
    assert both_direct(a, b)
    assert a.nat is not None and b.nat is not None
    b.nat.rebind()
    if rebound == "both":
        a.nat.rebind()
    sa = a.mux.get_session(b.key)
    assert sa is not None
    sa.send_message(stream, b"after the rebinding")
    assert net.run_until(lambda: sa.paths.kind == "relay", 10)
    # the rebound node's keepalive found its new address: it asks for an introduction, and
    # each side's node probes at once (Node._on_introduction wakes the endpoint)
    net.introduce(b, a)
    net.flush_all()
    assert net.run_until(lambda: len(b.messages) == 4, 30)
    assert b.messages[3].data == b"after the rebinding"
    assert net.run_until(lambda: both_direct(a, b), 2)
    assert not [e for e in a.events + b.events if type(e).__name__ == "SessionClosed"]


def test_an_introduction_probes_a_candidate_that_worked_before_again() -> None:
    """The lab's failure before this rule: bravo's NAT rebound, bravo followed alpha to the
    relay (so alpha's address stayed 'validated' in bravo's eyes) and the introduction did not
    make bravo probe it; alpha's probes to bravo's new port then met bravo's NAT closed."""
    paths = PathManager(random_token=lambda: b"t" * 8)
    paths.set_relay(RelayPath(b"k" * 32))
    peer = ("203.0.113.2", 4000)
    paths.add_candidates([peer], 0.0)
    assert [a for a, _ in paths.probes_due(0.0)] == [peer]
    assert paths.on_response(b"t" * 8, peer)
    paths.move_to(peer)
    paths.move_to(RelayPath(b"k" * 32))  # followed the peer to the relay: still "validated"
    assert paths.is_validated(peer) and paths.probes_due(50.0) == []
    paths.add_candidates([peer], 50.0)  # the introduction after the rebinding
    assert [a for a, _ in paths.probes_due(50.0)] == [peer]


def test_an_introduction_probes_the_active_path_too() -> None:
    """An audit (the NAT lab): after its own NAT rebound, a node's introduction named the
    peer's address, which was its active path, and was skipped: nothing left its new mapping
    towards the peer, whose probes its port-restricted NAT then dropped until its next
    keepalive (15 s). The active address is probed like any candidate now."""
    paths = PathManager(random_token=lambda: b"t" * 8)
    peer = ("203.0.113.2", 4000)
    paths.set_direct(peer)
    paths.add_candidates([peer], 0.0)
    assert [a for a, _ in paths.probes_due(0.0)] == [peer]
    assert paths.on_response(b"t" * 8, peer) and paths.active == peer


def test_a_peer_that_rebinds_again_and_again_is_still_probed_at_its_newest_address() -> None:
    """An audit: candidates were never forgotten, so after 16 addresses (14 rebindings of the
    peer's NAT) the 17th was not probed and the tunnel never went direct again. The one named
    longest ago goes now, never the active path's; and a round's tokens do not pile up."""
    paths = PathManager(random_token=lambda: b"t" * 8)
    paths.set_relay(RelayPath(b"k" * 32))
    first = ("203.0.113.2", 4000)
    paths.add_candidates([first], 0.0)
    paths.probes_due(0.0)
    assert paths.on_response(b"t" * 8, first)
    paths.move_to(first)
    for port in range(4001, 4040):  # many rebindings, each named by an introduction
        paths.add_candidates([("203.0.113.2", port)], float(port))
    newest = ("203.0.113.2", 4039)
    assert newest in [a for a, _ in paths.probes_due(4039.0)]
    assert paths.is_validated(first)  # the active path's address stays
    assert len(paths._candidates) == paths.config.max_candidates
    paths.move_to(RelayPath(b"k" * 32))
    for when in range(5000, 100_000, 200):  # retry rounds on the relay, no answers
        paths.probes_due(float(when))
    assert all(len(c.tokens) <= paths.config.probes_per_round for c in paths._candidates.values())
