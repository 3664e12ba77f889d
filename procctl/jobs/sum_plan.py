"""The sum-threshold job's plan: argument checks, the checked plan, the result.

Both sides of the process boundary read this module: the manager builds a
`SumPlan` (every check happens here, before anything starts), and every
worker receives it as an argument.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from .. import limits
from .sum_events import RaceEvent

#: Values per channel operation, at most.
MAX_BATCH = 100_000
#: Seconds the manager gives its stop (broadcast, then escalation).
GRACE = 5.0
#: The job's channels: the values, and the consumers' story (only when someone listens).
ITEMS = "items"
EVENTS = "events"

Delay = float | tuple[float, float]


@dataclass(frozen=True)
class SumPlan:
    """The checked arguments, as every worker receives them."""

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
    listen: bool = False  # consumers tell their story on the EVENTS channel

    @property
    def workers(self) -> int:
        return self.producers + self.consumers

    def role(self, worker_id: int) -> tuple[str, int]:
        """("producer", index) or ("consumer", index) of a controller worker id."""
        if worker_id < self.producers:
            return "producer", worker_id
        return "consumer", worker_id - self.producers


# -- results, errors, tallies ---------------------------------------------------------


@dataclass(frozen=True)
class SumResult:
    """How a sum-threshold run ended. Counts are items (values), not channel operations."""

    winner: int  # consumer index
    threshold: int
    sums: tuple[int, ...]  # value sum per consumer
    received: tuple[int, ...]  # items per consumer
    produced: tuple[int, ...]  # items per producer
    drained: int  # items the manager took off the channel during cleanup
    elapsed: float  # seconds, for the whole call

    @classmethod
    def nothing_ran(cls, plan: SumPlan, elapsed: float = 0.0) -> SumResult:
        """The result of a run that started nothing: nobody won, every count 0."""
        return cls(-1, plan.threshold, (0,) * plan.consumers, (0,) * plan.consumers, (0,) * plan.producers, 0,
                   elapsed)

    def to_dict(self) -> dict[str, Any]:
        return {"winner": self.winner, "threshold": self.threshold, "sums": list(self.sums),
                "received": list(self.received), "produced": list(self.produced),
                "drained": self.drained, "elapsed": round(self.elapsed, 3)}


class SumTimeout(TimeoutError):
    """Nobody crossed within the timeout; everything was stopped and cleaned up first.

    `result` holds the run's counts as they were settled (its `winner` is -1:
    nobody won), with the same accounting as a won run's."""

    def __init__(self, message: str, result: SumResult) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:  # it pickles with its counts
        return (type(self), (str(self), self.result))


class SumJobError(RuntimeError):
    """A producer or consumer failed (raised), or none of a role was left to finish the race.

    `result` holds the run's counts as they were settled once everything was
    cleaned up (its `winner` is -1), as SumTimeout's does; None where there
    are none (the run's own bookkeeping failed)."""

    def __init__(self, message: str, result: SumResult | None = None) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.result))


class SumCancelled(RuntimeError):
    """cancel() was called (e.g. on SIGINT); everything was stopped and cleaned up first.

    `result` holds the run's counts as they were settled (its `winner` is -1),
    as SumTimeout's does; None when the run was cancelled before it started."""

    def __init__(self, message: str, result: SumResult | None = None) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.result))


@dataclass(frozen=True)
class ProducerTally:
    """A producer's return value: items and their value sum, put into the channel."""

    producer: int
    produced: int
    value_sum: int = 0


@dataclass(frozen=True)
class ConsumerTally:
    """A consumer's return value. `unsent`: its story told after STOPPED, when
    the events channel takes nothing more; the manager tells it at cleanup."""

    consumer: int
    sum: int
    received: int
    crossed: bool
    won: bool
    unsent: tuple[RaceEvent, ...] = ()


# -- argument checks --------------------------------------------------------------


def _is_int(value: Any) -> bool:
    """An integer: an int or any other Integral (numpy's int64, say), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _count(name: str, value: Any, low: int = 1, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name} must be {bound}, not {value!r}")
    return int(value)


def _as_float(value: Any) -> float:
    """`value` (a Real) as a float; an int beyond any float is infinite (math.isfinite would overflow)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_seconds(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """Seconds >= 0 (inf only with `allow_inf`: no limit); else ValueError naming `name`
    (for a wrong type too: the sum job's arguments all raise ValueError, as issue 3 has it)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    seconds = _as_float(value)
    if math.isnan(seconds) or seconds < 0 or (math.isinf(seconds) and not allow_inf):
        kind = "a number" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {kind} of seconds >= 0, not {value!r}")
    return seconds


def _values(values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"values must be a sequence of positive integers, not {values!r}")
    items = tuple(values)
    if not items:
        raise ValueError("values must not be empty")
    bad = [v for v in items if not _is_int(v) or v <= 0]
    if bad:
        raise ValueError(f"values must be positive integers; {bad[0]!r} is not")
    return tuple(int(v) for v in items)


def _delay(delay: Any) -> tuple[float, float]:
    if isinstance(delay, (tuple, list)):
        if len(delay) != 2:
            raise ValueError(f"delay must be a number or a (min, max) pair, not {delay!r}")
        low, high = check_seconds("delay min", delay[0]), check_seconds("delay max", delay[1])
        if low > high:
            raise ValueError(f"delay min {low} is greater than delay max {high}")
        return low, high
    seconds = check_seconds("delay", delay)
    return seconds, seconds


def _timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, Real) or not _as_float(timeout) >= 0:
        raise ValueError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
    seconds = _as_float(timeout)
    return None if math.isinf(seconds) else seconds  # no limit, as None


def make_plan(producers: Any = 3, consumers: Any = 3, threshold: Any = 10, *, values: Any = (1, 2, 3),
              queue_size: Any = 3, delay: Any = 0.0, seed: Any = None, start_method: Any = None,
              timeout: Any = None, batch: Any = 1) -> SumPlan:
    """Check every argument (ValueError naming it); start nothing."""
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be an integer or None, not {seed!r}")
    if start_method is not None and start_method not in multiprocessing.get_all_start_methods():
        methods = ", ".join(multiprocessing.get_all_start_methods())
        raise ValueError(f"start_method must be one of {methods}, not {start_method!r}")
    workers = _count("producers", producers) + _count("consumers", consumers)
    too_many = limits.capacity_problem(workers, limits.WORK_FDS_PER_WORKER)  # (its channels)
    if too_many is not None:
        raise ValueError(f"too many workers ({producers} producers and {consumers} consumers): {too_many}")
    return SumPlan(
        producers=_count("producers", producers),
        consumers=_count("consumers", consumers),
        threshold=_count("threshold", threshold, low=0),
        values=_values(values),
        queue_size=_count("queue_size", queue_size),
        delay=_delay(delay),
        seed=None if seed is None else int(seed),
        start_method=start_method,
        timeout=_timeout(timeout),
        batch=_count("batch", batch, high=MAX_BATCH),
    )
