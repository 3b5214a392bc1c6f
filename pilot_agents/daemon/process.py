"""Process control: the home's lock and pid file, logging, running in the foreground, starting
detached, stopping.

``pilotctl daemon start`` runs ``python -m pilot_agents.daemon --ready-fd N --options JSON`` in
a new session and waits until that child reports on the pipe N that it is registered and serving
(or why it failed). One daemon per home: it holds an exclusive ``flock``
on ``<home>/daemon.lock`` for its whole life; the kernel drops the lock when the process dies,
however it dies, so a stale pid file or socket from a killed daemon never blocks a restart (the
next daemon removes them). Logs go to ``<home>/daemon.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import ipc
from ..errors import DaemonRunningError, PilotError, PilotTimeoutError
from ..home import check_home
from ..runtime import run
from .dispatch import Reply
from .options import LOG_MAX_BYTES, START_TIMEOUT, STOP_TIMEOUT, DaemonOptions
from .service import Daemon

log = logging.getLogger("pilot_agents.daemon")
EXIT_WAIT = 5.0  # seconds a daemon that closed its ready pipe without a word has to exit

def setup_logging(home: Path, *, to_stderr: bool) -> None:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_home(home)  # before writing to a file someone else may have planted there
    path = home / ipc.LOG_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handler: logging.Handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=LOG_MAX_BYTES, backupCount=2)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if os.environ.get("PILOT_DEBUG") else logging.INFO)
    root.addHandler(handler)
    if to_stderr:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        root.addHandler(console)


def run_foreground(options: DaemonOptions, ready_fd: int | None = None) -> int:
    """Run the daemon in this process until stopped. With ``ready_fd``, write one JSON line to it
    once ready (or failed) and close it. Returns the exit status."""
    failure: list[PilotError] = []

    def ready(result: Reply | PilotError) -> None:
        if isinstance(result, PilotError):
            failure.append(result)
            log.error("failed to start: %s", result)
            line = ipc.error_reply(result)
        else:
            line = {"ok": True, "info": result}
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, (json.dumps(line) + "\n").encode())
                os.close(ready_fd)
        elif not isinstance(result, PilotError):
            print(f"pilot-agents daemon ready: {result['hostname'] or result['node_id']} "
                  f"(pid {result['pid']})", file=sys.stderr, flush=True)

    setup_logging(options.home, to_stderr=ready_fd is None)
    log.info("starting (pid %d): hostname %s, beacon %s, listen %s", os.getpid(),
             options.hostname, options.beacon, options.listen)
    with contextlib.suppress(KeyboardInterrupt):
        run(Daemon(options).run(ready))
    if failure:
        if ready_fd is None:
            raise failure[0]
        return 1
    return 0


def start_detached(options: DaemonOptions, timeout: float = START_TIMEOUT) -> Reply:
    """Start a daemon in the background and return its info once it is ready; raise the
    PilotError that stopped it otherwise."""
    home = options.home
    ipc.endpoint(home)  # a home too long for a socket path fails here, before anything starts
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_home(home)  # before writing to a file someone else may have planted there
    pid = ipc.daemon_pid(home)
    if pid is not None:
        raise DaemonRunningError(
            f"a daemon is already running for {home} (pid {pid}); stop it with "
            "'pilotctl daemon stop'"
        )
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "pilot_agents.daemon", "--ready-fd", str(write_fd),
           "--options", options.to_json()]
    log_path = home / ipc.LOG_NAME
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, pass_fds=(write_fd,),
            start_new_session=True, cwd="/", close_fds=True,
        )
    finally:
        os.close(fd)
        os.close(write_fd)
    try:
        line = _read_line(read_fd, timeout)
    finally:
        os.close(read_fd)
    if not line:
        if line == "":
            # The pipe closed without a word: the child is exiting (a failure its log tells),
            # and may just not be reaped yet.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=EXIT_WAIT)
        if proc.poll() is None:
            proc.terminate()
            if line == "":
                raise PilotError(f"the daemon closed its ready pipe without a word, and did "
                                 f"not exit (stopped it); see {log_path}")
            raise PilotTimeoutError(
                f"the daemon did not become ready within {timeout:g} s (stopped it); "
                f"see {log_path}"
            )
        raise PilotError(
            f"the daemon exited during start (status {proc.returncode}): "
            f"{_last_log_line(log_path)} (see {log_path})"
        )
    try:
        reply = json.loads(line)
    except ValueError:
        raise PilotError(f"the daemon said something unexpected: {line[:200]!r}") from None
    if not reply.get("ok"):
        proc.wait(timeout=10)
        raise ipc.error_from_reply(reply.get("error") or {})
    info: Reply = reply["info"]
    return info


def _read_line(fd: int, timeout: float) -> str | None:
    """The first line written to ``fd``; "" if it closes without one, None if nothing came
    within ``timeout``."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return ""
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def _last_log_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


def stop(home: Path, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop the daemon of ``home``; its pid, or None if none ran. Asks over IPC, then SIGTERM,
    then SIGKILL. A daemon that had to be killed is a PilotTimeoutError, and one that stopped
    but lost the messages no client had read (it could not keep them in the home) a
    PilotError, raised once it is gone."""
    pid = ipc.daemon_pid(home)
    if pid is None:
        return None

    async def ask() -> Reply:
        async with ipc.IpcClient(home) as client:
            return await client.request("stop", wait=min(5.0, timeout))

    lost = None
    try:
        lost = asyncio.run(ask()).get("lost")
    except PilotError:
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = False
    while ipc.daemon_pid(home) is not None:
        if time.monotonic() > deadline:
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                time.sleep(0.2)
            break
        time.sleep(0.05)
    while pid > 0 and time.monotonic() < deadline + 2.0 and process_alive(pid):
        time.sleep(0.02)  # let it finish exiting
    if killed:
        raise PilotTimeoutError(
            f"the daemon (pid {pid}) did not stop within {timeout:g} s of being asked (stuck, "
            f"or stopped with SIGSTOP?): killed it (SIGKILL), so the messages no client had "
            f"read are lost; see {home / ipc.LOG_NAME}")
    if lost is not None:
        raise PilotError(f"the daemon stopped (pid {pid}), but {lost}; see "
                         f"{home / ipc.LOG_NAME}")
    return pid


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]
