"""The NAT-lab matrix: which path each NAT pair ends on, and how fast it gets there.

Runs the scenarios of ``tests/test_natlab_traversal.py`` (a real beacon and real nodes, each a
process in a network namespace of the NAT lab) and prints, per NAT pair: the final path, the time
to the first message (from the start of ``connect()`` until the listener has the message) and the
time to the direct path (from the start of ``connect()`` until the tunnel reports "direct"; "-"
if it never does). Then the stress scenarios: NAT rebinding in the middle of an 8 MB transfer,
NAT rebinding while the tunnel is idle (``tests/test_natlab_rebind.py``: daemons driven by
``pilotctl``; the receiver's NAT, then both; times run from the start of ``pilotctl connect``
after the rebinding, "direct" polled through ``pilotctl peers``), and a 10 MB message over WAN
links with 5 % loss and 50 ms delay.

    sudo .venv/bin/python -m benchmarks.natlab_matrix                # pairs at 0 and 20 ms, stress
    .venv/bin/python -m benchmarks.natlab_matrix --repeat 5 --delays 0,20,50
    .venv/bin/python -m benchmarks.natlab_matrix --no-stress         # pairs only (~1 min)
    .venv/bin/python -m benchmarks.natlab_matrix --write             # also update RESULTS.md

``--delays``: each WAN link (beacon, public hosts, NATs) delays what it sends into the internet
by that many ms, so every round trip between two sites (node-beacon, node-node) is twice that.
Times are medians over ``--repeat`` runs, with the range. Path changes are seen by polling every
20 ms, so "time to direct" is late by up to 20 ms. Needs root (network namespaces).

``--write`` replaces only the part of ``benchmarks/RESULTS.md`` between ``<!-- natlab:start -->``
and ``<!-- natlab:end -->`` (appending it, with its heading, if absent); the rest of the file
belongs to ``benchmarks/bench.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

from benchmarks import report
from tests.natlab import Lab
from tests.natlab.conftest_helpers import natlab_unavailable_reason
from tests.test_natlab_rebind import MAPPING_TIMEOUT, run_idle_rebind
from tests.test_natlab_traversal import (
    EXPECTED_PATH,
    IMPAIRED_TRANSFER,
    REBIND_TRANSFER,
    WAN_DELAY_MS,
    WAN_LOSS,
    PairResult,
    run_impaired,
    run_pair,
    run_rebind,
)

HEADING = "## NAT lab matrix"
T = TypeVar("T")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def summary(values: list[float | None]) -> str:
    """median (min-max) in ms, of the runs that have a value; "-" when none has."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    text = f"{ms(statistics.median(present))} ms"
    if len(present) > 1:
        text += f" ({ms(min(present))}-{ms(max(present))})"
    if len(present) < len(values):
        text += f", {len(values) - len(present)}/{len(values)} never"
    return text


def paths_summary(results: list[PairResult]) -> str:
    counts = Counter(f"{r.final_path}/{r.peer_path}" for r in results)
    if len(counts) == 1:
        both = next(iter(counts))
        a, b = both.split("/")
        return a if a == b else both
    return ", ".join(f"{k} x{n}" for k, n in counts.most_common())


def attempt(label: str, fn: Callable[[Lab, Path], T], keep_logs: Path | None) -> T | str:
    """One scenario in a fresh lab; its result, or the error text (logs kept on failure)."""
    work = Path(tempfile.mkdtemp(prefix="natlab-"))
    os.chmod(work, 0o755)
    started = time.monotonic()
    try:
        with Lab() as lab:
            result = fn(lab, work)
    except Exception as exc:
        where = work
        if keep_logs is not None:
            where = keep_logs / f"{label}-{int(time.time())}"
            shutil.copytree(work, where)
        log(f"  {label}: FAILED ({type(exc).__name__}); logs in {where}")
        log("".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000])
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    outcome = result.final_path if isinstance(result, PairResult) else "done"
    log(f"  {label}: {outcome} in {time.monotonic() - started:.1f} s")
    shutil.rmtree(work, ignore_errors=True)
    return result


def pairs_table(delay: float, rows: dict[str, list[PairResult | str]]) -> list[str]:
    rtt = 2 * delay
    out = [
        f"Links delay {delay:g} ms one way (every round trip {rtt:g} ms)"
        + (
            f"; the first message: alpha has bravo's name pinned (as `trust add` does), so "
            f"nothing waits for the beacon; the handshake through the relay (2 RTTs) and the "
            f"message through it (1) = {3 * rtt:g} ms, the least that keeps forward secrecy "
            f"for data (docs/protocol.md, connection set-up). Direct: within 1 s of it."
            if delay
            else "."
        ),
        "",
        "| NAT pair | expected | final path | time to first message | time to direct |",
        "|---|---|---|---:|---:|",
    ]
    for name, results in rows.items():
        ok = [r for r in results if isinstance(r, PairResult)]
        failed = [r for r in results if isinstance(r, str)]
        path = paths_summary(ok) if ok else "FAILED"
        if failed:
            path += f" ({len(failed)}/{len(results)} runs failed: {failed[0]})"
        out.append(
            f"| {name} | {EXPECTED_PATH[name]} | {path} | "
            f"{summary([r.first_message for r in ok])} | {summary([r.direct for r in ok])} |"
        )
    return out


