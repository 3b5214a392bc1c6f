"""The ``pilotctl`` / ``pilot-agents`` command line.

Every command but ``daemon start --foreground`` and ``beacon`` talks to the daemon of the home
(``--home``, else ``PILOT_HOME``, else ``~/.pilot-agents``) over its local ZeroMQ API. Every user
mistake ends as one line on stderr and a distinct exit code (see ``EXIT_CODES``); an unexpected
exception (a bug) prints one line too, and its traceback with ``PILOT_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import ipc
from .errors import (
    BadRequestError,
    BeaconError,
    ConfigError,
    ConnectionClosedError,
    DaemonNotRunningError,
    DaemonRunningError,
    KeyMismatchError,
    NotAvailableError,
    NotTrustedError,
    PeerUnreachableError,
    PilotError,
    PilotTimeoutError,
    PortClosedError,
    TrustRequestError,
    UnknownHostError,
)
from .ipc import IpcClient, decode_data, encode_data

DEFAULT_PORT = 1001

# Most specific first: the first class an error is an instance of gives the code.
EXIT_CODES: list[tuple[type[BaseException], int, str]] = [
    (DaemonNotRunningError, 3, "the daemon is not running or not answering"),
    (DaemonRunningError, 4, "a daemon already runs for this home"),
    (UnknownHostError, 5, "unknown host"),
    (NotTrustedError, 6, "peer not trusted"),
    (KeyMismatchError, 7, "a trusted name now resolves to another key"),
    (PeerUnreachableError, 8, "peer unreachable"),
    (PortClosedError, 9, "nothing listens on that port"),
    (PilotTimeoutError, 10, "timed out"),
    (BeaconError, 11, "beacon unreachable, name taken, or refused"),
    (ConnectionClosedError, 12, "connection closed"),
    (NotAvailableError, 2, "not available"),
    (BadRequestError, 2, "bad arguments"),
    (ConfigError, 2, "bad arguments"),
    (TrustRequestError, 2, "bad arguments"),
]
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 70, 130

EPILOG = """\
exit codes:
  0   success
  1   other error (network, file system)
  2   bad arguments, bad input, or a command that is not available yet
  3   daemon not running or not answering (start it: pilotctl daemon start --hostname NAME)
  4   a daemon is already running for this home
  5   unknown host
  6   peer not trusted (the message says the 'pilotctl trust ...' command that fixes it)
  7   key mismatch: a trusted name now resolves to a different key
  8   peer unreachable (down, no path, or it does not trust us)
  9   port closed: nothing listens on that port at the peer
  10  timed out
  11  beacon error: unreachable, name taken, refused
  12  connection closed by the peer
  70  internal error (a bug; PILOT_DEBUG=1 shows the traceback)
  130 interrupted

