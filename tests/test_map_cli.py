"""procctl map, as a user runs it: results, order, joblog and resume after SIGKILL, signals, bad input.

Every run is a real `python -m procctl map` subprocess started in the tests
directory, so `maptargets:FUNC` resolves as a user's module would. Tasks that
must be counted append (item, pid) to a marks file with one O_APPEND write.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from clihelp import CLI, LiveCli, assert_all_gone, json_events, run_cli, run_on_pty

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
    assert "maptargets:square: 20 items, 3 workers" in res.stderr


def test_one_item_and_one_worker_are_said_in_the_singular(tmp_path):
    res = map_cli(["maptargets:square", "--items", write_items(tmp_path / "in.jsonl", [3]), "--workers", "1"])
    assert res.returncode == 0 and "maptargets:square: 1 item, 1 worker" in res.stderr, res.stderr


CHATTY_MODULE = """
print("importing chatty")
def double(x):
    print("doubling", x)
    return 2 * x
triple = lambda x: 3 * x  # noqa: E731
"""


@pytest.mark.parametrize("func, method, factor", [("double", "fork", 2), ("double", "spawn", 2),
                                                  ("triple", "forkserver", 3)])
def test_stdout_has_only_the_results_whatever_the_function_prints(tmp_path, func, method, factor):
    # What the function (or its module, as a worker imports it) prints goes to
    # stderr; the function is sent by name, so a lambda runs under every method.
    (tmp_path / "chatty.py").write_text(CHATTY_MODULE)
    items = write_items(tmp_path / "in.jsonl", range(6))
    res = run_cli(["map", f"chatty:{func}", "--items", items, "--workers", "2", "--start-method", method],
                  cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert sorted(got, key=lambda r: r["item"]) == [{"item": i, "result": factor * i} for i in range(6)]
    if func == "double":
        assert res.stderr.count("doubling") == 6  # (two workers: their lines may interleave)


@pytest.mark.parametrize("huge", ["3e6", "1e300"])
def test_huge_timeouts_are_that_long(tmp_path, huge):
    # --timeout 3e6 once overflowed the wait of the command's loop (a traceback, exit 1).
    items = write_items(tmp_path / "in.jsonl", range(5))
    res = map_cli(["maptargets:square", "--items", items, "--workers", "2", "--timeout", huge,
                   "--task-timeout", huge, "--grace", huge])
    assert res.returncode == 0, res.stderr
    assert sorted(r["result"] for r in json_events(res.stdout)) == [i * i for i in range(5)]


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


WORKERS_CANNOT_START = """
import errno, sys
sys.path.insert(0, {tests!r})
import procctl.worker_plane
def refuse(self, ctx):
    raise OSError(errno.EMFILE, "Too many open files")  # in each worker, as it sets up (fork children inherit it)
