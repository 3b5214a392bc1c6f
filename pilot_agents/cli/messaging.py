"""``pilotctl connect|send|listen|unlisten``: messages over the daemon's tunnels."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

from ..errors import ConfigError, ConnectionClosedError, PilotError
from ..ipc import IpcClient
from ..patterns.frames import MAX_MESSAGE
from ..transport import DEFAULT_PORT
from .context import Context, receive_until
from .output import (
    EXIT_OK,
    Message,
    Reply,
    emit,
    label,
    message_out,
    ms,
    plural,
    write_message,
)
from .parser import Commands, add_until, port, positive
from .stdin import stdin_lines


def register(commands: Commands) -> None:
    sub = commands.command("connect", "open a connection: send --message, or pipe stdin/stdout "
                           "like netcat (lines in, messages out)", connect_cmd)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("port", nargs="?", type=port, default=None, metavar="PORT",
                     help=f"port (default {DEFAULT_PORT})")
    sub.add_argument("--port", dest="port_option", type=port, default=None, metavar="PORT")
    sub.add_argument("--message", "-m", default=None, metavar="TEXT",
                     help="send this message, confirm delivery, and close")
    sub.add_argument("--wait-reply", action="store_true",
                     help="with --message: wait for one reply and print it")
    sub.add_argument("--timeout", type=positive, default=10.0, metavar="S",
                     help="seconds for connecting, delivery and the reply (default 10)")
    sub.add_argument("--linger", type=positive, default=1.0, metavar="S",
                     help="netcat mode: after stdin ends, wait this long for replies "
                     "(default 1)")

    sub = commands.command("send", "send one message and confirm its delivery", send_cmd)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("port", type=port, metavar="PORT")
    data = sub.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", default=None, metavar="TEXT")
    data.add_argument("--file", default=None, metavar="PATH", help="file to send ('-': stdin)")
    sub.add_argument("--timeout", type=positive, default=10.0, metavar="S",
                     help="seconds for connecting and delivery (default 10)")

    sub = commands.command("listen", "print messages arriving on a port", listen_cmd)
    sub.add_argument("port", type=port, metavar="PORT")
    add_until(sub, "messages")
    sub.add_argument("--publish", action="store_true",
                     help="keep listening in the daemon and publish the messages on its ZeroMQ "
                     "PUB socket (ipc://HOME/pub.sock, topic = port as 5 digits); returns at once")
    sub = commands.command("unlisten", "stop listening on a port (undoes listen --publish)",
                           unlisten_cmd)
    sub.add_argument("port", type=port, metavar="PORT")


# -- connect ------------------------------------------------------------------------------------


def connect_cmd(ctx: Context) -> int:
    args = ctx.args
    if args.port is not None and args.port_option is not None and args.port != args.port_option:
        raise ConfigError(f"two different ports given ({args.port} and {args.port_option})")
    to_port: int = args.port or args.port_option or DEFAULT_PORT
    if args.message is None:
        if args.wait_reply:
            raise ConfigError("--wait-reply needs --message")
        return ctx.run(lambda c: _netcat(ctx, c, to_port))
    return ctx.run(lambda c: _connect_message(ctx, c, to_port))


async def _connect_message(ctx: Context, client: IpcClient, to_port: int) -> int:
    args = ctx.args
    opened = await client.request("connect", target=args.target, port=to_port,
                                  timeout=args.timeout)
    stream = opened["stream"]
    try:
        data = args.message.encode("utf-8")
        await client.carry("stream_send", data, stream=stream)
        drained = await client.request("stream_drain", stream=stream, timeout=args.timeout)
        reply: Message | None = None
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
    if ctx.json:
        out: dict[str, object] = {
            "peer": opened["peer"], "hostname": opened.get("hostname"), "port": to_port,
            "path": path, "rtt": rtt, "encrypted": True, "delivered": True, "bytes": len(data)}
        if reply is not None:
            out["reply"] = message_out(reply)
        emit(out)
    else:
        print(f"Connected via {path}. RTT: {ms(rtt)}. Encrypted.")
        print(f"Delivered {plural(len(data), 'byte')} to {label(opened, 'peer')} port "
              f"{to_port}.")
        if reply is not None:
            write_message(reply)
    return EXIT_OK


async def _netcat(ctx: Context, client: IpcClient, to_port: int) -> int:
    args = ctx.args
    readline = await stdin_lines(MAX_MESSAGE, "a message")  # (before a stream to close)
    opened = await client.request("connect", target=args.target, port=to_port,
                                  timeout=args.timeout)
    stream = opened["stream"]
    if not ctx.json and sys.stderr.isatty():
        print(f"Connected to {label(opened, 'peer')} port {to_port} via {opened['path']}. RTT: "
              f"{ms(opened.get('rtt'))}. Encrypted.", file=sys.stderr, flush=True)
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
            _print_message(ctx, reply["message"])

    async def send() -> None:
        while line := await readline():
            await client.carry("stream_send", line.rstrip(b"\n"), stream=stream)
        await client.request("stream_drain", stream=stream, timeout=args.timeout)
        last_input[0] = time.monotonic()
        while not peer_closed.is_set():  # linger for replies
            idle = time.monotonic() - last_input[0]
            if idle >= args.linger:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(args.linger - idle):
                    await peer_closed.wait()

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


def _print_message(ctx: Context, message: Message, prefix: str = "") -> None:
    """One received message: a JSON line, or its data (after ``prefix``) as it came."""
    if ctx.json:
        emit(message_out(message))
        return
    if prefix:
        sys.stdout.write(prefix)
        sys.stdout.flush()
    write_message(message)


# -- send, listen ----------------------------------------------------------------------------------


def send_cmd(ctx: Context) -> int:
    args = ctx.args
    data = _payload(args.data, args.file)

    async def deliver(client: IpcClient) -> Reply:
        # The data as a frame of its own (docs/ipc.md): in the JSON header, base64 and escapes
        # made a file of a few MiB too large for the daemon, which answers such a header
        # without its request id, so the command waited for ever.
        # The daemon bounds the delivery by the timeout too (a peer whose inbox is full).
        return await client.carry("send", data, target=args.target, port=args.port,
                                  timeout=args.timeout)

    result = ctx.run(deliver)
    if ctx.json:
        emit({k: result.get(k) for k in ("peer", "hostname", "port", "bytes", "path", "rtt")}
             | {"delivered": True})
    else:
        print(f"Delivered {plural(result['bytes'], 'byte')} to {label(result, 'peer')} port "
              f"{args.port} via {result['path']}. RTT: {ms(result.get('rtt'))}. Encrypted.")
    return EXIT_OK


def _payload(text: str | None, path: str | None) -> bytes:
    """The message ``--data`` or ``--file`` (``-``: stdin) gives; ConfigError if it cannot be
    read or is larger than a tunnel message (read no further than that)."""
    if path is None:
        assert text is not None
        data = text.encode("utf-8")
    else:
        try:
            if path == "-":
                data = sys.stdin.buffer.read(MAX_MESSAGE + 1)
            else:
                with open(path, "rb") as file:
                    data = file.read(MAX_MESSAGE + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_MESSAGE:
        raise ConfigError(f"{'stdin' if path == '-' else path or '--data'} has more than "
                          f"{MAX_MESSAGE} bytes, the largest message a tunnel carries")
    return data


def listen_cmd(ctx: Context) -> int:
    args = ctx.args
    if args.publish:
        if args.count is not None or args.timeout is not None:
            raise ConfigError("--count and --timeout are for printing messages: with --publish "
                              "the daemon listens until 'pilotctl unlisten "
                              f"{args.port}'")
        result = ctx.call("listen", port=args.port, publish=True)
        if ctx.json:
            emit({k: result[k] for k in ("port", "publish", "pub_endpoint", "topic")})
        else:
            print(f"Port {args.port} is published on {result['pub_endpoint']} (topic "
                  f"{result['topic']}); stop with 'pilotctl unlisten {args.port}'.")
        return EXIT_OK
    return ctx.run(lambda c: _listen(ctx, c))


async def _listen(ctx: Context, client: IpcClient) -> int:
    args = ctx.args
    await client.request("listen", port=args.port)
    if not ctx.json and sys.stderr.isatty():
        print(f"Listening on port {args.port}" + (
            f" for {plural(args.count, 'message')}" if args.count else "") + ".", file=sys.stderr,
            flush=True)

    async def receive(timeout: float | None) -> Message:
        message: Message = (await client.request("receive", port=args.port,
                                                 timeout=timeout))["message"]
        return message

    def show(message: Message) -> None:
        _print_message(ctx, message, f"[{message.get('hostname') or message['from']}] ")

    try:
        await receive_until(receive, show, count=args.count, timeout=args.timeout,
                            what="message", source=f"on port {args.port}")
    finally:
        with contextlib.suppress(PilotError):
            await client.request("unlisten", port=args.port)
    return EXIT_OK


def unlisten_cmd(ctx: Context) -> int:
    closed: bool = ctx.call("unlisten", port=ctx.args.port)["closed"]
    if ctx.json:
        emit({"port": ctx.args.port, "closed": closed})
    else:
        print(f"Stopped listening on port {ctx.args.port}." if closed else
              f"Port {ctx.args.port} stays open (another client or the inbox still uses it).")
    return EXIT_OK
