"""What every pilot node shares: where its transport comes from, running under both
``graph.invoke`` and ``graph.ainvoke``, reading the state, and the keys that make a re-run of a
LangGraph task recognisable."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import math
import queue
import threading
import uuid
import weakref
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langgraph.types import Interrupt, _interrupt_id

from ...errors import ConfigError, MissingStateKeyError, PilotError, stops_as
from ...sdk import Client
from ...transport import Transport
from .codec import Codec

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class DeliveryConfig:
    """The bounds of the pilot nodes; every node takes one as ``delivery=``."""

    retry_interval: float = 0.25  # seconds between tries while the peer has no listener
    remembered_ids: int = 10_000  # idempotency keys a PilotReceive remembers (oldest go first)
    remembered_receives: int = 64  # received updates kept for a re-run of the same task

    def __post_init__(self) -> None:
        if self.retry_interval <= 0:
            raise ConfigError("DeliveryConfig.retry_interval must be positive (seconds)")
        for name in ("remembered_ids", "remembered_receives"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DeliveryConfig.{name} must be at least 1")


class BoundedMemory(Generic[K, V]):
    """A map that forgets its oldest entries beyond ``size``; safe to share between the threads
    LangGraph runs sync nodes on."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._items.get(key)

    def replace(self, key: K, value: V) -> None:
        """Remember ``value`` for ``key``, as the newest entry."""
        with self._lock:
            self._items.pop(key, None)
            self._put(key, value)

    def add(self, key: K, value: V) -> bool:
        """Remember ``key``; False if it was already there (and it stays where it was)."""
        with self._lock:
            if key in self._items:
                return False
            self._put(key, value)
            return True

    def _put(self, key: K, value: V) -> None:
        self._items[key] = value
        while len(self._items) > self._size:
            self._items.popitem(last=False)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end from synchronous code, on a loop of its own (in a helper thread
    when this thread already runs a loop, which must not be re-entered)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # The copied context carries LangGraph's config of the running task (interrupt() reads it).
    context = contextvars.copy_context()
    with ThreadPoolExecutor(1, thread_name_prefix="pilot-langgraph") as pool:
        return pool.submit(context.run, asyncio.run, coro).result()


def iterate_sync(items: Callable[[], AsyncGenerator[T, None]], close_wait: float) -> Iterator[T]:
    """The items of an async iterator as they come, to synchronous code: it runs on a loop of
    its own in a helper thread, one item ahead at most. Leaving early cancels it (waiting up
    to ``close_wait`` seconds for it to clean up)."""
    handoff: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)  # (done, item or error)
    lock = threading.Lock()
    stopped = False
    feeding: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None

    async def feed() -> None:
        nonlocal feeding
        with lock:
            if stopped:
                return
            task = asyncio.current_task()
            assert task is not None  # asyncio.run runs us as a task
            feeding = (asyncio.get_running_loop(), task)
        # Closed here, not whenever it is collected: its clean-up needs this loop.
        async with contextlib.aclosing(items()) as iterator:
            async for item in iterator:
                await asyncio.to_thread(handoff.put, (False, item))

    def work() -> None:
        nonlocal feeding
        outcome: tuple[bool, Any] = (True, None)
        try:
            asyncio.run(feed())
        except BaseException as exc:  # the consumer's to raise
            outcome = (True, exc)
        with lock:
            feeding = None  # its loop is closed
            if stopped:
                return
        handoff.put(outcome)

    context = contextvars.copy_context()  # LangGraph's config of the running task, if any
    thread = threading.Thread(target=context.run, args=(work,), name="pilot-langgraph-stream",
                              daemon=True)
    thread.start()
    try:
        while True:
            done, item = handoff.get()
            if not done:
                yield item
            elif item is not None:
                raise item
            else:
                return
    finally:
        with lock:
            stopped = True
            if feeding is not None:
                loop, task = feeding
                loop.call_soon_threadsafe(task.cancel)
        with contextlib.suppress(queue.Empty):
            handoff.get_nowait()  # unblocks a feeder waiting to hand over the next item
        thread.join(close_wait)


# The error a SystemExit or KeyboardInterrupt becomes in the tasks of the code in contained();
# tasks copy their creator's context, so it reaches the tasks LangGraph makes for its nodes.
_STOPS: contextvars.ContextVar[Callable[[str], PilotError] | None] = contextvars.ContextVar(
    "pilot_langgraph_stops", default=None)
_CONTAINING: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


