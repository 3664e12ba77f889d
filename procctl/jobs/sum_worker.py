"""The sum job's worker side: producers and consumers on the controller's channels.

    producer --ctx.put(ITEMS)--> channel ITEMS (maxsize queue_size) --ctx.get(ITEMS)--> consumer
                                                                        | sum > threshold:
    ledger (shared page) <-- each worker's counts, after every item ----+ ledger.claim(), return
    channel EVENTS       <-- a consumer's story, when someone listens

A producer counts an item once `ctx.put` accepted it, a consumer as soon as
`ctx.get` returned it; both write their counts to their ledger slot after
every item, so a SIGKILLed worker still leaves them behind.  The manager
owns the channels, drains them and settles the books (sum_threshold.py).
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

from ..errors import Closed
from ..worker import WorkerContext
from .sum_events import Crossed, RaceEvent, Received
from .sum_ledger import Ledger
from .sum_plan import EVENTS, ITEMS, MAX_BATCH, ConsumerTally, ProducerTally, SumPlan

Item = int | bytes | tuple[int, ...]
#: Adler-32's modulus.
ADLER_MOD = 65521


def sum_worker(ctx: WorkerContext, plan: SumPlan, ledger_fd: Any) -> ProducerTally | ConsumerTally:
    """The controller's target: worker ids below `plan.producers` produce, the rest consume."""
    ledger = Ledger.attach(ledger_fd, plan.workers)
    try:
        if ctx.worker_id < plan.producers:
            return _produce(ctx, plan, ledger, ctx.worker_id)
        return _consume(ctx, plan, ledger, ctx.worker_id - plan.producers)
    finally:
        ledger.close()


# -- producing ---------------------------------------------------------------------


def _item_maker(rng: random.Random, values: tuple[int, ...], batch: int) -> Callable[[], Any]:
    if batch == 1:
        return partial(rng.choice, values)
    if max(values) <= 255 and len(values) <= 256:  # (a byte draws one of at most 256 entries)
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
    draw = batch + batch // 64 + 8  # enough, as a rule, once the tail bytes are gone

    def make() -> bytes:
        # One pass in C: drop the tail bytes, then map the rest to values.
        out = rng.randbytes(draw).translate(table, tail)
        while len(out) < batch:
            out += rng.randbytes(draw).translate(table, tail)
        return out if len(out) == batch else out[:batch]

    return make


def value_sum(values: tuple[int, ...]) -> Callable[[Any], int]:
    """How to sum one batch: bytes (see _byte_batches) in C, tuples with sum()."""
    if max(values) > 255:
        return sum
    low, span = min(values), max(values) - min(values)
    # Adler-32's first half is 1 + the sum of the bytes, modulo 65521 (RFC 1950):
    # with every byte in [low, low + span], that gives the exact sum of a run of
    # up to 65520 // span bytes, at memory speed (bytes.count was 3 passes, and
    # the per-batch sums were half the batched job's work on both sides).
    run = 65520 // span if span else MAX_BATCH

    def sum_bytes(item: Any) -> int:
        if not isinstance(item, bytes):
            return sum(item)
        if len(item) <= run:  # the rule: one run
            base = low * len(item)
            return base + ((zlib.adler32(item) & 0xFFFF) - 1 - base) % ADLER_MOD
        total = 0
        for start in range(0, len(item), run):
            part = item[start : start + run]
            base = low * len(part)
            total += base + ((zlib.adler32(part) & 0xFFFF) - 1 - base) % ADLER_MOD
        return total

    return sum_bytes


def _produce(ctx: WorkerContext, plan: SumPlan, ledger: Ledger, index: int) -> ProducerTally:
    # A fresh generator per producer: forked children would otherwise share one state.
    rng = random.Random(None if plan.seed is None else f"{plan.seed}:{index}")
    make_item = _item_maker(rng, plan.values, plan.batch)
    put, per_put = ctx.put, plan.batch
    total = value_sum(plan.values) if per_put > 1 else None
    slot = ledger.slot(ctx.worker_id)
    low, high = plan.delay
    produced = values = 0
    won_by = ledger.winner
    while won_by() < 0:  # a winner ends the race for producers too
        item = make_item()
        worth = item if total is None else total(item)
        # Pending first: if we die inside put(), the manager learns from the
        # channel's count whether this item went in, and what it was worth.
        slot.pend(per_put, worth)
        # Blocks on a full channel; False once STOPPED (the item was not sent).
        if not put(ITEMS, item):
            break
        produced += per_put
        values += worth
        slot.commit(produced, values)
        slot.clear_pending()
        if high > 0 and not ctx.sleep(rng.uniform(low, high) if high > low else low):
            slot.clear_pending()
            break
    return ProducerTally(index, produced, values)


# -- consuming ---------------------------------------------------------------------


def _consume(ctx: WorkerContext, plan: SumPlan, ledger: Ledger, index: int) -> ConsumerTally:
    get, threshold = ctx.get, plan.threshold
    total_of = value_sum(plan.values) if plan.batch > 1 else None
    slot = ledger.slot(ctx.worker_id)
    story = _Story(ctx, plan.t0, index) if plan.listen else None
    total = received = 0
    won_by = ledger.winner
    # Once a consumer has won, the others take nothing more: the race is over
    # (the manager's STOPPED follows, but only after it has seen the winner end).
    while won_by() < 0:
        try:
            # Blocks while empty (and while PAUSED); Closed at STOPPED.
            item = get(ITEMS)
        except Closed:
            break
        # Counted before anything else: taken means received.
        if total_of is None:
            total += item
            received += 1
        else:
            total += total_of(item)
            received += len(item)
        slot.commit(received, total)
        if story is not None:
            story.received((item,) if total_of is None else tuple(item), total)
        if total > threshold:
            won = ledger.claim(index)
            if story is not None:
                story.crossed(total, threshold, won)
            # Ending is the signal: the manager, blocked in pc.reap(), wakes and stops everyone.
            return ConsumerTally(index, total, received, True, won, story.unsent if story else ())
    return ConsumerTally(index, total, received, False, False, story.unsent if story else ())


class _Story:
    """A consumer's story, sent on the EVENTS channel while the run goes.

    A put at STOPPED is refused, so what happens after (the last items, a
    late crossing) goes home with the tally, and the manager tells it.
    """

    def __init__(self, ctx: WorkerContext, t0: float, index: int) -> None:
        self.ctx, self.t0, self.index = ctx, t0, index
        self.unsent: tuple[RaceEvent, ...] = ()

    def received(self, items: tuple[int, ...], total: int) -> None:
        t = time.monotonic() - self.t0
        running = total - sum(items)
        events: list[RaceEvent] = []
        for value in items:
            running += value
            events.append(Received(t, self.index, value, running))
        self._tell(events)

    def crossed(self, total: int, threshold: int, won: bool) -> None:
        self._tell([Crossed(time.monotonic() - self.t0, self.index, total, threshold, won)])

    def _tell(self, events: list[RaceEvent]) -> None:
        if self.unsent or not self.ctx.put(EVENTS, events):
            self.unsent += tuple(events)
