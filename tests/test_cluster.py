"""procctl.cluster on a LocalCluster of worker processes: 2 nodes x 2 workers.

One cluster serves the module; the tests that kill a Dask worker start their
own, since its nanny starts a new worker process in its place.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import weakref

import psutil
import pytest

pytest.importorskip("distributed")

import cluster_targets  # noqa: E402
import dask  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402
from procs import still_running  # noqa: E402

from procctl import Outcome, State, WorkerCrashed, WorkerStartError  # noqa: E402
from procctl.cluster import ClusterController, ClusterExecutor  # noqa: E402
from procctl.cluster.agent import Agent  # noqa: E402
from procctl.cluster.session import NO_DIAGNOSTICS, claim, local_cluster  # noqa: E402
from procctl.cluster.wire import Command, Op, Up, encode  # noqa: E402

LEASE = 2.0


@pytest.fixture(scope="module")
def cluster():
    cl = local_cluster(2, threads_per_worker=2)
    # One run first, so that the Dask workers have imported procctl and the
    # targets before a test's bounds count. (A node keeps no procctl process
    # between runs: its guardian ends with the run's agent.)
    with ClusterController(cluster_targets.loop, 1, cluster=cl, lease=5) as cc:
        cc.stop(grace=5)
    yield cl
    cl.close()


def dask_worker_pids(address: str) -> dict[str, int]:
    with Client(address, set_as_default=False) as client:
        return client.run(os.getpid)


def test_huge_seconds_mean_that_long(cluster):
    # lease, timeouts and grace past what a wait takes (about 9e9 s): as locally, no OverflowError
    with ClusterController(cluster_targets.loop, 1, cluster=cluster, lease=1e300, grace=1e300) as cc:
        cc.run(timeout=1e300)
        cc.pause(timeout=1e300)
        assert len(cc.status()) == 2
        assert not cc.wait(timeout=0.1)
        reports = cc.stop(grace=1e300)
    assert [r.outcome for r in reports.values()] == [Outcome.STOPPED] * 2


def test_run_pause_stop_across_two_nodes(cluster):
    events = []
    with ClusterController(cluster_targets.loop, 2, cluster=cluster, lease=5, on_event=events.append) as cc:
        nodes = [n.address for n in cc.nodes]
        assert len(nodes) == 2
        status = cc.status()
        assert [s.worker_id for s in status] == [0, 1, 2, 3]
        assert [s.node for s in status] == [nodes[0], nodes[0], nodes[1], nodes[1]]
        assert all(s.alive and s.state is State.PAUSED for s in status)
        pids = [s.pid for s in status]
        cc.run()
        assert {s.state for s in cc.status()} == {State.RUNNING}
        cc.pause()
        assert {s.state for s in cc.status()} == {State.PAUSED}
        cc.run()
        reports = cc.stop(grace=5)
    assert sorted(reports) == [0, 1, 2, 3]
    for wid, r in reports.items():
        assert r.outcome is Outcome.STOPPED
        assert r.node == nodes[wid // 2]
        assert r.result == (wid, 4)  # ctx.worker_id is the global id; ctx.workers counts every node's
    assert still_running(pids, timeout=5) == []
    seen = {(e.worker, e.event) for e in events if e.worker is not None}
    assert {(w, "running") for w in range(4)} <= seen
    assert [e.state for e in events if e.event == "broadcast"] == ["running", "paused", "running", "stopped"]
    assert all(e.node in nodes for e in events if e.worker is not None)


def test_the_local_methods_on_a_subset_of_the_workers(cluster):
    with ClusterController(cluster_targets.loop, 2, cluster=cluster, lease=5) as cc:
        cc.run(workers=[1, 2])  # one on each node
        assert [s.state for s in cc.status()] == [State.PAUSED, State.RUNNING, State.RUNNING, State.PAUSED]
        assert cc.state is State.PAUSED  # the broadcast state: a subset leaves it
        cc.pause(workers=[2])
        assert [s.state for s in cc.status()] == [State.PAUSED, State.RUNNING, State.PAUSED, State.PAUSED]
        with pytest.raises(ValueError, match="workers: 9"):
            cc.pause(workers=[9])
        with pytest.raises(TypeError, match="workers"):
            cc.run(workers="12")
        stopped = cc.stop(grace=5, workers=[1, 3])
        assert sorted(stopped) == [1, 3] and {r.outcome for r in stopped.values()} == {Outcome.STOPPED}
        assert cc.history(1) == [stopped[1]] and cc.history(0) == [] and not cc.gave_up
        assert [s.alive for s in cc.status()] == [True, False, True, False]
        with pytest.raises(ValueError, match="sig"):
            cc.signal_live(0)
        live = cc.pids()
        assert live == [s.pid for s in cc.status() if s.alive] and len(live) == 2
        assert cc.signal_live(signal.SIGKILL) == [0, 2]  # the live ones
        assert cc.wait_ended(20)
        assert {wid: r.outcome for wid, r in cc.reports.items()} == {
            0: Outcome.KILLED, 1: Outcome.STOPPED, 2: Outcome.KILLED, 3: Outcome.STOPPED}


def test_outcomes_name_the_node(cluster):
    with ClusterController(cluster_targets.by_id, 3, cluster=cluster, lease=5) as cc:
        nodes = [n.address for n in cc.nodes]
        cc.run()
        deadline = time.monotonic() + 20
        got = []
        while len(got) < 4 and time.monotonic() < deadline:  # blocking reaps, bounded
            got += cc.reap(timeout=deadline - time.monotonic())
        reports = cc.stop(grace=5)
    assert len(got) >= 4
    for wid, r in reports.items():
        assert r.node == nodes[wid // 3]
        expected = [Outcome.FINISHED, Outcome.FAILED, Outcome.STOPPED][wid % 3]
        assert r.outcome is expected, (wid, r)
    assert reports[1].error_line == "ValueError: bad input"
    assert reports[0].result == "done"

    with ClusterController(cluster_targets.crash, 1, cluster=cluster, lease=5, initial_state=State.RUNNING) as cc:
        assert cc.wait(timeout=45)  # a bound against a hang, generous under load
        reports = cc.stop()
    assert {r.outcome for r in reports.values()} == {Outcome.CRASHED}
    assert {r.exitcode for r in reports.values()} == {3}
    assert sorted(r.node for r in reports.values()) == sorted(n.address for n in cc.nodes)


def test_a_procctl_worker_sigkilled(cluster):
    with ClusterController(cluster_targets.loop, 2, cluster=cluster, lease=5) as cc:
        cc.run()
        status = cc.status()
        os.kill(status[3].pid, signal.SIGKILL)
        got = cc.reap(timeout=15)
        assert [r.worker_id for r in got] == [3]
        assert got[0].outcome is Outcome.CRASHED and got[0].exitcode == -signal.SIGKILL
        assert got[0].node == status[3].node
        assert [s.alive for s in cc.status()] == [True, True, True, False]
        cc.pause()  # the others still answer
        reports = cc.stop(grace=5)
    assert [r.outcome for r in reports.values()] == [Outcome.STOPPED] * 3 + [Outcome.CRASHED]


def test_executor_map_submit_pause_status(cluster):
    events = []
    with ClusterExecutor(cluster=cluster, workers_per_node=2, lease=5, on_event=events.append) as ex:
        assert list(ex.map(cluster_targets.square, range(300))) == [x * x for x in range(300)]
        assert list(ex.map(cluster_targets.square, range(20), chunksize=1)) == [x * x for x in range(20)]
        with pytest.raises(ValueError, match="bad 7") as info:
            ex.submit(cluster_targets.fail, 7).result(timeout=20)
        assert "Traceback" in str(info.value.__cause__)
        status = ex.status()
        assert [s.worker_id for s in status] == [0, 1, 2, 3]
        assert len({s.node for s in status}) == 2
        ex.pause(timeout=1e300)  # huge: "that long", as locally (it overflowed a wait)
        assert ex.paused
        fut = ex.submit(cluster_targets.square, 3)
        ex.resume(timeout=1e300)
        assert fut.result(timeout=20) == 9
        counts = ex.counts()
        # status() counts items too, not the chunks a node ran (it said 15 for 300 items)
        assert sum(s.done for s in ex.status()) == 322
    # Items, not chunks: 300 + 20 + 1 + 1.
    assert (counts.submitted, counts.completed, counts.failed) == (322, 321, 1)
    assert sum(e.event == "task-done" for e in events) == 321
    assert any(e.event == "task-failed" and e.node for e in events)
    # each names the worker that ran it, by its global id, as locally
    assert {e.worker for e in events if e.event.startswith("task-")} <= {0, 1, 2, 3}


@pytest.mark.parametrize("kind", ["controller", "executor"])
def test_a_pause_that_waits_longer_than_the_lease_keeps_the_run(cluster, kind, tmp_path):
    """The agent applies a pause in its own thread and goes on reading: the
    client's renewals keep its lease while the workers finish their units."""
    # (A lease of 0.5 s ran out under a load of 12 on 2 cores; renewals pass through the
    # scheduler, which other xdist workers' clusters starting at once can hold up.)
    lease, unit = 2.0, 4.5
    fifo = str(tmp_path / "started")
    os.mkfifo(fifo)
    told = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # (opening never blocks the worker's open)
    if kind == "controller":
        try:
            with ClusterController(cluster_targets.long_units, 1, args=(unit, fifo), cluster=cluster, lease=lease,
                                   initial_state=State.RUNNING) as cc:
                # In its unit (else a pause could find it at its first checkpoint)
                assert select.select([told], [], [], 30)[0], "the worker never started its unit"
                started = time.monotonic()
                cc.pause(timeout=30)
                assert time.monotonic() - started > lease
                assert all(s.alive and s.state is State.PAUSED for s in cc.status())
                reports = cc.stop(grace=10)  # paused: it stops at once
        finally:
            os.close(told)
        assert {r.outcome for r in reports.values()} == {Outcome.STOPPED}
        return
    with ClusterExecutor(cluster=cluster, workers_per_node=1, lease=lease) as ex:
        # One task: a second could wait in the same node's window, which a
        # paused pool rightly does not start.
        try:
            first = ex.submit(cluster_targets.deaf_task_telling, fifo, unit)
            assert select.select([told], [], [], 30)[0], "the task never started"
        finally:
            os.close(told)
        started = time.monotonic()
        ex.pause(timeout=30)  # acknowledged once the task ends (its result may come just after)
        assert time.monotonic() - started > lease
        assert first.exception(timeout=10) is None
        later = ex.submit(cluster_targets.square, 4)
        with pytest.raises(concurrent.futures.TimeoutError):
            later.result(timeout=0.5)  # a paused pool starts nothing
        ex.resume()
        assert later.result(timeout=20) == 16


