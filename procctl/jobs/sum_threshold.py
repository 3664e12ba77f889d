"""The sum-threshold job: producers fill one queue, consumers sum, the first past the threshold wins.

Everything runs on one ProcessController (workers 0..P-1 produce, P..P+C-1
consume), started RUNNING.  The shared pieces travel as the target's args:

    producers --put()--> multiprocessing.Queue(queue_size) --_Tap.take()--> consumers
                                                                |  first sum > threshold:
    manager  <-- pc.reap(): the winner's process ended ----------+  claim (locked Value), return
    manager:  pc.stop()  while a _Drainer thread empties the queue (producers blocked in put()
              get their slot, their feeder threads can flush), then, every process ended:
              last drain, queue.close(), queue.join_thread()

Accounting: a producer counts an item once put() returned; a consumer counts
an item as soon as it is off the pipe, before it looks at any command; the
drainer counts what nobody consumed.  Hence sum(produced) == sum(received) +
drained, whenever the stop comes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import pickle
import random
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from numbers import Real
from typing import Any

from .. import limits
from ..controller import ProcessController
from ..states import CLEAN_OUTCOMES, Outcome, State, WorkerReport
from ..worker import MANAGED_SIGNALS, WorkerContext

log = logging.getLogger("procctl")

#: Values per queue operation, at most. Up to about 500 small ints a message
#: stays under PIPE_BUF, so a producer killed mid-write cannot leave half a
#: message in the pipe; larger batches trade that for throughput (the queue's
#: write lock still keeps producers' messages whole).
MAX_BATCH = 100_000
#: Seconds the manager gives its stop (broadcast, then escalation).
GRACE = 5.0
#: How long the drainer waits for the queue's read lock before it looks again
#: (only a reader that died holding the lock makes it wait that long).
LOCK_WAIT = 0.2
#: How long the manager waits for one of its reader threads to finish.
JOIN_TIMEOUT = 10.0

Delay = float | tuple[float, float]
EventSink = Callable[[dict[str, Any]], None]


# -- results and errors ---------------------------------------------------------


@dataclass(frozen=True)
class SumResult:
    """How a sum-threshold run ended. Counts are items (values), not queue operations."""

    winner: int  # consumer index
    threshold: int
    sums: tuple[int, ...]  # value sum per consumer
    received: tuple[int, ...]  # items per consumer
    produced: tuple[int, ...]  # items per producer
    drained: int  # items the manager took off the queue during cleanup
    elapsed: float  # seconds, for the whole call

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "threshold": self.threshold, "sums": list(self.sums),
                "received": list(self.received), "produced": list(self.produced),
                "drained": self.drained, "elapsed": round(self.elapsed, 3)}


class SumJobError(RuntimeError):
    """A producer or consumer failed, crashed or was killed: the counts cannot be trusted."""


class SumCancelled(RuntimeError):
    """cancel() was called (e.g. on SIGINT); everything was stopped and cleaned up first."""


@dataclass(frozen=True)
class ProducerTally:
    """A producer's return value."""

    producer: int
    produced: int


@dataclass(frozen=True)
class ConsumerTally:
    """A consumer's return value."""

    consumer: int
    sum: int
    received: int
    crossed: bool
    won: bool


@dataclass(frozen=True)
class _Plan:
    """The validated arguments, as every worker receives them."""

    producers: int
    consumers: int
    threshold: int
    values: tuple[int, ...]
    queue_size: int
    delay: tuple[float, float]  # (min, max); (0, 0): no delay
    seed: int | None
    start_method: str | None
    timeout: float | None
    batch: int
    t0: float = 0.0  # time.monotonic() at the start of the run (system-wide on Linux)
    listen: bool = False  # send per-item events to the manager


# -- argument checks --------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name} must be {bound}, not {value!r}")
    return int(value)


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


def _values(values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"values must be a sequence of positive integers, not {values!r}")
    items = tuple(values)
    if not items:
        raise ValueError("values must not be empty")
    bad = [v for v in items if not _is_int(v) or v <= 0]
    if bad:
        raise ValueError(f"values must be positive integers; {bad[0]!r} is not")
    return items


