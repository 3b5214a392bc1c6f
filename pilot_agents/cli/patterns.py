"""``pilotctl request|serve|publish|subscribe|publishers|unpublish``: the message-bus patterns of
:mod:`pilot_agents.patterns` from a shell, through the daemon (``sdk.Client`` is the transport).

``request`` and ``subscribe`` run the pattern in this process for as long as the command runs;
``serve`` answers requests until stopped by running a command per request; ``publish`` ends at
once, so the daemon hosts the publisher (``daemon/publishing.py``) and keeps it until
``unpublish``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace

from ..errors import CommandFailedError, ConfigError, PilotError
from ..ipc import encode_data
from ..patterns.frames import MAX_PAYLOAD
from ..patterns.pubsub import Overflow, Publication, PubSubConfig, Subscriber
from ..patterns.reqrep import Replier, ReqRepConfig, Request, Requester
from ..sdk import Client
from .context import Context, receive_until
from .output import EXIT_INTERRUPTED, EXIT_OK, emit, plural, print_list
from .parser import Commands, add_until, count, port, positive


@dataclass(frozen=True)
class ExecConfig:
    """The bounds of ``serve --exec``: each request runs the command once, in a process of its
    own (argv split like a shell would, no shell involved)."""

    concurrency: int = 8  # requests whose command runs at once; more wait (so do their senders)
    timeout: float = 30.0  # seconds one run may take; then it is killed and an error goes back
    max_reply_bytes: int = 8 * 2**20  # stdout of one run; more and it is killed, error reply
    stderr_tail_bytes: int = 1024  # the end of stderr kept for an error reply and the log

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_reply_bytes < 1 or self.stderr_tail_bytes < 0:
            raise ConfigError("ExecConfig: concurrency and max_reply_bytes must be at least 1, "
                              "stderr_tail_bytes at least 0")
        if not self.timeout > 0:
            raise ConfigError("ExecConfig.timeout must be positive")
        if self.max_reply_bytes > MAX_PAYLOAD:
            # A larger reply cannot be sent: its requester would get no answer but a timeout.
            raise ConfigError(f"--max-reply-bytes: at most {MAX_PAYLOAD}, the largest reply a "
                              "tunnel message carries")


_DEFAULTS = ExecConfig()


def register(commands: Commands) -> None:
    sub = commands.command("request", "send one request to a replier and print its reply",
                           request_cmd)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("port", type=port, metavar="PORT")
    sub.add_argument("--data", required=True, metavar="TEXT", help="the request's payload")
    sub.add_argument("--timeout", type=positive, default=10.0, metavar="S",
                     help="seconds for the reply, connecting included (default 10)")

    sub = commands.command(
        "serve", "answer requests on a port by running a command per request: the request on "
        "its stdin, its stdout the reply (a non-zero exit is an error reply)", serve_cmd)
    sub.add_argument("port", type=port, metavar="PORT")
    sub.add_argument("--exec", required=True, dest="command", metavar="CMD",
                     help="the command, split like a shell would (no shell runs it: write "
                     "'sh -c \"...\"' for pipes)")
    sub.add_argument("--concurrency", type=count, default=_DEFAULTS.concurrency, metavar="N",
                     help=f"requests handled at once (default {_DEFAULTS.concurrency})")
    sub.add_argument("--timeout", type=positive, default=_DEFAULTS.timeout, metavar="S",
                     help=f"seconds one run may take before it is killed (default "
                     f"{_DEFAULTS.timeout:g})")
    sub.add_argument("--max-reply-bytes", type=count, default=_DEFAULTS.max_reply_bytes,
                     metavar="N", help="the most stdout one run may write (default "
                     f"{_DEFAULTS.max_reply_bytes})")

    sub = commands.command(
        "publish", "publish one message on a topic; the daemon hosts the port's publisher "
        "from the first publish until 'unpublish'", publish_cmd)
    sub.add_argument("port", type=port, metavar="PORT")
    sub.add_argument("topic", metavar="TOPIC")
    sub.add_argument("--data", required=True, metavar="TEXT", help="the publication's payload")
    sub.add_argument("--overflow", choices=[o.value for o in Overflow], default=None,
                     help="when a subscriber's queue is full: wait for it (block, the default) "
                     "or drop its oldest publications, counted (drop-oldest); set when the "
                     "publisher is created")
    sub.add_argument("--timeout", type=positive, default=10.0, metavar="S",
                     help="with block: seconds a full subscriber may hold the publish up "
                     "(default 10)")

    sub = commands.command("subscribe", "print the publications of a peer's publisher whose "
                           "topic starts with one of the prefixes", subscribe_cmd)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("port", type=port, metavar="PORT")
    sub.add_argument("prefixes", nargs="+", metavar="PREFIX",
                     help="topic prefixes ('' for every topic)")
    add_until(sub, "publications")

    commands.command("publishers", "list the publishers this daemon hosts", publishers_cmd)
    sub = commands.command("unpublish", "close the daemon's publisher on a port (its "
                           "subscribers are told, and wait for a new one)", unpublish_cmd)
    sub.add_argument("port", type=port, metavar="PORT")


def write_data(data: bytes, prefix: bytes = b"") -> None:
    """``data`` on stdout as it came, after ``prefix``, ending in one newline."""
    sys.stdout.buffer.write(prefix + data + (b"" if data.endswith(b"\n") else b"\n"))
    sys.stdout.buffer.flush()


def data_fields(data: bytes) -> dict[str, str]:
    text, encoding = encode_data(data)
    return {"data": text, "encoding": encoding}


# -- request ------------------------------------------------------------------------------------


def request_cmd(ctx: Context) -> int:
    return ctx.run_client(lambda client: _request(ctx, client), EXIT_INTERRUPTED)


async def _request(ctx: Context, client: Client) -> int:
    args = ctx.args
    async with Requester(client) as requester:
        started = time.perf_counter()
        reply = await requester.request(args.target, args.port, args.data.encode("utf-8"),
                                        timeout=args.timeout)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
    if ctx.json:
        emit({"target": args.target, "port": args.port, "replier": reply.sender,
              "bytes": len(reply.data), "ms": round(elapsed_ms, 3)} | data_fields(reply.data))
    else:
        write_data(reply.data)
    return EXIT_OK


# -- serve --------------------------------------------------------------------------------------


def serve_cmd(ctx: Context) -> int:
    args = ctx.args
    argv = exec_argv(args.command)
    config = ExecConfig(concurrency=args.concurrency, timeout=args.timeout,
                        max_reply_bytes=args.max_reply_bytes)
    return ctx.run_client(lambda client: _Server(ctx, client, argv, config).serve(), EXIT_OK)


def exec_argv(command: str) -> list[str]:
    """``--exec CMD`` split into argv; ConfigError if it cannot be, or names no command."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"cannot split --exec {command!r}: {exc}") from None
    if not argv:
        raise ConfigError("--exec needs a command")
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"--exec: no command {argv[0]!r} found (not on PATH, or not "
                          "executable)")
    return argv


