"""``pilot-agents bridge sub|pub|req|rep``: a pattern on a local ZeroMQ socket, for programs
that speak ZeroMQ and not pilot-agents (see docs/bridge.md and
:mod:`pilot_agents.integrations.zmq_bridge`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import ipc
from ..errors import DaemonNotRunningError
from ..integrations.zmq_bridge import (
    MAX_COUNT,
    Bridge,
    BridgeConfig,
    PubBridge,
    RepBridge,
    ReqBridge,
    SubBridge,
    run_together,
)
from ..patterns import Overflow, PubSubConfig
from ..runtime import STOPPING, run
from ..sdk import Client
from ..transport import Transport
from .context import Context
from .output import EXIT_OK, emit
from .parser import Commands, count, count_up_to, name_port, port, positive

DAEMON_CHECK_INTERVAL = 1.0  # seconds between looks at whether the daemon still runs

_ENDPOINT_HELP = "the local socket to bind: ipc://PATH or tcp://127.0.0.1:PORT ('*': any port)"


def register(commands: Commands) -> None:
    group = commands.group("bridge", "a pattern on a local ZeroMQ socket, for programs "
                           "without pilot-agents")

    sub = group.command("sub", "republish a remote publisher's topics on a local PUB (XPUB) "
                        "socket as [topic, payload]", sub_cmd)
    sub.add_argument("remote", type=name_port, metavar="NAME:PORT")
    sub.add_argument("prefixes", nargs="+", metavar="PREFIX",
                     help="topic prefixes to subscribe to at the publisher ('' for all)")
    sub.add_argument("endpoint", metavar="ENDPOINT", help=_ENDPOINT_HELP)
    sub.add_argument("--gap-topic", default=None, metavar="TOPIC",
                     help="after a gap, send [TOPIC, JSON {missed, resumed, topic}] locally "
                     "before the next publication")
    _common(sub)

    pub = group.command("pub", "publish on a pilot port what local PUB sockets send as "
                        "[topic, payload] (the bridge binds a SUB they connect to)", pub_cmd)
    pub.add_argument("port", type=port, metavar="PORT")
    pub.add_argument("endpoint", metavar="ENDPOINT", help=_ENDPOINT_HELP)
    pub.add_argument("--overflow", choices=[o.value for o in Overflow], default="block",
                     help="when a remote subscriber's queue is full: wait (block, default) or "
                     "drop its oldest publications and tell it how many (drop-oldest)")
    _common(pub)

    req = group.command("req", "send the requests of local REQ/DEALER clients to a remote "
                        "replier (the bridge binds a ROUTER they connect to)", req_cmd)
    req.add_argument("remote", type=name_port, metavar="NAME:PORT")
    req.add_argument("endpoint", metavar="ENDPOINT", help=_ENDPOINT_HELP)
    _common(req, requests=True)

    rep = group.command("rep", "serve requests on a pilot port by local REP/ROUTER workers "
                        "(the bridge binds a DEALER they connect to)", rep_cmd)
    rep.add_argument("port", type=port, metavar="PORT")
    rep.add_argument("endpoint", metavar="ENDPOINT", help=_ENDPOINT_HELP)
    _common(rep, requests=True)
    held = BridgeConfig().max_held_bytes
    rep.add_argument("--max-held-bytes", type=count, default=held, metavar="N",
                     help="take no more requests while those held (waiting for a worker, or "
                     f"with one) come to N bytes; they wait in the tunnel (default {held})")


def _common(parser: argparse.ArgumentParser, requests: bool = False) -> None:
    defaults = BridgeConfig()
    at_most = count_up_to(MAX_COUNT)
    parser.add_argument("--hwm", type=at_most, default=defaults.hwm, metavar="N",
                        help=f"high-water mark of the local socket, in messages (default "
                        f"{defaults.hwm})")
    parser.add_argument("--send-timeout", type=positive, default=defaults.send_timeout,
                        metavar="S", help="seconds a message may wait for room locally before "
                        f"it is dropped and counted (default {defaults.send_timeout:g})")
    if requests:
        parser.add_argument("--timeout", type=positive, default=defaults.request_timeout,
                            metavar="S", help="seconds a request may wait for its reply "
                            f"(default {defaults.request_timeout:g})")
        parser.add_argument("--max-in-flight", type=at_most, default=defaults.max_in_flight,
                            metavar="N", help="requests forwarded at once (default "
                            f"{defaults.max_in_flight})")


def _config(ctx: Context) -> BridgeConfig:
    args = ctx.args
    defaults = BridgeConfig()
    return BridgeConfig(
        hwm=args.hwm, send_timeout=args.send_timeout,
        max_in_flight=getattr(args, "max_in_flight", defaults.max_in_flight),
        request_timeout=getattr(args, "timeout", defaults.request_timeout),
        max_held_bytes=getattr(args, "max_held_bytes", defaults.max_held_bytes),
        gap_topic=getattr(args, "gap_topic", None),
        pubsub=PubSubConfig(overflow=Overflow(getattr(args, "overflow", "block"))))


def sub_cmd(ctx: Context) -> int:
    name, to_port = ctx.args.remote
    return _serve(ctx, lambda t: SubBridge(t, name, to_port, ctx.args.prefixes,
                                           ctx.args.endpoint, _config(ctx)))


def pub_cmd(ctx: Context) -> int:
    return _serve(ctx, lambda t: PubBridge(t, ctx.args.port, ctx.args.endpoint, _config(ctx)))


def req_cmd(ctx: Context) -> int:
    name, to_port = ctx.args.remote
    return _serve(ctx, lambda t: ReqBridge(t, name, to_port, ctx.args.endpoint, _config(ctx)))


def rep_cmd(ctx: Context) -> int:
    return _serve(ctx, lambda t: RepBridge(t, ctx.args.port, ctx.args.endpoint, _config(ctx)))


def _serve(ctx: Context, make: Callable[[Transport], Bridge]) -> int:
    """Run the bridge through the home's daemon until Ctrl-C, SIGTERM or SIGHUP (its terminal
    closed); a status line when it runs, one with its counts when it stops."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="bridge: %(message)s")
    # The SDK warns of a reply (a publication, an answer) to a remote peer that has left,
    # for an application to ask Client.flush() about: for a bridge that is a peer coming and
    # going, which its counts show, and nothing its user can act on.
    logging.getLogger("pilot_agents.sdk").setLevel(logging.ERROR)

    async def go() -> int:
        client = Client(ctx.home)
        bridge = make(client)  # a bad endpoint fails here, before the daemon is asked
        async with client:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            if not os.environ.get("PILOT_DEBUG"):
                loop.set_exception_handler(_one_line)
            for signum in STOPPING:
                loop.add_signal_handler(signum, stop.set)
            if await _open_unless(stop, bridge):
                try:
                    _announce(ctx, bridge)
                    await run_together(bridge.run(), _until(stop), _watch_daemon(client.home))
                finally:
                    await bridge.close()
            _report(ctx, bridge)
        return EXIT_OK

    return run(go())


