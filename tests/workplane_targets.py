"""Targets and tasks for the channel and executor tests (importable under spawn)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import procctl


def relay(ctx, src="jobs", dst="out"):
    n = 0
    for item in ctx.iter(src):
        if not ctx.put(dst, item):
            break
        n += 1
    return n


def producer(ctx, count, dst="jobs"):
    sent = 0
    for i in range(count):
        if not ctx.put(dst, (ctx.worker_id, i)):
            break
        sent += 1
    return sent


def consumer(ctx, src="jobs"):
    got = []
    for item in ctx.iter(src):
        got.append(item)
    return got


def one_get(ctx, src="jobs"):
    try:
        return ["got", ctx.get(src, timeout=30)]
    except procctl.Closed:
        return ["closed"]


def get_with_timeout(ctx):
    import queue

    try:
        ctx.get("jobs", timeout=-1)  # as queue.Queue: a ValueError
    except ValueError:
        pass
    else:
        return "a negative timeout was taken"
    for name in ([], None, 3):  # not a name: an error naming the argument, not "unhashable type"
        for call in (lambda n=name: ctx.get(n), lambda n=name: ctx.put(n, 1), lambda n=name: list(ctx.iter(n))):
            try:
                call()
            except TypeError as exc:
                if "name" not in str(exc):
                    return f"the TypeError does not name the argument: {exc}"
            else:
                return f"the channel name {name!r} was taken"
    try:
        ctx.get("jobs", timeout=0.2)
    except queue.Empty:
        return "empty"
    return "item"


def workers_and_id(ctx):
    return ctx.worker_id, ctx.workers


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def boom(x):
    raise ValueError(f"bad {x}")


def exit_now(code):
    os._exit(code)


def sigkill_self(_):
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def until_stopped(tag):
    ctx = procctl.context()
    started_dir = os.environ.get("WORKPLANE_STARTED_DIR")
    if started_dir:  # tell the test it has started
        open(os.path.join(started_dir, str(tag)), "w").close()
    while ctx.checkpoint():
        ctx.sleep(0.02)
    return tag


def pid_then_until_stopped(fifo):
    """Write our pid to `fifo` (the test waits to read it), then run until stopped."""
    with open(fifo, "w") as fh:
        fh.write(str(os.getpid()))
    return until_stopped("pid")


def context_facts(_):
    ctx = procctl.context()
    return ctx.worker_id, ctx.workers, os.getpid()


def crash_first_time(marker):
    """Crash unless `marker` exists; create it first (the retry then succeeds)."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return "ok"


def started_at(x):
    return x, time.monotonic()


def init_flag(path):
    global INIT_PATH
    INIT_PATH = path


def read_flag(_):
    return INIT_PATH


def init_fails():
    raise RuntimeError("no init")


def pid_of(_):
    return os.getpid()


def random_task(seconds):
    if seconds < 0:  # a crash
        os._exit(3)
    ctx = procctl.context()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not ctx.checkpoint():
            return None
        ctx.sleep(min(0.005, max(0.0, end - time.monotonic())))
    return seconds


INIT_PATH = None


def exit_at(x, bad):
    """A quick task, but item `bad` kills its worker (os._exit)."""
    if x == bad:
        os._exit(7)
    return x


def slow_item(x):
    time.sleep(0.005)
    return x


def sum_sizes(ctx, src="jobs"):
    return sum(len(item) for item in ctx.iter(src))


def nap(seconds):
    """Return at once for 0 (no system call: a map chunk's blocks grow), else sleep."""
    if seconds:
        time.sleep(seconds)
    return seconds


class Dummy:
    """A result a weak reference can follow (map must not keep it alive)."""


def make_dummy(_):
    return Dummy()


class ExitWhenUnpickled:
    """A result whose unpickling (in the executor's process) calls sys.exit(3)."""

    def __reduce__(self):
        return sys.exit, (3,)


def exit_when_unpickled(_):
    return ExitWhenUnpickled()


class ExitWhenPickled:
    """A result whose pickling (in the worker) calls sys.exit(1)."""

    def __reduce__(self):
        sys.exit(1)


def exit_when_pickled(_):
    return ExitWhenPickled()


def fail_at(x, bad):
    """A quick task, but item `bad` raises ValueError."""
    if x == bad:
        raise ValueError(f"bad {x}")
    return x


