"""What keepalives (issue #15) cost: bytes per idle node, and the beacon's CPU per keepalive.

    .venv/bin/python -m benchmarks.beacon_keepalive [--nodes 5000] [--rounds 5]

1. Bytes: one real :class:`BeaconClient` and :class:`BeaconServer` on a fake clock, idle for an
   hour; every datagram either way is counted with 28 bytes of IPv4 and UDP header. Once with
   the default keepalive interval, once with keepalives off (registrations only, as before).
2. CPU, in this process, side by side in one run (so the ratios hold on a loaded machine):
   ``--nodes`` registered nodes each send a KEEPALIVE from their registered address (the first
   round also derives each node's keepalive key, one X25519; later rounds don't), against the
   same nodes' refresh REGISTERs (a signature check and a signed answer each), which is what
   the beacon pays every 25 s per node without keepalives too. Times are the median of
   ``--rounds`` rounds, per message, through ``receive_datagram`` and ``datagrams_to_send``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from pilot_agents.beacon.server import BeaconConfig, BeaconServer
from pilot_agents.beacon.store import NameStore
from pilot_agents.net.traversal import beacon_client as bc
from pilot_agents.net.traversal import beacon_wire as bw
from pilot_agents.net.tunnel import crypto

HEADERS = 28  # IPv4 + UDP
BEACON = ("198.51.100.1", 9000)
WALL0 = 1_764_000_000 * 10**9


def idle_bytes_per_second(keepalive_interval: float, seconds: float = 3600.0) -> dict[str, float]:
    """A node named "alpha" behind a NAT, idle: bytes/s each way, headers included."""
    with TemporaryDirectory() as tmp:
        now = [0.0]
        wall = lambda: WALL0 + int(now[0] * 1e9)  # noqa: E731 - one clock for both sides
        secret, public = crypto.ed25519_keypair()
        server = BeaconServer(
            secret, public, NameStore(Path(tmp) / "n.db"), BeaconConfig(), wall_clock_ns=wall
        )
        node_secret, node_public = crypto.ed25519_keypair()
        client = bc.BeaconClient(
            node_secret, node_public, "alpha", BEACON, wall_clock_ns=wall,
            config=bc.BeaconClientConfig(keepalive_interval=keepalive_interval,
                                         classify_nat=False),
        )  # fmt: skip
        client.set_local_candidates([("10.0.0.2", 5000)])
        mapped = ("203.0.113.7", 40000)
        up = down = 0
        counted_from = 60.0  # after start-up (registration, NAT type)
        client.start(0.0)
        while now[0] < seconds:
            for data, _ in client.datagrams_to_send(now[0]):
                if now[0] >= counted_from:
                    up += len(data) + HEADERS
                server.receive_datagram(data, mapped, now[0])
            for data, _ in server.datagrams_to_send():
                if now[0] >= counted_from:
                    down += len(data) + HEADERS
                client.receive_datagram(data, now[0])
            deadline = client.get_timer()
            assert deadline is not None
            now[0] = max(now[0], deadline)
            client.handle_timer(now[0])
            server.handle_timer(now[0])
        span = seconds - counted_from
        return {"up": up / span, "down": down / span, "total": (up + down) / span}


def cpu_per_message(nodes: int, rounds: int) -> dict[str, float]:
    """Median seconds per message at the beacon: refresh REGISTER, first KEEPALIVE (derives the
    key), later KEEPALIVEs."""
    with TemporaryDirectory() as tmp:
        clock = [WALL0]
        secret, public = crypto.ed25519_keypair()
        config = BeaconConfig(
            verify_rate=1e9, verify_burst=1e9, known_verify_rate=1e9, known_verify_burst=1e9,
            register_source_rate=1e9, register_source_burst=1e9, claimed_key_rate=1e9,
            claimed_key_burst=1e9, register_rate=1e9, register_burst=1e9, source_rate=1e9,
            source_burst=1e9, max_names_per_ip=nodes + 1,
        )  # fmt: skip
        server = BeaconServer(
            secret, public, NameStore(Path(tmp) / "n.db"), config, wall_clock_ns=lambda: clock[0]
        )
        members = []
        for i in range(nodes):
            node_secret, node_public = crypto.ed25519_keypair()
            address = (f"10.{i // 65000}.{(i // 250) % 260 % 256}.{i % 250 + 1}", 40000 + i % 20000)
            key = bw.keepalive_key(crypto.ed25519_sk_to_x25519(node_secret), public, node_public)
            assert key is not None
            members.append((node_secret, node_public, address, key))

        def registers() -> list[tuple[bytes, tuple[str, int]]]:
            clock[0] += 10**9
            return [
                (bw.encode_register(s, p, clock[0] + i, bw.NatType.CONE, None, [a]), a)
                for i, (s, p, a, _) in enumerate(members)
            ]

        def keepalives() -> list[tuple[bytes, tuple[str, int]]]:
            clock[0] += 10**9
            return [
                (bw.encode_keepalive(k, p, clock[0] + i), a)
                for i, (_, p, a, k) in enumerate(members)
            ]

        def run(batch: list[tuple[bytes, tuple[str, int]]]) -> float:
            start = time.perf_counter()
            for data, address in batch:
                server.receive_datagram(data, address, 1.0)
            answers = server.datagrams_to_send()
            took = (time.perf_counter() - start) / len(batch)
            assert len(answers) == len(batch), (len(answers), server.stats.refusals)
            return took

        run(registers())  # new registrations
        first = run(keepalives())
        register_times, keepalive_times = [], []
        for _ in range(rounds):
            register_times.append(run(registers()))
            keepalive_times.append(run(keepalives()))
        return {
            "register": statistics.median(register_times),
            "first_keepalive": first,
            "keepalive": statistics.median(keepalive_times),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    default = bc.BeaconClientConfig().keepalive_interval
    print("idle node, bytes/s with IPv4+UDP headers (REGISTER every 25 s):")
    for label, interval in ((f"keepalive every {default:g} s", default), ("no keepalives", 0.0)):
        b = idle_bytes_per_second(interval)
        print(f"  {label:<22} up {b['up']:5.1f}  down {b['down']:5.1f}  total {b['total']:5.1f}")
    cpu = cpu_per_message(args.nodes, args.rounds)
    print(f"beacon CPU per message, {args.nodes} nodes, median of {args.rounds} rounds:")
    print(f"  refresh REGISTER      {cpu['register'] * 1e6:7.1f} us")
    print(f"  first KEEPALIVE       {cpu['first_keepalive'] * 1e6:7.1f} us (derives the key)")
    print(f"  KEEPALIVE             {cpu['keepalive'] * 1e6:7.1f} us "
          f"({cpu['register'] / cpu['keepalive']:.1f}x cheaper than a refresh)")  # fmt: skip
    per_second = 100_000 / default
    print(f"  100k nodes at {default:g} s: {per_second:,.0f} keepalives/s = "
          f"{per_second * cpu['keepalive']:.0%} of a core; their refreshes at 25 s: "
          f"{100_000 / 25 * cpu['register']:.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
