"""A compiled graph served to trusted peers, and the graph-like object that calls it by hostname.

LangGraph's own ``RemoteGraph`` needs the URL of a LangGraph Server; this one needs the peer's
hostname and a port, and works with both peers behind NAT.

Everything is request/reply (:mod:`pilot_agents.patterns.reqrep`) on one port: ``invoke`` is one
request. A stream is pulled: ``stream`` starts the run on the server and names it, then each
``next`` returns the updates produced since the last one (waiting up to a few seconds for at
least one), until the run has ended. The server holds a bounded number of updates per run, so a
slow caller holds up its run instead of filling the server's memory, and it cancels a run whose
caller stopped asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, ensure_config
from langgraph.types import Command, Interrupt, interrupt

from ...errors import (
    BusyError,
    ConfigError,
    ConnectionClosedError,
    PilotError,
    PilotTimeoutError,
    StoppedError,
    WireError,
)
from ...patterns.frames import MAX_PAYLOAD
from ...patterns.reqrep import Replier, ReqRepConfig, Request, Requester, serve, serving
from ...patterns.shares import check_share, peer_share
from ...transport import DEFAULT_TIMEOUT, Transport
from .base import (
    BoundedMemory,
    PilotNode,
    bounded,
    contained,
    interrupt_answers,
    iterate_sync,
    refuse_options,
    using,
)
from .codec import GRAPH, MARK, Codec, is_json, parse
from .nodes import AllowedTypes, call, decoded, to_bytes

Graph = Runnable[Any, Any]  # a compiled graph, or any Runnable with LangGraph's astream
INTERRUPT = "__interrupt__"  # where LangGraph puts a paused run's interrupts in its output


@dataclass(frozen=True)
class ServeGraphConfig:
    """The bounds of a served graph."""

    max_streams: int = 16  # streamed runs kept at once; a caller beyond that gets BusyError
    # ... and of one peer node (the callers on a daemon share its node's), so that one trusted
    # peer cannot hold every stream and lock the others out. None: half of max_streams (8 of
    # 16): a node running several agents that stream this graph at once may still stream as
    # many, and whatever one peer holds, the other half stays for the rest.
    max_streams_per_peer: int | None = None
    buffered_updates: int = 64  # updates a streamed run may get ahead of its caller
    poll_wait: float = 10.0  # seconds a ``next`` waits for an update before answering none
    idle_timeout: float = 60.0  # seconds without a ``next`` before a streamed run is cancelled
    reqrep: ReqRepConfig = field(default_factory=ReqRepConfig)  # runs at once, streams per peer
    # True: a peer's thread_id is the graph's thread as is, so (with a checkpointer) every peer
    # reads, continues and answers the interrupts of every other peer's threads of that name.
    # Only for peers that work on the same threads on purpose and trust each other with them.
    shared_threads: bool = False

    def __post_init__(self) -> None:
        for name in ("max_streams", "buffered_updates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ServeGraphConfig.{name} must be at least 1")
        check_share(self, "max_streams", "max_streams_per_peer")
        if not 0 < self.poll_wait < self.idle_timeout:
            raise ConfigError("ServeGraphConfig.poll_wait must be positive and below "
                              "idle_timeout (seconds)")

    @property
    def streams_per_peer(self) -> int:
        """The streamed runs of one peer kept at once: ``max_streams_per_peer``, or half of
        ``max_streams``."""
        return peer_share(self.max_streams_per_peer, self.max_streams, 2)


def servable(graph: Graph) -> Graph:
    """``graph``, checked to run as a served graph runs it (``ainvoke``, ``astream``): else
    the server would start, and each of its callers get an AttributeError from its run."""
    if all(callable(getattr(graph, name, None)) for name in ("ainvoke", "astream")):
        return graph
    kind = type(graph).__name__
    if callable(getattr(graph, "compile", None)):
        raise ConfigError(f"serve_graph takes a compiled graph, and this {kind} is its "
                          f"builder: call .compile() on it first")
    raise ConfigError(f"serve_graph takes a compiled graph (with ainvoke and astream), not a "
                      f"{kind}")


# What a remote graph's astream and stream take (its invoke and ainvoke: CALL_TAKES).
STREAM_TAKES = "an input, a config and stream_mode='updates' only"

_END = object()


def _last(updates: list[Any]) -> bool:
    """True if ``updates`` ends with the end of its run (or the error that ended it)."""
    return updates[-1] is _END or isinstance(updates[-1], Exception)


def _stopped(said: str) -> StoppedError:
    return StoppedError(f"the graph {said}")


RunKey = tuple[str, str]  # (the caller's node id, the run id): a run is its caller's alone
CANCEL_WAIT = 5.0  # seconds at most a caller waits for the answer to its cancel
REMEMBERED_CANCELS = 1024  # cancels of runs not (yet) here a server remembers


class _Run:
    """A streamed run: the task that runs the graph, and its updates not yet fetched."""

    def __init__(self, key: RunKey, buffered: int) -> None:
        self.key = key
        self.updates: asyncio.Queue[Any] = asyncio.Queue(buffered)
        self.task: asyncio.Task[None] | None = None
        self.last_asked = time.monotonic()
        # Taken from ``updates`` but left for the next fetch: an update that would make a
        # batch too large, or the error that ended the run, kept behind the updates before it.
        self.held: Any = None


class GraphServer:
    """The req/rep handler that runs ``graph`` for trusted peers (:meth:`handle`). A request is
    a graph call (from :class:`PilotRemoteGraph`) or a bare value, taken as the input state
    (from :class:`~pilot_agents.integrations.langgraph.PilotRequest` or any requester).

    A run belongs to the peer that started it: its id means something only with that peer's
    node id, so another peer that learns it can neither fetch its updates nor cancel it. The
    caller names its runs, invoke calls included, so it can cancel one whose answer it gave up
    waiting for; a cancel may overtake its run on another stream, so cancels of runs not here
    are remembered (the last ``REMEMBERED_CANCELS``) and such a run is not started.

    A thread belongs to its peer too, unless ``config.shared_threads``: the graph runs a peer's
    ``thread_id`` as :func:`peer_thread` of it, everywhere (runs, resumes, the interrupts a
    ``pending`` asks for). Another peer naming the same ``thread_id`` gets a thread of its own,
    new as LangGraph makes any thread it has no checkpoint of, and cannot read, continue or
    answer the first one's. What goes back (states, updates, interrupts) holds no thread id."""

    def __init__(self, graph: Graph, allowed_types: AllowedTypes = (),
                 config: ServeGraphConfig | None = None) -> None:
        self.graph = servable(graph)
        self.codec = Codec(allowed_types)
        self.config = config or ServeGraphConfig()
        self._runs: dict[RunKey, _Run] = {}  # streamed
        self._invoking: dict[RunKey, asyncio.Task[Any]] = {}
        self._cancelled: BoundedMemory[RunKey, bool] = BoundedMemory(REMEMBERED_CANCELS)

    async def handle(self, request: Request) -> object:
        body = parse(request.data)
        caller = request.sender
        if not (isinstance(body, dict) and body.get(MARK) == GRAPH):
            return await self._invoke(self._input(body, caller), RunnableConfig(), None)
        op = body.get("op")
        key = self._key(caller, body.get("run"))
        if op == "invoke":
            return await self._invoke(self._input(body.get("input"), caller),
                                      self._config(body.get("config"), caller), key)
        if op == "stream":
            return to_bytes({"run": self._start(key or (caller, uuid.uuid4().hex),
                                                self._input(body.get("input"), caller),
                                                self._config(body.get("config"), caller))})
        if op == "next":
            return await self._next(self._run(key, body.get("run")))
        if op == "pending":
            return await self._pending(self._config(body.get("config"), caller))
        if op == "cancel":
            return to_bytes({"cancelled": key is not None and self._cancel(key)})
        raise ConfigError(f"a graph call names an unknown op {op!r}")

    def close(self) -> None:
        """Cancel every run."""
        runs, self._runs = list(self._runs.values()), {}
        tasks = [run.task for run in runs if run.task is not None]
        for task in [*tasks, *self._invoking.values()]:
            task.cancel()

    @staticmethod
    def _key(caller: str, run_id: object) -> RunKey | None:
        if run_id is None:
            return None  # a caller that does not name its runs: the server names a stream's
        if not isinstance(run_id, str) or not 0 < len(run_id) <= 64:
            raise ConfigError(f"a run id is a string of 1 to 64 characters, not {run_id!r}")
        return caller, run_id

    def _config(self, raw: Any, caller: str) -> RunnableConfig:
        """:func:`peer_config` of ``raw``, its thread made ``caller``'s own."""
        config = peer_config(raw)
        configurable = config.get("configurable") or {}
        if self.config.shared_threads or "thread_id" not in configurable:
            return config
        return RunnableConfig(configurable={
            **configurable, "thread_id": peer_thread(caller, configurable["thread_id"])})

    def _input(self, state: Any, caller: str) -> Any:
        """A caller's input state; a resume (``Command(resume=...)``) is the one instruction
        to the graph it may send."""
        try:
            return self.codec.decode(state, (Command,))
        except WireError as exc:
            raise WireError(f"refused the input of {caller}: {exc}") from None

    def _cancel(self, key: RunKey) -> bool:
        run = self._runs.pop(key, None)
        task = self._invoking.get(key) if run is None else run.task
        if task is None:
            self._cancelled.add(key, True)
            return False
        task.cancel()
        return True

    def _claim(self, key: RunKey) -> None:
        """Check that ``key`` may start now."""
        if key in self._runs or key in self._invoking:
            raise ConfigError(f"run {key[1]!r} is running already: name each run anew")
        if self._cancelled.get(key):
            raise ConnectionClosedError(f"run {key[1]!r} was cancelled before it came")

    async def _run_graph(self, state: Any, config: RunnableConfig) -> Any:
        """The graph's output; a node's sys.exit() fails this run only (contained)."""
        with contained(_stopped):
            return await self.graph.ainvoke(state, config)

    async def _invoke(self, state: Any, config: RunnableConfig, key: RunKey | None) -> bytes:
        if key is None:
            output = await self._run_graph(state, config)
            return to_bytes(self.codec.encode(output, "the graph's output"))
        self._claim(key)
        # A task of its own: a cancel ends the run, not the worker of serve() that awaits it.
        run = self._invoking[key] = asyncio.create_task(self._run_graph(state, config))
        try:
            output = await run
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the server is closing
            raise ConnectionClosedError(f"run {key[1]!r} was cancelled by its caller") from None
        finally:
            self._invoking.pop(key, None)
        return to_bytes(self.codec.encode(output, "the graph's output"))

    async def _pending(self, config: RunnableConfig) -> bytes:
        """The interrupts the thread of ``config`` waits on an answer to (none without a
        checkpointer or a thread)."""
        get_state = getattr(self.graph, "aget_state", None)
        if get_state is None or "thread_id" not in (config.get("configurable") or {}):
            return to_bytes([])
        try:
            snapshot = await get_state(config)
        except ValueError:  # LangGraph: "No checkpointer set"
            return to_bytes([])
        return to_bytes(self.codec.encode(list(snapshot.interrupts), "the interrupts"))

    def _start(self, key: RunKey, state: Any, config: RunnableConfig) -> str:
        if len(self._runs) >= self.config.max_streams:
            raise BusyError(f"this graph streams {self.config.max_streams} runs at once "
                            f"already (ServeGraphConfig.max_streams); try again later")
        theirs = sum(caller == key[0] for caller, _ in self._runs)  # of max_streams at most
        if theirs >= self.config.streams_per_peer:
            raise BusyError(f"this graph streams {theirs} runs of your node at once already "
                            f"(ServeGraphConfig.max_streams_per_peer); try again later")
        self._claim(key)
        run = self._runs[key] = _Run(key, self.config.buffered_updates)
        run.task = asyncio.create_task(self._produce(run, state, config))
        self._watch(run)
        return key[1]

    def _watch(self, run: _Run) -> None:
        """Cancel ``run`` once nobody has asked for its updates for ``idle_timeout`` seconds.
        A caller that died or lost its tunnel never says so: without a clock of its own its run
        would go on (or wait on its full buffer) for as long as the server runs."""
        if self._runs.get(run.key) is not run:
            return  # it ended, was cancelled, or the server closed
        idle = time.monotonic() - run.last_asked
        if idle < self.config.idle_timeout:
            asyncio.get_running_loop().call_later(self.config.idle_timeout - idle, self._watch,
                                                  run)
            return
        del self._runs[run.key]
        if run.task is not None:
            run.task.cancel()

    async def _produce(self, run: _Run, state: Any, config: RunnableConfig) -> None:
        try:
            with contained(_stopped):
                async for update in self.graph.astream(state, config, stream_mode="updates"):
                    # Encoded here, so a fetch knows each update's size (_next).
                    await run.updates.put(to_bytes(self.codec.encode(
                        update, "an update of the graph")))
        except Exception as exc:  # the caller's to see, at its next fetch
            await run.updates.put(exc)
        else:
            await run.updates.put(_END)

    def _run(self, key: RunKey | None, run_id: object) -> _Run:
        run = None if key is None else self._runs.get(key)
        if run is None:
            # Another caller's run is not told apart from none: its id is no capability.
            raise ConfigError(f"no streamed run {run_id!r} of yours here: it ended, was "
                              f"cancelled, or nobody asked for its updates for "
                              f"{self.config.idle_timeout} s")
        run.last_asked = time.monotonic()
        return run

    async def _next(self, run: _Run) -> bytes:
        """The updates ready now, waiting up to ``poll_wait`` seconds for the first; as many
        as one tunnel message carries (one at least), the rest left for the next fetch."""
        updates: list[Any] = [] if run.held is None else [run.held]
        run.held = None
        if not updates:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_wait):
                    updates.append(await run.updates.get())
        size = _batch_size(updates)
        while updates and not _last(updates) and not run.updates.empty():
            update = run.updates.get_nowait()
            if isinstance(update, bytes) and size + len(update) + 1 > MAX_PAYLOAD:
                run.held = update
                break
            updates.append(update)
            size += len(update) + 1 if isinstance(update, bytes) else 0
        if len(updates) > 1 and isinstance(updates[-1], Exception):
            # The updates before the error go first, as a local astream yields them before it
            # raises; the error is the next fetch's answer.
            run.held = updates.pop()
            return _batch(updates, done=False)
        done = bool(updates) and _last(updates)
        if done:
            if self._runs.get(run.key) is run:
                del self._runs[run.key]
            if isinstance(updates[-1], Exception):
                raise updates[-1]
            updates.pop()
        return _batch(updates, done)