@contextlib.contextmanager
def contained(error: Callable[[str], PilotError]) -> Iterator[None]:
    """:func:`~pilot_agents.errors.stops_as` for the block and every task it starts. A graph
    runs each node in a task of its own, and LangGraph lets SystemExit through on purpose, so a
    node's ``sys.exit()`` reaches asyncio in that task, not in the block, and asyncio ends the
    event loop with it: the whole server. The loop's task factory (the one it had is still
    called) wraps the tasks made in the block's context."""
    loop = asyncio.get_running_loop()
    if loop not in _CONTAINING:
        _CONTAINING.add(loop)
        loop.set_task_factory(_containing_factory(loop.get_task_factory()))
    token = _STOPS.set(error)
    try:
        with stops_as(error):
            yield
    finally:
        _STOPS.reset(token)


def _containing_factory(previous: Any) -> Any:
    async def contain(coro: Coroutine[Any, Any, T], error: Callable[[str], PilotError]) -> T:
        with stops_as(error):
            return await coro

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context")
        error = _STOPS.get() if context is None else context.get(_STOPS)
        wrapped = coro if error is None else contain(coro, error)
        if previous is None:
            task = asyncio.Task(wrapped, loop=loop, **kwargs)
        else:
            task = previous(loop, wrapped, **kwargs)
        if wrapped is not coro:
            # A task cancelled before its first step never ran contain(), so nothing awaited
            # the coroutine it was made for: closed, it is not reported as never awaited
            # (LangGraph cancels such tasks when a run is cancelled as it ends).
            task.add_done_callback(lambda _: coro.close())
        return task
    return factory


@contextlib.asynccontextmanager
async def using(transport: Transport | None, home: str | Path | None) -> AsyncIterator[Transport]:
    """``transport``, or a client of the daemon of ``home`` (``$PILOT_HOME`` by default) for the
    block."""
    if transport is not None:
        yield transport
        return
    async with Client(home) as client:
        yield client


def bounded(timeout: float, who: str) -> float:
    """``timeout``, checked to be a positive number of seconds: a node that waits on a peer
    waits a bounded time (a dead peer would otherwise hold it, and its graph, for ever)."""
    if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
            or not 0 < timeout < math.inf):
        raise ConfigError(f"{who}: timeout= takes a positive number of seconds, not "
                          f"{timeout!r}: it waits on a peer, which may never answer")
    return timeout


def refuse_options(who: str, options: Mapping[str, Any], takes: str) -> None:
    """A ConfigError naming the call options in ``options`` that ask for something (not None
    or False, LangGraph's defaults): a node acts on none of them, and one ignored would give
    the caller what it did not ask for. ``takes``: what the call does take."""
    asked = [name for name, value in options.items() if value is not None and value is not False]
    if asked:
        raise ConfigError(f"{who} does not take {', '.join(f'{name}=' for name in asked)}: "
                          f"it takes {takes}")


def read_key(state: Any, key: str, who: str) -> Any:
    """``state[key]`` of a dict state, ``state.key`` of a dataclass or pydantic state."""
    if isinstance(state, Mapping):
        if key in state:
            return state[key]
        present = ", ".join(repr(k) for k in state) or "none"
    else:
        if hasattr(state, key):
            return getattr(state, key)
        present = f"a {type(state).__name__}"
    raise MissingStateKeyError(
        f"{who} reads the state key {key!r}, which this state does not have (keys: {present}); "
        f"set it in an earlier node or the graph's input, or name another key")


def task_of(config: RunnableConfig) -> str | None:
    """The LangGraph task a node runs as: its thread and namespace. LangGraph derives the task
    id in the namespace from the checkpoint it starts from, so a task re-run after an interrupt,
    a retry or a crash has the same one. None outside a graph."""
    configurable = config.get("configurable") or {}
    namespace = configurable.get("checkpoint_ns")
    if not namespace:
        return None
    return f"{configurable.get('thread_id', '')}\x00{namespace}"


# Where LangGraph keeps the state of one execution of a task (its interrupt() counter): a new
# object each time the task runs, a retry's attempt and a resumed re-run included. LangGraph has
# no public name for it; without it, calls are counted per task, not per execution.
_SCRATCHPAD = "__pregel_scratchpad"


# Where LangGraph passes a resume given by interrupt id (Command(resume={id: answer})) to the
# tasks of a run; no public name either.
_RESUME_MAP = "__pregel_resume_map"


@dataclass(frozen=True)
class Answers:
    """A LangGraph task's answers to its ``interrupt()`` calls, as one execution starts."""

    taken: int  # answers interrupt() returned in the task's earlier executions
    new: bool  # this execution brings an answer to the interrupt the task paused on


