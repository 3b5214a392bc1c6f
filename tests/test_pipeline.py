"""Pipeline files: schema errors name the file, line and field; `validate`; graphs built from
steps (no network)."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
from pathlib import Path

import pytest

from pilot_agents.errors import PipelineError
from pilot_agents.integrations.langgraph import PilotReceive, PilotSend
from pilot_agents.pipeline.graph import build_graph
from pilot_agents.pipeline.load import InvalidPipeline, load, parse
from pilot_agents.pipeline.schema import PythonStep
from tests.conftest import ROOT, assert_one_line_error, cli

EXAMPLE = ROOT / "examples/pipeline-basic/pipeline.yaml"
FULL_EXAMPLE = ROOT / "examples/pipeline/pipeline.yaml"


def problems(text: str) -> list[str]:
    with pytest.raises(InvalidPipeline) as info:
        parse(textwrap.dedent(text), "p.yaml")
    return [str(p) for p in info.value.problems]


def test_example_is_valid_and_trust_follows_the_sends() -> None:
    spec = load(EXAMPLE).spec
    assert spec.peers_of("scraper") == ["analyzer"]
    assert spec.peers_of("analyzer") == ["reporter", "scraper"]
    assert spec.peers_of("reporter") == ["analyzer"]
    assert spec.receive_ports("analyzer") == [1001]


def test_unknown_field_names_its_line_and_path() -> None:
    assert problems("""\
        agents:
          a:
            steps:
              - pilot_receive: {key: x}
          b:
            steps:
              - python: m:f
              - pilot_send: {to: a, key: x, prot: 3}
        """) == ["p.yaml:8: agents.b.steps.1.pilot_send.prot: not a known field (a typo?)"]


def test_each_error_is_reported() -> None:
    found = problems("""\
        settings: {timeout: -1}
        agents:
          a:
            hostname: Not_A_Host
            steps:
              - bogus: 1
        """)
    assert found[0] == "p.yaml:1: settings.timeout: Input should be greater than 0"
    assert found[1].startswith("p.yaml:4: agents.a.hostname: 'Not_A_Host' is not a hostname")
    assert found[2].startswith("p.yaml:6: agents.a.steps.0: a step has exactly one of the keys")
    assert found[2].endswith("; it has 'bogus'")


def test_a_misspelt_step_kind_is_named_with_what_it_likely_meant() -> None:
    found = problems("""\
        agents:
          a:
            steps:
              - pilot_sned: {to: b, key: x}
              - {python: "m:f", mcp: {server: s, tool: t}}
        """)
    assert found[0].endswith("; it has 'pilot_sned' (did you mean 'pilot_send'?)"), found
    assert found[1].endswith("; it has 2: python, mcp"), found


def test_strict_types_and_missing_fields() -> None:
    found = problems("""\
        agents:
          a:
            steps:
              - pilot_request: {to: b, port: "80", key: q}
          b:
            steps: [{python: m.f}]
        """)
    assert "p.yaml:4: agents.a.steps.0.pilot_request.port: Input should be a valid integer" \
        in found
    assert "p.yaml:4: agents.a.steps.0.pilot_request.result_key: required, and missing" in found


@pytest.mark.parametrize(("text", "expected"), [
    ("""\
     agents:
       a:
         steps:
           - pilot_send: {to: nobody}
     """, "p.yaml:4: agents.a.steps.0.pilot_send.to: 'nobody' is not an agent of this pipeline"),
    ("""\
     agents:
       a:
         steps: [{python: m:f}]
       b:
         steps:
           - pilot_send: {to: a, port: 7}
     """, "p.yaml:6: agents.b.steps.0.pilot_send.to: a has no pilot_receive step on port 7"),
    ("""\
     agents:
       a:
         steps:
           - {id: x, python: m:f}
           - {id: x, python: m:g}
     """, "p.yaml:5: agents.a.steps.1.id: two steps are called 'x'"),
    ("""\
     agents:
       a:
         mcp_servers:
           fetch: {command: uvx, args: [mcp-server-fetch]}
         steps:
           - mcp: {server: fecth, tool: fetch}
     """, "p.yaml:6: agents.a.steps.0.mcp.server: 'fecth' is not one of this agent's"),
    ("""\
     agents:
       a:
         steps: [{id: x, python: m:f}]
         edges: [[x, y]]
     """, "p.yaml:4: agents.a.edges.0.1: 'y' is not a step id of this agent"),
    ("""\
     agents:
       a:
         steps: [{id: x, python: m:f}, {id: y, python: m:g}]
         edges: [[x, y], [y, x]]
     """, "p.yaml:4: agents.a.edges.1: the edges loop (x -> y -> x), so the graph would never "
         "end"),
    ("""\
     agents:
       a:
         steps: [{id: x, python: m:f}]
         edges: [[START, x], [x, x], [x, END]]
     """, "p.yaml:4: agents.a.edges.1: the edges loop (x -> x)"),
    ("""\
     agents:
       a: {steps: [{python: m:f}]}
       a: {steps: [{python: m:g}]}
     """, "p.yaml:3: agents.a: given twice in one mapping"),
    ("""\
     agents:
       a:
         steps: [{python: m:f}]
       b:
         steps:
           - pilot_receive: {port: 7}
     """, "p.yaml:6: agents.b.steps.0.pilot_receive.port: no pilot_send step of this file sends "
         "to b on port 7, so this step would wait for its timeout"),
    ("""\
     agents:
       a:
         steps: [{python: m:f}]
       b:
         steps:
           - pilot_request: {to: a, port: 2001, key: q, result_key: r}
     """, "p.yaml:6: agents.b.steps.0.pilot_request.to: a does not serve port 2001"),
    ("""\
     agents:
       a: {serve: {port: 9}, steps: [{python: m:f}]}
     """, "p.yaml:1: agents: every agent serves"),
    ("""\
     services:
       web: {command: x, ready: {}}
     agents: {a: {steps: [{python: m:f}]}}
     """, "p.yaml:2: services.web.ready: give one of tcp: HOST:PORT or http: URL"),
    ("""\
     services:
       web: {command: x, ready: {tcp: localhost}}
     agents: {a: {steps: [{python: m:f}]}}
     """, "p.yaml:2: services.web.ready.tcp: 'localhost' is not HOST:PORT"),
    ("""\
     agents: {a: {steps: [{python: steps2}]}}
     """, "p.yaml:1: agents.a.steps.0.python: 'steps2' is not a module and an attribute of it"),
    ("""\
     agents:
       a:
         steps: [{python: m:f, args: {p: "${PIPELINE_TEST_UNSET}"}}]
     """, "p.yaml:3: agents.a.steps.0.args.p: ${PIPELINE_TEST_UNSET}: the environment variable "
         "PIPELINE_TEST_UNSET is not set"),
    ("""\
     agents:
       a:
         steps: [{python: m:f, args: {p: "${PORT:Web}"}}]
     """, "p.yaml:3: agents.a.steps.0.args.p: ${PORT:Web}: a port's name is lowercase"),
    ("""\
     agents:
       a:
         steps: [{python: m:f, args: {p: "${oops"}}]
     """, "p.yaml:3: agents.a.steps.0.args.p: '${oops': an unclosed '${'"),
    ("agents: [a, b\n", "p.yaml:2: not valid YAML"),
    ("- a\n", "p.yaml:1: a pipeline file is a mapping"),
])
def test_cross_checks(text: str, expected: str) -> None:
    found = problems(text)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_every_cross_reference_problem_is_reported_at_once() -> None:
    """Not one per run of validate: a file with three broken links names all three."""
    assert problems("""\
        agents:
          a:
            steps:
              - pilot_send: {to: nobody}
              - pilot_send: {to: b, port: 7}
          b:
            steps:
              - {id: x, python: m:f}
              - {id: x, python: m:g}
              - mcp: {server: s, tool: t}
            edges: [[x, y]]
        """) == [
        "p.yaml:9: agents.b.steps.1.id: two steps are called 'x'",
        "p.yaml:10: agents.b.steps.2.mcp.server: 's' is not one of this agent's mcp_servers "
        "(none)",
        "p.yaml:11: agents.b.edges.0.1: 'y' is not a step id of this agent (x, x, mcp_3, or END)",
        "p.yaml:11: agents.b.edges: no edge leads to the step 'mcp_3'",
    ]
    assert problems("""\
        agents:
          a:
            steps:
              - pilot_send: {to: nobody}
              - pilot_send: {to: b, port: 7}
          b:
            hostname: a
            steps: [{python: m:f}]
        """) == [
        "p.yaml:7: agents.b.hostname: 'a' is already the hostname of a",
        "p.yaml:4: agents.a.steps.0.pilot_send.to: 'nobody' is not an agent of this pipeline "
        "(a, b)",
        "p.yaml:5: agents.a.steps.1.pilot_send.to: b has no pilot_receive step on port 7, so "
        "nothing there would read this message",
    ]


def test_variables_expand_before_validation(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        services:
          web:
            command: "${PYTHON}"
            args: [-m, http.server, "${PORT:web}"]
            ready: {http: "http://127.0.0.1:${PORT:web}/"}
        agents:
          a:
            mcp_servers:
              db: {command: "${TOOLS:-${PIPELINE_DIR}/bin}/db", env: {URL: "${PIPELINE_DIR}/x"}}
            steps: [{python: m:f, args: {p: "${PORT:web}", home: "${HOME_DIR}", cost: "$$5"}}]
        """))
    loaded = load(tmp_path / "p.yaml", {"HOME_DIR": "/h"})
    port = loaded.ports["web"]
    assert loaded.spec.services["web"].args == ["-m", "http.server", str(port)]
    ready = loaded.spec.services["web"].ready
    assert ready is not None and ready.http == f"http://127.0.0.1:{port}/"
    server = loaded.spec.agents["a"].mcp_servers["db"]
    assert server.command == f"{tmp_path}/bin/db" and server.env["URL"] == f"{tmp_path}/x"
    step = loaded.spec.agents["a"].steps[0]
    assert isinstance(step, PythonStep)
    assert step.args == {"p": str(port), "home": "/h", "cost": "$5"}
    # Another process of the run gets the same port through the environment run passes on.
    again = load(tmp_path / "p.yaml", {"HOME_DIR": "/h", **loaded.port_environ()})
    assert again.ports == {"web": port}
    assert loaded.port_environ() == {"PIPELINE_PORT_WEB": str(port)}
    assert load(tmp_path / "p.yaml", {"HOME_DIR": "/h", "TOOLS": "/t"}).spec.agents["a"] \
        .mcp_servers["db"].command == "/t/db"


