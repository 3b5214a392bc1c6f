"""Userspace delay line for the NAT lab (this kernel has no ``netem`` qdisc).

Runs inside the lab's ``inet`` router namespace. Policy routing sends the packets of impaired links
into the tun device named on the command line; this process reads each IPv4 packet, decides from its
source and destination address which link(s) it crosses, drops it by a seeded RNG, holds it for the
link's delay (plus jitter, plus an extra gap for "reordered" packets so later ones overtake it) and
writes it back into the same tun device. A written packet arrives in the kernel as received on the
tun device, where a higher-priority rule (``iif TUN lookup main``) routes it on normally, so every
packet passes through here at most once.

Control: one JSON object per line on stdin, one JSON reply per line on stdout.
  {"op": "set", "link": NAME, "addrs": [IP, ...], "up": PARAMS|null, "down": PARAMS|null}
  {"op": "clear", "link": NAME}
  {"op": "stats"}
PARAMS = {"delay_ms", "jitter_ms", "loss", "reorder", "reorder_gap_ms", "seed"}.
"up" applies to packets whose source is one of the link's addresses (entering the internet from
the link), "down" to packets whose destination is. EOF on stdin ends the process, so a crashed test
never leaves a delay line behind.

Standard library only: it is started as a script with the venv's interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import heapq
import json
import os
import random
import select
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # raw IP packets, no 4-byte packet-info header
MAX_READS_PER_ROUND = 512  # so a flood cannot starve due releases


@dataclass
class Direction:
    delay_s: float
    jitter_s: float
    loss: float
    reorder: float
    reorder_gap_s: float
    rng: random.Random

    @classmethod
    def from_params(cls, params: dict[str, Any], link: str, direction: str) -> Direction:
        seed = params.get("seed", 0)
        return cls(
            delay_s=float(params.get("delay_ms", 0.0)) / 1000.0,
            jitter_s=float(params.get("jitter_ms", 0.0)) / 1000.0,
            loss=float(params.get("loss", 0.0)),
            reorder=float(params.get("reorder", 0.0)),
            reorder_gap_s=float(params.get("reorder_gap_ms", 10.0)) / 1000.0,
            # A string seed is hashed deterministically (not by PYTHONHASHSEED), and each
            # link+direction gets its own stream so impairing one link doesn't shift another's.
            rng=random.Random(f"{seed}:{link}:{direction}"),
        )

    def decide(self) -> float | None:
        """Seconds to hold the packet, or None to drop it."""
        if self.loss and self.rng.random() < self.loss:
            return None
        hold = self.delay_s
        if self.jitter_s:
            hold += self.rng.uniform(0.0, self.jitter_s)
        if self.reorder and self.rng.random() < self.reorder:
            hold += self.reorder_gap_s
        return hold


@dataclass
class Link:
    name: str
    addrs: set[bytes]
    up: Direction | None
    down: Direction | None
    stats: dict[str, int] = field(
        default_factory=lambda: {"up_in": 0, "up_drop": 0, "down_in": 0, "down_drop": 0}
    )


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
    fcntl.ioctl(fd, TUNSETIFF, ifr)
    return fd


class DelayLine:
    def __init__(self, tun_fd: int) -> None:
        self.tun_fd = tun_fd
        self.links: dict[str, Link] = {}
        self.by_addr: dict[bytes, Link] = {}
        self.heap: list[tuple[float, int, bytes]] = []
        self.seq = 0  # tie-breaker: equal release times keep arrival order
        self.passed_unmatched = 0

    def _reindex(self) -> None:
        self.by_addr = {a: link for link in self.links.values() for a in link.addrs}

    def control(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "set":
            name = str(msg["link"])
            self.links[name] = Link(
                name=name,
                addrs={bytes(map(int, a.split("."))) for a in msg["addrs"]},
                up=Direction.from_params(msg["up"], name, "up") if msg.get("up") else None,
                down=Direction.from_params(msg["down"], name, "down") if msg.get("down") else None,
            )
            self._reindex()
            return {"ok": True}
        if op == "clear":
            self.links.pop(str(msg["link"]), None)
            self._reindex()
            return {"ok": True}
        if op == "stats":
            return {
                "ok": True,
                "links": {n: link.stats for n, link in self.links.items()},
                "queued": len(self.heap),
                "unmatched": self.passed_unmatched,
            }
        return {"error": f"unknown op {op!r}"}

    def packet(self, pkt: bytes, now: float) -> None:
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            self._schedule(pkt, now)  # not IPv4: pass straight through
            return
        src_link = self.by_addr.get(pkt[12:16])
        dst_link = self.by_addr.get(pkt[16:20])
        hold = 0.0
        matched = False
        if src_link is not None and src_link.up is not None:
            matched = True
            src_link.stats["up_in"] += 1
            h = src_link.up.decide()
            if h is None:
                src_link.stats["up_drop"] += 1
                return
            hold += h
        if dst_link is not None and dst_link.down is not None:
            matched = True
            dst_link.stats["down_in"] += 1
            h = dst_link.down.decide()
            if h is None:
                dst_link.stats["down_drop"] += 1
                return
            hold += h
        if not matched:
            self.passed_unmatched += 1
        self._schedule(pkt, now + hold)

    def _schedule(self, pkt: bytes, due: float) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, pkt))

    def release_due(self, now: float) -> None:
        while self.heap and self.heap[0][0] <= now:
            _, _, pkt = heapq.heappop(self.heap)
            # kernel backlog full: that is a loss, as on a real link
            with contextlib.suppress(BlockingIOError):
                os.write(self.tun_fd, pkt)

    def read_packets(self) -> None:
        now = time.monotonic()
        for _ in range(MAX_READS_PER_ROUND):
            try:
                pkt = os.read(self.tun_fd, 65535)
            except BlockingIOError:
                return
            self.packet(pkt, now)


def reply(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tun", required=True, help="name of an existing tun device")
    args = parser.parse_args()

    line = DelayLine(open_tun(args.tun))
    reply({"ready": True, "tun": args.tun, "pid": os.getpid()})

    stdin_fd = sys.stdin.fileno()
    pending = b""
    while True:
        timeout = max(0.0, line.heap[0][0] - time.monotonic()) if line.heap else None
        readable, _, _ = select.select([line.tun_fd, stdin_fd], [], [], timeout)
        if line.tun_fd in readable:
            line.read_packets()
        if stdin_fd in readable:
            chunk = os.read(stdin_fd, 65536)
            if not chunk:
                return 0  # the lab closed our stdin (or died): stop
            pending += chunk
            while b"\n" in pending:
                raw, pending = pending.split(b"\n", 1)
                if raw.strip():
                    try:
                        reply(line.control(json.loads(raw)))
                    except (ValueError, KeyError, TypeError) as e:
                        reply({"error": f"bad control message {raw!r}: {e}"})
        line.release_due(time.monotonic())


if __name__ == "__main__":
    sys.exit(main())
