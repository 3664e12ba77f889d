"""Long stress runs: `scripts/soak.sh` runs them; CI skips the `soak` marker."""

from __future__ import annotations

import os
import random
import signal

import pytest
import targets

from procctl import Outcome, ProcessController

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_random_schedules_with_faults(method):
    """Hundreds of random run/pause/stop sequences with workers killed at random moments."""
    rng = random.Random(1234)
    for _ in range(60 if method == "fork" else 15):
        with ProcessController(targets.sleep_units, rng.randint(1, 12), start_method=method, grace=2) as pc:
            for _ in range(rng.randint(0, 6)):
                step = rng.choice(["run", "pause", "kill", "reap"])
                if step == "run":
                    pc.run()
                elif step == "pause":
                    pc.pause()
                elif step == "kill" and pc.pids():
                    os.kill(rng.choice(pc.pids()), signal.SIGKILL)
                else:
                    pc.reap()
            reports = pc.stop()
        assert len(reports) == pc.workers
        assert {r.outcome for r in reports.values()} <= {Outcome.STOPPED, Outcome.CRASHED}


def test_many_workers_broadcast_rounds():
    with ProcessController(targets.sleep_units, 300, args=(0.01,)) as pc:
        for _ in range(100):
            pc.run(timeout=60)
            pc.pause(timeout=60)
        reports = pc.stop()
    assert all(r.outcome is Outcome.STOPPED for r in reports.values())
