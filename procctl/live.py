"""The live terminal views of `procctl run`, `map` and `sum`: refresh in place while workers run.

Only the command line imports this (rich and psutil are CLI dependencies;
`import procctl` never loads them).
"""

from __future__ import annotations

import math
import os
import re
import selectors
import sys
import termios
import threading
import time
import tty
from collections import Counter
from collections.abc import Callable
from typing import IO, Any, cast

import psutil
from rich.cells import cell_len
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import threads
from .capture import Output
from .clitools import info_text, minutes_seconds
from .jobs.sum_events import ChannelClosed, ConsumerStopped, Crossed, JobEvent, ProducerStopped, Received
from .jobs.sum_plan import SumPlan
from .states import Event, State, WorkerStatus

#: How often the view redraws (seconds).
REFRESH = 0.25
#: A colour (SGR) sequence: the one kind of escape a worker's line keeps on the terminal.
_SGR = re.compile(r"(\x1b\[[0-9;:]*m)")
#: Every other escape sequence: CSI (a cursor move, a clear screen), OSC (a window
#: title), DCS/SOS/PM/APC strings, and two-character escapes (a reset, a charset).
_OTHER_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
                           r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?|\x1b[ -/]*[0-~]?")


class TerminalStream:
    """The terminal a live view draws on. A write it refuses (EIO once the
    terminal went away: a hangup) ends the drawing, never the command: the
    stop, its summary and the event log go on (rich's own refresh thread
    writes too, where an exception would only kill the thread, noisily)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self._stream.write(text)
            except BlockingIOError:  # a terminal that cannot take it now (^S): this frame is lost, not the view
                pass
            except (OSError, ValueError):  # (ValueError: closed meanwhile)
                self.gone = True
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except BlockingIOError:
                pass
            except (OSError, ValueError):
                self.gone = True

    def isatty(self) -> bool:
        try:
            return bool(self._stream.isatty())
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return int(self._stream.fileno())

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"


def terminal_console(stream: Any = None) -> Console:
    """A rich Console on `stream` (default: stdout) that a terminal gone away cannot break."""
    return Console(file=cast(IO[str], TerminalStream(sys.stdout if stream is None else stream)))


#: The keys every live view takes (`procctl run` adds +/-).
KEYS = "keys: p pause  r resume  s stop  q quit"


def footer_text(keys: str, where: str, message: str) -> list[Text]:
    """A live view's footer: its keys, the run's name, pid and control socket, what
    a key did; no line at all when there is nothing to say."""
    if not (keys or where or message):
        return []
    text = Text()
    if keys:
        text.append(keys, style="bold")
    if where:
        text.append(("  " if keys else "") + where, style="dim")
    if message:
        text.append(f"\n{message}", style="yellow")
    return [text]


def terminal_line(line: str) -> Text:
    """A worker's output line as it may go to the terminal above the live view.

    Its colours are kept; every other escape sequence (a clear screen, a
    cursor move, a terminal reset) is dropped, a carriage return shows what
    follows the last one (a progress bar's latest state; a colour set before
    it is not carried over; one that ends the line, as in CRLF, is dropped),
    and any other control character is written as an escape (`\\x00`):
    nothing a worker prints can move the cursor or wipe the view.
    """
    line = line.rstrip("\r").rsplit("\r", 1)[-1]  # (a CRLF line ends in one: not an empty line)
    parts = _SGR.split(line)
    for i in range(0, len(parts), 2):  # the text between the colour sequences
        text = _OTHER_ESCAPE.sub("", parts[i])
        if not text.isprintable():
            text = "".join(ch if ch.isprintable() or ch == "\t" else ascii(ch)[1:-1] for ch in text)
        parts[i] = text
    return Text.from_ansi("".join(parts))

STATE_STYLE = {"stopping": "magenta",
               "running": "green", "paused": "yellow", "stopped": "cyan", "finished": "bold green",
               "failed": "bold red", "crashed": "bold red", "killed": "magenta", "hung": "bold magenta"}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_count(n: float) -> str:
    return f"{n:.0f}" if abs(n) < 1e15 else f"{n:.3g}"


def _fmt_eta(seconds: float | None) -> str:
    return minutes_seconds(seconds) or ""


#: Columns of the worker table with the room each needs, in the order they
#: are given up when the terminal is narrow (the last first); worker and
#: state always stay, and info takes what is left (at least 12).
COLUMNS = (("worker", 7), ("state", 9), ("progress", 14), ("eta", 6), ("cpu %", 6), ("rss", 9), ("pid", 8),
           ("last event", 16), ("info", 12))
#: At most this many output lines are drawn per batch (the newest); the rest
#: are counted (and kept in --log-dir files), so a chatty worker cannot drown the view.
MAX_LINES_SHOWN = 400


def _width(cell: Any) -> int:
    """How many terminal columns a table cell (a str or a rich Text) takes."""
    return cell.cell_len if isinstance(cell, Text) else cell_len(str(cell))


class Usage:
    """CPU % and RSS of each live worker, through psutil: one Process object a
    worker, kept between redraws (its cpu_percent counts from the last call)."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def of(self, r: WorkerStatus) -> tuple[str, str]:
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


