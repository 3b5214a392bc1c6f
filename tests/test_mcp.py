"""MCP through tunnels, with real third-party MCP servers from PyPI (each in a venv of its own,
prepared by scripts/install-mcp-servers.sh), through two real daemons: ``pilotctl mcp serve``
on beta, and on alpha ``connect()``, ``mcp.Client(tunnel(...))`` and ``pilotctl mcp connect``
driven by the mcp SDK's own stdio client."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypedDict, cast

import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError

import pilot_agents
from pilot_agents import Client as PilotClient
from pilot_agents.errors import McpSessionError, McpToolError, PilotError, PortInUseError
from pilot_agents.integrations.mcp.remote import (
    Control,
    McpConfig,
    McpServer,
    RemoteSession,
    SessionEvent,
    _Session,
    connect,
    control,
    parse_control_untrusted,
    remote_session,
    tunnel,
)
from tests.conftest import (
    ROOT,
    DaemonHandle,
    assert_one_line_error,
    cli,
    ipc_call,
    short_home,
    start_daemons,
    stop_daemons,
)
from tests.mcp_servers import server_command, servers_fixture  # noqa: F401
from tests.test_node import server_and_two_clients
from tests.transport_pairs import kind_fixture, over_slow_link  # noqa: F401

INITIALIZE = (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":'
              b'"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}\n')


@contextlib.contextmanager
def serving(home: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``pilotctl mcp serve ARGS`` on ``home``'s daemon until the block ends (then SIGINT)."""
    with tempfile.NamedTemporaryFile(prefix="mcp-serve-", suffix=".log") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pilot_agents.cli", "--home", str(home), "mcp", "serve",
             *args], stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
        try:
            deadline = time.monotonic() + 20
            while b"Serving" not in Path(log.name).read_bytes():
                assert proc.poll() is None, Path(log.name).read_text()
                assert time.monotonic() < deadline, "mcp serve did not start"
                time.sleep(0.05)
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def daemons() -> Iterator[tuple[DaemonHandle, DaemonHandle, DaemonHandle]]:
    """alpha and beta trust each other; gamma knows beta's address and trusts it, but beta
    does not trust gamma."""
    homes = [short_home(), short_home(), short_home()]
    try:
        a, b, g = start_daemons((homes[0], "alpha"), (homes[1], "beta"), (homes[2], "gamma"))
        for me, other in ((a, b), (b, a), (g, b)):
            assert ipc_call(me.home, cmd="add_peer", node_id=other.node_id,
                            address=other.endpoint, hostname=other.hostname)["ok"]
            assert ipc_call(me.home, cmd="trust_add", target=other.node_id)["ok"]
        yield a, b, g
    finally:
        stop_daemons(*homes)


def test_control_messages_are_not_json() -> None:
    assert parse_control_untrusted(b'{"jsonrpc":"2.0"}') is None
    assert parse_control_untrusted(control(Control.END, "bye")) == (Control.END, "bye")
    with pytest.raises(PilotError):
        parse_control_untrusted(b"\x00\x63")


async def test_connect_lists_and_calls_a_tool(servers: Path, daemons: tuple[DaemonHandle, ...],
                                              ) -> None:
    alpha, beta, _ = daemons
    with serving(beta.home, "--port", "80", "--", server_command(servers, "mcp-server-time")):
        async with connect("beta", port=80, home=alpha.home) as session:
            tools = await session.list_tools()
            assert "get_current_time" in [t.name for t in tools.tools]
            result = await session.call_tool("get_current_time", {"timezone": "UTC"})
            assert not result.is_error
            assert "UTC" in result.content[0].text  # type: ignore[union-attr]
        # mcp.Client's own handshake (server/discover, then initialize) passes as well.
        async with Client(tunnel("beta", 80, home=alpha.home)) as client:
            result = await client.call_tool("convert_time", {
                "source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"})
            assert not result.is_error and "21:00" in str(result.content)
        # a request piped in is answered before `mcp connect` leaves at the end of its stdin
        result = cli(alpha.home, "mcp", "connect", "beta:80", input=INITIALIZE.decode())
        assert result.returncode == 0 and '"id":1' in result.stdout, result.stderr


class _Page(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


async def test_cli_connect_serves_any_mcp_client(servers: Path, tmp_path: Path,
                                                 daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, beta, _ = daemons
    (tmp_path / "page.html").write_text("<html><body><p>Quarterly sales: 1842 rows</p>"
                                        "</body></html>")
    web = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Page, directory=str(tmp_path)))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    command = StdioServerParameters(command=sys.executable, args=[
        "-m", "pilot_agents.cli", "--home", str(alpha.home), "mcp", "connect", "beta:81"],
        cwd=str(ROOT))
    try:
        with serving(beta.home, "--port", "81", "--",
                     server_command(servers, "mcp-server-fetch"), "--allow-private-ips"):
            async with Client(command) as client:
                assert "fetch" in [t.name for t in (await client.list_tools()).tools]
                result = await client.call_tool(
                    "fetch", {"url": f"http://127.0.0.1:{web.server_port}/page.html"})
                assert not result.is_error and "1842 rows" in str(result.content)
    finally:
        web.shutdown()


