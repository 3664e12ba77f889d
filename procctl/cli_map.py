"""`procctl map MODULE:FUNC`: a resumable, pausable parallel map on the command line.

procctl.cli registers it on the group; errors and exit codes are handled there.

    items (file or stdin) --read, check all--> MapPlan --submit, one future per item--> executor
    stdout <-- {"item", "result"|"error"} <-- collect() <-- wake pipe <-- future done-callbacks
    joblog <-- the worker appends each item's record as its task returns (procctl.map_task)
           <-- with --cluster, collect() appends it as the result arrives (workers may be elsewhere)

Every input is checked before a worker starts (and before --cluster connects). The loop blocks on one wake
pipe that future callbacks and signal handlers write to; it keeps a bounded
window of futures in flight and owns the item -> future bookkeeping, so the
order, the joblog and the unfinished items are exact whatever the executor does.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import selectors
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any, cast

import click

from . import maplog, threads
from .clitools import (
    DEFAULT_WORKERS_PER_NODE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    OUTPUT_GRACE,
    QUIT_GRACE,
    BadInput,
    Reporter,
    SignalBridge,
    _silence,
    check_distinct_files,
    check_writable_file,
    count,
    error_text,
    first_line,
    printable,
    read_input,
    say,
    working_dir,
)
from .control import ACK_WAIT
from .controller import WorkerStartError
from .executor import ProcessExecutor
from .limits import COMMAND_FDS, LIMIT_ERRNOS, WORK_FDS_PER_WORKER, capacity_problem
from .map_task import exception_text, output_to_stderr, run_item
from .named_target import NamedTarget, remember
from .states import State, WorkerStatus
from .workwire import remaining

if TYPE_CHECKING:
    from .cli_control import ControlPlan
    from .cluster import ClusterExecutor

START_METHODS = ("fork", "spawn", "forkserver")
#: How long `procctl pause` of a map run waits past the loop's own acknowledgement wait.
LOOP_SLACK = 1.0
#: Exit status when stdout's reader went away (| head): what a shell shows for SIGPIPE.
EXIT_PIPE = 128 + signal.SIGPIPE
#: Futures in flight per worker: enough that no worker waits for the loop, few enough
#: that a stop has little to cancel and a huge input is not all queued at once.
WINDOW_PER_WORKER = 8
MIN_WINDOW = 64


# -- the checked plan ---------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    line: int  # 1-based line number in the input
    value: Any
    text: str  # the value as JSON, for the output


@dataclass(frozen=True)
class ClusterPlan:
    """--cluster, checked: the scheduler to connect to, or how many local Dask workers to start."""

    text: str  # as given, for messages
    address: str | None  # tcp://HOST:PORT; None with local_nodes
    local_nodes: int  # local:N: start a LocalCluster of N worker processes
    workers_per_node: int
    lease: float  # seconds a node keeps its workers once the client is gone


@dataclass(frozen=True)
class MapPlan:
    """Every input checked once; the session and the views take their facts from here."""

    spec: str
    func: Callable[[Any], Any]
    items: list[Item]
    to_run: list[Item]  # items minus the ones the joblog has as done (--resume)
    raw_lines: bool
    workers: int
    ordered: bool
    retries: int
    task_timeout: float | None
    timeout: float | None
    grace: float
    joblog: str | None
    resume: bool
    unfinished: str | None
    start_method: str | None
    cluster: ClusterPlan | None = None  # None: the workers run here, `workers` of them
    spent: float = 0.0  # seconds of --timeout its function's import took

    @property
    def skipped(self) -> int:
        return len(self.items) - len(self.to_run)


def seconds(option: str, value: float | None, *, positive: bool = False) -> float | None:
    """A checked number of seconds; inf means no limit (None)."""
    if value is None:
        return None
    if math.isnan(value) or value < 0 or (positive and value == 0):
        kind = "a positive" if positive else "a non-negative"
        raise BadInput(f"{option} must be {kind} number of seconds, not {value}")
    return None if value == math.inf else value


def load_function(spec: str, local: bool, timeout: float | None = None) -> Callable[[Any], Any]:
    """The checked function, sent to the workers by its name (named_target.py): on a
    cluster too, where a node imports the module as it would to unpickle the function.
    A stop or `timeout` during its module's import gives cli.never_started."""
    from .cli import load_target, never_started  # procctl.cli imports this module at its end

    func = load_target(spec, option="MODULE:FUNC", takes="the item", timeout=timeout)
    if func is never_started:
        return func
    if local:
        remember(spec, func)  # (fork children inherit it: they import nothing)
    return NamedTarget(spec, working_dir())


def read_stdin(bridge: SignalBridge) -> bytes:
    """All of stdin; a stop signal while we wait for it (Ctrl-C at the terminal) ends the command.
    A closed stdin (`<&-`) has no items."""
    if sys.stdin is None:
        return b""
    if sys.stdin.isatty():
        say("procctl map: reading items from the terminal; end with Ctrl-D")
    return read_input(sys.stdin.buffer, "--items from stdin", bridge)


