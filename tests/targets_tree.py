"""Worker targets that start descendants of every kind (tests/test_containment.py).

Each target writes the pids of what it started to `pidfile` (one per line,
fsynced) before it goes on, so the test knows whom to look for.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

SLEEP = [sys.executable, "-c", "import time; time.sleep(1000)"]


def _note(pidfile, pids):
    with open(pidfile, "a") as f:
        f.write("".join(f"{p}\n" for p in pids))
        f.flush()
        os.fsync(f.fileno())


def _sleep_forever():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1000)


def _double_fork(r_pid_w, new_session):
    """fork, (setsid), fork again, the middle exits: a daemon re-parented away."""
    pid = os.fork()
    if pid == 0:
        try:
            if new_session:
                os.setsid()
            grand = os.fork()
            if grand == 0:
                _sleep_forever()
            os.write(r_pid_w, f"{grand}\n".encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def start_children(kind, pidfile, count=1):
    """Start `count` descendants of `kind`; return their pids."""
    pids = []
    for _ in range(count):
        if kind == "popen":
            pids.append(subprocess.Popen(SLEEP, stdin=subprocess.DEVNULL).pid)
        elif kind == "setsid":
            pids.append(subprocess.Popen(SLEEP, stdin=subprocess.DEVNULL, start_new_session=True).pid)
        elif kind == "pgroup":  # a process group of its own, in the worker's session
            pids.append(subprocess.Popen(SLEEP, stdin=subprocess.DEVNULL, preexec_fn=os.setpgrp).pid)  # (3.10)
        elif kind == "multiprocessing":
            p = multiprocessing.get_context("fork").Process(target=_sleep_forever, daemon=False)
            p.start()
            pids.append(p.pid)
        elif kind == "fork":
            pid = os.fork()
            if pid == 0:
                _sleep_forever()
            pids.append(pid)
        elif kind in ("daemon", "daemon_setsid"):
            r, w = os.pipe()
            _double_fork(w, new_session=kind == "daemon_setsid")
            os.close(w)
            with os.fdopen(r) as f:
                pids.append(int(f.readline()))
        else:
            raise ValueError(kind)
    if pidfile is not None:
        _note(pidfile, pids)
    return pids


def by_worker(ctx, kinds, fifo, then):
    """Worker i starts one descendant of kinds[i], writes 'i pid...' to the FIFO, ends as `then`."""
    pids = start_children(kinds[ctx.worker_id], None)
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, (" ".join(map(str, [ctx.worker_id, *pids])) + "\n").encode())
    os.close(fd)
    return _end(ctx, then)


def _end(ctx, then):
    if then == "finish":
        return "done"
    if then == "fail":
        raise RuntimeError("failed on purpose")
    if then == "crash":
        os._exit(7)
    if then in ("hang", "sigkill"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        while True:
            time.sleep(1000)
    while ctx.sleep(float("inf")):
        pass
    return "stopped"


def own_cgroup(ctx):
    """The cgroup v2 path this worker runs its target in."""
    with open("/proc/self/cgroup") as f:
        return f.read().strip().rsplit(":", 1)[1]


def quick(ctx):
    """Return at the first checkpoint."""
    return ctx.checkpoint()


def sleeps(ctx):
    """Short sleeps until STOPPED."""
    while ctx.sleep(0.01):
        pass
    return "stopped"


def nested(ctx):
    """A worker that runs a controller of its own (fork workers), and returns their results."""
    from procctl import ProcessController

    with ProcessController(quick, workers=2, start_method="fork") as pc:
        pc.run()
        pc.wait(timeout=20)
        reports = pc.stop()
    return sorted(r.outcome.value for r in reports.values())
