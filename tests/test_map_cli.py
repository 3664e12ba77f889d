"""procctl map, as a user runs it: results, order, joblog and resume after SIGKILL, signals, bad input.

Every run is a real `python -m procctl map` subprocess started in the tests
directory, so `maptargets:FUNC` resolves as a user's module would. Tasks that
must be counted append (item, pid) to a marks file with one O_APPEND write.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
from clihelp import LiveCli, assert_all_gone, json_events, run_cli, run_on_pty

TESTS = os.path.dirname(__file__)


def write_items(path, items) -> str:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return str(path)


def results(stdout: str) -> list[dict]:
    """The result records of a run's stdout (--json adds event records)."""
    return [r for r in json_events(stdout) if "item" in r]


def marks(path) -> list[dict]:
    return json_events(path.read_text()) if path.exists() else []


def map_cli(args, **kw):
    return run_cli(["map"] + args, cwd=TESTS, **kw)


# -- results --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_results_as_json_lines(tmp_path, method):
    items = write_items(tmp_path / "in.jsonl", range(20))
    res = map_cli(["maptargets:square", "--items", items, "--workers", "3", "--start-method", method])
    assert res.returncode == 0, res.stderr
    got = json_events(res.stdout)
    assert sorted(got, key=lambda r: r["item"]) == [{"item": i, "result": i * i} for i in range(20)]
    assert "summary: 20 items: 20 done, 0 failed, 0 unfinished" in res.stderr


def test_any_json_value_is_an_item_and_blank_lines_are_skipped(tmp_path):
    values = [{"a": [1, 2]}, "text", 3.5, None, [True, False], {"nested": {"x": "é"}}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(v) for v in values[:3]) + "\n\n  \n"
                    + "\n".join(json.dumps(v) for v in values[3:]))  # no newline at the end
    res = map_cli(["maptargets:mark", "--items", str(path), "--ordered"], env={"MAP_MARKS": str(tmp_path / "m")})
    assert res.returncode == 0, res.stderr
    assert json_events(res.stdout) == [{"item": v, "result": v} for v in values]


def test_ordered_keeps_input_order(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(20))
    res = map_cli(["maptargets:later_items_first", "--items", items, "--workers", "2", "--ordered"])
    assert res.returncode == 0, res.stderr
    assert [r["item"] for r in json_events(res.stdout)] == list(range(20))


def test_lines_from_stdin():
    text = "alpha\n\nbeta gamma\n{not json}\n"
    res = map_cli(["maptargets:upper", "--lines", "--ordered"], input=text)
    assert res.returncode == 0, res.stderr
    assert json_events(res.stdout) == [{"item": s, "result": s.upper()}
                                       for s in ("alpha", "", "beta gamma", "{not json}")]


def test_failed_items_give_error_records_and_exit_1(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(1, 10))
    res = map_cli(["maptargets:fail_on_multiples_of_3", "--items", items, "--ordered", "--json"])
    assert res.returncode == 1
    records = json_events(res.stdout)
    assert results(res.stdout) == [
        {"item": i, "error": f"ValueError: {i} is a multiple of 3"} if i % 3 == 0 else {"item": i, "result": i}
        for i in range(1, 10)]
    assert records[0]["event"] == "started" and records[0]["items"] == 9
    summary = records[-1]
    assert summary["event"] == "summary"
    assert (summary["done"], summary["failed"], summary["unfinished"]) == (6, 3, 0)
    assert "Traceback" not in res.stderr


def test_a_crash_or_a_timeout_fails_only_its_item(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(1, 9))
    log = tmp_path / "log"
    res = map_cli(["maptargets:crash_on_5_hang_on_3", "--items", items, "--workers", "2", "--ordered",
                   "--retries", "1", "--task-timeout", "0.5", "--joblog", str(log)])
    assert res.returncode == 1, res.stderr
    records = json_events(res.stdout)
    assert [r.get("result") for r in records] == [1, 2, None, 4, None, 6, 7, 8]
    assert records[2]["error"].startswith("TaskTimeout:")
    assert records[4]["error"].startswith("WorkerCrashed:") and "code 3" in records[4]["error"]
    failed = {r["line"]: r for r in json_events(log.read_text()) if r["status"] == "failed"}
    assert sorted(failed) == [3, 5] and failed[5]["pid"] is None


def test_a_result_that_is_not_json_fails_its_item(tmp_path):
    res = map_cli(["maptargets:not_json"], input="1\n")
    assert res.returncode == 1
    [record] = json_events(res.stdout)
    assert record["item"] == 1 and record["error"].startswith("result is not JSON: TypeError")


def test_empty_input_runs_nothing_and_exits_0(tmp_path):
    res = map_cli(["maptargets:square", "--json"], input="")
    assert res.returncode == 0
    assert json_events(res.stdout)[-1]["items"] == 0


# -- bad input: one line, exit 2, nothing run -------------------------------------------


