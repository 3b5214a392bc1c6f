"""The command line met the way a new user (or a careless script) meets it: closed stdin, usage
errors asked for as JSON, arguments that are not UTF-8, files larger than the daemon's request
bound, a peer that takes no more. Real daemons, real processes."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    DaemonHandle,
    assert_one_line_error,
    cli,
    cli_json,
    named_pair,
)

Pair = tuple[DaemonHandle, DaemonHandle]
MAX_MESSAGE = 64 * 2**20  # a tunnel's largest message, the daemon's payload bound


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """A pair of this module's own: its tests send beta's inbox files of tens of MB."""
    with named_pair() as daemons:
        yield daemons


def without_stdin(home: Path, *args: str, timeout: float = 20.0,
                  ) -> subprocess.CompletedProcess[str]:
    """``pilotctl --home HOME ARGS`` with its stdin closed (``<&-``), as a supervisor may
    start it."""
    env = {k: v for k, v in os.environ.items() if k != "PILOT_DEBUG"}
    return subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh", sys.executable, "-m",
                           "pilot_agents.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def json_error(result: subprocess.CompletedProcess[str], code: int) -> dict[str, object]:
    """The error object a failed ``--json`` command printed, checked against its stderr."""
    line = assert_one_line_error(result, code)
    error: dict[str, object] = json.loads(result.stdout)["error"]
    assert error["exit_code"] == code and f"error: {error['message']}" == line
    return error


def test_a_closed_stdin_reads_as_empty(pair: Pair) -> None:
    # Closed, its number went to the next socket or uvloop's own descriptor: connect and push
    # --stdin waited for ever, send --file - and trust import - failed as internal errors
    # (exit 70), and request aborted inside uvloop (SIGABRT).
    a, _ = pair
    assert without_stdin(a.home, "connect", "beta", "--timeout", "5").returncode == 0
    pushed = without_stdin(a.home, "--json", "push", "beta", "4999", "--stdin")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["pushed"] == 0
    sent = without_stdin(a.home, "send", "beta", "1001", "--file", "-")
    assert sent.returncode == 0 and sent.stdout.startswith("Delivered 0 bytes"), sent.stderr
    assert_one_line_error(without_stdin(a.home, "trust", "import", "-"), 2,
                          "no trust request given", "pilotctl trust export")
    assert_one_line_error(without_stdin(a.home, "request", "beta", "5999", "--data", "x"), 9,
                          "beta has no replier on port 5999")


def interrupted(home: Path, args: tuple[str, ...], stdin: int) -> str:
    """``pilotctl --home HOME ARGS`` with ``stdin`` that nobody writes to, Ctrl-C'd once it
    waits for it: it must end as interrupted (exit 130); its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "PILOT_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "pilot_agents.cli", "--home", str(home),
                             *args], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    time.sleep(2.0)  # connected, and waiting for stdin
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert (proc.returncode, err.splitlines()[-1:]) == (130, ["interrupted"]), err
    return err


@pytest.mark.parametrize("args", [("connect", "beta"), ("push", "beta", "4998", "--stdin"),
                                  ("--json", "push", "beta", "4998", "--stdin")])
