"""Where a round trip through the daemons spends CPU: each of the four processes' CPU time per
round trip (the client, its daemon, the server's daemon, the server), and the kernel's share of
it for the three started here, beside the latency.

    .venv/bin/python -m benchmarks.daemon_path [--mode reqrep|plain] [--rounds N]
        [--socket stream|zeromq]

CPU time per round trip moves much less than latency on a loaded machine (it does not count
the time a process waits for a core), so it compares two versions of the IPC path even while
other work shares the cores; latency is measured too, for what it is worth then. To compare with
another checkout, put its ``pilot_agents`` first on ``PYTHONPATH``: the daemons start from the
root directory, so they run the same code as this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pilot_agents
from benchmarks.harness import HOST, percentile
from pilot_agents import Client
from pilot_agents.daemon import DaemonOptions, start_detached, stop
from pilot_agents.patterns.reqrep import Replier, Requester
from pilot_agents.sdk import ClientOptions

PORT = 2001
WARMUP = 200
MESSAGE = b"\x5a" * 100


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (from /proc)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time of ``pid`` so far (from /proc): how much of a hop is the
    kernel's (socket writes, wake-ups), which no Python trimming changes."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def options(socket: str) -> ClientOptions:
    """The SDK on the daemon's stream socket (its default) or on its ZeroMQ socket."""
    return ClientOptions(stream_socket=socket == "stream")


async def serve(home: str, mode: str, socket: str) -> None:
    """The server process: echo every request until killed."""
    async with Client(home, options(socket)) as client:
        if mode == "plain":
            async with client.listen(PORT) as listener:
                print("ready", flush=True)
                async for message in listener:
                    await message.reply(message.data)
        else:
            async with Replier(client, PORT) as replier:
                print("ready", flush=True)
                async for request in replier:
                    await request.reply(request.data)


async def measure(home: Path, peer: str, mode: str, rounds: int,
                  socket: str) -> tuple[list[int], float]:
    """Round-trip times (ns) after the warm-up, and this process's CPU seconds over them."""
    async with Client(home, options(socket)) as client, Requester(client) as requester, \
            client.connect(peer, PORT) as conn:

        async def roundtrip() -> bytes:
            if mode == "plain":
                await conn.send(MESSAGE)
                return (await conn.receive(timeout=10)).data
            return (await requester.request(peer, PORT, MESSAGE, timeout=10)).data

        for _ in range(WARMUP):
            await roundtrip()
        start = cpu_seconds(os.getpid())
        samples = []
        for _ in range(rounds):
            began = time.perf_counter_ns()
            if await roundtrip() != MESSAGE:
                raise AssertionError("the echo differs")
            samples.append(time.perf_counter_ns() - began)
        return samples, cpu_seconds(os.getpid()) - start


async def trust_each_other(homes: tuple[Path, Path], infos: tuple[dict[str, object], ...]) -> None:
    for home, other in ((homes[0], infos[1]), (homes[1], infos[0])):
        async with Client(home) as client:
            endpoints = other["endpoints"]
            assert isinstance(endpoints, list)
            await client.add_peer(str(other["node_id"]), str(endpoints[0]))
            await client.trust_add(str(other["node_id"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.daemon_path",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["reqrep", "plain"], default="reqrep")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--socket", choices=["stream", "zeromq"], default="stream",
                        help="the daemon socket the SDK talks on (default: stream)")
    parser.add_argument("--serve", nargs=3, metavar=("HOME", "MODE", "SOCKET"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        pilot_agents.run(serve(*args.serve))
        return 0
    work = Path(tempfile.mkdtemp(prefix="daemon-path-", dir="/tmp"))
    homes = (work / "client", work / "server")
    infos = tuple(start_detached(DaemonOptions(home=home, hostname=home.name,
                                               listen=f"{HOST}:0", inbox_ports=()))
                  for home in homes)
    server: subprocess.Popen[str] | None = None
    try:
        asyncio.run(trust_each_other(homes, infos))
        server = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.daemon_path", "--serve", str(homes[1]),
             args.mode, args.socket], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        server.stdout.readline()
        pids = {"client daemon": int(str(infos[0]["pid"])),
                "server daemon": int(str(infos[1]["pid"])), "server": server.pid}
        before = {name: cpu_split(pid) for name, pid in pids.items()}
        samples, own = pilot_agents.run(measure(homes[0], str(infos[1]["node_id"]), args.mode,
                                                args.rounds, args.socket))
        after = {name: cpu_split(pid) for name, pid in pids.items()}
        per_rt = {name: round((sum(after[name]) - sum(before[name])) / args.rounds * 1e6)
                  for name in pids}
        system = {name: round((after[name][1] - before[name][1]) / args.rounds * 1e6)
                  for name in pids}
        per_rt["client"] = round(own / args.rounds * 1e6)
        print(json.dumps({
            "mode": args.mode, "socket": args.socket, "rounds": args.rounds,
            "median_us": round(percentile(tuple(samples), 50) / 1000, 1),
            "p99_us": round(percentile(tuple(samples), 99) / 1000, 1),
            "cpu_us_per_round_trip": per_rt, "cpu_us_total": sum(per_rt.values()),
            "system_cpu_us_of_it": system,
            "loadavg_1min": float(Path("/proc/loadavg").read_text().split()[0]),
        }))
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        for home in homes:
            stop(home)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
