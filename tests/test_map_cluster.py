"""procctl map --cluster, as a user runs it: on a LocalCluster of 2 Dask workers, 1 procctl worker each.

One cluster serves the module (started as tests/test_cluster.py does);
one test has the command
start its own (`--cluster local:2`). The joblog is the command line's to
write here: each test checks it against what stdout said.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time

import pytest

pytest.importorskip("distributed")

import dask  # noqa: E402
import maptargets  # noqa: E402
from clihelp import LiveCli, json_events, run_cli  # noqa: E402
from test_map_cli import TESTS, map_cli, results, write_items  # noqa: E402

from procctl.cluster import ClusterExecutor  # noqa: E402
from procctl.cluster.session import NO_DIAGNOSTICS, local_cluster  # noqa: E402


@pytest.fixture(scope="module")
def address():
    cl = local_cluster(2, threads_per_worker=2)
    # One run first, so that the Dask workers have imported procctl and the
    # targets before a test's bounds count. (A node keeps no procctl process
    # between runs: its guardian ends with the run's agent.)
    with ClusterExecutor(cluster=cl, workers_per_node=1, lease=5) as ex:
        assert list(ex.map(maptargets.square, range(4), chunksize=1)) == [0, 1, 4, 9]
    yield cl.scheduler_address
    cl.close()


def joblog(path) -> dict[int, dict]:
    """The joblog's records by input line; each line at most once."""
    records = json_events(path.read_text())
    lines = [r["line"] for r in records]
    assert len(lines) == len(set(lines)), lines
    return {r["line"]: r for r in records}


def test_local_cluster_ordered_with_a_joblog(tmp_path):
    items = write_items(tmp_path / "in.jsonl", range(16))
    log = tmp_path / "log.jsonl"
    res = map_cli(["maptargets:later_items_first", "--items", items, "--cluster", "local:2",
                   "--workers-per-node", "1", "--ordered", "--joblog", str(log), "--json"])
    assert res.returncode == 0, res.stderr
    assert [(r["item"], r["result"]) for r in results(res.stdout)] == [(i, i) for i in range(16)]
    started = [e for e in json_events(res.stdout) if e.get("event") == "started"]
    assert started[0]["nodes"] == 2 and started[0]["workers"] == 2
    records = joblog(log)
    assert sorted(records) == list(range(1, 17))
    assert all(r["status"] == "done" and r["item"] == r["result"] == line - 1 for line, r in records.items())
    assert all(isinstance(r["pid"], int) and r["runtime"] >= 0 and r["start"] > 0 for r in records.values())


