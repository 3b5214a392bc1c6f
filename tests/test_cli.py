"""The command line, run as a user runs it: real daemons, real processes, output and exit codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pilot_agents import ipc
from pilot_agents.daemon import process_alive
from pilot_agents.identity import Identity
from pilot_agents.runtime import run
from tests.conftest import (
    ROOT,
    DaemonHandle,
    assert_one_line_error,
    cli,
    cli_json,
    cli_many,
    ipc_call,
    require_node_api,
    short_home,
    start_daemon,
    start_daemons,
    stop_daemons,
)

Pair = tuple[DaemonHandle, DaemonHandle]
CONNECTED = re.compile(r"^Connected via (direct|relay)\. RTT: [0-9.]+ ms\. Encrypted\.$")
# What a --json command stopped by Ctrl-C or SIGTERM prints last.
INTERRUPTED = {"error": {"type": "KeyboardInterrupt", "message": "interrupted", "exit_code": 130}}

# A service in its own process, written against the SDK: answers each message on a port with
# its upper-case form.
UPPER_SERVICE = """
import asyncio, sys
import pilot_agents.sdk as pilot
async def main(home, port):
    async with pilot.listen(port, home=home) as listener:
        print("ready", flush=True)
        async for message in listener:
            await message.reply(message.data.upper())
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def upper_service(daemon_pair: Pair) -> Iterator[int]:
    _, b = daemon_pair
    port = 4500
    proc = subprocess.Popen([sys.executable, "-c", UPPER_SERVICE, str(b.home), str(port)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- daemon lifecycle -------------------------------------------------------------------------


def test_daemon_start_status_stop(fresh_home: Path) -> None:
    home = fresh_home
    status = cli(home, "daemon", "status")
    assert status.returncode == 3 and "not running" in status.stdout
    assert "pilotctl daemon start --hostname NAME" in status.stdout

    started = cli(home, "daemon", "start", "--hostname", "solo", "--listen", "127.0.0.1:0")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("Daemon started: solo, pid ")
    pid = ipc.daemon_pid(home)
    assert pid is not None and pid > 0
    assert (home / "daemon.log").exists()

    again = cli(home, "daemon", "start", "--hostname", "solo", "--listen", "127.0.0.1:0")
    assert_one_line_error(again, 4, "already running", str(pid), "pilotctl daemon stop")

    env = {"PILOT_HOME": str(home)}  # the default home comes from PILOT_HOME
    status = json.loads(cli(None, "--json", "daemon", "status", env=env).stdout)
    assert status["running"] is True and status["pid"] == pid and status["hostname"] == "solo"
    assert status["home"] == str(home)
    human = cli(home, "daemon", "status")
    assert human.returncode == 0 and "Hostname:  solo" in human.stdout

    stopped = cli(None, "daemon", "stop", env=env)
    assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
    assert ipc.daemon_pid(home) is None
    assert not (home / "daemon.sock").exists() and not (home / "daemon.pid").exists()
    assert not process_alive(pid)
    assert cli_json(home, "daemon", "stop") == {"stopped": False, "pid": None,
                                                "home": str(home)}


def test_restart_after_sigkill(fresh_home: Path) -> None:
    home = fresh_home
    first = start_daemon(home, "phoenix")
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while ipc.daemon_pid(home) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (home / "daemon.pid").exists() and (home / "daemon.sock").exists()  # stale leftovers
    status = cli(home, "daemon", "status")
    assert status.returncode == 3 and "crashed" in status.stdout
    assert_one_line_error(cli(home, "info"), 3, "not running", "pilotctl daemon start")

    second = start_daemon(home, "phoenix")
    assert second.pid != first.pid and second.node_id == first.node_id  # same identity
    assert cli_json(home, "info")["pid"] == second.pid


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_pilot_agents_run_uses_uvloop() -> None:
    # uvloop is a dependency on Linux: the daemon's tunnels, and applications started with
    # pilot_agents.run, run on its C event loop.
    assert run(_loop_module()).startswith("uvloop")


def test_pilot_agents_run_falls_back_to_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import fails
    assert run(_loop_module()).startswith("asyncio")


def test_home_path_too_long_is_one_line() -> None:
    home = Path("/tmp/" + "x" * 120)
    try:
        result = cli(home, "daemon", "start", "--listen", "127.0.0.1:0")
        assert_one_line_error(result, 2, "too long", "shorter --home")
    finally:
        stop_daemons(home)


def test_start_reports_a_bad_listen_address(fresh_home: Path) -> None:
    result = cli(fresh_home, "daemon", "start", "--listen", "256.1.1.1:99999")
    assert_one_line_error(result, 2, "port 99999 is not in 0..65535")
    assert ipc.daemon_pid(fresh_home) is None


def test_start_refuses_a_hostname_no_beacon_would_take(fresh_home: Path) -> None:
    """Taken without a beacon, it failed only once the node was given one."""
    result = cli(fresh_home, "daemon", "start", "--hostname", "bad name!", "--listen",
                 "127.0.0.1:0")
    assert_one_line_error(result, 2, "--hostname 'bad name!': bad name")
    assert ipc.daemon_pid(fresh_home) is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP],  # or its terminal closed
                         ids=["SIGTERM", "SIGHUP"])
