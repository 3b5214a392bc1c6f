"""What the command line prints: human text or one JSON object a line (``--json``), the exit
codes, and how an error ends a command (one line on stderr, a traceback only with PILOT_DEBUG).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TextIO, TypedDict, TypeVar

from .. import errors
from ..ipc import decode_data

# Most specific first: the first class an error is an instance of gives the code.
EXIT_CODES: list[tuple[type[BaseException], int, str]] = [
    (errors.DaemonNotRunningError, 3, "the daemon is not running or not answering"),
    (errors.DaemonOutdatedError, 3, "the daemon runs older code: restart it"),
    (errors.HomeInUseError, 4, "a daemon (or another node) already runs for this home"),
    (errors.UnknownHostError, 5, "unknown host"),
    (errors.NotTrustedError, 6, "peer not trusted"),
    (errors.KeyMismatchError, 7, "a trusted name now resolves to another key"),
    (errors.PeerUnreachableError, 8, "peer unreachable"),
    (errors.PortClosedError, 9, "nothing listens on that port"),
    (errors.PilotTimeoutError, 10, "timed out"),
    (errors.BeaconError, 11, "beacon unreachable, name taken, or refused"),
    (errors.ConnectionClosedError, 12, "connection closed"),
    (errors.RemoteError, 13, "the peer's handler failed"),
    (errors.NotAvailableError, 2, "not available"),
    (errors.BadRequestError, 2, "bad arguments"),
    (errors.ConfigError, 2, "bad arguments"),
    (errors.TrustRequestError, 2, "bad arguments"),
]
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
EXIT_PIPE = 141  # what a shell reports for a process SIGPIPE ended, as a C tool's would be
# Seconds between redraws of a progress line: a few a second reads as live, more only flickers
# (and costs a write to a terminal each).
PROGRESS_INTERVAL = 0.25

EPILOG = """\
exit codes:
  0   success
  1   other error (network, file system)
  2   bad arguments, bad input, or a command that is not available yet
  3   daemon not running or not answering (start it: pilotctl daemon start --hostname NAME),
      or running other code than this command, which it refused (restart it)
  4   a daemon (or another node) is already running for this home
  5   unknown host
  6   peer not trusted (the message says the 'pilotctl trust ...' command that fixes it)
  7   key mismatch: a trusted name now resolves to a different key
  8   peer unreachable (down, no path, or it does not trust us)
  9   port closed: nothing listens on that port at the peer
  10  timed out
  11  beacon error: unreachable, name taken, refused
  12  connection closed by the peer
  13  the peer's request handler failed (request: an error reply, e.g. serve --exec's
      command exited non-zero)
  70  internal error (a bug; PILOT_DEBUG=1 shows the traceback)
  130 interrupted
  141 the reader of our output went away (as 'pilotctl listen 1001 | head -1' ends)

environment: PILOT_HOME (default home), PILOT_BEACON (default --beacon), PILOT_DEBUG=1
"""

E = TypeVar("E")

STATE_NAMES = {"mutual": "mutual", "outgoing": "outgoing", "incoming": "incoming-pending"}

Reply = dict[str, Any]
"""A daemon reply's fields: a JSON object (docs/ipc.md has each command's)."""

# A message as the daemon hands it over ('from' is a keyword, hence the functional form).
Message = TypedDict("Message", {
    "from": str, "hostname": str | None, "port": int, "source_port": int, "data": str,
    "encoding": str,
})


class TrustEntry(TypedDict):
    """One peer in the trust store, as the daemon's trust commands return it."""

    node_id: str
    hostname: str | None
    state: str
    reason: str
    updated_at: float


def exit_code(exc: BaseException) -> int:
    for cls, code, _ in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR


def emit(obj: object, to: TextIO | None = None) -> None:
    """``obj`` as one line of JSON on stdout (or ``to``)."""
    print(json.dumps(obj, separators=(",", ":"), ensure_ascii=False), file=to, flush=True)


def fields(reply: Reply) -> Reply:
    """The reply without its envelope (``ok``, ``id``): what ``--json`` prints of it."""
    return {k: v for k, v in reply.items() if k not in ("ok", "id")}


def plural(n: int, noun: str) -> str:
    """``1 byte``, ``2 bytes``: a count in a sentence."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def ms(rtt: float | None) -> str:
    if rtt is None:
        return "unknown"
    millis = rtt * 1000.0
    return f"{millis:.2f} ms" if millis < 0.1 else f"{millis:.1f} ms"


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_list(as_json: bool, key: str, items: list[E], empty: str, header: list[str],
               row: Callable[[E], list[str]]) -> bool:
    """A list reply: ``{key: items}`` with ``as_json``, else the line ``empty`` or a table of
    ``row(item)`` under ``header``. True if it printed the table."""
    if as_json:
        emit({key: items})
        return False
    if not items:
        print(empty)
        return False
    table([row(item) for item in items], header)
    return True


def print_fields(rows: list[tuple[str, object]], indent: str = "") -> None:
    """``name value`` lines, the values lined up one space after the longest name."""
    width = max(len(name) for name, _ in rows) + 1
    for name, value in rows:
        print(f"{indent}{name:<{width}}{value}")


def label(obj: Mapping[str, object], key: str = "node_id") -> str:
    """How a peer is called in human output: its hostname, else its id."""
    return str(obj.get("hostname") or obj.get(key))


def message_out(message: Message) -> dict[str, object]:
    return {"from": message["from"], "hostname": message.get("hostname"),
            "port": message["port"], "source_port": message["source_port"],
            "data": message["data"], "encoding": message["encoding"]}


def write_message(message: Message) -> None:
    """A message's data on stdout, raw bytes ending in one newline."""
    data = decode_data(str(message.get("data", "")), str(message.get("encoding", "utf-8")))
    sys.stdout.buffer.write(data + (b"" if data.endswith(b"\n") else b"\n"))
    sys.stdout.buffer.flush()