def test_a_crash_names_the_global_worker_and_its_node(cluster):
    events = []
    with ClusterExecutor(cluster=cluster, workers_per_node=2, lease=5, retries=1, on_event=events.append) as ex:
        # What it was given, as ProcessExecutor shows it.
        assert (ex.retries, ex.task_timeout, ex.grace, ex.workers_per_node) == (1, None, 5.0, 2)
        ids = {ex.submit(cluster_targets.where_am_i, i).result(timeout=20)[:2] for i in range(16)}
        assert {w for w, _ in ids} <= {0, 1, 2, 3} and {n for _, n in ids} == {4}
        by_pid = {s.pid: s for s in ex.status()}
        fut = ex.submit(cluster_targets.exit_if, 1, 1)
        with pytest.raises(WorkerCrashed) as info:
            fut.result(timeout=20)
        retried = ex.retried
    retry = next(e for e in events if e.event == "task-retry")
    for text in (str(info.value), retry.error):
        said = re.search(r"worker (\d+) on node (\S+) \(pid (\d+)\)", text)
        assert said, text
    status = by_pid[int(said[3])]  # the first crash's worker (the retry ran on its replacement)
    assert (int(said[1]), said[2]) == (status.worker_id, status.node) == (retry.worker, retry.node)
    # The events ProcessExecutor gives: the retry on the node, the workers' crashes
    # (global ids, the node), the task's end named as locally.
    names = [e.event for e in events]
    assert names.count("task-retry") == 1 == retried and names.count("task-crashed") == 1
    crashed = [e for e in events if e.event == "crashed"]
    assert len(crashed) == 2 and all(e.worker in (0, 1, 2, 3) and e.node for e in crashed)
    end = next(e for e in events if e.event == "task-crashed")
    assert (end.done, end.total) == (17.0, 17.0)
    assert end.worker in (0, 1, 2, 3) and end.node  # the worker that died in it (its replacement's id)


