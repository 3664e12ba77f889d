"""The control socket: procctl ls/status/pause/resume/stop/events/metrics against live runs."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest
from clihelp import CLI, LiveCli, assert_all_gone, json_events, worker_pids
from procs import end_session

from procctl import State, WorkerStatus
from procctl.control import (
    MAX_CONNECTIONS,
    MAX_FOLLOWERS,
    MAX_REQUEST,
    ControlServer,
    RunHooks,
    check_peer_uid,
    peer_credentials,
)

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def env(tmp_path):
    """A private runtime directory, so that only this test's runs are live."""
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    return {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}


def ctl(env, *args, timeout=30):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=TESTS)


def ctl_json(env, *args):
    res = ctl(env, *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def status_once(env, *args, ready, timeout=20.0):
    """`procctl status ARGS --json` once `ready(status)` (the "running" lines say the
    workers took the run, before their targets' first progress() call)."""
    deadline = time.monotonic() + timeout
    while True:
        status = ctl_json(env, "status", *args)
        if ready(status) or time.monotonic() > deadline:
            return status


def start_run(env, name, *extra, workers=3, target="targets_control:steady"):
    """A `procctl run` that waits for commands; returns once its workers are up."""
    args = ["run", "--workers", str(workers), "--target", target, "--schedule", "run",
            "--step", "0", "--json", "--name", name, *extra]
    cli = LiveCli(args, cwd=TESTS, env=env)
    cli.wait_for(lambda lines: sum('"running"' in line for line in lines) >= workers)
    return cli


def socket_of(env, name):
    return os.path.join(env["XDG_RUNTIME_DIR"], "procctl", name + ".sock")


def test_ls_without_runs_says_so_on_stderr(env):
    res = ctl(env, "ls")
    assert (res.returncode, res.stdout) == (0, "") and "no live runs" in res.stderr
    assert ctl_json(env, "ls") == []


def test_a_runtime_directory_past_the_unix_socket_path_limit(tmp_path):
    """A deep $XDG_RUNTIME_DIR (pytest-xdist's temporary trees) makes socket paths
    longer than a socket address holds: the run exited 1 ("cannot write the output:
    AF_UNIX path too long", from its output capture) after warning it would go on
    without its control socket. Both work, through the directory."""
    runtime = tmp_path / ("d" * 60) / ("e" * 60)
    runtime.mkdir(parents=True, mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    assert len(socket_of(env, "job1")) > 108
    cli = start_run(env, "job1", workers=2, target="targets_control:say_then_wait")
    try:
        assert [w["state"] for w in ctl_json(env, "status", "job1")["workers"]] == ["running", "running"]
        assert ctl(env, "stop", "job1").returncode == 0
        code, out, err = cli.finish()
    finally:
        cli.kill()
    assert code == 0, err
    assert "no control socket" not in err
    assert "[1] worker 1 says hello" in err  # the workers' output, captured ([id] prefix)
    assert_all_gone(worker_pids(json_events(out)))


def test_replies_are_strict_json_whatever_the_figures():
    from procctl.control import json_bytes

    line = json_bytes({"eta": math.inf, "rate": [1.5, -math.inf, math.nan], "info": {(1, 2): object}})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line!r}")) == {
        "eta": None, "rate": [1.5, None, None], "info": {"(1, 2)": "<class 'object'>"}}


def test_status_keeps_huge_figures_in_their_columns(env):
    cli = start_run(env, "huge", workers=1, target="targets_control:huge_progress")
    try:
        status = status_once(env, "huge", ready=lambda st: st["workers"][0]["rate"] is not None)
        assert status["workers"][0]["rate"] > 1e300
        res = ctl(env, "status", "huge")
        assert res.returncode == 0, res.stderr
        row = res.stdout.splitlines()[2]
        assert len(row) < 120, row  # the rate was printed in full: 309 digits
        assert "e+30" in row
        assert ctl(env, "stop", "huge").returncode == 0
        assert cli.finish()[0] == 0
    finally:
        cli.kill()


def test_status_says_an_eta_as_the_live_view_does():
    from procctl.cli_control import _fmt_eta

    # Minutes:seconds (it said 4964 where the live view said 82:44); what no column holds, as the rate.
    assert [_fmt_eta(x) for x in (None, 0.4, 61, 4964.2, 1e9)] == ["-", "0:00", "1:01", "82:44", "1e+09"]


