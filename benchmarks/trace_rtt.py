"""Where a round trip's time goes, from the kernel's clock: each hop of a request/reply split into
the wake-up, the event loop reaching the socket, and the work from reading a datagram to sending
the answer.

    sudo .venv/bin/python -m benchmarks.trace_rtt [--only CASE ...] [--rounds N]

Needs root and tracefs (/sys/kernel/tracing, mounted if it is not): it enables the syscall
tracepoints of sendto, sendmsg, recvfrom, recvmsg, recvmmsg and the waits (epoll_wait,
epoll_pwait, select, poll...), on the ``mono`` clock, while the benchmark's rtt measurement
runs, then matches each datagram sent by one process to the other process's wait, read and next
send. Times are medians over the second half of the round trips (steady state). Tracing itself
adds about a microsecond per syscall, so RTTs come out a little higher than in
``benchmarks.bench``.
"""

from __future__ import annotations

import argparse
import bisect
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import Params
from benchmarks.runner import CaseFailed, run_pair

TRACEFS = Path("/sys/kernel/tracing")
WAITS = ("epoll_wait", "epoll_pwait", "epoll_pwait2", "select", "pselect6", "poll", "ppoll")
# recvmmsg: the node reads its socket in batches (net/io/udp.DatagramReader); sendmsg and
# recvmsg: libuv's UDP handles (udp-uvloop).
SENDS = ("sendto", "sendmsg")
READS = ("recvfrom", "recvmmsg", "recvmsg")
TRACEPOINTS = ([f"sys_enter_{s}" for s in SENDS] + [f"sys_exit_{r}" for r in READS]
               + [f"sys_exit_{w}" for w in WAITS])
DEFAULT_CASES = ("zmq-tcp", "zmq-asyncio", "tunnel", "tunnel-asyncio", "core-blocking")
LINE = re.compile(r"^\s*.+?-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): sys_(\w+)(?:\(| -> )(.*)$")


@dataclass
class Timeline:
    """One thread's syscalls of interest, each list in time order (seconds)."""

    sends: list[float] = field(default_factory=list)
    reads: list[float] = field(default_factory=list)
    wakes: list[float] = field(default_factory=list)


@dataclass
class Hop:
    wake: float  # the peer's send to this side's return from its wait (0 if it never slept)
    to_read: float  # return from the wait to the datagram read
    to_send: float  # datagram read to the answer's send

    @property
    def total(self) -> float:
        return self.wake + self.to_read + self.to_send


def parse(trace: str) -> dict[int, Timeline]:
    threads: dict[int, Timeline] = defaultdict(Timeline)
    for line in trace.splitlines():
        match = LINE.match(line)
        if match is None:
            continue
        tid, at, call, rest = int(match[1]), float(match[2]), match[3], match[4]
        if call in SENDS:
            threads[tid].sends.append(at)
        elif call in READS:
            if not rest.startswith("0xf") and rest not in ("0x0", "0"):  # a datagram, not -errno
                threads[tid].reads.append(at)
        elif call in WAITS and rest not in ("0x0", "0"):  # woke with something ready
            threads[tid].wakes.append(at)
    return threads


def hops(sender: Timeline, receiver: Timeline) -> list[Hop]:
    """Each datagram ``sender`` sent, followed into ``receiver`` up to its next send."""
    out = []
    for sent in sender.sends:
        i = bisect.bisect_right(receiver.reads, sent)
        if i == len(receiver.reads):
            break
        read = receiver.reads[i]
        j = bisect.bisect_right(receiver.sends, read)
        if j == len(receiver.sends):
            break
        k = bisect.bisect_left(receiver.wakes, read) - 1
        woke = receiver.wakes[k] if k >= 0 and receiver.wakes[k] > sent else None
        if woke is None:  # it was awake when the datagram came: no wake-up to count
            out.append(Hop(0.0, read - sent, receiver.sends[j] - read))
        else:
            out.append(Hop(woke - sent, read - woke, receiver.sends[j] - read))
    return out


def summarize(threads: dict[int, Timeline]) -> tuple[list[Hop], list[Hop]] | None:
    """Request hops (client -> server) and reply hops, the two busiest senders taken as client
    and server (the client sends first)."""
    busiest = sorted(threads.values(), key=lambda t: len(t.sends), reverse=True)[:2]
    if len(busiest) < 2 or not busiest[0].sends or not busiest[1].sends:
        return None
    client, server = sorted(busiest, key=lambda t: t.sends[0])
    requests, replies = hops(client, server), hops(server, client)
    steady = len(requests) // 2
    return requests[steady:], replies[steady:]


def _us(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:.1f}"


def _cell(side: list[Hop]) -> str:
    parts = ("wake", "to_read", "to_send")
    return " / ".join(_us([getattr(hop, part) for hop in side]) for part in parts)


def _set(path: str, value: str) -> None:
    (TRACEFS / path).write_text(value)


def traced(points: Iterable[str], action: Callable[[], object]) -> str:
    """The trace of the syscall tracepoints ``points`` while ``action`` runs. On the ``mono``
    clock: the default ``local`` clock is per CPU and not synchronised across CPUs, which
    skews every hop between processes on different CPUs (changing the clock empties the
    trace, so it is read before the clock is put back)."""
    clock = (TRACEFS / "trace_clock").read_text().split("[")[1].split("]")[0]
    _set("tracing_on", "0")
    _set("trace_clock", "mono")
    _set("trace", "")
    _set("buffer_size_kb", "65536")
    for point in points:
        _set(f"events/syscalls/{point}/enable", "1")
    try:
        _set("tracing_on", "1")
        action()
        _set("tracing_on", "0")
        return (TRACEFS / "trace").read_text()
    finally:
        _set("tracing_on", "0")
        for point in points:
            _set(f"events/syscalls/{point}/enable", "0")
        _set("trace_clock", clock)


def trace_case(case: str, p: Params) -> str:
    return traced(TRACEPOINTS, lambda: run_pair(case, "rtt", p))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="CASE", help="a case (repeatable)")
    parser.add_argument("--rounds", type=int, default=2000, help="round trips per case")
    args = parser.parse_args()
    if not (TRACEFS / "events/syscalls").is_dir():
        # A VM that booted without it mounted (seen here): mounting it needs root too.
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True,
                       check=False)
    if not (TRACEFS / "events/syscalls").is_dir():
        print(f"trace_rtt: needs root and tracefs at {TRACEFS} (syscall tracepoints)",
              file=sys.stderr)
        return 2
    print("| case | RTT | request hop: wake-up / loop to read / read to send "
          "| reply hop: wake-up / loop to read / read to send |")
    print("|---|---:|---|---|")
    with tempfile.TemporaryDirectory(prefix="pilot-trace-") as workdir:
        p = Params(rtt_warmup=100, rtt_count=args.rounds, workdir=workdir)
        for case in args.only or DEFAULT_CASES:
            try:
                found = summarize(parse(trace_case(case, p)))
            except CaseFailed as exc:
                print(f"| {case} | error: {exc} | | |")
                continue
            if found is None:
                print(f"| {case} | no datagram syscalls seen (not UDP?) | | |")
                continue
            requests, replies = found
            rtt = [a.total + b.total for a, b in zip(requests, replies, strict=False)]
            print(f"| {case} | {_us(rtt)} | {_cell(requests)} | {_cell(replies)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