BAD = [
    (["nosuchmodule_xyz:f"], "cannot import module"),
    (["maptargets:missing"], "has no attribute"),
    (["maptargets:NOT_CALLABLE"], "is not callable"),
    (["maptargets:no_argument"], "must take one argument"),
    (["maptargets"], "must look like"),
    (["maptargets:mark", "--items", "{bad}"], "line 3 is not JSON"),
    (["maptargets:mark", "--items", "{nan}"], "line 2 is not JSON"),
    (["maptargets:mark", "--items", "/no/such/items.jsonl"], "cannot be read"),
    (["maptargets:mark", "--items", "{dir}"], "cannot be read"),
    (["maptargets:mark", "--resume"], "--resume needs --joblog"),
    (["maptargets:mark", "--workers", "0"], "--workers"),
    (["maptargets:mark", "--retries", "-1"], "--retries"),
    (["maptargets:mark", "--task-timeout", "nan"], "--task-timeout"),
    (["maptargets:mark", "--task-timeout", "0"], "--task-timeout"),
    (["maptargets:mark", "--timeout", "-1"], "--timeout"),
    (["maptargets:mark", "--grace", "nan"], "--grace"),
    (["maptargets:mark", "--joblog", "/no/such/dir/log"], "--joblog"),
    (["maptargets:mark", "--unfinished", "{dir}"], "is a directory"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_runs(tmp_path, args, message):
    good = tmp_path / "good.jsonl"
    write_items(good, [1, 2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('1\n"two"\n{"three": \n4\n')
    nan = tmp_path / "nan.jsonl"
    nan.write_text("1\nNaN\n")
    args = [a.format(bad=bad, nan=nan, dir=tmp_path) for a in args]
    if "--items" not in args:
        args += ["--items", str(good)]
    marks_file = tmp_path / "marks"
    res = map_cli(args + ["--events", str(tmp_path / "events")], env={"MAP_MARKS": str(marks_file)})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert res.stdout == ""
    assert not marks_file.exists()  # no item ran: the input was checked before any worker started
    assert not (tmp_path / "events").exists()


def test_resume_refuses_a_joblog_of_another_input(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(5))
    log = str(tmp_path / "log")
    assert map_cli(["maptargets:square", "--items", items, "--joblog", log]).returncode == 0
    other = write_items(tmp_path / "other.jsonl", [10, 11, 12, 13, 14])
    res = map_cli(["maptargets:square", "--items", other, "--joblog", log, "--resume"])
    assert res.returncode == 2 and res.stdout == ""
    assert "another input" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# -- joblog and resume ------------------------------------------------------------------


def test_joblog_records_every_item_and_resume_reruns_only_failures(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(1, 8))
    log = tmp_path / "log"
    res = map_cli(["maptargets:fail_on_multiples_of_3", "--items", items, "--joblog", str(log)])
    assert res.returncode == 1
    records = json_events(log.read_text())
    assert sorted(r["line"] for r in records) == list(range(1, 8))
    for r in records:
        assert r["item"] == r["line"] and len(r["sha"]) == 16 and r["runtime"] >= 0 and r["pid"] > 0
        assert r["status"] == ("failed" if r["item"] % 3 == 0 else "done")
        assert r.get("result") == (None if r["item"] % 3 == 0 else r["item"])
    # A resumed run skips what is done and runs the failed items again.
    res = map_cli(["maptargets:fail_on_multiples_of_3", "--items", items, "--joblog", str(log), "--resume",
                   "--json"])
    assert res.returncode == 1
    assert sorted(r["item"] for r in results(res.stdout)) == [3, 6]
    assert json_events(res.stdout)[-1]["skipped"] == 5


def test_sigkill_mid_run_then_resume_does_every_item_exactly_once(tmp_path):
    n = 40
    items = write_items(tmp_path / "in.jsonl", range(n))
    log, marks_file = tmp_path / "log", tmp_path / "marks"
    env = {"MAP_MARKS": str(marks_file), "MAP_DELAY": "0.02"}
    args = ["maptargets:mark", "--items", items, "--workers", "2", "--joblog", str(log)]
    cli = LiveCli(["map"] + args, cwd=TESTS, env=env)
    try:
        cli.wait_for(lambda lines: len(lines) >= 10)
        os.kill(cli.proc.pid, signal.SIGKILL)  # no stop, no flush, no cleanup
        cli.proc.wait(10)
    finally:
        cli.kill()
    first = {r["item"] for r in marks(marks_file)}
    assert 10 <= len(first) < n
    assert_all_gone({m["pid"] for m in marks(marks_file)})  # the workers died with the command line
    logged = {r["item"] for r in json_events(log.read_text()) if r["status"] == "done"}
    assert logged == first  # every item that ran is in the joblog, none that did not

    res = map_cli(args + ["--resume", "--json"], env={**env, "MAP_DELAY": "0"})
    assert res.returncode == 0, res.stderr
    assert {r["item"] for r in results(res.stdout)} == set(range(n)) - first
    assert json_events(res.stdout)[-1]["skipped"] == len(first)
    counts = Counter(m["item"] for m in marks(marks_file))
    assert counts == Counter(range(n))  # every item done, none twice
    assert_all_gone({m["pid"] for m in marks(marks_file)})


# -- signals ------------------------------------------------------------------------


# SIGINT to the group is Ctrl-C on a terminal (the workers ignore it, the command line stops them);
# SIGTERM to the group reaches the workers too: each ends after its task, which counts as done.
@pytest.mark.parametrize("sig, code, to_group", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, False),
                                                 (signal.SIGINT, 130, True), (signal.SIGTERM, 143, True)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-to-group", "SIGTERM-to-group"])
def test_stop_signal_writes_the_unfinished_items(tmp_path, sig, code, to_group):
    n = 40
    items = write_items(tmp_path / "in.jsonl", [{"n": i} for i in range(n)])
    unfinished, marks_file = tmp_path / "todo.jsonl", tmp_path / "marks"
    cli = LiveCli(["map", "maptargets:mark", "--items", items, "--workers", "2", "--unfinished", str(unfinished)],
                  cwd=TESTS, env={"MAP_MARKS": str(marks_file), "MAP_DELAY": "0.02"})
    try:
        cli.wait_for(lambda lines: len(lines) >= 5)
        if to_group:
            cli.signal_group(sig)
        else:
            os.kill(cli.proc.pid, sig)
        rc, out, err = cli.finish()
    finally:
        cli.kill()
    assert rc == code, err
    assert "Traceback" not in err
    done = [r["item"]["n"] for r in json_events(out)]
    left = [r["n"] for r in json_events(unfinished.read_text())]
    assert left and left == sorted(left)  # in input order, as input
    assert sorted(done + left) == list(range(n))  # each item once: done or unfinished
    assert sorted(m["item"]["n"] for m in marks(marks_file)) == sorted(done)
    assert f"{len(left)} unfinished" in err
    assert_all_gone({m["pid"] for m in marks(marks_file)})


def test_second_sigint_kills_at_once(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(4))
    unfinished = tmp_path / "todo.jsonl"
    cli = LiveCli(["map", "maptargets:ignore_stop", "--items", items, "--workers", "2", "--grace", "30", "--json",
                   "--unfinished", str(unfinished)], cwd=TESTS, env={"MAP_MARKS": str(tmp_path / "marks")})
    try:
        cli.wait_for(lambda lines: cli.err.count(b"task started") == 2)  # both workers are in a task
        os.kill(cli.proc.pid, signal.SIGINT)
        cli.wait_for(lambda lines: any('"stopping"' in line for line in lines))  # the stop has begun
        t0 = time.monotonic()
        os.kill(cli.proc.pid, signal.SIGINT)  # must cut the 30 s grace short
        rc, out, err = cli.finish(timeout=15)
        took = time.monotonic() - t0
    finally:
        cli.kill()
    assert rc == 130 and took < 10, err
    assert "Traceback" not in err
    assert json_events(unfinished.read_text()) == [0, 1, 2, 3]
    assert_all_gone({m["pid"] for m in marks(tmp_path / "marks")})


def test_sigusr1_pauses_and_sigusr2_resumes(tmp_path):
    n = 30
    items = write_items(tmp_path / "in.jsonl", range(n))
    marks_file = tmp_path / "marks"
    cli = LiveCli(["map", "maptargets:mark", "--items", items, "--workers", "2", "--json"], cwd=TESTS,
                  env={"MAP_MARKS": str(marks_file), "MAP_DELAY": "0.02"})
    try:
        cli.wait_for(lambda lines: len(lines) >= 4)
        os.kill(cli.proc.pid, signal.SIGUSR1)
        cli.wait_for(lambda lines: any('"paused"' in line for line in lines))
        at_pause = len(marks(marks_file))
        time.sleep(0.5)  # a window to watch: a paused pool starts no item
        assert len(marks(marks_file)) == at_pause < n
        os.kill(cli.proc.pid, signal.SIGUSR2)
        rc, out, err = cli.finish()
    finally:
        cli.kill()
    assert rc == 0, err
    kinds = [r.get("event") for r in json_events(out)]
    assert kinds.index("paused") < kinds.index("resumed")
    assert sorted(r["item"] for r in results(out)) == list(range(n))


def test_timeout_stops_cleanly_and_exits_124(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(100))
    unfinished = tmp_path / "todo.jsonl"
    res = map_cli(["maptargets:mark", "--items", items, "--workers", "2", "--timeout", "0.5",
                   "--unfinished", str(unfinished)], env={"MAP_MARKS": str(tmp_path / "m"), "MAP_DELAY": "0.05"})
    assert res.returncode == 124
    done = [r["item"] for r in json_events(res.stdout)]
    left = json_events(unfinished.read_text())
    assert done and left and sorted(done + left) == list(range(100))


def test_live_view_on_a_terminal(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(30))
    code, out = run_on_pty(["map", "maptargets:mark", "--items", items, "--workers", "2"], cwd=TESTS,
                           env={"MAP_MARKS": str(tmp_path / "m"), "MAP_DELAY": "0.02"})
    assert code == 0
    assert "\x1b[" in out  # redrawn in place
    assert "30/30" in out and "done" in out and "/s" in out
    assert '{"item": 29, "result": 29}' in out  # results print above the view
    assert "summary: 30 items: 30 done" in out
