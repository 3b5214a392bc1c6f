"""The pipeline file's schema: agents, their MCP servers, their steps and edges.

Strict (no coercion, no unknown keys), so a typo is an error naming its field rather than a
setting silently ignored. :mod:`.load` reads the YAML and turns every error into one message with
the file, line and field path; :func:`Pipeline.peers_of` derives the trust between agents from
the steps that reach another agent.
"""

from __future__ import annotations

import itertools
import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictStr,
    Tag,
    field_validator,
    model_validator,
)

from ..addressing import parse_beacon_list
from ..errors import ConfigError, FieldValueError, FieldValueErrors
from ..transport import DEFAULT_PORT

NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"  # a hostname label: what the beacon registers
STEP_ID = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
# module:attribute or module.attribute: a bare name names no attribute of a module.
DOTTED = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*|\.[A-Za-z_]\w*)$"
HOST_PORT = r"^[^\s:]+:[0-9]{1,5}$"
RESERVED_STEP_IDS = ("START", "END")

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
StateKey = Annotated[StrictStr, Field(min_length=1, max_length=200)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class McpServer(Strict):
    """A stdio MCP server, as an MCP client's ``mcpServers`` entry gives it."""

    command: Annotated[StrictStr, Field(min_length=1)]
    args: list[StrictStr] = []
    env: dict[StrictStr, StrictStr] = {}


# -- steps ---------------------------------------------------------------------------------


class StepBase(Strict):
    id: Annotated[StrictStr, Field(pattern=STEP_ID)] | None = None  # the graph node's name

    @property
    def kind(self) -> str:
        """The step's type: its one field besides ``id`` (and that field's options)."""
        return next(name for name in type(self).model_fields if name != "id")

    def node_id(self, index: int) -> str:
        """The graph node's name: ``id``, else KIND_INDEX (1-based)."""
        return self.id or f"{self.kind}_{index + 1}"

    def peer(self) -> str | None:
        """The agent this step reaches (sends to, asks, subscribes to), if any."""
        to = getattr(getattr(self, self.kind), "to", None)
        return to if isinstance(to, str) else None


class PythonStep(StepBase):
    """A function ``f(state, **args) -> dict`` (sync or async), or a compiled graph, named by
    ``module:attribute`` or ``module.attribute``; modules next to the pipeline file import."""

    python: Annotated[StrictStr, Field(pattern=DOTTED)]
    args: dict[StrictStr, Any] = {}


class McpCall(Strict):
    server: StrictStr  # a key of the agent's mcp_servers
    tool: Annotated[StrictStr, Field(min_length=1)]
    args: dict[StrictStr, Any] = {}  # constant arguments
    args_from_state: dict[StrictStr, StateKey] = {}  # tool argument -> state key
    result_key: StateKey = "result"
    timeout: Seconds = 60.0  # one call, the server's start included


class McpStep(StepBase):
    mcp: McpCall


class SendCall(Strict):
    to: StrictStr  # an agent of this pipeline, by name or hostname
    key: StateKey = "message"
    port: Port = DEFAULT_PORT
    timeout: Seconds = 30.0


class PilotSendStep(StepBase):
    pilot_send: SendCall


class ReceiveCall(Strict):
    key: StateKey = "message"
    port: Port = DEFAULT_PORT
    timeout: Seconds = 60.0


class PilotReceiveStep(StepBase):
    pilot_receive: ReceiveCall


class RequestCall(Strict):
    to: StrictStr
    port: Port
    key: StateKey
    result_key: StateKey
    timeout: Seconds = 30.0


class PilotRequestStep(StepBase):
    pilot_request: RequestCall


class PublishCall(Strict):
    port: Port
    topic: Annotated[StrictStr, Field(min_length=1)]
    key: StateKey
    timeout: Seconds = 30.0  # for the subscribers this file names to subscribe


class PublishStep(StepBase):
    publish: PublishCall


class SubscribeCall(Strict):
    to: StrictStr  # the publishing agent
    port: Port
    topic: StrictStr = ""  # a prefix; "" is every topic
    key: StateKey = "publication"
    timeout: Seconds = 60.0
    count: Annotated[int, Field(ge=1, le=10_000)] = 1  # publications to take before going on


class SubscribeStep(StepBase):
    subscribe: SubscribeCall


STEP_KINDS: dict[str, type[StepBase]] = {
    "python": PythonStep, "mcp": McpStep, "pilot_send": PilotSendStep,
    "pilot_receive": PilotReceiveStep, "pilot_request": PilotRequestStep,
    "publish": PublishStep, "subscribe": SubscribeStep,
}


def _step_kind(value: Any) -> str | None:
    if isinstance(value, StepBase):
        return value.kind
    if isinstance(value, dict):
        kinds = [k for k in value if k in STEP_KINDS]
        if len(kinds) == 1:
            return str(kinds[0])
    return None  # pydantic reports it, with the tags it knows


Step = Annotated[
    Annotated[PythonStep, Tag("python")] | Annotated[McpStep, Tag("mcp")]
    | Annotated[PilotSendStep, Tag("pilot_send")]
    | Annotated[PilotReceiveStep, Tag("pilot_receive")]
    | Annotated[PilotRequestStep, Tag("pilot_request")]
    | Annotated[PublishStep, Tag("publish")] | Annotated[SubscribeStep, Tag("subscribe")],
    Discriminator(_step_kind, custom_error_type="step_kind",
                  custom_error_message="a step has exactly one of the keys "
                  + ", ".join(STEP_KINDS)),
]


# -- agents and the pipeline ------------------------------------------------------------------


class Serve(Strict):
    """The agent's graph answers requests (``pilot_request`` steps of other agents) on ``port``
    instead of running once: each request's value is its input state, the reply its output
    state."""

    port: Port


class Agent(Strict):
    """One agent: a daemon under ``hostname`` running the graph its ``steps`` describe, once,
    or for each request when it has ``serve``."""

    hostname: Annotated[StrictStr, Field(pattern=NAME)] | None = None  # default: the agent's name
    mcp_servers: dict[StrictStr, McpServer] = {}
    input: dict[StrictStr, Any] = {}  # the graph's initial state (a run-once agent's)
    serve: Serve | None = None
    steps: Annotated[list[Step], Field(min_length=1)]
    # [from, to] step ids ("START"/"END" allowed); absent: the steps run in their order.
    edges: list[Annotated[list[StrictStr], Field(min_length=2, max_length=2)]] | None = None

    def node_ids(self) -> list[str]:
        return [step.node_id(i) for i, step in enumerate(self.steps)]

    def graph_edges(self) -> list[tuple[str, str]]:
        """The edges of the graph, START and END included."""
        ids = self.node_ids()
        if self.edges is None:
            chain = ["START", *ids, "END"]
            return list(itertools.pairwise(chain))
        edges = [(a, b) for a, b in self.edges]
        if not any(a == "START" for a, _ in edges):
            edges.insert(0, ("START", ids[0]))
        ends = {a for a, _ in edges}
        edges += [(i, "END") for i in ids if i not in ends]
        return edges

    @model_validator(mode="after")
    def _graph(self) -> Agent:
        problems: list[FieldValueError] = []
        ids = self.node_ids()
        seen: set[str] = set()
        for i, node in enumerate(ids):
            if node in RESERVED_STEP_IDS:
                problems.append(FieldValueError(
                    ("steps", i, "id"), f"{node!r} is reserved (START and END are the graph's "
                    "ends)"))
            elif node in seen:
                problems.append(FieldValueError(("steps", i, "id"),
                                                f"two steps are called {node!r}"))
            seen.add(node)
        for i, step in enumerate(self.steps):
            if isinstance(step, McpStep) and step.mcp.server not in self.mcp_servers:
                known = ", ".join(self.mcp_servers) or "none"
                problems.append(FieldValueError(("steps", i, "mcp", "server"),
                                                f"{step.mcp.server!r} is not one of this "
                                                f"agent's mcp_servers ({known})"))
        for j, (a, b) in enumerate(self.edges or []):
            for end, name, allowed in ((0, a, "START"), (1, b, "END")):
                if name not in seen and name != allowed:
                    problems.append(FieldValueError(("edges", j, end),
                                                    f"{name!r} is not a step id of this agent "
                                                    f"({', '.join(ids)}, or {allowed})"))
        reached = {b for a, b in self.graph_edges()}
        for node in ids[1:] if self.edges is not None else ():
            if node not in reached:
                problems.append(FieldValueError(("edges",),
                                                f"no edge leads to the step {node!r}"))
        FieldValueErrors.raise_any(problems)
        self._no_cycle()  # (on a graph whose ids and edges are sound)
        return self

    def _no_cycle(self) -> None:
        # Every edge out of a step runs (they are not conditional), so a cycle never ends: the
        # graph would loop until LangGraph's recursion limit.
        after: dict[str, list[tuple[int, str]]] = {}
        for j, (a, b) in enumerate(self.edges or []):
            after.setdefault(a, []).append((j, b))
        done: set[str] = set()
        for first in self.node_ids():
            path, pending = [first], [iter(after.get(first, []))]  # iterative: a long chain
            while pending:
                j, nxt = next(pending[-1], (-1, ""))
                if j < 0:
                    done.add(path.pop())
                    pending.pop()
                elif nxt in path:
                    loop = " -> ".join([*path[path.index(nxt):], nxt])
                    raise FieldValueError(("edges", j), f"the edges loop ({loop}), so the graph "
                                          "would never end: every edge out of a step is taken")
                elif nxt not in done:
                    path.append(nxt)
                    pending.append(iter(after.get(nxt, [])))


class Settings(Strict):
    """The bounds of a run (seconds)."""

    timeout: Seconds = 600.0  # an agent's whole run, from its start to the end of its graph
    startup_timeout: Seconds = 60.0  # a daemon up, registered, and trust with its peers mutual
    shutdown_timeout: Seconds = 15.0  # an agent's stop (its daemon included) after Ctrl-C
    # between tries of a pilot_request whose replier does not listen yet (a serving agent
    # starting), for up to the step's timeout
    retry_interval: Seconds = 0.25


class Ready(Strict):
    """When a service counts as started: ``tcp: HOST:PORT`` accepts a connection, or ``http:
    URL`` answers (any status below 500). Polled every ``interval`` for up to ``timeout``."""

    tcp: Annotated[StrictStr, Field(pattern=HOST_PORT)] | None = None
    http: Annotated[StrictStr, Field(pattern=r"^http://[^/\s]+(/\S*)?$")] | None = None
    timeout: Seconds = 30.0
    interval: Seconds = 0.1

    @model_validator(mode="after")
    def _one(self) -> Ready:
        if (self.tcp is None) == (self.http is None):
            raise FieldValueError((), "give one of tcp: HOST:PORT or http: URL")
        return self


class Service(Strict):
    """A process ``run`` starts (in the file's folder) before the agents, once it is ready, and
    stops (SIGINT, then SIGKILL after ``settings.shutdown_timeout``) once they have ended: a
    data source, a sink, a database the agents' MCP servers reach."""

    command: Annotated[StrictStr, Field(min_length=1)]
    args: list[StrictStr] = []
    env: dict[StrictStr, StrictStr] = {}  # added to run's environment
    ready: Ready | None = None  # none: started is ready


class Pipeline(Strict):
    """A pipeline file."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=100)] | None = None
    beacon: StrictStr | None = None  # HOST:PORT or KEY@HOST:PORT; none: `run` starts one
    settings: Settings = Settings()
    services: dict[Annotated[StrictStr, Field(pattern=NAME)], Service] = {}
    agents: Annotated[dict[StrictStr, Agent], Field(min_length=1)]

    @field_validator("beacon")
    @classmethod
    def _beacon(cls, beacon: str | None) -> str | None:
        # As the daemons the run starts take it (their --beacon), so a typo is the file's
        # error at its line rather than every agent's failure to start.
        if beacon is not None:
            try:
                parse_beacon_list(beacon, given_as="")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return beacon

    @field_validator("agents")
    @classmethod
    def _names(cls, agents: dict[str, Agent]) -> dict[str, Agent]:
        for name in agents:
            if not re.match(NAME, name):
                raise FieldValueError((name,), "an agent's name is a hostname label (lowercase "
                                      "letters, digits and inner '-', up to 63)")
        return agents

    def hostname(self, agent: str) -> str:
        return self.agents[agent].hostname or agent

    def agent_named(self, name: str) -> str | None:
        """The agent called ``name``, or whose hostname it is."""
        if name in self.agents:
            return name
        return next((a for a in self.agents if self.hostname(a) == name), None)

    def peers_of(self, agent: str) -> list[str]:
        """The agents ``agent`` must trust: those its steps reach and those whose steps reach
        it. Trust is mutual, so each side adds the other."""
        peers: set[str] = set()
        for name, spec in self.agents.items():
            for step in spec.steps:
                target = self.agent_named(step.peer() or "")
                if name == agent and target is not None:
                    peers.add(target)
                if target == agent:
                    peers.add(name)
        peers.discard(agent)
        return sorted(peers)

    def receive_ports(self, agent: str) -> list[int]:
        """The ports of ``agent``'s receive steps: its daemon buffers them from its start."""
        return sorted({s.pilot_receive.port for s in self.agents[agent].steps
                       if isinstance(s, PilotReceiveStep)})

    def subscribers_of(self, agent: str, port: int, publication: int = 1) -> int:
        """How many subscribe steps of this file subscribe to ``agent``'s ``port`` and take
        ``publication`` (its 1-based rank among the agent's publish steps on the port) or
        more: those the ``publication``-th publish step waits for."""
        return sum(1 for spec in self.agents.values() for s in spec.steps
                   if isinstance(s, SubscribeStep) and s.subscribe.port == port
                   and s.subscribe.count >= publication
                   and self.agent_named(s.subscribe.to) == agent)

    def publish_topics(self, agent: str, port: int) -> list[str]:
        """The topics of ``agent``'s publish steps on ``port``, in their order."""
        return [s.publish.topic for s in self.agents[agent].steps
                if isinstance(s, PublishStep) and s.publish.port == port]

    @model_validator(mode="after")
    def _links(self) -> Pipeline:
        problems: list[FieldValueError] = []
        hostnames: dict[str, str] = {}
        for name in self.agents:
            host = self.hostname(name)
            if host in hostnames:
                problems.append(FieldValueError(
                    ("agents", name, "hostname"),
                    f"{host!r} is already the hostname of {hostnames[host]}"))
            hostnames.setdefault(host, name)
        sent_to: set[tuple[str, int]] = set()  # (agent, port) of the pilot_send steps
        for name, spec in self.agents.items():
            for i, step in enumerate(spec.steps):
                to = step.peer()
                if to is not None:
                    where = ("agents", name, "steps", i, step.kind, "to")
                    problems += self._link_problems(name, step, to, where, sent_to)
        for name, spec in self.agents.items():
            for i, step in enumerate(spec.steps):
                if (isinstance(step, PilotReceiveStep)
                        and (name, step.pilot_receive.port) not in sent_to):
                    port = step.pilot_receive.port
                    problems.append(FieldValueError(
                        ("agents", name, "steps", i, "pilot_receive", "port"),
                        f"no pilot_send step of this file sends to {name} on port {port}, so "
                        f"this step would wait for its timeout"))
        if all(spec.serve is not None for spec in self.agents.values()):
            problems.append(FieldValueError(
                ("agents",), "every agent serves, so none would start the pipeline: at least "
                "one runs its steps once"))
        FieldValueErrors.raise_any(problems)
        return self

    def _link_problems(self, name: str, step: StepBase, to: str, where: tuple[str | int, ...],
                       sent_to: set[tuple[str, int]]) -> list[FieldValueError]:
        """What is wrong with the step of agent ``name`` that reaches the agent ``to``."""
        target = self.agent_named(to)
        if target is None:
            return [FieldValueError(where, f"{to!r} is not an agent of this pipeline "
                                    f"({', '.join(self.agents)})")]
        if target == name:
            return [FieldValueError(where, "an agent does not send to itself")]
        if isinstance(step, PilotSendStep):
            port = step.pilot_send.port
            sent_to.add((target, port))
            if port not in self.receive_ports(target):
                return [FieldValueError(where, f"{target} has no pilot_receive step on port "
                                        f"{port}, so nothing there would read this message")]
        if isinstance(step, SubscribeStep):
            sub = step.subscribe
            topics = self.publish_topics(target, sub.port)
            if not any(t.startswith(sub.topic) for t in topics):
                return [FieldValueError(where, f"{target} has no publish step on port "
                                        f"{sub.port} with a topic starting {sub.topic!r}, so "
                                        "nothing would reach this subscription")]
        if isinstance(step, PilotRequestStep):
            served = self.agents[target].serve
            if served is None or served.port != step.pilot_request.port:
                return [FieldValueError(
                    where, f"{target} does not serve port {step.pilot_request.port} (give it "
                    f"'serve: {{port: {step.pilot_request.port}}}')")]
        return []