def read_items(path: str, raw_lines: bool, bridge: SignalBridge) -> list[Item]:
    """Every item of the input, or BadInput naming the first bad line."""
    where = "stdin" if path == "-" else repr(path)
    try:
        if path == "-":
            data = read_stdin(bridge)
        else:
            try:
                f = open(path, "rb")
            except OSError as exc:
                raise BadInput(f"--items {path!r} cannot be read: {exc.strerror}") from None
            with f:
                data = read_input(f, f"--items {path!r}", bridge)
    except OSError as exc:  # (EIO from a terminal that went away, EISDIR)
        raise BadInput(f"--items {where} cannot be read: {exc.strerror or exc}") from None
    except MemoryError:  # under a memory limit of its own (ulimit -v)
        raise BadInput(f"--items {where} is too large to read") from None
    chunks = data.split(b"\n")
    if chunks and chunks[-1] == b"":
        chunks.pop()  # the newline that ends the last line
    items = []
    for number, chunk in enumerate(chunks, start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"--items {where} line {number} is not UTF-8 text") from None
        if raw_lines:
            items.append(Item(number, text, json.dumps(text)))
            continue
        if not text.strip():
            continue  # JSON Lines readers skip blank lines
        try:
            value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
        except ValueError as exc:
            raise BadInput(f"--items {where} line {number} is not JSON: {exc}") from None
        except RecursionError:
            raise BadInput(f"--items {where} line {number} is nested too deeply to read") from None
        items.append(Item(number, value, json.dumps(value)))
    return items


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: no float holds it, and JSON has no word for infinity
        raise ValueError(f"{text} is out of range for a number")
    return value


def make_plan(spec: str, items_path: str, raw_lines: bool, workers: int | None, ordered: bool, retries: int,
              task_timeout: float | None, timeout: float | None, grace: float, joblog: str | None, resume: bool,
              unfinished: str | None, start_method: str | None, events_path: str | None,
              bridge: SignalBridge, cluster_address: str | None = None,
              workers_per_node: int | None = None, lease: float | None = None) -> MapPlan:
    task_timeout = seconds("--task-timeout", task_timeout, positive=True)
    timeout = seconds("--timeout", timeout)
    checked_grace = seconds("--grace", grace)
    if resume and not joblog:
        raise BadInput("--resume needs --joblog FILE (the log of the run to resume)")
    cluster = check_cluster(cluster_address, workers, workers_per_node, lease)
    if workers is not None:
        too_many = capacity_problem(workers, WORK_FDS_PER_WORKER, COMMAND_FDS)  # (an executor's)
        if too_many is not None:
            raise BadInput(f"--workers {workers}: {too_many}")
    # The items first: a log written over them would lose them (`--joblog items.jsonl`).
    check_distinct_files({"--items": None if items_path in (None, "-") else items_path, "--joblog": joblog,
                          "--unfinished": unfinished, "--events": events_path})
    for path, option in ((joblog, "--joblog"), (unfinished, "--unfinished"), (events_path, "--events")):
        if path is not None:
            check_writable_file(path, option)
    if cluster is not None:
        from .cli import load_cluster

        load_cluster(cluster.address)  # (after the checks above: none of them needs Dask)
    importing = time.monotonic()
    func = load_function(spec, local=cluster is None, timeout=timeout)
    spent = time.monotonic() - importing  # (the import counts: --timeout bounds the whole command)
    items = read_items(items_path, raw_lines, bridge)
    done: set[int] = set()
    if joblog and resume:
        try:
            done = maplog.read_done(joblog, {item.line: maplog.digest(item.value) for item in items})
        except maplog.JoblogError as exc:
            raise BadInput(f"--joblog {joblog!r} {exc}") from None
    to_run = [item for item in items if item.line not in done]
    if cluster is not None:  # on each node: no more workers than there are items
        cluster = replace(cluster, workers_per_node=max(1, min(cluster.workers_per_node, len(to_run))))
        workers = cluster.workers_per_node
    return MapPlan(
        spec=spec, func=func, items=items, to_run=to_run, raw_lines=raw_lines,
        workers=max(1, min(workers or os.cpu_count() or 1, len(to_run))), ordered=ordered, retries=retries,
        task_timeout=task_timeout, timeout=timeout, spent=spent,
        grace=math.inf if checked_grace is None else checked_grace,
        joblog=joblog, resume=resume, unfinished=unfinished, start_method=start_method, cluster=cluster)


def check_cluster(text: str | None, workers: int | None, workers_per_node: int | None,
                  lease: float | None = None) -> ClusterPlan | None:
    """--cluster, --workers-per-node and --lease, checked without connecting (procctl.cli's rules)."""
    from .cli import check_lease, parse_cluster  # procctl.cli imports this module at its end (and Dask: not yet)

    node_lease = check_lease(lease, text is not None)
    if text is None:
        if workers_per_node is not None:
            raise BadInput("--workers-per-node works with --cluster; on one machine use --workers")
        return None

    if workers is not None:
        raise BadInput("--workers is for one machine; with --cluster use --workers-per-node")
    per_node = DEFAULT_WORKERS_PER_NODE if workers_per_node is None else workers_per_node
    too_many = capacity_problem(per_node)
    if too_many is not None:
        raise BadInput(f"--workers-per-node {per_node}: {too_many}")
    address, local_nodes = parse_cluster(text)
    return ClusterPlan(text.strip(), address, local_nodes, per_node, node_lease)


# -- the executor ---------------------------------------------------------------------


#: Worker processes on each Dask worker when --cluster comes without --workers-per-node (procctl run's).


def make_executor(plan: MapPlan) -> ProcessExecutor:
    # stdout carries the results: what the function prints goes to stderr.
    return ProcessExecutor(plan.workers, retries=plan.retries, task_timeout=plan.task_timeout,
                           start_method=plan.start_method, grace=plan.grace, initializer=output_to_stderr)


class ClusterStartFailed(click.ClickException):
    """The cluster was reached, but its nodes could not run the workers (exit 1, one line)."""


