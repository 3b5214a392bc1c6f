"""Prometheus metrics of a running beacon: ``pilot-agents beacon --metrics HOST:PORT``.

The counters are the ones :class:`~pilot_agents.beacon.server.BeaconStats` keeps anyway; they
are read when Prometheus scrapes (a custom collector), so the packet path pays nothing for them.
Only calls to the name store are timed as they happen (a histogram per operation), and they are
off the refresh path: a refresh under the same name needs no trip to the store.
docs/metrics.md lists every metric with example queries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..net.io.metrics_http import MetricsServer, serve_metrics
from .server import BeaconServer
from .store import Registry

T = TypeVar("T")

# Store operations take from tens of microseconds (a cached SELECT) to milliseconds (a commit).
STORE_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0)

COUNTERS = (
    ("registrations", "New registrations (not refreshes) accepted"),
    ("refreshes", "Refreshes of a live registration accepted (moves included)"),
    ("resolves", "RESOLVE requests answered"),
    ("introductions", "Introductions made (each sends to both nodes)"),
    ("relayed_packets", "Packets relayed between registered nodes"),
    ("relayed_bytes", "Payload bytes relayed between registered nodes"),
    ("stun_requests", "STUN Binding requests parsed"),
    ("status_requests", "STATUS requests answered"),
)
GAUGES = (
    ("registered_nodes", "live_nodes", "Nodes with a live registration"),
    ("names", "names", "Hostnames held in the name store"),
    ("relay_pairs", "relay_pairs", "Relayed (sender, receiver) pairs seen within relay_idle"),
    ("relay_blocks", "relay_blocks", "Relay blocks in force (BLOCK_RELAY)"),
    ("uptime_s", "uptime_seconds", "Seconds since the beacon started"),
)


class Observed(Protocol):
    """What the metrics read of a running beacon (:class:`~.service.BeaconService`)."""

    server: BeaconServer

    @property
    def send_errors(self) -> int: ...

    def status(self) -> dict[str, Any]: ...


class BeaconCollector(Collector):
    """The beacon's counters, read at scrape time."""

    def __init__(self, service: Observed) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        status = self.service.status()
        for name, doc in COUNTERS:
            yield CounterMetricFamily(f"pilot_beacon_{name}", doc, value=status[name])
        refusals = CounterMetricFamily(
            "pilot_beacon_refusals",
            "Requests refused or dropped, by reason (docs/metrics.md lists the reasons)",
            labels=["reason"],
        )
        for reason, count in sorted(self.service.server.stats.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        yield CounterMetricFamily(
            "pilot_beacon_send_errors",
            "Datagrams the beacon could not send (a full socket buffer)",
            value=self.service.send_errors,
        )
        for key, name, doc in GAUGES:
            yield GaugeMetricFamily(f"pilot_beacon_{name}", doc, value=status[key])


class TimedRegistry:
    """A :class:`Registry` that times every call of the one it wraps."""

    def __init__(self, inner: Registry, seconds: Histogram) -> None:
        self._inner = inner
        self._seconds = seconds

    def _timed(self, op: str, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return call()
        finally:
            self._seconds.labels(op).observe(time.perf_counter() - start)

    def owner(self, name: str) -> bytes | None:
        return self._timed("owner", lambda: self._inner.owner(name))

    def claim(self, name: str, key: bytes, now_ns: int, source: str) -> bytes:
        return self._timed("claim", lambda: self._inner.claim(name, key, now_ns, source))

    def names_of(self, key: bytes) -> list[str]:
        return self._timed("names_of", lambda: self._inner.names_of(key))

    def claimed_from(self, source: str) -> int:
        return self._timed("claimed_from", lambda: self._inner.claimed_from(source))

    def touch(self, name: str, now_ns: int) -> None:
        self._timed("touch", lambda: self._inner.touch(name, now_ns))

    def release(self, name: str) -> None:
        self._timed("release", lambda: self._inner.release(name))

    def expire(self, unused_since_ns: int) -> int:
        return self._timed("expire", lambda: self._inner.expire(unused_since_ns))

    def count(self) -> int:
        return self._timed("count", self._inner.count)

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        # Whatever else a store offers passes through untimed.
        return getattr(self._inner, name)


def registry_for(service: Observed) -> CollectorRegistry:
    """A Prometheus registry of ``service``'s metrics; times its name store from now on."""
    registry = CollectorRegistry(auto_describe=True)
    seconds = Histogram(
        "pilot_beacon_store_seconds",
        "Seconds a call to the name store took, by operation",
        ["op"],
        registry=registry,
        buckets=STORE_BUCKETS,
    )
    server = service.server
    server.registry = TimedRegistry(server.registry, seconds)
    registry.register(BeaconCollector(service))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes
    return registry


async def serve(listen: str, service: Observed) -> MetricsServer:
    """Serve ``service``'s metrics on ``listen`` (HOST:PORT) until closed."""
    registry = registry_for(service)
    return await serve_metrics(listen, lambda: generate_latest(registry), CONTENT_TYPE_LATEST)
