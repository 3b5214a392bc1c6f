"""The pattern benchmark cases, by name: ``module`` (its ``CASE``) or ``module:ATTRIBUTE``. A
case's module is imported only in the processes that run it, so a case whose client library is
missing reports itself unavailable instead of breaking the others."""

from __future__ import annotations

CASES: dict[str, str] = {
    "embedded": "benchmarks.patterns_cases.ours:EMBEDDED",
    "daemon": "benchmarks.patterns_cases.ours:DAEMON",
    "pyzmq": "benchmarks.patterns_cases.pyzmq",
    "zenoh": "benchmarks.patterns_cases.zenoh_peer",
    "nats-py": "benchmarks.patterns_cases.nats_py",
    "redis-py": "benchmarks.patterns_cases.redis_py",
    "floor-c": "benchmarks.patterns_cases.floor:FLOOR_C",
    "floor-py": "benchmarks.patterns_cases.floor:FLOOR_PY",
    "floor-node": "benchmarks.patterns_cases.floor:FLOOR_NODE",
    "floor-embedded": "benchmarks.patterns_cases.floor_embedded",
}
OURS = ("embedded", "daemon")