_BATCH_FRAME = (b'{"updates":[', b'],"done":%s}')  # around updates encoded one by one


def _batch(updates: list[bytes], done: bool) -> bytes:
    """``{"updates": updates, "done": done}`` as message bytes, of updates already encoded."""
    head, tail = _BATCH_FRAME
    return head + b",".join(updates) + tail % (b"true" if done else b"false")


def _batch_size(updates: list[Any]) -> int:
    """The size of :func:`_batch` of the encoded ones of ``updates``, ``done`` false."""
    encoded = [u for u in updates if isinstance(u, bytes)]
    return len(_batch(encoded, done=False))


def peer_config(raw: Any) -> RunnableConfig:
    """What a peer may set of our graph's config: the plain-JSON ``configurable`` entries
    (``thread_id`` and the graph's own), not LangGraph's internal ones."""
    configurable = raw.get("configurable") if isinstance(raw, dict) else None
    if not isinstance(configurable, dict):
        return RunnableConfig()
    return RunnableConfig(configurable=forwardable(configurable))


def peer_thread(node_id: str, thread_id: object) -> str:
    """The thread of a served graph that the peer ``node_id`` calls ``thread_id`` (a string or
    an integer): the id the graph runs it as, and its checkpoints are listed under. A node id
    has no ``:``, so two peers' threads never share one."""
    return f"{node_id}:{checked_thread(thread_id)}"


