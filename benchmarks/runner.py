"""Runs a case's server and client in two spawned processes and relays between them.

The runner is the only thing that waits without a transport-level timeout, and it waits at most
:attr:`Params.pair_deadline` for a pair; then it ends both processes and reports an error.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
import time
import traceback
from collections.abc import Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from benchmarks.cases import load_case
from benchmarks.harness import KINDS, BulkResult, Control, Kind, Params, Result, RttResult
from benchmarks.machine import CpuSample, others_share

Role = Literal["server", "client"]
ROLES: tuple[Role, ...] = ("server", "client")
BUSY_SHARE = 0.05
"""Above this share of the CPU taken by other processes, a measurement is flagged as suspect."""
REAP_GRACE = 3.0
"""Seconds a finished role gets to exit before it is terminated, then killed."""


class CaseFailed(Exception):
    """A server/client pair did not produce a result."""


@dataclass
class Row:
    """One case's line in the results table."""

    case: str
    bulk: BulkResult | None = None
    rtt: RttResult | None = None
    notes: list[str] = field(default_factory=list)
    others_cpu: dict[Kind, float] = field(default_factory=dict)
    """Share of the CPU other processes used during each measurement."""

    def add_pass(self, other: Row) -> None:
        """Fold in another RTT pass of the same case: its samples, its notes and its CPU."""
        if other.rtt is not None:
            self.rtt = other.rtt if self.rtt is None else self.rtt + other.rtt
        self.notes += [note for note in other.notes if note not in self.notes]
        if "rtt" in other.others_cpu:
            self.others_cpu["rtt"] = max(self.others_cpu.get("rtt", 0.0), other.others_cpu["rtt"])

    def remarks(self) -> list[str]:
        """The notes, led by a warning if other processes took a share of the CPU meanwhile."""
        busiest = max(self.others_cpu.values(), default=0.0)
        if busiest <= BUSY_SHARE:
            return self.notes
        return [f"SUSPECT: other processes took up to {busiest:.0%} of the CPU", *self.notes]

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "bulk_mb_per_s": round(self.bulk.mb_per_s, 2) if self.bulk else None,
            "bulk_seconds": round(self.bulk.seconds, 4) if self.bulk else None,
            "bulk_loss": round(self.bulk.loss, 4) if self.bulk else None,
            "rtt_median_us": round(self.rtt.median_us, 1) if self.rtt else None,
            "rtt_p99_us": round(self.rtt.p99_us, 1) if self.rtt else None,
            "rtt_samples": len(self.rtt.samples_ns) if self.rtt else None,
            "others_cpu": {kind: round(share, 3) for kind, share in self.others_cpu.items()},
            "notes": self.remarks(),
        }


def run_case(name: str, p: Params, kinds: tuple[Kind, ...] = KINDS) -> Row:
    """The case's measurements of these kinds, each in a fresh server/client pair."""
    row = Row(name)
    try:
        case = load_case(name)
    except ImportError as exc:
        row.notes.append(f"unavailable: {_describe(exc)}")
        return row
    row.notes.append(case.about)
    for kind in kinds:
        _log(f"{name} {kind} ...")
        before = CpuSample.now()
        try:
            result = run_pair(name, kind, p)
        except CaseFailed as exc:
            row.notes.append(f"{kind} error: {exc}")
            _log(f"{name} {kind} failed: {exc}")
            continue
        share = others_share(before, CpuSample.now())
        if share is not None:
            row.others_cpu[kind] = share
        if isinstance(result, BulkResult):
            row.bulk = result
            if result.note:
                row.notes.append(result.note)
            _log(f"{name} bulk: {result.mb_per_s:.1f} MB/s ({result.seconds:.2f} s)")
        else:
            row.rtt = result
            _log(f"{name} rtt: median {result.median_us:.1f} µs, p99 {result.p99_us:.1f} µs")
    return row


def run_pair(case: str, kind: Kind, p: Params) -> Result:
    """Spawns the case's server and client; returns the client's measurement."""
    ctx = mp.get_context("spawn")
    links: dict[Role, Connection] = {}
    procs: dict[Role, BaseProcess] = {}
    grace = 0.2  # a failed pair's other role may be stuck in a long wait: end it promptly
    try:
        for role in ROLES:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_role_main,
                args=(case, role, kind, p, theirs),
                name=f"bench-{case}-{kind}-{role}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            links[role] = ours
            procs[role] = proc
        result = _relay(links, procs, p.pair_deadline)
        grace = REAP_GRACE
    finally:
        for child in procs.values():
            _reap(child, grace)
    if not isinstance(result, BulkResult | RttResult):
        raise CaseFailed(f"client returned {type(result).__name__}, not a measurement")
    return result


def _relay(links: dict[Role, Connection], procs: dict[Role, BaseProcess], limit: float) -> object:
    """Forwards what each role publishes to the other until both report; returns the client's."""
    deadline = time.monotonic() + limit
    waiting = {conn: role for role, conn in links.items()}
    results: dict[Role, object] = {}
    while waiting:
        ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            pending = " and ".join(waiting.values())
            raise CaseFailed(f"timed out after {limit:.0f} s waiting for the {pending}")
        for conn in ready:
            assert isinstance(conn, Connection)
            role = waiting[conn]
            try:
                tag, body = conn.recv()
            except EOFError:
                procs[role].join(REAP_GRACE)
                code = procs[role].exitcode
                raise CaseFailed(f"{role} process exited (code {code}) without a result") from None
            if tag == "error":
                raise CaseFailed(f"{role}: {body}")
            if tag == "info":
                _send(links[_other(role)], ("info", body))
                continue
            results[role] = body
            del waiting[conn]
            if role == "client":
                _send(links["server"], ("stop", None))
    return results["client"]


def _role_main(case: str, role: Role, kind: Kind, p: Params, conn: Connection) -> None:
    """Entry point of a spawned role process."""
    try:
        impl = load_case(case)
        run = impl.server if role == "server" else impl.client
        out: object = run(Control(conn, p.wait), p, kind)
        if isinstance(out, Coroutine):
            out = impl.run_async(out)
        conn.send(("result", out))
    except BaseException as exc:
        print(f"--- {case} {kind} {role} failed:", file=sys.stderr)
        traceback.print_exc()
        conn.send(("error", _describe(exc)))


def _reap(proc: BaseProcess, grace: float) -> None:
    proc.join(grace)
    if proc.is_alive():
        proc.terminate()
        proc.join(REAP_GRACE)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _send(conn: Connection, message: tuple[str, object]) -> None:
    # a role that has exited can't be told anything; the relay reports its EOF
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.send(message)


def _other(role: Role) -> Role:
    return "client" if role == "server" else "server"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
