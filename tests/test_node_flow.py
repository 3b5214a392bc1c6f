"""Flow control through the embedded Node, on 127.0.0.1: a listener that never reads stops its
sender instead of growing (issue #11 item 1's acceptance test), and the node refuses a
connection it has no local port for instead of spinning (item 4)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, cast

import pytest

from pilot_agents import Node
from pilot_agents.errors import PilotTimeoutError, PortBusyError, TooManyConnectionsError
from pilot_agents.net.tunnel import events
from pilot_agents.net.tunnel.config import SessionConfig
from pilot_agents.node.connection import SEND_HIGH_WATER, Connection, Mailbox, Message, StreamHandle
from pilot_agents.node.node import EPHEMERAL_PORTS
from tests.test_node import trusted_pair

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
OFFERED = 2 * 1000**3  # bytes offered per message size (it blocks long before)


def rss(pid: int) -> int:
    """Resident memory of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def offer(conn: Connection, size: int, count: int) -> int:
    """Send up to ``count`` messages of ``size`` bytes; stop at the first send that does not
    complete within 2 s (the sender is blocked). Returns how many were accepted."""
    data = bytes(size)
    for sent in range(count):
        try:
            await asyncio.wait_for(conn.send(data), 2)
        except TimeoutError:
            return sent
    return count


