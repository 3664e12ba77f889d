"""The command line: parse, call the library, map outcomes to exit codes."""

from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import click

from . import __version__, threads
from .cli_control import COMMANDS as CONTROL_COMMANDS
from .cli_control import ControlPlan, ServedControl
from .clitools import (
    DEFAULT_WORKERS_PER_NODE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    QUIT_GRACE,
    BadInput,
    Reporter,
    SignalBridge,
    alarm_after,
    check_distinct_files,
    check_writable_file,
    count,
    ensure_std_fds,
    error_text,
    exit_holding_signals,
    hold_signals,
    printable,
    say,
    split_range,
    working_dir,
)
from .control import ACK_WAIT
from .controller import ProcessController, WorkerStartError
from .limits import COMMAND_FDS, LIMIT_ERRNOS, SystemLimit, capacity_problem
from .named_target import NamedTarget, remember
from .states import CLEAN_OUTCOMES, Event, Outcome, State, WorkerReport, error_line
from .supervise import Plan, Restart, Strategy
from .workwire import MIN_LEASE

if TYPE_CHECKING:
    from .capture import OutputCapture

STEPS = {"run": State.RUNNING, "pause": State.PAUSED, "stop": State.STOPPED}
START_METHODS = ("fork", "spawn", "forkserver")
TICK = 0.25  # live view refresh


#: The subcommands defined in modules `run` does not need, imported only when
#: one is named (or listed, for --help and completion): `procctl run` and a
#: bad input start without importing the executor, the map or the sum job.
_ELSEWHERE = {
    "map": ("procctl.cli_map", "map_command"),
    "sum": ("procctl.cli_sum", "sum_command"),
    "timeline": ("procctl.cli_timeline", "timeline_command"),
}


class _Commands(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_ELSEWHERE))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in _ELSEWHERE:
            module, attribute = _ELSEWHERE[name]
            command = getattr(importlib.import_module(module), attribute)
            assert isinstance(command, click.Command) and command.name == name
            self.add_command(command)
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="procctl")
def main_group() -> None:
    """Run N worker processes you can pause, resume and stop, leaving nothing behind."""


for _command in CONTROL_COMMANDS:  # cli_control is imported for `run`'s control socket anyway
    main_group.add_command(_command)


def _say_library_warnings() -> None:
    """The library's warnings (a worker that ignored SIGTERM...) as the
    command's other lines: one line each, `procctl: ...`, on stderr."""
    log = logging.getLogger("procctl")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("procctl: %(message)s"))
        handler.setLevel(logging.WARNING)
        log.addHandler(handler)


#: What a write to the output fails with when the output is at fault.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.ENXIO})


