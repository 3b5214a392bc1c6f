"""A compiled graph served to trusted peers, and the graph-like object that calls it by hostname.

LangGraph's own ``RemoteGraph`` needs the URL of a LangGraph Server; this one needs the peer's
hostname and a port, and works with both peers behind NAT."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

from langchain_core.runnables import Runnable, RunnableConfig, ensure_config

from ...errors import ConfigError
from ...patterns.reqrep import Handler, Replier, ReqRepConfig, Request, serve, serving
from ...transport import DEFAULT_TIMEOUT, Transport
from .base import DeliveryConfig, PilotNode, run_sync, using
from .codec import GRAPH, MARK, Codec, is_json, parse
from .nodes import AllowedTypes, call, to_bytes

Graph = Runnable[Any, Any]  # a compiled graph, or any Runnable with LangGraph's astream


def graph_handler(graph: Graph, allowed_types: AllowedTypes = ()) -> Handler:
    """The req/rep handler that runs ``graph`` for a request. A request is either a graph call
    (from :class:`PilotRemoteGraph`) or a bare value, taken as the input state (from
    :class:`~pilot_agents.integrations.langgraph.PilotRequest` or any requester)."""
    codec = Codec(allowed_types)

    async def handle(request: Request) -> object:
        body = parse(request.data)
        op: Any = "invoke"
        config = RunnableConfig()
        if isinstance(body, dict) and body.get(MARK) == GRAPH:
            op = body.get("op")
            config = peer_config(body.get("config"))
            body = body.get("input")
        state = codec.decode(body)
        if op == "invoke":
            output = await graph.ainvoke(state, config)
        elif op == "stream":
            output = [chunk async for chunk in graph.astream(state, config,
                                                              stream_mode="updates")]
        else:
            raise ConfigError(f"a graph call names an unknown op {op!r}")
        return to_bytes(codec.encode(output, "the graph's output"))

    return handle


def peer_config(raw: Any) -> RunnableConfig:
    """What a peer may set of our graph's config: the plain-JSON ``configurable`` entries
    (``thread_id`` and the graph's own), not LangGraph's internal ones."""
    configurable = raw.get("configurable") if isinstance(raw, dict) else None
    if not isinstance(configurable, dict):
        return RunnableConfig()
    return RunnableConfig(configurable=forwardable(configurable))


def forwardable(configurable: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in configurable.items()
            if not k.startswith(("__", "checkpoint_")) and is_json(v)}


async def serve_graph(graph: Graph, port: int, transport: Transport | None = None, *,
                      home: str | Path | None = None, allowed_types: AllowedTypes = (),
                      config: ReqRepConfig | None = None) -> None:
    """Run ``graph`` for every request trusted peers send to ``port``, until cancelled; up to
    ``config.handler_concurrency`` runs at once. A run that raises is answered with an error
    the caller raises as :class:`~pilot_agents.errors.RemoteError`. Peers may set the run's
    ``thread_id`` (so, with a checkpointer, continue any of its threads): serve only to peers
    you would let do that."""
    async with using(transport, home) as t:
        await serve(t, port, graph_handler(graph, allowed_types), config)


@contextlib.asynccontextmanager
async def serving_graph(graph: Graph, port: int, transport: Transport | None = None, *,
                        home: str | Path | None = None, allowed_types: AllowedTypes = (),
                        config: ReqRepConfig | None = None) -> AsyncIterator[Replier]:
    """:func:`serve_graph` in the background for the ``async with`` block; the port is listened
    on before the block starts."""
    async with using(transport, home) as t, \
            serving(t, port, graph_handler(graph, allowed_types), config) as replier:
        yield replier


class PilotRemoteGraph(PilotNode):
    """A graph served by :func:`serve_graph` on ``port`` of the peer ``to``, used like a local
    compiled graph: ``invoke``/``ainvoke`` return its output state, ``stream``/``astream`` its
    updates (``stream_mode="updates"``, ``{node: update}`` per step). Add it to a graph as a
    node (``builder.add_node("analyze", PilotRemoteGraph("analyzer", 2001))``): it is given the
    parent's state and its output state is the node's update.

    The config passed on is the ``configurable`` part's plain-JSON entries, ``thread_id``
    included, so a served graph with a checkpointer keeps a thread per caller thread.
    Updates arrive when the remote run has ended (in one reply), not live."""

    def __init__(self, to: str, port: int, *, timeout: float = DEFAULT_TIMEOUT,
                 transport: Transport | None = None, home: str | Path | None = None,
                 allowed_types: AllowedTypes = (), delivery: DeliveryConfig | None = None,
                 name: str | None = None) -> None:
        super().__init__(transport=transport, home=home, allowed_types=allowed_types,
                         delivery=delivery, name=name or f"PilotRemoteGraph({to}:{port})")
        self.to, self.port, self.timeout = to, port, timeout

    async def run(self, state: Any, config: RunnableConfig,
                  transport: Transport) -> dict[str, Any]:
        output = await self._call(transport, "invoke", state, config)
        if not isinstance(output, dict):
            raise ConfigError(f"{self.label} answered a {type(output).__name__}, not a state")
        return output

    async def _call(self, transport: Transport, op: str, state: Any,
                    config: RunnableConfig) -> Any:
        body = {MARK: GRAPH, "op": op, "input": self.codec.encode(state, "the graph's input"),
                "config": {"configurable": forwardable(dict(config.get("configurable") or {}))}}
        return await call(transport, self.to, self.port, to_bytes(body), self.timeout,
                          self.codec.decode)

    async def astream(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any | None) -> AsyncIterator[dict[str, Any]]:
        config = ensure_config(config)
        if self._as_node(config, kwargs):
            yield await self.ainvoke(input, config)
            return
        async with using(self.transport, self.home) as transport:
            chunks = await self._call(transport, "stream", input, config)
        for chunk in _chunks(chunks, self.label):
            yield chunk

    def stream(self, input: Any, config: RunnableConfig | None = None,
               **kwargs: Any | None) -> Iterator[dict[str, Any]]:
        config = ensure_config(config)
        if self._as_node(config, kwargs):
            yield self.invoke(input, config)
            return
        chunks = run_sync(self._stream_on_own_loop(input, config))
        yield from _chunks(chunks, self.label)

    async def _stream_on_own_loop(self, state: Any, config: RunnableConfig) -> Any:
        async with using(None, self._sync_home()) as transport:
            return await self._call(transport, "stream", state, config)

    def _as_node(self, config: RunnableConfig, kwargs: dict[str, Any]) -> bool:
        """LangGraph streams a node (under ``astream_events``) and wants its output, not its
        updates: a call from inside a graph's task without a ``stream_mode`` is that."""
        mode = kwargs.get("stream_mode")
        if mode not in (None, "updates"):
            raise ConfigError(f"{self.label} streams stream_mode='updates' only, not {mode!r}")
        return mode is None and "langgraph_node" in (config.get("metadata") or {})


def _chunks(chunks: Any, who: str) -> Iterable[dict[str, Any]]:
    if not (isinstance(chunks, list) and all(isinstance(c, dict) for c in chunks)):
        raise ConfigError(f"{who} answered a stream request with something else")
    return chunks
