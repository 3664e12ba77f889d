"""The timeline from an event log: `procctl timeline` draws what --timeline drew; the Chrome trace."""

from __future__ import annotations

import json
import os
import re

import pytest
from clihelp import run_cli

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_timeline_and_trace_from_the_log_equal_the_runs_own(tmp_path):
    log, html, trace = tmp_path / "run.jsonl", tmp_path / "run.html", tmp_path / "run.json"
    res = run_cli(["run", "--workers", "3", "--target", "targets_control:steady", "--schedule", "run,pause,run,stop",
                   "--step", "0.2", "--quiet", "--events", str(log), "--timeline", str(html), "--trace", str(trace)],
                  cwd=TESTS)
    assert res.returncode == 0, res.stderr
    assert f"wrote the timeline to {html}" in res.stderr and f"wrote the Chrome trace to {trace}" in res.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["state"] for r in records if r["event"] == "broadcast"] == ["running", "paused", "running", "stopped"]

    again = tmp_path / "again.html"
    res = run_cli(["timeline", str(log), "-o", str(again)])
    assert res.returncode == 0, res.stderr
    assert again.read_text() == html.read_text()
    svg = tmp_path / "again.svg"
    assert run_cli(["timeline", str(log), "-o", str(svg)]).returncode == 0
    assert svg.read_text().count('class="broadcast ') == 4

    chrome = tmp_path / "again.json"
    res = run_cli(["timeline", str(log), "--format", "chrome", "-o", str(chrome)])
    assert res.returncode == 0, res.stderr
    assert chrome.read_text() == trace.read_text()
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["ph"] for e in events} == {"M", "X", "i", "C"}
    spans = {(e["tid"], e["name"]) for e in events if e["ph"] == "X"}
    assert {(tid, name) for tid in (1, 2, 3) for name in ("running", "paused", "grace")} <= spans
    outcomes = [e for e in events if e["ph"] == "i" and e["cat"] == "outcome"]
    assert sorted(e["name"] for e in outcomes) == ["stopped"] * 3
    broadcasts = [e["name"] for e in events if e["ph"] == "i" and e["cat"] == "broadcast"]
    assert broadcasts == ["broadcast running", "broadcast paused", "broadcast running", "broadcast stopped"]
    counters = {e["name"]: e["args"] for e in events if e["ph"] == "C"}
    assert counters["progress worker 2"] == {"done": 3, "total": 10}
    for e in events:
        if e["ph"] == "X":
            assert e["dur"] >= 0 and e["ts"] >= 0


def test_timeline_of_a_sum_log_draws_its_producers_and_consumers(tmp_path):
    """A timeline from any event log: a sum's has no controller events, but its
    producers' and consumers' ends, and the crossing that stopped them."""
    log, svg, trace = tmp_path / "sum.jsonl", tmp_path / "sum.svg", tmp_path / "sum.json"
    res = run_cli(["sum", "--producers", "2", "--consumers", "3", "--threshold", "30", "--seed", "2", "--quiet",
                   "--events", str(log)])
    assert res.returncode == 0, res.stderr
    res = run_cli(["timeline", str(log), "-o", str(svg)])
    assert res.returncode == 0, res.stderr
    text = svg.read_text()
    assert text.count('class="row"') == 5 and "2 producers, 3 consumers" in text
    assert text.count('class="broadcast ') == 1  # the crossing
    marks = re.findall(r'class="outcome (\w+)"', text)
    assert len(marks) == 5 and "finished" in marks, marks
    assert run_cli(["timeline", str(log), "--format", "chrome", "-o", str(trace)]).returncode == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert len([e for e in events if e["ph"] == "i" and e["cat"] == "outcome"]) == 5


def test_timeline_of_a_map_log_says_it_has_no_worker(tmp_path):
    items, log, svg = tmp_path / "items.jsonl", tmp_path / "map.jsonl", tmp_path / "map.svg"
    items.write_text("1\n2\n")
    res = run_cli(["map", "json:dumps", "--items", str(items), "--workers", "1", "--events", str(log)])
    assert res.returncode == 0, res.stderr
    res = run_cli(["timeline", str(log), "-o", str(svg)])
    assert res.returncode == 0 and "a procctl map log: it records items, not workers" in res.stderr, res.stderr


def test_timeline_of_a_bad_log_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    res = run_cli(["timeline", str(bad)])
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and "not an event log" in res.stderr
    res = run_cli(["timeline", str(tmp_path / "missing.jsonl")])
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1
    res = run_cli(["timeline", str(bad), "-o", str(tmp_path / "x.png")])
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1
    res = run_cli(["timeline", str(bad), "-o", ""])
    assert res.returncode == 2 and res.stderr == "procctl: error: -o needs a file name, not ''\n", res.stderr