def test_ls_status_pause_resume_events_metrics_stop(env):
    from prometheus_client.parser import text_string_to_metric_families

    cli = start_run(env, "job1")
    try:
        runs = ctl_json(env, "ls")
        assert [(r["name"], r["pid"], r["workers"], r["state"]) for r in runs] == [
            ("job1", cli.proc.pid, 3, "running")]
        assert runs[0]["job"] == "run targets_control:steady" and runs[0]["elapsed"] >= 0

        # RUN omitted: the only live run
        status = status_once(env, ready=lambda st: all(w["info"] for w in st["workers"]))
        workers = status["workers"]
        assert [w["id"] for w in workers] == [0, 1, 2]
        for w in workers:
            assert w["state"] == "running" and w["outcome"] is None and w["restarts"] == 0
            assert (w["done"], w["total"]) == (w["id"] + 1, 10)
            assert w["info"] == {"item": f"i{w['id']}"}
            assert w["rss"] > 0 and w["cpu_percent"] >= 0 and "eta" in w and "rate" in w

        res = ctl(env, "pause", "job1")
        assert res.returncode == 0, res.stderr
        assert {w["state"] for w in ctl_json(env, "status", "job1")["workers"]} == {"paused"}
        res = ctl(env, "resume", str(cli.proc.pid))  # a run is also known by its pid
        assert res.returncode == 0, res.stderr
        assert {w["state"] for w in ctl_json(env, "status", "job1")["workers"]} == {"running"}

        text = ctl(env, "metrics", "job1").stdout
        families = {f.name: f for f in text_string_to_metric_families(text)}
        by_state = {s.labels["state"]: s.value for s in families["procctl_workers"].samples}
        assert by_state["running"] == 3 and by_state["paused"] == 0
        progress = {s.labels["worker"]: s.value for s in families["procctl_worker_progress"].samples}
        assert progress == {str(w["id"]): w["done"] for w in workers}
        assert families["procctl_tasks_done"].samples[0].value == sum(w["done"] for w in workers)

        events = [json.loads(line) for line in ctl(env, "events", "job1").stdout.splitlines()]
        assert [e["state"] for e in events if e["event"] == "broadcast"] == ["running", "paused", "running"]

        # Unbuffered: readline takes the first line and no more, and communicate() the rest whole.
        follow = subprocess.Popen(CLI + ["events", "job1", "--follow"], stdout=subprocess.PIPE, bufsize=0, env=env)
        try:
            assert json.loads(follow.stdout.readline())["event"] == "paused"  # from the start
            res = ctl(env, "stop", "job1")  # waits until the run has ended
            assert res.returncode == 0 and "stopped job1" in res.stdout, res.stderr
            rest = [json.loads(line) for line in follow.communicate(timeout=20)[0].splitlines()]
        finally:
            follow.kill()
            follow.wait()
        assert rest[-1]["event"] == "summary" and rest[-1]["outcomes"] == {"stopped": 3}
        assert follow.returncode == 0
        code, out, err = cli.finish()
        assert code == 0, err
        assert json_events(out)[-1]["outcomes"] == {"stopped": 3}
        assert not os.path.exists(socket_of(env, "job1"))  # removed when the run ended
        assert_all_gone(worker_pids(json_events(out)))
    finally:
        cli.kill()


def test_socket_is_private_and_foreign_uids_are_refused(env):
    cli = start_run(env, "priv", workers=1)
    try:
        path = socket_of(env, "priv")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            assert peer_credentials(sock)[:2] == (cli.proc.pid, os.getuid())
        check_peer_uid(os.getuid())
        with pytest.raises(PermissionError, match="not the owner"):
            check_peer_uid(os.getuid() + 1)
        with pytest.raises(PermissionError):
            check_peer_uid(0, owner_uid=1000)  # not even root
        # A second run may not take a live run's name.
        res = ctl(env, "run", "--workers", "1", "--name", "priv")
        assert res.returncode == 2 and "already live" in res.stderr and len(res.stderr.splitlines()) == 1
        ctl(env, "stop", "priv")
        assert cli.finish()[0] == 0
    finally:
        cli.kill()


def exchange(path, payload, *, close_write=False):
    """Send `payload` on a fresh connection and return the first reply line."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(path)
        failed = []

        def send():
            try:
                sock.sendall(payload)
                if close_write:
                    sock.shutdown(socket.SHUT_WR)
            except OSError as exc:  # the server may stop reading a 10 MB request early
                failed.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        sender.join(20)
        return json.loads(data.split(b"\n")[0])


def test_bad_requests_get_errors_and_the_run_goes_on(env):
    cli = start_run(env, "rough", workers=2)
    try:
        path = socket_of(env, "rough")
        for payload, words in [
            (b"this is not json\n", "not a JSON request"),
            (b"[1, 2]\n", "JSON object"),
            (b'{"cmd": "explode"}\n', "unknown command"),
            (b'{"cmd": "pause", "workers": [-1]}\n', "workers"),
            (b'{"cmd": "scale", "n": "many"}\n', "scale needs n"),
            (b"\xff\xfe\n", "not a JSON request"),
            (b"[" * 30000 + b"\n", "nested too deeply"),  # short, yet past the decoder's depth
        ]:
            reply = exchange(path, payload)
            assert reply["ok"] is False and words in reply["error"], (payload, reply)
        truncated = exchange(path, b'{"cmd": "sta', close_write=True)
        assert truncated["ok"] is False and "truncated" in truncated["error"]
        huge = exchange(path, b"x" * (10 * 1024 * 1024))
        assert huge["ok"] is False and "too long" in huge["error"] and str(MAX_REQUEST) in huge["error"]
        # Several requests on one connection, after an error: each answered.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            sock.sendall(b'nonsense\n{"cmd": "info"}\n')
            lines = b""
            while lines.count(b"\n") < 2:
                lines += sock.recv(65536)
            first, second = (json.loads(x) for x in lines.splitlines()[:2])
            assert first["ok"] is False and second["ok"] is True and second["name"] == "rough"
        status = ctl_json(env, "status", "rough")
        assert {w["state"] for w in status["workers"]} == {"running"}
        assert ctl(env, "stop", "rough").returncode == 0
        code, out, err = cli.finish()
        assert code == 0, err
        assert json_events(out)[-1]["outcomes"] == {"stopped": 2}
        assert "Traceback" not in err, err
    finally:
        cli.kill()


@pytest.mark.parametrize("reads", [1, 0])
def test_events_follow_ends_when_its_reader_has_gone(env, reads):
    # `procctl events RUN --follow | head -1`: head has its line and exits; the
    # follow waited for the run's next event (maybe never) to find it out.
    cli = start_run(env, f"quiet{reads}", workers=1)
    try:
        r, w = os.pipe()
        follow = subprocess.Popen(CLI + ["events", f"quiet{reads}", "--follow"], stdout=w, stderr=subprocess.PIPE,
                                  env=env)
        os.close(w)
        with os.fdopen(r, "rb") as reader:
            for _ in range(reads):
                assert json.loads(reader.readline())["event"]  # head -1's line; then it goes away
        try:
            err = follow.communicate(timeout=20)[1]
        finally:
            follow.kill()
            follow.wait()
        assert follow.returncode == 0 and err == b"", err
        assert cli.proc.poll() is None  # the run goes on
        ctl(env, "stop", f"quiet{reads}")
        assert cli.finish()[0] == 0
    finally:
        cli.kill()


def follower(path):
    """A raw `events --follow` connection, past its history."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(20)
    sock.connect(path)
    sock.sendall(b'{"cmd": "events", "follow": true}\n')
    first = json.loads(sock.recv(65536).split(b"\n")[0])
    return sock, first


