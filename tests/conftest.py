"""Shared fixtures for the daemon, CLI, IPC and SDK tests: real daemons in their own processes.

Markers:
- ``beacon``: needs the beacon integrated into Node (``Node(beacon=..., hostname=...)``,
  ``resolve``, ``send_trust_request``, ``on_trust_request``). Such a test fails with a message
  naming what is missing until then; deselect with ``-m "not beacon"``.
- ``node_api``: needs the Node introspection API (``peers()``, ``ping()``, ``info()``); fails with
  a clear message until it exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "beacon: needs the beacon integrated into Node (fails clearly until then)")
    config.addinivalue_line(
        "markers", "node_api: needs Node.peers()/ping()/info() (fails clearly until then)")
    rebuild_stale_native_modules()


def rebuild_stale_native_modules() -> None:
    """Compiled protocol modules older than their .py would shadow it (Python imports the .so):
    rebuild them before any test imports pilot_agents, or stop the run saying why."""
    native = runpy.run_path(str(ROOT / "pilot_agents/net/_native.py"))  # not an import: see there
    if not (stale := native["stale"]()):
        return
    print(f"rebuilding the compiled {', '.join(stale)} ({native['REBUILD']})", file=sys.stderr)
    result = subprocess.run([ROOT / native["REBUILD"]], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable})
    if result.returncode != 0:
        pytest.exit(f"{native['REBUILD']} failed, so the compiled modules are stale:\n"
                    f"{result.stdout}{result.stderr}", returncode=pytest.ExitCode.USAGE_ERROR)


def require_node_api(*names: str) -> None:
    """Fail (not skip) with a clear message if the Node lacks any of ``names``; a name with
    '=' is a constructor keyword (``"beacon="``)."""
    import inspect

    from pilot_agents.node.node import Node

    params = inspect.signature(Node.__init__).parameters
    missing = [
        n for n in names
        if (n.endswith("=") and n[:-1] not in params)
        or (not n.endswith("=") and not hasattr(Node, n))
    ]
    if missing:
        pytest.fail(
            "waiting on the Node integration: Node lacks "
            + ", ".join(f"{m[:-1]}= (constructor keyword)" if m.endswith("=") else f"{m}()"
                        for m in missing),
            pytrace=False,
        )


def short_home(prefix: str = "pa-") -> Path:
    """A home with a short path: a ZeroMQ ipc:// path must fit in a unix socket address."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def cli(home: Path | None, *args: str, input: str | None = None, timeout: float = 30.0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pilot_agents.cli [--home HOME] ARGS`` and return its result."""
    cmd = [sys.executable, "-m", "pilot_agents.cli"]
    if home is not None:
        cmd += ["--home", str(home)]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PILOT_DEBUG", None)
    return subprocess.run(cmd + list(args), input=input, capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def cli_many(calls: list[tuple[Path | None, ...]], timeout: float = 60.0,
             ) -> list[subprocess.CompletedProcess[str]]:
    """Run several CLI commands ``(home, *args)`` at once; their results in order."""
    env = {k: v for k, v in os.environ.items() if k != "PILOT_DEBUG"}
    procs = []
    for home, *args in calls:
        cmd = [sys.executable, "-m", "pilot_agents.cli"]
        if home is not None:
            cmd += ["--home", str(home)]
        procs.append((cmd + [str(a) for a in args],
                      subprocess.Popen(cmd + [str(a) for a in args], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)))
    results = []
    for cmd, proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def cli_json(home: Path | None, *args: str, **kw: object) -> dict[str, object]:
    result = cli(home, "--json", *args, **kw)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int,
                          *fragments: str) -> str:
    """The CLI failed the way a user should see it: one line on stderr, the exit code, no
    traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@dataclass
class DaemonHandle:
    home: Path
    hostname: str
    node_id: str
    endpoint: str  # HOST:PORT of its UDP socket
    pid: int


def start_daemon(home: Path, hostname: str, *extra: str) -> DaemonHandle:
    result = cli(home, "--json", "daemon", "start", "--hostname", hostname,
                 "--listen", "127.0.0.1:0", *extra)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    return DaemonHandle(home, hostname, info["node_id"], info["endpoints"][0], info["pid"])


def start_daemons(*specs: tuple[Path, str], extra: tuple[str, ...] = ()) -> list[DaemonHandle]:
    """Start several daemons at once (through the CLI, in parallel)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pilot_agents.cli", "--home", str(home), "--json", "daemon",
             "start", "--hostname", name, "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for home, name in specs
    ]
    handles = []
    for proc, (home, name) in zip(procs, specs, strict=True):
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        info = json.loads(out)
        handles.append(DaemonHandle(home, name, info["node_id"], info["endpoints"][0],
                                    info["pid"]))
    return handles


def ipc_call(home: Path, wait: float = 20.0, **request: object) -> dict[str, object]:
    """One raw request over ZeroMQ (REQ), as any program could send it."""
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(wait * 1000))
    sock.connect(f"ipc://{home}/daemon.sock")
    try:
        sock.send(json.dumps(request).encode())
        return json.loads(sock.recv())  # type: ignore[no-any-return]
    finally:
        sock.close()


def peer_up(a: DaemonHandle, b: DaemonHandle) -> None:
    """Make a and b static peers of each other (named) and trust each other by node id."""
    for me, other in ((a, b), (b, a)):
        assert ipc_call(me.home, cmd="add_peer", node_id=other.node_id, address=other.endpoint,
                        hostname=other.hostname)["ok"]
        assert ipc_call(me.home, cmd="trust_add", target=other.node_id)["ok"]


@contextlib.contextmanager
def named_pair() -> Iterator[tuple[DaemonHandle, DaemonHandle]]:
    """Two daemons (alpha, beta) on 127.0.0.1, each a static peer of the other under its name,
    trusting each other by node id; stopped and their homes removed afterwards."""
    homes = [short_home(), short_home()]
    try:
        a, b = start_daemons((homes[0], "alpha"), (homes[1], "beta"))
        peer_up(a, b)
        yield a, b
    finally:
        stop_daemons(*homes)


@pytest.fixture(scope="module")
def daemon_pair() -> Iterator[tuple[DaemonHandle, DaemonHandle]]:
    """:func:`named_pair`, shared by a module's tests."""
    with named_pair() as pair:
        yield pair


def stop_daemons(*homes: Path) -> None:
    """Stop the daemons of ``homes`` at once (raw IPC 'stop', then SIGKILL if need be) and
    delete the homes."""
    import time

    from pilot_agents import ipc

    running = {home: ipc.daemon_pid(home) for home in homes}
    for home, pid in running.items():
        if pid is not None:
            try:
                ipc_call(home, wait=3.0, cmd="stop")
            except Exception:
                if pid > 0:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for home, pid in running.items():
        while pid is not None and ipc.daemon_pid(home) is not None:
            if time.monotonic() > deadline:
                if pid > 0:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def fresh_home() -> Iterator[Path]:
    home = short_home()
    try:
        yield home
    finally:
        stop_daemons(home)


@pytest.fixture
def fresh_pair() -> Iterator[tuple[DaemonHandle, DaemonHandle]]:
    """Two new daemons (gamma, delta) that know nothing of each other."""
    homes = [short_home(), short_home()]
    try:
        yield tuple(start_daemons((homes[0], "gamma"), (homes[1], "delta")))  # type: ignore[misc]
    finally:
        stop_daemons(*homes)
