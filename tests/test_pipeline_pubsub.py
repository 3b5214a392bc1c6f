"""The publish/subscribe steps: Publisher.drain on embedded Nodes; the steps end to end through
`pilot-agents run` (real beacon, daemons and tunnels)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from pilot_agents import PilotTimeoutError
from pilot_agents.patterns import Publisher, Subscriber
from pilot_agents.pipeline.graph import build_graph
from pilot_agents.pipeline.load import InvalidPipeline, parse
from pilot_agents.pipeline.pubsub import PublishNode
from tests.conftest import ROOT
from tests.test_pipeline_run import (  # noqa: F401 (no_logs_left: a fixture)
    CMD,
    alive,
    daemon_pids,
    events_of,
    no_logs_left,
)
from tests.test_pubsub import until_subscribed
from tests.transport_pairs import embedded


async def test_drain_waits_until_the_queues_are_sent(tmp_path: Path) -> None:
    async with (embedded(tmp_path) as pair,
                Subscriber(pair.client.transport, pair.server_name, 8101, [""]) as sub):
        async with Publisher(pair.server.transport, 8101) as pub:
            await until_subscribed(pub, 1)
            for n in range(5):
                await pub.publish("t", b"x" * 30_000 + bytes([n]))
            with pytest.raises(PilotTimeoutError, match="5 publications still queued for "
                               "1 subscribers after 0 s"):
                await pub.drain(0)
            await pub.drain(10)
        # Closed right after the drain: every publication had reached the transport.
        assert [(await sub.receive(5)).data[-1] for _ in range(5)] == [0, 1, 2, 3, 4]


FANOUT = """\
agents:
  editor:
    steps:
      - {id: first, publish: {port: 3001, topic: news.a, key: s}}
      - {id: second, publish: {port: 3001, topic: news.b, key: s}}
  once: {steps: [{subscribe: {to: editor, port: 3001, topic: news.a}}]}
  twice: {steps: [{subscribe: {to: editor, port: 3001, topic: news., count: 2}}]}
"""


def test_the_kth_publish_waits_for_the_subscribers_that_take_k_or_more() -> None:
    graph = build_graph(parse(FANOUT, "p.yaml"), "editor")
    nodes = [graph.nodes[n].bound for n in ("first", "second")]
    assert [n.subscribers for n in nodes if isinstance(n, PublishNode)] == [2, 1]
    with pytest.raises(InvalidPipeline) as info:
        parse(FANOUT.replace("topic: news.a}", "topic: sports}"), "p.yaml")
    assert str(info.value.problems[0]).startswith(
        "p.yaml:6: agents.once.steps.0.subscribe.to: editor has no publish step on port 3001 "
        "with a topic starting 'sports'")


def run(folder: Path, pipeline: str) -> subprocess.CompletedProcess[str]:
    (folder / "keep.py").write_text(textwrap.dedent("""\
        import json
        def keep(state, path):
            with open(path, "w") as f:
                json.dump([state["news"], state["news_topic"], state["news_from"]], f)
            return {}
        def crash(state):
            import time
            time.sleep(6)  # after the publisher's 2 s: its own failure, not a stop, ends it
            raise RuntimeError("the reader is down")
        """))
    (folder / "p.yaml").write_text(textwrap.dedent(pipeline))
    return subprocess.run([*CMD, "--json", "run", str(folder / "p.yaml")], capture_output=True,
                          text=True, timeout=180, cwd=ROOT)


def test_one_agent_publishes_to_two_subscriber_agents(tmp_path: Path) -> None:
    """Both get the first publication; the one that takes two subscribes again for the
    second publish step."""
    result = run(tmp_path, """\
        agents:
          editor:
            input: {story: {headline: "rates up", n: 1}}
            steps:
              - {id: announce, publish: {port: 3001, topic: news.markets, key: story}}
              - {id: again, publish: {port: 3001, topic: news.later, key: story}}
          reader-a:
            steps:
              - {subscribe: {to: editor, port: 3001, topic: news., key: news}}
              - {python: "keep:keep", args: {path: a.json}}
          reader-b:
            steps:
              - {subscribe: {to: editor, port: 3001, key: news, count: 2}}
              - {python: "keep:keep", args: {path: b.json}}
        """)
    assert result.returncode == 0, result.stdout + result.stderr
    story = {"headline": "rates up", "n": 1}
    assert json.loads((tmp_path / "a.json").read_text()) == [story, "news.markets", "editor"]
    assert json.loads((tmp_path / "b.json").read_text()) == [
        [story, story], ["news.markets", "news.later"], "editor"]
    events = events_of(result.stdout)
    reached = {e["step"]: e["subscribers"] for e in events if e["event"] == "step"
               and e["agent"] == "editor" and e["status"] == "done"}
    assert reached == {"announce": 2, "again": 1}
    assert not any(alive(pid) for pid in daemon_pids(events))


def test_a_publish_whose_subscriber_never_comes_fails_in_one_line(tmp_path: Path) -> None:
    result = run(tmp_path, """\
        agents:
          editor:
            input: {story: hello}
            steps:
              - {id: announce, publish: {port: 3001, topic: t, key: story, timeout: 2}}
          reader:
            steps:
              - {python: "keep:crash"}
              - {subscribe: {to: editor, port: 3001, key: news}}
        """)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    summary = events_of(result.stdout)[-1]
    assert summary["agents"]["editor"]["error"] == (
        "step 'announce': 0 of 1 subscribers subscribed to port 3001 within 2 s")