def test_the_log_is_never_overwritten_by_its_own_drawing(tmp_path):
    log = tmp_path / "run.json"
    text = '{"t": 0.1, "event": "running", "worker": 0}\n'
    log.write_text(text)
    res = run_cli(["timeline", str(log), "--format", "chrome"])  # the default name would be run.json
    assert res.returncode == 0, res.stderr
    assert log.read_text() == text and json.loads((tmp_path / "run.trace.json").read_text())
    res = run_cli(["timeline", str(log), "-o", str(log)])
    assert res.returncode == 2 and "is the event log itself" in res.stderr and log.read_text() == text
    for fmt in ("svg", "html"):  # a log named as its picture would be (a traceback once)
        own = tmp_path / f"run.{fmt}"
        own.write_text(text)
        res = run_cli(["timeline", str(own), "--format", fmt])
        assert res.returncode == 0, res.stderr
        assert own.read_text() == text and (tmp_path / f"run.timeline.{fmt}").stat().st_size > 0


@pytest.mark.parametrize("fmt, output", [("chrome", "x.html"), ("chrome", "x.SVG"), ("svg", "x.html"),
                                         ("html", "x.json")])
def test_an_output_named_for_another_format_is_bad_input(tmp_path, fmt, output):
    # A Chrome trace written into x.html was taken (exit 0): the extension said otherwise.
    log = tmp_path / "run.jsonl"
    log.write_text('{"t": 0.1, "event": "running", "worker": 0}\n')
    res = run_cli(["timeline", str(log), "--format", fmt, "-o", str(tmp_path / output)])
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "-o" in res.stderr and not (tmp_path / output).exists()


def test_a_log_torn_by_a_kill_still_draws(tmp_path):
    log = tmp_path / "torn.jsonl"
    log.write_text('{"t": 0.1, "event": "running", "worker": 0}\n{"t": 0.5, "event": "broadcast", "sta')
    out = tmp_path / "torn.html"
    res = run_cli(["timeline", str(log)])
    assert res.returncode == 0, res.stderr
    assert out.exists() and 'data-worker="0"' in out.read_text()


BAD_LINES = [  # each skipped as a torn line is: no finite time, or a worker that is not an id
    '{"t": 1e400, "event": "running", "worker": 5}',
    '{"t": NaN, "event": "running", "worker": 5}',
    '{"t": "x", "event": "running", "worker": 5}',
    '{"t": true, "event": "running", "worker": 5}',
    '{"t": 1' + "0" * 400 + ', "event": "running", "worker": 5}',
    '{"t": 0.3, "event": "running", "worker": "a"}',
    '{"t": 0.3, "event": "running", "worker": -1}',
    '{"t": 0.3, "event": "running", "worker": 1.5}',
    '{"t": 0.3, "event": "running", "worker": 1' + "0" * 30 + '}',
    '{"t": 0.3, "event": "broadcast", "state": "paused", "worker": {}}',
    '{"event": "summary", "workers": 1' + "0" * 30 + ', "elapsed": Infinity}',
    "[" * 100_000,
]


@pytest.mark.parametrize("fmt", ["svg", "chrome"])
@pytest.mark.parametrize("good", [True, False], ids=["with-good-lines", "nothing-usable"])
def test_bad_values_in_a_log_are_skipped(tmp_path, fmt, good):
    log = tmp_path / "bad.jsonl"
    lines = (['{"t": 0.1, "event": "running", "worker": 0}', '{"t": 0.2, "event": "broadcast", "state": "paused"}',
              '{"t": 0.4, "event": "running", "worker": 0, "done": 1e400, "total": "x"}']  # progress: not numbers
             if good else [])
    log.write_text("\n".join(lines + BAD_LINES) + "\n")
    out = tmp_path / ("out.svg" if fmt == "svg" else "out.json")
    res = run_cli(["timeline", str(log), "--format", fmt, "-o", str(out)])
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    text = out.read_text()
    if fmt == "chrome":
        events = json.loads(text)["traceEvents"]
        workers = {e["tid"] - 1 for e in events if e["tid"]}
        assert workers == ({0} if good else set())
        assert not [e for e in events if e["ph"] == "C"]  # the progress there was not a number
    else:
        assert re.findall(r'data-worker="([^"]*)"', text) == (["0"] if good else [])
        assert text.count('class="broadcast ') == (1 if good else 0)
