"""The work plane's batching: many tasks per message, chunks that pause and stop
between items, consumers' windows of items taken back at PAUSED, full sockets."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest
import workplane_targets as t

from procctl import ProcessController, ProcessExecutor, WorkerCrashed


def test_a_crash_costs_one_task_when_tasks_travel_in_batches():
    with ProcessExecutor(2) as ex:
        assert list(ex.map(t.square, range(3000), chunksize=1))[-1] == 2999 ** 2  # quick: batches
        futs = [ex.submit(t.exit_at, i, 1500) for i in range(3000)]
        outcomes = [f.exception(30) for f in futs]
        assert [i for i, e in enumerate(outcomes) if e is not None] == [1500]
        assert isinstance(outcomes[1500], WorkerCrashed)
        assert [f.result() for i, f in enumerate(futs) if i != 1500] == [i for i in range(3000) if i != 1500]
        assert list(ex.map(t.square, range(10), chunksize=1)) == [x * x for x in range(10)]  # still usable


def test_max_tasks_per_worker_with_quick_batched_tasks():
    with ProcessExecutor(2, max_tasks_per_worker=7) as ex:
        facts = list(ex.map(t.context_facts, range(300), chunksize=1))
    per_pid: dict[int, int] = {}
    for _, _, pid in facts:
        per_pid[pid] = per_pid.get(pid, 0) + 1
    assert len(facts) == 300 and max(per_pid.values()) <= 7


def test_a_big_chunk_pauses_and_stops_between_its_items():
    ex = ProcessExecutor(2)
    items = list(range(4000))  # automatic chunks of 500 items of 5 ms
    it = ex.map(t.slow_item, items)
    assert next(it) == 0  # the first chunk is done, the others run
    t0 = time.monotonic()
    ex.pause(timeout=10)  # within a block of items, not a whole 2.5 s chunk
    assert time.monotonic() - t0 < 1.5
    done = ex.counts().completed
    time.sleep(0.1)  # paused: no chunk completes meanwhile
    assert ex.counts().completed == done
    ex.resume(timeout=10)
    left = ex.stop(grace=5)
    seen = [0]
    with pytest.raises(cf.CancelledError):
        seen.extend(it)  # the first items of an interrupted chunk come, then the cut
    # In order up to the first item not done; none both yielded and handed back
    # (items of later chunks that completed are neither, as after a cancelled
    # future in the stdlib's map).
    assert seen == items[:len(seen)]
    assert not set(seen) & set(left.items) and len(set(left.items)) == len(left.items)
    assert left.items and set(left.running) <= set(left.items) <= set(items)
    assert left.items[0] == len(seen)  # the cut chunk's unfinished items are handed back one by one


def test_prefetched_items_go_back_at_pause_with_exact_accounting():
    with ProcessController(t.relay, 2, channels={"jobs": 0, "out": 0}) as pc:
        pc.run()
        jobs = pc.channels["jobs"]
        for i in range(2000):
            jobs.put(i)
        out = [pc.channels["out"].get(timeout=10) for _ in range(50)]
        pc.pause()
        s = jobs.stats()
        relayed = pc.channels["out"].stats().put
        # A paused relay holds at most the one item between its get and its
        # put; what it had asked for and not read is back in the channel.
        assert s.got - relayed <= 2
        assert s.queued == 2000 - s.got and s.put == 2000
        pc.run()
        jobs.close()
        out += [pc.channels["out"].get(timeout=10) for _ in range(2000 - len(out))]
        pc.stop()
    assert sorted(out) == list(range(2000))
    assert jobs.stats().got == 2000 and jobs.stats().drained == 0


def test_items_larger_than_a_consumers_socket_window_all_arrive():
    big = b"x" * 100_000  # a window of these does not fit a socket: the broker waits for room
    with ProcessController(t.sum_sizes, 2, channels={"jobs": 0}) as pc:
        pc.run()
        for _ in range(300):
            pc.channels["jobs"].put(big)
        pc.channels["jobs"].close()
        assert pc.wait(timeout=30)
        reports = pc.stop()
    assert sum(r.result for r in reports.values()) == 300 * len(big)
    s = pc.channels["jobs"].stats()
    assert (s.put, s.got, s.drained) == (300, 300, 0)


def test_shutdown_cancel_futures_wakes_a_map_waiting_on_a_cancelled_item():
    ex = ProcessExecutor(1)
    # The worker's window: this one and the next (2 s: ended before the shutdown, it
    # let the queued items run, and nothing was left to cancel).
    busy = ex.submit(t.sleep_for, 2.0)
    ahead = ex.map(t.sleep_for, [0.0] * 3, chunksize=1)
    waiting = ex.map(t.square, [7], chunksize=1)  # queued behind them
    outcome = []

    def consume():
        try:
            outcome.append(list(waiting))
        except cf.CancelledError:
            outcome.append("cancelled")

    th = threading.Thread(target=consume)
    th.start()
    th.join(0.1)  # it waits on a queued item
    ex.shutdown(wait=False, cancel_futures=True)
    th.join(10)
    assert not th.is_alive() and outcome == ["cancelled"]
    assert busy.result(15) == 2.0
    with pytest.raises(cf.CancelledError):
        list(ahead)
    ex.shutdown(wait=True)
