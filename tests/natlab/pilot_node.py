"""A pilot-agents Node in its own process, driven by JSON lines: the NAT lab's test agent.

Run inside a lab host (``Lab.python_cmd(host, pilot_node.py, [...])``)::

    pilot_node.py --home DIR --beacon HOST:PORT --hostname NAME [--log FILE] [--log-level L]

stdout carries one JSON object per line, every one stamped ``"t"`` with ``time.monotonic()``
(network namespaces share the machine's monotonic clock, so times from different nodes and from
the test process compare directly):

- ``{"event": "ready", "node_id", "hostname", "local", "info"}`` once registered at the beacon;
- ``{"event": "path", "peer", "path", "rtt"}`` whenever a tunnel's path changes (``node.peers()``
  polled every 20 ms; "none", "relay" or "direct");
- ``{"event": "received", "port", "size", "sha256", "sender", "text"}`` for each message a
  listener got (``text``: the first 80 bytes when they are ASCII, for markers);
- ``{"id", "ok": true, ...}`` or ``{"id", "error"}``: the answer to the command with that id.

Commands on stdin (each may carry ``"id"``; each runs as its own task, so a long ``drain`` does
not block a ``status``; every wait has a timeout, ``"timeout"`` in seconds, default 30):

- ``trust {node_id, hostname?}``: with ``hostname``, the name is pinned (as ``trust add NAME``)
- ``listen {port, reply?, reply_seed?}``: unless ``reply`` is false, answer every message with
  as many pseudo-random bytes (``payload_for(size, reply_seed)``), reported as
  ``{"event": "replied", "size", "sha256"}``
- ``reply_size {port, size}``: from now on answer with ``size`` bytes (null: as many as came)
- ``connect {conn, peer, port, size? | text?, seed?}``: open a connection and send a first
  message at once; answers ``t0`` (just before ``connect()``), ``t_open``, ``t_sent``,
  ``sha256`` and the connection's ``path``
- ``send {conn, size? | text?, seed?}``: one more message (answered once it is buffered)
- ``drain {conn}``: wait until the peer acknowledged everything sent on ``conn``
- ``recv {conn}``: the next message the peer sent back on ``conn`` (size, sha256)
- ``wait_peer {peer, bytes_in?, bytes_out?, path?}``: until that tunnel's counters or path get
  there
- ``status``: ``peers`` (node.peers()) and ``conns`` (each connection's path and rtt)
- ``close {conn}``, ``quit``

The test-side handle, :class:`PilotNode`, lives at the bottom of this file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLL_INTERVAL = 0.02  # seconds between path polls
DEFAULT_TIMEOUT = 30.0


def payload_for(size: int, seed: int) -> bytes:
    """``size`` pseudo-random bytes, the same for the same seed (cheap: no per-byte Python)."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _text_head(data: bytes) -> str | None:
    head = data[:80]
    return head.decode("ascii") if head.isascii() else None