environment: PILOT_HOME (default home), PILOT_BEACON (default --beacon), PILOT_DEBUG=1
"""


def exit_code(exc: BaseException) -> int:
    for cls, code, _ in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR


# -- argument parsing ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} is not in 1..65535")
    return port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is less than 1")
    return value


def _ports(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(_port(p) for p in text.split(","))


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in ("pilotctl", "pilot-agents") else "pilotctl"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, metavar="DIR",
                        help="node home (default: $PILOT_HOME or ~/.pilot-agents)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")

    parser = _Parser(
        prog=prog or _prog(), description="pilot-agents: encrypted P2P tunnels for AI agents.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--home", default=None, metavar="DIR",
                        help="node home (default: $PILOT_HOME or ~/.pilot-agents)")
    parser.add_argument("--json", action="store_true", default=False,
                        help="machine-readable output")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, func: Callable[[argparse.Namespace], int],
                parent: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=help_text, parents=[common], epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(func=func)
        return sub

    # daemon
    daemon = commands.add_parser("daemon", help="start, stop or inspect the daemon")
    daemon_cmds = daemon.add_subparsers(dest="daemon_command", metavar="ACTION", required=True)
    start = command("start", "start the daemon (detached unless --foreground)", cmd_daemon_start,
                    daemon_cmds)
    start.add_argument("--hostname", help="name to register at the beacon (required with "
                       "--beacon)")
    start.add_argument("--beacon", default=os.environ.get("PILOT_BEACON") or None,
                       metavar="HOST:PORT", help="beacon address, or KEY@HOST:PORT to pin its "
                       "key (default: $PILOT_BEACON; none: static peers only)")
    start.add_argument("--listen", default="0.0.0.0:0", metavar="ADDR",
                       help="UDP address of the tunnel endpoint (default 0.0.0.0:0)")
    start.add_argument("--inbox", type=_ports, default=(DEFAULT_PORT,), metavar="PORTS",
                       help="ports listened on from the start, messages buffered until read "
                       "(comma-separated; default 1001; 'none')")
    start.add_argument("--foreground", action="store_true",
                       help="run in this process, logging to stderr too")
    start.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    command("stop", "stop the daemon", cmd_daemon_stop, daemon_cmds)
    command("status", "is the daemon running, and as whom", cmd_daemon_status, daemon_cmds)

    commands.add_parser("beacon", help="run a beacon server (pilot-agents beacon --listen ADDR "
                        "[--data-dir DIR]; its own --help has the rest)", add_help=False)

    # trust
    trust = commands.add_parser("trust", help="who this node trusts")
    trust_cmds = trust.add_subparsers(dest="trust_command", metavar="ACTION", required=True)
    sub = command("add", "trust a peer (pins the key its name resolves to now) and ask it to "
                  "trust us", cmd_trust_add, trust_cmds)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("--reason", default="", help="shown to the peer with the request")
    command("pending", "trust requests waiting for approve/reject", cmd_trust_pending,
            trust_cmds)
    for name, help_text, func in (
        ("approve", "trust a peer that asked us", cmd_trust_approve),
        ("reject", "drop a peer's trust request", cmd_trust_reject),
        ("remove", "stop trusting a peer (tears down its tunnels)", cmd_trust_remove),
    ):
        command(name, help_text, func, trust_cmds).add_argument("target", metavar="NAME|NODE_ID")
    command("list", "trusted peers and pending requests", cmd_trust_list, trust_cmds)
    sub = command("export", "print a signed trust request for a peer, to hand over out of band "
                  "(no beacon needed)", cmd_trust_export, trust_cmds)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("--reason", default="")
    sub = command("import", "take a trust request printed by 'trust export' on the peer",
                  cmd_trust_import, trust_cmds)
    sub.add_argument("request", metavar="REQUEST", help="the request, or - to read stdin")

    sub = command("add-peer", "static peer: where to reach a node id without a beacon",
                  cmd_add_peer)
    sub.add_argument("node_id", metavar="NODE_ID")
    sub.add_argument("address", metavar="HOST:PORT")
    sub.add_argument("--name", default=None, help="a local name for it")

    sub = command("connect", "open a connection: send --message, or pipe stdin/stdout like "
                  "netcat (lines in, messages out)", cmd_connect)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("port", nargs="?", type=_port, default=None, metavar="PORT",
                     help=f"port (default {DEFAULT_PORT})")
    sub.add_argument("--port", dest="port_option", type=_port, default=None, metavar="PORT")
    sub.add_argument("--message", "-m", default=None, metavar="TEXT",
                     help="send this message, confirm delivery, and close")
    sub.add_argument("--wait-reply", action="store_true",
                     help="with --message: wait for one reply and print it")
    sub.add_argument("--timeout", type=_positive, default=10.0, metavar="S",
                     help="seconds for connecting, delivery and the reply (default 10)")
    sub.add_argument("--linger", type=_positive, default=1.0, metavar="S",
                     help="netcat mode: after stdin ends, wait this long for replies "
                     "(default 1)")

    sub = command("send", "send one message and confirm its delivery", cmd_send)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("port", type=_port, metavar="PORT")
    data = sub.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", default=None, metavar="TEXT")
    data.add_argument("--file", default=None, metavar="PATH", help="file to send ('-': stdin)")
    sub.add_argument("--timeout", type=_positive, default=10.0, metavar="S")

    sub = command("listen", "print messages arriving on a port", cmd_listen)
    sub.add_argument("port", type=_port, metavar="PORT")
    sub.add_argument("--count", type=_count, default=None, metavar="N",
                     help="exit after N messages")
    sub.add_argument("--timeout", type=_positive, default=None, metavar="S",
                     help="give up after S seconds")
    sub.add_argument("--publish", action="store_true",
                     help="keep listening in the daemon and publish the messages on its ZeroMQ "
                     "PUB socket (ipc://HOME/pub.sock, topic = port as 5 digits); returns at once")
    sub = command("unlisten", "stop listening on a port (undoes listen --publish)",
                  cmd_unlisten)
    sub.add_argument("port", type=_port, metavar="PORT")

    sub = command("ping", "measure the round trip to a peer", cmd_ping)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("--count", "-c", type=_count, default=3, metavar="N")
    sub.add_argument("--interval", type=_positive, default=0.5, metavar="S")
    sub.add_argument("--timeout", type=_positive, default=5.0, metavar="S")

    command("peers", "tunnels: path, RTT, traffic", cmd_peers)
    command("info", "this node: id, address, hostname, NAT type, endpoints", cmd_info)
    sub = command("resolve", "look a name up (beacon, trust store, static peers)", cmd_resolve)
    sub.add_argument("name", metavar="NAME")
    sub = command("run", "run a YAML pipeline (not available yet)", cmd_run)
    sub.add_argument("pipeline", metavar="PIPELINE.yaml")
    return parser


# -- output helpers -------------------------------------------------------------------------


def _home(args: argparse.Namespace) -> Path:
    return ipc.resolve_home(getattr(args, "home", None))


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _emit(obj: Any) -> None:
    print(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), flush=True)


def _ms(rtt: float | None) -> str:
    if rtt is None:
        return "unknown"
    ms = rtt * 1000.0
    return f"{ms:.2f} ms" if ms < 0.1 else f"{ms:.1f} ms"


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _label(obj: dict[str, Any], key: str = "node_id") -> str:
    return str(obj.get("hostname") or obj.get(key))


def _data_bytes(message: dict[str, Any]) -> bytes:
    return decode_data(str(message.get("data", "")), str(message.get("encoding", "utf-8")))


def _write_data(data: bytes) -> None:
    sys.stdout.buffer.write(data + (b"" if data.endswith(b"\n") else b"\n"))
    sys.stdout.buffer.flush()


def _run(args: argparse.Namespace, body: Callable[[IpcClient], Any]) -> Any:
    async def go() -> Any:
        async with IpcClient(_home(args)) as client:
            return await body(client)

    return asyncio.run(go())


STATE_NAMES = {"mutual": "mutual", "outgoing": "outgoing", "incoming": "incoming-pending"}


# -- daemon --------------------------------------------------------------------------------


def cmd_daemon_start(args: argparse.Namespace) -> int:
    if args.beacon and not args.hostname:
        raise ConfigError("--hostname is required with --beacon (the name to register)")
    pid = None if args.foreground else ipc.daemon_pid(_home(args))
    if pid is not None:  # said before loading the daemon's code
        raise DaemonRunningError(f"a daemon is already running for {_home(args)} (pid {pid}); "
                                 "stop it with 'pilotctl daemon stop'")
    from .daemon import DaemonOptions, run_foreground, start_detached

    options = DaemonOptions(home=_home(args), hostname=args.hostname, beacon=args.beacon,
                            listen=args.listen, inbox_ports=args.inbox)
    if args.foreground:
        return run_foreground(options, args.ready_fd)
    info = start_detached(options)
    if _json(args):
        _emit(info)
        return EXIT_OK
    name = info.get("hostname") or "(no hostname)"
    where = f", beacon {info['beacon']}" if info.get("beacon") else " (no beacon: static peers)"
    print(f"Daemon started: {name}, pid {info['pid']}, home {info['home']}")
    print(f"Node id {info['node_id']}, UDP {', '.join(info['endpoints'])}{where}")
    return EXIT_OK


def cmd_daemon_stop(args: argparse.Namespace) -> int:
    home = _home(args)
    pid = None
    if ipc.daemon_pid(home) is not None:
        from .daemon import stop

        pid = stop(home)
    if _json(args):
        _emit({"stopped": pid is not None, "pid": pid, "home": str(home)})
    elif pid is None:
        print(f"The daemon is not running (home {home}).")
    else:
        print(f"Daemon stopped (pid {pid}).")
    return EXIT_OK


def cmd_daemon_status(args: argparse.Namespace) -> int:
    home = _home(args)
    if ipc.daemon_pid(home) is None:
        stale = (home / ipc.PID_NAME).exists()
        if _json(args):
            _emit({"running": False, "home": str(home), "stale_pid_file": stale})
        else:
            note = " (a crashed daemon left its pid file; the next start cleans it up)" \
                if stale else ""
            print(f"The daemon is not running (home {home}){note}. Start it with "
                  f"'{ipc.start_hint(home)}'.")
        return 3

    async def body(client: IpcClient) -> dict[str, Any]:
        return await client.request("info")

    info = _run(args, body)
    info.pop("ok", None)
    info.pop("id", None)
    if _json(args):
        _emit({"running": True, **info})
        return EXIT_OK
    ports = ", ".join(
        str(p["port"]) + (" (published)" if p["publish"] else "") for p in info["listening"])
    print(f"Running: pid {info['pid']}, up {info['uptime']:.0f} s, home {info['home']}")
    print(f"Hostname:  {info.get('hostname') or '-'}")
    print(f"Node id:   {info['node_id']}")
    print(f"Beacon:    {info.get('beacon') or '- (static peers only)'}")
    print(f"Endpoints: {', '.join(info['endpoints'])}")
    print(f"Listening: {ports or '-'}")
    print(f"Trust:     {info['trusted']} trusted, {info['pending']} pending")
    return EXIT_OK


def _beacon_argv(argv: list[str]) -> list[str] | None:
    """The beacon's own arguments if the command is ``beacon`` (it parses them itself)."""
    i = 0
    while i < len(argv):
        if argv[i] == "--json" or argv[i].startswith("--home="):
            i += 1
        elif argv[i] == "--home":
            i += 2
        else:
            return argv[i + 1:] if argv[i] == "beacon" else None
    return None


