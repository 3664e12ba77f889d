"""A controller started from a thread that then exits keeps its workers."""

from __future__ import annotations

import threading

import targets

from procctl import Outcome, ProcessController


def test_workers_survive_the_thread_that_started_them(start_method):
    pc = ProcessController(targets.loop, 2, start_method=start_method)
    starter = threading.Thread(target=pc.start)
    starter.start()
    starter.join(30)
    assert not starter.is_alive()
    try:
        pc.run()  # the kernel's parent-death signal must not have fired with the thread
        assert all(s.alive for s in pc.status())
    finally:
        reports = pc.stop(grace=5)
    assert {r.outcome for r in reports.values()} == {Outcome.STOPPED}



def _blocked(native_id: int) -> set[int]:
    """The signals thread `native_id` of this process blocks (from /proc)."""
    with open(f"/proc/self/task/{native_id}/status") as f:
        mask = int(next(line.split()[1] for line in f if line.startswith("SigBlk:")), 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


def test_the_managers_threads_leave_the_operators_signals_to_the_main_thread():
    # A signal the kernel hands to another thread runs Python's C handler
    # there, which does not wake a main thread asleep in the controller's
    # wait: procctl sum hung after a Ctrl-C that came while its main thread
    # held the signals. procctl's threads block them, so the main one gets them.
    import signal

    from procctl import ProcessExecutor

    managed = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
               signal.SIGTTIN, signal.SIGTTOU}
    with ProcessController(targets.loop, 1, channels={"c": 1}, control=True) as pc, ProcessExecutor(1) as ex:
        assert ex.submit(pow, 2, 3).result(20) == 8
        ours = [t for t in threading.enumerate() if t.name.startswith("procctl-")]
        assert {t.name for t in ours} >= {"procctl-channels", "procctl-control", "procctl-executor"}
        for t in ours:
            assert managed <= _blocked(t.native_id), t.name
        assert not managed & _blocked(threading.main_thread().native_id)
        pc.stop(grace=5)


def test_a_signal_that_does_not_interrupt_the_commands_wait_still_wakes_it():
    # A signal landing just before the main thread enters epoll_wait, or in
    # another thread, interrupts no system call of the main thread: only the
    # C-level handler runs, and the Python one would wait for the next event
    # (procctl sum hung after a SIGTERM, about once in 40 runs). Here the
    # signal goes to a helper thread; the bridge's watcher must nudge the wait.
    import os
    import select
    import signal

    from procctl.clitools import SignalBridge

    ready, release = threading.Event(), threading.Event()

    def helper() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        ready.set()
        release.wait(30)

    bridge = SignalBridge().install()
    r, w = os.pipe()
    other = threading.Thread(target=helper)
    other.start()
    try:
        ready.wait(10)
        with bridge.attach(wake=lambda: None, hurry=lambda: None, nudge=lambda: os.write(w, b"!")):
            signal.pthread_kill(other.ident, signal.SIGUSR1)
            readable, _, _ = select.select([r], [], [], 10)
            assert readable == [r]  # nudged, not timed out
            assert bridge.take() == [signal.SIGUSR1]  # and the handler ran in this thread
    finally:
        release.set()
        other.join(10)
        bridge.uninstall()
        os.close(r)
        os.close(w)
    watchers = [t for t in threading.enumerate() if t.name == "procctl-signals"]
    for t in watchers:
        t.join(10)
        assert not t.is_alive()  # uninstall() ended it


def test_a_process_forked_from_the_script_cannot_use_the_controller():
    """With the controller's own thread (here: a heartbeat), a child forked while
    that thread held the lock would wait for it for ever: a clear error instead,
    at once, and the child's close() leaves the parent's workers alone."""
    import os
    import select

    with ProcessController(targets.loop, 2, start_method="fork", heartbeat=30.0) as pc:
        pc.run()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                pc.status()
                said = b"no error"
            except RuntimeError as exc:
                said = str(exc).encode()
            pc.close()
            os.write(w, said)
            os._exit(0)
        os.close(w)
        assert select.select([r], [], [], 20)[0], "the child hung"
        said = os.read(r, 500).decode()
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0
        assert "a process forked from it cannot use it" in said
        assert all(s.alive for s in pc.status())
        reports = pc.stop()
    assert {r.outcome for r in reports.values()} == {Outcome.STOPPED}
