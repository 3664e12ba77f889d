"""The sum-threshold job, manager side: producers fill one channel, consumers sum, the first past the threshold wins.

Everything runs on one ProcessController (workers 0..P-1 produce, P..P+C-1
consume, see sum_worker.py), started RUNNING, with the controller's channels:

    ITEMS  (maxsize queue_size)  producers --> consumers; the controller drains it at stop()
    EVENTS (unbounded, when someone listens)  consumers --> _Relay thread --> on_event

    manager: pc.reap() wakes when a worker ends: the winner (it claimed in
             the ledger, then returned), one that failed, or one SIGKILLed
    manager: pc.stop() (STOPPED wakes producers blocked on a full channel and
             consumers blocked in a get); then settle the books, tell the cleanup

Accounting: the channel counts every item put, taken and drained, and keeps
``put == got + drained`` whatever happens to a worker; each worker's own
counts come back in its tally, or, if it was killed, from its ledger slot.
A killed worker can have made one last put or get it never wrote down; the
channel's totals say whether it did (`_settle`).  Hence
``sum(produced) == sum(received) + drained`` on every run.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from .. import threads
from ..channels import Channel, ChannelStats
from ..controller import ProcessController, WorkerStartError
from ..states import CLEAN_OUTCOMES, Outcome, State, WorkerReport
from .sum_events import ChannelClosed, ConsumerStopped, Drained, JobEvent, ProducerStopped
from .sum_ledger import MASK, Ledger, SlotRecord
from .sum_plan import (
    EVENTS,
    GRACE,
    ITEMS,
    MAX_BATCH,
    ConsumerTally,
    Delay,
    ProducerTally,
    SumCancelled,
    SumJobError,
    SumPlan,
    SumResult,
    SumTimeout,
    check_seconds,
    make_plan,
)
from .sum_worker import sum_worker, value_sum

log = logging.getLogger("procctl")

#: How long the manager waits for its event relay thread to finish.
JOIN_TIMEOUT = 10.0
#: Producers that died inside put() at once, beyond which _went_in() does not search.
SEARCH_LIMIT = 12

EventSink = Callable[[JobEvent], None]

__all__ = ["GRACE", "MAX_BATCH", "Delay", "SumCancelled", "SumJob", "SumJobError", "SumPlan", "SumResult",
           "SumTimeout",
           "make_plan", "sum_threshold"]


class _Verdict(enum.Enum):
    """Why the race ended."""

    CROSSED = "crossed"  # a consumer claimed the win
    FAILED = "failed"  # a worker raised
    STARVED = "starved"  # no producer or no consumer is left
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class _Books:
    """Every worker's tally once settled, and what the channel had left."""

    producers: tuple[ProducerTally, ...]
    consumers: tuple[ConsumerTally, ...]
    drained: int  # items
    winner: int  # the claim: a consumer index, or -1


# -- the event relay -------------------------------------------------------------------


class _Relay(threading.Thread):
    """Hands the consumers' events to on_event as they arrive on the EVENTS channel."""

    def __init__(self, channel: Channel, deliver: EventSink) -> None:
        super().__init__(name="sum-events", daemon=True)
        self.channel = channel
        self.deliver = deliver
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Ends when the controller stops: the channel then reads as closed once empty.
            for events in self.channel:
                for event in events:
                    self.deliver(event)
        except BaseException as exc:  # noqa: BLE001 - reported by finish(), in the manager's thread
            self.error = exc

    def finish(self) -> None:
        """After stop(): join, then deliver what arrived after the relay's last get."""
        self.join(JOIN_TIMEOUT)
        if self.is_alive():
            raise SumJobError(f"the manager's {self.name} thread did not finish within {JOIN_TIMEOUT}s")
        if self.error is not None:
            raise SumJobError(f"the manager's {self.name} thread failed: {self.error!r}") from self.error
        for events in self.channel.drain():
            for event in events:
                self.deliver(event)


# -- the job ----------------------------------------------------------------------------


