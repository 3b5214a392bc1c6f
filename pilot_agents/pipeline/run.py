"""Running a pipeline: one agent (:func:`run_agent`, in this process) or all of them
(:func:`run_pipeline`: a beacon if the file names none, and each agent in a process of its own,
``pilot-agents run FILE --agent NAME``, whose JSON events it reads).

Daemons are started and stopped through the CLI's own ``daemon start``/``daemon stop`` (this
layer does not import the daemon). Every wait is bounded by the file's ``settings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO, cast

from ..errors import (
    AgentFailedError,
    BeaconError,
    ConfigError,
    HomeInUseError,
    PeerUnreachableError,
    PilotError,
    PilotTimeoutError,
    PipelineError,
    UnknownHostError,
)
from ..integrations.langgraph import serve_graph
from ..runtime import interruptible
from ..sdk import Client, daemon_running
from .graph import build_graph
from .load import LoadedPipeline
from .schema import (
    PilotReceiveStep,
    PilotSendStep,
    PublishStep,
    Ready,
    Service,
    StepBase,
    SubscribeStep,
)

Event = dict[str, Any]
Emit = Callable[[Event], None]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
TRUST_POLL = 0.2  # seconds between looks at the trust store while trust becomes mutual
EVENT_LINE_LIMIT = 1 << 20  # bytes of one event line read from an agent process
# Characters of an error an agent's event carries: a step that raises with a huge message (a
# whole document, say) is reported by its beginning and end, not failed for a line too long.
ERROR_TEXT_LIMIT = 16 * 1024
FOLLOW_GRACE = 5.0  # seconds to read an ended agent's last output (its pipes may outlive it)
GROUP_POLL = 0.05  # seconds between looks at whether an ended process's session is empty
STDERR_LINES = 20  # lines of an agent process's stderr kept for its failure's message
STDERR_LOG_BYTES = 8 << 20  # of a process's stderr written to its log; then only its last lines
STDERR_LINE_BYTES = 4096  # of one stderr line kept for a failure's message (its end)


def cli_command(*args: str) -> list[str]:
    """This installation's command line, as a child process."""
    return [sys.executable, "-m", "pilot_agents.cli", *args]


