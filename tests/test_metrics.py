"""``--metrics HOST:PORT``: a real beacon process and a real daemon serve Prometheus metrics over
HTTP, and what they report follows the traffic they carry (issue #16)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.beacon_flood import READY, Node
from pilot_agents.identity import key_from_node_id
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.tunnel import wire
from tests.conftest import (
    ROOT,
    cli,
    ipc_call,
    peer_up,
    short_home,
    start_daemon,
    stop_daemons,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(address: str) -> Samples:
    """Every sample at ``http://address/metrics``, by name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def beacon(tmp_path: Path) -> Iterator[tuple[tuple[str, int], bytes, str]]:
    """A beacon process with --metrics: its address, key and metrics address."""
    metrics = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "pilot_agents.cli", "beacon", "--listen", "127.0.0.1:0",
               "--data-dir", str(tmp_path), "--alt-port", "off", "--metrics", metrics]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        match = READY.search(proc.stdout.readline())
        assert match, "the beacon did not start"
        yield (match.group(1), int(match.group(2))), key_from_node_id(match.group(4)), metrics
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_beacon_metrics_follow_registrations_resolves_relay_and_refusals(
    beacon: tuple[tuple[str, int], bytes, str],
) -> None:
    address, key, metrics = beacon
    idle = scrape(metrics)
    assert value(idle, "pilot_beacon_live_nodes") == 0
    assert value(idle, "pilot_beacon_registrations_total") == 0
    assert value(idle, "process_resident_memory_bytes") > 0

    target, requester = Node(address, key, "target"), Node(address, key, None)
    assert target.register() is not None and requester.register() is not None
    assert requester.resolve("target") is not None
    # A DATA packet relayed from the requester to the target, and one from a stranger.
    packet = bytes([wire.DATA]) + bytes(99)
    requester.sock.sendto(bw.encode_relay(target.public, packet), address)
    target.sock.settimeout(5)
    assert target.sock.recv(2048)[0] == bw.RELAYED
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.sendto(bw.encode_relay(target.public, packet), address)
        time.sleep(0.2)

    busy = scrape(metrics)
    assert value(busy, "pilot_beacon_registrations_total") == 2
    assert value(busy, "pilot_beacon_live_nodes") == 2
    assert value(busy, "pilot_beacon_names") == 1
    assert value(busy, "pilot_beacon_resolves_total") == 1
    assert value(busy, "pilot_beacon_relayed_packets_total") == 1
    assert value(busy, "pilot_beacon_relayed_bytes_total") == len(packet)
    assert value(busy, "pilot_beacon_refusals_total", reason="relay_not_registered") == 1
    # The name was claimed in the store, and the call was timed.
    assert value(busy, "pilot_beacon_store_seconds_count", op="claim_name") == 1
    assert value(busy, "pilot_beacon_uptime_seconds") > value(idle, "pilot_beacon_uptime_seconds")


def test_metrics_endpoint_answers_only_get_metrics(
    beacon: tuple[tuple[str, int], bytes, str],
) -> None:
    metrics = beacon[2]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{metrics}/other", timeout=10)
    assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as post:
        urllib.request.urlopen(f"http://{metrics}/metrics", data=b"x", timeout=10)
    assert post.value.code == 405
    # A client that connects and says nothing does not hold up the next scrape.
    with socket.create_connection(("127.0.0.1", int(metrics.rpartition(":")[2]))):
        assert value(scrape(metrics), "pilot_beacon_live_nodes") == 0


def test_beacon_metrics_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "pilot_agents.cli", "beacon", "--listen", "127.0.0.1:0",
             "--data-dir", str(tmp_path), "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, cwd=ROOT, timeout=30,
        )
    assert result.returncode == 2
    assert f"--metrics: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_daemon_metrics_follow_tunnels_and_messages() -> None:
    homes = [short_home(), short_home()]
    metrics = f"127.0.0.1:{free_port()}"
    try:
        a = start_daemon(homes[0], "alpha", "--metrics", metrics)
        b = start_daemon(homes[1], "beta")
        before = scrape(metrics)
        assert value(before, "pilot_daemon_tunnels", path="direct") == 0
        assert value(before, "pilot_daemon_port_received_messages_total", port="1001") == 0
        peer_up(a, b)
        assert ipc_call(b.home, cmd="send", target="alpha", port=1001, data="hello")["ok"]
        deadline = time.monotonic() + 10
        while True:
            after = scrape(metrics)
            if value(after, "pilot_daemon_port_received_messages_total", port="1001") == 1:
                break
            assert time.monotonic() < deadline, "the message never counted"
            time.sleep(0.05)
        assert value(after, "pilot_daemon_tunnels", path="direct") == 1
        assert value(after, "pilot_daemon_port_buffered_messages", port="1001") == 1
        assert value(after, "pilot_daemon_peer_received_bytes_total", peer=b.node_id) > 0
        assert value(after, "pilot_daemon_peer_sent_bytes_total", peer=b.node_id) > 0
        assert value(after, "pilot_daemon_trusted_peers") == 1
        assert value(after, "process_resident_memory_bytes") > 0
    finally:
        stop_daemons(*homes)


def test_daemon_metrics_port_in_use_stops_the_start_with_a_one_line_error() -> None:
    home = short_home()
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = cli(home, "daemon", "start", "--listen", "127.0.0.1:0",
                         "--metrics", f"127.0.0.1:{port}")
        assert result.returncode != 0
        assert f"--metrics: cannot listen on 127.0.0.1:{port}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        stop_daemons(home)
