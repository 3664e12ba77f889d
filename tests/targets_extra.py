"""Extra worker targets for the library tests (importable by module name for spawn/forkserver)."""

from __future__ import annotations

import os
import signal
import sys
import time


def record_context(ctx):
    """Return what the target saw of its context and of checkpoint()."""
    seen = {
        "worker_id": ctx.worker_id,
        "state_at_entry": int(ctx.state),
        "pid": os.getpid(),
        "sigint": signal.getsignal(signal.SIGINT),
    }
    first = ctx.checkpoint()
    seen["first_checkpoint"] = first
    seen["state_after_first"] = int(ctx.state)
    n = 0
    while ctx.checkpoint():
        n += 1
        time.sleep(0.001)
    seen["stopped_checkpoints"] = [ctx.checkpoint() for _ in range(3)]
    seen["state_at_end"] = int(ctx.state)
    seen["loops"] = n
    return seen


def states_seen(ctx):
    """Record every state the target observes at a checkpoint, until stopped."""
    seen = [int(ctx.state)]
    while ctx.checkpoint():
        if int(ctx.state) != seen[-1]:
            seen.append(int(ctx.state))
        time.sleep(0.001)
    seen.append(int(ctx.state))
    return seen


def finish_after(ctx, seconds):
    """Simulated work: run for `seconds` (checking in), then finish by itself."""
    deadline = time.monotonic() + seconds
    while ctx.checkpoint():
        if time.monotonic() >= deadline:
            return time.time()
        time.sleep(0.005)
    return None


def stamp_end(ctx, seconds=0.0):
    """Work `seconds` without checkpoints, then return the wall time of the end."""
    time.sleep(seconds * (1 + ctx.worker_id))
    return time.time()


def one_busy(ctx, busy_id=1, seconds=30.0):
    """Worker `busy_id` goes busy (no checkpoint) for `seconds`; the others loop."""
    if ctx.worker_id == busy_id:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return "busy-done"
    n = 0
    while ctx.checkpoint():
        n += 1
        time.sleep(0.001)
    return n


def one_exits(ctx, dead_id=0, code=9):
    """Worker `dead_id` calls os._exit(code) at once; the others loop until stopped."""
    if ctx.worker_id == dead_id:
        os._exit(code)
    n = 0
    while ctx.checkpoint():
        n += 1
        time.sleep(0.001)
    return n


def sleep_outside(ctx):
    """Ignore SIGTERM and sleep forever outside any checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.05)


def spin_no_checkpoint(ctx):
    """Burn CPU in Python code without ever calling checkpoint again."""
    x = 0
    while True:
        x += 1


def segfault(ctx):
    import ctypes
    import faulthandler

    faulthandler.disable()  # pytest's faulthandler would print a dump

    ctypes.string_at(0)


class _BadOnLoad:
    """Pickles fine, fails to unpickle in the manager."""

    def __reduce__(self):
        return (_explode, ())


def _explode():
    raise RuntimeError("cannot rebuild this result")


def unloadable_result(ctx):
    return _BadOnLoad()


class _ReduceRaises:
    def __reduce__(self):
        raise TypeError("refuse to be pickled")


def reduce_raises_result(ctx):
    return _ReduceRaises()


class _ReduceExits:
    def __reduce__(self):
        raise SystemExit(4)


def reduce_exits_result(ctx):
    """A result whose pickling raises SystemExit: the result's fault, not the worker's end."""
    return _ReduceExits()


def recursion_result(ctx):
    """A result too deeply nested to pickle (RecursionError)."""
    x = []
    for _ in range(200_000):
        x = [x]
    return x


def big_payload(ctx, megabytes=40):
    ctx.checkpoint()
    data = bytes(range(256)) * ((megabytes << 20) // 256)
    return data


def big_with_stop(ctx, megabytes=20):
    """Return a big result only after STOPPED is broadcast."""
    while ctx.checkpoint():
        time.sleep(0.001)
    return b"y" * (megabytes << 20)


def write_then_exit_clean(ctx):
    """os._exit(0): exit code 0 but no report."""
    os._exit(0)


def kill_self(ctx, sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)
    time.sleep(5)


def print_and_return(ctx):
    print(f"hello from worker {ctx.worker_id}", flush=True)
    sys.stderr.write(f"err from worker {ctx.worker_id}\n")
    return ctx.worker_id


def add(ctx, a, b, *, scale=1):
    return (a + b) * scale + ctx.worker_id


def raise_keyboard_interrupt(ctx):
    raise KeyboardInterrupt


def raise_base_exception(ctx):
    raise GeneratorExit("odd base exception")


def gil_hog(ctx):
    """A long C call that holds the GIL throughout (no eval-loop breaks)."""
    ctx.checkpoint()
    return sum(range(10**12))


def gil_hog_said(ctx):
    """gil_hog that writes a line to its standard output as it enters the C call."""
    ctx.checkpoint()
    os.write(1, b"in its C call\n")
    return sum(range(10**12))


def signals_a_task_child_gets(_):
    """What a program a task starts does with SIGINT, SIGUSR1 and SIGUSR2 (its exit
    status), and whether this worker survives the three itself."""
    import subprocess

    out = {}
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        child = subprocess.Popen(["sleep", "30"])
        os.kill(child.pid, sig)
        try:
            out[int(sig)] = child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            out[int(sig)] = child.wait()
        os.kill(os.getpid(), sig)  # the worker itself: nothing happens
    return out
