"""Process-tree containment: everything a worker starts ends with it.

The kernel's handles on a worker's tree, cheapest first:

- **its process group.** Each worker leads its own group (pgid = its pid), and
  whatever it starts with Popen, multiprocessing or os.fork() inherits it.
  The group outlives the worker while any member lives, and the kernel never
  hands out a pid that is still a group's id, so `killpg(worker_pid)` after
  the worker's death reaches exactly its leftovers.  One system call.
- **subreaping.** Each worker is a child subreaper: a descendant orphaned
  inside its tree (the middle process of a double fork exits) is re-parented
  to the worker, not to init, so while the worker lives its tree is whole,
  including descendants that left the group with setsid().
- **a cgroup v2** (opt-in, where one is writable): one directory per worker;
  every descendant stays in it whatever it does, and `cgroup.kill` ends them
  all.  Moving a process into a cgroup costs about half a millisecond (with
  spikes of tens), hence opt-in.

Who uses them (see README, "Process-tree containment"):

- the worker, when its target has ended, kills its own descendants
  (`end_descendants`) before it reports;
- the controller, when it reaps a worker however it ended, kills the
  worker's group and cgroup (`end_leftovers`), and when it must kill a live
  worker it freezes and kills the whole tree first (`kill_trees`);
- the guardian (guardian.py), a small process per manager, does the same
  when the manager itself is SIGKILLed.

This module holds mechanisms only (pids in, signals out) and is used on both
sides of the process boundary.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import sys
from collections.abc import Iterable
from typing import Any

from .leftovers import kill_cgroup, kill_group, remove_cgroup
from .leftovers import signal_pid as _signal

PR_SET_CHILD_SUBREAPER = 36
#: How long a worker waits for the descendants it killed to go (SIGKILL is
#: asynchronous; a process in uninterruptible sleep may take a moment).
END_TIMEOUT = 2.0
#: Rounds of the freeze-and-look walk: each round stops what the last round
#: found; a tree stops growing once its members are stopped.
FREEZE_ROUNDS = 50


def _libc(name: str) -> Any:
    # Resolved at import, in the manager: fork children share ctypes' pages.
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover - not in this libc
        return None


#: prctl(2) and tgkill(2) through ctypes, or None off Linux (worker.py uses PRCTL too).
PRCTL = _libc("prctl")
TGKILL = _libc("tgkill")


def signal_thread(pid: int, tid: int, sig: int) -> bool:
    """tgkill(2): send `sig` to thread `tid` of process `pid` (of ours: a worker not
    yet reaped, whose pid no other process can have); False if it is gone or the
    call is missing here (glibc before 2.30)."""
    return TGKILL is not None and bool(TGKILL(pid, tid, sig) == 0)


# -- the worker's side --------------------------------------------------------------


def contain_worker() -> None:
    """Make the calling process (a fresh worker) the root of a containable tree:
    leader of its own process group and child subreaper."""
    try:  # (not contextlib.suppress: each page a fork child touches is copied)
        os.setpgid(0, 0)
    except OSError:
        pass
    if PRCTL is not None:
        PRCTL(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def join_cgroup(cgroup: str) -> None:
    """Make the calling process (a worker, before its target runs) the only
    member of the cgroup directory `cgroup`.

    The write can wait for the kernel's RCU grace period (10-15 ms for the
    first of a burst of workers, well under a millisecond for the others):
    the worker does it after it has told the controller it is up, so that
    the wait overlaps the start of the others instead of holding up start().
    """
    try:  # (no file object: fewer pages touched, copied after the fork)
        fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError:
        pass  # the controller's process group and tree kills still hold


def end_descendants(timeout: float = END_TIMEOUT) -> None:
    """Kill every descendant of the calling process and reap them.

    Called by a worker whose target has ended. Costs one system call when
    there are none. The process group goes first, in one kill (we step out
    of it to do so); what is left after that left the group (setsid(), a
    daemon) and is found by walking /proc, which our subreaping keeps whole.
    """
    if not _has_children():
        return
    me = os.getpid()
    if os.getpgid(0) == me:
        try:
            # A group leader may join another group of its session; the
            # group it led lives on with its members, which we then kill.
            os.setpgid(0, os.getpgid(os.getppid()))
        except OSError:
            pass
        else:
            with contextlib.suppress(OSError):
                os.killpg(me, signal.SIGKILL)
            _reap_group(me)
    if _has_children():
        kill_trees([me], include_roots=False, timeout=timeout)
        _reap_all()


def _has_children() -> bool:
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _reap_group(pgid: int) -> None:
    # Members were SIGKILLed: each exits at once, and the grandchildren of a
    # dying member are re-parented to us (subreaper) before it turns zombie,
    # so this ends when the group is gone.
    while True:
        try:
            os.waitid(os.P_PGID, pgid, os.WEXITED)
        except ChildProcessError:
            return
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue


def _reap_all() -> None:
    while True:
        try:
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG) is None:
                return
        except ChildProcessError:
            return


# -- anyone's side ---------------------------------------------------------------


def _parents() -> dict[int, tuple[int, bool]]:
    """{pid: (ppid, zombie)} of every process, from /proc (as much of it as
    can be read: out of descriptors, none; the roots are killed all the same)."""
    out: dict[int, tuple[int, bool]] = {}
    try:
        names = os.listdir("/proc")
    except OSError as exc:
        import logging  # (here only: the worker side imports this module, and not logging)

        logging.getLogger("procctl").warning(
            "cannot read /proc (%s): descendants that left their worker's process group are not found"
            " (cgroups, where there are, still cover them)", exc)
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        out[int(name)] = (int(fields[1]), fields[0] in (b"Z", b"X"))
    return out


def descendants(roots: Iterable[int]) -> set[int]:
    """Every live (non-zombie) descendant of `roots`, roots excluded."""
    children: dict[int, list[int]] = {}
    zombies = set()
    for pid, (ppid, zombie) in _parents().items():
        children.setdefault(ppid, []).append(pid)
        if zombie:
            zombies.add(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for kid in children.get(stack.pop(), ()):
            if kid not in found:
                found.add(kid)
                stack.append(kid)
    return found - zombies


def kill_trees(roots: Iterable[int], *, include_roots: bool = True, timeout: float = 0.0) -> set[int]:
    """SIGKILL `roots` and all their descendants; return the pids killed.

    The roots are stopped first (a stopped process forks no more), then
    each round stops the descendants found so far, until a round finds no
    new one; then everything is killed at once. Stopping first matters: a
    root killed first would hand its children to init before we saw them.
    With `timeout`, wait up to that long for them to be gone.
    """
    roots = list(roots)
    me = os.getpid()
    if include_roots:
        for pid in roots:
            _signal(pid, signal.SIGSTOP)
    seen: set[int] = set()
    for _ in range(FREEZE_ROUNDS):
        new = descendants(roots) - seen - {me}
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        seen |= new
    targets = seen | (set(roots) if include_roots else set())
    fds = _pidfds(targets) if timeout > 0 else []
    for pid in seen:
        _signal(pid, signal.SIGKILL)
    if include_roots:
        for pid in roots:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # the root and its group at once
            _signal(pid, signal.SIGKILL)
    if fds:
        _wait_exits(fds, timeout)
    return targets


def _pidfds(pids: Iterable[int]) -> list[int]:
    fds = []
    for pid in pids:
        with contextlib.suppress(OSError):
            fds.append(os.pidfd_open(pid))
    return fds


def _wait_exits(fds: list[int], timeout: float) -> None:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    pending = set(fds)
    try:
        import time

        deadline = time.monotonic() + timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                pending.discard(fd)
    finally:
        for fd in fds:
            os.close(fd)


# -- cgroups ---------------------------------------------------------------------


def own_cgroup_dir() -> str | None:
    """The directory of this process's cgroup v2, if the v2 hierarchy is mounted."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
        with open("/proc/self/mountinfo") as f:
            mounts = f.read().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    for line in mounts:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            root, mount = fields[3], fields[4]
            if path.startswith(root):
                rel = path[len(root):].lstrip("/")
                return os.path.join(mount, rel) if rel else mount
    return None


