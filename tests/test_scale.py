"""Hundreds of workers: no per-process limit (select()'s 1024 fds) may bite."""

from __future__ import annotations

import resource

import pytest
import targets

from procctl import Outcome, ProcessController


@pytest.fixture
def room_for_300_workers():
    """A soft fd limit of 1024 (a user's usual) holds 250 workers: raise it to the hard limit's allowance."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2048
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"300 workers need about {need} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(120)
def test_three_hundred_workers_pause_and_resume(room_for_300_workers):
    # Forked workers inherit the manager's fds, so the later workers' own fds
    # are numbered past 1024 (300 workers x 4 descriptors each, inherited under
    # fork): a select()-based pause used to fail there.
    with ProcessController(targets.sleep_units, 300, args=(0.1,), start_method="fork") as pc:
        pc.run(timeout=60)
        pc.pause(timeout=60)
        pc.run(timeout=60)
        reports = pc.stop()
    assert [r.outcome for r in reports.values()] == [Outcome.STOPPED] * 300