def test_executor_spreads_tasks_over_the_nodes(cluster):
    nodes = set(dask_worker_pids(cluster.scheduler_address).values())
    with ClusterExecutor(cluster=cluster, workers_per_node=2, lease=5) as ex:
        assert set(ex.map(cluster_targets.parent_pid, range(16))) == nodes
        futs = [ex.submit(cluster_targets.parent_pid, i) for i in range(8)]
        assert {f.result(timeout=20) for f in futs} == nodes


def test_stop_hands_back_each_unfinished_item_once(cluster):
    with ClusterExecutor(cluster=cluster, workers_per_node=2, lease=5) as ex:
        futs = [ex.submit(cluster_targets.slow_square, i) for i in range(200)]
        next(concurrent.futures.as_completed(futs, timeout=30))
        left = ex.stop(grace=2)
    completed = [i for i, f in enumerate(futs) if f.done() and not f.cancelled()]
    assert all(futs[i].result() == i * i for i in completed)
    assert len(left.items) == len(set(left.items))
    assert sorted(completed + left.items) == list(range(200))
    assert left.items == sorted(left.items)
    assert all(f.cancelled() for f in left.futures)
    done, not_done = concurrent.futures.wait(futs, timeout=5)  # the cancelled ones count as done
    assert not not_done


def test_the_wire_needs_no_fallback_serialization(cluster, caplog):
    # Dask logs "Failed to serialize ... falling back to pickle" for each put
    # of an object msgpack does not know: procctl's commands and messages must not be.
    logger = logging.getLogger("distributed.protocol.core")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="distributed.protocol.core"):
            with ClusterController(cluster_targets.loop, 1, address=cluster.scheduler_address, lease=5) as cc:
                cc.run()
                cc.pause()
                cc.stop(grace=5)
    finally:
        logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "serialize" in r.getMessage()], caplog.text


def guardians(pids) -> list[int]:
    """procctl guardians of the processes `pids` (not their children: a go-between started them)."""
    marks = tuple(f"main({pid}," for pid in pids)
    out = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            line = " ".join(proc.cmdline())
            if "procctl.guardian" in line and line.endswith(")") and any(m in line for m in marks) and (
                    proc.status() != psutil.STATUS_ZOMBIE):
                out.append(proc.pid)
    return out


def test_nothing_procctl_started_outlives_a_run_on_a_node(cluster):
    nodes = list(dask_worker_pids(cluster.scheduler_address).values())
    with ClusterController(cluster_targets.loop, 1, cluster=cluster, lease=5) as cc:
        cc.run()
        # One a node while its workers run (and for a moment its go-between too,
        # with the same command line). Not asserted: two full-suite runs in
        # five saw none at this point, for a reason not found (this stop).
        running = guardians(nodes)
        cc.stop(grace=5)
    assert still_running(running, timeout=5) == []
    assert still_running(guardians(nodes), timeout=5) == []
    with ClusterExecutor(cluster=cluster, workers_per_node=1, lease=5) as ex:
        assert list(ex.map(cluster_targets.square, range(4))) == [0, 1, 4, 9]
        running = guardians(nodes)
    assert still_running(running, timeout=5) == []
    assert still_running(guardians(nodes), timeout=5) == []


def test_a_future_cancelled_in_the_clients_queue_is_counted_at_once(cluster):
    with ClusterExecutor(cluster=cluster, workers_per_node=1, lease=5) as ex:
        futs = [ex.submit(cluster_targets.slower_square, i) for i in range(60)]
        assert futs[-1].cancel()  # still in the client's queue (a node is dealt a few)
        counts = ex.counts()
        assert counts.cancelled == 1, counts
        assert counts.completed + counts.failed + counts.cancelled + counts.running + counts.queued == 60, counts
        ex.shutdown(cancel_futures=True)


def test_a_node_gives_back_the_slow_tasks_it_has_not_started(cluster):
    # As ProcessPoolExecutor: once tasks are slow, a node holds what its workers run and a
    # few more (2 a worker here); the rest wait in the client's queue: pending, cancellable.
    with ClusterExecutor(cluster=cluster, workers_per_node=2, lease=5) as ex:
        # Slow until seen quick: a burst of submits stays in the client's queue.
        burst = [ex.submit(cluster_targets.napping_square, i, 1.0) for i in range(40)]
        early = sum(f.cancel() for f in burst)
        assert early >= 40 - 2 * (2 + 1)
        futs = [ex.submit(cluster_targets.napping_square, i, 1.0) for i in range(40)]
        done = 0
        for _ in concurrent.futures.as_completed(futs, timeout=30):  # the second round of tasks
            done += 1
            if done == 5:
                break
        running = [i for i, f in enumerate(futs) if f.running()]
        assert len(running) <= 2 * 2 * 2, running  # (a node held 16 before they were seen slow)
        cancelled = [i for i, f in enumerate(futs) if f.cancel()]
        assert len(cancelled) >= 40 - 5 - 2 * 2 * 2 - 4, cancelled
        assert not set(cancelled) & set(running)
        ex.shutdown(wait=True)
    assert all(f.result() == i * i for i, f in enumerate(futs) if i not in cancelled)
    assert ex.counts().cancelled == early + len(cancelled)


def test_shutdown_cancels_what_did_not_start_and_ends_the_agents(cluster):
    ex = ClusterExecutor(cluster=cluster, workers_per_node=2, lease=5)
    # Tasks long enough that a loaded machine cannot run all 40 before the cancel.
    futs = [ex.submit(cluster_targets.slower_square, i) for i in range(40)]
    next(concurrent.futures.as_completed(futs, timeout=30))
    ex.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in futs if f.cancelled()]
    assert all(f.result() == i * i for i, f in enumerate(futs) if not f.cancelled())
    # Also those a node held but had not started (a node holds 16 here: 32 of 40).
    assert len(cancelled) > 20 and ex.counts().cancelled == len(cancelled)

    ex = ClusterExecutor(cluster=cluster, workers_per_node=1, lease=5)
    pids = [s.pid for s in ex.status()]
    futs = [ex.submit(cluster_targets.square, i) for i in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=20) for f in futs] == [0, 1, 4, 9]
    assert still_running(pids, timeout=10) == []  # the agents stop with the last task, not at our exit

    # Dropped without shutdown(): collected, and then as shutdown(wait=False), as ProcessExecutor.
    ex = ClusterExecutor(cluster=cluster, workers_per_node=1, lease=5)
    pids = [s.pid for s in ex.status()]
    futs = [ex.submit(cluster_targets.square, i) for i in range(4)]
    dropped = weakref.ref(ex)
    del ex
    gc.collect()
    assert dropped() is None
    assert [f.result(timeout=20) for f in futs] == [0, 1, 4, 9]
    assert still_running(pids, timeout=10) == []


