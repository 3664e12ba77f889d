"""Targets for tests/test_cluster.py: importable by name in Dask workers and their children."""

from __future__ import annotations

import os
import time


def loop(ctx):
    """Run until stopped; ctx.sleep keeps it responsive."""
    while ctx.checkpoint():
        ctx.sleep(0.01)
    return ctx.worker_id, ctx.workers


def by_id(ctx):
    """With 3 workers a node: each node's first worker finishes, its second fails, its third runs until stopped."""
    ctx.checkpoint()
    kind = ctx.worker_id % 3
    if kind == 0:
        return "done"
    if kind == 1:
        raise ValueError("bad input")
    while ctx.checkpoint():
        ctx.sleep(0.01)
    return "stopped"


def deaf(ctx):
    """Runs, then never looks at a checkpoint again."""
    ctx.checkpoint()
    time.sleep(100)


def deaf_task(seconds):
    time.sleep(seconds)


def crash(ctx):
    ctx.checkpoint()
    os._exit(3)


def square(x):
    return x * x


def slow_square(x):
    time.sleep(0.05)
    return x * x


def slower_square(x):
    time.sleep(0.3)
    return x * x


def napping_square(x, seconds):
    time.sleep(seconds)
    return x * x


def fail(x):
    raise ValueError(f"bad {x}")


def crash_at_once(ctx):
    os._exit(3)


def parent_pid(x):
    """The pid of the process that started this worker: its node's Dask worker."""
    time.sleep(0.01)
    return os.getppid()


class Dummy:
    """A result a weak reference can follow (map must not keep it alive)."""


def make_dummy(_):
    return Dummy()


def long_units(ctx, seconds, fifo=None):
    """Checkpoints only between units of `seconds`: a pause waits for the unit's end.
    With `fifo`, says "started" through it as its first unit begins."""
    while ctx.checkpoint():
        if fifo is not None:
            with open(fifo, "w") as f:
                f.write("started\n")
            fifo = None
        time.sleep(seconds)
    return "stopped"


def exit_if(x, bad):
    """x, or the worker dies (os._exit(7)) for the item `bad`."""
    if x == bad:
        os._exit(7)
    time.sleep(0.01)
    return x


def where_am_i(_):
    import procctl
    ctx = procctl.context()
    return ctx.worker_id, ctx.workers, os.getpid()


def deaf_task_telling(fifo, seconds):
    """Say "started" through the FIFO at `fifo`, then sleep without a checkpoint."""
    with open(fifo, "w") as f:
        f.write("started\n")
    time.sleep(seconds)


def fail_on_worker_0():
    """An initializer that fails on global worker 0 only (the first node's)."""
    import procctl

    if procctl.context().worker_id == 0:
        raise ValueError("no good on this node")


def tell_start_and_stop(fifo, i):
    """Say "started I" through the FIFO, sleep until STOPPED, say "stopped I",
    then sleep without a checkpoint (the node escalates after its grace)."""
    import procctl

    ctx = procctl.context()
    with open(fifo, "w") as f:
        f.write(f"started {i}\n")
    while ctx.sleep(60):
        pass
    with open(fifo, "w") as f:
        f.write(f"stopped {i}\n")
    time.sleep(60)