def connect_cluster(plan: MapPlan, cluster: ClusterPlan,
                    bridge: SignalBridge) -> tuple[ClusterExecutor | None, Any]:
    """A ClusterExecutor with its agents up on every node, and the LocalCluster started for
    local:N (else None). BadInput (exit 2) if the scheduler cannot be reached in
    CLUSTER_CONNECT_TIMEOUT; ClusterStartFailed (exit 1) if its nodes cannot start the workers.
    (None, None) when SIGINT or SIGTERM came meanwhile: the connect gives up at once."""
    from concurrent.futures import BrokenExecutor

    from .cli import CLUSTER_CONNECT_TIMEOUT
    from .cluster import ClusterExecutor
    from .cluster.session import cancel_opening, local_cluster

    def wake() -> None:
        if bridge.stop_requested():
            cancel_opening()

    local: Any = None
    try:
        address = cluster.address
        if cluster.local_nodes:
            local = local_cluster(cluster.local_nodes)
            address = local.scheduler_address
        with bridge.attach(wake=wake, hurry=lambda: None):
            if bridge.stop_requested():
                raise InterruptedError("stopped before the connect")
            executor = ClusterExecutor(
                address=address, workers_per_node=cluster.workers_per_node, retries=plan.retries,
                lease=cluster.lease, task_timeout=plan.task_timeout, grace=plan.grace,
                start_method=plan.start_method or "fork", connect_timeout=CLUSTER_CONNECT_TIMEOUT)
    except BaseException as exc:
        if local is not None:
            local.close()
        if isinstance(exc, InterruptedError) and bridge.stop_requested():
            return None, None  # the run says it stopped before it started
        why = first_line(str(exc)) or type(exc).__name__
        if isinstance(exc, (ConnectionError, ValueError)):
            raise BadInput(f"--cluster {cluster.text!r}: {why}") from None
        if isinstance(exc, (BrokenExecutor, OSError)):  # TimeoutError: the agents did not come up
            raise ClusterStartFailed(f"--cluster {cluster.text!r}: the workers could not start: {why}") from None
        raise
    return executor, local


# -- events and output ---------------------------------------------------------------


@dataclass(frozen=True)
class MapEvent:
    """One thing that happened in a map run, as --json (run-level ones) and --events see it.

    ``event`` is ``started``, ``done`` or ``failed`` (an item, with its input
    ``line``), ``paused``, ``resumed``, ``stopping`` (with the ``signal``) or
    ``timeout``; the summary is a plain record.
    """

    t: float  # seconds since the run started
    event: str
    line: int | None = None
    error: str | None = None
    items: int | None = None
    skipped: int | None = None
    workers: int | None = None
    nodes: int | None = None  # --cluster: the Dask workers the run's workers are spread over
    signal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # (vars, not asdict: its deep copy was a fifth of an item's cost; every field is a plain value)
        return {k: v for k, v in vars(self).items() if v is not None}


class OutputStalled(Exception):
    """Raised by a signal handler into a write to stdout that its reader does not take."""


class ResultWriter:
    """Result lines to stdout, or above the live view when that view owns the terminal.

    A reader that stops reading blocks a write, and the session's loop with it:
    once a stop was asked for, such a write gets OUTPUT_GRACE (a SIGALRM), then
    it is abandoned and stdout goes to /dev/null."""

    def __init__(self, stream: IO[str], printer: Callable[[str], None] | None = None) -> None:
        self._stream = stream
        self.printer = printer
        self.broken = False
        self.error: OSError | None = None  # why stdout could not be written (None: its reader left)
        #: True while a write or flush to stdout is under way (read by signal handlers).
        self.writing = False
        self.alarm = False
        #: Set while the session's SIGALRM handler is in place (only then may arm() set the timer).
        self.alarmable = False
        #: Whether a stop was asked for (set by the session).
        self.stopping: Callable[[], bool] = lambda: False

    def write(self, line: str) -> None:
        if self.broken:
            return
        if self.printer is not None:
            self.printer(line)
            return
        self._guarded(self._stream.write, line + "\n")

    def write_text(self, text: str) -> None:
        """Text as it is (the events' reporter writes through here: one stdout, one order)."""
        if not self.broken:
            self._guarded(self._stream.write, text)

    def flush(self) -> None:
        if self.broken or self.printer is not None:
            return
        self._guarded(self._stream.flush)

    def _guarded(self, op: Callable[..., Any], *args: Any) -> None:
        self.writing = True
        try:
            if self.stopping():
                self.arm()
            op(*args)
        except OutputStalled:
            self._stalled()
        except (OSError, ValueError) as exc:
            self._broke(exc)
        finally:
            self.writing = False
            if self.alarm:
                self.alarm = False
                signal.setitimer(signal.ITIMER_REAL, 0)

    def arm(self) -> None:
        """Give the write under way OUTPUT_GRACE (from the loop's thread or a handler)."""
        if self.alarmable and self.writing and not self.alarm:
            self.alarm = True
            signal.setitimer(signal.ITIMER_REAL, OUTPUT_GRACE)

    def _stalled(self) -> None:
        self.broken = True
        say("procctl map: the reader of stdout stopped reading: the rest of the results is not written")
        _silence(self._stream)

    def _broke(self, exc: Exception) -> None:
        # Nobody can take more results (| head, a full disk): the session stops;
        # the joblog and --unfinished still say what was done and what was not.
        self.broken = True
        if isinstance(exc, OSError) and exc.errno != errno.EPIPE:
            self.error = exc
            say(f"procctl map: error: the results cannot be written to stdout ({exc.strerror})")
        _silence(self._stream)


# -- the session ----------------------------------------------------------------------