async def _cli(args: list[str], timeout: float) -> tuple[int, str, str]:
    """Run a CLI command; its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *cli_command(*args), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PilotTimeoutError(f"'pilotctl {' '.join(args)}' took over {timeout:g} s") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else "no output"


# -- one agent ----------------------------------------------------------------------------------


@dataclass
class AgentRun:
    """What one agent needs to run in this process."""

    pipeline: LoadedPipeline
    agent: str
    home: Path
    beacon: str | None
    listen: str = "0.0.0.0:0"
    emit: Emit = field(default=lambda event: None)
    # Steps started and not done, by LangGraph task id: their name and start (monotonic); a
    # timeout names them as still running.
    running: dict[str, tuple[str, float]] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return self.pipeline.spec.hostname(self.agent)

    def event(self, event: str, **fields: Any) -> None:
        error = fields.get("error")
        if isinstance(error, str) and len(error) > ERROR_TEXT_LIMIT:
            half = ERROR_TEXT_LIMIT // 2
            fields["error"] = (f"{error[:half]} [... {len(error) - 2 * half} characters left "
                               f"out ...] {error[-half:]}")
        self.emit({"event": event, "agent": self.agent, "time": time.time(), **fields})


@contextlib.asynccontextmanager
async def agent_daemon(run: AgentRun) -> AsyncIterator[bool]:
    """The agent's daemon for the block: the one running for its home, else one started now (and
    stopped at the end). Yields whether it was started here."""
    settings = run.pipeline.spec.settings
    home = str(run.home)
    code, out, err = await _cli(["--home", home, "--json", "daemon", "status"],
                                settings.startup_timeout)
    started = False
    if code == 0:
        info = json.loads(out)
        if info.get("hostname") != run.hostname:
            raise AgentFailedError(
                f"the daemon of {home} runs as {info.get('hostname')!r}, not as "
                f"{run.hostname!r}: give --home a home of its own for this agent")
    else:
        args = ["--home", home, "--json", "daemon", "start", "--hostname", run.hostname,
                "--listen", run.listen]
        ports = run.pipeline.spec.receive_ports(run.agent)
        args += ["--inbox", ",".join(map(str, ports)) if ports else "none"]
        if run.beacon:
            args += ["--beacon", run.beacon]
        try:
            code, out, err = await _cli(args, settings.startup_timeout)
        except BaseException:  # Ctrl-C or a timeout mid-start: the daemon may be up already
            await stop_daemon(run.home, settings.shutdown_timeout)
            raise
        if code != 0:
            raise AgentFailedError(f"{run.agent}: its daemon did not start: {_last_line(err)}")
        info = json.loads(out)
        started = True
    run.event("daemon", node_id=info.get("node_id"), pid=info.get("pid"), started=started,
              home=home)
    try:
        yield started
    finally:
        if started:
            await stop_daemon(run.home, settings.shutdown_timeout)


async def stop_daemon(home: Path, timeout: float) -> None:
    """Stop the daemon of ``home`` if one runs (the CLI's ``daemon stop``)."""
    await asyncio.shield(_cli(["--home", str(home), "--json", "daemon", "stop"], timeout))


async def set_up_trust(run: AgentRun, client: Client) -> None:
    """Trust every peer the file connects this agent with, and wait until each trusts back."""
    spec = run.pipeline.spec
    peers = {spec.hostname(p): p for p in spec.peers_of(run.agent)}
    if not peers:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + spec.settings.startup_timeout
    pending = set(peers)
    while pending:  # a peer not registered yet is unknown to the beacon: ask again
        for host in sorted(pending):
            try:
                await client.trust_add(host, reason=f"pipeline {run.pipeline.name}")
                pending.discard(host)
            except (UnknownHostError, PeerUnreachableError):
                pass
        if pending:
            if loop.time() > deadline:
                raise PilotTimeoutError(
                    f"{', '.join(sorted(pending))} did not come up within "
                    f"{spec.settings.startup_timeout:g} s (settings.startup_timeout)")
            await asyncio.sleep(TRUST_POLL)
    waiting = set(peers)
    while True:
        entries = await client.trust_list()
        mutual = {e.get("hostname") for e in entries if e.get("state") == "mutual"}
        for host in sorted(waiting & mutual):
            run.event("trust", peer=peers[host], hostname=host, state="mutual")
        waiting -= mutual
        if not waiting:
            return
        if loop.time() > deadline:
            raise PilotTimeoutError(
                f"{', '.join(sorted(waiting))} did not trust {run.hostname} back within "
                f"{spec.settings.startup_timeout:g} s (settings.startup_timeout)")
        await asyncio.sleep(TRUST_POLL)


def _size(value: Any) -> int:
    """A received value's size, as its JSON."""
    return len(json.dumps(value, default=str, separators=(",", ":")).encode())


def _step_details(step: StepBase, update: Mapping[str, Any]) -> dict[str, Any]:
    """Where a step's message went (or came from), and its size."""
    if isinstance(step, PilotSendStep):
        receipt = update.get(f"{step.pilot_send.key}_receipt") or {}
        return {"to": receipt.get("to"), "bytes": receipt.get("bytes"),
                "path": receipt.get("path"), "rtt": receipt.get("rtt"),
                "port": receipt.get("port")}
    if isinstance(step, PilotReceiveStep):
        key = step.pilot_receive.key
        return {"from": update.get(f"{key}_from"), "bytes": _size(update.get(key)),
                "port": step.pilot_receive.port}
    if isinstance(step, PublishStep):
        published = update.get(f"{step.publish.key}_published") or {}
        return {"topic": step.publish.topic, "port": step.publish.port,
                "subscribers": published.get("subscribers")}
    if isinstance(step, SubscribeStep):
        key = step.subscribe.key
        return {"from": update.get(f"{key}_from"), "port": step.subscribe.port,
                "topic": update.get(f"{key}_topic"), "bytes": _size(update.get(key))}
    return {}


async def run_graph(run: AgentRun, client: Client) -> dict[str, Any]:
    """The agent's graph, each step's start and end an event; its final state."""
    graph = build_graph(run.pipeline, run.agent, transport=client)
    spec = run.pipeline.spec.agents[run.agent]
    steps = dict(zip(spec.node_ids(), spec.steps, strict=True))
    state: dict[str, Any] = {}
    async for mode, item in graph.astream(dict(spec.input), stream_mode=["tasks", "values"]):
        chunk = cast(dict[str, Any], item)
        if mode == "values":
            state = chunk
            continue
        name = chunk["name"]
        step = steps.get(name)
        if step is None:
            continue
        now = time.monotonic()
        if "input" in chunk:
            run.running[chunk["id"]] = (name, now)
            run.event("step", step=name, kind=step.kind, status="start")
            continue
        duration = now - run.running.pop(chunk["id"], (name, now))[1]
        if chunk.get("error") is not None:
            run.event("step", step=name, kind=step.kind, status="failed", duration=duration,
                      error=str(chunk["error"]) or type(chunk["error"]).__name__)
            continue
        update = (chunk.get("result") or {}).get("__root__") or {}
        run.event("step", step=name, kind=step.kind, status="done", duration=duration,
                  **_step_details(step, update))
    return state


async def run_agent(run: AgentRun) -> int:
    """Run one agent: its daemon, trust, its graph; events through ``run.emit``. The exit
    status: 0, 1 (failed) or 130 (interrupted)."""
    settings = run.pipeline.spec.settings
    begun = time.monotonic()
    run.event("agent", status="starting", hostname=run.hostname, pid=os.getpid())
    status, error = "ok", None
    try:
        async with asyncio.timeout(settings.timeout):
            async with agent_daemon(run), Client(run.home) as client:
                await set_up_trust(run, client)
                serve = run.pipeline.spec.agents[run.agent].serve
                if serve is not None:  # until stopped
                    graph = build_graph(run.pipeline, run.agent, transport=client)
                    run.event("agent", status="serving", port=serve.port)
                    await serve_graph(graph, serve.port, transport=client)
                else:
                    run.event("agent", status="running")
                    state = await run_graph(run, client)
                    run.event("state", keys=sorted(state))
    except TimeoutError as exc:
        status = "failed"
        if isinstance(exc, PilotError):
            error = str(exc)
        else:
            steps = ", ".join(sorted({name for name, _ in run.running.values()}))
            error = (f"did not finish within {settings.timeout:g} s (settings.timeout)"
                     + (f"; still running: step {steps}" if steps else ""))
    except asyncio.CancelledError:
        # A serving agent serves until it is stopped: that is its normal end.
        serving = run.pipeline.spec.agents[run.agent].serve is not None
        status = "ok" if serving else "interrupted"
    except Exception as exc:  # reported as the agent's failure, not raised
        status = "failed"
        error = str(exc) or type(exc).__name__
        if not isinstance(exc, PilotError):
            error = f"{type(exc).__name__}: {error}"
    run.event("done", status=status, error=error, duration=time.monotonic() - begun)
    return {"ok": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_FAILED)


def run_one(run: AgentRun) -> int:
    """:func:`run_agent` on an event loop of its own, Ctrl-C included, in the pipeline file's
    folder (relative paths in the steps' args are relative to it)."""
    spec = run.pipeline.spec
    if run.beacon is None and spec.peers_of(run.agent):
        raise ConfigError(f"{run.agent} talks to {', '.join(spec.peers_of(run.agent))}, which it "
                          "finds through a beacon: give --beacon HOST:PORT (or beacon: in the "
                          "file)")
    os.chdir(run.pipeline.folder)
    loop = asyncio.new_event_loop()
    try:
        code = int(loop.run_until_complete(interruptible(lambda: run_agent(run))()))
    finally:
        # Not asyncio.run: it waits for the executor's threads, and a Python step still
        # running in one (a sleep, a blocking call) would hold the agent after Ctrl-C.
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    if code != EXIT_OK and threading.active_count() > 1:
        # Its daemon is stopped and its end reported; a step that ignores the cancel is
        # abandoned rather than joined at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# -- the whole pipeline -------------------------------------------------------------------------


@dataclass
class AgentProcess:
    name: str
    home: Path
    proc: asyncio.subprocess.Process
    log: Path  # all of its stderr (up to STDERR_LOG_BYTES)
    # The end of its stderr: why it failed when it could not say so in an event.
    stderr: deque[str]
    reader: asyncio.Task[None]  # of its stderr (_keep_stderr)
    status: str = "starting"
    error: str | None = None
    event_too_long: bool = False  # it wrote an event line the run could not read
    daemon_was_running: bool = False  # its home's, which it used: left running at the end


def _tail() -> deque[str]:
    return deque(maxlen=STDERR_LINES)


async def _spawn(args: Sequence[str], log: Path, tail: deque[str],
                 **options: Any) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    """``args`` started in a session of its own, and the task keeping its stderr in ``log``
    and ``tail`` (:func:`_keep_stderr`). Its stderr is a pipe of ours, not asyncio's: a
    program the process starts and leaves running holds the pipe open, and asyncio's pipes
    would keep the process's wait() (on 3.11) and the transport waiting for that program's
    end; ours is closed once read, or once the reading is given up."""
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    reader = asyncio.StreamReader()
    try:
        # Connected before the start: a cancel after it must find the process tracked.
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", 0))
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stderr=write_end,
                start_new_session=True, **options)
        except BaseException:
            transport.close()
            raise
    finally:
        os.close(write_end)
    task = asyncio.create_task(_keep_stderr(reader, log, tail))

    def done(task: asyncio.Task[None]) -> None:
        transport.close()
        # Retrieved, so that asyncio prints no traceback of it: the clean-up reports it.
        _failure("", task)
    task.add_done_callback(done)
    return proc, task


