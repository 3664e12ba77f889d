"""ProcessExecutor: a task that completed is done whatever STOPPED did meanwhile; kill() ends a stop's grace.

Each task announces that it started by writing its pid to a FIFO the test
reads (the read blocks until the task is in it): no polling, no sleeps. The
test holds the FIFO open for reading and writing from the start, so a task's
open never waits and no end of file comes between two tasks' writes (a reader
that closed after the first writer's end of file once left the second
writer's write to a FIFO with no reader: a BrokenPipeError, and a test that
waited for its pid forever).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import select
import signal
import threading
import time

import pytest
import workplane_targets as t

from procctl import ProcessExecutor


def announce(fifo: str) -> None:
    with open(fifo, "w") as f:
        f.write(f"{os.getpid()}\n")


def work_past_a_sigterm(fifo, x):
    """Run on through a stop without a checkpoint, then return: a completed task."""
    announce(fifo)
    time.sleep(0.3)  # the SIGTERM comes in here; the handler runs and the sleep goes on
    return x


def told_to_stop(fifo, x):
    """Return early once checkpoint() says stop: an interrupted task."""
    announce(fifo)
    ctx = t.procctl.context()
    while ctx.checkpoint():
        ctx.sleep(0.02)
    return x


def ignore_stop(fifo, x):
    announce(fifo)
    time.sleep(60)
    return x


_held: dict[str, int] = {}  # fifo path -> the test's read-write end


def started_pids(fifo: str, n: int, timeout: float = 30) -> list[int]:
    """Block until `n` tasks announced themselves (at most `timeout` s); their pids."""
    fd, buf, deadline = _held[fifo], b"", time.monotonic() + timeout
    while len(buf.split(b"\n")) <= n:  # n whole lines
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"{len(buf.split())} of {n} tasks announced themselves in {timeout} s"
        buf += os.read(fd, 4096)
    return [int(line) for line in buf.split()]


@pytest.fixture
def fifo(tmp_path):
    path = str(tmp_path / "started")
    os.mkfifo(path)
    _held[path] = os.open(path, os.O_RDWR)  # (Linux: opening never blocks; never an end of file)
    yield path
    os.close(_held.pop(path))


def test_a_task_that_returns_is_completed_though_a_sigterm_stopped_its_worker(fifo):
    with ProcessExecutor(1) as ex:
        fut = ex.submit(work_past_a_sigterm, fifo, 7)
        [pid] = started_pids(fifo, 1)
        os.kill(pid, signal.SIGTERM)  # as a SIGTERM to the whole process group does
        assert fut.result(20) == 7
        assert ex.counts().completed == 1
        assert ex.submit(t.square, 3).result(20) == 9  # the worker was replaced


def test_a_task_told_to_stop_is_interrupted_though_it_returned(fifo):
    ex = ProcessExecutor(1)
    try:
        fut = ex.submit(told_to_stop, fifo, 7)
        [pid] = started_pids(fifo, 1)
        os.kill(pid, signal.SIGTERM)
    finally:
        left = ex.stop(grace=10)
    assert left.items == [(fifo, 7)] and left.running == [(fifo, 7)]
    assert fut.cancelled()


@pytest.mark.parametrize("when", ["in-the-grace", "before-the-stop"])
def test_kill_ends_the_workers_and_the_stop_hands_back_every_item_once(fifo, when):
    stopped = threading.Event()

    def on_event(event):
        if event.event == "broadcast" and event.state == "stopped":
            stopped.set()

    ex = ProcessExecutor(2, grace=30, on_event=on_event)
    try:
        running = [ex.submit(ignore_stop, fifo, i) for i in range(2)]
        queued = [ex.submit(t.square, i) for i in range(100, 110)]
        pids = started_pids(fifo, 2)
        t0 = time.monotonic()
        if when == "before-the-stop":
            ex.kill()
            left = ex.stop()
        else:
            # A second Ctrl-C: kill() from a signal handler while stop() waits out its grace.
            old = signal.signal(signal.SIGUSR1, lambda *_: ex.kill())
            sender = threading.Thread(target=lambda: stopped.wait(20) and os.kill(os.getpid(), signal.SIGUSR1))
            sender.start()
            try:
                left = ex.stop()
            finally:
                sender.join()
                signal.signal(signal.SIGUSR1, old)
        took = time.monotonic() - t0
    finally:
        ex.stop(grace=0)
    assert took < 10  # not the 30 s grace
    assert left.items == [(fifo, 0), (fifo, 1)] + list(range(100, 110))  # in submission order
    assert left.running == [(fifo, 0), (fifo, 1)]
    assert all(f.cancelled() for f in running + queued)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError):
        ex.submit(t.square, 1)


def test_kill_then_shutdown_does_not_wait_for_the_work(fifo):
    ex = ProcessExecutor(1, grace=30)
    futs = [ex.submit(ignore_stop, fifo, 0)] + [ex.submit(t.square, i) for i in range(5)]
    started_pids(fifo, 1)
    ex.kill()
    ex.shutdown(wait=True)
    assert all(f.cancelled() for f in futs)


def test_a_stopped_chunk_hands_back_only_its_started_item_as_running(fifo):
    # Two chunks of ten, one per worker: each worker is in its chunk's first
    # item when the stop comes; the other nine of each never started.
    with ProcessExecutor(2) as ex:
        results = ex.map(told_to_stop, [fifo] * 20, range(20), chunksize=10)
        started_pids(fifo, 2)
        left = ex.stop(grace=10)
    assert left.items == [(fifo, x) for x in range(20)]
    assert left.running == [(fifo, 0), (fifo, 10)]
    with pytest.raises(cf.CancelledError):  # as at any unfinished item
        next(results)
