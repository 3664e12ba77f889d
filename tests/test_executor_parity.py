"""ProcessExecutor against concurrent.futures' less obvious guarantees: callbacks
that call the executor, references the map iterator lets go of, results that
cannot be unpickled, an executor dropped without shutdown()."""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import workplane_targets as t
from procs import still_running

from procctl import ProcessExecutor, TaskTimeout, WorkerCrashed

HERE = os.path.dirname(__file__)

# Done callbacks and on_event run in the executor's manager thread: a call
# there that waits for the manager would wait for itself. Run in a child
# process, so that the old deadlock fails the test in seconds, not the suite.
CALLBACK_CHILD = textwrap.dedent("""
    import json, os, sys, threading
    sys.path.insert(0, {here!r})
    import workplane_targets as t
    from procctl import ProcessExecutor

    def run(call):
        ex = ProcessExecutor(2, start_method="fork")
        returned, out = threading.Event(), {{}}
        def callback(fut):
            out["thread"] = threading.current_thread() is not threading.main_thread()
            try:
                value = eval(call, {{"ex": ex}})
                out["value"] = repr(value) if not hasattr(value, "items") else sorted(value.items)
            except BaseException as exc:
                out["raised"] = type(exc).__name__
            returned.set()
        first = ex.submit(t.sleep_for, 0.1)
        first.add_done_callback(callback)
        rest = [ex.submit(t.sleep_for, 0.1) for i in range(6)]
        out["returned"] = returned.wait(10)
        if not out["returned"]:
            return out  # deadlocked: the workers die with us, at os._exit
        ex.shutdown(wait=True)
        out["done"] = sum(f.done() for f in rest)
        out["cancelled"] = sum(f.cancelled() for f in rest)
        return out

    # One executor a call, all at once: their tasks mostly sleep.
    results = {{}}
    threads = [threading.Thread(target=lambda c=c: results.__setitem__(c, run(c))) for c in sys.argv[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    for call in sys.argv[1:]:
        print(json.dumps(results.get(call, {{"returned": False}})), flush=True)
    os._exit(0)
""")


def _run_child(code: str, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=40)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
    return [json.loads(line) for line in proc.stdout.splitlines()]


CALLS = ["ex.status()", "ex.counts()", "ex.pause()", "ex.resume()", "ex.pause(timeout=1)", "ex.kill()",
         "ex.submit(pow, 2, 3).done()", "ex.shutdown(wait=False)", "ex.stop(grace=1)", "ex.shutdown()"]


def test_every_method_works_from_a_done_callback():
    outs = _run_child(CALLBACK_CHILD.format(here=HERE), *CALLS)
    assert len(outs) == len(CALLS), outs
    by_call = dict(zip(CALLS, outs, strict=True))
    for call, out in by_call.items():
        assert out["thread"] and out["returned"], (call, out)
        assert out["done"] == 6, (call, out)  # every other future ends, none hangs
    for call in CALLS[:-1]:
        assert "raised" not in by_call[call], (call, by_call[call])
    # stop() there hands back what had not run (the first task is done; six wait)...
    stopped = by_call["ex.stop(grace=1)"]
    assert stopped["value"] and len(stopped["value"]) <= 6 and stopped["cancelled"] == len(stopped["value"])
    # ... and shutdown(wait=True) cannot wait there, as the stdlib's cannot: it says so at once.
    assert by_call["ex.shutdown()"]["raised"] == "RuntimeError"
    assert by_call["ex.shutdown()"]["cancelled"] == 0


def test_stop_at_the_first_failure_from_on_event():
    code = textwrap.dedent(f"""
        import json, os, sys, threading
        sys.path.insert(0, {HERE!r})
        import workplane_targets as t
        from procctl import ProcessExecutor
        holder, out, told = {{}}, [], threading.Event()
        def on_event(event):
            if event.event == "task-crashed" and not out:
                out.append(holder["ex"].stop(grace=1))
                told.set()
        ex = holder["ex"] = ProcessExecutor(2, start_method="fork", on_event=on_event)
        crash = ex.submit(t.exit_now, 3)
        rest = [ex.submit(t.sleep_for, 0.3) for _ in range(10)]
        if not told.wait(10):
            os._exit(1)  # on_event did not return: the workers die with us
        ex.shutdown()
        left = out[0]
        print(json.dumps({{"left": len(left.items), "cancelled": sum(f.cancelled() for f in rest),
                          "done": sum(f.done() for f in rest), "crash": type(crash.exception()).__name__}}))
    """)
    (out,) = _run_child(code)
    assert out["crash"] == "WorkerCrashed"
    assert out["done"] == 10
    # (Most are handed back: at most 2 begun at once, and a few more if the stop came late under load.)
    assert 5 <= out["left"] <= 10 and out["cancelled"] == out["left"], out


