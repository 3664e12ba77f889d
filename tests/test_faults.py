"""Real faults in workers, races in commands, and start errors (issue 2)."""

from __future__ import annotations

import hashlib
import importlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import targets
import targets_extra
from procs import session_members as _session_members
from procs import wait_dead

from procctl import Outcome, ProcessController, State, WorkerStartError


def ours() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("procctl-worker")]


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- the target raises, exits, is killed -----------------------------------------


def test_raise_is_failed_with_traceback(start_method):
    with ProcessController(targets.raise_error, 2, start_method=start_method) as pc:
        pc.run()
        assert pc.wait(timeout=30)
    for wid, r in pc.reports.items():
        assert r.outcome is Outcome.FAILED
        assert r.result is None
        assert r.error.startswith("Traceback (most recent call last)")
        assert "raise_error" in r.error and "targets.py" in r.error
        assert r.error.rstrip().endswith(f"ValueError: bad input in worker {wid}")
        assert r.error_line == f"ValueError: bad input in worker {wid}"


def test_a_failing_worker_does_not_disturb_the_others():
    with ProcessController(targets.some_fail, 4, start_method="fork") as pc:
        pc.run()
        failed = []
        while len(failed) < 2:
            failed += pc.reap(timeout=10)
        assert sorted(r.worker_id for r in failed) == [1, 3]
        pc.pause()
        pc.run()
        reports = pc.stop()
    assert [reports[i].outcome for i in range(4)] == [
        Outcome.STOPPED, Outcome.FAILED, Outcome.STOPPED, Outcome.FAILED
    ]
    assert "RuntimeError: odd worker" in reports[1].error
    assert reports[0].result > 0 and reports[2].result > 0


def test_os_exit_is_crashed_with_exitcode(start_method):
    with ProcessController(targets.exit_hard, 2, kwargs={"code": 7}, start_method=start_method) as pc:
        pc.run()
        assert pc.wait(timeout=30)
    for r in pc.reports.values():
        assert r.outcome is Outcome.CRASHED
        assert r.exitcode == 7
        assert r.result is None
        assert "exited with code 7" in r.error


def test_os_exit_zero_is_still_a_crash():
    with ProcessController(targets_extra.write_then_exit_clean, 1, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=10)
    r = pc.reports[0]
    assert r.outcome is Outcome.CRASHED and r.exitcode == 0
    assert "without reporting" in r.error


def test_kill_9_of_one_worker_leaves_the_others_running(start_method):
    with ProcessController(targets.sleep_units, 3, start_method=start_method) as pc:
        pc.run()
        victim = pc.status()[1].pid
        os.kill(victim, signal.SIGKILL)
        wait_dead(victim)
        pc.pause()
        assert {s.worker_id: s.state for s in pc.status() if s.alive} == {
            0: State.PAUSED, 2: State.PAUSED
        }
        pc.run()
        reports = pc.stop(grace=5)
    assert reports[1].outcome is Outcome.CRASHED
    assert reports[1].exitcode == -signal.SIGKILL
    assert "SIGKILL" in reports[1].error
    for i in (0, 2):
        assert reports[i].outcome is Outcome.STOPPED
        assert reports[i].result > 0


def test_segfault_is_crashed_with_minus_11():
    with ProcessController(targets_extra.segfault, 1, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=10)
    r = pc.reports[0]
    assert r.outcome is Outcome.CRASHED
    assert r.exitcode == -signal.SIGSEGV
    assert "SIGSEGV" in r.error


def test_worker_ignoring_stop_and_sigterm_is_killed_in_time(start_method):
    grace = 0.5
    ignoring = multiprocessing.get_context(start_method).Semaphore(0)
    with ProcessController(targets.ignore_stop, 2, args=(ignoring,), start_method=start_method) as pc:
        pc.run()
        # (run() returns before the target's first line: a worker slow to reach it died of the SIGTERM)
        assert ignoring.acquire(timeout=30) and ignoring.acquire(timeout=30)
        t0 = time.monotonic()
        reports = pc.stop(grace=grace)
        took = time.monotonic() - t0
    assert grace <= took < grace + 3  # SIGTERM, its 0.5 s, SIGKILL: not the 5.5 s more of a missed death
    for r in reports.values():
        assert r.outcome is Outcome.KILLED
        assert r.exitcode == -signal.SIGKILL
    assert ours() == []


