"""The NAT-lab loss benchmark: each congestion controller, side by side, over lossy WAN links.

Two scenarios, each run in a fresh lab per controller (real beacon and nodes, see ``tests/natlab``
and ``benchmarks/natlab_matrix.py``):

- *loss*: cone <-> cone, each NAT's WAN link delaying what it sends into the internet by 25 ms
  and dropping ``--losses`` percent of it (so every crossing between the homes costs 25 ms and
  one chance of loss; round trip 50 ms). Once the tunnel is direct, alpha sends one
  ``--size-mb`` MiB message; the time runs from the send until bravo has the whole message
  (SHA-256 checked), and the table gives MB/s (10**6 bytes).
- *fairness*: two tunnels share one bottleneck, a token bucket (``tc ... tbf``) of ``--rate-mbit``
  on the uplink of the NAT both senders sit behind, with a queue of one bandwidth-delay product,
  25 ms delay per crossing and no random loss. Both send 1 MiB messages for ``--seconds`` after a
  warm-up; the table gives each one's MB/s over that window and their ratio (target: within 2x).

    sudo .venv/bin/python -m benchmarks.natlab_loss                 # 16 MiB at 0/1/5 %, fairness
    .venv/bin/python -m benchmarks.natlab_loss --losses 1 --size-mb 4 --no-fairness
    .venv/bin/python -m benchmarks.natlab_loss --write               # also update RESULTS.md

``--write`` replaces only the part of ``benchmarks/RESULTS.md`` between ``<!-- natlab-loss:start
-->`` and ``<!-- natlab-loss:end -->``. Needs root (network namespaces). NewReno at 5 % loss
moves well under 100 kB/s here, so its 16 MiB take minutes: the whole run takes ~15 minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from benchmarks import report
from benchmarks.natlab_matrix import attempt, log
from pilot_agents.net.tunnel.congestion import ALGORITHMS
from tests.natlab import Lab
from tests.natlab.conftest_helpers import natlab_unavailable_reason
from tests.natlab.pilot_node import PilotNode
from tests.test_natlab_traversal import (
    SERVICE_PORT,
    build_pair,
    first_exchange,
    send_checked,
    start_beacon,
    wait_for_path,
)

NAME = "natlab-loss"
HEADING = "## NAT lab: congestion control under loss"
DELAY_MS = 25.0  # per crossing between the two homes
REPLY_SIZE = 100  # bytes bravo answers each message with
CHUNK = 1 << 20  # bytes per message in the fairness scenario
WARMUP = 3.0  # seconds both fairness flows run before the window opens


@dataclass
class Transfer:
    seconds: float
    size: int
    dropped: str  # the delay line's drop counts, per link

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6


def run_transfer(
    lab: Lab, workdir: Path, *, controller: str, loss: float, size: int, timeout: float
) -> Transfer:
    """One ``size``-byte message alpha -> bravo over the lossy, delayed cone <-> cone path."""
    pair = build_pair(lab, workdir, "cone-cone", congestion=controller)
    a, b = pair.a, pair.b
    try:
        for seed, nat in enumerate(pair.nats.values(), start=1):
            lab.impair(nat, delay_ms=DELAY_MS, loss=loss, seed=seed, direction="up")
        first_exchange(pair)
        wait_for_path(pair, "direct")
        b.call("reply_size", port=SERVICE_PORT, size=REPLY_SIZE, timeout=5)
        started = time.monotonic()
        got = send_checked(pair, size, timeout)
        stats = lab.delayline_stats().get("links", {})
        dropped = ", ".join(f"{c['up_drop']}/{c['up_in']}" for c in stats.values())
        return Transfer(got["t"] - started, size, dropped)
    finally:
        a.close()
        b.close()


def _connect(a: PilotNode, b: PilotNode, conn: str) -> None:
    """alpha-n trusts bravo-n, connects by name, and the tunnel goes direct."""
    a.call("trust", node_id=b.node_id, timeout=5)
    b.call("trust", node_id=a.node_id, timeout=5)
    b.call("listen", port=SERVICE_PORT, reply_seed=2, timeout=5)
    b.call("reply_size", port=SERVICE_PORT, size=REPLY_SIZE, timeout=5)
    a.call("connect", conn=conn, peer=b.name, port=SERVICE_PORT, size=1000, seed=1, timeout=20)
    a.wait_event(
        lambda e: e.get("event") == "path" and e["peer"] == b.node_id and e["path"] == "direct",
        10,
    )


def run_fairness(
    lab: Lab, workdir: Path, *, controller: str, rate_mbit: float, seconds: float
) -> tuple[float, float]:
    """Each flow's MB/s over ``seconds``, both sending through one ``rate_mbit`` bottleneck."""
    workdir.mkdir(parents=True, exist_ok=True)
    beacon = start_beacon(lab, lab.add_public_host("beacon"), workdir)
    senders_nat, receivers_nat = lab.add_nat("nat_a", "cone"), lab.add_nat("nat_b", "cone")
    for nat in (senders_nat, receivers_nat):
        lab.impair(nat, delay_ms=DELAY_MS, direction="up")
    queue = int(rate_mbit * 1e6 / 8 * 2 * DELAY_MS / 1000)  # one BDP, bytes
    lab.exec(
        senders_nat,
        ["tc", "qdisc", "replace", "dev", senders_nat.wan_iface, "root", "tbf",
         "rate", f"{rate_mbit}mbit", "burst", "16kb", "limit", str(queue)],
    )  # fmt: skip
    nodes: list[PilotNode] = []
    try:
        for nat, side in ((senders_nat, "alpha"), (receivers_nat, "bravo")):
            for n in (1, 2):
                host = lab.add_host_behind(nat, f"{side[0]}{n}")
                nodes.append(
                    PilotNode(
                        lab,
                        host,
                        home=workdir / f"{side}{n}",
                        beacon=beacon.address,
                        hostname=f"{side}{n}",
                        log_path=workdir / f"{side}{n}.log",
                        congestion=controller,
                    )
                )
        flows = [(nodes[0], nodes[2]), (nodes[1], nodes[3])]
        for i, (a, b) in enumerate(flows):
            _connect(a, b, f"c{i}")
        # Enough queued on each to outlast the window even if one flow took the whole link.
        count = int(rate_mbit * 1e6 / 8 * (WARMUP + seconds + 5) / CHUNK) + 1
        marks = [b.mark() for _, b in flows]
        for i, (a, _) in enumerate(flows):
            for _ in range(count):
                a.send({"cmd": "send", "conn": f"c{i}", "size": CHUNK, "seed": 5, "timeout": 120})
        opened = time.monotonic() + WARMUP
        time.sleep(WARMUP + seconds)
        closed = opened + seconds
        rates = []
        for (_, b), mark in zip(flows, marks, strict=True):
            got = [
                e for e in b.events[mark:]
                if e.get("event") == "received" and opened <= e["t"] < closed
            ]  # fmt: skip
            rates.append(len(got) * CHUNK / seconds / 1e6)
        return rates[0], rates[1]
    finally:
        for node in nodes:
            node.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--controllers", default="newreno,cubic,bbr", help="the first is the ratios' base"
    )
    parser.add_argument("--losses", default="0,1,5", help="random loss per crossing, percent")
    parser.add_argument("--size-mb", type=float, default=16, help="MiB per transfer")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per transfer, at most")
    parser.add_argument("--no-fairness", action="store_true", help="skip the shared bottleneck")
    parser.add_argument("--rate-mbit", type=float, default=40, help="the bottleneck, Mbit/s")
    parser.add_argument("--seconds", type=float, default=20, help="the fairness window")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy failed runs' logs here")
    parser.add_argument("--write", action="store_true", help=f"update {report.RESULTS}")
    args = parser.parse_args(argv)
    reason = natlab_unavailable_reason()
    if reason:
        print(f"natlab_loss: {reason}", file=sys.stderr)
        return 2
    controllers = [c.strip() for c in args.controllers.split(",") if c.strip()]
    unknown = [c for c in controllers if c not in ALGORITHMS]
    if unknown:
        parser.error(f"unknown controllers {unknown}; choose from {', '.join(ALGORITHMS)}")
    losses = [float(x) for x in args.losses.split(",") if x.strip()]
    size = int(args.size_mb * 2**20)
    started = time.monotonic()
    failed: list[str] = []
    lines = [
        f"{args.size_mb:g} MiB alpha -> bravo, cone <-> cone, {DELAY_MS:g} ms per crossing (RTT "
        f"{2 * DELAY_MS:g} ms), random loss on each crossing; MB/s (10^6 bytes/s), dropped/seen "
        "by the delay line per link in parentheses.",
        "",
        "| loss | " + " | ".join(controllers) + " | " + " | ".join(
            f"{c} / {controllers[0]}" for c in controllers[1:]
        ) + " |",
        "|---:|" + "---:|" * (2 * len(controllers) - 1),
    ]  # fmt: skip
    for loss in losses:
        cells: list[str] = []
        rates: list[float | None] = []
        for controller in controllers:
            label = f"{controller} at {loss:g} %"
            res = attempt(
                label,
                partial(run_transfer, controller=controller, loss=loss / 100, size=size,
                        timeout=args.timeout),
                args.keep_logs,
            )  # fmt: skip
            if isinstance(res, str):
                failed.append(label)
                cells.append(f"FAILED: {res}")
                rates.append(None)
            else:
                log(f"    {res.mb_per_s:.2f} MB/s ({res.seconds:.1f} s)")
                cells.append(f"{res.mb_per_s:.2f} ({res.dropped})")
                rates.append(res.mb_per_s)
        base = rates[0]
        ratios = [
            f"{r / base:.1f}x" if r is not None and base else "-" for r in rates[1:]
        ]  # fmt: skip
        lines.append(f"| {loss:g} % | " + " | ".join(cells + ratios) + " |")
    if not args.no_fairness:
        lines += [
            "",
            f"Two tunnels (alpha1 -> bravo1, alpha2 -> bravo2) through one {args.rate_mbit:g} "
            f"Mbit/s bottleneck (tbf, queue of one BDP) on the senders' NAT uplink, "
            f"{DELAY_MS:g} ms per crossing, no random loss; MB/s of each over {args.seconds:g} s "
            f"after {WARMUP:g} s of warm-up.",
            "",
            "| controller | flow 1 MB/s | flow 2 MB/s | sum | ratio (target < 2) |",
            "|---|---:|---:|---:|---:|",
        ]
        for controller in controllers:
            shared = attempt(
                f"fairness {controller}",
                partial(run_fairness, controller=controller, rate_mbit=args.rate_mbit,
                        seconds=args.seconds),
                args.keep_logs,
            )  # fmt: skip
            if isinstance(shared, str):
                failed.append(f"fairness {controller}")
                lines.append(f"| {controller} | FAILED: {shared} | | | |")
                continue
            one, two = shared
            ratio = max(one, two) / min(one, two) if min(one, two) > 0 else float("inf")
            log(f"    {one:.2f} + {two:.2f} MB/s, ratio {ratio:.2f}")
            lines.append(
                f"| {controller} | {one:.2f} | {two:.2f} | {one + two:.2f} | {ratio:.2f} |"
            )
    elapsed = time.monotonic() - started
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"]
    cmd = " ".join(["python -m benchmarks.natlab_loss", *shown])
    header = [
        f"Written by `benchmarks/natlab_loss.py --write`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}; "
        f"`{cmd}` took {elapsed:.0f} s. Each cell is one run in a fresh lab. Loss-free, a "
        "transfer takes about a second and the CPU is the limit: that row varies by ±30 % "
        "between runs (and more on a busy machine).",
        "",
    ]
    text = "\n".join(header + lines)
    print(text)
    if args.write:
        written = report.write_section(NAME, f"{HEADING}\n\n{text}")
        log(f"wrote {written}")
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
