"""Errors the daemon reports for the beacon's refusals (issue #11, item 16)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.conftest import short_home, start_daemons, stop_daemons
from tests.test_cli import start_beacon


@pytest.fixture
def beacon_daemon(tmp_path: Path) -> Iterator[Path]:
    proc, address = start_beacon(tmp_path / "beacon")
    home = short_home()
    try:
        start_daemons((home, "asker"), extra=("--beacon", address))
        yield home
    finally:
        stop_daemons(home)
        proc.terminate()
        proc.wait(timeout=10)


def test_rate_limited_resolve_is_a_beacon_error(beacon_daemon: Path) -> None:
    """The beacon answers at most a burst of resolves per node; the rest are refused as rate
    limited. That is the beacon's refusal (BeaconError, exit 11), not an unknown host (exit 5):
    the name exists."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 15000)
    sock.connect(f"ipc://{beacon_daemon}/daemon.sock")
    try:
        count = 160  # over the beacon's burst of 100 resolves, under its per-address limit
        for i in range(count):
            sock.send(json.dumps({"cmd": "resolve", "name": "asker", "id": i}).encode())
        replies = [json.loads(sock.recv()) for _ in range(count)]
    finally:
        sock.close()
        ctx.destroy(linger=0)
    errors = [r["error"] for r in replies if not r["ok"]]
    assert any(r["ok"] for r in replies)
    assert errors, "the beacon refused none: its limits changed?"
    assert {e["type"] for e in errors} == {"BeaconError"}, errors[:3]
    assert all("rate limited" in e["message"] for e in errors), errors[:3]