def _failure(what: str, task: asyncio.Task[None]) -> list[str]:
    """How ``task`` (of ``what``) failed, in a line, if it did."""
    if not task.done() or task.cancelled():
        return []
    exc = task.exception()
    return [] if exc is None else [f"{what}: {_said(exc)}"]


def _said(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, PilotError) else f"{type(exc).__name__}: {exc}"


async def start_beacon(data_dir: Path, timeout: float) -> tuple[asyncio.subprocess.Process, str]:
    """A beacon on 127.0.0.1 for this run: its process and its KEY@HOST:PORT."""
    proc = await asyncio.create_subprocess_exec(
        *cli_command("beacon", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout):
            line = (await proc.stdout.readline()).decode()
    except TimeoutError:
        line = ""
    words = line.split()  # listening on HOST:PORT alt-port PORT key NODE_ID
    if len(words) < 7 or words[:2] != ["listening", "on"]:
        await _end(proc, 0.0)
        raise BeaconError(f"the pipeline's beacon did not start (it said {line.strip()!r})")
    return proc, f"{words[6]}@{words[2]}"


@dataclass
class ServiceProcess:
    name: str
    proc: asyncio.subprocess.Process
    log: Path  # all of its stderr (up to STDERR_LOG_BYTES)
    stderr: deque[str]
    reader: asyncio.Task[None]  # of its stderr (_keep_stderr)


async def _answers(ready: Ready) -> bool:
    """Whether the service answers its readiness check now."""
    if ready.http is not None:
        url = urllib.parse.urlsplit(ready.http)
        host, port = url.hostname or "", url.port or 80
    else:
        name, _, number = str(ready.tcp).rpartition(":")
        host, port = name, int(number)
    try:
        async with asyncio.timeout(max(ready.interval, 1.0)):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                if ready.http is None:
                    return True
                writer.write(f"GET {url.path or '/'} HTTP/1.0\r\nHost: {url.netloc}\r\n\r\n"
                             .encode())
                words = (await reader.readline()).split()
                return len(words) >= 2 and words[1].isdigit() and int(words[1]) < 500
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError):
        return False