def test_a_lambda_is_sent_by_name_to_the_nodes(tmp_path, address):
    # As on one machine: the nodes import FUNC's module by name (from the
    # directory the command ran in, when it is theirs too), so a lambda runs.
    (tmp_path / "lambdas.py").write_text("triple = lambda x: 3 * x  # noqa: E731\n")
    items = write_items(tmp_path / "in.jsonl", range(6))
    res = run_cli(["map", "lambdas:triple", "--items", items, "--cluster", address, "--workers-per-node", "1",
                   "--ordered"], cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert [(r["item"], r["result"]) for r in results(res.stdout)] == [(i, 3 * i) for i in range(6)]


def test_a_failing_item_exits_1_and_resume_runs_only_what_is_not_done(tmp_path, address):
    items = write_items(tmp_path / "in.jsonl", range(10))
    log = tmp_path / "log.jsonl"
    res = map_cli(["maptargets:fail_on_multiples_of_3", "--items", items, "--cluster", address,
                   "--workers-per-node", "1", "--joblog", str(log)])
    assert res.returncode == 1, res.stderr
    out = {r["item"]: r for r in results(res.stdout)}
    assert sorted(out) == list(range(10))
    assert {i for i, r in out.items() if "error" in r} == {0, 3, 6, 9}
    records = joblog(log)
    assert {line - 1 for line, r in records.items() if r["status"] == "failed"} == {0, 3, 6, 9}
    assert "Traceback" in records[4]["traceback"] and records[4]["error"] == "ValueError: 3 is a multiple of 3"
    assert {line - 1 for line, r in records.items() if r["status"] == "done"} == {1, 2, 4, 5, 7, 8}

    res = map_cli(["maptargets:square", "--items", items, "--cluster", address, "--joblog", str(log),
                   "--resume", "--ordered"])
    assert res.returncode == 0, res.stderr
    assert [r["item"] for r in results(res.stdout)] == [0, 3, 6, 9]
    assert "6 skipped" in res.stderr
    again = json_events(log.read_text())[10:]  # a resumed run appends
    assert sorted((r["line"] - 1, r["status"], r["result"]) for r in again) == [
        (i, "done", i * i) for i in (0, 3, 6, 9)]


def test_pause_resume_and_a_graceful_stop(tmp_path, address):
    items = write_items(tmp_path / "in.jsonl", [{"n": i, "s": 0.2} for i in range(40)])
    log, left = tmp_path / "log.jsonl", tmp_path / "left.jsonl"
    cli = LiveCli(["map", "maptargets:nap", "--items", items, "--cluster", address, "--workers-per-node", "1",
                   "--joblog", str(log), "--unfinished", str(left), "--json"], cwd=TESTS)
    try:
        def seen(event):
            return lambda lines: any(f'"event": "{event}"' in line for line in lines)

        cli.wait_for(lambda lines: sum('"result"' in line for line in lines) >= 2, timeout=30)
        cli.proc.send_signal(signal.SIGUSR1)
        cli.wait_for(seen("paused"))
        cli.proc.send_signal(signal.SIGUSR2)
        cli.wait_for(seen("resumed"))
        cli.proc.send_signal(signal.SIGINT)
        code, out, err = cli.finish()
    finally:
        cli.kill()
    assert code == 130, err
    assert "Traceback" not in err
    records = json_events(out)
    done = sorted(r["item"]["n"] for r in results(out))
    assert all("result" in r for r in results(out))
    assert 2 <= len(done) < 40
    assert [e["event"] for e in records if e.get("event") in ("paused", "resumed", "stopping")] == [
        "paused", "resumed", "stopping"]
    # What stdout says is done is exactly what the joblog says, and the rest is unfinished, once each.
    assert sorted(r["item"]["n"] for r in joblog(log).values() if r["status"] == "done") == done
    unfinished = [json.loads(line)["n"] for line in left.read_text().splitlines()]
    assert unfinished == sorted(set(range(40)) - set(done))
    summary = records[-1]
    assert summary["event"] == "summary" and (summary["done"], summary["unfinished"]) == (len(done), 40 - len(done))


def test_a_second_sigint_kills_at_once(tmp_path, address):
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # before any task opens it to write
    keep = os.open(fifo, os.O_WRONLY)  # a writer always there: readable means a task wrote
    # 10 items: a node holds 8 per worker, so each of the 2 nodes gets some.
    items = write_items(tmp_path / "in.jsonl", [{"n": i, "s": 60, "fifo": str(fifo)} for i in range(10)])
    cli = LiveCli(["map", "maptargets:nap", "--items", items, "--cluster", address, "--workers-per-node", "1",
                   "--grace", "30", "--json", "--unfinished", str(tmp_path / "left.jsonl")], cwd=TESTS)
    try:
        said = b""
        while said.count(b"started") < 2:  # a task on each node, neither checkpoints
            assert select.select([reader], [], [], 30)[0], f"the tasks did not start: {said!r}"
            said += os.read(reader, 1024)
        cli.proc.send_signal(signal.SIGINT)
        cli.wait_for(lambda lines: any('"stopping"' in line for line in lines))
        t0 = time.monotonic()
        cli.proc.send_signal(signal.SIGINT)  # must cut the 30 s grace short, on every node
        code, out, err = cli.finish(timeout=20)
        took = time.monotonic() - t0
    finally:
        cli.kill()
        os.close(reader)
        os.close(keep)
    assert code == 130, err
    assert took < 15, f"the second SIGINT took {took:.1f}s"
    assert results(out) == []
    summary = json_events(out)[-1]
    assert (summary["done"], summary["failed"], summary["unfinished"]) == (0, 0, 10)
    assert len((tmp_path / "left.jsonl").read_text().splitlines()) == 10


@pytest.mark.parametrize("spec", ["tcp://127.0.0.1:9", "nonsense"])
def test_bad_address_is_one_line_and_exit_2_before_anything_is_written(tmp_path, spec):
    items = write_items(tmp_path / "in.jsonl", range(3))
    log = tmp_path / "log.jsonl"
    log.write_text("a joblog of an earlier run\n")
    started = time.monotonic()
    res = map_cli(["maptargets:square", "--items", items, "--cluster", spec, "--joblog", str(log)], timeout=30)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and spec in res.stderr, res.stderr
    assert res.stdout == ""
    assert log.read_text() == "a joblog of an earlier run\n"  # a fresh run starts it afresh only once connected
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("args, says", [
    (["--items", "{bad json"], "line 1 is not JSON"),
    (["--workers", "2"], "--workers is for one machine"),
    (["--workers-per-node", "0"], "--workers-per-node"),
    (["--lease", "-1"], "--lease"),
    (["--lease", "nan"], "--lease"),
])
def test_input_is_checked_before_connecting(tmp_path, args, says):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{bad json\n")
    args = [str(bad) if a == "{bad json" else a for a in args]
    with socket.create_server(("127.0.0.1", 0)) as scheduler:  # a "scheduler" that counts who calls
        spec = f"tcp://127.0.0.1:{scheduler.getsockname()[1]}"
        res = map_cli(["maptargets:square", "--cluster", spec] + args, input="1\n", timeout=30)
        called = select.select([scheduler], [], [], 0)[0]
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and says in res.stderr, res.stderr
    assert not called, "it connected before it checked its input"


@pytest.mark.parametrize("option", ["--workers-per-node", "--lease"])
def test_cluster_options_need_a_cluster(option):
    res = map_cli(["maptargets:square", option, "2"], input="1\n")
    assert res.returncode == 2 and f"{option} works with --cluster" in res.stderr, res.stderr



def test_items_left_when_every_node_is_lost_are_unfinished_not_failed(tmp_path):
    """Every Dask worker SIGKILLed mid-run (their nannies start new ones, which
    run no agent of this run): the executor has no node left. What was not done
    did not fail, nothing was left to run it: --unfinished lists it, and the run
    says why and exits 1 (it was 'failed', and --unfinished was empty)."""
    from distributed import Client, LocalCluster

    items = write_items(tmp_path / "in.jsonl", [{"n": i, "s": 0.2} for i in range(40)])
    left = tmp_path / "left.jsonl"
    with dask.config.set(NO_DIAGNOSTICS):
        cl = LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None)
    cli = None
    try:
        with Client(cl.scheduler_address, set_as_default=False) as client:
            # (Before the run: a client's connect under load can outlast the work left.)
            dask_pids = list(client.run(os.getpid).values())
        cli = LiveCli(["map", "maptargets:nap", "--items", items, "--cluster", cl.scheduler_address,
                       "--workers-per-node", "1", "--lease", "2", "--unfinished", str(left), "--json"], cwd=TESTS)
        cli.wait_for(lambda lines: sum('"result"' in line for line in lines) >= 2, timeout=30)
        for pid in dask_pids:
            os.kill(pid, signal.SIGKILL)
        code, out, err = cli.finish(timeout=60)
    finally:
        if cli is not None:
            cli.kill()
        cl.close()
    assert code == 1, err
    assert "the workers are gone" in err
    done = sorted(r["item"]["n"] for r in results(out) if "result" in r)
    assert not [r for r in results(out) if "error" in r]
    summary = json_events(out)[-1]
    assert (summary["done"], summary["failed"], summary["unfinished"]) == (len(done), 0, 40 - len(done)), summary
    assert [json.loads(line)["n"] for line in left.read_text().splitlines()] == sorted(set(range(40)) - set(done))
