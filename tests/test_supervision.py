"""Supervision (issue 9, sections 1, 2 and 4): restart policies, intensity, backoff,
one_for_all, hang detection, resize and per-worker commands; the CLI's flags and signals."""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import time

import pytest
import targets_supervision as ts
from clihelp import LiveCli, json_events, run_cli

from procctl import Outcome, ProcessController, State
from procctl.controller import WorkerStartError
from procctl.states import Event, WorkerStatus
from procctl.supervise import Action, Plan, SchedSample, Supervisor, looks_hung, sched_sample


def ours() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("procctl-worker")]


def controller(target, workers=1, events=None, **kw) -> ProcessController:
    kw.setdefault("start_method", "fork")
    kw.setdefault("backoff", (0.0, 0.0))
    kw.setdefault("grace", 1.0)
    return ProcessController(target, workers, on_event=None if events is None else events.append, **kw)


def reap_n(pc: ProcessController, n: int, timeout: float = 20.0) -> list:
    """Block until `n` reports have come (each reap() blocks until one does)."""
    got: list = []
    end = time.monotonic() + timeout
    while len(got) < n:
        left = end - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} reports came: {got}"
        got += pc.reap(timeout=left)
    return got


# -- the policy, without processes ------------------------------------------------


def test_policy_table():
    never, failure, always = (Plan.check(restart=r) for r in ("never", "on-failure", "always"))
    for outcome in Outcome:
        assert not never.wants_restart(outcome)
        assert failure.wants_restart(outcome) == (outcome in (Outcome.FAILED, Outcome.CRASHED,
                                                              Outcome.KILLED, Outcome.HUNG))
        assert always.wants_restart(outcome) == (outcome is not Outcome.STOPPED)


def test_intensity_and_backoff_by_hand():
    sup = Supervisor(Plan.check(restart="on-failure", max_restarts=3, restart_window=10.0, backoff=(0.1, 0.3)))
    delays = [sup.on_exit(0, Outcome.FAILED, t).delay for t in (0.0, 1.0, 2.0)]
    assert delays == [0.1, 0.2, 0.3]  # doubling, capped at backoff[1]
    assert sup.on_exit(1, Outcome.CRASHED, 3.0).action is Action.GIVE_UP  # a 4th within 10 s
    assert sup.on_exit(1, Outcome.FINISHED, 3.0).action is Action.NONE
    # Restarts older than the window are forgotten: by intensity, and by the backoff.
    again = sup.on_exit(0, Outcome.FAILED, 12.5)
    assert again.action is Action.RESTART and again.delay == 0.1
    assert Supervisor(Plan.check(restart="always", max_restarts=0)).on_exit(0, Outcome.FINISHED, 0).action \
        is Action.GIVE_UP


def test_a_cancelled_restart_does_not_count():
    sup = Supervisor(Plan.check(restart="on-failure", max_restarts=1, backoff=(0.1, 0.3)))
    assert sup.on_exit(0, Outcome.FAILED, 1.0).action is Action.RESTART
    sup.cancel(0, 1.0)  # worker 0 was stopped during its backoff
    second = sup.on_exit(0, Outcome.FAILED, 2.0)
    assert second.action is Action.RESTART and second.delay == 0.1 and sup.total == 1


def test_a_restart_cancelled_during_its_backoff_is_not_counted():
    """max_restarts=1: worker 0's restart, cancelled while it waited (its worker
    stopped alone), never happened; worker 1's failure after it is the first
    restart, not one past the limit (it gave up and stopped every worker)."""
    told = multiprocessing.get_context("fork").Event()
    events: list[Event] = []
    with controller(ts.fail_when_told, 3, events, args=(told,), restart="on-failure", max_restarts=1,
                    backoff=(60.0, 60.0)) as pc:
        pc.run()
        assert [r.worker_id for r in reap_n(pc, 1)] == [0]  # it waits 60 s for its restart
        pc.stop(workers=[0])
        told.set()
        assert [r.worker_id for r in reap_n(pc, 1)] == [1]
        assert not pc.gave_up and pc.status()[2].alive
        pc.stop()
    assert [(e.event, e.worker) for e in events if e.event in ("restarting", "gave_up")] == [
        ("restarting", 0), ("restarting", 1)]


def test_a_worker_id_a_resize_brings_back_starts_its_backoff_afresh():
    """Worker 1 failed twice (backoff 0.05 s, then 0.1 s); removed by a shrink
    and brought back by a growth, it is a new worker: its first restart waits
    0.05 s again, not the old id's next step."""
    events: list[Event] = []
    with controller(ts.worker1_fails_twice, 2, events, restart="on-failure", max_restarts=10,
                    backoff=(0.05, 10.0)) as pc:
        pc.run()
        reap_n(pc, 2)  # its two failures
        pc.resize(1)
        pc.resize(2)  # a fresh worker 1 (restarts 0): it fails once more
        reap_n(pc, 2)  # the one the shrink stopped, and that failure
        delays = [e.delay for e in events if e.event == "restarting" and e.worker == 1]
        pc.stop()
    assert delays[:3] == [0.05, 0.1, 0.05], delays  # (the old id would have waited 0.2 s)


# -- bad arguments: refused before any process starts ------------------------------------


