"""``pilotctl ping|peers|info|resolve|add-peer``: this node, its peers, and how to reach them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .. import ipc
from ..errors import PeerUnreachableError, PilotError, PilotTimeoutError
from ..ipc import IpcClient
from .context import Context
from .output import EXIT_OK, STATE_NAMES, emit, fields, ms, print_fields, print_list
from .parser import Commands, count, positive


def register_add_peer(commands: Commands) -> None:
    """``add-peer`` alone: the help lists it before the messaging commands, the rest after."""
    sub = commands.command("add-peer", "static peer: where to reach a node id without a beacon",
                           add_peer_cmd)
    sub.add_argument("node_id", metavar="NODE_ID")
    sub.add_argument("address", metavar="HOST:PORT")
    sub.add_argument("--name", default=None, help="a local name for it")


def register(commands: Commands) -> None:
    sub = commands.command("ping", "measure the round trip to a peer", ping_cmd)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("--count", "-c", type=count, default=3, metavar="N")
    sub.add_argument("--interval", type=positive, default=0.5, metavar="S")
    sub.add_argument("--timeout", type=positive, default=5.0, metavar="S")

    commands.command("peers", "tunnels: path, RTT, traffic", peers_cmd)
    commands.command("info", "this node: id, address, hostname, NAT type, endpoints", info_cmd)
    sub = commands.command("resolve", "look a name up (beacon, trust store, static peers)",
                           resolve_cmd)
    sub.add_argument("name", metavar="NAME")


def add_peer_cmd(ctx: Context) -> int:
    args = ctx.args
    result = ctx.call("add_peer", node_id=args.node_id, address=args.address,
                      hostname=args.name)
    if ctx.json:
        emit({k: result[k] for k in ("node_id", "address", "hostname")})
    else:
        name = f" ({args.name})" if args.name else ""
        print(f"Static peer {result['node_id']}{name} at {result['address']}.")
    return EXIT_OK


def ping_cmd(ctx: Context) -> int:
    return ctx.run(lambda client: _ping(ctx, client))


async def _ping(ctx: Context, client: IpcClient) -> int:
    args = ctx.args
    probes: list[dict[str, object]] = []
    rtts: list[float] = []
    last_error: PilotError | None = None
    peer: str = args.target
    for seq in range(1, args.count + 1):
        if seq > 1:
            await asyncio.sleep(args.interval)
        try:
            result = await client.request("ping", target=args.target, timeout=args.timeout)
        except (PilotTimeoutError, PeerUnreachableError) as exc:
            last_error = exc
            probes.append({"seq": seq, "error": str(exc)})
            if not ctx.json:
                print(f"no reply from {peer} (probe {seq}): {exc}")
            continue
        peer = result.get("hostname") or result["peer"]
        rtts.append(result["rtt"])
        probes.append({"seq": seq, "rtt": result["rtt"], "path": result["path"]})
        if not ctx.json:
            print(f"reply from {peer}: probe {seq} time={ms(result['rtt'])} "
                  f"path={result['path']}")
    low, high = min(rtts, default=None), max(rtts, default=None)
    average = sum(rtts) / len(rtts) if rtts else None
    if ctx.json and not rtts and last_error is not None:
        raise last_error  # one document, the error's, as for any command that fails
    if ctx.json:
        emit({"target": args.target, "sent": len(probes), "received": len(rtts), "min": low,
              "max": high, "avg": average, "probes": probes})
    else:
        print(f"{len(probes)} probes, {len(rtts)} replies" + (
            f", min/avg/max {ms(low)}/{ms(average)}/{ms(high)}" if rtts else ""))
    if not rtts and last_error is not None:
        raise last_error
    return EXIT_OK


def peers_cmd(ctx: Context) -> int:
    print_list(ctx.json, "peers", ctx.call("peers")["peers"], "No peers.",
               ["NAME", "NODE ID", "PATH", "RTT", "IN", "OUT", "TRUST"], lambda p: [
                   p.get("hostname") or "-", p["node_id"], p["path"], ms(p.get("rtt")),
                   str(p["bytes_in"]), str(p["bytes_out"]), p.get("trust") or "-"])
    return EXIT_OK


def info_cmd(ctx: Context) -> int:
    info = fields(ctx.call("info"))
    if ctx.json:
        emit(info)
        return EXIT_OK
    print_fields([
        ("Node id:", info["node_id"]),
        ("Virtual address:", info["virtual_address"]),
        ("Hostname:", info.get("hostname") or "-"),
        ("NAT type:", info.get("nat_type") or "unknown"),
        ("Endpoints:", ", ".join(info["endpoints"])),
        ("Beacon:", info.get("beacon") or "- (static peers only)"),
        ("Home:", info["home"]),
        ("Local API:", f"{ipc.endpoint(Path(info['home']))} (pub: {info['pub_endpoint']})"),
    ])
    return EXIT_OK


def resolve_cmd(ctx: Context) -> int:
    result = fields(ctx.call("resolve", name=ctx.args.name))
    if ctx.json:
        emit(result)
        return EXIT_OK
    print(f"{ctx.args.name}: {result['node_id']}")
    print_fields([
        ("candidates:", ", ".join(result["candidates"]) or "-"),
        ("NAT type:", result["nat_type"]),
        ("source:", result["source"]),
        ("trust:", STATE_NAMES.get(result["trust"] or "", "not trusted")),
    ], indent="  ")
    return EXIT_OK
