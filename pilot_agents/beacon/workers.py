"""Several beacon processes on one port: ``pilot-agents beacon --workers N``.

One Python process answers on one core; a beacon with N workers answers on N. The supervisor
(this module, the process the operator starts) binds N UDP sockets to the one address with
``SO_REUSEPORT`` and hands one to each worker process (a plain ``pilot-agents beacon`` run on an
inherited socket). The kernel picks a socket by hashing the datagram's addresses, so each node's
packets always reach the same worker, and the worker keeps that node's state (its keepalive key,
its rate limits) in memory as a single beacon does.

The supervisor keeps its copy of every socket and never reads them. So the group of sockets,
and with it which worker each node lands on, does not change when a worker dies: the restarted
worker takes over the same socket (and the datagrams queued on it). Its nodes re-register on
its first answer, as after a beacon restart. A worker that dies more than ``MAX_RESTARTS`` times
within ``RESTART_WINDOW`` seconds stops the beacon with an error rather than leaving part of the
nodes unanswered.

The workers share one beacon id, key and store: a Redis store (SQLite keeps live registrations
in one process's memory, where the other workers can't see them). What one worker doesn't
hold, it reads from the store (:mod:`.server`, "sibling workers").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError, PilotError
from ..net.io.udp import open_socket

log = logging.getLogger("pilot_agents.beacon")

READY_TIMEOUT = 30.0  # seconds a worker may take to open its store and print its ready line
STOP_TIMEOUT = 10.0  # seconds a worker may take to stop before it is killed
MAX_RESTARTS = 5  # restarts of one worker within RESTART_WINDOW before the beacon gives up
RESTART_WINDOW = 60.0


def bind_group(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets sharing ``(host, port)`` (port 0: one the kernel picks for all)."""
    first = open_socket(host, port, reuse_port=True)
    group = [first]
    try:
        port = first.getsockname()[1]
        group += [open_socket(host, port, reuse_port=True) for _ in range(count - 1)]
    except OSError:
        for sock in group:
            sock.close()
        raise
    return group


class WorkerFailedError(PilotError):
    """A worker kept dying: the beacon stops rather than answer for part of its nodes."""


@dataclass
class _Worker:
    index: int
    fds: tuple[int, ...]  # its main socket, then its alt socket if any
    process: asyncio.subprocess.Process | None = None
    deaths: list[float] = field(default_factory=list)  # when it died unasked (monotonic)


class Supervisor:
    """Starts the workers, restarts one that dies, stops them all on ``stop()``."""

    def __init__(self, argv: Sequence[str], sockets: list[socket.socket],
                 alt_sockets: list[socket.socket] | None) -> None:
        self._argv = list(argv)  # the worker's command line, without the socket options
        self._sockets = sockets + (alt_sockets or [])
        self._workers = [
            _Worker(i, (sock.fileno(),) + ((alt_sockets[i].fileno(),) if alt_sockets else ()))
            for i, sock in enumerate(sockets)
        ]
        self._stopping = False

    async def _spawn(self, worker: _Worker) -> str:
        """Start ``worker``; its ready line. ConfigError if it exits or hangs before it."""
        command = [
            sys.executable, "-m", "pilot_agents.beacon.service", *self._argv,
            "--worker", f"{worker.index}:{','.join(map(str, worker.fds))}",
        ]
        process = await asyncio.create_subprocess_exec(
            *command, pass_fds=worker.fds, stdout=asyncio.subprocess.PIPE, stdin=None
        )
        worker.process = process
        assert process.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                line = (await process.stdout.readline()).decode().strip()
        except TimeoutError:
            line = ""
        if not line.startswith("listening on "):
            # Its own error went to the shared stderr already.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            code = await process.wait()
            raise ConfigError(f"worker {worker.index} did not start (exit status {code})")
        return line

    async def run(self, stop: asyncio.Event, ready: Callable[[str], object]) -> None:
        """Run the workers until ``stop`` is set; PilotError if one can't be kept running.
        ``ready`` gets the workers' ready line (the same for all: one address, one key) once
        every one is ready."""
        try:
            lines = [await self._spawn(worker) for worker in self._workers]
            ready(lines[0])
            await self._watch(stop)
        finally:
            await self._stop_all()

    async def _watch(self, stop: asyncio.Event) -> None:
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                exits = {
                    asyncio.ensure_future(w.process.wait()): w
                    for w in self._workers
                    if w.process is not None
                }
                done, _ = await asyncio.wait(
                    {stopped, *exits}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in exits:
                    if task not in done:
                        task.cancel()
                if stopped in done:
                    return
                for task in done:
                    await self._died(exits[task], task.result())
        finally:
            stopped.cancel()

    async def _died(self, worker: _Worker, code: int) -> None:
        while True:
            now = time.monotonic()
            worker.deaths = [t for t in worker.deaths if t > now - RESTART_WINDOW] + [now]
            if len(worker.deaths) > MAX_RESTARTS:
                raise WorkerFailedError(
                    f"worker {worker.index} died {len(worker.deaths)} times within "
                    f"{RESTART_WINDOW:.0f} s (last exit status {code}): stopping the beacon; "
                    "its log lines above say why"
                )
            log.error("worker %d exited with status %d: restarting it", worker.index, code)
            try:
                await self._spawn(worker)
                return
            except ConfigError:  # it died again before it was ready: one more death
                assert worker.process is not None
                code = worker.process.returncode or 0

    async def _stop_all(self) -> None:
        running = [w.process for w in self._workers
                   if w.process is not None and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for sock in self._sockets:
            sock.close()


def require_shared_store(store: str | None, workers: int) -> None:
    if workers > 1 and not (store or "").startswith(("redis://", "rediss://")):
        raise ConfigError(
            f"--workers {workers} needs --store redis://HOST:PORT/DB: the workers share the "
            "nodes' live registrations through it, and SQLite keeps them in one process's "
            "memory (docs/beacon.md, Workers)"
        )
