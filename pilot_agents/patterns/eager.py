"""Running a coroutine's first step at once, as the task that is to finish it.

A request handed to an idle worker task starts only at the event loop's next turn: the rest of
the delivery callback, the loop's bookkeeping and a task step come first, ~5 µs of a cold CPU
before the handler runs, and all of it before the reply can leave. Most handlers answer without
waiting for anything, so :func:`serve <pilot_agents.patterns.reqrep.serve>` runs a request's
first step in the delivery callback itself, as the idle worker that would have run it:
``asyncio.current_task()`` names that worker meanwhile, in the worker's own context, so timeouts,
cancellation and context variables behave as they do in the task, and the worker is handed only
what is left when the handler waits (a coroutine suspended on a future). What the callback did
after the delivery then happens after the reply left, while the peer wakes up.

asyncio 3.12 does this for a new task (``eager_start``); on 3.11 it takes asyncio's
``_enter_task`` and ``_leave_task``, on which the eager tasks of later versions are built. Where
they are missing, :data:`AVAILABLE` is False and every request starts in its task, as before.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any

try:
    from asyncio.tasks import _enter_task, _leave_task
except ImportError:  # an asyncio without them: no eager steps
    AVAILABLE = False
else:
    AVAILABLE = True


class Suspended:
    """A coroutine stopped at its first wait (``awaiting``, what it yielded): awaiting this, in
    the task it ran as, finishes it. The task's sends and throws (a cancel) go to the
    coroutine, as if the task had run it from the start."""

    __slots__ = ("_awaiting", "_coro")

    def __init__(self, coro: Coroutine[Any, Any, None], awaiting: object) -> None:
        self._coro = coro
        self._awaiting = awaiting

    def __await__(self) -> Generator[Any, None, None]:
        coro, awaiting = self._coro, self._awaiting
        while True:
            try:
                yield awaiting
            except BaseException as exc:  # (GeneratorExit too: the coroutine closes)
                try:
                    awaiting = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    awaiting = coro.send(None)
                except StopIteration:
                    return


def start_as(task: asyncio.Task[Any], context: contextvars.Context,
             coro: Coroutine[Any, Any, None]) -> Suspended | None:
    """Run ``coro`` up to its first wait, now, as ``task`` (which must be waiting, not running)
    in ``context``: None if it finished, else what ``task`` must await to finish it. Only from
    a callback, outside every task (``asyncio.current_task()`` is None); what ``coro`` raises
    in its first step propagates."""
    loop = task.get_loop()
    _enter_task(loop, task)
    try:
        awaiting = context.run(coro.send, None)
    except StopIteration:
        return None
    finally:
        _leave_task(loop, task)
    return Suspended(coro, awaiting)
