"""pilot_agents.integrations.langgraph: real compiled graphs talking through real tunnels, on
embedded Nodes and through daemons, and as agents in processes of their own."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, RemoveMessage
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import REMOVE_ALL_MESSAGES, add_messages
from langgraph.types import Command, Interrupt, Overwrite, Send, interrupt
from pydantic import BaseModel

from pilot_agents import Client, Node
from pilot_agents.errors import (
    ConfigError,
    DaemonNotRunningError,
    MissingStateKeyError,
    PilotTimeoutError,
    RemoteError,
    StoppedError,
    UnserializableValueError,
    WireError,
)
from pilot_agents.integrations.langgraph import (
    PilotReceive,
    PilotRemoteGraph,
    PilotRequest,
    PilotSend,
    ServeGraphConfig,
    peer_thread,
    serving_graph,
)
from pilot_agents.integrations.langgraph import base as base_module
from pilot_agents.integrations.langgraph import remote as remote_module
from pilot_agents.integrations.langgraph.codec import Codec, parse
from pilot_agents.integrations.langgraph.remote import GraphServer
from pilot_agents.patterns import Request, Requester, serving
from tests.conftest import ROOT, DaemonHandle, peer_up, short_home, start_daemons, stop_daemons
from tests.test_node import server_and_two_clients
from tests.transport_pairs import (  # noqa: F401 (fixtures)
    Pair,
    embedded,
    kind_fixture,
    pair_fixture,
)

AGENTS = str(ROOT / "tests" / "langgraph_agents.py")


class State(TypedDict, total=False):
    message: Any
    message_receipt: dict[str, Any]
    message_from: str
    question: Any
    answer: Any
    approved: Any


def one_node(node: Any, checkpointer: Any = None) -> Any:
    """A compiled graph START -> node -> END."""
    builder = StateGraph(State)
    builder.add_node("node", node)
    builder.add_edge(START, "node")
    builder.add_edge("node", END)
    return builder.compile(checkpointer=checkpointer)


def receiver(pair: Pair, port: int, **kw: Any) -> PilotReceive:
    return PilotReceive(port, transport=pair.server.transport, timeout=20, **kw)


# -- send and receive ------------------------------------------------------------------------


async def test_a_state_key_arrives_typed_with_its_sender_and_a_receipt(pair: Pair) -> None:
    value = {"rows": [1, 2.5, None], "chat": [HumanMessage("hi"), AIMessage("hello")]}
    receiving = asyncio.create_task(one_node(receiver(pair, 7101)).ainvoke({}))
    sent = await one_node(PilotSend(pair.server_name, 7101, transport=pair.client.transport)
                          ).ainvoke({"message": value})
    got = await asyncio.wait_for(receiving, 30)
    assert got["message"] == value
    assert isinstance(got["message"]["chat"][0], HumanMessage)
    assert got["message_from"] in (pair.client.node_id, "alpha")  # alpha: its daemon's name
    receipt = sent["message_receipt"]
    assert receipt["peer"] == pair.server.node_id
    assert (receipt["to"], receipt["port"], receipt["path"]) == (pair.server_name, 7101, "direct")
    assert receipt["bytes"] > 0 and len(receipt["id"]) == 32


class Report(BaseModel):
    """A pydantic state: the nodes read attributes and their updates are validated."""

    title: str
    chat: list[HumanMessage] = []
    chat_from: str = ""
    chat_receipt: dict[str, Any] = {}


async def test_a_pydantic_state_is_read_and_updated(pair: Pair) -> None:
    def graph(node: Any) -> Any:
        builder = StateGraph(Report)
        builder.add_node("node", node)
        builder.add_edge(START, "node")
        return builder.compile()

    receiving = asyncio.create_task(graph(receiver(pair, 7105, key="chat")).ainvoke(
        Report(title="in")))
    sent = await graph(PilotSend(pair.server_name, 7105, key="chat", timeout=20,
                                 transport=pair.client.transport)
                       ).ainvoke(Report(title="out", chat=[HumanMessage("typed")]))
    got = await asyncio.wait_for(receiving, 20)
    assert got["chat"] == [HumanMessage("typed")] and got["chat_from"]
    assert sent["chat_receipt"]["peer"] == pair.server.node_id


async def test_a_send_waits_for_the_receiver_to_listen(pair: Pair) -> None:
    """The receiver's graph gets to its PilotReceive after the send began: the send is tried
    again until the port has a listener."""
    sending = asyncio.create_task(one_node(
        PilotSend(pair.server_name, 7102, transport=pair.client.transport, timeout=20)
    ).ainvoke({"message": "early"}))
    await asyncio.sleep(1.0)
    got = await one_node(receiver(pair, 7102)).ainvoke({})
    assert got["message"] == "early"
    assert (await asyncio.wait_for(sending, 20))["message_receipt"]["port"] == 7102


async def test_a_plain_message_is_received_as_its_json_or_text(pair: Pair) -> None:
    graph = one_node(receiver(pair, 7103))
    for data, expected in (({"a": 1}, {"a": 1}), ("plain text", "plain text"),
                           (b"\xff\xfe", b"\xff\xfe")):
        receiving = asyncio.create_task(graph.ainvoke({}))
        await send_when_listening(pair, 7103, data)
        assert (await asyncio.wait_for(receiving, 20))["message"] == expected


async def send_when_listening(pair: Pair, port: int, data: object) -> None:
    """A raw send, tried until the receiving graph's node listens."""
    for _ in range(100):
        with contextlib.suppress(Exception):
            await pair.client.transport.send(pair.server_name, port, data, timeout=5)
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"port {port} never listened")


async def test_a_malformed_envelope_is_dropped_and_counted(pair: Pair) -> None:
    node = receiver(pair, 7104)
    receiving = asyncio.create_task(one_node(node).ainvoke({}))
    await send_when_listening(pair, 7104, {"pilot": "lg-send/1", "value": 1})  # no id
    await one_node(PilotSend(pair.server_name, 7104, transport=pair.client.transport)
                   ).ainvoke({"message": "good"})
    assert (await asyncio.wait_for(receiving, 20))["message"] == "good"
    assert node.malformed == 1


class Chat(TypedDict, total=False):
    chat: Annotated[list[AnyMessage], add_messages]
    chat_from: str


HOSTILE: list[object] = [  # each would bypass the chat's reducer or wipe it
    [RemoveMessage(id=REMOVE_ALL_MESSAGES)],
    Overwrite([AIMessage("planted")]),
    {"__overwrite__": [{"type": "ai", "content": "planted"}]},
    {"type": "__overwrite__", "value": []},
    [{"type": "remove", "id": REMOVE_ALL_MESSAGES, "content": ""}],
    [{"lc": 1, "type": "constructor", "id": ["langchain", "RemoveMessage"],
      "kwargs": {"id": REMOVE_ALL_MESSAGES, "content": ""}}],
    Command(goto="elsewhere"),
    [Send("node", {})],
]


