"""Issue 10: no hang, no lost result, whatever a worker does or a caller passes."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import targets
import targets_hardening as th
from procs import end_session, still_running

from procctl import Outcome, ProcessController, State, sum_threshold


def _quick(pc: ProcessController) -> ProcessController:
    pc.term_timeout = 0.5
    pc.kill_timeout = 3.0
    return pc


# -- 1. a worker that execs or closes its fds ends only when its process ends --

@pytest.mark.parametrize("case", [
    pytest.param(("exec", "fork"), id="exec-fork"),
    pytest.param(("closerange", "fork"), id="closerange-fork"),
    pytest.param(("closerange", "spawn"), id="closerange-spawn"),
])
def test_exec_or_closed_fds_do_not_hang_the_controller(case):
    what, method = case
    target = th.exec_sleep if what == "exec" else th.close_fds_and_sleep
    with _quick(ProcessController(target, 1, start_method=method)) as pc:
        pid = pc.pids()[0]
        pc.run()
        t0 = time.monotonic()
        assert pc.wait(timeout=1.0) is False  # still running: its pipe closed, it did not end
        assert time.monotonic() - t0 < 4.0
        assert pc.status()[0].alive
        t0 = time.monotonic()
        reports = pc.stop(grace=0.5)
        took = time.monotonic() - t0
    assert took < 5.0, f"stop took {took:.1f}s"
    assert reports[0].outcome is Outcome.KILLED
    assert reports[0].exitcode == -signal.SIGTERM
    assert not still_running([pid], timeout=1)


# -- 2. a worker that forked a helper is seen to die --------------------------

def test_worker_death_seen_although_its_child_holds_the_pipes(start_method):
    with ProcessController(th.fork_helper_then_die, 1, start_method=start_method) as pc:
        pc.run()
        t0 = time.monotonic()
        reports = pc.reap(timeout=10)
        assert time.monotonic() - t0 < 3.0
        assert [r.outcome for r in reports] == [Outcome.CRASHED]
        assert reports[0].exitcode == -signal.SIGKILL
        assert not pc.status()[0].alive


# -- 3. started from a thread that ended, a GIL-holding worker still dies with the manager --

MANAGER_IN_THREAD = textwrap.dedent("""
    import json, os, sys, threading
    sys.path.insert(0, {tests!r})
    import targets_extra
    from procctl import ProcessController
    pc = ProcessController(targets_extra.gil_hog, 2, start_method={method!r})
    def starter():
        pc.start()
        pc.run()
    t = threading.Thread(target=starter)
    t.start()
    t.join()
    print(json.dumps({{"workers": pc.pids()}}), flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_thread_started_controller_workers_die_with_the_manager(method, tests_dir):
    src = MANAGER_IN_THREAD.format(tests=tests_dir, method=method)
    proc = subprocess.Popen([sys.executable, "-c", src], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        workers = json.loads(line)["workers"]
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert still_running(workers, timeout=2.0) == []
    finally:
        end_session(proc)


# A Ctrl-C to the process group while exec'd children start (a spawn worker,
# the fork server) importing the parent's main module: held until the worker
# has its own handlers, never a KeyboardInterrupt traceback or a lost worker.
CTRL_C_WHILE_IMPORTING = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    if __name__ == "__mp_main__":  # a spawn worker or the fork server, importing this script
        os.killpg(0, signal.SIGINT)
    if __name__ == "__main__":
        import targets
        from procctl import ProcessController
        seen = []
        signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
        with ProcessController(targets.finish_at_once, 3, start_method={method!r}) as pc:
            pc.run()
            assert pc.wait(timeout=60)
            reports = pc.stop()
        print(json.dumps({{"outcomes": sorted(r.outcome.value for r in reports.values()),
                          "manager_saw": len(seen)}}))
""")


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_ctrl_c_while_exec_children_import_is_held_for_the_worker(method, tests_dir, tmp_path):
    out, err = _run_script(tmp_path / "ctrl_c_script.py",
                           CTRL_C_WHILE_IMPORTING.format(tests=tests_dir, method=method))
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    got = json.loads(out)
    assert got["outcomes"] == ["finished"] * 3
    assert got["manager_saw"] >= 1  # the signal was sent, and the manager had it


def _run_script(path, text: str) -> tuple[str, str]:
    """Run a script in its own session (bounded, its processes ended); its stdout and stderr.
    It must exit 0."""
    path.write_text(text)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        return out, err
    finally:
        end_session(proc)


MASK_BELOW_THE_FORK_SERVER = textwrap.dedent("""
    import json, multiprocessing as mp, signal, sys
    sys.path.insert(0, {tests!r})

    def blocked():
        for line in open("/proc/self/status"):
            if line.startswith("SigBlk"):
                return int(line.split()[1], 16) >> (signal.SIGUSR1 - 1) & 1

    def grandchild(q):
        q.put(("grandchild", blocked()))

    def child(q):
        q.put(("child", blocked()))
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
        g = mp.get_context("fork").Process(target=grandchild, args=(q,))
        g.start()
        g.join(30)

    if __name__ == "__main__":
        import targets
        from procctl import ProcessController
        with ProcessController(targets.finish_at_once, 1, start_method="forkserver") as pc:
            pc.run()
            pc.wait(timeout=30)
        q = mp.get_context("forkserver").SimpleQueue()
        p = mp.get_context("forkserver").Process(target=child, args=(q,))
        p.start()
        p.join(60)
        print(json.dumps(dict(q.get() for _ in range(2))))
""")


def test_a_fork_server_child_of_anyone_has_the_usual_mask_and_passes_its_own_on(tests_dir, tmp_path):
    # The fork server procctl starts holds the operator's signals blocked; a
    # user's forkserver process gets the usual mask (SIGUSR1 not blocked), and
    # what it forks keeps the mask it gave it (SIGUSR1 blocked, for sigwait).
    script = tmp_path / "mask_script.py"
    script.write_text(MASK_BELOW_THE_FORK_SERVER.format(tests=tests_dir))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        assert json.loads(out) == {"child": 0, "grandchild": 1}
    finally:
        end_session(proc)


# -- 4. report frames stay whole whatever thread writes them ------------------

def test_progress_from_a_thread_never_corrupts_the_result():
    for _ in range(3):
        with ProcessController(th.progress_thread_and_big_result, 2, start_method="fork",
                               kwargs={"megabytes": 16}) as pc:
            pc.run()
            assert pc.wait(timeout=30)
            reports = pc.stop()
        for wid, r in reports.items():
            assert r.outcome is Outcome.FINISHED, r.error
            assert r.result == bytes([wid % 251]) * (16 << 20)


# -- 5. a SIGTERM from outside while workers start is a graceful stop ---------

# Each worker gets a SIGTERM before it is up: under fork from an at-fork hook
# (held, as every managed signal, until the worker has its handlers), under
# spawn and forkserver while it unpickles its arguments.
SIGTERM_WHILE_STARTING = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    if __name__ == "__main__":
        import targets_hardening as th
        from procctl import ProcessController
        args = ()
        if {method!r} == "fork":
            os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))
        else:
            args = (th.SigtermOnLoad(),)
        pc = ProcessController(th.cooperative, 3, start_method={method!r}, args=args)
        pc.start()  # no WorkerStartError, nobody killed
        reports = pc.stop()
        pc.close()
        print(json.dumps(sorted((r.outcome.value, r.exitcode) for r in reports.values())))
""")


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_sigterm_from_outside_while_workers_start_stops_them_gracefully(method, tests_dir, tmp_path):
    out, err = _run_script(tmp_path / "sigterm_while_starting.py",
                           SIGTERM_WHILE_STARTING.format(tests=tests_dir, method=method))
    assert json.loads(out) == [["stopped", 0]] * 3, err


# Two of three workers SIGTERMed before they are up, under one_for_all: both
# are restarted (the second's group restart replaced the first's).
ONE_FOR_ALL_BEFORE_UP = textwrap.dedent("""
    import json, os, signal, sys, threading
    sys.path.insert(0, {tests!r})
    if __name__ == "__main__":
        import targets_hardening as th
        from procctl import ProcessController
        marks = [os.path.join({tmp!r}, f"term{{i}}") for i in range(2)]
        for mark in marks:
            open(mark, "w").close()
        def sigterm_first_two():  # in each forked child: the first two claim a mark
            for mark in marks:
                try:
                    os.unlink(mark)
                except FileNotFoundError:
                    continue
                os.kill(os.getpid(), signal.SIGTERM)
                return
        os.register_at_fork(after_in_child=sigterm_first_two)
        up, restarting, restarted = threading.Event(), set(), set()
        def on_event(e):
            if e.event == "restarting":
                restarting.add(e.worker)
            elif e.event == "running" and e.worker in restarting:
                restarted.add(e.worker)
                if len(restarted) == 3:
                    up.set()
        pc = ProcessController(th.cooperative, 3, start_method="fork", restart="always",
                               strategy="one_for_all", backoff=(0, 0), on_event=on_event)
        pc.start()
        pc.run()
        up.wait(timeout=30)  # (the supervisor's thread tells on_event)
        print(json.dumps({{"restarted": sorted(restarted), "alive": [s.alive for s in pc.status()]}}))
        pc.stop()
        pc.close()
""")


def test_one_for_all_restarts_every_worker_that_ended_while_starting(tests_dir, tmp_path):
    out, err = _run_script(tmp_path / "one_for_all_before_up.py",
                           ONE_FOR_ALL_BEFORE_UP.format(tests=tests_dir, tmp=str(tmp_path)))
    assert json.loads(out) == {"restarted": [0, 1, 2], "alive": [True, True, True]}, err


# -- 6, 7. NaN is refused; huge timeouts mean "that long" -----------------------

NAN = float("nan")


@pytest.mark.parametrize("kw", ["grace", "ack_timeout"])
def test_nan_in_the_constructor_is_refused(kw):
    with pytest.raises(ValueError, match=kw):
        ProcessController(targets.loop, 1, **{kw: NAN})


def test_nan_timeouts_are_refused():
    with ProcessController(targets.loop, 1, start_method="fork") as pc:
        for call in (lambda: pc.wait(NAN), lambda: pc.reap(NAN), lambda: pc.pause(timeout=NAN),
                     lambda: pc.run(timeout=NAN), lambda: pc.wait_ended(NAN)):
            with pytest.raises(ValueError, match="timeout"):
                call()
        with pytest.raises(ValueError, match="grace"):
            pc.stop(grace=NAN)
        with pytest.raises(ValueError, match="grace"):
            pc.stop(grace=-1)
        with pytest.raises(ValueError, match="state"):
            pc.broadcast(5)
        with pytest.raises(TypeError, match="state"):
            pc.broadcast(2.0)  # (it was RUNNING, while True was refused)
        pc.broadcast("paused")  # a state's name, as it reads in events and status
        assert {s.state for s in pc.status()} == {State.PAUSED}
        assert pc.pids()  # nothing was stopped by the refused calls
    with pytest.raises(ValueError, match="initial_state"):
        ProcessController(targets.loop, 1, initial_state=5)
    for bad in (0, -1):  # every broadcast would time out at once; the same words for both
        with pytest.raises(ValueError, match="ack_timeout must be > 0 seconds"):
            ProcessController(targets.loop, 1, ack_timeout=bad)
    with pytest.raises(TypeError, match="start_method"):
        ProcessController(targets.loop, 1, start_method=5)


def test_huge_timeouts_wait_as_long_as_needed():
    with ProcessController(targets.finish_at_once, 2, start_method="fork", grace=1e10,
                           ack_timeout=3e6) as pc:
        pc.pause(timeout=3e6)
        pc.run(timeout=1e300)
        assert pc.wait(timeout=3e6)
        assert len(pc.reap(timeout=1e10)) == 2
        assert pc.reap(timeout=10**400) == []  # nothing left to wait for
    with ProcessController(targets.loop, 2, start_method="fork") as pc:
        pc.run(timeout=math.inf)
        t0 = time.monotonic()
        reports = pc.stop(grace=3e6)
        assert time.monotonic() - t0 < 5
    assert {r.outcome for r in reports.values()} == {Outcome.STOPPED}


def test_the_worker_sides_waits_refuse_bad_timeouts_and_take_huge_ones():
    with ProcessController(th.worker_waits, 1, start_method="fork") as pc:
        pc.run()
        # (run() returns before the target's first line: a stop sent earlier cut its waits short)
        assert select.select([th.SLEEPING_R], [], [], 30)[0] and os.read(th.SLEEPING_R, 1) == b"z"
        assert not pc.wait(timeout=0.3)  # in its 1e10 s sleep
        reports = pc.stop(grace=5)
    refused, readable, stopped = reports[0].result
    assert refused == ["ValueError", "ValueError", "TypeError", "TypeError", "ValueError", "ValueError",
                       "TypeError", "TypeError", "ValueError", "OSError"]  # (99999: not open, not readable)
    assert readable and stopped
    # The sum job sleeps on the worker side: a huge delay is that long, cut by its timeout.
    with pytest.raises(TimeoutError):
        sum_threshold(threshold=10, delay=3e6, timeout=0.5)


# -- 14. a target that leaves a non-daemon thread running ---------------------

@pytest.mark.parametrize("target", [th.leave_thread_running, th.leave_exit_handler_blocking],
                         ids=["thread", "exit-handler"])
def test_leftover_thread_does_not_keep_the_worker_alive(start_method, target):
    # (An exit handler that blocks held a spawn worker until the grace's SIGTERM:
    # reported finished with exit code -15.)
    with ProcessController(target, 2, start_method=start_method, grace=30) as pc:
        pc.run()
        assert pc.wait(timeout=15)
        reports = pc.stop()
    for r in reports.values():
        assert r.outcome is Outcome.FINISHED
        assert r.result == 42
        assert r.exitcode == 0


# -- 15. one controller, many threads ------------------------------------------

def test_public_methods_are_safe_from_many_threads():
    errors: list[BaseException] = []
    with ProcessController(targets.loop, 4, start_method="fork", ack_timeout=20) as pc:
        pc.run()
        go = threading.Barrier(4)

        def flip(first, second):
            try:
                go.wait(10)
                for _ in range(25):
                    getattr(pc, first)()
                    getattr(pc, second)()
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        def watch():
            try:
                go.wait(10)
                for _ in range(50):
                    assert len(pc.status()) == 4
                    assert pc.wait(timeout=0.01) is False
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=flip, args=("pause", "run")),
                   threading.Thread(target=flip, args=("run", "pause")),
                   threading.Thread(target=watch), threading.Thread(target=watch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(45)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        pc.run()
        assert all(s.alive for s in pc.status())
        reports = pc.stop(grace=5)
    assert {r.outcome for r in reports.values()} == {Outcome.STOPPED}


def test_wait_in_one_thread_does_not_delay_a_pause_in_another():
    with ProcessController(targets.loop, 2, start_method="fork") as pc:
        pc.run()
        waiter = threading.Thread(target=pc.wait, args=(20,))
        waiter.start()
        try:
            t0 = time.monotonic()
            pc.pause()
            assert time.monotonic() - t0 < 5
        finally:
            pc.wakeup()
            waiter.join(10)
        assert not waiter.is_alive()


# -- the collector is quiet while forking, and back on everywhere after --------

@pytest.mark.parametrize("enabled", [True, False])
def test_garbage_collector_state_survives_a_start(enabled):
    import gc

    was = gc.isenabled()
    frozen = gc.get_freeze_count()  # 0, but Python 3.12.1 starts with a few hundred
    (gc.enable if enabled else gc.disable)()
    try:
        with ProcessController(th.collector_on, 2, start_method="fork") as pc:
            assert gc.isenabled() is enabled
            assert gc.get_freeze_count() == frozen
            pc.run()
            assert pc.wait(timeout=15)
            reports = pc.stop()
        assert [r.result for r in reports.values()] == [enabled, enabled]
    finally:
        (gc.enable if was else gc.disable)()


CTRL_C_DURING_STOP = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import targets_hardening as th
    from procctl import ProcessController
    pc = ProcessController(th.told_then_stubborn, 1, args=({marker!r},), grace=1e10, start_method="fork")
    pc.start()
    pc.run()
    if {in_with!r}:
        with pc:
            pc.stop()  # its grace would last for ever: a Ctrl-C cuts it short
    # else: left open; closing it at exit stops it with that grace
""")


CTRL_C_JUST_AFTER_THE_POST = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import targets_hardening as th
    from procctl import ProcessController
    pc = ProcessController(th.told_then_stubborn, 1, args=("/dev/null",), grace=1e10, start_method="fork")
    pc.start()
    pc.run()
    posted = pc._post

    def post_then_ctrl_c(*args, **kwargs):
        posted(*args, **kwargs)
        raise KeyboardInterrupt  # (where a Ctrl-C lands when the manager is slow to its wait)

    pc._post = post_then_ctrl_c
    with pc:
        pc.stop()
""")


