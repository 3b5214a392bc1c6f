"""The connection's Mailbox: FIFO order, deadlines, and no item lost to a cancelled waiter."""

from __future__ import annotations

import asyncio

import pytest

from pilot_agents.node.connection import Mailbox


async def test_items_come_out_in_order_and_a_wait_ends_with_a_put() -> None:
    box: Mailbox[int] = Mailbox()
    box.put(1)
    waiter = asyncio.create_task(box.get(5))
    assert await waiter == 1
    later = asyncio.create_task(box.get(5))
    await asyncio.sleep(0)
    box.put(2)
    box.put(3)
    assert await later == 2
    assert len(box) == 1 and await box.get(None) == 3


async def test_a_deadline_raises_timeout_error_and_leaves_nothing_behind() -> None:
    box: Mailbox[int] = Mailbox()
    with pytest.raises(TimeoutError):
        await box.get(0.01)
    box.put(7)
    assert await box.get(0) == 7


async def test_an_item_meant_for_a_cancelled_waiter_reaches_the_next_one() -> None:
    box: Mailbox[str] = Mailbox()
    first = asyncio.create_task(box.get(5))
    second = asyncio.create_task(box.get(5))
    await asyncio.sleep(0)
    box.put("x")  # wakes the first waiter...
    first.cancel()  # ...which is cancelled before it runs
    assert await second == "x"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_waits_share_one_timer_that_only_moves_earlier() -> None:
    loop = asyncio.get_running_loop()
    box: Mailbox[int] = Mailbox()
    for i in range(50):  # a request/reply loop: every wait ends long before its deadline
        waiter = asyncio.create_task(box.get(60))
        await asyncio.sleep(0)
        box.put(i)
        assert await waiter == i
    assert sum(1 for h in loop._scheduled if not h.cancelled()) == 1  # type: ignore[attr-defined]
    # A shorter deadline than the armed one still fires on time...
    started = loop.time()
    with pytest.raises(TimeoutError):
        await box.get(0.05)
    assert 0.05 <= loop.time() - started < 1
    # ...and a timer left from an earlier, shorter wait does not end a longer one early.
    short = asyncio.create_task(box.get(0.02))
    long = asyncio.create_task(box.get(0.2))
    with pytest.raises(TimeoutError):
        await short
    await asyncio.sleep(0.05)
    assert not long.done()
    box.put(9)
    assert await long == 9


async def test_a_cancelled_wait_without_a_deadline_leaves_nothing_behind() -> None:
    """A request's timeout cancels its wait for the reply, on a stream that may stay quiet: each
    such wait left its entry behind until an item came (memory growing with every timeout)."""
    box: Mailbox[int] = Mailbox()
    for _ in range(100):
        waiting = asyncio.create_task(box.get(None))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert len(box._waiters) == 0
    box.put(1)
    assert await box.get(0) == 1
