"""The public API of ProcessController, with real worker processes (issue 2)."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import time

import psutil
import pytest
import targets
import targets_extra
from procs import wait_dead

from procctl import Outcome, ProcessController, State, WorkerContext, WorkerStartError
from procctl.states import WorkerReport, WorkerStatus


def ours() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("procctl-worker")]


# -- the vocabulary -----------------------------------------------------------


def test_state_values():
    assert issubclass(State, int)
    assert (State.STOPPED, State.PAUSED, State.RUNNING) == (0, 1, 2)
    assert [s.name for s in State] == ["STOPPED", "PAUSED", "RUNNING"]
    assert State(2) is State.RUNNING


def test_outcome_values():
    assert issubclass(Outcome, str)
    assert {o.value for o in Outcome} == {"finished", "stopped", "failed", "crashed", "killed", "hung"}
    assert Outcome("crashed") is Outcome.CRASHED
    assert Outcome.FAILED == "failed"


def test_public_names_importable():
    import procctl

    for name in ("ProcessController", "State", "Outcome", "WorkerContext"):
        assert hasattr(procctl, name)
    assert WorkerContext is procctl.WorkerContext


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"workers": 0}, ValueError),
        ({"workers": -1}, ValueError),
        ({"workers": True}, ValueError),
        ({"workers": "3"}, ValueError),
        ({"workers": 1, "grace": -1.0}, ValueError),
        ({"workers": 1, "initial_state": State.STOPPED}, ValueError),
    ],
)
def test_bad_arguments_rejected_before_any_process(kwargs, exc):
    with pytest.raises(exc):
        ProcessController(targets.loop, **kwargs)
    assert ours() == []


def test_signal_live_refuses_what_is_not_a_signal():
    with ProcessController(targets.loop, 1, start_method="fork") as pc:
        for bad, exc in [(-1, ValueError), (0, ValueError), (10**30, ValueError), (float("nan"), TypeError),
                         (True, TypeError), ("TERM", TypeError)]:
            with pytest.raises(exc, match="sig must be a signal number"):
                pc.signal_live(bad)
        assert all(s.alive for s in pc.status())  # nothing was sent
    assert ours() == []


def test_target_must_be_callable():
    with pytest.raises(TypeError):
        ProcessController("targets:loop", 1)


def test_unknown_start_method_rejected():
    with pytest.raises(ValueError):
        ProcessController(targets.loop, 1, start_method="teleport")


# -- start, context, checkpoint -----------------------------------------------


def test_workers_start_paused(start_method, tmp_path):
    with ProcessController(targets.loop, 2, start_method=start_method) as pc:
        st = pc.status()
        assert [s.worker_id for s in st] == [0, 1]
        assert all(isinstance(s, WorkerStatus) for s in st)
        assert all(s.state is State.PAUSED and s.alive for s in st)
        assert len({s.pid for s in st}) == 2
        for s in st:
            assert psutil.pid_exists(s.pid)
        assert pc.state is State.PAUSED
        assert pc.reports == {}
        assert pc.reap() == []
        assert pc.wait(timeout=0.05) is False  # nobody runs, nobody ends
    assert ours() == []


def test_context_fields_and_checkpoint_semantics(start_method):
    with ProcessController(targets_extra.record_context, 2, start_method=start_method) as pc:
        pids = {s.worker_id: s.pid for s in pc.status()}
        pc.run()
        pc.pause()  # acknowledged at a checkpoint inside the target: it blocks there
        pc.run()
        reports = pc.stop(grace=5.0)
    assert sorted(reports) == [0, 1]
    for wid, r in reports.items():
        assert isinstance(r, WorkerReport)
        assert r.outcome is Outcome.STOPPED, r.error
        seen = r.result
        assert seen["worker_id"] == wid == r.worker_id
        assert seen["pid"] == pids[wid] == r.pid
        assert seen["state_at_entry"] == State.RUNNING
        assert seen["first_checkpoint"] is True
        assert seen["state_after_first"] == State.RUNNING
        # False once STOPPED, then on every later call.
        assert seen["stopped_checkpoints"] == [False, False, False]
        assert seen["state_at_end"] == State.STOPPED
        assert seen["sigint"].__name__ == "_ignored"  # Ctrl-C is the manager's to act on


def test_checkpoint_blocks_while_paused():
    """No iteration of the target happens between pause() returning and run()."""

    with ProcessController(_stamps, 2, start_method="fork") as pc:
        pc.run()
        # Some work before the pause: run() returns once the workers took the
        # command, before their first stamp (a fixed 0.1 s missed it under load).
        left = {0, 1}
        while left:
            assert select.select([_STAMPED_R], [], [], 30)[0], f"workers {left} never stamped"
            left -= set(os.read(_STAMPED_R, 64))
        pc.pause()
        t_paused = time.time()
        assert all(s.state is State.PAUSED for s in pc.status())
        time.sleep(0.3)  # the measurement window, not a synchronisation
        t_resume = time.time()
        pc.run()
        deadline = time.monotonic() + 0.1
        while time.monotonic() < deadline:
            pc.reap(timeout=deadline - time.monotonic())
        reports = pc.stop()
    for r in reports.values():
        stamps = r.result
        assert r.outcome is Outcome.STOPPED
        during = [t for t in stamps if t_paused < t < t_resume]
        assert during == [], f"worker {r.worker_id} ran while paused"
        assert any(t < t_paused for t in stamps) and any(t > t_resume for t in stamps)


#: _stamps writes its worker id here after its first stamp (fork: the test reads it).
_STAMPED_R, _STAMPED_W = os.pipe()


def _stamps(ctx):
    out = []
    while ctx.checkpoint():
        out.append(time.time())
        if len(out) == 1:
            os.write(_STAMPED_W, bytes([ctx.worker_id]))
        time.sleep(0.002)
    return out


def test_initial_state_running_needs_no_run(start_method):
    with ProcessController(
        targets.finish_at_once, 3, start_method=start_method, initial_state=State.RUNNING
    ) as pc:
        assert pc.wait(timeout=30) is True
        reports = pc.reports
    assert {w: (r.outcome, r.result) for w, r in reports.items()} == {
        w: (Outcome.FINISHED, w * 10) for w in range(3)
    }


def test_args_and_kwargs_reach_the_target():
    with ProcessController(
        targets_extra.add, 2, args=(1, 2), kwargs={"scale": 10}, start_method="spawn"
    ) as pc:
        pc.run()
        assert pc.wait(timeout=30)
    assert {w: r.result for w, r in pc.reports.items()} == {0: 30, 1: 31}


def test_lambda_target_works_under_fork():
    with ProcessController(lambda ctx: ctx.worker_id + 100, 2, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=10)
    assert [r.result for r in pc.reports.values()] == [100, 101]


def test_run_pause_run_stop_cycle(start_method):
    with ProcessController(targets.sleep_units, 3, start_method=start_method) as pc:
        pc.run()
        assert [s.state for s in pc.status()] == [State.RUNNING] * 3
        assert pc.state is State.RUNNING
        pc.pause()
        assert [s.state for s in pc.status()] == [State.PAUSED] * 3
        pc.run()
        assert [s.state for s in pc.status()] == [State.RUNNING] * 3
        t0 = time.monotonic()
        reports = pc.stop(grace=5.0)
        assert time.monotonic() - t0 < 2.0
    assert [r.outcome for r in reports.values()] == [Outcome.STOPPED] * 3
    assert all(isinstance(r.result, int) and r.result > 0 for r in reports.values())
    assert all(r.exitcode == 0 for r in reports.values())
    assert [s.alive for s in pc.status()] == [False] * 3
    assert ours() == []


def test_worker_ids_are_zero_to_n_minus_one():
    with ProcessController(targets.finish_at_once, 5, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=10)
    assert sorted(pc.reports) == list(range(5))
    assert [r.result for r in pc.reports.values()] == [0, 10, 20, 30, 40]


# -- wait, reap, status, reports ------------------------------------------------


def test_wait_returns_as_soon_as_the_last_worker_ends():
    with ProcessController(targets_extra.stamp_end, 3, args=(0.1,), start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=30) is True
        returned = time.time()
        last_end = max(r.result for r in pc.reports.values())
    assert len(pc.reports) == 3
    assert all(r.outcome is Outcome.FINISHED for r in pc.reports.values())
    # the last target returned ~0.3 s after run(); wait() must follow it closely
    assert 0 <= returned - last_end < 2.0  # at once, not at the timeout (room for a loaded machine)


def test_wait_times_out_while_workers_live():
    with ProcessController(targets.sleep_units, 1, start_method="fork") as pc:
        pc.run()
        t0 = time.monotonic()
        assert pc.wait(timeout=0.2) is False
        took = time.monotonic() - t0
        assert 0.15 <= took < 2.0
        assert pc.reports == {}


def test_wait_true_after_close():
    pc = ProcessController(targets.loop, 1, start_method="fork")
    with pc:
        pass
    assert pc.wait(timeout=0) is True


def test_reap_returns_only_newly_ended():
    with ProcessController(targets_extra.one_exits, 3, kwargs={"dead_id": 1, "code": 4},
                           start_method="fork") as pc:
        assert pc.reap() == []
        pc.run()
        first = pc.reap(timeout=10)
        assert [r.worker_id for r in first] == [1]
        assert first[0].outcome is Outcome.CRASHED and first[0].exitcode == 4
        assert pc.reap() == []  # nothing new
        assert list(pc.reports) == [1]
        st = {s.worker_id: s for s in pc.status()}
        assert st[1].alive is False and st[0].alive and st[2].alive
        reports = pc.stop()
    assert sorted(reports) == [0, 1, 2]
    assert reports[1] == first[0]
    assert [r.outcome for r in (reports[0], reports[2])] == [Outcome.STOPPED] * 2


def test_reap_blocks_until_one_ends():
    with ProcessController(targets_extra.stamp_end, 2, args=(0.2,), start_method="fork") as pc:
        pc.run()
        t0 = time.monotonic()
        got = pc.reap(timeout=None)
        assert got and time.monotonic() - t0 < 5
        got += pc.reap(timeout=None) if len(got) < 2 else []
        assert sorted(r.worker_id for r in got) == [0, 1]


def test_report_fields_and_timing(start_method):
    t_before = time.time()
    with ProcessController(targets_extra.finish_after, 2, args=(0.2,), start_method=start_method) as pc:
        pids = [s.pid for s in pc.status()]
        pc.run()
        assert pc.wait(timeout=30)
    t_after = time.time()
    for wid, r in pc.reports.items():
        assert r.worker_id == wid
        assert r.pid == pids[wid]
        assert r.outcome is Outcome.FINISHED
        assert isinstance(r.result, float)
        assert r.error is None
        assert r.exitcode == 0
        assert t_before <= r.started <= r.result <= r.ended <= t_after
        assert r.duration >= 0.2
        assert r.duration == pytest.approx(r.ended - r.started)


def test_stop_reports_every_worker_and_is_idempotent():
    pc = ProcessController(targets.loop, 2, start_method="fork")
    pc.start()
    pc.run()
    first = pc.stop(grace=2)
    again = pc.stop(grace=2)
    assert first == again
    assert sorted(first) == [0, 1]
    pc.close()
    pc.close()
    with pytest.raises(RuntimeError):
        pc.run()
    with pytest.raises(RuntimeError):
        pc.start()
    assert ours() == []


def test_commands_before_start_are_refused():
    pc = ProcessController(targets.loop, 1, start_method="fork")
    with pytest.raises(RuntimeError):
        pc.run()
    with pytest.raises(RuntimeError):
        pc.broadcast(State.PAUSED)
    pc.close()
    assert ours() == []


def test_stopped_is_final():
    with ProcessController(targets.loop, 1, start_method="fork") as pc:
        pc.run()
        pc.broadcast(State.STOPPED)
        with pytest.raises(RuntimeError):
            pc.run()
        assert pc.wait(timeout=10)
    assert pc.reports[0].outcome is Outcome.STOPPED


def test_status_of_an_ended_worker():
    with ProcessController(targets.finish_at_once, 2, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=10)
        st = pc.status()
        assert [s.alive for s in st] == [False, False]
        assert all(s.state is State.STOPPED for s in st)
        assert pc.pids() == []


# -- broadcast ---------------------------------------------------------------


def test_broadcast_timeout_names_the_busy_worker():
    # (The same under every start method: the acknowledgements are the controller's, once started.)
    with ProcessController(targets_extra.one_busy, 3, kwargs={"busy_id": 2},
                           start_method="fork", grace=0.3) as pc:
        pc.run()  # worker 2 acknowledged RUNNING, then went busy
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            pc.pause(timeout=0.5)
        took = time.monotonic() - t0
        assert 0.45 <= took < 1.5
        msg = str(info.value)
        assert "2" in msg.replace("0.5", "")
        assert "0" not in msg.replace("0.5", "") and "1" not in msg.replace("0.5", "")
        # the others did pause
        st = {s.worker_id: s.state for s in pc.status()}
        assert st[0] is State.PAUSED and st[1] is State.PAUSED
        # and the controller stays usable
        with pytest.raises(TimeoutError):
            pc.run(timeout=0.2)
        t0 = time.monotonic()
        reports = pc.stop()
        assert time.monotonic() - t0 < 0.3 + 0.5 + 1.5
    assert reports[2].outcome is Outcome.KILLED
    assert reports[2].exitcode == -signal.SIGKILL
    assert reports[0].outcome is Outcome.STOPPED and reports[1].outcome is Outcome.STOPPED


def test_broadcast_timeout_on_a_sigstopped_worker():
    with ProcessController(targets.sleep_units, 2, start_method="fork", grace=0.2) as pc:
        pc.run()
        pid = pc.status()[1].pid
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(TimeoutError, match="1"):
            pc.pause(timeout=0.5)
        t0 = time.monotonic()
        reports = pc.stop()
        assert time.monotonic() - t0 < 0.2 + 0.5 + 1.5
    assert reports[1].outcome is Outcome.KILLED
    assert reports[1].exitcode in (-signal.SIGTERM, -signal.SIGKILL)
    assert reports[0].outcome is Outcome.STOPPED


def test_broadcast_reaps_ended_workers_first(start_method):
    with ProcessController(targets.loop, 3, start_method=start_method) as pc:
        victim = pc.status()[0].pid
        os.kill(victim, signal.SIGKILL)
        wait_dead(victim)
        pc.run()  # no reap(), no status(): run() itself reaps first
        assert list(pc.reports) == [0]
        assert pc.reports[0].outcome is Outcome.CRASHED
        assert pc.reports[0].exitcode == -signal.SIGKILL
        assert [s.state for s in pc.status()[1:]] == [State.RUNNING] * 2
        reports = pc.stop()
    assert [reports[i].outcome for i in (1, 2)] == [Outcome.STOPPED] * 2


def test_broadcast_never_blocks_on_a_dying_worker():
    with ProcessController(targets_extra.one_exits, 3, kwargs={"dead_id": 0},
                           start_method="fork", ack_timeout=30) as pc:
        for _ in range(10):
            t0 = time.monotonic()
            pc.run()
            pc.pause()
            assert time.monotonic() - t0 < 1.0
        reports = pc.stop()
    assert reports[0].outcome is Outcome.CRASHED and reports[0].exitcode == 9
    assert [reports[i].outcome for i in (1, 2)] == [Outcome.STOPPED] * 2


def test_broadcast_when_all_workers_are_dead():
    with ProcessController(targets.finish_at_once, 2, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=10)
        t0 = time.monotonic()
        pc.pause()
        pc.run()
        assert time.monotonic() - t0 < 0.5
        reports = pc.stop()
    assert [r.outcome for r in reports.values()] == [Outcome.FINISHED] * 2


def test_start_error_type_is_exported():
    assert issubclass(WorkerStartError, Exception)