# ---------------------------------------------------------------------------------------------
# the runner (inside the lab host)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node: Any = None
        self.conns: dict[str, Any] = {}
        self.listeners: dict[int, Any] = {}
        self.reply_sizes: dict[int, int | None] = {}  # per port; None: as big as the message
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stop = asyncio.Event()
        self._paths: dict[str, str] = {}

    def emit(self, msg: dict[str, Any]) -> None:
        msg.setdefault("t", time.monotonic())
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def main(self) -> None:
        from pilot_agents import Node

        args = self.args
        from pilot_agents.net.tunnel.config import SessionConfig
        from pilot_agents.net.tunnel.congestion import CongestionConfig

        config = SessionConfig()
        if args.congestion:
            config.congestion = CongestionConfig(algorithm=args.congestion)
        self.node = Node(
            args.home,
            args.listen,
            beacon=args.beacon,
            hostname=args.hostname or None,
            config=config,
        )
        await self.node.start()
        try:
            info = self.node.info()
            self.emit(
                {
                    "event": "ready",
                    "node_id": self.node.node_id,
                    "hostname": self.node.hostname,
                    "local": list(self.node.local_endpoint),
                    "info": dataclasses.asdict(info),
                }
            )
            self.spawn(self.watch_paths())
            self.spawn(self.read_commands())
            await self.stop.wait()
        finally:
            for task in list(self.tasks):
                task.cancel()
            await self.node.close()

    async def read_commands(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        def pump() -> None:  # a thread: stdin has no portable asyncio reader
            with contextlib.suppress(RuntimeError):  # the loop closed: we are exiting anyway
                for line in iter(sys.stdin.buffer.readline, b""):
                    loop.call_soon_threadsafe(queue.put_nowait, line)
                loop.call_soon_threadsafe(queue.put_nowait, b"")

        threading.Thread(target=pump, name="stdin", daemon=True).start()
        while True:
            line = await queue.get()
            if not line:
                self.stop.set()  # EOF: the test is gone
                return
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
            except ValueError as exc:
                self.emit({"error": f"bad command {line!r}: {exc}"})
                continue
            self.spawn(self.run_command(cmd))

    async def run_command(self, cmd: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": cmd.get("id")}
        name = str(cmd.get("cmd"))
        handler = getattr(self, f"cmd_{name}", None)
        try:
            if handler is None:
                raise ValueError(f"unknown command {name!r}")
            timeout = float(cmd.get("timeout", DEFAULT_TIMEOUT))
            result = await asyncio.wait_for(handler(cmd), timeout)
            reply.update(result or {})
            reply["ok"] = True
        except TimeoutError:
            reply["error"] = f"{name}: timed out after {cmd.get('timeout', DEFAULT_TIMEOUT)} s"
        except Exception as exc:  # reported to the test, which fails with it
            logging.getLogger("pilot_node").exception("command %s failed", name)
            reply["error"] = f"{name}: {type(exc).__name__}: {exc}"
            reply["traceback"] = traceback.format_exc()
        self.emit(reply)

    async def watch_paths(self) -> None:
        while True:
            for peer in self.node.peers():
                if self._paths.get(peer.node_id) != peer.path:
                    self._paths[peer.node_id] = peer.path
                    self.emit(
                        {"event": "path", "peer": peer.node_id, "path": peer.path, "rtt": peer.rtt}
                    )
            await asyncio.sleep(POLL_INTERVAL)

    @staticmethod
    def _message(cmd: dict[str, Any]) -> bytes:
        if cmd.get("text") is not None:
            return str(cmd["text"]).encode()
        return payload_for(int(cmd["size"]), int(cmd.get("seed", 0)))

    # -- commands

    async def cmd_trust(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.node.trust(cmd["node_id"], cmd.get("hostname"))
        return {}

    async def cmd_listen(self, cmd: dict[str, Any]) -> dict[str, Any]:
        port = int(cmd["port"])
        listener = self.node.listen(port)
        self.listeners[port] = listener
        reply = bool(cmd.get("reply", True))
        reply_seed = int(cmd.get("reply_seed", 1))
        self.reply_sizes[port] = None

        async def serve() -> None:
            async for message in listener:
                t = time.monotonic()
                self.emit(
                    {
                        "event": "received",
                        "t": t,
                        "port": port,
                        "size": len(message.data),
                        "sha256": sha256(message.data),
                        "sender": message.sender,
                        "text": _text_head(message.data),
                    }
                )
                if reply:
                    size = self.reply_sizes.get(port)
                    data = payload_for(len(message.data) if size is None else size, reply_seed)
                    self.spawn(self._reply(message, data))

        self.spawn(serve())
        return {}

    async def cmd_reply_size(self, cmd: dict[str, Any]) -> dict[str, Any]:
        size = cmd.get("size")
        self.reply_sizes[int(cmd["port"])] = None if size is None else int(size)
        return {}

    async def _reply(self, message: Any, data: bytes) -> None:
        try:
            await message.reply(data)
            self.emit({"event": "replied", "size": len(data), "sha256": sha256(data)})
        except Exception as exc:
            self.emit({"event": "reply_failed", "error": f"{type(exc).__name__}: {exc}"})

    async def cmd_connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        data = self._message(cmd)
        t0 = time.monotonic()
        conn = self.node.connect(
            cmd["peer"], int(cmd["port"]), timeout=float(cmd.get("connect_timeout", 10))
        )
        await conn.__aenter__()
        t_open = time.monotonic()
        self.conns[cmd["conn"]] = conn
        await conn.send(data)
        return {
            "t0": t0,
            "t_open": t_open,
            "t_sent": time.monotonic(),
            "size": len(data),
            "sha256": sha256(data),
            "path": conn.path,
        }

    async def cmd_send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        conn = self.conns[cmd["conn"]]
        data = self._message(cmd)
        t_start = time.monotonic()
        await conn.send(data)
        return {
            "t_start": t_start,
            "t_sent": time.monotonic(),
            "size": len(data),
            "sha256": sha256(data),
        }

    async def cmd_drain(self, cmd: dict[str, Any]) -> dict[str, Any]:
        conn = self.conns[cmd["conn"]]
        await conn.drain(timeout=float(cmd.get("timeout", DEFAULT_TIMEOUT)))
        return {"path": conn.path}

    async def cmd_recv(self, cmd: dict[str, Any]) -> dict[str, Any]:
        conn = self.conns[cmd["conn"]]
        message = await conn.receive(timeout=float(cmd.get("timeout", DEFAULT_TIMEOUT)))
        return {
            "size": len(message.data),
            "sha256": sha256(message.data),
            "text": _text_head(message.data),
            "path": conn.path,
        }

    async def cmd_wait_peer(self, cmd: dict[str, Any]) -> dict[str, Any]:
        while True:
            for peer in self.node.peers():
                if peer.node_id != cmd["peer"]:
                    continue
                if (
                    peer.bytes_in >= int(cmd.get("bytes_in", 0))
                    and peer.bytes_out >= int(cmd.get("bytes_out", 0))
                    and cmd.get("path") in (None, peer.path)
                ):
                    return {"peer": dataclasses.asdict(peer)}
            await asyncio.sleep(POLL_INTERVAL)

    async def cmd_status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        conns = {}
        for name, conn in self.conns.items():
            address = list(conn.address) if conn.address is not None else None
            conns[name] = {"path": conn.path, "rtt": conn.rtt, "address": address}
        return {
            "peers": [dataclasses.asdict(p) for p in self.node.peers()],
            "conns": conns,
            "info": dataclasses.asdict(self.node.info()),
        }

    async def cmd_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        conn = self.conns.pop(cmd["conn"])
        await conn.close()
        return {}

    async def cmd_quit(self, cmd: dict[str, Any]) -> dict[str, Any]:
        asyncio.get_running_loop().call_later(0.05, self.stop.set)
        return {}


def _stamp_monotonic(record: logging.LogRecord) -> bool:
    """Log lines carry time.monotonic(), the clock of the events and of the test process."""
    record.mono = time.monotonic()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--listen", default="0.0.0.0:0")
    parser.add_argument("--beacon", required=True)
    parser.add_argument("--hostname", default="")
    parser.add_argument("--log", default=None, help="log file (default: stderr)")
    parser.add_argument("--log-level", default="DEBUG")
    parser.add_argument("--congestion", default="", help="congestion control (default: the node's)")
    args = parser.parse_args(argv)
    handler: logging.Handler = (
        logging.FileHandler(args.log) if args.log else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(mono).3f %(name)s %(levelname)s %(message)s"))
    handler.addFilter(_stamp_monotonic)
    logging.basicConfig(level=args.log_level, handlers=[handler])
    runner = Runner(args)
    try:
        asyncio.run(runner.main())
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        runner.emit({"event": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# the handle (in the test process)


class NodeError(RuntimeError):
    pass


class PilotNode:
    """A runner started in ``host``; ``call()`` sends a command and waits for its answer,
    ``wait_event()`` waits for a pushed event. Every wait has a timeout, and every failure
    message carries the runner's stderr and the tail of its log file."""

    def __init__(
        self,
        lab: Any,
        host: Any,
        *,
        home: Path,
        beacon: str,
        hostname: str,
        log_path: Path,
        listen: str = "0.0.0.0:0",
        log_level: str = "DEBUG",
        ready_timeout: float = 15.0,
        congestion: str = "",
    ) -> None:
        self.name = hostname
        self.host = host
        self.log_path = log_path
        args = [
            "--home", str(home), "--beacon", beacon, "--hostname", hostname,
            "--listen", listen, "--log", str(log_path), "--log-level", log_level,
            "--congestion", congestion,
        ]  # fmt: skip
        self.proc = lab.python_cmd(
            host,
            str(Path(__file__).resolve()),
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._ids = iter(range(1, 1 << 30))
        threading.Thread(target=self._pump_out, daemon=True, name=f"out-{hostname}").start()
        threading.Thread(target=self._pump_err, daemon=True, name=f"err-{hostname}").start()
        ready = self.wait_event(lambda e: e.get("event") in ("ready", "fatal"), ready_timeout)
        if ready.get("event") != "ready":
            raise NodeError(f"{hostname} did not start: {ready}\n{self.diagnostics()}")
        self.node_id: str = ready["node_id"]
        self.ready = ready

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            try:
                msg = json.loads(raw)
            except ValueError:
                msg = {"event": "garbage", "line": raw.decode("utf-8", "replace")}
            with self._cond:
                self.events.append(msg)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self.stderr.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def diagnostics(self, log_lines: int = 60) -> str:
        try:
            log_tail = self.log_path.read_text().splitlines()[-log_lines:]
        except OSError:
            log_tail = ["(no log)"]
        return (
            f"--- {self.name} stderr ---\n" + "\n".join(self.stderr[-40:])
            + f"\n--- {self.name} log tail ({self.log_path}) ---\n" + "\n".join(log_tail)
        )  # fmt: skip

    def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0
    ) -> dict[str, Any]:
        """The first event (at index ``start`` or later) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.events):
                    if predicate(self.events[i]):
                        return self.events[i]
                    i += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    why = "exited" if self._eof else f"nothing within {timeout:.1f} s"
                    raise NodeError(f"{self.name}: expected event: {why}\n{self.diagnostics()}")
                self._cond.wait(remaining)

    def mark(self) -> int:
        """An index for ``wait_event(start=...)``: only events from now on."""
        with self._cond:
            return len(self.events)

    def send(self, cmd: dict[str, Any]) -> int:
        msg_id = next(self._ids)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({**cmd, "id": msg_id}).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise NodeError(f"{self.name} is gone\n{self.diagnostics()}") from None
        return msg_id

    def result(self, msg_id: int, timeout: float) -> dict[str, Any]:
        reply = self.wait_event(lambda e: e.get("id") == msg_id, timeout)
        if reply.get("error"):
            raise NodeError(
                f"{self.name}: {reply['error']}\n{reply.get('traceback', '')}\n{self.diagnostics()}"
            )
        return reply

    def call(self, cmd: str, timeout: float = DEFAULT_TIMEOUT, **fields: Any) -> dict[str, Any]:
        # the runner's own timeout fires first, so its answer explains what it was waiting for
        msg_id = self.send({"cmd": cmd, "timeout": timeout, **fields})
        return self.result(msg_id, timeout + 5.0)

    def path_events(self, peer: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == "path" and e.get("peer") == peer]

    def close(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except (NodeError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


if __name__ == "__main__":
    sys.exit(main())
