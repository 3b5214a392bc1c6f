"""``pilotctl daemon start|stop|status``.

The daemon's own code (and pydantic with it) loads only when a daemon is started or stopped, so
every other command starts fast.
"""

from __future__ import annotations

import argparse
import os

from .. import ipc
from ..errors import ConfigError, DaemonRunningError
from ..net.traversal.beacon_wire import STATUS_REASONS, Status, valid_hostname
from ..transport import DEFAULT_PORT
from ..version import build
from .context import Context
from .output import EXIT_OK, emit, fields, print_fields
from .parser import Commands, ports


def register(commands: Commands) -> None:
    daemon = commands.group("daemon", "start, stop or inspect the daemon")
    start = daemon.command("start", "start the daemon (detached unless --foreground)", start_cmd)
    start.add_argument("--hostname", help="name to register at the beacon (required with "
                       "--beacon)")
    start.add_argument("--beacon", default=os.environ.get("PILOT_BEACON") or None,
                       metavar="HOST:PORT[,...]", help="beacon address, or KEY@HOST:PORT to "
                       "pin its key; a fleet's beacons separated by commas, the preferred home "
                       "first (fails over to the next) (default: $PILOT_BEACON; none: static "
                       "peers only)")
    start.add_argument("--listen", default="0.0.0.0:0", metavar="ADDR",
                       help="UDP address of the tunnel endpoint (default 0.0.0.0:0)")
    start.add_argument("--inbox", type=ports, default=(DEFAULT_PORT,), metavar="PORTS",
                       help="ports listened on from the start, messages buffered until read "
                       f"(comma-separated; default {DEFAULT_PORT}; 'none')")
    start.add_argument("--metrics", metavar="HOST:PORT", default=None,
                       help="serve Prometheus metrics over HTTP on HOST:PORT (GET /metrics)")
    start.add_argument("--foreground", action="store_true",
                       help="run in this process, logging to stderr too")
    start.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    daemon.command("stop", "stop the daemon", stop_cmd)
    daemon.command("status", "is the daemon running, and as whom", status_cmd)


def start_cmd(ctx: Context) -> int:
    args = ctx.args
    if args.beacon and not args.hostname:
        raise ConfigError("--hostname is required with --beacon (the name to register)")
    if args.hostname is not None and not valid_hostname(args.hostname.lower()):
        # The beacon's rule, with a beacon or not: the same name must work with one later.
        raise ConfigError(f"--hostname {args.hostname!r}: "
                          f"{STATUS_REASONS[Status.BAD_NAME]}")
    pid = None if args.foreground else ipc.daemon_pid(ctx.home)
    if pid is not None:  # said before loading the daemon's code
        raise DaemonRunningError(f"a daemon is already running for {ctx.home} (pid {pid}); "
                                 "stop it with 'pilotctl daemon stop' first (to restart it, "
                                 "after an upgrade say)")
    from ..daemon import DaemonOptions, run_foreground, start_detached

    options = DaemonOptions(home=ctx.home, hostname=args.hostname, beacon=args.beacon,
                            listen=args.listen, inbox_ports=args.inbox, metrics=args.metrics)
    if args.foreground:
        return run_foreground(options, args.ready_fd)
    info = start_detached(options)
    if ctx.json:
        emit(info)
        return EXIT_OK
    name = info.get("hostname") or "(no hostname)"
    where = f", beacon {info['beacon']}" if info.get("beacon") else " (no beacon: static peers)"
    print(f"Daemon started: {name}, pid {info['pid']}, home {info['home']}")
    print(f"Node id {info['node_id']}, UDP {', '.join(info['endpoints'])}{where}")
    return EXIT_OK


def stop_cmd(ctx: Context) -> int:
    home = ctx.home
    pid = None
    if ipc.daemon_pid(home) is not None:
        from ..daemon import stop

        pid = stop(home)
    if ctx.json:
        emit({"stopped": pid is not None, "pid": pid, "home": str(home)})
    elif pid is None:
        print(f"The daemon is not running (home {home}).")
    else:
        print(f"Daemon stopped (pid {pid}).")
    return EXIT_OK


def status_cmd(ctx: Context) -> int:
    home = ctx.home
    if ipc.daemon_pid(home) is None:
        stale = (home / ipc.PID_NAME).exists()
        if ctx.json:
            emit({"running": False, "home": str(home), "stale_pid_file": stale})
        else:
            note = " (a crashed daemon left its pid file; the next start cleans it up)" \
                if stale else ""
            print(f"The daemon is not running (home {home}){note}. Start it with "
                  f"'{ipc.start_hint(home)}'.")
        return 3  # the code of DaemonNotRunningError: not an error here, but the answer

    info = fields(ctx.call("info"))
    if ctx.json:
        emit({"running": True, **info})
        return EXIT_OK
    listening = ", ".join(
        str(p["port"]) + (" (published)" if p["publish"] else "") for p in info["listening"])
    print(f"Running: pid {info['pid']}, up {info['uptime']:.0f} s, home {info['home']}")
    print_fields([
        ("Hostname:", info.get("hostname") or "-"),
        ("Node id:", info["node_id"]),
        ("Beacon:", info.get("beacon") or "- (static peers only)"),
        ("Endpoints:", ", ".join(info["endpoints"])),
        ("Listening:", listening or "-"),
        ("Trust:", f"{info['trusted']} trusted, {info['pending']} pending"),
    ])
    if info.get("build") != build():
        print("It runs other code than this command (pilot-agents was upgraded, reinstalled or "
              "changed since it started): restart it with 'pilotctl daemon stop', then "
              "'pilotctl daemon start'.")
    return EXIT_OK