@contextlib.asynccontextmanager
async def progress(status: Callable[[], str], wanted: bool,
                   interval: float = PROGRESS_INTERVAL) -> AsyncIterator[None]:
    """While the body runs, ``status()`` on one line of stderr, redrawn in place every
    ``interval`` seconds when it changed, and erased at the end: what follows (the result, an
    error, "interrupted") starts on a clean line. Only if ``wanted`` (not under ``--json``)
    and stderr is a terminal: a log or a script reading stderr gets none of it."""
    if not wanted or not sys.stderr.isatty():
        yield
        return
    shown = ""

    async def redraw() -> None:
        nonlocal shown
        while True:
            await asyncio.sleep(interval)
            line = status()[:_columns() - 1]  # a wrapped line would not be redrawn in place
            if line != shown:
                if not _to_terminal(f"\r{line}\x1b[K"):
                    return
                shown = line

    task = asyncio.create_task(redraw())
    try:
        yield
    finally:
        task.cancel()
        if shown:
            _to_terminal("\r\x1b[K")


def _columns() -> int:
    with contextlib.suppress(OSError):
        # A terminal that has not said its size (a new pty) reports 0.
        return os.get_terminal_size(sys.stderr.fileno()).columns or 80
    return 80


def _to_terminal(text: str) -> bool:
    """Write ``text`` to stderr; False once the terminal is gone (the command goes on)."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except OSError:
        return False
    return True


def _report(exc: BaseException, as_json: bool, code: int, stdout_is_data: bool) -> None:
    message = str(exc) or type(exc).__name__
    _say_error(type(exc).__name__, message, code, f"error: {message}\n", as_json=as_json,
               stdout_is_data=stdout_is_data)


def _say_error(kind: str, message: str, code: int, line: str, *, as_json: bool,
               stdout_is_data: bool) -> None:
    """``line`` on stderr, and with ``as_json`` the error object on stdout; or, when stdout
    carries another protocol (``mcp connect``'s JSON-RPC, which an object of ours would
    corrupt), the object alone on stderr in place of ``line``."""
    if as_json and stdout_is_data:
        _emit_error(kind, message, code, sys.stderr)
        return
    sys.stderr.write(line)
    sys.stderr.flush()
    if as_json:
        _emit_error(kind, message, code)


def _emit_error(kind: str, message: str, code: int, to: TextIO | None = None) -> None:
    try:
        emit({"error": {"type": kind, "message": message, "exit_code": code}}, to)
    except OSError:
        # Its reader is gone (Ctrl-C ends `pilotctl ... --json | jq` both at once): the
        # command ends with its own status all the same, not a traceback of this write.
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    """Writes to stdout go nowhere from now on, so the flush at exit raises nothing either."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def interrupted(as_json: bool, stdout_is_data: bool = False) -> int:
    """Say that a signal (Ctrl-C, SIGTERM) stopped the command; its exit status. With
    ``as_json``, the error object a script gets for any other failure, too: for a command that
    prints one object per line (``listen``, ``subscribe``, ``pull``) the stream's last line,
    so that its reader tells an interrupted stream from a finished one without the status.
    ``stdout_is_data``: see :func:`_say_error`."""
    _say_error("KeyboardInterrupt", "interrupted", EXIT_INTERRUPTED, "interrupted\n",
               as_json=as_json, stdout_is_data=stdout_is_data)
    return EXIT_INTERRUPTED


def exit_status(exc: BaseException, as_json: bool, stdout_is_data: bool = False) -> int | None:
    """The exit status of a command that raised ``exc``, once said in one line on stderr (and
    as a JSON ``error`` object with ``as_json``: on stdout, unless ``stdout_is_data``, as for
    :func:`_say_error`); None when ``exc`` should go on up with its traceback: it is no
    Exception, or PILOT_DEBUG asks for the traceback of a bug."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if isinstance(exc, KeyboardInterrupt):
        return interrupted(as_json, stdout_is_data)
    if isinstance(exc, BrokenPipeError):
        # Nobody reads our output any more: end quietly, as a Unix tool does.
        _stdout_to_devnull()
        return EXIT_PIPE
    if isinstance(exc, errors.PilotError):
        code = exit_code(exc)
        _report(exc, as_json, code, stdout_is_data)
        return code
    if isinstance(exc, OSError):
        _report(OSError(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")),
                as_json, EXIT_ERROR, stdout_is_data)
        return EXIT_ERROR
    if not isinstance(exc, Exception) or os.environ.get("PILOT_DEBUG"):
        return None
    _report(RuntimeError(f"internal error: {type(exc).__name__}: {exc} (run with "
                         "PILOT_DEBUG=1 for the traceback)"), as_json, EXIT_BUG, stdout_is_data)
    return EXIT_BUG
