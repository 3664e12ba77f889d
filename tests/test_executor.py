"""ProcessExecutor: stdlib Executor semantics, crashes that cost one task, pause, stop accounting."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import workplane_targets as t
from procs import still_running

from procctl import ProcessExecutor, TaskTimeout, Unfinished, WorkerCrashed
from procctl.worker_plane import RETURN_SIGNAL


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_submit_map_in_order_and_context(start_method):
    with ProcessExecutor(2, start_method=start_method) as ex:
        assert isinstance(ex, cf.Executor)
        assert ex.submit(t.add, 2, b=3).result(10) == 5
        assert list(ex.map(t.square, range(50), chunksize=1)) == [x * x for x in range(50)]
        assert list(ex.map(t.square, range(1000))) == [x * x for x in range(1000)]
        assert list(ex.map(t.add, range(5), range(5), chunksize=2)) == [0, 2, 4, 6, 8]
        facts = [f.result(10) for f in [ex.submit(t.context_facts, i) for i in range(8)]]
    assert {wid for wid, _, _ in facts} <= {0, 1}
    assert {n for _, n, _ in facts} == {2}


def test_exception_carries_worker_traceback_and_is_not_retried():
    with ProcessExecutor(2, retries=3) as ex:
        fut = ex.submit(t.boom, 7)
        with pytest.raises(ValueError, match="bad 7") as info:
            fut.result(10)
        assert "in boom" in str(info.value.__cause__)
        assert ex.counts().failed == 1


def test_shutdown_semantics_match_the_stdlib():
    for cls in (cf.ProcessPoolExecutor, ProcessExecutor):
        ex = cls(1)
        first = ex.submit(t.sleep_for, 0.3)
        rest = [ex.submit(t.square, i) for i in range(50)]
        ex.shutdown(wait=True, cancel_futures=True)
        assert first.result() == 0.3, cls
        assert any(f.cancelled() for f in rest), cls
        assert all(f.done() for f in rest), cls
        with pytest.raises(RuntimeError):
            ex.submit(t.square, 1)
        ex2 = cls(2)
        futs = [ex2.submit(t.square, i) for i in range(20)]
        ex2.shutdown(wait=False)
        assert [f.result(10) for f in futs] == [i * i for i in range(20)], cls
        ex2.shutdown(wait=True)


def _quick_then_slow(ex, quick=3000, slow=200, seconds=0.1):
    """Quick tasks (each worker's window grows to its quick size), then slow ones."""
    quick_futs = [ex.submit(t.square, i) for i in range(quick)]
    slow_futs = [ex.submit(t.sleep_for, seconds) for _ in range(slow)]
    cf.wait(quick_futs, timeout=60)
    return slow_futs


def test_slow_tasks_after_quick_ones_are_not_held_by_the_workers():
    # The window a worker holds while tasks are quick (dozens) shrinks once a
    # slow task runs at its head: the tasks sent behind it come back, pending
    # again (not running, cancellable), as the stdlib's hold about one extra.
    workers = 2
    with ProcessExecutor(workers, start_method="fork") as ex:
        slow = _quick_then_slow(ex)
        slow[2 * workers].result(timeout=30)  # slow ones have run on every worker
        left = [f for f in slow if not f.done()]
        assert sum(f.running() for f in left) <= 2 * workers
        assert all(f.cancel() for f in left[-50:])
        ex.shutdown(cancel_futures=True)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_quick_tasks_behind_a_slow_one_run_on_the_idle_worker_meanwhile(start_method):
    # Quick tasks a worker had read behind a slow one waited for it (23 of 700 for the
    # 3 s it ran) while the other worker sat idle; ProcessPoolExecutor runs them at once.
    # The worker's thread that gives them back is signalled alone: a thread the
    # initializer left (or numpy's) must not take the signal, which would kill the worker.
    ex = ProcessExecutor(2, start_method=start_method, initializer=t.start_idle_thread)
    try:
        assert list(ex.map(t.square, range(1000), chunksize=1))[-1] == 999 ** 2  # windows are quick
        quick = [ex.submit(t.square, i) for i in range(200)]
        slow = ex.submit(t.sleep_for, 60)
        quick += [ex.submit(t.square, i) for i in range(500)]
        done, waiting = cf.wait(quick, timeout=20)
        assert not waiting and slow.running()
        assert all(f.exception() is None for f in quick)
        # Nor do a task and what it starts inherit the signal blocked.
        assert RETURN_SIGNAL not in ex.submit(t.blocked_signals, 0).result(timeout=20)
    finally:
        ex.kill()
        ex.stop(grace=0)


def test_shutdown_cancel_futures_cancels_what_the_workers_hold_unstarted():
    workers = 2
    with ProcessExecutor(workers, start_method="fork") as ex:
        # (0.5 s tasks: the count below and the shutdown's landing are two thread
        # handoffs apart; with 0.1 s ones a stall there let two more complete.)
        slow = _quick_then_slow(ex, seconds=0.5)
        slow[0].result(timeout=30)
        done_before = sum(f.done() for f in slow)
        t0 = time.monotonic()
        ex.shutdown(wait=True, cancel_futures=True)
        took = time.monotonic() - t0
        ran = sum(not f.cancelled() for f in slow)
        assert all(f.done() for f in slow)
    # What ran: what was done, and at most the task each worker ran and the one it held.
    assert ran <= done_before + 2 * workers, (ran, done_before)
    assert took < 10 * 0.5 + 5  # a bound against a hang (it held dozens of the slow tasks before)
    assert ex.counts().cancelled == len(slow) - ran


def test_shutdown_cancel_futures_does_not_start_the_next_task_a_busy_worker_holds(tmp_path):
    import select

    workers = 2
    fifo, gate = str(tmp_path / "begun"), str(tmp_path / "gate")
    os.mkfifo(fifo)
    os.mkfifo(gate)
    told = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # (opening never blocks the tasks' opens)
    release = os.open(gate, os.O_RDWR | os.O_NONBLOCK)
    try:
        with ProcessExecutor(workers, start_method="fork") as ex:
            # The begun tasks end only once the test says so: no clock decides
            # whether the shutdown came before a worker started what it held.
            futs = [ex.submit(t.tell_then_hold, fifo, gate) for _ in range(12)]
            try:
                begun = b""
                while len(begun) < workers:  # each worker has begun its first (and holds the next)
                    assert select.select([told], [], [], 30)[0], "the tasks never began"
                    begun += os.read(told, 16)
                ex.shutdown(wait=False, cancel_futures=True)
                _, not_done = cf.wait(futs[workers:], timeout=30)  # (a cancelled future is done)
            finally:
                os.write(release, b"go")  # only now may the begun tasks end
            assert not not_done, [i for i, f in enumerate(futs) if not f.done()]
    finally:
        os.close(told)
        os.close(release)
    ran = [i for i, f in enumerate(futs) if not f.cancelled()]
    assert ran == list(range(workers)), ran  # the next one each held was not started after the shutdown


def test_a_future_cancelled_in_the_queue_is_counted_at_once():
    with ProcessExecutor(1, start_method="fork") as ex:
        futs = [ex.submit(t.sleep_for, 0.2) for _ in range(20)]
        assert futs[-1].cancel()
        counts = ex.counts()
        assert counts.cancelled == 1, counts  # it stayed queued until the manager met it
        assert counts.cancelled + counts.queued + counts.running + counts.completed == 20
        ex.shutdown(cancel_futures=True)


@pytest.mark.parametrize("chunksize", [1, 5])
def test_items_that_ran_after_map_ended_early_count_as_completed(chunksize, tmp_path):
    # map() ends at item 3's error; the items its workers already held run
    # on (a running future is not cancelled, as with the stdlib's map): they
    # count as completed, each with its task-done event, not as cancelled.
    events = []
    with ProcessExecutor(max_workers=2, start_method="fork", on_event=events.append) as ex:
        with pytest.raises(ValueError):
            list(ex.map(t.touch_unless, range(10), [str(tmp_path)] * 10, [3] * 10, chunksize=chunksize))
        ex.shutdown(wait=True)
        counts = ex.counts()
    ran = len(os.listdir(tmp_path))
    assert counts.completed == ran
    assert sum(e.event == "task-done" for e in events) == ran
    assert counts.completed + counts.failed + counts.cancelled == counts.submitted == 10


def test_pause_timeout_names_the_workers_that_did_not_acknowledge():
    with ProcessExecutor(max_workers=2, start_method="fork") as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        pid = next(s.pid for s in ex.status() if s.worker_id == 1)
        os.kill(pid, signal.SIGSTOP)  # it cannot answer
        try:
            with pytest.raises(TimeoutError, match=r"workers \[1\] did not acknowledge PAUSED within 0.2s"):
                ex.pause(timeout=0.2)
        finally:
            os.kill(pid, signal.SIGCONT)
        ex.resume(timeout=30)
        assert ex.submit(abs, -2).result(timeout=30) == 2


def test_status_totals_add_up_after_a_worker_crashed():
    # The replaced worker's tally goes on, and the task that crashed it counts.
    with ProcessExecutor(max_workers=2, start_method="fork") as ex:
        assert list(ex.map(abs, range(20))) == list(range(20))
        futures = [ex.submit(t.exit_at, i, 5) for i in range(20)]
        cf.wait(futures, timeout=60)
        assert isinstance(futures[5].exception(), WorkerCrashed)
        counts = ex.counts()
        rows = ex.status()
    assert (counts.submitted, counts.completed, counts.failed) == (40, 39, 1)
    assert sum(r.done for r in rows) == sum(r.total for r in rows) == 40


def test_a_paused_pool_counts_no_task_running():
    # The tasks its workers hold wait at their checkpoint: queued, not running.
    with ProcessExecutor(max_workers=2, start_method="fork") as ex:
        futures = [ex.submit(time.sleep, 0.2) for _ in range(12)]
        ex.pause(timeout=30)  # acknowledged once the two running tasks end
        counts = ex.counts()
        assert counts.running == 0, counts
        assert counts.queued == 12 - counts.completed > 0
        assert not any(f.done() for f in futures[4:])
        ex.resume(timeout=30)
        cf.wait(futures, timeout=60)
        assert ex.counts().completed == 12


def test_map_timeout_raises_timeout_error_and_as_completed_wait_work():
    with ProcessExecutor(2) as ex:
        it = ex.map(t.sleep_for, [0.0, 5.0], timeout=0.3, chunksize=1)
        assert next(it) == 0.0
        with pytest.raises(cf.TimeoutError):
            next(it)
        futs = [ex.submit(t.square, i) for i in range(10)]
        assert sorted(f.result() for f in cf.as_completed(futs, timeout=10)) == [i * i for i in range(10)]
        done, not_done = cf.wait(futs, timeout=10)
        assert len(done) == 10 and not not_done
        ex.stop(grace=0)


@pytest.mark.parametrize("start_method, how", [("fork", "exit"), ("fork", "sigkill"), ("fork", "timeout"),
                                               ("spawn", "sigkill")])
def test_a_crash_costs_one_task_and_the_pool_goes_on(start_method, how):
    # A task_timeout only where it is the crash under test: on a loaded machine a
    # trivial task can wait a second for a CPU, and would time out too.
    with ProcessExecutor(2, start_method=start_method, task_timeout=2.0 if how == "timeout" else None) as ex:
        before = [ex.submit(t.square, i) for i in range(10)]
        bad = {"exit": lambda: ex.submit(t.exit_now, 3),
               "sigkill": lambda: ex.submit(t.sigkill_self, 0),
               "timeout": lambda: ex.submit(t.sleep_for, 30)}[how]()
        after = [ex.submit(t.square, i) for i in range(10, 30)]
        assert [f.result(20) for f in before + after] == [i * i for i in range(30)]
        expected = TaskTimeout if how == "timeout" else WorkerCrashed
        with pytest.raises(expected) as info:
            bad.result(20)
        if how == "exit":
            assert "code 3" in str(info.value)
        elif how == "sigkill":
            assert "SIGKILL" in str(info.value)
        assert ex.submit(t.square, 9).result(20) == 81  # the pool is still usable
        assert len({ex.submit(t.pid_of, i).result(20) for i in range(6)}) >= 1


def test_task_timeout_stops_when_the_function_returns():
    """The clock of a task stops when its function returns: a result that takes
    longer than task_timeout to pickle and send is no timeout (its worker was
    killed after the function had returned, and the next task blamed)."""
    import targets_supervision as ts

    with ProcessExecutor(2, start_method="fork", task_timeout=0.3) as ex:
        futures = [ex.submit(ts.slow_to_pickle, 0.6) for _ in range(4)]
        assert [f.result(timeout=60) for f in futures] == ["pickled"] * 4


def test_task_timeout_counts_from_when_the_worker_is_up():
    # The first task is sent while the worker is still in its initializer:
    # that time is the worker's, not the task's.
    # (1 s: a trivial task can wait most of a second for a CPU on a loaded machine.)
    with ProcessExecutor(1, task_timeout=1.0, initializer=t.sleep_for, initargs=(2.0,)) as ex:
        assert ex.submit(t.square, 3).result(20) == 9
        with pytest.raises(TaskTimeout):
            ex.submit(t.sleep_for, 30).result(20)  # once up, the timeout holds


@pytest.mark.parametrize("task", ["never_checkpoints", "checkpoints"])
def test_a_pause_stops_the_clock_of_a_paused_task_only(tmp_path, task):
    # A task that never reaches a checkpoint does not pause: its task_timeout runs on
    # (a pending pause kept it from ever timing out, and the pause from ever being
    # acknowledged). One paused at a checkpoint is not late for the time it was paused.
    import select

    fifo = str(tmp_path / "begun")
    os.mkfifo(fifo)
    told = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # (the task's open never waits; a bounded wait here)
    try:
        # 1.5 s of work: the pause has that long to land (0.5 s was a stall's worth under load).
        with ProcessExecutor(1, task_timeout=2.0) as ex:
            if task == "never_checkpoints":
                fut = ex.submit(t.tell_then_sleep, fifo, 60)
            else:
                fut = ex.submit(t.tell_then_work, fifo, 1.5)
            assert select.select([told], [], [], 30)[0], "the task never began"
            started = time.monotonic()
            ex.pause(timeout=20)  # acknowledged: the task paused, or timed out and its worker was replaced
            if task == "never_checkpoints":
                with pytest.raises(TaskTimeout):
                    fut.result(0)
                assert time.monotonic() - started < 10
            else:
                with pytest.raises(cf.TimeoutError):
                    fut.result(timeout=2.5)  # paused for longer than its task_timeout: neither done nor timed out
                ex.resume(timeout=20)
                assert fut.result(20) == 1.5  # not a TaskTimeout: the paused time was not its
    finally:
        os.close(told)


def test_a_task_sent_on_resume_is_not_given_the_pause_as_time():
    # Its worker was paused idle; the task came with the resume. Its task_timeout
    # counts from then: the pause before it is not its time (it once was, 4.5 s for 0.5 s).
    with ProcessExecutor(1, task_timeout=0.5) as ex:
        assert ex.submit(t.square, 2).result(20) == 4  # the worker is up
        ex.pause(timeout=20)
        fut = ex.submit(t.sleep_for, 60)
        with pytest.raises(cf.TimeoutError):
            fut.result(timeout=5)  # paused: it does not start (5 s: ten times its timeout)
        resumed = time.monotonic()
        ex.resume(timeout=20)
        with pytest.raises(TaskTimeout):
            fut.result(30)
        assert time.monotonic() - resumed < 4.5, "the pause was counted as the task's time"

def test_sigkill_from_outside_mid_task_fails_that_task_only(tmp_path):
    fifo = str(tmp_path / "pid")
    os.mkfifo(fifo)
    ex = ProcessExecutor(2)
    try:
        victim = ex.submit(t.pid_then_until_stopped, fifo)
        others = [ex.submit(t.context_facts, i) for i in range(20)]
        facts = [f.result(20) for f in others]  # none waits behind the endless one
        assert len(facts) == 20
        with open(fifo) as fh:  # the victim has started, in this process
            pid = int(fh.read())
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            victim.result(20)
        assert ex.submit(t.square, 3).result(20) == 9
    finally:
        ex.stop(grace=0)


def test_retries_run_a_crashed_task_again(tmp_path):
    marker = str(tmp_path / "m")
    with ProcessExecutor(2, retries=1) as ex:
        assert ex.submit(t.crash_first_time, marker).result(20) == "ok"
    with ProcessExecutor(1, retries=2) as ex:
        with pytest.raises(WorkerCrashed):
            ex.submit(t.exit_now, 1).result(30)  # crashes three times: given up


def test_initializer_max_tasks_per_worker_and_broken_initializer(tmp_path):
    with ProcessExecutor(2, initializer=t.init_flag, initargs=("set",), max_tasks_per_worker=3) as ex:
        assert ex.submit(t.read_flag, 0).result(10) == "set"
        pids = [f.result(20) for f in [ex.submit(t.pid_of, i) for i in range(12)]]
    assert len(set(pids)) >= 4  # each worker is replaced after three tasks
    with ProcessExecutor(1, max_tasks_per_child=3) as ex:  # map too: one worker ran all 9 (chunks of 3)
        pids = list(ex.map(t.pid_of, range(9)))
    assert [pids.count(p) for p in dict.fromkeys(pids)] == [3, 3, 3]
    ex = ProcessExecutor(1, initializer=t.init_fails)
    with pytest.raises(cf.BrokenExecutor, match="initializer"):
        ex.submit(t.square, 2).result(20)  # the submit, or the future, says so
    with pytest.raises(cf.BrokenExecutor):
        ex.submit(t.square, 2)
    ex.shutdown()


def test_pause_with_a_backlog_starts_no_task():
    with ProcessExecutor(2) as ex:
        futs = [ex.submit(t.started_at, i) for i in range(20_000)]
        t0 = time.monotonic()
        ex.pause()
        paused_at = time.monotonic()
        assert paused_at - t0 < 5
        done_then = sum(f.done() for f in futs)
        time.sleep(0.3)  # a window in which nothing may start
        assert sum(f.done() for f in futs) <= done_then + 2 * 2  # only those already in flight
        c = ex.counts()  # what two workers hold is not all running: one each at most
        assert c.running <= 2 and c.completed + c.running + c.queued == c.submitted == 20_000
        ex.resume()
        started = [f.result(60)[1] for f in futs[-10:]]
        assert min(started) > paused_at
        left = ex.stop(grace=1)
    assert isinstance(left, Unfinished)


def _check_stop_accounting(ex, futs, left, items=None):
    if items is not None:  # handed back in submission order (a retry or a window given back goes
        place = {x: i for i, x in enumerate(items)}  # first in line again: not in the queue's order)
        assert [place[x] for x in left.items] == sorted(place[x] for x in left.items)
    completed = sum(1 for f in futs if f.done() and not f.cancelled() and f.exception() is None)
    failed = sum(1 for f in futs if f.done() and not f.cancelled() and f.exception() is not None)
    assert all(f.done() for f in futs)
    assert completed + failed + len(left.items) == len(futs)
    assert sorted(left.items) == sorted(set(left.items))  # each once
    assert set(left.running) <= set(left.items)
    assert all(f.cancelled() for f in left.futures)
    results = {f.result() for f in futs if f.done() and not f.cancelled() and f.exception() is None}
    assert not results & set(left.items)


def test_stop_accounting_under_random_timing():
    rng = random.Random(8)
    for _ in range(50):
        ex = ProcessExecutor(2, retries=rng.choice([0, 1]))
        # (a negative one crashes its worker)
        items = [rng.choice([0.0, 0.0, 0.001, 0.01, -1]) + i * 1e-9 for i in range(rng.randint(0, 30))]
        futs = [ex.submit(t.random_task, x) for x in items]
        time.sleep(rng.choice([0, 0.001, 0.01, 0.03]))
        left = ex.stop(grace=rng.choice([0, 0.01, 1]))
        _check_stop_accounting(ex, futs, left, items)


def test_stop_hands_back_running_items_and_queued_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKPLANE_STARTED_DIR", str(tmp_path))
    ex = ProcessExecutor(2)
    long = [ex.submit(t.until_stopped, i) for i in range(2)]
    queued = [ex.submit(t.square, i) for i in range(100, 110)]
    end = time.monotonic() + 20
    while len(os.listdir(tmp_path)) < 2 and time.monotonic() < end:  # both have started
        time.sleep(0.01)
    # As ProcessPoolExecutor's: a task on its way is running and cannot be cancelled.
    assert all(f.running() for f in long) and not long[0].cancel()
    assert queued[-1].cancel() and not queued[-1].running()
    left = ex.stop(grace=2)
    assert sorted(left.running) == [0, 1]
    assert sorted(left.items) == [0, 1] + list(range(100, 110))
    assert all(f.cancelled() for f in long + queued)
    # wait() and as_completed() see the cancelled futures at once.
    done, not_done = cf.wait(long + queued, timeout=5)
    assert not not_done
    assert len(list(cf.as_completed(long + queued, timeout=5))) == 12
    with pytest.raises(RuntimeError):
        ex.submit(t.square, 1)


@pytest.mark.parametrize("chunksize", [1, None])
def test_task_events_status_and_counts_are_per_item(chunksize):
    events = []
    with ProcessExecutor(2, on_event=events.append) as ex:
        list(ex.map(t.square, range(40), chunksize=chunksize))  # None: chunks of 5
        status = ex.status()
        counts = ex.counts()
    assert sum(s.done for s in status) == 40
    assert sum(1 for e in events if e.event == "task-done") == 40
    assert (counts.submitted, counts.completed, counts.queued, counts.running) == (40, 40, 0, 0)


def test_task_timeout_is_per_item_in_a_map_chunk():
    with ProcessExecutor(1, task_timeout=1.0) as ex:
        # One chunk of 50 items of 30 ms: longer than the timeout, each item far shorter;
        # after 2000 quick items, in one block of the chunk's (blocks grow while quick).
        items = [0.0] * 5000 + [0.03] * 50
        assert list(ex.map(t.nap, items, chunksize=len(items))) == items
        with pytest.raises(TaskTimeout):
            list(ex.map(t.sleep_for, [0.01, 30], chunksize=2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_workers"):
        ProcessExecutor(0)
    with pytest.raises(ValueError, match="retries"):
        ProcessExecutor(1, retries=-1)
    with pytest.raises(ValueError, match="task_timeout"):
        ProcessExecutor(1, task_timeout=float("nan"))
    with pytest.raises(ValueError, match="grace"):
        ProcessExecutor(1, grace=-1)
    with pytest.raises(TypeError, match="grace"):  # a wrong type is a TypeError, as ProcessController's
        ProcessExecutor(1, grace="5")
    with pytest.raises(TypeError, match="initargs"):
        ProcessExecutor(1, initargs=5)
    with pytest.raises(TypeError, match="initargs"):  # not ('a', 'b')
        ProcessExecutor(1, initializer=t.init_flag, initargs="ab")
    with pytest.raises(TypeError, match="on_event"):
        ProcessExecutor(1, on_event=5)
    with pytest.raises(ValueError, match="max_workers"):
        ProcessExecutor(10**9)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        ProcessExecutor(1, max_tasks_per_child=0)
    # A wrong type is a TypeError, as the stdlib's (they were ValueErrors).
    for kwargs, name in (({"max_workers": 2.5}, "max_workers"), ({"max_workers": "2"}, "max_workers"),
                         ({"max_workers": 1, "max_tasks_per_child": 1.5}, "max_tasks_per_child"),
                         ({"max_workers": 1, "retries": 0.5}, "retries")):
        with pytest.raises(TypeError, match=name):
            ProcessExecutor(**kwargs)
    with pytest.raises(TypeError, match="mp_context"):
        ProcessExecutor(1, mp_context="fork")
    with ProcessExecutor(1, task_timeout=10**400) as ex:  # beyond any float: no limit, as inf
        assert ex.task_timeout is None
        with pytest.raises(ValueError, match="chunksize"):
            ex.map(t.square, [1], chunksize=0)
        with pytest.raises(TypeError, match="chunksize"):
            ex.map(t.square, [1], chunksize="2")
        assert list(ex.map(t.square, range(5), chunksize=10**400)) == [0, 1, 4, 9, 16]  # one chunk
        with pytest.raises(ValueError, match="timeout"):
            ex.map(t.square, [1], timeout=float("nan"))
        assert list(ex.map(t.square, [3], timeout=float("inf"))) == [9]
        assert list(ex.map(t.square, [4], timeout=1e12)) == [16]
        for bad in (float("nan"), -1):
            with pytest.raises(ValueError, match="timeout"):
                ex.pause(timeout=bad)
        ex.pause(timeout=float("inf"))  # no limit, and a huge one is that long
        ex.resume(timeout=1e300)


def test_manager_sigkill_during_map_leaves_no_orphans(tmp_path):
    script = tmp_path / "m.py"
    script.write_text(textwrap.dedent(f"""
        import sys, os
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import workplane_targets as t
        from procctl import ProcessExecutor
        ex = ProcessExecutor(3)
        it = ex.map(t.sleep_for, [0.05] * 10000, chunksize=1)
        next(it)
        print(" ".join(map(str, ex._pool._pc.pids())), flush=True)
        for _ in it:
            pass
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 3
        proc.kill()
        proc.wait(10)
        assert still_running(pids, timeout=5) == []
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


CTRL_C_SCRIPT = """
import atexit, sys, time
from procctl import ProcessExecutor

# Runs just before procctl's exit hook (atexit: last registered, first run).
atexit.register(lambda: print("exiting", file=sys.stderr, flush=True))

def stuck(_):
    while True:
        time.sleep(0.5)  # never looks at a checkpoint

def said_stop(event):
    if event.event == "broadcast" and event.state == "stopped":
        print("stopping", file=sys.stderr, flush=True)

ex = ProcessExecutor(2, grace=float(sys.argv[1]), start_method="fork",
                     on_event=said_stop)  # never shut down: the exit hook's
futures = [ex.submit(stuck, i) for i in range(3)]
print(" ".join(str(s.pid) for s in ex.status()), flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def _script(tmp_path, text, *args):
    """A script that prints its executor's 2 worker pids, in a session of its
    own (Ctrl-C reaches its whole group); killed with its group if still there."""
    script = tmp_path / "script.py"
    script.write_text(text)
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        yield proc, pids
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)


WITH_CTRL_C_SCRIPT = """
import sys, time
from procctl import ProcessExecutor

def stuck(_):
    while True:
        time.sleep(0.5)  # never looks at a checkpoint

def said_stop(event):
    if event.event == "broadcast" and event.state == "stopped":
        print("stopping", file=sys.stderr, flush=True)

with ProcessExecutor(2, grace=60.0, start_method="fork", on_event=said_stop) as ex:
    futures = [ex.submit(stuck, i) for i in range(4)]
    print(" ".join(str(s.pid) for s in ex.status()), flush=True)
    time.sleep(60)
"""


def test_a_second_ctrl_c_while_the_with_block_stops_ends_the_script(tmp_path):
    # The first Ctrl-C leaves the block: a stop with its grace (60 s); the
    # second kills the workers and the script ends, at once. The exit hook's
    # own stop of the same executor once waited for ever for an answer.
    t0 = time.monotonic()
    with _script(tmp_path, WITH_CTRL_C_SCRIPT) as (proc, pids):
        os.killpg(proc.pid, signal.SIGINT)
        said = proc.stderr.readline()
        assert said == "stopping\n", said
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == -signal.SIGINT, err
    assert time.monotonic() - t0 < 20
    assert still_running(pids, timeout=5) == []


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_ends_a_script_whose_executor_runs_endless_tasks(tmp_path, presses):
    # The workers ignore SIGINT (the manager decides): a script ended by Ctrl-C
    # stops its executor's tasks at exit (grace, then SIGTERM) instead of waiting
    # for them as shutdown(wait=True) does, and a second Ctrl-C kills them at once.
    grace = 1.0 if presses == 1 else 60.0  # the second press must not wait it out
    t0 = time.monotonic()
    with _script(tmp_path, CTRL_C_SCRIPT, str(grace)) as (proc, pids):
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C on a terminal: the whole group
        said = ""
        if presses == 2:  # once procctl's exit hook has begun to wait out the grace
            while not said.endswith("stopping\n"):
                line = proc.stderr.readline()
                assert line, said
                said += line
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        err = said + err
    assert proc.returncode == -signal.SIGINT, err
    assert time.monotonic() - t0 < 30
    # The script's own traceback, its exit hook's line, then procctl's stop. (A worker
    # slow to die of the SIGTERM on a loaded machine adds the escalation's warning.)
    err = "".join(line for line in err.splitlines(keepends=True) if "ignored SIGTERM: sent SIGKILL" not in line)
    assert err.count("Traceback") == 1 and err.endswith("KeyboardInterrupt\nexiting\nstopping\n"), err
    assert still_running(pids, timeout=5) == []