@pytest.mark.parametrize("call", ["stop", "status"])
def test_on_event_may_call_the_controller_while_run_waits(cluster, call):
    """As locally, an on_event callback may call any method, here while the
    script's run() waits for the acknowledgements: stop at the first failure,
    or ask the status (a lock-order deadlock, both for ever, on the first try)."""
    out: dict = {}
    done = threading.Event()

    def on_event(e) -> None:
        if e.event == "failed" and not out:
            out["thread"] = threading.current_thread().name
            try:
                out["got"] = cc.stop(grace=2) if call == "stop" else cc.status()
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                out["error"] = repr(exc)
            done.set()

    cc = ClusterController(cluster_targets.by_id, 3, cluster=cluster, lease=5, on_event=on_event)
    runner = threading.Thread(target=lambda: cc.__enter__().run(), daemon=True)
    try:
        runner.start()
        assert done.wait(30), "on_event's call never returned"
        runner.join(30)
        assert not runner.is_alive(), "run() never returned"
    finally:
        reports = cc.stop(grace=2)
    assert "error" not in out, out  # (told by the deliverer, or by run() itself once it let go of its lock)
    assert len(out["got"]) == 6
    assert {r.outcome for r in reports.values()} >= {Outcome.FAILED, Outcome.FINISHED}


def test_an_initializer_that_fails_on_every_node_breaks_the_executor(cluster):
    """As a local pool whose initializer fails: the futures fail, then a submit
    raises, and shutdown() returns (new tasks went to nodes whose pools were
    broken, and waited there for ever; so did shutdown())."""
    from concurrent.futures import BrokenExecutor

    ex = ClusterExecutor(cluster=cluster, workers_per_node=1, lease=5, initializer=cluster_targets.fail,
                         initargs=(1,))
    try:
        with pytest.raises(BrokenExecutor):
            ex.submit(cluster_targets.square, 2).result(30)
        late = []
        with contextlib.suppress(BrokenExecutor):  # (refused at once once every node said its pool broke)
            for i in range(4):
                late.append(ex.submit(cluster_targets.square, i))
        for fut in late:
            with pytest.raises(BrokenExecutor):
                fut.result(30)
        with pytest.raises(BrokenExecutor):
            list(ex.map(cluster_targets.square, [1, 2]))
    finally:
        stopped = threading.Thread(target=ex.shutdown, daemon=True)
        stopped.start()
        stopped.join(30)
    assert not stopped.is_alive(), "shutdown() did not return"


def test_a_node_whose_pool_breaks_leaves_its_tasks_to_the_others(cluster):
    """One node's initializer fails, the other's does not: that node's tasks
    did not run, and go to the other node; every future completes."""
    ex = ClusterExecutor(cluster=cluster, workers_per_node=1, lease=5, initializer=cluster_targets.fail_on_worker_0)
    try:
        futs = [ex.submit(cluster_targets.square, i) for i in range(20)]
        assert [f.result(60) for f in futs] == [i * i for i in range(20)]
        assert ex.submit(cluster_targets.square, 5).result(60) == 25  # the executor goes on
    finally:
        ex.stop(grace=1)


def test_executor_methods_work_from_a_done_callback(cluster):
    """A done callback may pause, ask the status, stop at the first failure:
    they wait for the nodes' answers, which another thread than the
    callback's reads."""
    out: dict = {}
    called = threading.Event()
    ex = ClusterExecutor(cluster=cluster, workers_per_node=2, lease=5)

    def stop_at_the_failure(fut):
        out["thread"] = threading.current_thread().name
        try:
            out["status"] = len(ex.status())
            ex.pause(timeout=5)
            ex.resume(timeout=5)
            out["left"] = ex.stop(grace=1)
            with pytest.raises(RuntimeError, match="cannot wait"):
                ex.shutdown(wait=True)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            out["error"] = repr(exc)
        called.set()

    try:
        first = [ex.submit(cluster_targets.slower_square, i) for i in range(4)]
        ex.submit(cluster_targets.fail, 1).add_done_callback(stop_at_the_failure)
        rest = [ex.submit(cluster_targets.slower_square, i) for i in range(40)]
        assert called.wait(30), out
    finally:
        ex.stop(grace=1)
    assert "error" not in out and out["thread"] != threading.current_thread().name, out
    assert out["status"] == 4
    assert len(out["left"].items) > 20 and all(f.cancelled() for f in out["left"].futures)
    assert all(f.done() for f in first + rest)


@pytest.mark.parametrize("chunksize", [1, 5])
def test_executor_map_lets_go_of_the_results_it_yielded(cluster, chunksize):
    """As the stdlib's map (bpo-14406): a yielded result lives as long as the caller keeps it."""
    with ClusterExecutor(cluster=cluster, workers_per_node=1, lease=5) as ex:
        it = ex.map(cluster_targets.make_dummy, range(20), chunksize=chunksize)
        refs = [weakref.ref(next(it)) for _ in range(12)]
        gc.collect()
        assert [r for r in refs if r() is not None] == []  # while the iterator lives
        assert len(list(it)) == 8


def test_a_local_cluster_runs_no_dashboard_diagnostics(cluster):
    # Its nodes' sampling profiler and tick check cost an idle cluster a fifth of a core.
    with Client(cluster.scheduler_address, set_as_default=False) as client:
        seen = client.run(lambda: (dask.config.get("distributed.worker.profile.enabled"),
                                   dask.config.get("distributed.admin.tick.interval")))
    assert len(seen) == 2 and set(seen.values()) == {(False, "1s")}


def test_claim_runs_an_agent_once(cluster):
    with Client(cluster, set_as_default=False) as client:
        name = f"procctl-test-claim-{os.getpid()}-{time.monotonic_ns()}"
        first = client.submit(claim, name, pure=False).result(timeout=10)
        again = client.submit(claim, name, pure=False).result(timeout=10)
    assert (first, again) == (True, False)


