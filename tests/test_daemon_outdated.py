"""A daemon still running the code from before an upgrade: what it refuses says to restart it.

The "older" daemon runs from a copy of the package in which one rule is as it was before this
SDK (``port_attach`` wants some credit: the SDK now attaches with none and grants its window at
the first receive), and one command, ``peers``, does not exist yet."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

import pilot_agents.sdk as pilot
from pilot_agents import DaemonOutdatedError
from pilot_agents.errors import BadRequestError
from tests.conftest import (
    ROOT,
    DaemonHandle,
    assert_one_line_error,
    cli,
    short_home,
    stop_daemons,
)


@pytest.fixture(scope="module")
def older(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    copy = tmp_path_factory.mktemp("older") / "pilot_agents"
    shutil.copytree(ROOT / "pilot_agents", copy, ignore=shutil.ignore_patterns("__pycache__"))
    requests = copy / "daemon" / "requests.py"
    text = requests.read_text()
    for now, before in (("Field(ge=0, le=MAX_CREDIT_MESSAGES)",
                         "Field(ge=1, le=MAX_CREDIT_MESSAGES)"),
                        ('cmd: Literal["peers"]', 'cmd: Literal["peers-to-come"]')):
        assert now in text
        text = text.replace(now, before)
    requests.write_text(text)
    home = short_home()
    started = cli(home, "--json", "daemon", "start", "--hostname", "older", "--listen",
                  "127.0.0.1:0", env={"PYTHONPATH": str(copy.parent)})
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    try:
        yield DaemonHandle(home, "older", info["node_id"], info["endpoints"][0], info["pid"])
    finally:
        stop_daemons(home)


async def test_what_a_daemon_of_older_code_refuses_says_to_restart_it(
        older: DaemonHandle) -> None:
    async with pilot.Client(older.home) as client:
        with pytest.raises(DaemonOutdatedError, match="restart it") as refused:
            async with client.listen(7301):
                pass
        assert "credit_messages" in str(refused.value)  # what it refused, too
        with pytest.raises(DaemonOutdatedError, match=f"pid {older.pid}"):
            await client.call("no_such_command")
        assert (await client.info())["hostname"] == "older"  # what it knows still works


def test_the_cli_says_to_restart_it_too(older: DaemonHandle) -> None:
    result = cli(older.home, "peers")
    assert_one_line_error(result, 3, "unknown command", "restart it")
    status = cli(older.home, "daemon", "status")
    assert status.returncode == 0 and "runs other code than this command" in status.stdout


async def test_a_daemon_of_the_same_code_refuses_as_it_did(
        daemon_pair: tuple[DaemonHandle, DaemonHandle]) -> None:
    async with pilot.Client(daemon_pair[0].home) as client:
        with pytest.raises(BadRequestError) as refused:
            await client.call("no_such_command")
        assert not isinstance(refused.value, DaemonOutdatedError)
    status = cli(daemon_pair[0].home, "daemon", "status")
    assert status.returncode == 0 and "other code" not in status.stdout, status.stdout
