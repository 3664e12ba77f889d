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
