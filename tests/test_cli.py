"""procctl run, as a user runs it: output, exit codes, signals, bad input."""

from __future__ import annotations

import os
import signal
import time

import pytest
from clihelp import LiveCli, assert_all_gone, json_events, run_cli, run_on_pty, worker_pids

TESTS = os.path.dirname(__file__)
WORKER_EVENTS = {"running", "paused", "stopped", "finished", "failed", "crashed", "killed"}


def test_default_run_walks_through_the_schedule_and_exits_0():
    res = run_cli(["run", "--workers", "10", "--step", "0.2", "--seed", "1"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1].startswith("summary: 10 workers")
    for state in ("paused", "running"):
        assert any(line.endswith(f": {state}") for line in lines)
    assert "Traceback" not in res.stderr


def test_json_lines_events_and_summary():
    res = run_cli(["run", "--workers", "4", "--step", "0.1", "--json", "--finish-chance", "0"])
    assert res.returncode == 0, res.stderr
    events = json_events(res.stdout)
    *body, summary = events
    assert all(e["event"] in WORKER_EVENTS for e in body)
    assert all(isinstance(e["t"], float) and isinstance(e["worker"], int) for e in body)
    assert summary["event"] == "summary" and summary["workers"] == 4
    assert summary["outcomes"] == {"stopped": 4}
    assert summary["elapsed"] > 0.35
    # Running, Paused, Running for every worker, in that order.
    for w in range(4):
        seq = [e["event"] for e in body if e["worker"] == w]
        assert seq == ["paused", "running", "paused", "running", "stopped"]
    assert_all_gone(worker_pids(events))


def test_finish_chance_one_finishes_everyone_at_first_run():
    res = run_cli(["run", "--workers", "5", "--step", "0", "--json", "--finish-chance", "1"])
    assert res.returncode == 0
    assert json_events(res.stdout)[-1]["outcomes"] == {"finished": 5}


def test_schedule_without_stop_waits_for_workers_to_end_by_themselves():
    res = run_cli(["run", "--workers", "3", "--schedule", "run", "--step", "0", "--finish-chance", "1", "--json"])
    assert res.returncode == 0
    assert json_events(res.stdout)[-1]["outcomes"] == {"finished": 3}


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_user_target_from_current_directory(method):
    res = run_cli(["run", "--workers", "2", "--target", "targets:cli_task", "--step", "0.05",
                   "--start-method", method, "--json"], cwd=TESTS)
    assert res.returncode == 0, res.stderr
    assert json_events(res.stdout)[-1]["outcomes"] == {"stopped": 2}


NOISY_MODULE = """
import sys
print("importing noisy")
print("importing noisy (stderr)", file=sys.stderr)
lam = lambda ctx: ctx.worker_id  # noqa: E731 - a target pickle cannot send by reference
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_target_module_output_and_a_lambda_target_under_every_start_method(tmp_path, method):
    # The workers get the target's name and import it once their output is
    # captured: what the module prints as it loads is prefixed on stderr, never
    # on --json's stdout; and a lambda runs as it does under fork.
    (tmp_path / "noisy.py").write_text(NOISY_MODULE)
    res = run_cli(["run", "--workers", "2", "--target", "noisy:lam", "--step", "0.05", "--schedule", "run",
                   "--start-method", method, "--json"], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    events = json_events(res.stdout)  # every stdout line is JSON
    assert events[-1]["outcomes"] == {"finished": 2}
    assert "[0] importing noisy" in res.stderr and "[1] importing noisy (stderr)" in res.stderr
    assert "importing noisy\n" in res.stderr.replace("[0] ", "").replace("[1] ", "")


def test_failing_target_exits_1_and_shows_the_error_once():
    res = run_cli(["run", "--workers", "2", "--target", "targets:raise_error", "--step", "0.05"], cwd=TESTS)
    assert res.returncode == 1
    assert "worker 1 failed: ValueError: bad input in worker 1" in res.stdout
    assert res.stdout.count("Traceback") == 2  # one per failed worker, in the summary


def test_an_error_of_several_lines_is_named_by_its_first_and_cannot_drive_the_terminal():
    res = run_cli(["run", "--workers", "1", "--target", "targets:raise_multiline", "--step", "0.05"], cwd=TESTS)
    assert res.returncode == 1
    # (its type and first line, not its last line; the control characters as escapes)
    expected = "failed: ValueError: first line \\x1b]0;title\\x07\\x1b[2Jof the message"
    assert f"worker 0: {expected}" in res.stdout and f"worker 0 {expected}" in res.stdout, res.stdout
    assert not any(ch in res.stdout for ch in "\x1b\x07\x9b\r"), repr(res.stdout)
    res = run_cli(["run", "--workers", "1", "--target", "targets:raise_multiline", "--step", "0.05", "--json"],
                  cwd=TESTS)
    summary = json_events(res.stdout)[-1]
    assert summary["errors"] == {"0": "ValueError: first line \x1b]0;title\x07\x1b[2Jof the message"}


def test_crashing_target_exits_1():
    res = run_cli(["run", "--workers", "2", "--target", "targets:exit_hard", "--step", "0.05", "--json"],
                  cwd=TESTS)
    assert res.returncode == 1
    summary = json_events(res.stdout)[-1]
    assert summary["outcomes"] == {"crashed": 2}


def test_timeout_stops_cleanly_and_exits_124():
    t0 = time.monotonic()
    res = run_cli(["run", "--workers", "3", "--step", "5", "--timeout", "0.5", "--json"])
    assert res.returncode == 124
    assert time.monotonic() - t0 < 5
    events = json_events(res.stdout)
    assert events[-1]["outcomes"] == {"stopped": 3}
    assert_all_gone(worker_pids(events))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_to_process_group_stops_cleanly(sig, code):
    cli = LiveCli(["run", "--workers", "4", "--schedule", "run", "--finish-chance", "0", "--step", "0",
                   "--json"])
    try:
        cli.wait_for(lambda lines: sum('"running"' in line for line in lines) == 4)
        cli.signal_group(sig)  # as Ctrl-C on a terminal does: every process gets it
        rc, out, err = cli.finish()
    finally:
        cli.kill()
    assert rc == code, err
    assert "Traceback" not in out + err
    events = json_events(out)
    assert events[-1]["outcomes"] == {"stopped": 4}
    assert_all_gone(worker_pids(events))


@pytest.mark.parametrize("ignored, then, code", [(signal.SIGHUP, signal.SIGTERM, 143),
                                                  (signal.SIGINT, signal.SIGTERM, 143)])
def test_a_stop_signal_ignored_at_start_stays_ignored(ignored, then, code):
    # `nohup procctl run ...` (SIGHUP), a background job of a shell without job
    # control (SIGINT): the signal was to be ignored, and the run goes on. A
    # SIGINT was dropped only while it came before the handlers, then acted on.
    cli = LiveCli(["run", "--workers", "2", "--schedule", "run", "--finish-chance", "0", "--step", "0",
                   "--json"], preexec_fn=lambda: signal.signal(ignored, signal.SIG_IGN))
    try:
        cli.wait_for(lambda lines: sum('"running"' in line for line in lines) == 2)
        cli.signal_group(ignored)
        cli.signal_group(then)
        rc, out, err = cli.finish()
    finally:
        cli.kill()
    assert rc == code, err  # the ignored one taken would have stopped the run first, with its own status
    assert json_events(out)[-1]["outcomes"] == {"stopped": 2}


def test_second_sigint_kills_at_once():
    cli = LiveCli(["run", "--workers", "2", "--target", "targets:ignore_stop", "--schedule", "run",
                   "--step", "0", "--grace", "30", "--json"], cwd=TESTS)
    try:
        cli.wait_for(lambda lines: sum('"running"' in line for line in lines) == 2)
        cli.signal_group(signal.SIGINT)
        cli.wait_for(lambda lines: b"stopping the workers" in cli.err)  # the first stop has begun
        t0 = time.monotonic()
        cli.signal_group(signal.SIGINT)  # must cut its 30 s grace short
        rc, out, err = cli.finish(timeout=10)
        took = time.monotonic() - t0
    finally:
        cli.kill()
    assert rc == 130
    assert took < 5
    assert json_events(out)[-1]["outcomes"] == {"killed": 2}
    assert "Traceback" not in out + err


def test_the_escalation_warning_is_one_procctl_line():
    # (--timeout counts from before the workers start: at 0.3 s, under load, one that had
    # not yet taken the run was stopped before its target ignored SIGTERM)
    res = run_cli(["run", "--workers", "2", "--target", "targets:ignore_stop", "--schedule", "run",
                   "--step", "0", "--timeout", "2", "--grace", "0.2", "--json"], timeout=30, cwd=TESTS)
    assert res.returncode == 124, res.stderr
    assert "procctl: workers [0, 1] ignored SIGTERM: sent SIGKILL" in res.stderr.splitlines()
    assert json_events(res.stdout)[-1]["outcomes"] == {"killed": 2}


def test_sigusr1_pauses_and_sigusr2_resumes():
    cli = LiveCli(["run", "--workers", "3", "--schedule", "run", "--finish-chance", "0", "--step", "0",
                   "--json"])
    try:
        cli.wait_for(lambda lines: sum('"running"' in line for line in lines) == 3)
        os.kill(cli.proc.pid, signal.SIGUSR1)
        cli.wait_for(lambda lines: sum('"paused"' in line for line in lines) == 6)  # 3 at start + 3 now
        os.kill(cli.proc.pid, signal.SIGUSR2)
        cli.wait_for(lambda lines: sum('"running"' in line for line in lines) == 6)
        os.kill(cli.proc.pid, signal.SIGTERM)
        rc, out, err = cli.finish()
    finally:
        cli.kill()
    assert rc == 143
    assert_all_gone(worker_pids(json_events(out)))


def test_manager_killed_leaves_no_orphans():
    cli = LiveCli(["run", "--workers", "3", "--schedule", "run,pause", "--finish-chance", "0", "--step", "0",
                   "--json"])
    try:
        lines = cli.wait_for(lambda lines: sum('"paused"' in line for line in lines) == 6)
        pids = worker_pids(json_events("\n".join(lines)))
        os.kill(cli.proc.pid, signal.SIGKILL)
        cli.proc.wait(10)
    finally:
        cli.kill()
    assert len(pids) == 3
    assert_all_gone(pids, timeout=3)


BAD_INPUTS = [
    ["--workers", "0"], ["--workers", "-1"], ["--workers", "abc"],
    ["--target", "nocolon"], ["--target", "no_such_module_x:f"], ["--target", "os:no_such_attr"],
    ["--target", "os:sep"], ["--schedule", "run,jump"], ["--schedule", "run,stop,run"],
    ["--step", "-1"], ["--grace", "-1"], ["--timeout", "-1"],
    ["--finish-chance", "1.5"], ["--finish-chance", "-0.1"], ["--start-method", "thread"],
    ["--events", "/no/such/dir/events.jsonl"], ["--events", ""], ["--trace", " "], ["--events", "-"],
    ["--events", "same.svg", "--timeline", "same.svg"],
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=lambda a: " ".join(a))
def test_bad_input_is_one_line_and_exit_2(args):
    res = run_cli(["run"] + args)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
    assert "Traceback" not in res.stderr


def test_version_and_module_entry_point():
    res = run_cli(["--version"])
    assert res.returncode == 0 and "procctl" in res.stdout


def test_live_view_on_a_terminal():
    code, out = run_on_pty(["run", "--workers", "4", "--target", "tasks:count_primes",
                             "--schedule", "run,pause,run", "--step", "0.4"],
                            cwd=os.path.join(os.path.dirname(TESTS), "examples"))
    assert code == 0
    assert "\x1b[" in out  # redrawn in place
    for column in ("worker", "state", "progress", "cpu %", "rss", "pid", "info"):
        assert column in out
    assert "/60000" in out  # per-worker progress from ctx.progress()
    assert "worker 0: running" not in out  # the view replaces the plain lines
    assert "summary: 4 workers" in out


def test_quiet_prints_only_the_summary():
    res = run_cli(["run", "--workers", "3", "--step", "0", "--quiet"])
    assert res.returncode == 0
    assert res.stdout.strip().splitlines() == [res.stdout.strip()]
    assert res.stdout.startswith("summary: 3 workers")


def test_events_file_is_flushed_as_it_goes(tmp_path):
    log = tmp_path / "events.jsonl"
    cli = LiveCli(["run", "--workers", "2", "--schedule", "run", "--finish-chance", "0", "--step", "0",
                   "--json", "--events", str(log)])
    try:
        cli.wait_for(lambda lines: sum('"running"' in line for line in lines) == 2)
        os.kill(cli.proc.pid, signal.SIGKILL)  # no chance to flush anything at exit
        cli.proc.wait(10)
    finally:
        cli.kill()
    events = json_events(log.read_text())
    assert [e["event"] for e in events].count("running") == 2
    assert_all_gone(worker_pids(events), timeout=3)


@pytest.mark.parametrize("args", [["--timeline", "run.png"], ["--timeline", "/no/such/dir/t.svg"],
                                  ["--events", "/proc/events.jsonl"]], ids=lambda a: " ".join(a))
def test_bad_output_paths(args, tmp_path):
    res = run_cli(["run"] + args, cwd=str(tmp_path))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


def test_sum_live_view_on_a_terminal():
    code, out = run_on_pty(["sum", "--threshold", "20", "--delay", "0.01-0.03", "--seed", "3"])
    assert code == 0
    assert "toward the threshold" in out and "WON" in out
    assert "\x1b[" in out
    assert out.rstrip().splitlines()[-1].lstrip("\x1b[?25h").startswith("summary: consumer")


def test_sum_quiet_prints_only_the_summary(tmp_path):
    log = tmp_path / "sum.jsonl"
    res = run_cli(["sum", "--quiet", "--seed", "1", "--events", str(log)])
    assert res.returncode == 0
    assert len(res.stdout.strip().splitlines()) == 1 and res.stdout.startswith("summary: consumer")
    events = json_events(log.read_text())
    assert events[-1]["event"] == "summary" and any(e["event"] == "received" for e in events)


@pytest.mark.parametrize("args", [["run", "--workers", "2", "--schedule", "run,stop", "--step", "0"],
                                  ["sum", "--threshold", "1000"],
                                  ["map", "maptargets:square"]], ids=["run", "sum", "map"])
def test_quiet_json_prints_only_the_summary(args):
    # --quiet: "Print only the summary", --json or not (a map's results too).
    res = run_cli(args + ["--quiet", "--json"], cwd=TESTS, input="1\n2\n")
    assert res.returncode == 0, res.stderr
    events = [e for e in json_events(res.stdout) if "event" in e]
    assert [e["event"] for e in events] == ["summary"], res.stdout
