"""The daemon's inbox and message memory on their own: bounds in bytes, payloads not kept for
reply, acknowledged delivery (issue #11, items 2 and 12)."""

from __future__ import annotations

import asyncio

import pytest

from pilot_agents.daemon.inbox import Inbox, MessageMemory
from pilot_agents.daemon.requests import _nesting_within
from pilot_agents.errors import PilotTimeoutError
from pilot_agents.node.connection import Message


def message(size: int, tag: str = "x") -> Message:
    return Message(tag.encode() * size, "sender", 1001, 50000)


async def no_reply(data: bytes) -> None:
    raise AssertionError("not called")


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
    ids = [memory.remember(message(1000, str(i)), inbox, no_reply, ack=False) for i in range(5)]
    assert memory.payload_bytes == 2000  # the three oldest payloads are forgotten
    assert all(memory.get(i) is not None for i in ids)  # but every one can still be replied to
    assert memory.requeue(ids[0]) is False
    assert memory.requeue(ids[4]) is True
    assert (await inbox.get(0)).data == b"4" * 1000
    assert memory.requeue(ids[4]) is False  # once


async def test_reply_memory_is_bounded_by_count() -> None:
    inbox = Inbox("port 1001", 100, 10_000)
    memory = MessageMemory(limit=3, requeue_bytes=10_000, ack_wait=30)
    ids = [memory.remember(message(10), inbox, no_reply, ack=False) for _ in range(5)]
    assert [memory.get(i) is not None for i in ids] == [False, False, True, True, True]
    assert memory.payload_bytes == 30


async def test_unacked_message_holds_its_room_and_comes_back_after_ack_wait() -> None:
    inbox = Inbox("port 1001", 2, 10_000)
    memory = MessageMemory(limit=100, requeue_bytes=0, ack_wait=0.05)
    first = memory.remember(message(100), inbox, no_reply, ack=True)
    assert (inbox.held, inbox.bytes, len(inbox)) == (1, 100, 0)
    inbox.put(message(100, "y"))
    assert not inbox.has_room()  # one waiting plus one unacknowledged
    await asyncio.sleep(0.1)
    assert (inbox.held, len(inbox)) == (0, 2)
    assert (await inbox.get(0)).data == b"x" * 100  # redelivered first
    assert memory.ack(first) is False  # too late: it went back
    second = memory.remember(message(100), inbox, no_reply, ack=True)
    assert memory.ack(second) is True
    await asyncio.sleep(0.1)
    assert (inbox.held, inbox.bytes, len(inbox)) == (0, 100, 1)


async def test_evicting_an_unacked_message_puts_it_back() -> None:
    inbox = Inbox("port 1001", 100, 10_000)
    memory = MessageMemory(limit=1, requeue_bytes=0, ack_wait=30)
    memory.remember(message(10, "a"), inbox, no_reply, ack=True)
    memory.remember(message(10, "b"), inbox, no_reply, ack=True)
    assert len(inbox) == 1 and inbox.held == 1
    assert (await inbox.get(0)).data == b"a" * 10


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