def state_counts(text: Text, names: list[str]) -> Text:
    """`text` followed by how many workers are in each state or outcome, in their colours."""
    for name, n in Counter(names).items():
        text.append(f"{n} {name}  ", style=STATE_STYLE.get(name, ""))
    return text


def rest_line(names: list[str], what: str) -> list[Text]:
    """The line that sums up the rows a screen has no room for (none if none)."""
    if not names:
        return []
    summary = ", ".join(f"{n} {name}" for name, n in Counter(names).items())
    return [Text(f"... and {len(names)} more {what}: {summary}", style="dim")]


def ago(last: tuple[str, float] | None) -> str:
    """A row's last event and how long ago it came (`paused 3s ago`)."""
    if last is None:
        return ""
    what, when = last
    return f"{what} {time.monotonic() - when:.0f}s ago"


def fitting(columns: tuple[tuple[str, int], ...], room: int, always: int) -> list[str]:
    """The names of `columns` (name, width; in the order they are kept) that fit
    in `room` characters; the first `always` stay whatever the width."""
    kept: list[str] = []
    used = 0
    for i, (name, width) in enumerate(columns):
        if i >= always and used + width > room:
            break  # goes, and every one after it (a narrower one after it would jump the order)
        kept.append(name)
        used += width
    return kept


