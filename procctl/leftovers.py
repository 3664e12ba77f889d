"""Ending what a worker left behind: its process group, its cgroup.

Used by the controller (containment.py) and by the guardian process
(guardian_process.py), a fresh interpreter that starts with this module and
nothing heavier: os, select, signal, errno and time only.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time


def signal_pid(pid: int, sig: int) -> None:
    """os.kill, quiet about a process that is gone or not ours."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group `pgid` (a worker's)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in cgroup `path` and below (cgroup.kill, Linux 5.14;
    older kernels: each member listed, one kill each)."""
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    for pid in cgroup_pids(path):
        signal_pid(pid, signal.SIGKILL)


def cgroup_pids(path: str) -> list[int]:
    pids = []
    for dirpath, _, _ in os.walk(path):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return pids


def remove_cgroup(path: str, timeout: float) -> bool:
    """Remove cgroup `path` (and the ones below it) once empty, waiting up to
    `timeout` for killed members to go. True if it is gone."""
    for dirpath, dirnames, _ in sorted(os.walk(path, topdown=False), key=lambda w: -len(w[0])):
        del dirnames
        if not _rmdir_when_empty(dirpath, timeout):
            return False
    return True


def _rmdir_when_empty(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    events = None
    try:
        while True:
            try:
                os.rmdir(path)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # cgroup.events signals POLLPRI when "populated" changes.
            if events is None:
                events = open(os.path.join(path, "cgroup.events"), "rb", buffering=0)
                poller = select.poll()
                poller.register(events.fileno(), select.POLLPRI)
                continue  # the last member may have left before we watched
            poller.poll(remaining * 1000)
    except OSError:
        return False
    finally:
        if events is not None:
            events.close()
