"""What the system lets one manager start: file descriptors and processes.

Checked before anything starts, so that a worker count the system cannot
carry is one clear error instead of a start that fails half-way; and used to
name the limit when a start fails anyway (another process took the room).
"""

from __future__ import annotations

import errno
import os

#: Descriptors the manager holds for each live worker: the link socket
#: (doorbell one way, reports the other), the process sentinel,
#: multiprocessing's own pipe end that the child watches, and the pidfd the
#: controller watches (not under forkserver). Update this when the
#: controller's channels change.
MANAGER_FDS_PER_WORKER = 4
#: With a work plane (channels, ProcessExecutor), each worker's work link adds
#: its socket and the pipe a worker's stop wakes (measured: 6.1 and 6.2).
WORK_FDS_PER_WORKER = 7
#: Descriptors beyond the per-worker ones: the controller's board, selector
#: and wakeup pipe, those in use while one worker starts (its ends of the
#: pipes, multiprocessing's), the few a forked worker opens for itself on top
#: of the manager's it inherits, and an event log.
START_FDS = 16
#: What a command line opens after its first look at the limits (its control
#: socket and selector, the output capture, the signal pipe): the controller's
#: own look comes then, and must not be the one that refuses.
COMMAND_FDS = 10
#: Errors of a process or pipe creation that mean "a system limit was hit".
LIMIT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})


def _soft_limit(name: str) -> int | None:
    """The soft limit `name` of the resource module (None: unlimited or unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    which = getattr(resource, name, None)
    if which is None:  # pragma: no cover - not on this system
        return None
    soft, _ = resource.getrlimit(which)
    return None if soft == resource.RLIM_INFINITY else soft


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own
    except OSError:  # pragma: no cover - no /proc
        return 3


def _user_processes() -> int:
    """Processes (tasks) of our real user, as the kernel counts for RLIMIT_NPROC."""
    uid = os.getuid()
    count = 0
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - no /proc
        return 0
    for entry in entries:
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass  # gone meanwhile, or not ours to see
    return count


class BeyondCapacity(ValueError):
    """More workers than this system lets one manager start (fds, processes)."""


class SystemLimit(OSError):
    """The system refused a thread or a process (errno EAGAIN); its text names the limit."""

    def __str__(self) -> str:
        return str(self.strerror)


def thread_refused() -> SystemLimit:
    """What to raise when a thread cannot start (CPython says only "can't start new thread"):
    each thread counts against the user's process limit, and its stack against the address space."""
    limits = []
    nproc = _soft_limit("RLIMIT_NPROC")
    if nproc is not None and os.getuid() != 0:
        limits.append(f"the user's limit of {nproc} processes and threads (ulimit -u;"
                      f" {_user_processes()} running)")
    space = _soft_limit("RLIMIT_AS")
    if space is not None:
        limits.append(f"the address-space limit of {space // 1024} KiB (ulimit -v)")
    what = " or ".join(limits) or "the system's limits (kernel.threads-max, a pids cgroup, memory)"
    return SystemLimit(errno.EAGAIN, f"this process cannot start another thread: {what}")


def _cwd_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def capacity_problem(workers: int, fds_per_worker: int = MANAGER_FDS_PER_WORKER, reserve: int = 0) -> str | None:
    """Why this process cannot start `workers` more workers, or None if it can
    (`fds_per_worker`: WORK_FDS_PER_WORKER for channels and executors).

    Reads the soft RLIMIT_NOFILE (against the descriptors open now) and
    RLIMIT_NPROC (against our user's processes; the kernel exempts root).
    """
    fd_limit = _soft_limit("RLIMIT_NOFILE")
    if fd_limit is not None:
        need = workers * fds_per_worker + START_FDS + reserve
        in_use = _open_fds()
        if need + in_use > fd_limit:
            return (f"{workers} workers need about {need} file descriptors; the limit is {fd_limit}"
                    f" ({in_use} already open; raise it with ulimit -n)")
    proc_limit = _soft_limit("RLIMIT_NPROC")
    if proc_limit is not None and os.getuid() != 0 and workers + 1 > proc_limit - _user_processes():
        return (f"{workers} workers need {workers} more processes; the limit is {proc_limit} processes"
                f" for this user, {_user_processes()} already running (raise it with ulimit -u)")
    return None


def describe_start_failure(exc: BaseException) -> str | None:
    """The limit behind a failed process start, or None if it was not a limit."""
    if isinstance(exc, OSError) and "AF_UNIX path too long" in str(exc):
        import tempfile

        return ("multiprocessing's fork server listens on a Unix socket in the temporary directory"
                f" {tempfile.gettempdir()!r}, too long a path for one (108 bytes): set TMPDIR to a shorter one")
    if isinstance(exc, SystemLimit):
        return str(exc)
    if isinstance(exc, FileNotFoundError) and _cwd_gone():
        return ("the current directory no longer exists, and multiprocessing starts spawn and forkserver"
                " workers from it: run from a directory that exists")
    if not isinstance(exc, OSError) or exc.errno not in LIMIT_ERRNOS:
        return None
    if exc.errno == errno.EMFILE:
        what = f"the manager ran out of file descriptors (limit {_soft_limit('RLIMIT_NOFILE')}; ulimit -n)"
    elif exc.errno == errno.ENFILE:
        what = "the system ran out of file descriptors (fs.file-max)"
    elif exc.errno == errno.EAGAIN:
        limit = _soft_limit("RLIMIT_NPROC")
        shown = "unlimited" if limit is None else str(limit)
        what = f"the system refused another process (user process limit {shown}; ulimit -u, or a pids cgroup)"
    else:
        what = "the system ran out of memory for another process"
    return f"{what}: {exc.strerror}"
