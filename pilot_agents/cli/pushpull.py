"""``pilotctl push|pull``: work spread over workers (:mod:`pilot_agents.patterns.pushpull`) from
a shell, through the daemon (``sdk.Client`` is the transport). Both run the pattern in this
process for as long as the command runs.

``pull`` acknowledges an item once it is printed and flushed (with ``--exec``, once the command
run for it exited 0), so a pull killed mid-stream loses nothing: what it had not acknowledged
goes to the other pullers. ``push`` exits once every item it pushed was acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..errors import CommandFailedError, ConfigError, PilotTimeoutError, not_trusted
from ..patterns.frames import MAX_PAYLOAD
from ..patterns.pushpull import Puller, Pusher, PushPullConfig, WorkItem
from ..sdk import Client
from .context import Context, receive_until
from .output import EXIT_INTERRUPTED, EXIT_OK, emit, plural, progress
from .parser import Commands, add_until, count, port, positive
from .patterns import ExecConfig, data_fields, exec_argv, run_command, write_data
from .stdin import stdin_lines

_DEFAULTS = PushPullConfig()
_EXEC = ExecConfig()
LINK_POLL_INTERVAL = 0.05  # seconds between looks at the pullers linked, for --wait-for


def register(commands: Commands) -> None:
    sub = commands.command(
        "push", "hand work items to pullers, one item to one puller, and wait until every item "
        "is acknowledged", push_cmd)
    sub.add_argument("targets", nargs="?", metavar="NAME[,NAME...]",
                     help="the pullers (hostnames or node ids), listening on PORT")
    sub.add_argument("port", type=port, metavar="PORT")
    sub.add_argument("--listen", action="store_true",
                     help="listen on PORT instead: pullers connect ('pull --from')")
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", action="append", metavar="TEXT",
                        help="an item (repeat for several)")
    source.add_argument("--stdin", action="store_true",
                        help="one item per line of stdin (without its newline)")
    sub.add_argument("--wait-for", type=count, default=None, metavar="N",
                     help="push nothing until N pullers are linked (so that the first to link "
                     "does not take all of a short batch)")
    sub.add_argument("--timeout", type=positive, default=_DEFAULTS.push_timeout, metavar="S",
                     help="seconds an item may wait for a puller with room, and the last items "
                     f"for their acknowledgement (default {_DEFAULTS.push_timeout:g})")

    sub = commands.command(
        "pull", "take work items pushed to a port and print them (or run a command per item); "
        "each is acknowledged once done", pull_cmd)
    sub.add_argument("port", type=port, metavar="PORT")
    sub.add_argument("--from", dest="source", metavar="NAME|NODE_ID",
                     help="connect to the pusher listening on PORT there ('push --listen')")
    add_until(sub, "items")
    sub.add_argument("--window", type=count, default=_DEFAULTS.window_items, metavar="N",
                     help="items this puller takes ahead of its consumer (default "
                     f"{_DEFAULTS.window_items}; 1 for slow commands, so that items wait for a "
                     "free worker)")
    sub.add_argument("--exec", dest="command", metavar="CMD",
                     help="run CMD per item (split like a shell would, no shell), the item on "
                     "its stdin; acknowledged when it exits 0; a failure stops the pull and its "
                     "unacknowledged items go to other pullers")
    sub.add_argument("--exec-timeout", type=positive, default=_EXEC.timeout, metavar="S",
                     help=f"seconds one run may take before it is killed (default "
                     f"{_EXEC.timeout:g})")


def _quiet() -> None:
    # The pattern logs a pusher closed with items unacknowledged, and the SDK an ACK or BYE
    # that found its pusher gone (which gives the item to another puller anyway): the
    # command's own output and error line say what matters, and a user mistake is one line.
    for name in ("pilot_agents.patterns.pushpull", "pilot_agents.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- push ---------------------------------------------------------------------------------------


def push_cmd(ctx: Context) -> int:
    args = ctx.args
    if args.listen == (args.targets is not None):
        raise ConfigError("push takes NAME[,NAME...] PORT, or --listen PORT")
    targets = [] if args.targets is None else [t for t in args.targets.split(",") if t]
    if args.targets is not None and not targets:
        raise ConfigError(f"no puller named in {args.targets!r}")
    _quiet()
    return ctx.run_client(lambda client: _push(ctx, client, targets), EXIT_INTERRUPTED)


@dataclass
class _Tally:
    """How far a push got: its progress line, and what its errors say."""

    read: int = 0  # items read (from stdin, or --data)
    pushed: int = 0


async def _push(ctx: Context, client: Client, targets: list[str]) -> int:
    args = ctx.args
    for target in targets:
        await _check_peer(client, target)
    started = time.perf_counter()
    tally = _Tally()
    async with Pusher(client, targets or args.port, None if args.listen else args.port) as pusher:
        def status() -> str:
            linked = len(pusher.connected)
            return (f"{tally.read} read, {tally.pushed} pushed, "
                    f"{sum(pusher.acknowledged.values())} acknowledged, {linked} "
                    f"puller{'' if linked == 1 else 's'} linked")

        async with progress(status, not ctx.json):
            if args.wait_for is not None:
                await _linked(pusher, args.wait_for, args.timeout)
            try:
                async for item in _items(ctx, tally):
                    if len(item) > pusher.config.window_bytes:
                        # The items before it are done first: a pusher closed now would drop
                        # its links, and what its pullers still held of them with them.
                        await pusher.join(timeout=args.timeout)
                        raise ConfigError(f"item {tally.pushed + 1} is {len(item)} bytes, more "
                                          "than a puller takes "
                                          f"({pusher.config.window_bytes}): the {tally.pushed} "
                                          "before it were pushed and acknowledged, none after "
                                          "it was pushed")
                    await pusher.push(item, timeout=args.timeout)
                    tally.pushed += 1
            except PilotTimeoutError as exc:
                raise PilotTimeoutError(f"{exc}; {plural(tally.pushed, 'item')} pushed, "
                                        f"{pusher.pending} of them not acknowledged") from None
            try:
                await pusher.join(timeout=args.timeout)
            except PilotTimeoutError as exc:  # it says how many were not acknowledged
                raise PilotTimeoutError(f"{plural(tally.pushed, 'item')} pushed: {exc}") from None
        spread = dict(pusher.acknowledged)
        redelivered = pusher.redelivered
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    if ctx.json:
        emit({"port": args.port, "pushed": tally.pushed, "acknowledged": spread,
              "redelivered": redelivered, "ms": round(elapsed_ms, 3)})
    else:
        shares = ", ".join(f"{name} {n}" for name, n in sorted(spread.items())) or "none"
        print(f"Pushed {plural(tally.pushed, 'item')} to port {args.port}, all acknowledged "
              f"({shares}; {redelivered} sent again) in {elapsed_ms / 1000:.2f} s.")
    return EXIT_OK


async def _check_peer(client: Client, name: str) -> None:
    """An unknown or untrusted name is the user's mistake, not a wait to time out: the links
    to it would fail and be tried again until then (a peer may come back)."""
    found = await client.resolve(name)
    refusal = not_trusted(found.get("hostname") or name, found.get("trust"))
    if refusal is not None:
        raise refusal


async def _linked(pusher: Pusher, pullers: int, timeout: float) -> None:
    """Wait until ``pullers`` are linked to ``pusher``; PilotTimeoutError after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while len(pusher.connected) < pullers:
                await asyncio.sleep(LINK_POLL_INTERVAL)
    except TimeoutError:
        raise PilotTimeoutError(f"{len(pusher.connected)} of {pullers} pullers linked to port "
                                f"{pusher.port} within {timeout:g} s") from None