procctl.worker_plane.WorkEnd.start_returner = refuse
from procctl.cli import main
sys.argv = ["procctl", "map", "json:dumps", "--items", {items!r}, "--workers", "2"]
main()
"""


def test_workers_that_cannot_start_leave_every_item_unfinished_and_the_run_ends(tmp_path):
    """A pool whose workers cannot start is broken (ProcessPoolExecutor's
    BrokenProcessPool): no item failed, nothing was left to run them; they are
    unfinished (--unfinished lists them), and the command ends at once, saying why."""
    items, left = write_items(tmp_path / "in.jsonl", range(2000)), tmp_path / "left.jsonl"
    script = WORKERS_CANNOT_START.format(tests=TESTS, items=items)
    script = script.replace('"2"]', f'"2", "--unfinished", {str(left)!r}]')
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=TESTS)
    assert res.returncode == 1, res.stderr
    assert results(res.stdout) == []
    assert "the workers are gone" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "0 done, 0 failed, 2000 unfinished" in res.stderr, res.stderr
    assert [int(line) for line in left.read_text().splitlines()] == list(range(2000))


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


def test_an_item_that_closes_its_workers_descriptors_fails_alone_without_a_traceback(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(1, 5))
    res = map_cli(["maptargets:close_fds_on_2", "--items", items, "--workers", "1", "--ordered"])
    assert res.returncode == 1, res.stderr
    records = json_events(res.stdout)
    assert [r.get("result") for r in records] == [1, None, 3, 4]
    assert records[1]["error"].startswith("WorkerCrashed:")
    assert "Traceback" not in res.stderr, res.stderr  # (the worker's exit tripped on its closed link)

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
    (["maptargets:mark", "--items", "{huge}"], "line 2 is not JSON: 1e999 is out of range"),
    (["maptargets:mark", "--items", "/no/such/items.jsonl"], "cannot be read"),
    (["maptargets:mark", "--items", "{dir}"], "cannot be read"),
    (["maptargets:mark", "--resume"], "--resume needs --joblog"),
    (["maptargets:mark", "--workers", "0"], "--workers"),
    (["maptargets:mark", "--workers", "99999999999999999999999"], "file descriptors; the limit is"),
    (["maptargets:mark", "--retries", "-1"], "--retries"),
    (["maptargets:mark", "--task-timeout", "nan"], "--task-timeout"),
    (["maptargets:mark", "--task-timeout", "0"], "--task-timeout"),
    (["maptargets:mark", "--timeout", "-1"], "--timeout"),
    (["maptargets:mark", "--grace", "nan"], "--grace"),
    (["maptargets:mark", "--joblog", "/no/such/dir/log"], "--joblog"),
    (["maptargets:mark", "--unfinished", "{dir}"], "is a directory"),
    (["maptargets:mark", "--joblog", ""], "--joblog needs a file name"),
    (["maptargets:mark", "--joblog", "{dir}/log", "--unfinished", "{dir}/log"], "name the same file"),
    (["maptargets:mark", "--items", "{deep}"], "line 1 is nested too deeply to read"),
    (["maptargets:mark", "--items", "{good}", "--joblog", "{good}"], "--items and --joblog name the same file"),
    (["maptargets:mark", "--items", "{good}", "--unfinished", "{good}"], "--items and --unfinished name the same"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_runs(tmp_path, args, message):
    good = tmp_path / "good.jsonl"
    write_items(good, [1, 2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('1\n"two"\n{"three": \n4\n')
    nan = tmp_path / "nan.jsonl"
    nan.write_text("1\nNaN\n")
    huge = tmp_path / "huge.jsonl"
    huge.write_text("1\n1e999\n")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")  # (a RecursionError once)
    args = [a.format(bad=bad, nan=nan, huge=huge, dir=tmp_path, deep=deep, good=good) for a in args]
    before = good.read_text()
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
    assert good.read_text() == before  # (a joblog named as the items once wrote over them)


def test_resume_refuses_a_joblog_of_another_input(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(5))
    log = str(tmp_path / "log")
    assert map_cli(["maptargets:square", "--items", items, "--joblog", log]).returncode == 0
    other = write_items(tmp_path / "other.jsonl", [10, 11, 12, 13, 14])
    res = map_cli(["maptargets:square", "--items", other, "--joblog", log, "--resume"])
    assert res.returncode == 2 and res.stdout == ""
    assert "another input" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_resume_with_the_input_cut_short_or_grown(tmp_path):
    # The joblog's records past the end of a shorter input are items it no longer has:
    # it said "records input line 4 with another item than the input has there".
    log = str(tmp_path / "log")
    assert map_cli(["maptargets:square", "--items", write_items(tmp_path / "in", range(5)),
                    "--joblog", log]).returncode == 0
    res = map_cli(["maptargets:square", "--items", write_items(tmp_path / "short", range(3)), "--joblog", log,
                   "--resume"])
    assert res.returncode == 0 and res.stdout == "", res.stderr  # all three done already
    res = map_cli(["maptargets:square", "--items", write_items(tmp_path / "long", range(7)), "--joblog", log,
                   "--resume"])
    assert res.returncode == 0, res.stderr
    assert sorted(json.loads(line)["result"] for line in res.stdout.splitlines()) == [25, 36]


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


def test_resume_after_a_torn_last_record_keeps_the_joblog_whole(tmp_path):
    """A record cut short (a full disk, a power cut) is cut off at the next resume:
    its item runs again, and the next record starts a line of its own."""
    items = write_items(tmp_path / "in.jsonl", range(1, 6))
    log = tmp_path / "log"
    whole = write_items(tmp_path / "first.jsonl", range(1, 4))
    assert map_cli(["maptargets:square", "--items", whole, "--joblog", str(log)]).returncode == 0
    with open(log, "a") as f:
        f.write('{"line": 4, "sha')  # torn
    for skipped in (3, 5):  # the second resume reads what the first wrote
        res = map_cli(["maptargets:square", "--items", items, "--joblog", str(log), "--resume", "--json"])
        assert res.returncode == 0, res.stderr
        assert json_events(res.stdout)[-1]["skipped"] == skipped
    records = json_events(log.read_text())
    assert sorted(r["line"] for r in records) == [1, 2, 3, 4, 5]


def test_sigkill_mid_run_then_resume_does_every_item_exactly_once(tmp_path):
    n = 400  # (at 40, a stall after the 10th line let the run end first)
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
    # Every item that ran is in the joblog, none that did not; but one a worker was
    # killed with, between its item's end and the joblog's line, which nothing can close
    # (the resume runs it again: the joblog is what says done).
    assert logged <= first and len(first - logged) <= 2, (first - logged, logged - first)

    res = map_cli(args + ["--resume", "--json"], env={**env, "MAP_DELAY": "0"})
    assert res.returncode == 0, res.stderr
    assert {r["item"] for r in results(res.stdout)} == set(range(n)) - logged
    assert json_events(res.stdout)[-1]["skipped"] == len(logged)
    counts = Counter(m["item"] for m in marks(marks_file))
    assert counts == Counter(range(n)) + Counter(first - logged)  # every item done, none logged twice
    assert_all_gone({m["pid"] for m in marks(marks_file)})


# -- signals ------------------------------------------------------------------------


# SIGINT to the group is Ctrl-C on a terminal (the workers ignore it, the command line stops them);
# SIGTERM to the group reaches the workers too: each ends after its task, which counts as done.
@pytest.mark.parametrize("sig, code, to_group", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, False),
                                                 (signal.SIGINT, 130, True), (signal.SIGTERM, 143, True)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-to-group", "SIGTERM-to-group"])
def test_stop_signal_writes_the_unfinished_items(tmp_path, sig, code, to_group):
    n = 400  # (at 40, a stall after the 5th line let the run end first)
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
    n = 200  # (at 30, a stall after the 3rd result let the run end before the signal)
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


def test_a_pause_that_a_long_task_holds_up_does_not_hold_up_a_stop(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(4))
    unfinished = tmp_path / "todo.jsonl"
    cli = LiveCli(["map", "maptargets:ignore_stop", "--items", items, "--workers", "2", "--grace", "0", "--json",
                   "--unfinished", str(unfinished)], cwd=TESTS, env={"MAP_MARKS": str(tmp_path / "marks")})
    try:
        cli.wait_for(lambda lines: cli.err.count(b"task started") == 2)  # both workers are in a 60 s task
        os.kill(cli.proc.pid, signal.SIGUSR1)  # no task checkpoints: no worker can acknowledge the pause
        cli.wait_for(lambda lines: b"acknowledged the pause" in cli.err)
        os.kill(cli.proc.pid, signal.SIGINT)
        rc, out, err = cli.finish(timeout=20)
    finally:
        cli.kill()
    assert rc == 130, err
    assert json_events(unfinished.read_text()) == [0, 1, 2, 3]
    assert_all_gone({m["pid"] for m in marks(tmp_path / "marks")})


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_during_a_pause_nobody_acknowledges_does_not_wait_for_it(tmp_path, sig, code):
    # The loop waits up to 2 s for the pause's acknowledgements (no task here
    # checkpoints): a stop signal meanwhile ends that wait at once (it waited
    # the 2 s out, said the pause was not acknowledged, and only then stopped).
    items = write_items(tmp_path / "in.jsonl", range(4))
    cli = LiveCli(["map", "maptargets:ignore_stop", "--items", items, "--workers", "2", "--grace", "0", "--json"],
                  cwd=TESTS, env={"MAP_MARKS": str(tmp_path / "marks")})
    try:
        cli.wait_for(lambda lines: cli.err.count(b"task started") == 2)  # both workers are in a 60 s task
        os.kill(cli.proc.pid, signal.SIGUSR1)
        time.sleep(0.5)  # the moment under test (the loop is in the pause's 2 s wait), not a synchronisation
        signalled = time.monotonic()
        os.kill(cli.proc.pid, sig)
        rc, out, err = cli.finish(timeout=20)
        took = time.monotonic() - signalled
    finally:
        cli.kill()
    assert rc == code, err
    assert "acknowledged the pause" not in err and "paused:" not in err, err  # (the stop won)
    assert "paused" not in [e.get("event") for e in json_events(out)]
    assert took < 10, took  # a bound against a hang (about 0.3 s; it was 1.5 s more)
    assert_all_gone({m["pid"] for m in marks(tmp_path / "marks")})


def test_timeout_stops_cleanly_and_exits_124(tmp_path):
    # (The clock runs from before the workers start: at 0.5 s, under load, no item was done.)
    items = write_items(tmp_path / "in.jsonl", range(200))
    unfinished = tmp_path / "todo.jsonl"
    res = map_cli(["maptargets:mark", "--items", items, "--workers", "2", "--timeout", "1.5",
                   "--unfinished", str(unfinished)], env={"MAP_MARKS": str(tmp_path / "m"), "MAP_DELAY": "0.05"})
    assert res.returncode == 124
    done = [r["item"] for r in json_events(res.stdout)]
    left = json_events(unfinished.read_text())
    assert done and left and sorted(done + left) == list(range(200))


def test_live_view_on_a_terminal(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(30))
    code, out = run_on_pty(["map", "maptargets:mark", "--items", items, "--workers", "2"], cwd=TESTS,
                           env={"MAP_MARKS": str(tmp_path / "m"), "MAP_DELAY": "0.02"})
    assert code == 0
    assert "\x1b[" in out  # redrawn in place
    assert "30/30" in out and "done" in out and "/s" in out
    assert '{"item": 29, "result": 29}' in out  # results print above the view
    assert "summary: 30 items: 30 done" in out


# -- hardening: limits, streams, strict JSON, signals at any moment ------------------------


def strict_json(line: str) -> dict:
    """json.loads that refuses NaN and Infinity, as strict parsers do."""
    def refuse(token: str) -> None:
        raise ValueError(f"invalid JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def with_limit(which: int, soft: int):
    def preexec() -> None:
        _, hard = resource.getrlimit(which)
        resource.setrlimit(which, (soft, hard))
    return preexec


def test_more_workers_than_the_fd_limit_names_the_limit(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(300))
    res = subprocess.run(CLI + ["map", "maptargets:square", "--items", items, "--workers", "200"], cwd=TESTS,
                         capture_output=True, text=True, timeout=30, preexec_fn=with_limit(resource.RLIMIT_NOFILE, 256))
    assert res.returncode == 2 and res.stdout == ""
    [line] = res.stderr.strip().splitlines()
    assert "200 workers need about" in line and "file descriptors; the limit is 256" in line


def test_a_result_without_a_json_form_fails_its_item_and_the_output_stays_strict(tmp_path):
    res = map_cli(["maptargets:not_finite", "--json", "--ordered"], input="1\n2\n3\n")
    assert res.returncode == 1
    records = [strict_json(line) for line in res.stdout.splitlines()]
    assert [r.get("result") for r in results(res.stdout)] == [None, 2, None]
    assert all(r["error"].startswith("result is not JSON") for r in results(res.stdout) if "error" in r)
    assert records[-1]["event"] == "summary" and records[-1]["failed"] == 2


def test_events_to_dev_full_is_one_warning_and_the_run_goes_on(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(5))
    res = map_cli(["maptargets:square", "--items", items, "--json", "--events", "/dev/full"])
    assert res.returncode == 0
    [line] = res.stderr.strip().splitlines()
    assert "event log" in line and "/dev/full" in line
    assert sorted(r["item"] for r in results(res.stdout)) == list(range(5))
    assert strict_json(res.stdout.splitlines()[-1])["event"] == "summary"


@pytest.mark.parametrize("stream", [1, 2], ids=["stdout", "stderr"])
def test_a_closed_output_stream_is_not_a_crash(tmp_path, stream):
    items = write_items(tmp_path / "in.jsonl", range(5))
    log, joblog = tmp_path / "events.jsonl", tmp_path / "joblog"
    res = subprocess.run(CLI + ["map", "maptargets:square", "--items", items, "--events", str(log),
                                "--joblog", str(joblog)], cwd=TESTS, capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: os.close(stream))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert strict_json(log.read_text().splitlines()[-1])["done"] == 5
    assert len(json_events(joblog.read_text())) == 5


@pytest.mark.parametrize("args, said", [
    # the joblog stops the run; /dev/full once read back (to recover what was
    # logged) gave zeros without end, the memory growing by gigabytes
    (["--workers", "1", "--joblog", "/dev/full"], "the joblog '/dev/full' cannot be written"),
    (["--timeout", "0", "--unfinished", "/dev/full"],
     "--unfinished '/dev/full' cannot be written (No space left on device)"),
], ids=["joblog", "unfinished"])
def test_a_log_on_a_full_disk_is_named_and_fails_the_run(tmp_path, args, said):
    items = write_items(tmp_path / "in.jsonl", range(5))
    res = map_cli(["maptargets:square", "--items", items, "--quiet", *args], timeout=30)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert said in res.stderr
    # The log's failure is not the items': one that ran has its result.
    assert all("result" in r for r in results(res.stdout)), res.stdout


def test_a_closed_stdin_has_no_items():
    res = subprocess.run(CLI + ["map", "maptargets:square", "--json"], cwd=TESTS, capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(0))
    assert res.returncode == 0, res.stderr
    assert json_events(res.stdout)[-1]["items"] == 0


def test_stdout_on_a_full_disk_stops_the_run_with_one_line(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(5))
    with open("/dev/full", "w") as full:
        res = subprocess.run(CLI + ["map", "maptargets:square", "--items", items, "--quiet"], cwd=TESTS,
                             stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "No space left on device" in res.stderr


@contextlib.contextmanager
def _map_holding(args: list[str], held: set[int], **kw) -> Iterator[subprocess.Popen]:
    """`procctl map ARGS` in a session of its own, started with the signals `held`
    blocked: held through the interpreter's start-up (not procctl's to catch: a
    signal there was a KeyboardInterrupt traceback on a loaded machine, a death by
    SIGUSR1), they come as procctl lets its signals in. Killed if still there at the end."""
    def block() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)

    proc = subprocess.Popen(CLI + ["map", *args], cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=block, **kw)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_ctrl_c_while_reading_items_from_stdin_ends_the_command(tmp_path):
    with _map_holding(["maptargets:square"], {signal.SIGINT}, stdin=subprocess.PIPE) as proc:
        proc.stdin.write(b"1\n")
        proc.stdin.flush()  # it is reading, and stdin stays open
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode in (130, -signal.SIGINT) and out == b"", err
    assert b"Traceback" not in err


def test_pause_and_resume_signals_while_reading_items_do_not_end_the_command():
    """SIGUSR1 and SIGUSR2 while the items still come (a slow producer) are a
    pause and a resume for the run, not a stop: it exited 130 with nothing
    done. Held through the interpreter's start-up, as Ctrl-C above."""
    with _map_holding(["maptargets:square", "--ordered"], {signal.SIGUSR1, signal.SIGUSR2},
                      stdin=subprocess.PIPE) as proc:
        for i in range(10):  # the producer's pace: 2 s in all, the command reading through most of it
            proc.stdin.write(b"%d\n" % i)
            proc.stdin.flush()
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGUSR2)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert [json.loads(line)["result"] for line in out.splitlines()] == [i * i for i in range(10)]


