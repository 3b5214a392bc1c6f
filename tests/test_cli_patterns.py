"""The bus verbs (``request``, ``serve``, ``publish``, ``subscribe``, ``publishers``,
``unpublish``) run as a user runs them: two real daemons, each verb its own process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import pilot_agents
from pilot_agents.cli.patterns import ExecConfig, run_command
from pilot_agents.errors import CommandFailedError
from pilot_agents.identity import Identity
from tests.conftest import (
    ROOT,
    DaemonHandle,
    assert_one_line_error,
    cli,
    cli_json,
    cli_many,
    ipc_call,
    named_pair,
    short_home,
    stop_daemons,
)
from tests.test_cli import wait_for

Pair = tuple[DaemonHandle, DaemonHandle]
# A command that fails the way a real one does: a word on stderr, a non-zero status.
FAILING = f"{sys.executable} -c \"import sys; sys.stderr.write('no such row'); sys.exit(3)\""


def start(home: Path, *args: str) -> subprocess.Popen[str]:
    """A long-running CLI command (serve, subscribe) in its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "pilot_agents.cli", "--home", str(home), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def listening(home: Path, port: int) -> bool:
    listening_ports = ipc_call(home, cmd="info")["listening"]
    return any(p["port"] == port for p in listening_ports)  # type: ignore[attr-defined]