def _delay(delay: Any) -> tuple[float, float]:
    if isinstance(delay, (tuple, list)):
        if len(delay) != 2:
            raise ValueError(f"delay must be a number or a (min, max) pair, not {delay!r}")
        low, high = _seconds("delay min", delay[0]), _seconds("delay max", delay[1])
        if low > high:
            raise ValueError(f"delay min {low} is greater than delay max {high}")
        return low, high
    seconds = _seconds("delay", delay)
    return seconds, seconds


def _timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, Real) or not float(timeout) > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def make_plan(producers: Any = 3, consumers: Any = 3, threshold: Any = 10, *, values: Any = (1, 2, 3),
              queue_size: Any = 3, delay: Any = 0.0, seed: Any = None, start_method: Any = None,
              timeout: Any = None, batch: Any = 1) -> _Plan:
    """Check every argument (ValueError with a clear message); start nothing."""
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be an integer or None, not {seed!r}")
    if start_method is not None and start_method not in multiprocessing.get_all_start_methods():
        methods = ", ".join(multiprocessing.get_all_start_methods())
        raise ValueError(f"start_method must be one of {methods}, not {start_method!r}")
    workers = _count("producers", producers) + _count("consumers", consumers)
    too_many = limits.capacity_problem(workers)
    if too_many is not None:
        raise ValueError(f"too many workers ({producers} producers and {consumers} consumers): {too_many}")
    return _Plan(
        producers=_count("producers", producers),
        consumers=_count("consumers", consumers),
        threshold=_count("threshold", threshold, low=0),
        values=_values(values),
        queue_size=_count("queue_size", queue_size),
        delay=_delay(delay),
        seed=seed,
        start_method=start_method,
        timeout=_timeout(timeout),
        batch=_count("batch", batch, high=MAX_BATCH),
    )


# -- the worker side ----------------------------------------------------------------


def sum_worker(ctx: WorkerContext, plan: _Plan, queue: Any, claim: Any, events: Any) -> Any:
    """The controller's target: worker ids below `plan.producers` produce, the rest consume."""
    if ctx.worker_id < plan.producers:
        return _produce(ctx, plan, queue, ctx.worker_id)
    return _consume(ctx, plan, queue, claim, events, ctx.worker_id - plan.producers)


def _item_maker(rng: random.Random, values: tuple[int, ...], batch: int) -> Callable[[], Any]:
    if batch == 1:
        return partial(rng.choice, values)
    if max(values) <= 255:
        return _byte_batches(rng, values, batch)
    return lambda: tuple(rng.choices(values, k=batch))