class SumJob:
    """One sum-threshold run. `run()` once; `cancel()` and `kill()` are safe from a signal handler."""

    def __init__(self, producers: int = 3, consumers: int = 3, threshold: int = 10, *,
                 values: Sequence[int] = (1, 2, 3), queue_size: int = 3, delay: Delay = 0.0,
                 seed: int | None = None, start_method: str | None = None, timeout: float | None = None,
                 batch: int = 1, on_event: EventSink | None = None, grace: float = GRACE) -> None:
        plan = make_plan(producers, consumers, threshold, values=values, queue_size=queue_size,
                         delay=delay, seed=seed, start_method=start_method, timeout=timeout, batch=batch)
        self._setup(plan, on_event, grace)

    @classmethod
    def from_plan(cls, plan: SumPlan, *, on_event: EventSink | None = None, grace: float = GRACE) -> SumJob:
        """A job for a plan `make_plan()` already checked."""
        if not isinstance(plan, SumPlan):
            raise TypeError(f"plan must be a SumPlan from make_plan(), not {type(plan).__name__}")
        job = cls.__new__(cls)
        job._setup(plan, on_event, grace)
        return job

    def _setup(self, plan: SumPlan, on_event: EventSink | None, grace: float) -> None:
        if on_event is not None and not callable(on_event):
            raise ValueError(f"on_event must be callable, not {on_event!r}")
        self.plan = plan
        self.grace = check_seconds("grace", grace, allow_inf=True)  # inf: no limit, as for ProcessController
        self._on_event = on_event
        self._last_t = 0.0  # the `t` of the last event told
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

    def wakeup(self) -> None:
        """Make run()'s wait look again, as cancel() does, without cancelling. Safe from any thread."""
        if self._pc is not None:
            self._pc.wakeup()

    def kill(self) -> None:
        """SIGKILL every worker now (a second Ctrl-C)."""
        self._cancelled = True
        if self._pc is not None:
            self._pc.kill()
            self._pc.wakeup()

    def pids(self) -> tuple[list[int | None], list[int | None]]:
        """(producer pids, consumer pids) while the run goes (None for one not
        started); empty lists before run()."""
        pc = self._pc
        if pc is None:
            return [], []
        pids: list[int | None] = [w.pid for w in pc.status()]
        return pids[: self.plan.producers], pids[self.plan.producers :]

    # -- the run ---------------------------------------------------------------

    def run(self) -> SumResult:
        if self._used:
            raise RuntimeError("a SumJob runs once; create another")
        self._used = True
        self._t0 = time.monotonic()
        self._last_t = 0.0
        if self._cancelled:  # before the run: nothing starts, every count is 0
            raise SumCancelled("the sum-threshold run was cancelled before it started; nothing ran",
                               SumResult.nothing_ran(self.plan))
        plan = replace(self.plan, t0=self._t0, listen=self._on_event is not None)
        channels = {ITEMS: plan.queue_size, **({EVENTS: 0} if plan.listen else {})}
        ledger = Ledger(plan.workers)
        try:
            pc = ProcessController(sum_worker, plan.workers, args=(plan, ledger.handoff()), channels=channels,
                                   start_method=plan.start_method, grace=self.grace,
                                   initial_state=State.RUNNING)
        except BaseException:
            ledger.close()
            raise
        pc._background = False  # _await_verdict pumps it (reap)
        pc._kills_at_start_ok = True  # one killed while starting is one killed: the run goes on
        self._pc = pc
        relay: _Relay | None = None
        try:
            try:
                pc.start()
            except WorkerStartError:
                if not self._cancelled:
                    raise
                # kill() while they started (a second Ctrl-C): that cancel's doing, not
                # a failure to start; what those that were up did is settled as ever.
                verdict = _Verdict.CANCELLED
            else:
                if plan.listen:
                    relay = _Relay(pc.channels[EVENTS], self._emit)
                    threads.start(relay)
                verdict = self._await_verdict(pc, ledger)
        except BaseException:
            try:
                self._stop(pc, relay)
            finally:
                ledger.close()
            raise
        try:
            reports = self._stop(pc, relay)
            books = _settle(plan, reports, ledger, pc.channels[ITEMS])
        finally:
            ledger.close()
        self._tell_cleanup(reports, books)
        return self._conclude(verdict, reports, books)

    def _await_verdict(self, pc: ProcessController, ledger: Ledger) -> _Verdict:
        """Block until a winner claimed, a worker failed, a role died out, the timeout, or cancel()."""
        plan = self.plan
        deadline = None if plan.timeout is None else self._t0 + plan.timeout
        producers, consumers = plan.producers, plan.consumers
        while True:
            if self._cancelled:
                return _Verdict.CANCELLED
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            # Wakes when a worker ends (the winner returns at once) or on cancel()'s wakeup.
            ended = pc.reap(timeout=remaining)
            if ledger.winner() >= 0:
                return _Verdict.CROSSED
            for report in ended:
                if report.outcome is Outcome.FAILED:
                    return _Verdict.FAILED
                # Killed or crashed: its counts are in the ledger; the others go on.
                log.info("sum job: %s %d ended early: %s", *plan.role(report.worker_id),
                            report.error_line or report.outcome.value)
                if report.worker_id < plan.producers:
                    producers -= 1
                else:
                    consumers -= 1
            if not producers or not consumers:
                return _Verdict.STARVED
            if deadline is not None and time.monotonic() >= deadline:
                return _Verdict.TIMEOUT

    def _stop(self, pc: ProcessController, relay: _Relay | None) -> dict[int, WorkerReport]:
        """Stop everyone (the controller drains the channels), then finish the relay."""
        try:
            return pc.stop()
        except BaseException:
            pc.kill()  # interrupted while stopping: do not wait any longer
            pc.stop(grace=0)
            raise
        finally:
            # Every process has ended now: nothing more can arrive.
            if relay is not None:
                relay.finish()

    def _tell_cleanup(self, reports: dict[int, WorkerReport], books: _Books) -> None:
        if self._on_event is None:
            return
        # What consumers could not send after STOPPED, as they told it.
        for tally in books.consumers:
            for event in tally.unsent:
                self._emit(event)
        for wid, report in reports.items():
            role, index = self.plan.role(wid)
            error = None if report.outcome in CLEAN_OUTCOMES else (report.error_line or report.outcome.value)
            if role == "producer":
                p = books.producers[index]
                self._emit(ProducerStopped(self._now(), index, p.produced, report.outcome, error))
            else:
                c = books.consumers[index]
                self._emit(ConsumerStopped(self._now(), index, c.sum, c.received, c.won, report.outcome, error))
        self._emit(Drained(self._now(), books.drained))
        self._emit(ChannelClosed(self._now()))

    def _conclude(self, verdict: _Verdict, reports: dict[int, WorkerReport], books: _Books) -> SumResult:
        plan = self.plan
        if verdict is _Verdict.CANCELLED:
            raise SumCancelled("the sum-threshold run was cancelled; everything was stopped and cleaned up",
                               self._result(-1, books))
        failed = [r for r in reports.values() if r.outcome is Outcome.FAILED]
        if failed:
            lines = []
            for r in failed:
                role, index = plan.role(r.worker_id)
                lines.append(f"{role} {index} (worker {r.worker_id}) failed: {r.error_line or '-'}")
            raise SumJobError("; ".join(lines), self._result(-1, books))
        if verdict is _Verdict.TIMEOUT:
            raise SumTimeout(f"no consumer's sum exceeded {plan.threshold} within {plan.timeout}s;"
                             " everything was stopped and cleaned up", self._result(-1, books))
        if verdict is _Verdict.STARVED:
            gone = [f"{' '.join(map(str, plan.role(r.worker_id)))} {r.outcome.value}" for r in reports.values()
                    if r.outcome not in CLEAN_OUTCOMES]
            raise SumJobError("no consumer could win any more: " + ", ".join(gone or ["workers ended"]),
                              self._result(-1, books))
        winner = books.winner
        if winner < 0 or books.consumers[winner].sum <= plan.threshold:
            raise SumJobError(f"the run ended without a valid winner (claim {winner}, verdict {verdict.value})",
                              self._result(-1, books))
        return self._result(winner, books)

    def _result(self, winner: int, books: _Books) -> SumResult:
        return SumResult(
            winner=winner,
            threshold=self.plan.threshold,
            sums=tuple(c.sum for c in books.consumers),
            received=tuple(c.received for c in books.consumers),
            produced=tuple(p.produced for p in books.producers),
            drained=books.drained,
            elapsed=time.monotonic() - self._t0,
        )

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def elapsed(self) -> float:
        """Seconds since run() began (0.0 before): the clock of the events' `t`."""
        return max(self._last_t, self._now()) if self._t0 else 0.0

    def _emit(self, event: JobEvent) -> None:
        # Called from the relay thread during the run, from the caller's thread
        # after it (the relay is joined first): never two at once.
        assert self._on_event is not None
        # Each process stamps its own events (one clock for all), and they reach
        # us in the order the channel delivered them: an event stamped a little
        # before the last one told is told at that one's time, so that `t`
        # never goes back (what a reader of the log assumes).
        t = getattr(event, "t", None)
        if isinstance(t, float):
            if t < self._last_t:
                event = replace(event, t=self._last_t)
            else:
                self._last_t = t
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event callback failed for %s", event)


