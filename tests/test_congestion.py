"""Congestion controllers end to end on the simulated network: two tunnels over a bottleneck
(2.5 MB/s, a queue of one bandwidth-delay product, 25 ms each way), a fake clock, seeded loss.

Throughput here is simulated time, so it is exact and reproducible; the NAT-lab benchmark
(benchmarks/natlab_loss.py) measures the real thing.
"""

from __future__ import annotations

import pytest

from pilot_agents.errors import ConfigError
from pilot_agents.net.tunnel.bbr import PROBE_BW, Bbr
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.net.tunnel.congestion import ALGORITHMS, CongestionConfig, NewReno
from pilot_agents.net.tunnel.cubic import Cubic
from pilot_agents.net.tunnel.recovery import Recovery, new_controller
from tests.simnet import Bottleneck, Host, LinkProfile, SimNetwork

RATE = 2.5e6  # bytes per second through the bottleneck
DELAY = 0.025  # seconds each way
BDP = int(RATE * 2 * DELAY)


def config(algorithm: str) -> SessionConfig:
    return SessionConfig(mtu_probe_sizes=(), congestion=CongestionConfig(algorithm=algorithm))


def bottlenecked(algorithm: str, loss: float, seed: int = 1) -> tuple[SimNetwork, Host, Host]:
    net = SimNetwork(seed, LinkProfile(delay=DELAY, loss=loss))
    a, b = net.pair(config(algorithm))
    net.bottleneck = Bottleneck(RATE, BDP, frozenset({a.address}))
    return net, a, b


def transfer_rate(algorithm: str, loss: float, size: int = 4 << 20) -> float:
    """Bytes per simulated second for one ``size``-byte message, handshake included."""
    net, a, b = bottlenecked(algorithm, loss)
    net.start_stream(a, b, 1, bytes(size))
    assert net.run_until(lambda: len(b.messages) == 1, 300), f"{algorithm} stalled at {loss}"
    assert b.messages[0].data == bytes(size)
    return size / net.now


def test_default_is_bbr_and_recovery_builds_what_config_names() -> None:
    assert SessionConfig().congestion.algorithm == "bbr"
    assert isinstance(new_controller(), NewReno)  # RFC 9002's, for a bare Recovery
    kinds = {"newreno": NewReno, "cubic": Cubic, "bbr": Bbr}
    for name in ALGORITHMS:
        cc = Recovery(congestion=CongestionConfig(algorithm=name)).cc
        assert type(cc) is kinds[name]
    with pytest.raises(ConfigError, match="newreno"):
        CongestionConfig(algorithm="vegas")


