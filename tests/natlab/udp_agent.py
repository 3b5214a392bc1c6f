"""A scriptable UDP endpoint for the NAT lab: one socket, driven by JSON commands on stdin.

Started inside a host's namespace, it binds one UDP socket, prints
``{"ready": true, "local": [ip, port]}``, then executes one command per stdin line and answers each
with exactly one JSON line on stdout (``{"error": ...}`` if it failed). Everything it does uses the
same socket, so a NAT mapping learned with "reflect" is the one "punch" and "recv" use. EOF on stdin
ends it. Standard library only.

Commands (times in seconds):
  {"op": "reflect", "server": [ip, port], "timeout": 2.0}
      ask a udp_echo server for our mapped address; retried every 0.2 s
      -> {"mapped": [ip, port]}
  {"op": "send", "to": [ip, port], "data": "text", "count": 1, "interval": 0.0}
      -> {"sent": n}
  {"op": "recv", "timeout": 1.0, "max": 0}
      collect datagrams until timeout (or max of them, if max > 0)
      -> {"packets": [{"from": [ip, port], "data": "text"}, ...]}
  {"op": "punch", "peer": [ip, port], "count": 10, "interval": 0.05, "linger": 0.5}
      send count "PUNCH <seq>" datagrams to peer, interval apart, receiving all the while, then
      keep receiving for linger -> {"sent": n, "packets": [...]}
  {"op": "ping", "to": [ip, port], "count": 10, "interval": 0.01, "timeout": 1.0}
      "PING <seq>" to a udp_echo server; waits timeout after the last send for stragglers
      -> {"sent": n, "received": k, "rtts_ms": [...], "lost": [seq, ...], "reordered": r}
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import select
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

Addr = tuple[str, int]


class Agent:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)

    def _drain(self) -> list[tuple[Addr, bytes]]:
        out: list[tuple[Addr, bytes]] = []
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return out
            except ConnectionRefusedError:
                continue  # ICMP port unreachable for an earlier send: not a datagram
            out.append(((addr[0], addr[1]), data))

    def _wait(self, timeout: float) -> list[tuple[Addr, bytes]]:
        readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        return self._drain() if readable else []

    @staticmethod
    def _pkt(addr: Addr, data: bytes) -> dict[str, Any]:
        return {"from": [addr[0], addr[1]], "data": data.decode("latin-1")}

    def reflect(self, server: list[Any], timeout: float = 2.0) -> dict[str, Any]:
        dest = (str(server[0]), int(server[1]))
        nonce = f"REFLECT {time.monotonic_ns()}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.sendto(nonce.encode(), dest)
            retry_at = min(deadline, time.monotonic() + 0.2)
            while time.monotonic() < retry_at:
                for addr, data in self._wait(retry_at - time.monotonic()):
                    if addr != dest:
                        continue
                    try:
                        answer = json.loads(data)
                    except ValueError:
                        continue
                    if answer.get("data") == nonce:
                        return {"mapped": answer["mapped"]}
        return {"error": f"no answer from {dest[0]}:{dest[1]} within {timeout}s"}

    def send(
        self, to: list[Any], data: str, count: int = 1, interval: float = 0.0
    ) -> dict[str, Any]:
        dest = (str(to[0]), int(to[1]))
        for i in range(count):
            if i and interval:
                time.sleep(interval)
            self.sock.sendto(data.encode("latin-1"), dest)
        return {"sent": count}

    def recv(self, timeout: float = 1.0, max: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        got: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not (max and len(got) >= max):
            got.extend(self._pkt(a, d) for a, d in self._wait(deadline - time.monotonic()))
        return {"packets": got}

    def punch(
        self, peer: list[Any], count: int = 10, interval: float = 0.05, linger: float = 0.5
    ) -> dict[str, Any]:
        dest = (str(peer[0]), int(peer[1]))
        got: list[dict[str, Any]] = []
        start = time.monotonic()
        for seq in range(count):
            send_at = start + seq * interval
            while (now := time.monotonic()) < send_at:
                got.extend(self._pkt(a, d) for a, d in self._wait(send_at - now))
            self.sock.sendto(f"PUNCH {seq}".encode(), dest)
        end = time.monotonic() + linger
        while (now := time.monotonic()) < end:
            got.extend(self._pkt(a, d) for a, d in self._wait(end - now))
        return {"sent": count, "packets": got}

    def ping(
        self, to: list[Any], count: int = 10, interval: float = 0.01, timeout: float = 1.0
    ) -> dict[str, Any]:
        dest = (str(to[0]), int(to[1]))
        sent_at: dict[int, float] = {}
        rtts: dict[int, float] = {}
        order: list[int] = []

        def absorb(items: list[tuple[Addr, bytes]]) -> None:
            now = time.monotonic()
            for addr, data in items:
                if addr != dest:
                    continue
                try:
                    text = json.loads(data)["data"]
                    seq = int(text.split()[1])
                except (ValueError, KeyError, IndexError):
                    continue
                if seq in sent_at and seq not in rtts:
                    rtts[seq] = (now - sent_at[seq]) * 1000.0
                    order.append(seq)

        start = time.monotonic()
        for seq in range(count):
            send_at = start + seq * interval
            while (now := time.monotonic()) < send_at:
                absorb(self._wait(send_at - now))
            absorb(self._drain())
            sent_at[seq] = time.monotonic()
            with contextlib.suppress(BlockingIOError):  # our send queue full: counts as lost
                self.sock.sendto(f"PING {seq}".encode(), dest)
        end = time.monotonic() + timeout
        while len(rtts) < count and (now := time.monotonic()) < end:
            absorb(self._wait(end - now))
        reordered = sum(1 for a, b in itertools.pairwise(order) if b < a)
        return {
            "sent": count,
            "received": len(rtts),
            "rtts_ms": [rtts[s] for s in sorted(rtts)],
            "lost": [s for s in range(count) if s not in rtts],
            "reordered": reordered,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((args.bind, args.port))
    agent = Agent(sock)
    ip, port = sock.getsockname()
    print(json.dumps({"ready": True, "local": [ip, port]}), flush=True)

    ops: dict[str, Callable[..., dict[str, Any]]] = {
        "reflect": agent.reflect,
        "send": agent.send,
        "recv": agent.recv,
        "punch": agent.punch,
        "ping": agent.ping,
    }
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            op = ops[cmd.pop("op")]
            result = op(**cmd)
        except Exception as e:  # reported to the test as {"error": ...}
            result = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
