"""Where a beacon's time goes, in process: the sans-IO core fed real datagrams, no sockets.

    .venv/bin/python -m benchmarks.beacon_profile [--nodes 10000] [--profile refresh]
    .venv/bin/python -m benchmarks.beacon_profile --instructions [--tree DIR]

Registers ``--nodes`` nodes (with names, in an in-memory SQLite store), then times each kind of
message through :meth:`BeaconServer.receive_datagram` (and ``datagrams_to_send``): refreshes
(signed REGISTERs with a newer timestamp from the node's own address), resolves by name,
introductions and 1,200-byte relayed DATA packets. It prints microseconds per message and, for
the kind named by ``--profile``, cProfile's top functions by own time. The signature checks and
signatures themselves are timed alone for comparison. Complements ``beacon_swarm`` (the whole
process on loopback) with numbers that don't depend on what else the machine runs as much.
Times are the process's CPU time (``time.process_time``), not wall time, for the same reason.

``--gc`` measures the cyclic garbage collector instead: a full collection and a whole sweep
(``handle_timer``, one call per slice of the tables) with ``--nodes`` live nodes, and the longest
collection while every node refreshes once (what a refresh waits behind), with the collector as
Python leaves it and after ``gc.freeze()`` (what the beacon process does after start-up and
after each sweep call).

``--instructions`` counts instructions per message instead, with valgrind (callgrind): two runs
per kind, of a short and a long series, the difference divided by the extra messages (so setup
cancels out); ``--tree`` counts another checkout beside this one. Deterministic to about 1 %,
so it compares builds on a busy machine.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.beacon_swarm import NODES_PER_IP, node_ip, node_keys
from pilot_agents.beacon.server import SWEEP_SLICES, BeaconServer
from pilot_agents.beacon.store import NameStore
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.tunnel import crypto, wire

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("refresh", "resolve", "introduce", "relay")
SHORT, LONG = 200, 700  # messages in the two runs of --instructions
WALL = time.time_ns()  # the beacon's wall clock, for registration timestamps

Datagram = tuple[bytes, tuple[str, int]]
# Seconds of the beacon's clock between two datagrams, so that no budget is what limits (and
# no registration expires before the last kind was timed).
RAMP_STEP = 0.004
STEP = 0.001


def nodes_clock(nodes: int) -> float:
    """The beacon's clock once ``nodes`` registered, each address under 2 new keys/s."""
    return nodes * max(RAMP_STEP, 0.6 * NODES_PER_IP / nodes)


def build(nodes: int) -> tuple[BeaconServer, list[tuple[bytes, bytes]], list[tuple[str, int]]]:
    secret, public = crypto.ed25519_keypair()
    # A wall clock that stands still: however slowly this runs (valgrind), no timestamp is stale.
    server = BeaconServer(secret, public, NameStore(":memory:"), wall_clock_ns=lambda: WALL)
    keys = [node_keys(i, 7) for i in range(nodes)]
    addresses = [(node_ip(i), 40_000 + i % 20_000) for i in range(nodes)]
    stamp = WALL
    # One address after the other, spread over time, so that no budget is what limits.
    order = sorted(range(nodes), key=lambda i: (i % NODES_PER_IP, i))
    step = nodes_clock(nodes) / nodes
    for n, i in enumerate(order):
        sk, pk = keys[i]
        data = bw.encode_register(sk, pk, stamp, bw.NatType.CONE, f"n{i}", [addresses[i]])
        server.receive_datagram(data, addresses[i], n * step)
    server.datagrams_to_send()
    assert server.stats.registrations == nodes, server.stats
    return server, keys, addresses


def run(server: BeaconServer, datagrams: list[Datagram], start: float) -> float:
    """Seconds per datagram, each fed at a ``now`` that keeps every budget full."""
    receive, flush = server.receive_datagram, server.datagrams_to_send
    began = time.process_time()
    for n, (data, address) in enumerate(datagrams):
        receive(data, address, start + n * STEP)
        if n % 64 == 63:
            flush()
    flush()
    return (time.process_time() - began) / len(datagrams)


