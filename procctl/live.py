"""The live terminal view of `procctl run`: refreshes in place while workers run.

Only the command line imports this (rich and psutil are CLI dependencies;
`import procctl` never loads them).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import psutil
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .jobs.sum_events import ChannelClosed, ConsumerStopped, Crossed, JobEvent, Received
from .jobs.sum_plan import SumPlan
from .states import Event, WorkerStatus

#: How often the view redraws (seconds).
REFRESH = 0.25
STATE_STYLE = {"running": "green", "paused": "yellow", "stopped": "cyan", "finished": "bold green",
               "failed": "bold red", "crashed": "bold red", "killed": "magenta"}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_count(n: float) -> str:
    return f"{n:.0f}" if abs(n) < 1e15 else f"{n:.3g}"


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class LiveView:
    """A rich Live display fed by controller events and status() snapshots."""

    def __init__(self, status: Callable[[], list[WorkerStatus]], title: str, console: Console | None = None):
        self._status = status
        self._title = title
        self._console = console or Console()
        self._last: dict[int, str] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._t0 = time.monotonic()
        self._live: Live | None = None

    def __enter__(self) -> LiveView:
        self._live = Live(console=self._console, auto_refresh=False, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self.refresh()
            self._live.__exit__(None, None, None)
            self._live = None

    def on_event(self, event: Event) -> None:
        if event.worker is not None:
            self._last[event.worker] = event.event

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.render(self._status()), refresh=True)

    # -- drawing ------------------------------------------------------------

    def render(self, rows: list[WorkerStatus]) -> Group:
        return Group(self._header(rows), self._overall(rows), self._table(rows))

    def _header(self, rows: list[WorkerStatus]) -> Text:
        states = Counter(r.state.name.lower() for r in rows if r.alive)
        outcomes = Counter(r.outcome.value for r in rows if r.outcome is not None)
        text = Text(f"{self._title}  ", style="bold")
        text.append(f"{time.monotonic() - self._t0:6.1f}s  ")
        for name, n in list(states.items()) + list(outcomes.items()):
            text.append(f"{n} {name}  ", style=STATE_STYLE.get(name, ""))
        return text

    def _overall(self, rows: list[WorkerStatus]) -> Table | Text:
        with_total = [r for r in rows if r.total and r.done is not None and math.isfinite(r.total)]
        if not with_total:
            return Text("")
        # In units of the largest total, so that totals near 1e308 add up
        # without overflowing to infinity.
        unit = max(r.total or 0.0 for r in with_total)
        done = sum((r.done or 0.0) / unit for r in with_total)
        total = sum((r.total or 0.0) / unit for r in with_total)
        rate = sum(r.rate / unit for r in with_total if r.rate and math.isfinite(r.rate))
        eta = (total - done) / rate if rate > 0 and total > done else None
        grid = Table.grid(padding=(0, 1))
        grid.add_row(ProgressBar(total=total, completed=min(done, total), width=40),
                     f"{100 * done / total:5.1f}%", f"ETA {_fmt_eta(eta)}" if eta is not None else "")
        return grid

    def _table(self, rows: list[WorkerStatus]) -> Group:
        room = max(3, self._console.size.height - 8)
        shown = rows[:room]
        table = Table(box=None, pad_edge=False, header_style="bold dim")
        for column in ("worker", "pid", "state", "progress", "cpu %", "rss", "last event"):
            table.add_column(column)
        for r in shown:
            table.add_row(str(r.worker_id), str(r.pid or ""), *self._cells(r))
        parts: list[Any] = [table]
        if len(rows) > len(shown):
            rest = Counter((r.outcome.value if r.outcome else r.state.name.lower()) for r in rows[len(shown):])
            summary = ", ".join(f"{n} {name}" for name, n in rest.items())
            parts.append(Text(f"... and {len(rows) - len(shown)} more workers: {summary}", style="dim"))
        return Group(*parts)

    def _cells(self, r: WorkerStatus) -> tuple[Any, ...]:
        name = r.outcome.value if r.outcome else r.state.name.lower()
        state = Text(name, style=STATE_STYLE.get(name, ""))
        if r.done is None:
            progress: Any = ""
        elif r.total:
            progress = f"{_fmt_count(r.done)}/{_fmt_count(r.total)} {_fmt_eta(r.eta)}"
        else:
            progress = _fmt_count(r.done)
        cpu, rss = self._usage(r)
        return state, progress, cpu, rss, self._last.get(r.worker_id, "")

    def _usage(self, r: WorkerStatus) -> tuple[str, str]:
        if not r.alive or r.pid is None:
            self._procs.pop(r.worker_id, None)
            return "", ""
        try:
            proc = self._procs.get(r.worker_id)
            if proc is None or proc.pid != r.pid:
                proc = self._procs[r.worker_id] = psutil.Process(r.pid)
                proc.cpu_percent(None)  # the first call only starts the count
            return f"{proc.cpu_percent(None):5.1f}", _fmt_bytes(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return "", ""


class SumLiveView:
    """The live view of `procctl sum`: each consumer's sum racing to the threshold.

    Built from the checked plan, fed by the job's events; rich redraws it
    from its own refresh thread, so the elapsed time moves even while no
    item arrives.
    """

    def __init__(self, plan: SumPlan, console: Console | None = None):
        self._threshold = plan.threshold
        self._producers = plan.producers
        self._sums = [0] * plan.consumers
        self._received = [0] * plan.consumers
        self._last = [""] * plan.consumers
        self._note = "running"
        self._t0 = time.monotonic()
        self._live = Live(self, console=console or Console(), refresh_per_second=1 / REFRESH)

    def __enter__(self) -> SumLiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(None, None, None)

    def on_event(self, event: JobEvent) -> None:
        if isinstance(event, Received):
            c = event.consumer
            self._sums[c] = event.sum
            self._received[c] += 1
            self._last[c] = f"got {event.value}"
        elif isinstance(event, Crossed):
            c = event.consumer
            self._last[c] = "WON" if event.winner else "crossed too late"
            if event.winner:
                self._note = f"consumer {c} won: stopping everyone"
        elif isinstance(event, ConsumerStopped):
            c = event.consumer
            self._sums[c], self._received[c] = event.sum, event.received
            if event.error is not None:
                self._last[c] = event.outcome.value
        elif isinstance(event, ChannelClosed):
            self._note = "cleanup: queue drained and closed"

    def __rich__(self) -> Group:
        head = Text(f"procctl sum: {self._producers} producers, {len(self._sums)} consumers, "
                    f"threshold {self._threshold}  ", style="bold")
        head.append(f"{time.monotonic() - self._t0:6.1f}s  {self._note}")
        table = Table(box=None, pad_edge=False, header_style="bold dim")
        for column in ("consumer", "sum", "toward the threshold", "items", "last"):
            table.add_column(column)
        for c, total in enumerate(self._sums):
            bar = ProgressBar(total=max(1, self._threshold + 1), completed=min(total, self._threshold + 1), width=30)
            table.add_row(str(c), str(total), bar, str(self._received[c]), self._last[c])
        return Group(head, table)


class MapLiveView:
    """The live view of `procctl map`: tasks done of the total, rate, ETA, state.

    `counts` returns (done, failed, in_flight) at each redraw; rich redraws
    from its own refresh thread, so the clock moves while no task ends.
    Result lines for a terminal stdout go through `print` (above the view).
    """

    def __init__(self, title: str, total: int, counts: Callable[[], tuple[int, int, int]],
                 console: Console | None = None) -> None:
        self._title = title
        self._total = total
        self._counts = counts
        self.note = "running"
        self._t0 = time.monotonic()
        self._live = Live(self, console=console or Console(), refresh_per_second=1 / REFRESH,
                          redirect_stdout=False, redirect_stderr=False)

    def __enter__(self) -> MapLiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(None, None, None)

    def print(self, line: str) -> None:
        self._live.console.print(Text(line), soft_wrap=True)

    def __rich__(self) -> Group:
        done, failed, in_flight = self._counts()
        elapsed = time.monotonic() - self._t0
        ended = done + failed
        rate = ended / elapsed if elapsed > 0 else 0.0
        eta = (self._total - ended) / rate if rate > 0 and self._total > ended else None
        head = Text(f"{self._title}  ", style="bold")
        head.append(f"{elapsed:6.1f}s  ")
        head.append(self.note, style=STATE_STYLE.get(self.note, ""))
        grid = Table.grid(padding=(0, 1))
        grid.add_row(ProgressBar(total=max(1, self._total), completed=ended, width=40),
                     f"{ended}/{self._total}", f"{100 * ended / max(1, self._total):5.1f}%",
                     f"{rate:.1f}/s", f"ETA {_fmt_eta(eta)}" if eta is not None else "")
        tally = Text(f"{done} done  ", style=STATE_STYLE["finished"])
        tally.append(f"{failed} failed  ", style=STATE_STYLE["failed"] if failed else "")
        tally.append(f"{in_flight} in flight  {self._total - ended - in_flight} queued")
        return Group(head, grid, tally)