# -- settling the books ---------------------------------------------------------------------


def _settle(plan: SumPlan, reports: dict[int, WorkerReport], ledger: Ledger, items: Channel) -> _Books:
    """Every worker's tally, once every worker has ended and the channel is drained.

    A worker that returned brought its tally.  One that did not (SIGKILLed,
    crashed, failed) left its counts in its ledger slot, up to its last
    channel operation: a producer killed inside put() has that item pending,
    a consumer killed just after get() never wrote its item down.  The
    channel's own counts (exact, whatever happened to a worker) say how many
    such items there were; their values are what nobody else accounts for.
    Value sums read from the ledger are modulo 2**64 (see sum_ledger.py): each
    is made whole again from its count of values (_unwrap).
    """
    leftovers = items.drain()  # what stop() drained: nobody took these
    stats = items.stats()
    worth = value_sum(plan.values) if plan.batch > 1 else int
    winner = ledger.winner()
    producers = [_tally(reports.get(i), ProducerTally) for i in range(plan.producers)]
    consumers = [_tally(reports.get(plan.producers + i), ConsumerTally) for i in range(plan.consumers)]
    records = {i: ledger.read(i) for i, t in enumerate(producers) if t is None}
    whole = partial(_unwrap, plan.values)
    settled_p = [t or ProducerTally(i, records[i].items, whole(records[i].value_sum, records[i].items))
                 for i, t in enumerate(producers)]
    drained_sum = sum(map(worth, leftovers))
    lost = [i for i, t in enumerate(consumers) if t is None]
    # Puts that went in but were never written down: some of the pending ones, as many as the channel says.
    untold = stats.put * plan.batch - sum(p.produced for p in settled_p)
    if untold:
        pending = [i for i, rec in records.items() if rec.pending_items]
        known_out = None if lost else sum(c.sum for c in consumers if c is not None) + drained_sum
        for i in _went_in(pending, records, untold, sum(p.value_sum for p in settled_p), known_out):
            rec = records[i]
            count = rec.items + rec.pending_items
            settled_p[i] = ProducerTally(i, count, whole(rec.value_sum + rec.pending_sum, count))
    settled_c = []
    for i, t in enumerate(consumers):
        if t is None:
            rec = ledger.read(plan.producers + i)
            total = whole(rec.value_sum, rec.items)
            t = ConsumerTally(i, total, rec.items, total > plan.threshold, winner == i)
        settled_c.append(t)
    if lost:
        # Gets that took an item its consumer did not live to write down: credited to
        # the consumer that died (the first, if two died inside a get at once).
        untaken = stats.got * plan.batch - sum(c.received for c in settled_c)
        value = whole(sum(p.value_sum for p in settled_p) - drained_sum - sum(c.sum for c in settled_c), untaken)
        if untaken:
            c = settled_c[lost[0]]
            total = c.sum + value
            settled_c[lost[0]] = replace(c, received=c.received + untaken, sum=total,
                                         crossed=total > plan.threshold)
    books = _Books(tuple(settled_p), tuple(settled_c), stats.drained * plan.batch, winner)
    _check_books(plan, books, stats, drained_sum)
    return books