class _Server:
    """``serve --exec``: a Replier whose requests each run the command once."""

    def __init__(self, ctx: Context, client: Client, argv: list[str],
                 config: ExecConfig) -> None:
        self.ctx = ctx
        self.client = client
        self.argv = argv
        self.config = config
        self.answered = 0
        self._names: dict[str, str | None] = {}

    async def serve(self) -> int:
        port = self.ctx.args.port
        async with Replier(self.client, port) as replier:
            if self.ctx.json:  # the first line: a script knows the port is served from here
                emit({"state": "serving", "port": port, "command": self.argv,
                      "concurrency": self.config.concurrency})
            else:
                print(f"Serving port {port} with {shlex.join(self.argv)} (up to "
                      f"{self.config.concurrency} at once); Ctrl-C stops.", file=sys.stderr,
                      flush=True)
            try:
                # Stopped, it kills the commands still running before the replier closes,
                # which answers their requests with an error: no requester waits for its
                # timeout.
                await replier.serve(self._answer,
                                    ReqRepConfig(handler_concurrency=self.config.concurrency))
            finally:
                if self.ctx.json:
                    emit({"state": "stopped", "answered": self.answered})
                else:
                    print(f"Stopped after {plural(self.answered, 'request')}.", file=sys.stderr,
                          flush=True)
        return EXIT_OK

    async def _answer(self, request: Request) -> bytes:
        """Run the command for ``request``: its output is the reply, and its failure (raised
        on) an error reply. A requester that gives up has the command killed."""
        started = time.perf_counter()
        try:
            output = await run_command(self.argv, request.data, self.config)
        except CommandFailedError as exc:
            self.answered += 1
            await self._log(request, started, None, exc)
            raise
        except asyncio.CancelledError:
            if request.cancelled:
                await self._log(request, started, None, PilotError(
                    "the requester gave up (timed out or cancelled); the command was killed"))
            raise
        self.answered += 1
        await self._log(request, started, output, None)
        return output

    async def _log(self, request: Request, started: float, output: bytes | None,
                   error: PilotError | None) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        hostname = await self._hostname(request.sender)
        if self.ctx.json:
            emit({"time": time.time(), "from": request.sender, "hostname": hostname,
                  "request_bytes": len(request.data),
                  "reply_bytes": None if output is None else len(output),
                  "ok": error is None, "error": None if error is None else str(error),
                  "ms": round(elapsed_ms, 3)})
            return
        outcome = f"{len(output)} B" if error is None and output is not None else f"error: {error}"
        print(f"{time.strftime('%H:%M:%S')} {hostname or request.sender} "
              f"{len(request.data)} B -> {outcome} ({elapsed_ms:.1f} ms)", flush=True)

    async def _hostname(self, node_id: str) -> str | None:
        """The requester's name in the trust store, looked up once per requester."""
        if node_id not in self._names:
            with contextlib.suppress(PilotError):
                for entry in (await self.client.call("trust_list"))["entries"]:
                    self._names[entry["node_id"]] = entry.get("hostname")
            self._names.setdefault(node_id, None)
        return self._names[node_id]