def test_stop_at_the_first_failure_from_a_done_callback():
    code = textwrap.dedent(f"""
        import json, os, sys, threading
        sys.path.insert(0, {HERE!r})
        import workplane_targets as t
        from procctl import ProcessExecutor
        ex = ProcessExecutor(2, start_method="fork")
        out, told = [], threading.Event()
        def callback(fut):
            if fut.exception() is not None:
                out.append(ex.stop(grace=1))
            told.set()
        ex.pause()  # all is submitted before the failure: no submit after the callback's stop
        futs = [ex.submit(t.sleep_for, 0.2), ex.submit(t.boom, 1)]
        futs[1].add_done_callback(callback)
        futs += [ex.submit(t.sleep_for, 0.2) for _ in range(20)]
        ex.resume()
        if not told.wait(10):
            os._exit(1)  # the callback did not return: the workers die with us
        ex.shutdown()
        print(json.dumps({{"ran": sum(f.done() and not f.cancelled() for f in futs), "left": len(out[0].items),
                          "cancelled": sum(f.cancelled() for f in futs), "all": all(f.done() for f in futs)}}))
    """)
    (out,) = _run_child(code)
    assert out["all"], out
    # (Most are handed back: each 0.2 s task the stop came late under load is one fewer.)
    assert out["ran"] + out["cancelled"] == 22 and out["left"] == out["cancelled"] >= 10, out


@pytest.mark.parametrize("chunksize", [1, None, 5])
def test_map_lets_go_of_the_results_it_yielded(chunksize):
    """As the stdlib's map (bpo-14406): a yielded result lives as long as the caller keeps it."""
    with ProcessExecutor(2, start_method="fork") as ex:
        it = ex.map(t.make_dummy, range(50), chunksize=chunksize)
        refs = [weakref.ref(next(it)) for _ in range(41)]
        gc.collect()
        assert [r for r in refs if r() is not None] == []  # while the iterator lives
        assert len(list(it)) == 9


def test_a_map_let_go_of_takes_back_what_its_worker_has_not_begun():
    """As the stdlib's map cancels what has not started once its iterator is
    closed: here the chunks a worker holds behind the one it runs come back,
    cancelled (of 4 chunks of 8, 3 ran after the close, and shutdown() waited for them)."""
    ex = ProcessExecutor(1, start_method="fork")
    try:
        # Automatic chunks: 8 items each; a quick first one, then 2 s chunks (at
        # 0.4 s each, a stall of the close let the third chunk begin).
        it = ex.map(t.nap, [0.01] * 8 + [0.25] * 24)
        next(it)  # (the first chunk has ended: its results come together)
        it.close()
        ex.shutdown(wait=True)
        counts = ex.counts()
    finally:
        ex.stop()
    assert counts.completed <= 16 and counts.cancelled >= 16, counts
    assert counts.completed + counts.cancelled == 32


def test_a_map_iterator_the_collector_closes_takes_no_lock(tests_dir, tmp_path):
    """The collector closes a dropped map iterator (in a reference cycle) at any
    allocation, also while the executor's own lock is held: its let-go takes no
    lock (it deadlocked on itself)."""
    script = tmp_path / "collect.py"
    script.write_text(textwrap.dedent(f"""
        import gc, sys
        sys.path.insert(0, {tests_dir!r})
        import workplane_targets as t
        from procctl import ProcessExecutor
        ex = ProcessExecutor(2, start_method="fork")
        it = ex.map(t.nap, [0] * 100)
        next(it)
        cycle = [it]
        cycle.append(cycle)
        del it, cycle
        gc.disable()
        with ex._pool._lock:  # (as a pass of the manager's, or an enqueue, holds it)
            gc.collect()
        print("collected", flush=True)
        ex.shutdown()
    """))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "collected" in res.stdout, res.stderr


def test_a_result_that_cannot_be_unpickled_fails_its_own_future_only():
    with ProcessExecutor(2, start_method="fork") as ex:
        slow = [ex.submit(t.sleep_for, 0.2) for _ in range(4)]
        bad = ex.submit(t.exit_when_unpickled, 0)
        error = bad.exception(timeout=10)
        assert type(error) is SystemExit and error.args == (3,)
        assert "could not be unpickled" in str(error.__cause__)
        assert [f.result(timeout=10) for f in slow] == [0.2] * 4
        assert ex.submit(t.square, 3).result(timeout=10) == 9  # the pool goes on
        assert ex.counts().failed == 1


