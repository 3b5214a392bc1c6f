"""Benchmark pilot-agents' pub/sub and req/rep patterns against pyzmq, zenoh, NATS and Redis,
side by side in one run.

.venv/bin/python -m benchmarks.patterns [--quick] [--only NAME] [--reqrep] [--json] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.harness import HOST, RttResult, load
from benchmarks.machine import CpuSample, describe, others_share
from benchmarks.pattern_harness import (
    PatternCase,
    PatternParams,
    PubResult,
    ReqRepCase,
    SubResult,
    free_port,
)
from benchmarks.patterns_cases import CASES
from benchmarks.runner import CaseFailed, RoleSpec, measure, run_roles, suspect

SERVICE_START = 10.0
"""Seconds a server gets to accept connections after it is started."""
SECTION = "patterns"
"""The name of this benchmark's section in RESULTS.md."""
HEADER = ("case", "pub/sub 1 sub msg/s", "lost", "pub/sub {n} subs msg/s", "lost",
          "req/rep median µs", "p99 µs", "notes")
NUMERIC = {1, 2, 3, 4, 5, 6}


class Unavailable(Exception):
    """A case can't run here (its client library or its server is missing)."""


@dataclass(frozen=True)
class PubSub:
    """A pub/sub measurement: the publisher's and every subscriber's results."""

    publisher: PubResult
    subscribers: tuple[SubResult, ...]

    @property
    def delivered(self) -> int:
        return sum(s.received for s in self.subscribers)

    @property
    def lost(self) -> int:
        return self.publisher.published * len(self.subscribers) - self.delivered

    @property
    def seconds(self) -> float:
        """From the first publication to the last subscriber's last arrival."""
        last = max((s.last_ns for s in self.subscribers), default=0)
        return max(last - self.publisher.start_ns, 1) / 1e9

    @property
    def rate(self) -> float:
        """Publications per second each subscriber received (all delivered / subscribers /
        :attr:`seconds`)."""
        return self.delivered / len(self.subscribers) / self.seconds

    def notes(self) -> list[str]:
        out = []
        if duplicates := sum(s.duplicates for s in self.subscribers):
            out.append(f"{duplicates} duplicates")
        if reordered := sum(s.reordered for s in self.subscribers):
            out.append(f"{reordered} out of order")
        if quiet := sum(not s.ended for s in self.subscribers):
            out.append(f"{quiet} subscriber(s) saw no end marker")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "subscribers": len(self.subscribers),
            "published": self.publisher.published,
            "publish_seconds": round(self.publisher.seconds, 4),
            "delivered": self.delivered,
            "lost": self.lost,
            "seconds": round(self.seconds, 4),
            "msgs_per_s_per_subscriber": round(self.rate, 1),
            "duplicates": sum(s.duplicates for s in self.subscribers),
            "reordered": sum(s.reordered for s in self.subscribers),
        }


