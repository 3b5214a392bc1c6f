"""The home directory: refused when another user owns it or can write to it, as are planted files
in it; one node per home (an embedded Node never takes over a running daemon's home)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pilot_agents.beacon import service
from pilot_agents.errors import (
    BeaconError,
    ConfigError,
    DaemonRunningError,
    HomeInUseError,
    IdentityError,
    UnsafeHomeError,
)
from pilot_agents.home import write_private
from pilot_agents.identity import Identity
from pilot_agents.node.node import Node
from pilot_agents.trust import TrustStore
from tests.conftest import assert_one_line_error, cli, ipc_call, short_home, start_daemon

MALLORY = Identity.generate()
NOBODY = 65534


@pytest.fixture
def home() -> Iterator[Path]:
    from tests.conftest import stop_daemons

    path = short_home()
    try:
        yield path
    finally:
        path.chmod(0o700)
        stop_daemons(path)


def plant_trust(home: Path, mode: int) -> Path:
    """A trust.json someone else wrote: Mallory's key, trusted both ways."""
    path = home / "trust.json"
    path.write_text(json.dumps({"version": 1, "entries": [{
        "node_id": MALLORY.node_id, "hostname": "friend", "state": "mutual",
        "added_at": time.time(), "updated_at": time.time()}]}))
    path.chmod(mode)
    return path


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")


# -- the home and the files in it ----------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
async def test_home_writable_by_others_is_refused(home: Path, mode: int) -> None:
    home.chmod(mode)
    with pytest.raises(UnsafeHomeError, match=f"run: chmod 700 {home}"):
        Node(home, "127.0.0.1:0")
    with pytest.raises(UnsafeHomeError, match="chmod 700"):
        TrustStore.load(home)
    assert not (home / "identity.key").exists()


async def test_home_readable_by_others_is_accepted(home: Path) -> None:
    home.chmod(0o755)  # as ssh: only writing matters for the directory
    async with Node(home, "127.0.0.1:0"):
        pass


async def test_home_owned_by_another_user_is_refused(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)
    with pytest.raises(UnsafeHomeError, match=r"belongs to .*not to you"):
        Node(home, "127.0.0.1:0")
    with pytest.raises(UnsafeHomeError, match="belongs to"):
        TrustStore.load(home)


@pytest.mark.parametrize("foreground", [False, True])
def test_daemon_refuses_a_home_writable_by_others(home: Path, foreground: bool) -> None:
    home.chmod(0o777)
    planted = home / "daemon.log"
    planted.symlink_to(home / "victim")  # the log would be written through it
    result = cli(home, "daemon", "start", "--hostname", "gamma", "--listen", "127.0.0.1:0",
                 *(["--foreground"] if foreground else []), timeout=20)
    assert_one_line_error(result, 2, f"chmod 700 {home}")
    assert not (home / "victim").exists()


def test_daemon_refuses_a_home_owned_by_another_user(home: Path) -> None:
    need_root()
    os.chown(home, NOBODY, -1)
    result = cli(home, "daemon", "start", "--hostname", "gamma", "--listen", "127.0.0.1:0")
    assert_one_line_error(result, 2, "belongs to", "not to you")


@pytest.mark.parametrize("mode", [0o666, 0o620])
def test_planted_writable_trust_json_is_refused(home: Path, mode: int) -> None:
    path = plant_trust(home, mode)
    with pytest.raises(UnsafeHomeError, match=f"run: chmod 600 {path}"):
        TrustStore.load(home)
    result = cli(home, "daemon", "start", "--hostname", "gamma", "--listen", "127.0.0.1:0")
    assert_one_line_error(result, 2, f"chmod 600 {path}")


def test_trust_json_of_another_user_is_refused(home: Path) -> None:
    need_root()
    path = plant_trust(home, 0o600)
    os.chown(path, NOBODY, -1)
    with pytest.raises(UnsafeHomeError, match="belongs to"):
        TrustStore.load(home)
    result = cli(home, "daemon", "start", "--hostname", "gamma", "--listen", "127.0.0.1:0")
    assert_one_line_error(result, 2, str(path), "belongs to")


def test_our_own_trust_json_is_loaded(home: Path) -> None:
    plant_trust(home, 0o644)  # readable by others is fine, as for ssh's authorized_keys
    assert TrustStore.load(home).is_trusted(MALLORY.node_id)


@pytest.mark.parametrize("name", ["static-peers.json", "beacons.json"])
async def test_other_state_files_writable_by_others_are_refused(home: Path, name: str) -> None:
    path = home / name
    path.write_text("{}")
    path.chmod(0o666)
    if name == "beacons.json":
        with pytest.raises(UnsafeHomeError, match=f"chmod 600 {path}"):
            async with Node(home, "127.0.0.1:0", beacon="127.0.0.1:9", hostname="x"):
                pass
    else:
        result = cli(home, "daemon", "start", "--hostname", "gamma", "--listen", "127.0.0.1:0")
        assert_one_line_error(result, 2, f"chmod 600 {path}")


# -- one node per home ---------------------------------------------------------------------


