"""Every test is bounded (pytest-timeout, see pytest.ini) and must leave no process behind."""

from __future__ import annotations

import multiprocessing
import os
import select
import sys
import time

import psutil
import pytest

from procctl.pytest_plugin import Snapshot

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
    # gone once it has ended: its zombie is for its parent (init, a
    # subreaper) to reap, which can take seconds.
    ours = {c.pid for c in psutil.Process().children()}
    _, alive = psutil.wait_procs([p for p in left if p.pid in ours], timeout=2.0)
    alive += _still_running([p for p in left if p.pid not in ours], timeout=2.0)
    mine = {c.pid for c in psutil.Process().children()}
    zombies = [p for p in left if p not in alive and p.pid in mine]
    alive = [p for p in alive if _running(p) or p.pid in mine]
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    multiprocessing.active_children()  # join what multiprocessing knows of
    if alive or zombies:
        pytest.fail(f"test left processes behind: {[described[p.pid] for p in alive + zombies]}")


def _still_running(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `procs` that have not ended within `timeout` (pidfds: an ended
    process's pidfd is readable whether or not it was reaped)."""
    fds = {}
    for proc in procs:
        try:
            fds[os.pidfd_open(proc.pid)] = proc
        except ProcessLookupError:
            pass
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
        return list(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
