"""`pilot-agents run`: the example end to end (a real beacon, three agents in processes, each
with its daemon), its numbers checked against the dataset; --json events; a failing agent;
Ctrl-C leaves no daemon; --agent runs one agent of the file."""

from __future__ import annotations

import contextlib
import csv
import email
import email.message
import email.policy
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, assert_one_line_error, cli, short_home, stop_daemons
from tests.mcp_servers import server_command, servers_fixture  # noqa: F401

EXAMPLE = ROOT / "examples/pipeline-basic"
FULL_EXAMPLE = ROOT / "examples/pipeline"
CMD = [sys.executable, "-m", "pilot_agents.cli"]


def expected_totals(path: Path) -> dict[str, dict[str, float]]:
    """The dataset's sales by quarter and region, computed here independently of steps.py."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    with path.open() as f:
        for row in csv.DictReader(f):
            q = f"Q{(int(row['date'].split('-')[1]) + 2) // 3}"
            out[q][row["region"]] += int(row["units"]) * float(row["unit_price"])
    return {q: dict(r) for q, r in out.items()}


def alive(pid: int, wait: float = 5.0) -> bool:
    """Whether ``pid`` still runs ``wait`` seconds from now at the latest (a zombie does not)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_logs_left(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The stderr logs a failed run keeps are of no use once its test is over. The runs of the
    test keep them in a $TMPDIR of its own, removed then: what appeared in /tmp meanwhile may
    be another process's run, still going."""
    folder = short_home("pa-test-tmp-")
    monkeypatch.setenv("TMPDIR", str(folder))
    yield
    shutil.rmtree(folder, ignore_errors=True)


def events_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def daemon_pids(events: list[dict[str, Any]]) -> list[int]:
    return [e["pid"] for e in events if e["event"] == "daemon"]


def check_report(folder: Path) -> None:
    report = json.loads((folder / "report.json").read_text())
    expected = expected_totals(folder / "sales.csv")
    assert set(report["by_quarter_region"]) == {"Q1", "Q2", "Q3", "Q4"}
    for q, regions in expected.items():
        assert report["by_quarter_region"][q] == pytest.approx(regions, abs=0.01)
        assert report["by_quarter"][q] == pytest.approx(sum(regions.values()), abs=0.05)
    q1, q2 = sum(expected["Q1"].values()), sum(expected["Q2"].values())
    assert report["growth_percent"]["Q2"] == pytest.approx(100 * (q2 / q1 - 1), abs=0.06)
    markdown = (folder / "report.md").read_text()
    assert f"{sum(expected['Q4'].values()):,.2f}" in markdown
    assert report["source"] == "scraper"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("report.*", "__pycache__"))
    return folder