def _beacon(argv: list[str]) -> int:
    try:
        from .beacon import service
    except ImportError as exc:
        raise NotAvailableError(
            f"the beacon is not available in this installation ({exc})"
        ) from None
    result = service.main(argv)
    return int(result or 0)


# -- trust -----------------------------------------------------------------------------------


def _print_entry_result(args: argparse.Namespace, result: dict[str, Any], verb: str) -> None:
    if _json(args):
        result.pop("ok", None)
        result.pop("id", None)
        _emit(result)
        return
    entry = result["entry"]
    print(f"{verb} {_label(entry)} ({entry['node_id']}): "
          f"{STATE_NAMES.get(entry['state'], entry['state'])}.")
    if result.get("note"):
        print(result["note"][0].upper() + result["note"][1:] + ".")


def cmd_trust_add(args: argparse.Namespace) -> int:
    result = _run(args, lambda c: c.request("trust_add", target=args.target,
                                            reason=args.reason))
    _print_entry_result(args, result, "Trusted")
    return EXIT_OK


def cmd_trust_approve(args: argparse.Namespace) -> int:
    result = _run(args, lambda c: c.request("trust_approve", target=args.target))
    _print_entry_result(args, result, "Approved")
    return EXIT_OK


def cmd_trust_reject(args: argparse.Namespace) -> int:
    result = _run(args, lambda c: c.request("trust_reject", target=args.target))
    _print_entry_result(args, result, "Rejected")
    return EXIT_OK


