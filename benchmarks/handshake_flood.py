"""A trusted peer's round trip and a new tunnel's set-up time while a node is flooded with
handshake initiations it must refuse (issue #11, finding 6). 127.0.0.1 only, bounded in time.

    .venv/bin/python -m benchmarks.handshake_flood [--rate 40000] [--seconds 6] [--sources 64]

Three processes: the responder (an embedded Node trusting two keys), a flooder, and this one,
which holds the trusted peers. Phases, each with a fresh flood:

- ``idle``: no flood.
- ``replay``: one initiation, built once by an untrusted key with the library's own handshake
  code (so it is valid-looking for the code under test, MACs included) and replayed at
  ``--rate`` datagrams/s, spread over ``--sources`` source ports.
- ``random``: random bytes of the same size at ``--rate``, from one source port.

In each phase: the median and p90 of ``--pings`` pings (for at most a third of the flood) over
an established tunnel (the node's own RTT measure, in the tunnel), then the time a fresh trusted
node takes from ``ping()`` to its answer over a new tunnel (handshake and one round trip). The
flooder reports the rate it kept; the responder, what its mux counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pilot_agents.errors import PilotTimeoutError
from pilot_agents.identity import Identity, key_from_node_id
from pilot_agents.net.tunnel.mux import Mux
from pilot_agents.node.node import Node
from pilot_agents.runtime import run

HOST = "127.0.0.1"
PHASES = ("idle", "replay", "random")


def _node(home: Path) -> Node:
    return Node(home=home, listen=f"{HOST}:0")


# -- roles -----------------------------------------------------------------------------------


async def _responder(home: Path, trusted: list[str]) -> None:
    node = _node(home)
    async with node:
        for node_id in trusted:
            node.trust(node_id)
        port = node.local_endpoint[1]
        print(f"{port} {node.node_id}", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
        mux = node._mux  # the counters are the mux's; the Node API does not show them
        assert mux is not None
        print(f"responder counted: {dataclasses.asdict(mux.stats)}", file=sys.stderr)


def _flood_packet(responder_id: str, home: Path) -> bytes:
    """An initiation to the responder from a key it does not trust, as the code under test
    writes it."""
    identity = Identity.load_or_create(home)
    mux = Mux(identity.secret_key, identity.public_key)
    responder = key_from_node_id(responder_id)
    mux.trust(responder)
    session = mux.session(responder, 0.0)
    session.address = (HOST, 9)
    session.connect(0.0)
    packets = mux.datagrams_to_send(0.0)
    return packets[0][0]


def _flooder(
    port: int, mode: str, rate: float, seconds: float, sources: int, packet: bytes
) -> None:
    target = (HOST, port)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sources)]
    for sock in socks:
        sock.bind((HOST, 0))
        sock.setblocking(False)
    size = len(packet)
    batch = 64
    sent = 0
    start = time.monotonic()
    deadline = start + seconds
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        due = int((now - start) * rate)
        while sent < due:
            for _ in range(min(batch, due - sent)):
                data = packet if mode == "replay" else os.urandom(size)
                with contextlib.suppress(BlockingIOError):
                    socks[sent % sources].sendto(data, target)
                sent += 1
        time.sleep(0.0005)
    elapsed = time.monotonic() - start
    print(f"{sent} {elapsed:.3f}", flush=True)


# -- the measuring process -------------------------------------------------------------------


def _spawn(*args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.handshake_flood", *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
    )


async def _pings(node: Node, peer: str, count: int, seconds: float) -> tuple[list[float], int]:
    """Up to ``count`` pings, 5 ms apart, for at most ``seconds``: the RTTs and how many pings
    got no answer within 2 s."""
    rtts: list[float] = []
    lost = 0
    deadline = time.monotonic() + seconds
    while len(rtts) + lost < count and time.monotonic() < deadline:
        try:
            result = await node.ping(peer, timeout=2.0)
        except PilotTimeoutError:
            lost += 1
            continue
        rtts.append(result.rtt)
        await asyncio.sleep(0.005)
    return rtts, lost


async def _measure(args: argparse.Namespace) -> list[dict[str, object]]:
    root = Path(tempfile.mkdtemp(prefix="pa-flood-"))
    peer = _node(root / "peer")
    newcomers = {phase: _node(root / f"new-{phase}") for phase in PHASES}
    trusted = [peer.node_id, *(n.node_id for n in newcomers.values())]
    responder = _spawn(
        "--role", "responder", "--home", str(root / "responder"), *trusted, stdin=subprocess.PIPE
    )
    assert responder.stdout is not None
    port_text, responder_id = responder.stdout.readline().split()
    port = int(port_text)
    packet = _flood_packet(responder_id, root / "attacker")
    rows: list[dict[str, object]] = []
    try:
        async with peer:
            peer.trust(responder_id)
            peer.add_peer(responder_id, (HOST, port))
            await peer.ping(responder_id, timeout=5.0)  # the tunnel up
            await _pings(peer, responder_id, 20, 5.0)  # warm
            for phase in PHASES:
                flooder = None
                if phase != "idle":
                    sources = args.sources if phase == "replay" else 1
                    flooder = _spawn(
                        "--role", "flooder", "--port", str(port), "--mode", phase,
                        "--rate", str(args.rate), "--seconds", str(args.seconds),
                        "--sources", str(sources), "--packet", packet.hex(),
                    )
                    await asyncio.sleep(0.5)  # the flood under way
                flood_end = time.monotonic() + args.seconds - 0.5
                rtts, lost = await _pings(peer, responder_id, args.pings, args.seconds / 3)
                newcomer = newcomers[phase]
                async with newcomer:
                    newcomer.trust(responder_id)
                    newcomer.add_peer(responder_id, (HOST, port))
                    started = time.perf_counter()
                    try:
                        await newcomer.ping(responder_id, timeout=10.0)
                        new_tunnel: float | None = time.perf_counter() - started
                        if flooder is not None and time.monotonic() > flood_end:
                            print(f"{phase}: the flood ended first", file=sys.stderr)
                    except Exception as exc:
                        new_tunnel = None
                        print(f"{phase}: new tunnel failed: {exc!r}", file=sys.stderr)
                flood_rate = 0.0
                if flooder is not None:
                    out, _ = await asyncio.get_running_loop().run_in_executor(
                        None, flooder.communicate
                    )
                    sent, elapsed = out.split()
                    flood_rate = int(sent) / float(elapsed)
                rows.append(
                    {
                        "phase": phase,
                        "flood_per_s": flood_rate,
                        "pings": f"{len(rtts)}/{len(rtts) + lost}",
                        "rtt_median_ms": statistics.median(rtts) * 1e3 if rtts else None,
                        "rtt_p90_ms": statistics.quantiles(rtts, n=10)[-1] * 1e3
                        if len(rtts) > 1
                        else None,
                        "new_tunnel_ms": new_tunnel * 1e3 if new_tunnel is not None else None,
                    }
                )
                print(_format_row(rows[-1]), file=sys.stderr, flush=True)
    finally:
        assert responder.stdin is not None
        responder.stdin.close()
        try:
            responder.wait(10)
        except subprocess.TimeoutExpired:
            responder.kill()
        shutil.rmtree(root, ignore_errors=True)
    return rows


def _ms(value: object) -> str:
    return "failed" if value is None else f"{value:.2f}"


def _format_row(row: dict[str, object]) -> str:
    return (
        f"| {row['phase']} | {float(row['flood_per_s']):,.0f} | {row['pings']} "  # type: ignore[arg-type]
        f"| {_ms(row['rtt_median_ms'])} "
        f"| {_ms(row['rtt_p90_ms'])} | {_ms(row['new_tunnel_ms'])} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("measure", "responder", "flooder"), default="measure")
    parser.add_argument("--home")
    parser.add_argument("--port", type=int)
    parser.add_argument("--mode", choices=("replay", "random"))
    parser.add_argument("--packet", default="")
    parser.add_argument("--rate", type=float, default=40_000.0, help="flood datagrams/s")
    parser.add_argument("--seconds", type=float, default=6.0, help="flood duration per phase")
    parser.add_argument("--sources", type=int, default=64, help="source ports of the replay")
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("trusted", nargs="*")
    args = parser.parse_args()
    if args.role == "responder":
        run(_responder(Path(args.home), args.trusted))
    elif args.role == "flooder":
        _flooder(
            args.port, args.mode, args.rate, args.seconds, args.sources, bytes.fromhex(args.packet)
        )
    else:
        rows = run(_measure(args))
        print("| phase | flood datagrams/s | pings answered | RTT median ms | RTT p90 ms "
              "| new tunnel ms |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(_format_row(row))


if __name__ == "__main__":
    main()
