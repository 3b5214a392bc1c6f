"""The daemon's settings: what ``pilotctl daemon start`` passes, and every bound it enforces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_INBOX_PORTS = (1001,)
START_TIMEOUT = 30.0  # seconds `daemon start` waits for the daemon to be ready
STOP_TIMEOUT = 10.0  # seconds `daemon stop` waits before it kills
LOG_MAX_BYTES = 5 * 1024 * 1024


@dataclass
class DaemonOptions:
    home: Path
    hostname: str | None = None
    beacon: str | None = None  # "HOST:PORT" or "KEYB32@HOST:PORT"
    listen: str = "0.0.0.0:0"  # UDP address of the tunnel endpoint
    inbox_ports: tuple[int, ...] = DEFAULT_INBOX_PORTS  # listened on from the start
    # Messages buffered per listened port or stream before the daemon stops taking more from
    # the tunnel (which then back-pressures the sender).
    inbox_messages: int = 1024
    stream_idle_timeout: float = 600.0  # seconds an IPC stream may go unused before it is aborted
    message_memory: int = 10_000  # handed-out messages remembered for `reply`