def test_one_stubborn_worker_among_good_ones():
    with ProcessController(targets_extra.one_busy, 3, kwargs={"busy_id": 0},
                           start_method="fork") as pc:
        pc.run()
        t0 = time.monotonic()
        reports = pc.stop(grace=0.3)
        assert time.monotonic() - t0 < 0.3 + 3  # escalated after its grace (bounds: room for a loaded machine)
    assert reports[0].outcome is Outcome.KILLED
    assert [reports[i].outcome for i in (1, 2)] == [Outcome.STOPPED] * 2


def test_spinning_worker_without_checkpoint_is_terminated():
    with ProcessController(targets_extra.spin_no_checkpoint, 1, start_method="fork") as pc:
        pc.run()
        t0 = time.monotonic()
        reports = pc.stop(grace=0.3)
        assert time.monotonic() - t0 < 0.3 + 3
    assert reports[0].outcome is Outcome.KILLED
    assert reports[0].exitcode in (-signal.SIGTERM, -signal.SIGKILL)


def test_close_on_exit_of_with_block_respects_grace():
    t0 = time.monotonic()
    with ProcessController(targets.ignore_stop, 1, start_method="fork", grace=0.2) as pc:
        pc.run()
    assert time.monotonic() - t0 < 0.2 + 3.5  # (t0 before the start: the start counts too)
    assert pc.reports[0].outcome is Outcome.KILLED


@pytest.mark.parametrize("code, shown, status", [(3, "sys.exit(3)", 3), (0, "sys.exit(0)", 0),
                                                 ("bye", "sys.exit('bye')", 1), (None, "sys.exit(None)", 0)])
def test_sys_exit_in_target_is_a_clear_failure(code, shown, status):
    """A failure that says so; the process ends with the status sys.exit()
    asked for, as a multiprocessing.Process does (it ended with 0)."""
    with ProcessController(targets.call_sys_exit, 1, kwargs={"code": code}, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=10)
    r = pc.reports[0]
    assert r.outcome is Outcome.FAILED
    assert "SystemExit" in r.error
    assert shown in r.error
    assert r.exitcode == status


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_sys_exit_and_an_exception_set_the_exit_status_under_every_start_method(start_method):
    with ProcessController(targets.call_sys_exit, 1, start_method=start_method) as pc:
        pc.run()
        assert pc.wait(timeout=30)
    assert pc.reports[0].outcome is Outcome.FAILED
    assert "sys.exit(3)" in pc.reports[0].error
    assert pc.reports[0].exitcode == 3
    with ProcessController(targets.raise_error, 1, start_method=start_method) as pc:
        pc.run()
        assert pc.wait(timeout=30)
    assert (pc.reports[0].outcome, pc.reports[0].exitcode) == (Outcome.FAILED, 1)  # as multiprocessing's


def test_keyboard_interrupt_raised_in_target_is_failed():
    with ProcessController(targets_extra.raise_keyboard_interrupt, 1, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=10)
    assert pc.reports[0].outcome is Outcome.FAILED
    assert "KeyboardInterrupt" in pc.reports[0].error


# -- results -------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, words",
    [
        (targets.unpicklable_result, ["pickle", "function"]),
        (targets_extra.reduce_raises_result, ["pickle", "refuse to be pickled"]),
        (targets_extra.reduce_exits_result, ["could not be pickled", "SystemExit(4)"]),
        (targets_extra.unloadable_result, ["unpickle", "cannot rebuild"]),
        (targets_extra.recursion_result, ["pickle"]),
    ],
    ids=["lambda", "reduce-raises", "reduce-exits", "fails-to-load", "too-deep"],
)
def test_bad_result_is_a_clear_error_not_a_hang(target, words):
    t0 = time.monotonic()
    with ProcessController(target, 2, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=20)
    assert time.monotonic() - t0 < 10
    for r in pc.reports.values():
        assert r.outcome is Outcome.FAILED, r
        assert r.result is None
        for w in words:
            assert w in r.error


def test_unpicklable_result_under_spawn():
    with ProcessController(targets.unpicklable_result, 1, start_method="spawn") as pc:
        pc.run()
        assert pc.wait(timeout=30)
    assert pc.reports[0].outcome is Outcome.FAILED
    assert "pickle" in pc.reports[0].error


def test_big_result_arrives_whole(start_method):
    with ProcessController(targets.big_result, 1, kwargs={"megabytes": 30},
                           start_method=start_method) as pc:
        pc.run()
        assert pc.wait(timeout=30)
    r = pc.reports[0]
    assert r.outcome is Outcome.FINISHED
    assert r.result == b"x" * (30 << 20)