def test_every_variable_error_is_reported_with_the_file_s_other_problems() -> None:
    """Only the first variable that did not expand was reported, and nothing else of the
    file. A string whose variable does not expand is not checked as written either: its
    error would only say the same again (not a hostname, here)."""
    assert problems("""\
        agents:
          a:
            hostname: "${PIPELINE_TEST_UNSET_HOST}"
            steps:
              - {python: "m:f", args: {p: "${PIPELINE_TEST_UNSET_A}"}}
              - {python: "m:f", args: {p: "${PIPELINE_TEST_UNSET_B}"}}
              - {pilot_send: {to: zz, port: "1"}}
        """) == [
        "p.yaml:3: agents.a.hostname: ${PIPELINE_TEST_UNSET_HOST}: the environment variable "
        "PIPELINE_TEST_UNSET_HOST is not set (give a default with "
        "${PIPELINE_TEST_UNSET_HOST:-DEFAULT})",
        "p.yaml:5: agents.a.steps.0.args.p: ${PIPELINE_TEST_UNSET_A}: the environment variable "
        "PIPELINE_TEST_UNSET_A is not set (give a default with ${PIPELINE_TEST_UNSET_A:-DEFAULT})",
        "p.yaml:6: agents.a.steps.1.args.p: ${PIPELINE_TEST_UNSET_B}: the environment variable "
        "PIPELINE_TEST_UNSET_B is not set (give a default with ${PIPELINE_TEST_UNSET_B:-DEFAULT})",
        "p.yaml:7: agents.a.steps.2.pilot_send.port: Input should be a valid integer",
    ]