async def test_server_death_is_the_clients_error(servers: Path,
                                                 daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, beta, _ = daemons
    with serving(beta.home, "--port", "82", "--",
                 server_command(servers, "mcp-server-time")) as serve:
        async with connect("beta", port=82, home=alpha.home) as session:
            await session.list_tools()
            (server,) = children(serve.pid)
            os.kill(server, signal.SIGKILL)
            with pytest.raises(MCPError, match="exited with status -9"):
                await session.call_tool("get_current_time", {"timezone": "UTC"})
        # through `pilotctl mcp connect`: a waiting request gets the reason, and it exits 1
        connector = subprocess.Popen(
            [sys.executable, "-m", "pilot_agents.cli", "--home", str(alpha.home), "mcp",
             "connect", "beta:82"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=ROOT)
        assert connector.stdin is not None and connector.stdout is not None
        connector.stdin.write(INITIALIZE)
        connector.stdin.flush()
        assert b'"id":1' in connector.stdout.readline()
        (server,) = children(serve.pid)
        os.kill(server, signal.SIGKILL)
        connector.stdin.write(b'{"jsonrpc":"2.0","id":2,"method":"tools/list"}\n')
        connector.stdin.flush()
        line = connector.stdout.readline()  # empty if the end came before the request
        assert line == b"" or b"exited with status -9" in line, line
        _, err = connector.communicate(timeout=10)
        assert connector.returncode == 1 and len(err.splitlines()) == 1, err
        assert b"exited with status -9" in err
        # the client leaving ends its server process
        async with connect("beta", port=82, home=alpha.home) as session:
            await session.list_tools()
            assert len(children(serve.pid)) == 1
        deadline = time.monotonic() + 10
        while children(serve.pid):
            assert time.monotonic() < deadline, "the server process outlived its session"
            time.sleep(0.05)


async def test_connect_to_a_server_that_dies_at_start_raises_mcp_error(
        daemons: tuple[DaemonHandle, ...]) -> None:
    """As docs/mcp.md says: an MCPError naming the status and the last stderr line, not the
    SDK's ExceptionGroup of ExceptionGroups, which `except MCPError` does not catch."""
    alpha, beta, _ = daemons
    dies = "import sys; sys.stderr.write('db password wrong\\n'); sys.exit(3)"
    with (serving(beta.home, "--port", "84", "--", sys.executable, "-c", dies),
          pytest.raises(MCPError, match="exited with status 3: db password wrong")):
        async with connect("beta", port=84, home=alpha.home):
            pass


async def test_connect_to_a_server_that_never_answers_gives_up(
        daemons: tuple[DaemonHandle, ...]) -> None:
    """READY comes once the process runs and heartbeats kept the session up: connect() waited
    for 'initialize' without end (an audit)."""
    alpha, beta, _ = daemons
    with serving(beta.home, "--port", "90", "--", "sleep", "600"):  # answers nothing
        started = time.monotonic()
        with pytest.raises(McpSessionError, match="the MCP server on beta:90 did not answer "
                                                  "'initialize' within 2 s"):
            async with asyncio.timeout(20), connect("beta", 90, home=alpha.home,
                                                     start_timeout=2):
                pass
        assert time.monotonic() - started < 10


async def test_sessions_are_bounded(servers: Path, daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, beta, _ = daemons
    with serving(beta.home, "--port", "83", "--max-sessions", "1", "--max-message-bytes",
                 "4096", "--", server_command(servers, "mcp-server-time")):
        async with connect("beta", port=83, home=alpha.home) as session:
            with pytest.raises(McpSessionError, match="all 1 sessions"):
                async with connect("beta", port=83, home=alpha.home):
                    pass
            await session.list_tools()
        async with connect("beta", port=83, home=alpha.home) as session:
            with pytest.raises(MCPError, match="more than 4096"):
                await session.call_tool("get_current_time", {"timezone": "x" * 5000})


async def test_a_port_is_served_once(servers: Path, tmp_path: Path,
                                     daemons: tuple[DaemonHandle, ...]) -> None:
    """A second `mcp serve` on a served port started silently, and the daemon handed each
    message of the port to one of the two: every session's messages went partly to a server
    that had no such session (an audit). It is refused, and the sessions go on."""
    alpha, beta, _ = daemons
    time_server = server_command(servers, "mcp-server-time")
    with serving(beta.home, "--port", "98", "--", time_server):
        async with connect("beta", port=98, home=alpha.home) as session:
            result = cli(beta.home, "mcp", "serve", "--port", "98", "--", time_server,
                         timeout=20)
            assert_one_line_error(result, 2, "cannot serve MCP on port 98: port 98 is already "
                                  "listened on")
            # nor may any other listen take the port's messages while it is served
            reply = ipc_call(beta.home, cmd="listen", port=98)
            assert reply["error"] == {"type": "PortInUseError", "message": (
                "port 98 is held by a listener that takes all its messages (a server such as "
                "'pilotctl mcp serve'): stop it, or use another port")}, reply
            for _ in range(5):  # as many as the servers there were would have shared
                await session.list_tools()
    # a port listened on already is not served either (here through daemon.sock's listen)
    assert ipc_call(beta.home, cmd="listen", port=99)["ok"]
    try:
        reply = ipc_call(beta.home, cmd="listen", port=99, exclusive=True)
        assert cast(dict[str, str], reply["error"])["type"] == "PortInUseError", reply
        assert_one_line_error(cli(beta.home, "mcp", "serve", "--port", "99", "--", time_server,
                                  timeout=20), 2, "port 99 is already listened on")
    finally:
        assert ipc_call(beta.home, cmd="unlisten", port=99)["closed"]
    # on an embedded Node as well
    async with (server_and_two_clients(tmp_path) as (node, _, _),
                running(McpServer(node, 98, ["cat"]))):
        with pytest.raises(PortInUseError, match="cannot serve MCP on port 98"):
            await McpServer(node, 98, ["cat"]).serve()


async def test_stopping_serve_tells_every_client(daemons: tuple[DaemonHandle, ...]) -> None:
    """Sessions were ended once the port was closed, so their ENDs were lost: a client waiting
    on a call heard ~9 s later that nothing listened on the port (an audit)."""
    alpha, beta, _ = daemons
    with serving(beta.home, "--port", "85", "--", "sleep", "600") as serve:  # answers nothing
        async with (remote_session("beta", 85, home=alpha.home) as first,
                    remote_session("beta", 85, home=alpha.home) as second):
            for remote in (first, second):
                await remote.send(b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}')
            serve.send_signal(signal.SIGTERM)
            async with asyncio.timeout(3):  # at once, not after the stop of the processes
                for remote in (first, second):
                    with pytest.raises(McpSessionError,
                                       match="ended: the MCP server side is stopping"):
                        await remote.receive()
        assert serve.wait(timeout=15) == 0


def test_untrusted_peer_is_refused(servers: Path, daemons: tuple[DaemonHandle, ...]) -> None:
    _, beta, gamma = daemons
    with serving(beta.home, "--port", "84", "--", server_command(servers, "mcp-server-time")):
        result = cli(gamma.home, "mcp", "connect", "beta:84", "--timeout", "3", input="")
        assert_one_line_error(result, 8, "does not trust us")
        assert result.stdout == ""


def test_user_mistakes_are_one_line_errors(daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, _, _ = daemons
    assert_one_line_error(cli(alpha.home, "mcp", "serve", "--port", "80", "--"), 2,
                          "command after '--'")
    assert_one_line_error(cli(alpha.home, "mcp", "serve", "--", "no-such-mcp-server"), 2,
                          "no command 'no-such-mcp-server'")
    assert_one_line_error(cli(alpha.home, "mcp", "connect", "nosuchhost:80", input=""), 5)
    assert_one_line_error(cli(short_home(), "mcp", "connect", "beta:80", input=""), 3,
                          "daemon is not running")
    # Nothing serves port 80 there: the hint is 'mcp serve', not the daemon's 'listen'; the
    # exit status is a closed port's, as for every verb.
    result = cli(alpha.home, "mcp", "connect", "beta:80", "--timeout", "5", input="")
    line = assert_one_line_error(result, 9, "serves no MCP server",
                                 "pilotctl mcp serve --port 80 -- COMMAND")
    assert "pilotctl listen" not in line


def test_cli_connect_json_keeps_stdout_for_json_rpc(daemons: tuple[DaemonHandle, ...]) -> None:
    """`mcp connect --json` wrote the CLI's error object on stdout, the MCP client's JSON-RPC
    channel (an audit): its errors go to stderr, as JSON."""
    alpha, beta, _ = daemons
    result = cli(alpha.home, "--json", "mcp", "connect", "nosuchhost:80", input="")
    assert result.returncode == 5 and result.stdout == "", result
    (line,) = result.stderr.splitlines()
    assert json.loads(line)["error"]["exit_code"] == 5
    # a line that does not parse, too (it has not got as far as knowing the command's needs)
    result = cli(alpha.home, "--json", "mcp", "connect", "no-port", input="")
    assert result.returncode == 2 and result.stdout == "", result
    (line,) = result.stderr.splitlines()
    assert json.loads(line)["error"]["type"] == "ConfigError", line
    # the session ends under a waiting request: its answer is JSON-RPC, the reason on stderr
    dies = [sys.executable, "-c", "import sys; sys.stdin.readline(); sys.exit(3)"]
    with serving(beta.home, "--port", "90", "--", *dies):
        result = cli(alpha.home, "--json", "mcp", "connect", "beta:90",
                     input=INITIALIZE.decode())
    assert result.returncode == 1, result
    (answer,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert answer["jsonrpc"] == "2.0" and answer["id"] == 1, answer
    (line,) = result.stderr.splitlines()
    assert "exited with status 3" in json.loads(line)["error"]["message"]


def test_config_bounds_are_checked() -> None:
    with pytest.raises(PilotError, match="peer_timeout"):
        McpConfig(heartbeat_interval=10, peer_timeout=5)
    with pytest.raises(PilotError, match="largest message a tunnel carries"):
        McpConfig(max_message_bytes=2**30)
    assert_one_line_error(cli(None, "mcp", "connect", "beta:80", "--max-message-bytes",
                              str(2**30), input=""), 2, "at most 67108864")
    # only the option that is wrong is named, where one message listed three
    line = assert_one_line_error(cli(None, "mcp", "serve", "--max-message-bytes", "10", "--",
                                     "cat"), 2, "max_message_bytes must be at least 1024, not 10")
    assert "max_sessions" not in line and "stderr_tail_bytes" not in line
    with pytest.raises(PilotError, match=r"^McpConfig.max_sessions must be at least 1, not 0$"):
        McpConfig(max_sessions=0)


class TimeState(TypedDict, total=False):
    tz: str
    now: Any


async def test_mcp_tool_is_a_langgraph_step(servers: Path) -> None:
    from langgraph.graph import END, START, StateGraph

    from pilot_agents.integrations.mcp import McpTool

    config = {"mcpServers": {"time": {"command": server_command(servers, "mcp-server-time"),
                                      "args": ["--local-timezone", "UTC"]}}}
    builder = StateGraph(TimeState)
    builder.add_node("now", McpTool(config["mcpServers"]["time"], "get_current_time",
                                    args_from_state={"timezone": "tz"}, result_key="now"))
    builder.add_edge(START, "now")
    builder.add_edge("now", END)
    graph = builder.compile()
    first = graph.invoke({"tz": "Asia/Tokyo"})
    second = await graph.ainvoke({"tz": "UTC"})
    assert first["now"]["timezone"] == "Asia/Tokyo", first
    assert second["now"]["timezone"] == "UTC", second
    with pytest.raises(PilotError, match="get_current_time"):
        await graph.ainvoke({"tz": "Not/A_Zone"})
    started = [pid for pid in children(os.getpid())
               if b"mcp-server-time" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(started) == 1  # one server for the process, reused by every call
    os.kill(started[0], signal.SIGKILL)  # a server that dies is started again by a later call
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(PilotError):
            assert (await graph.ainvoke({"tz": "UTC"}))["now"]["timezone"] == "UTC"
            break
        assert time.monotonic() < deadline


async def test_mcp_tool_starts_a_server_that_died_idle_again(servers: Path) -> None:
    """Its death was seen only when a call failed on it: the call after a server died between
    calls failed with "Connection closed", where docs/mcp.md says it is started again."""
    from pilot_agents.integrations.mcp import McpTool

    tool = McpTool({"command": server_command(servers, "mcp-server-time"),
                    "args": ["--local-timezone", "Pacific/Auckland"]}, "get_current_time",
                   args_from_state={"timezone": "tz"}, result_key="now", timeout=30)
    assert (await tool.ainvoke({"tz": "UTC"}))["now"]["timezone"] == "UTC"
    (server,) = [pid for pid in children(os.getpid())
                 if b"Pacific/Auckland" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(server, signal.SIGKILL)
    await asyncio.sleep(1)  # dead, between calls
    assert (await tool.ainvoke({"tz": "UTC"}))["now"]["timezone"] == "UTC"  # the first call


async def test_a_server_that_dies_at_start_says_why_in_the_tool_s_error() -> None:
    """The commonest mistake, a setting the server needs and did not get, read only
    'unhandled errors in a TaskGroup (1 sub-exception)'; the reason was in the log alone."""
    from pilot_agents.integrations.mcp import McpTool

    dies = ("import sys; sys.stderr.write('starting\\nKeyError: DB_URL\\n'); sys.exit(3)")
    tool = McpTool({"command": sys.executable, "args": ["-c", dies]}, "query", timeout=20)
    with pytest.raises(McpToolError, match="cannot start the MCP server") as raised:
        await tool.ainvoke({})
    assert "TaskGroup" not in str(raised.value)
    assert str(raised.value).endswith("its stderr ended with: starting / KeyError: DB_URL")


async def test_a_server_that_hangs_at_start_is_started_again(servers: Path,
                                                            tmp_path: Path) -> None:
    """A server that never answered 'initialize' was waited for by every later call too, for
    as long as the process ran: the first start's wait was shared, and never ended."""
    from pilot_agents.integrations.mcp import McpTool

    hung = tmp_path / "hung-once"
    first_hangs = (f"import os, sys, time\nif not os.path.exists({str(hung)!r}):\n"
                   f"    open({str(hung)!r}, 'w').close(); time.sleep(600)\n"
                   f"os.execv({server_command(servers, 'mcp-server-time')!r}, "
                   "['mcp-server-time', '--local-timezone', 'UTC'])")
    tool = McpTool({"command": sys.executable, "args": ["-c", first_hangs]},
                   "get_current_time", args_from_state={"timezone": "tz"}, result_key="now",
                   timeout=3)
    with pytest.raises(PilotError, match=r"took more than 3 s|did not answer 'initialize'"):
        await tool.ainvoke({"tz": "UTC"})
    deadline = time.monotonic() + 20
    while True:  # once the hung start has failed, a call starts the server again
        with contextlib.suppress(PilotError):
            assert (await tool.ainvoke({"tz": "UTC"}))["now"]["timezone"] == "UTC"
            break
        assert time.monotonic() < deadline, "the hung start was never given up"


async def test_silent_and_idle_sessions_end(servers: Path,
                                            daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, beta, _ = daemons
    events: list[SessionEvent] = []
    config = McpConfig(heartbeat_interval=0.3, peer_timeout=1.5, idle_timeout=2.0)
    async with (PilotClient(beta.home) as server_side,
                PilotClient(alpha.home) as client_side):
        server = McpServer(server_side, 86, [server_command(servers, "mcp-server-time")],
                           config=config, on_event=events.append)
        async with running(server):
            # A client that vanishes without a word (its process killed): it opens a session,
            # then sends nothing, not even heartbeats.
            deadline = time.monotonic() + 10
            async with client_side.connect("beta", 86) as conn:
                await conn.send(control(Control.OPEN))
                answer = await conn.receive(timeout=5)
                assert parse_control_untrusted(answer.data) == (Control.READY, "")
                while not any(e.kind == "end" for e in events):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            assert "heard nothing from the client" in events[-1].reason
            assert not server.sessions
            # A live client that sends no JSON-RPC for idle_timeout: ended, and told why.
            async with remote_session("beta", 86, transport=client_side,
                                      config=config) as remote:
                with pytest.raises(McpSessionError, match="idle for 2 s"):
                    await remote.receive()


async def test_a_request_after_the_end_fails_at_once(servers: Path,
                                                    daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, beta, _ = daemons
    with serving(beta.home, "--port", "87", "--",
                 server_command(servers, "mcp-server-time")) as serve:
        async with connect("beta", port=87, home=alpha.home) as session:
            await session.list_tools()
            (server,) = children(serve.pid)
            os.kill(server, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while children(serve.pid):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(1)  # the END has reached this side
            async with asyncio.timeout(10):  # not the answer-less wait it was
                for _ in range(2):
                    with pytest.raises(MCPError, match="exited with status -9"):
                        await session.call_tool("get_current_time", {"timezone": "UTC"})


def group_members(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                state, _, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                if int(group) == pgid and state != "Z":  # a zombie is dead, waiting for its reaper
                    found.append(int(entry.name))
    return found


async def group_ends(pgid: int, within: float) -> None:
    """Every process of group ``pgid`` ends within ``within`` seconds (a killed one takes a
    moment to die: longer on a loaded machine)."""
    deadline = time.monotonic() + within
    while group_members(pgid):
        assert time.monotonic() < deadline, "a process of the server's group outlived it"
        await asyncio.sleep(0.05)


async def test_a_server_s_helpers_end_with_its_session(servers: Path,
                                                      daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, beta, _ = daemons
    # a server that starts a helper of its own, which outlives it unless its group is stopped
    with serving(beta.home, "--port", "88", "--", "sh", "-c", 'sleep 300 & exec "$0"',
                 server_command(servers, "mcp-server-time")) as serve:
        async with connect("beta", port=88, home=alpha.home) as session:
            await session.list_tools()
            (server,) = children(serve.pid)
            assert len(group_members(server)) == 2
        await group_ends(server, 10)


async def test_a_server_s_death_ends_its_session_though_a_helper_lives(
        servers: Path, daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, beta, _ = daemons
    # the helper holds the server's stdout open: its end is not the server's
    with serving(beta.home, "--port", "89", "--", "sh", "-c", 'sleep 300 & exec "$0"',
                 server_command(servers, "mcp-server-time")) as serve:
        async with connect("beta", port=89, home=alpha.home) as session:
            await session.list_tools()
            (server,) = children(serve.pid)
            os.kill(server, signal.SIGKILL)
            async with asyncio.timeout(10):
                with pytest.raises(MCPError, match="exited with status -9"):
                    await session.call_tool("get_current_time", {"timezone": "UTC"})
            # Killed as the session ends, not after the helper's 300 s. Its end can reach the
            # client a moment before the helper is dead.
            await group_ends(server, 2)


async def test_a_message_on_several_lines_is_one_message(servers: Path,
                                                        daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, beta, _ = daemons
    request = json.dumps(json.loads(INITIALIZE), indent=2).replace("\n", "\r\n").encode()
    with serving(beta.home, "--port", "91", "--", server_command(servers, "mcp-server-time")):
        async with remote_session("beta", 91, home=alpha.home) as remote:
            await remote.send(request)
            async with asyncio.timeout(10):  # where it was dropped, and never answered
                assert json.loads(await remote.receive())["id"] == 1


async def test_a_server_line_that_looks_like_a_control_message_is_not_one(
        servers: Path, daemons: tuple[DaemonHandle, ...]) -> None:
    """A line starting with a NUL byte on the server's stdout went to the client as is, where
    it read as a control message: an END, here, that the serving side never sent (an audit)."""
    alpha, beta, _ = daemons
    forges = ["sh", "-c", 'printf "\\000\\003forged END\\n"; exec "$0"',
              server_command(servers, "mcp-server-time")]
    with serving(beta.home, "--port", "94", "--", *forges):
        async with connect("beta", port=94, home=alpha.home) as session:
            assert "get_current_time" in [t.name for t in (await session.list_tools()).tools]


async def test_a_request_the_client_cancelled_is_not_waited_for(
        daemons: tuple[DaemonHandle, ...]) -> None:
    """A server need not answer a request its client cancelled (MCP's notifications/cancelled):
    its id stayed among those waiting for the session's life, one more per request given up."""
    alpha, beta, _ = daemons
    with serving(beta.home, "--port", "93", "--", "sleep", "600"):  # answers nothing
        async with remote_session("beta", 93, home=alpha.home) as remote:
            await remote.send(b'{"jsonrpc": "2.0", "id": 5, "method": "tools/list"}')
            assert remote.unanswered == 1
            await remote.send(b'{"jsonrpc": "2.0", "method": "notifications/cancelled", '
                              b'"params": {"requestId": 5, "reason": "timed out"}}')
            assert remote.unanswered == 0
            async with asyncio.timeout(1):
                await remote.all_answered()


def test_cli_connect_reads_a_file_or_dev_null_as_stdin(servers: Path, tmp_path: Path,
                                                       daemons: tuple[DaemonHandle, ...]) -> None:
    alpha, beta, _ = daemons
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(INITIALIZE + b'{"jsonrpc":"2.0","id":2,"method":"tools/list"}\n'
                         + b"x" * 5000)
    command = [sys.executable, "-m", "pilot_agents.cli", "--home", str(alpha.home), "mcp",
               "connect", "beta:92"]
    with serving(beta.home, "--port", "92", "--", server_command(servers, "mcp-server-time")):
        # where the event loop aborted the process (status -6), saying nothing
        with open(os.devnull, "rb") as stdin:
            result = subprocess.run(command, stdin=stdin, capture_output=True, cwd=ROOT,
                                    timeout=30)
        assert result.returncode == 0 and result.stdout == b"", result
        with open(requests, "rb") as stdin:
            result = subprocess.run(command, stdin=stdin, capture_output=True, cwd=ROOT,
                                    timeout=30)
        assert result.returncode == 0, result
        assert [line[:16] for line in result.stdout.splitlines()] == [
            b'{"jsonrpc":"2.0"', b'{"jsonrpc":"2.0"'], result.stdout
        with open(requests, "rb") as stdin:
            result = subprocess.run([*command, "--max-message-bytes", "4096"], stdin=stdin,
                                    capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert_one_line_error(result, 2, "more than 4096 bytes on stdin")


def test_cli_connect_fails_when_answers_never_come(daemons: tuple[DaemonHandle, ...]) -> None:
    """stdin ended and a request is still unanswered after --drain-timeout: an error saying
    so, where it exited with success and printed nothing."""
    alpha, beta, _ = daemons
    mute = [sys.executable, "-c", "import sys\nfor _ in sys.stdin: pass"]  # answers nothing
    with serving(beta.home, "--port", "93", "--", *mute):
        result = cli(alpha.home, "mcp", "connect", "beta:93", "--drain-timeout", "1",
                     input=INITIALIZE.decode())
    assert_one_line_error(result, 1, "1 request had no answer 1 s after stdin ended")
    assert result.stdout == ""


@contextlib.asynccontextmanager
async def running(server: McpServer) -> AsyncIterator[McpServer]:
    """``server`` serving in a task for the block, which starts once its port is listened on
    (else a client's first session may find the port closed, as it did on a loaded machine)."""
    listening = asyncio.Event()
    task = asyncio.create_task(server.serve(listening.set))
    try:
        await asyncio.wait_for(listening.wait(), 10)
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_mcp_serve_checks_the_share_of_a_peer() -> None:
    """(The bound itself: tests/test_shares.py.)"""
    assert_one_line_error(cli(None, "mcp", "serve", "--max-sessions", "2",
                              "--max-sessions-per-peer", "3", "--", "cat"), 2,
                          "max_sessions_per_peer must be at least 1 and at most "
                          "max_sessions (2), not 3")


async def test_one_peer_cannot_take_every_session(tmp_path: Path) -> None:
    """An MCP server's sessions (max_sessions) went to whoever opened them first: one peer
    opening that many, kept by their heartbeats, had every other peer's session refused for as
    long as it liked. Now each peer has at most max_sessions_per_peer of them; one it ends
    makes room for its next (its process stopped)."""
    config = McpConfig(max_sessions=3, max_sessions_per_peer=2)
    async with (
        server_and_two_clients(tmp_path) as (server, greedy, other),
        running(McpServer(server, 94, ["cat"], config=config)) as mcp,
        contextlib.AsyncExitStack() as stack,
    ):
        held = [await stack.enter_async_context(RemoteSession(greedy, server.node_id, 94, config))
                for _ in range(2)]
        with pytest.raises(McpSessionError, match=r"your node has 2 sessions .* already, as many "
                                                  r"as one node may \(McpConfig.max_sessions_per"):
            async with RemoteSession(greedy, server.node_id, 94, config):
                pass
        await stack.enter_async_context(RemoteSession(other, server.node_id, 94, config))
        assert sorted(key[0] for key in mcp.sessions) == sorted(
            [greedy.node_id] * 2 + [other.node_id])
        await held[0].close()
        async with RemoteSession(greedy, server.node_id, 94, config):  # once the first stopped
            assert len(mcp.sessions) == 3


async def test_a_session_still_stopping_counts_against_max_sessions(
        servers: Path, daemons: tuple[DaemonHandle, ...]) -> None:
    """A client that closes a session and opens the next at once gets no second process while
    the first still stops (max_sessions bounds the processes): the new session waits for that
    stop, or is refused once the serving side's open_timeout has passed."""
    alpha, beta, _ = daemons
    # Ignores SIGTERM and outlives its server: each stop takes the whole 2 x stop_grace.
    slow_to_stop = ["sh", "-c", 'trap "" TERM; "$0"; sleep 30',
                    server_command(servers, "mcp-server-time")]
    async with (PilotClient(beta.home) as server_side,
                PilotClient(alpha.home) as client_side):
        for port, open_timeout in ((95, 30.0), (97, 1.0)):
            events: list[SessionEvent] = []
            config = McpConfig(max_sessions=1, stop_grace=1.5, open_timeout=open_timeout)
            async with running(McpServer(server_side, port, slow_to_stop, config=config,
                                         on_event=events.append)):
                async with remote_session("beta", port, transport=client_side):
                    pass
                if open_timeout > 3:
                    async with remote_session("beta", port, transport=client_side):
                        # where the second process started while the first still ran
                        assert [e.kind for e in events] == ["open", "end", "open"], events
                else:
                    with pytest.raises(McpSessionError,
                                       match=r"all 1 sessions .* \(1 still stopping\)"):
                        async with remote_session("beta", port, transport=client_side):
                            pass
                    assert [e.kind for e in events] == ["open", "refused"], events


async def test_a_request_still_arriving_keeps_its_session(servers: Path, kind: str,
                                                        tmp_path: Path) -> None:
    """A request that takes longer than peer_timeout to cross a slow link is word from the
    client while its bytes arrive (no heartbeat can pass it on its stream), where the serving
    side ended the session as silent and the request was answered with "no such session"."""
    config = McpConfig(heartbeat_interval=0.3, peer_timeout=1.5)
    request = json.loads(INITIALIZE)
    request["params"]["padding"] = "x" * 4_000_000  # 4 s at 1 MB/s
    async with over_slow_link(kind, tmp_path, rate=1_000_000) as pair:
        events: list[SessionEvent] = []
        server = McpServer(pair.server.transport, 96, [server_command(servers, "mcp-server-time")],
                           config=config, on_event=events.append)
        async with running(server):
            async with remote_session(pair.server_name, 96, transport=pair.client.transport,
                                      config=config) as remote:
                started = time.monotonic()
                await remote.send(json.dumps(request).encode())
                async with asyncio.timeout(30):
                    assert json.loads(await remote.receive())["id"] == 1
                assert time.monotonic() - started > config.peer_timeout  # it did take long
            assert [e.kind for e in events] == ["open"], events


def test_a_message_for_a_server_that_has_exited_is_dropped_not_raised() -> None:
    """Its session ends when its exit is seen; a message arriving just before was written to
    the closed pipe, where uvloop raises RuntimeError, and that ended `mcp serve` itself (an
    audit: the next client heard that nothing listened)."""
    async def main() -> None:
        server = McpServer(cast(Any, None), 84, ["true"])
        proc = await asyncio.create_subprocess_exec("true", stdin=asyncio.subprocess.PIPE)
        await proc.wait()
        assert proc.stdin is not None
        while not proc.stdin.is_closing():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # closed, not only closing
        session = _Session(("peer", 1), None, proc, cast(Any, None))
        await server._to_server(session, b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}')

    pilot_agents.run(main())


async def test_a_client_that_reads_nothing_holds_up_no_other_session(tmp_path: Path) -> None:
    """A trusted peer's session to `cat` whose echoes it never reads ends at write_timeout;
    its next message was answered END inline by the loop that reads every session's messages,
    which then waited for ever on that peer's full stream: no other client was served (an
    audit). The END goes from a task of its own, once per stream."""
    async with server_and_two_clients(tmp_path) as (s, hostile, good):
        server = McpServer(s, 9300, ["cat"], config=McpConfig(write_timeout=1, stop_grace=0.5,
                                                             max_message_bytes=2**21))
        serving = asyncio.create_task(server.serve())
        try:
            conn = hostile.connect(s.node_id, 9300)
            await conn.__aenter__()
            await conn.send(control(Control.OPEN))
            await conn.receive(timeout=10)
            line = b'"' + b"x" * (2**20 - 2) + b'"'
            with contextlib.suppress(TimeoutError):  # until its stream is full both ways
                async with asyncio.timeout(10):
                    for _ in range(40):
                        await conn.send(line)
            deadline = time.monotonic() + 20
            while server.sessions or server.stopping:  # write_timeout ended it
                assert time.monotonic() < deadline, "the session did not end"
                await asyncio.sleep(0.1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await conn.send(b'{"jsonrpc": "2.0", "method": "late"}')
                    await conn.send(control(Control.OPEN))  # READY would wait on it, too
            await asyncio.sleep(0.5)
            async with good.connect(s.node_id, 9300) as honest:
                await honest.send(control(Control.OPEN))
                assert parse_control_untrusted((await honest.receive(timeout=10)).data) == (
                    Control.READY, "")
                await honest.send(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}')
                assert json.loads((await honest.receive(timeout=10)).data)["id"] == 1
            await conn.abort()
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)


SERIAL_SERVER = (  # reads its next message once it has answered the last, as many do
    "import json, sys, time\n"
    "for line in sys.stdin:\n"
    "    message = json.loads(line)\n"
    "    if message.get('method') == 'sleep':\n"
    "        time.sleep(message['params']['seconds'])\n"
    "    if 'id' in message:\n"
    "        print(json.dumps({'jsonrpc': '2.0', 'id': message['id'], 'result': {}}), "
    "flush=True)\n")


async def test_a_server_that_reads_nothing_holds_up_only_its_own_session(tmp_path: Path) -> None:
    """A message to a server busy with a long call was written from the loop that reads every
    session's messages, which then waited up to write_timeout for it to be read: every other
    session stalled that long (an audit)."""
    config = McpConfig(write_timeout=4, stop_grace=0.5)
    async with server_and_two_clients(tmp_path) as (s, a, b):
        server = McpServer(s, 9301, [sys.executable, "-c", SERIAL_SERVER], config=config)
        async with (running(server), RemoteSession(a, s.node_id, 9301) as busy,
                    RemoteSession(b, s.node_id, 9301) as other):
            await busy.send(b'{"jsonrpc": "2.0", "id": 1, "method": "sleep", '
                            b'"params": {"seconds": 30}}')
            # more than its stdin's pipe holds: written, it waits for the server to read it
            await busy.send(b'{"jsonrpc": "2.0", "method": "notifications/big", "params": '
                            b'{"pad": "%s"}}' % (b"x" * 2**20))
            worst, until, ping = 0.0, time.monotonic() + 6, 100
            while time.monotonic() < until:
                ping += 1
                sent = time.monotonic()
                await other.send(b'{"jsonrpc": "2.0", "id": %d, "method": "ping"}' % ping)
                async with asyncio.timeout(10):
                    assert json.loads(await other.receive())["id"] == ping
                worst = max(worst, time.monotonic() - sent)
                await asyncio.sleep(0.1)
            assert worst < 2, f"a ping took {worst:.1f} s"
            # and the busy one's session ends at write_timeout, as before, saying why
            with pytest.raises(McpSessionError, match="the MCP server read nothing for 4 s"):
                async with asyncio.timeout(10):
                    await busy.receive()
