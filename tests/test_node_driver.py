"""The node's Driver: waiting on the network keeps the caller's cancel."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from pilot_agents.node.driver import Driver


async def test_a_cancel_that_comes_with_progress_ends_the_wait() -> None:
    # Python 3.11's wait_for returned the finished waiter's result here and dropped the cancel,
    # so the loop waited again, for the whole timeout, in a task its owner had cancelled.
    driver = Driver()
    driver.endpoint = cast(Any, object())  # only "running or not" is read
    task = asyncio.create_task(driver.wait_until(lambda: False, 60.0))
    await asyncio.sleep(0)  # the task now waits on its first waiter
    driver.progress_made()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()
