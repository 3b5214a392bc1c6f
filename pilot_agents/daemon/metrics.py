"""Prometheus metrics of a running daemon: ``pilotctl daemon start --metrics HOST:PORT``.

Everything is read when Prometheus scrapes (a custom collector over the numbers ``daemon info``
and ``peers`` already report), so messages pay nothing for it. Per-peer series carry the peer's
node id as the ``peer`` label (stable, unlike a name learnt later); a daemon talks to few peers,
so that stays small.
docs/metrics.md lists every metric with example queries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..net.io.metrics_http import MetricsServer, serve_metrics
from ..node.node import PeerStatus
from .dispatch import Reply

PATHS = ("direct", "relay", "none")
# Per listened port: the field of `daemon info`'s "listening" entry, the metric, what it says.
PORT_METRICS: tuple[tuple[str, type[CounterMetricFamily | GaugeMetricFamily], str, str], ...] = (
    ("received", CounterMetricFamily, "pilot_daemon_port_received_messages",
     "Messages a listened port took from its tunnels"),
    ("buffered", GaugeMetricFamily, "pilot_daemon_port_buffered_messages",
     "Messages waiting in a port's inbox for a client"),
    ("buffered_bytes", GaugeMetricFamily, "pilot_daemon_port_buffered_bytes",
     "Payload bytes waiting in a port's inbox"),
    ("unacked", GaugeMetricFamily, "pilot_daemon_port_unacked_messages",
     "Messages handed out with ack and not acknowledged yet"),
)


class DaemonCollector(Collector):
    """``snapshot``: what ``daemon info`` answers; ``peers``: the Node's tunnels."""

    def __init__(
        self, snapshot: Callable[[], Reply], peers: Callable[[], list[PeerStatus]]
    ) -> None:
        self.snapshot = snapshot
        self.peers = peers

    def collect(self) -> Iterator[Metric]:
        info = self.snapshot()
        peers = self.peers()
        yield from self._tunnels(peers)
        yield from self._ports(info["listening"])
        for name, value, doc in (
            ("streams", info["streams"], "IPC streams open"),
            ("trusted_peers", info["trusted"], "Peers in the trust store"),
            ("pending_trust_requests", info["pending"], "Trust requests awaiting approval"),
            ("uptime_seconds", info["uptime"], "Seconds since the daemon started"),
        ):
            yield GaugeMetricFamily(f"pilot_daemon_{name}", doc, value=value)

    def _tunnels(self, peers: list[PeerStatus]) -> Iterator[Metric]:
        by_path = Counter(p.path for p in peers)
        tunnels = GaugeMetricFamily(
            "pilot_daemon_tunnels", "Tunnels to peers, by path (direct, relay, none)",
            labels=["path"],
        )
        for path in sorted(set(PATHS) | set(by_path)):
            tunnels.add_metric([path], by_path[path])
        yield tunnels
        received = CounterMetricFamily(
            "pilot_daemon_peer_received_bytes",
            "Bytes received from a peer over its current tunnel", labels=["peer"],
        )
        sent = CounterMetricFamily(
            "pilot_daemon_peer_sent_bytes", "Bytes sent to a peer over its current tunnel",
            labels=["peer"],
        )
        rtt = GaugeMetricFamily(
            "pilot_daemon_peer_rtt_seconds", "Smoothed round-trip time to a peer", labels=["peer"]
        )
        for p in peers:
            label = [p.node_id]
            received.add_metric(label, p.bytes_in)
            sent.add_metric(label, p.bytes_out)
            if p.rtt is not None:
                rtt.add_metric(label, p.rtt)
        yield from (received, sent, rtt)

    def _ports(self, listening: list[Reply]) -> Iterator[Metric]:
        families = {
            key: family(name, doc, labels=["port"]) for key, family, name, doc in PORT_METRICS
        }
        for port in listening:
            for key, metric in families.items():
                metric.add_metric([str(port["port"])], port[key])
        yield from families.values()


async def serve(
    listen: str, snapshot: Callable[[], Reply], peers: Callable[[], list[PeerStatus]]
) -> MetricsServer:
    """Serve the daemon's metrics on ``listen`` (HOST:PORT) until closed."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(DaemonCollector(snapshot, peers))
    ProcessCollector(registry=registry)
    return await serve_metrics(listen, lambda: generate_latest(registry), CONTENT_TYPE_LATEST)
