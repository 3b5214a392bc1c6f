"""The round-trip benchmark's own cases keep working: pilot-agents' cases and the floors they
are read against, each run through the real harness (a process per role) in tiny sizes, both
kinds (bulk and round trips), checked for every round trip and every byte. Nothing here
asserts a speed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.harness import BulkResult, Params, RttResult
from benchmarks.runner import run_pair

TINY = Params(bulk_bytes=256 * 1024, rtt_warmup=5, rtt_count=20, wait=30.0, bulk_wait=60.0)


@pytest.mark.parametrize("case", ["udp-uvloop", "core-blocking", "tunnel", "reqrep"])
def test_a_case_measures_every_round_trip_and_moves_every_byte(case: str, tmp_path: Path) -> None:
    p = replace(TINY, workdir=str(tmp_path))
    rtt = run_pair(case, "rtt", p)
    assert isinstance(rtt, RttResult) and len(rtt.samples_ns) == TINY.rtt_count
    bulk = run_pair(case, "bulk", p)
    assert isinstance(bulk, BulkResult) and bulk.sent >= TINY.bulk_bytes
    if case != "udp-uvloop":  # a datagram blast, unreliable by design: its loss is its note
        assert bulk.delivered == bulk.sent
