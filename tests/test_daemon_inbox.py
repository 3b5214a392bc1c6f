"""The daemon's inbox, message memory and reply paths on their own: bounds in bytes, payloads
not kept for reply, acknowledged delivery (issue #11, items 2 and 12), a reply path per live
stream."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from pilot_agents.daemon.inbox import Inbox, MessageMemory, ReplyPaths
from pilot_agents.daemon.requests import _nesting_within
from pilot_agents.errors import ConnectionClosedError, PilotError, PilotTimeoutError
from pilot_agents.node.connection import Message


def message(size: int, tag: str = "x") -> Message:
    return Message(tag.encode() * size, "sender", 1001, 50000)


def remember(memory: MessageMemory, message: Message, inbox: Inbox, *, ack: bool) -> str:
    return memory.remember(message, inbox, ack=ack, stream=None)


class Stream:
    """A stream's way back, as a Node's stream handle offers it."""

    def __init__(self) -> None:
        self.peer_id = "sender"
        self.ended = False
        self.error: PilotError | None = None
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.sent.append(data)


async def test_inbox_is_full_by_bytes_before_count() -> None:
    inbox = Inbox("port 1001", max_messages=100, max_bytes=1000)
    inbox.put(message(600))
    assert inbox.has_room()
    inbox.put(message(600))  # the pump checked for room before: it may overshoot by one
    assert not inbox.has_room() and inbox.bytes == 1200
    waiting = asyncio.create_task(inbox.wait_for_room())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await inbox.get(1)
    await asyncio.wait_for(waiting, 1)
    assert inbox.bytes == 600


async def test_inbox_get_times_out() -> None:
    with pytest.raises(PilotTimeoutError, match="port 1001"):
        await Inbox("port 1001", 10, 10).get(0.01)


async def test_handed_out_payloads_are_kept_only_within_the_requeue_budget() -> None:
    inbox = Inbox("port 1001", 100, 10_000)
    memory = MessageMemory(limit=1000, requeue_bytes=2500, ack_wait=30)
    ids = [remember(memory, message(1000, str(i)), inbox, ack=False) for i in range(5)]
    assert memory.payload_bytes == 2000  # the three oldest payloads are forgotten
    assert memory.requeue(ids[0]) is False
    assert memory.requeue(ids[4]) is True
    assert (await inbox.get(0)).data == b"4" * 1000
    assert memory.requeue(ids[4]) is False  # once


async def test_requeue_memory_is_bounded_by_count() -> None:
    inbox = Inbox("port 1001", 100, 10_000)
    memory = MessageMemory(limit=3, requeue_bytes=10_000, ack_wait=30)
    ids = [remember(memory, message(10), inbox, ack=False) for _ in range(5)]
    assert memory.payload_bytes == 30
    assert [memory.requeue(i) for i in ids] == [False, False, True, True, True]


async def test_unacked_message_holds_its_room_and_comes_back_after_ack_wait() -> None:
    inbox = Inbox("port 1001", 2, 10_000)
    memory = MessageMemory(limit=100, requeue_bytes=0, ack_wait=0.05)
    first = remember(memory, message(100), inbox, ack=True)
    assert (inbox.held, inbox.bytes, len(inbox)) == (1, 100, 0)
    inbox.put(message(100, "y"))
    assert not inbox.has_room()  # one waiting plus one unacknowledged
    await asyncio.sleep(0.1)
    assert (inbox.held, len(inbox)) == (0, 2)
    assert (await inbox.get(0)).data == b"x" * 100  # redelivered first
    assert memory.ack(first) is False  # too late: it went back
    second = remember(memory, message(100), inbox, ack=True)
    assert memory.ack(second) is True
    await asyncio.sleep(0.1)
    assert (inbox.held, inbox.bytes, len(inbox)) == (0, 100, 1)


async def test_evicting_an_unacked_message_puts_it_back() -> None:
    inbox = Inbox("port 1001", 100, 10_000)
    memory = MessageMemory(limit=1, requeue_bytes=0, ack_wait=30)
    remember(memory, message(10, "a"), inbox, ack=True)
    remember(memory, message(10, "b"), inbox, ack=True)
    assert len(inbox) == 1 and inbox.held == 1
    assert (await inbox.get(0)).data == b"a" * 10


async def test_a_reply_path_lives_with_its_stream_not_with_a_message_count() -> None:
    inbox = Inbox("port 1001", 100, 10_000)
    memory = MessageMemory(limit=3, requeue_bytes=0, ack_wait=30)
    paths = ReplyPaths()
    live, short = Stream(), Stream()
    first = memory.remember(message(1), inbox, ack=False, stream=paths.key(live))
    for _ in range(1000):  # far more messages than the memory holds, on one other stream each
        other = Stream()
        memory.remember(message(1), inbox, ack=False, stream=paths.key(other))
        del other
    assert len(paths) == 1  # a stream gone is forgotten at once (the Node dropped it)
    await paths.find(first).send(b"answer")
    assert live.sent == [b"answer"]
    ended = memory.remember(message(1), inbox, ack=False, stream=paths.key(short))
    short.ended, short.error = True, ConnectionClosedError("beta port 9: reset by the peer")
    with pytest.raises(ConnectionClosedError, match=r"has ended \(beta port 9: reset"):
        paths.find(ended)
    del short
    gc.collect()
    assert len(paths) == 1
    with pytest.raises(ConnectionClosedError, match=r"the stream it came on has ended$"):
        paths.find(ended)
    for bogus in ("m1", "nonsense", first.replace(".", ".x"), first + "999999", "m1.-1"):
        with pytest.raises(ConnectionClosedError, match="did not hand it out"):
            paths.find(bogus)
    assert ReplyPaths().key(live) != paths.key(live)  # a later daemon's keys are its own


@pytest.mark.parametrize(("body", "depth", "within"), [
    (b'{"cmd": "info"}', 1, True),
    (b"[" * 100_000, 4, False),
    (b"[[[]]]", 3, True),
    (b"[[[]]]", 2, False),
    (b'{"data": "[[[[[[[[\\"{{{{{{"}', 1, True),
    (b"[}", 4, False),
])
def test_nesting_is_measured_without_parsing(body: bytes, depth: int, within: bool) -> None:
    assert _nesting_within(body, depth) is within


@pytest.mark.parametrize("tail", [b'\\"' * 500_000, b'"' + b'\\"' * 500_000 + b"\\",
                                  b'"\\' * 500_000, b'"' * 1_000_000])
def test_nesting_is_measured_in_linear_time(tail: bytes) -> None:
    # Unterminated strings full of escaped quotes: a failed match at each quote made the
    # check quadratic (48 KB held the daemon 6 s; these 1-2 MB, hours).
    started = time.perf_counter()
    assert _nesting_within(b"[[[[[" + tail, 4) is False
    assert time.perf_counter() - started < 2
