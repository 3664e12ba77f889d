"""Worker targets for tests/test_supervision.py: importable by module name (spawn, forkserver)."""

from __future__ import annotations

import os
import select
import signal
import time


def fail_first(ctx, how="raise", times=1, then_finish=False):
    """Fail the first `times` incarnations (how: raise, exit, kill, hang, finish); then
    finish at once (`then_finish`) or loop until stopped. Returns ctx.restarts."""
    ctx.checkpoint()
    if ctx.restarts < times:
        if how == "raise":
            raise ValueError(f"incarnation {ctx.restarts} of worker {ctx.worker_id}")
        if how == "exit":
            os._exit(9)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "hang":
            time.sleep(1000)  # a C call: no checkpoint, no signal handler runs until it returns
        if how == "finish":
            return ctx.restarts
    if then_finish:
        return ctx.restarts
    while ctx.checkpoint():
        ctx.sleep(0.05)
    return ctx.restarts


def always_fail(ctx):
    ctx.checkpoint()
    raise RuntimeError(f"always fails (restart {ctx.restarts})")


def worker0_fails(ctx, times=1):
    """Worker 0 raises in its first `times` incarnations; the others loop, counting their incarnations."""
    ctx.checkpoint()
    if ctx.worker_id == 0 and ctx.restarts < times:
        raise ValueError("worker 0 fails")
    while ctx.checkpoint():
        ctx.sleep(0.05)
    return ctx.restarts


def fail_when_told(ctx, told):
    """Worker 0 fails at once, worker 1 once `told` is set (first incarnations
    only); the others, and later incarnations, loop until stopped."""
    ctx.checkpoint()
    if ctx.restarts == 0 and ctx.worker_id == 0:
        raise ValueError("worker 0 fails")
    if ctx.restarts == 0 and ctx.worker_id == 1:
        while not told.wait(0.05):
            if not ctx.checkpoint():
                return None
        raise ValueError("worker 1 fails")
    while ctx.sleep(0.05):
        pass
    return ctx.restarts


def _stuck_if(path):
    """Unpickled in a worker as it starts: blocks (as an import that hangs) once `path` exists."""
    if os.path.exists(path):
        time.sleep(600)
    return path


class StuckOnRestart:
    """An argument whose unpickling, in a worker that starts, blocks once `path` exists."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_stuck_if, (self.path,))


def loops_with(ctx, arg):
    """Loops until stopped, whatever `arg` is."""
    while ctx.sleep(0.05):
        pass


def crash_then_stuck(ctx, path):
    """Worker 0 creates `path` and dies: its restart blocks as it starts
    (forkserver or spawn: the arguments are unpickled there). Others loop."""
    ctx.checkpoint()
    if ctx.worker_id == 0:
        open(path, "w").close()
        os._exit(1)
    while ctx.sleep(0.05):
        pass


def last_ignores_the_stop(ctx, inside):
    """The highest worker id ignores the stop and SIGTERM (it sleeps in C,
    after setting `inside`); the others loop until stopped."""
    ctx.checkpoint()
    if ctx.worker_id == ctx.workers - 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        inside.set()
        time.sleep(600)
    while ctx.sleep(0.05):
        pass


def worker1_fails_twice(ctx):
    """Worker 1 raises in its first two incarnations; the others, and its later
    ones, loop until stopped."""
    ctx.checkpoint()
    if ctx.worker_id == 1 and ctx.restarts < 2:
        raise ValueError("worker 1 fails")
    while ctx.sleep(0.05):
        pass


def gil_hog(ctx):
    """Hangs in one long GIL-holding computation when first run."""
    ctx.checkpoint()
    if ctx.restarts == 0:
        sum(range(10**12))  # minutes of pure C under the GIL
    while ctx.checkpoint():
        ctx.sleep(0.05)
    return ctx.restarts


def busy_checkpoints(ctx):
    """A tight loop of checkpoints: never hung."""
    n = 0
    while ctx.checkpoint():
        n += 1
    return n


def progress_only(ctx, seconds=1.6):
    """Reports progress in a tight loop, with no checkpoint, for `seconds`; then checkpoints."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        ctx.progress(i)
    while ctx.checkpoint():
        ctx.sleep(0.05)
    return i


def long_sleep(ctx):
    """Waits inside procctl (ctx.sleep): answers the heartbeat, never hung."""
    while ctx.checkpoint():
        ctx.sleep(1000)
    return ctx.restarts


def shard(ctx):
    """Loops until stopped; returns (worker_id, ctx.workers)."""
    while ctx.checkpoint():
        ctx.sleep(0.05)
    return ctx.worker_id, ctx.workers


def fail_on_stop(ctx):
    """Runs until stopped, then raises."""
    while ctx.checkpoint():
        ctx.sleep(0.05)
    raise RuntimeError("fails as it stops")


def saves_after_stop(ctx, seconds, inside=None):
    """Checkpoints until stopped, then saves its state for `seconds` (no
    checkpoint meanwhile, as a real save) and returns "saved". Sets the
    event `inside`, if given, once in its loop."""
    while ctx.checkpoint():
        if inside is not None and not inside.is_set():
            inside.set()
    time.sleep(seconds)
    return "saved"