async def test_listener_that_never_reads_stops_the_sender(tmp_path: Path) -> None:
    """Default settings on both sides: ~2 GB offered per message size, the receiver in its own
    process so that its memory is its own."""
    stream_window = SessionConfig().stream_window
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "tests" / "flood_receiver.py"),
        str(tmp_path / "receiver"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        info = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
        async with Node(home=tmp_path / "sender", listen="127.0.0.1:0") as me:
            process.stdin.write(me.node_id.encode() + b"\n")
            await process.stdin.drain()
            me.trust(info["node_id"])
            me.add_peer(info["node_id"], ("127.0.0.1", info["port"]))
            await asyncio.sleep(0.5)  # the receiver is listening
            before = rss(process.pid)
            connections = []
            accepted = []
            started = time.monotonic()
            for size, count in ((0, 0), (1000, OFFERED // 1000), (MiB, OFFERED // MiB)):
                conn = me.connect(info["node_id"], port=1001, timeout=10)
                await conn.__aenter__()
                connections.append(conn)
                if size == 0:
                    # An empty message is 8 bytes on the wire: the sender's own buffer (8 MiB)
                    # would take a million of them to fill, so offer more than the receiver's
                    # window and see that they never all arrive.
                    empty = stream_window // 8 + 100_000
                    for _ in range(empty):
                        await conn.send(b"")
                    accepted.append(empty)
                    with pytest.raises(PilotTimeoutError):
                        await conn.drain(timeout=2)
                else:
                    accepted.append(await offer(conn, size, count))
                    assert accepted[-1] < count  # blocked
            grown = rss(process.pid) - before
            assert grown < 100 * MiB, f"the receiver grew by {grown / MiB:.0f} MiB"
            assert time.monotonic() - started < 120
            # Reading resumes every sender.
            process.stdin.write(b"read\n")
            await process.stdin.drain()
            for conn in connections:
                await conn.drain(timeout=60)
            for conn in connections:
                await conn.close()
    finally:
        process.kill()
        await process.wait()


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Interrupt a call that never returns (a busy loop starves asyncio's own timeouts)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


async def test_every_local_port_in_use_is_an_error(tmp_path: Path) -> None:
    async with trusted_pair(tmp_path) as (a, b):
        opened = []
        for _ in range(len(EPHEMERAL_PORTS)):
            conn = a.connect(b.node_id, port=1001)
            await conn.__aenter__()
            opened.append(conn)
        with alarm(20), pytest.raises(TooManyConnectionsError, match="in use"):
            await a.connect(b.node_id, port=1001).__aenter__()
        # Closing one frees its port.
        await opened.pop().abort()
        conn = a.connect(b.node_id, port=1001)
        await conn.__aenter__()
        await conn.abort()


async def test_overshoot_counts_what_write_took_past_the_bound_until_there_is_room(
        tmp_path: Path) -> None:
    """``write`` never refuses; ``overshoot`` says how much it took past the stream's bound, for
    a daemon to bound writers that do not wait for ``room``, and goes back to 0 with room."""
    async with (trusted_pair(tmp_path) as (a, b), b.listen(4300) as listener,
                a.connect(b.node_id, port=4300) as conn):
        chunk = bytes(64 * 1024)
        written = 1
        while conn.write(chunk):  # queued up to the stream's bound (nothing sent yet)
            assert conn.overshoot == 0
            written += 1
        taken = [conn.write(chunk) for _ in range(3)]
        assert taken == [False] * 3 and conn.overshoot == 4 * len(chunk)
        for _ in range(written + 3):  # the application reads: acknowledged, room again
            await listener.receive(timeout=10)
        await asyncio.wait_for(conn.room(), 10)
        assert conn.overshoot == 0
    assert conn.overshoot == 0  # closed: nothing is held past a bound


def test_message_overhead_covers_what_a_message_waiting_for_the_reader_costs() -> None:
    """The delivery windows charge each handed-out message ``message_overhead`` bytes beyond
    its payload: its event, the node's Message and the listener's inbox entry must fit."""
    count = 20_000
    inbox: Mailbox[tuple[object, Message]] = Mailbox()
    queued: list[events.MessageReceived] = []
    handle = object()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            payload = (i % 65536).to_bytes(2, "big")  # an object of its own, as received
            event = events.MessageReceived(b"k" * 32, i, 50000, 1001, payload)
            queued.append(event)  # the session's event queue, until the node takes it
            inbox.put((handle, Message(event.data, "peer", 1001, 50000, None)))
        per_message = (tracemalloc.get_traced_memory()[0] - before) / count - 2
    finally:
        tracemalloc.stop()
    assert per_message <= SessionConfig().message_overhead, per_message


async def test_messages_larger_than_the_stream_window_on_many_streams_all_arrive(
        tmp_path: Path) -> None:
    """Real UDP, small windows: twelve streams each carry a message twice the stream window.
    Before LARGE_MESSAGE, the other streams' partial messages took the credit meant for the
    one the receiver let through whole, and the tunnel stalled for good (12 x 20 MiB at the
    defaults: nothing within 60 s; now 1.5 s)."""
    config = SessionConfig(stream_window=256 * 1024, connection_window=1 * MiB)
    async with (
        Node(home=tmp_path / "a", listen="127.0.0.1:0", config=config) as a,
        Node(home=tmp_path / "b", listen="127.0.0.1:0", config=config) as b,
    ):
        a.trust(b.node_id)
        b.trust(a.node_id)
        a.add_peer(b.node_id, b.local_endpoint)
        async with b.listen(1001) as listener:
            async def send(n: int) -> None:
                async with a.connect(b.node_id, 1001) as conn:
                    await conn.send(bytes([n]) * (512 * 1024))
                    await conn.drain(timeout=30)

            sending = asyncio.gather(*(send(n) for n in range(12)))
            got = sorted([(await listener.receive(timeout=30)).data[0] for _ in range(12)])
            await sending
    assert got == list(range(12))


async def test_streams_nobody_reads_do_not_stop_the_tunnel_s_other_streams(
        tmp_path: Path) -> None:
    """Messages handed to the application and not taken count against the tunnel's delivery
    window (4 MiB) as well as their stream's (1 MiB): four streams nobody reads filled it, and
    no other stream of the tunnel was handed a message again (an audit: a subscriber that reads
    got 0 of 20 publications). A stream whose reader took all it was given gets its next."""
    async with trusted_pair(tmp_path) as (a, b):
        unread = [b.listen(port) for port in range(7301, 7305)]  # listened on, never read
        stuck = []
        for port in range(7301, 7305):
            conn = a.connect(b.node_id, port)
            await conn.__aenter__()
            stuck.append(conn)
            for _ in range(3):
                await conn.send(b"x" * MiB)
        await asyncio.sleep(1)  # in, and handed out up to the windows
        async with b.listen(7300) as listener, a.connect(b.node_id, 7300) as reading:
            for i in range(20):
                await reading.send(f"small {i}")
            got = [(await listener.receive(timeout=5)).data for _ in range(20)]
            assert got == [f"small {i}".encode() for i in range(20)]
        for conn in stuck:
            await conn.abort()
        for quiet in unread:
            await quiet.close()


async def test_one_shot_sends_to_a_port_nobody_reads_slow_down_and_leave_other_ports_alone(
        tmp_path: Path) -> None:
    """Each one-shot message waits in a stream of its own until it is read: past the port's
    share of the peer's streams (512) a send tries again within its timeout, then raises
    PortBusyError; the peer's other ports take streams as before (an audit: at 1024 every
    stream to any port was refused)."""
    async with trusted_pair(tmp_path) as (a, b), b.listen(7401), b.listen(7402) as other:
        sent = 0
        with pytest.raises(PortBusyError, match="is it read there"):
            for sent in range(2000):  # noqa: B007 (counted for the assertion)
                await a.send(b.node_id, 7401, b"unread", timeout=1)
        assert sent == 512
        await a.send(b.node_id, 7402, b"read")
        assert (await other.receive(timeout=5)).data == b"read"


async def test_a_reply_stall_is_measured_by_what_the_peer_takes() -> None:
    """room(stall) judged a stalled reader by the bytes waiting for it, which other writers on
    the stream (serve()'s handlers answering one requester) raise meanwhile: a requester that
    read 1 MiB while 2 MiB more were written was reset as one that read nothing. One layer: a
    stand-in for the session."""
    class Session:
        written, acked, resets, peer = SEND_HIGH_WATER + 2 * MiB, 0, 0, bytes(32)

        def stream_written(self, _: int) -> int:
            return self.written

        def stream_buffered(self, _: int) -> int:
            return self.written - self.acked

        def reset_stream(self, _: int, code: int) -> None:
            self.resets += 1

    class Driver:
        windows = 0

        async def wait_until(self, has_room: Callable[[], bool], timeout: float | None) -> None:
            self.windows += 1
            session.acked += MiB  # the reader took 1 MiB in this stall window...
            session.written += 0 if self.windows > 3 else 2 * MiB  # ...while 2 more came
            if not has_room():
                raise PilotTimeoutError("stall")

        def wake(self) -> None: ...

        def progress_made(self) -> None: ...

    session = Session()
    handle = StreamHandle(cast(Any, Driver()), cast(Any, session), 1, 1, 1)
    with contextlib.suppress(PilotTimeoutError):
        await handle.room(stall=30)  # the reader kept taking: room came
    assert session.resets == 0
