"""Functions for `procctl map` tests: importable by module name from the tests directory."""

from __future__ import annotations

import json
import os
import time

NOT_CALLABLE = 42


def square(x):
    return x * x


def no_argument():
    return 1


def fail_on_multiples_of_3(x):
    if x % 3 == 0:
        raise ValueError(f"{x} is a multiple of 3")
    return x


def not_json(x):
    return {x}  # a set has no JSON form


def not_finite(x):
    """NaN and infinity have no JSON form."""
    return {1: float("nan"), 2: 2, 3: float("inf")}[x]


def later_items_first(x):
    """The higher the item, the sooner it ends: completion order is not input order."""
    time.sleep(max(0, 20 - x) * 0.004)
    return x


def mark(item):
    """Work for MAP_DELAY seconds, then record (item, pid) in MAP_MARKS with one O_APPEND write."""
    time.sleep(float(os.environ.get("MAP_DELAY", "0")))
    fd = os.open(os.environ["MAP_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps({"item": item, "pid": os.getpid()}) + "\n").encode())
    finally:
        os.close(fd)
    return item


def ignore_stop(item):
    """Mark, then work far past any grace period without a checkpoint."""
    fd = os.open(os.environ["MAP_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps({"item": item, "pid": os.getpid()}) + "\n").encode())
    os.close(fd)
    os.write(2, b"task started\n")  # on the command line's stderr, for the test to wait on
    time.sleep(60)
    return item


def upper(line):
    return line.upper()


def close_fds_on_2(x):
    """Item 2 closes every descriptor of its worker (the work link too) and returns."""
    if x == 2:
        os.closerange(3, 65536)
    return x


def crash_on_5_hang_on_3(x):
    if x == 5:
        os._exit(3)
    if x == 3:
        time.sleep(60)
    return x


def nap(item):
    """Sleep item["s"] seconds and return item["n"]: the item says how long, since
    the workers of a --cluster run do not see the command line's environment.
    With item["fifo"], first say "started" on that FIFO, which the test reads."""
    if "fifo" in item:
        with open(item["fifo"], "w") as f:
            f.write(f"started {item['n']}\n")
    time.sleep(item["s"])
    return item["n"]
