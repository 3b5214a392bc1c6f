"""What every benchmark case shares: sizes, payloads, request/reply sessions, timing, statistics.

A case is a pair of roles, a server and a client, each run in its own process by
:mod:`benchmarks.runner`. The roles talk to the runner through a :class:`Control` (to exchange
addresses and to learn when to stop); they talk to each other only over the transport under test.

Reliable transports are measured the same way: the client runs a *session* (a generator that
yields requests and receives replies, see :func:`client_session`) through its transport's
round-trip function, and the server answers the requests of a *plan* (:func:`server_plan`) in
order. The case supplies only the transport; timing, payloads and checks live here.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import random
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, ClassVar, Literal, Protocol, TypeVar

MB = 1_000_000
"""Throughput is reported in MB/s with MB = 10**6 bytes."""

HOST = "127.0.0.1"
Kind = Literal["bulk", "rtt"]
KINDS: tuple[Kind, ...] = ("bulk", "rtt")
OK = b"ok"
"""The server's reply once a bulk transfer is complete and its sha256 matches."""

R = TypeVar("R")
Y = TypeVar("Y")
S = TypeVar("S")


@dataclass(frozen=True)
class Params:
    """Sizes and limits of one benchmark run (the defaults are the full run)."""

    bulk_bytes: int = 64 * MB
    rtt_warmup: int = 200
    rtt_count: int = 2000
    msg_size: int = 100
    wait: float = 10.0
    """Limit, in seconds, of one setup step or one round trip."""
    bulk_wait: float = 60.0
    """Limit, in seconds, of the whole bulk transfer."""
    passes: int = 1
    """RTT passes: each case's round trips measured again in a fresh pair, the cases taking
    turns, so that a machine whose speed drifts (a VM's does) slows every case alike."""
    seed: int = 20261125
    workdir: str = ""
    """Scratch directory of this run (for node homes)."""
    congestion: str = ""
    """The tunnel's congestion controller in the Node cases ("": the default)."""

    @classmethod
    def quick(cls) -> Params:
        return cls(bulk_bytes=16 * MB, rtt_warmup=50, rtt_count=500, bulk_wait=30.0)

    @property
    def rtt_rounds(self) -> int:
        return self.rtt_warmup + self.rtt_count

    @property
    def pair_deadline(self) -> float:
        """Limit, in seconds, for a server/client pair from spawn to both results."""
        return self.bulk_wait + 3 * self.wait

    def timeout(self, kind: Kind) -> float:
        """Limit of the longest single wait of a measurement of this kind."""
        return self.bulk_wait if kind == "bulk" else self.wait


# --- payloads -------------------------------------------------------------------------------


def bulk_payload(p: Params) -> bytes:
    """The bulk message: random bytes that both processes derive from the seed."""
    return random.Random(p.seed).randbytes(p.bulk_bytes)


def small_message(p: Params, index: int) -> bytes:
    """A ``msg_size``-byte request that carries its index, so stale or reordered replies show."""
    return index.to_bytes(8, "big").ljust(p.msg_size, b"\x5a")


class VerificationError(Exception):
    """A reply or a received transfer is not what was sent."""


def expect_echo(sent: bytes, got: bytes) -> None:
    if got != sent:
        raise VerificationError(f"echo mismatch: sent {sent[:12]!r}..., got {got[:12]!r}...")


# --- server side: what to answer --------------------------------------------------------------


class Responder(Protocol):
    """Answers one request, fed to it in chunks as it arrives."""

    def feed(self, chunk: bytes | memoryview) -> None: ...

    def finish(self) -> bytes: ...


class Echo:
    """Replies with the request."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes | memoryview) -> None:
        self._buf += chunk

    def finish(self) -> bytes:
        return bytes(self._buf)


class Verifier:
    """Hashes a bulk transfer as it arrives; replies :data:`OK` if it is exactly the payload."""

    def __init__(self, p: Params) -> None:
        expected = bulk_payload(p)
        self._size = len(expected)
        self._digest = hashlib.sha256(expected).digest()
        self._hash = hashlib.sha256()
        self._received = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        self._hash.update(chunk)
        self._received += len(chunk)

    def finish(self) -> bytes:
        if self._received != self._size:
            raise VerificationError(f"received {self._received} of {self._size} bytes")
        if self._hash.digest() != self._digest:
            raise VerificationError("bulk transfer arrived complete but its sha256 differs")
        return OK


def server_plan(kind: Kind, p: Params) -> list[Responder]:
    """The requests a server answers, in order.

    bulk: an untimed hello (so connection setup and handshakes are over), then the transfer.
    rtt: one echo per round trip, warm-up included.
    """
    if kind == "bulk":
        return [Echo(), Verifier(p)]
    return [Echo() for _ in range(p.rtt_rounds)]


# --- client side: what to send and time ---------------------------------------------------------


@dataclass(frozen=True)
class BulkResult:
    sent: int
    delivered: int
    seconds: float
    note: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.delivered / self.seconds / MB

    @property
    def loss(self) -> float:
        return 1 - self.delivered / self.sent


@dataclass(frozen=True)
class RttResult:
    samples_ns: tuple[int, ...]

    def __add__(self, other: RttResult) -> RttResult:
        return RttResult(self.samples_ns + other.samples_ns)

    @property
    def median_us(self) -> float:
        return percentile(self.samples_ns, 50) / 1000

    @property
    def p99_us(self) -> float:
        return percentile(self.samples_ns, 99) / 1000


Result = BulkResult | RttResult
Session = Generator[bytes, bytes, R]
"""Yields each request, is sent its reply, returns the measurement."""


class Stopwatch:
    """Starts when created."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._start