def _one_line(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """What asyncio reports (a background task of a pattern that failed as the daemon went),
    in one line: no traceback for the user (PILOT_DEBUG=1 keeps asyncio's own report)."""
    exc = context.get("exception")
    logging.getLogger("pilot_agents.cli.bridge").warning(
        "%s%s", context.get("message", "asyncio"), f": {exc}" if exc else "")


async def _open_unless(stop: asyncio.Event, bridge: Bridge) -> bool:
    """Open ``bridge``; False, with nothing left open, if ``stop`` is set first: reaching the
    peer of a req bridge can take a handshake's timeout, and a Ctrl-C meanwhile must stop it
    then, not once that is over."""
    opening = asyncio.create_task(bridge.__aenter__())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    opening.cancel()  # the bridge closes what it opened
    await asyncio.wait({opening})
    if opening.cancelled():
        return False
    opening.result()  # raises what the opening raised
    return True


async def _until(event: asyncio.Event) -> None:
    await event.wait()


async def _watch_daemon(home: Path) -> None:
    """Raise when the daemon the bridge runs through stops: the patterns would otherwise go on
    resubscribing or answering errors through a connection that is gone for good."""
    running = ipc.daemon_pid(home)
    while True:
        await asyncio.sleep(DAEMON_CHECK_INTERVAL)
        if ipc.daemon_pid(home) != running:
            raise DaemonNotRunningError(f"the daemon of home {home} stopped, and the bridge "
                                        "with it")


def _announce(ctx: Context, bridge: Bridge) -> None:
    status = bridge.status()
    if ctx.json:
        emit(status | {"state": "running"})
        return
    where = f"{status['remote']} port {status['port']}" if status["remote"] else \
        f"pilot port {status['port']}"
    print(f"Bridging {where} ({bridge.kind}) at {status['endpoint']} ({status['socket']}, "
          f"HWM {status['hwm']}). Ctrl-C stops.", flush=True)


def _report(ctx: Context, bridge: Bridge) -> None:
    counts = dataclasses.asdict(bridge.stats)
    if ctx.json:
        emit({"bridge": bridge.kind, "state": "stopped", "stats": counts})
    else:
        print("Stopped: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v or
                                      k == "forwarded") + ".", flush=True)