@pytest.fixture
def own_cluster():
    # The scheduler's default allowed-failures (3): procctl must not count a re-run.
    with dask.config.set({**NO_DIAGNOSTICS, "distributed.worker.daemon": False}):
        cl = LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None)
    try:
        yield cl
    finally:
        cl.close()


def test_a_dask_worker_sigkilled(own_cluster, tmp_path):
    address = own_cluster.scheduler_address
    # A lease far longer than the bound below: the scheduler's word that the worker is
    # gone is what tells it (under allowed-failures 3 the agent was queued again,
    # and the node's loss was seen only when the lease ran out).
    with ClusterController(cluster_targets.loop, 2, address=address, lease=60) as cc:
        cc.run()
        lost = cc.nodes[1].address
        victims = [s.pid for s in cc.status() if s.node == lost]
        os.kill(dask_worker_pids(address)[lost], signal.SIGKILL)
        got = []
        deadline = time.monotonic() + 15
        while len(got) < 2 and time.monotonic() < deadline:
            got += cc.reap(timeout=deadline - time.monotonic())
        assert sorted(r.worker_id for r in got) == [2, 3]
        assert all(r.outcome is Outcome.CRASHED and r.node == lost and lost in r.error for r in got)
        assert still_running(victims, timeout=5) == []  # they died with their node
        reports = cc.stop(grace=5)
    assert [r.outcome for r in reports.values()] == [Outcome.STOPPED] * 2 + [Outcome.CRASHED] * 2

    with Client(address, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=20)  # the nanny's new worker
        # (Looked up before the run: a client's connect while the tasks ran took
        # long enough, under load, for them all to end before the kill.)
        pids = client.run(os.getpid)
    events = []
    with ClusterExecutor(address=address, workers_per_node=2, lease=LEASE, on_event=events.append) as ex:
        futs = [ex.submit(cluster_targets.slow_square, i) for i in range(80)]
        it = concurrent.futures.as_completed(futs, timeout=30)
        for _ in range(8):
            next(it)
        os.kill(pids[ex.nodes[1].address], signal.SIGKILL)
        assert [f.result(timeout=30) for f in futs] == [i * i for i in range(80)]
        assert ex.retried > 0
        assert any(e.event == "task-retry" and e.node == ex.nodes[1].address for e in events)
        # Its workers went with it: crashed, each with its global id and the node (as ClusterController says).
        assert sorted(e.worker for e in events if e.event == "crashed" and e.node == ex.nodes[1].address) == [2, 3]
        # The lost node's workers stay in status(), crashed, with their node; ids stay stable.
        status = ex.status()
        assert [s.worker_id for s in status] == [0, 1, 2, 3]
        assert [(s.alive, s.outcome, s.node) for s in status[2:]] == [
            (False, Outcome.CRASHED, ex.nodes[1].address)] * 2
        assert sum(s.total for s in status) == 80
        more = [ex.submit(cluster_targets.slow_square, i) for i in range(100)]
        next(concurrent.futures.as_completed(more, timeout=30))
        left = ex.stop(grace=2)
    completed = [i for i, f in enumerate(more) if f.done() and not f.cancelled()]
    assert sorted(completed + left.items) == list(range(100))
    assert len(set(left.items)) == len(left.items)

    # A node lost while stop() waits for it: its workers are still reported crashed,
    # and what they ran is in `running` (they were not, and their events never came).
    with Client(address, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=20)
        # (Before the run: a client's connect inside the stop's 3 s grace could
        # take long enough, under load, for the node to end its workers itself.)
        pids = client.run(os.getpid)
    said = tmp_path / "said"
    os.mkfifo(said)
    reader = os.open(said, os.O_RDONLY | os.O_NONBLOCK)
    keep = os.open(said, os.O_WRONLY)  # (no end of file between the tasks' writes)
    events, out = [], []
    ex = ClusterExecutor(address=address, workers_per_node=2, lease=LEASE, on_event=events.append)
    try:
        futs = [ex.submit(cluster_targets.tell_start_and_stop, str(said), i) for i in range(8)]
        started = _read_said(reader, 4)  # every worker runs one
        stopping = threading.Thread(target=lambda: out.append(ex.stop(grace=3)))
        stopping.start()
        ids = sorted(int(line.split()[1]) for line in started)
        assert sorted(int(line.split()[1]) for line in _read_said(reader, 4)) == ids  # each saw STOPPED
        lost = ex.nodes[1].address
        os.kill(pids[lost], signal.SIGKILL)
        stopping.join(30)
        assert out, "stop() did not return"
    finally:
        ex.stop(0)
        os.close(reader)
        os.close(keep)
    left = out[0]
    # (A task's item is its arguments: here (fifo, i).)
    assert sorted(i for _, i in left.items) == list(range(8)) and all(f.cancelled() for f in futs)
    assert sorted(i for _, i in left.running) == ids
    assert sorted(e.worker for e in events if e.event == "crashed" and e.node == lost) == [2, 3]


def _read_said(fd: int, lines: int, timeout: float = 30) -> list[str]:
    """`lines` lines from the FIFO the tasks write to (its reader end, non-blocking)."""
    got = b""
    deadline = time.monotonic() + timeout
    while got.count(b"\n") < lines:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise AssertionError(f"the tasks said only {got!r} in {timeout}s")
        got += os.read(fd, 4096)
    return got.decode().splitlines()


CLIENT = """
import json, sys
import cluster_targets
from procctl.cluster import ClusterController, ClusterExecutor
address, lease = sys.argv[1], float(sys.argv[2])
# Workers that never look at a checkpoint, with the default grace (5 s): a controller's
# target and an executor's tasks.
cc = ClusterController(cluster_targets.deaf, 1, address=address, lease=lease)
cc.start()
cc.run()
ex = ClusterExecutor(address=address, workers_per_node=1, lease=lease)
futs = [ex.submit(cluster_targets.deaf_task, 100) for _ in range(2)]
print(json.dumps([s.pid for s in cc.status() + ex.status()]), flush=True)
sys.stdin.read()
"""


def _client_pids(proc, how: str) -> list[int]:
    """The pids of the client's 4 workers: its first line (library), or its running events (CLI)."""
    if how != "cli":
        return json.loads(proc.stdout.readline())
    pids: set[int] = set()
    while len(pids) < 4:
        line = proc.stdout.readline()
        assert line, "the CLI ended before its workers ran"
        event = json.loads(line)
        if event.get("event") == "running":
            pids.add(event["pid"])
    return sorted(pids)