def test_followers_that_went_away_free_their_connections(env):
    """A follower that closes its end ends its stream at once, even in a run
    that has no event to send it; and followers never take every connection."""
    cli = start_run(env, "quiet", workers=1)
    try:
        path = socket_of(env, "quiet")
        for _ in range(3):  # more than MAX_CONNECTIONS in all, fewer than MAX_FOLLOWERS at once
            socks = [follower(path) for _ in range(MAX_FOLLOWERS)]
            assert all(first["ok"] for _, first in socks), [f for _, f in socks if not f["ok"]][:1]
            for sock, _ in socks:
                sock.shutdown(socket.SHUT_WR)  # gone: the run's end of it closes, and frees its place first
            for sock, _ in socks:
                while sock.recv(65536):
                    pass
                sock.close()
        held = [follower(path) for _ in range(MAX_CONNECTIONS)]
        try:
            refused = [first for _, first in held if not first["ok"]]
            assert len(refused) == MAX_CONNECTIONS - MAX_FOLLOWERS and "too many event streams" in refused[0]["error"]
            assert ctl_json(env, "ls")[0]["name"] == "quiet"  # commands still get in
            stop = ctl(env, "stop", "quiet")  # and a stop, whose wait takes no follower's place
            assert stop.returncode == 0 and stop.stdout.strip() == "stopped quiet", stop
        finally:
            for sock, _ in held:
                sock.close()
        assert cli.finish()[0] == 0
    finally:
        cli.kill()


def test_a_connection_refused_a_thread_is_told_so_and_the_run_stays_reachable(env, monkeypatch):
    """No room for a connection's thread (a process limit): that client is told
    the run is busy; the server goes on (its accept thread died, and every
    later command found no run)."""
    import targets_control

    from procctl import ProcessController
    from procctl.control import Request, ask

    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    refused = []
    real = threading.Thread.start

    def start(self):
        if self.name == "procctl-control-conn" and not refused:
            refused.append(self.name)
            raise RuntimeError("can't start new thread")  # what CPython says when pthread_create fails
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with ProcessController(targets_control.steady, 1, control="thin") as pc:
        path = socket_of(env, "thin")
        first = ask(path, Request("info"))
        assert first["ok"] is False and "busy" in first["error"] and "thread" in first["error"], first
        assert ask(path, Request("info"))["name"] == "thin"
        pc.stop()


def test_a_name_that_is_another_runs_pid_is_ambiguous(env):
    first = start_run(env, "alpha", workers=1)
    second = start_run(env, str(first.proc.pid), workers=1)  # named with the first one's pid
    try:
        res = ctl(env, "stop", str(first.proc.pid))
        assert res.returncode == 2, res.stdout  # it stopped the second run, not the first
        [line] = res.stderr.splitlines()
        assert "name the run" in line and "'alpha'" in line
        assert sorted(r["name"] for r in ctl_json(env, "ls")) == sorted(["alpha", str(first.proc.pid)])
        assert ctl(env, "stop", "alpha").returncode == 0
        assert ctl(env, "stop", str(first.proc.pid)).returncode == 0  # now only the second's name
        assert first.finish()[0] == 0 and second.finish()[0] == 0
    finally:
        first.kill()
        second.kill()


def test_stale_socket_is_cleaned_and_run_must_be_named_among_several(env):
    first = start_run(env, "alpha", workers=1)
    second = start_run(env, "beta", workers=1)
    try:
        res = ctl(env, "status")
        assert res.returncode == 2
        [line] = res.stderr.splitlines()
        assert "2 live runs" in line and "alpha" in line and "beta" in line
        assert ctl(env, "pause").returncode == 2

        pids = worker_pids(json_events("\n".join(first.lines)))
        directory = os.path.dirname(socket_of(env, "alpha"))
        capture = [n for n in os.listdir(directory) if n.startswith(f".{first.proc.pid}.") and n.endswith(".output")]
        assert len(capture) == 1  # alpha's output capture socket
        os.kill(first.proc.pid, signal.SIGKILL)  # the manager dies; its workers follow it
        first.proc.wait(10)
        assert_all_gone(pids)
        assert os.path.exists(socket_of(env, "alpha"))  # nobody removed it
        assert os.path.exists(os.path.join(directory, capture[0]))
        runs = ctl_json(env, "ls")
        assert [r["name"] for r in runs] == ["beta"]
        assert not os.path.exists(socket_of(env, "alpha"))  # the stale one is gone
        assert sorted(n for n in os.listdir(directory) if n.startswith(".")) == [  # and so is its capture socket
            n for n in sorted(os.listdir(directory)) if n.startswith(f".{second.proc.pid}.")]
        res = ctl(env, "status")  # now RUN may be omitted again
        assert res.returncode == 0 and "beta" in res.stdout
        res = ctl(env, "status", "alpha")
        assert res.returncode == 2 and "no live run named 'alpha'" in res.stderr

        ctl(env, "stop", "beta")
        assert second.finish()[0] == 0
    finally:
        first.kill()
        second.kill()
    res = ctl(env, "status")
    assert res.returncode == 2 and "no live procctl run" in res.stderr