@pytest.mark.parametrize("kwargs, exc, name", [
    ({"restart": "sometimes"}, ValueError, "restart"),
    ({"restart": None}, TypeError, "restart"),
    ({"strategy": "rest_for_one"}, ValueError, "strategy"),
    ({"max_restarts": -1}, ValueError, "max_restarts"),
    ({"max_restarts": 2.5}, TypeError, "max_restarts"),
    ({"max_restarts": True}, TypeError, "max_restarts"),
    ({"restart_window": 0}, ValueError, "restart_window"),
    ({"restart_window": -1.0}, ValueError, "restart_window"),
    ({"restart_window": math.nan}, ValueError, "restart_window"),
    ({"backoff": (1.0, 0.5)}, ValueError, "backoff"),
    ({"backoff": (-1.0, 1.0)}, ValueError, "backoff"),
    ({"backoff": (math.nan, 1.0)}, ValueError, "backoff"),
    ({"backoff": (0.1, math.inf)}, ValueError, "backoff"),
    ({"backoff": 1.0}, TypeError, "backoff"),
    ({"backoff": "1,2"}, TypeError, "backoff"),
    ({"heartbeat": 0}, ValueError, "heartbeat"),
    ({"heartbeat": -1.0}, ValueError, "heartbeat"),
    ({"heartbeat": math.nan}, ValueError, "heartbeat"),
    ({"heartbeat": 5e-324}, ValueError, "heartbeat"),  # a probe every 1e-324 s: every worker hung at once
    ({"heartbeat": "1"}, TypeError, "heartbeat"),
])
def test_bad_supervision_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ProcessController(ts.shard, 1, **kwargs)
    assert ours() == []


@pytest.mark.parametrize("n, exc", [(0, ValueError), (-2, ValueError), (True, ValueError),
                                    ("2", TypeError), (2.0, TypeError), (None, TypeError)])
def test_bad_resize_arguments(n, exc):
    with controller(ts.shard, 2) as pc:
        pids = pc.pids()
        with pytest.raises(exc, match="n must be a positive integer"):
            pc.resize(n)
        assert pc.pids() == pids and pc.workers == 2
        with pytest.raises(ValueError, match="workers"):
            pc.pause(workers=[2])
        with pytest.raises(TypeError, match="workers"):
            pc.run(workers="0")


# -- restarts: each way of dying, under each policy ----------------------------------------


@pytest.mark.parametrize("restart", ["never", "on-failure", "always"])
@pytest.mark.parametrize("how, outcome", [("raise", Outcome.FAILED), ("exit", Outcome.CRASHED),
                                          ("kill", Outcome.CRASHED), ("hang", Outcome.HUNG),
                                          ("finish", Outcome.FINISHED)])
def test_restart_policy(how, outcome, restart):
    events: list[Event] = []
    # The second incarnation finishes at once; with "always" that restarts it too,
    # until the limit (max_restarts=2) gives up: finite either way.
    with controller(ts.fail_first, 1, events, args=(how, 1, True), restart=restart, max_restarts=2,
                    heartbeat=0.3 if how == "hang" else None, grace=0.3) as pc:
        pc.run()
        assert pc.wait(20)
        history = pc.history(0)
    outcomes = [r.outcome for r in history]
    assert outcomes[0] is outcome
    assert [r.restarts for r in history] == list(range(len(history)))
    restarted = restart == "always" or (restart == "on-failure" and how != "finish")
    if not restarted:
        assert len(history) == 1 and not any(e.event == "restarting" for e in events)
    elif restart == "on-failure":
        assert outcomes == [outcome, Outcome.FINISHED] and history[1].result == 1
        assert len({r.pid for r in history}) == 2
    else:  # always: finished is restarted too, until more than 2 restarts
        assert outcomes == [outcome, Outcome.FINISHED, Outcome.FINISHED] and pc.gave_up
    assert [e.restarts for e in events if e.event == "restarting"] == list(range(1, len(history)))
    if how == "hang":
        assert [e.worker for e in events if e.event == "hung"] == [0]


@pytest.mark.parametrize("restart, again", [("always", True), ("on-failure", False)])
def test_an_outside_sigterm_is_a_normal_end_for_the_policy(restart, again):
    # SIGTERM to one worker (`kill PID`, no stop of ours): it stops gracefully; "always"
    # restarts it as OTP does a permanent child (it was never restarted), "on-failure" not.
    with controller(ts.shard, 2, restart=restart) as pc:
        pc.run()
        os.kill(pc.status()[1].pid, signal.SIGTERM)
        [ended] = reap_n(pc, 1)
        assert ended.worker_id == 1 and ended.outcome is Outcome.STOPPED
        now = pc.status()[1]
        assert (now.alive, now.restarts) == ((True, 1) if again else (False, 0))
        pc.stop()


def test_restart_after_an_outside_sigkill_in_each_start_method(start_method):
    with controller(ts.shard, 2, restart="on-failure", start_method=start_method) as pc:
        pc.run()
        before = pc.status()
        os.kill(before[1].pid, signal.SIGKILL)
        [dead] = reap_n(pc, 1)
        assert dead.worker_id == 1 and dead.outcome is Outcome.CRASHED and dead.exitcode == -signal.SIGKILL
        # Restarted at once (no backoff), in the job's state, before it has said so itself.
        now = pc.status()[1]
        assert now.restarts == 1 and now.alive and now.state is State.RUNNING
        pc.run()  # acknowledged by the new incarnation too
        after = pc.status()
        assert after[1].alive and after[1].restarts == 1 and after[1].pid != before[1].pid
        assert after[1].state is State.RUNNING and after[0].pid == before[0].pid and after[0].restarts == 0
        reports = pc.stop()
    # (under spawn the new process may see the stop before its target runs: no result then)
    assert reports[1].result in ((1, 2), None) and reports[1].restarts == 1
    assert [r.outcome for r in pc.history(1)] == [Outcome.CRASHED, Outcome.STOPPED]