@pytest.mark.parametrize("how", ["library", pytest.param("cli", marks=pytest.mark.soak)])  # (CI time: the
def test_a_killed_client_leaves_no_worker_behind(cluster, tests_dir, how):  # lease is the same for both)
    """Within lease + 2 s, whatever the workers do: the lease's stop has a short
    grace (library: a controller's target and an executor's tasks that never
    checkpoint; cli: workers that checkpoint)."""
    before = dask_worker_pids(cluster.scheduler_address)
    if how != "cli":
        argv = [sys.executable, "-c", CLIENT, cluster.scheduler_address, str(LEASE)]
    else:  # --lease must reach the nodes: the default (10 s) would leave them running past the bound
        argv = [sys.executable, "-m", "procctl", "run", "--cluster", cluster.scheduler_address,
                "--workers-per-node", "2", "--lease", str(LEASE), "--target", "cluster_targets:loop",
                "--schedule", "run", "--step", "0", "--json"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tests_dir, text=True)
    try:
        pids = _client_pids(proc, how)
        assert len(pids) == 4 and still_running(pids, timeout=0) != []
        helpers = guardians(before.values())
        proc.kill()
        killed = time.monotonic()
        proc.wait(5)
        left = still_running(pids, timeout=LEASE + 2)
        assert left == [], f"workers still running {time.monotonic() - killed:.1f}s after the client died"
        assert still_running(helpers, timeout=5) == []  # the nodes' guardians too
    finally:
        proc.kill()
        proc.wait(5)
        proc.stdin.close()
        proc.stdout.close()
    assert dask_worker_pids(cluster.scheduler_address) == before  # the Dask workers stay up


def test_bad_address_and_arguments():
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        ClusterController(cluster_targets.loop, address="tcp://127.0.0.1:9", connect_timeout=1).start()
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        ClusterExecutor(address="tcp://127.0.0.1:9", connect_timeout=1)
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="address"):
        ClusterController(cluster_targets.loop)
    with pytest.raises(TypeError, match="cluster"):
        ClusterController(cluster_targets.loop, cluster=object())
    for lease in (float("nan"), -1, 0, float("inf")):  # one message for each
        with pytest.raises(ValueError, match="lease must be a finite number of seconds > 0"):
            ClusterController(cluster_targets.loop, address="tcp://127.0.0.1:9", lease=lease)
    for lease in (0.05, 1e-320):  # shorter than the nodes' beats: every node would be lost at once
        with pytest.raises(ValueError, match="lease must be at least 0.2"):
            ClusterExecutor(address="tcp://127.0.0.1:9", lease=lease)
    with pytest.raises(ValueError, match="workers_per_node"):
        ClusterExecutor(address="tcp://127.0.0.1:9", workers_per_node=0)
    with pytest.raises(TypeError, match="workers_per_node"):  # as ProcessExecutor's max_workers=2.5
        ClusterExecutor(address="tcp://127.0.0.1:9", workers_per_node=2.5)
    for cls in (ClusterController, ClusterExecutor):  # every connect would fail at once (it was taken)
        with pytest.raises(ValueError, match="connect_timeout"):
            cls(*[cluster_targets.loop][:cls is ClusterController], address="tcp://127.0.0.1:9", connect_timeout=0)
    started = time.monotonic()  # a name that does not resolve: said at once (it waited the timeout)
    with pytest.raises(ConnectionError, match="cannot resolve 'no-such-host.invalid'"):
        ClusterExecutor(address="tcp://no-such-host.invalid:8786", connect_timeout=20)
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="initial_state"):
        ClusterController(cluster_targets.loop, address="tcp://127.0.0.1:9", initial_state="x")
    started = time.monotonic()
    for address in ("http://127.0.0.1:8786", "tcp://127.0.0.1:99999", "nonsense", "tcp://127.0.0.1", "local:2"):
        with pytest.raises(ValueError, match=f"address '{address}'"):
            ClusterController(cluster_targets.loop, address=address)
        with pytest.raises(ValueError, match=f"address '{address}'"):
            ClusterExecutor(address=address)
    assert time.monotonic() - started < 2  # at once: no connect


def test_a_resolver_that_fails_for_now_is_left_to_dasks_own_retries(monkeypatch):
    # Only a name that does not exist is refused at once; EAI_AGAIN was too.
    from procctl.cluster import session

    def lookup_fails(error):
        def connect(*args, **kwargs):
            raise socket.gaierror(error, "resolver says no")
        return connect

    monkeypatch.setattr(session.socket, "create_connection", lookup_fails(socket.EAI_AGAIN))
    session._refused_at_once("tcp://sched.example:8786", 1.0)  # (returns: Dask's connect tries again)
    monkeypatch.setattr(session.socket, "create_connection", lookup_fails(socket.EAI_NONAME))
    with pytest.raises(OSError, match="cannot resolve 'sched.example'"):
        session._refused_at_once("tcp://sched.example:8786", 1.0)


