"""Progress from inside a worker, status() and events carrying it, on_event."""

from __future__ import annotations

import multiprocessing
import os

import targets

from procctl import Event, ProcessController, State


def test_progress_is_cheap_and_reaches_status_and_events():
    events: list[Event] = []
    counted = multiprocessing.get_context("fork").Semaphore(0)

    def on_event(e: Event) -> None:
        events.append(e)

    with ProcessController(targets.report_progress, 2, args=(counted, 50_000), on_event=on_event,
                           start_method="fork") as pc:
        pc.run()
        assert counted.acquire(timeout=30) and counted.acquire(timeout=30)
        rows = pc.status()
        info = {r.worker_id: r.info for r in pc.status()}
        reports = pc.stop()
    for r in rows:
        assert r.total == 50_000 and r.state is State.RUNNING and r.alive
        # A rate and an ETA at the first status() call: counted from the worker's first run.
        assert r.rate is not None and r.rate > 0 and r.eta is not None and r.eta >= 0
    assert info[0].get("phase") == "counting" and info[1].get("worker") == 1
    # 50,000 calls: shared-memory stores, far under a second in all.
    assert all(r.result < 1.0 for r in reports.values())
    ends = [e for e in events if e.event == "stopped"]
    assert len(ends) == 2 and all(e.done == 50_000 and e.total == 50_000 for e in ends)
    assert any(e.event == "broadcast" and e.state == "running" for e in events)


def test_the_last_info_of_a_tight_loop_is_not_lost():
    # progress() sends info at most every INFO_INTERVAL: the last one waits for
    # the worker's next sleep, or its return; it was dropped for good.
    with ProcessController(targets.tight_info, 1, args=(False,), start_method="fork") as pc:
        pc.run()
        pc.pause(timeout=30)  # acknowledged from its sleep, after the info it held back
        assert pc.status()[0].info == {"cur": 999}
    with ProcessController(targets.tight_info, 1, args=(True,), start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=30)
        assert pc.status()[0].info == {"cur": 999}


def test_a_pause_taken_as_a_sleep_begins_cuts_it_short():
    """The pause reached the worker before its sleep did (CI: the 'rate' test below
    hung so); the sleep paused at its start, and after the run slept its hour."""
    r, w = os.pipe()

    def on_event(event):
        if (event.event, event.state) == ("broadcast", "paused"):
            os.write(w, b"x")  # posted: now the worker goes on to its sleep

    try:
        with ProcessController(targets.read_then_sleep, 1, args=(r,), start_method="fork", on_event=on_event) as pc:
            pc.run()
            pc.pause()
            pc.run()
            assert pc.wait(timeout=10)
            reports = pc.stop()
    finally:
        os.close(r)
        os.close(w)
    assert reports[0].result is True


def test_an_ended_workers_rate_stays_as_it_ended_and_it_has_no_eta():
    # The rate kept falling after the end (its clock ran on), and an ETA was shown for what never comes.
    with ProcessController(targets.half_then_return, 1, start_method="fork") as pc:
        pc.run()
        pc.pause()  # acknowledged from its sleep, at 10 of 100
        assert pc.status()[0].done == 10  # (the rate's origin)
        pc.run()
        assert pc.wait(timeout=30)
        first = pc.status()[0]
        again = pc.status()[0]
    assert first.done == 50 and first.rate is not None and first.rate > 0
    assert (again.rate, first.eta, again.eta) == (first.rate, None, None)


def test_a_pause_stops_the_rates_clock_and_a_paused_worker_has_no_eta():
    # The rate was done / all the time since the first run, pauses included: after a
    # pause three times as long as the run, a third of the real rate, and the ETA
    # three times too long; a paused worker still showed one.
    with ProcessController(targets.paced, 1, start_method="fork") as pc:
        pc.run()
        assert not pc.wait(0.5)  # it runs half a second
        pc.pause()
        before = pc.status()[0]
        assert not pc.wait(1.5)  # then is paused three times as long
        paused = pc.status()[0]
        assert paused.eta is None and paused.rate == before.rate
        pc.run()
        assert not pc.wait(0.5)
        after = pc.status()[0]
        pc.stop()
    assert before.rate is not None and after.rate is not None and after.eta is not None
    assert after.rate > 0.6 * before.rate, (before, after)
