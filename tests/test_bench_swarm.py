"""The beacon swarm benchmark keeps working: a tiny swarm (real beacon process, generator
processes, signed messages on loopback) and a tiny relay run, through the same code as the full
measurement. Nothing here asserts a speed."""

from __future__ import annotations

import pytest

from benchmarks import beacon_swarm


# Two workers: nodes resolve, introduce and relay to nodes the other worker holds, via Redis.
@pytest.mark.parametrize("scale", [[], ["--workers", "2"]], ids=["one process", "two workers"])
def test_tiny_swarm_gets_every_answer_and_the_relay_delivers(scale: list[str]) -> None:
    args = beacon_swarm.parse_args([
        "--nodes", "60", "--per-ip", "5", "--processes", "2", "--rates", "30",
        "--seconds", "2", "--relay-pairs", "3", "--relay-rate", "3000", "--relay-seconds", "1",
        "--relay-gso", "8", *scale,
    ])
    result = beacon_swarm.measure(args)
    [(rate, generators, beacon)] = result["steps"]
    assert rate == 30
    for kind in ("register", "resolve", "introduce"):
        assert generators["sent"][kind] > 0
        assert generators["answered"][kind] == generators["sent"][kind], (kind, generators)
    assert len(generators["latencies_us"]["register"]) == generators["sent"]["register"]
    assert beacon["nodes"] == 60 and beacon["rss"] > 0 and beacon["refusals"] == {}
    relay = result["relay"]
    assert relay["sent"] > 0 and relay["delivered"] == relay["relayed"] > 0
