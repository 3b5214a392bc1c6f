"""The daemon's settings: what ``pilotctl daemon start`` passes, and every bound it enforces."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..transport import UNREAD_REPLIES_TIMEOUT

DEFAULT_INBOX_PORTS = (1001,)
START_TIMEOUT = 30.0  # seconds `daemon start` waits for the daemon to be ready
STOP_TIMEOUT = 10.0  # seconds `daemon stop` waits before it kills
LOG_MAX_BYTES = 5 * 1024 * 1024


@dataclass
class DaemonOptions:
    home: Path
    hostname: str | None = None
    beacon: str | None = None  # "HOST:PORT" or "KEYB32@HOST:PORT"; a fleet's: comma-separated
    listen: str = "0.0.0.0:0"  # UDP address of the tunnel endpoint
    inbox_ports: tuple[int, ...] = DEFAULT_INBOX_PORTS  # listened on from the start
    metrics: str | None = None  # HOST:PORT serving Prometheus metrics (docs/metrics.md); None: off
    # -- inboxes: messages waiting in the daemon for a client --------------------------------
    # A listened port's (or a stream's) inbox takes messages from the tunnel while it holds fewer
    # than inbox_messages messages and fewer than inbox_bytes payload bytes (so it can overshoot
    # by one message); when full it takes no more, and the tunnel's flow control holds the sender.
    # Messages handed out with "ack": true count until acknowledged.
    inbox_messages: int = 1024
    inbox_bytes: int = 16 * 1024 * 1024
    stream_idle_timeout: float = 600.0  # seconds an IPC stream may go unused before it is aborted
    # IPC streams ('connect') open at once, all clients together: each may hold an inbox and a
    # send buffer, so one more is refused (BusyError) until another closes.
    max_streams: int = 4096
    # Handed-out messages remembered for `requeue` and `ack` (their id and inbox; payloads only
    # within requeue_memory_bytes). `reply` does not depend on it: a message can be replied to
    # as long as the stream it came on is open (docs/ipc.md, Messages).
    message_memory: int = 10_000
    # Payload bytes of recently handed-out messages kept so `requeue` can put them back (a client
    # that gave up waiting hands its late reply back at once); the oldest are forgotten first.
    requeue_memory_bytes: int = 8 * 1024 * 1024
    ack_wait: float = 30.0  # seconds a message received with "ack": true waits for its `ack`
    # Seconds a client's reply may wait for room on a stream whose peer reads none of it; then
    # the stream is reset (the requester stopped reading), and the reply fails.
    unread_replies_timeout: float = UNREAD_REPLIES_TIMEOUT
    # -- the local API ---------------------------------------------------------------------------
    max_request_bytes: int = 16 * 1024 * 1024  # a larger request is refused (BadRequestError)
    # A message's payload frame (docs/ipc.md, Framing): larger is refused. The tunnel's own
    # largest message (TunnelConfig.max_message_size) is 64 MiB.
    max_payload_bytes: int = 64 * 1024 * 1024
    max_request_depth: int = 4  # nesting of arrays/objects in a request (requests are flat)
    # Replies (and requests) ZeroMQ queues per client (its SNDHWM/RCVHWM): a client that does
    # not read its replies loses those beyond this, instead of growing the daemon.
    client_queue_messages: int = 1000
    # Connections to the stream socket at once (an SDK Client is one, and each data socket
    # of its streams and ports one more): one more gets its first request answered BusyError
    # and is closed. Kept below the open-file limit, which the daemon raises at start as far
    # as this needs, up to the hard limit (docs/ipc.md, The stream socket).
    max_clients: int = 8192
    # Requests of one client the daemon works on at once; more are refused with BusyError, so one
    # client cannot crowd out the others.
    client_max_requests: int = 256

    def to_json(self) -> str:
        """The options for a daemon started in another process (``python -m
        pilot_agents.daemon --options JSON``)."""
        fields = dataclasses.asdict(self)
        fields["home"] = str(self.home)
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> DaemonOptions:
        fields = json.loads(text)
        fields["home"] = Path(fields["home"])
        fields["inbox_ports"] = tuple(fields["inbox_ports"])
        return cls(**fields)
