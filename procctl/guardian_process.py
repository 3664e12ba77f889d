"""The guardian process (see guardian.py, the manager's side, which starts it).

A fresh interpreter (`python -I -S`) runs main(): this module imports only
os, select, signal and leftovers.py, so that the guardian costs its manager
a few milliseconds of CPU at the start of a run, not the 40 of logging,
subprocess and typing (a Dask worker starts one per run of a cluster job).
"""

from __future__ import annotations

import os
import select
import signal

from .leftovers import kill_cgroup, kill_group, remove_cgroup

#: How long the guardian waits for killed cgroups to empty before removing them.
CGROUP_WAIT = 2.0


def main(manager_pid: int, manager: int, fd: int, bell: int) -> None:
    """Entry point of the go-between, which forks the guardian and exits.

    `manager_pid` only names the manager in the command line (`ps`, tests);
    `manager` is a pidfd of the manager (opened by the manager itself: no
    pid can be reused under it), or -1 where there is none; `fd` the read end
    of the manager's notes, `bell` of its rings (read the notes now). The
    guardian's standard output stays the pipe the go-between writes its pid
    to: the manager sees its end close when the guardian has exited.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    try:
        pid = os.fork()
    except OSError:  # a process limit: the manager says the guardian did not start
        os._exit(1)
    if pid:
        os.write(1, b"%d\n" % pid)
        os._exit(0)
    _guard(manager, fd, bell)


def _guard(manager: int, fd: int, bell: int) -> None:
    groups: set[int] = set()
    cgroups: set[str] = set()
    buffer = b""
    os.set_blocking(fd, False)
    os.set_blocking(bell, False)
    poller = select.poll()
    # The notes are read when the bell rings or the manager is gone, not as
    # they come: a write to the pipe wakes nobody who asked for its end only.
    poller.register(fd, 0)
    poller.register(bell, select.POLLIN)
    if manager >= 0:
        poller.register(manager, select.POLLIN)
    while True:
        ready = {f for f, _ in poller.poll()}
        if bell in ready:
            _drain(bell)
        buffer, released = _read(fd, buffer, groups, cgroups)
        # Without a pidfd, the end of the notes pipe is the manager's end
        # (later, if a child of the manager's still holds a copy).
        if manager in ready or released:
            break
    for pgid in groups:
        kill_group(pgid)
    for path in cgroups:
        kill_cgroup(path)
    for path in cgroups:
        remove_cgroup(path, CGROUP_WAIT)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _read(fd: int, buffer: bytes, groups: set[int], cgroups: set[str]) -> tuple[bytes, bool]:
    """Apply the manager's messages; True as the second value once it let us go."""
    released = False
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            released = True  # the manager is gone (every copy of its end closed)
            break
        buffer += chunk
    *lines, buffer = buffer.split(b"\n")
    for line in lines:
        kind, arg = line[:1], line[1:].decode()
        if kind == b"+":
            groups.add(int(arg))
        elif kind == b"-":
            groups.discard(int(arg))
        elif kind == b"c":
            cgroups.add(arg)
        elif kind == b"u":
            cgroups.discard(arg)
        elif kind == b"x":  # the manager exits cleanly: clean up what is left, and go
            released = True
    return buffer, released