def test_restarted_worker_starts_in_the_current_state_paused():
    events: list[Event] = []
    with controller(ts.shard, 1, events, restart="on-failure") as pc:  # started PAUSED, never run
        pid = pc.pids()[0]
        os.kill(pid, signal.SIGKILL)
        reap_n(pc, 1)
        pc.pause()  # acknowledged by the new process
        [row] = pc.status()
        assert row.alive and row.state is State.PAUSED and row.restarts == 1 and row.pid != pid
        # Each incarnation says its first state, PAUSED too (the timeline draws its span from it).
        assert [(e.event, e.pid) for e in events if e.event in ("paused", "running")] == [
            ("paused", pid), ("paused", row.pid)]
        pc.run()
        assert pc.status()[0].state is State.RUNNING


def test_no_restart_after_stopped():
    events: list[Event] = []
    with controller(ts.fail_on_stop, 2, events, restart="always") as pc:
        pc.run()
        pc.stop(workers=[0])  # fails as it stops: not restarted
        assert pc.status()[0].alive is False and pc.status()[1].alive
        reports = pc.stop()  # fails as it stops: not restarted
    assert all(r.outcome is Outcome.FAILED for r in reports.values())
    assert not any(e.event == "restarting" for e in events)
    assert all(len(pc.history(w)) == 1 for w in (0, 1))


def test_intensity_limit_gives_up_and_stops_everything():
    events: list[Event] = []
    with controller(ts.worker0_fails, 3, events, args=(1000,), restart="on-failure", max_restarts=3) as pc:
        pc.run()
        assert pc.wait(20)  # returns: every worker was stopped
        assert pc.gave_up
        reports = pc.reports
    assert [e.restarts for e in events if e.event == "restarting"] == [1, 2, 3]
    [gave_up] = [e for e in events if e.event == "gave_up"]
    assert gave_up.worker == 0 and "worker 0 fails" in (gave_up.error or "")
    assert len(pc.history(0)) == 4 and reports[0].outcome is Outcome.FAILED
    assert reports[1].outcome is Outcome.STOPPED and reports[2].outcome is Outcome.STOPPED
    assert ours() == []


def test_backoff_does_not_delay_the_others():
    events: list[Event] = []
    with controller(ts.worker0_fails, 2, events, args=(1000,), restart="on-failure", backoff=(30.0, 60.0)) as pc:
        pc.run()
        reap_n(pc, 1)
        [restarting] = [e for e in events if e.event == "restarting"]
        assert restarting.worker == 0 and restarting.delay == 30.0
        t = time.monotonic()
        for _ in range(5):  # the other worker goes on, and commands are answered at once
            pc.pause(timeout=5)
            pc.run(timeout=5)
        assert time.monotonic() - t < 10
        assert [s.alive for s in pc.status()] == [False, True]
        assert not pc.wait(0.2)  # a restart is pending: not all ended
        t = time.monotonic()
        reports = pc.stop()  # the pending restart is dropped, not waited for
        assert time.monotonic() - t < 10
    assert len(pc.history(0)) == 1 and reports[1].outcome is Outcome.STOPPED


def test_one_for_all_restarts_every_worker():
    events: list[Event] = []
    with controller(ts.worker0_fails, 3, events, args=(1,), restart="on-failure", strategy="one_for_all") as pc:
        first = {s.worker_id: s.pid for s in pc.status()}  # paused: worker 0 has not failed yet
        pc.run()
        ended = reap_n(pc, 3)
        assert sorted((r.worker_id, r.outcome) for r in ended) == [
            (0, Outcome.FAILED), (1, Outcome.STOPPED), (2, Outcome.STOPPED)]
        pc.run()
        rows = pc.status()
        assert all(r.alive and r.restarts == 1 and r.pid != first[r.worker_id] for r in rows), (first, rows)
        reports = pc.stop()
    assert all(r.restarts == 1 and r.outcome is Outcome.STOPPED for r in reports.values())
    # ctx.restarts in each (None: the stop came before a new process ran its target)
    assert all(r.result in (1, None) for r in reports.values())
    assert sorted(e.worker for e in events if e.event == "restarting") == [0, 1, 2]


# -- hang detection ---------------------------------------------------------------------


@pytest.mark.parametrize("target", [ts.gil_hog, ts.c_sleep])
def test_worker_blocked_in_a_c_call_is_hung(target):
    events: list[Event] = []
    with controller(target, 1, events, heartbeat=0.3, grace=0.3) as pc:
        pc.run()
        assert pc.wait(20)
        [report] = pc.reports.values()
    assert report.outcome is Outcome.HUNG and "heartbeat" in (report.error or "")
    if target is ts.gil_hog:  # holds the GIL: its SIGTERM handler never runs, SIGKILL ends it
        assert report.exitcode == -signal.SIGKILL
    assert [e.event for e in events if e.worker == 0][-1] == "hung"


