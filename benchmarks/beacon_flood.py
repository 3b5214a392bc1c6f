"""A bad-signature REGISTER flood against a real beacon on 127.0.0.1, and what legitimate nodes see.

    .venv/bin/python -m benchmarks.beacon_flood [--rate 17000] [--sources 1000] [--seconds 10]

Issue #11 item 8: 17k/s REGISTERs with bad signatures from 1,000 source addresses pushed a
legitimate RESOLVE to 551 ms. This starts a beacon process (``python -m
pilot_agents.beacon.service``), registers two nodes (a named target and a requester), measures
the requester's RESOLVE round trips idle, then again while a second process sends the flood from
``--sources`` sockets bound to 127.0.0.2, 127.0.0.3, ... (loopback is all of 127.0.0.0/8). During
the flood a fresh key also registers twice a second: a new node's view. Everything is bounded by
``--seconds`` and ``--rate``; only 127.0.0.0/8 is used.

    .venv/bin/python -m benchmarks.beacon_flood --relay [--rate 40000] [--seconds 10]

Issue #11 item 6, the beacon's side: three throwaway keys register and send forged handshake
initiations through the relay to a registered victim, which counts what the beacon delivers.
(The victim here is a bare socket: it sends no BLOCK_RELAY, so this shows the rate limits alone.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pilot_agents.beacon import service
from pilot_agents.identity import key_from_node_id
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.tunnel import crypto

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"listening on (\S+):(\d+) alt-port (\d+|off) key (\w+)")
Address = tuple[str, int]


def source_ip(index: int) -> str:
    """The ``index``-th flood source: 127.0.0.2 upwards, 250 per /24."""
    return f"127.0.{index // 250}.{index % 250 + 2}"


def flood(beacon: Address, rate: float, sources: int, seconds: float) -> None:
    """The flooding process: bad-signature REGISTERs, round robin over ``sources`` sockets."""
    socks = []
    packets = []
    for i in range(sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source_ip(i), 0))
        sock.setblocking(False)
        socks.append(sock)
        body = bw.encode_register(
            bytes(64), secrets.token_bytes(32), time.time_ns(), bw.NatType.UNKNOWN, f"f{i}", []
        )
        packets.append(body[:-64] + secrets.token_bytes(64))  # a signature that fails
    sent = 0
    start = time.monotonic()
    end = start + seconds
    i = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * rate)
        while sent < due:
            with contextlib.suppress(OSError):  # a full buffer: the flood is what it is
                socks[i].sendto(packets[i], beacon)
            sent += 1
            i = (i + 1) % sources
        time.sleep(0.0005)
    print(f"sent {sent} in {time.monotonic() - start:.2f} s", flush=True)


def relay_flood(beacon: Address, victim: bytes, rate: float, seconds: float) -> None:
    """The flooding process of ``--relay``: three registered keys relay forged initiations."""
    attackers = [Node(beacon, bytes(32), None) for _ in range(3)]  # the beacon key goes unchecked
    for attacker in attackers:
        assert attacker.register() is not None, "an attacker could not register"
    initiation = bw.encode_relay(victim, b"\x10" + secrets.token_bytes(116))
    socks = [a.sock for a in attackers]
    for sock in socks:
        sock.setblocking(False)
    print("ready", flush=True)
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        while sent < int((now - start) * rate):
            with contextlib.suppress(OSError):
                socks[sent % 3].sendto(initiation, beacon)
            sent += 1
        time.sleep(0.0005)
    print(f"sent {sent} in {time.monotonic() - start:.2f} s", flush=True)


class Node:
    """A registered node on a blocking socket: just enough to register and resolve."""

    def __init__(self, beacon: Address, beacon_key: bytes, hostname: str | None) -> None:
        self.beacon = beacon
        self.beacon_key = beacon_key
        self.secret, self.public = crypto.ed25519_keypair()
        self.hostname = hostname
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    def register(self, timeout: float = 1.0) -> float | None:
        """Seconds to a REGISTERED OK, or None if none came within ``timeout``."""
        stamp = time.time_ns()
        message = bw.encode_register(
            self.secret, self.public, stamp, bw.NatType.OPEN, self.hostname, []
        )
        start = time.monotonic()
        self.sock.sendto(message, self.beacon)
        while True:
            left = start + timeout - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(2048)
            except TimeoutError:
                return None
            if data[0] != bw.REGISTERED:
                continue
            reply = bw.parse_registered_untrusted(data)
            if reply.timestamp_ns == stamp and reply.verify(self.public):
                return time.monotonic() - start if reply.status == bw.Status.OK else None

    def resolve(self, name: str, timeout: float = 1.0) -> float | None:
        """Seconds to a signed RESOLVED OK for ``name``; None on timeout or refusal."""
        request_id = secrets.randbits(32)
        start = time.monotonic()
        self.sock.sendto(bw.encode_resolve(request_id, hostname=name), self.beacon)
        while True:
            left = start + timeout - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(2048)
            except TimeoutError:
                return None
            if data[0] == bw.RESOLVED:
                reply = bw.parse_resolved_untrusted(data)
                if reply.request_id == request_id:
                    ok = reply.status == bw.Status.OK and reply.verify(self.beacon_key, self.public)
                    return time.monotonic() - start if ok else None
            elif data[0] == bw.REFUSED and bw.parse_refused_untrusted(data)[1] == request_id:
                return None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(label: str, samples: list[float | None]) -> str:
    ok = sorted(s * 1000 for s in samples if s is not None)
    lost = len(samples) - len(ok)
    if not ok:
        return f"{label}: {len(samples)} tries, all lost"
    p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))]
    return (
        f"{label}: {len(samples)} tries, {lost} lost; median {statistics.median(ok):.2f} ms, "
        f"p99 {p99:.2f} ms, max {ok[-1]:.2f} ms"
    )


def start_beacon(data_dir: str, *options: str) -> tuple[subprocess.Popen[str], Address, bytes]:
    """A beacon process (with more command-line ``options``), its address and key."""
    command = [sys.executable, "-m", "pilot_agents.beacon.service", "--listen", "127.0.0.1:0"]
    command += ["--data-dir", data_dir, "--alt-port", "off", "--log-level", "WARNING", *options]
    beacon_proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert beacon_proc.stdout is not None
    match = READY.search(beacon_proc.stdout.readline())
    assert match, "the beacon did not start"
    return beacon_proc, (match.group(1), int(match.group(2))), key_from_node_id(match.group(4))


def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        beacon_proc, beacon, beacon_key = start_beacon(tmp)
        try:
            target = Node(beacon, beacon_key, "target")
            requester = Node(beacon, beacon_key, None)
            assert target.register() is not None and requester.register() is not None
            idle: list[float | None] = []
            end = time.monotonic() + args.idle_seconds
            while time.monotonic() < end:
                idle.append(requester.resolve("target"))
                time.sleep(0.06)  # under the per-node RESOLVE allowance (20/s)
            cpu0 = cpu_seconds(beacon_proc.pid)
            flooder = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.beacon_flood",
                    "--flood-child",
                    f"{beacon[0]}:{beacon[1]}",
                    "--rate",
                    str(args.rate),
                    "--sources",
                    str(args.sources),
                    "--seconds",
                    str(args.seconds),
                ],
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            time.sleep(1.0)  # the flooder binds its sockets and gets going
            loaded: list[float | None] = []
            fresh: list[float | None] = []
            started = time.monotonic()
            end = started + args.seconds - 2.0
            next_fresh = started
            while time.monotonic() < end:
                loaded.append(requester.resolve("target"))
                if time.monotonic() >= next_fresh:
                    next_fresh += 0.5
                    newcomer = Node(beacon, beacon_key, None)
                    fresh.append(newcomer.register())
                    newcomer.sock.close()
                time.sleep(0.06)  # under the per-node RESOLVE allowance (20/s)
            flood_cpu = cpu_seconds(beacon_proc.pid) - cpu0
            flood_wall = time.monotonic() - started
            out, _ = flooder.communicate(timeout=args.seconds + 30)
            counters = asyncio.run(service.query_status(beacon, timeout=3.0))
        finally:
            beacon_proc.terminate()
            beacon_proc.wait(timeout=10)
    print(f"flood: {out.strip()} from {args.sources} addresses (asked {args.rate:g}/s)")
    print(summary("resolve idle", idle))
    print(summary("resolve under flood", loaded))
    print(summary("new registration under flood", fresh))
    print(f"beacon CPU under flood: {100 * flood_cpu / flood_wall:.0f} % of one core")
    print(f"beacon refusals: {counters['refusals']}")


def measure_relay(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        beacon_proc, beacon, beacon_key = start_beacon(tmp)
        try:
            victim = Node(beacon, beacon_key, None)
            assert victim.register() is not None
            cpu0 = cpu_seconds(beacon_proc.pid)
            command = [sys.executable, "-m", "benchmarks.beacon_flood"]
            command += ["--relay-child", f"{beacon[0]}:{beacon[1]}", "--victim"]
            command += [victim.public.hex(), "--rate", str(args.rate), "--seconds"]
            command += [str(args.seconds)]
            flooder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            assert flooder.stdout is not None
            assert flooder.stdout.readline().strip() == "ready"
            started = time.monotonic()
            delivered = 0
            victim.sock.settimeout(0.2)
            while time.monotonic() < started + args.seconds:
                with contextlib.suppress(TimeoutError):
                    data, _ = victim.sock.recvfrom(2048)
                    delivered += data[0] == bw.RELAYED
            flood_cpu = cpu_seconds(beacon_proc.pid) - cpu0
            flood_wall = time.monotonic() - started
            out, _ = flooder.communicate(timeout=args.seconds + 30)
            counters = asyncio.run(service.query_status(beacon, timeout=3.0))
        finally:
            beacon_proc.terminate()
            beacon_proc.wait(timeout=10)
    print(f"relay flood: {out.strip()} from 3 registered keys (asked {args.rate:g}/s)")
    print(f"delivered to the victim: {delivered} ({delivered / flood_wall:.0f}/s)")
    print(f"beacon CPU under flood: {100 * flood_cpu / flood_wall:.0f} % of one core")
    print(f"beacon refusals: {counters['refusals']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=17_000.0, help="datagrams per second")
    parser.add_argument("--sources", type=int, default=1000, help="source addresses")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the flood")
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument("--relay", action="store_true", help="the relayed initiation flood")
    parser.add_argument("--flood-child", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--relay-child", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--victim", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seconds > 120 or args.rate > 100_000 or args.sources > 10_000:
        parser.error("bounded: at most 120 s, 100k/s and 10,000 sources")
    if args.flood_child:
        host, _, port = args.flood_child.rpartition(":")
        flood((host, int(port)), args.rate, args.sources, args.seconds)
    elif args.relay_child:
        host, _, port = args.relay_child.rpartition(":")
        relay_flood((host, int(port)), bytes.fromhex(args.victim), args.rate, args.seconds)
    elif args.relay:
        measure_relay(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