def bulk_session(p: Params) -> Session[BulkResult]:
    """An untimed hello, then the payload as one request, timed until the server's OK."""
    hello = small_message(p, 0)
    expect_echo(hello, (yield hello))
    data = bulk_payload(p)
    watch = Stopwatch()
    reply = yield data
    seconds = watch.elapsed()
    if reply != OK:
        raise VerificationError(f"server did not confirm the transfer: {reply[:40]!r}")
    return BulkResult(sent=len(data), delivered=len(data), seconds=seconds)


def rtt_session(p: Params) -> Session[RttResult]:
    """``rtt_rounds`` echoes of ``msg_size`` bytes, each timed; the warm-up ones are dropped."""
    samples: list[int] = []
    for i in range(p.rtt_rounds):
        request = small_message(p, i)
        start = time.perf_counter_ns()
        reply = yield request
        elapsed = time.perf_counter_ns() - start
        expect_echo(request, reply)
        if i >= p.rtt_warmup:
            samples.append(elapsed)
    return RttResult(tuple(samples))


def client_session(kind: Kind, p: Params) -> Session[Result]:
    return bulk_session(p) if kind == "bulk" else rtt_session(p)


def drive(session: Generator[Y, S, R], roundtrip: Callable[[Y], S]) -> R:
    """Runs a session over a blocking request/reply function (or any step function: the
    session yields what to do and is sent the outcome)."""
    request = next(session)
    while True:
        try:
            request = session.send(roundtrip(request))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def adrive(session: Generator[Y, S, R], roundtrip: Callable[[Y], Awaitable[S]]) -> R:
    """Runs a session over an asynchronous request/reply (or step) function."""
    request = next(session)
    while True:
        try:
            request = session.send(await roundtrip(request))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


# --- statistics -----------------------------------------------------------------------------------


def percentile(samples: tuple[int, ...] | list[float], q: float) -> float:
    """The q-th percentile, interpolating linearly between closest ranks (NumPy's default)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- sockets --------------------------------------------------------------------------------------


def udp_socket(rcvbuf: int | None = None) -> socket.socket:
    """A UDP socket bound to an ephemeral loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((HOST, 0))
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# --- the runner, as a role sees it ---------------------------------------------------------------


class Control:
    """A role's line to the runner: publish an address, read the peer's, wait for the end."""

    def __init__(self, conn: Connection, wait: float) -> None:
        self._conn = conn
        self._wait = wait

    def publish(self, **info: Any) -> None:
        """Sends ``info`` (picklable values) to the other role."""
        self._conn.send(("info", info))

    def peer(self) -> dict[str, Any]:
        """What the other role published; blocks up to ``wait`` seconds."""
        info: dict[str, Any] = self._expect("info", "the other role has published nothing")
        return info

    def has_news(self) -> bool:
        """Whether the other role has published something :meth:`peer` would return at once."""
        return self._conn.poll()

    def wait_stop(self, limit: float | None = None) -> None:
        """Blocks until the client has reported its result (servers call this last), for up to
        ``limit`` seconds (default: the setup step's ``wait``)."""
        self._expect("stop", "the client has not reported a result", limit)

    async def await_stop(self, limit: float | None = None) -> None:
        """:meth:`wait_stop` without blocking the event loop (the transport keeps running)."""
        await asyncio.to_thread(self.wait_stop, limit)

    def _expect(self, tag: str, meaning: str, limit: float | None = None) -> Any:
        limit = self._wait if limit is None else limit
        if not self._conn.poll(limit):
            raise TimeoutError(f"{meaning} within {limit} s")
        got, body = self._conn.recv()
        if got != tag:
            raise RuntimeError(f"expected {tag!r} from the benchmark runner, got {got!r}")
        return body


class Roles:
    """What the runner needs of a case: its roles are its methods, each run in its own process
    with a :class:`Control` first, and a coroutine role runs on the case's event loop."""

    name: ClassVar[str]
    about: ClassVar[str]
    """Short description for the notes column."""

    def run_async(self, main: Coroutine[Any, Any, R]) -> R:
        """Runs a role that is a coroutine: on asyncio's own event loop unless a case says."""
        return asyncio.run(main)


def load(spec: str) -> Roles:
    """The case object named ``module`` (its ``CASE``) or ``module:ATTRIBUTE``; raises
    ImportError when its module can't be imported here (a missing dependency)."""
    module, _, attribute = spec.partition(":")
    case = getattr(importlib.import_module(module), attribute or "CASE")
    assert isinstance(case, Roles)
    return case


class Case(Roles, ABC):
    """One transport under test. Each method runs in its own process."""

    @abstractmethod
    def server(self, ctl: Control, p: Params, kind: Kind) -> Coroutine[Any, Any, None] | None:
        """Sets up, publishes its address, answers, then waits for :meth:`Control.wait_stop`."""

    @abstractmethod
    def client(self, ctl: Control, p: Params, kind: Kind) -> Result | Coroutine[Any, Any, Result]:
        """Reads the server's address from :meth:`Control.peer` and measures."""
