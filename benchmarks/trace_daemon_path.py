"""Where a round trip through the daemons spends its time, hop by hop, from the kernel's clock:
for each of the six hops (client → its daemon → tunnel → the server's daemon → server, and
back) the wake-up (the sender's write to the receiver's return from its wait) and the work
(the receiver's read to its own write onward).

    .venv/bin/python -m benchmarks.trace_daemon_path [--seconds S] [--rounds N]

Needs root and tracefs (/sys/kernel/tracing). It runs ``benchmarks.daemon_path`` (request/reply
on the stream socket) and traces a few seconds of its steady state: the syscall tracepoints of
the reads and writes each process makes per hop (``read``/``writev`` on the IPC socket,
``recvmmsg``/``sendto`` on the tunnel's) and of ``epoll_pwait``. Medians in µs; tracing adds
about a microsecond per traced syscall. ``benchmarks.daemon_path`` gives the CPU time per
process, this the latency each hop adds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.trace_rtt import LINE, TRACEFS, Hop, Timeline, hops, traced

EVENTS = ("sys_exit_read", "sys_enter_writev", "sys_exit_recvmmsg", "sys_enter_sendto",
          "sys_exit_epoll_pwait")
# (receiver, what it reads, what it writes onward), in the order a round trip passes them.
HOPS = (("client daemon", "read", "sendto"), ("server daemon", "recvmmsg", "writev"),
        ("server", "read", "writev"), ("server daemon", "read", "sendto"),
        ("client daemon", "recvmmsg", "writev"), ("client", "read", "writev"))


def roles(client: int) -> dict[int, str]:
    """The processes of the run, by role: ``client`` is the benchmark itself, the daemons and
    the server are told apart by their command lines."""
    found = {client: "client"}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"benchmarks.daemon_path --serve" in cmdline:
            found[int(entry.name)] = "server"
        elif b"pilot_agents.daemon" in cmdline and b"daemon-path-" in cmdline:
            found[int(entry.name)] = ("client daemon" if b"/client" in cmdline
                                      else "server daemon")
    return found


def parse(trace: str, pids: dict[int, str]) -> dict[str, dict[str, list[float]]]:
    """Each role's event times (seconds), by call: ``read`` and ``recvmmsg`` when they return
    data, ``writev`` and ``sendto`` when they start, ``wake`` when a wait returns ready."""
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in trace.splitlines():
        match = LINE.match(line)
        if match is None or int(match[1]) not in pids:
            continue
        at, call, rest = float(match[2]), match[3], match[4]
        if rest in ("0x0", "0") or rest.startswith("0xf"):  # nothing read, or -errno
            continue
        times[pids[int(match[1])]]["wake" if call == "epoll_pwait" else call].append(at)
    return times


def hop_split(times: dict[str, dict[str, list[float]]], sender: str, sent_by: str,
              receiver: str, reads: str, writes: str) -> list[Hop]:
    """Each ``sent_by`` write of ``sender`` followed into ``receiver``'s ``reads`` call and its
    ``writes`` onward, split as trace_rtt splits a hop."""
    theirs, mine = times[sender], times[receiver]
    found = hops(Timeline(sends=theirs[sent_by]),
                 Timeline(sends=mine[writes], reads=mine[reads], wakes=mine["wake"]))
    return found[len(found) // 4:]  # past the start of tracing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to trace")
    parser.add_argument("--rounds", type=int, default=20000,
                        help="round trips of the run (it must outlast the tracing)")
    args = parser.parse_args()
    if not (TRACEFS / "events/syscalls").is_dir():
        print(f"trace_daemon_path: needs root and tracefs at {TRACEFS}", file=sys.stderr)
        return 2
    run = subprocess.Popen([sys.executable, "-m", "benchmarks.daemon_path", "--rounds",
                            str(args.rounds)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(5)  # start-up, handshakes and the warm-up round trips
        pids = roles(run.pid)
        trace = traced(EVENTS, lambda: time.sleep(args.seconds))
    finally:
        summary = run.communicate()[0].strip()
    if len(set(pids.values())) < 4:
        print(f"trace_daemon_path: found {sorted(pids.values())}, not the four processes",
              file=sys.stderr)
        return 1
    times = parse(trace, pids)
    print(f"daemon_path (whole run, untraced but for {args.seconds} s): {summary}")
    print("| hop | wake-up µs | work µs |")
    print("|---|---:|---:|")
    total = 0.0
    previous = HOPS[-1]
    for receiver, reads, writes in HOPS:
        split = hop_split(times, previous[0], previous[2], receiver, reads, writes)
        if not split:
            print(f"| {previous[0]} → {receiver} | no events | |")
            return 1
        wake = statistics.median(h.wake for h in split) * 1e6
        busy = statistics.median(h.to_send for h in split) * 1e6
        total += wake + busy
        print(f"| {previous[0]} → {receiver} ({reads} … {writes}) | {wake:.1f} | {busy:.1f} |")
        previous = (receiver, reads, writes)
    print(f"\nsum of the medians: {total:.0f} µs; pid roles: "
          + ", ".join(f"{role} {pid}" for pid, role in sorted(pids.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
