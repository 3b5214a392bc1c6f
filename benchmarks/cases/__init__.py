"""The benchmark cases, by name. A case's module is imported only when the case runs, so a case
whose dependency is missing (or not built yet) reports itself unavailable instead of breaking
the others."""

from __future__ import annotations

from benchmarks.harness import Case, load

CASES: dict[str, str] = {
    "raw-udp": "benchmarks.cases.raw_udp",
    "udp-uvloop": "benchmarks.cases.udp_uvloop",
    "zmq-tcp": "benchmarks.cases.zmq_tcp",
    "zmq-asyncio": "benchmarks.cases.zmq_asyncio",
    "aioquic": "benchmarks.cases.quic",
    "tunnel": "benchmarks.cases.tunnel",
    "tunnel-asyncio": "benchmarks.cases.tunnel_asyncio",
    "core-blocking": "benchmarks.cases.core_blocking",
    "reqrep": "benchmarks.cases.reqrep",
    "daemon": "benchmarks.cases.daemon",
    "daemon-reqrep": "benchmarks.cases.daemon_reqrep",
    "nats": "benchmarks.cases.nats",
}


def load_case(name: str) -> Case:
    """The case called ``name``; raises ImportError when it can't run here."""
    case = load(CASES[name])
    assert isinstance(case, Case)
    return case
