"""Every test is bounded (pytest-timeout, see pytest.ini) and must leave no process behind."""

from __future__ import annotations

import multiprocessing
import os
import sys

import psutil
import pytest
from procs import running

from procctl.pytest_plugin import Snapshot, _end_owners, wait_ended

START_METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Fail a test that leaves a process behind (a child, a grandchild, one re-parented
    to init or a subreaper, or an unreaped zombie); kill the leftovers.

    The plugin's Snapshot finds them: our descendants, plus orphans in our process
    group or carrying the mark it puts in the environment for the test.
    """
    snapshot = Snapshot(psutil)
    try:
        yield
    finally:
        snapshot.restore()
    left = snapshot.new_processes(psutil)
    if not left:
        return
    described = {p.pid: _describe(p) for p in left}
    # Our children are waited for (and reaped); any other process counts as
    # gone once it has ended (see wait_ended).
    alive = wait_ended(left, 2.0, psutil)
    mine = {c.pid for c in psutil.Process().children()}
    zombies = [p for p in left if p not in alive and p.pid in mine]
    alive = [p for p in alive if running(p) or p.pid in mine]
    # Their executor or controller first, as the plugin does: killed alone, a worker
    # is replaced, and the replacement blamed on the next test.
    _end_owners({p.pid for p in alive})
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    multiprocessing.active_children()  # join what multiprocessing knows of
    if alive or zombies:
        pytest.fail(f"test left processes behind: {[described[p.pid] for p in alive + zombies]}")


@pytest.fixture(params=START_METHODS)
def start_method(request):
    return request.param


@pytest.fixture
def tests_dir():
    return os.path.dirname(__file__)


# Child processes started by tests (the CLI, scripts) must import this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
sys.path.insert(0, os.path.dirname(__file__))


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ({' '.join(proc.cmdline())[:80]}, {proc.status()}, ppid {proc.ppid()})"
    except psutil.Error:
        return f"pid {proc.pid}"