async def run_command(argv: list[str], data: bytes, config: ExecConfig) -> bytes:
    """Run ``argv`` with ``data`` on its stdin; its stdout. CommandFailedError if it exits
    non-zero, is killed at ``config.timeout``, or writes more than ``config.max_reply_bytes``:
    the message has the end of its stderr. It runs in a process group of its own, killed
    whole: a shell's pipeline, or what it started in the background, goes with it."""
    name = argv[0]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise CommandFailedError(f"cannot run {name}: {exc.strerror or exc}") from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    tail = bytearray()
    too_much = False

    def kill() -> None:
        # The group, not the process alone: its children hold our pipes, and the wait for it
        # ends only once they are closed (a pipeline past its timeout held its request, and
        # a slot of --concurrency, until its last process ended by itself).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def feed() -> None:
        # A command that does not read its stdin (or exits early) closes the pipe: fine. If
        # it already has, the write is not tried: uvloop raises RuntimeError for it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if not stdin.is_closing():
                stdin.write(data)
                await stdin.drain()
            stdin.close()

    async def read_stdout() -> bytes:
        nonlocal too_much
        out = bytearray()
        while chunk := await stdout.read(65536):
            out += chunk
            if len(out) > config.max_reply_bytes:
                too_much = True
                kill()
                return b""
        return bytes(out)

    async def read_stderr() -> None:
        while chunk := await stderr.read(65536):
            tail.extend(chunk)
            if len(tail) > config.stderr_tail_bytes:
                del tail[:len(tail) - config.stderr_tail_bytes]

    def said() -> str:
        text = tail.decode("utf-8", "replace").strip()
        return f": {text}" if text else ""

    try:
        async with asyncio.timeout(config.timeout):
            _, output, _ = await asyncio.gather(feed(), read_stdout(), read_stderr())
            status = await proc.wait()
    except TimeoutError:
        if proc.returncode is not None:  # it ended; what it started kept its output open
            raise CommandFailedError(
                f"{name} exited (status {proc.returncode}), but a process it started still "
                f"held its stdout or stderr after {config.timeout:g} s and was killed (send "
                f"a background process's output elsewhere){said()}") from None
        raise CommandFailedError(
            f"{name} took longer than {config.timeout:g} s and was killed{said()}") from None
    finally:
        kill()  # what is left of its group, if anything: nothing outlives its run
        await proc.wait()
    if too_much:
        raise CommandFailedError(
            f"{name} wrote more than {config.max_reply_bytes} bytes and was killed{said()}")
    if status < 0:
        raise CommandFailedError(f"{name} was killed by signal {-status}{said()}")
    if status != 0:
        raise CommandFailedError(f"{name} exited with status {status}{said()}")
    return output


