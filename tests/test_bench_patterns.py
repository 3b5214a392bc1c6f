"""The pattern benchmark keeps working: our two cases (embedded Node, daemon path) and the floor
cases (forwarders in the daemons' places) measured in tiny sizes through the real harness (a
process per role, real daemons), and a case that can't run here shows as unavailable instead of
breaking the run. Nothing here asserts a speed."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import patterns
from benchmarks.harness import Params, RttResult
from benchmarks.pattern_harness import PatternParams, PubResult, SubResult
from benchmarks.patterns_cases import CASES

TINY = PatternParams(
    messages=200, fanout=2, fanout_messages=50, quiet=1.0, wait=30.0, deadline=120.0,
    rtt=Params(msg_size=100, rtt_warmup=5, rtt_count=20),
)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pp-"))  # short: daemon socket paths live under it
    try:
        yield path
    finally:
        patterns._stop_daemons(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def rows(workdir: Path) -> dict[str, patterns.Row]:
    p = replace(TINY, workdir=str(workdir))
    return {name: patterns.run_case(name, p) for name in ("embedded", "daemon")}


@pytest.mark.parametrize("name", ["embedded", "daemon"])
def test_our_case_delivers_every_publication_and_answers_every_request(
        rows: dict[str, patterns.Row], name: str) -> None:
    row = rows[name]
    assert not [note for note in row.notes if "error" in note], row.notes
    one, fanout = row.pubsub(1), row.pubsub(TINY.fanout)
    assert one is not None and fanout is not None
    assert (one.delivered, one.lost) == (TINY.messages, 0)
    assert (fanout.delivered, fanout.lost) == (TINY.fanout * TINY.fanout_messages, 0)
    assert one.rate > 0 and all(s.ended for s in one.subscribers)
    assert row.rtt is not None and len(row.rtt.samples_ns) == TINY.rtt.rtt_count


def test_table_and_targets_name_every_case_and_what_was_not_measured(
        rows: dict[str, patterns.Row]) -> None:
    p = replace(TINY, workdir="")
    text = patterns.markdown(list(rows.values()), p, 1, "cmd", None)
    assert "| embedded" in text and "| daemon" in text
    assert "pub/sub 2 subs msg/s" in text
    assert "- req/rep median, embedded / pyzmq REQ/REP: not measured" in text


@pytest.mark.parametrize("name", ["floor-c", "floor-py", "floor-node", "floor-embedded"])
def test_a_floor_case_answers_every_request_and_measures_no_pub_sub(
        workdir: Path, name: str) -> None:
    row = patterns.run_case(name, replace(TINY, workdir=str(workdir)))
    assert not [note for note in row.notes if "error" in note], row.notes
    assert not row.passes
    assert row.rtt is not None and len(row.rtt.samples_ns) == TINY.rtt.rtt_count


def test_a_case_that_cannot_run_here_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CASES, "missing", "benchmarks.patterns_cases.no_such_module")
    assert patterns.run_case("missing", TINY).notes[0].startswith("unavailable: ")
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    row = patterns.run_case("redis-py", TINY)  # no redis-server, or no redis-py
    assert row.notes[0].startswith("unavailable: ") and not row.passes and row.rtt is None


def test_passes_fold_into_one_row_that_shows_the_median_rate() -> None:
    def one_pass(seconds: float, rtt_ns: int) -> patterns.Row:
        sub = SubResult(100, 0, 0, last_ns=int(seconds * 1e9), ended=True)
        return patterns.Row("x", {1: [patterns.PubSub(PubResult(100, 0, 0.1), (sub,))]},
                            RttResult((rtt_ns,)), ["about"], {"req/rep": 0.01})

    row = one_pass(1.0, 10)
    row.add_pass(one_pass(4.0, 20))
    row.add_pass(one_pass(2.0, 30))
    median = row.pubsub(1)
    assert median is not None and median.rate == pytest.approx(50)
    assert row.rtt is not None and sorted(row.rtt.samples_ns) == [10, 20, 30]
    assert row.notes == ["about"]


def test_a_bad_publication_count_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert patterns.main(["--messages", "0"]) == 2
    assert capsys.readouterr().err == "--messages must be at least 1\n"
