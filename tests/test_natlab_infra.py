"""Proves the NAT lab behaves like real NATs and links, with plain UDP helper processes.

No pilot-agents protocol code is involved: a STUN-like echo server (``udp_echo.py``) on public
hosts, and scriptable UDP endpoints (``udp_agent.py``) on hosts behind NATs. Every test builds its
own lab (about 0.3 s), so state such as impairments or rebinds never leaks between tests.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from tests.natlab import Lab, LabError, cleanup_stale
from tests.natlab.agents import EchoServer, UdpAgent, punch_pair
from tests.natlab.conftest_helpers import lab_fixture, natlab_fixture  # noqa: F401 - fixtures
from tests.natlab.pcap import udp_datagrams
from tests.natlab.topology import NS_PREFIX, list_netns

# ---------------------------------------------------------------------------------------------
# 1. mapping behaviour


def test_cone_nat_maps_to_public_ip_with_one_port_for_all_destinations(lab: Lab) -> None:
    stun1 = EchoServer(lab, lab.add_public_host("stun1"))
    stun2 = EchoServer(lab, lab.add_public_host("stun2"))
    nat = lab.add_nat("home", "cone")
    alice = UdpAgent(lab, lab.add_host_behind(nat, "alice"))

    m1 = alice.reflect(stun1.addr())
    m2 = alice.reflect(stun2.addr())

    assert m1[0] == nat.public_ip, lab.describe()
    assert m1 == m2, "a cone NAT must map one socket to one public port for every destination"
    # Linux MASQUERADE keeps the source port when it is free; tests may rely on it.
    assert m1[1] == alice.local[1]


def test_symmetric_nat_maps_each_destination_to_a_new_port(lab: Lab) -> None:
    stun1 = EchoServer(lab, lab.add_public_host("stun1"))
    stun2 = EchoServer(lab, lab.add_public_host("stun2"))
    nat = lab.add_nat("office", "symmetric")
    bob = UdpAgent(lab, lab.add_host_behind(nat, "bob"))

    m1 = bob.reflect(stun1.addr())
    m2 = bob.reflect(stun2.addr())

    assert m1[0] == m2[0] == nat.public_ip
    assert m1[1] != m2[1], "a symmetric NAT must use a new port per destination"
    assert bob.reflect(stun1.addr()) == m1, "while it lives, a mapping is stable"


def test_full_cone_nat_accepts_anyone_once_mapped(lab: Lab) -> None:
    stun = EchoServer(lab, lab.add_public_host("stun"))
    stranger = UdpAgent(lab, lab.add_public_host("stranger"))
    nat = lab.add_nat("open", "full-cone")
    carol = UdpAgent(lab, lab.add_host_behind(nat, "carol"))

    mapped = carol.reflect(stun.addr())
    stranger.send(mapped, "hello from nowhere")
    got = carol.recv(timeout=1.0, max_packets=1)
    assert [p.data for p in got] == ["hello from nowhere"]


# ---------------------------------------------------------------------------------------------
# 2./3. hole punching and filtering


def test_cone_to_cone_hole_punch_succeeds(lab: Lab) -> None:
    stun = EchoServer(lab, lab.add_public_host("beacon"))
    # both homes use the same private subnet, as real ones do
    nat_a = lab.add_nat("home_a", "cone", lan_subnet="192.168.1.0/24")
    nat_b = lab.add_nat("home_b", "cone", lan_subnet="192.168.1.0/24")
    a = UdpAgent(lab, lab.add_host_behind(nat_a, "a"))
    b = UdpAgent(lab, lab.add_host_behind(nat_b, "b"))
    assert a.local[0] == b.local[0] == "192.168.1.2"
    ma, mb = a.reflect(stun.addr()), b.reflect(stun.addr())

    # One probe arrives long before b sends anything. The router firewall must drop it without a
    # trace: were it accepted, conntrack would keep it and b's own packets to a would leave from
    # a different public port, killing the punch (checked by hand without the DROP rule).
    a.send(mb, "early probe")
    got_a, got_b = punch_pair(a, mb, b, ma, count=10, interval=0.05)

    assert any(p.src == mb for p in got_a), f"a got nothing from b: {got_a}"
    assert any(p.src == ma for p in got_b), f"b got nothing from a: {got_b}"
    # the first probes may die at the far NAT's firewall; the later ones must all pass
    assert {p.data for p in got_a if p.src == mb} >= {"PUNCH 8", "PUNCH 9"}
    assert {p.data for p in got_b if p.src == ma} >= {"PUNCH 8", "PUNCH 9"}


def test_cone_nat_drops_unsolicited_inbound(lab: Lab) -> None:
    stun = EchoServer(lab, lab.add_public_host("beacon"))
    stranger_host = lab.add_public_host("stranger")
    nat = lab.add_nat("home", "cone")
    alice = UdpAgent(lab, lab.add_host_behind(nat, "alice"))
    mapped = alice.reflect(stun.addr())  # a live mapping exists, but only towards the beacon

    # The stranger is a socket of this test process living in the stranger's namespace.
    with lab.socket(stranger_host) as stranger:
        stranger.bind(("0.0.0.0", 4000))
        stranger.settimeout(2.0)
        stranger.sendto(b"unsolicited", mapped)
        assert alice.recv(timeout=0.5) == [], "port-restricted cone must drop unknown senders"

        # Control: once alice has sent to the stranger, the same packet gets in, so the drop
        # above was the NAT's filtering and not a broken path.
        alice.send((stranger_host.ip, 4000), "hi stranger")
        data, src = stranger.recvfrom(100)
        assert (data, src) == (b"hi stranger", mapped)
        stranger.sendto(b"solicited now", mapped)
        assert [p.data for p in alice.recv(timeout=2.0, max_packets=1)] == ["solicited now"]


def test_symmetric_to_symmetric_hole_punch_fails(lab: Lab) -> None:
    stun = EchoServer(lab, lab.add_public_host("beacon"))
    nat_a, nat_b = lab.add_nat("corp_a", "symmetric"), lab.add_nat("corp_b", "symmetric")
    a = UdpAgent(lab, lab.add_host_behind(nat_a, "a"))
    b = UdpAgent(lab, lab.add_host_behind(nat_b, "b"))
    ma, mb = a.reflect(stun.addr()), b.reflect(stun.addr())

    got_a, got_b = punch_pair(a, mb, b, ma, count=10, interval=0.05, linger=0.3)

    assert got_a == [] and got_b == [], (got_a, got_b)


# ---------------------------------------------------------------------------------------------
# 4. same LAN


def test_two_hosts_behind_one_nat_reach_each_other_on_the_lan(lab: Lab) -> None:
    stun = EchoServer(lab, lab.add_public_host("beacon"))
    nat = lab.add_nat("home", "cone")
    h1, h2 = lab.add_host_behind(nat, "h1"), lab.add_host_behind(nat, "h2")
    a, b = UdpAgent(lab, h1), UdpAgent(lab, h2)
    assert lab.address(h1) != lab.address(h2)

    a.send(b.local, "over the lan")
    assert [(p.src, p.data) for p in b.recv(timeout=2.0, max_packets=1)] == [
        (a.local, "over the lan")  # source is the LAN address: no NAT in between
    ]
    b.send(a.local, "and back")
    assert [(p.src, p.data) for p in a.recv(timeout=2.0, max_packets=1)] == [(b.local, "and back")]

    # Linux NAT does no hairpinning: the public (reflexive) address of a neighbour is useless,
    # so same-LAN peers must find each other through their LAN candidates.
    mapped_b = b.reflect(stun.addr())
    a.send(mapped_b, "via the public address")
    assert b.recv(timeout=0.5) == []


# ---------------------------------------------------------------------------------------------
# 5. the delay line


def test_delay_line_adds_20ms_per_crossing(lab: Lab) -> None:
    beacon = lab.add_public_host("beacon")
    stun = EchoServer(lab, beacon)
    nat = lab.add_nat("home", "cone")
    alice = UdpAgent(lab, lab.add_host_behind(nat, "alice"))
    base = alice.ping(stun.addr(), count=20, interval=0.01)

    # each packet entering the internet is held 20 ms: a request and its answer cross once each
    lab.impair(nat, delay_ms=20, direction="up")
    lab.impair(beacon, delay_ms=20, direction="up")
    slow = alice.ping(stun.addr(), count=20, interval=0.02)

    assert slow.received == 20 and slow.lost == [], slow
    assert min(slow.rtts_ms) >= 40.0, slow.rtts_ms
    assert statistics.median(slow.rtts_ms) < 80.0, slow.rtts_ms
    print(
        f"RTT without delay line: median {statistics.median(base.rtts_ms):.2f} ms; "
        f"with 2x20 ms: min {min(slow.rtts_ms):.2f} median {statistics.median(slow.rtts_ms):.2f} "
        f"max {max(slow.rtts_ms):.2f} ms"
    )

    # clearing restores the fast path
    lab.clear_impairment(nat)
    lab.impair(beacon, delay_ms=0)
    fast = alice.ping(stun.addr(), count=20, interval=0.01)
    assert statistics.median(fast.rtts_ms) < 20.0, fast.rtts_ms


def test_delay_line_loses_about_5_percent_by_seeded_rng(lab: Lab) -> None:
    stun = EchoServer(lab, lab.add_public_host("beacon"))
    nat = lab.add_nat("home", "cone")
    alice = UdpAgent(lab, lab.add_host_behind(nat, "alice"))

    lab.impair(nat, loss=0.05, seed=7, direction="up")
    res = alice.ping(stun.addr(), count=1000, interval=0.001, timeout=1.0)
    stats = lab.delayline_stats()["links"]["home"]
    print(f"loss: {len(res.lost)}/1000 lost ({res.loss_rate:.1%}); delay line: {stats}")

    assert 0.02 <= res.loss_rate <= 0.09, res.loss_rate
    # every loss was the delay line's doing (no queue overflowed anywhere else)
    assert stats["up_in"] == 1000 and stats["up_drop"] == len(res.lost), stats

    # same seed, same packets -> the same packets are lost (impair() restarts the RNG)
    lab.impair(nat, loss=0.05, seed=7, direction="up")
    again = alice.ping(stun.addr(), count=1000, interval=0.001, timeout=1.0)
    assert again.lost == res.lost


def test_delay_line_reorders(lab: Lab) -> None:
    stun = EchoServer(lab, lab.add_public_host("beacon"))
    nat = lab.add_nat("home", "cone")
    alice = UdpAgent(lab, lab.add_host_behind(nat, "alice"))

    lab.impair(nat, delay_ms=2, reorder=0.2, seed=1, reorder_gap_ms=15, direction="up")
    res = alice.ping(stun.addr(), count=200, interval=0.002, timeout=1.0)

    assert res.received == 200, res.lost
    assert res.reordered >= 10, res.reordered  # ~20 % of 200 are held back and overtaken


# ---------------------------------------------------------------------------------------------
# 6. NAT state: rebinding, timeouts


def test_rebind_gives_the_same_socket_a_new_mapped_port(lab: Lab) -> None:
    stun = EchoServer(lab, lab.add_public_host("beacon"))
    nat = lab.add_nat("home", "cone")
    alice = UdpAgent(lab, lab.add_host_behind(nat, "alice"))
    before = alice.reflect(stun.addr())

    # forgetting mappings alone is not a rebind on Linux: the source port is preserved again
    lab.flush_conntrack(nat)
    assert alice.reflect(stun.addr()) == before

    lo, hi = lab.rebind(nat)
    after = alice.reflect(stun.addr())
    assert after[0] == nat.public_ip
    assert after[1] != before[1] and lo <= after[1] <= hi, (before, after, (lo, hi))

    lo2, hi2 = lab.rebind(nat)
    third = alice.reflect(stun.addr())
    assert third[1] not in (before[1], after[1]) and lo2 <= third[1] <= hi2


def test_rebind_keeps_a_cone_nat_cone(lab: Lab) -> None:
    stun1 = EchoServer(lab, lab.add_public_host("stun1"))
    stun2 = EchoServer(lab, lab.add_public_host("stun2"))
    nat = lab.add_nat("home", "cone")
    alice = UdpAgent(lab, lab.add_host_behind(nat, "alice"))
    lab.rebind(nat)
    # the kernel reuses an existing mapping of the same source (find_appropriate_src)
    assert alice.reflect(stun1.addr()) == alice.reflect(stun2.addr())


def test_udp_timeout_expires_mappings(lab: Lab) -> None:
    stun = EchoServer(lab, lab.add_public_host("beacon"))
    nat = lab.add_nat("corp", "symmetric")
    bob = UdpAgent(lab, lab.add_host_behind(nat, "bob"))
    lab.set_udp_timeout(nat, 1)

    first = bob.reflect(stun.addr())
    assert bob.reflect(stun.addr()) == first  # refreshed within the timeout: same mapping
    assert "udp" in lab.conntrack_table(nat)
    time.sleep(1.6)
    assert "udp" not in lab.conntrack_table(nat), lab.conntrack_table(nat)
    # symmetric NAT: a new flow after expiry gets a fresh random port
    assert bob.reflect(stun.addr()) != first


# ---------------------------------------------------------------------------------------------
# capture


def test_capture_sees_udp_payloads_at_the_beacon(lab: Lab, tmp_path: Path) -> None:
    beacon = lab.add_public_host("beacon")
    stun = EchoServer(lab, beacon)
    nat = lab.add_nat("home", "cone")
    alice = UdpAgent(lab, lab.add_host_behind(nat, "alice"))

    pcap = tmp_path / "beacon.pcap"
    cap = lab.capture(beacon, "eth0", pcap, bpf=["udp"])
    alice.reflect(stun.addr())
    alice.send(stun.addr(), "PLAINTEXT-MARKER")
    time.sleep(0.2)
    assert cap.stop() >= 3

    seen = udp_datagrams(pcap)
    marker = [d for d in seen if d.payload == b"PLAINTEXT-MARKER"]
    assert marker and marker[0].src[0] == nat.public_ip and marker[0].dst == stun.addr()


# ---------------------------------------------------------------------------------------------
# 7. teardown


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_teardown_leaves_nothing_behind(natlab: None, tmp_path: Path) -> None:
    links_before = _root_links()
    procs: list[subprocess.Popen[bytes]] = []

    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        prefix = lab.prefix
        beacon = lab.add_public_host("beacon")
        nat = lab.add_nat("home", "cone")
        alice = lab.add_host_behind(nat, "alice")
        lab.impair(nat, delay_ms=5)  # starts the delay line process
        stun = EchoServer(lab, beacon)
        UdpAgent(lab, alice).reflect(stun.addr())
        lab.capture(beacon, "eth0", tmp_path / "x.pcap")
        procs = list(lab._procs)
        procs.append(lab.run(alice, ["sleep", "300"]))
        assert len([ns for ns in list_netns() if ns.startswith(prefix)]) == 4
        raise RuntimeError("boom")  # a failing test body

    assert [ns for ns in list_netns() if ns.startswith(prefix)] == []
    assert _root_links() == links_before, "no veth/tun may appear in the root namespace"
    assert len(procs) >= 5 and all(p.poll() is not None for p in procs)


def test_cleanup_stale_removes_namespaces_of_dead_runs(natlab: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free: a "crashed run"
    stale = f"{NS_PREFIX}{dead.pid}-1-inet"
    alive = f"{NS_PREFIX}{os.getpid()}-999-inet"  # ours (pid alive): must survive
    for ns in (stale, alive):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    # a process left running inside the stale namespace, as a crashed run would leave one
    orphan = subprocess.Popen(
        ["ip", "netns", "exec", stale, "sleep", "300"], start_new_session=True
    )
    try:
        removed = cleanup_stale()
        assert stale in removed and alive not in removed
        assert stale not in list_netns() and alive in list_netns()
        assert orphan.wait(timeout=5) != 0  # killed
    finally:
        subprocess.run(["ip", "netns", "del", alive], check=False)
        if orphan.poll() is None:
            orphan.kill()
        subprocess.run(["ip", "netns", "del", stale], check=False, capture_output=True)


def test_lab_errors_are_clear(lab: Lab) -> None:
    nat = lab.add_nat("home", "cone")
    host = lab.add_host_behind(nat, "alice")
    with pytest.raises(ValueError, match="already used"):
        lab.add_public_host("alice")
    with pytest.raises(ValueError, match="no WAN link"):
        lab.impair(host, delay_ms=10)
    with pytest.raises(LabError, match="command failed"):
        lab.exec(host, ["ip", "link", "set", "nonexistent0", "up"])
    assert socket.inet_aton(lab.address(host))