async def _until_ready(service: ServiceProcess, ready: Ready) -> None:
    """Until ``ready`` answers, or the process exits (PipelineError with its last word)."""
    proc = service.proc
    try:
        async with asyncio.timeout(ready.timeout):
            while proc.returncode is None and not await _answers(ready):
                await asyncio.sleep(ready.interval)
    except TimeoutError:
        check = f"tcp {ready.tcp}" if ready.tcp else f"http {ready.http}"
        raise PipelineError(f"service {service.name} was not ready ({check}) within "
                            f"{ready.timeout:g} s (services.{service.name}.ready.timeout)") \
            from None
    if proc.returncode is not None:
        await _finish_reading(service.reader)
        said = next((line for line in reversed(service.stderr) if line.strip()), "")
        raise PipelineError(f"service {service.name} exited with status {proc.returncode} "
                            f"before it was ready: {said or 'it said nothing'} (all its "
                            f"stderr: {service.log})")


async def start_service(name: str, service: Service, folder: Path, environ: Mapping[str, str],
                        emit: Emit, logs: Path) -> ServiceProcess:
    """Start ``service`` in ``folder`` and wait until it is ready; PipelineError (with the end
    of its stderr; all of it is in ``logs``/service-NAME.log) if it exits or is not ready in
    time."""
    log, tail = logs / f"service-{name}.log", _tail()
    try:
        proc, reader = await _spawn([service.command, *service.args], log, tail, cwd=folder,
                                    env={**environ, **service.env},
                                    stdout=asyncio.subprocess.DEVNULL)
    except OSError as exc:
        raise PipelineError(f"service {name}: cannot start {service.command}: "
                            f"{exc.strerror}") from None
    started = ServiceProcess(name, proc, log, tail, reader)
    emit({"event": "service", "service": name, "status": "starting", "pid": proc.pid,
          "time": time.time()})
    if service.ready is not None:
        try:
            await _until_ready(started, service.ready)
        except BaseException:
            await _stop_service(started, 0.0)
            raise
    emit({"event": "service", "service": name, "status": "ready", "pid": proc.pid,
          "time": time.time()})
    return started


