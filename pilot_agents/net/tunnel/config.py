"""Settings of the tunnel core, one dataclass, every unit in the name or the comment.

Tests set fields on an instance; nothing reads module globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .congestion import CongestionConfig
from .paths import PathConfig
from .ratelimit import HandshakeLimits
from .recovery import RecoveryConfig

MiB = 1024 * 1024


@dataclass
class SessionConfig:
    max_packet_size: int = 1200  # bytes of a data datagram before path MTU probing raises it
    # Datagram sizes tried in turn once the tunnel is up (DPLPMTUD, RFC 8899): Ethernet, jumbo
    # frames, and loopback/jumbo-capable paths. A lost probe ends the climb. () disables it.
    mtu_probe_sizes: tuple[int, ...] = (1452, 8952, 16384)
    # Receiving. What a tunnel holds for an application that does not read is bounded by
    # connection_window (stream bytes: messages not yet taken, partial messages, out-of-order
    # data), plus the overhead part of connection_delivery_window; while a message larger than
    # the windows arrives, that message (up to max_message_size) and one more connection_window.
    # docs/protocol.md, "Flow control", has the accounting.
    stream_window: int = 16 * MiB  # bytes a peer may send on one stream ahead of our reader
    connection_window: int = 64 * MiB  # the same, summed over all streams of the tunnel
    # bytes; a larger incoming message resets its stream as soon as its header arrives. One
    # stream at a time may receive a message larger than the windows (it is handed over whole).
    max_message_size: int = 64 * MiB
    # bytes charged per message handed to the application and not yet taken, beyond its length
    # and 8-byte header: the Python objects that carry it (bytes object ~33, the event ~80,
    # the node's Message and its inbox entry ~200), as tests/test_node_flow.py measures.
    message_overhead: int = 320
    # bytes (each message charged length + 8 + message_overhead) handed to the application
    # ahead of what it has taken, per stream and per tunnel; further whole messages wait in
    # the stream buffers, where they count against the windows above.
    stream_delivery_window: int = 1 * MiB
    connection_delivery_window: int = 4 * MiB
    # holes (separate out-of-order ranges) in all of a tunnel's stream buffers before the peer
    # is judged hostile and the tunnel closed: each costs a range entry (~100 bytes). A real
    # sender makes one per lost packet still missing.
    max_reassembly_gaps: int = 16384
    max_incoming_streams: int = 1024  # concurrently open streams the peer may open
    # ... of them to one port: one port whose reader is behind (its one-shot messages wait,
    # a stream each) must not take every stream the peer may open, or the peer reaches none of
    # our other ports; the streams beyond it are reset (PORT_BUSY) while the rest stay free.
    max_incoming_streams_per_port: int = 512
    ack_every: int = 2  # ack-eliciting packets received before an ACK is sent at once
    max_ack_delay: float = 0.025  # seconds an ACK may be held back
    keepalive_interval: float = 15.0  # seconds without sending before a PING; holds NAT mappings
    idle_timeout: float = 60.0  # seconds without hearing from the peer before the tunnel dies
    max_probe_timeouts: int = 8  # consecutive unanswered PTOs before the peer is declared dead
    handshake_timeout: float = 10.0  # seconds to establish the first keys before giving up
    handshake_retry: float = 0.25  # seconds before the first resend of an initiation; doubles
    handshake_retry_max: float = 2.0  # seconds, cap of the doubling
    rekey_after_time: float = 120.0  # seconds a key is used before a new handshake
    reject_after_time: float = 180.0  # seconds after which a key is never used again
    rekey_after_packets: int = 2**60  # packets sent with one key before a new handshake
    reject_after_packets: int = 2**64 - 2**13 - 1  # packets after which a key is never used
    replay_window: int = 8192  # packet numbers remembered below the highest received
    # The probe timer stops doubling at 8x, so max_probe_timeouts unanswered probes take about
    # 40 PTO periods (2 s on a LAN, ~15 s at 300 ms): a dead peer is reported in bounded time.
    recovery: RecoveryConfig = field(
        default_factory=lambda: RecoveryConfig(max_pto_backoff_exponent=3)
    )
    # BBR: loss on a Wi-Fi or mobile hop is not congestion to it (docs/protocol.md, "Congestion
    # control"); "cubic" and "newreno" are the loss-based alternatives.
    congestion: CongestionConfig = field(
        default_factory=lambda: CongestionConfig(algorithm="bbr")
    )
    paths: PathConfig = field(default_factory=PathConfig)
    handshakes: HandshakeLimits = field(default_factory=HandshakeLimits)