def test_per_worker_commands_and_scale_within_max_workers(env):
    cli = start_run(env, "plain", "--max-workers", "3", workers=2)
    try:
        for args in (["pause", "plain", "--workers", "0"], ["scale", "plain", "3"]):
            res = ctl(env, *args)
            assert res.returncode == 0, res.stderr
        res = ctl(env, "scale", "plain", "4")  # over --max-workers: refused, as SIGTTIN is
        assert res.returncode == 1 and res.stdout == "", res.stderr
        [line] = res.stderr.splitlines()
        assert "--max-workers 3" in line
        assert [w["alive"] for w in ctl_json(env, "status", "plain")["workers"]] == [True] * 3
        res = ctl(env, "pause", "plain", "--workers", "x")
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1
        for cmd in ("pause", "resume", "stop"):  # an id the run does not have: bad input too
            res = ctl(env, cmd, "plain", "--workers", "7")
            assert res.returncode == 2 and res.stderr.splitlines() == [
                "procctl: error: --workers: 7 is not a worker id (0 to 2)"], res.stderr
        huge = "9" * 23  # past any run's size: bad input as well (it was exit 1)
        res = ctl(env, "pause", "plain", "--workers", huge)
        assert res.returncode == 2 and res.stderr.splitlines() == [
            f"procctl: error: --workers: {huge} is not a worker id"], res.stderr
        assert [w["alive"] for w in ctl_json(env, "status", "plain")["workers"]] == [True] * 3
        res = ctl(env, "stop", "plain", "--workers", "2")
        assert res.returncode == 0, res.stderr
        for cmd in ("pause", "resume"):  # one that has ended: nothing done, and said (it said "paused")
            res = ctl(env, cmd, "plain", "--workers", "1,2")
            assert res.returncode == 1 and res.stdout == "", res.stdout
            assert res.stderr.splitlines() == [
                f"procctl: error: worker 2 of this run has ended: nothing to {cmd}"], res.stderr
        ctl(env, "stop", "plain")
        assert cli.finish()[0] == 0
    finally:
        cli.kill()


def test_a_stop_of_some_workers_follows_those_only_and_no_wait_returns_at_once(env):
    # Worker 1 never passes a checkpoint: its stop takes the whole 30 s grace.
    # `--no-wait` returned only after it (and past 10 s, with an error, while the
    # stop went on); a waiting stop of worker 0 waits for worker 0 alone.
    cli = start_run(env, "some", "--grace", "30", workers=2, target="targets_control:deaf_but_one")
    try:
        res = ctl(env, "stop", "some", "--workers", "1", "--no-wait", timeout=10)
        assert res.returncode == 0 and res.stdout == "stopping workers 1 of some\n", res.stderr
        states = {w["id"]: w["state"] for w in ctl_json(env, "status", "some")["workers"]}
        assert states == {0: "running", 1: "stopping"}
        metrics = ctl(env, "metrics", "some").stdout
        assert 'procctl_workers{run="some",state="stopping"} 1' in metrics
        assert 'procctl_workers_ended{run="some",outcome="hung"} 0' in metrics  # every outcome, from the start
        res = ctl(env, "stop", "some", "--workers", "0", timeout=10)
        assert res.returncode == 0 and res.stdout == "stopped workers 0 of some\n", res.stderr
        status = {w["id"]: w for w in ctl_json(env, "status", "some")["workers"]}
        assert status[0]["state"] == "ended" and status[0]["outcome"] == "stopped"
        assert status[1]["state"] == "stopping" and status[1]["alive"]
        res = ctl(env, "stop", "some", "--workers", "0")
        assert res.returncode == 1 and res.stderr.splitlines() == [
            "procctl: error: worker 0 of this run has ended: nothing to stop"], res.stderr
        pids = {w["pid"] for w in status.values()}
    finally:
        cli.kill()
    assert_all_gone(pids)


def test_a_scale_down_that_waits_for_its_worker_is_under_way_not_failed(env):
    # Worker 1 never passes a checkpoint: the shrink waits out its 30 s grace.
    # `procctl scale` said "did not answer within 10s", exit 1, while the shrink
    # went on and happened.
    cli = start_run(env, "down", "--grace", "30", workers=2, target="targets_control:deaf_but_one")
    try:
        res = ctl(env, "scale", "down", "1", timeout=20)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("scaling down to 1 worker: under way"), res.stdout
        assert [w["id"] for w in ctl_json(env, "status", "down")["workers"]] == [0]
        pids = set(worker_pids(json_events("\n".join(cli.lines))))
    finally:
        cli.kill()
    assert_all_gone(pids)