def test_example_end_to_end_with_json_events(example: Path) -> None:
    result = subprocess.run([*CMD, "--json", "run", str(example / "pipeline.yaml")],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr + result.stdout
    events = events_of(result.stdout)
    assert len(events) == len(result.stdout.splitlines())  # nothing but JSON lines
    summary = events[-1]
    assert summary["event"] == "summary" and summary["ok"], summary
    assert {n: a["status"] for n, a in summary["agents"].items()} == {
        "scraper": "ok", "analyzer": "ok", "reporter": "ok"}
    sends = [e for e in events if e["event"] == "step" and e["kind"] == "pilot_send"
             and e["status"] == "done"]
    assert {(e["agent"], e["to"]) for e in sends} == {("scraper", "analyzer"),
                                                       ("analyzer", "reporter")}
    for e in sends:
        assert e["bytes"] > 0 and e["path"] in ("direct", "relay")
    csv_bytes = (example / "sales.csv").stat().st_size
    assert next(e["bytes"] for e in sends if e["agent"] == "scraper") > csv_bytes
    trusts = {(e["agent"], e["peer"]) for e in events if e["event"] == "trust"}
    assert trusts == {("scraper", "analyzer"), ("analyzer", "scraper"),
                      ("analyzer", "reporter"), ("reporter", "analyzer")}
    check_report(example)
    pids = daemon_pids(events)
    assert len(pids) == 3 and not any(alive(pid) for pid in pids)


def test_the_full_example_with_third_party_mcp_servers(tmp_path: Path, servers: Path) -> None:
    """The README's first command: services (an HTTP server, an SMTP sink, a chat webhook)
    around three agents whose steps call mcp-server-fetch, mcp-alchemy and mcp-email-server,
    each from its own venv (and the example's chat webhook server); the report's numbers
    (computed in SQL) checked against the dataset, the mail and the chat post read back from
    the sinks."""
    folder = tmp_path / "example"
    shutil.copytree(FULL_EXAMPLE, folder, ignore=shutil.ignore_patterns(
        "report.*", "chart.png", "sales.db", "mail", "chat.jsonl", "__pycache__"))
    begun = time.monotonic()
    result = subprocess.run([*CMD, "--json", "run", str(folder / "pipeline.yaml")],
                            capture_output=True, text=True, timeout=240, cwd=ROOT,
                            env={**os.environ, "MCP_SERVERS": str(servers)})
    took = time.monotonic() - begun
    assert result.returncode == 0, result.stderr + result.stdout
    events = events_of(result.stdout)
    assert events[-1]["ok"], events[-1]
    services = [(e["service"], e["status"]) for e in events if e["event"] == "service"]
    names = ("web", "mail", "chat")
    assert services == [(n, s) for n in names for s in ("starting", "ready")] + \
        [(n, "stopped") for n in names]
    pids = [e["pid"] for e in events if e["event"] == "service" and e["status"] == "ready"]
    assert not any(alive(pid) for pid in pids + daemon_pids(events))
    mcp_steps = {(e["agent"], e["step"]) for e in events if e["event"] == "step"
                 and e["kind"] == "mcp" and e["status"] == "done"}
    assert mcp_steps == {("scraper", "fetch"), ("analyzer", "drop"), ("analyzer", "create"),
                         ("analyzer", "load"), ("analyzer", "by_region"),
                         ("analyzer", "growth"), ("reporter", "email"), ("reporter", "chat")}
    check_report(folder)
    report = json.loads((folder / "report.json").read_text())
    assert report["rows"] == 3000
    expected = expected_totals(folder / "sales.csv")
    quarters = [sum(expected[q].values()) for q in ("Q1", "Q2", "Q3", "Q4")]
    for q, before, now in zip(("Q2", "Q3", "Q4"), quarters, quarters[1:], strict=False):
        assert report["growth_percent"][q] == pytest.approx(100 * (now / before - 1), abs=0.06)
    assert (folder / "chart.png").read_bytes().startswith(b"\x89PNG")
    assert "![Sales by quarter and region](chart.png)" in (folder / "report.md").read_text()
    with sqlite3.connect(folder / "sales.db") as db:
        assert db.execute("SELECT COUNT(*) FROM sales").fetchone() == (3000,)
    mails = list((folder / "mail" / "new").iterdir())
    assert len(mails) == 1
    mail = email.message_from_bytes(mails[0].read_bytes(), policy=email.policy.default)
    assert mail["To"] == "sales-team@example.test" and "Q4 best" in mail["Subject"]
    assert isinstance(mail, email.message.EmailMessage)
    body = mail.get_body(("plain",))
    assert body is not None and f"{quarters[3]:,.2f}" in body.get_content()
    attached = [part.get_filename() for part in mail.iter_attachments()]
    assert attached == ["chart.png"]
    posts = [json.loads(line) for line in (folder / "chat.jsonl").read_text().splitlines()]
    assert len(posts) == 1 and posts[0]["path"] == "/hooks/sales"
    assert f"{sum(quarters):,.2f}" in posts[0]["text"]
    assert took < 90, f"the example took {took:.1f} s"


def test_a_service_that_dies_before_it_is_ready_stops_the_run(tmp_path: Path) -> None:
    """Its last stderr line is the run's one-line error; the services already up are stopped."""
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        services:
          good:
            command: ${PYTHON}
            args: [-m, http.server, "${PORT:good}", --bind, 127.0.0.1]
            ready: {http: "http://127.0.0.1:${PORT:good}/"}
          bad:
            command: ${PYTHON}
            args: [-c, "import sys; sys.exit('no config file')"]
            ready: {tcp: "127.0.0.1:${PORT:bad}"}
        agents:
          a: {steps: [{python: "m:f"}]}
        """))
    result = subprocess.run([*CMD, "--json", "run", str(tmp_path / "p.yaml")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert_one_line_error(result, 2, "service bad exited with status 1 before it was ready: "
                          "no config file")
    events = events_of(result.stdout)
    good = next(e["pid"] for e in events if e.get("event") == "service"
                and e["status"] == "ready")
    assert not alive(good)
    assert not any(e.get("event") == "agent" for e in events)


def test_plain_output_and_a_failing_agent(tmp_path: Path) -> None:
    (tmp_path / "boom.py").write_text(textwrap.dedent("""\
        import time
        def fine(state):
            return {"fine": True}
        def fail(state):
            time.sleep(5)  # after "ok" ended: a failure stops the agents still running
            raise ValueError("no data")
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        agents:
          ok:
            steps: [{python: "boom:fine"}]
          broken:
            steps: [{id: crunch, python: "boom:fail"}]
        """))
    result = subprocess.run([*CMD, "run", str(tmp_path / "p.yaml")], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "[broken] crunch (python) failed: no data" in result.stdout
    assert "pipeline FAILED" in result.stdout
    assert "broken: failed: ValueError: no data" in result.stdout
    assert "  ok: ok" in result.stdout


def test_a_pipeline_past_its_timeout_names_the_step_still_running(tmp_path: Path) -> None:
    """It said only 'did not finish within 3 s': which of the agent's steps hung was left to
    guess."""
    (tmp_path / "slow.py").write_text(textwrap.dedent("""\
        import time
        def fine(state):
            return {"fine": True}
        def hang(state):
            time.sleep(60)
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        settings: {timeout: 3}
        agents:
          a:
            steps: [{id: first, python: "slow:fine"}, {id: stuck, python: "slow:hang"}]
        """))
    result = subprocess.run([*CMD, "run", str(tmp_path / "p.yaml")], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("a: failed: did not finish within 3 s (settings.timeout); still running: step "
            "stuck") in result.stdout, result.stdout


def test_the_first_agent_that_fails_stops_the_others(tmp_path: Path) -> None:
    """An agent waiting for what a failed one would have sent is stopped at once, where it
    waited out its own timeout (300 s here)."""
    (tmp_path / "boom.py").write_text("def fail(state):\n    raise ValueError('no data')\n")
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        agents:
          broken:
            steps: [{python: "boom:fail"}, {pilot_send: {to: waiter, key: x}}]
          waiter:
            steps: [{pilot_receive: {key: x, timeout: 300}}]
        """))
    begun = time.monotonic()
    result = subprocess.run([*CMD, "--json", "run", str(tmp_path / "p.yaml")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - begun < 60
    summary = events_of(result.stdout)[-1]
    assert summary["agents"]["broken"]["status"] == "failed"
    assert summary["agents"]["waiter"] == {
        "status": "interrupted", "error": "stopped because broken failed",
        "exit_code": summary["agents"]["waiter"]["exit_code"]}
    assert not summary["interrupted"]


def test_a_step_that_prints_does_not_break_the_events(tmp_path: Path) -> None:
    """A step's print (with no newline at that) and a program it starts write to stdout, where
    the agent's events are, read as JSON lines by the run (or by the user of --agent --json)."""
    (tmp_path / "chatty.py").write_text(textwrap.dedent("""\
        import subprocess
        def talk(state):
            print("half done", end="")
            return {"x": 1}
        def child(state):
            subprocess.run(["printf", "from a child"], check=True)
            return {"y": 2}
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        agents:
          a:
            steps: [{id: talk, python: "chatty:talk"}, {id: child, python: "chatty:child"}]
        """))
    whole = [*CMD, "--json", "run", str(tmp_path / "p.yaml")]
    home = short_home()
    try:
        for args in (whole, [*CMD, "--home", str(home), *whole[3:], "--agent", "a"]):
            result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert result.returncode == 0, result.stdout + result.stderr
            events = events_of(result.stdout)
            assert len(events) == len(result.stdout.splitlines()), result.stdout
            done = [e["step"] for e in events if e["event"] == "step" and e["status"] == "done"]
            assert done == ["talk", "child"]
            assert next(e for e in events if e["event"] == "state")["keys"] == ["x", "y"]
    finally:
        stop_daemons(home)


def test_a_step_writing_a_huge_line_to_stderr_is_not_blocked(tmp_path: Path) -> None:
    """5 MB on stderr with no newline, more than a line the run reads: the run keeps reading
    the agent's stderr (else the agent blocks on the full pipe until settings.timeout)."""
    (tmp_path / "loud.py").write_text(textwrap.dedent("""\
        import sys
        def shout(state):
            for _ in range(50):
                sys.stderr.write("." * 100_000)
            return {"x": 1}
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        settings: {timeout: 60}
        agents:
          a: {steps: [{python: "loud:shout"}]}
        """))
    begun = time.monotonic()
    result = subprocess.run([*CMD, "--json", "run", str(tmp_path / "p.yaml")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert events_of(result.stdout)[-1]["ok"]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - begun < 40


def test_a_reader_that_goes_away_leaves_nothing_running(tmp_path: Path) -> None:
    """`run --json | head -N`, or a closed terminal: the run's output fails mid-run; it still
    stops its service, its agent's daemon and its beacon."""
    (tmp_path / "slow.py").write_text(textwrap.dedent("""\
        import time
        def nap(state):
            time.sleep(2)
            return {"x": 1}
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        services:
          web:
            command: ${PYTHON}
            args: [-m, http.server, "${PORT:web}", --bind, 127.0.0.1]
            ready: {tcp: "127.0.0.1:${PORT:web}"}
        agents:
          a: {steps: [{python: "slow:nap"}]}
        """))
    proc = subprocess.Popen([*CMD, "--json", "run", str(tmp_path / "p.yaml")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    events: list[dict[str, Any]] = []
    while not events or events[-1]["event"] != "daemon":
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        events.append(json.loads(line))
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err, err
    run_dir = str(Path(events[-1]["home"]).parent)  # the beacon's data is there too
    service = next(e["pid"] for e in events if e["event"] == "service")
    assert not alive(service) and not alive(events[-1]["pid"])
    assert not [p for p in Path("/proc").glob("[0-9]*")
                if run_dir.encode() in _cmdline(p) and alive(int(p.name), 0)]


@pytest.mark.parametrize("then", ["return {'x': 1}", "raise ValueError('gave up')"],
                         ids=["ok", "failed"])
def test_a_program_a_step_leaves_running_ends_with_its_agent(tmp_path: Path, then: str) -> None:
    """A step that starts a program in the background (which inherits the agent's stderr) and
    ends: the run waited for the end of that pipe, the program's, until its own deadline,
    printed asyncio's "Exception ignored ... Event loop is closed" and left the program
    running. The run ends with its agent, and the rest of the agent's session is stopped."""
    (tmp_path / "bg.py").write_text(textwrap.dedent(f"""\
        import subprocess
        def start(state):
            child = subprocess.Popen(["sleep", "300"])
            with open("child.pid", "w") as f:
                f.write(str(child.pid))
            {then}
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        settings: {timeout: 20, startup_timeout: 20, shutdown_timeout: 3}
        agents:
          a: {steps: [{python: "bg:start"}]}
        """))
    begun = time.monotonic()
    result = subprocess.run([*CMD, "--json", "run", str(tmp_path / "p.yaml")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    took = time.monotonic() - begun
    child = int((tmp_path / "child.pid").read_text())
    try:
        assert result.returncode == (0 if then.startswith("return") else 1), result.stderr
        assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, \
            result.stderr
        assert took < 15, f"the run took {took:.1f} s"  # its deadline: 43 s
        assert not alive(child)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_failure_while_cleaning_up_does_not_skip_the_rest(tmp_path: Path) -> None:
    """The run's logs folder removed under it (a cleaner of /tmp, say): the stderr of a
    service started then could not be kept, and its error ended the clean-up there, a
    traceback and exit 1 on Ctrl-C, the beacon left running and the homes not removed. Now
    each step of the clean-up is done; what failed is a warning line of the summary."""
    (tmp_path / "remover.py").write_text(textwrap.dedent("""\
        import contextlib, os, shutil, socket, sys, time
        fds = f"/proc/{os.getppid()}/fd"  # the run's, one of them its log of this service
        for fd in os.listdir(fds):
            with contextlib.suppress(OSError):
                log = os.readlink(f"{fds}/{fd}")
                if log.endswith("/service-remover.log"):
                    shutil.rmtree(os.path.dirname(log))
        server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
        time.sleep(300)
        """))
    (tmp_path / "slow.py").write_text("import time\ndef nap(state):\n    time.sleep(300)\n")
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        services:
          remover:
            command: ${PYTHON}
            args: [remover.py, "${PORT:remover}"]
            ready: {tcp: "127.0.0.1:${PORT:remover}"}
          web:
            command: ${PYTHON}
            args: [-m, http.server, "${PORT:web}", --bind, 127.0.0.1]
            ready: {http: "http://127.0.0.1:${PORT:web}/"}
        agents:
          a: {steps: [{id: nap, python: "slow:nap"}]}
        """))
    proc = subprocess.Popen([*CMD, "--json", "run", str(tmp_path / "p.yaml")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    events: list[dict[str, Any]] = []
    while not events or events[-1].get("event") != "step":
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=60)
        events.append(json.loads(line))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    events += events_of(out)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    summary = events[-1]
    assert summary["event"] == "summary" and summary["interrupted"], summary
    assert [w.split(": its stderr could not be kept in ")[0] for w in summary["warnings"]] \
        == ["agent a", "service web"], summary["warnings"]
    assert all(w.endswith("/service-web.log: No such file or directory")
               or w.endswith("/a.log: No such file or directory") for w in summary["warnings"])
    assert [e["service"] for e in events if e.get("status") == "stopped"] == ["remover", "web"]
    run_dir = Path(next(e["home"] for e in events if e["event"] == "daemon")).parent
    assert not run_dir.exists()  # the homes, the beacon's data among them
    assert not [p for p in Path("/proc").glob("[0-9]*")
                if str(run_dir).encode() in _cmdline(p) and alive(int(p.name), 0)]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP],  # or the terminal closed
                         ids=["SIGINT", "SIGHUP"])
def test_ctrl_c_stops_every_agent_and_daemon(tmp_path: Path, signum: int) -> None:
    (tmp_path / "slow.py").write_text(textwrap.dedent("""\
        import time
        def nap(state, seconds):
            time.sleep(seconds)
            return {"x": "late"}
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        settings: {shutdown_timeout: 10}
        agents:
          waiter:
            steps: [{pilot_receive: {key: x, timeout: 300}}]
          sender:
            steps:
              - {python: "slow:nap", args: {seconds: 300}}
              - {pilot_send: {to: waiter, key: x}}
              - {pilot_send: {to: idle, key: x, port: 1002}}
          idle:
            steps: [{pilot_receive: {key: y, port: 1002, timeout: 300}}]
        """))
    proc = subprocess.Popen([*CMD, "--json", "run", str(tmp_path / "p.yaml")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    events: list[dict[str, Any]] = []
    waiting: set[str] = set()
    deadline = time.monotonic() + 120
    while waiting != {"waiter", "idle", "sender"} and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        events.append(json.loads(line))
        if events[-1]["event"] == "step" and events[-1]["status"] == "start":
            waiting.add(events[-1]["agent"])
    assert waiting == {"waiter", "idle", "sender"}, events
    interrupted_at = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    # Each agent stopped by itself, before the 10 s after which it would have been killed.
    assert time.monotonic() - interrupted_at < 10
    events += events_of(out)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    summary = events[-1]
    assert summary["event"] == "summary" and summary["interrupted"]
    assert {a["status"] for a in summary["agents"].values()} == {"interrupted"}
    assert {e["agent"] for e in events if e["event"] == "done"
            and e["status"] == "interrupted"} == {"waiter", "idle", "sender"}
    pids = daemon_pids(events)
    assert len(pids) == 3
    assert not any(alive(pid) for pid in pids)


def test_agent_mode_runs_one_agent_each(example: Path) -> None:
    """The same file over three "machines": a beacon, and `run --agent` once per agent with a
    home of its own."""
    beacon_dir = Path(short_home("pa-beacon-"))
    beacon = subprocess.Popen([*CMD, "beacon", "--listen", "127.0.0.1:0", "--data-dir",
                               str(beacon_dir)], stdout=subprocess.PIPE, text=True)
    homes = [short_home() for _ in range(3)]
    try:
        assert beacon.stdout is not None
        words = beacon.stdout.readline().split()
        address = f"{words[6]}@{words[2]}"
        agents = [subprocess.Popen(
            [*CMD, "--home", str(home), "--json", "run", str(example / "pipeline.yaml"),
             "--agent", name, "--beacon", address, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for home, name in zip(homes, ("reporter", "analyzer", "scraper"), strict=True)]
        results = [p.communicate(timeout=180) for p in agents]
        for proc, (out, err) in zip(agents, results, strict=True):
            assert proc.returncode == 0, err + out
            done = events_of(out)[-1]
            assert done["event"] == "done" and done["status"] == "ok", done
        check_report(example)
        for home in homes:  # each agent stopped the daemon it started
            assert not (home / "daemon.pid").exists() or not alive(
                int((home / "daemon.pid").read_text().split()[0]))
    finally:
        beacon.send_signal(signal.SIGINT)
        beacon.wait(10)
        stop_daemons(*homes)
        shutil.rmtree(beacon_dir, ignore_errors=True)


def test_homes_are_one_run_s_at_a_time(tmp_path: Path) -> None:
    """Two runs on the same --homes: the second used the first's daemons and stopped them at
    its end, failing both. It is refused now; and a daemon that ran in a home before a run is
    used and left running, as with --agent."""
    (tmp_path / "slow.py").write_text(textwrap.dedent("""\
        import time
        def nap(state):
            time.sleep(4)
            return {"x": 1}
        """))
    (tmp_path / "p.yaml").write_text("agents:\n  a: {steps: [{python: 'slow:nap'}]}\n")
    homes = short_home("pa-homes-")
    run = [*CMD, "--json", "run", str(tmp_path / "p.yaml"), "--homes", str(homes)]
    beacon_dir = short_home("pa-beacon-")
    beacon = subprocess.Popen([*CMD, "beacon", "--listen", "127.0.0.1:0", "--data-dir",
                               str(beacon_dir)], stdout=subprocess.PIPE, text=True)
    try:
        first = subprocess.Popen(run, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        assert first.stdout is not None
        while (line := first.stdout.readline()) and json.loads(line).get("event") != "step":
            pass
        second = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert_one_line_error(second, 4, "another pilot-agents run is already running with the "
                              f"homes in {homes}", f"(pid {first.pid})")
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err + out

        assert beacon.stdout is not None
        words = beacon.stdout.readline().split()
        address = f"{words[6]}@{words[2]}"
        daemon = cli(homes / "a", "--json", "daemon", "start", "--hostname", "a", "--beacon",
                     address, "--listen", "127.0.0.1:0")
        assert daemon.returncode == 0, daemon.stderr
        again = subprocess.run([*run, "--beacon", address], capture_output=True, text=True,
                               timeout=60, cwd=ROOT)
        assert again.returncode == 0, again.stderr + again.stdout
        used = next(e for e in events_of(again.stdout) if e["event"] == "daemon")
        assert used["started"] is False and used["pid"] == json.loads(daemon.stdout)["pid"]
        assert alive(used["pid"], 0)
    finally:
        stop_daemons(homes / "a")
        beacon.send_signal(signal.SIGINT)
        beacon.wait(10)
        shutil.rmtree(homes, ignore_errors=True)
        shutil.rmtree(beacon_dir, ignore_errors=True)


def test_a_daemon_that_ran_before_is_left_running_by_an_agent_that_fails_first(
        tmp_path: Path) -> None:
    """The run knew of a daemon that ran before it only from the agent's 'daemon' event: an
    agent that failed before (its home's daemon runs as another name) told nothing, and the
    clean-up stopped the user's daemon."""
    (tmp_path / "s.py").write_text("def f(state):\n    return {'x': 1}\n")
    (tmp_path / "p.yaml").write_text("agents:\n  a: {steps: [{python: 's:f'}]}\n")
    homes = short_home("pa-homes-")
    try:
        daemon = cli(homes / "a", "--json", "daemon", "start", "--hostname", "zed", "--listen",
                     "127.0.0.1:0")
        assert daemon.returncode == 0, daemon.stderr
        run = subprocess.run([*CMD, "--json", "run", str(tmp_path / "p.yaml"), "--homes",
                              str(homes)], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert run.returncode == 1, run.stderr + run.stdout
        assert "runs as 'zed', not as 'a'" in run.stdout
        assert alive(json.loads(daemon.stdout)["pid"], 0)
    finally:
        stop_daemons(homes / "a")
        shutil.rmtree(homes, ignore_errors=True)


def test_agent_mode_needs_a_beacon_and_a_known_agent(example: Path) -> None:
    home = short_home()
    try:
        no_beacon = subprocess.run(
            [*CMD, "--home", str(home), "run", str(example / "pipeline.yaml"), "--agent",
             "scraper"], capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "PILOT_BEACON"})
        assert no_beacon.returncode == 2 and "--beacon" in no_beacon.stderr
        unknown = subprocess.run(
            [*CMD, "--home", str(home), "run", str(example / "pipeline.yaml"), "--agent", "x"],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert unknown.returncode == 2 and "no agent 'x'" in unknown.stderr
    finally:
        stop_daemons(home)


def test_a_serving_agent_answers_pilot_requests(tmp_path: Path) -> None:
    """An agent with `serve:` answers each request with a run of its graph, and is stopped (as
    a success) once the agents that run once have ended."""
    (tmp_path / "calc.py").write_text(textwrap.dedent("""\
        def total(state):
            return {"sum": sum(state["numbers"])}
        def keep(state):
            with open("answer.txt", "w") as f:  # the agent runs in the pipeline's folder
                f.write(str(state["reply"]["sum"]))
            return {"answer": state["reply"]["sum"]}
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        agents:
          calculator:
            serve: {port: 2001}
            steps: [{python: "calc:total"}]
          client:
            input: {question: {numbers: [3, 4, 5]}}
            steps:
              - {id: ask, pilot_request: {to: calculator, port: 2001, key: question,
                                          result_key: reply}}
              - {python: "calc:keep"}
        """))
    result = subprocess.run([*CMD, "--json", "run", str(tmp_path / "p.yaml")],
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    events = events_of(result.stdout)
    assert {n: a["status"] for n, a in events[-1]["agents"].items()} == {
        "calculator": "ok", "client": "ok"}
    assert any(e["event"] == "agent" and e["status"] == "serving" for e in events)
    state = next(e for e in events if e["event"] == "state" and e["agent"] == "client")
    assert "answer" in state["keys"]
    assert (tmp_path / "answer.txt").read_text() == "12"
    assert any(e["event"] == "step" and e["step"] == "ask" and e["status"] == "done"
               for e in events)
    assert not any(alive(pid) for pid in daemon_pids(events))


def test_on_a_terminal_progress_is_a_live_table(tmp_path: Path) -> None:
    import pty

    (tmp_path / "hello.py").write_text("def hi(state):\n    return {'hi': 1}\n")
    (tmp_path / "p.yaml").write_text("agents:\n  solo:\n    steps: [{python: 'hello:hi'}]\n")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*CMD, "run", str(tmp_path / "p.yaml")], stdout=follower,
                            stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "TERM": "xterm"})
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    text = output.decode(errors="replace")
    assert "┏" in text and "│ solo" in text and "\x1b[" in text  # rich draws a table
    assert "pipeline ok" in text and "solo: ok" in text


def test_an_mcp_step_calls_a_third_party_server(tmp_path: Path, servers: Path) -> None:
    """An `mcp` step starts the agent's stdio MCP server (mcp-server-time from PyPI, in its own
    venv) and puts the tool's structured result in state, constant args merged with state's."""
    (tmp_path / "keep.py").write_text(textwrap.dedent("""\
        import json
        def keep(state):
            with open("now.json", "w") as f:
                json.dump(state["now"], f)
            return {}
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""\
        agents:
          clock:
            mcp_servers:
              time: {{command: {server_command(servers, "mcp-server-time")}}}
            input: {{zone: Europe/Paris}}
            steps:
              - {{id: ask, mcp: {{server: time, tool: convert_time,
                                 args: {{source_timezone: UTC, time: "12:00"}},
                                 args_from_state: {{target_timezone: zone}},
                                 result_key: now}}}}
              - {{python: "keep:keep"}}
        """))
    result = subprocess.run([*CMD, "--json", "run", str(tmp_path / "p.yaml")],
                            capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    now = json.loads((tmp_path / "now.json").read_text())
    assert now["source"]["timezone"] == "UTC"
    assert now["target"]["timezone"] == "Europe/Paris"
    assert now["target"]["datetime"].split("T")[1].startswith(("13:00", "14:00"))


def test_a_failed_agent_s_whole_stderr_is_kept_in_a_log(tmp_path: Path) -> None:
    """Every line a failed agent wrote to stderr is in its log, whose path the summary gives
    (where the failure message kept only the last line), and the log is bounded: past
    STDERR_LOG_BYTES it says how much it left out, then gives the last lines."""
    from pilot_agents.pipeline.run import STDERR_LOG_BYTES

    (tmp_path / "noisy.py").write_text(textwrap.dedent(f"""\
        import sys
        def fail(state):
            for n in range(100):
                print(f"line {{n}}", file=sys.stderr)
            sys.stderr.write(("." * 99 + "\\n") * ({STDERR_LOG_BYTES} // 100 + 1000))
            print("last words", file=sys.stderr)
            raise ValueError("no data")
        def fine(state):
            print("all well", file=sys.stderr)
            return {{"x": 1}}
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        agents:
          broken: {steps: [{python: "noisy:fail"}]}
          ok: {steps: [{python: "noisy:fine"}]}
        """))
    result = subprocess.run([*CMD, "--json", "run", str(tmp_path / "p.yaml")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    summary = events_of(result.stdout)[-1]
    logs = Path(summary["logs"])
    try:
        broken = (logs / "broken.log").read_text()
        assert broken.startswith("".join(f"line {n}\n" for n in range(100)))
        assert len(broken) < STDERR_LOG_BYTES + 10_000
        assert "bytes of stderr not kept" in broken
        assert broken.rstrip().endswith("last words")
        assert (logs / "ok.log").read_text() == "all well\n"
        # the plain output names the log too
        result = subprocess.run([*CMD, "run", str(tmp_path / "p.yaml")],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 1
        named = Path(result.stdout.rsplit("stderr of each agent: ", 1)[1].split()[0])
        assert named.name == "NAME.log"
        assert (named.parent / "broken.log").read_text() == broken
        shutil.rmtree(named.parent)
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def one_step_failure_events(tmp_path: Path, name: str, source: str) -> list[dict[str, Any]]:
    """Run a pipeline of one agent whose one step is ``name``, defined by ``source`` in
    ``name``.py, which fails; its events."""
    (tmp_path / f"{name}.py").write_text(source)
    (tmp_path / "p.yaml").write_text(
        f'agents:\n  a: {{steps: [{{id: {name}, python: "{name}:{name}"}}]}}\n')
    result = subprocess.run([*CMD, "--json", "run", str(tmp_path / "p.yaml")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr
    events = events_of(result.stdout)
    assert events[-1]["agents"]["a"]["status"] == "failed"
    return events


def one_step_failure(tmp_path: Path, name: str, source: str) -> str:
    """The error the failure of :func:`one_step_failure_events`'s step is summarised with."""
    return str(one_step_failure_events(tmp_path, name, source)[-1]["agents"]["a"]["error"])


def test_an_event_line_too_long_to_read_fails_its_agent(tmp_path: Path) -> None:
    """An event line of more than EVENT_LINE_LIMIT (a state of 100,000 keys, listed in the
    `state` event) is not read: the agent fails saying so, where the line was dropped without a
    word and the run passed."""
    error = one_step_failure(tmp_path, "wide", "def wide(state):\n"
                             "    return {f'key_{n:06d}': n for n in range(100_000)}\n")
    assert "event line of more than 1048576 bytes" in error


def test_a_step_raising_a_huge_message_fails_with_its_beginning_and_end(tmp_path: Path) -> None:
    """An exception carrying a whole document: its event line went over EVENT_LINE_LIMIT, and
    the agent failed with "event line too long" instead of what the step said."""
    error = one_step_failure(tmp_path, "huge", "def huge(state):\n"
                             "    raise ValueError('start ' + 'x' * 2_000_000 + ' end')\n")
    assert "ValueError: start xxx" in error and "characters left out" in error
    assert error.endswith("xxx end") and len(error) < 20_000


@pytest.mark.parametrize("source, said", [
    ("import sys\ndef leave(state):\n    sys.exit(3)\n", "SystemExit: 3"),
    ("async def leave(state):\n    raise KeyboardInterrupt\n", "KeyboardInterrupt"),
], ids=["sys.exit", "async-KeyboardInterrupt"])
def test_a_step_that_exits_fails_naming_itself(tmp_path: Path, source: str, said: str) -> None:
    """SystemExit and KeyboardInterrupt are not Exceptions: asyncio raised them out of the
    agent's event loop, which failed with "RuntimeError: athrow(): asynchronous generator is
    already running" and no event of the step's failure."""
    events = one_step_failure_events(tmp_path, "leave", source)
    error = f"step leave: leave:leave raised {said}"
    assert [(e["step"], e["status"], e.get("error")) for e in events if e["event"] == "step"] \
        == [("leave", "start", None), ("leave", "failed", error)]
    assert events[-1]["agents"]["a"]["error"] == error


async def test_the_clean_up_signals_no_group_whose_leader_pid_is_taken_again() -> None:
    """What a reaped agent left in its session is stopped by signalling its group, named by
    the agent's pid; by the time of the clean-up that pid may be another process's, leading
    a session of its own, which the run killed. Here a session leader stands for that one."""
    from pilot_agents.pipeline.run import _stop_session

    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        await _stop_session(other.pid, 0.5)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