class MapSession:
    """Runs a plan on an executor: submit, wait, collect, act on signals, stop.

    On one machine it starts its ProcessExecutor; with --cluster it is handed a
    connected ClusterExecutor (None if a stop came first), stops it the same
    way, and writes every joblog record itself.
    """

    def __init__(self, plan: MapPlan, reporter: Reporter, results: ResultWriter,
                 executor: ClusterExecutor | None = None) -> None:
        self.plan = plan
        self.reporter = reporter
        self.results = results
        self.started = time.monotonic()
        self.deadline = None if plan.timeout is None else self.started + max(0.0, plan.timeout - plan.spent)
        self.executor: ProcessExecutor | ClusterExecutor | None = executor
        self.on_cluster = plan.cluster is not None
        #: Worker processes in all (on a cluster: nodes x per node; none if it never connected).
        self.workers = plan.workers if not self.on_cluster else executor.workers if executor is not None else 0
        self.nodes = len(executor.nodes) if executor is not None else None
        self.bridge: SignalBridge | None = None
        self.next = 0  # position in plan.to_run of the next item to submit
        self.futures: dict[int, Future[Any]] = {}  # position -> future, while in flight
        self.ended: set[int] = set()  # positions with an outcome (done or failed)
        self.completed: deque[int] = deque()  # positions whose futures completed, for the loop
        self.pending_lines: dict[int, str] = {}  # --ordered: output waiting for earlier items
        self.next_out = 0
        self.done = 0
        self.failed = 0
        self.timed_out = False
        self.start_failed: int | None = None  # the exit status when the workers could not start
        self.hurried = False  # a second stop signal came before the executor was there to kill
        self.paused = False
        self.joblog_error: OSError | None = None  # --cluster: a record could not be written
        self.unfinished_error: OSError | None = None
        #: Why the executor broke (run() stops; what was not done is unfinished).
        self.broken: str | None = None
        self.window = max(MIN_WINDOW, WINDOW_PER_WORKER * self.workers)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self.on_state: Callable[[str], None] = lambda note: None  # the live view's note
        self.on_record: Callable[[dict[str, Any]], None] = lambda record: None  # the control socket's log
        self.stop_asked = False  # by `procctl stop` or the live view's keys
        self.stop_by = "procctl stop"
        #: Set once finish() has stopped or shut down the executor (the live view's `q` waits for it).
        self.finished = threading.Event()
        #: Notified when the loop has paused or resumed (`procctl pause` waits for it).
        self.state_changed = threading.Condition()
        #: What the last pause or resume could not get acknowledged in time (None: all was).
        self.late: str | None = None
        #: Set to end acknowledged()'s wait when a stop is asked for (None: not waiting).
        self._settling: threading.Event | None = None
        self._old_alarm: Any = None

    # -- the loop, as a table of contents

    def on_signal(self) -> None:
        """In the signal handler: wake the loop; a write to stdout that holds it
        gets OUTPUT_GRACE once a stop was asked for."""
        self.wake()
        assert self.bridge is not None
        if self.bridge.stop_requested():
            self.results.arm()  # (only if a write is under way)
            self._stop_settling()

    def on_alarm(self, signum: int, frame: Any) -> None:
        if self.results.writing:
            raise OutputStalled

    def end_alarm(self) -> None:
        """Put SIGALRM back as run() found it (once the summary is written)."""
        if self._old_alarm is not None:
            self.results.alarmable = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old_alarm)
            self._old_alarm = None

    def run(self, bridge: SignalBridge) -> None:
        """Run every item, or until a stop; the summary and exit status come after (report())."""
        self.bridge = bridge
        self.results.stopping = lambda: self.should_stop() or bridge.stop_requested()
        if threading.current_thread() is threading.main_thread() and self._old_alarm is None:
            self._old_alarm = signal.signal(signal.SIGALRM, self.on_alarm)  # until end_alarm(): the summary too
            self.results.alarmable = True
        with bridge.attach(wake=self.on_signal, hurry=self.hurry, nudge=self.wake):
            try:
                where = f" on {self.nodes} nodes" if self.nodes is not None else ""
                self.emit(MapEvent(self.t(), "started", items=len(self.plan.items), skipped=self.plan.skipped,
                                   workers=self.workers, nodes=self.nodes),
                          f"procctl map {self.plan.spec}: {count(len(self.plan.to_run), 'item')},"
                          f" {count(self.workers, 'worker')}{where}"
                          + (f" ({self.plan.skipped} already done)" if self.plan.skipped else ""))
                if self.plan.to_run and not self.should_stop() and self.start():
                    while self.busy() and not self.should_stop():
                        # (Before the first fill: a SIGUSR1 that came while the items were
                        # read, or the workers started, lets no item start.)
                        self.handle_signals()
                        self.fill()
                        self.wait()
                        self.collect()
            finally:
                self.finish()
        # Closed only now: until the bridge let go of the job, a handler may write to it.
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def start(self) -> bool:
        """Start the workers; False (and the exit status noted) if they cannot run."""
        if self.on_cluster:  # connected before the run (connect_cluster), unless a stop came first
            if self.hurried and self.executor is not None:
                self.executor.kill()
            return self.executor is not None
        try:
            self.executor = make_executor(self.plan)
        except (WorkerStartError, OSError, ValueError) as exc:
            # The controller has killed and reaped what it had started.
            # (ValueError: the system's limits shrank since make_plan checked them.)
            assert self.bridge is not None
            if self.bridge.stop_requested():
                return False  # a stop signal hit the start (under forkserver, the fork server too): its doing
            say(f"procctl map: error: {error_text(exc)}")
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            limit = isinstance(exc, ValueError) or (isinstance(cause, OSError) and cause.errno in LIMIT_ERRNOS)
            self.start_failed = EXIT_USAGE if limit else EXIT_FAILED  # a limit: more workers than allowed
            return False
        if self.hurried:  # a second stop signal while the workers started
            self.executor.kill()
        return True

    def report(self) -> int:
        """The summary (after any live view has closed) and the exit status."""
        self.summary()
        return self.exit_status()

    def busy(self) -> bool:
        return bool(self.futures) or self.next < len(self.plan.to_run)

    def should_stop(self) -> bool:
        assert self.bridge is not None
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.timed_out = True
        return (self.bridge.stop_signal is not None or self.timed_out or self.results.broken
                or self.stop_asked or self.joblog_error is not None or self.broken is not None)

    # -- steps

    def fill(self) -> None:
        """Submit items until the window is full: one future per item, keyed by its position."""
        assert self.executor is not None
        plan = self.plan
        while self.next < len(plan.to_run) and len(self.futures) < self.window:
            pos, item = self.next, plan.to_run[self.next]
            self.next += 1
            # On a cluster the worker cannot reach the joblog file: record() writes the record.
            joblog = None if self.on_cluster else plan.joblog
            head = maplog.record_head(item.line, item.value, item.text) if joblog else None
            try:
                future = self.executor.submit(run_item, plan.func, item.value, joblog, head)
            except futures.BrokenExecutor as exc:
                self.next = pos  # (not submitted: unfinished)
                self.broke(exc)
                return
            except RuntimeError as exc:  # shut down under us
                self.record(pos, maplog.ItemOutcome(False, exception_text(exc)), logged=False)
                continue
            self.futures[pos] = future
            future.add_done_callback(functools.partial(self._completed, pos))

    def _completed(self, pos: int, future: Future[Any]) -> None:
        # In the executor's thread: hand the position to the loop and wake it.
        self.completed.append(pos)
        self.wake()

    def wake(self) -> None:
        """Wake the loop; safe from any thread and from a signal handler."""
        with contextlib.suppress(BlockingIOError):  # full: the loop is due to wake anyway
            os.write(self._wake_w, b"\0")

    def wait(self) -> None:
        """Block until a future completes, a signal comes or the deadline passes."""
        if self.completed or not self.busy():  # (a broken executor fails the items fill() gave it at once)
            return
        self._selector.select(remaining(self.deadline))  # (at most a day: the loop comes round again)
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 65536)

    def handle_signals(self) -> None:
        assert self.bridge is not None and self.executor is not None
        if self.should_stop():
            return  # a stop wins over a pause that came with it
        for sig in self.bridge.take():
            if sig == signal.SIGUSR1 and not self.paused:
                self.acknowledged(self.executor.pause, "pause")
                if self.should_stop():
                    return  # (asked for during the wait: the stop wins, as above)
                with self.state_changed:
                    self.paused = True
                    self.state_changed.notify_all()
                self.on_state("paused")
                self.emit(MapEvent(self.t(), "paused"), "paused: no new item starts (SIGUSR2 resumes)")
            elif sig == signal.SIGUSR2 and self.paused:
                self.acknowledged(self.executor.resume, "resume")
                if self.should_stop():
                    return
                with self.state_changed:
                    self.paused = False
                    self.state_changed.notify_all()
                self.on_state("running")
                self.emit(MapEvent(self.t(), "resumed"), "resumed")

    def acknowledged(self, command: Callable[..., None], name: str) -> None:
        """Pause or resume, waiting a bounded time for every worker to acknowledge
        (as `procctl run` does): a task that never checkpoints pauses when it ends,
        and the loop must go on to see a stop signal. `late` says what was not
        acknowledged in time (for `procctl pause`'s reply), or None.

        A stop asked for meanwhile (a signal, `procctl stop`, the live view's
        keys, --timeout) ends the wait at once, as `procctl run`'s does: the
        command's own bounded wait goes on in a thread of its own, which the
        stop answers, and the loop stops without waiting it out."""
        self.late = None
        settled = threading.Event()
        late: list[str] = []

        def call() -> None:
            try:
                command(timeout=ACK_WAIT)
            except (TimeoutError, futures.TimeoutError):  # (one and the same from Python 3.11)
                late.append(f"not every worker acknowledged the {name} within {ACK_WAIT:g}s"
                            " (a task that does not checkpoint does when it ends)")
            except Exception:  # noqa: BLE001 - stopped or broken meanwhile: the loop sees to that
                pass
            finally:
                settled.set()

        self._settling = settled
        try:
            try:
                threads.start(threading.Thread(target=call, name="procctl-map-acknowledge", daemon=True))
            except OSError:  # no room for a thread: wait here, as before
                call()
            # (A stop before this line is seen by should_stop(); one after it sets `settled`.)
            while not self.should_stop() and not settled.wait(remaining(self.deadline)):
                pass  # (--timeout's deadline came: should_stop() says so)
        finally:
            self._settling = None
        if settled.is_set() and late:
            self.late = late[0]
            say(f"procctl map: {self.late}; going on")

    def _stop_settling(self) -> None:
        """A stop was asked for: end acknowledged()'s wait (from a signal handler or any thread)."""
        settling = self._settling
        if settling is not None:
            settling.set()

    def collect(self) -> None:
        while self.completed:
            pos = self.completed.popleft()
            future = self.futures.pop(pos, None)
            if future is not None and future.done() and not future.cancelled():
                exc = future.exception()
                if isinstance(exc, futures.BrokenExecutor):
                    self.broke(exc)  # the item did not fail: nothing was left to run it
                    continue
                self.record(pos, *self.outcome(future))
        self.results.flush()

    def broke(self, exc: BaseException) -> None:
        """The executor broke (every node of a cluster lost, workers that die as they
        start): the run stops, and what it had not done is unfinished, not failed."""
        if self.broken is None:
            self.broken = first_line(exception_text(exc))
            say(f"procctl map: error: the workers are gone ({self.broken}); what was not done is unfinished")

    def outcome(self, future: Future[Any]) -> tuple[maplog.ItemOutcome, bool]:
        """The item's outcome, and whether the worker logged it (on one machine, unless
        the task never returned; on a cluster, never: record() does)."""
        exc = future.exception()
        if exc is None:
            result: maplog.ItemOutcome = future.result()
            return result, not self.on_cluster and result.log_error is None
        return maplog.ItemOutcome(False, exception_text(exc)), False

    def record(self, pos: int, outcome: maplog.ItemOutcome, logged: bool) -> None:
        item = self.plan.to_run[pos]
        self.ended.add(pos)
        if self.plan.joblog and not logged:
            # Crashed or timed out (the worker could not log it), or any item on a
            # cluster: written before its result goes out, so a result seen was logged.
            self.log_record(item, outcome)
        if outcome.ok:
            self.done += 1
            line = f'{{"item": {item.text}, "result": {outcome.text}}}'
            self.reporter.emit(MapEvent(self.t(), "done", line=item.line).to_dict(), None, to_json=False)
        else:
            self.failed += 1
            line = f'{{"item": {item.text}, "error": {json.dumps(outcome.text)}}}'
            self.reporter.emit(MapEvent(self.t(), "failed", line=item.line, error=outcome.text).to_dict(),
                               f"line {item.line} failed: {printable(first_line(outcome.text))}", to_json=False)
        self.output(pos, line)

    def log_record(self, item: Item, outcome: maplog.ItemOutcome) -> None:
        """Append the item's joblog record; a joblog that cannot be written stops the run (exit 1)."""
        assert self.plan.joblog is not None
        if self.joblog_error is not None:
            return
        try:
            maplog.append(self.plan.joblog, maplog.record_head(item.line, item.value, item.text)
                          + maplog.record_tail(outcome))
        except OSError as exc:
            # Going on would run items that --resume could not skip: stop; the
            # results that came still go out, and --unfinished still says the rest.
            self.joblog_error = exc
            say(f"procctl map: error: the joblog {self.plan.joblog!r} cannot be written ({exc.strerror})")

    def output(self, pos: int, line: str) -> None:
        if not self.plan.ordered:
            self.results.write(line)
            return
        self.pending_lines[pos] = line
        while self.next_out in self.pending_lines:
            self.results.write(self.pending_lines.pop(self.next_out))
            self.next_out += 1

    def finish(self) -> None:
        """Stop or shut down the executor, collect what ended meanwhile, account for the rest."""
        executor = self.executor
        if executor is not None:
            if self.busy():
                self.announce_stop()
                executor.stop(self.plan.grace)
            executor.shutdown(wait=True)
            self.executor = None
            self.completed.extend(self.futures)  # ended during the stop: output them; the rest is unfinished
            self.collect()
            self.recover_logged()
        for pos in sorted(self.pending_lines):  # --ordered: what waited behind an unfinished item
            self.results.write(self.pending_lines.pop(pos))
        self.results.flush()
        self.finished.set()
        with self.state_changed:
            self.state_changed.notify_all()
        if self.plan.unfinished:
            self.write_unfinished(self.plan.unfinished)

    def recover_logged(self) -> None:
        """Items that completed and logged themselves, but whose result the stop cut off on its
        way back (the worker ended first): the joblog is the record, so they are done.
        (On a cluster only this loop writes records: it has seen every item logged.)"""
        if not self.plan.joblog or self.on_cluster:
            return
        lines = {self.plan.to_run[pos].line: pos for pos in range(self.next) if pos not in self.ended}
        if not lines:
            return
        for _, record in maplog.read_records(self.plan.joblog):
            pos = lines.pop(record["line"], None) if record["status"] == maplog.DONE else None
            if pos is not None:
                self.record(pos, maplog.ItemOutcome(True, json.dumps(record.get("result"))), logged=True)
        self.results.flush()

    def announce_stop(self) -> None:
        assert self.bridge is not None
        self.on_state("stopping")
        if self.timed_out:
            self.emit(MapEvent(self.t(), "timeout"), f"timeout after {self.plan.timeout}s: stopping")
        elif self.bridge.stop_signal is not None:
            name = signal.Signals(self.bridge.stop_signal).name
            self.emit(MapEvent(self.t(), "stopping", signal=name), f"{name}: stopping")
        elif self.stop_asked:
            self.emit(MapEvent(self.t(), "stopping"), f"{self.stop_by}: stopping")
        else:
            why = ("stdout failed" if self.results.error is not None
                   else "stdout was closed" if self.results.broken
                   else "the joblog failed" if self.joblog_error is not None
                   else "the workers are gone" if self.broken is not None else "an error")
            self.emit(MapEvent(self.t(), "stopping"), f"{why}: stopping")

    def request_stop(self, by: str = "procctl stop") -> None:
        """`procctl stop` (or the live view's `s`): a graceful stop, as the first SIGINT
        (from the control server's or the key reader's thread)."""
        if not self.stop_asked:
            self.stop_by = by
        self.stop_asked = True
        self._stop_settling()
        self.wake()

    def hurry(self) -> None:
        """A second SIGINT/SIGTERM (in the signal handler): kill the workers at once.

        The executor's kill() only records it and wakes its manager thread,
        which kills, also in the middle of the stop's grace; the stop then
        counts the killed workers' items unfinished.
        """
        self.hurried = True
        if self.executor is not None:
            self.executor.kill()

    def unfinished_items(self) -> Iterator[Item]:
        return (item for pos, item in enumerate(self.plan.to_run) if pos not in self.ended)

    def write_unfinished(self, path: str) -> None:
        try:
            with open(path, "w", encoding="utf-8") as f:
                for item in self.unfinished_items():
                    f.write((item.value if self.plan.raw_lines else item.text) + "\n")
        except OSError as exc:  # (checked writable before the run: a disk that filled up, /dev/full)
            say(f"procctl map: error: --unfinished {path!r} cannot be written ({exc.strerror or exc})")
            self.unfinished_error = exc

    def summary(self) -> None:
        elapsed = time.monotonic() - self.started
        unfinished = len(self.plan.to_run) - self.done - self.failed
        record = {"event": "summary", "items": len(self.plan.items), "done": self.done, "failed": self.failed,
                  "unfinished": unfinished, "skipped": self.plan.skipped, "elapsed": round(elapsed, 3),
                  "rate": round((self.done + self.failed) / elapsed, 1) if elapsed > 0 else 0.0}
        text = (f"summary: {len(self.plan.items)} items: {self.done} done, {self.failed} failed, "
                f"{unfinished} unfinished")
        if self.plan.skipped:
            text += f", {self.plan.skipped} skipped (done before)"
        text += f" in {elapsed:.2f}s ({record['rate']}/s)"
        self.reporter.summary(record, text)
        self.on_record(record)

    def exit_status(self) -> int:
        assert self.bridge is not None
        if self.bridge.exit_code is not None:
            return self.bridge.exit_code
        if self.start_failed is not None:
            return self.start_failed
        if self.joblog_error is not None or self.unfinished_error is not None or self.broken is not None:
            return EXIT_FAILED
        if self.results.broken:
            return EXIT_PIPE if self.results.error is None else EXIT_FAILED
        if self.timed_out:
            return EXIT_TIMEOUT
        return EXIT_FAILED if self.failed else EXIT_OK

    def emit(self, event: MapEvent, text: str | None) -> None:
        record = event.to_dict()
        self.reporter.emit(record, text)
        self.on_record(record)

    def t(self) -> float:
        return round(time.monotonic() - self.started, 6)

    def counts(self) -> tuple[int, int, int]:
        return self.done, self.failed, len(self.futures)