def test_a_worker_told_to_stop_that_never_sees_it_is_still_hung():
    """broadcast(STOPPED) to a worker blocked in a C call: it never passes the
    checkpoint that would show it the stop, so the heartbeat still finds it
    (for a while it was spared as "told to stop", and wait() never returned)."""
    events: list[Event] = []
    inside = multiprocessing.get_context("fork").Event()
    with controller(ts.c_sleep_once_inside, 1, events, args=(inside,), heartbeat=0.2, grace=0.3) as pc:
        pc.run()
        assert inside.wait(30)  # (a stop that came before would be seen at its checkpoint)
        with contextlib.suppress(TimeoutError):
            pc.broadcast(State.STOPPED, timeout=0.1)
        assert pc.wait(20)
    assert pc.reports[0].outcome is Outcome.HUNG
    assert [e.event for e in events if e.event == "hung"] == ["hung"]


def test_a_hung_worker_is_killed_and_restarted_while_the_script_does_something_else():
    """Supervision needs no call of the script's: the controller's own thread
    pumps (the script here only waits on its own Event)."""
    import threading

    restarted = threading.Event()

    def on_event(e: Event) -> None:
        if e.event == "running" and e.worker == 0 and pc.status()[0].restarts == 1:
            restarted.set()

    with ProcessController(ts.c_sleep, 1, on_event=on_event, heartbeat=0.3, restart="on-failure",
                           backoff=(0.0, 0.0), start_method="fork", grace=0.5) as pc:
        first = pc.pids()[0]
        pc.run()
        assert restarted.wait(15), "no restart without a call of the script's"
        assert first not in pc.pids()
        [report] = pc.history(0)[:1]
        assert report.outcome is Outcome.HUNG


@pytest.mark.parametrize("where", ["script", "background"])
def test_stop_from_on_event_stops_the_others_gracefully(where):
    """"Stop at the first failure" from on_event, whichever thread runs it: the
    stop waits for the workers as any stop does (it was SIGKILLing them at
    once, reported killed, with "ignored SIGTERM" in the log)."""
    import threading

    said: dict = {}
    done = threading.Event()

    def on_event(e: Event) -> None:
        if e.event == "crashed" and not said:
            said["thread"] = threading.current_thread().name
            said["reports"] = pc.stop(grace=10)
            done.set()

    # A heartbeat gives the controller its own thread; without one, only the script's calls pump.
    # In the background, worker 0 dies once run() has returned: a death during run() is the
    # script's to see (its wait for the acknowledgements pumps).
    target = ts.first_crashes if where == "script" else ts.shard
    with ProcessController(target, 3, on_event=on_event, start_method="fork",
                           heartbeat=30.0 if where == "background" else None) as pc:
        pc.run()
        if where == "script":
            pc.wait(20)
        else:
            os.kill(pc.pids()[0], signal.SIGKILL)
        assert done.wait(20)
    assert (said["thread"] == "MainThread") == (where == "script")
    reports = said["reports"]
    assert reports[0].outcome is Outcome.CRASHED
    # Stopped gracefully, not killed; a worker the STOPPED reached before its RUN (worker
    # 0's crash can come while run() waits for the others) stops before its target: no result.
    assert [reports[w].outcome for w in (1, 2)] == [Outcome.STOPPED] * 2
    assert reports[1].result in ((1, 3), None) and reports[2].result in ((2, 3), None)


def test_looks_hung_tells_a_queued_worker_from_a_sleeping_one():
    """The second look (without processes): the kernel counts a wait for a CPU
    only when the task next gets one, so a worker queued through the whole
    look shows no change, as a sleeper does; its state tells them apart."""
    before = SchedSample(ran=10**9, waited=10**9, runnable=True)

    def after(ran_ms: float, waited_ms: float, runnable: bool) -> SchedSample:
        return SchedSample(before.ran + int(ran_ms * 1e6), before.waited + int(waited_ms * 1e6), runnable)

    assert not looks_hung(before, after(0, 0, True), 0.0125)  # queued all along: not counted yet
    assert looks_hung(before, after(0, 0, False), 0.0125)  # asleep (blocked in a C call)
    assert looks_hung(before, after(0, 2, False), 0.0125)  # asleep most of the look
    assert not looks_hung(before, after(0, 10, False), 0.0125)  # waited for a CPU, then got one
    assert looks_hung(before, after(5, 0, True), 0.0125)  # ran and did not answer: not checkpointing
    assert looks_hung(None, after(0, 0, True), 0.0125)  # no /proc: the second look decides
    sample = sched_sample(os.getpid())
    assert sample is not None and sample.runnable and sample.ran > 0  # this process, running now


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one for the starved worker")
def test_a_worker_starved_of_cpu_is_not_hung():
    """A tight checkpoint loop that a busier process keeps off its CPU (a
    crowded machine) is runnable, not hung: at the smallest heartbeat, it was
    killed as hung within a tenth of a second."""
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))
    theirs, ours_ = cpus[0], set(cpus[1:])
    mine = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    events: list[Event] = []
    try:
        os.sched_setaffinity(hog.pid, {theirs})
        os.sched_setaffinity(0, ours_)  # the manager answers from the other CPU(s)
        with controller(ts.starved, 1, events, args=(theirs,), heartbeat=0.05, grace=30.0) as pc:
            pc.run()
            assert not pc.wait(1.5)  # thirty heartbeat periods
            hog.kill()
            hog.wait(10)
            # Back to a normal priority on any CPU, for its stop: at SCHED_IDLE, the rest
            # of the suite's load kept it from its next checkpoint past the grace.
            # (Without privilege, SCHED_IDLE cannot be left: then any idle CPU serves it.)
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pc.pids()[0], mine)
            with contextlib.suppress(OSError):
                os.sched_setscheduler(pc.pids()[0], os.SCHED_OTHER, os.sched_param(0))
            reports = pc.stop()
    finally:
        os.sched_setaffinity(0, mine)
        hog.kill()
        hog.wait(10)
    assert [(e.event, e.t) for e in events if e.event == "hung"] == []
    assert reports[0].outcome is Outcome.STOPPED and reports[0].result > 0


