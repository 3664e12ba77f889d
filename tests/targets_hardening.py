"""Worker targets that misbehave the way issue 10 says users' targets do."""

from __future__ import annotations

import os
import signal
import threading
import time


def exec_sleep(ctx):
    ctx.checkpoint()
    os.execv("/bin/sleep", ["sleep", "1000"])


def close_fds_and_sleep(ctx):
    # (No checkpoint first: a pause that came before it was acknowledged there.)
    os.closerange(3, 65536)
    time.sleep(1000)


def fork_helper_then_die(ctx):
    """Fork a helper that inherits every fd, then die by SIGKILL.

    The helper exits when its pipe from us closes, i.e. when we are dead.
    """
    ctx.checkpoint()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # EOF once the worker is gone
        os._exit(0)
    os.close(r)
    os.kill(os.getpid(), signal.SIGKILL)


def progress_thread_and_big_result(ctx, megabytes=16):
    """A helper thread reports progress with info while the main thread returns a big result."""
    import procctl.worker

    procctl.worker.INFO_INTERVAL = 0.0  # send info on every call: the race the lock must close
    ctx.checkpoint()
    stop = threading.Event()

    def chatter():
        i = 0
        while not stop.is_set():
            i += 1
            ctx.progress(i, step=i)

    t = threading.Thread(target=chatter, daemon=True)
    t.start()
    data = bytes([ctx.worker_id % 251]) * (megabytes << 20)
    return data


def leave_thread_running(ctx):
    ctx.checkpoint()
    threading.Thread(target=time.sleep, args=(1000,), name="left-behind").start()
    return 42


def collector_on(ctx):
    import gc

    ctx.checkpoint()
    return gc.isenabled()


#: worker_waits writes a byte here as it goes to its last sleep (fork: the test reads it).
SLEEPING_R, SLEEPING_W = os.pipe()


def worker_waits(ctx):
    """The worker side's timeouts: bad ones refused, huge ones waited (until the stop)."""
    refused = []
    r, w = os.pipe()
    for call in (lambda: ctx.sleep(float("nan")), lambda: ctx.sleep(-1), lambda: ctx.sleep("x"),
                 lambda: ctx.sleep(None), lambda: ctx.wait_readable(r, float("nan")),
                 lambda: ctx.wait_readable(r, -1), lambda: ctx.wait_readable("x"), lambda: ctx.wait_readable(None),
                 lambda: ctx.wait_readable(10**30), lambda: ctx.wait_readable(99999, 1)):
        try:
            call()
            refused.append(None)
        except (ValueError, TypeError, OSError) as exc:
            refused.append(type(exc).__name__)
    os.write(w, b"x")
    readable = ctx.wait_readable(r, 3e6)  # ready at once: a huge timeout is no error
    os.close(r)
    os.close(w)
    os.write(SLEEPING_W, b"z")
    stopped = not ctx.sleep(1e10)  # until the stop
    return refused, readable, stopped


def cooperative(ctx, *_):
    """Checkpoints until told to stop."""
    while ctx.checkpoint():
        ctx.sleep(0.01)
    return "stopped"


def _sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)
    return None


class SigtermOnLoad:
    """An argument that sends SIGTERM to the worker that unpickles it (spawn,
    forkserver): a SIGTERM from outside before the worker is up."""

    def __reduce__(self):
        return _sigterm_self, ()


def leave_exit_handler_blocking(ctx):
    """An exit handler that never returns: a spawn worker's interpreter exit runs it."""
    import atexit

    ctx.checkpoint()
    atexit.register(time.sleep, 1000)
    return 42


def told_then_stubborn(ctx, marker):
    """Runs until told to stop, says so in `marker`, then goes on regardless
    (only a signal ends it)."""
    while ctx.checkpoint():
        ctx.sleep(0.05)
    with open(marker, "w") as f:
        f.write("told\n")
    while True:
        time.sleep(1)