# -- the command ------------------------------------------------------------------------


@click.command("map")
@click.argument("spec", metavar="MODULE:FUNC")
@click.option("--items", "items_path", default="-", show_default=True,
              help="JSON Lines file of items, one JSON value a line; - reads stdin.")
@click.option("--lines", "raw_lines", is_flag=True, help="Each input line is an item, as text (not JSON).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: the number of CPUs).")
@click.option("--cluster", "cluster_address", default=None, metavar="tcp://HOST:PORT|local:N",
              help="Run on every worker of this Dask cluster (needs procctl[dask]); local:N starts N local ones.")
@click.option("--workers-per-node", type=click.IntRange(min=1), default=None,
              help=f"With --cluster: worker processes on each Dask worker (default: {DEFAULT_WORKERS_PER_NODE}).")
@click.option("--lease", type=float, default=None,
              help="With --cluster: seconds a node keeps its workers once this process is gone (default 10).")
@click.option("--ordered", is_flag=True, help="Results in input order (default: as they complete).")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Retry an item whose worker crashed or timed out, on a fresh worker.")
@click.option("--task-timeout", type=float, default=None, help="Seconds an item may run (its worker is replaced).")
@click.option("--timeout", type=float, default=None, help="Stop everything after this many seconds (exit 124).")
@click.option("--grace", type=float, default=5.0, show_default=True,
              help="Seconds running items get to stop before their workers are killed.")