def test_a_worker_saving_its_state_after_the_stop_is_not_hung():
    """A worker that saw the stop owes no more checkpoints: what it does on the
    way out (here 0.6 s, three heartbeat periods) is bounded by the grace. It
    was killed as hung a period after the stop, its result lost."""
    events: list[Event] = []
    with controller(ts.saves_after_stop, 2, events, args=(0.6,), heartbeat=0.2, grace=30.0) as pc:
        pc.run()
        reports = pc.stop()
    assert [e.event for e in events if e.event == "hung"] == []
    assert [(r.outcome, r.result) for r in reports.values()] == [(Outcome.STOPPED, "saved")] * 2


@pytest.mark.parametrize("how", ["its result takes long to pickle", "a SIGTERM from outside, then it saves"])
def test_a_worker_past_its_last_checkpoint_is_not_hung(how):
    """A target that returned (its result pickled and sent), or that a SIGTERM
    from outside stopped (as the README says, the graceful stop), owes no
    checkpoint: both were killed as hung a period later, the result lost."""
    events: list[Event] = []
    if how.startswith("its result"):
        with controller(ts.slow_result, 1, events, args=(0.6,), heartbeat=0.1, grace=30.0) as pc:
            pc.run()
            assert pc.wait(30)
        expected = (Outcome.FINISHED, "pickled")
    else:
        inside = multiprocessing.get_context("fork").Event()
        with controller(ts.saves_after_stop, 1, events, args=(0.6, inside), heartbeat=0.1, grace=30.0) as pc:
            pc.run()
            assert inside.wait(30)  # (a SIGTERM before its target runs is a stop with no result)
            os.kill(pc.pids()[0], signal.SIGTERM)
            assert pc.wait(30)
        expected = (Outcome.STOPPED, "saved")
    assert [e.event for e in events if e.event == "hung"] == []
    assert (pc.reports[0].outcome, pc.reports[0].result) == expected


def test_a_worker_past_its_last_checkpoint_still_ends_within_the_grace():
    """No checkpoint is owed after the target returned, but a process that then
    never ends (a result whose pickling blocks) is killed after the grace, as in
    a stop: not hung, not left running."""
    events: list[Event] = []
    with controller(ts.slow_result, 1, events, args=(600,), heartbeat=0.1, grace=0.5) as pc:
        pc.run()
        assert pc.wait(30)
    assert [e.event for e in events if e.event == "hung"] == []
    assert pc.reports[0].outcome is Outcome.KILLED


def test_progress_from_a_helper_thread_does_not_undo_the_end_of_the_beats():
    """A helper's progress() that read "beats owed" just before the target
    returned wrote its answer over BEAT_DONE: the next probe went unanswered and
    the worker was killed as hung, its result lost (6 to 15 of 64 workers)."""
    events: list[Event] = []
    with controller(ts.result_with_a_chatty_helper, 16, events, args=(0.4,), heartbeat=0.1, grace=30.0) as pc:
        pc.run()
        assert pc.wait(60)
    assert [e.worker for e in events if e.event == "hung"] == []
    assert {(r.outcome, r.result) for r in pc.reports.values()} == {(Outcome.FINISHED, "pickled")}


def test_a_worker_a_resize_started_that_does_not_come_up_fails(tmp_path):
    """resize() raises when a new worker does not come up within start_timeout;
    that worker was left running unseen (status RUNNING, wait() held)."""
    stuck = tmp_path / "stuck"
    with controller(ts.loops_with, 1, args=(ts.StuckOnRestart(str(stuck)),), start_method="forkserver") as pc:
        pc.run()
        stuck.touch()  # from now on a worker that starts blocks as it unpickles its arguments
        pc.start_timeout = 1.0
        with pytest.raises(WorkerStartError, match="did not come up"):
            pc.resize(2)
        assert reap_n(pc, 1)[0].worker_id == 1
        assert not pc.status()[1].alive
        pc.stop()
    assert pc.reports[1].outcome is Outcome.FAILED and "did not come up" in pc.reports[1].error
    assert pc.reports[0].outcome is Outcome.STOPPED


def test_wait_readable_waits_through_heartbeat_probes():
    """A probe is not a command: wait_readable() on a silent pipe waits out its
    timeout (it returned False at the first probe, a heartbeat period in)."""
    with controller(ts.waits_on_a_silent_pipe, 1, heartbeat=0.1, args=(1.0,)) as pc:
        pc.run()
        assert pc.wait(30)
    said, waited = pc.reports[0].result
    assert said is False and waited >= 0.95


def test_wait_readable_after_the_stop_returns_at_once():
    """Once told to stop, wait_readable() has nothing to wait for (as sleep()):
    without a timeout it blocked for ever, and the worker was killed after the grace."""
    with controller(ts.waits_after_the_stop, 1, grace=30.0) as pc:
        pc.run()
        reports = pc.stop()
    assert (reports[0].outcome, reports[0].result) == (Outcome.STOPPED, False)