def cmd_trust_remove(args: argparse.Namespace) -> int:
    result = _run(args, lambda c: c.request("trust_remove", target=args.target))
    if _json(args):
        _emit({"entry": result["entry"]})
    else:
        entry = result["entry"]
        print(f"Removed {_label(entry)} ({entry['node_id']}) from the trust store.")
    return EXIT_OK


def cmd_trust_list(args: argparse.Namespace) -> int:
    entries = _run(args, lambda c: c.request("trust_list"))["entries"]
    if _json(args):
        _emit({"entries": entries})
    elif not entries:
        print("No trusted peers. Add one with 'pilotctl trust add NAME'.")
    else:
        _table([[e.get("hostname") or "-", e["node_id"], STATE_NAMES.get(e["state"], e["state"])]
                for e in entries], ["NAME", "NODE ID", "STATE"])
    return EXIT_OK


def cmd_trust_pending(args: argparse.Namespace) -> int:
    pending = _run(args, lambda c: c.request("trust_pending"))["pending"]
    if _json(args):
        _emit({"pending": pending})
    elif not pending:
        print("No pending trust requests.")
    else:
        now = time.time()
        _table([[e.get("hostname") or "-", e["node_id"], f"{now - e['updated_at']:.0f} s ago",
                 e.get("reason") or ""] for e in pending],
               ["NAME", "NODE ID", "RECEIVED", "REASON"])
        print("Approve with 'pilotctl trust approve NAME', or reject with "
              "'pilotctl trust reject NAME'.")
    return EXIT_OK


