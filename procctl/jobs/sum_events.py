"""The sum-threshold job's events: defined once, used by the job, the CLI and the live view.

Consumers create `Received` and `Crossed` while the run goes (they travel to
the manager on the job's events channel); the manager creates the rest.
`on_event` receives these objects.  Each also reads as its JSON form
(``event["consumer"]``, ``event.to_dict()``), the dicts the job's callbacks
have always been given, and `--json` prints exactly that form.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from ..states import Outcome

if TYPE_CHECKING:
    from .sum_plan import SumResult


class SumEventKind(str, enum.Enum):
    """The ``event`` field of each record."""

    RECEIVED = "received"
    CROSSED = "crossed"
    PRODUCER_STOPPED = "producer_stopped"
    CONSUMER_STOPPED = "consumer_stopped"
    DRAINED = "drained"
    CLOSED = "closed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    SUMMARY = "summary"

    def __str__(self) -> str:
        return self.value


class SumEvent(Mapping[str, Any]):
    """What every event of the job has: its kind, and its JSON form, which it
    also reads as (a read-only mapping: ``event["sum"]``, ``dict(event)``,
    ``event == {...}``)."""

    kind: ClassVar[SumEventKind]
    #: Fields left out of the JSON form when they are None.
    optional: ClassVar[frozenset[str]] = frozenset()
    #: Fields whose JSON name differs (one that would hide a Mapping method).
    renamed: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.name in self.optional:
                continue
            if f.name == "t":
                out["t"] = round(value, 6)
                out["event"] = self.kind.value
            else:
                out[self.renamed.get(f.name, f.name)] = value.value if isinstance(value, enum.Enum) else value
        out.setdefault("event", self.kind.value)
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.to_dict() == dict(other)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class Received(SumEvent):
    """Consumer `consumer` took `value` off the channel; its sum is now `sum`."""

    kind: ClassVar[SumEventKind] = SumEventKind.RECEIVED
    t: float  # seconds since the run started
    consumer: int
    value: int
    sum: int


@dataclass(frozen=True, eq=False)
class Crossed(SumEvent):
    """Consumer `consumer`'s sum went past the threshold; `winner` if its claim came first."""

    kind: ClassVar[SumEventKind] = SumEventKind.CROSSED
    t: float
    consumer: int
    sum: int
    threshold: int
    winner: bool


@dataclass(frozen=True, eq=False)
class ProducerStopped(SumEvent):
    """A producer ended; `error` says why when it did not end cleanly."""

    kind: ClassVar[SumEventKind] = SumEventKind.PRODUCER_STOPPED
    optional: ClassVar[frozenset[str]] = frozenset({"error"})
    t: float
    producer: int
    produced: int
    outcome: Outcome
    error: str | None = None


@dataclass(frozen=True, eq=False)
class ConsumerStopped(SumEvent):
    """A consumer ended; `error` says why when it did not end cleanly."""

    kind: ClassVar[SumEventKind] = SumEventKind.CONSUMER_STOPPED
    optional: ClassVar[frozenset[str]] = frozenset({"error"})
    t: float
    consumer: int
    sum: int
    received: int
    winner: bool
    outcome: Outcome
    error: str | None = None


@dataclass(frozen=True, eq=False)
class Drained(SumEvent):
    """Cleanup: `count` values (JSON: "items") were left in the channel, taken by nobody."""

    kind: ClassVar[SumEventKind] = SumEventKind.DRAINED
    renamed: ClassVar[dict[str, str]] = {"count": "items"}
    t: float
    count: int


@dataclass(frozen=True, eq=False)
class ChannelClosed(SumEvent):
    """Cleanup done: the channels are closed and every process is reaped."""

    kind: ClassVar[SumEventKind] = SumEventKind.CLOSED
    t: float


@dataclass(frozen=True, eq=False)
class Cancelled(SumEvent):
    """The command line stopped the run on a signal, or `by` a request such as
    ``procctl stop`` (then the JSON form has no signal); everything was cleaned up first."""

    kind: ClassVar[SumEventKind] = SumEventKind.CANCELLED
    signal: str | None
    by: str | None = None
    t: float | None = None  # seconds since the run began, as every event's

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.t is None else {"t": round(self.t, 6)}
        out["event"] = self.kind.value
        if self.by is not None:
            out["by"] = self.by
        else:
            out["signal"] = self.signal
        return out


@dataclass(frozen=True, eq=False)
class TimedOut(SumEvent):
    """Nobody crossed within `timeout` seconds (everything was cleaned up first)."""

    kind: ClassVar[SumEventKind] = SumEventKind.TIMEOUT
    timeout: float | None
    t: float | None = None  # seconds since the run began, as every event's

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.t is None else {"t": round(self.t, 6)}
        out["event"] = self.kind.value
        out["timeout"] = self.timeout
        return out


@dataclass(frozen=True, eq=False)
class Summary(SumEvent):
    """The last record of a run: the result (after a timeout, its counts, no winner)."""

    kind: ClassVar[SumEventKind] = SumEventKind.SUMMARY
    result: SumResult

    def to_dict(self) -> dict[str, Any]:
        out = {"event": self.kind.value, **self.result.to_dict()}
        if self.result.winner < 0:  # a timeout's or a cancel's counts: nobody won
            out["winner"] = None
        return out


#: Events the consumers send while the run goes.
RaceEvent = Received | Crossed
#: Every event `on_event` receives from the job.
JobEvent = Received | Crossed | ProducerStopped | ConsumerStopped | Drained | ChannelClosed

__all__ = [
    "Cancelled", "ChannelClosed", "ConsumerStopped", "Crossed", "Drained", "JobEvent", "ProducerStopped",
    "RaceEvent", "Received", "SumEvent", "SumEventKind", "Summary", "TimedOut",
]
