"""Test-side handles for the UDP helper processes (``udp_echo.py``, ``udp_agent.py``).

Each handle starts a real process inside a lab host and talks to it over pipes, always with a
timeout; on any failure the error includes the helper's stderr.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from .procs import JsonChild
from .topology import NATLAB_DIR, Host, Lab

Addr = tuple[str, int]
PIPES: dict[str, Any] = {
    "stdin": subprocess.PIPE,
    "stdout": subprocess.PIPE,
    "stderr": subprocess.PIPE,
}


def _addr(a: Any) -> Addr:
    return (str(a[0]), int(a[1]))


@dataclass(frozen=True)
class Packet:
    src: Addr
    data: str


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    rtts_ms: list[float]
    lost: list[int]
    reordered: int

    @property
    def loss_rate(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 0.0


class EchoServer:
    """``udp_echo.py`` on ``host``: answers each datagram with the sender's mapped address."""

    def __init__(self, lab: Lab, host: Host, ports: tuple[int, ...] = (3478,)) -> None:
        self.host = host
        args = ["--lifeline"]
        for p in ports:
            args += ["--port", str(p)]
        proc = lab.python_cmd(host, str(NATLAB_DIR / "udp_echo.py"), args, **PIPES)
        self._child = JsonChild(proc, f"udp_echo@{host.name}")
        ready = self._child.receive(timeout=10.0)
        self.ports: list[int] = [int(p) for p in ready["ports"]]

    def addr(self, port: int | None = None) -> Addr:
        return (self.host.ip, self.ports[0] if port is None else port)

    def close(self) -> None:
        self._child.close()


class UdpAgent:
    """``udp_agent.py`` on ``host``: one UDP socket, scripted command by command."""

    def __init__(self, lab: Lab, host: Host, port: int = 0) -> None:
        self.host = host
        proc = lab.python_cmd(
            host, str(NATLAB_DIR / "udp_agent.py"), ["--port", str(port)], **PIPES
        )
        self._child = JsonChild(proc, f"udp_agent@{host.name}")
        ready = self._child.receive(timeout=10.0)
        self.local: Addr = (host.ip, int(ready["local"][1]))

    # Split request/response, so two agents can run a command at the same time (hole punching).
    def submit(self, op: str, **args: Any) -> None:
        self._child.send({"op": op, **args})

    def result(self, wait: float) -> dict[str, Any]:
        return self._child.receive(wait)

    def call(self, op: str, wait: float, **args: Any) -> dict[str, Any]:
        """Run one command; ``wait`` bounds how long we wait for its answer (seconds)."""
        self.submit(op, **args)
        return self.result(wait)

    def reflect(self, server: Addr, timeout: float = 2.0) -> Addr:
        """Our reflexive address as seen by an EchoServer at ``server``."""
        return _addr(
            self.call("reflect", timeout + 5.0, server=list(server), timeout=timeout)["mapped"]
        )

    def send(self, to: Addr, data: str, count: int = 1, interval: float = 0.0) -> None:
        self.call(
            "send", 5.0 + count * interval, to=list(to), data=data, count=count, interval=interval
        )

    def recv(self, timeout: float, max_packets: int = 0) -> list[Packet]:
        res = self.call("recv", timeout + 5.0, timeout=timeout, max=max_packets)
        return [Packet(_addr(p["from"]), p["data"]) for p in res["packets"]]

    def start_punch(
        self, peer: Addr, count: int = 10, interval: float = 0.05, linger: float = 0.5
    ) -> float:
        """Begin punching; returns the timeout to give ``punch_result``."""
        self.submit("punch", peer=list(peer), count=count, interval=interval, linger=linger)
        return count * interval + linger + 5.0

    def punch_result(self, timeout: float) -> list[Packet]:
        res = self.result(timeout)
        return [Packet(_addr(p["from"]), p["data"]) for p in res["packets"]]

    def ping(
        self, to: Addr, count: int = 10, interval: float = 0.01, timeout: float = 1.0
    ) -> PingResult:
        res = self.call(
            "ping",
            count * interval + timeout + 10.0,
            to=list(to),
            count=count,
            interval=interval,
            timeout=timeout,
        )
        return PingResult(
            sent=int(res["sent"]),
            received=int(res["received"]),
            rtts_ms=[float(x) for x in res["rtts_ms"]],
            lost=[int(x) for x in res["lost"]],
            reordered=int(res["reordered"]),
        )

    def close(self) -> None:
        self._child.close()


def punch_pair(
    a: UdpAgent,
    a_peer: Addr,
    b: UdpAgent,
    b_peer: Addr,
    count: int = 10,
    interval: float = 0.05,
    linger: float = 0.5,
) -> tuple[list[Packet], list[Packet]]:
    """Both agents punch at the same time (as a beacon would tell them to); what each received."""
    ta = a.start_punch(a_peer, count, interval, linger)
    tb = b.start_punch(b_peer, count, interval, linger)
    return a.punch_result(ta), b.punch_result(tb)