def test_a_pause_that_came_before_the_workers_lets_no_item_start(tmp_path):
    """A SIGUSR1 taken before the first items went out (while the input was
    read, the workers started) pauses the run before any item starts: the
    first items ran before the pause was applied."""
    items, marks_file = write_items(tmp_path / "in.jsonl", range(6)), tmp_path / "marks"
    with _map_holding(["maptargets:mark", "--items", items, "--workers", "2", "--json"],
                      {signal.SIGUSR1, signal.SIGUSR2}, env={**os.environ, "MAP_MARKS": str(marks_file)}) as proc:
        os.kill(proc.pid, signal.SIGUSR1)  # held until procctl's handlers are in: before any item
        for line in proc.stdout:  # (bounded by the test's timeout)
            if json.loads(line).get("event") == "paused":
                break
        assert marks(marks_file) == []  # no item ran
        os.kill(proc.pid, signal.SIGUSR2)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sorted(m["item"] for m in marks(marks_file)) == list(range(6))


def _launch(events: str, items: str, marks_file,
            blocked: bool = False) -> contextlib.AbstractContextManager[subprocess.Popen]:
    return _map_holding(["maptargets:mark", "--items", items, "--workers", "2", "--json", "--events", events],
                        {signal.SIGINT, signal.SIGTERM} if blocked else set(),
                        env={**os.environ, "MAP_MARKS": str(marks_file), "MAP_DELAY": "0.05"})