def _unwrap(values: tuple[int, ...], mod_sum: int, count: int) -> int:
    """The sum of `count` of `values` whose sum modulo 2**64 is `mod_sum`: the one
    between count * min(values) and count * max(values), whole while their
    spread times the count stays under 2**64 (values of 2**64 and more included)."""
    low = min(values) * count
    return low + ((mod_sum - low) & MASK)


def _went_in(pending: list[int], records: dict[int, SlotRecord], untold: int, values_in: int,
             values_out: int | None) -> list[int]:
    """Which pending puts went in: `untold` items' worth of them.  When several
    producers died inside put() at once, the one choice whose values balance
    the books (known when no consumer was lost too); else the first ones."""
    by_count = [i for i in pending if records[i].pending_items <= untold]
    if values_out is not None and len(by_count) <= SEARCH_LIMIT:
        for n in range(1, len(by_count) + 1):
            for chosen in itertools.combinations(by_count, n):
                if (sum(records[i].pending_items for i in chosen) == untold
                        and (values_in + sum(records[i].pending_sum for i in chosen) - values_out) & MASK == 0):
                    return list(chosen)
    chosen_first: list[int] = []
    for i in by_count:
        if untold >= records[i].pending_items:
            untold -= records[i].pending_items
            chosen_first.append(i)
    return chosen_first