def test_kill_is_final():
    """As the README says of kill(): nothing is restarted, and run() or resize()
    after it raise as after a stop (resize started new workers)."""
    with controller(ts.shard, 2, restart="always") as pc:
        pc.run()
        pc.kill()
        assert pc.wait(30)
        for call in (pc.run, lambda: pc.resize(4), pc.pause):
            with pytest.raises(RuntimeError, match="kill is final"):
                call()
        assert [r.outcome for r in pc.reports.values()] == [Outcome.KILLED] * 2
        assert len(pc.pids()) == 0 or all(not s.alive for s in pc.status())


@pytest.mark.parametrize("frozen_while", ["running", "paused"])
def test_a_frozen_worker_is_hung_and_restarted(frozen_while):
    """A worker frozen from outside (SIGSTOP) is hung as the README says, also
    when it was frozen while paused and then told to run: that one was never
    found (run() timed out, and it stayed PAUSED for ever)."""
    events: list[Event] = []
    with controller(ts.shard, 2, events, heartbeat=0.2, restart="on-failure", grace=0.5) as pc:
        pc.run()
        if frozen_while == "paused":
            pc.pause()
        frozen = pc.pids()[0]
        os.kill(frozen, signal.SIGSTOP)
        try:
            pc.run(timeout=30)  # returns once the frozen worker is found hung and killed
            assert reap_n(pc, 1)[0].outcome is Outcome.HUNG
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
        pc.stop()
    assert [(e.event, e.worker) for e in events if e.event in ("hung", "restarting")] == [
        ("hung", 0), ("restarting", 0)]


def test_a_restart_that_never_comes_up_fails_and_the_policy_applies(tmp_path):
    """start() waits start_timeout for its workers; a restart has nobody to wait
    for it, and one stuck as it started stayed "running" for ever. Now it is
    killed after start_timeout and fails, and the policy goes on (here: the
    restart limit, one, is reached)."""
    events: list[Event] = []
    with controller(ts.crash_then_stuck, 2, events, args=(ts.StuckOnRestart(str(tmp_path / "crashed")),),
                    start_method="forkserver", restart="on-failure", max_restarts=1) as pc:
        pc.start_timeout = 1.0
        pc.run()
        assert pc.wait(30)
    assert pc.gave_up
    failed = [e for e in events if e.event == "failed" and e.worker == 0]
    assert len(failed) == 1 and "did not come up within 1s" in failed[0].error
    assert [e.event for e in events if e.worker == 0 and e.event in ("crashed", "restarting", "failed", "gave_up")] \
        == ["crashed", "restarting", "failed", "gave_up"]


def test_live_workers_are_not_hung():
    events: list[Event] = []
    targets = [ts.busy_checkpoints, ts.progress_only, ts.long_sleep]
    # (heartbeat well above what a loaded machine's scheduler may keep a process waiting)
    with ProcessController(ts.dispatch, 3, args=(targets, 1.6), heartbeat=0.4, grace=0.3, on_event=events.append,
                           start_method="fork") as pc:
        pc.run()
        assert not pc.wait(1.6)  # four heartbeat periods
        assert all(s.alive and s.beat_age is not None and s.beat_age < 5.0 for s in pc.status())
        pc.pause()
        assert not pc.wait(0.9)  # a paused worker is never hung
        assert all(s.alive and s.beat_age is None for s in pc.status())
        pc.stop()
    assert not any(e.event == "hung" for e in events)
    assert all(r.outcome is Outcome.STOPPED for r in pc.reports.values())


def test_beat_age_follows_the_silence_within_a_quarter_period():
    # T=4: a worker silent for 3.2 s (not hung) after answering every probe
    # has a beat_age of at least 3.2 - T/4 > T/2 (the live view's mark); it
    # read 0 while its last probe was answered and the next one was T away.
    # (Its silence lasts 3.9 s: the test's look may come 0.7 s late under load.)
    silent = multiprocessing.get_context("fork").Event()
    with ProcessController(ts.beats_then_silent, 1, args=(silent, 3.9), heartbeat=4.0, start_method="fork") as pc:
        pc.run()
        assert silent.wait(30)
        time.sleep(3.2)  # the silence under test
        age = pc.status()[0].beat_age
        assert age is not None and age > 2.0, age
        assert pc.wait(30)
    assert pc.reports[0].outcome is Outcome.FINISHED


def test_the_second_look_at_a_silent_worker_comes_a_quarter_period_after_the_first(monkeypatch):
    # Other workers' probes run the timer every few milliseconds: the deciding
    # look must still wait T/4 (the scheduler's counts say nothing sooner); it
    # came 0-30 ms after the first, and live workers short of a CPU were killed as hung.
    gaps: list[float] = []
    confirm = ProcessController._confirm_hang

    def looked(self, w, now):
        if w.suspect is not None:
            gaps.append(now - w.suspect[0])
        return confirm(self, w, now)

    monkeypatch.setattr(ProcessController, "_confirm_hang", looked)
    targets = [ts.c_sleep] + [ts.long_sleep] * 5
    with ProcessController(ts.dispatch, 6, args=(targets,), heartbeat=0.8, grace=0.3, start_method="fork") as pc:
        pc.run()
        ended = pc.reap(timeout=30)  # the hung one, killed (no restart policy)
        pc.stop()
    assert [(r.worker_id, r.outcome) for r in ended] == [(0, Outcome.HUNG)]
    assert gaps and min(gaps) >= 0.8 / 4 * 0.9, gaps


