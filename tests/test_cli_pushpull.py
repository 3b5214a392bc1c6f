"""The ``push`` and ``pull`` verbs run as a user runs them: three real daemons (alpha pushes,
beta and gamma pull), each verb its own process."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pilot_agents.cli.output import PROGRESS_INTERVAL
from tests.conftest import (
    ROOT,
    DaemonHandle,
    assert_one_line_error,
    cli,
    cli_json,
    peer_up,
    short_home,
    start_daemons,
    stop_daemons,
)
from tests.test_cli import INTERRUPTED, wait_for
from tests.test_cli_patterns import FAILING, finish, listening, start

Trio = tuple[DaemonHandle, DaemonHandle, DaemonHandle]


@pytest.fixture(scope="module")
def trio() -> Iterator[Trio]:
    homes = [short_home(), short_home(), short_home()]
    try:
        a, b, c = start_daemons(*zip(homes, ("alpha", "beta", "gamma"), strict=True))
        peer_up(a, b)
        peer_up(a, c)
        yield a, b, c
    finally:
        stop_daemons(*homes)


def pull(home: Path, port: int, *args: str) -> subprocess.Popen[str]:
    """``pull PORT ARGS`` on ``home``, once its puller listens (or, with ``--count``, has
    perhaps done already: an item waiting for it can come before this looks)."""
    proc = start(home, "pull", str(port), *args)
    if "--from" not in args:
        wait_for(lambda: listening(home, port) or proc.poll() is not None, timeout=20)
        assert proc.poll() is None or ("--count" in args and proc.returncode == 0), \
            proc.communicate()
    return proc


def stop(proc: subprocess.Popen[str]) -> list[dict[str, object]]:
    """SIGTERM a ``pull --json``; the items it printed. It stops as interrupted, cleanly: the
    error object that says so is its last line, as any failure's is."""
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert (proc.returncode, err) == (130, "interrupted\n")
    *items, last = [json.loads(line) for line in out.splitlines()]
    assert last == INTERRUPTED
    return items


def push(home: Path, *args: str, input: str | None = None) -> dict[str, object]:
    result = cli(home, "--json", "push", *args, input=input, timeout=90)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_push_stdin_spreads_over_two_pullers_none_twice(trio: Trio) -> None:
    a, b, c = trio
    pullers = [pull(b.home, 4001, "--json"), pull(c.home, 4001, "--json")]
    lines = "".join(f"{n}\n" for n in range(1, 101))
    out = push(a.home, "beta,gamma", "4001", "--wait-for", "2", "--stdin", input=lines)
    assert (out["port"], out["pushed"], out["redelivered"]) == (4001, 100, 0)
    got = [stop(p) for p in pullers]
    spread = out["acknowledged"]
    assert isinstance(spread, dict)
    assert set(spread) == {"beta", "gamma"} and all(spread.values())
    assert [len(g) for g in got] == [spread["beta"], spread["gamma"]]
    items = got[0] + got[1]
    assert sorted(int(str(i["data"])) for i in items) == list(range(1, 101))  # none twice
    assert all(i["encoding"] == "utf-8" and i["sender"] == a.node_id and not i["redelivered"]
               for i in items)
    assert len({i["id"] for i in items}) == 100