def make_cgroup(parent: str, name: str, *, checked: bool = False, fresh: bool = False) -> str | None:
    """Create cgroup directory `parent/name`; None if that cannot be done here
    (`checked`: `parent` was made here, so its children are ours to use;
    `fresh`: one that exists already is someone else's, FileExistsError)."""
    path = os.path.join(parent, name)
    try:
        os.mkdir(path)
    except FileExistsError:
        if fresh:
            raise
    except OSError:
        return None
    if not checked and not os.access(os.path.join(path, "cgroup.procs"), os.W_OK):
        remove_cgroup(path, 0)
        return None
    return path


# -- the controller's bookkeeping ---------------------------------------------------------


class WorkerTrees:
    """One controller's handles on its workers' trees: process groups, the
    optional cgroups, and the guardian that cleans up if the manager is killed."""

    #: Numbers the controllers of this process (next() is atomic: controllers
    #: start in several threads at once, and two that took one cgroup killed
    #: each other's workers).
    _serial = itertools.count(1)

    def __init__(self, use_cgroup: bool | None) -> None:
        """`use_cgroup`: None, a cgroup where one is writable; True, the same,
        with a warning where none is; False, process groups only."""
        from . import guardian

        self._guardian = guardian.link()
        self.cgroup: str | None = None
        if use_cgroup is not False:
            parent = own_cgroup_dir()
            while parent is not None:
                try:  # (one left by a killed process whose pid we now have is not ours either)
                    self.cgroup = make_cgroup(parent, f"procctl-{os.getpid()}-{next(WorkerTrees._serial)}",
                                              fresh=True)
                    break
                except FileExistsError:
                    continue
            if self.cgroup is not None:
                self._guardian.send("c", self.cgroup)
            elif use_cgroup:
                import logging

                logging.getLogger("procctl").warning(
                    "no writable cgroup v2 here: containing worker trees with process groups only"
                )

    def worker_cgroup(self, worker_id: int) -> str | None:
        """A fresh cgroup directory for a worker (None without cgroups)."""
        if self.cgroup is None:
            return None
        return make_cgroup(self.cgroup, f"w{worker_id}", checked=True)

    def started(self, pid: int | None) -> None:
        if pid is not None:
            self._guardian.note("+", pid)

    def flush(self) -> None:
        """Tell the guardian what started and ended since the last flush."""
        self._guardian.flush()

    def ended(self, pid: int | None, cgroup: str | None) -> None:
        """A worker ended (however): kill what it left. Call before reaping it,
        while its zombie still holds the pid (see the module docstring)."""
        if pid is not None:
            kill_group(pid)
            self._guardian.note("-", pid)
        if cgroup is not None:
            try:
                os.rmdir(cgroup)  # the rule: the worker left nothing (an exited worker is no member)
            except FileNotFoundError:
                pass
            except OSError:  # busy: something it started lives on
                kill_cgroup(cgroup)
                remove_cgroup(cgroup, 0)  # what is still dying goes at close()

    def close(self, timeout: float) -> None:
        self.flush()
        self._guardian.settle()  # its go-between reaped: no process of ours left below the manager
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)
            remove_cgroup(self.cgroup, timeout)
            self._guardian.send("u", self.cgroup)
            self.cgroup = None
