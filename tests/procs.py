"""Process facts the tests share: is it dead yet, who is in a session."""

from __future__ import annotations

import os
import select
import signal

import psutil

from procctl.pytest_plugin import wait_ended


def wait_dead(pid: int, timeout: float = 5.0) -> None:
    """Block until `pid` has terminated, without reaping it (pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"pid {pid} still alive after {timeout}s"
    finally:
        os.close(fd)


def session_members(sid: int) -> list[psutil.Process]:
    """Every process whose session id is `sid`."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


def still_running(pids, timeout: float = 5.0) -> list[psutil.Process]:
    """Those of `pids` still running after up to `timeout` seconds.

    Zombies count as gone: an orphan's zombie waits on an init that may
    never reap it, but the process has ended.
    """
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return [p for p in wait_ended(procs, timeout, psutil) if running(p)]


def end_session(proc) -> None:
    """Kill whatever is left in the session of `proc` (a script started with
    start_new_session), reap it, close its pipes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def running(proc: psutil.Process) -> bool:
    """Not ended: a zombie has ended, whether or not its parent reaped it."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