async def test_a_peer_cannot_send_values_that_bypass_the_reducers(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """Values that are LangGraph instructions rather than data (an Overwrite, a RemoveMessage,
    their plain-JSON spellings, a Command or Send) are refused, with a warning naming the peer;
    the history kept by the add_messages reducer stays, and the next good message arrives."""
    builder = StateGraph(Chat)
    builder.add_node("node", receiver(pair, 7107, key="chat"))
    builder.add_edge(START, "node")
    node = builder.nodes["node"].runnable
    assert isinstance(node, PilotReceive)
    graph = builder.compile()
    history: list[AnyMessage] = [HumanMessage("kept", id="h1")]
    receiving = asyncio.create_task(graph.ainvoke({"chat": history}))
    for value in [*HOSTILE, [AIMessage("good", id="a1")]]:
        await one_node(PilotSend(pair.server_name, 7107, transport=pair.client.transport,
                                 timeout=20)).ainvoke({"message": value})
    got = await asyncio.wait_for(receiving, 20)
    assert got["chat"] == [*history, AIMessage("good", id="a1")]
    assert node.malformed == len(HOSTILE)
    assert f"refused a message from {got['chat_from']} on port 7107" in caplog.text


async def test_a_replier_or_caller_cannot_send_values_that_bypass_the_reducers(
        tmp_path: Path) -> None:
    """A replier's Overwrite is a WireError naming it; a caller's Overwrite or a Command that
    is not a resume is refused by the served graph, whose error the caller raises."""
    async def hostile(request: Request) -> object:
        return Codec().encode({"chat": Overwrite([])})

    async with embedded(tmp_path) as pair, serving(pair.server.transport, 7211, hostile), \
            serving_graph(doubling_graph(), 7212, pair.server.transport):
        asks = one_node(PilotRequest(pair.server_name, 7211, "message", "answer",
                                     transport=pair.client.transport))
        with pytest.raises(WireError, match=rf"{pair.server_name} port 7211 answered .*"
                                            r"Overwrite"):
            await asks.ainvoke({"message": 1})
        remote = PilotRemoteGraph(pair.server_name, 7212, transport=pair.client.transport)
        for value in ({"question": Overwrite(2)}, Command(goto="double"),
                      Command(resume=1, update={"question": 2})):
            with pytest.raises(RemoteError, match=rf"{pair.client.node_id}.*(Overwrite|goto)"):
                await remote.ainvoke(value)


@contextlib.asynccontextmanager
async def trio(tmp_path: Path) -> AsyncIterator[tuple[Node, Node, Node]]:
    """Embedded nodes ``a``, ``b`` and ``c``: ``b`` trusts the other two, which know where it
    is (two peers of one receiver or server)."""
    async with (Node(home=tmp_path / "a", listen="127.0.0.1:0") as a,
                Node(home=tmp_path / "b", listen="127.0.0.1:0") as b,
                Node(home=tmp_path / "c", listen="127.0.0.1:0") as c):
        for peer in (a, c):
            peer.trust(b.node_id)
            b.trust(peer.node_id)
            peer.add_peer(b.node_id, b.local_endpoint)
        yield a, b, c


async def test_a_receive_with_senders_refuses_other_peers_with_a_log_and_a_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Embedded nodes: senders= names node ids. A trusted peer not among them is refused (a
    warning naming it, counted), and the receiver goes on waiting for an accepted one."""
    async with trio(tmp_path) as (a, b, c):
        node = PilotReceive(7106, transport=b, timeout=20, senders=[a.node_id.upper()])
        receiving = asyncio.create_task(one_node(node).ainvoke({}))
        await one_node(PilotSend(b.node_id, 7106, transport=c, timeout=20)
                       ).ainvoke({"message": "from c"})
        await one_node(PilotSend(b.node_id, 7106, transport=a, timeout=20)
                       ).ainvoke({"message": "from a"})
        got = await asyncio.wait_for(receiving, 20)
    assert (got["message"], got["message_from"]) == ("from a", a.node_id)
    assert node.refused == 1
    assert f"refused a message from {c.node_id} on port 7106" in caplog.text


async def test_a_daemon_receive_with_senders_takes_hostnames() -> None:
    """Through a daemon, senders= takes the hostnames the daemon knows its peers by."""
    with agent_daemons("carol", "hub", "dave") as (carol, hub, dave):
        for who in (carol, dave):  # the inbox port takes both at once, carol's first
            await asyncio.to_thread(one_node(PilotSend("hub", home=who.home)).invoke,
                                    {"message": f"from {who.hostname}"})
        node = PilotReceive(home=hub.home, timeout=20, senders=["Dave"])
        got = await one_node(node).ainvoke({})
    assert (got["message"], got["message_from"]) == ("from dave", "dave")
    assert node.refused == 1
    with pytest.raises(ConfigError, match="senders="):
        PilotReceive(senders="dave")  # a string is not a list of names


# -- request/reply and remote graphs ----------------------------------------------------------


def doubling_graph() -> Any:
    """The graph a peer serves: answer = question * 2, in two steps."""
    builder = StateGraph(State)
    builder.add_node("read", lambda state: {"approved": True})
    builder.add_node("double", lambda state: {"answer": state["question"] * 2})
    builder.add_edge(START, "read")
    builder.add_edge("read", "double")
    builder.add_edge("double", END)
    return builder.compile()


async def test_request_reply_between_graphs(pair: Pair) -> None:
    """A PilotRequest to a served graph (its input is the request's value) and to a plain
    req/rep handler."""
    async def handler(request: Request) -> object:
        return {"len": len(request.json()["question"])}

    async with serving_graph(doubling_graph(), 7201, pair.server.transport), \
            serving(pair.server.transport, 7202, handler):
        asks = one_node(PilotRequest(pair.server_name, 7201, "message", "answer",
                                     transport=pair.client.transport))
        out = await asks.ainvoke({"message": {"question": 21}})
        assert out["answer"] == {"question": 21, "approved": True, "answer": 42}
        asks = one_node(PilotRequest(pair.server_name, 7202, "message", "answer",
                                     transport=pair.client.transport))
        assert (await asks.ainvoke({"message": {"question": "four"}}))["answer"] == {"len": 4}


async def test_a_remote_graph_as_a_subgraph_node_and_streamed(pair: Pair) -> None:
    remote = PilotRemoteGraph(pair.server_name, 7203, transport=pair.client.transport)
    builder = StateGraph(State)
    builder.add_node("ask", lambda state: {"question": "ab"})
    builder.add_node("remote", remote)
    builder.add_node("check", lambda state: {"message": f"got {state['answer']}"})
    builder.add_edge(START, "ask")
    builder.add_edge("ask", "remote")
    builder.add_edge("remote", "check")
    builder.add_edge("check", END)
    parent = builder.compile()
    async with serving_graph(doubling_graph(), 7203, pair.server.transport):
        out = await parent.ainvoke({})
        assert out == {"question": "ab", "answer": "abab", "approved": True,
                       "message": "got abab"}
        updates = [chunk async for chunk in remote.astream({"question": 3})]
        assert updates == [{"read": {"approved": True}}, {"double": {"answer": 6}}]
        # The parent's own stream shows the remote node's update, not the remote steps.
        parent_updates = [c async for c in parent.astream({}, stream_mode="updates")]
        assert parent_updates[1] == {"remote": {"question": "ab", "approved": True,
                                                "answer": "abab"}}
        with pytest.raises(RemoteError, match="KeyError"):
            await remote.ainvoke({"message": "no question"})


async def test_a_served_graph_node_that_exits_fails_only_its_run(tmp_path: Path) -> None:
    """A served graph's node that calls sys.exit() (argparse on bad arguments, say) or raises
    KeyboardInterrupt, in a sync or an async node, in a task LangGraph makes for it: its caller
    gets a RemoteError naming it, invoked or streamed, and the server goes on serving."""
    def check(state: State) -> State:
        if state["question"] == "exit":
            sys.exit("usage: check QUESTION")
        return {"answer": state["question"]}

    async def interrupted(state: State) -> State:
        if state["question"] == "ctrl-c":
            raise KeyboardInterrupt
        return {"approved": True}

    builder = StateGraph(State)
    builder.add_node("check", check)
    builder.add_node("interrupted", interrupted)
    builder.add_edge(START, "check")
    builder.add_edge(START, "interrupted")  # two nodes in one step: each in a task of its own
    async with embedded(tmp_path) as pair, \
            serving_graph(builder.compile(), 7220, pair.server.transport):
        remote = PilotRemoteGraph(pair.server_name, 7220, transport=pair.client.transport)
        for question, said in (("exit", "SystemExit: usage: check QUESTION"),
                               ("ctrl-c", "KeyboardInterrupt")):
            with pytest.raises(RemoteError, match=f"the graph raised {said}") as raised:
                await remote.ainvoke({"question": question})
            assert raised.value.remote_type == "StoppedError"
            with pytest.raises(RemoteError, match=f"the graph raised {said}"):
                [update async for update in remote.astream({"question": question})]
        assert await remote.ainvoke({"question": "q"}) == {"question": "q", "answer": "q",
                                                           "approved": True}


async def test_a_task_cancelled_before_it_starts_leaves_no_coroutine_unawaited() -> None:
    """contained() wraps the coroutine of each task made in its block; LangGraph cancels such a
    task before its first step when a run is cancelled as it ends (its loop's exit task). The
    coroutine it was made for is closed then, not left to be reported as never awaited."""
    async def exit_stack() -> None:
        pass

    inner = exit_stack()
    with base_module.contained(StoppedError):
        task = asyncio.create_task(inner)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # (its done callbacks)
    assert inner.cr_frame is None  # closed: an unstarted coroutine still has its frame


async def test_a_failing_stream_yields_its_updates_before_the_error(tmp_path: Path) -> None:
    """A remote run streams three updates, then a node raises: a caller slow enough that the
    three and the error wait on the server together gets the three, then the error, as from
    a local graph's astream."""
    def fail(state: State) -> State:
        raise ValueError("step four failed")

    builder = StateGraph(State)
    builder.add_sequence([("one", lambda state: {"answer": 1}),
                          ("two", lambda state: {"answer": 2}),
                          ("three", lambda state: {"answer": 3}), ("four", fail)])
    builder.add_edge(START, "one")
    got: list[Any] = []
    async with embedded(tmp_path) as pair, \
            serving_graph(builder.compile(), 7221, pair.server.transport):
        remote = PilotRemoteGraph(pair.server_name, 7221, transport=pair.client.transport)
        with pytest.raises(RemoteError, match="step four failed"):
            async for update in remote.astream({}):
                got.append(update)
                await asyncio.sleep(0.5)  # meanwhile the rest and the error wait together
    assert got == [{"one": {"answer": 1}}, {"two": {"answer": 2}}, {"three": {"answer": 3}}]


async def test_a_stream_batch_stays_within_one_tunnel_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Updates waiting for a slow caller go in batches no larger than a tunnel message carries
    (here made 3 000 bytes, for updates of 1 000), one update at least, the rest left for the
    next fetch: each update fits, so the stream works as ainvoke does, in order."""
    limit = 3000
    monkeypatch.setattr(remote_module, "MAX_PAYLOAD", limit, raising=False)
    replies: list[int] = []
    fetch = GraphServer._next

    async def measured(self: GraphServer, run: Any) -> bytes:
        reply = await fetch(self, run)
        replies.append(len(reply))
        return reply

    monkeypatch.setattr(GraphServer, "_next", measured)
    builder = StateGraph(State)
    builder.add_sequence([(f"n{i}", lambda state, i=i: {"answer": str(i) * 1000})
                          for i in range(6)])
    builder.add_edge(START, "n0")
    got: list[Any] = []
    async with embedded(tmp_path) as pair, \
            serving_graph(builder.compile(), 7222, pair.server.transport):
        remote = PilotRemoteGraph(pair.server_name, 7222, transport=pair.client.transport)
        async for update in remote.astream({}):
            got.append(update)
            await asyncio.sleep(0.2)  # the others wait on the server meanwhile
    assert got == [{f"n{i}": {"answer": str(i) * 1000}} for i in range(6)]
    assert max(replies) <= limit
    assert len(replies) < 6  # updates that fit together still go together


async def test_a_reply_that_cannot_be_read_names_the_peer_and_port(tmp_path: Path) -> None:
    """A replier's malformed value is its fault: the error says which peer and port sent it."""
    bad = {"pilot": "lg-value/1", "msgpack": "not base64!"}

    async def handler(request: Request) -> object:
        answers = {"stream": {"run": "r1"}, "next": {"updates": [bad], "done": True}}
        return answers.get(request.json().get("op"), bad)

    async with embedded(tmp_path) as pair, serving(pair.server.transport, 7210, handler):
        asks = one_node(PilotRequest(pair.server_name, 7210, "message", "answer",
                                     transport=pair.client.transport))
        where = rf"{pair.server_name} port 7210 answered a malformed value envelope"
        with pytest.raises(WireError, match=where):
            await asks.ainvoke({"message": {"question": 1}})
        remote = PilotRemoteGraph(pair.server_name, 7210, transport=pair.client.transport)
        with pytest.raises(WireError, match=where):
            [update async for update in remote.astream({})]


def gated_graph(release: asyncio.Event, cancelled: asyncio.Event) -> Any:
    """first -> second, which waits for ``release`` (and sets ``cancelled`` if cancelled)."""
    async def wait_for_release(state: State) -> State:
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {"answer": "released"}

    builder = StateGraph(State)
    builder.add_node("first", lambda state: {"question": "started"})
    builder.add_node("second", wait_for_release)
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    return builder.compile()


async def test_a_remote_graph_streams_its_updates_as_they_happen(pair: Pair) -> None:
    """The first update arrives while the remote run still waits; a caller that stops early
    cancels the remote run; a caller beyond max_streams is told the server is busy."""
    release, cancelled = asyncio.Event(), asyncio.Event()
    served = gated_graph(release, cancelled)
    remote = PilotRemoteGraph(pair.server_name, 7205, transport=pair.client.transport)
    config = ServeGraphConfig(max_streams=1, poll_wait=0.5)
    async with serving_graph(served, 7205, pair.server.transport, config=config):
        updates = remote.astream({})
        assert await asyncio.wait_for(anext(updates), 10) == {"first": {"question": "started"}}
        with pytest.raises(RemoteError, match="BusyError"):
            await anext(remote.astream({}))
        release.set()
        assert [u async for u in updates] == [{"second": {"answer": "released"}}]

        release.clear()
        early = remote.astream({})
        assert isinstance(early, AsyncGenerator)
        assert await asyncio.wait_for(anext(early), 10) == {"first": {"question": "started"}}
        await early.aclose()  # stop asking: the remote run is cancelled
        await asyncio.wait_for(cancelled.wait(), 10)


async def test_one_peer_cannot_take_every_stream_of_a_served_graph(tmp_path: Path) -> None:
    """A served graph's streamed runs (max_streams) went to whoever started them first: one
    peer starting that many, and fetching their updates now and then so that none went idle,
    had every other peer's stream refused with BusyError for as long as it liked. Now each peer
    has at most max_streams_per_peer of them."""
    release, cancelled = asyncio.Event(), asyncio.Event()
    config = ServeGraphConfig(max_streams=3, max_streams_per_peer=2, poll_wait=0.5)
    async with (
        server_and_two_clients(tmp_path) as (server, greedy, other),
        serving_graph(gated_graph(release, cancelled), 7219, server, config=config),
    ):
        greedy_remote = PilotRemoteGraph(server.node_id, 7219, transport=greedy)
        held = [greedy_remote.astream({}) for _ in range(2)]
        for updates in held:
            assert await asyncio.wait_for(anext(updates), 10) == {
                "first": {"question": "started"}}
        with pytest.raises(RemoteError, match="max_streams_per_peer"):
            await anext(greedy_remote.astream({}))
        updates = PilotRemoteGraph(server.node_id, 7219, transport=other).astream({})
        assert await asyncio.wait_for(anext(updates), 10) == {"first": {"question": "started"}}
        release.set()
        for stream in [*held, updates]:
            assert [u async for u in stream] == [{"second": {"answer": "released"}}]


async def test_a_streamed_run_whose_caller_stopped_asking_is_cancelled(tmp_path: Path) -> None:
    """A caller that starts a stream and then dies never cancels it: the server cancels the run
    after idle_timeout on its own, not only when another caller happens to start a stream."""
    release, cancelled = asyncio.Event(), asyncio.Event()
    config = ServeGraphConfig(poll_wait=0.2, idle_timeout=0.5)
    start = {"pilot": "lg-graph/1", "op": "stream", "input": {}, "config": {}}
    async with embedded(tmp_path) as pair, \
            serving_graph(gated_graph(release, cancelled), 7209, pair.server.transport,
                          config=config):
        async with Requester(pair.client.transport) as requester:  # the caller, gone after this
            started = await requester.request(pair.server_name, 7209, start, timeout=10)
        assert started.json()["run"]
        await asyncio.wait_for(cancelled.wait(), 5)


async def test_a_streamed_run_answers_only_its_caller(tmp_path: Path) -> None:
    """Another trusted peer that learns a run's id can neither fetch its updates nor cancel
    it: to that peer the run does not exist. Its caller streams it to the end."""
    release, cancelled = asyncio.Event(), asyncio.Event()
    start = {"pilot": "lg-graph/1", "op": "stream", "input": {}, "config": {}}
    async with trio(tmp_path) as (a, b, c), \
            serving_graph(gated_graph(release, cancelled), 7213, b), \
            Requester(a) as owner, Requester(c) as other:
        run = (await owner.request(b.node_id, 7213, start, timeout=10)).json()["run"]
        with pytest.raises(RemoteError, match=f"no streamed run '{run}' of yours"):
            await other.request(b.node_id, 7213, {**start, "op": "next", "run": run},
                                timeout=10)
        cancel = {**start, "op": "cancel", "run": run}
        assert (await other.request(b.node_id, 7213, cancel, timeout=10)).json() == {
            "cancelled": False}
        assert not cancelled.is_set()
        release.set()
        updates: list[Any] = []
        while True:
            batch = (await owner.request(b.node_id, 7213, {**start, "op": "next", "run": run},
                                         timeout=10)).json()
            updates += batch["updates"]
            if batch["done"]:
                break
    assert updates == [{"first": {"question": "started"}}, {"second": {"answer": "released"}}]


async def test_a_call_that_times_out_cancels_the_remote_run(pair: Pair) -> None:
    """invoke and a stream's first fetch: the caller's timeout cancels the run on the server,
    which would otherwise go on for nobody."""
    release, cancelled = asyncio.Event(), asyncio.Event()
    remote = PilotRemoteGraph(pair.server_name, 7214, transport=pair.client.transport,
                              timeout=1)
    config = ServeGraphConfig(poll_wait=5)  # a fetch waits longer than the caller
    async with serving_graph(gated_graph(release, cancelled), 7214, pair.server.transport,
                             config=config):
        with pytest.raises(PilotTimeoutError, match="within 1"):
            await remote.ainvoke({})
        await asyncio.wait_for(cancelled.wait(), 10)
        cancelled.clear()
        updates = remote.astream({})
        assert await asyncio.wait_for(anext(updates), 10) == {"first": {"question": "started"}}
        with pytest.raises(PilotTimeoutError, match="within 1"):
            await anext(updates)
        await asyncio.wait_for(cancelled.wait(), 10)


async def test_a_pilot_request_that_times_out_cancels_the_served_graph(pair: Pair) -> None:
    """A bare request names no run, but req/rep's CANCEL stops the handler running it."""
    release, cancelled = asyncio.Event(), asyncio.Event()
    ask = PilotRequest(pair.server_name, 7215, key="question", result_key="answer", timeout=1,
                       transport=pair.client.transport)
    async with serving_graph(gated_graph(release, cancelled), 7215, pair.server.transport):
        with pytest.raises(PilotTimeoutError, match="within 1"):
            await ask.ainvoke({"question": {"question": "q"}})  # the served graph's input
        await asyncio.wait_for(cancelled.wait(), 10)


def review_graph() -> Any:
    """A checkpointed graph START -> review, which asks to approve the state's question (None
    on a thread that has none yet)."""
    def review(state: State) -> State:
        return {"approved": interrupt({"question": state.get("question")})}

    builder = StateGraph(State)
    builder.add_node("review", review)
    builder.add_edge(START, "review")
    return builder.compile(checkpointer=InMemorySaver())


async def test_a_remote_graph_keeps_a_thread_and_carries_interrupts(pair: Pair) -> None:
    """A served graph with a checkpointer: the caller's thread_id is its thread, an interrupt
    comes back as LangGraph's Interrupt, and Command(resume=...) goes there."""
    remote = PilotRemoteGraph(pair.server_name, 7204, transport=pair.client.transport)
    config = RunnableConfig(configurable={"thread_id": "t-1"})
    async with serving_graph(review_graph(), 7204, pair.server.transport):
        first = await remote.ainvoke({"question": "ship it?"}, config)
        [pending] = first["__interrupt__"]
        assert isinstance(pending, Interrupt) and pending.value == {"question": "ship it?"}
        assert await remote.ainvoke(Command(resume="yes"), config) == {
            "question": "ship it?", "approved": "yes"}


async def test_a_uuid_thread_id_goes_as_its_string(pair: Pair) -> None:
    """LangGraph's examples name threads with uuid.uuid4(): a PilotRemoteGraph sends it as its
    string, so the run and its resume meet on one thread; a thread_id it cannot send is a
    ConfigError at the caller, not a thread silently left out."""
    thread = uuid.uuid4()
    remote = PilotRemoteGraph(pair.server_name, 7223, transport=pair.client.transport)
    served = review_graph()
    async with serving_graph(served, 7223, pair.server.transport):
        config = RunnableConfig(configurable={"thread_id": thread})
        assert "__interrupt__" in await remote.ainvoke({"question": "ship it?"}, config)
        assert await remote.ainvoke(Command(resume="yes"), config) == {
            "question": "ship it?", "approved": "yes"}
        with pytest.raises(ConfigError, match="a thread_id is a string or an integer, not a "
                                              "float"):
            await remote.ainvoke({"question": "q"}, {"configurable": {"thread_id": 1.5}})
    assert (await served.aget_state({"configurable": {"thread_id": peer_thread(
        pair.client.node_id, str(thread))}})).values["approved"] == "yes"


async def pending(requester: Requester, server: Node, port: int, thread: object) -> Any:
    """The questions the served graph's thread ``thread`` waits on an answer to, as the
    requester's PilotRemoteGraph node asks for them."""
    body = {"pilot": "lg-graph/1", "op": "pending",
            "config": {"configurable": {"thread_id": thread}}}
    reply = await requester.request(server.node_id, port, body, timeout=10)
    return [i.value for i in Codec().decode(reply.json(), (Interrupt,))]


async def test_each_peer_has_threads_of_its_own(tmp_path: Path) -> None:
    """Two peers naming the same thread_id get two threads. The other peer neither sees the
    first one's pending interrupt nor answers it: its resume goes to a thread of its own, new
    as LangGraph makes any thread it has no checkpoint of (as a local graph would, and without
    telling whether another peer has a thread of that name). The first continues its own."""
    served = review_graph()
    config = RunnableConfig(configurable={"thread_id": "t"})
    async with trio(tmp_path) as (a, b, c), serving_graph(served, 7216, b), \
            Requester(a) as first, Requester(c) as other:
        mine, theirs = (PilotRemoteGraph(b.node_id, 7216, transport=peer) for peer in (a, c))
        asked = await mine.ainvoke({"question": "from a"}, config)
        assert [i.value for i in asked["__interrupt__"]] == [{"question": "from a"}]
        assert await pending(first, b, 7216, "t") == [{"question": "from a"}]
        assert await pending(other, b, 7216, "t") == []
        answered = await theirs.ainvoke(Command(resume="c approves"), config)
        assert [i.value for i in answered["__interrupt__"]] == [{"question": None}]
        assert await mine.ainvoke(Command(resume="a approves"), config) == {
            "question": "from a", "approved": "a approves"}
        with pytest.raises(RemoteError, match="a thread_id is a string or an integer, not a "
                                              "dict"):
            await pending(other, b, 7216, {"t": 1})
    # The checkpointer lists each peer's thread under its node id.
    assert (await served.aget_state({"configurable": {"thread_id": peer_thread(
        a.node_id, "t")}})).values == {"question": "from a", "approved": "a approves"}
    assert (await served.aget_state({"configurable": {"thread_id": peer_thread(
        c.node_id, "t")}})).next == ("review",)
    assert peer_thread(a.node_id, "t") == f"{a.node_id}:t"


async def test_shared_threads_let_peers_answer_each_others_interrupts(tmp_path: Path) -> None:
    """ServeGraphConfig(shared_threads=True): a thread_id names the graph's thread as is, for
    every peer, so one peer sees and answers the interrupt another's run paused on."""
    served = review_graph()
    config = RunnableConfig(configurable={"thread_id": "t"})
    async with trio(tmp_path) as (a, b, c), \
            serving_graph(served, 7217, b, config=ServeGraphConfig(shared_threads=True)), \
            Requester(c) as other:
        await PilotRemoteGraph(b.node_id, 7217, transport=a).ainvoke({"question": "from a"},
                                                                     config)
        assert await pending(other, b, 7217, "t") == [{"question": "from a"}]
        assert await PilotRemoteGraph(b.node_id, 7217, transport=c).ainvoke(
            Command(resume="c approves"), config) == {"question": "from a",
                                                      "approved": "c approves"}
    assert (await served.aget_state(config)).values["approved"] == "c approves"


async def test_an_interrupt_in_a_remote_subgraph_pauses_the_parent(pair: Pair) -> None:
    """A remote graph used as a node of a checkpointed parent: its interrupt pauses the parent
    with the remote question, and resuming the parent answers the remote thread without
    running the remote graph's earlier steps again."""
    drafts: list[str] = []

    def draft(state: State) -> State:
        drafts.append(state["question"])
        return {"answer": f"draft of {state['question']}"}

    served = StateGraph(State)
    served.add_node("draft", draft)
    served.add_node("review", lambda state: {"approved": interrupt({"check": state["answer"]})})
    served.add_edge(START, "draft")
    served.add_edge("draft", "review")
    served.add_edge("review", END)
    parent = StateGraph(State)
    parent.add_node("remote", PilotRemoteGraph(pair.server_name, 7206,
                                               transport=pair.client.transport))
    parent.add_node("after", lambda state: {"message": f"{state['answer']}: {state['approved']}"})
    parent.add_edge(START, "remote")
    parent.add_edge("remote", "after")
    parent.add_edge("after", END)
    graph = parent.compile(checkpointer=InMemorySaver())
    config = RunnableConfig(configurable={"thread_id": "parent-1"})
    async with serving_graph(served.compile(checkpointer=InMemorySaver()), 7206,
                             pair.server.transport):
        paused = await graph.ainvoke({"question": "Q4"}, config)
        [question] = paused["__interrupt__"]
        assert question.value == {"check": "draft of Q4"}
        done = await graph.ainvoke(Command(resume="looks right"), config)
    assert done["message"] == "draft of Q4: looks right"
    assert drafts == ["Q4"]


async def test_a_remote_subgraph_asking_in_turn_gets_each_answer(pair: Pair) -> None:
    """A remote graph that asks three questions in turn, as a node of a checkpointed parent:
    each resume of the parent (answers without an id, or by the interrupt's id) answers the
    question it paused on, as with a local subgraph; LangGraph gives the node's n-th
    interrupt() call the n-th answer of all the task's runs, so earlier answers are not sent
    again."""
    served = StateGraph(State)
    for key, after in (("question", START), ("answer", "question"), ("approved", "answer")):
        served.add_node(key, lambda state, key=key: {key: interrupt(f"{key}?")})
        served.add_edge(after, key)
    graph = one_node(PilotRemoteGraph(pair.server_name, 7218, transport=pair.client.transport),
                     InMemorySaver())
    async with serving_graph(served.compile(checkpointer=InMemorySaver()), 7218,
                             pair.server.transport):
        for by_id in (False, True):
            config = RunnableConfig(configurable={"thread_id": f"by-id-{by_id}"})
            paused = await graph.ainvoke({}, config)
            asked = []
            for answer in ("Q4", 42, "yes"):
                [question] = paused["__interrupt__"]
                asked.append(question.value)
                paused = await graph.ainvoke(
                    Command(resume={question.id: answer} if by_id else answer), config)
            assert asked == ["question?", "answer?", "approved?"]
            assert paused == {"question": "Q4", "answer": 42, "approved": "yes"}


async def test_new_input_to_a_parent_starts_its_remote_subgraph_anew(pair: Pair) -> None:
    """New input on a parent thread whose remote subgraph waits on a question starts a new
    run, as it does a local subgraph: the remote graph asks about the new input, and the
    answer goes to that question, not the one left unanswered."""
    graph = one_node(PilotRemoteGraph(pair.server_name, 7219, transport=pair.client.transport),
                     InMemorySaver())
    config = RunnableConfig(configurable={"thread_id": "parent-1"})
    async with serving_graph(review_graph(), 7219, pair.server.transport):
        first = await graph.ainvoke({"question": "delete prod?"}, config)
        assert [i.value for i in first["__interrupt__"]] == [{"question": "delete prod?"}]
        second = await graph.ainvoke({"question": "deploy docs?"}, config)
        assert [i.value for i in second["__interrupt__"]] == [{"question": "deploy docs?"}]
        assert await graph.ainvoke(Command(resume="yes"), config) == {
            "question": "deploy docs?", "approved": "yes"}


async def test_a_remote_graph_node_of_a_replier_that_is_no_graph_is_a_clear_error(
        tmp_path: Path) -> None:
    """As a node of a checkpointed parent, the remote graph's answers about interrupts come
    from the peer: a plain req/rep handler (or a hostile peer) answers anything, which must be
    a ConfigError naming the peer, not an AttributeError from inside LangGraph's interrupt."""
    asked = Codec().encode({"__interrupt__": [Interrupt("q?", id="i-1")]}, "a question")

    async def plain(request: Request) -> object:
        # Its answer to a run looks like a paused graph's, to a "pending" not a bit.
        return asked if request.json()["op"] == "invoke" else {"rows": [1, 2]}

    async def hostile(request: Request) -> object:
        return [] if request.json()["op"] == "pending" else {"__interrupt__": ["not one"]}

    config = RunnableConfig(configurable={"thread_id": "parent-1"})
    async with embedded(tmp_path) as pair, \
            serving(pair.server.transport, 7207, plain), \
            serving(pair.server.transport, 7208, hostile):
        for port, resume in ((7207, True), (7208, False)):
            graph = one_node(PilotRemoteGraph(pair.server_name, port,
                                              transport=pair.client.transport), InMemorySaver())
            if resume:  # the parent asks whether the thread waits only when it is resumed
                assert "__interrupt__" in await graph.ainvoke({"question": "Q4"}, config)
            with pytest.raises(ConfigError, match=rf"serve_graph on port {port}"):
                await graph.ainvoke(Command(resume="yes") if resume else {"question": "Q4"},
                                    config)


# -- re-runs: no second delivery ---------------------------------------------------------------


async def test_a_task_rerun_after_an_interrupt_does_not_deliver_twice(pair: Pair) -> None:
    """A node sends, then asks for approval (interrupt): resuming re-runs the whole node, so
    the send happens again with the same idempotency key and the receiver drops it."""
    send = PilotSend(pair.server_name, 7301, transport=pair.client.transport, timeout=20)

    async def send_then_approve(state: State, config: RunnableConfig) -> State:
        update = await send.ainvoke(state, config)
        return {**update, "approved": interrupt("sent: approve?")}  # type: ignore[typeddict-item]

    builder = StateGraph(State)
    builder.add_node("send", send_then_approve)
    builder.add_node("send_more", lambda state: {"message": "second"})
    builder.add_node("send_again", PilotSend(pair.server_name, 7301,
                                             transport=pair.client.transport, timeout=20))
    builder.add_edge(START, "send")
    builder.add_edge("send", "send_more")
    builder.add_edge("send_more", "send_again")
    builder.add_edge("send_again", END)
    sender = builder.compile(checkpointer=InMemorySaver())
    config = RunnableConfig(configurable={"thread_id": "approval"})

    node = receiver(pair, 7301)
    receiving = one_node(node)
    first = asyncio.create_task(receiving.ainvoke({}))
    paused = await sender.ainvoke({"message": "first"}, config)
    assert "__interrupt__" in paused
    assert (await asyncio.wait_for(first, 20))["message"] == "first"

    second = asyncio.create_task(receiving.ainvoke({}))
    done = await sender.ainvoke(Command(resume=True), config)
    assert (await asyncio.wait_for(second, 20))["message"] == "second"
    assert done["approved"] is True
    assert node.duplicates == 1  # the re-run's copy of "first"


async def test_a_receive_rerun_after_an_interrupt_gets_the_same_message(pair: Pair) -> None:
    """A node receives, then asks for approval: resuming re-runs it, and its PilotReceive hands
    back what it took instead of waiting for another message."""
    receive = receiver(pair, 7302)

    async def receive_then_approve(state: State, config: RunnableConfig) -> State:
        update = await receive.ainvoke(state, config)
        return {**update, "approved": interrupt("received: approve?")}  # type: ignore[typeddict-item]

    graph = one_node(receive_then_approve, InMemorySaver())
    config = RunnableConfig(configurable={"thread_id": "receiver"})
    receiving = asyncio.create_task(graph.ainvoke({}, config))
    await one_node(PilotSend(pair.server_name, 7302, transport=pair.client.transport,
                             timeout=20)).ainvoke({"message": "only"})
    assert "__interrupt__" in await asyncio.wait_for(receiving, 20)
    done = await asyncio.wait_for(graph.ainvoke(Command(resume="ok"), config), 5)
    assert (done["message"], done["approved"]) == ("only", "ok")


async def test_a_receive_called_twice_in_one_task_gets_the_next_message(pair: Pair) -> None:
    """One PilotReceive called twice in a node gets two messages; the node's re-run after an
    interrupt gets the same two again, in order, without waiting for more."""
    receive = receiver(pair, 7303)

    async def receive_two_then_approve(state: State, config: RunnableConfig) -> State:
        first = await receive.ainvoke(state, config)
        second = await receive.ainvoke(state, config)
        return {"answer": [first["message"], second["message"]],
                "approved": interrupt("received two: approve?")}

    graph = one_node(receive_two_then_approve, InMemorySaver())
    config = RunnableConfig(configurable={"thread_id": "twice"})
    receiving = asyncio.create_task(graph.ainvoke({}, config))
    for value in ("one", "two"):  # two tasks of the sender: two idempotency keys
        await one_node(PilotSend(pair.server_name, 7303, transport=pair.client.transport,
                                 timeout=20)).ainvoke({"message": value})
    paused = await asyncio.wait_for(receiving, 20)
    assert "__interrupt__" in paused
    done = await asyncio.wait_for(graph.ainvoke(Command(resume="ok"), config), 5)
    assert (done["answer"], done["approved"]) == (["one", "two"], "ok")
    assert receive.duplicates == 0


async def test_a_killed_agent_resumed_from_its_sqlite_checkpoint_delivers_once(
        tmp_path: Path) -> None:
    """Two agents, each a process with its daemon. The sender is checkpointed (AsyncSqliteSaver)
    before its send, killed after the send but before the send's step is checkpointed, and
    resumed in a new process: that runs the send again, and the receiver gets it once."""
    with agent_daemons("alpha", "beta") as (alpha, beta):
        db = str(tmp_path / "sender.db")
        node = PilotReceive(transport=None, home=beta.home, timeout=60)
        receiving = one_node(node)
        first = start_agent(alpha, "crash-sender", db, "beta", "1001", "first")
        try:
            got = await asyncio.wait_for(receiving.ainvoke({}), 60)
            assert (got["message"], got["message_from"]) == ("v1", "alpha")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        resumed = start_agent(alpha, "crash-sender", db, "beta", "1001", "resume")
        got = await asyncio.wait_for(receiving.ainvoke({}), 60)
        assert got["message"] == "v2"  # the copy of "v1" before it was dropped
        assert node.duplicates == 1
        state = await finish(resumed)
        assert state["blocked"] is True and state["draft_receipt"]["peer"] == beta.node_id


# -- three agents, three processes --------------------------------------------------------------


async def test_three_agents_in_three_processes_hand_the_work_on() -> None:
    """scraper -> analyzer -> reporter, each a graph in its own process with its own daemon,
    by hostname; the scraper runs synchronously (graph.invoke)."""
    with agent_daemons("scraper", "analyzer", "reporter") as (scraper, analyzer, reporter):
        agents = [start_agent(reporter, "reporter"), start_agent(analyzer, "analyzer"),
                  start_agent(scraper, "scraper")]
        reported, analyzed, scraped = [await finish(a) for a in agents]
    assert reported["insights"] == {"totals": {"north": 300.5, "south": 150.25},
                                    "note": "four rows, two regions", "source": "scraper"}
    assert reported["insights_from"] == "analyzer"
    assert analyzed["batch_from"] == "scraper"
    assert analyzed["insights_receipt"]["peer"] == reporter.node_id
    assert scraped["batch_receipt"]["peer"] == analyzer.node_id


@contextlib.contextmanager
def agent_daemons(*names: str) -> Iterator[list[DaemonHandle]]:
    """A daemon per name, each a static, trusted peer of the next."""
    homes = [short_home() for _ in names]
    try:
        daemons = start_daemons(*zip(homes, names, strict=True))
        for a, b in itertools.pairwise(daemons):
            peer_up(a, b)
        yield daemons
    finally:
        stop_daemons(*homes)


def start_agent(daemon: DaemonHandle, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PILOT_HOME": str(daemon.home)}
    return subprocess.Popen([sys.executable, AGENTS, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


async def finish(agent: subprocess.Popen[str], timeout: float = 90) -> dict[str, Any]:
    try:
        out, err = await asyncio.to_thread(agent.communicate, timeout=timeout)
    except subprocess.TimeoutExpired:
        agent.kill()
        out, err = agent.communicate()
        raise AssertionError(f"agent {agent.args!r} did not finish: {err}") from None
    assert agent.returncode == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


# -- synchronous graphs -------------------------------------------------------------------------


async def test_graph_invoke_runs_the_nodes_synchronously(
        daemon_pair: tuple[DaemonHandle, DaemonHandle]) -> None:
    """Under graph.invoke (no event loop in the thread, or one running) the nodes open their
    own daemon clients."""
    alpha, beta = daemon_pair
    async with Client(alpha.home) as client:
        send = one_node(PilotSend("beta", 7401, transport=client))
        receive = one_node(PilotReceive(7401, home=beta.home, timeout=20))
        with ThreadPoolExecutor(1) as pool:  # a thread without a loop
            receiving = pool.submit(receive.invoke, {})
            sent = send.invoke({"message": [HumanMessage("sync")]})  # this thread runs a loop
            got = receiving.result(timeout=30)
    assert got["message"] == [HumanMessage("sync")] and got["message_from"] == "alpha"
    assert sent["message_receipt"]["peer"] == beta.node_id


async def test_a_remote_graph_streams_synchronously_as_it_happens(
        daemon_pair: tuple[DaemonHandle, DaemonHandle]) -> None:
    alpha, beta = daemon_pair
    release, cancelled = asyncio.Event(), asyncio.Event()
    async with Client(alpha.home) as client, Client(beta.home) as server, \
            serving_graph(gated_graph(release, cancelled), 7403, server):
        updates = PilotRemoteGraph("beta", 7403, transport=client).stream({})
        first = await asyncio.wait_for(asyncio.to_thread(next, updates), 10)
        assert first == {"first": {"question": "started"}}
        release.set()
        rest = await asyncio.wait_for(asyncio.to_thread(list, updates), 10)
        assert rest == [{"second": {"answer": "released"}}]
        release.clear()
        early = PilotRemoteGraph("beta", 7403, home=alpha.home).stream({})
        assert isinstance(early, Generator)
        assert await asyncio.wait_for(asyncio.to_thread(next, early), 10) == first
        await asyncio.to_thread(early.close)  # stop asking: the remote run is cancelled
        await asyncio.wait_for(cancelled.wait(), 10)


async def test_an_embedded_node_under_graph_invoke_is_a_clear_error(tmp_path: Path) -> None:
    async with embedded(tmp_path) as pair:
        graph = one_node(PilotSend(pair.server_name, 7402, transport=pair.client.transport))
        with pytest.raises(ConfigError, match=r"graph\.ainvoke"):
            await asyncio.to_thread(graph.invoke, {"message": 1})


# -- user mistakes ------------------------------------------------------------------------------


async def test_user_mistakes_are_clear_errors(pair: Pair) -> None:
    send = one_node(PilotSend(pair.server_name, 7501, key="report",
                              transport=pair.client.transport, timeout=1))
    with pytest.raises(MissingStateKeyError, match=r"'report'.*keys: 'message'"):
        await send.ainvoke({"message": 1})
    with pytest.raises(UnserializableValueError, match="'message' is a lock"):
        await one_node(PilotSend(pair.server_name, 7501, transport=pair.client.transport)
                       ).ainvoke({"message": threading.Lock()})
    with pytest.raises(PilotTimeoutError, match="no listener on port 7501"):
        await one_node(PilotSend(pair.server_name, 7501, transport=pair.client.transport,
                                 timeout=1)).ainvoke({"message": 1})
    with pytest.raises(PilotTimeoutError, match=r"no message on port 7502 within 0\.5 s"):
        await one_node(PilotReceive(7502, transport=pair.server.transport, timeout=0.5)
                       ).ainvoke({})


async def test_a_call_to_a_peer_needs_a_number_of_seconds(pair: Pair) -> None:
    """timeout=None was a TypeError from deep inside the first call ('float' + 'NoneType');
    a wait on a peer that may never answer is bounded, so it is refused where it is given.
    PilotReceive's None (wait for ever for a message) stays."""
    for bad in (None, 0, -1, float("inf"), "30"):
        for make in (lambda t: PilotSend("analyzer", timeout=t),
                     lambda t: PilotRequest("db", 2001, "q", "a", timeout=t),
                     lambda t: PilotRemoteGraph("analyzer", 2001, timeout=t)):
            with pytest.raises(ConfigError, match=r"timeout= takes a positive number of sec"):
                make(bad)
    assert PilotReceive(timeout=None).timeout is None
    async with Requester(pair.client.transport) as requester:
        with pytest.raises(ConfigError, match=r"timeout= takes a number of seconds, not None"):
            await requester.request(pair.server_name, 7503, b"x", timeout=None)  # type: ignore[arg-type]


async def test_serving_a_graph_that_was_not_compiled_is_refused_at_the_start(
        pair: Pair) -> None:
    """A StateGraph (the builder) was served without a word, and every caller got a
    RemoteError "AttributeError: 'StateGraph' object has no attribute 'ainvoke'"."""
    builder = StateGraph(State)
    builder.add_node("n", lambda state: {"answer": 1})
    builder.add_edge(START, "n")
    with pytest.raises(ConfigError, match=r"StateGraph is its builder: call \.compile\(\)"):
        async with serving_graph(builder, 7504, pair.server.transport):  # type: ignore[arg-type]
            pass
    with pytest.raises(ConfigError, match=r"compiled graph .* not a function"):
        await remote_module.serve_graph(lambda state: state, 7504,  # type: ignore[arg-type]
                                        pair.server.transport)
    async with serving_graph(builder.compile(), 7504, pair.server.transport):
        assert await PilotRemoteGraph(pair.server_name, 7504, transport=pair.client.transport
                                      ).ainvoke({}) == {"answer": 1}


def test_a_node_added_without_a_name_has_one_langgraph_takes() -> None:
    """The default names held ':' ("PilotSend(analyzer:1001)"), which LangGraph reserves:
    builder.add_node(PilotSend("analyzer")) raised "':' is a reserved character"."""
    nodes = [PilotSend("analyzer"), PilotReceive(), PilotRequest("db", 2001, "q", "a"),
             PilotRemoteGraph("analyzer", 2001)]
    builder = StateGraph(State)
    for node in nodes:
        builder.add_node(node)
    assert list(builder.nodes) == ["PilotSend(analyzer, 1001)", "PilotReceive(1001)",
                                   "PilotRequest(db, 2001)", "PilotRemoteGraph(analyzer, 2001)"]


async def test_call_options_a_remote_graph_does_not_act_on_are_refused(pair: Pair) -> None:
    """subgraphs=True, output_keys=, interrupt_before=... were dropped without a word: the
    caller got items of another shape, or keys it had not asked for, than a local graph
    gives."""
    remote = PilotRemoteGraph(pair.server_name, 7505, transport=pair.client.transport)
    async with serving_graph(doubling_graph(), 7505, pair.server.transport):
        with pytest.raises(ConfigError, match=r"does not take subgraphs=: it takes an input, "
                                              r"a config and stream_mode='updates' only"):
            await anext(remote.astream({"question": 1}, subgraphs=True))
        with pytest.raises(ConfigError, match="does not take output_keys=, debug="):
            await remote.ainvoke({"question": 1}, output_keys=["answer"], debug=True)
        with pytest.raises(ConfigError, match="does not take interrupt_before="):
            await asyncio.to_thread(remote.invoke, {"question": 1}, interrupt_before=["read"])
        with pytest.raises(ConfigError, match="does not take interrupt_after="):
            await asyncio.to_thread(lambda: next(remote.stream({"question": 1},
                                                               interrupt_after="*")))
        with pytest.raises(ConfigError, match=r"PilotRequest.* does not take context="):
            await PilotRequest(pair.server_name, 7505, "q", "a").ainvoke({}, context={"a": 1})
        # What they ask for is what a remote graph does: taken, as the defaults are.
        assert (await remote.ainvoke({"question": 1}, None, debug=False, output_keys=None)
                )["answer"] == 2
        assert [u async for u in remote.astream({"question": 1}, stream_mode="updates",
                                                subgraphs=False)][-1] == {"double": {"answer": 2}}


def test_no_daemon_running_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    home = short_home()
    try:
        monkeypatch.setenv("PILOT_HOME", str(home))
        with pytest.raises(DaemonNotRunningError, match="daemon start"):
            one_node(PilotSend("analyzer")).invoke({"message": 1})
    finally:
        stop_daemons(home)


# -- the codec ----------------------------------------------------------------------------------


def test_values_round_trip_and_plain_json_goes_as_itself() -> None:
    codec = Codec()
    plain: list[object] = [{"a": [1, "x", None, True]}, "text", 3.5, None]
    for value in plain:
        assert codec.encode(value) == value  # as itself: any JSON peer reads it
    typed: list[object] = [[HumanMessage("hi")], (1, 2), {1: "int key"}, b"raw", {"pilot": "mine"},
                           Command(resume={"ok": 1}), float("inf")]
    for value in typed:
        wire = codec.encode(value)
        assert wire["pilot"] == "lg-value/1"
        decoded = codec.decode(json.loads(json.dumps(wire)), (Command,))
        if isinstance(value, Command):  # msgpack has no tuples: compare what a resume uses
            assert isinstance(decoded, Command) and decoded.resume == value.resume
        else:
            assert decoded == (list(value) if isinstance(value, tuple) else value)


def test_values_nested_too_deep_are_refused_not_a_recursion_error() -> None:
    """A peer's '[[[[...' crashed PilotReceive with RecursionError, uncounted; a state value
    that contains itself raised it too, where a value that cannot go is an
    UnserializableValueError naming its key."""
    with pytest.raises(WireError, match="nested deeper"):
        parse(b"[" * 100_000)
    looped: dict[str, object] = {}
    looped["me"] = looped
    for value in (looped, functools.reduce(lambda inner, _: [inner], range(5000), [])):
        with pytest.raises(UnserializableValueError, match="the state key 'k' is nested deeper"):
            Codec().encode(value, "the state key 'k'")


class Custom:
    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.n == self.n


class Point(BaseModel):
    x: int


def test_a_peer_cannot_make_us_build_classes_we_did_not_allow() -> None:
    wire = json.loads(json.dumps(Codec().encode(Point(x=1))))
    assert Codec().decode(wire) == {"x": 1}  # its fields, not the class
    assert Codec(allowed_types=[Point]).decode(wire) == Point(x=1)
    with pytest.raises(UnserializableValueError, match="Custom"):
        Codec().encode(Custom(1))
    for hostile in HOSTILE:
        with pytest.raises(WireError, match="a value holding"):
            Codec().decode(json.loads(json.dumps(Codec().encode(hostile))), (Command,))
    assert Codec(allowed_types=[Overwrite]).decode(Codec().encode(Overwrite(1))) == Overwrite(1)
    for bad in ({"pilot": "lg-value/1", "msgpack": "not base64!"},
                {"pilot": "lg-value/1", "msgpack": "AAAA"[:3]},
                {"pilot": "lg-value/1", "type": "pickle", "data": ""},
                {"pilot": "lg-value/1"}):
        with pytest.raises(WireError):
            Codec().decode(bad)