def test_a_ctrl_c_just_after_the_stop_was_posted_cuts_it_short_too(tmp_path, tests_dir):
    # Between the post and the wait, it was not marked cut short: close() waited out
    # the whole grace (seen twice in the suite: 15 s, then the test's timeout).
    script = tmp_path / "script.py"
    script.write_text(CTRL_C_JUST_AFTER_THE_POST.format(tests=tests_dir))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=30, start_new_session=True)
    assert proc.returncode == -signal.SIGINT, proc.stderr[-2000:]


@pytest.mark.parametrize("where", ["with-block", "at-exit"])
def test_a_ctrl_c_during_a_long_graceful_stop_ends_it(where, tmp_path, tests_dir):
    """A Ctrl-C while stop() waits out its grace: the with block's close() (or
    the one at exit) kills what is left at once, as a second Ctrl-C does on the
    command line, and the script ends with 130 (it waited the grace again; at
    exit, it waited for ever, or printed 'Exception ignored' and exited 0)."""
    script = tmp_path / "script.py"
    # (The worker, forked, shares the script's stdout: it says there that it was told to stop.)
    script.write_text(CTRL_C_DURING_STOP.format(tests=tests_dir, marker="/dev/stdout", in_with=where == "with-block"))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        seen = b""
        while b"told" not in seen:  # the stop is in its grace
            assert select.select([proc.stdout], [], [], 20)[0], seen
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, proc.stderr.read() if proc.stderr else seen
            seen += chunk
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        proc.wait(10)
    # (An uncaught KeyboardInterrupt ends Python by SIGINT: -2; at exit, procctl says 130.)
    assert proc.returncode == (-signal.SIGINT if where == "with-block" else 130), err
    assert b"Exception ignored" not in err