@dataclass
class Row:
    """One case's line in the table."""

    case: str
    passes: dict[int, list[PubSub]] = field(default_factory=dict)
    """Pub/sub measurements by number of subscribers, one per pass."""
    rtt: RttResult | None = None
    notes: list[str] = field(default_factory=list)
    others_cpu: dict[str, float] = field(default_factory=dict)
    """Share of the CPU other processes used during each measurement."""

    def pubsub(self, subscribers: int) -> PubSub | None:
        """The pass with the median rate (of an even number, the slower middle one)."""
        passes = sorted(self.passes.get(subscribers, []), key=lambda m: m.rate)
        return passes[(len(passes) - 1) // 2] if passes else None

    def add_pass(self, other: Row) -> None:
        """Fold in another pass of the same case: its measurements, notes and CPU shares."""
        for n, measured in other.passes.items():
            self.passes.setdefault(n, []).extend(measured)
        if other.rtt is not None:
            self.rtt = other.rtt if self.rtt is None else self.rtt + other.rtt
        self.notes += [note for note in other.notes if note not in self.notes]
        for label, share in other.others_cpu.items():
            self.others_cpu[label] = max(self.others_cpu.get(label, 0.0), share)

    def remarks(self) -> list[str]:
        return suspect(self.others_cpu.values()) + self.notes

    def cells(self, fanout: int) -> tuple[str, ...]:
        def rate(n: int) -> tuple[str, str]:
            got = self.pubsub(n)
            return (f"{got.rate:.0f}", str(got.lost)) if got else (report.MISSING,) * 2

        median = f"{self.rtt.median_us:.1f}" if self.rtt else report.MISSING
        p99 = f"{self.rtt.p99_us:.1f}" if self.rtt else report.MISSING
        return (self.case, *rate(1), *rate(fanout), median, p99, "; ".join(self.remarks()))

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "pubsub": [m.to_json() for passes in self.passes.values() for m in passes],
            "rtt_median_us": round(self.rtt.median_us, 1) if self.rtt else None,
            "rtt_p99_us": round(self.rtt.p99_us, 1) if self.rtt else None,
            "rtt_samples": len(self.rtt.samples_ns) if self.rtt else None,
            "others_cpu": {kind: round(share, 3) for kind, share in self.others_cpu.items()},
            "notes": self.remarks(),
        }


# --- servers ----------------------------------------------------------------------------------