class SlowToPickle:
    """A result that takes `seconds` to pickle (a large one, in effect)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __reduce__(self):
        time.sleep(self.seconds)
        return (str, ("pickled",))


def slow_to_pickle(seconds):
    """An executor task that returns at once a result that takes `seconds` to pickle."""
    return SlowToPickle(seconds)


def slow_result(ctx, seconds):
    """Returns at its first checkpoint a result that takes `seconds` to pickle."""
    ctx.checkpoint()
    return SlowToPickle(seconds)


def result_with_a_chatty_helper(ctx, seconds):
    """A helper thread calls progress() without a pause (switching threads as
    often as it can) while the target returns a result that takes `seconds`
    to pickle."""
    import sys
    import threading

    sys.setswitchinterval(1e-5)

    def spin():
        i = 0
        while True:
            i += 1
            ctx.progress(i)

    threading.Thread(target=spin, daemon=True).start()
    ctx.checkpoint()
    time.sleep(0.2)  # the helper answers the probes meanwhile
    return SlowToPickle(seconds)


def waits_on_a_silent_pipe(ctx, timeout):
    """wait_readable() on a pipe nobody writes to, without a command meanwhile:
    returns (what it said, how long it waited)."""
    r, w = os.pipe()
    started = time.monotonic()
    said = ctx.wait_readable(r, timeout=timeout)
    return said, time.monotonic() - started


def waits_after_the_stop(ctx):
    """Runs until stopped, then waits on a silent pipe without a timeout."""
    r, w = os.pipe()
    while ctx.checkpoint():
        ctx.sleep(0.05)
    return ctx.wait_readable(r)


def c_sleep_once_inside(ctx, inside):
    """Sets `inside`, then blocks in time.sleep (a C call, no checkpoint)."""
    ctx.checkpoint()
    inside.set()
    time.sleep(1000)


def c_sleep(ctx):
    """Blocks in time.sleep (a C call, no checkpoint) when first run."""
    ctx.checkpoint()
    if ctx.restarts == 0:
        time.sleep(1000)
    return ctx.restarts


def dispatch(ctx, targets, *args):
    """Worker i runs targets[i] (those that take an argument get `args`)."""
    target = targets[ctx.worker_id]
    return target(ctx, *args) if target is progress_only else target(ctx)


def first_crashes(ctx):
    """Worker 0 dies at once (os._exit(3)); the others run until stopped."""
    ctx.checkpoint()
    if ctx.worker_id == 0:
        os._exit(3)
    return shard(ctx)


def beats_then_silent(ctx, silent, quiet):
    """Checkpoints for 0.3 s (answering every probe), says so on `silent`, then
    passes no checkpoint for `quiet` seconds, and returns."""
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        ctx.checkpoint()
    silent.set()
    time.sleep(quiet)
    return ctx.checkpoint()


def starved(ctx, cpu: int):
    """A tight checkpoint loop at the lowest priority (SCHED_IDLE) on one CPU,
    where the test keeps a normal busy process: runnable all the time, it gets
    a slice now and then. Returns how many checkpoints it passed."""
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    n = 0
    while ctx.checkpoint():
        n += 1
    return n


#: size_seen writes its worker id here after each look (fork: the test reads them).
_LOOKED_R, _LOOKED_W = os.pipe()


def size_seen(ctx):
    """Each size ctx.workers said, at each command (it sleeps until the next),
    and a byte on _LOOKED_W (its worker id) after each look."""
    seen = []
    while True:
        if not seen or seen[-1] != ctx.workers:
            seen.append(ctx.workers)
        os.write(_LOOKED_W, bytes([ctx.worker_id]))
        if not ctx.sleep(float("inf")):
            return seen


def looked(workers: set[int], timeout: float = 30.0) -> None:
    """Block until each of `workers` has written a look to _LOOKED_W; what
    was written before (by workers now paused) first: call drain_looks()."""
    left = set(workers)
    deadline = time.monotonic() + timeout
    while left:
        if not select.select([_LOOKED_R], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError(f"workers {sorted(left)} did not look within {timeout} s")
        left -= set(os.read(_LOOKED_R, 64))


def drain_looks() -> None:
    while select.select([_LOOKED_R], [], [], 0)[0]:
        os.read(_LOOKED_R, 64)


#: Worker 1 of first_fails_others_deaf says it is in its target (fork: the workers share it).
_IN_TARGET_R, _IN_TARGET_W = os.pipe()


def first_fails_others_deaf(ctx):
    """Worker 0 raises once worker 1 is in its target (a worker stopped before
    it got there would end at once); the others never pass another checkpoint."""
    ctx.checkpoint()
    if ctx.worker_id == 0:
        select.select([_IN_TARGET_R], [], [], 30.0)
        raise ValueError("worker 0 fails")
    os.write(_IN_TARGET_W, b"x")
    time.sleep(3600)
