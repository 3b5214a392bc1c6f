"""The home directory's safety rules, and the lock that lets one node at a time run on a home.

A home holds the node's secret key, its trust store and its state, so we treat it as ssh treats
``~/.ssh`` (see docs/security.md, "home directory and trust store"):

- the home must belong to the user running us and must not be writable by group or others,
  or another user could replace what we load from it (fix: ``chmod 700 HOME``);
- every file we load from it (``identity.key``, ``trust.json``, ``static-peers.json``,
  ``beacons.json``) must belong to us and must not be writable by group or others
  (fix: ``chmod 600 FILE``); ``identity.key`` must not be readable by them either
  (identity.py checks that).

The directories above the home are not checked.

One node per home: a running Node holds an exclusive ``flock`` on ``<home>/node.lock`` (the
daemon's Node too), so a second one on the same home (an embedded Node while the daemon runs, or
the daemon while an embedded Node runs) is refused instead of taking over the beacon registration
and the tunnels of the first. The daemon itself holds ``<home>/daemon.lock`` for its whole life
and writes its pid to ``<home>/daemon.pid`` once it serves; :func:`hold_daemon_lock` lets a tool
edit the home while no daemon runs.

A leaf module: it imports nothing of the package but errors, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DaemonRunningError, HomeInUseError, UnsafeHomeError

NODE_LOCK = "node.lock"
DAEMON_LOCK = "daemon.lock"
DAEMON_PID = "daemon.pid"
DAEMON_LOCK_WAIT = 0.5  # seconds to wait for another brief holder of the daemon's lock


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _writers(mode: int) -> str:
    who = [name for bit, name in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "other users"))
           if mode & bit]
    return " and ".join(who)


def check_home(home: Path) -> None:
    """Refuse a home that another user owns or can write to (FileNotFoundError if absent)."""
    info = os.stat(home)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeHomeError(f"the home {home} is not a directory: use another --home")
    me = os.geteuid()
    if info.st_uid != me:
        raise UnsafeHomeError(
            f"the home {home} belongs to {_user(info.st_uid)}, not to you ({_user(me)}); its "
            f"owner could change your keys and trust store. Use a home of your own (--home DIR "
            f"or PILOT_HOME), or if it is yours run: chown {_user(me)} {home}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeHomeError(
            f"the home {home} is writable by {_writers(mode)} (mode {mode:04o}), who could "
            f"replace your keys and trust store; run: chmod 700 {home}"
        )


def check_private_file(path: Path, info: os.stat_result) -> None:
    """Refuse a file of the home that another user owns or can write to."""
    me = os.geteuid()
    if info.st_uid != me:
        raise UnsafeHomeError(
            f"{path} belongs to {_user(info.st_uid)}, not to you ({_user(me)}), so it was not "
            f"written by pilot-agents for you: check it, then remove it or run: "
            f"chown {_user(me)} {path}"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeHomeError(
            f"{path} is writable by {_writers(mode)} (mode {mode:04o}), who could have changed "
            f"it: check it, then run: chmod 600 {path}"
        )


def read_private_text(path: Path) -> str:
    """The text of a file of the home, after :func:`check_private_file` on the file we opened
    (FileNotFoundError if absent)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "r", encoding="utf-8") as file:
        check_private_file(path, os.fstat(fd))
        return file.read()


def write_private(path: Path, text: str) -> None:
    """Replace a file of the home with ``text``, atomically and durably, mode 0600: a crash
    leaves the old file or the new one, never half of one, and nobody else can read it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o600)  # a leftover tmp of ours may have had other bits
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable: until the directory itself is synced, a
    crash can lose the new name even though the file's data was synced."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NodeLock:
    """The exclusive lock a running Node holds on its home: ``<home>/node.lock``, which holds
    the pid of its holder."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the home (if not held yet), or raise DaemonRunningError / HomeInUseError naming
        who has it."""
        if self._fd is not None:
            return
        fd = os.open(self.home / NODE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise _in_use(self.home, int(holder) if holder.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the lock
            self._fd = None


def _in_use(home: Path, holder: int | None) -> HomeInUseError:
    try:
        daemon = int((home / DAEMON_PID).read_text().strip())
    except (OSError, ValueError):
        daemon = None
    if holder is not None and holder == daemon:
        return DaemonRunningError(
            f"a daemon runs on {home} (pid {holder}); use pilot_agents.Client({str(home)!r}) "
            f"or another home"
        )
    who = f"pid {holder}" if holder is not None else "another process"
    return HomeInUseError(
        f"another pilot-agents node ({who}) runs on {home}: stop it or use another home (if it "
        f"is the daemon, use pilot_agents.Client({str(home)!r}))"
    )


@contextlib.contextmanager
def hold_daemon_lock(home: Path) -> Iterator[bool]:
    """Hold the daemon's lock of ``home`` (so that no daemon starts meanwhile) and yield True;
    yield False if a daemon runs (it holds the lock and has written its pid file). Another
    holder without a pid file (a status check, another tool) holds it only for a moment: we
    wait up to ``DAEMON_LOCK_WAIT`` for it."""
    fd = os.open(home / DAEMON_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        yield lock_within(fd, DAEMON_LOCK_WAIT, give_up=(home / DAEMON_PID).exists)
    finally:
        os.close(fd)  # releases the lock


def lock_within(fd: int, wait: float, give_up: Callable[[], bool] | None = None) -> bool:
    """Take an exclusive lock on ``fd``, trying again for up to ``wait`` seconds (a status
    check holds a lock only for a moment) unless ``give_up()`` says its holder is there to
    stay; whether we have it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if (give_up is not None and give_up()) or time.monotonic() > deadline:
                return False
            time.sleep(0.02)
