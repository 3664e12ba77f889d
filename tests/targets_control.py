"""Targets for the control, timeline and live-view tests (importable by name for spawn)."""

from __future__ import annotations

import os
import signal
import sys
import time


def steady(ctx):
    """Reports progress worker_id+1 of 10 with info, then waits for the next command."""
    while ctx.checkpoint():
        ctx.progress(ctx.worker_id + 1, 10, item=f"i{ctx.worker_id}")
        ctx.sleep(float("inf"))


def chatty(ctx, lines=2000):
    """Writes numbered lines to stdout and stderr as fast as it can, then waits."""
    for i in range(lines):
        if not ctx.checkpoint():
            return i
        stream = sys.stdout if i % 2 == 0 else sys.stderr
        stream.write(f"worker {ctx.worker_id} processed item {i}\n")
    sys.stdout.flush()
    while ctx.sleep(float("inf")):
        pass
    return lines


def reports_then_waits(ctx):
    """In its first incarnation reports worker_id+1 of 10 as it starts (before any
    command: whatever comes when), then waits for commands."""
    if ctx.restarts == 0:
        ctx.progress(ctx.worker_id + 1, 10)
    while ctx.sleep(float("inf")):
        pass


def say_then_wait(ctx):
    """Prints one line, then waits for the next command."""
    print(f"worker {ctx.worker_id} says hello", flush=True)
    while ctx.sleep(float("inf")):
        pass


def print_then_crash(ctx):
    """Worker 0 writes two lines and dies without flushing or reporting; the others wait."""
    if ctx.worker_id == 0:
        print("before the crash, line 1")
        sys.stderr.write("before the crash, line 2\n")
        os._exit(9)
    while ctx.sleep(float("inf")):
        pass


def slow_item(x):
    """A procctl map item that takes a moment."""
    import time

    time.sleep(0.05)
    return x


def first_two_finish(ctx):
    """Workers 0 and 1 finish at once; the others wait for the next command."""
    if ctx.worker_id < 2:
        return ctx.worker_id
    while ctx.checkpoint():
        ctx.sleep(float("inf"))
    return ctx.worker_id


def spin(ctx):
    """All CPU, a checkpoint at a time, until stopped."""
    while ctx.checkpoint():
        pass


def huge_progress(ctx):
    """Reports 1e307 of 1e308 done at once (a rate and an ETA past 1e300), then waits."""
    ctx.progress(1e307, 1e308)
    while ctx.checkpoint():
        ctx.sleep(float("inf"))


def escaping_info(ctx):
    """Progress info that would clear the screen and move the cursor if printed raw."""
    ctx.progress(1, 10, note="\x1b[2J\x1b[Hcleared\nbroken")
    while ctx.sleep(float("inf")):
        pass


def escaping_output(ctx):
    """Output lines that would wipe the screen, reset the terminal and overwrite a line if written raw."""
    print("\x1b[2J\x1b[Hcleared the screen", flush=True)
    print("\x1bcreset the terminal \x07bell \x9b2J", flush=True)
    print("before\rafter the return", flush=True)
    print("a windows line\r", flush=True)
    print("\x1b[31mred stays red\x1b[0m", flush=True)
    while ctx.sleep(float("inf")):
        pass


def deaf_but_one(ctx):
    """Worker 0 stops at a checkpoint; the others never pass one."""
    if ctx.worker_id == 0:
        while ctx.sleep(3600.0):
            pass
        return "stopped"
    ctx.checkpoint()
    time.sleep(3600)


def one_hangs(ctx):
    """Worker 0 passes no checkpoint and ignores SIGTERM (hung, with a heartbeat);
    the others run until stopped."""
    if ctx.worker_id == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(100)
    while ctx.checkpoint():
        ctx.sleep(0.05)


def naps(ctx):
    """Checkpoints every 0.2 s, sleeping between (a command waits for the nap's end)."""
    while ctx.checkpoint():
        time.sleep(0.2)