@pytest.mark.parametrize("loss", [0.0, 0.01, 0.05])
def test_every_controller_delivers_under_random_loss(loss: float) -> None:
    rates = {name: transfer_rate(name, loss) for name in ALGORITHMS}
    # Loss-free, all three fill most of the bottleneck.
    if loss == 0.0:
        assert min(rates.values()) > 0.6 * RATE, rates
    else:
        # Random loss is not congestion to BBR; NewReno and CUBIC cut their windows for it.
        assert rates["bbr"] > 0.6 * RATE, rates
        assert rates["bbr"] > 5 * rates["newreno"], rates
        assert rates["cubic"] >= 0.9 * rates["newreno"], rates


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_overflowing_queue_bounds_the_window(algorithm: str) -> None:
    """A bulk transfer through a queue of half a BDP: the sender settles near the bottleneck
    rate, losing few packets, with the window around BDP + queue rather than growing on."""
    net = SimNetwork(2, LinkProfile(delay=DELAY))
    a, b = net.pair(config(algorithm))
    net.bottleneck = Bottleneck(RATE, BDP // 2, frozenset({a.address}))
    session, _ = net.start_stream(a, b, 1, *[bytes(64 << 10)] * 160)  # 10 MiB
    assert net.run_until(lambda: len(b.messages) == 160, 60)
    assert 10 * 2**20 / net.now > 0.7 * RATE
    cc = session._recovery.cc
    assert cc.congestion_window < 3 * BDP, cc
    assert net.bottleneck is not None
    assert session.stats.packets_lost < 0.05 * session.stats.packets_sent
    if isinstance(cc, Bbr):
        assert cc.mode == PROBE_BW and 0.7 * RATE < cc.btl_bw < 1.1 * RATE, cc
        assert 2 * DELAY <= cc.min_rtt < 2 * DELAY + 0.005, cc


def two_flows(algorithm: str, queue: int, seconds: float = 10.0) -> tuple[float, float]:
    """Two tunnels through one bottleneck with a ``queue``-byte buffer, the second starting a
    second later; each one's rate over ``seconds`` once both run."""
    net = SimNetwork(7, LinkProfile(delay=DELAY))
    hosts = [net.add_host(name, config(algorithm)) for name in "abcd"]
    pairs = [(hosts[0], hosts[1]), (hosts[2], hosts[3])]
    for x, y in pairs:
        x.mux.trust(y.key)
        y.mux.trust(x.key)
        x.mux.session(y.key, net.now).address = y.address
    net.bottleneck = Bottleneck(RATE, queue, frozenset({hosts[0].address, hosts[2].address}))
    chunk = bytes(64 << 10)
    count = int(RATE * (seconds + 4) / len(chunk))
    net.start_stream(*pairs[0], 1, *[chunk] * count)
    net.run_for(1.0)
    net.start_stream(*pairs[1], 1, *[chunk] * count)
    net.run_for(2.0)
    before = [len(y.messages) for _, y in pairs]
    net.run_for(seconds)
    first, second = (
        (len(y.messages) - n) * len(chunk) / seconds
        for (_, y), n in zip(pairs, before, strict=True)
    )
    return first, second


@pytest.mark.parametrize(
    ("algorithm", "queue"),
    [(name, BDP) for name in ALGORITHMS] + [("newreno", BDP // 2), ("bbr", BDP // 2)],
)
def test_two_flows_share_a_bottleneck_within_2x(algorithm: str, queue: int) -> None:
    first, second = two_flows(algorithm, queue)
    assert first + second > 0.8 * RATE, (first, second)
    assert max(first, second) < 2 * min(first, second), (first, second)


def test_app_limited_samples_do_not_lower_the_bandwidth_estimate() -> None:
    """After a bulk transfer taught BBR the path, a trickle of small messages (app-limited:
    the rate samples measure the application) must not drag the estimate down, nor may the
    window grow while it is not used."""
    net, a, b = bottlenecked("bbr", 0.0)
    session, stream = net.start_stream(a, b, 1, bytes(2 << 20))
    assert net.run_until(lambda: len(b.messages) == 1, 60)
    cc = session._recovery.cc
    assert isinstance(cc, Bbr)
    learned = cc.btl_bw
    window = cc.congestion_window
    assert learned > 0.7 * RATE
    for _ in range(40):  # 1 kB every 50 ms: 20 kB/s, under 1 % of the path
        session.send_message(stream, bytes(1000))
        net.flush(a)
        net.run_for(0.05)
    assert net.run_until(lambda: len(b.messages) == 41, 10)
    assert cc.btl_bw > 0.7 * learned, cc
    assert cc.congestion_window <= window + 4 * 1200, cc


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_stall_after_a_blackout(algorithm: str) -> None:
    """Every packet dropped for two seconds (persistent congestion to RFC 9002): each controller
    resumes and finishes once the link is back."""
    net, a, b = bottlenecked(algorithm, 0.0)
    net.start_stream(a, b, 1, bytes(4 << 20))
    net.run_for(0.8)
    net.profile.loss = 1.0
    net.run_for(2.0)
    net.profile.loss = 0.0
    assert net.run_until(lambda: len(b.messages) == 1, 60), algorithm
    assert b.messages[0].data == bytes(4 << 20)
