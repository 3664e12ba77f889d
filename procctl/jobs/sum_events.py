"""The sum-threshold job's events: defined once, used by the job, the CLI and the live view.

Consumers create `Received` and `Crossed` while the run goes (they travel to
the manager on the job's events channel); the manager creates the rest.
`on_event` receives these objects.  Each also reads as its JSON form
(``event["consumer"]``, ``event.to_dict()``), the dicts the job's callbacks
have always been given, and `--json` prints exactly that form.
"""

from __future__ import annotations

import enum
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


class SumEvent:
    """What every event of the job has: its kind, its JSON form, read access by field name."""

    kind: ClassVar[SumEventKind]
    #: Fields left out of the JSON form when they are None.
    optional: ClassVar[frozenset[str]] = frozenset()

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
                out[f.name] = value.value if isinstance(value, enum.Enum) else value
        out.setdefault("event", self.kind.value)
        return out

    # Read access as the dicts the job's callbacks used to receive.
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()


@dataclass(frozen=True)
class Received(SumEvent):
    """Consumer `consumer` took `value` off the channel; its sum is now `sum`."""

    kind: ClassVar[SumEventKind] = SumEventKind.RECEIVED
    t: float  # seconds since the run started
    consumer: int
    value: int
    sum: int


@dataclass(frozen=True)
class Crossed(SumEvent):
    """Consumer `consumer`'s sum went past the threshold; `winner` if its claim came first."""

    kind: ClassVar[SumEventKind] = SumEventKind.CROSSED
    t: float
    consumer: int
    sum: int
    threshold: int
    winner: bool


@dataclass(frozen=True)
class ProducerStopped(SumEvent):
    """A producer ended; `error` says why when it did not end cleanly."""

    kind: ClassVar[SumEventKind] = SumEventKind.PRODUCER_STOPPED
    optional: ClassVar[frozenset[str]] = frozenset({"error"})
    t: float
    producer: int
    produced: int
    outcome: Outcome
    error: str | None = None


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Drained(SumEvent):
    """Cleanup: `items` values were left in the channel, taken by nobody."""

    kind: ClassVar[SumEventKind] = SumEventKind.DRAINED
    t: float
    items: int


@dataclass(frozen=True)
class ChannelClosed(SumEvent):
    """Cleanup done: the channels are closed and every process is reaped."""

    kind: ClassVar[SumEventKind] = SumEventKind.CLOSED
    t: float


@dataclass(frozen=True)
class Cancelled(SumEvent):
    """The command line stopped the run on a signal (everything was cleaned up first)."""

    kind: ClassVar[SumEventKind] = SumEventKind.CANCELLED
    signal: str | None


@dataclass(frozen=True)
class TimedOut(SumEvent):
    """Nobody crossed within `timeout` seconds (everything was cleaned up first)."""

    kind: ClassVar[SumEventKind] = SumEventKind.TIMEOUT
    timeout: float | None


@dataclass(frozen=True)
class Summary(SumEvent):
    """The last record of a successful run: the result."""

    kind: ClassVar[SumEventKind] = SumEventKind.SUMMARY
    result: SumResult

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind.value, **self.result.to_dict()}


#: Events the consumers send while the run goes.
RaceEvent = Received | Crossed
#: Every event `on_event` receives from the job.
JobEvent = Received | Crossed | ProducerStopped | ConsumerStopped | Drained | ChannelClosed

__all__ = [
    "Cancelled", "ChannelClosed", "ConsumerStopped", "Crossed", "Drained", "JobEvent", "ProducerStopped",
    "RaceEvent", "Received", "SumEvent", "SumEventKind", "Summary", "TimedOut",
]