def checked_thread(thread_id: object) -> str | int:
    """``thread_id`` if it is a string or an integer, else a ConfigError."""
    if isinstance(thread_id, bool) or not isinstance(thread_id, str | int):
        raise ConfigError(f"a thread_id is a string or an integer, not a "
                          f"{type(thread_id).__name__} (a caller sends a UUID as its string)")
    return thread_id


def forwardable(configurable: dict[str, Any]) -> dict[str, Any]:
    """The ``configurable`` entries a caller passes on: plain JSON, not LangGraph's own, and
    the ``thread_id`` always, or a ConfigError: a thread dropped on the way would make every
    call a run on no thread. A UUID (what LangGraph's examples use) goes as its string."""
    forwarded = {k: v for k, v in configurable.items()
                 if not k.startswith(("__", "checkpoint_")) and is_json(v)}
    if "thread_id" in configurable:
        thread_id = configurable["thread_id"]
        forwarded["thread_id"] = checked_thread(
            str(thread_id) if isinstance(thread_id, uuid.UUID) else thread_id)
    return forwarded


async def serve_graph(graph: Graph, port: int, transport: Transport | None = None, *,
                      home: str | Path | None = None, allowed_types: AllowedTypes = (),
                      config: ServeGraphConfig | None = None) -> None:
    """Run ``graph`` for every request trusted peers send to ``port``, until cancelled; up to
    ``config.reqrep.handler_concurrency`` requests at once. A run that raises is answered with
    an error the caller raises as :class:`~pilot_agents.errors.RemoteError`. Peers may set the
    run's ``thread_id``, which names a thread of their own (:func:`peer_thread`): with a
    checkpointer each continues its own threads, never another peer's. With
    ``config.shared_threads`` every peer continues every thread of the name it gives, and
    answers its interrupts: set it only for peers you would let do that."""
    server = GraphServer(graph, allowed_types, config)
    try:
        async with using(transport, home) as t:
            await serve(t, port, server.handle, server.config.reqrep)
    finally:
        server.close()


