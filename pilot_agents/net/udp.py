"""Reading a non-blocking UDP socket in batches, shared by the node's endpoint and the beacon.

asyncio's datagram transport reads one datagram per loop iteration, which caps throughput; a
readiness callback that drains up to a batch instead keeps up with a full window.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("pilot_agents.udp")

MAX_DATAGRAM = 65535
READ_BATCH = 256  # datagrams per readiness callback before yielding to other tasks

Address = tuple[str, int]


def read_batch(sock: socket.socket, limit: int = READ_BATCH) -> list[tuple[bytes, Address]]:
    """Up to ``limit`` datagrams waiting on ``sock``, with their (host, port) senders."""
    batch: list[tuple[bytes, Address]] = []
    for _ in range(limit):
        try:
            data, address = sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            # ICMP errors from earlier sends surface here on Linux: nothing to read, go on.
            log.debug("recvfrom: %s", exc)
            continue
        batch.append((data, (address[0], address[1])))
    return batch