async def _stop_service(service: ServiceProcess, grace: float) -> None:
    await _end(service.proc, grace)
    await _finish_reading(service.reader)


async def _finish_reading(reader: asyncio.Task[None]) -> None:
    """Until an ended process's stderr is read to its end, for FOLLOW_GRACE at most: a
    program that left its session may hold the pipe for ever. Past that the reading stops,
    the pipe closed. (An error of the reading is the clean-up's to report.)"""
    _, late = await asyncio.wait({reader}, timeout=FOLLOW_GRACE)
    for task in late:
        task.cancel()


async def _end(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGINT, then SIGKILL after ``grace`` seconds; then what it left running
    (:func:`_stop_session`)."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        if proc.returncode is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await proc.wait()
    await _stop_session(proc.pid, grace)


async def _stop_session(leader: int, grace: float) -> None:
    """The processes left in the session (and process group) of ``leader``, started with
    start_new_session and ended (reaped): what its steps started and left running, which would
    outlive the run (and hold its stderr open). SIGTERM, then SIGKILL after ``grace`` seconds.

    A pid is not given out again while a group of that id has members, so while no process
    has the leader's pid the group is what ours left; once one has it, the pid was reused, and
    so may be the group's id: not ours to signal."""
    loop = asyncio.get_running_loop()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        deadline = loop.time() + wait
        try:
            if _exists(leader):
                return
            os.killpg(leader, sig)
            while loop.time() < deadline:  # no event says a group emptied: look again
                await asyncio.sleep(GROUP_POLL)
                os.killpg(leader, 0)
        except ProcessLookupError:  # none left
            return
        except PermissionError:  # one became another user's (setuid): not ours to stop
            return


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


async def _follow(agent: AgentProcess, emit: Emit, grace: float) -> None:
    """Pass an agent process's events on, as they come, until it ends; then stop what it left
    running and read the rest of its stderr. An event line too long to read fails the
    agent: it may have been any event, its end included."""
    assert agent.proc.stdout is not None
    async for raw in _lines(agent.proc.stdout):
        if raw is None:
            agent.event_too_long = True
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            continue  # not an event (an error line goes to stderr)
        if not isinstance(event, dict) or "event" not in event:
            continue
        if event["event"] == "done":
            agent.status, agent.error = event.get("status", "failed"), event.get("error")
        if event["event"] == "daemon" and event.get("started") is False:
            agent.daemon_was_running = True  # (one that came up meanwhile is not ours either)
        emit(event)
    await agent.proc.wait()
    await _stop_session(agent.proc.pid, grace)
    await _finish_reading(agent.reader)
    if agent.event_too_long:
        said = f"{agent.error}; and " if agent.status != "ok" and agent.error else ""
        agent.status = "failed"
        agent.error = (f"{said}it wrote an event line of more than {EVENT_LINE_LIMIT} bytes, "
                       "which the run does not read (its progress and end may be among them)")


class _LogFile:
    """A log that, once it cannot be written (its folder removed, the disk full), is given up,
    its ``error`` kept, rather than the reading of what it logs: a pipe no longer read fills up
    and blocks its writer."""

    def __init__(self, path: Path) -> None:
        self.error: OSError | None = None
        self.file: BinaryIO | None = None
        try:
            self.file = path.open("wb")
        except OSError as exc:
            self.error = exc

    def write(self, data: bytes) -> None:
        if self.file is not None:
            try:
                self.file.write(data)
            except OSError as exc:
                self.error = exc
                self.close()

    def close(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                self.error = self.error or exc


async def _keep_stderr(stream: asyncio.StreamReader, log: Path, tail: deque[str]) -> None:
    """All of a process's stderr into ``log``, up to STDERR_LOG_BYTES: past them, how many
    bytes were left out, then its last lines, which ``tail`` keeps as they come (for a failure's
    message). Read in chunks, not lines: a line of any length (a progress bar redrawn in place,
    a blob printed whole) is read on, where a pipe no longer read fills up and blocks its
    writer, the process hung until killed. A log that cannot be written is a PipelineError
    once all is read."""
    written = left_out = 0
    partial = b""  # the line not ended yet (its last STDERR_LINE_BYTES)
    out = _LogFile(log)
    try:
        while chunk := await stream.read(65536):
            room = max(STDERR_LOG_BYTES - written, 0)
            out.write(chunk[:room])
            written += min(len(chunk), room)
            left_out += max(len(chunk) - room, 0)
            *lines, partial = (partial + chunk).split(b"\n")
            partial = partial[-STDERR_LINE_BYTES:]
            tail.extend(line[-STDERR_LINE_BYTES:].decode(errors="replace").rstrip()
                        for line in lines)
        if partial:
            tail.append(partial.decode(errors="replace").rstrip())
        if left_out:
            out.write(f"\n[pilot-agents: {left_out} more bytes of stderr not kept (a log keeps "
                      f"the first {STDERR_LOG_BYTES}); the last lines:]\n".encode())
            out.write("\n".join(tail).encode() + b"\n")
    finally:
        out.close()
    if out.error is not None:
        raise PipelineError(f"its stderr could not be kept in {log}: "
                            f"{out.error.strerror or out.error}")


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes | None]:
    """The stream's lines until its end; None for a line longer than the stream's limit,
    which is skipped, not the end of the reading (a pipe no longer read would fill up and
    block its writer)."""
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # readline has discarded what it read of the long line
            yield None
            continue
        if not line:
            return
        yield line


async def run_pipeline(pipeline: LoadedPipeline, emit: Emit, *, beacon: str | None = None,
                       homes: Path | None = None) -> int:
    """Every agent of ``pipeline``, each in a process of its own (homes under ``homes``, else a
    new temporary directory removed at the end), with a beacon of its own unless ``beacon``
    (or the file) names one. 0 when every agent succeeded, 130 when interrupted, else 1."""
    spec = pipeline.spec
    settings = spec.settings
    beacon = beacon or spec.beacon
    lock = None if homes is None else _lock_homes(homes)
    scratch = Path(tempfile.mkdtemp(prefix="pa-run-", dir="/tmp")) if homes is None else None
    root = homes or scratch
    # Outside the homes, which may be removed at the end: kept unless every agent succeeded.
    # ($TMPDIR's, unlike the homes, whose sockets need a short path.)
    logs = Path(tempfile.mkdtemp(prefix="pa-logs-"))
    assert root is not None
    begun = time.monotonic()

    def serves(agent: str) -> bool:
        return spec.agents[agent].serve is not None

    agents: list[AgentProcess] = []
    services: list[ServiceProcess] = []
    followers: list[asyncio.Task[None]] = []
    beacon_proc: asyncio.subprocess.Process | None = None
    interrupted = False
    failed_first: str | None = None  # the agent whose failure stopped the others
    warnings: list[str] = []  # what went wrong besides the agents, one line each
    # The ports of ${PORT:NAME}, the same in every agent's process and service.
    environ = {**os.environ, **pipeline.port_environ()}
    try:
        if beacon is None:
            beacon_proc, beacon = await start_beacon(root / "beacon", settings.startup_timeout)
        emit({"event": "pipeline", "name": pipeline.name, "file": str(pipeline.path),
              "beacon": beacon, "agents": list(spec.agents), "time": time.time()})
        for name, service in spec.services.items():
            services.append(await start_service(name, service, pipeline.folder, environ, emit,
                                                logs))
        for name in spec.agents:
            home = root / name
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Looked at here, not left to the agent's 'daemon' event: an agent that fails
            # before it (its home's daemon runs as another name) has told nothing, and the
            # daemon it found must be left running all the same.
            was_running = daemon_running(home)
            log, tail = logs / f"{name}.log", _tail()
            proc, reader = await _spawn(
                cli_command("--home", str(home), "--json", "run", str(pipeline.path),
                            "--agent", name, "--beacon", beacon, "--listen", "127.0.0.1:0"),
                log, tail, stdout=asyncio.subprocess.PIPE, limit=EVENT_LINE_LIMIT, env=environ)
            agents.append(AgentProcess(name, home, proc, log, tail, reader,
                                       daemon_was_running=was_running))
        followers = [asyncio.create_task(_follow(a, emit, settings.shutdown_timeout))
                     for a in agents]
        limit = settings.timeout + settings.startup_timeout + settings.shutdown_timeout
        # asyncio.wait, not gather: a cancel (Ctrl-C) leaves the followers reading, so each
        # agent's last events (its own stop) still arrive. Serving agents answer until every
        # other agent has ended, then they are stopped (by _clean_up).
        once = {f: a for a, f in zip(agents, followers, strict=True) if not serves(a.name)}
        failed_first = await _until_done_or_failed(once, limit)
        late = failed_first is None and any(a.proc.returncode is None for a in once.values())
        for agent in agents:
            if agent.proc.returncode is None and late and not serves(agent.name):
                agent.status, agent.error = "failed", f"still running after {limit:g} s"
    except asyncio.CancelledError:
        interrupted = True
    finally:
        try:
            warnings += await asyncio.shield(_clean_up(
                agents, followers, services, beacon_proc, settings.shutdown_timeout, emit))
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            if lock is not None:
                lock.close()
    for agent in agents:
        if agent.status == "starting":  # it ended without saying how
            agent.status = "interrupted" if interrupted else "failed"
        if failed_first is not None and agent.status == "interrupted":
            agent.error = f"stopped because {failed_first} failed"
        if agent.status == "failed" and agent.error is None:
            said = [line for line in agent.stderr if line.strip()]
            agent.error = said[-1].removeprefix("error: ") if said else \
                f"exited with status {agent.proc.returncode}"
    ok = bool(agents) and all(a.status == "ok" for a in agents)
    summary: Event = {
        "event": "summary", "ok": ok, "duration": time.monotonic() - begun, "time": time.time(),
        "interrupted": interrupted,
        "agents": {a.name: {"status": a.status, "error": a.error, "exit_code": a.proc.returncode}
                   for a in agents}}
    if ok:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        summary["logs"] = str(logs)
    if warnings:
        summary["warnings"] = warnings
    emit(summary)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if ok else EXIT_FAILED


def _lock_homes(homes: Path) -> TextIO:
    """``homes`` for this run alone, until the file returned is closed (or this process
    ends): a second run on them would use the first's daemons, and stop them at its end.
    HomeInUseError if another run has them."""
    homes.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = (homes / "run.lock").open("a+")  # (not a hostname label: no agent's home)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise HomeInUseError(f"another pilot-agents run is already running with the homes in "
                             f"{homes} (pid {holder}): wait for its end, or give --homes "
                             "another folder") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