def put_then_idle(ctx, timeout, idle):
    """One put on "jobs" (queue.Full after `timeout`), said on "out"; then idle
    without putting again: blocked in a get on "hold", or asleep."""
    import queue

    try:
        ctx.put("jobs", "w", timeout=timeout)
        said = "sent"
    except queue.Full:
        said = "full"
    ctx.put("out", said)
    if idle == "get":
        for _ in ctx.iter("hold"):
            pass
    else:
        while ctx.sleep(60):
            pass
    return said


def consume_or_die(ctx, bad):
    """Square what comes on "jobs" into "out"; the process dies at the item `bad`."""
    for item in ctx.iter("jobs"):
        if item == bad:
            os._exit(3)
        ctx.put("out", item * item)


def init_exits():
    """An initializer that ends its process (os._exit), as a crash in it would."""
    os._exit(7)


def put_past_a_close(ctx):
    """Fill `jobs` (maxsize 1), then put once more: blocked until the channel is closed."""
    ctx.put("jobs", 0)
    t0 = time.monotonic()
    sent = ctx.put("jobs", 1, timeout=30)
    ctx.put("out", (sent, time.monotonic() - t0))
    while ctx.sleep(3600):
        pass


def touch_unless(i, where, bad):
    """Item `bad` raises; the others take a moment, then leave a file named after them."""
    if i == bad:
        raise ValueError(f"item {i}")
    time.sleep(0.05)
    open(os.path.join(where, str(i)), "w").close()
    return i


def take_all(ctx, name="jobs"):
    """Every item of channel `name`, in the order they came."""
    return list(ctx.iter(name))


def tell_then_hold(fifo, gate):
    """Write one byte to the FIFO at `fifo` (it has begun), then wait without a
    checkpoint until the FIFO at `gate` has data (the test holds it open
    read-write and writes it; nobody reads it, so every task sees it)."""
    import select

    with open(fifo, "wb") as f:
        f.write(b"x")
    fd = os.open(gate, os.O_RDONLY | os.O_NONBLOCK)
    try:
        select.select([fd], [], [], 60)
    finally:
        os.close(fd)
    return 0


def tell_then_sleep(fifo, seconds):
    """Write one byte to the FIFO at `fifo` (it has begun), then sleep `seconds` without a checkpoint."""
    with open(fifo, "wb") as f:
        f.write(b"x")
    time.sleep(seconds)
    return seconds


def start_idle_thread():
    """An initializer that leaves a thread running (as a logging listener or OpenBLAS would)."""
    threading.Thread(target=threading.Event().wait, daemon=True).start()


def blocked_signals(_):
    """The signals blocked in the thread that runs the task (what its subprocesses inherit)."""
    return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def tell_then_work(fifo, seconds):
    """Write one byte to the FIFO at `fifo` (it has begun), then work `seconds` of
    running time in steps of 10 ms with a checkpoint between them (paused time does not count)."""
    ctx = procctl.context()
    with open(fifo, "wb") as f:
        f.write(b"x")
    ran = 0.0
    while ran < seconds and ctx.checkpoint():
        t0 = time.monotonic()
        time.sleep(0.01)
        ran += time.monotonic() - t0
    return seconds


# -- an item whose unpickling takes the next item (a get inside a get) --------------

_CTX = None


def _get_next():
    return ("inner", _CTX.get("jobs", timeout=10))


class GetsTheNext:
    """Unpickled, it is the next item of "jobs" (taken from inside the outer get)."""

    def __reduce__(self):
        return (_get_next, ())


def relay_nested(ctx, src="jobs", dst="out"):
    """relay(), with the context where a GetsTheNext item reaches it."""
    global _CTX
    _CTX = ctx
    return relay(ctx, src, dst)


# -- an item the worker can unpickle and the manager cannot -------------------------


def _only_in_a_worker(value):
    if os.environ.get("PROCCTL_TEST_IN_WORKER") != "1":
        raise RuntimeError(f"cannot unpickle {value} in the manager")
    return ("ok", value)


class OnlyInAWorker:
    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (_only_in_a_worker, (self.value,))


def put_some_unreadable(ctx, dst="out"):
    """Puts 1, an item the manager cannot unpickle, 3, another, then waits to be stopped."""
    os.environ["PROCCTL_TEST_IN_WORKER"] = "1"
    for item in (1, OnlyInAWorker(2), 3, OnlyInAWorker(4)):
        ctx.put(dst, item)
    ctx.put("said", True)
    while ctx.sleep(float("inf")):
        pass