T = TypeVar("T", ProducerTally, ConsumerTally)


def _tally(report: WorkerReport | None, kind: type[T]) -> T | None:
    """The tally a worker returned, or None if it returned none."""
    if report is not None and report.outcome in CLEAN_OUTCOMES and isinstance(report.result, kind):
        return report.result
    return None


def _check_books(plan: SumPlan, books: _Books, stats: ChannelStats, drained_sum: int) -> None:
    """The workers' counts against the channel's, items and values: a bug is never papered over."""
    produced = sum(p.produced for p in books.producers)
    received = sum(c.received for c in books.consumers)
    values_in = sum(p.value_sum for p in books.producers) & MASK
    values_out = (sum(c.sum for c in books.consumers) + drained_sum) & MASK
    won = [c.consumer for c in books.consumers if c.won]
    if ((produced, received) != (stats.put * plan.batch, stats.got * plan.batch) or stats.queued
            or values_in != values_out or won != ([books.winner] if books.winner >= 0 else [])):
        raise SumJobError(f"the books do not balance: producers counted {produced} items and consumers"
                          f" {received}; the channel counted {stats.put * plan.batch} put,"
                          f" {stats.got * plan.batch} taken, {stats.drained * plan.batch} drained;"
                          f" value sums {values_in} in, {values_out} out; winners {won}, claim {books.winner}")


def sum_threshold(producers: int = 3, consumers: int = 3, threshold: int = 10, *,
                  values: Sequence[int] = (1, 2, 3), queue_size: int = 3, delay: Delay = 0.0,
                  seed: int | None = None, start_method: str | None = None, timeout: float | None = None,
                  batch: int = 1, on_event: EventSink | None = None) -> SumResult:
    """Run producers and consumers over one channel until a consumer's sum exceeds `threshold`.

    Each producer puts values chosen at random from `values` (`batch` of
    them per channel operation), sleeping `delay` seconds (or a random
    `(min, max)`) after each put.  The first consumer whose sum exceeds the
    threshold wins; then everyone is stopped, the channel drained and
    closed, every process reaped.  A producer or consumer that is killed
    does not end the run while the others can finish it; its counts are
    kept.  ValueError for bad arguments (before any process starts);
    TimeoutError (a SumTimeout: its `result` has the counts, winner -1)
    after a clean stop when nobody crossed within `timeout` seconds;
    SumJobError when a worker failed (raised) or no producer or no consumer
    is left (its `result` has the counts too, winner -1).

    `on_event(event)` gets the story as events of procctl.jobs.sum_events
    (each also reads as a dict: ``event["consumer"]``, ``event.to_dict()``):
    received, crossed (from a helper thread while the run goes), then
    producer_stopped, consumer_stopped, drained, closed; calls never overlap.
    """
    job = SumJob(producers, consumers, threshold, values=values, queue_size=queue_size, delay=delay,
                 seed=seed, start_method=start_method, timeout=timeout, batch=batch, on_event=on_event)
    return job.run()