def test_live_view_marks_a_silent_worker():
    pytest.importorskip("rich")
    from procctl.live import LiveView

    view = LiveView(lambda: [], "t", heartbeat=1.0)
    row = WorkerStatus(0, 1, State.RUNNING, True, restarts=2, beat_age=0.7)
    assert view.silent(row) and not view.silent(WorkerStatus(0, 1, State.RUNNING, True, beat_age=0.2))
    assert "no beat" in str(view._cells(row)["state"]) and "r2" in str(view._cells(row)["state"])


# -- resize and per-worker commands ---------------------------------------------------------


@pytest.mark.parametrize("state", [State.RUNNING, State.PAUSED])
def test_resize_up_and_down(state):
    events: list[Event] = []
    with controller(ts.shard, 2, events, initial_state=state) as pc:
        pc.broadcast(state)  # (a command after the first: the new workers start from it)
        pc.resize(4)
        rows = pc.status()
        assert [r.worker_id for r in rows] == [0, 1, 2, 3] and all(r.alive for r in rows)
        assert all(r.state is state for r in rows)
        said = state.name.lower()
        assert sorted(e.worker for e in events if e.event == said) == [0, 1, 2, 3]  # the new ones too
        pc.resize(1)
        assert [r.worker_id for r in pc.status()] == [0] and len(pc.pids()) == 1
        assert {w: r.outcome for w, r in pc.reports.items()} == {w: Outcome.STOPPED for w in (1, 2, 3)}
        pc.resize(2)  # the next free id again, a new worker
        assert [r.alive for r in pc.status()] == [True, True]
        pc.run()
        reports = pc.stop()
    assert reports[0].result == (0, 2)
    # ctx.workers is the count when it started (started RUNNING, a new worker may
    # see the stop before its target runs: no result then)
    assert reports[1].result == (1, 2) or (state is State.RUNNING and reports[1].result is None)
    assert [r.outcome for r in pc.history(1)] == [Outcome.STOPPED, Outcome.STOPPED]


def test_ctx_workers_follows_a_resize():
    """ctx.workers is the size now, for the workers already running too (a
    target that shards by it: worker 0 said 2 after a resize to 4)."""
    ts.drain_looks()
    with controller(ts.size_seen, 2) as pc:
        pc.run()
        ts.looked({0, 1})  # (run() returns once the workers took the command: before they look)
        pc.resize(4)
        pc.pause()  # (each worker's next checkpoint comes after the resize)
        ts.drain_looks()
        pc.run()
        ts.looked({0, 1, 2, 3})
        pc.resize(3)
        pc.pause()
        ts.drain_looks()
        pc.run()
        ts.looked({0, 1, 2})
        seen = {wid: r.result for wid, r in pc.stop().items()}
    assert seen[0] == seen[1] == [2, 4, 3], seen
    assert seen[2][-2:] == [4, 3] and seen[3][-1] == 4, seen