@contextmanager
def serving(home: Path, port: int, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``serve PORT ARGS`` until the block ends; then SIGTERM, which must stop it cleanly."""
    proc = start(home, "serve", str(port), *args)
    try:
        wait_for(lambda: listening(home, port) or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, proc.communicate()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert not listening(home, port)  # it closed what it opened in the daemon


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=20)
    assert "Traceback" not in out + err, err
    return out, err


# -- request / serve ---------------------------------------------------------------------------


def test_request_and_serve_exec(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    with serving(b.home, 5001, "--exec", "tr a-z A-Z") as server:
        human = cli(a.home, "request", "beta", "5001", "--data", "hello")
        assert (human.returncode, human.stdout, human.stderr) == (0, "HELLO\n", "")
        out = cli_json(a.home, "request", b.node_id, "5001", "--data", "second one")
        assert (out["data"], out["encoding"], out["bytes"]) == ("SECOND ONE", "utf-8", 10)
        assert (out["replier"], out["target"], out["port"]) == (b.node_id, b.node_id, 5001)
        assert isinstance(out["ms"], float) and 0 < out["ms"] < 10_000
    out_text, err = finish(server)
    assert server.returncode == 0  # SIGTERM is the normal way to stop a server
    log = out_text.splitlines()
    assert len(log) == 2 and " alpha 5 B -> 5 B (" in log[0], log
    assert "Serving port 5001 with tr a-z A-Z" in err and "Stopped after 2 requests." in err


def test_serve_json_log_and_concurrency(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    sleepy = f"{sys.executable} -c \"import sys, time; time.sleep(1); print(sys.stdin.read())\""
    with serving(b.home, 5002, "--json", "--exec", sleepy, "--concurrency", "4") as server:
        calls: list[tuple[Path | None, ...]] = [
            (a.home, "--json", "request", "beta", "5002", "--data", f"r{i}")  # type: ignore[misc]
            for i in range(4)]
        results = cli_many(calls)
    for i, result in enumerate(results):
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert reply["data"] == f"r{i}\n"
        # Four runs of one second at once: each reply within ~1 s of its request, where
        # one at a time the last would wait 4 s.
        assert reply["ms"] < 3500, reply
    out, err = finish(server)
    assert err == ""  # --json: nothing but the JSON lines
    first, *lines, last = [json.loads(line) for line in out.splitlines()]
    assert first == {"state": "serving", "port": 5002, "command": first["command"],
                     "concurrency": 4} and first["command"][0] == sys.executable
    assert last == {"state": "stopped", "answered": 4}
    assert len(lines) == 4
    for line in lines:
        assert (line["from"], line["hostname"], line["ok"], line["error"]) == (
            a.node_id, "alpha", True, None)
        assert line["request_bytes"] == 2 and line["reply_bytes"] == 3
        assert line["ms"] >= 1000


def test_failing_command_is_a_remote_error(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    with serving(b.home, 5003, "--exec", FAILING, "--json") as server:
        failed = cli(a.home, "request", "beta", "5003", "--data", "x")
        line = assert_one_line_error(failed, 13, "CommandFailedError", "exited with status 3",
                                     "no such row")
        assert failed.stdout == "" and line.startswith("error: ")
        as_json = cli(a.home, "--json", "request", "beta", "5003", "--data", "x")
        assert as_json.returncode == 13
        error = json.loads(as_json.stdout)["error"]
        assert (error["type"], error["exit_code"]) == ("RemoteError", 13)
    out, _ = finish(server)
    _, *logged, _ = [json.loads(line) for line in out.splitlines()]  # (between its states)
    assert [entry["ok"] for entry in logged] == [False, False]
    assert "exited with status 3: no such row" in logged[0]["error"]


def test_serve_kills_a_command_past_its_timeout_or_its_output_limit(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    with serving(b.home, 5004, "--exec", "sleep 30", "--timeout", "0.5"):
        started = time.monotonic()
        result = cli(a.home, "request", "beta", "5004", "--data", "x")
        assert_one_line_error(result, 13, "sleep took longer than 0.5 s and was killed")
        assert time.monotonic() - started < 15
    chatty = f"{sys.executable} -c \"print('x' * 5000)\""
    with serving(b.home, 5004, "--exec", chatty, "--max-reply-bytes", "100"):
        result = cli(a.home, "request", "beta", "5004", "--data", "x")
        assert_one_line_error(result, 13, "wrote more than 100 bytes and was killed")


def test_request_timeout_kills_the_command_it_gave_up_on(daemon_pair: Pair) -> None:
    """The requester tells the server it gave up: the command (a long model call, say) is
    killed then, not left running until its own --timeout (60 s by default)."""
    a, b = daemon_pair
    with serving(b.home, 5005, "--exec", "sleep 30") as server:
        started = time.monotonic()
        result = cli(a.home, "request", "beta", "5005", "--data", "x", "--timeout", "1")
        assert_one_line_error(result, 10, "no reply from beta port 5005 within 1")
        assert time.monotonic() - started < 15
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
        wait_for(lambda: children.read_text().strip() == "", timeout=10)
    out, _ = finish(server)
    assert "error: the requester gave up (timed out or cancelled); the command was killed" in out


def test_a_server_stopped_mid_request_answers_it_with_an_error(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    with serving(b.home, 5008, "--exec", "sleep 30") as server:
        request = start(a.home, "request", "beta", "5008", "--data", "x", "--timeout", "60")
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
        wait_for(lambda: children.read_text().strip() != "", timeout=20)  # sleep is running
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        _, err = finish(request)
        assert request.returncode == 13, err
        assert "the replier on port 5008 closed before answering" in err
        assert time.monotonic() - started < 10


def test_request_and_serve_mistakes(daemon_pair: Pair) -> None:
    a, _ = daemon_pair
    assert_one_line_error(cli(a.home, "request", "beta", "70000", "--data", "x"), 2,
                          "port 70000 is not in 1..65535")
    assert_one_line_error(cli(a.home, "request", "beta", "5006"), 2, "--data")
    assert_one_line_error(cli(a.home, "request", "nobody", "5006", "--data", "x"), 5,
                          "unknown host 'nobody'")
    assert_one_line_error(cli(a.home, "request", "beta", "5006", "--data", "x"), 9,
                          "beta has no replier on port 5006",
                          "'pilotctl serve 5006 --exec CMD'")
    assert_one_line_error(cli(a.home, "serve", "5006", "--exec", "no-such-command-xyz"), 2,
                          "no command 'no-such-command-xyz' found")
    assert_one_line_error(cli(a.home, "serve", "5006", "--exec", "tr 'a-z"), 2,
                          "cannot split --exec")
    assert_one_line_error(cli(a.home, "serve", "5006", "--exec", ""), 2, "needs a command")
    assert_one_line_error(cli(a.home, "serve", "5006", "--exec", "cat", "--max-reply-bytes",
                              str(64 * 2**20), timeout=10), 2, "--max-reply-bytes: at most")
    # A port is a publisher's or a client's, not both.
    assert_one_line_error(cli(a.home, "publish", "1001", "t", "--data", "x"), 2,
                          "port 1001 is listened on by a client")
    cli_json(a.home, "publish", "5006", "t", "--data", "x")
    try:
        assert_one_line_error(cli(a.home, "serve", "5006", "--exec", "cat"), 2,
                              "port 5006 is already being listened on")
    finally:
        ipc_call(a.home, cmd="unpublish", port=5006)


async def test_run_command_bounds() -> None:
    config = ExecConfig(stderr_tail_bytes=10, max_reply_bytes=1000, timeout=10)
    # A command that does not read its stdin is fine; only the end of stderr is kept.
    assert await run_command(["echo", "hi"], b"x" * 2**20, config) == b"hi\n"
    noisy = [sys.executable, "-c", "import sys; sys.stderr.write('a' * 5000 + 'THE END'); "
             "sys.exit(1)"]
    with pytest.raises(CommandFailedError) as failed:
        await run_command(noisy, b"", config)
    assert str(failed.value) == f"{sys.executable} exited with status 1: aaaTHE END"
    with pytest.raises(CommandFailedError, match="was killed by signal 9"):
        await run_command(["sh", "-c", "kill -9 $$"], b"", config)
    with pytest.raises(CommandFailedError, match="cannot run /nonexistent"):
        await run_command(["/nonexistent"], b"", config)


def test_run_command_on_uvloop_to_a_command_that_reads_nothing() -> None:
    """As the CLI runs it, on uvloop: a command that exits without reading its stdin (or
    failing) made the write raise uvloop's RuntimeError, which ended serve and pull (exit 70)."""
    config = ExecConfig(timeout=10)

    async def main() -> None:
        for _ in range(20):
            assert await run_command(["true"], b"x", config) == b""
            with pytest.raises(CommandFailedError, match="exited with status 4: oops"):
                await run_command(["sh", "-c", "echo oops >&2; exit 4"], b"x" * 2**16, config)

    pilot_agents.run(main())


def test_verbs_without_a_daemon() -> None:
    home = short_home()
    try:
        for args in (("request", "beta", "5007", "--data", "x"),
                     ("serve", "5007", "--exec", "cat"),
                     ("publish", "5007", "t", "--data", "x"),
                     ("subscribe", "beta", "5007", "t"),
                     ("publishers",), ("unpublish", "5007")):
            assert_one_line_error(cli(home, *args), 3, "not running")
    finally:
        stop_daemons(home)


def test_serve_and_subscribe_end_when_their_daemon_goes_away() -> None:
    with named_pair() as (a, b):
        cli_json(a.home, "publish", "6010", "t", "--data", "-")
        sub = start(b.home, "subscribe", "alpha", "6010", "")
        wait_for(lambda: subscribers(a.home, 6010) == 1, timeout=20)
        server = start(b.home, "serve", "5010", "--exec", "cat")
        wait_for(lambda: listening(b.home, 5010), timeout=20)
        ipc_call(b.home, cmd="stop")
        for proc in (server, sub):
            _, err = finish(proc)
            assert proc.returncode == 3, err
            assert err.strip().splitlines()[-1].startswith("error: the daemon (home ")


# -- publish / subscribe ---------------------------------------------------------------------


def subscribers(home: Path, port: int) -> int:
    hosted = cli_json(home, "publishers")["publishers"]
    return next((p["subscribers"] for p in hosted if p["port"] == port), 0)  # type: ignore


def test_publish_reaches_a_subscriber(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    first = cli_json(b.home, "publish", "6001", "sales.q1", "--data", "too early")
    # Nobody subscribed yet: the publication reaches nobody (ZeroMQ, NATS alike).
    assert first == {"port": 6001, "topic": "sales.q1", "bytes": 9, "subscribers": 0,
                     "created": True}
    sub = start(a.home, "--json", "subscribe", "beta", "6001", "sales.", "ops.",
                "--count", "3", "--timeout", "30")
    wait_for(lambda: subscribers(b.home, 6001) == 1, timeout=20)
    assert cli_json(b.home, "publish", "6001", "hr.jobs", "--data", "no")["subscribers"] == 0
    for topic, data in (("sales.q2", "1842"), ("ops.disk", "full"), ("sales.q3", "é")):
        published = cli_json(b.home, "publish", "6001", topic, "--data", data)
        assert (published["subscribers"], published["created"]) == (1, False)
    out, err = finish(sub)
    assert sub.returncode == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(g["topic"], g["data"], g["encoding"]) for g in got] == [
        ("sales.q2", "1842", "utf-8"), ("ops.disk", "full", "utf-8"), ("sales.q3", "é", "utf-8")]
    assert all(g["sender"] == b.node_id and g["missed"] == 0 and not g["resumed"] for g in got)

    human = cli(b.home, "publish", "6001", "hr.jobs", "--data", "x")
    assert human.returncode == 0 and "reached nobody" in human.stdout
    listed = cli(b.home, "publishers")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["PORT", "SUBSCRIBERS", "OVERFLOW", "PUBLISHED"]
    assert (row.split()[0], row.split()[2:]) == ("6001", ["block", "6"])
    assert cli_json(b.home, "unpublish", "6001") == {"port": 6001, "closed": True}
    assert cli_json(b.home, "publishers") == {"publishers": []}
    assert_one_line_error(cli(b.home, "unpublish", "6001"), 2, "no publisher on port 6001")


def test_subscribe_before_the_publisher_and_human_output(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    sub = start(a.home, "subscribe", "beta", "6002", "", "--count", "2", "--timeout", "60")
    try:
        # The subscriber keeps trying until a publisher comes up; publish until it is there.
        wait_for(lambda: cli_json(b.home, "publish", "6002", "warm-up", "--data", "w",
                                  "--overflow", "drop-oldest")["subscribers"] == 1, timeout=40)
        assert cli_json(b.home, "publish", "6002", "news", "--data", "two words")[
            "subscribers"] == 1
        out, err = finish(sub)
        assert sub.returncode == 0, err
        assert out.splitlines() == ["warm-up w", "news two words"]
        overflow = cli(b.home, "publish", "6002", "t", "--data", "x", "--overflow", "block")
        assert_one_line_error(overflow, 2, "has overflow 'drop-oldest'", "unpublish 6002")
    finally:
        ipc_call(b.home, cmd="unpublish", port=6002)


def test_a_peer_that_does_not_answer_is_named_so_within_the_timeout(daemon_pair: Pair) -> None:
    """request said only "no reply ... within 1 s", as if the replier had been slow, and
    subscribe waited its 10 s for the peer whatever --timeout said."""
    a, _ = daemon_pair
    ghost = Identity.generate().node_id
    assert cli(a.home, "add-peer", ghost, "127.0.0.1:9", "--name", "ghost").returncode == 0
    assert cli(a.home, "trust", "add", "ghost").returncode == 0
    try:
        started = time.monotonic()
        assert_one_line_error(cli(a.home, "request", "ghost", "5009", "--data", "x",
                                  "--timeout", "1"), 10,
                              "ghost did not answer within 1.0 s (opening a stream",
                              "down, unreachable, or does not trust us")
        assert_one_line_error(cli(a.home, "subscribe", "ghost", "6009", "t", "--timeout", "1"),
                              8, "no answer from ghost within 1.0 s")
        assert time.monotonic() - started < 9
    finally:
        cli(a.home, "trust", "remove", "ghost")


def test_subscribe_timeout_interrupt_and_mistakes(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    cli_json(b.home, "publish", "6003", "t", "--data", "nobody listens")
    try:
        result = cli(a.home, "subscribe", "beta", "6003", "t", "--count", "2", "--timeout", "1")
        assert_one_line_error(result, 10, "received 0 of 2 publications from beta port 6003")
        sub = start(a.home, "subscribe", "beta", "6003", "t")
        # Its stream is up (the publisher's count may still hold the last one, gone unseen).
        wait_for(lambda: ipc_call(a.home, cmd="info")["streams"] == 1, timeout=20)
        sub.send_signal(signal.SIGINT)
        out, err = finish(sub)
        assert (sub.returncode, out, err) == (130, "", "interrupted\n")
        assert_one_line_error(cli(a.home, "subscribe", "nobody", "6003", "t"), 5,
                              "unknown host 'nobody'")
        assert_one_line_error(cli(a.home, "subscribe", "beta", "6003", "x" * 2000), 2,
                              "topic of 2000 bytes")
        assert_one_line_error(cli(a.home, "subscribe", "beta", "0", "t"), 2, "not in 1..65535")
        # A port a client listens on is not the daemon's to publish on, and the reverse.
        assert_one_line_error(cli(b.home, "listen", "6003", "--count", "1"), 2,
                              "already being listened on")
    finally:
        ipc_call(b.home, cmd="unpublish", port=6003)


def test_a_subscriber_that_stops_reading(daemon_pair: Pair) -> None:
    """A subscriber that stops reading (SIGSTOP) while its buffers fill: with block, publish
    waits and times out; with drop-oldest it goes on, and the subscriber, once it reads again,
    is told how many it missed: received + missed = published, nothing lost silently."""
    a, b = daemon_pair
    blob = "x" * 100 * 1024  # fits in one argument of the command line
    # Room between the publisher and a stopped reader: the publisher's queue (4 MiB), the
    # reader's stream window (16 MiB) and its daemon's stream inbox (16 MiB), ~36 MiB.
    most = 800
    for port, overflow in ((6004, "block"), (6005, "drop-oldest")):
        cli_json(b.home, "publish", str(port), "start", "--data", "-", "--overflow", overflow)
        sub = start(a.home, "--json", "subscribe", "beta", str(port), "")
        try:
            wait_for(lambda p=port: subscribers(b.home, p) == 1, timeout=20)
            sub.send_signal(signal.SIGSTOP)
            published = 0
            while published < most:
                reply = ipc_call(b.home, cmd="publish", port=port, topic="t", data=blob,
                                 timeout=1)
                if not reply["ok"]:
                    break
                published += 1
            if overflow == "block":
                assert reply["error"]["type"] == "PilotTimeoutError", reply  # type: ignore
                assert 100 < published < most
                result = cli(b.home, "publish", str(port), "t", "--data", blob, "--timeout",
                             "0.5")
                assert_one_line_error(result, 10, "stayed full for 0.5 s", "drop-oldest")
                continue
            assert published == most
            assert cli_json(b.home, "publish", str(port), "end", "--data", "!")["subscribers"] == 1
            sub.send_signal(signal.SIGCONT)
            assert sub.stdout is not None
            got = []
            for line in sub.stdout:
                got.append(json.loads(line))
                if got[-1]["topic"] == "end":
                    break
            blobs = [g for g in got if g["topic"] == "t"]
            missed = sum(g["missed"] for g in got)
            assert missed > 0 and len(blobs) + missed == most, (len(blobs), missed)
            assert all(g["data"] == blob for g in blobs)
        finally:
            sub.send_signal(signal.SIGCONT)
            sub.send_signal(signal.SIGINT)
            sub.communicate(timeout=30)
            ipc_call(b.home, cmd="unpublish", port=port)


def running(marker: str) -> list[int]:
    """The processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


async def test_a_command_past_its_timeout_is_killed_with_every_process_it_started() -> None:
    """A pipeline through a shell (what ``--help`` suggests for pipes), or a command that
    starts one in the background that keeps its output open: killing the shell alone left its
    children running, and the wait for the shell's end waited for theirs."""
    config = ExecConfig(timeout=1)
    marker = f"{os.getpid()}{time.monotonic_ns() % 10**6}"  # a sleep nobody else runs
    started = time.monotonic()
    with pytest.raises(CommandFailedError, match="took longer than 1 s"):
        await run_command(["sh", "-c", f"sleep 30.{marker} | cat"], b"", config)
    assert time.monotonic() - started < 5
    await asyncio.sleep(0.2)
    assert running(f"sleep 30.{marker}") == []
    with pytest.raises(CommandFailedError, match=r"sh exited \(status 0\), but a process it "
                       "started still held its stdout or stderr after 1 s and was killed"):
        await run_command(["sh", "-c", f"sleep 40.{marker} & echo started"], b"", config)
    assert time.monotonic() - started < 5
    await asyncio.sleep(0.2)
    assert running(f"sleep 40.{marker}") == []