def cmd_trust_export(args: argparse.Namespace) -> int:
    result = _run(args, lambda c: c.request("trust_export", target=args.target,
                                            reason=args.reason))
    if _json(args):
        _emit({"request": result["request"], "to": result["to"]})
    else:
        print(result["request"])
    return EXIT_OK


def cmd_trust_import(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.request == "-" else args.request
    result = _run(args, lambda c: c.request("trust_import", request=text.strip()))
    entry = result["entry"]
    if _json(args):
        _emit({"entry": entry})
    elif entry["state"] == "incoming":
        print(f"Trust request from {_label(entry)} ({entry['node_id']}) is pending: approve it "
              f"with 'pilotctl trust approve {_label(entry)}'.")
    else:
        print(f"Trust with {_label(entry)} ({entry['node_id']}) is {entry['state']}.")
    return EXIT_OK


def cmd_add_peer(args: argparse.Namespace) -> int:
    result = _run(args, lambda c: c.request("add_peer", node_id=args.node_id,
                                            address=args.address, hostname=args.name))
    if _json(args):
        _emit({k: result[k] for k in ("node_id", "address", "hostname")})
    else:
        name = f" ({args.name})" if args.name else ""
        print(f"Static peer {result['node_id']}{name} at {result['address']}.")
    return EXIT_OK


# -- messaging -------------------------------------------------------------------------------


def cmd_connect(args: argparse.Namespace) -> int:
    if args.port is not None and args.port_option is not None and args.port != args.port_option:
        raise ConfigError(f"two different ports given ({args.port} and {args.port_option})")
    port = args.port or args.port_option or DEFAULT_PORT
    if args.message is None:
        if args.wait_reply:
            raise ConfigError("--wait-reply needs --message")
        return int(_run(args, lambda c: _netcat(args, c, port)))
    return int(_run(args, lambda c: _connect_message(args, c, port)))


async def _connect_message(args: argparse.Namespace, client: IpcClient, port: int) -> int:
    opened = await client.request("connect", target=args.target, port=port,
                                  timeout=args.timeout)
    stream = opened["stream"]
    label = opened.get("hostname") or opened["peer"]
    try:
        data = args.message.encode("utf-8")
        await client.request("stream_send", stream=stream, data=args.message)
        drained = await client.request("stream_drain", stream=stream, timeout=args.timeout)
        reply: dict[str, Any] | None = None
        if args.wait_reply:
            reply = (await client.request("stream_receive", stream=stream,
                                          timeout=args.timeout))["message"]
        await client.request("stream_close", stream=stream)
    except BaseException:
        with contextlib.suppress(PilotError):
            await client.request("stream_abort", stream=stream)
        raise
    rtt = drained.get("rtt") if drained.get("rtt") is not None else opened.get("rtt")
    path = drained.get("path") or opened.get("path")
    if _json(args):
        out: dict[str, Any] = {"peer": opened["peer"], "hostname": opened.get("hostname"),
                               "port": port, "path": path, "rtt": rtt, "encrypted": True,
                               "delivered": True, "bytes": len(data)}
        if reply is not None:
            out["reply"] = _message_out(reply)
        _emit(out)
    else:
        print(f"Connected via {path}. RTT: {_ms(rtt)}. Encrypted.")
        print(f"Delivered {len(data)} bytes to {label} port {port}.")
        if reply is not None:
            _write_data(_data_bytes(reply))
    return EXIT_OK


async def _netcat(args: argparse.Namespace, client: IpcClient, port: int) -> int:
    opened = await client.request("connect", target=args.target, port=port,
                                  timeout=args.timeout)
    stream = opened["stream"]
    label = opened.get("hostname") or opened["peer"]
    if not _json(args) and sys.stderr.isatty():
        print(f"Connected to {label} port {port} via {opened['path']}. RTT: "
              f"{_ms(opened.get('rtt'))}. Encrypted.", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    def read_stdin() -> None:  # a daemon thread: a blocked read never holds up exit
        for line in iter(sys.stdin.buffer.readline, b""):
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    last_input = [time.monotonic()]
    peer_closed = asyncio.Event()

    async def receive() -> None:
        while True:
            try:
                reply = await client.request("stream_receive", stream=stream, timeout=None)
            except ConnectionClosedError:
                peer_closed.set()
                return
            last_input[0] = time.monotonic()
            message = reply["message"]
            if _json(args):
                _emit(_message_out(message))
            else:
                _write_data(_data_bytes(message))

    async def send() -> None:
        while (line := await lines.get()) is not None:
            text, encoding = encode_data(line.rstrip(b"\n"))
            await client.request("stream_send", stream=stream, data=text, encoding=encoding)
        await client.request("stream_drain", stream=stream, timeout=args.timeout)
        last_input[0] = time.monotonic()
        while not peer_closed.is_set():  # linger for replies
            idle = time.monotonic() - last_input[0]
            if idle >= args.linger:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer_closed.wait(), args.linger - idle)

    receiver = asyncio.create_task(receive())
    sender = asyncio.create_task(send())
    try:
        done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in (receiver, sender):
            task.cancel()
        await asyncio.gather(receiver, sender, return_exceptions=True)
        with contextlib.suppress(PilotError):
            await client.request("stream_close", stream=stream, wait=args.timeout + 5)
    return EXIT_OK


def _message_out(message: dict[str, Any]) -> dict[str, Any]:
    return {"from": message["from"], "hostname": message.get("hostname"),
            "port": message["port"], "source_port": message["source_port"],
            "data": message["data"], "encoding": message["encoding"]}


def cmd_send(args: argparse.Namespace) -> int:
    if args.file is not None:
        try:
            data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {args.file}: {exc.strerror}") from None
    else:
        data = args.data.encode("utf-8")
    text, encoding = encode_data(data)
    result = _run(args, lambda c: c.request("send", target=args.target, port=args.port,
                                            data=text, encoding=encoding, timeout=args.timeout))
    if _json(args):
        _emit({k: result.get(k) for k in ("peer", "hostname", "port", "bytes", "path", "rtt")}
              | {"delivered": True})
    else:
        print(f"Delivered {result['bytes']} bytes to {_label(result, 'peer')} port {args.port} "
              f"via {result['path']}. RTT: {_ms(result.get('rtt'))}. Encrypted.")
    return EXIT_OK


def cmd_listen(args: argparse.Namespace) -> int:
    if args.publish:
        result = _run(args, lambda c: c.request("listen", port=args.port, publish=True))
        if _json(args):
            _emit({k: result[k] for k in ("port", "publish", "pub_endpoint", "topic")})
        else:
            print(f"Port {args.port} is published on {result['pub_endpoint']} (topic "
                  f"{result['topic']}); stop with 'pilotctl unlisten {args.port}'.")
        return EXIT_OK
    return int(_run(args, lambda c: _listen(args, c)))


async def _listen(args: argparse.Namespace, client: IpcClient) -> int:
    await client.request("listen", port=args.port)
    if not _json(args) and sys.stderr.isatty():
        print(f"Listening on port {args.port}" + (
            f" for {args.count} message(s)" if args.count else "") + ".", file=sys.stderr,
            flush=True)
    received = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        while args.count is None or received < args.count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise PilotTimeoutError(f"no message on port {args.port} within "
                                        f"{args.timeout:g} s")
            try:
                reply = await client.request("receive", port=args.port, timeout=remaining)
            except PilotTimeoutError:
                if received and args.count is None:
                    break
                raise PilotTimeoutError(
                    f"received {received} of {args.count} messages on port {args.port} within "
                    f"{args.timeout:g} s" if args.count else
                    f"no message on port {args.port} within {args.timeout:g} s"
                ) from None
            received += 1
            message = reply["message"]
            if _json(args):
                _emit(_message_out(message))
            else:
                sys.stdout.write(f"[{message.get('hostname') or message['from']}] ")
                sys.stdout.flush()
                _write_data(_data_bytes(message))
    finally:
        with contextlib.suppress(PilotError):
            await client.request("unlisten", port=args.port)
    return EXIT_OK


def cmd_unlisten(args: argparse.Namespace) -> int:
    result = _run(args, lambda c: c.request("unlisten", port=args.port))
    if _json(args):
        _emit({"port": args.port, "closed": result["closed"]})
    else:
        print(f"Stopped listening on port {args.port}." if result["closed"] else
              f"Port {args.port} stays open (another client or the inbox still uses it).")
    return EXIT_OK


def cmd_ping(args: argparse.Namespace) -> int:
    async def body(client: IpcClient) -> int:
        probes: list[dict[str, Any]] = []
        last_error: PilotError | None = None
        label = args.target
        for seq in range(1, args.count + 1):
            if seq > 1:
                await asyncio.sleep(args.interval)
            try:
                result = await client.request("ping", target=args.target, timeout=args.timeout)
            except (PilotTimeoutError, PeerUnreachableError) as exc:
                last_error = exc
                probes.append({"seq": seq, "error": str(exc)})
                if not _json(args):
                    print(f"no reply from {label} (probe {seq}): {exc}")
                continue
            label = result.get("hostname") or result["peer"]
            probes.append({"seq": seq, "rtt": result["rtt"], "path": result["path"]})
            if not _json(args):
                print(f"reply from {label}: probe {seq} time={_ms(result['rtt'])} "
                      f"path={result['path']}")
        rtts = [p["rtt"] for p in probes if "rtt" in p]
        summary = {"target": args.target, "sent": len(probes), "received": len(rtts),
                   "min": min(rtts, default=None), "max": max(rtts, default=None),
                   "avg": sum(rtts) / len(rtts) if rtts else None}
        if _json(args):
            _emit({**summary, "probes": probes})
        else:
            print(f"{summary['sent']} probes, {summary['received']} replies" + (
                f", min/avg/max {_ms(summary['min'])}/{_ms(summary['avg'])}/"
                f"{_ms(summary['max'])}" if rtts else ""))
        if not rtts and last_error is not None:
            raise last_error
        return EXIT_OK

    return int(_run(args, body))


def cmd_peers(args: argparse.Namespace) -> int:
    peers = _run(args, lambda c: c.request("peers"))["peers"]
    if _json(args):
        _emit({"peers": peers})
    elif not peers:
        print("No peers.")
    else:
        _table([[p.get("hostname") or "-", p["node_id"], p["path"], _ms(p.get("rtt")),
                 str(p["bytes_in"]), str(p["bytes_out"]), p.get("trust") or "-"]
                for p in peers], ["NAME", "NODE ID", "PATH", "RTT", "IN", "OUT", "TRUST"])
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    info = _run(args, lambda c: c.request("info"))
    info.pop("ok", None)
    info.pop("id", None)
    if _json(args):
        _emit(info)
        return EXIT_OK
    print(f"Node id:         {info['node_id']}")
    print(f"Virtual address: {info['virtual_address']}")
    print(f"Hostname:        {info.get('hostname') or '-'}")
    print(f"NAT type:        {info.get('nat_type') or 'unknown'}")
    print(f"Endpoints:       {', '.join(info['endpoints'])}")
    print(f"Beacon:          {info.get('beacon') or '- (static peers only)'}")
    print(f"Home:            {info['home']}")
    print(f"Local API:       {ipc.endpoint(Path(info['home']))} (pub: {info['pub_endpoint']})")
    return EXIT_OK


def cmd_resolve(args: argparse.Namespace) -> int:
    result = _run(args, lambda c: c.request("resolve", name=args.name))
    result.pop("ok", None)
    result.pop("id", None)
    if _json(args):
        _emit(result)
        return EXIT_OK
    print(f"{args.name}: {result['node_id']}")
    print(f"  candidates: {', '.join(result['candidates']) or '-'}")
    print(f"  NAT type:   {result['nat_type']}")
    print(f"  source:     {result['source']}")
    print(f"  trust:      {STATE_NAMES.get(result['trust'] or '', 'not trusted')}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    raise NotAvailableError(f"cannot run {args.pipeline}: pipelines are not available yet")


# -- entry point --------------------------------------------------------------------------


def _report(exc: BaseException, args: argparse.Namespace | None, code: int) -> None:
    message = str(exc) or type(exc).__name__
    sys.stderr.write(f"error: {message}\n")
    if args is not None and _json(args):
        _emit({"error": {"type": type(exc).__name__, "message": message, "exit_code": code}})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    try:
        beacon_args = _beacon_argv(argv)
        if beacon_args is not None:
            return _beacon(beacon_args)
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except PilotError as exc:
        code = exit_code(exc)
        _report(exc, args, code)
        return code
    except OSError as exc:
        _report(OSError(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")),
                args, EXIT_ERROR)
        return EXIT_ERROR
    except Exception as exc:
        if os.environ.get("PILOT_DEBUG"):
            raise
        _report(RuntimeError(f"internal error: {type(exc).__name__}: {exc} (run with "
                             "PILOT_DEBUG=1 for the traceback)"), args, EXIT_BUG)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
