"""Worker targets for the tests: importable by module name, so spawn and forkserver can load them."""

from __future__ import annotations

import os
import signal
import sys
import time


def loop(ctx, limit=None):
    n = 0
    while ctx.checkpoint():
        n += 1
        if limit is not None and n >= limit:
            return n
    return n


def finish_at_once(ctx):
    return ctx.worker_id * 10


def sleep_units(ctx, unit=0.001):
    n = 0
    while ctx.checkpoint():
        time.sleep(unit)
        n += 1
    return n


def raise_error(ctx):
    ctx.checkpoint()
    raise ValueError(f"bad input in worker {ctx.worker_id}")


def exit_hard(ctx, code=7):
    ctx.checkpoint()
    os._exit(code)


def call_sys_exit(ctx, code=3):
    ctx.checkpoint()
    sys.exit(code)


def ignore_stop(ctx, ignoring=None):
    """Never reaches a checkpoint again and ignores SIGTERM (then releases `ignoring`, a semaphore, if given)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if ignoring is not None:
        ignoring.release()
    ctx.checkpoint()
    while True:
        time.sleep(0.05)


def ignore_stop_and_say(ctx):
    """ignore_stop that says on its output once it ignores SIGTERM (a test at a
    terminal waits for it: the run's "running" comes before the target's first line)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"worker {ctx.worker_id} ignores SIGTERM", flush=True)
    ctx.checkpoint()
    while True:
        time.sleep(0.05)


def big_result(ctx, megabytes=30):
    ctx.checkpoint()
    return b"x" * (megabytes << 20)


def big_result_said(ctx, megabytes=30):
    """big_result that writes a line to its standard output as it returns."""
    ctx.checkpoint()
    result = b"x" * (megabytes << 20)
    os.write(1, b"returning its result\n")
    return result


def unpicklable_result(ctx):
    ctx.checkpoint()
    return lambda: None


def some_fail(ctx):
    """Odd workers raise, even ones loop until stopped."""
    if ctx.worker_id % 2:
        ctx.checkpoint()
        raise RuntimeError("odd worker")
    return loop(ctx)


def cli_task(ctx):
    """For `procctl run --target targets:cli_task`: loops until stopped."""
    return loop(ctx)


def ignore_sigint_check(ctx):
    return loop(ctx)


def report_progress(ctx, counted, total=50_000):
    """Reports progress on every unit, releases `counted`, holds still until
    stopped; returns the CPU time the progress calls took (not the wall
    clock, which a loaded machine stretches)."""
    import time as _time

    spent = 0.0
    for i in range(total):
        if not ctx.checkpoint():
            break
        t = _time.thread_time()
        ctx.progress(i + 1, total, phase="counting", worker=ctx.worker_id)
        spent += _time.thread_time() - t
    counted.release()
    ctx.sleep(float("inf"))  # hold still until stopped, so status() can be read
    return spent


def tight_info(ctx, then_return: bool):
    """1000 progress calls with info in a tight loop (one info sent per interval), then idle or return."""
    for i in range(1000):
        ctx.progress(i + 1, 1000, cur=i)
    if then_return:
        return "done"
    while ctx.sleep(3600.0):
        pass
    return "stopped"


def read_then_sleep(ctx, fd):
    """Reads a byte from `fd` (no checkpoint), then sleeps an hour: the sleep's result."""
    os.read(fd, 1)
    return ctx.sleep(3600.0)


def half_then_return(ctx):
    """10 of 100 done, then (after the next command and a run) 50 of 100, and return."""
    ctx.progress(10, 100)
    ctx.sleep(3600.0)
    ctx.progress(50, 100)
    return "half"


def raise_multiline(ctx):
    """A message of several lines, with what would drive a terminal in it."""
    raise ValueError("first line \x1b]0;title\x07\x1b[2Jof the message\nsecond line\r\x9b2J")


def paced(ctx):
    """One unit of progress about every 5 ms, of a million, until stopped."""
    i = 0
    while ctx.checkpoint():
        time.sleep(0.005)
        i += 1
        ctx.progress(i, 1_000_000)
    return i