# -- publish, publishers, unpublish ------------------------------------------------------------


def publish_cmd(ctx: Context) -> int:
    args = ctx.args
    result = ctx.call("publish", port=args.port, topic=args.topic, data=args.data,
                      overflow=args.overflow, timeout=args.timeout)
    reached: int = result["subscribers"]
    if ctx.json:
        emit({k: result[k] for k in ("port", "topic", "bytes", "subscribers", "created")})
    elif reached:
        print(f"Published {plural(result['bytes'], 'byte')} on port {args.port}, topic "
              f"{args.topic!r}, to {plural(reached, 'subscriber')}.")
    else:
        print(f"Published {plural(result['bytes'], 'byte')} on port {args.port}, topic "
              f"{args.topic!r}: "
              "no subscriber wants that topic now, so it reached nobody (a publication goes "
              "only to those subscribed when it is sent).")
    return EXIT_OK


def publishers_cmd(ctx: Context) -> int:
    items: list[dict[str, object]] = ctx.call("publishers")["publishers"]
    print_list(ctx.json, "publishers", items, "This daemon hosts no publisher.",
               ["PORT", "SUBSCRIBERS", "OVERFLOW", "PUBLISHED"],
               lambda p: [str(p["port"]), str(p["subscribers"]), str(p["overflow"]),
                          str(p["published"])])
    return EXIT_OK


def unpublish_cmd(ctx: Context) -> int:
    ctx.call("unpublish", port=ctx.args.port)
    if ctx.json:
        emit({"port": ctx.args.port, "closed": True})
    else:
        print(f"Closed the publisher on port {ctx.args.port}.")
    return EXIT_OK


# -- subscribe ----------------------------------------------------------------------------------


def subscribe_cmd(ctx: Context) -> int:
    return ctx.run_client(lambda client: _subscribe(ctx, client), EXIT_INTERRUPTED)


async def _subscribe(ctx: Context, client: Client) -> int:
    args = ctx.args
    config = PubSubConfig()
    if args.timeout is not None:  # subscribing counts against it too
        config = replace(config, connect_timeout=min(config.connect_timeout, args.timeout))
    async with Subscriber(client, args.target, args.port, list(args.prefixes),
                          config) as subscriber:
        if not ctx.json and sys.stderr.isatty():
            prefixes = ", ".join(map(repr, args.prefixes))
            print(f"Subscribed to {args.target} port {args.port} ({prefixes})"
                  + (f" for {plural(args.count, 'publication')}" if args.count else "") + ".",
                  file=sys.stderr, flush=True)
        await receive_until(subscriber.receive, lambda p: _print_publication(ctx, p),
                            count=args.count, timeout=args.timeout, what="publication",
                            source=f"from {args.target} port {args.port}")
    return EXIT_OK


def _print_publication(ctx: Context, publication: Publication) -> None:
    if ctx.json:
        emit({"topic": publication.topic, "sender": publication.sender,
              "missed": publication.missed, "resumed": publication.resumed}
             | data_fields(publication.data))
        return
    if publication.resumed:
        print("(subscribed again: what was published meanwhile was missed)", file=sys.stderr)
    if publication.missed:
        print(f"(missed {plural(publication.missed, 'publication')}: this subscriber fell behind)",
              file=sys.stderr)
    write_data(publication.data, publication.topic.encode("utf-8") + b" ")