@click.option("--joblog", default=None, help="Record each item's outcome to FILE (JSON Lines), as it happens.")
@click.option("--resume", is_flag=True, help="Skip the items the --joblog FILE has as done.")
@click.option("--unfinished", default=None, help="At the end, write the items not done to FILE (as input).")
@click.option("--start-method", type=click.Choice(START_METHODS), default=None)
@click.option("--json", "json_lines", is_flag=True, help="Run events and the summary as JSON Lines on stdout too.")
@click.option("--quiet", is_flag=True,
              help="No story on stderr: only results and the summary (and where the metrics are).")
@click.option("--events", "events_path", default=None, help="Also write every event as JSON Lines to FILE.")
@click.option("--name", default=None, help="Name of the run for procctl status/pause/... (default: its pid).")
@click.option("--metrics-addr", default=None,
              help="Serve Prometheus metrics on HOST:PORT/metrics (default host: 127.0.0.1).")
def map_command(spec: str, items_path: str, raw_lines: bool, workers: int | None, ordered: bool, retries: int,
                task_timeout: float | None, timeout: float | None, grace: float, joblog: str | None, resume: bool,
                unfinished: str | None, start_method: str | None, json_lines: bool, quiet: bool,
                events_path: str | None, name: str | None = None, metrics_addr: str | None = None,
                cluster_address: str | None = None, workers_per_node: int | None = None,
                lease: float | None = None) -> int:
    """Call MODULE:FUNC on every item, in worker processes; results as JSON Lines on stdout."""
    from .cli import signal_bridge  # procctl.cli imports this module at its end
    from .cli_control import ControlPlan

    bridge = signal_bridge()
    control = ControlPlan.check(name, metrics_addr, job=f"map {spec}", announce=not (json_lines or quiet))
    plan = make_plan(spec, items_path, raw_lines, workers, ordered, retries, task_timeout, timeout, grace,
                     joblog, resume, unfinished, start_method, events_path, bridge, cluster_address,
                     workers_per_node, lease)
    executor: ClusterExecutor | None = None
    local_cluster: Any = None
    if plan.cluster is not None and not bridge.stop_requested():
        # Everything is checked: connect now, before the joblog is truncated or a line
        # is printed, so that an address that cannot be reached is one line and exit 2
        # (also when there is nothing to run: the address is input like any other).
        executor, local_cluster = connect_cluster(plan, plan.cluster, bridge)
    try:
        return _map(plan, bridge, control, executor, json_lines, quiet, events_path)
    finally:
        if executor is not None:
            executor.stop(0.0)  # the session has stopped it, unless something failed before it ran
        if local_cluster is not None:
            local_cluster.close()