def interrupt_answers(config: RunnableConfig) -> Answers:
    """What the task of ``config`` holds: LangGraph matches a task's interrupt() calls to its
    answers by position, so a node that must not act twice on one answer (pass it on to a peer)
    needs to know which of its calls replay an answer taken before and which gets a new one.

    LangGraph keeps the answers in the execution's scratchpad: a list of those taken before,
    with an answer given by id already appended, and apart from it an answer given without one
    (``Command(resume=answer)``) until an interrupt() takes it."""
    configurable = config.get("configurable") or {}
    scratchpad = configurable.get(_SCRATCHPAD)
    if scratchpad is None:
        return Answers(0, False)  # not inside a task of a graph
    held = len(scratchpad.resume)
    by_id = configurable.get(_RESUME_MAP) or {}
    # The id interrupt() gave the task's last question is the one an answer by id names.
    if held and _interrupt_id(configurable.get("checkpoint_ns", ""), held - 1) in by_id:
        return Answers(held - 1, True)
    # Checked second: an answer without an id stays there until the step ends, taken or not.
    return Answers(held, scratchpad.get_null_resume(False) is not None)


class CallCounter:
    """Numbers the calls made in one execution of a LangGraph task (0, 1, ...), so the n-th
    call of a re-run matches the n-th call of the run before it, as interrupt() matches its
    resume values. Remembers the last ``size`` executions."""

    def __init__(self, size: int) -> None:
        # Each execution's object is held, not only its id, so the id is not reused meanwhile.
        self._counts: BoundedMemory[int, list[Any]] = BoundedMemory(size)
        self._lock = threading.Lock()

    def next(self, config: RunnableConfig) -> int:
        execution = (config.get("configurable") or {}).get(_SCRATCHPAD)
        if execution is None:
            return 0
        with self._lock:
            entry = self._counts.get(id(execution))
            if entry is None or entry[0] is not execution:
                entry = [execution, 0]
                self._counts.replace(id(execution), entry)
            entry[1] += 1
            return int(entry[1]) - 1


def idempotency_key(config: RunnableConfig, *parts: object) -> str:
    """Equal for every run of one LangGraph task (and ``parts``); random outside a graph."""
    task = task_of(config)
    if task is None:
        return uuid.uuid4().hex
    text = json.dumps([task, *map(str, parts)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


CALL_TAKES = "an input and a config only"  # what a node's invoke and ainvoke take


class PilotNode(Runnable[Any, dict[str, Any]]):
    """A LangGraph node (a Runnable) that talks to peers: ``graph.invoke`` and ``graph.ainvoke``
    both work. Its transport: the one given, else a client of the daemon of ``home``
    (``$PILOT_HOME``, else ``~/.pilot-agents``) opened for each call.

    Under ``invoke`` (a synchronous graph) each call runs on an event loop of its own, so the
    transport must be a daemon :class:`~pilot_agents.Client` (a new client of its home is used)
    or none; an embedded Node lives on its own loop and serves ``ainvoke`` only."""

    def __init__(self, *, transport: Transport | None, home: str | Path | None,
                 allowed_types: Iterable[type | tuple[str, ...]], delivery: DeliveryConfig | None,
                 name: str) -> None:
        self.transport = transport
        self.home = home
        self.codec = Codec(allowed_types)
        self.delivery = delivery or DeliveryConfig()
        self.name = name
        self.label = name  # self.name, typed as set

    def reply_value(self, value: Any) -> Any:
        """A served graph's (or replier's) answer, decoded: a graph's output may hold the
        Interrupts it paused on."""
        return self.codec.decode(value, (Interrupt,))

    @abstractmethod
    async def run(self, state: Any, config: RunnableConfig,
                  transport: Transport) -> dict[str, Any]:
        """The node's work on ``transport``; returns the state update."""

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> dict[str, Any]:
        refuse_options(self.label, kwargs, CALL_TAKES)
        async with using(self.transport, self.home) as transport:
            return await self.run(input, ensure_config(config), transport)

    def invoke(self, input: Any, config: RunnableConfig | None = None,
               **kwargs: Any) -> dict[str, Any]:
        refuse_options(self.label, kwargs, CALL_TAKES)
        return run_sync(self._on_own_loop(input, ensure_config(config)))

    async def _on_own_loop(self, state: Any, config: RunnableConfig) -> dict[str, Any]:
        async with using(None, self._sync_home()) as transport:
            return await self.run(state, config, transport)

    def _sync_home(self) -> str | Path | None:
        if self.transport is None:
            return self.home
        if isinstance(self.transport, Client):
            return self.transport.home
        raise ConfigError(
            f"{self.label} was given a {type(self.transport).__name__}, which runs on its own "
            f"event loop: run the graph with 'await graph.ainvoke(...)', or give the node a "
            f"daemon Client (or no transport) to use it under graph.invoke")