def _assert_clean_stop(proc: subprocess.Popen, sig: int, code: int, events: str, marks_file) -> bool:
    """The run stopped cleanly (True), or the signal came before any procctl code ran (False)."""
    out, err = proc.communicate(timeout=30)
    if proc.returncode == -sig or (sig == signal.SIGINT and proc.returncode == 1 and b"/procctl/" not in err):
        assert not out  # the interpreter's own start-up: a death by the signal, as a shell reports it
        return False
    assert proc.returncode == code, err.decode()
    assert b"Traceback" not in err
    if os.path.exists(events):
        log = [strict_json(line) for line in open(events).read().splitlines()]
        assert log[-1]["event"] == "summary"
        assert log[-1]["done"] == len(marks(marks_file))
    assert_all_gone({m["pid"] for m in marks(marks_file)})
    return True


SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


@pytest.mark.parametrize("sig, code", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_before_the_handlers_exist_is_a_clean_stop(tmp_path, sig, code):
    items = write_items(tmp_path / "in.jsonl", range(20))
    events, marks_file = str(tmp_path / "events.jsonl"), tmp_path / "marks"
    with _launch(events, items, marks_file, blocked=True) as proc:
        os.killpg(proc.pid, sig)
        assert _assert_clean_stop(proc, sig, code, events, marks_file)


@pytest.mark.parametrize("sig, code", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_a_random_moment_is_a_clean_stop(tmp_path, sig, code):
    # Three runs get the signal, to their process group, at random moments of their
    # first 0.6 s (start-up, reading and checking the input, workers starting, running).
    items = write_items(tmp_path / "in.jsonl", range(20))
    runs = []
    with contextlib.ExitStack() as started:
        for i in range(3):
            events, marks_file = str(tmp_path / f"events{i}.jsonl"), tmp_path / f"marks{i}"
            runs.append((started.enter_context(_launch(events, items, marks_file)), events, marks_file,
                         random.uniform(0.0, 0.6)))
        t0 = time.monotonic()
        for proc, _, _, delay in sorted(runs, key=lambda r: r[3]):
            time.sleep(max(0.0, t0 + delay - time.monotonic()))  # bounded pacing of the signal times under test
            os.killpg(proc.pid, sig)
        for proc, events, marks_file, _ in runs:
            _assert_clean_stop(proc, sig, code, events, marks_file)


def test_sigterm_while_stderr_is_a_broken_pipe_exits_143(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(400))
    marks_file = tmp_path / "marks"
    cli = LiveCli(["map", "maptargets:mark", "--items", items, "--workers", "2", "--json"], cwd=TESTS,
                  env={"MAP_MARKS": str(marks_file), "MAP_DELAY": "0.02"})
    try:
        cli.wait_for(lambda lines: len(lines) >= 3)
        cli.proc.stderr.close()  # nobody reads stderr any more
        cli._sel.unregister(cli.proc.stderr)
        os.kill(cli.proc.pid, signal.SIGTERM)
        out, _ = cli.proc.communicate(timeout=30)
    finally:
        cli.kill()
    assert cli.proc.returncode == 143
    records = json_events("\n".join(cli.lines) + "\n" + out.decode())
    assert records[-1]["event"] == "summary"
    assert_all_gone({m["pid"] for m in marks(marks_file)})