@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all"])
def test_a_stop_of_a_worker_waiting_for_its_restart_holds_it(env, strategy):
    # Worker 0 failed and waits for its restart: 30 s of backoff, or (one_for_all)
    # worker 1, which ignores its stop for the 30 s grace. The stop holds it (it
    # was refused as "ended", and the worker restarted).
    target = "worker0_fails" if strategy == "one_for_one" else "first_fails_others_deaf"
    args = ["run", "--workers", "2", "--target", f"targets_supervision:{target}", "--schedule", "run",
            "--restart", "on-failure", "--backoff", "30,30", "--strategy", strategy, "--grace", "30",
            "--json", "--name", "held"]
    cli = LiveCli(args, cwd=TESTS, env=env)
    try:
        cli.wait_for(lambda lines: any('"failed"' in line for line in lines))
        res = ctl(env, "stop", "held", "--workers", "0", timeout=10)
        assert res.returncode == 0 and res.stdout == "stopped workers 0 of held\n", res.stderr
        [w0, w1] = ctl_json(env, "status", "held")["workers"]
        assert (w0["alive"], w0["restarts"], w1["alive"]) == (False, 0, True)
        pids = {w1["pid"]}
    finally:
        cli.kill()
    assert_all_gone(pids)


def test_a_worker_waiting_for_its_restart_can_be_paused_alone(env):
    # It was refused as "ended: nothing to pause", while the whole run's pause
    # was taken; its next process now starts paused.
    args = ["run", "--workers", "2", "--target", "targets_supervision:worker0_fails", "--schedule", "run",
            "--restart", "on-failure", "--backoff", "2,2", "--json", "--name", "later"]
    cli = LiveCli(args, cwd=TESTS, env=env)
    try:
        cli.wait_for(lambda lines: any('"failed"' in line for line in lines))
        res = ctl(env, "pause", "later", "--workers", "0", timeout=10)
        assert res.returncode == 0, res.stderr
        def restarted_paused(lines: list[str]) -> bool:
            events = [(e["event"], e.get("worker")) for e in json_events("\n".join(lines))]
            return ("restarting", 0) in events and ("paused", 0) in events[events.index(("restarting", 0)):]

        cli.wait_for(restarted_paused)
        [w0, w1] = ctl_json(env, "status", "later")["workers"]
        assert (w0["state"], w0["restarts"], w1["state"]) == ("paused", 1, "running")
        pids = {w0["pid"], w1["pid"]}
        ctl(env, "stop", "later")
        assert cli.finish()[0] == 0
    finally:
        cli.kill()
    assert_all_gone(pids)


def test_worker_lists_and_the_runtime_dir_as_a_user_gives_them(monkeypatch, tmp_path):
    from procctl.cli_control import parse_workers
    from procctl.control import runtime_dir

    assert parse_workers("1,1,0,1") == (1, 0)  # each once, in the order given
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", "rel")  # relative: ignored, as the XDG spec says (it was used,
    assert os.path.isabs(runtime_dir(create=False))  # and the run could not be found from elsewhere)


class _StopFails:
    """A controller whose stop of some workers fails (a cluster node's error, say)."""

    workers = 1
    state = State.RUNNING

    def status(self):
        return [WorkerStatus(0, os.getpid(), State.RUNNING, True)]

    def stop(self, grace=None, *, workers=None):
        raise RuntimeError("boom")


def test_a_stop_of_some_workers_that_fails_says_so(env, monkeypatch):
    # It was "stopped workers 0", exit 0.
    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    server = ControlServer(RunHooks("fake", _StopFails, lambda: None), "fake").start()
    try:
        res = ctl(env, "stop", "fake", "--workers", "0")
    finally:
        server.close()
    assert res.returncode == 1 and res.stdout == "", res
    assert res.stderr.splitlines() == ["procctl: error: stop failed: boom"]


def test_a_waiting_stop_of_some_workers_gets_its_second_reply_only_when_they_ended(env):
    cli = start_run(env, "gone", "--grace", "30", workers=2, target="targets_control:deaf_but_one")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20)
            sock.connect(socket_of(env, "gone"))
            sock.sendall(b'{"cmd": "stop", "workers": [1], "wait": true}\n')
            reader = sock.makefile("rb")
            assert json.loads(reader.readline()) == {"ok": True, "stopping": [1]}  # at once: the stop began
            pids = {w["pid"] for w in ctl_json(env, "status", "gone")["workers"]}
            os.kill(cli.proc.pid, signal.SIGKILL)  # worker 1 never ended its stop: no second reply
            assert reader.readline() == b""
    finally:
        cli.kill()
    assert_all_gone(pids)


def test_a_scale_past_what_the_system_lets_it_start_is_bad_input(env):
    # As `procctl run --workers` past the limits: one line naming it, exit 2 (it was 1, a refusal).
    cli = start_run(env, "big", workers=1)
    try:
        res = ctl(env, "scale", "big", "1000000")
        assert res.returncode == 2 and res.stdout == "", res.stderr
        [line] = res.stderr.splitlines()
        assert "file descriptors" in line and "1000000" in line
        assert len(ctl_json(env, "status", "big")["workers"]) == 1
        ctl(env, "stop", "big")
        assert cli.finish()[0] == 0
    finally:
        cli.kill()