def _byte_batches(rng: random.Random, values: tuple[int, ...], batch: int) -> Callable[[], bytes]:
    """Batches of small values as bytes, drawn and mapped in C: the per-value
    Python loop of choices() was the batched job's bottleneck. Consumers sum
    and count bytes as they do tuples.

    Random bytes at or past the largest multiple of len(values) are dropped,
    so that every value stays equally likely.
    """
    n = len(values)
    limit = 256 - 256 % n
    table = bytes(values[b % n] if b < limit else 0 for b in range(256))
    tail = bytes(range(limit, 256))

    def make() -> bytes:
        out = b""
        while len(out) < batch:
            out += rng.randbytes(batch - len(out) + batch // 64 + 8).translate(None, tail)
        return out[:batch].translate(table)

    return make


def _produce(ctx: WorkerContext, plan: _Plan, queue: Any, index: int) -> ProducerTally:
    # A fresh generator per producer: forked children would otherwise share one state.
    rng = random.Random(None if plan.seed is None else f"{plan.seed}:{index}")
    make_item = _item_maker(rng, plan.values, plan.batch)
    put, per_put = queue.put, plan.batch
    low, high = plan.delay
    produced = 0
    while ctx.checkpoint():
        # put() may block on a full queue; once the stop comes the manager
        # drains, so it returns, and the item it accepted is counted here.
        put(make_item())
        produced += per_put
        if high > 0 and not ctx.sleep(rng.uniform(low, high) if high > low else low):
            break
    # Returning lets multiprocessing join our feeder thread at exit; it can
    # flush because the manager keeps draining until every process has ended.
    return ProducerTally(index, produced)


class _Tap:
    """Take messages off a multiprocessing.Queue while staying responsive to commands.

    Queue.get() blocks in recv() holding the queue's read lock: deaf to a
    stop.  Waiting outside the lock instead (every consumer polling the pipe)
    wakes every consumer for every item.  So a consumer takes the read lock,
    and only if the pipe is empty waits, still holding it, in
    ctx.wait_readable(), which also wakes on a command or the manager's
    death.  One reader waits on the pipe, the others queue on the lock, as
    with Queue.get(); on a stop the holder lets go at once and each next
    holder finds the command already posted.  It uses the Queue's own lock,
    slot semaphore and pipe, so it interoperates with put() and get().
    """

    def __init__(self, queue: Any) -> None:
        reader = queue._reader
        self.fd: int = reader.fileno()
        self.recv = reader.recv_bytes
        self.lock = queue._rlock
        self.free_slot = queue._sem.release
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        self.ready = partial(poller.poll, 0)

    def take(self, ctx: WorkerContext) -> bytes | None:
        """The next message, or None once STOPPED."""
        with self.lock:
            while not self.ready():
                ctx.wait_readable(self.fd)
                # A command may have been applied even if the pipe is readable now.
                if not ctx.checkpoint():
                    return None
            data: bytes = self.recv()
        self.free_slot()  # a producer blocked in put() may go on
        return data


def _claim(claim: Any, index: int) -> bool:
    """The first caller wins; the lock makes the test-and-set atomic across processes."""
    with claim.get_lock():
        if claim.value >= 0:
            return False
        claim.value = index
        return True


def _consume(ctx: WorkerContext, plan: _Plan, queue: Any, claim: Any, events: Any, index: int) -> ConsumerTally:
    tap = _Tap(queue)
    take, loads, checkpoint = tap.take, pickle.loads, ctx.checkpoint
    threshold, batched = plan.threshold, plan.batch > 1
    tell = _Teller(events, plan.t0, index) if events is not None else None
    total = received = 0
    while True:
        data = take(ctx)
        if data is None:
            break
        item = loads(data)
        # Counted before any command is looked at: taken means received.
        if batched:
            total += sum(item)
            received += len(item)
        else:
            total += item
            received += 1
        if tell is not None:
            tell.received(item if batched else (item,), total)
        if total > threshold:
            won = _claim(claim, index)
            if tell is not None:
                tell.crossed(total, won)
            # Ending is the signal: the manager, blocked in pc.reap(), wakes and stops everyone.
            return ConsumerTally(index, total, received, True, won)
        if not checkpoint():
            break
    return ConsumerTally(index, total, received, False, False)


class _Teller:
    """A consumer's story, as small tuples on the events queue (only when someone listens)."""

    def __init__(self, events: Any, t0: float, index: int) -> None:
        self.put, self.t0, self.index = events.put, t0, index

    def received(self, items: Sequence[int], total: int) -> None:
        t = time.monotonic() - self.t0
        running = total - sum(items)
        for value in items:
            running += value
            self.put(("received", t, self.index, value, running))

    def crossed(self, total: int, won: bool) -> None:
        self.put(("crossed", time.monotonic() - self.t0, self.index, total, won))


# -- the manager side ---------------------------------------------------------------


def _start_thread(thread: threading.Thread) -> None:
    # Started with the managed signals blocked, so the thread inherits a mask
    # that leaves every signal to the main thread (which the handlers must wake).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, MANAGED_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _PipeReader(threading.Thread):
    """A manager thread that reads a queue's pipe until finish(), then empties it.

    finish() must only be called once every worker process has ended: the
    last pass reads without the lock and without blocking.
    """

    def __init__(self, name: str, reader: Any) -> None:
        super().__init__(name=name, daemon=True)
        self.reader = reader
        self.fd: int = reader.fileno()
        self._stop_r, self._stop_w = os.pipe()
        self.error: BaseException | None = None

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while not any(fd == self._stop_r for fd, _ in poller.poll()):
                self.take_some()
            self.take_rest()
        except BaseException as exc:  # noqa: BLE001 - reported by finish(), in the manager's thread
            self.error = exc

    def take_some(self) -> None:
        raise NotImplementedError

    def handle(self, data: bytes) -> None:
        raise NotImplementedError

    def take_rest(self) -> None:
        # Every writer has ended: whatever is in the pipe is all there is, and
        # a message a killed writer left half-written must not block us.
        os.set_blocking(self.fd, False)
        while True:
            try:
                data = self.reader.recv_bytes()
            except (BlockingIOError, EOFError):
                return
            self.handle(data)

    def finish(self) -> None:
        os.write(self._stop_w, b"\0")
        self.join(JOIN_TIMEOUT)
        alive = self.is_alive()
        if not alive:
            os.close(self._stop_r)
            os.close(self._stop_w)
        if alive:
            raise SumJobError(f"the manager's {self.name} thread did not finish within {JOIN_TIMEOUT}s")
        if self.error is not None:
            raise SumJobError(f"the manager's {self.name} thread failed: {self.error!r}") from self.error


class _Drainer(_PipeReader):
    """Empties the item queue while the stop is under way, then once everyone has ended."""

    def __init__(self, queue: Any) -> None:
        super().__init__("sum-drainer", queue._reader)
        self.tap = _Tap(queue)
        self.items = 0

    def take_some(self) -> None:
        # Consumers may still be reading: share the lock as they do.
        if not self.tap.lock.acquire(timeout=LOCK_WAIT):
            return
        try:
            while self.tap.ready():
                data = self.tap.recv()
                self.tap.free_slot()
                self.handle(data)
        finally:
            self.tap.lock.release()

    def handle(self, data: bytes) -> None:
        item = pickle.loads(data)
        self.items += len(item) if isinstance(item, (tuple, bytes)) else 1


class _Relay(_PipeReader):
    """Turns the consumers' event tuples into dicts for on_event, as they come."""

    def __init__(self, events: Any, deliver: EventSink, threshold: int) -> None:
        super().__init__("sum-events", events._reader)
        self.deliver = deliver
        self.threshold = threshold
        self._ready = select.poll()
        self._ready.register(self.fd, select.POLLIN)

    def take_some(self) -> None:
        # We are the events queue's only reader: no lock needed.
        while self._ready.poll(0):
            self.handle(self.reader.recv_bytes())

    def handle(self, data: bytes) -> None:
        kind, t, consumer, a, b = pickle.loads(data)
        if kind == "received":
            event = {"t": round(t, 6), "event": "received", "consumer": consumer, "value": a, "sum": b}
        else:
            event = {"t": round(t, 6), "event": "crossed", "consumer": consumer, "sum": a,
                     "threshold": self.threshold, "winner": b}
        self.deliver(event)


def _close_queue(queue: Any) -> None:
    queue.close()
    queue.join_thread()
    # The manager never put(), so it has no feeder thread, and Queue.close()
    # closes the pipe only through that thread: close our ends ourselves.
    queue._reader.close()
    queue._writer.close()


class SumJob:
    """One sum-threshold run. `run()` once; `cancel()` and `kill()` are safe from a signal handler."""

    def __init__(self, producers: int = 3, consumers: int = 3, threshold: int = 10, *,
                 values: Sequence[int] = (1, 2, 3), queue_size: int = 3, delay: Delay = 0.0,
                 seed: int | None = None, start_method: str | None = None, timeout: float | None = None,
                 batch: int = 1, on_event: EventSink | None = None, grace: float = GRACE) -> None:
        self.plan = make_plan(producers, consumers, threshold, values=values, queue_size=queue_size,
                              delay=delay, seed=seed, start_method=start_method, timeout=timeout, batch=batch)
        if on_event is not None and not callable(on_event):
            raise ValueError(f"on_event must be callable, not {on_event!r}")
        self.grace = _seconds("grace", grace)
        self._on_event = on_event
        self._cancelled = False
        self._pc: ProcessController | None = None
        self._used = False
        self._t0 = 0.0

    @property
    def controller(self) -> ProcessController | None:
        """The controller of the run (None before run() made it), for status and pause/resume."""
        return self._pc

    # -- control, from any thread or a signal handler -------------------------

    def cancel(self) -> None:
        """Stop cleanly as soon as possible; run() then raises SumCancelled."""
        self._cancelled = True
        if self._pc is not None:
            self._pc.wakeup()

    def kill(self) -> None:
        """SIGKILL every worker now (a second Ctrl-C): the counts are lost."""
        self._cancelled = True
        if self._pc is not None:
            self._pc.kill()
            self._pc.wakeup()

    # -- the run ---------------------------------------------------------------

    def run(self) -> SumResult:
        if self._used:
            raise RuntimeError("a SumJob runs once; create another")
        self._used = True
        self._t0 = time.monotonic()
        plan = replace(self.plan, t0=self._t0, listen=self._on_event is not None)
        mp = multiprocessing.get_context(plan.start_method)
        queue = mp.Queue(plan.queue_size)
        claim = mp.Value("i", -1)
        events = mp.SimpleQueue() if plan.listen else None
        relay = _Relay(events, self._emit, plan.threshold) if events is not None else None
        pc = ProcessController(sum_worker, plan.producers + plan.consumers, args=(plan, queue, claim, events),
                               start_method=plan.start_method, grace=self.grace, initial_state=State.RUNNING)
        self._pc = pc
        verdict = "interrupted"
        try:
            if relay is not None:
                _start_thread(relay)
            pc.start()
            verdict = self._await_verdict(pc, claim)
        finally:
            reports, drained = self._shutdown(pc, queue, events, relay)
        return self._conclude(verdict, reports, claim.value, drained)

    def _await_verdict(self, pc: ProcessController, claim: Any) -> str:
        """Block until a winner claimed, a worker ended anyway, the timeout, or cancel()."""
        timeout = self.plan.timeout
        deadline = None if timeout is None else self._t0 + timeout
        while True:
            if self._cancelled:
                return "cancelled"
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Wakes when a worker ends (the winner returns at once) or on cancel()'s wakeup.
            ended = pc.reap(timeout=remaining)
            if claim.value >= 0:
                return "crossed"
            if ended:
                return "ended"
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"

    def _shutdown(self, pc: ProcessController, queue: Any, events: Any,
                  relay: _Relay | None) -> tuple[dict[int, WorkerReport], int]:
        """Stop everyone while draining; then drain, close, join, in that order."""
        drainer = _Drainer(queue)
        _start_thread(drainer)
        try:
            try:
                reports = pc.stop()
            except BaseException:
                pc.kill()  # interrupted while stopping: do not wait any longer
                pc.stop(grace=0)
                raise
            finally:
                # Every process has ended now: nothing more can arrive.
                try:
                    drainer.finish()
                finally:
                    if relay is not None:
                        relay.finish()
        finally:
            _close_queue(queue)
            if events is not None:
                events.close()
        self._tell_cleanup(reports, drainer.items)
        return reports, drainer.items

    def _tell_cleanup(self, reports: dict[int, WorkerReport], drained: int) -> None:
        if self._on_event is None:
            return
        for report in reports.values():
            self._emit(self._ended_event(report))
        self._emit({"t": self._now(), "event": "drained", "items": drained})
        self._emit({"t": self._now(), "event": "closed"})

    def _ended_event(self, report: WorkerReport) -> dict[str, Any]:
        tally = self._tally(report)
        if isinstance(tally, ProducerTally):
            return {"t": self._now(), "event": "producer_stopped", "producer": tally.producer,
                    "produced": tally.produced, "outcome": report.outcome.value}
        if isinstance(tally, ConsumerTally):
            return {"t": self._now(), "event": "consumer_stopped", "consumer": tally.consumer,
                    "sum": tally.sum, "received": tally.received, "winner": tally.won,
                    "outcome": report.outcome.value}
        role, index = self._role(report.worker_id)
        return {"t": self._now(), "event": f"{role}_stopped", role: index, "outcome": report.outcome.value,
                "error": report.error_line or report.outcome.value}

    def _conclude(self, verdict: str, reports: dict[int, WorkerReport], winner: int, drained: int) -> SumResult:
        if verdict == "cancelled":
            raise SumCancelled("the sum-threshold run was cancelled; everything was stopped and cleaned up")
        producers, consumers = self._tallies(reports)
        if verdict == "timeout":
            raise TimeoutError(f"no consumer's sum exceeded {self.plan.threshold} within {self.plan.timeout}s;"
                               " everything was stopped and cleaned up")
        if winner < 0 or not consumers[winner].won or consumers[winner].sum <= self.plan.threshold:
            raise SumJobError(f"the run ended without a valid winner (claim {winner}, verdict {verdict})")
        return SumResult(
            winner=winner,
            threshold=self.plan.threshold,
            sums=tuple(c.sum for c in consumers),
            received=tuple(c.received for c in consumers),
            produced=tuple(p.produced for p in producers),
            drained=drained,
            elapsed=time.monotonic() - self._t0,
        )

    def _tallies(self, reports: dict[int, WorkerReport]) -> tuple[list[ProducerTally], list[ConsumerTally]]:
        """Every worker's tally; SumJobError if any did not end cleanly."""
        tallies = {wid: self._tally(report) for wid, report in reports.items()}
        bad = [reports[wid] for wid, tally in tallies.items() if tally is None]
        if bad or len(reports) != self.plan.producers + self.plan.consumers:
            lines = []
            for r in bad:
                role, index = self._role(r.worker_id)
                lines.append(f"{role} {index} (worker {r.worker_id}) {r.outcome.value}: {r.error_line or '-'}")
            raise SumJobError("the counts cannot be trusted: " + "; ".join(lines or ["a worker is missing"]))
        producers = [tallies[w] for w in range(self.plan.producers)]
        consumers = [tallies[self.plan.producers + c] for c in range(self.plan.consumers)]
        return producers, consumers  # type: ignore[return-value]

    def _tally(self, report: WorkerReport) -> ProducerTally | ConsumerTally | None:
        """The worker's tally, or None if its counts are unknown."""
        if report.outcome not in CLEAN_OUTCOMES:
            return None
        if isinstance(report.result, (ProducerTally, ConsumerTally)):
            return report.result
        if report.outcome is Outcome.STOPPED and report.result is None:
            # Stopped before its target ever ran (it came up after the race was
            # over): it touched nothing, so it counts zero.
            role, index = self._role(report.worker_id)
            return ProducerTally(index, 0) if role == "producer" else ConsumerTally(index, 0, 0, False, False)
        return None

    def _role(self, worker_id: int) -> tuple[str, int]:
        if worker_id < self.plan.producers:
            return "producer", worker_id
        return "consumer", worker_id - self.plan.producers

    def _now(self) -> float:
        return round(time.monotonic() - self._t0, 6)

    def _emit(self, event: dict[str, Any]) -> None:
        # Called from the relay thread during the run, from the caller's thread
        # after it (the relay is joined first): never two at once.
        assert self._on_event is not None
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event callback failed for %s", event)


def sum_threshold(producers: int = 3, consumers: int = 3, threshold: int = 10, *,
                  values: Sequence[int] = (1, 2, 3), queue_size: int = 3, delay: Delay = 0.0,
                  seed: int | None = None, start_method: str | None = None, timeout: float | None = None,
                  batch: int = 1, on_event: EventSink | None = None) -> SumResult:
    """Run producers and consumers over one queue until a consumer's sum exceeds `threshold`.

    Each producer puts values chosen at random from `values` (`batch` of
    them per queue operation), sleeping `delay` seconds (or a random
    `(min, max)`) after each put.  The first consumer whose sum exceeds the
    threshold wins; then everyone is stopped, the queue drained, closed and
    joined, every process reaped.  ValueError for bad arguments (before any
    process starts); TimeoutError after a clean stop when nobody crossed
    within `timeout` seconds; SumJobError when a worker failed.

    `on_event(dict)` gets the story: received, crossed (from a helper thread
    while the run goes), then producer_stopped, consumer_stopped, drained,
    closed; calls never overlap.
    """
    job = SumJob(producers, consumers, threshold, values=values, queue_size=queue_size, delay=delay,
                 seed=seed, start_method=start_method, timeout=timeout, batch=batch, on_event=on_event)
    return job.run()