class LiveView:
    """A rich Live display fed by controller events, status() snapshots and worker output.

    One lock serialises every write to the terminal: the redraws (from the
    view's own refresh thread, so the view moves during a stop's grace
    period too) and the workers' lines printed above the view, which are
    therefore never torn.
    """

    def __init__(self, status: Callable[[], list[WorkerStatus]], title: str | Callable[[], str],
                 console: Console | None = None,
                 *, footer: str = "", keys: bool = False, heartbeat: float | None = None) -> None:
        self._status = status
        self._heartbeat = heartbeat  # a worker silent for more than half of it is marked
        self._title = title
        self._footer = footer
        self._keys = keys
        self._console = console or terminal_console()
        self._usage_of = Usage()
        self._t0 = time.monotonic()
        self._live: Live | None = None
        self._draw = threading.RLock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_at: float | None = None
        self._grace = 0.0
        self._message = ""
        #: Each worker's last event and when it came (monotonic).
        self._last_event: dict[int, tuple[str, float]] = {}

    def __enter__(self) -> LiveView:
        self._live = Live(console=self._console, auto_refresh=False, transient=False,
                          redirect_stdout=False, redirect_stderr=False)
        with self._draw:
            self._live.__enter__()
        self._thread = threading.Thread(target=self._refresher, name="procctl-live", daemon=True)
        threads.start(self._thread)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._live is not None:
            self.refresh()
            with self._draw:
                self._live.__exit__(None, None, None)
            self._live = None

    def _refresher(self) -> None:
        while not self._done.wait(REFRESH):  # a display's frame rate, not a wait for a condition
            self.refresh()

    def on_event(self, event: Event) -> None:
        """A worker's event: its row's last event (from the controller's thread)."""
        if event.worker is not None:
            self._last_event[event.worker] = (event.event, time.monotonic())

    def stopping(self, grace: float) -> None:
        """A stop began: count the grace period down, and show no more ETA."""
        self._stop_at = time.monotonic()
        self._grace = grace

    def message(self, text: str) -> None:
        """A short note in the footer (e.g. what a key did)."""
        self._message = text

    def output(self, output: Output) -> None:
        """A worker's lines, printed above the view as `[3] text` (from any thread)."""
        lines = output.lines()
        shown = lines[-MAX_LINES_SHOWN:]  # the newest: the screen shows where the worker is now
        hidden = len(lines) - len(shown)
        text = Text("\n").join(Text(f"[{output.worker}] ") + terminal_line(line) for line in shown)
        with self._draw:
            # Also before the view opens and after it closed: the capture drains what the
            # workers wrote last once they have ended (it was dropped, neither shown nor counted).
            if hidden:
                self._console.print(Text(f"[procctl] {hidden} lines of worker {output.worker}'s output"
                                         " not shown (--log-dir keeps them)", style="dim"))
            self._console.print(text, soft_wrap=True, markup=False, highlight=False)

    def refresh(self) -> None:
        with self._draw:
            if self._live is not None:
                self._live.update(self.render(self._status()), refresh=True)

    # -- drawing ------------------------------------------------------------

    def render(self, rows: list[WorkerStatus]) -> Group:
        parts: list[Any] = [self._header(rows), self._overall(rows)]
        if self._stop_at is not None:
            parts.append(self._countdown(rows))
        parts.append(self._table(rows))
        parts += self._footer_text()
        return Group(*parts)

    def _header(self, rows: list[WorkerStatus]) -> Text:
        title = self._title() if callable(self._title) else self._title  # (a run that resizes)
        text = Text(f"{title}  ", style="bold")
        text.append(f"{time.monotonic() - self._t0:6.1f}s  ")
        return state_counts(text, [self._state_name(r) for r in rows if r.alive]
                            + [r.outcome.value for r in rows if r.outcome is not None])

    def _state_name(self, r: WorkerStatus) -> str:
        if r.outcome is not None:
            return r.outcome.value
        return "stopping" if self._stop_at is not None else r.state.name.lower()

    def _countdown(self, rows: list[WorkerStatus]) -> Text:
        assert self._stop_at is not None
        left = self._grace - (time.monotonic() - self._stop_at)
        running = [str(r.worker_id) for r in rows if r.alive]
        who = ", ".join(running[:20]) + (" ..." if len(running) > 20 else "")
        if not running:
            return Text("every worker has ended", style="cyan")
        if left > 0:
            return Text(f"stopping: {left:4.1f}s of the {self._grace:g}s grace period left; "
                        f"still running: {who}", style="magenta")
        return Text(f"grace period over: terminating {who}", style="bold magenta")

    def _overall(self, rows: list[WorkerStatus]) -> Table | Text:
        with_total = [r for r in rows if r.total and r.done is not None and math.isfinite(r.total)]
        if not with_total:
            return Text("")
        # In units of the largest total, so that totals near 1e308 add up
        # without overflowing to infinity.
        unit = max(r.total or 0.0 for r in with_total)
        done = sum((r.done or 0.0) / unit for r in with_total)
        total = sum((r.total or 0.0) / unit for r in with_total)
        # Only running workers move: a paused one keeps its rate (as it was) and has no ETA.
        rate = sum(r.rate / unit for r in with_total
                   if r.rate and math.isfinite(r.rate) and r.alive and r.state is State.RUNNING)
        eta = (total - done) / rate if rate > 0 and total > done and self._stop_at is None else None
        grid = Table.grid(padding=(0, 1))
        width = max(10, min(40, self._console.size.width - 20))
        grid.add_row(ProgressBar(total=total, completed=min(done, total), width=width),
                     f"{100 * done / total:5.1f}%", f"ETA {_fmt_eta(eta)}" if eta is not None else "")
        return grid

    def columns(self, measured: dict[str, int] | None = None) -> list[str]:
        """The columns that fit the terminal's width, in display order: each as
        wide as it says (COLUMNS) or as `measured` (its widest cell) and a gap."""
        widths = tuple((name, max(width, (measured or {}).get(name, 0) + 2)) for name, width in COLUMNS)
        kept = fitting(widths, self._console.size.width, 2)  # worker and state always
        order = ("worker", "pid", "state", "progress", "eta", "last event", "info", "cpu %", "rss")
        return [name for name in order if name in kept]

    def _table(self, rows: list[WorkerStatus]) -> Group:
        room = max(3, self._console.size.height - 10)
        shown = rows[:room]
        rows_cells = [self._cells(r) for r in shown]
        # Each column as wide as its widest cell or header (the state at least 8);
        # info takes the room the others leave (and two spaces between two
        # columns): more, and rich would cut the other columns instead (RSS, the pid).
        measured = {name: max([cell_len(name), 8 if name == "state" else 0]
                              + [_width(cells[name]) for cells in rows_cells])
                    for name, _ in COLUMNS if name != "info"}
        columns = self.columns(measured)
        others = sum(measured[name] for name in columns if name != "info")
        info_room = max(12, min(30, self._console.size.width - others - 2 * (len(columns) - 1) - 1))
        table = Table(box=None, pad_edge=False, header_style="bold dim")
        for column in columns:
            if column == "state":
                table.add_column(column, no_wrap=True, min_width=8)
            elif column == "info":
                table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=info_room)
            else:
                table.add_column(column, no_wrap=True)
        for cells in rows_cells:
            table.add_row(*(cells[c] for c in columns))
        return Group(table, *rest_line([self._state_name(r) for r in rows[len(shown):]], "workers"))

    def _cells(self, r: WorkerStatus) -> dict[str, Any]:
        name = self._state_name(r)
        progress = ""
        if r.done is not None:
            progress = f"{_fmt_count(r.done)}/{_fmt_count(r.total)}" if r.total else _fmt_count(r.done)
        eta = _fmt_eta(r.eta) if r.alive and self._stop_at is None else ""
        # A Text, not a str: rich would read "[/]" or "[red]" in the worker's info as markup.
        # Nor may an escape sequence in it move the cursor or clear the screen.
        info = Text(info_text(r.info)) if r.info else ""
        cpu, rss = self._usage_of.of(r)
        state = Text(name, style=STATE_STYLE.get(name, ""))
        if r.restarts:
            state.append(f" r{r.restarts}", style="dim")
        if self.silent(r):
            state.append(f" no beat {r.beat_age:.1f}s", style="bold red")
        last = ago(self._last_event.get(r.worker_id))
        return {"worker": str(r.worker_id), "pid": str(r.pid or ""), "state": state,
                "progress": progress, "eta": eta, "last event": last, "info": info, "cpu %": cpu, "rss": rss}

    def _footer_text(self) -> list[Text]:
        return footer_text(KEYS + "  +/- workers" if self._keys else "", self._footer, self._message)

    def silent(self, r: WorkerStatus) -> bool:
        """Is the worker's last heartbeat older than half the heartbeat period?"""
        return (self._heartbeat is not None and r.alive and r.beat_age is not None
                and r.beat_age > self._heartbeat / 2)


