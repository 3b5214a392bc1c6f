"""What the raw data socket tests (tests/test_daemon_data_socket.py, a stream's;
tests/test_daemon_port_socket.py, a port's) share: daemons that import this checkout's code, a
client's end of a data socket framed by hand, and the requests a peer's side needs."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from pilot_agents import ipc
from pilot_agents.daemon import DaemonOptions, start_detached
from tests.conftest import ROOT, DaemonHandle, ipc_call, peer_up, short_home
from tests.test_ipc import stream_socket

WAIT = 10.0  # seconds any one answer may take, far more than it does


def started(*specs: tuple[str, dict[str, int]]) -> list[DaemonHandle]:
    """Daemons (a hostname, bounds of DaemonOptions) that are static peers trusting each
    other; stop_daemons their homes afterwards."""
    daemons = []
    with pytest.MonkeyPatch.context() as env:
        # The daemons start from "/": they import this checkout's code, not the one an
        # editable install may point at.
        env.setenv("PYTHONPATH", str(ROOT))
        for name, bounds in specs:
            home = short_home()
            info = start_detached(DaemonOptions(home=home, hostname=name, listen="127.0.0.1:0",
                                                **bounds))  # type: ignore[arg-type]
            daemons.append(DaemonHandle(home, name, info["node_id"], info["endpoints"][0],
                                        info["pid"]))
    if len(daemons) == 2:
        peer_up(*daemons)
    return daemons


def assert_clean_logs(*daemons: DaemonHandle) -> None:
    """Whatever a client sent, nothing went wrong in the daemons."""
    for daemon in daemons:
        log = (daemon.home / ipc.LOG_NAME).read_text()
        assert "Traceback" not in log and "ERROR" not in log, log


def connect(a: DaemonHandle, port: int, target: str = "beta") -> str:
    reply = ipc_call(a.home, cmd="connect", target=target, port=port)
    assert reply["ok"], reply
    return str(reply["stream"])


def receive(daemon: DaemonHandle, port: int) -> dict[str, Any]:
    reply = ipc_call(daemon.home, cmd="receive", port=port, timeout=WAIT)
    assert reply["ok"], reply
    return cast(dict[str, Any], reply["message"])


def payload(message: dict[str, Any]) -> bytes:
    return ipc.decode_data(message["data"], message["encoding"])


class FramedSocket:
    """A client's connection to the stream socket, framed by hand (docs/ipc.md, Framing)."""

    def __init__(self, daemon: DaemonHandle) -> None:
        self.sock = stream_socket(daemon.home)
        self.sock.settimeout(WAIT)
        self._reader = ipc.FrameReader(1 << 30)
        self._messages: list[list[bytes]] = []

    def write(self, *messages: list[bytes]) -> None:
        self.sock.sendall(b"".join(b"".join(ipc.pack_frames(m)) for m in messages))

    def next(self) -> list[bytes]:
        while not self._messages:
            data = self.sock.recv(1 << 20)
            assert data, "the daemon closed the data socket"
            self._messages += self._reader.feed(data)
        return self._messages.pop(0)

    def answer(self, kind: int) -> dict[str, Any]:
        """The next message, a header of ``kind`` then JSON."""
        (header,) = self.next()
        assert header[0] == kind, header
        return json.loads(header[1:])  # type: ignore[no-any-return]

    def assert_closed(self) -> None:
        """The daemon closes the connection (what it sent before is read first)."""
        assert self._messages == []
        assert self.sock.recv(1 << 20) == b""

    def close(self) -> None:
        self.sock.close()