async def _until_done_or_failed(once: dict[asyncio.Task[None], AgentProcess],
                                limit: float) -> str | None:
    """Wait until every run-once agent has ended, or ``limit`` s; the name of the first that
    failed, at once: the others are stopped then (fail fast), as an agent waiting for what a
    failed one would have sent would only wait out its own timeout."""
    pending = set(once)
    deadline = asyncio.get_running_loop().time() + limit
    while pending:
        left = deadline - asyncio.get_running_loop().time()
        done, pending = await asyncio.wait(pending, timeout=max(left, 0.0),
                                           return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return None
        for task in done:
            if once[task].status != "ok":
                return once[task].name
    return None


async def _clean_up(agents: list[AgentProcess], followers: list[asyncio.Task[None]],
                    services: list[ServiceProcess], beacon: asyncio.subprocess.Process | None,
                    grace: float, emit: Emit) -> list[str]:
    """Every agent process ended (each stops its own daemon on SIGINT) and its last events
    read, any daemon one left behind stopped (not one that ran before the run, which it used
    and leaves running), then the services, then the beacon. Each of them is done whatever
    failed before it (which would leave the rest running); what failed is returned, one line
    each."""
    problems: list[str] = []

    async def each(what: str, action: Awaitable[object]) -> None:
        try:
            await action
        except Exception as exc:
            problems.append(f"{what}: {_said(exc)}")

    await asyncio.gather(*(each(f"stopping agent {a.name}", _end(a.proc, grace))
                           for a in agents))
    if followers:
        _, late = await asyncio.wait(followers, timeout=FOLLOW_GRACE)
        for task in late:
            task.cancel()
        for agent, task in zip(agents, followers, strict=True):
            problems += _failure(f"following agent {agent.name}", task)
    await asyncio.gather(*(each(f"stopping the daemon of {a.name}", _stop_left(a.home, grace))
                           for a in agents if not a.daemon_was_running))
    await asyncio.gather(*(each(f"stopping service {s.name}", _stop_service(s, grace))
                           for s in services))
    for service in services:
        emit({"event": "service", "service": service.name, "status": "stopped",
              "exit_code": service.proc.returncode, "time": time.time()})
    if beacon is not None:
        await each("stopping the beacon", _end(beacon, grace))
    for agent in agents:
        problems += _failure(f"agent {agent.name}", agent.reader)
    for service in services:
        problems += _failure(f"service {service.name}", service.reader)
    return problems


async def _stop_left(home: Path, timeout: float) -> None:
    with contextlib.suppress(PilotError):
        await stop_daemon(home, timeout)