def test_foreground_daemon_stops_cleanly_on_a_signal(fresh_home: Path, signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pilot_agents.cli", "--home", str(fresh_home), "daemon", "start",
         "--foreground", "--listen", "127.0.0.1:0", "--hostname", "fg"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "pilot-agents daemon ready" in line:
            break
    assert cli_json(fresh_home, "info")["hostname"] == "fg"
    proc.send_signal(signum)
    assert proc.wait(timeout=10) == 0
    assert ipc.daemon_pid(fresh_home) is None
    assert "stopped" in (fresh_home / "daemon.log").read_text()  # its clean-up ran


# -- messaging ------------------------------------------------------------------------------


def test_a_command_naming_its_own_node_says_so(daemon_pair: Pair) -> None:
    """Not "not trusted: run trust add", which trust add refuses for one's own id."""
    a, _ = daemon_pair
    for target in ("alpha", a.node_id):
        result = cli(a.home, "connect", target, "--message", "hello")
        assert_one_line_error(result, 2, "is this node itself")


def test_connect_with_message_then_listen(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    message = '{"rows":1842,"summary":"Q4 up 23%"}'
    result = cli(a.home, "connect", "beta", "--message", message)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert CONNECTED.match(lines[0]), lines
    assert lines[1] == f"Delivered {len(message)} bytes to beta port 1001."
    got = cli(b.home, "--json", "listen", "1001", "--count", "1", "--timeout", "5")
    assert got.returncode == 0, got.stderr
    received = json.loads(got.stdout)
    assert (received["from"], received["hostname"], received["port"], received["data"]) == (
        a.node_id, "alpha", 1001, message)


def test_connect_json_and_wait_reply(daemon_pair: Pair, upper_service: int) -> None:
    a, b = daemon_pair
    out = cli_json(a.home, "connect", "beta", str(upper_service), "--message", "hello",
                   "--wait-reply")
    assert out["delivered"] is True and out["encrypted"] is True and out["path"] == "direct"
    assert out["peer"] == b.node_id and out["reply"]["data"] == "HELLO"
    human = cli(a.home, "connect", b.node_id, "--port", str(upper_service), "-m", "abc",
                "--wait-reply")
    assert human.returncode == 0 and human.stdout.splitlines()[-1] == "ABC"


def test_connect_pipes_stdin_and_stdout_like_netcat(daemon_pair: Pair,
                                                    upper_service: int) -> None:
    a, _ = daemon_pair
    result = cli(a.home, "connect", "beta", "--port", str(upper_service), "--linger", "0.5",
                 input="one\ntwo\nthree\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ONE", "TWO", "THREE"]
    assert result.stderr == ""  # status chatter goes to a terminal only


def test_send_data_file_and_binary(daemon_pair: Pair, tmp_path: Path) -> None:
    a, b = daemon_pair
    sent = cli(a.home, "send", "beta", "4600", "--data", "x")  # nobody listens yet
    assert_one_line_error(sent, 9, "beta is not listening on port 4600")
    assert ipc_call(b.home, cmd="listen", port=4600)["ok"]
    try:
        result = cli(a.home, "send", "beta", "4600", "--data", "plain text")
        assert result.returncode == 0 and result.stdout.startswith("Delivered 10 bytes to beta")
        blob = bytes(range(256)) * 4
        path = tmp_path / "blob.bin"
        path.write_bytes(blob)
        out = cli_json(a.home, "send", "beta", "4600", "--file", str(path))
        assert out["bytes"] == 1024 and out["delivered"] is True
        piped = subprocess.run(
            [sys.executable, "-m", "pilot_agents.cli", "--home", str(a.home), "send", "beta",
             "4600", "--file", "-"], input=b"from stdin", capture_output=True, cwd=ROOT)
        assert piped.returncode == 0, piped.stderr
        got = cli(b.home, "--json", "listen", "4600", "--count", "3", "--timeout", "5")
        first, second, third = (json.loads(line) for line in got.stdout.splitlines())
        assert (first["data"], first["encoding"]) == ("plain text", "utf-8")
        assert second["encoding"] == "base64"
        import base64

        assert base64.b64decode(second["data"]) == blob
        assert third["data"] == "from stdin"
    finally:
        ipc_call(b.home, cmd="unlisten", port=4600)


def test_listen_human_output_and_count(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    proc = subprocess.Popen(
        [sys.executable, "-m", "pilot_agents.cli", "--home", str(b.home), "listen", "4700",
         "--count", "2", "--timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_for(lambda: any(p["port"] == 4700 for p in ipc_call(b.home, cmd="info")["listening"]))
    for text in ("first", "second"):
        assert cli(a.home, "send", "beta", "4700", "--data", text).returncode == 0
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["[alpha] first", "[alpha] second"]
    info = cli_json(b.home, "info")
    assert all(p["port"] != 4700 for p in info["listening"])  # listen cleaned up after itself


def test_a_beacon_usage_mistake_is_one_line() -> None:
    result = cli(None, "beacon", "--bogus")
    assert_one_line_error(result, 2, "unrecognized arguments: --bogus",
                          "see 'pilot-agents beacon --help'")


def test_a_beacon_takes_home_for_its_data_and_refuses_json(tmp_path: Path) -> None:
    """As every command: --home before the verb (the beacon's data directory is HOME/beacon,
    where it was ignored); --json is refused, where it was ignored too."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pilot_agents.cli", "--home", str(tmp_path / "h"), "beacon",
         "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening on ")
        assert (tmp_path / "h" / "beacon" / "identity.key").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    result = cli(None, "--json", "beacon", "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["message"].startswith("the beacon prints no JSON")


def test_listen_into_a_reader_that_goes_away_ends_quietly(daemon_pair: Pair) -> None:
    """`pilotctl listen PORT | head -1`: once head has its line and exits, the next message
    has nowhere to go. That ended as "error: Broken pipe", exit 1; a Unix tool ends quietly."""
    a, b = daemon_pair
    reader, writer = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pilot_agents.cli", "--home", str(b.home), "listen", "4710"],
        stdout=writer, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    os.close(writer)
    wait_for(lambda: any(p["port"] == 4710 for p in ipc_call(b.home, cmd="info")["listening"]))
    assert cli(a.home, "send", "beta", "4710", "--data", "first").returncode == 0
    with os.fdopen(reader) as head:
        assert head.readline() == "[alpha] first\n"
    assert cli(a.home, "send", "beta", "4710", "--data", "second").returncode == 0
    _, err = proc.communicate(timeout=10)
    assert (proc.returncode, err) == (141, "")
    wait_for(lambda: all(p["port"] != 4710 for p in ipc_call(b.home, cmd="info")["listening"]))


def test_ctrl_c_under_json_ends_the_stream_with_an_error_object(daemon_pair: Pair) -> None:
    """A script reading ``listen --json`` that stopped it with Ctrl-C got no JSON at all, so it
    could not tell a stream cut short from one that ended: the last line is now the error
    object any other failure prints. A reader gone by then (Ctrl-C ends ``... | jq`` too)
    leaves the status and "interrupted", not a traceback of that last write. SIGTERM (a
    supervisor's stop) ends it the same way; it used to kill it without a word."""
    a, b = daemon_pair
    for reader_gone, signum in ((False, signal.SIGINT), (True, signal.SIGINT),
                                (False, signal.SIGTERM)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pilot_agents.cli", "--home", str(b.home), "--json", "listen",
             "4720"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout is not None and proc.stderr is not None
        wait_for(lambda: any(p["port"] == 4720
                             for p in ipc_call(b.home, cmd="info")["listening"]))
        assert cli(a.home, "send", "beta", "4720", "--data", "x").returncode == 0
        assert json.loads(proc.stdout.readline())["data"] == "x"
        if reader_gone:
            proc.stdout.close()
        proc.send_signal(signum)
        err = proc.stderr.read()
        out = "" if reader_gone else proc.stdout.read()
        assert (proc.wait(timeout=10), err) == (130, "interrupted\n")
        assert [json.loads(line) for line in out.splitlines()] == \
            ([] if reader_gone else [INTERRUPTED])
        wait_for(lambda: all(p["port"] != 4720
                             for p in ipc_call(b.home, cmd="info")["listening"]))


def test_listen_publish_and_unlisten(daemon_pair: Pair) -> None:
    _, b = daemon_pair
    out = cli_json(b.home, "listen", "4800", "--publish")
    assert out == {"port": 4800, "publish": True, "pub_endpoint": f"ipc://{b.home}/pub.sock",
                   "topic": "04800"}
    done = cli(b.home, "unlisten", "4800")
    assert done.returncode == 0 and "Stopped listening on port 4800" in done.stdout
    assert_one_line_error(cli(b.home, "unlisten", "4800"), 2, "not being listened on")


def tunnel_up(a: DaemonHandle, b: DaemonHandle) -> None:
    """A message from a to b, taken from b's inbox: their tunnel is up, and a has learnt that b
    trusts it (trust is "outgoing" until then, "mutual" once it has)."""
    assert ipc_call(a.home, cmd="send", target=b.node_id, port=1001, data="warm-up")["ok"]
    assert ipc_call(b.home, cmd="receive", port=1001, timeout=5)["ok"]


def test_info_resolve_and_add_peer_outputs(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    tunnel_up(a, b)  # alone, no earlier test of the module has brought it up
    info = cli_json(a.home, "info")
    assert {"node_id", "virtual_address", "hostname", "nat_type", "endpoints",
            "beacon"} <= set(info)
    human = cli(a.home, "info").stdout
    assert f"Node id:         {a.node_id}" in human and "Hostname:        alpha" in human
    resolved = cli_json(a.home, "resolve", "beta")
    assert resolved["node_id"] == b.node_id and resolved["candidates"] == [b.endpoint]
    assert resolved["trust"] == "mutual"
    assert f"beta: {b.node_id}" in cli(a.home, "resolve", "beta").stdout
    stranger = Identity.generate().node_id
    assert_one_line_error(cli(a.home, "add-peer", "not-a-node-id", "127.0.0.1:1"), 2,
                          "not a node id")
    assert_one_line_error(cli(a.home, "add-peer", stranger, "nowhere"), 2)
    for where in ("1.2.3.4:0", ":4000", "0.0.0.0:4000"):  # listen addresses, not a peer's
        assert_one_line_error(cli(a.home, "add-peer", stranger, where), 2,
                              "no address a peer can be reached at")
    # It was taken, and the peer it named never answered, with nothing to say why.
    assert_one_line_error(cli(a.home, "add-peer", stranger, "nosuchhost.invalid:4000"), 2,
                          "cannot resolve 'nosuchhost.invalid'")
    assert_one_line_error(cli(a.home, "add-peer", stranger, "a..b:4000"), 2,  # not a name
                          "cannot resolve 'a..b'")


def test_json_outputs_parse(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    ghost = Identity.generate().node_id
    assert ipc_call(a.home, cmd="listen", port=4950)["ok"]
    calls: list[tuple[str, ...]] = [
        ("add-peer", ghost, "127.0.0.1:9", "--name", "ghost2"), ("unlisten", "4950"),
        ("info",), ("resolve", "beta"), ("trust", "list"), ("trust", "pending"),
        ("daemon", "status"), ("send", "beta", "1001", "--data", "j"),
        ("connect", "beta", "-m", "j"), ("trust", "export", "beta"),
    ]
    results = cli_many([(a.home, "--json", *args) for args in calls])
    for args, result in zip(calls, results, strict=True):
        assert result.returncode == 0, (args, result.stderr)
        assert isinstance(json.loads(result.stdout), dict), args
    assert json.loads(results[0].stdout) == {"node_id": ghost, "address": "127.0.0.1:9",
                                             "hostname": "ghost2"}
    assert json.loads(results[1].stdout) == {"port": 4950, "closed": True}
    for _ in range(2):  # the two messages sent above
        ipc_call(b.home, cmd="receive", port=1001, timeout=5)


def test_trust_list_of_the_pair(daemon_pair: Pair) -> None:
    a, b = daemon_pair
    entries = cli_json(a.home, "trust", "list")["entries"]
    assert [(e["node_id"], e["hostname"]) for e in entries] == [(b.node_id, "beta")]
    human = cli(a.home, "trust", "list").stdout.splitlines()
    assert human[0].split() == ["NAME", "NODE", "ID", "STATE"]
    assert human[1].split()[:2] == ["beta", b.node_id]


# -- one clear line for every mistake ----------------------------------------------------------


def test_daemon_not_running_says_how_to_start_it(fresh_home: Path) -> None:
    calls = [("info",), ("send", "x", "1", "--data", "y"), ("trust", "list"),
             ("listen", "1001", "--count", "1"), ("connect", "x", "-m", "y")]
    for result in cli_many([(fresh_home, *args) for args in calls]):
        assert_one_line_error(result, 3, "not running",
                              f"pilotctl daemon start --hostname NAME --home {fresh_home}")


MISTAKES: list[tuple[tuple[str, ...], int, tuple[str, ...]]] = [
        (("send", "nobody", "1001", "--data", "x"), 5, ("unknown host 'nobody'",)),
        (("connect", "nobody", "-m", "x"), 5, ("unknown host",)),
        (("resolve", "nobody"), 5, ("unknown host",)),
        (("trust", "approve", "nobody"), 2, ("no pending trust request from nobody",)),
        (("trust", "reject", "nobody"), 2, ("no pending trust request",)),
        (("trust", "remove", "nobody"), 2, ("not in the trust store",)),
        (("trust", "import", "bm90IGEgcmVxdWVzdA=="), 2, ("trust request",)),
        (("listen", "4900", "--timeout", "0.3"), 10, ("no message on port 4900 within 0.3 s",)),
        (("listen", "4900", "--count", "2", "--timeout", "0.3"), 10, ("received 0 of 2",)),
        (("run", "no-such-pipeline.yaml"), 2, ("cannot read the pipeline no-such-pipeline.yaml",)),
        (("send", "beta"), 2, ("required", "--help")),
        (("listen", "70000"), 2, ("not in 1..65535",)),
        (("frobnicate",), 2, ("invalid choice",)),
        (("connect", "beta", "--wait-reply"), 2, ("--wait-reply needs --message",)),
        (("connect", "beta", "5", "--port", "6", "-m", "x"), 2, ("two different ports",)),
        (("ping", "beta", "--count", "0"), 2, ("less than 1",)),
        (("send", "beta", "1001", "--file", "/nonexistent/file"), 2, ("cannot read",)),
        # Ignored, they let a user believe the command would print what arrives.
        (("listen", "4900", "--publish", "--count", "1"), 2,
         ("--count and --timeout are for printing messages", "pilotctl unlisten 4900")),
]


def test_user_mistakes_are_one_line(daemon_pair: Pair) -> None:
    a, _ = daemon_pair
    results = cli_many([(a.home, *args) for args, _, _ in MISTAKES])
    for (args, code, fragments), result in zip(MISTAKES, results, strict=True):
        try:
            assert_one_line_error(result, code, *fragments)
        except AssertionError as exc:
            raise AssertionError(f"pilotctl {' '.join(args)}: {exc}") from None


def test_untrusted_peer_gets_the_exact_fix(daemon_pair: Pair) -> None:
    a, _ = daemon_pair
    stranger = Identity.generate().node_id
    assert_one_line_error(cli(a.home, "send", stranger, "1001", "--data", "x"), 6,
                          f"run 'pilotctl trust add {stranger}'")
    assert ipc_call(a.home, cmd="add_peer", node_id=stranger, address="127.0.0.1:9",
                    hostname="ghost")["ok"]
    assert_one_line_error(cli(a.home, "connect", "ghost", "-m", "x"), 6,
                          "ghost is not trusted: run 'pilotctl trust add ghost'")


def test_unreachable_peer(daemon_pair: Pair) -> None:
    a, _ = daemon_pair
    stranger = Identity.generate().node_id
    assert ipc_call(a.home, cmd="add_peer", node_id=stranger, address="127.0.0.1:9",
                    hostname="void")["ok"]
    assert ipc_call(a.home, cmd="trust_add", target="void")["ok"]
    try:
        line = assert_one_line_error(
            cli(a.home, "send", "void", "1001", "--data", "x", "--timeout", "0.5"), 8,
            "void did not answer")
        assert "pilotctl trust add alpha" in line  # it may not trust us yet: say the fix
    finally:
        assert ipc_call(a.home, cmd="trust_remove", target="void")["ok"]


def test_json_errors_parse(daemon_pair: Pair) -> None:
    a, _ = daemon_pair
    result = cli(a.home, "--json", "send", "nobody", "1001", "--data", "x")
    assert result.returncode == 5
    assert json.loads(result.stdout) == {"error": {
        "type": "UnknownHostError", "exit_code": 5, "message": result.stderr.strip()[7:]}}


def test_help_documents_the_exit_codes() -> None:
    result = cli(None, "--help")
    assert result.returncode == 0
    for line in ("3   daemon not running", "5   unknown host", "6   peer not trusted",
                 "9   port closed", "10  timed out", "11  beacon error"):
        assert line in result.stdout
    assert "exit codes:" in cli(None, "send", "--help").stdout


def test_commands_other_than_daemon_start_and_stop_load_no_daemon_code() -> None:
    # Every command group is imported to build the parser: none may pull in the daemon (and
    # pydantic with it), or every pilotctl call pays for it.
    probe = ("import sys; from pilot_agents.cli import build_parser; build_parser(); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic' "
             "or m.startswith('pilot_agents.daemon')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unreadable_trust_store_fails_the_start_in_one_line(fresh_home: Path) -> None:
    (fresh_home / "trust.json").write_text("{not json")
    result = cli(fresh_home, "daemon", "start", "--listen", "127.0.0.1:0")
    assert_one_line_error(result, 2, "trust.json is not a valid trust store", "fix or remove it")


@pytest.mark.parametrize("content", [b"{not json", b'{"peers": [{"node_id": 1}]}', b"\xff"])
def test_unreadable_static_peers_fail_the_start_in_one_line(fresh_home: Path,
                                                           content: bytes) -> None:
    """Before: pydantic's three lines (the last a URL) on stderr; a file that is not UTF-8, a
    traceback in the log."""
    (fresh_home / "static-peers.json").write_bytes(content)
    (fresh_home / "static-peers.json").chmod(0o600)
    result = cli(fresh_home, "daemon", "start", "--listen", "127.0.0.1:0")
    line = assert_one_line_error(result, 2, "static-peers.json is not a valid static peers file",
                                 "fix or remove it")
    assert "https://" not in line


def test_a_lock_file_that_cannot_be_opened_is_not_a_daemon_not_running(fresh_home: Path) -> None:
    """Before: any OSError opening daemon.lock (too many open files, say) read as "no daemon
    runs": `status` said not running, `send` told the user to start one."""
    lock = fresh_home / "daemon.lock"
    lock.symlink_to("daemon.lock")  # ELOOP, as EMFILE would be
    try:
        for args in (("daemon", "status"), ("send", "beta", "1001", "--data", "x")):
            assert_one_line_error(cli(fresh_home, *args), 1, "cannot tell whether a daemon runs",
                                  "daemon.lock: Too many levels of symbolic links")
    finally:
        lock.unlink()


# -- trust flow without a beacon (out-of-band requests) --------------------------------------


def test_trust_flow_export_import_approve_reject_remove(fresh_pair: Pair) -> None:
    c, d = fresh_pair
    for me, other in ((c, d), (d, c)):
        assert ipc_call(me.home, cmd="add_peer", node_id=other.node_id,
                        address=other.endpoint)["ok"]

    refused = cli(c.home, "trust", "export", d.node_id)
    assert_one_line_error(refused, 6, f"pilotctl trust add {d.node_id}")
    added = cli(c.home, "trust", "add", d.node_id, "--reason", "pipeline")
    assert added.returncode == 0 and "outgoing" in added.stdout
    assert "no trust request was sent" in added.stdout

    # d rejects a first request, then approves a second one
    blob = cli(c.home, "trust", "export", d.node_id, "--reason", "pipeline").stdout.strip()
    imported = cli(d.home, "trust", "import", blob)
    assert imported.returncode == 0 and "pilotctl trust approve gamma" in imported.stdout
    replayed = ipc_call(d.home, cmd="trust_import", request=blob)
    assert replayed["error"]["type"] == "TrustRequestError"  # type: ignore[index]
    assert replayed["error"]["message"] == (  # type: ignore[index]
        "this trust request was already received; it waits for approval: 'pilotctl trust "
        "approve gamma'")
    pending = ipc_call(d.home, cmd="trust_pending")["pending"]
    assert [(p["node_id"], p["hostname"], p["reason"], p["state"])  # type: ignore[index]
            for p in pending] == [(c.node_id, "gamma", "pipeline", "incoming")]  # type: ignore[union-attr]
    human = cli(d.home, "trust", "pending").stdout
    assert "gamma" in human and "pipeline" in human and "pilotctl trust approve" in human
    assert "incoming-pending" in cli(d.home, "trust", "list").stdout
    early = ipc_call(c.home, cmd="send", target=d.node_id, port=1001, data="x", timeout=0.5)
    assert early["error"]["type"] == "PeerUnreachableError"  # type: ignore[index]
    rejected = cli(d.home, "trust", "reject", "gamma")
    assert rejected.returncode == 0 and "Rejected gamma" in rejected.stdout
    assert ipc_call(d.home, cmd="trust_pending")["pending"] == []

    blob = str(ipc_call(c.home, cmd="trust_export", target=d.node_id)["request"])
    piped = cli(d.home, "trust", "import", "-", input=blob + "\n")
    assert piped.returncode == 0, piped.stderr
    approved = cli_json(d.home, "trust", "approve", "gamma")
    assert approved["entry"]["state"] == "mutual" and approved["entry"]["hostname"] == "gamma"  # type: ignore[index]
    assert "mutual" in approved["note"]  # type: ignore[operator]

    # c learns that it is mutual when a tunnel comes up
    def state(home: Path) -> str:
        return ipc_call(home, cmd="trust_list")["entries"][0]["state"]  # type: ignore[index,no-any-return]

    assert state(c.home) == "outgoing"
    assert ipc_call(c.home, cmd="send", target=d.node_id, port=1001, data="hi")["ok"]
    assert state(c.home) == "mutual"
    got = ipc_call(d.home, cmd="receive", port=1001, timeout=5)
    assert got["message"]["data"] == "hi"  # type: ignore[index]

    removed = cli(d.home, "trust", "remove", "gamma")
    assert removed.returncode == 0 and "Removed gamma" in removed.stdout
    assert ipc_call(d.home, cmd="trust_list")["entries"] == []
    assert_one_line_error(cli(d.home, "send", c.node_id, "1001", "--data", "x"), 6,
                          f"pilotctl trust add {c.node_id}")
    time.sleep(0.2)
    late = ipc_call(c.home, cmd="send", target=d.node_id, port=1001, data="x", timeout=1)
    assert late["error"]["type"] in ("PeerUnreachableError", "ConnectionClosedError")  # type: ignore[index]
    assert oct((d.home / "trust.json").stat().st_mode & 0o777) == "0o600"


def test_trust_store_and_static_peers_survive_a_restart(fresh_home: Path) -> None:
    other = Identity.generate().node_id
    start_daemon(fresh_home, "gamma")
    assert ipc_call(fresh_home, cmd="trust_add", target=other)["ok"]
    assert ipc_call(fresh_home, cmd="add_peer", node_id=other, address="127.0.0.1:9",
                    hostname="delta")["ok"]
    assert ipc_call(fresh_home, cmd="stop")["ok"]
    wait_for(lambda: ipc.daemon_pid(fresh_home) is None)
    start_daemon(fresh_home, "gamma")
    entries = ipc_call(fresh_home, cmd="trust_list")["entries"]
    assert [(e["node_id"], e["state"]) for e in entries] == [(other, "outgoing")]  # type: ignore[index,union-attr]
    assert ipc_call(fresh_home, cmd="resolve", name="delta")["node_id"] == other


# -- needs Node.peers() / Node.ping() -------------------------------------------------------


@pytest.mark.node_api
def test_peers_and_ping(daemon_pair: Pair) -> None:
    require_node_api("peers", "ping", "info")
    a, b = daemon_pair
    tunnel_up(a, b)
    peers = cli_json(a.home, "peers")["peers"]
    beta = next(p for p in peers if p["node_id"] == b.node_id)
    assert beta["path"] == "direct" and beta["hostname"] == "beta" and beta["established"]
    assert beta["bytes_out"] > 0 and beta["trust"] == "mutual"
    assert "beta" in cli(a.home, "peers").stdout
    ping = cli(a.home, "ping", "beta", "--count", "2", "--interval", "0.05")
    assert ping.returncode == 0, ping.stderr
    lines = ping.stdout.splitlines()
    assert all(re.match(r"^reply from beta: probe \d time=[0-9.]+ ms path=direct$", line)
               for line in lines[:2]), lines
    assert lines[2].startswith("2 probes, 2 replies")
    out = cli_json(a.home, "ping", "beta", "--count", "1")
    assert out["received"] == 1 and out["probes"][0]["path"] == "direct"


def test_ping_that_gets_no_reply_prints_one_json_document(daemon_pair: Pair) -> None:
    """It printed its summary, then the error: two documents, which json.load refuses."""
    a, _ = daemon_pair
    ghost = Identity.generate().node_id
    assert cli(a.home, "add-peer", ghost, "127.0.0.1:9", "--name", "ghost").returncode == 0
    assert cli(a.home, "trust", "add", "ghost").returncode == 0
    try:
        result = cli(a.home, "--json", "ping", "ghost", "--count", "2", "--interval", "0.05",
                     "--timeout", "0.5")
        assert result.returncode == 8, result.stderr
        assert json.loads(result.stdout)["error"]["type"] == "PeerUnreachableError"
    finally:
        cli(a.home, "trust", "remove", "ghost")


# -- the walkthrough, with a beacon ----------------------------------------------------------


def start_beacon(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pilot_agents.cli", "beacon", "--listen", "127.0.0.1:0",
         "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.match(r"listening on (\S+) ", line)
    if not match:
        proc.kill()
        error = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"the beacon did not start: {line!r} {error}")
    return proc, match.group(1)


@pytest.fixture
def beacon(tmp_path: Path) -> Iterator[str]:
    require_node_api("beacon=", "hostname=", "resolve", "send_trust_request")
    proc, address = start_beacon(tmp_path / "beacon")
    try:
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def beacon_homes() -> Iterator[tuple[Path, Path, Path]]:
    homes = (short_home(), short_home(), short_home())
    try:
        yield homes
    finally:
        stop_daemons(*homes)


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def entries(home: Path) -> list[dict[str, object]]:
    return ipc_call(home, cmd="trust_list")["entries"]  # type: ignore[return-value]


def pending(home: Path) -> list[dict[str, object]]:
    return ipc_call(home, cmd="trust_pending")["pending"]  # type: ignore[return-value]


@pytest.mark.beacon
def test_walkthrough_with_a_beacon(beacon: str, beacon_homes: tuple[Path, Path, Path]) -> None:
    analyst, reporter, third = beacon_homes
    for home, name in ((analyst, "analyst-agent"), (reporter, "reporter-agent")):
        started = cli(home, "daemon", "start", "--hostname", name, "--beacon", beacon)
        assert started.returncode == 0, started.stderr
    added = cli(analyst, "trust", "add", "reporter-agent")
    assert added.returncode == 0, added.stderr
    assert "outgoing" in added.stdout and "Trust request sent" in added.stdout
    wait_for(lambda: pending(reporter))
    assert pending(reporter)[0]["hostname"] == "analyst-agent"
    # the reporter runs `trust add` too (the walkthrough): that approves the pending request
    added = cli(reporter, "trust", "add", "analyst-agent")
    assert added.returncode == 0 and "mutual" in added.stdout, added.stderr
    wait_for(lambda: entries(analyst)[0]["state"] == "mutual")
    result = cli(analyst, "connect", "reporter-agent", "--message",
                 '{"rows":1842,"summary":"Q4 up 23%"}')
    assert result.returncode == 0, result.stderr
    assert CONNECTED.match(result.stdout.splitlines()[0])
    got = cli_json(reporter, "listen", "1001", "--count", "1", "--timeout", "5")
    assert json.loads(got["data"]) == {"rows": 1842, "summary": "Q4 up 23%"}  # type: ignore[arg-type]
    assert got["hostname"] == "analyst-agent"
    resolved = ipc_call(analyst, cmd="resolve", name="reporter-agent")
    assert resolved["source"] == "beacon" and resolved["trust"] == "mutual"

    # a third node asks both; the reporter rejects it, the analyst approves it
    started = cli(third, "daemon", "start", "--hostname", "third", env={"PILOT_BEACON": beacon})
    assert started.returncode == 0 and f"beacon {beacon}" in started.stdout, started.stderr
    assert ipc_call(third, cmd="trust_add", target="analyst-agent", reason="hello")["ok"]
    assert ipc_call(third, cmd="trust_add", target="reporter-agent")["ok"]
    wait_for(lambda: pending(analyst) and pending(reporter))
    listed = cli(analyst, "trust", "pending").stdout
    assert "third" in listed and "hello" in listed
    assert cli(reporter, "trust", "reject", "third").returncode == 0
    assert pending(reporter) == []
    approved = cli_json(analyst, "trust", "approve", "third")
    assert approved["entry"]["state"] == "mutual" and approved["request_sent"] is True  # type: ignore[index]
    wait_for(lambda: {e["hostname"]: e["state"] for e in entries(third)}["analyst-agent"]
             == "mutual")
    assert ipc_call(third, cmd="send", target="analyst-agent", port=1001, data="hi")["ok"]
    assert_one_line_error(cli(third, "send", "reporter-agent", "1001", "--data", "x",
                              "--timeout", "2"), 8, "pilotctl trust add third")
    assert cli(analyst, "trust", "remove", "third").returncode == 0
    assert_one_line_error(cli(analyst, "send", "third", "1001", "--data", "x"), 6,
                          "pilotctl trust add third")


@pytest.mark.beacon
def test_beacon_errors(beacon: str, beacon_homes: tuple[Path, Path, Path]) -> None:
    one, two, three = beacon_homes
    start_daemons((one, "taken"), extra=("--beacon", beacon))
    results = cli_many([
        (two, "daemon", "start", "--hostname", "taken", "--beacon", beacon),
        (three, "daemon", "start", "--hostname", "lonely", "--beacon", "127.0.0.1:9"),
        (one, "trust", "add", "nobody-here"),
        (one, "connect", "nobody-here", "-m", "x"),
    ])
    assert_one_line_error(results[0], 11, "taken")
    assert_one_line_error(results[1], 11, "beacon")
    assert_one_line_error(results[2], 5, "nobody-here")
    assert_one_line_error(results[3], 5, "nobody-here")
    assert ipc.daemon_pid(two) is None and ipc.daemon_pid(three) is None


@pytest.mark.beacon
def test_key_change_behind_a_pinned_name_fails_loudly(
        beacon: str, beacon_homes: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A name pinned at `trust add` time that later maps to another key (here: the beacon lost
    its registry and someone else took the name) is refused, naming both keys and the fix."""
    one, two, three = beacon_homes
    _, old = start_daemons((one, "one"), (two, "target"), extra=("--beacon", beacon))
    assert ipc_call(one, cmd="trust_add", target="target")["ok"]
    ipc_call(one, cmd="stop")
    ipc_call(two, cmd="stop")
    wait_for(lambda: ipc.daemon_pid(one) is None and ipc.daemon_pid(two) is None)
    # the name moves to another key: a fresh beacon, where a new node registers it first
    proc, second = start_beacon(tmp_path / "beacon2")
    try:
        _, new = start_daemons((one, "one"), (three, "target"), extra=("--beacon", second))
        line = assert_one_line_error(cli(one, "connect", "target", "-m", "x"), 7)
        assert old.node_id in line and new.node_id in line
        assert "pilotctl trust remove target" in line
    finally:
        proc.terminate()
        proc.wait(timeout=10)