def test_a_client_that_trips_on_the_schedulers_first_batch_is_opened_again(cluster, monkeypatch):
    # Dask's client asserts that the scheduler's first batch holds one message;
    # a loaded scheduler may batch two. The connect asks again while time is left.
    from procctl.cluster import session

    calls = []

    def tripping_client(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise AssertionError
        return Client(*args, **kwargs)

    monkeypatch.setattr(session, "Client", tripping_client)
    client = session.connect(cluster.scheduler_address, timeout=30)
    try:
        assert len(calls) == 2 and client.status == "running"
    finally:
        client.close()


@pytest.fixture
def silent_address():
    """An address that accepts TCP connections but never speaks Dask."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock, f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_an_address_that_does_not_speak_dask_is_a_connection_error(silent_address):
    _, address = silent_address
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=address):
        ClusterController(cluster_targets.loop, address=address, connect_timeout=1).start()
    with pytest.raises(ConnectionError, match=address):
        ClusterExecutor(address=address, connect_timeout=1)
    assert time.monotonic() - started < 8  # about connect_timeout each; Dask's own client hangs


@pytest.fixture
def garbage_address():
    """An address that answers every connection with bytes that are not Dask's (which its
    decoder read as an absurd array shape: a ValueError, once taken for a bad address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(30)
        conns = []

        def serve():
            try:
                while True:
                    conn, _ = sock.accept()
                    conns.append(conn)
                    conn.sendall(b"\xff" * 64)
            except OSError:
                pass  # the test is over

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        yield f"tcp://127.0.0.1:{sock.getsockname()[1]}"
        sock.shutdown(socket.SHUT_RDWR)
    server.join(5)
    for conn in conns:
        conn.close()


def test_an_address_that_answers_garbage_is_a_connection_error(garbage_address, tests_dir):
    with pytest.raises(ConnectionError, match=garbage_address) as info:
        ClusterExecutor(address=garbage_address, connect_timeout=2)
    assert "not Dask's protocol" in str(info.value) and "Error" not in str(info.value)  # (no decoder's complaint)
    res = subprocess.run([sys.executable, "-m", "procctl", "run", "--cluster", garbage_address, "--json"],
                         capture_output=True, text=True, timeout=30, cwd=tests_dir)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr


def test_cli_on_an_address_that_does_not_speak_dask(silent_address, tests_dir, tmp_path):
    sock, address = silent_address
    # A SIGTERM while it connects ends it at once (it used to wait for the socket to close).
    (tmp_path / "items").write_text("1\n")
    proc = subprocess.Popen([sys.executable, "-m", "procctl", "map", "cluster_targets:square", "--items",
                             str(tmp_path / "items"), "--cluster", address, "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tests_dir, text=True)
    try:
        sock.settimeout(20)
        check, _ = sock.accept()  # its refusal check
        handshake, _ = sock.accept()  # it waits for the handshake now
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, err = proc.communicate(timeout=15)  # (a bound against a hang; the figure is below)
        took = time.monotonic() - signalled
        check.close()
        handshake.close()
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    assert took < 4, took  # at once, not after the connect's 5 s
    # Left alone, it is the library's ConnectionError (test above): one line, exit 2,
    # as for a port where nothing listens (test_cli_bad_cluster_is_one_line_and_exit_2).


@pytest.mark.parametrize("kwargs, error, says", [
    ({"task_timeout": -1}, ValueError, "task_timeout"),
    ({"task_timeout": float("nan")}, ValueError, "task_timeout"),
    ({"initializer": 3}, TypeError, "initializer"),
    ({"start_method": "bogus"}, ValueError, "start_method"),
    ({"workers_per_node": 10**6}, ValueError, "workers_per_node"),
])
def test_arguments_are_checked_before_connecting(kwargs, error, says):
    # The address would be a ConnectionError: the check comes first.
    with pytest.raises(error, match=says):
        ClusterExecutor(address="tcp://127.0.0.1:9", **kwargs)
    if "start_method" in kwargs or "workers_per_node" in kwargs:
        with pytest.raises(error, match=says):
            ClusterController(cluster_targets.loop, address="tcp://127.0.0.1:9", **kwargs)


def test_a_node_that_cannot_start_says_why(cluster, monkeypatch):
    # Past the client's own check, the node's ProcessController refuses it: its error, not a timeout.
    monkeypatch.setattr("procctl.cluster.controller.check_start_method", lambda method: method, raising=False)
    with pytest.raises(WorkerStartError, match="ValueError: start_method must be one of"):
        ClusterController(cluster_targets.loop, 1, cluster=cluster, start_method="bogus").start()


@pytest.mark.parametrize("args, says", [
    (["--cluster", "tcp://127.0.0.1:9"], "127.0.0.1:9"),
    (["--cluster", "ws://127.0.0.1:9"], "ws://127.0.0.1:9"),
    (["--cluster", "nonsense"], "nonsense"),
    (["--cluster", "local:0"], "local:0"),
    (["--cluster", "local:1", "--lease", "nan"], "--lease"),
    (["--cluster", "local:1", "--lease", "0"], "--lease"),
    (["--cluster", "local:1", "--lease", "0.001"], "--lease must be at least 0.2"),
    (["--cluster", "local:1", "--lease", "inf"], "--lease"),
    (["--lease", "5"], "--lease works with --cluster"),
    (["--cluster", "http://127.0.0.1:8786"], "'http'"),
    (["--cluster", "tcp://127.0.0.1:99999"], "99999"),
    (["--workers-per-node", "3"], "--workers-per-node works with --cluster"),
    (["--cluster", "local:1", "--workers-per-node", "100000"], "--workers-per-node 100000:"),
    (["--cluster", "local:1", "--restart", "always"], "not with --cluster"),
    (["--cluster", "local:1", "--backoff", "1,2"], "--backoff goes with --restart"),  # (once accepted, no effect)
    (["--cluster", "local:1", "--strategy", "one_for_all"], "--strategy goes with --restart"),
])
def test_cli_bad_cluster_is_one_line_and_exit_2(args, says):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "procctl", "run"] + args,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr, proc.stderr
    assert proc.stdout == ""  # (no run was announced: it never began)
    if {"tcp://127.0.0.1:9", "ws://127.0.0.1:9", "http://127.0.0.1:8786"} & set(args):  # at once, not at the timeout
        assert time.monotonic() - started < 8, "a refused connection waited for the timeout (10 s)"
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("command, says", [
    (["run", "--cluster", "local:1", "--lease", "nan"], "--lease"),
    (["run", "--cluster", "tcp://127.0.0.1:9", "--restart", "always"], "not with --cluster"),
    (["map", "maptargets:square", "--cluster", "local:2", "--joblog", "/no/such/dir/log"], "--joblog"),
])
def test_cli_refuses_cluster_options_before_it_imports_dask(tmp_path, command, says):
    # A distributed that cannot be imported: the option's own error comes first
    # (it came after Dask's import, a second of the command's time, and here its error).
    (tmp_path / "distributed").mkdir()
    (tmp_path / "distributed" / "__init__.py").write_text("raise ImportError('no Dask in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(__file__)])}
    proc = subprocess.run([sys.executable, "-m", "procctl", *command], capture_output=True, text=True,
                          input="1\n", env=env, timeout=30)
    assert proc.returncode == 2 and says in proc.stderr and "Dask" not in proc.stderr, proc.stderr


def test_cli_local_cluster():
    proc = subprocess.run([sys.executable, "-m", "procctl", "run", "--cluster", "local:2", "--workers-per-node", "1",
                           "--target", "cluster_targets:loop", "--schedule", "run,pause,run,stop", "--step", "0.2",
                           "--json"], capture_output=True, text=True, timeout=45,
                          cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[-1]["event"] == "summary" and lines[-1]["outcomes"] == {"stopped": 2}
    assert len({r["node"] for r in lines if r.get("event") == "running"}) == 2
    assert "WARNING" not in proc.stderr  # Dask's own, as its cluster closes: not the run's


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_local_cluster_stops_gracefully_on_a_group_signal(tests_dir, sig, code):
    # The Dask workers of local:N are in the command's process group: the
    # signal reaches them too, and must not take the run's workers with them.
    proc = subprocess.Popen([sys.executable, "-m", "procctl", "run", "--cluster", "local:2",
                             "--workers-per-node", "1", "--target", "cluster_targets:loop", "--schedule", "run",
                             "--step", "0", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tests_dir, text=True, start_new_session=True)
    try:
        pids = set()
        while len(pids) < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            event = json.loads(line)
            if event["event"] == "running":
                pids.add(event["pid"])
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
    assert proc.returncode == code, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["outcomes"] == {"stopped": 2}, out
    assert "Traceback" not in err and "ERROR" not in err, err
    assert still_running(sorted(pids), timeout=5) == []


def test_import_procctl_loads_no_dask():
    code = ("import sys, procctl, procctl.cli; procctl.ProcessController; procctl.ProcessExecutor;"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    code = "import sys; sys.modules['distributed'] = None; import procctl.cluster"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "pip install 'procctl[dask]'" in proc.stderr


def test_workers_that_end_during_the_start_are_reported(cluster):
    """A worker that ends while its node is still starting the others: its report
    reaches the client (it was dropped when it came before the node's HELLO)."""
    with ClusterController(cluster_targets.crash_at_once, 3, cluster=cluster, lease=5,
                           initial_state=State.RUNNING) as cc:
        assert cc.wait(timeout=45)  # a bound against a hang
        reports = cc.stop()
    assert len(reports) == 6
    assert {r.outcome for r in reports.values()} == {Outcome.CRASHED}
    assert {r.exitcode for r in reports.values()} == {3}


def test_a_wakeup_while_another_thread_holds_the_lock_still_wakes_the_wait(cluster):
    # A signal's wakeup can come while the keeper or a send holds the lock for
    # a moment: it must still reach the wait, not wait for the next message of
    # a node (a quarter of the lease: 15 s here).
    with ClusterController(cluster_targets.loop, 1, cluster=cluster, lease=60) as cc:
        assert not cc._woken
        waiting, woken = threading.Event(), threading.Event()

        def wait() -> None:
            with cc.cond:
                waiting.set()
                if cc.cond.wait_for(lambda: cc._woken, 30):
                    woken.set()

        waiter = threading.Thread(target=wait)
        waiter.start()
        assert waiting.wait(10)
        with cc.cond:  # taken only once the waiter waits (and let go of it)
            waker = threading.Thread(target=cc.wakeup)
            waker.start()
            waker.join(10)  # it could not take the lock: we hold it
        assert woken.wait(5)
        waiter.join(10)
        cc.stop(grace=5)


class _Commands:
    """A node's command queue that hands out what the client put, in the order given."""

    def __init__(self, commands):
        self.items = [encode(c) for c in commands]

    def get(self):
        if not self.items:
            raise ConnectionError("the test's queue is empty")  # ends serve()
        return self.items.pop(0)


class _Said:
    def __init__(self):
        self.said = []

    def say(self, kind, seq=0, body=None):
        self.said.append((kind, seq))


class _RecordingAgent(Agent):
    def __init__(self, commands):  # no Dask: what serve() uses
        self._setup(types.SimpleNamespace(node=0, beat=60.0, lease=60.0), _Commands(commands), _Said())
        self.applied = []

    def apply(self, cmd):
        self.applied.append(cmd.seq)
        return cmd.seq

    def lease_lost(self):
        pass


def test_an_agent_applies_a_command_that_overtook_another_once_each():
    # Two threads of the client (a dispatch, a shutdown's CANCEL) put their commands
    # in either order: a high-water mark dropped the lower one as a duplicate, and a
    # shutdown(wait=True) then waited for ever on the tasks it carried.
    agent = _RecordingAgent([Command(2, Op.STATUS), Command(1, Op.STATUS), Command(2, Op.STATUS)])
    agent.serve()
    assert agent.applied == [2, 1]
    assert [seq for kind, seq in agent.outbox.said if kind is Up.ACK] == [2, 1, 2]  # the copy answered again


def test_status_from_another_shell_names_each_workers_node(cluster, tests_dir, tmp_path):
    """`procctl status --json` on a cluster run gives each worker's node, as
    status() does; `procctl scale` is refused in plain words."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    run = subprocess.Popen([sys.executable, "-m", "procctl", "run", "--cluster", cluster.scheduler_address,
                            "--workers-per-node", "1", "--lease", str(LEASE), "--target", "cluster_targets:loop",
                            "--schedule", "run", "--step", "0", "--json", "--name", "spread"],
                           stdout=subprocess.PIPE, cwd=tests_dir, text=True, env=env)
    try:
        for line in run.stdout:  # until both workers run
            if json.loads(line).get("event") == "running" and json.loads(line).get("worker") == 1:
                break
        ctl = [sys.executable, "-m", "procctl"]
        status = subprocess.run(ctl + ["status", "spread", "--json"], capture_output=True, text=True,
                                timeout=30, env=env)
        assert status.returncode == 0, status.stderr
        workers = json.loads(status.stdout)["workers"]
        assert sorted(w["node"] for w in workers) == sorted(cluster.scheduler_info["workers"]), workers
        scale = subprocess.run(ctl + ["scale", "spread", "3"], capture_output=True, text=True, timeout=30, env=env)
        assert scale.returncode == 1 and "run run" not in scale.stderr
        assert "procctl run --cluster keeps the number of workers it started with" in scale.stderr, scale.stderr
        stop = subprocess.run(ctl + ["stop", "spread"], capture_output=True, text=True, timeout=60, env=env)
        assert stop.returncode == 0, stop.stderr
        assert run.wait(30) == 0
    finally:
        if run.poll() is None:
            run.terminate()  # (a graceful stop: killed, it would leave the nodes' workers for the lease)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(30)
        run.kill()
        run.wait(10)
        run.stdout.close()