@contextlib.asynccontextmanager
async def serving_graph(graph: Graph, port: int, transport: Transport | None = None, *,
                        home: str | Path | None = None, allowed_types: AllowedTypes = (),
                        config: ServeGraphConfig | None = None) -> AsyncIterator[Replier]:
    """:func:`serve_graph` in the background for the ``async with`` block; the port is listened
    on before the block starts."""
    server = GraphServer(graph, allowed_types, config)
    try:
        async with using(transport, home) as t, \
                serving(t, port, server.handle, server.config.reqrep) as replier:
            yield replier
    finally:
        server.close()


class PilotRemoteGraph(PilotNode):
    """A graph served by :func:`serve_graph` on ``port`` of the peer ``to``, used like a local
    compiled graph: ``invoke``/``ainvoke`` return its output state, ``astream``/``stream`` its
    updates as they happen (``stream_mode="updates"``: ``{node: update}`` per step). As a node
    (``builder.add_node("analyze", PilotRemoteGraph("analyzer", 2001))``) it is given the
    parent's state, and its output state is the node's update.

    The config passed on is the ``configurable`` part's plain-JSON entries, ``thread_id``
    included, so a served graph with a checkpointer keeps a thread per caller thread (its
    caller's alone, unless it shares threads: :class:`ServeGraphConfig`). As a node
    of a checkpointed graph, a remote ``interrupt()`` pauses the parent graph, and resuming the
    parent answers the remote thread. ``timeout``: seconds for an ``invoke``, and for each
    fetch of a stream's updates."""

    def __init__(self, to: str, port: int, *, timeout: float = DEFAULT_TIMEOUT,
                 transport: Transport | None = None, home: str | Path | None = None,
                 allowed_types: AllowedTypes = (), name: str | None = None) -> None:
        super().__init__(transport=transport, home=home, allowed_types=allowed_types,
                         delivery=None, name=name or f"PilotRemoteGraph({to}, {port})")
        self.to, self.port = to, port
        self.timeout = bounded(timeout, self.label)

    async def run(self, state: Any, config: RunnableConfig,
                  transport: Transport) -> dict[str, Any]:
        forwarded = {"configurable": forwardable(dict(config.get("configurable") or {}))}
        if not self._interrupts_pass(config, forwarded):
            return await self._invoke(transport, state, forwarded)
        answers = interrupt_answers(config)
        # LangGraph gives this task's n-th interrupt() call the n-th answer of all its runs.
        # The answers taken before went on to the remote thread when they came: their calls
        # are made again (each returns its answer at once), so the next call gets the new one.
        for _ in range(answers.taken):
            interrupt(None)
        pending: list[Interrupt] = []
        if answers.taken or answers.new:
            # Resumed: the remote thread still waits, so it is answered, not run again. Only
            # then: a new run of the parent (new input) starts the remote thread anew, as it
            # does a local subgraph, even while that thread waits on an older question.
            pending = self._interrupts(await call(transport, self.to, self.port,
                                                  self._body("pending", config=forwarded),
                                                  self.timeout, self.reply_value))
        output = ({INTERRUPT: pending} if pending
                  else await self._invoke(transport, state, forwarded))
        while interrupts := self._interrupts(output.get(INTERRUPT, [])):
            # Our interrupt() pauses the parent graph with the remote question; once the parent
            # is resumed it returns the answer, which goes on to the remote thread at once, so
            # every answer taken has been passed on (of several questions, one at a time).
            question = interrupts[0]
            output = await self._invoke(transport, Command(resume={
                question.id: interrupt(question.value)}), forwarded)
        return output

    def _interrupts(self, value: object) -> list[Interrupt]:
        """``value`` checked to be what a served graph gives: a list of LangGraph Interrupts.
        A replier that is no served graph (or a hostile one) answers anything, and its answer
        must not reach LangGraph's interrupt() or crash the parent graph deep inside."""
        if isinstance(value, list) and all(isinstance(i, Interrupt) and isinstance(i.id, str)
                                           for i in value):
            return value
        raise ConfigError(f"{self.label} answered a {type(value).__name__} where a served "
                          f"graph gives a list of interrupts: does {self.to} serve a graph "
                          f"with serve_graph on port {self.port}?")

    async def _invoke(self, transport: Transport, state: Any,
                      forwarded: dict[str, Any]) -> dict[str, Any]:
        run_id = uuid.uuid4().hex
        body = self._body("invoke", input=self.codec.encode(state, "the graph's input"),
                          config=forwarded, run=run_id)
        try:
            output = await call(transport, self.to, self.port, body, self.timeout,
                                self.reply_value)
        except (PilotTimeoutError, asyncio.CancelledError):
            # Nobody will read the answer: the server's run need not go on.
            await self._cancel(lambda: call(transport, self.to, self.port,
                                            self._body("cancel", run=run_id),
                                            min(self.timeout, CANCEL_WAIT),
                                            self.reply_value))
            raise
        if not isinstance(output, dict):
            raise ConfigError(f"{self.label} answered a {type(output).__name__}, not a state")
        return output

    @staticmethod
    def _interrupts_pass(config: RunnableConfig, forwarded: dict[str, Any]) -> bool:
        """A node of a graph with a thread (so a checkpointer) passes the remote graph's
        interrupts on to its own graph; called from anywhere else it returns them."""
        return ("langgraph_node" in (config.get("metadata") or {})
                and "thread_id" in forwarded["configurable"])

    def _body(self, op: str, **fields: Any) -> bytes:
        return to_bytes({MARK: GRAPH, "op": op, **fields})

    @staticmethod
    async def _cancel(ask: Callable[[], Awaitable[Any]]) -> None:
        """Cancel a run whose caller gave up on it, as well as can be: the server cancels a
        stream nobody fetches from on its own, and an invoke it cannot be told of runs on."""
        with contextlib.suppress(PilotError):
            await ask()

    async def astream(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any | None) -> AsyncIterator[dict[str, Any]]:
        config = ensure_config(config)
        if self._as_node(config, kwargs):
            yield await self.ainvoke(input, config)
            return
        async with using(self.transport, self.home) as transport, \
                contextlib.aclosing(self._pull(transport, input, config)) as updates:
            async for update in updates:
                yield update  # closed early, the block closes _pull at once: it cancels the run

    async def _pull(self, transport: Transport, state: Any,
                    config: RunnableConfig) -> AsyncGenerator[dict[str, Any], None]:
        async with Requester(transport) as requester:
            async def ask(op: str, timeout: float = self.timeout, **fields: Any) -> Any:
                reply = await requester.request(self.to, self.port, self._body(op, **fields),
                                                timeout=timeout)
                return parse(reply.data)

            # Named here, so a start whose answer does not come in time can be cancelled too.
            run_id = uuid.uuid4().hex
            done = False
            try:
                started = await ask("stream", run=run_id,
                                    input=self.codec.encode(state, "the graph's input"),
                                    config={"configurable": forwardable(
                                        dict(config.get("configurable") or {}))})
                if isinstance(started, dict) and isinstance(started.get("run"), str):
                    run_id = started["run"]  # a server that names runs itself
                while not done:
                    batch = await ask("next", run=run_id)
                    if not isinstance(batch, dict) or not isinstance(batch.get("updates"), list):
                        raise ConfigError(f"{self.label} answered a stream fetch with "
                                          f"something else: is it a served graph?")
                    done = bool(batch.get("done"))
                    for update in batch["updates"]:
                        yield decoded(self.reply_value, update, self.to, self.port)
            finally:
                if not done:  # the caller stopped early: the server's run need not go on
                    await self._cancel(lambda: ask("cancel", min(self.timeout, CANCEL_WAIT),
                                                   run=run_id))

    def stream(self, input: Any, config: RunnableConfig | None = None,
               **kwargs: Any | None) -> Iterator[dict[str, Any]]:
        config = ensure_config(config)
        if self._as_node(config, kwargs):
            yield self.invoke(input, config)
            return
        home = self._sync_home()

        async def updates() -> AsyncGenerator[dict[str, Any], None]:
            async with using(None, home) as transport, \
                    contextlib.aclosing(self._pull(transport, input, config)) as pulled:
                async for update in pulled:
                    yield update

        yield from iterate_sync(updates, close_wait=self.timeout)

    def _as_node(self, config: RunnableConfig, kwargs: dict[str, Any]) -> bool:
        """LangGraph streams a node (under ``astream_events``) and wants its output, not its
        updates: a call from inside a graph's task without a ``stream_mode`` is that. Other
        options of a local graph's stream (``subgraphs=True``, ``interrupt_before=``...) are
        refused: the served graph would not act on them."""
        options = dict(kwargs)
        mode = options.pop("stream_mode", None)
        if mode not in (None, "updates"):
            raise ConfigError(f"{self.label} streams stream_mode='updates' only, not {mode!r}")
        refuse_options(self.label, options, STREAM_TAKES)
        return mode is None and "langgraph_node" in (config.get("metadata") or {})
