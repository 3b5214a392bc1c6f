"""Agents for tests/test_langgraph.py, each a compiled graph in a process of its own, talking
through the daemon of $PILOT_HOME (the nodes' default transport). Prints its final state as
JSON on stdout.

    python tests/langgraph_agents.py scraper     # sends rows to "analyzer"
    python tests/langgraph_agents.py analyzer    # receives them, sends insights to "reporter"
    python tests/langgraph_agents.py reporter    # receives the insights
    python tests/langgraph_agents.py crash-sender DB PEER PORT first|resume
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TypedDict

from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from pilot_agents.integrations.langgraph import PilotReceive, PilotSend

ROWS = [
    {"region": "north", "quarter": "Q1", "sales": 120.0},
    {"region": "north", "quarter": "Q2", "sales": 180.5},
    {"region": "south", "quarter": "Q1", "sales": 90.25},
    {"region": "south", "quarter": "Q2", "sales": 60.0},
]


class Pipeline(TypedDict, total=False):
    batch: dict[str, Any]  # {"rows": [...], "note": HumanMessage}
    batch_receipt: dict[str, Any]
    batch_from: str
    insights: dict[str, Any]
    insights_receipt: dict[str, Any]
    insights_from: str


def scraper() -> dict[str, Any]:
    """Synchronous graph.invoke, so the nodes' sync path is what runs here."""
    builder = StateGraph(Pipeline)
    builder.add_node("scrape", lambda state: {
        "batch": {"rows": ROWS, "note": HumanMessage("four rows, two regions")}})
    builder.add_node("send", PilotSend("analyzer", key="batch"))
    builder.add_edge(START, "scrape")
    builder.add_edge("scrape", "send")
    builder.add_edge("send", END)
    return builder.compile().invoke({})


def analyze(state: Pipeline) -> Pipeline:
    batch = state["batch"]
    assert isinstance(batch["note"], HumanMessage), batch  # the typed value arrived typed
    totals: dict[str, float] = {}
    for row in batch["rows"]:
        totals[row["region"]] = totals.get(row["region"], 0.0) + row["sales"]
    return {"insights": {"totals": totals, "note": batch["note"].content,
                         "source": state["batch_from"]}}


async def analyzer() -> dict[str, Any]:
    builder = StateGraph(Pipeline)
    builder.add_node("receive", PilotReceive(key="batch", timeout=60))
    builder.add_node("analyze", analyze)
    builder.add_node("send", PilotSend("reporter", key="insights"))
    builder.add_edge(START, "receive")
    builder.add_edge("receive", "analyze")
    builder.add_edge("analyze", "send")
    builder.add_edge("send", END)
    return await builder.compile().ainvoke({})


async def reporter() -> dict[str, Any]:
    builder = StateGraph(Pipeline)
    builder.add_node("receive", PilotReceive(key="insights", timeout=60))
    builder.add_edge(START, "receive")
    return await builder.compile().ainvoke({})


class Drafts(TypedDict, total=False):
    draft: str
    draft_receipt: dict[str, Any]
    after: str
    after_receipt: dict[str, Any]
    blocked: bool


async def crash_sender(db: str, peer: str, port: int, phase: str) -> dict[str, Any]:
    """Checkpointed before the send (an approval interrupt); the send and a slow node share a
    step, so the process is killed in phase "first" after the send but before that step is
    checkpointed (durability="exit" holds writes until the run ends); "resume" continues the
    thread from the checkpoint, which runs the same send task again."""
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async def slow(state: Drafts) -> Drafts:
        if phase == "first":
            print("sent; now blocked", file=sys.stderr, flush=True)
            await asyncio.sleep(3600)  # the test kills us here
        return {"blocked": True}

    builder = StateGraph(Drafts)
    builder.add_node("prepare", lambda state: {"draft": "v1", "after": "v2"})
    builder.add_node("send", PilotSend(peer, port, key="draft"))
    builder.add_node("slow", slow)
    builder.add_node("send_after", PilotSend(peer, port, key="after"))
    builder.add_edge(START, "prepare")
    builder.add_edge("prepare", "send")
    builder.add_edge("prepare", "slow")
    builder.add_edge(["send", "slow"], "send_after")
    builder.add_edge("send_after", END)
    config = RunnableConfig(configurable={"thread_id": "drafts"})
    async with AsyncSqliteSaver.from_conn_string(db) as saver:
        graph = builder.compile(checkpointer=saver, interrupt_before=["send"])
        if phase == "first":
            await graph.ainvoke({}, config)  # stops before the send, checkpointed
        return await graph.ainvoke(None, config, durability="exit")


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "scraper":
        state = scraper()
    elif role == "analyzer":
        state = asyncio.run(analyzer())
    elif role == "reporter":
        state = asyncio.run(reporter())
    elif role == "crash-sender":
        state = asyncio.run(crash_sender(argv[1], argv[2], int(argv[3]), argv[4]))
    else:
        raise SystemExit(f"unknown role {role!r}")
    print(json.dumps(state, default=repr))


if __name__ == "__main__":
    main(sys.argv[1:])