class KeyReader:
    """The live view's keys: stdin in cbreak mode, one thread, each key to `on_key`.

    Does nothing unless stdin is a terminal; the terminal's mode is restored on exit.
    """

    def __init__(self, on_key: Callable[[str], None]) -> None:
        self.on_key = on_key
        self._saved: Any = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> KeyReader:
        if not os.isatty(0):
            return self
        try:
            self._saved = termios.tcgetattr(0)
            tty.setcbreak(0)
        except termios.error:
            return self
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="procctl-keys", daemon=True)
        threads.start(self._thread)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        os.write(self._wake_w, b"\0")
        self._thread.join(5.0)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._thread = None
        try:
            termios.tcsetattr(0, termios.TCSADRAIN, self._saved)
        except termios.error:
            pass

    def _loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(0, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                if any(key.fd == self._wake_r for key, _ in sel.select()):
                    return
                try:
                    data = os.read(0, 64)
                except OSError:
                    return
                if not data:
                    return
                for ch in data.decode(errors="ignore"):
                    try:
                        self.on_key(ch)
                    except Exception:  # noqa: BLE001 - a key must never end the run
                        pass


#: The sum view's columns with the room each needs, in the order they are kept
#: (worker, role and state always stay).
SUM_COLUMNS = (("worker", 7), ("role", 12), ("state", 10), ("sum", 9), ("toward the threshold", 24),
               ("items", 7), ("last event", 18), ("cpu %", 6), ("rss", 9))


class SumLiveView:
    """The live view of `procctl sum`: every producer and consumer (state, CPU,
    memory, last event) and each consumer's sum racing to the threshold.

    Built from the checked plan, fed by the job's events and its controller's
    status(); rich redraws it from its own refresh thread, so the elapsed
    time moves even while no item arrives.
    """

    def __init__(self, plan: SumPlan, console: Console | None = None, *, footer: str = "", keys: bool = False,
                 status: Callable[[], list[WorkerStatus]] | None = None):
        #: Where the run is reached from another shell; whether the keys work (both set before it opens).
        self.footer = footer
        self.keys = keys
        #: What the last key did, for the footer.
        self.message = ""
        #: The workers' status (the job's controller's, once it has one).
        self.status = status or list
        self._plan = plan
        self._threshold = plan.threshold
        self._sums = [0] * plan.consumers
        self._received = [0] * plan.consumers
        self._produced: list[int | None] = [None] * plan.producers
        #: Each worker's last event (by worker id) and when it came (monotonic).
        self._last: dict[int, tuple[str, float]] = {}
        self._note = "running"
        self._stopping = False
        self._t0 = time.monotonic()
        self._usage = Usage()
        self._console = console or terminal_console()
        self._live = Live(self, console=self._console, refresh_per_second=1 / REFRESH)

    def __enter__(self) -> SumLiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._live.__exit__(None, None, None)

    def on_event(self, event: JobEvent) -> None:
        now = time.monotonic()
        consumer = self._plan.producers + getattr(event, "consumer", 0)
        if isinstance(event, Received):
            self._sums[event.consumer] = event.sum
            self._received[event.consumer] += 1
            self._last[consumer] = (f"got {event.value}", now)
        elif isinstance(event, Crossed):
            self._last[consumer] = ("WON" if event.winner else "crossed too late", now)
            if event.winner:
                self._note = f"consumer {event.consumer} won: stopping everyone"
                self._stopping = True
        elif isinstance(event, ConsumerStopped):
            self._sums[event.consumer], self._received[event.consumer] = event.sum, event.received
            self._last[consumer] = ("WON" if event.winner else event.outcome.value, now)
        elif isinstance(event, ProducerStopped):
            self._produced[event.producer] = event.produced
            self._last[event.producer] = (event.outcome.value, now)
        elif isinstance(event, ChannelClosed):
            self._note = "cleanup: queue drained and closed"

    def stopping(self, why: str) -> None:
        """A stop was asked for (a signal, a key, `procctl stop`)."""
        self._note = why
        self._stopping = True

    def __rich__(self) -> Group:
        rows = {r.worker_id: r for r in self.status()}
        head = Text(f"procctl sum: {self._plan.producers} producers, {self._plan.consumers} consumers, "
                    f"threshold {self._threshold}  ", style="bold")
        head.append(f"{time.monotonic() - self._t0:6.1f}s  ")
        state_counts(head, [self._state_name(rows.get(wid)) for wid in range(self._plan.workers)])
        head.append(self._note)
        return Group(head, self._overall(), self._table(rows),
                     *footer_text(KEYS if self.keys else "", self.footer, self.message))

    def _state_name(self, r: WorkerStatus | None) -> str:
        if r is None:
            return "starting"
        if r.outcome is not None:
            return r.outcome.value
        return "stopping" if self._stopping else r.state.name.lower()

    def _overall(self) -> Table:
        """The leading consumer's sum toward the threshold, with an ETA at its pace so far."""
        leader = max(range(len(self._sums)), key=self._sums.__getitem__)
        best = self._sums[leader]
        goal = self._threshold + 1  # (crossed: past the threshold, as each row's bar)
        elapsed = time.monotonic() - self._t0
        grid = Table.grid(padding=(0, 1))
        width = max(10, min(40, self._console.size.width - 50))
        text = f"{100 * min(best, goal) / goal:5.1f}%  leader: consumer {leader}, {best} of {self._threshold}"
        if 0 < best < self._threshold and not self._stopping:
            text += f"  ETA {_fmt_eta((self._threshold - best) * elapsed / best)}"
        grid.add_row(ProgressBar(total=goal, completed=min(best, goal), width=width), text)
        return grid

    def _table(self, rows: dict[int, WorkerStatus]) -> Group:
        columns = fitting(SUM_COLUMNS, self._console.size.width, 3)
        table = Table(box=None, pad_edge=False, header_style="bold dim")
        for column in columns:
            table.add_column(column, no_wrap=True)
        room = max(3, self._console.size.height - 8)
        wids = list(range(self._plan.workers))
        for wid in wids[:room]:
            cells = self._cells(wid, rows.get(wid))
            table.add_row(*(cells[c] for c in columns))
        return Group(table, *rest_line([self._state_name(rows.get(wid)) for wid in wids[room:]], "workers"))

    def _cells(self, wid: int, r: WorkerStatus | None) -> dict[str, Any]:
        role, index = self._plan.role(wid)
        name = self._state_name(r)
        cpu, rss = self._usage.of(r) if r is not None else ("", "")
        last = ago(self._last.get(wid))
        cells: dict[str, Any] = {"worker": str(wid), "role": f"{role} {index}",
                                 "state": Text(name, style=STATE_STYLE.get(name, "")),
                                 "sum": "", "toward the threshold": "", "items": "",
                                 "last event": last, "cpu %": cpu, "rss": rss}
        if role == "consumer":
            total = self._sums[index]
            cells["sum"] = str(total)
            cells["toward the threshold"] = ProgressBar(total=max(1, self._threshold + 1),
                                                        completed=min(total, self._threshold + 1), width=20)
            cells["items"] = str(self._received[index])
        elif self._produced[index] is not None:
            cells["items"] = str(self._produced[index])
        return cells


class MapLiveView:
    """The live view of `procctl map`: tasks done of the total, rate, ETA, state.

    `counts` returns (done, failed, in_flight) at each redraw; rich redraws
    from its own refresh thread, so the clock moves while no task ends.
    Result lines for a terminal stdout go through `print` (above the view).
    """

    def __init__(self, title: str, total: int, counts: Callable[[], tuple[int, int, int]],
                 console: Console | None = None, *, footer: str = "", keys: bool = False) -> None:
        #: Where the run is reached from another shell; whether the keys work (both set before it opens).
        self.footer = footer
        self.keys = keys
        #: What the last key did, for the footer.
        self.message = ""
        self._title = title
        self._total = total
        self._counts = counts
        self.note = "running"
        self._t0 = time.monotonic()
        self._live = Live(self, console=console or terminal_console(), refresh_per_second=1 / REFRESH,
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
        eta = None
        if rate > 0 and self._total > ended and self.note != "stopping":  # (no ETA once a stop began)
            eta = (self._total - ended) / rate
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
        return Group(head, grid, tally, *footer_text(KEYS if self.keys else "", self.footer, self.message))
