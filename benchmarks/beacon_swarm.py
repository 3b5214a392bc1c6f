"""A swarm of simulated nodes against one real beacon process on loopback (issue #16).

    .venv/bin/python -m benchmarks.beacon_swarm --nodes 10000 [--seconds 30]
    .venv/bin/python -m benchmarks.beacon_swarm --nodes 100000 --seconds 50
    .venv/bin/python -m benchmarks.beacon_swarm --nodes 20000 --rates 2000,4000,6000,8000
    .venv/bin/python -m benchmarks.beacon_swarm --nodes 0 --relay-pairs 100 --relay-rate 100000

It starts a beacon (``python -m pilot_agents.beacon.service``) and generator processes, each
holding up to 16,000 simulated nodes: a key pair and a UDP socket each, bound to 127.1.x.y (50
nodes per address, so the beacon's per-address limits see what a NAT full of nodes would make).
Every message is real: signed REGISTERs, RESOLVEs by name and INTRODUCEs, built with
:mod:`pilot_agents.net.traversal.beacon_wire`, answered by the beacon with signed replies.

First every node registers (the ramp, paced under the beacon's budget for new keys); then, for
each rate step, every node refreshes once per ``nodes / rate`` seconds (25 s by default: a node's
keepalive), and random nodes resolve random names and ask for introductions. A generator signs a
step's REGISTERs before the step starts (a timestamp needs only to be newer than the node's last
one and within a minute of the beacon's clock), so during the step it only sends and matches
answers. For the step the report gives the beacon's CPU (share of one core), its RSS, the reply
latency p50/p99 per kind, answers lost (none within ``--grace`` seconds), the beacon's refusals
by reason, datagrams its socket dropped (``/proc/net/udp``), and the generators' own CPU.

``--relay-pairs N`` then measures the relay: N registered senders send RELAYs of 1,200-byte DATA
packets to N registered receivers at ``--relay-rate`` packets/s in all (sent in batches with UDP
GSO so the generator stays cheap; ``--relay-gso 1``: one datagram per call, which nothing
coalesces), and the receivers count what arrives (read with ``recvmmsg`` where the C module
``_mmsg`` was built). Only 127.0.0.0/8 is used; every loop is bounded in time.

Scale-out (``--workers N``, ``--beacons N``, ``--store redis``): the beacon runs N worker
processes on one port, or N beacons share one Redis (the generators split the nodes among them,
and the relay runs through the first), on a redis-server the benchmark starts. The beacon's CPU
is then the sum over its processes and Redis's, each listed; its counters are summed over the
workers (STATUS answers from the worker the asking port lands on).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.beacon_flood import ROOT, cpu_seconds, start_beacon
from benchmarks.machine import CpuSample, describe
from pilot_agents.beacon import service
from pilot_agents.errors import PilotTimeoutError
from pilot_agents.identity import Identity
from pilot_agents.net.io.udp import MAX_DATAGRAM, MMSG_BATCH, read_batch, read_many
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.tunnel import crypto, wire
from tests.redis_server import RedisServer

Address = tuple[str, int]
NODES_PER_IP = 50  # under the beacon's max_names_per_ip (64) and its per-address rates
NODES_PER_PROCESS = 16_000  # a process may hold 20,000 descriptors here (ulimit -Hn)
RAMP_RETRY = 2.0  # seconds before an unanswered ramp REGISTER is sent again
KEEPALIVE = 25.0  # seconds between a node's REGISTERs outside a step, as nodes do (TTL 90 s)
KEEPALIVE_BATCH = 10  # keepalives per look at the clock
RELAY_PAYLOAD = 1200  # bytes of the sealed tunnel packet a RELAY carries
UDP_SEGMENT = 103  # Linux's UDP GSO option (netinet/udp.h)
GSO_BATCH = 32  # RELAYs per sendmsg, by default


def node_ip(index: int, net: int = 1, per_ip: int = NODES_PER_IP) -> str:
    """The address of simulated node ``index``: 127.<net>.x.y, ``per_ip`` nodes per address."""
    n = index // per_ip
    return f"127.{net + n // 62_500}.{n // 250 % 250}.{n % 250 + 2}"


def node_keys(index: int, salt: int) -> tuple[bytes, bytes]:
    """A node's Ed25519 pair from its index, so any process can know any node's key."""
    return crypto.ed25519_seed_keypair(struct.pack("!QQ16x", salt, index))


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def proc_rss_mb(pid: int) -> tuple[float, float]:
    """``(VmRSS, VmHWM)`` of ``pid`` in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def socket_drops(port: int) -> int:
    """Datagrams dropped on the UDP socket bound to local ``port`` (its receive buffer was full).

    Asked of ``ss`` (netlink): reading /proc/net/udp takes over a minute with 100k sockets open."""
    try:
        out = subprocess.run(
            ["ss", "-uanmH", f"sport = :{port}"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return -1
    # Workers share the port: one line (and drop count) per socket.
    found = re.findall(r"skmem:\(.*?,d(\d+)\)", out)
    return sum(int(d) for d in found) if found else -1


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the generator process ---------------------------------------------------------------------


@dataclass
class Pending:
    kind: str
    sent: float  # time.monotonic()


@dataclass
class StepResult:
    sent: dict[str, int] = field(default_factory=dict)
    answered: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    latencies_us: dict[str, list[int]] = field(default_factory=dict)
    pushed: int = 0  # introductions pushed to the introduced side
    late_s: float = 0.0  # how far behind its schedule the generator fell, at worst
    presign_s: float = 0.0  # from the start of presigning to the go
    cpu_s: float = 0.0
    wall_s: float = 0.0


class Swarm:
    """``count`` simulated nodes from index ``first``, on one epoll."""

    def __init__(
        self,
        beacon: Address,
        first: int,
        count: int,
        total: int,
        salt: int,
        *,
        net: int = 1,
        per_ip: int = NODES_PER_IP,
    ) -> None:
        self.beacon = beacon
        self.first = first
        self.total = total
        self.salt = salt
        self.prefix = f"n{net}-"  # names differ between swarms whose keys differ
        self.keys = [node_keys(first + i, salt) for i in range(count)]
        self.socks: list[socket.socket] = []
        self.index_of_fd: dict[int, int] = {}
        self.epoll = select.epoll()
        for i in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((node_ip(first + i, net, per_ip), 0))
            sock.setblocking(False)
            self.socks.append(sock)
            self.index_of_fd[sock.fileno()] = i
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.addresses = [s.getsockname() for s in self.socks]
        self.last_stamp = [0] * count
        self.pending: dict[tuple[int, int], Pending] = {}
        self.registered: set[int] = set()  # nodes whose last REGISTER was answered OK
        self.last_sent = [0.0] * count  # when each node last sent a REGISTER (monotonic)
        self.refresh_order: deque[tuple[float, int]] = deque()  # (sent, node), oldest first
        self.per_ip = per_ip
        self.result = StepResult()

    def name(self, index: int) -> str:
        return f"{self.prefix}{index}"

    def register_message(self, i: int, stamp: int) -> bytes:
        secret, public = self.keys[i]
        self.last_stamp[i] = stamp
        return bw.encode_register(
            secret, public, stamp, bw.NatType.CONE, self.name(self.first + i), [self.addresses[i]]
        )

    def send(self, i: int, data: bytes, kind: str, match: int) -> None:
        now = time.monotonic()
        self.pending[(i, match)] = Pending(kind, now)
        if data[0] == bw.REGISTER:
            self.last_sent[i] = now
            self.refresh_order.append((now, i))
        r = self.result
        r.sent[kind] = r.sent.get(kind, 0) + 1
        with contextlib.suppress(BlockingIOError):  # a full buffer: it counts as lost
            self.socks[i].sendto(data, self.beacon)

    def receive(self, timeout: float) -> None:
        r = self.result
        for fd, _ in self.epoll.poll(timeout):
            i = self.index_of_fd[fd]
            while True:
                try:
                    data = os.read(fd, 2048)
                except BlockingIOError:
                    break
                except OSError:  # an ICMP error from an earlier send
                    continue
                now = time.monotonic()
                kind = data[0]
                if kind == bw.REGISTERED:
                    match = int.from_bytes(data[2:10], "big")  # the echoed timestamp
                    refused = data[1] != bw.Status.OK
                elif kind in (bw.RESOLVED, bw.INTRODUCTION):
                    match = int.from_bytes(data[2:6], "big")  # the request id
                    if kind == bw.INTRODUCTION and match == 0:
                        r.pushed += 1
                        continue
                    refused = False
                elif kind == bw.REFUSED:
                    match = int.from_bytes(data[2:6], "big")
                    refused = True
                else:
                    continue
                pending = self.pending.pop((i, match), None)
                if pending is None:
                    continue
                if refused:
                    r.refused[pending.kind] = r.refused.get(pending.kind, 0) + 1
                    self.registered.discard(i)
                else:
                    if kind == bw.REGISTERED:
                        self.registered.add(i)
                    r.answered[pending.kind] = r.answered.get(pending.kind, 0) + 1
                    r.latencies_us.setdefault(pending.kind, []).append(
                        int((now - pending.sent) * 1e6)
                    )

    def ramp(self, rate: float, deadline: float) -> int:
        """Register every node at ``rate``/s, resending what got no answer; how many failed."""
        # One address after the other: the beacon checks 2 new keys/s per address (burst 20).
        waiting = sorted(range(len(self.socks)), key=lambda i: (i % self.per_ip, i))
        start = time.monotonic()
        sent = 0
        while waiting and time.monotonic() < deadline:
            now = time.monotonic()
            for i in waiting[sent : int((now - start) * rate)]:
                stamp = time.time_ns()
                self.send(i, self.register_message(i, stamp), "ramp", stamp)
                sent += 1
            self.receive(0.002)
            self.keepalive()
            if len(self.registered) == len(self.socks):
                return 0
            if sent >= len(waiting) and time.monotonic() - start > RAMP_RETRY:
                # Resend what is unanswered (or was refused) once the last answers had time.
                waiting = [i for i in waiting if i not in self.registered]
                self.pending.clear()
                start, sent = time.monotonic(), 0
        return len(waiting)

    def signing_time(self, messages: float) -> float:
        """CPU seconds it will take to sign ``messages`` REGISTERs, from a sample of 50."""
        secret, public = self.keys[0]
        began = time.process_time()
        for _ in range(50):
            bw.encode_register(secret, public, 0, bw.NatType.CONE, self.name(0), self.addresses[:1])
        return (time.process_time() - began) / 50 * messages

    def keepalive(self) -> None:
        """Refresh the registered nodes whose last REGISTER is KEEPALIVE old (outside a step)."""
        now = time.monotonic()
        order = self.refresh_order
        budget = KEEPALIVE_BATCH  # so that a backlog (after signing a step) goes out spread
        while order and now - order[0][0] >= KEEPALIVE and budget > 0:
            sent, i = order.popleft()
            if self.last_sent[i] == sent and i in self.registered:
                budget -= 1
                stamp = time.time_ns()
                self.send(i, self.register_message(i, stamp), "keepalive", stamp)

    def wait_line(self) -> str:
        """The parent's next line; the nodes stay registered meanwhile."""
        while not select.select([sys.stdin], [], [], 0.01)[0]:
            self.keepalive()
            self.receive(0)
        return sys.stdin.readline()

    def step(self, params: dict[str, Any]) -> None:
        """Say how long signing the step takes; sign its REGISTERs for the start the parent
        sets; wait for the go; run it; print the result."""
        count = len(self.socks)
        interval = self.total / params["rate"]
        seconds = params["seconds"]
        print(json.dumps(self.signing_time(count * (seconds / interval + 1))), flush=True)
        # Every timestamp is the time its REGISTER is due: the beacon takes them only within a
        # minute of its clock, so the step must start within a minute of the parent's go_at.
        go_at = int(json.loads(self.wait_line())["go_at"] * 1e9)
        presign_start = time.time_ns()
        schedule: list[tuple[float, int, bytes, int]] = []
        for i in range(count):
            phase = (self.first + i) / self.total * interval
            offset = phase
            while offset < seconds:
                stamp = max(go_at + int(offset * 1e9), self.last_stamp[i] + 1)
                schedule.append((offset, i, self.register_message(i, stamp), stamp))
                offset += interval
            if i % 256 == 255:  # registrations must not expire while we sign
                self.keepalive()
                self.receive(0)
        schedule.sort(key=lambda event: event[0])
        rng = random.Random(self.first)
        requests = []  # (offset, kind)
        for kind in ("resolve", "introduce"):
            n = int(params[f"{kind}_rate"] * seconds)
            requests += [(rng.uniform(0, seconds), kind) for _ in range(n)]
        requests.sort()
        print("presigned", flush=True)
        self.wait_line()  # the go
        self.result = StepResult(presign_s=(time.time_ns() - presign_start) / 1e9)
        self.pending.clear()
        cpu0, start = own_cpu(), time.monotonic()
        next_event = next_request = 0
        request_id = 1
        end = start + seconds
        while (now := time.monotonic()) < end:
            due = now - start
            while next_event < len(schedule) and schedule[next_event][0] <= due:
                offset, i, message, stamp = schedule[next_event]
                self.send(i, message, "register", stamp)
                self.result.late_s = max(self.result.late_s, due - offset)
                next_event += 1
            while next_request < len(requests) and requests[next_request][0] <= due:
                kind = requests[next_request][1]
                i = rng.randrange(count)
                target = rng.randrange(self.total)
                if kind == "resolve":
                    message = bw.encode_resolve(request_id, hostname=self.name(target))
                else:
                    message = bw.encode_introduce(request_id, node_keys(target, self.salt)[1])
                self.send(i, message, kind, request_id)
                request_id += 1
                next_request += 1
            self.receive(0.001)
        grace_end = time.monotonic() + params["grace"]
        while self.pending and time.monotonic() < grace_end:
            self.receive(0.01)
        self.result.cpu_s = own_cpu() - cpu0
        self.result.wall_s = seconds
        print(json.dumps(self.result.__dict__), flush=True)


def swarm_child(config: dict[str, Any]) -> None:
    """A generator process: bound and keyed, then ramp, then steps, as the parent says."""
    beacon = (config["host"], config["port"])
    swarm = Swarm(
        beacon, config["first"], config["count"], config["total"], config["salt"],
        per_ip=config["per_ip"],
    )
    print("bound", flush=True)
    ramp = json.loads(sys.stdin.readline())
    failed = swarm.ramp(ramp["rate"], time.monotonic() + ramp["timeout"])
    print(json.dumps({"failed": failed}), flush=True)
    while line := swarm.wait_line().strip():
        swarm.step(json.loads(line))


# -- the relay generator ------------------------------------------------------------------------


def relay_child(config: dict[str, Any]) -> None:
    """Senders (``role`` send) or receivers (``role`` receive) of the relay measurement."""
    beacon = (config["host"], config["port"])
    pairs = config["pairs"]
    sending = config["role"] == "send"
    first = 0 if sending else pairs
    # Few nodes per address, so that they all register at once.
    swarm = Swarm(beacon, first, pairs, 2 * pairs, config["salt"], net=100, per_ip=5)
    for sock in swarm.socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    failed = swarm.ramp(1000.0, time.monotonic() + 30.0)
    print(json.dumps({"failed": failed}), flush=True)
    sys.stdin.readline()  # the go
    seconds = config["seconds"]
    cpu0, start = own_cpu(), time.monotonic()
    count = nbytes = 0
    if sending:
        packet = bytes([wire.DATA]) + bytes(RELAY_PAYLOAD - 1)
        batch = config["gso"]
        relays = [
            bw.encode_relay(node_keys(pairs + i, config["salt"])[1], packet) for i in range(pairs)
        ]
        size = struct.pack("H", RELAY_PAYLOAD + bw.RELAY_OVERHEAD)
        segment = [(socket.SOL_UDP, UDP_SEGMENT, size)]
        rate = config["rate"]
        # With one datagram per call the generator, not the beacon, can be what runs out of CPU:
        # its loop is kept to the call (bound methods, no context manager per packet), and a
        # connected socket spares the kernel a route lookup per packet.
        sends = []
        for sock in swarm.socks:
            sock.connect(beacon)
            sends.append(sock.send)
        i = 0
        while (now := time.monotonic()) < start + seconds:
            due = (now - start) * rate
            while count < due:
                try:
                    if batch > 1:
                        swarm.socks[i].sendmsg([relays[i] * batch], segment, 0, beacon)
                    else:
                        sends[i](relays[i])
                except BlockingIOError:
                    pass
                count += batch
                i = (i + 1) % pairs
            time.sleep(0.0005)
    else:
        read = receiver_of()
        end = start + seconds + 1.0
        while time.monotonic() < end:
            for fd, _ in swarm.epoll.poll(0.01):
                for data in read(swarm.socks[swarm.index_of_fd[fd]]):
                    if data[0] == bw.RELAYED:
                        count += 1
                        nbytes += len(data) - bw.RELAY_OVERHEAD
    print(json.dumps({"packets": count, "bytes": nbytes, "cpu_s": own_cpu() - cpu0}), flush=True)


def receiver_of() -> Callable[[socket.socket], list[bytes]]:
    """What reads every datagram waiting on a socket: many per recvmmsg where the C module
    was compiled, so that the receivers take less of the CPU the beacon needs."""
    try:
        from pilot_agents.net.io import _mmsg
    except ImportError:
        return lambda sock: [data for data, _ in read_batch(sock)]
    receiver = _mmsg.Receiver(MMSG_BATCH, MAX_DATAGRAM)  # one for every socket: read in turn

    def read(sock: socket.socket) -> list[bytes]:
        batch: list[bytes] = []
        read_many(receiver, sock.fileno(), lambda data, _, __: batch.append(data), 0.0)
        return batch

    return read


# -- the parent --------------------------------------------------------------------------------


class Child:
    def __init__(self, mode: str, config: dict[str, Any]) -> None:
        command = [sys.executable, "-m", "benchmarks.beacon_swarm", mode, json.dumps(config)]
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )

    def say(self, message: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((message if isinstance(message, str) else json.dumps(message)) + "\n")
        self.proc.stdin.flush()

    def hear(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a generator died (status {self.proc.wait()})")
        return line.strip()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.say("")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Beacons:
    """The beacon processes (their workers too) and the redis-server they share, if any."""

    def __init__(self, procs: list[subprocess.Popen[str]], addresses: list[Address],
                 workers: int, redis: RedisServer | None) -> None:
        self.procs = procs
        self.addresses = addresses
        self.workers = workers
        self.redis = redis

    @property
    def first(self) -> Address:
        return self.addresses[0]

    def pids(self) -> dict[str, int]:
        """Every process doing the beacon's work, by a label."""
        found: dict[str, int] = {}
        for b, proc in enumerate(self.procs):
            tree = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            workers = [int(pid) for pid in tree] if self.workers > 1 else []
            found[f"beacon {b}"] = proc.pid
            found.update({f"beacon {b} worker {w}": pid for w, pid in enumerate(workers)})
        if self.redis is not None and self.redis._process is not None:
            found["redis"] = self.redis._process.pid
        return found

    def status(self) -> dict[str, Any]:
        """The counters summed over every beacon and worker."""
        total: dict[str, Any] = {"refusals": {}}
        for address in self.addresses:
            for counters in worker_statuses(address, self.workers):
                for key, value in counters.items():
                    if key == "refusals":
                        for reason, count in value.items():
                            total["refusals"][reason] = total["refusals"].get(reason, 0) + count
                    elif isinstance(value, int | float) and key != "worker":
                        total[key] = total.get(key, 0) + value
        return total


def worker_statuses(beacon: Address, workers: int) -> list[dict[str, Any]]:
    """Each worker's counters: STATUS from fresh ports until every worker answered one."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(20 * workers):
        counters = status(beacon)
        seen[int(counters.get("worker", 0))] = counters
        if len(seen) == workers:
            break
    return list(seen.values())


@dataclass
class BeaconSample:
    cpu: dict[str, float]  # CPU seconds by process
    wall: float
    drops: int
    machine: CpuSample | None

    @classmethod
    def take(cls, beacons: Beacons) -> BeaconSample:
        cpu = {label: cpu_seconds(pid) for label, pid in beacons.pids().items()}
        drops = sum(socket_drops(port) for _, port in beacons.addresses)
        return cls(cpu, time.monotonic(), drops, CpuSample.now())

    def used(self, before: BeaconSample) -> dict[str, float]:
        """CPU seconds each process took since ``before``."""
        return {label: cpu - before.cpu.get(label, 0.0) for label, cpu in self.cpu.items()}


def cpu_report(used: dict[str, float], wall: float, messages: int) -> str:
    total = sum(used.values())
    each = ", ".join(f"{label} {100 * cpu / wall:.0f} %" for label, cpu in used.items())
    per = f", {1e6 * total / messages:.1f} us of CPU per message" if messages else ""
    return f"beacon side {100 * total / wall:.0f} % of a core ({each}){per}"


def others_percent(before: BeaconSample, after: BeaconSample, ours: float) -> str:
    """Of the machine's two cores, the share other processes than ours used."""
    if before.machine is None or after.machine is None:
        return "?"
    busy = after.machine.busy - before.machine.busy
    total = after.machine.total - before.machine.total
    return f"{100 * max(0.0, busy - ours) / total:.0f} %" if total > 0 else "?"


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"sent": {}, "answered": {}, "refused": {}, "latencies_us": {}}
    merged["pushed"] = sum(r["pushed"] for r in results)
    merged["late_s"] = max(r["late_s"] for r in results)
    merged["presign_s"] = max(r["presign_s"] for r in results)
    merged["cpu_s"] = sum(r["cpu_s"] for r in results)
    for r in results:
        for key in ("sent", "answered", "refused"):
            for kind, n in r[key].items():
                merged[key][kind] = merged[key].get(kind, 0) + n
        for kind, values in r["latencies_us"].items():
            merged["latencies_us"].setdefault(kind, []).extend(values)
    return merged


def report_step(rate: float, seconds: float, merged: dict[str, Any], beacon: dict[str, Any]) -> str:
    lines = [f"step {rate:g} registrations/s for {seconds:g} s:"]
    for kind in ("register", "resolve", "introduce"):
        sent = merged["sent"].get(kind, 0)
        if not sent:
            continue
        answered = merged["answered"].get(kind, 0)
        refused = merged["refused"].get(kind, 0)
        latencies = sorted(v / 1000 for v in merged["latencies_us"].get(kind, []))
        timing = (
            f"p50 {percentile(latencies, 0.5):.2f} ms, p99 {percentile(latencies, 0.99):.2f} ms"
            if latencies
            else "no answers"
        )
        lines.append(
            f"  {kind}: {sent} sent ({sent / seconds:.0f}/s), {answered} answered, {refused} "
            f"refused, {sent - answered - refused} lost; {timing}"
        )
    lines.append(
        f"  beacon: {beacon['cpu']:.0f} % of a core, RSS {beacon['rss']:.0f} MB (peak "
        f"{beacon['hwm']:.0f} MB), {beacon['drops']} datagrams dropped by its socket, "
        f"{beacon['nodes']} live nodes"
    )
    lines.append(f"  {beacon['cpu_detail']}")
    lines.append(f"  beacon refusals in the step: {beacon['refusals'] or 'none'}")
    lines.append(
        f"  generators: {100 * merged['cpu_s'] / seconds:.0f} % of a core in all, at worst "
        f"{merged['late_s'] * 1000:.0f} ms behind schedule, the step started "
        f"{merged['presign_s']:.1f} s after they began signing it; other processes: "
        f"{beacon['others']}"
    )
    return "\n".join(lines)


def refusals_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def status(beacon: Address) -> dict[str, Any]:
    """The beacon's counters; empty ones if it is too busy to answer within 10 s."""
    import asyncio

    try:
        return asyncio.run(service.query_status(beacon, timeout=10.0))
    except PilotTimeoutError:
        print("(the beacon did not answer STATUS: its counters are missing here)", flush=True)
        return {"refusals": {}, "registered_nodes": "?", "relayed_packets": 0}


def run_steps(
    args: argparse.Namespace, beacons: Beacons
) -> list[tuple[float, dict[str, Any], dict[str, Any]]]:
    """Ramp, then each rate step; per step the generators' merged result and the beacon's."""
    nodes = args.nodes
    procs = args.processes or max(1, -(-nodes // NODES_PER_PROCESS))
    share = -(-nodes // procs)
    targets = beacons.addresses
    children = [
        Child(
            "--swarm-child",
            {"host": targets[k % len(targets)][0], "port": targets[k % len(targets)][1],
             "first": first, "total": nodes, "count": min(share, nodes - first),
             "salt": args.salt, "per_ip": args.per_ip},
        )
        for k, first in enumerate(range(0, nodes, share))
    ]
    out = []
    try:
        for child in children:
            assert child.hear() == "bound"
        started = time.monotonic()
        for child in children:
            child.say({"rate": args.ramp_rate / len(children), "timeout": args.ramp_timeout})
        failed = sum(json.loads(child.hear())["failed"] for child in children)
        print(
            f"ramp: {nodes - failed} of {nodes} nodes registered in "
            f"{time.monotonic() - started:.1f} s; beacon refusals "
            f"{beacons.status()['refusals']}, "
            f"{sum(socket_drops(port) for _, port in targets)} datagrams dropped by its socket",
            flush=True,
        )
        for rate in args.rates or [nodes / args.interval]:
            params = {
                "rate": rate, "seconds": args.seconds, "grace": args.grace,
                "resolve_rate": rate * args.resolve_share / len(children),
                "introduce_rate": rate * args.introduce_share / len(children),
            }
            for child in children:
                child.say(params)
            # They sign at once, on the machine's cores: three times the slowest one's estimate.
            signing = max(json.loads(child.hear()) for child in children)
            go_at = time.time() + 5 + 3 * signing * len(children) / (os.cpu_count() or 1)
            for child in children:
                child.say({"go_at": go_at})
            for child in children:
                assert child.hear() == "presigned"
            refusals0 = beacons.status()["refusals"]
            time.sleep(max(0.0, go_at - time.time()))
            before = BeaconSample.take(beacons)
            for child in children:
                child.say("go")
            if (late := time.time() - go_at) > 30:
                print(f"(the step starts {late:.0f} s late: REGISTERs stamped more than a minute"
                      " before they are sent are refused as stale)", flush=True)
            time.sleep(args.seconds)
            after = BeaconSample.take(beacons)
            memory = [proc_rss_mb(pid) for label, pid in beacons.pids().items()
                      if label != "redis"]
            rss, hwm = sum(m[0] for m in memory), sum(m[1] for m in memory)
            results = [json.loads(child.hear()) for child in children]
            counters = beacons.status()
            merged = merge(results)
            wall = after.wall - before.wall
            used = after.used(before)
            ours = sum(used.values()) + merged["cpu_s"]
            stats = {
                "cpu": 100 * sum(used.values()) / wall,
                "cpu_detail": cpu_report(used, wall, sum(merged["answered"].values())),
                "rss": rss, "hwm": hwm, "drops": after.drops - before.drops,
                "nodes": counters["registered_nodes"],
                "refusals": refusals_delta(refusals0, counters["refusals"]),
                "others": others_percent(before, after, ours),
            }
            print(report_step(rate, args.seconds, merged, stats), flush=True)
            out.append((rate, merged, stats))
    finally:
        for child in children:
            child.close()
    return out


def run_relay(args: argparse.Namespace, beacons: Beacons) -> dict[str, Any]:
    beacon = beacons.first
    base = {"host": beacon[0], "port": beacon[1], "pairs": args.relay_pairs,
            "salt": args.salt + 1, "seconds": args.relay_seconds, "rate": args.relay_rate,
            "gso": args.relay_gso}
    receivers = Child("--relay-child", base | {"role": "receive"})
    senders = Child("--relay-child", base | {"role": "send"})
    try:
        for child in (receivers, senders):
            failed = json.loads(child.hear())["failed"]
            assert failed == 0, f"{failed} relay nodes did not register"
        stats0 = beacons.status()
        before = BeaconSample.take(beacons)
        for child in (receivers, senders):
            child.say("go")
        sent = json.loads(senders.hear())
        after = BeaconSample.take(beacons)
        got = json.loads(receivers.hear())
        stats1 = beacons.status()
    finally:
        receivers.close()
        senders.close()
    wall = after.wall - before.wall
    used = after.used(before)
    ours = sum(used.values()) + sent["cpu_s"] + got["cpu_s"]
    relayed = stats1.get("relayed_packets", 0) - stats0.get("relayed_packets", 0)
    result = {
        "sent": sent["packets"], "delivered": got["packets"], "relayed": relayed,
        "cpu": 100 * sum(used.values()) / wall, "drops": after.drops - before.drops,
        "cpu_detail": cpu_report(used, wall, relayed),
        "generator_cpu": 100 * (sent["cpu_s"] + got["cpu_s"]) / args.relay_seconds,
        "refusals": refusals_delta(stats0["refusals"], stats1["refusals"]),
        "others": others_percent(before, after, ours),
    }
    seconds = args.relay_seconds
    print(
        f"relay, {args.relay_pairs} pairs, {RELAY_PAYLOAD} B packets, {args.relay_gso} per send, "
        f"{seconds:g} s: "
        f"{result['sent']} sent ({result['sent'] / seconds:.0f}/s), {result['relayed']} relayed "
        f"by the beacon, {result['delivered']} delivered ({result['delivered'] / seconds:.0f}/s);"
        f" beacon {result['cpu']:.0f} % of a core, {result['drops']} dropped by its socket; "
        f"generators {result['generator_cpu']:.0f} % of a core; refusals "
        f"{result['refusals'] or 'none'}; other processes: {result['others']}\n"
        f"  {result['cpu_detail']}",
        flush=True,
    )
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    print(f"machine: {describe()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        redis = None
        options = ["--workers", str(args.workers)]
        if args.store == "redis":
            redis = RedisServer(Path(tmp) / "redis")
            redis.start()
            # One key for the fleet (each beacon would make its own in its data directory).
            Identity.load_or_create(Path(tmp) / "fleet")
            options += ["--store", redis.url(), "--key-file", f"{tmp}/fleet/identity.key"]
        procs: list[subprocess.Popen[str]] = []
        addresses: list[Address] = []
        try:
            for b in range(args.beacons):
                proc, address, _ = start_beacon(
                    f"{tmp}/beacon-{b}", *options, "--beacon-id", f"beacon-{b}"
                )
                procs.append(proc)
                addresses.append(address)
            beacons = Beacons(procs, addresses, args.workers, redis)
            rss0 = sum(proc_rss_mb(pid)[0] for label, pid in beacons.pids().items()
                       if label != "redis")
            print(f"{args.beacons} beacon(s) of {args.workers} worker(s), store {args.store}: "
                  f"RSS {rss0:.0f} MB", flush=True)
            steps = run_steps(args, beacons) if args.nodes else []
            relay = run_relay(args, beacons) if args.relay_pairs else None
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=20)
            if redis is not None:
                redis.stop()
    return {"steps": steps, "relay": relay}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000, help="simulated nodes (0: none)")
    parser.add_argument("--interval", type=float, default=25.0,
                        help="seconds between a node's REGISTERs (default 25: the keepalive)")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        help="registrations/s steps, comma-separated, instead of nodes/interval")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each step")
    parser.add_argument("--resolve-share", type=float, default=0.1,
                        help="resolves per registration (default 0.1)")
    parser.add_argument("--introduce-share", type=float, default=0.05,
                        help="introductions per registration (default 0.05)")
    parser.add_argument("--ramp-rate", type=float, default=1500.0,
                        help="first registrations per second (the beacon checks 2,000 new keys/s)")
    parser.add_argument("--ramp-timeout", type=float, default=180.0)
    parser.add_argument("--grace", type=float, default=2.0,
                        help="seconds an answer may take before it counts as lost")
    parser.add_argument("--per-ip", type=int, default=NODES_PER_IP,
                        help="simulated nodes per source address (at most 64, the name limit)")
    parser.add_argument("--processes", type=int, default=0,
                        help=f"generator processes (default: one per {NODES_PER_PROCESS} nodes)")
    parser.add_argument("--relay-pairs", type=int, default=0, help="node pairs relaying")
    parser.add_argument("--relay-rate", type=float, default=100_000.0,
                        help="relayed packets per second in all")
    parser.add_argument("--relay-seconds", type=float, default=10.0)
    parser.add_argument("--relay-gso", type=int, default=GSO_BATCH,
                        help=f"RELAYs per sendmsg, sent with UDP GSO (default {GSO_BATCH}); 1: "
                        "one sendto each, which the beacon then can't read in batches either")
    parser.add_argument("--salt", type=int, default=0, help="varies the nodes' keys")
    parser.add_argument("--workers", type=int, default=1,
                        help="the beacon's worker processes (more than 1 implies --store redis)")
    parser.add_argument("--beacons", type=int, default=1,
                        help="beacons sharing one Redis (more than 1 implies --store redis); the "
                        "generators split the nodes among them, the relay runs through the first")
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite",
                        help="sqlite (default) or a redis-server the benchmark starts")
    parser.add_argument("--swarm-child", help=argparse.SUPPRESS)
    parser.add_argument("--relay-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers > 1 or args.beacons > 1:
        args.store = "redis"
    if not (1 <= args.workers <= 8 and 1 <= args.beacons <= 4):
        parser.error("bounded: 1 to 8 workers, 1 to 4 beacons")
    if args.nodes > 200_000 or args.seconds > 300 or args.relay_seconds > 120:
        parser.error("bounded: at most 200,000 nodes, 300 s steps and 120 s of relay")
    if args.relay_pairs > 1000 or args.relay_rate > 1e6:
        parser.error("bounded: at most 1,000 relay pairs and 1M packets/s")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.swarm_child:
        swarm_child(json.loads(args.swarm_child))
    elif args.relay_child:
        relay_child(json.loads(args.relay_child))
    else:
        measure(args)


if __name__ == "__main__":
    main()
