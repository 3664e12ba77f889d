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