def _output_error(exc: OSError) -> bool:
    """Whether an OSError that escaped a command is its output's (the error of
    anything else must not read "cannot write the output")."""
    if exc.errno in OUTPUT_ERRNOS:
        return True
    if exc.errno == errno.EBADF:  # a standard output closed under us, or a descriptor of ours?
        try:
            os.fstat(1)
        except OSError:
            return True
    return False


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: every bad input is one line on stderr and exit 2.

    SIGINT and SIGTERM are the operator's at every moment: held from the
    first line (see __main__), recorded from here on, and a command they
    reach ends with 130 or 143 after a clean stop.
    """
    hold_signals()
    ensure_std_fds()
    _say_library_warnings()
    try:
        bridge = SignalBridge().install()
    except SystemLimit as exc:  # its thread, the first: no room for any
        say(f"procctl: error: {exc}")
        exit_holding_signals(EXIT_USAGE)
    try:
        code = main_group.main(args=argv, prog_name="procctl", standalone_mode=False, obj=bridge)
    except click.UsageError as exc:
        where = f"procctl {exc.ctx.info_name}" if exc.ctx and exc.ctx.parent else "procctl"
        say(f"{where}: error: {exc.format_message()}")
        code = EXIT_USAGE
    except BadInput as exc:
        say(f"procctl: error: {exc}")
        code = EXIT_USAGE
    except click.ClickException as exc:  # a live run refused a control command, or went away
        say(f"procctl: error: {exc.format_message()}")
        code = EXIT_FAILED
    except click.Abort:
        code = bridge.exit_code or 130
    except SystemLimit as exc:  # a thread the system refused (ulimit -u, -v): a limit, as for workers
        say(f"procctl: error: {exc}")
        code = EXIT_USAGE
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise  # (a reader that went away: handled where the output is written)
        where = f": {exc.filename}" if exc.filename else ""
        if _output_error(exc):  # a full disk, /dev/full: one line, as GNU tools say it
            say(f"procctl: error: cannot write the output{where}: {exc.strerror or exc}")
        else:  # not the output's: say what failed, not that the output did
            say(f"procctl: error{where}: {exc.strerror or exc}")
        code = EXIT_FAILED
    if bridge.exit_code is not None and code != EXIT_USAGE:
        code = bridge.exit_code  # a signal that came after the job ended still ends the command
    exit_holding_signals(code or 0)


def signal_bridge() -> SignalBridge:
    """The bridge main() installed (a command invoked some other way installs its own)."""
    ctx = click.get_current_context(silent=True)
    bridge = ctx.find_object(SignalBridge) if ctx is not None else None
    return bridge if bridge is not None else SignalBridge().install()


# -- input checks -------------------------------------------------------------


def non_negative(name: str, value: float | None) -> None:
    if value is not None and not value >= 0:  # also rejects NaN
        raise BadInput(f"{name} must be a non-negative number of seconds, not {value}")


#: A node's lease when --lease is not given (ClusterController's and ClusterExecutor's default).
DEFAULT_LEASE = 10.0


def check_lease(lease: float | None, cluster: bool) -> float:
    """--lease, checked: the seconds a node keeps its workers once this process is gone."""
    if lease is None:
        return DEFAULT_LEASE
    if not cluster:
        raise BadInput("--lease works with --cluster (how long a node outlives a lost client)")
    if not 0 < lease < math.inf:  # also rejects NaN
        raise BadInput(f"--lease must be a finite number of seconds > 0, not {lease}")
    if lease < MIN_LEASE:
        raise BadInput(f"--lease must be at least {MIN_LEASE:g} seconds (a node beats every lease/4), not {lease}")
    return lease


def parse_schedule(text: str) -> list[str]:
    steps = [s.strip().lower() for s in text.split(",")]
    if not steps or any(not s for s in steps):
        raise BadInput(f"--schedule {text!r} has an empty step; use a comma list of run, pause, stop")
    for step in steps:
        if step not in STEPS:
            raise BadInput(f"unknown schedule step {step!r} in --schedule {text!r}; steps are run, pause, stop")
    if "stop" in steps[:-1]:
        raise BadInput(f"--schedule {text!r}: stop is final, nothing may follow it")
    return steps


class _ImportStopped(BaseException):
    """Raised into the import of a target's module by a stop signal or --timeout
    (a BaseException: the module's own `except Exception` does not take it)."""


def never_started(arg: Any) -> None:
    """What load_target() gives when a stop or the timeout came while the target's
    module was importing: the command starts no worker, so it is never called."""
    raise RuntimeError("never_started is not a target: the command was stopped before its workers started")


def load_target(spec: str, option: str = "--target", takes: str = "its WorkerContext",
                timeout: float | None = None) -> Callable[..., Any]:
    """Resolve 'package.module:function', looking in the current directory too;
    the function must take one argument (`takes`: what it is given).

    The module runs its own code as it loads, which may block (a sleep, a
    network call): a SIGINT, SIGTERM or SIGHUP, or `timeout` seconds, end the
    import, and `never_started` comes back (the command then starts nothing,
    and ends as a stop or a timeout before the start does)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BadInput(f"{option} {spec!r} must look like package.module:function")
    cwd = working_dir()
    if cwd is not None and cwd not in sys.path:
        sys.path.insert(0, cwd)
    bridge = signal_bridge()
    raised: list[bool] = []  # once: a second signal must not land in the unwinding of the first

    def stop_import() -> None:  # (in the signal handler: the import is where it lands)
        if bridge.stop_requested() and not raised:
            raised.append(True)
            raise _ImportStopped

    def time_out() -> None:
        if not raised:
            raised.append(True)
            raise _ImportStopped

    try:
        with bridge.attach(wake=stop_import, hurry=lambda: None), alarm_after(timeout, time_out):
            if bridge.stop_requested():
                return never_started
            # What the module prints as it loads is not the command's output (JSON Lines, map's results).
            with contextlib.redirect_stdout(sys.stderr):
                module = importlib.import_module(module_name)
    except _ImportStopped:
        why = bridge.signal_name or f"--timeout {timeout:g}s"
        say(f"procctl: {why} while {module_name!r} was importing: no worker started")
        return never_started
    except ImportError as exc:
        raise BadInput(f"{option} {spec!r}: cannot import module {module_name!r}: {exc}") from None
    except SystemExit as exc:
        raise BadInput(f"{option} {spec!r}: importing {module_name!r} called sys.exit({exc.code!r})") from None
    except KeyboardInterrupt:
        # Not the operator's Ctrl-C: main()'s handler records that one.
        raise BadInput(f"{option} {spec!r}: importing {module_name!r} raised KeyboardInterrupt") from None
    except BaseException as exc:  # noqa: BLE001 - any error in the user's module is bad input
        raise BadInput(f"{option} {spec!r}: importing {module_name!r} raised {exc!r}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInput(f"{option} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadInput(f"{option} {spec!r}: {attr!r} is not callable")
    try:
        inspect.signature(obj).bind(None)
    except TypeError:
        raise BadInput(f"{option} {spec!r} must take one argument ({takes})") from None
    except ValueError:
        pass  # no signature to read (some builtins): let the call tell
    return obj  # type: ignore[no-any-return]


# -- procctl run --------------------------------------------------------------


def event_text(event: Event) -> str | None:
    """The human line for one controller event (None: not shown)."""
    if event.worker is None:
        return None
    text = f"worker {event.worker}: {event.event}"
    if event.event == "restarting":
        return f"{text} (restart {event.restarts}, in {event.delay or 0:.2f}s)"
    if event.event == "gave_up":
        text = f"worker {event.worker}: gave up: the restart limit was reached"
    line = error_line(event.error) if event.event in ("failed", "crashed", "killed", "hung", "gave_up") else None
    if line:
        text += f": {printable(line)}"
    return text


def parse_backoff(text: str) -> tuple[float, float]:
    """--backoff MIN,MAX (or MIN-MAX): seconds before the first restart, and the most."""
    parts = text.split(",") if "," in text else split_range(text)
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise BadInput(f"--backoff {text!r} must look like MIN,MAX (seconds), e.g. 0.1,10") from None
    return low, high


def check_supervision(restart: str, max_restarts: int, restart_window: float, backoff: str,
                      strategy: str, heartbeat: float | None) -> Plan:
    """The supervision options, checked before anything starts (bad input: exit 2)."""
    try:
        return Plan.check(restart, max_restarts, restart_window, parse_backoff(backoff), strategy, heartbeat)
    except (TypeError, ValueError) as exc:
        name, _, rest = str(exc).partition(" ")
        flag = "--" + name.split("[")[0].replace("_", "-")
        raise BadInput(f"{flag}: {exc}" if "[" in name else f"{flag} {rest}") from None


class RunSession:
    """Drives one controller through a schedule, acting on signals and the deadline."""

    def __init__(self, pc: ProcessController, bridge: SignalBridge, deadline: float | None,
                 tick: Callable[[], None] | None = None, max_workers: int | None = None) -> None:
        self.pc = pc
        self.bridge = bridge
        self.deadline = deadline
        self.timed_out = False
        self.max_workers = max_workers  # no resize goes beyond this
        self.stop_asked = False  # by `procctl stop` or a key of the live view
        self.stop_grace: float | None = None
        self.stopped = threading.Event()  # set once the stop has reaped every worker
        self.tick = tick  # called between waits
        self.view: Any = None  # the live view, for the keys' notes
        self._resizing = threading.RLock()
        # A broadcast that waits for acknowledgements gives way to a stop.
        pc._interrupt_waits = lambda: self.stop_asked or bridge.stop_requested()

    def out_of_time(self) -> bool:
        """True (and timed out) if --timeout has already passed."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.timed_out = True
        return self.timed_out

    def request_stop(self, grace: float | None = None) -> None:
        """Stop gracefully, as the first SIGINT would (from any thread); `grace`
        overrides the run's grace period (0: terminate at once)."""
        self.stop_grace = grace
        self.stop_asked = True
        self.pc.wakeup()

    def run(self, steps: list[str], step_seconds: float) -> None:
        for step in steps:
            if self.wait(step_seconds) != "elapsed":
                return
            if step == "stop":
                return
            self.broadcast(STEPS[step])
        self.wait(math.inf)  # no final stop: the workers end by themselves

    def wait(self, seconds: float) -> str:
        """Wait `seconds`; 'elapsed', or 'ended' (all workers), 'stop' (signal), 'timeout'."""
        until = time.monotonic() + seconds
        while True:
            if self.bridge.stop_requested() or self.stop_asked:
                return "stop"
            taken = self.bridge.take()
            for sig in taken:
                if sig in (signal.SIGTTIN, signal.SIGTTOU):
                    note = self.resize(+1 if sig == signal.SIGTTIN else -1)
                    say(f"procctl: {signal.Signals(sig).name}: {note}")
                else:
                    self.broadcast(State.PAUSED if sig == signal.SIGUSR1 else State.RUNNING)
            if taken:
                # A signal handled during those broadcasts had its wakeup read by
                # their waits: look again before waiting, or it waits for the next event.
                continue
            now = time.monotonic()
            limit = until if self.deadline is None else min(until, self.deadline)
            if self.deadline is not None and now >= self.deadline:
                self.timed_out = True
                return "timeout"
            if now >= limit:
                return "elapsed"
            wait = None if limit == math.inf else limit - now
            if self.tick is not None:
                self.tick()
                wait = TICK if wait is None else min(wait, TICK)
            if self.pc.wait(wait):
                return "ended"

    def broadcast(self, state: State) -> None:
        """Send `state` and wait up to ACK_WAIT for the acknowledgements, but
        not past --timeout, and not once a stop was asked (the wait ends at once)."""
        wait = ACK_WAIT
        if self.deadline is not None:
            wait = max(0.0, min(wait, self.deadline - time.monotonic()))
        try:
            self.pc.broadcast(state, timeout=wait)
        except TimeoutError as exc:
            if self.deadline is None or time.monotonic() < self.deadline:  # else --timeout ends the run
                say(f"procctl: {exc}; going on")
        except RuntimeError:
            pass  # the controller gave up and stopped everything: the loop ends

    def scale(self, n: int) -> None:
        """Resize to `n` workers, from 1 up to --max-workers: every way of resizing
        a run (SIGTTIN/SIGTTOU, the +/- keys, `procctl scale`) comes here, from
        any thread. ValueError or RuntimeError, with a message for the user, when
        it is refused or fails; the run goes on either way."""
        with self._resizing:  # a key, a signal and `procctl scale` at once: one after the other
            if not hasattr(self.pc, "resize"):
                raise ValueError("this run cannot resize")
            if self.stop_asked or self.bridge.stop_requested():
                raise RuntimeError("the run is stopping")
            if n < 1:
                raise ValueError(f"cannot resize to {n} workers: a run keeps at least 1")
            if self.max_workers is not None and n > self.max_workers:
                raise ValueError(f"cannot resize to {n} workers: more than --max-workers {self.max_workers}")
            self.pc.resize(n)

    def resize(self, step: int) -> str:
        """One worker more (+1) or fewer (-1) than the run's current size
        (SIGTTIN/SIGTTOU, the +/- keys); a line saying what happened."""
        with self._resizing:
            n = self.pc.workers + step  # the size, not the live count: finished workers keep their ids
            try:
                self.scale(n)
            except (ValueError, RuntimeError, OSError) as exc:  # WorkerStartError is a RuntimeError
                return str(exc)
            n = self.pc.workers
            return f"resized to {count(n, 'worker')}"


def summarize(reports: dict[int, WorkerReport], elapsed: float,
              restarts: int = 0, gave_up: bool = False) -> tuple[dict[str, Any], str]:
    """The summary record and text. `reports` has each worker id's last
    incarnation, those a shrink removed included: `workers` counts the ids
    the run had, so that the outcomes add up to it."""
    workers = len(reports)
    counts = Counter(r.outcome.value for r in reports.values())
    outcomes = {o.value: counts[o.value] for o in Outcome if counts[o.value]}
    record: dict[str, Any] = {"event": "summary", "workers": workers, "outcomes": outcomes,
                              "elapsed": round(elapsed, 3)}
    parts = ", ".join(f"{n} {name}" for name, n in outcomes.items()) or "none started"
    if restarts:
        record["restarts"] = restarts
        parts += f", {restarts} restart{'s' if restarts != 1 else ''}"
    if gave_up:
        record["gave_up"] = True
    lines = [f"summary: {count(workers, 'worker')}, {parts} in {elapsed:.2f}s"]
    errors = {}
    for r in reports.values():
        if r.outcome not in CLEAN_OUTCOMES:
            errors[str(r.worker_id)] = r.error_line or r.outcome.value
            lines.append(f"worker {r.worker_id} {r.outcome.value}: {printable(r.error_line or r.outcome.value)}")
            if r.outcome is Outcome.FAILED and r.error:
                lines.extend("    " + printable(line) for line in r.error.rstrip().splitlines())
    if errors:
        record["errors"] = errors
    return record, "\n".join(lines)


def exit_status(reports: dict[int, WorkerReport], bridge: SignalBridge, timed_out: bool,
                gave_up: bool = False) -> int:
    if bridge.exit_code is not None:
        return bridge.exit_code
    if gave_up:
        return EXIT_FAILED
    if timed_out:
        return EXIT_TIMEOUT
    if any(r.outcome not in CLEAN_OUTCOMES for r in reports.values()):
        return EXIT_FAILED
    return EXIT_OK


@main_group.command("run")
@click.option("--workers", type=click.IntRange(min=1), default=10, show_default=True, help="Worker processes.")
@click.option("--target", default=None, help="package.module:function to run as function(ctx).")
@click.option("--schedule", default="run,pause,run,stop", show_default=True, help="Comma list of run, pause, stop.")
@click.option("--step", type=float, default=1.0, show_default=True, help="Seconds before each step.")
@click.option("--finish-chance", type=float, default=0.3, show_default=True,
              help="Demo job: chance a worker finishes each time it goes running.")
@click.option("--grace", type=float, default=5.0, show_default=True, help="Seconds to stop before SIGTERM.")
@click.option("--timeout", type=float, default=None, help="Stop everything after this many seconds (exit 124).")
@click.option("--start-method", type=click.Choice(START_METHODS), default=None)
@click.option("--seed", type=int, default=None, help="Seed for the demo job's choices.")
@click.option("--json", "json_lines", is_flag=True, help="JSON Lines events on stdout.")
@click.option("--quiet", is_flag=True,
              help="Print only the summary (and, with --metrics-addr, where the metrics are).")
@click.option("--events", "events_path", default=None, help="Also write every event as JSON Lines to FILE.")
@click.option("--timeline", "timeline_path", default=None, help="Draw the run as a Gantt chart (.svg or .html).")
@click.option("--cluster", "cluster_address", default=None, metavar="tcp://HOST:PORT|local:N",
              help="Run on every worker of this Dask cluster (needs procctl[dask]); local:N starts N local ones.")
@click.option("--workers-per-node", type=click.IntRange(min=1), default=None,
              help="With --cluster: worker processes on each Dask worker (default 4; --workers is then not used).")
@click.option("--lease", type=float, default=None,
              help=f"With --cluster: seconds a node keeps its workers once this process is gone"
                   f" (default {DEFAULT_LEASE:g}).")
@click.option("--restart", type=click.Choice([r.value for r in Restart]), default="never", show_default=True,
              help="Restart workers that end: never, on-failure (failed, crashed, killed, hung), always.")
@click.option("--max-restarts", type=int, default=5, show_default=True,
              help="Give up (exit 1) after more than this many restarts within --restart-window.")
@click.option("--restart-window", type=float, default=60.0, show_default=True, help="Seconds, for --max-restarts.")
@click.option("--backoff", default="0.1,10", show_default=True,
              help="MIN,MAX seconds before a restart, doubling from MIN for a worker that keeps failing.")
@click.option("--strategy", type=click.Choice([s.value for s in Strategy]), default="one_for_one",
              show_default=True, help="one_for_all: a failure restarts every worker.")
@click.option("--heartbeat", type=float, default=None,
              help="A running worker that passes no checkpoint for this many seconds is hung: killed.")
@click.option("--max-workers", type=int, default=None,
              help="SIGTTIN adds a worker, SIGTTOU removes one: at most this many (default: the system's limits).")
@click.option("--trace", "trace_path", default=None, help="Write the run as a Chrome trace (FILE.json, for Perfetto).")
@click.option("--name", default=None, help="Name of the run for procctl status/pause/... (default: its pid).")
@click.option("--metrics-addr", default=None,
              help="Serve Prometheus metrics on HOST:PORT/metrics (default host: 127.0.0.1).")
@click.option("--log-dir", default=None,
              help="Also write each worker's output to DIR/worker-ID-PID.log (DIR is created if need be).")
def run_command(workers: int, target: str | None, schedule: str, step: float, finish_chance: float,
                grace: float, timeout: float | None, start_method: str | None, seed: int | None,
                json_lines: bool, quiet: bool, events_path: str | None, timeline_path: str | None,
                cluster_address: str | None = None, workers_per_node: int | None = None, restart: str = "never",
                max_restarts: int = 5, restart_window: float = 60.0, backoff: str = "0.1,10",
                strategy: str = "one_for_one", heartbeat: float | None = None,
                max_workers: int | None = None, trace_path: str | None = None,
                name: str | None = None, metrics_addr: str | None = None, log_dir: str | None = None,
                lease: float | None = None) -> int:
    """Run workers under a controller through a schedule of states."""
    bridge = signal_bridge()
    steps = parse_schedule(schedule)
    non_negative("--step", step)
    non_negative("--grace", grace)
    non_negative("--timeout", timeout)
    if not 0.0 <= finish_chance <= 1.0:
        raise BadInput(f"--finish-chance must be between 0 and 1, not {finish_chance}")
    cluster_spec = parse_cluster(cluster_address) if cluster_address is not None else None
    node_lease = check_lease(lease, cluster_spec is not None)
    if cluster_spec is None:
        if workers_per_node is not None:
            raise BadInput("--workers-per-node works with --cluster; on one machine use --workers")
        too_many = capacity_problem(workers, reserve=COMMAND_FDS)
        if too_many is not None:
            raise BadInput(f"--workers {workers}: {too_many}")
    else:
        workers_per_node = DEFAULT_WORKERS_PER_NODE if workers_per_node is None else workers_per_node
        too_many = capacity_problem(workers_per_node)
        if too_many is not None:
            raise BadInput(f"--workers-per-node {workers_per_node}: {too_many}")
    plan = check_supervision(restart, max_restarts, restart_window, backoff, strategy, heartbeat)
    if cluster_spec is not None and (plan.restarts or plan.heartbeat is not None or max_workers is not None):
        raise BadInput("--restart, --heartbeat and --max-workers work on one machine, not with --cluster")
    if cluster_spec is not None:
        restart_options = (("--max-restarts", "max_restarts"), ("--restart-window", "restart_window"),
                           ("--backoff", "backoff"), ("--strategy", "strategy"))
        given = [option for option, param in restart_options if _given(param)]
        if given:  # (else accepted and without effect: a node's workers are never restarted)
            raise BadInput(f"{given[0]} goes with --restart, which works on one machine, not with --cluster")
    if max_workers is not None:
        if max_workers < workers:
            raise BadInput(f"--max-workers {max_workers} is less than --workers {workers}")
        # A cap, not a size: one past what the system lets us start is taken (a generous
        # "no practical cap"), and a resize past the system's limits is refused as it comes.
    check_output_paths(events_path, timeline_path, trace_path, log_dir)
    control = ControlPlan.check(name, metrics_addr, job=f"run {target or 'demo'}", announce=not (json_lines or quiet))
    # (Dask's import: after every check above.)
    cluster_mod: Any = None if cluster_spec is None else load_cluster(cluster_spec[0])
    if log_dir is not None:
        try:
            os.makedirs(log_dir, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"--log-dir {log_dir!r} cannot be created: {exc.strerror or exc}") from None
        if not (os.path.isdir(log_dir) and os.access(log_dir, os.W_OK | os.X_OK)):
            raise BadInput(f"--log-dir {log_dir!r} is not a writable directory")
    args: tuple[Any, ...] = ()
    if target is not None:
        importing = time.monotonic()
        func = load_target(target, timeout=timeout)
        if timeout is not None:  # (its import counts: --timeout bounds the whole command)
            timeout = max(0.0, timeout - (time.monotonic() - importing))
        if func is not never_started and cluster_spec is None:  # the workers resolve the name (named_target.py)
            remember(target, func)
            func = NamedTarget(target, working_dir())
    else:
        from .jobs.demo import demo_worker

        func, args = demo_worker, (finish_chance, seed)
    live = sys.stdout.isatty() and not json_lines and not quiet
    reporter = Reporter(json_lines=json_lines, quiet=quiet or live, events_path=events_path, background=True)
    reporter.watch(bridge)
    local_cluster: Any = None
    # Output capture is local: workers on a cluster's nodes keep their own streams.
    capture = None if cluster_spec is not None else _capture(
        workers, log_dir, line_buffered=live or sys.stdout.isatty() or log_dir is not None)
    if capture is not None:
        from .capture_worker import run_captured

        func, args = run_captured, (capture.spec, func, *args)
    try:
        if cluster_spec is None:
            def make(on_event: Callable[[Event], None]) -> Any:
                pc = ProcessController(func, workers, args=args, start_method=start_method, grace=grace,
                                       on_event=on_event, restart=plan.restart.value,
                                       max_restarts=plan.max_restarts, restart_window=plan.restart_window,
                                       backoff=plan.backoff, strategy=plan.strategy.value,
                                       heartbeat=plan.heartbeat)
                pc._background = False  # the command's own loop pumps it, and draws the view in its thread
                return pc
        else:
            address, local_nodes = cluster_spec
            if local_nodes:
                local_cluster = cluster_mod.session.local_cluster(local_nodes)
                address = local_cluster.scheduler_address

            def make(on_event: Callable[[Event], None]) -> Any:
                return cluster_mod.ClusterController(
                    func, workers_per_node, address=address, args=args, grace=grace, on_event=on_event,
                    lease=node_lease,
                    start_method=start_method or "fork", connect_timeout=CLUSTER_CONNECT_TIMEOUT)

        code = _run(make, workers, steps, step, timeout, reporter, live, timeline_path, bridge, control,
                    trace_path, capture, max_workers, plan.heartbeat)
    finally:
        if capture is not None:
            capture.close()
        reporter.close()
        if local_cluster is not None:
            local_cluster.close()
    return code


#: How long `run --cluster` waits for the scheduler before it gives up (exit 2).
CLUSTER_CONNECT_TIMEOUT = 5.0


def parse_cluster(text: str) -> tuple[str | None, int]:
    """(scheduler address, local nodes) from --cluster, by its form alone; BadInput if wrong.

    Dask is not imported here (load_cluster): a command that another option
    refuses says so without the second its import takes."""
    text = text.strip()
    if text.startswith("local:"):
        count = text[len("local:"):]
        if not count.isdigit() or not 1 <= int(count) <= 256:
            raise BadInput(f"--cluster {text!r}: local:N needs a number of worker processes from 1 to 256")
        return None, int(count)
    rest = text.split("://", 1)[1] if "://" in text else text
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"--cluster {text!r} is not a scheduler address: use tcp://HOST:PORT or local:N")
    return text, 0


