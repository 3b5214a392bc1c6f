"""Small process helpers shared by the lab and the UDP helper wrappers.

A child's stdout/stderr is read by a daemon thread into a queue, so that every wait in the lab has
a timeout (a blocking ``readline`` on a pipe has none) and so that, when something times out, the
error can show everything the child printed.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO, Any


class LabError(RuntimeError):
    """The NAT lab could not do what was asked (a command failed, a helper did not answer)."""


class LineReader:
    """Collects the lines of one binary pipe on a daemon thread."""

    def __init__(self, pipe: IO[bytes], name: str) -> None:
        self.name = name
        self.lines: list[str] = []  # everything seen, for error messages
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(
            target=self._pump, args=(pipe,), name=f"natlab-reader-{name}", daemon=True
        )
        self._thread.start()

    def _pump(self, pipe: IO[bytes]) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(line)
                self._queue.put(line)
        except (OSError, ValueError):  # pipe closed under us during teardown
            pass
        finally:
            self._queue.put(None)  # EOF marker

    def get(self, timeout: float) -> str:
        """The next line; LabError on timeout or EOF."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise LabError(f"{self.name}: no output within {timeout:.1f}s") from None
        if line is None:
            self._queue.put(None)  # keep EOF sticky for later callers
            raise LabError(f"{self.name}: process closed its output")
        return line

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first line (from now on) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LabError(f"{self.name}: expected line not seen within {timeout:.1f}s")
            line = self.get(remaining)
            if predicate(line):
                return line

    def text(self) -> str:
        return "\n".join(self.lines)


class JsonChild:
    """A helper process spoken to with one JSON object per line on stdin/stdout.

    Wraps a Popen started with ``stdin=PIPE, stdout=PIPE, stderr=PIPE``. Errors carry the child's
    stderr, which is where a Python traceback from the helper ends up.
    """

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        if proc.stdin is None or proc.stdout is None or proc.stderr is None:
            raise LabError(f"{name}: JsonChild needs stdin, stdout and stderr pipes")
        self.proc = proc
        self.name = name
        self._stdin = proc.stdin
        self.out = LineReader(proc.stdout, f"{name}/stdout")
        self.err = LineReader(proc.stderr, f"{name}/stderr")

    def send(self, msg: dict[str, Any]) -> None:
        if self.proc.poll() is not None:
            raise self._died()
        try:
            self._stdin.write(json.dumps(msg).encode() + b"\n")
            self._stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._died() from None

    def receive(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.out.wait_for(lambda s: s.startswith("{"), timeout)
        except LabError as e:
            raise LabError(f"{e}\n--- {self.name} stderr ---\n{self._stderr_text()}") from None
        msg: dict[str, Any] = json.loads(line)
        if msg.get("error"):
            raise LabError(f"{self.name}: {msg['error']}")
        return msg

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(msg)
        return self.receive(timeout)

    def close(self, timeout: float = 3.0) -> None:
        """Close stdin (the helpers exit on EOF), then insist."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def _stderr_text(self) -> str:
        time.sleep(0.05)  # let the reader thread catch the last lines of a dying child
        return self.err.text() or "(empty)"

    def _died(self) -> LabError:
        self.proc.poll()
        return LabError(
            f"{self.name} exited (rc={self.proc.returncode})\n--- stderr ---\n{self._stderr_text()}"
        )
