"""The command line met the way a new user (or a careless script) meets it: closed stdin, usage
errors asked for as JSON, arguments that are not UTF-8, files larger than the daemon's request
bound, a peer that takes no more. Real daemons, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    DaemonHandle,
    assert_one_line_error,
    cli,
    named_pair,
)

Pair = tuple[DaemonHandle, DaemonHandle]
MAX_MESSAGE = 64 * 2**20  # a tunnel's largest message, the daemon's payload bound


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """A pair of this module's own: its tests fill beta's inbox."""
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
                          "beta is not listening on port 5999")


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
