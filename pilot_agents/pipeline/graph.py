"""An agent's steps as a LangGraph graph: the integrations' nodes (PilotSend, PilotReceive,
PilotRequest, McpTool; publish/subscribe from :mod:`.pubsub`) and the user's Python functions or
compiled graphs, joined by the agent's edges. Builds without touching the network, so it is
tested on its own."""

from __future__ import annotations

import functools
import importlib
import inspect
import reprlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.pregel import Pregel
from langgraph.types import Command, RetryPolicy

from ..errors import PipelineError, PortClosedError, stops_as
from ..integrations.langgraph import PilotReceive, PilotRequest, PilotSend
from ..integrations.langgraph.base import read_key
from ..transport import Transport
from .load import LoadedPipeline
from .mcp import mcp_node
from .pubsub import PublishNode, SubscribeNode
from .schema import (
    McpStep,
    PilotReceiveStep,
    PilotRequestStep,
    PilotSendStep,
    Pipeline,
    PublishStep,
    PythonStep,
    RequestCall,
    Settings,
    StepBase,
    SubscribeStep,
)


def merge(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, Any]:
    """The state's reducer: a node's update sets its keys, the others stay."""
    return {**(old or {}), **(new or {})}


_PREVIEW = reprlib.Repr()  # a value in an error message: a glimpse, not the whole of it
_PREVIEW.maxstring = _PREVIEW.maxother = 60

INPUT_RULE = "an agent's input must be a mapping (an object of state keys)"


def _described(value: Any) -> str:
    """``value`` in an error message: "a str 'what is 6*7?'"."""
    if value is None:
        return "None"
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} {_PREVIEW.repr(value)}"


def state_of(agent: str) -> Any:
    """``agent``'s state: an open dict, so steps need not declare the keys they write. Its
    first update is the graph's input, which for a serving agent is a request's value: one
    that is no mapping is a PipelineError naming the agent (which its requester raises as a
    RemoteError), not the reducer's bare "'str' object is not a mapping"."""
    def merge_checked(old: Mapping[str, Any] | None, new: Any) -> dict[str, Any]:
        if new is not None and not isinstance(new, Mapping):
            raise PipelineError(f"agent {agent} was given {_described(new)}: {INPUT_RULE}, "
                                f"and so must each step's update")
        return merge(old, new)
    return Annotated[dict[str, Any], merge_checked]


# Values that arrive at a serving agent as anything but a mapping, whatever their content (an
# object of another class may arrive as its fields: the serving agent's check is the last word).
_NOT_MAPPINGS = (str, bytes, bytearray, int, float, list, tuple, set, frozenset)


class RequestNode(PilotRequest):
    """A ``pilot_request`` step. What it sends is the input state of the agent serving the
    port, so a value that cannot arrive there as a mapping is refused before it is sent."""

    def __init__(self, call: RequestCall, target: str, *, transport: Transport | None,
                 home: str | Path | None, name: str) -> None:
        super().__init__(call.to, call.port, call.key, call.result_key, timeout=call.timeout,
                         transport=transport, home=home, name=name)
        self.target = target

    async def run(self, state: Any, config: RunnableConfig,
                  transport: Transport) -> dict[str, Any]:
        value = read_key(state, self.key, self.label)
        if value is None or isinstance(value, _NOT_MAPPINGS):
            raise PipelineError(f"step {self.label}: the state key {self.key!r} holds "
                                f"{_described(value)}, which this pilot_request would send "
                                f"to agent {self.target} as its input: {INPUT_RULE}")
        return await super().run(state, config, transport)


def resolve(dotted: str, folder: Path) -> Any:
    """The object ``module:attr`` (or ``module.attr``) names; the pipeline's folder is searched
    first, so a module next to the pipeline file imports."""
    module_name, _, attr = dotted.partition(":")
    if not attr:
        module_name, _, attr = dotted.rpartition(".")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError(f"cannot import {module_name!r} for {dotted!r} ({exc}); it is looked "
                            f"for in {folder} and the installed packages") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PipelineError(f"{module_name} has no {attr!r} (for {dotted!r})") from None
    return obj