def _binary(name: str) -> str:
    """The server's executable: on PATH, or where Debian puts it (nats-server: /usr/sbin)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise Unavailable(f"{name} not installed (scripts/install-bench.sh)")
    return found


@contextlib.contextmanager
def server(name: str, workdir: Path) -> Iterator[str]:
    """A fresh ``nats-server`` or ``redis-server`` on 127.0.0.1 and an ephemeral port, its files
    in a temporary directory; its address. Stopped and waited for on exit, so the CPU it used
    counts as ours."""
    binary = _binary(name)
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    if name == "nats-server":
        command = [binary, "-a", HOST, "-p", str(port), "--log", str(home / "log")]
        address = f"nats://{HOST}:{port}"
    else:
        command = [binary, "--bind", HOST, "--port", str(port), "--dir", str(home),
                   "--save", "", "--appendonly", "no", "--logfile", str(home / "log")]
        address = f"{HOST}:{port}"
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _await_listening(proc, port, name)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(SERVICE_START)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def _await_listening(proc: subprocess.Popen[bytes], port: int, name: str) -> None:
    deadline = time.monotonic() + SERVICE_START
    while True:
        if proc.poll() is not None:
            raise CaseFailed(f"{name} exited at start (status {proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise CaseFailed(f"{name} did not listen on port {port} within {SERVICE_START} s")
        time.sleep(0.02)


# --- measurements -------------------------------------------------------------------------------


def run_case(name: str, p: PatternParams, pubsub: bool = True) -> Row:
    """The case's pub/sub to 1 and to ``fanout`` subscribers (unless not ``pubsub``) and its
    round trips, each in fresh processes (and a fresh server, if it has one)."""
    row = Row(name)
    try:
        case = load(CASES[name])
        assert isinstance(case, ReqRepCase)
        if case.service is not None:
            _binary(case.service)
    except (ImportError, Unavailable) as exc:
        row.notes.append(f"unavailable: {type(exc).__name__}: {exc}")
        return row
    row.notes.append(case.about)
    spec = CASES[name]
    plans: list[tuple[str, list[RoleSpec]]] = [
        (f"pub/sub {n}", [("publisher", (n, m)), *(("subscriber", (m, i)) for i in range(n))])
        for n, m in ((1, p.messages), (p.fanout, p.fanout_messages))
        if pubsub and isinstance(case, PatternCase)
    ]
    plans.append(("req/rep", [("replier", ()), ("requester", ())]))
    for label, roles in plans:

        def run(roles: list[RoleSpec] = roles) -> list[object]:
            with contextlib.ExitStack() as stack:
                q = p
                if case.service is not None:
                    q = replace(p, service=stack.enter_context(
                        server(case.service, Path(p.workdir))))
                return run_roles(spec, [(m, (q, *args)) for m, args in roles], p.wait,
                                 p.deadline)

        results = measure(name, label, row.notes, row.others_cpu, run)
        if results is None:
            continue
        if label == "req/rep":
            assert isinstance(results[1], RttResult)
            row.rtt = results[1]
            _log(f"{name} req/rep: median {row.rtt.median_us:.1f} µs, "
                 f"p99 {row.rtt.p99_us:.1f} µs")
            continue
        pub, *subs = results
        assert isinstance(pub, PubResult)
        assert all(isinstance(s, SubResult) for s in subs)
        measured = PubSub(pub, tuple(s for s in subs if isinstance(s, SubResult)))
        row.passes.setdefault(len(subs), []).append(measured)
        row.notes += [f"{label}: {note}" for note in measured.notes()]
        _log(f"{name} {label}: {measured.rate:.0f} msg/s per subscriber, {measured.lost} lost")
    return row


# --- targets ------------------------------------------------------------------------------------


def targets(rows: dict[str, Row]) -> list[str]:
    """The issue's targets, each as a ratio measured in this run and whether it was met."""
    out: list[str] = []

    def to_one(case: str) -> PubSub | None:
        row = rows.get(case)
        return row.pubsub(1) if row else None

    def rate(case: str) -> float | None:
        measured = to_one(case)
        return measured.rate if measured else None

    def median(case: str) -> float | None:
        row = rows.get(case)
        return row.rtt.median_us if row and row.rtt else None

    def line(what: str, ours: float | None, theirs: float | None, limit: float,
             at_least: bool, extra: str = "") -> None:
        if ours is None or theirs is None or theirs == 0:
            out.append(f"- {what}: not measured")
            return
        ratio = ours / theirs
        met = ratio >= limit if at_least else ratio <= limit
        sign = "≥" if at_least else "≤"
        out.append(f"- {what}: {ratio:.3g}x (target {sign} {limit:g}x){extra}: "
                   f"{'met' if met else 'MISSED'}")

    for ours in ("embedded", "daemon"):
        measured = to_one(ours)
        lost = f"; {measured.lost} lost (target 0)" if measured else ""
        line(f"pub/sub to 1 subscriber, {ours} / nats-py", rate(ours), rate("nats-py"), 1.0,
             True, lost)
        line(f"pub/sub to 1 subscriber, {ours} / zenoh", rate(ours), rate("zenoh"), 0.5, True,
             lost)
    line("req/rep median, embedded / pyzmq REQ/REP", median("embedded"), median("pyzmq"), 1.2,
         False)
    line("req/rep median, daemon / nats-py request", median("daemon"), median("nats-py"), 1.0,
         False)
    return out


# --- output -------------------------------------------------------------------------------------


def sizes(p: PatternParams, passes: int) -> str:
    turns = (f"; {passes} passes with the cases taking turns: the pass with the median rate, "
             "round trips pooled" if passes > 1 else "")
    return (f"pub/sub: {p.messages} publications of {p.message_bytes} B to 1 subscriber, "
            f"{p.fanout_messages} to {p.fanout} subscribers (each in its own process), rate = "
            f"publications each subscriber received per second; req/rep: {p.rtt.rtt_count} "
            f"round trips of {p.rtt.msg_size} B after {p.rtt.rtt_warmup} warm-up{turns}")


def table(rows: list[Row], p: PatternParams) -> str:
    header = tuple(h.format(n=p.fanout) for h in HEADER)
    return report.grid(header, [row.cells(p.fanout) for row in rows], NUMERIC)


