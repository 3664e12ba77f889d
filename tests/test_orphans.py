"""No orphans when the manager is SIGKILLed; workers ignore SIGINT (issue 2)."""

from __future__ import annotations

import json
import os
import select
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
from procs import end_session
from procs import session_members as _session_members

from procctl import Outcome, ProcessController, ProcessExecutor, State

MANAGER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import targets, targets_extra
    from procctl import ProcessController
    target = {target}
    pc = ProcessController(target, {workers}, start_method={method!r})
    pc.start()
    if {run}:
        pc.run()
    print(json.dumps({{"manager": os.getpid(), "workers": pc.pids()}}), flush=True)
    sys.stdin.read()  # until the test kills us
""")

MODES = {
    # worker spins in Python code between checkpoints
    "running": ("targets.loop", True),
    # worker blocks inside checkpoint(), never run
    "paused": ("targets.loop", False),
    # worker sleeps outside any checkpoint, SIGTERM ignored
    "sleeping": ("targets_extra.sleep_outside", True),
}


class Exits:
    """pidfds opened up front: readable the moment each process terminates.

    (psutil.wait_procs on a non-child waits until init has reaped the zombie,
    which measures init, not us.)
    """

    def __init__(self, pids):
        self.fds = {}
        for pid in pids:
            try:
                self.fds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> list[int]:
        """Block until all have exited or `timeout`; return the pids still alive."""
        deadline = time.monotonic() + timeout
        pending = dict(self.fds)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select(list(pending.values()), [], [], remaining)
            for fd in ready:
                pending = {p: f for p, f in pending.items() if f != fd}
        return sorted(pending)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _start_manager(tests_dir, target, run, method, workers=2, said=None):
    """The manager script and its line of pids, once its workers are up (and,
    with `said`, once a worker has also written that line: before or after it)."""
    src = MANAGER.format(tests=tests_dir, target=target, workers=workers, method=method, run=run)
    proc = subprocess.Popen(
        [sys.executable, "-c", src], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    info = None
    while info is None or said is not None:
        line = proc.stdout.readline()  # blocks until the workers are up (or the manager died)
        if not line:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"manager failed: {err}")
        if line == said:
            said = None
        else:
            info = json.loads(line)
    return proc, info


@pytest.mark.parametrize("mode", list(MODES))
def test_workers_exit_when_the_manager_is_sigkilled(mode, start_method, tests_dir):
    target, run = MODES[mode]
    proc, info = _start_manager(tests_dir, target, run, start_method)
    sid = proc.pid
    try:
        workers = [psutil.Process(pid) for pid in info["workers"]]
        assert len(workers) == 2
        if start_method == "forkserver":
            assert all(w.ppid() != info["manager"] for w in workers)
        else:
            assert all(w.ppid() == info["manager"] for w in workers)
        exits = Exits(info["workers"])
        helpers = Exits([p.pid for p in _session_members(sid)
                         if p.pid not in info["workers"] and p.pid != proc.pid])
        try:
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            alive = exits.wait(timeout=3.0)
            took = time.monotonic() - t0
            assert alive == [], f"orphaned workers still alive after {took:.1f}s: {alive}"
            assert took < 2.0, f"orphans took {took:.1f}s to exit"
            # nothing else of the manager's stays either (fork server, resource tracker)
            assert helpers.wait(timeout=3.0) == []
        finally:
            exits.close()
            helpers.close()
        proc.wait(timeout=10)
    finally:
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()

@pytest.mark.parametrize("method", [
    "fork",
    "spawn",
    "forkserver",
])
def test_orphan_exits_even_inside_a_gil_holding_c_call(tests_dir, method):
    _assert_orphans_exit(tests_dir, "targets_extra.gil_hog_said", method, timeout=2.0, said="in its C call\n")


def test_orphan_exit_while_big_result_is_being_written(tests_dir):
    """A worker blocked writing a result nobody reads (the manager script
    reads no report) still leaves."""
    _assert_orphans_exit(tests_dir, "targets.big_result_said", "fork", timeout=3.0, said="returning its result\n")


def _assert_orphans_exit(tests_dir, target, method, timeout, said):
    """SIGKILL a manager whose one worker runs `target`, once the worker `said`
    it is there (run() returns before the target's first line); the worker must
    exit within `timeout`."""
    proc, info = _start_manager(tests_dir, target, True, method, workers=1, said=said)
    try:
        exits = Exits(info["workers"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        try:
            assert exits.wait(timeout=timeout) == []
        finally:
            exits.close()
    finally:
        end_session(proc)


def test_manager_exiting_normally_without_close_leaves_no_orphan(tests_dir):
    proc, info = _start_manager(tests_dir, "targets.sleep_units", True, "fork")
    try:
        exits = Exits(info["workers"])
        t0 = time.monotonic()
        proc.stdin.close()  # the manager script ends: atexit must clean up
        try:
            assert proc.wait(timeout=20) == 0, proc.stderr.read()
            assert exits.wait(timeout=3.0) == []
        finally:
            exits.close()
        assert time.monotonic() - t0 < 5
    finally:
        end_session(proc)


# -- SIGINT ----------------------------------------------------------------------


def test_workers_ignore_sigint(start_method):
    with ProcessController(targets.sleep_units, 2, start_method=start_method) as pc:
        pids = pc.pids()
        for pid in pids:  # paused
            os.kill(pid, signal.SIGINT)
        pc.run()
        for pid in pids:  # running
            os.kill(pid, signal.SIGINT)
        pc.pause()  # both still acknowledge: alive and well
        assert [s.state for s in pc.status()] == [State.PAUSED] * 2
        assert pc.reports == {}
        pc.run()
        reports = pc.stop()
    assert [r.outcome for r in reports.values()] == [Outcome.STOPPED] * 2


def test_manager_sigint_handler_does_not_leak_into_forked_workers():
    fired = []
    old = signal.signal(signal.SIGINT, lambda *a: fired.append(a))
    try:
        with ProcessController(targets_extra.record_context, 1, start_method="fork") as pc:
            pc.run()
            pc.pause()
            pc.run()
            reports = pc.stop()
    finally:
        signal.signal(signal.SIGINT, old)
    assert reports[0].result["sigint"].__name__ == "_ignored"  # the worker's own (a no-op), not ours


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_what_a_task_starts_gets_the_default_signals_and_the_worker_ignores_them(method):
    # SIG_IGN in the worker reached programs its tasks started through exec: a server a
    # task stopped with SIGINT, or `sleep` sent SIGUSR1, went on for ever.
    with ProcessExecutor(1, start_method=method) as ex:
        got = ex.submit(targets_extra.signals_a_task_child_gets, 0).result(timeout=60)
    assert got == {int(s): -int(s) for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_controller_started_in_a_thread_outlives_the_thread(method):
    """Whatever kills orphans must not kill workers when the starting thread ends."""
    holder = {}

    def starter():
        holder["pc"] = ProcessController(targets.sleep_units, 2, start_method=method).start()

    t = threading.Thread(target=starter)
    t.start()
    t.join(30)
    pc = holder["pc"]
    with pc:
        pc.run()
        pc.pause()
        assert pc.reports == {}, pc.reports
        pc.run()
        reports = pc.stop()
    assert [r.outcome for r in reports.values()] == [Outcome.STOPPED] * 2