def test_a_signal_to_events_follow_only_ends_the_following(env):
    cli = start_run(env, "watched", workers=1)
    try:
        for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            follow = subprocess.Popen(CLI + ["events", "watched", "--follow"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
            try:
                assert json.loads(follow.stdout.readline())["worker"] == 0  # following now
                follow.send_signal(sig)
                _, err = follow.communicate(timeout=20)
            finally:
                follow.kill()
                follow.wait()
            assert follow.returncode == code and err == "", err  # no "stopping the workers": it has none
        assert [w["alive"] for w in ctl_json(env, "status", "watched")["workers"]] == [True]
        assert ctl(env, "stop", "watched").returncode == 0
        assert cli.finish()[0] == 0
    finally:
        cli.kill()


def test_events_follow_of_a_run_killed_says_so_and_exits_1(env):
    # It exited 0 and said nothing: a crash read as a clean end.
    cli = start_run(env, "doomed", workers=1)
    try:
        follow = subprocess.Popen(CLI + ["events", "doomed", "--follow"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert json.loads(follow.stdout.readline())["worker"] == 0  # following now
            os.kill(cli.proc.pid, signal.SIGKILL)
            _, err = follow.communicate(timeout=20)
        finally:
            follow.kill()
            follow.wait()
        assert follow.returncode == 1
        [line] = err.splitlines()
        assert "killed?" in line
    finally:
        cli.kill()


def test_pause_that_a_worker_does_not_acknowledge_is_a_failure(env):
    # The workers are stuck in a C call (time.sleep): they never reach a checkpoint to acknowledge.
    cli = start_run(env, "stuck", "--grace", "0.2", workers=2, target="targets_supervision:c_sleep")
    try:
        res = ctl(env, "pause", "stuck")
        assert res.returncode == 1 and res.stdout == "", (res.stdout, res.stderr)
        [line] = res.stderr.splitlines()
        assert "did not acknowledge" in line and "stays posted" in line
        assert ctl(env, "stop", "stuck").returncode == 0
        cli.finish()
    finally:
        cli.kill()


@pytest.mark.parametrize("n", ["99999999999999999999", "0", "-1", "nan", "abc", "1.5"])
def test_scale_to_a_bad_size_is_bad_usage(env, n):
    res = ctl(env, "scale", "somerun", n)  # checked before any run is looked for
    assert res.returncode == 2 and res.stdout == "", res.stderr
    [line] = res.stderr.splitlines()
    assert n in line and ("range" in line or "integer" in line), line


def assert_scale_refused(env, run):
    """`procctl scale` on a run that cannot resize: one line, the refusal's exit status, nothing changed."""
    res = ctl(env, "scale", run, "8")
    assert res.returncode == 1 and res.stdout == "", (res.stdout, res.stderr)
    [line] = res.stderr.splitlines()
    assert "this run does not support scale" in line


def test_metrics_over_http_and_a_script_with_control(env, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {TESTS!r})\n"
        "from procctl import ProcessController\n"
        "from targets_control import steady\n"
        "if __name__ == '__main__':\n"
        "    with ProcessController(steady, 2, control='lib') as pc:\n"
        "        pc.run()\n"
        "        print('up', flush=True)\n"
        "        pc.wait()\n"
        "        print(sorted(r.outcome.value for r in pc.stop().values()), flush=True)\n")
    lib = subprocess.Popen([CLI[0], str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env)
    cli = LiveCli(["run", "--workers", "2", "--target", "targets_control:steady", "--schedule", "run",
                   "--step", "0", "--name", "web", "--metrics-addr", "127.0.0.1:0"], cwd=TESTS, env=env)
    try:
        assert lib.stdout.readline().strip() == "up"
        status = ctl_json(env, "status", "lib")
        assert status["job"] == "script steady" and [w["state"] for w in status["workers"]] == ["running"] * 2
        assert ctl(env, "stop", "lib").returncode == 0
        out, err = lib.communicate(timeout=20)
        assert out.strip() == "['stopped', 'stopped']", (out, err[-3000:])

        lines = cli.wait_for(lambda lines: any("metrics on http://" in line for line in lines))
        assert any(line.startswith("procctl run: name web, pid ") and "procctl pause web" in line for line in lines)
        url = next(line.split("metrics on ")[1] for line in lines if "metrics on http://" in line)
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as reply:
            families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
        assert sum(s.value for s in families["procctl_workers"].samples) == 2
        # The workers hold no copy of the manager's listener (the port stayed bound while one lived).
        for w in ctl_json(env, "status", "web")["workers"]:
            listening = [c for c in psutil.Process(w["pid"]).net_connections("inet")
                         if c.status == psutil.CONN_LISTEN]
            assert listening == [], listening
        ctl(env, "stop", "web")
        assert cli.finish()[0] == 0
    finally:
        cli.kill()
        lib.kill()
        lib.communicate(timeout=10)


def test_a_stop_from_another_shell_escalates_and_ends_the_scripts_wait(env, tmp_path):
    """On a script's controller, `procctl stop` is stop() without the wait: the
    worker that never passes a checkpoint is escalated after the grace period,
    and the script's wait() returns True with every worker's report."""
    script = tmp_path / "deaf.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {TESTS!r})\n"
        "from procctl import ProcessController\n"
        "from targets_control import deaf_but_one\n"
        "if __name__ == '__main__':\n"
        "    with ProcessController(deaf_but_one, 2, control='deaf', grace=0.3) as pc:\n"
        "        pc.run()\n"
        "        print('up', flush=True)\n"
        "        ended = pc.wait(timeout=60)\n"
        "        print(ended, sorted(r.outcome.value for r in pc.reports.values()), flush=True)\n")
    lib = subprocess.Popen([CLI[0], str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, start_new_session=True)
    try:
        assert lib.stdout.readline().strip() == "up"
        stop = ctl(env, "stop", "deaf")
        assert stop.returncode == 0, stop.stderr
        out, err = lib.communicate(timeout=30)
        assert out.strip() == "True ['killed', 'stopped']", (out, err[-3000:])
    finally:
        end_session(lib)


def test_map_has_a_control_socket(env, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(f"{i}\n" for i in range(2000)))
    cli = LiveCli(["map", "targets_control:slow_item", "--items", str(items), "--workers", "2", "--name", "m"],
                  cwd=TESTS, env=env)
    try:
        cli.wait_for(lambda lines: len(lines) >= 3)  # results are coming
        status = ctl_json(env, "status", "m")
        assert status["job"] == "map targets_control:slow_item" and len(status["workers"]) == 2
        assert ctl(env, "pause", "m").returncode == 0
        assert_scale_refused(env, "m")
        for cmd in ("stop", "pause"):  # a map run is stopped and paused as a whole
            res = ctl(env, cmd, "m", "--workers", "1")
            assert res.returncode == 1 and f"does not support {cmd} of single workers" in res.stderr, res.stderr
            assert "Traceback" not in res.stderr and "attribute" not in res.stderr
        events = [json.loads(line) for line in ctl(env, "events", "m").stdout.splitlines()]
        assert events[0]["event"] == "started"
        res = ctl(env, "stop", "m")
        assert res.returncode == 0, res.stderr
        code, out, err = cli.finish()
        assert code == 0, err
        assert "paused" in err and "procctl stop: stopping" in err
        assert "unfinished" in err.splitlines()[-1]
    finally:
        cli.kill()


def test_pause_of_a_map_run_returns_once_it_is_paused(env, tmp_path):
    # Tasks of 0.5 s that never checkpoint: a worker pauses when its task ends. As for
    # `procctl run`, the command returns once that happened, not as soon as it was asked.
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"n": i, "s": 0.5}) + "\n" for i in range(40)))
    cli = LiveCli(["map", "maptargets:nap", "--items", str(items), "--workers", "2", "--name", "mp"],
                  cwd=TESTS, env=env)
    try:
        cli.wait_for(lambda lines: len(lines) >= 2)
        for command, state in (("pause", "paused"), ("resume", "running"), ("pause", "paused")):
            res = ctl(env, command, "mp")
            assert res.returncode == 0, res.stderr
            assert {w["state"] for w in ctl_json(env, "status", "mp")["workers"]} == {state}, command
        assert ctl(env, "stop", "mp").returncode == 0
        assert cli.finish()[0] == 0
    finally:
        cli.kill()

