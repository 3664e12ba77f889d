"""Worker-side functions for scripts/bench.py.

Kept in their own small module, importable by name, so that spawn and
forkserver children load only this (plus what procctl needs), never the
harness or the peer libraries.
"""

from __future__ import annotations

import os
import queue
import random
import subprocess
import time

UNIT = 0.001  # one unit of work: 1 ms of this thread's CPU time


def burn(seconds: float = UNIT) -> None:
    """Spin for `seconds` of CPU time (not wall time: fair under contention)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def trivial(x: int = 0) -> int:
    """The one trivial task a peer pool runs per worker."""
    return x + 1


def unit_task(x: int = 0) -> int:
    """One 1 ms CPU unit, as a pool task (the peers' 'checkpoint' is the task boundary)."""
    burn()
    return x


# -- procctl targets ---------------------------------------------------------


def pc_lifecycle(ctx) -> int:
    """Reach the first unit of work, do it, return (the controller reaps)."""
    if ctx.checkpoint():
        return trivial(ctx.worker_id)
    return -1


def pc_idle(ctx) -> int:
    """Stay alive, blocked in the kernel, answering every broadcast."""
    n = 0
    while ctx.sleep(3600.0):
        n += 1
    return n


def pc_busy(ctx, ready) -> int:
    """1 ms CPU units with a checkpoint between them; `ready` released after the first."""
    units = 0
    while ctx.checkpoint():
        burn()
        units += 1
        if units == 1:
            ready.release()
    return units


def pc_busy_with_children(ctx, ready, pids, k: int) -> int:
    """pc_busy after starting `k` grandchildren (`sleep 1000`), their pids in `pids`."""
    kids = [subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL) for _ in range(k)]
    for j, kid in enumerate(kids):
        pids[ctx.worker_id * k + j] = kid.pid
    return pc_busy(ctx, ready)


# -- raw floors --------------------------------------------------------------


def raw_lifecycle(conn) -> None:
    """Go, one reply, exit."""
    try:
        conn.recv()
        conn.send(trivial(0))
    finally:
        conn.close()


def raw_pipe_echo(conn) -> None:
    """Per-worker Pipe floor: echo every command until None."""
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                return
            conn.send(msg)
    except (EOFError, OSError):
        return
    finally:
        conn.close()


def raw_cond_worker(lock, cmd, done, gen, acks, n: int) -> None:
    """Shared-Condition floor: wait for a new generation, count an ack.

    gen.value < 0 means stop.
    """
    mine = 0
    with lock:
        while True:
            while gen.value == mine:
                cmd.wait()
            mine = gen.value
            if mine < 0:
                return
            acks.value += 1
            if acks.value >= n:
                done.notify()


def raw_busy(stop, ready, up, go) -> None:
    """Raw Event floor: 1 ms units, the Event checked between them.

    Says `up`, waits for `go` (so that early workers do not starve the
    parent while it is still starting the rest), then works.
    """
    up.release()
    go.wait()
    units = 0
    while not stop.is_set():
        burn()
        units += 1
        if units == 1:
            ready.release()


def raw_blocked_get(q) -> None:
    """Paused floor: blocked in Queue.get() until None arrives."""
    while q.get() is not None:
        pass


def raw_naive_poll(q) -> None:
    """The naive 'pause': get_nowait() + sleep(0) in a loop."""
    while True:
        try:
            if q.get_nowait() is None:
                return
        except queue.Empty:
            time.sleep(0)


def raw_idle_recv(conn) -> None:
    """An idle raw worker for the memory case: say hello, block in recv()."""
    try:
        conn.send(os.getpid())
        conn.recv()
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


# -- raw sum-threshold loop (same work as procctl.sum_threshold) -------------


def raw_producer(i, q, flag, produced, values, batch: int, seed: int) -> None:
    """Put random values (or lists of `batch` values) until the shared flag is set."""
    rng = random.Random(seed * 1000 + i)
    count = 0
    try:
        while not flag.value:
            item = rng.choices(values, k=batch) if batch > 1 else rng.choice(values)
            while True:
                try:
                    q.put(item, timeout=0.01)
                    break
                except queue.Full:
                    if flag.value:
                        item = None
                        break
            if item is None:
                break
            count += batch
    finally:
        # Our feeder thread may still hold items; the manager keeps draining
        # the queue until we are gone, so the flush at exit cannot block.
        produced[i] = count


def raw_consumer(i, q, flag, stop, lock, winner, sums, received, threshold: int) -> None:
    """Sum what arrives; the first to cross the threshold wins and stops everyone."""
    total = 0
    count = 0
    try:
        while not flag.value:
            try:
                item = q.get(timeout=0.01)
            except queue.Empty:
                continue
            if isinstance(item, list):
                total += sum(item)
                count += len(item)
            else:
                total += item
                count += 1
            if total > threshold:
                with lock:
                    if winner.value < 0:
                        winner.value = i
                flag.value = 1
                stop.set()
                break
    finally:
        sums[i] = total
        received[i] = count


def ready_then(ready, go, target, q) -> None:
    """Tell the manager we are up, wait for `go`, then run `target(q)`."""
    ready.release()
    go.wait()
    target(q)


def pid() -> int:
    return os.getpid()


# -- the work plane (executor and channels cases) --------------------------------


def ident(x):
    return x


def cpu_1ms(x):
    """1 ms of this thread's CPU time (not wall time: fair under contention)."""
    burn()
    return x


def chan_consume(ctx, n):
    got = 0
    for _ in ctx.iter("jobs"):
        got += 1
    return got


def chan_3x3(ctx, per_producer, batch):
    """The sum job's traffic on bare channels: workers 0-2 put, 3-5 take until closed."""
    if ctx.worker_id < 3:
        item = 2 if batch == 1 else bytes([2]) * batch
        sent = 0
        while sent < per_producer and ctx.put("items", item):
            sent += 1
        return sent
    got = 0
    for _ in ctx.iter("items"):
        got += 1
    return got


def mpq_consume(q, up):
    """Says it is up (as chan_consume's worker acknowledges its run), then takes until None."""
    up.release()
    got = 0
    while q.get() is not None:
        got += 1


# -- supervision (issue 9) ----------------------------------------------------------


def sup_restart(ctx, starts, deaths, pids, up, armed) -> None:
    """Each incarnation stamps its first checkpoint; then, once the bench
    watches its pid (`up`, `armed`), its death, and dies (os._exit)."""
    ctx.checkpoint()
    starts[ctx.restarts] = time.monotonic()
    if ctx.restarts + 1 < len(starts):
        pids[ctx.restarts] = os.getpid()
        up.release()
        armed.acquire()
        deaths[ctx.restarts] = time.monotonic()
        os._exit(1)


def watch_deaths(pids, ended, up, armed) -> None:
    """A process apart: for each incarnation `up` announces, watch its pidfd
    (then `armed` lets it die) and stamp in `ended` when the kernel says it ended."""
    import select

    for k in range(len(ended)):
        if not up.acquire(timeout=60):
            return
        fd = os.pidfd_open(pids[k])
        armed.release()
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(60_000):
                return
            ended[k] = time.monotonic()
        finally:
            os.close(fd)


def raw_first(stamps, k: int) -> None:
    """A raw Process's first instruction."""
    stamps[k] = time.monotonic()


def sup_checkpoints(ctx, n: int) -> float:
    """Seconds for `n` checkpoints in a tight loop."""
    t0 = time.perf_counter()
    for _ in range(n):
        ctx.checkpoint()
    return time.perf_counter() - t0