def test_human_output_and_data_items(trio: Trio) -> None:
    a, b, _ = trio
    puller = pull(b.home, 4002, "--count", "2")
    result = cli(a.home, "push", "beta", "4002", "--data", "first", "--data", "second")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Pushed 2 items to port 4002, all acknowledged (beta 2;")
    out, err = finish(puller)
    assert (puller.returncode, out, err) == (0, "first\nsecond\n", "")


def test_a_pull_killed_mid_run_loses_nothing(trio: Trio) -> None:
    a, b, c = trio
    slow = pull(b.home, 4003, "--json", "--exec", "sh -c 'sleep 0.3; cat'")
    fast = pull(c.home, 4003, "--json")
    pusher = subprocess.Popen(
        [sys.executable, "-m", "pilot_agents.cli", "--home", str(a.home), "--json", "push",
         "beta,gamma", "4003", "--wait-for", "2", "--stdin", "--timeout", "60"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT)
    assert pusher.stdin is not None and slow.stdout is not None
    pusher.stdin.write("".join(f"{n}\n" for n in range(40)))
    pusher.stdin.close()
    done_by_slow = [json.loads(slow.stdout.readline()) for _ in range(2)]
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    pusher.stdin = None  # closed above: communicate() must not flush it
    out, err = pusher.communicate(timeout=90)
    assert pusher.returncode == 0, err
    report = json.loads(out)
    assert report["pushed"] == 40 and report["redelivered"] > 0
    assert sum(report["acknowledged"].values()) == 40
    got = stop(fast)
    # At least once: everything was done, by one or the other; what the killed one had not
    # acknowledged came to gamma flagged.
    assert {str(i["data"]) for i in got + done_by_slow} == {str(n) for n in range(40)}
    assert any(i["redelivered"] for i in got)


def test_exec_acknowledges_on_success(trio: Trio) -> None:
    a, b, _ = trio
    worker = pull(b.home, 4004, "--json", "--count", "2", "--exec", "tr a-z A-Z")
    push(a.home, "beta", "4004", "--data", "ab", "--data", "cd")
    out, err = finish(worker)
    assert worker.returncode == 0, err
    done = [json.loads(line) for line in out.splitlines()]
    assert [(d["data"], d["bytes"], d["redelivered"]) for d in done] == [
        ("AB", 2, False), ("CD", 2, False)]


def test_exec_failure_releases_the_item_to_another_puller(trio: Trio) -> None:
    a, b, c = trio
    failing = pull(b.home, 4005, "--exec", FAILING)
    pusher = start(a.home, "--json", "push", "beta,gamma", "4005", "--data", "job",
                   "--timeout", "60")
    _, err = finish(failing)
    assert failing.returncode == 1, err
    assert len(err.strip().splitlines()) == 1
    assert "no such row" in err and "not acknowledged: it goes to another puller" in err
    other = pull(c.home, 4005, "--json", "--count", "1")
    out, err = finish(other)
    assert other.returncode == 0, err
    item = json.loads(out)
    assert (item["data"], item["redelivered"]) == ("job", True)
    out, err = finish(pusher)
    assert pusher.returncode == 0, err
    assert json.loads(out)["acknowledged"] == {"gamma": 1}


def test_listening_pusher(trio: Trio) -> None:
    a, b, c = trio
    pullers = [pull(h.home, 4006, "--json", "--from", "alpha") for h in (b, c)]
    out = push(a.home, "--listen", "4006", "--wait-for", "2", "--stdin",
               input="".join(f"{n}\n" for n in range(20)))
    assert out["pushed"] == 20
    assert sorted(out["acknowledged"]) == sorted([b.node_id, c.node_id])  # type: ignore[call-overload]
    items = stop(pullers[0]) + stop(pullers[1])
    assert sorted(int(str(i["data"])) for i in items) == list(range(20))


def test_an_item_too_large_ends_the_push_once_those_before_it_are_done(trio: Trio) -> None:
    """A line too large to be an item stops the push, but not before the items pushed ahead of
    it are acknowledged: ended at once, the pusher dropped its links, and the items still
    queued at a puller went with them, none of it said."""
    a, b, _ = trio
    worker = pull(b.home, 4009, "--json", "--exec", "sh -c 'sleep 0.2; cat'")
    lines = "".join(f"{n}\n" for n in range(5)) + "x" * (5 * 2**20) + "\nafter\n"
    result = cli(a.home, "push", "beta", "4009", "--stdin", input=lines, timeout=90)
    assert_one_line_error(result, 2, "item 6 is 5242880 bytes", "the 5 before it were pushed "
                          "and acknowledged")
    got = stop(worker)
    assert sorted(str(i["data"]) for i in got) == [str(n) for n in range(5)]


def read_terminal(fd: int, until: str | None = None, timeout: float = 30.0) -> str:
    """What a terminal's master side ``fd`` shows: up to ``until``, else up to its end (the
    process on the other side exited)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while until is None or until.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        assert ready, (until, seen)
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: nothing has the other side open any more
            chunk = b""
        if not chunk:
            assert until is None, (until, seen)
            break
        seen += chunk
    return seen.decode()


def test_push_shows_progress_on_a_terminal(trio: Trio) -> None:
    """``producer | push --stdin`` said nothing until it ended, minutes later for a long input.
    With stderr a terminal it now keeps a line there up to date, erased at the end; its stdout
    is the same, and ``--json`` shows no progress at all (a script reads it)."""
    a, b, _ = trio
    worker = pull(b.home, 4010, "--json")
    for as_json in (False, True):
        terminal, stderr = pty.openpty()
        pusher = subprocess.Popen(
            [sys.executable, "-m", "pilot_agents.cli", "--home", str(a.home),
             *(["--json"] if as_json else []), "push", "beta", "4010", "--stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT)
        os.close(stderr)
        assert pusher.stdin is not None and pusher.stdout is not None
        assert worker.stdout is not None
        pusher.stdin.write("1\n2\n3\n")
        pusher.stdin.flush()
        assert [json.loads(worker.stdout.readline())["data"] for _ in range(3)] == ["1", "2", "3"]
        shown = "" if as_json else read_terminal(
            terminal, "3 read, 3 pushed, 3 acknowledged, 1 puller linked")
        time.sleep(3 * PROGRESS_INTERVAL)  # what --json would have drawn meanwhile
        pusher.stdin.close()
        out = pusher.stdout.read()
        assert pusher.wait(timeout=30) == 0
        shown += read_terminal(terminal)
        os.close(terminal)
        if as_json:
            assert shown == "" and json.loads(out)["pushed"] == 3
        else:
            assert out.startswith("Pushed 3 items to port 4010, all acknowledged (beta 3;")
            assert shown.startswith("\r") and shown.endswith("\r\x1b[K"), shown
    assert stop(worker) == []  # each item was read above


def test_mistakes_and_timeouts(trio: Trio) -> None:
    a, b, _ = trio
    assert_one_line_error(cli(a.home, "push", "4007", "--data", "x"), 2,
                          "push takes NAME[,NAME...] PORT, or --listen PORT")
    assert_one_line_error(cli(a.home, "push", "beta", "4007", "--listen", "--data", "x"), 2,
                          "or --listen PORT")
    assert_one_line_error(cli(a.home, "push", ",", "4007", "--data", "x"), 2, "no puller named")
    assert_one_line_error(cli(a.home, "push", "beta", "4007"), 2, "--data")
    assert_one_line_error(cli(a.home, "push", "beta", "4007", "--data", "x", "--stdin"), 2,
                          "not allowed with")
    assert_one_line_error(cli(a.home, "push", "nobody", "4007", "--data", "x"), 5,
                          "unknown host 'nobody'")
    assert_one_line_error(cli(a.home, "pull", "4007", "--exec", "no-such-command-xyz"), 2,
                          "no command 'no-such-command-xyz' found")
    assert_one_line_error(cli(a.home, "pull", "70000"), 2, "not in 1..65535")
    # Nothing pulls on beta 4007: the item waits, then the timeout says what became of it.
    assert_one_line_error(cli(a.home, "push", "beta", "4007", "--data", "x", "--timeout", "1"),
                          10, "no puller on port 4007 had room", "0 items pushed")
    assert_one_line_error(cli(a.home, "push", "--listen", "4007", "--wait-for", "1", "--data",
                              "x", "--timeout", "1"), 10, "0 of 1 pullers linked")
    assert_one_line_error(cli(b.home, "pull", "4007", "--timeout", "1"), 10,
                          "no work item on port 4007 within 1 s")
    # Named peers are checked first, not waited for to time out (pull --from waited for ever).
    assert_one_line_error(cli(b.home, "pull", "4007", "--from", "nobody"), 5,
                          "unknown host 'nobody'")
    gamma = cli_json(a.home, "resolve", "gamma")
    assert cli(b.home, "add-peer", str(gamma["node_id"]), str(gamma["candidates"][0]), "--name",
               "gamma").returncode == 0  # known to beta, not trusted by it
    assert_one_line_error(cli(b.home, "push", "gamma", "4007", "--data", "x"), 6,
                          "gamma is not trusted: run 'pilotctl trust add gamma'")
    assert_one_line_error(cli(b.home, "pull", "4007", "--from", "gamma"), 6,
                          "gamma is not trusted")


def test_a_push_whose_last_items_go_unacknowledged_says_how_many_of_how_many(
        trio: Trio) -> None:
    """It read "1 items pushed to port ... were not acknowledged" for three pushed, one of
    them not acknowledged."""
    a, b, _ = trio
    slow = pull(b.home, 4009, "--exec", "sleep 60")  # takes the items, finishes none in time
    try:
        assert_one_line_error(
            cli(a.home, "push", "beta", "4009", "--data", "one", "--data", "two", "--data",
                "three", "--timeout", "2"),
            10, "3 items pushed: 3 of the items pushed to port 4009 were not acknowledged "
                "within 2.0 s")
    finally:
        slow.send_signal(signal.SIGTERM)  # it stops its command too
        finish(slow)


def test_verbs_without_a_daemon() -> None:
    home = short_home()
    try:
        for args in (("push", "beta", "4008", "--data", "x"), ("pull", "4008")):
            assert_one_line_error(cli(home, *args), 3, "not running")
    finally:
        stop_daemons(home)