def test_procctl_stop_cancels_a_sum_run_cleanly(env):
    # The sum job serves the control socket too; `procctl stop` is a clean cancel (exit 0), told as a typed event.
    # Items slow enough that its stdout, which nobody reads while `procctl stop` waits,
    # does not fill up (the run would wait on the pipe, and give up after 10 s).
    cli = LiveCli(["sum", "--threshold", "1000000000", "--delay", "0.1", "--json", "--name", "sum1"],
                  cwd=TESTS, env=env)
    try:
        cli.wait_for(lambda lines: any('"received"' in line for line in lines))
        before = [(w["id"], w["pid"]) for w in ctl_json(env, "status", "sum1")["workers"]]
        assert_scale_refused(env, "sum1")  # its books are sized once: a resize would break the job
        assert [(w["id"], w["pid"], w["alive"]) for w in ctl_json(env, "status", "sum1")["workers"]] == [
            (i, pid, True) for i, pid in before]
        res = ctl(env, "stop", "sum1")
        assert res.returncode == 0, res.stderr
        code, out, err = cli.finish()
    finally:
        cli.kill()
    assert code == 0, err
    events = json_events(out)
    assert [e["event"] for e in events[-4:]] == ["drained", "closed", "cancelled", "summary"]
    assert {k: v for k, v in events[-2].items() if k != "t"} == {"event": "cancelled", "by": "procctl stop"}
    assert events[-2]["t"] >= events[-3]["t"]
    assert events[-1]["winner"] is None
    assert not os.path.exists(socket_of(env, "sum1"))


def test_the_counters_never_go_down(env, monkeypatch):
    """procctl_restarts_total and procctl_tasks_done_total are counters: a restart
    (whose new incarnation starts from 0) or a shrink that removes a worker does
    not take its restarts or its work away."""
    from prometheus_client.parser import text_string_to_metric_families
    from targets_control import reports_then_waits

    from procctl import ProcessController

    def counters() -> tuple[float, float]:
        res = ctl(env, "metrics", "counted")
        assert res.returncode == 0, res.stderr
        families = {f.name: f for f in text_string_to_metric_families(res.stdout)}
        return families["procctl_restarts"].samples[0].value, families["procctl_tasks_done"].samples[0].value

    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    with ProcessController(reports_then_waits, 2, control="counted", restart="on-failure", backoff=(0.0, 0.0),
                           start_method="fork") as pc:
        pc.run()
        pc.pause()  # workers 0 and 1 reported 1 and 2 before they acknowledged anything
        assert counters() == (0, 3)
        for _ in range(2):
            os.kill(pc.status()[1].pid, signal.SIGKILL)
            pc.reap(timeout=20)  # and restarted at once, paused: no progress yet
        assert counters() == (2, 3)
        pc.resize(1)
        assert counters() == (2, 3)
        pc.stop()


def test_the_first_status_has_the_cpu_a_busy_worker_used(env, monkeypatch):
    """psutil's first cpu_percent() is 0.0: a single `procctl status` (or a
    scraper's first scrape) said 0 % for a worker that spins."""
    from targets_control import spin

    from procctl import ProcessController

    monkeypatch.setenv("XDG_RUNTIME_DIR", env["XDG_RUNTIME_DIR"])
    with ProcessController(spin, 1, control="spinning", start_method="fork") as pc:
        pc.run()
        [worker] = ctl_json(env, "status", "spinning")["workers"]  # (the command's start-up: ~0.2 s)
        pc.stop()
    assert worker["cpu_percent"] > 5, worker  # (0.0 before; nearer 100 on a quiet machine)