def stress_table(rows: list[tuple[str, PairResult | str]]) -> list[str]:
    out = [
        "| scenario | final path | time to first message | time to direct | notes |",
        "|---|---|---:|---:|---|",
    ]
    for label, r in rows:
        if isinstance(r, str):
            out.append(f"| {label} | FAILED | - | - | {r} |")
            continue
        changes = " → ".join(f"{p}@{t:.2f}s" for t, p in r.paths_a)
        history = f"; alpha's path: {changes}" if changes else ""
        out.append(
            f"| {label} | {paths_summary([r])} | {ms(r.first_message)} ms | "
            f"{ms(r.direct)} ms | {r.notes}{history} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per pair and delay")
    parser.add_argument("--delays", default="0,20", help="one-way link delays in ms, e.g. 0,20")
    parser.add_argument("--pairs", default=",".join(EXPECTED_PATH), help="NAT pairs to run")
    parser.add_argument("--no-stress", action="store_true", help="skip rebinding and loss runs")
    parser.add_argument(
        "--impaired-mb", type=float, default=IMPAIRED_TRANSFER / 2**20,
        help="MiB sent over the lossy WAN (default 10; takes about 3 minutes)",
    )  # fmt: skip
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy failed runs' logs here")
    parser.add_argument(
        "--write", action="store_true", help=f"update the section in {report.RESULTS}"
    )
    args = parser.parse_args(argv)
    reason = natlab_unavailable_reason()
    if reason:
        print(f"natlab_matrix: {reason}", file=sys.stderr)
        return 2
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in pairs if p not in EXPECTED_PATH]
    if unknown:
        parser.error(f"unknown pairs {unknown}; choose from {', '.join(EXPECTED_PATH)}")
    started = time.monotonic()
    lines: list[str] = []
    failures = 0
    for delay in delays:
        rows: dict[str, list[PairResult | str]] = {}
        for name in pairs:
            rows[name] = []
            for i in range(args.repeat):
                label = f"{name} delay={delay:g}ms run {i + 1}"
                res = attempt(label, partial(run_pair, name=name, delay_ms=delay), args.keep_logs)
                rows[name].append(res)
                if isinstance(res, str) or res.final_path != EXPECTED_PATH[name]:
                    failures += 1
        lines += [*pairs_table(delay, rows), ""]
    if not args.no_stress:
        stress: list[tuple[str, PairResult | str]] = []
        for side in ("sender", "receiver"):
            label = f"cone-cone, {side}'s NAT rebinds mid-transfer ({REBIND_TRANSFER >> 20} MiB)"
            res = attempt(f"rebind-{side}", partial(run_rebind, side=side), args.keep_logs)
            stress.append((label, res))
            failures += isinstance(res, str)
        idle_rebinds = {("bravo",): "the receiver's NAT rebinds", ("alpha", "bravo"): "both do"}
        for sides, who in idle_rebinds.items():
            label = (
                f"cone-cone daemons, idle {MAPPING_TIMEOUT + 1} s (mappings expire after "
                f"{MAPPING_TIMEOUT} s), then {who}; `pilotctl connect --timeout 40 --message`"
            )
            run = partial(run_idle_rebind, sides=sides)
            res = attempt(f"idle-rebind-{'-'.join(sides)}", run, args.keep_logs)
            stress.append((label, res))
            failures += isinstance(res, str)
        size = int(args.impaired_mb * 2**20)
        label = (
            f"cone-cone, {WAN_LOSS:.0%} loss + {WAN_DELAY_MS:g} ms on each WAN link "
            f"({size / 2**20:g} MiB)"
        )
        res = attempt("impaired", partial(run_impaired, size=size), args.keep_logs)
        stress.append((label, res))
        failures += isinstance(res, str)
        lines += [*stress_table(stress), ""]
    elapsed = time.monotonic() - started
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"]
    if args.keep_logs is not None:  # where logs went is nobody else's business
        i = shown.index("--keep-logs") if "--keep-logs" in shown else -1
        shown = shown[:i] + shown[i + 2 :] if i >= 0 else shown
    cmd = " ".join(["python -m benchmarks.natlab_matrix", *shown])
    header = [
        f"Written by `benchmarks/natlab_matrix.py --write`, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}; "
        f"`{cmd}` took {elapsed:.0f} s.",
        "",
        "Each run builds a fresh lab (see `tests/natlab`): a beacon on a public host, two nodes "
        "(`alpha` trusts `bravo` under its name, connects to it by name and sends 1000 B; "
        "`bravo` answers; then 1 MiB each "
        "way on the settled path). Times run from the start of `connect()`; medians over "
        f"{args.repeat} runs (min-max). Cone <-> symmetric stays on the relay by design (no port "
        "prediction). Path changes are polled every 20 ms. In the idle-rebinding rows "
        "(`tests/test_natlab_rebind.py`, daemons driven by `pilotctl`) the time to the first "
        "message is the whole `pilotctl connect` command after the rebinding, process start-up "
        "included, and the time to direct runs from its start until both daemons logged their "
        "move to the direct path.",
        "",
    ]
    text = "\n".join(header + lines)
    print(text)
    if args.write:
        written = report.write_section("natlab", HEADING + "\n\n" + text)
        log(f"wrote {written}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