def python_node(step: PythonStep, folder: Path, node: str) -> Any:
    """A compiled graph as itself (a subgraph); a function with the step's ``args`` bound, whose
    result is checked to be state updates (LangGraph's own error would name neither the step
    nor the function: "'int' object is not a mapping")."""
    target = resolve(step.python, folder)
    if isinstance(target, Pregel):
        if step.args:
            raise PipelineError(f"{step.python} is a compiled graph, which takes no args")
        return target
    if not callable(target):
        raise PipelineError(f"{step.python} is a {type(target).__name__}, not a function or a "
                            "compiled graph")

    def updates(result: Any) -> Any:
        if result is None or isinstance(result, Mapping | Command):
            return result
        raise PipelineError(f"step {node}: {step.python} returned {type(result).__name__} "
                            f"{_PREVIEW.repr(result)}, where a step returns a dict of the state's "
                            "keys to set (or None)")

    def stopped(said: str) -> PipelineError:
        return PipelineError(f"step {node}: {step.python} {said}")

    # SystemExit and KeyboardInterrupt (stops_as): past this point asyncio would raise them out
    # of its event loop, where the graph's generators, stopped mid-step, failed the agent with
    # an unrelated RuntimeError and no event naming the step. (A real Ctrl-C never arrives
    # here: the runtime's handler turns it into a cancel, and a step's thread does not receive
    # signals.)
    # (**kwargs: what LangGraph passes a function that asks for it, config say, by the
    # signature update_wrapper gives the wrapper: the function's own)
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
            type(target).__call__):  # (an object whose __call__ is async)
        async def call_async(state: dict[str, Any], **kwargs: Any) -> Any:
            with stops_as(stopped):
                result = await target(state, **step.args, **kwargs)
            return updates(result)
        return functools.update_wrapper(call_async, target)

    def call(state: dict[str, Any], **kwargs: Any) -> Any:
        with stops_as(stopped):
            result = target(state, **step.args, **kwargs)
        return updates(result)
    return functools.update_wrapper(call, target)


def step_node(pipeline: Pipeline, name: str, index: int, folder: Path,
              transport: Transport | None, home: str | Path | None) -> Any:
    """What runs agent ``name``'s step ``index``: a Runnable of the integrations, or the
    user's function."""
    agent = pipeline.agents[name]
    step, node = agent.steps[index], agent.node_ids()[index]
    if isinstance(step, PythonStep):
        return python_node(step, folder, node)
    if isinstance(step, PilotSendStep):
        s = step.pilot_send
        return PilotSend(s.to, s.port, s.key, timeout=s.timeout, transport=transport,
                         home=home, name=node)
    if isinstance(step, PilotReceiveStep):
        r = step.pilot_receive
        return PilotReceive(r.port, r.key, timeout=r.timeout, transport=transport, home=home,
                            name=node)
    if isinstance(step, PilotRequestStep):
        q = step.pilot_request
        return RequestNode(q, pipeline.agent_named(q.to) or q.to, transport=transport,
                           home=home, name=node)
    if isinstance(step, McpStep):
        return mcp_node(agent.mcp_servers[step.mcp.server], step.mcp)
    if isinstance(step, PublishStep):
        port = step.publish.port
        rank = sum(1 for s in agent.steps[:index + 1]
                   if isinstance(s, PublishStep) and s.publish.port == port)
        return PublishNode(step.publish, pipeline.subscribers_of(name, port, rank),
                           transport=transport, home=home, name=node)
    if isinstance(step, SubscribeStep):
        target = pipeline.agent_named(step.subscribe.to) or step.subscribe.to
        return SubscribeNode(step.subscribe, pipeline.hostname(target),
                             pipeline.settings.retry_interval, transport=transport, home=home,
                             name=node)
    raise AssertionError(f"no node for a {type(step).__name__}")


def _retry(step: StepBase, settings: Settings) -> RetryPolicy | None:
    """A request to a replier that does not listen yet is tried again, for up to its timeout."""
    if not isinstance(step, PilotRequestStep):
        return None
    tries = max(1, int(step.pilot_request.timeout / settings.retry_interval))
    return RetryPolicy(initial_interval=settings.retry_interval, backoff_factor=1.0,
                       max_interval=settings.retry_interval, max_attempts=tries, jitter=False,
                       retry_on=PortClosedError)


def build_graph(pipeline: LoadedPipeline, agent: str, *, transport: Transport | None = None,
                home: str | Path | None = None) -> CompiledStateGraph[Any, Any, Any, Any]:
    """``agent``'s graph. The pilot steps talk through ``transport`` (else the daemon of
    ``home``, else of ``$PILOT_HOME``)."""
    spec = pipeline.spec.agents.get(agent)
    if spec is None:
        raise PipelineError(f"{pipeline.path} has no agent {agent!r} (it has "
                            f"{', '.join(pipeline.spec.agents)})")
    builder: StateGraph[Any, Any, Any, Any] = StateGraph(state_of(agent))
    for index, (step, node) in enumerate(zip(spec.steps, spec.node_ids(), strict=True)):
        action: Runnable[Any, Any] | Any = step_node(pipeline.spec, agent, index,
                                                     pipeline.folder, transport, home)
        builder.add_node(node, action, retry_policy=_retry(step, pipeline.spec.settings))
    ends = {"START": START, "END": END}
    for a, b in spec.graph_edges():
        builder.add_edge(ends.get(a, a), ends.get(b, b))
    return builder.compile(name=f"{pipeline.name}/{agent}")