def test_ctrl_c_while_stdin_is_idle_interrupts_cleanly(pair: Pair, args: tuple[str, ...]) -> None:
    """stdin a pipe nobody writes to, as `sleep 30 | pilotctl connect beta` leaves it. A
    thread blocked reading it made the interpreter abort at exit ("Fatal Python error:
    _enter_buffered_busy ... could not acquire lock for <_io.BufferedReader name='<stdin>'>"),
    exit status 134, instead of ending as interrupted."""
    read, write = os.pipe()
    try:
        assert "Fatal" not in interrupted(pair[0].home, args, read)
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.parametrize("args", [("connect", "beta"), ("push", "beta", "4998", "--stdin")])
def test_a_terminal_is_left_as_it_was(pair: Pair, args: tuple[str, ...]) -> None:
    """stdin a terminal, Ctrl-C: the terminal was left non-blocking (the event loop's doing,
    on a flag the shell shares), and the next program reading it failed with EAGAIN."""
    controller, terminal = pty.openpty()
    try:
        interrupted(pair[0].home, args, terminal)
        assert not fcntl.fcntl(terminal, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(controller)
        os.close(terminal)


def test_usage_errors_under_json_are_json_errors() -> None:
    # argparse's errors went to stderr only: a script asking for --json got an empty stdout.
    for args in (("--json", "send", "beta", "abc", "--data", "x"), ("--json",),
                 ("--json", "daemon"), ("send", "beta", "1001", "--json"),
                 ("--json", "publish", "3001", "t", "--data", "x", "--overflow", "bogus")):
        error = json_error(cli(None, *args), 2)
        assert error["type"] == "ConfigError" and "--help" in str(error["message"])
    # After '--' the arguments are the MCP server's: its --json is not ours.
    result = cli(None, "mcp", "serve", "--port", "0", "--", "cat", "--json")
    assert_one_line_error(result, 2, "port 0 is not in 1..65535")
    assert result.stdout == ""


def test_arguments_that_are_not_utf8_are_usage_errors(pair: Pair) -> None:
    # Python hands such bytes over as lone surrogates: encoding them failed deep in each
    # command, an internal error (exit 70).
    a, _ = pair
    raw = os.fsdecode(b"caf\xe9")
    for args in (("send", "beta", "1001", "--data", raw),
                 ("request", "beta", "5999", "--data", raw), ("subscribe", "beta", "5999", raw)):
        assert_one_line_error(cli(a.home, *args), 2, "argument b'caf\\xe9' is not UTF-8 text",
                              "--file")
    json_error(cli(a.home, "--json", "connect", "beta", "-m", raw), 2)


def test_send_files_up_to_a_tunnel_message_and_refuses_larger(pair: Pair,
                                                               tmp_path: Path) -> None:
    # In the JSON header, base64 made a 20 MB binary file larger than the daemon's 16 MiB
    # request bound: the daemon answers such a request without its id, so send waited for
    # ever (and a file over 128 MiB of JSON was "the daemon went away", exit 3).
    a, b = pair
    data = os.urandom(20_000_000)
    (tmp_path / "big").write_bytes(data)
    sent = cli_json(a.home, "send", "beta", "1001", "--file", str(tmp_path / "big"), timeout=20)
    assert sent["bytes"] == len(data) and sent["delivered"] is True
    # What earlier tests sent waits before it in the inbox: the last message is this one.
    listened = cli(b.home, "--json", "listen", "1001", "--timeout", "3", timeout=20)
    assert listened.returncode == 0, listened.stderr
    got = json.loads(listened.stdout.splitlines()[-1])
    assert got["encoding"] == "base64" and base64.b64decode(str(got["data"])) == data
    (tmp_path / "huge").write_bytes(b"\0" * (MAX_MESSAGE + 1))
    assert_one_line_error(cli(a.home, "send", "beta", "1001", "--file", str(tmp_path / "huge")),
                          2, "has more than 67108864 bytes", "the largest message")


def test_send_to_a_peer_that_takes_no_more_ends_at_its_timeout(tmp_path: Path) -> None:
    # Beta's inbox on port 1001 holds 16 MiB; nobody reads it. Past that, a large message
    # stays unsent, and the daemon does not bound that wait: send waited for ever, whatever
    # its --timeout. A pair of its own: the module's, left full, failed the next send to it.
    (tmp_path / "part").write_bytes(os.urandom(30_000_000))
    send = ("send", "beta", "1001", "--file", str(tmp_path / "part"), "--timeout", "2")
    with named_pair() as (a, _):
        for _ in range(2):
            assert cli(a.home, *send, timeout=20).returncode == 0
        started = time.monotonic()
        assert_one_line_error(cli(a.home, *send, timeout=20), 10,
                              "beta port 1001 did not take the message within 2 s")
        assert time.monotonic() - started < 10