def test_two_big_results_at_once_with_content_check():
    expected = hashlib.sha256(bytes(range(256)) * ((40 << 20) // 256)).hexdigest()
    with ProcessController(targets_extra.big_payload, 2, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=30)
    for r in pc.reports.values():
        assert r.outcome is Outcome.FINISHED
        assert len(r.result) == 40 << 20
        assert hashlib.sha256(r.result).hexdigest() == expected


def test_big_results_sent_during_stop():
    with ProcessController(targets_extra.big_with_stop, 2, start_method="fork") as pc:
        pc.run()
        reports = pc.stop(grace=20)
    for r in reports.values():
        assert r.outcome is Outcome.STOPPED
        assert r.result == b"y" * (20 << 20)


# -- races between commands and workers ------------------------------------------


@pytest.mark.parametrize("limit", [1, 200, 5000, 20000])
def test_pausing_while_workers_are_finishing(limit):
    with ProcessController(targets.loop, 4, kwargs={"limit": limit}, start_method="fork",
                           ack_timeout=5) as pc:
        rounds = 0
        while not pc.wait(timeout=0):
            t0 = time.monotonic()
            pc.run()
            pc.pause()
            assert time.monotonic() - t0 < 2.0
            rounds += 1
            assert rounds < 10000
        reports = pc.stop()
    assert {r.outcome for r in reports.values()} == {Outcome.FINISHED}
    assert [r.result for r in reports.values()] == [limit] * 4


def test_pausing_while_workers_finish_under_spawn():
    with ProcessController(targets_extra.finish_after, 2, args=(0.05,), start_method="spawn") as pc:
        while not pc.wait(timeout=0):
            pc.run()
            pc.pause()
        reports = pc.stop()
    assert {r.outcome for r in reports.values()} == {Outcome.FINISHED}


def test_stop_while_paused(start_method):
    with ProcessController(targets.sleep_units, 2, start_method=start_method) as pc:
        pc.run()
        pc.pause()
        t0 = time.monotonic()
        reports = pc.stop(grace=5)
        assert time.monotonic() - t0 < 3.0  # at once, not after the 5 s grace
    for r in reports.values():
        assert r.outcome is Outcome.STOPPED
        assert isinstance(r.result, int)
        assert r.exitcode == 0


def test_stop_before_the_first_run(start_method):
    with ProcessController(targets.loop, 2, start_method=start_method) as pc:
        t0 = time.monotonic()
        reports = pc.stop(grace=5)
        assert time.monotonic() - t0 < 3.0  # at once, not after the 5 s grace
    for r in reports.values():
        assert r.outcome is Outcome.STOPPED
        assert r.result is None and r.error is None
        assert r.exitcode == 0


def test_close_right_after_start():
    pc = ProcessController(targets.loop, 3, start_method="fork").start()
    pc.close()
    assert [r.outcome for r in pc.reports.values()] == [Outcome.STOPPED] * 3
    assert ours() == []


def test_run_again_after_a_worker_died_while_paused(start_method):
    with ProcessController(targets.sleep_units, 3, start_method=start_method, ack_timeout=5) as pc:
        pc.run()
        pc.pause()
        victim = pc.status()[0].pid
        os.kill(victim, signal.SIGKILL)
        wait_dead(victim)
        t0 = time.monotonic()
        pc.run()
        assert time.monotonic() - t0 < 1.0
        assert [s.state for s in pc.status()[1:]] == [State.RUNNING] * 2
        pc.pause()
        pc.run()
        reports = pc.stop()
    assert reports[0].outcome is Outcome.CRASHED and reports[0].exitcode == -signal.SIGKILL
    assert [reports[i].outcome for i in (1, 2)] == [Outcome.STOPPED] * 2


def test_run_right_after_kill_without_waiting():
    """The victim may or may not be dead yet when run() is sent: never a hang."""
    for _ in range(5):
        with ProcessController(targets.sleep_units, 3, start_method="fork", ack_timeout=5) as pc:
            pc.run()
            pc.pause()
            os.kill(pc.status()[2].pid, signal.SIGKILL)
            pc.run()
            pc.pause()
            reports = pc.stop()
        assert reports[2].outcome is Outcome.CRASHED


# -- KeyboardInterrupt -------------------------------------------------------------


def test_keyboard_interrupt_in_with_block_closes_everything(start_method):
    fds = fd_count()
    with pytest.raises(KeyboardInterrupt):
        with ProcessController(targets.sleep_units, 2, start_method=start_method) as pc:
            pc.run()
            raise KeyboardInterrupt
    assert ours() == []
    assert [r.outcome for r in pc.reports.values()] == [Outcome.STOPPED] * 2
    with pytest.raises(RuntimeError):
        pc.run()
    if start_method == "fork":
        assert fd_count() == fds


def test_real_sigint_in_with_block_closes_everything():
    with pytest.raises(KeyboardInterrupt):
        with ProcessController(targets.sleep_units, 2, start_method="fork") as pc:
            pc.run()
            signal.raise_signal(signal.SIGINT)
    assert ours() == []
    assert [r.outcome for r in pc.reports.values()] == [Outcome.STOPPED] * 2


def test_second_ctrl_c_while_stopping_kills_at_once():
    fired = []

    def on_event(ev):
        if ev.event == "broadcast" and ev.state == "stopped" and not fired:
            fired.append(ev)
            raise KeyboardInterrupt  # as if Ctrl-C came while stop() waits

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with ProcessController(targets.ignore_stop, 2, start_method="fork", grace=30,
                               on_event=on_event) as pc:
            pc.run()
    assert fired
    assert time.monotonic() - t0 < 5  # not the 30 s grace
    assert ours() == []
    assert [r.outcome for r in pc.reports.values()] == [Outcome.KILLED] * 2


def test_exception_in_with_block_propagates_and_closes():
    with pytest.raises(ZeroDivisionError):
        with ProcessController(targets.loop, 2, start_method="fork") as pc:
            pc.run()
            1 / 0  # noqa: B018 - the point is the ZeroDivisionError
    assert ours() == []
    assert len(pc.reports) == 2


# -- start errors --------------------------------------------------------------------


def _vanishing_target(tmp_path, name):
    mod = tmp_path / f"{name}.py"
    mod.write_text("def work(ctx):\n    return 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
    mod.unlink()
    shutil.rmtree(tmp_path / "__pycache__", ignore_errors=True)
    return module.work


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_target_not_importable_in_child_is_a_start_error(method, tmp_path):
    multiprocessing.get_context(method)  # nothing to warm for spawn
    if method == "forkserver":
        with ProcessController(targets.finish_at_once, 1, start_method=method):
            pass  # warm up the fork server so fd counts compare
    work = _vanishing_target(tmp_path, f"vanishing_{method}")
    fds = fd_count()
    t0 = time.monotonic()
    pc = ProcessController(work, 2, start_method=method)
    with pytest.raises(WorkerStartError) as info:
        pc.start()
    assert time.monotonic() - t0 < 20
    msg = str(info.value)
    assert f"vanishing_{method}" in msg
    assert method in msg
    assert ours() == []
    pc.close()
    assert fd_count() == fds
    sys.modules.pop(f"vanishing_{method}", None)


def test_target_not_importable_works_under_fork(tmp_path):
    work = _vanishing_target(tmp_path, "vanishing_fork")
    with ProcessController(work, 1, start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=10)
    assert pc.reports[0].result == 1
    sys.modules.pop("vanishing_fork", None)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_lambda_target_is_a_start_error(method):
    fds = fd_count()
    t0 = time.monotonic()
    with pytest.raises(WorkerStartError) as info:
        with ProcessController(lambda ctx: 1, 2, start_method=method):
            pass
    assert time.monotonic() - t0 < 20
    assert "lambda" in str(info.value) or "pickle" in str(info.value).lower()
    assert ours() == []
    if method == "spawn":
        assert fd_count() == fds


def test_unpicklable_argument_is_a_start_error():
    with pytest.raises(WorkerStartError):
        with ProcessController(targets.loop, 1, args=(threading.Lock(),), start_method="spawn"):
            pass
    assert ours() == []


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_main_module_target_of_python_c_script(method):
    script = textwrap.dedent(f"""
        import sys, time
        from procctl import ProcessController, WorkerStartError
        def work(ctx):
            return 1
        t0 = time.monotonic()
        try:
            with ProcessController(work, 2, start_method={method!r}) as pc:
                pc.run()
        except WorkerStartError as exc:
            print("START-ERROR", round(time.monotonic() - t0, 2), exc)
            sys.exit(0)
        print("NO-ERROR")
        sys.exit(5)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, (out, err)
    assert "START-ERROR" in out and "work" in out
    assert "Traceback" not in err, err
    left = _session_members(proc.pid)
    gone, alive = psutil.wait_procs(left, timeout=3)
    assert alive == [], [p.cmdline() for p in alive]