def load_cluster(address: str | None) -> Any:
    """procctl.cluster, imported (with Dask), once the scheduler address parse_cluster
    gave (None for local:N) has a scheme Dask knows; BadInput if not."""
    try:
        import procctl.cluster as cluster_mod
        import procctl.cluster.session  # noqa: F401 - local_cluster
    except ImportError as exc:
        raise BadInput(f"--cluster: {exc}") from None
    if address is not None:
        try:
            cluster_mod.session.check_address(address)  # a scheme Dask does not know (http://)
        except ValueError as exc:
            raise BadInput(f"--cluster {address!r}: {exc}") from None
    return cluster_mod


def _capture(workers: int, log_dir: str | None, *, line_buffered: bool) -> OutputCapture | None:
    """The capture of the workers' output, when the system lets the manager hold one more fd per worker.

    Line-buffered as the workers' streams would be on the terminal, and for
    --log-dir, so that a crash loses no printed line; else buffered as Python
    buffers a pipe, so that a chatty worker runs as fast as without capture.
    """
    from .capture import OutputCapture
    from .control import ControlError
    from .limits import MANAGER_FDS_PER_WORKER

    if capacity_problem(workers + workers // MANAGER_FDS_PER_WORKER + 1) is not None:
        if log_dir is not None:
            say("procctl: warning: too few file descriptors to capture the workers' output; --log-dir stays empty")
        return None
    try:
        return OutputCapture(lambda lines: None, log_dir, line_buffered=line_buffered)
    except (ControlError, OSError) as exc:
        say(f"procctl: warning: the workers' output is not captured ({exc})")
        return None


def check_output_paths(events_path: str | None, timeline_path: str | None, trace_path: str | None = None,
                       log_dir: str | None = None) -> None:
    if log_dir == "-":
        raise BadInput("--log-dir needs a directory name; '-' is not stdout here (./- is a directory named '-')")
    check_distinct_files({"--events": events_path, "--timeline": timeline_path, "--trace": trace_path,
                          "--log-dir": log_dir})
    if trace_path is not None:
        check_writable_file(trace_path, "--trace")
    if events_path is not None:
        check_writable_file(events_path, "--events")
    if timeline_path is not None:
        from .timeline import timeline_format

        try:
            timeline_format(timeline_path)
        except ValueError as exc:
            raise BadInput(f"--timeline: {exc}") from None
        check_writable_file(timeline_path, "--timeline")


def _run(make: Callable[[Callable[[Event], None]], Any], workers: int, steps: list[str],
         step: float, timeout: float | None, reporter: Reporter, live: bool, timeline_path: str | None,
         bridge: SignalBridge, control: ControlPlan | None = None, trace_path: str | None = None,
         capture: OutputCapture | None = None, max_workers: int | None = None,
         heartbeat: float | None = None) -> int:
    history: list[Event] = []
    view = None
    keys: Any = None
    served: ServedControl | None = None

    def on_event(event: Event) -> None:
        history.append(event)
        # Broadcasts go to the event log only, so that a timeline drawn from it is whole.
        reporter.emit(event.to_dict(), None if event.event == "broadcast" else event_text(event),
                      to_json=event.event != "broadcast")
        if view is not None:
            view.on_event(event)
        if served is not None:
            served.record(event)

    pc = make(on_event)
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    session = RunSession(pc, bridge, deadline, max_workers=max_workers)
    ready = False
    on_cluster = hasattr(pc, "cancel_open")
    if control is not None:
        # (On a cluster, said once it answered: a bad address is one line on stderr, nothing else.)
        served = control.serve(lambda: pc if ready else None, session.request_stop, reporter,
                               scale=session.scale if hasattr(pc, "resize") else None, announce=not on_cluster)
    if live:
        from .live import KeyReader, LiveView

        keys = KeyReader(partial(_on_key, session))
        view = LiveView(lambda: pc.status(), lambda: f"procctl run: {count(pc.workers, 'worker')}",
                        footer=served.footer if served is not None else "",
                        keys=keys.active or os.isatty(0), heartbeat=heartbeat)
        session.view = view
    if capture is not None:
        capture.sink = view.output if view is not None else reporter.passthrough
        capture.start()
    try:
        def wake() -> None:
            if bridge.stop_requested() and not ready and on_cluster:
                pc.cancel_open()  # a cluster's connect and start give up at once
            pc.wakeup()

        with bridge.attach(wake=wake, hurry=pc.kill, nudge=pc.wakeup):
            if session.out_of_time():  # (its target's import took all of --timeout): start none
                failed = None
            else:
                failed = _start(pc, bridge)
            if failed is not None:
                return failed
            ready = True
            if served is not None and on_cluster:
                served.announce(reporter)
            with keys if keys is not None else contextlib.nullcontext():
                reports = _drive(pc, session, view, steps, step)
            if capture is not None:
                capture.close()  # every worker has ended: their last lines come before the summary
        elapsed = time.monotonic() - started
        restarts = sum(r.restarts for r in reports.values())
        gave_up = bool(getattr(pc, "gave_up", False))  # (a cluster controller does not restart)
        record, text = summarize(reports, elapsed, restarts, gave_up)
        reporter.summary(record, text)
        reporter.drain()  # the output's lines before what is said on stderr next
        if served is not None:
            served.record(record)
    finally:
        if served is not None:
            served.close()
    if gave_up:
        plan = pc.supervision
        say(f"procctl: the restart limit was reached (more than {plan.max_restarts} restarts"
            f" in {plan.restart_window:g}s): stopped every worker")
    had = record["workers"]  # as the summary in the event log says, for `procctl timeline LOG`
    written = True
    log_records = [e.to_dict() for e in history] + [record] if timeline_path or trace_path else []
    title = f"procctl run: {count(had, 'worker')}"
    if timeline_path:
        from .timeline import render_timeline

        written &= _write_file("--timeline", timeline_path, "the timeline",
                               lambda: render_timeline(log_records, timeline_path, workers=had, title=title))
    if trace_path:
        from .trace import write_trace

        written &= _write_file("--trace", trace_path, "the Chrome trace",
                               lambda: write_trace(log_records, trace_path, title=title))
    status = exit_status(reports, bridge, session.timed_out, gave_up)
    return EXIT_FAILED if status == EXIT_OK and not written else status


def _write_file(option: str, path: str, what: str, write: Callable[[], Any]) -> bool:
    """Write one of the run's files after it (a full disk: one line naming it; the command exits 1)."""
    try:
        write()
    except OSError as exc:
        say(f"procctl: error: {option} {path!r} cannot be written ({exc.strerror or exc})")
        return False
    say(f"procctl: wrote {what} to {path}")
    return True


def _drive(pc: ProcessController, session: RunSession, view: Any, steps: list[str],
           step: float) -> dict[int, WorkerReport]:
    """Run the schedule under the live view (if any); stop and reap everything."""
    try:
        if view is not None:
            view.__enter__()
        if not session.bridge.stop_requested() and not session.timed_out:  # a signal during the start stops at once
            session.run(steps, step)
    finally:
        grace = session.stop_grace
        if view is not None:
            view.stopping(float(getattr(pc, "grace", 5.0)) if grace is None else grace)
        reports = pc.stop() if grace is None else pc.stop(grace)
        session.stopped.set()
        if view is not None:
            view.__exit__(None, None, None)
    return reports


def _on_key(session: RunSession, key: str) -> None:
    """A key of the live view (from the key reader's thread)."""
    pc, view = session.pc, session.view
    if key in "pr":
        try:
            pc.broadcast(State.PAUSED if key == "p" else State.RUNNING, timeout=ACK_WAIT)
            note = "paused every worker" if key == "p" else "resumed every worker"
        except TimeoutError as exc:
            note = f"{exc}; the command stays posted"
        except RuntimeError as exc:
            note = str(exc)
    elif key == "s":
        session.request_stop()
        note = "stopping gracefully"
    elif key == "q":
        # Now, but a worker that checkpoints still stops cleanly (its next
        # checkpoint is moments away); one that does not is killed after QUIT_GRACE.
        grace = min(QUIT_GRACE, float(getattr(pc, "grace", QUIT_GRACE)))
        under_way = session.stop_asked or session.bridge.stop_requested()
        session.request_stop(grace=grace)
        if view is not None:
            view.message("stopping now")
        if under_way and not session.stopped.wait(grace):
            # A stop already waits out its own (longer) grace: `q` cuts it short.
            pc.kill()
        return
    elif key in "+-":
        # As SIGTTIN/SIGTTOU, in a thread of its own: a shrink waits for its worker
        # to end (up to the grace), and the keys after it (q) must be read meanwhile.
        def resize(step: int) -> None:
            note = session.resize(step)
            if view is not None:
                view.message(note)

        try:
            threads.start(threading.Thread(target=resize, args=(+1 if key == "+" else -1,),
                                           name="procctl-resize", daemon=True))
        except OSError as exc:  # no room for a thread
            note = str(exc)
        else:
            return
    else:
        return
    if view is not None:
        view.message(note)


def _given(param: str) -> bool:
    """Whether the command line gave the option `param` (not its default)."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(param) is click.core.ParameterSource.COMMANDLINE


def _start(pc: ProcessController, bridge: SignalBridge) -> int | None:
    """Start the workers unless a stop came first; an exit status if they cannot run."""
    if bridge.stop_requested():
        return None  # nothing to start: the summary says none started
    try:
        pc.start()
    except (WorkerStartError, OSError) as exc:
        pc.close()  # the controller has killed and reaped what it had started
        if bridge.stop_requested():
            return None  # a second signal killed them while they started: the signal's doing
        say(f"procctl: error: {error_text(exc)}")  # (a node's error may have more lines)
        if isinstance(exc, ConnectionError):
            return EXIT_USAGE  # --cluster names no scheduler we can reach
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        if isinstance(cause, OSError) and cause.errno in LIMIT_ERRNOS:
            return EXIT_USAGE  # more workers than the system allows
        return EXIT_FAILED
    return None