async def _items(ctx: Context, tally: _Tally) -> AsyncIterator[bytes]:
    if not ctx.args.stdin:
        for text in ctx.args.data:
            tally.read += 1
            yield text.encode("utf-8")
        return
    readline = await stdin_lines(MAX_PAYLOAD, "an item")
    while line := await readline():
        tally.read += 1
        yield line[:-1] if line.endswith(b"\n") else line


# -- pull ---------------------------------------------------------------------------------------


def pull_cmd(ctx: Context) -> int:
    args = ctx.args
    argv: list[str] | None = None
    if args.command is not None:
        argv = exec_argv(args.command)
    _quiet()
    return ctx.run_client(lambda client: _Pull(ctx, client, argv).run(), EXIT_INTERRUPTED)


@dataclass
class _Done:
    """An item whose command exited 0, and what it wrote."""

    item: WorkItem
    output: bytes
    ms: float


class _Pull:
    def __init__(self, ctx: Context, client: Client, argv: list[str] | None) -> None:
        self.ctx = ctx
        self.client = client
        self.argv = argv
        self.exec_config = ExecConfig(timeout=ctx.args.exec_timeout)

    async def run(self) -> int:
        args = self.ctx.args
        if args.source is not None:
            await _check_peer(self.client, args.source)
        config = PushPullConfig(window_items=args.window)
        # With --exec the command's exit decides; else the next receive (after the item was
        # printed and flushed) acknowledges it.
        async with Puller(self.client, args.port, config, peer=args.source,
                          auto_ack=self.argv is None) as puller:
            if not self.ctx.json and sys.stderr.isatty():
                where = f"from {args.source} " if args.source else ""
                print(f"Pulling {where}on port {args.port}; Ctrl-C stops.", file=sys.stderr,
                      flush=True)
            source = f"from {args.source} port {args.port}" if args.source else \
                f"on port {args.port}"
            if self.argv is None:
                await receive_until(puller.receive, self._print, count=args.count,
                                    timeout=args.timeout, what="work item", source=source)
            else:
                argv = self.argv

                async def run_next(remaining: float | None) -> _Done:
                    return await self._run(argv, await puller.receive(remaining))

                await receive_until(run_next, self._print_done, count=args.count,
                                    timeout=args.timeout, what="work item", source=source)
        return EXIT_OK

    async def _run(self, argv: list[str], item: WorkItem) -> _Done:
        started = time.perf_counter()
        try:
            output = await run_command(argv, item.data, self.exec_config)
        except CommandFailedError as exc:
            # Not acknowledged: leaving the puller tells the pusher, which gives this item and
            # the others not acknowledged to another puller.
            raise CommandFailedError(f"{exc} (item {item.id} from {item.sender}, not "
                                     "acknowledged: it goes to another puller)") from None
        await item.ack()
        return _Done(item, output, (time.perf_counter() - started) * 1000.0)

    def _print(self, item: WorkItem) -> None:
        if self.ctx.json:
            emit(_item_fields(item) | data_fields(item.data))
        else:
            write_data(item.data)

    def _print_done(self, done: _Done) -> None:
        if self.ctx.json:
            emit(_item_fields(done.item) | {"bytes": len(done.item.data),
                                            "ms": round(done.ms, 3)} | data_fields(done.output))
        elif done.output:
            sys.stdout.buffer.write(done.output)
            sys.stdout.buffer.flush()


def _item_fields(item: WorkItem) -> dict[str, object]:
    return {"sender": item.sender, "id": item.id, "redelivered": item.redelivered}