def markdown(rows: list[Row], p: PatternParams, passes: int, command: str,
             others: float | None) -> str:
    return f"""## Patterns: pub/sub and req/rep beside pyzmq, zenoh, NATS and Redis (issue #13)

Written by `benchmarks/patterns.py --write`, which replaces this section; see
`benchmarks/README.md` ("Pattern benchmarks") for what each number measures.

- Date: {report.now()}
- Machine: {describe()}
- Quiet: {report.interference(others)}
- Command: `{command}`
- Sizes: {sizes(p, passes)}

{table(rows, p)}

Targets (issue #13), from this run:

{chr(10).join(targets({row.case: row for row in rows}))}
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.patterns", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2000 publications (500 to each of the fan-out's subscribers), "
                             "500 round trips: about a minute")
    parser.add_argument("--only", action="append", choices=list(CASES), metavar="NAME",
                        help=f"run only this case (repeatable): {', '.join(CASES)}")
    parser.add_argument("--fanout", type=int, default=None, metavar="N",
                        help="subscribers of the fan-out measurement (default 10)")
    parser.add_argument("--messages", type=int, default=None, metavar="N",
                        help="publications to one subscriber (default 20000, about 0.2 s for "
                             "ours: mostly the tunnel's start-up; 200000 measures its steady "
                             "rate)")
    parser.add_argument("--passes", type=int, default=1, metavar="N",
                        help="measure every case N times, the cases taking turns; the table "
                             "shows the pass with the median rate and pools the round trips")
    parser.add_argument("--reqrep", action="store_true",
                        help="measure only the round trips (no pub/sub)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON instead of a table")
    parser.add_argument("--write", action="store_true",
                        help="also write the section in benchmarks/RESULTS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.fanout is not None and args.fanout < 2:
        print("--fanout must be at least 2", file=sys.stderr)
        return 2
    if args.messages is not None and args.messages < 1:
        print("--messages must be at least 1", file=sys.stderr)
        return 2
    if args.passes < 1:
        print("--passes must be at least 1", file=sys.stderr)
        return 2
    names = args.only or list(CASES)
    before = CpuSample.now()
    with tempfile.TemporaryDirectory(prefix="pilot-patterns-") as workdir:
        p = replace(PatternParams.quick() if args.quick else PatternParams(), workdir=workdir)
        if args.fanout is not None:
            p = replace(p, fanout=args.fanout)
        if args.messages is not None:
            p = replace(p, messages=args.messages)
        try:
            pubsub = not args.reqrep
            rows = [run_case(name, p, pubsub) for name in names]
            for _ in range(args.passes - 1):
                for row in rows:
                    row.add_pass(run_case(row.case, p, pubsub))
        finally:
            _stop_daemons(Path(workdir))
    others = others_share(before, CpuSample.now())
    command = report.command(argv, "benchmarks.patterns")
    if args.json:
        print(json.dumps({
            "date": report.now(), "machine": describe(), "command": command,
            "others_cpu": None if others is None else round(others, 3),
            "sizes": sizes(p, args.passes), "results": [row.to_json() for row in rows],
            "targets": targets({row.case: row for row in rows}),
        }, indent=2, ensure_ascii=False))
    else:
        print(f"{report.now()} · {describe()}\n{sizes(p, args.passes)}\n")
        print(table(rows, p))
        print("\n" + "\n".join(targets({row.case: row for row in rows})))
        print(f"\n{report.interference(others)}")
    if args.write:
        written = report.write_section(SECTION, markdown(rows, p, args.passes, command, others))
        print(f"wrote {written}", file=sys.stderr)
    return 0


def _stop_daemons(workdir: Path) -> None:
    """Stop a daemon a killed role left behind (a role stops its own when it ends normally)."""
    try:
        from pilot_agents import ipc
        from pilot_agents.daemon import stop
    except ImportError:
        return
    for home in workdir.iterdir():
        if home.is_dir() and ipc.daemon_pid(home) is not None:
            stop(home)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