def instructions(tree: Path, kind: str, messages: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out"]
        command += [sys.executable, "-m", "benchmarks.beacon_profile", "--nodes", "1000"]
        command += ["--only", kind, "--messages", str(messages), "--build", str(LONG)]
        result = subprocess.run(
            command, env=env, cwd=tree, capture_output=True, text=True, check=True, timeout=900
        )
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{result.stderr}")
    return int(found.group(1))


def count_instructions(trees: list[Path]) -> None:
    for tree in trees:
        for kind in ("refresh", "relay"):
            extra = instructions(tree, kind, LONG) - instructions(tree, kind, SHORT)
            per = extra / (LONG - SHORT)
            print(f"{tree}: {kind} {per / 1000:.1f} k instructions per message", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=5_000, help="per kind")
    parser.add_argument("--profile", choices=KINDS)
    parser.add_argument("--only", choices=KINDS, help="time only this kind")
    parser.add_argument("--build", type=int, default=0, help="datagrams made per kind, at least")
    parser.add_argument("--instructions", action="store_true", help="count with valgrind")
    parser.add_argument("--gc", action="store_true", help="time the garbage collector")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="with --instructions: another checkout to count beside this one")
    args = parser.parse_args()
    if args.instructions:
        count_instructions([*args.tree, ROOT])
        return
    server, keys, addresses = build(args.nodes)
    if args.gc:
        measure_gc(server, keys, addresses)
        return
    n = min(args.messages, args.nodes)
    stamp = WALL + 1
    built = max(args.messages, args.build)  # the same count in both valgrind runs
    m = min(built, args.nodes)
    builders: dict[str, Callable[[], list[Datagram]]] = {
        "refresh": lambda: [
            (bw.encode_register(sk, pk, stamp, bw.NatType.CONE, f"n{i}", [addresses[i]]),
             addresses[i])
            for i, (sk, pk) in enumerate(keys[:m])
        ],
        "resolve": lambda: [
            (bw.encode_resolve(i + 1, hostname=f"n{(i * 7919) % args.nodes}"), addresses[i])
            for i in range(m)
        ],
        "introduce": lambda: [
            (bw.encode_introduce(i + 1, keys[(i * 7919 + 1) % args.nodes][1]), addresses[i])
            for i in range(m)
        ],
        "relay": lambda: [
            (bw.encode_relay(keys[(i + 1) % 100][1], bytes([wire.DATA]) + bytes(1199)),
             addresses[i % 100])
            for i in range(built)
        ],
    }
    limit = {"relay": args.messages}
    kinds = {
        kind: build()[: limit.get(kind, n)]
        for kind, build in builders.items()
        if args.only in (None, kind)
    }
    clock = nodes_clock(args.nodes)  # past the last registration
    for kind, datagrams in kinds.items():
        profiler = cProfile.Profile() if kind == args.profile else None
        if profiler is not None:
            profiler.enable()
        seconds = run(server, datagrams, clock)
        if profiler is not None:
            profiler.disable()
        clock += len(datagrams) * STEP
        print(f"{kind}: {seconds * 1e6:.1f} us per message ({len(datagrams)} messages)")
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    print(f"refusals: {dict(server.stats.refusals) or 'none'}")
    if args.only:
        return
    sk, pk = keys[0]
    message = bytes(120)
    signature = crypto.ed25519_sign(sk, message)
    for label, call in (
        ("ed25519 sign", lambda: crypto.ed25519_sign(sk, message)),
        ("ed25519 verify", lambda: crypto.ed25519_verify(pk, message, signature)),
    ):
        print(f"{label}: {timed(call) * 1e6:.1f} us")


def measure_gc(
    server: BeaconServer, keys: list[tuple[bytes, bytes]], addresses: list[tuple[str, int]]
) -> None:
    pauses: list[tuple[int, float]] = []  # (generation, seconds) of each collection
    started = [0.0]

    def timing(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            pauses.append((info["generation"], time.process_time() - started[0]))

    clock = nodes_clock(len(keys))
    for frozen in (False, True):
        gc.collect()
        if frozen:
            gc.freeze()
        label = "frozen" if frozen else "as is"
        tracked = len(gc.get_objects())
        began = time.process_time()
        gc.collect()
        full = time.process_time() - began
        slices = []  # a whole sweep: one call per slice of the tables
        for _ in range(SWEEP_SLICES):
            server._next_sweep = clock  # due now
            began = time.process_time()
            server.handle_timer(clock)
            slices.append(time.process_time() - began)
        if frozen:
            gc.freeze()  # as the beacon does after each sweep
        # Every node refreshes once (a registration's 25 s of refreshes), timing collections.
        stamp = WALL + (2 if frozen else 1)
        datagrams = [
            (bw.encode_register(sk, pk, stamp, bw.NatType.CONE, f"n{i}", [addresses[i]]),
             addresses[i])
            for i, (sk, pk) in enumerate(keys)
        ]
        pauses.clear()
        gc.callbacks.append(timing)
        try:
            per = run(server, datagrams, clock)
        finally:
            gc.callbacks.remove(timing)
        clock += len(datagrams) * STEP
        longest = max((p for _, p in pauses), default=0.0)
        full_runs = [p for g, p in pauses if g == 2]
        print(
            f"gc {label}: {tracked:,} objects tracked; full collection {full * 1e3:.1f} ms; "
            f"sweep {sum(slices) * 1e3:.1f} ms in {len(slices)} calls, the longest "
            f"{max(slices) * 1e3:.1f} ms; {len(keys):,} refreshes at {per * 1e6:.1f} us each: "
            f"{len(pauses)} collections, {len(full_runs)} full, the longest "
            f"{longest * 1e3:.1f} ms, all {sum(p for _, p in pauses) * 1e3:.0f} ms"
        )
    gc.unfreeze()


def timed(call: Callable[[], object], count: int = 2000) -> float:
    began = time.process_time()
    for _ in range(count):
        call()
    return (time.process_time() - began) / count


if __name__ == "__main__":
    main()