def test_a_first_task_whose_result_cannot_be_pickled_does_not_break_a_fresh_pool():
    """An initializer failure breaks the pool (BrokenProcessPool, as the
    stdlib's); a first task's failure (here its result's pickling calls
    sys.exit) is that task's, as any task's is."""
    with ProcessExecutor(2, start_method="fork") as ex:
        error = ex.submit(t.exit_when_pickled, 0).exception(timeout=10)
        # As ProcessPoolExecutor's: the exception itself, here with a note.
        assert type(error) is SystemExit and error.args == (1,), error
        assert "could not be pickled" in " ".join(error.__notes__)
        assert [ex.submit(t.square, i).result(timeout=10) for i in range(3)] == [0, 1, 4]
        assert ex.counts().failed == 1


def test_an_executor_dropped_without_shutdown_runs_its_tasks_then_stops():
    """As ProcessPoolExecutor: its manager does not keep the executor alive;
    once collected, it shuts down as shutdown(wait=False) does."""
    ex = ProcessExecutor(2, start_method="fork")
    futs = [ex.submit(t.sleep_for, 0.1) for _ in range(4)]
    pids, manager = ex._pool._pc.pids(), ex._pool._thread
    del ex
    gc.collect()
    assert [f.result(timeout=10) for f in futs] == [0.1] * 4  # submitted, so they run
    manager.join(10)
    assert not manager.is_alive()
    assert still_running(pids, timeout=5) == []


@pytest.mark.parametrize("retries, one_range", [(0, False), (1, False), (0, True)])
def test_a_crash_in_an_automatic_map_chunk_costs_one_item(retries, one_range):
    """Item 210 of 400 kills its worker (in chunks of 50): map yields the 210
    before it, then raises WorkerCrashed there; every other item completes,
    those its chunk had run before the crash run again. (One range as the
    input, kept as it is, once ended the manager thread there: a hang.)"""
    with ProcessExecutor(2, start_method="fork", retries=retries) as ex:
        it = (ex.map(functools.partial(t.exit_at, bad=210), range(400)) if one_range
              else ex.map(t.exit_at, range(400), [210] * 400))
        got = [next(it) for _ in range(210)]
        with pytest.raises(WorkerCrashed):
            next(it)
    counts = ex.counts()  # once the pool is shut down: every item has its outcome
    assert got == list(range(210))
    # (the map's later chunks are cancelled if they were not done when it raised)
    assert counts.failed == 1 and counts.completed + counts.cancelled == 399, counts


def test_a_timeout_in_a_map_chunk_costs_one_item():
    with ProcessExecutor(2, start_method="fork", task_timeout=0.5) as ex:
        items = [0.0] * 32 + [30.0] + [0.0] * 7  # chunks of 5: the long one is the third of its chunk
        it = ex.map(t.nap, items)
        assert [next(it) for _ in range(32)] == [0.0] * 32
        with pytest.raises(TaskTimeout):
            next(it)
    counts = ex.counts()  # once the pool is shut down: every item has its outcome
    assert counts.failed == 1 and counts.completed + counts.cancelled == 39, counts


def test_a_failing_initializer_is_a_broken_process_pool_and_max_workers_says_as_the_stdlib():
    from concurrent.futures.process import BrokenProcessPool

    with ProcessExecutor(1, start_method="fork", initializer=t.init_fails) as ex:
        with pytest.raises(BrokenProcessPool, match="initializer"):
            ex.submit(t.square, 1).result(timeout=10)
    # One that ends its process: started again, it died again, for ever (100 a second).
    with ProcessExecutor(1, start_method="fork", initializer=t.init_exits) as ex:
        with pytest.raises(BrokenProcessPool, match="died before it was up"):
            ex.submit(t.square, 1).result(timeout=10)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            ProcessExecutor(bad)


@pytest.mark.parametrize("task_timeout", [None, 30])
def test_an_item_that_raises_in_a_map_chunk_ends_the_map_at_that_item(task_timeout):
    """As the stdlib's map with one item a task: the items before it are
    yielded, then its exception is raised (chunks of 50 here)."""
    with ProcessExecutor(2, start_method="fork", task_timeout=task_timeout) as ex:
        it = ex.map(t.fail_at, range(400), [210] * 400)
        got = [next(it) for _ in range(210)]
        with pytest.raises(ValueError, match="bad 210") as info:
            next(it)
        assert "Traceback" in str(info.value.__cause__)
    counts = ex.counts()  # once the pool is shut down: every item has its outcome
    assert got == list(range(210))
    assert counts.failed == 40 and counts.completed + counts.cancelled == 360, counts  # 210..249 with it
