"""Every test is bounded (pytest-timeout, see pytest.ini) and must leave no process behind."""

from __future__ import annotations

import multiprocessing
import os
import sys

import psutil
import pytest

START_METHODS = ["fork", "spawn", "forkserver"]

# multiprocessing's own long-lived helpers are not ours to reap.
_HELPERS = ("resource_tracker", "forkserver")


def _is_helper(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(h in cmd for h in _HELPERS)


def _children() -> list[psutil.Process]:
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in kids if not _is_helper(p)]


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Fail a test that leaves a child (or a zombie) behind; kill the leftovers."""
    before = {p.pid for p in _children()}
    yield
    left = [p for p in _children() if p.pid not in before]
    if not left:
        return
    _, alive = psutil.wait_procs(left, timeout=2.0)
    zombies = [p for p in left if p not in alive and p.pid in {c.pid for c in _children()}]
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    multiprocessing.active_children()  # join what multiprocessing knows of
    if alive or zombies:
        pytest.fail(f"test left processes behind: {[p.pid for p in alive + zombies]}")


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