def test_output_that_cannot_be_written_is_one_line_not_a_traceback(env):
    with open("/dev/full", "w") as full:
        res = subprocess.run(CLI + ["ls", "--json"], stdout=full, stderr=subprocess.PIPE, text=True,
                             timeout=30, env=env, cwd=TESTS)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["procctl: error: cannot write the output: No space left on device"]


def test_an_unusable_control_directory_is_a_warning_not_a_traceback(tmp_path):
    # A symlink where the control directory should be is refused (it could hand
    # our commands to another), as a warning: the run goes on without its socket.
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (runtime / "procctl").symlink_to(tmp_path / "elsewhere")
    res = subprocess.run([sys.executable, "-m", "procctl", "run", "--workers", "1", "--schedule", "run",
                          "--step", "0", "--finish-chance", "1"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "no control socket" in res.stderr


@pytest.mark.parametrize("when", ["running", "ended", "hung", "busy"])
def test_a_stop_of_a_scripts_run_returns_once_its_workers_have_ended(env, tmp_path, when):
    """A script's run has ended once its workers have: `procctl stop` returns
    then, while the script goes on with other work (it waited for the script
    to close its controller, and stopping a run whose workers had all ended
    waited as long). busy: the script is not waiting for its workers at all,
    and the stop is carried out all the same (it waited for the script's next call)."""
    script = tmp_path / "busy.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {TESTS!r})\n"
        "from procctl import ProcessController\n"
        "import threading\n"
        "from targets_control import first_two_finish, naps, one_hangs, steady\n"
        "hung = threading.Event()\n"
        "if __name__ == '__main__':\n"
        f"    target = {dict(running='steady', busy='naps', ended='first_two_finish', hung='one_hangs')[when]}\n"
        "    # (hung: worker 0 is found hung, then killed: an end with no event of its own)\n"
        f"    beat = {0.5 if when == 'hung' else None}  # (a heartbeat has a thread of its own pump)\n"
        "    with ProcessController(target, 2, control='busy', heartbeat=beat, grace=1.0,\n"
        "                           on_event=lambda e: e.event == 'hung' and hung.set()) as pc:\n"
        "        pc.run()\n"
        f"        if {when!r} == 'ended':  # both finish by themselves\n"
        "            pc.wait(timeout=60)\n"
        f"        if {when!r} == 'hung':\n"
        "            hung.wait(30)\n"
        "        print('up', flush=True)\n"
        f"        if {when!r} != 'busy':\n"
        "            print(pc.wait(timeout=60), flush=True)\n"
        "        sys.stdin.read()  # other work, the controller still open\n"
        "        print(pc.wait(timeout=0), [s.alive for s in pc.status()], flush=True)\n")
    lib = subprocess.Popen([CLI[0], str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        assert lib.stdout.readline().strip() == "up"
        stop = ctl(env, "stop", "busy")
        assert stop.returncode == 0 and stop.stdout.strip() == "stopped busy", stop.stderr
        if when != "busy":
            assert lib.stdout.readline().strip() == "True"
        assert lib.poll() is None  # the script goes on
        out, err = lib.communicate("", timeout=30)
        assert lib.returncode == 0 and out.strip() == "True [False, False]", (out, err[-3000:])
    finally:
        end_session(lib)


@pytest.mark.parametrize("quiet", ["--json", "--quiet"])
def test_metrics_on_port_0_say_where_under_json_and_quiet(env, quiet):
    """Port 0 picks a free port: the line that says which is on stderr under
    --json and --quiet too (it went with the start line, and nothing said where)."""
    res = ctl(env, "run", "--workers", "1", "--schedule", "stop", "--step", "0", quiet, "--metrics-addr", "0")
    assert res.returncode == 0, res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith("procctl run: metrics on http://127.0.0.1:") and line.endswith("/metrics"), line
    assert "metrics on" not in res.stdout


def test_one_worker_is_one_worker():
    """Counts read as words: "1 worker" (status, the live view's and the
    timeline's titles said "1 workers")."""
    from procctl.clitools import count

    assert (count(1, "worker"), count(0, "worker"), count(3, "worker")) == ("1 worker", "0 workers", "3 workers")


def test_status_of_a_one_worker_run_says_1_worker(env):
    cli = start_run(env, "single", workers=1)
    try:
        res = ctl(env, "status", "single")
        assert res.returncode == 0 and ", 1 worker, " in res.stdout.splitlines()[0], res.stdout
        assert ctl(env, "stop", "single").returncode == 0
        assert cli.finish()[0] == 0
    finally:
        cli.kill()


def test_a_run_that_does_not_answer_is_listed_as_such(env):
    """A live run that does not answer (its process stopped) is no stale
    socket: `ls` lists it, "not answering" (it said there was no live run)."""
    cli = start_run(env, "frozen", workers=1)
    pid = ctl_json(env, "status", "frozen")["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            runs = ctl_json(env, "ls")  # (after its 5 s wait for an answer)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert [(r["name"], r["pid"], r["state"]) for r in runs] == [("frozen", pid, "not answering")], runs
        assert ctl(env, "stop", "frozen").returncode == 0
        assert cli.finish()[0] == 0
    finally:
        cli.kill()
