"""Prometheus metrics of a running beacon: ``pilot-agents beacon --metrics HOST:PORT``.

The counters are the ones :class:`~pilot_agents.beacon.server.BeaconStats` keeps anyway; they
are read when Prometheus scrapes (a custom collector), so the packet path pays nothing for them.
Only calls to the store are timed as they happen (a histogram per operation), and they are off
the refresh path: a refresh under the same name needs no trip to the store for names (a store
shared by a fleet gets one publication per refresh).
docs/metrics.md lists every metric with example queries.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterator
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..net.io.metrics_http import MetricsServer, serve_metrics
from .server import BeaconServer
from .store import Claim, Found, NameLimits, Registration, RelayTarget, Store

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
    ("guests", "Nodes of other beacons of the fleet that attached here as guests"),
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


class TimedStore:
    """A :class:`Store` that times every call of the one it wraps. A synchronous store stays
    synchronous: the wrapper awaits only the inner call."""

    def __init__(self, inner: Store, seconds: Histogram) -> None:
        self._inner = inner
        self._seconds = seconds

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await call
        finally:
            self._seconds.labels(op).observe(time.perf_counter() - start)

    @property
    def synchronous(self) -> bool:
        return self._inner.synchronous

    def describe(self) -> str:
        return self._inner.describe()

    async def claim_name(
        self, name: str, key: bytes, now_ns: int, source: str, limits: NameLimits
    ) -> Claim:
        return await self._timed(
            "claim_name", self._inner.claim_name(name, key, now_ns, source, limits)
        )

    async def find_name(self, name: str) -> Found:
        return await self._timed("find_name", self._inner.find_name(name))

    async def find_key(self, key: bytes, guest_at: str | None = None) -> Found:
        return await self._timed("find_key", self._inner.find_key(key, guest_at))

    async def publish(self, registration: Registration, ttl: float) -> None:
        await self._timed("publish", self._inner.publish(registration, ttl))

    async def publish_guest(self, guest: Registration, ttl: float) -> None:
        await self._timed("publish_guest", self._inner.publish_guest(guest, ttl))

    async def expire_names(self, unused_since_ns: int) -> int:
        return await self._timed("expire_names", self._inner.expire_names(unused_since_ns))

    async def name_count(self) -> int:
        return await self._timed("name_count", self._inner.name_count())

    async def block_relay(self, receiver: bytes, sender: bytes, until_ns: int) -> None:
        await self._timed("block_relay", self._inner.block_relay(receiver, sender, until_ns))

    async def relay_target(self, key: bytes, guest_at: str | None = None) -> RelayTarget:
        return await self._timed("relay_target", self._inner.relay_target(key, guest_at))

    async def aclose(self) -> None:
        await self._inner.aclose()


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
    server.registry = TimedStore(server.registry, seconds)
    registry.register(BeaconCollector(service))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, process_resident_memory_bytes
    return registry


async def serve(listen: str, service: Observed) -> MetricsServer:
    """Serve ``service``'s metrics on ``listen`` (HOST:PORT) until closed."""
    registry = registry_for(service)
    return await serve_metrics(listen, lambda: generate_latest(registry), CONTENT_TYPE_LATEST)
