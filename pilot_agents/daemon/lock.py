"""The home's lock: the daemon holds it for its whole life, so one daemon runs per home."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from .. import ipc
from ..errors import DaemonRunningError
from ..home import lock_within

log = logging.getLogger("pilot_agents.daemon")


class HomeLock:
    """The exclusive lock that makes this process the home's daemon, and the files that say so."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._fd: int | None = None

    def acquire(self) -> None:
        path = self.home / ipc.LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if not lock_within(fd, 0.5):  # a status check may hold a shared lock for a moment
            os.close(fd)
            raise DaemonRunningError(
                f"a daemon is already running for {self.home} (pid {ipc.daemon_pid(self.home)}); "
                "stop it with 'pilotctl daemon stop'"
            )
        self._fd = fd
        for stale in (ipc.SOCKET_NAME, ipc.PUB_SOCKET_NAME, ipc.PID_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self.home / stale).unlink()
                log.info("removed stale %s", stale)

    def write_pid(self) -> None:
        (self.home / ipc.PID_NAME).write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        if self._fd is None:
            return
        for name in (ipc.SOCKET_NAME, ipc.PUB_SOCKET_NAME, ipc.PID_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self.home / name).unlink()
        os.close(self._fd)  # releases the lock
        self._fd = None