async def test_embedded_node_on_a_daemon_home_is_refused(home: Path) -> None:
    daemon = start_daemon(home, "gamma")
    node = Node(home, "127.0.0.1:0")
    with pytest.raises(DaemonRunningError) as info:
        await node.start()
    assert str(info.value) == (f"a daemon runs on {home} (pid {daemon.pid}); use "
                               f"pilot_agents.Client('{home}') or another home")
    assert ipc_call(home, cmd="info")["pid"] == daemon.pid  # the daemon is untouched
    await node.close()


async def test_daemon_refuses_a_home_an_embedded_node_runs_on(home: Path) -> None:
    async with Node(home, "127.0.0.1:0"):
        result = cli(home, "daemon", "start", "--hostname", "gamma", "--listen", "127.0.0.1:0")
        assert_one_line_error(result, 4, f"another pilot-agents node (pid {os.getpid()}) runs "
                                         f"on {home}")
    start_daemon(home, "gamma")  # free again once the node is closed


async def test_two_embedded_nodes_on_one_home(home: Path) -> None:
    first = Node(home, "127.0.0.1:0")
    second = Node(home, "127.0.0.1:0")
    async with first:
        with pytest.raises(HomeInUseError, match=f"pid {os.getpid()}"):
            await second.start()
    async with second:  # the lock went with the first node
        pass
    with pytest.raises(ConfigError, match="cannot listen"):
        async with Node(home, "192.0.2.1:0"):  # not an address of ours
            pass
    async with Node(home, "127.0.0.1:0"):  # the node that failed to start let the home go
        pass


# -- the beacon's key pin (security.md #41) -------------------------------------------------------


@pytest.mark.parametrize("text", ['{"127.0.0.1:9": "8b1f9f', "[]", '{"127.0.0.1:9": "zz"}',
                                  '{"127.0.0.1:9": "8b1f"}', '{"127.0.0.1:9": 5}'])
async def test_a_damaged_beacon_pin_file_is_refused_not_dropped(home: Path, text: str) -> None:
    """Before: read as no pins at all, so the next beacon to answer was pinned instead."""
    path = home / "beacons.json"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=f"{path} is not a valid beacon pin file") as info:
        async with Node(home, "127.0.0.1:0", beacon="127.0.0.1:9", hostname="x"):
            pass
    assert "fix or remove it" in str(info.value)
    assert path.read_text() == text


async def test_a_beacon_whose_key_changed_fails_the_start_naming_both_keys(
    home: Path, tmp_path: Path,
) -> None:
    running = await service.start("127.0.0.1:0", tmp_path / "beacon")
    beacon = "{}:{}".format(*running.address)
    try:
        async with Node(home, "127.0.0.1:0", beacon=beacon, hostname="carol"):
            pass
        path = home / "beacons.json"
        real = json.loads(path.read_text())[beacon]
        pinned = bytes(range(32)).hex()
        path.write_text(json.dumps({beacon: pinned}))
        with pytest.raises(BeaconError) as info:
            async with Node(home, "127.0.0.1:0", beacon=beacon, hostname="carol"):
                pass
        message = str(info.value)
        assert pinned in message and real in message and str(path) in message, message
        assert json.loads(path.read_text()) == {beacon: pinned}  # the pin stays
    finally:
        running.close()
        running.server.registry.close()


# -- identity.key is created whole or not at all (security.md #42) -------------------------------


def _create_identity(home: Path, start: Any, results: Any) -> None:
    start.wait()
    try:
        results.put(Identity.load_or_create(home).node_id)
    except Exception as exc:  # reported to the test, not lost in the child
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_creating_one_identity_get_the_same_complete_key(tmp_path: Path) -> None:
    """Before: the key file was created empty (O_EXCL) and its seed written after, so the loser
    of the race read an empty or half-written file ("wrong length") about half the time."""
    context = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(40):
        home = tmp_path / f"h{round_}"
        start, results = context.Barrier(2), context.Queue()
        procs = [context.Process(target=_create_identity, args=(home, start, results))
                 for _ in range(2)]
        for proc in procs:
            proc.start()
        got = {results.get(timeout=30), results.get(timeout=30)}
        for proc in procs:
            proc.join(30)
        if len(got) != 1:
            failures.append(got)
        assert [p.name for p in home.iterdir()] == ["identity.key"]  # no temp file left
    assert failures == []


def test_a_failed_identity_creation_leaves_no_key_file(
    home: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: a crash between creating identity.key and writing its seed left it empty, and
    every later start failed on it."""
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(IdentityError, match="No space left"):
        Identity.load_or_create(home)
    assert list(home.iterdir()) == []
    monkeypatch.undo()
    identity = Identity.load_or_create(home)
    assert Identity.load_or_create(home) == identity


# -- files of the home are durable once written (security.md #43) --------------------------------


def test_writes_of_the_home_sync_its_directory_after_the_rename(
    home: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: write_private fsynced the file but not the directory, so the rename (and the
    link of a new identity.key) could be lost by a crash after the call returned."""
    events: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    def link(src: Any, dst: Any) -> None:
        events.append("link")
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    write_private(home / "trust.json", "{}")
    assert events == ["fsync file", "rename", "fsync dir"]
    events.clear()
    Identity.load_or_create(home)
    assert events == ["fsync file", "link", "fsync dir"]