class _ThroughResults:
    """The --json events' stream: stdout through the results' writer (one order,
    and one way out for a write that its reader does not take)."""

    def __init__(self, results: ResultWriter) -> None:
        self._results = results
        self.encoding = getattr(sys.stdout, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        self._results.write_text(text)
        return len(text)

    def flush(self) -> None:
        self._results.flush()

    def fileno(self) -> int:
        return sys.stdout.fileno()


def _map(plan: MapPlan, bridge: SignalBridge, control: ControlPlan, executor: ClusterExecutor | None, json_lines: bool,
         quiet: bool, events_path: str | None) -> int:
    joblog = plan.joblog
    if joblog and not plan.resume:
        open(joblog, "w").close()  # a fresh run starts a fresh log (GNU parallel does the same)
    view_stream = None
    if not json_lines and not quiet:
        view_stream = sys.stdout if sys.stdout.isatty() else sys.stderr if sys.stderr.isatty() else None
    results = ResultWriter(sys.stdout)
    events_out = cast(IO[str], _ThroughResults(results)) if json_lines else sys.stderr
    reporter = Reporter(json_lines=json_lines, quiet=quiet or view_stream is not None, stream=events_out,
                        events_path=events_path)
    try:
        session = MapSession(plan, reporter, results, executor)
        served = control.serve(lambda: _MapControl(session, bridge), session.request_stop, reporter)
        session.on_record = served.record
        try:
            if view_stream is None:
                session.run(bridge)
            else:
                _run_live(session, view_stream, bridge, served.footer)
            return session.report()
        finally:
            session.end_alarm()
            served.close()
    finally:
        reporter.close()


class _MapControl:
    """A map run as the control server sees a controller (control.py's RunHooks)."""

    def __init__(self, session: MapSession, bridge: SignalBridge) -> None:
        self.session = session
        self.bridge = bridge

    @property
    def workers(self) -> int:
        return self.session.workers

    @property
    def state(self) -> State:
        if self.session.stop_asked or self.bridge.stop_requested():
            return State.STOPPED
        return State.PAUSED if self.session.paused else State.RUNNING

    def status(self) -> list[WorkerStatus]:
        executor = self.session.executor
        return executor.status() if executor is not None else []

    def pause(self, timeout: float | None = None) -> None:
        self._command(signal.SIGUSR1, timeout)

    def run(self, timeout: float | None = None) -> None:
        self._command(signal.SIGUSR2, timeout)

    def _command(self, sig: int, timeout: float | None) -> None:
        """Have the loop pause or resume, as for kill -USR1/-USR2 (with its events and notes),
        and wait up to `timeout` until it has: a `procctl status` right after sees it done."""
        session = self.session
        paused = sig == signal.SIGUSR1
        self.bridge.pending.append(sig)
        session.wake()
        # The loop waits up to ACK_WAIT for the workers' acknowledgements, then
        # takes the state all the same: wait for that, and a moment more.
        bound = None if timeout is None else timeout + ACK_WAIT + LOOP_SLACK
        with session.state_changed:
            done = session.state_changed.wait_for(
                lambda: session.paused == paused or session.finished.is_set() or self.state is State.STOPPED,
                bound)
        if not done:
            raise TimeoutError(f"the run did not {'pause' if paused else 'resume'} within {bound:g}s;"
                               " it will when its loop comes round")
        if session.late is not None:
            raise TimeoutError(session.late)  # (the reply says it was not acknowledged, and why)


def _run_live(session: MapSession, stream: IO[str], bridge: SignalBridge, footer: str) -> MapSession:
    from .live import KeyReader, MapLiveView, terminal_console

    plan = session.plan
    where = f" on {session.nodes} nodes" if session.nodes is not None else ""
    view = MapLiveView(f"procctl map {plan.spec}: {count(session.workers, 'worker')}{where}", len(plan.to_run),
                       session.counts, console=terminal_console(stream), footer=footer)
    if stream is sys.stdout:
        session.results.printer = view.print  # results print above the view

    def note(state: str) -> None:
        view.note = state

    session.on_state = note
    with KeyReader(lambda key: _on_key(session, bridge, view, key)) as keys:  # (the items are in by now)
        view.keys = keys.active
        with view:
            session.run(bridge)
    return session


def _on_key(session: MapSession, bridge: SignalBridge, view: Any, key: str) -> None:
    """A key of the live view (from the key reader's thread): as `procctl pause/resume/stop`."""
    if key in "pr":
        # The loop pauses and resumes as for kill -USR1/-USR2, with its events and notes.
        bridge.pending.append(signal.SIGUSR1 if key == "p" else signal.SIGUSR2)
        session.wake()
        view.message = "pausing every worker" if key == "p" else "resuming every worker"
    elif key == "s":
        session.request_stop(by="the s key")
        view.message = "stopping gracefully"
    elif key == "q":
        # A task that checkpoints stops cleanly at once; the rest are killed after QUIT_GRACE.
        session.request_stop(by="the q key")
        view.message = "stopping now"
        if not session.finished.wait(QUIT_GRACE):
            session.hurry()
