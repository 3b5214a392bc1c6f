"""Runs a case's roles (a server and a client; a publisher and its subscribers) in spawned
processes, one each, and relays between them.

The runner is the only thing that waits without a transport-level timeout, and it waits at most
:attr:`Params.pair_deadline` for a pair (the caller's deadline for other sets); then it ends
every process and reports an error.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from benchmarks.cases import CASES, load_case
from benchmarks.harness import (
    KINDS,
    BulkResult,
    Control,
    Kind,
    Params,
    Result,
    RttResult,
    load,
)
from benchmarks.machine import CpuSample, others_share

BUSY_SHARE = 0.05
"""Above this share of the CPU taken by other processes, a measurement is flagged as suspect."""
T = TypeVar("T")
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
    others_cpu: dict[str, float] = field(default_factory=dict)
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
        return suspect(self.others_cpu.values()) + self.notes

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


def suspect(others_cpu: Iterable[float]) -> list[str]:
    """A warning if other processes took more than :data:`BUSY_SHARE` of the CPU during any of
    a row's measurements (their shares), else nothing."""
    busiest = max(others_cpu, default=0.0)
    if busiest <= BUSY_SHARE:
        return []
    return [f"SUSPECT: other processes took up to {busiest:.0%} of the CPU"]


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
        result = measure(name, kind, row.notes, row.others_cpu, partial(run_pair, name, kind, p))
        if result is None:
            continue
        if isinstance(result, BulkResult):
            row.bulk = result
            if result.note:
                row.notes.append(result.note)
            _log(f"{name} bulk: {result.mb_per_s:.1f} MB/s ({result.seconds:.2f} s)")
        else:
            row.rtt = result
            _log(f"{name} rtt: median {result.median_us:.1f} µs, p99 {result.p99_us:.1f} µs")
    return row


def measure(case: str, label: str, notes: list[str], others_cpu: dict[str, float],
            run: Callable[[], T]) -> T | None:
    """One measurement of a case: ``run()``'s result, or None with an error note when it failed;
    records in ``others_cpu[label]`` the share of the CPU other processes took meanwhile."""
    _log(f"{case} {label} ...")
    before = CpuSample.now()
    try:
        result = run()
    except CaseFailed as exc:
        notes.append(f"{label} error: {exc}")
        _log(f"{case} {label} failed: {exc}")
        return None
    share = others_share(before, CpuSample.now())
    if share is not None:
        others_cpu[label] = share
    return result


def run_pair(case: str, kind: Kind, p: Params) -> Result:
    """Spawns the case's server and client; returns the client's measurement."""
    _, result = run_roles(CASES[case], [("server", (p, kind)), ("client", (p, kind))],
                          p.wait, p.pair_deadline)
    if not isinstance(result, BulkResult | RttResult):
        raise CaseFailed(f"client returned {type(result).__name__}, not a measurement")
    return result


RoleSpec = tuple[str, tuple[object, ...]]
"""A role: the name of the case's method the process runs, and its arguments after the
:class:`Control` (picklable)."""


def run_roles(case: str, roles: Sequence[RoleSpec], wait: float, deadline: float) -> list[object]:
    """Spawns one process per role of the case ``case`` (``module`` or ``module:ATTRIBUTE``, see
    :func:`benchmarks.harness.load`); returns each role's result, in order.

    The first role is the hub (a server, a publisher): what it publishes goes to every other
    role, what they publish goes to it, and it is told to stop once all of them reported."""
    ctx = mp.get_context("spawn")
    links: dict[str, Connection] = {}
    procs: dict[str, BaseProcess] = {}
    methods = [method for method, _ in roles]
    grace = 0.2  # a failed set's other roles may be stuck in a long wait: end them promptly
    try:
        for i, (method, args) in enumerate(roles):
            label = method if methods.count(method) == 1 else f"{method} {i}"
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_role_main,
                args=(case, method, args, wait, theirs),
                name=f"bench-{case}-{label}".replace(" ", "-"),
                daemon=True,
            )
            proc.start()
            theirs.close()
            links[label] = ours
            procs[label] = proc
        results = _relay(links, procs, deadline)
        grace = REAP_GRACE
    finally:
        for child in procs.values():
            _reap(child, grace)
    return [results[label] for label in links]


def _relay(links: dict[str, Connection], procs: dict[str, BaseProcess], limit: float
           ) -> dict[str, object]:
    """Forwards what the hub publishes to every other role and what they publish to the hub,
    until every role reports; returns their results."""
    deadline = time.monotonic() + limit
    hub = next(iter(links))
    waiting = {conn: role for role, conn in links.items()}
    results: dict[str, object] = {}
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
                for other in links if role == hub else [hub]:
                    if other != role:
                        _send(links[other], ("info", body))
                continue
            results[role] = body
            del waiting[conn]
            if role != hub and all(other == hub for other in waiting.values()):
                _send(links[hub], ("stop", None))
    return results


def _role_main(case: str, method: str, args: tuple[object, ...], wait_s: float,
               conn: Connection) -> None:
    """Entry point of a spawned role process."""
    try:
        impl = load(case)
        out: object = getattr(impl, method)(Control(conn, wait_s), *args)
        if isinstance(out, Coroutine):
            out = impl.run_async(out)
        conn.send(("result", out))
    except BaseException as exc:
        print(f"--- {case} {method} failed:", file=sys.stderr)
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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