def test_resizes_from_several_threads_leave_every_worker_alive():
    # A grow from one thread reused ids whose processes a shrink from another
    # was still stopping: that stop's escalation then SIGKILLed the new ones.
    import threading

    for _ in range(3):
        with ProcessController(ts.shard, 2, initial_state=State.RUNNING) as pc:
            threads = [threading.Thread(target=pc.resize, args=(n,)) for n in (5, 1, 4, 3, 6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            rows = pc.status()
            assert [r.worker_id for r in rows] == list(range(len(rows)))
            assert all(r.alive for r in rows), rows
            assert all(r.outcome is Outcome.STOPPED for r in pc.reports.values()), pc.reports  # (by shrinks)
            pc.stop()


def test_per_worker_commands():
    with controller(ts.shard, 3) as pc:
        pc.run(workers=[0, 2])
        assert [r.state for r in pc.status()] == [State.RUNNING, State.PAUSED, State.RUNNING]
        pc.pause(workers=[2])
        pc.run(workers=[1])
        assert [r.state for r in pc.status()] == [State.RUNNING, State.RUNNING, State.PAUSED]
        stopped = pc.stop(workers=[1])
        assert list(stopped) == [1] and stopped[1].outcome is Outcome.STOPPED
        assert [r.alive for r in pc.status()] == [True, False, True]
        pc.run()  # a broadcast reaches the live ones
        assert [r.state for r in pc.status() if r.alive] == [State.RUNNING, State.RUNNING]
        reports = pc.stop()
    assert all(r.outcome is Outcome.STOPPED for r in reports.values())


# -- the command line ------------------------------------------------------------------------


def test_cli_restart_limit_exits_1(tests_dir):
    res = run_cli(["run", "--target", "targets_supervision:always_fail", "--workers", "2", "--schedule", "run",
                   "--restart", "on-failure", "--max-restarts", "2", "--backoff", "0,0", "--json"],
                  timeout=40, cwd=tests_dir)
    assert res.returncode == 1, res.stderr
    assert "restart limit was reached" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    events = json_events(res.stdout)
    assert [e["event"] for e in events].count("restarting") == 2
    assert any(e["event"] == "gave_up" for e in events) and events[-1].get("gave_up") is True


def test_cli_heartbeat_finds_a_hung_worker(tests_dir):
    res = run_cli(["run", "--target", "targets_supervision:c_sleep", "--workers", "1", "--schedule", "run",
                   "--heartbeat", "0.3", "--grace", "0.3", "--json"], timeout=40, cwd=tests_dir)
    assert res.returncode == 1, res.stderr
    events = json_events(res.stdout)
    assert any(e["event"] == "hung" and e["worker"] == 0 for e in events), res.stdout + res.stderr
    assert events[-1].get("outcomes") == {"hung": 1}, res.stdout + res.stderr


@pytest.mark.parametrize("args", [["--restart", "sometimes"], ["--max-restarts", "-1"], ["--heartbeat", "0"],
                                  ["--heartbeat", "nan"], ["--backoff", "2,1"], ["--strategy", "x"],
                                  ["--max-workers", "1", "--workers", "2"]])
def test_cli_bad_supervision_flags(args):
    res = run_cli(["run", *args], timeout=30)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_cli_max_workers_past_the_system_is_a_cap_not_a_refusal():
    # A generous --max-workers ("no practical cap") was refused at start (exit 2).
    res = run_cli(["run", "--workers", "1", "--schedule", "stop", "--max-workers", "99999999", "--quiet"],
                  timeout=30)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_cli_backoff_takes_what_the_library_takes():
    from procctl.cli import parse_backoff

    # An exponent's '-' is not the MIN-MAX form's (1e-3,0.5 was refused).
    assert parse_backoff("1e-3,0.5") == (0.001, 0.5) and parse_backoff("0.1,1E-1") == (0.1, 0.1)
    assert parse_backoff("0.1-10") == (0.1, 10.0) and parse_backoff("1e-3-0.5") == (0.001, 0.5)
    res = run_cli(["run", "--backoff", "-1,2"], timeout=30)
    assert res.returncode == 2 and "must be >= 0" in res.stderr, res.stderr  # (not "must look like")


def test_a_stop_asked_for_while_it_grows_ends_the_growth():
    # The command line's stop (a SIGTERM, `procctl stop`) may come while
    # thousands of workers start: the growth ends there, without an error.
    events: list[Event] = []
    with controller(ts.shard, 1, events, initial_state=State.PAUSED) as pc:
        pc._interrupt_waits = lambda: len(pc._workers) >= 4  # "a stop came" once 4 exist
        pc.resize(40)
        assert pc.workers == 4 and all(r.alive for r in pc.status())
        reports = pc.stop()
    assert sorted(reports) == [0, 1, 2, 3]


def test_a_stop_asked_for_while_it_shrinks_does_not_wait_for_the_removed_worker():
    """A shrink waits for the removed worker to end, up to the grace; a stop asked
    for meanwhile (the command line's SIGINT, `procctl stop`, the q key) waited
    for all of it before the others were even told to stop."""
    inside = multiprocessing.get_context("fork").Event()
    with controller(ts.last_ignores_the_stop, 3, args=(inside,), grace=60.0) as pc:
        pc.run()
        assert inside.wait(30)
        pc._interrupt_waits = lambda: True  # "a stop came" as soon as the shrink waits
        pc.resize(2)  # took the 60 s grace
        assert pc.workers == 2 and 2 not in pc.reports  # worker 2 is still ending
        pc.stop(grace=0.5)
    assert [(wid, r.outcome) for wid, r in sorted(pc.reports.items())] == [
        (0, Outcome.STOPPED), (1, Outcome.STOPPED), (2, Outcome.KILLED)]


def test_cli_sigttin_sigttou_resize(tests_dir):
    cli = LiveCli(["run", "--target", "targets_supervision:shard", "--workers", "2", "--schedule", "run",
                   "--step", "0", "--json", "--max-workers", "3"], cwd=tests_dir)
    try:
        def running(ids):
            return lambda lines: {e["worker"] for e in json_events("\n".join(lines))
                                  if e["event"] == "running"} >= ids
        cli.wait_for(running({0, 1}))
        os.kill(cli.proc.pid, signal.SIGTTIN)
        cli.wait_for(running({0, 1, 2}))
        os.kill(cli.proc.pid, signal.SIGTTIN)  # over --max-workers: refused
        os.kill(cli.proc.pid, signal.SIGTTOU)
        cli.wait_for(lambda lines: any(e["event"] == "stopped" and e["worker"] == 2
                                       for e in json_events("\n".join(lines))))
        os.kill(cli.proc.pid, signal.SIGTERM)
        code, out, err = cli.finish()
    finally:
        cli.kill()
    assert code == 143
    assert "--max-workers 3" in err
    summary = json_events(out)[-1]
    assert summary["event"] == "summary", out[-3000:]
    # Three worker ids, each counted once with its last outcome (2 by the shrink, 0 and 1 at the end).
    assert summary["workers"] == 3 and summary["outcomes"] == {"stopped": 3}


def test_timeline_goes_on_after_a_restart(tmp_path):
    from procctl.timeline import build_run, render_timeline

    events = [{"t": 0.0, "event": "running", "worker": 0}, {"t": 0.5, "event": "failed", "worker": 0, "error": "E"},
              {"t": 0.5, "event": "restarting", "worker": 0, "restarts": 1, "delay": 0.1},
              {"t": 0.7, "event": "running", "worker": 0}, {"t": 1.0, "event": "hung", "worker": 0}]
    run = build_run(events)
    [row] = run.rows
    assert [s.start for s in row.spans] == [0.0, 0.7] and row.outcome == "hung"
    assert run.outcome_counts()["failed"] == 1 and run.outcome_counts()["hung"] == 1
    render_timeline(events, tmp_path / "t.svg")
    svg = (tmp_path / "t.svg").read_text()
    assert 'class="outcome failed"' in svg and 'class="outcome hung"' in svg