def test_the_full_example_is_valid() -> None:
    loaded = load(FULL_EXAMPLE, {})
    spec = loaded.spec
    assert list(spec.services) == ["web", "mail", "chat"]
    assert set(loaded.ports) == {"web", "smtp", "chat"}
    assert spec.agents["analyzer"].mcp_servers["db"].env["DB_URL"] == \
        f"sqlite:///{FULL_EXAMPLE.parent}/sales.db"
    assert spec.peers_of("analyzer") == ["reporter", "scraper"]
    assert [s.kind for s in spec.agents["analyzer"].steps].count("mcp") == 5


def test_validate_cli(tmp_path: Path) -> None:
    ok = cli(None, "validate", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
    assert "analyzer (analyzer): receive -> analyze -> send; trusts reporter, scraper" in ok.stdout
    data = json.loads(cli(None, "--json", "validate", str(EXAMPLE)).stdout)
    assert data["valid"] and data["agents"]["scraper"]["peers"] == ["analyzer"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("agents:\n  a:\n    steps:\n      - pilot_send: {to: zed}\n")
    assert_one_line_error(cli(None, "validate", str(bad)), 2,
                          f"{bad}:4: agents.a.steps.0.pilot_send.to: 'zed'")
    result = cli(None, "--json", "validate", str(bad))
    assert result.returncode == 2
    report = json.loads(result.stdout)  # one document (the error object followed it)
    assert report["valid"] is False
    assert report["problems"][0] | {"message": ""} == {
        "file": str(bad), "line": 4, "field": "agents.a.steps.0.pilot_send.to", "message": ""}
    assert_one_line_error(cli(None, "validate", str(tmp_path / "none.yaml")), 2, "cannot read")


def test_an_alias_inside_the_value_it_names_is_refused(tmp_path: Path) -> None:
    """A recursive structure: every walk of the file (its lines, its variables) followed it
    until Python's recursion limit, and validate failed with an internal error (exit 70)."""
    assert problems("""\
        agents:
          a:
            steps: &s
              - {python: "m:f", args: {x: *s}}
        """) == ["p.yaml:4: recursive alias *s: it is inside the value it names, which would "
                 "never end"]
    assert problems("""\
        agents: &a
          a:
            steps:
              - {python: "m:f", args: {x: *a}}
        """)[0].startswith("p.yaml:4: recursive alias *a:")
    deep = "[" * 1000 + "]" * 1000
    assert problems(f"agents:\n  a:\n    input: {{x: {deep}}}\n    steps: [{{python: m:f}}]\n") \
        == ["p.yaml:3: nested more than 100 levels deep"]
    file = tmp_path / "p.yaml"
    file.write_text("agents:\n  a:\n    steps: &s\n      - {python: m:f, args: {x: *s}}\n")
    assert_one_line_error(cli(None, "validate", str(file)), 2, f"{file}:4: recursive alias *s")


def aliases_of_aliases(levels: int) -> str:
    """A pipeline whose input is a "billion laughs": each level nine aliases of the last."""
    lines = ["agents:", "  a:", "    steps: [{python: m:f}]", "    input:",
             '      a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"      a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_aliases_that_expand_past_the_limit_are_refused(tmp_path: Path) -> None:
    """Each level multiplies the values by 9: ten levels in 500 bytes held validate and run for
    ever, their memory growing 8-fold a level. Refused at the alias that goes past
    MAX_ALIAS_VALUES, at once; aliases under it still expand."""
    from pilot_agents.pipeline.load import MAX_ALIAS_VALUES

    assert 9 ** 5 < MAX_ALIAS_VALUES < 9 ** 6
    input_ = parse(aliases_of_aliases(5), "p.yaml").spec.agents["a"].input
    assert input_["a4"][8][8][8][8] == ["x"] * 9
    assert problems(aliases_of_aliases(6)) == [
        "p.yaml:10: *a4: with it the file's aliases expand to more than 100,000 values (each "
        "alias is a copy of the value it names), a pipeline file's limit"]
    file = tmp_path / "p.yaml"
    file.write_text(aliases_of_aliases(10))
    assert_one_line_error(cli(None, "validate", str(file), timeout=20), 2,
                          f"{file}:10: *a4: with it the file's aliases expand")


def test_aliases_that_nest_past_the_depth_limit_are_refused(tmp_path: Path) -> None:
    """Each alias inside 90 levels of nesting names a value 90 levels deep: written, no value
    nests past MAX_DEPTH (100), expanded, twelve of them nest 1,080 levels, and walking the
    file failed with an internal RecursionError (exit 70)."""
    levels = 90
    lines = ["agents:", "  a:", "    steps:", "      - python: m:f", "        args:"]
    inside = "1"
    for n in range(1, 13):
        lines.append(f"          l{n}: &l{n} {'[' * levels}{inside}{']' * levels}")
        inside = f"*l{n}"
    text = "\n".join(lines) + "\n"
    assert problems(text) == [
        "p.yaml:7: nested more than 100 levels deep, with the values its aliases name"]
    file = tmp_path / "p.yaml"
    file.write_text(text)
    assert_one_line_error(cli(None, "validate", str(file)), 2, f"{file}:7: nested more than")


def test_the_beacon_field_is_checked_as_the_daemons_take_it(tmp_path: Path) -> None:
    """`beacon: nonsense` passed validate, and run failed later, every agent's daemon refusing
    it."""
    agents = "agents:\n  a: {steps: [{python: m:f}]}\n"
    assert problems(f"beacon: nonsense\n{agents}") == [
        "p.yaml:1: beacon: 'nonsense': expected KEY@HOST:PORT or HOST:PORT"]
    assert problems(f"beacon: 'NOTAKEY@127.0.0.1:9000'\n{agents}") == [
        "p.yaml:1: beacon: 'NOTAKEY' in 'NOTAKEY@127.0.0.1:9000' is not a beacon key (a node id)"]
    for beacon in ("127.0.0.1:9000", "beacon.example:9000,10.0.0.2:9000"):
        assert parse(f"beacon: '{beacon}'\n{agents}", "p.yaml").spec.beacon == beacon
    file = tmp_path / "p.yaml"
    file.write_text(f"beacon: nonsense\n{agents}")
    assert_one_line_error(cli(None, "validate", str(file)), 2,
                          f"{file}:1: beacon: 'nonsense': expected KEY@HOST:PORT or HOST:PORT")
    # ... and so is run's --beacon, before anything starts.
    file.write_text(agents)
    for mode in ([], ["--agent", "a"]):
        assert_one_line_error(cli(tmp_path / "home", "run", str(file), "--beacon", "nonsense",
                                  *mode), 2, "--beacon 'nonsense': expected KEY@HOST:PORT")


def test_graph_of_each_agent_without_the_network() -> None:
    loaded = load(EXAMPLE)
    graph = build_graph(loaded, "analyzer")
    nodes = graph.get_graph().nodes
    assert [n for n in nodes if not n.startswith("__")] == ["receive", "analyze", "send"]
    assert isinstance(graph.nodes["receive"].bound, PilotReceive)
    assert isinstance(graph.nodes["send"].bound, PilotSend)
    assert graph.nodes["send"].bound.to == "reporter"
    with pytest.raises(PipelineError, match="no agent 'nobody'"):
        build_graph(loaded, "nobody")


def test_python_steps_run_in_a_built_graph(tmp_path: Path) -> None:
    (tmp_path / "mysteps.py").write_text(textwrap.dedent("""\
        async def double(state, by):
            return {"x": state.get("x", 1) * by}
        def label(state):
            return {"label": f"x={state['x']}"}
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        agents:
          solo:
            steps:
              - {id: double, python: "mysteps:double", args: {by: 3}}
              - {id: again, python: mysteps.double, args: {by: 2}}
              - {id: label, python: "mysteps:label"}
            edges: [[double, again], [again, label]]
        """))
    graph = build_graph(load(tmp_path / "p.yaml"), "solo")
    assert asyncio.run(graph.ainvoke({"x": 5})) == {"x": 30, "label": "x=30"}


def test_a_python_step_must_return_state_updates(tmp_path: Path) -> None:
    """What is not a dict is refused naming the step and the function; a function asking for
    LangGraph's config still gets it, and an object with an async __call__ is awaited."""
    (tmp_path / "odd.py").write_text(textwrap.dedent("""\
        def number(state):
            return 42
        def with_config(state, config, tag):
            return {"tag": tag, "has_config": "configurable" in config}
        class Later:
            async def __call__(self, state):
                return {"later": True}
        later = Later()
        """))
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        agents:
          good:
            steps:
              - {python: "odd:with_config", args: {tag: t}}
              - {python: "odd:later"}
          bad:
            steps: [{id: calc, python: "odd:number"}]
        """))
    loaded = load(tmp_path / "p.yaml")
    good = asyncio.run(build_graph(loaded, "good").ainvoke({}))
    assert good == {"tag": "t", "has_config": True, "later": True}
    with pytest.raises(PipelineError, match=r"^step calc: odd:number returned int 42, where a "
                       r"step returns a dict"):
        asyncio.run(build_graph(loaded, "bad").ainvoke({}))


def test_a_serving_agent_s_input_must_be_a_mapping(tmp_path: Path) -> None:
    """A request whose value is not a mapping failed in the state's reducer with a bare
    "TypeError: 'str' object is not a mapping", naming neither the agent nor the rule; a
    pilot_request of such a value is refused before it is sent, naming the step and key."""
    (tmp_path / "qa.py").write_text("def answer(state):\n    return {'answer': 42}\n")
    (tmp_path / "p.yaml").write_text(textwrap.dedent("""\
        agents:
          answerer:
            serve: {port: 2001}
            steps: [{id: answer, python: "qa:answer"}]
          asker:
            steps:
              - {id: ask, pilot_request: {to: answerer, port: 2001, key: q, result_key: a}}
        """))
    loaded = load(tmp_path / "p.yaml")
    served = build_graph(loaded, "answerer")
    rule = re.escape("an agent's input must be a mapping (an object of state keys)")
    for value, shown in (("what is 6*7?", "a str 'what is 6*7?'"), ([1, 2], "a list [1, 2]")):
        given = f"^agent answerer was given {re.escape(shown)}: {rule}"
        with pytest.raises(PipelineError, match=given):
            asyncio.run(served.ainvoke(value))
        with pytest.raises(PipelineError, match=given):
            asyncio.run(anext(served.astream(value, stream_mode="updates")))
    assert asyncio.run(served.ainvoke({"q": 1})) == {"q": 1, "answer": 42}

    class Unused:  # a transport the refused requests never reach
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"sent anyway ({name})")

    asker = build_graph(loaded, "asker", transport=Unused())
    for value, shown in (("what?", "a str 'what?'"), (None, "None"), (7, "an int 7")):
        with pytest.raises(PipelineError, match=re.escape(
                f"step ask: the state key 'q' holds {shown}, which this pilot_request would "
                f"send to agent answerer as its input: ") + rule):
            asyncio.run(asker.ainvoke({"q": value}))


def test_a_python_step_that_does_not_import(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("agents:\n  a:\n    steps: [{python: 'nomodule:f'}]\n")
    with pytest.raises(PipelineError, match="cannot import 'nomodule'"):
        build_graph(load(tmp_path / "p.yaml"), "a")
