"""`procctl sum`: the sum-threshold job on the command line.

procctl.cli registers it on the group; errors and exit codes are handled there.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import click

from .clitools import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    QUIT_GRACE,
    BadInput,
    Reporter,
    SignalBridge,
    check_writable_file,
    error_text,
    printable,
    say,
    split_range,
)
from .control import ACK_WAIT
from .controller import WorkerStartError
from .jobs.sum_events import (
    Cancelled,
    ChannelClosed,
    ConsumerStopped,
    Crossed,
    Drained,
    JobEvent,
    ProducerStopped,
    Received,
    SumEvent,
    Summary,
    TimedOut,
)
from .jobs.sum_plan import Delay, SumCancelled, SumJobError, SumResult, SumTimeout, make_plan
from .jobs.sum_threshold import SumJob
from .limits import LIMIT_ERRNOS

START_METHODS = ("fork", "spawn", "forkserver")
#: The library's argument names that are options here (its messages start with them).
OPTION_NAMES = {"producers", "consumers", "threshold", "values", "queue_size", "delay", "batch", "timeout"}


# -- parsing ----------------------------------------------------------------------


def parse_values(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BadInput(f"--values {text!r} must be a comma list of positive integers, e.g. 1,2,3") from None


def parse_delay(text: str) -> Delay:
    """'0.5' is a fixed delay; '1-2' a random one between 1 and 2 seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    parts = split_range(text)
    try:
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise BadInput(f"--delay {text!r} must be SECONDS or MIN-MAX, e.g. 0.5 or 1-2")


def _as_option(message: str) -> str:
    """'queue_size must be ...' -> '--queue-size must be ...': name what the user typed."""
    name, sep, rest = message.partition(" ")
    if name in OPTION_NAMES and sep:
        return f"--{name.replace('_', '-')} {rest}"
    return message


# -- the story --------------------------------------------------------------------


def event_text(event: SumEvent) -> str | None:
    """The human line for one event of the job."""
    match event:
        case Received():
            return f"consumer {event.consumer} received {event.value} (sum {event.sum})"
        case Crossed(winner=True):
            return (f"consumer {event.consumer} crossed the threshold {event.threshold} with sum "
                    f"{event.sum}: it wins, stopping everyone")
        case Crossed():
            return f"consumer {event.consumer} crossed too (sum {event.sum}), but another consumer won first"
        case ProducerStopped(error=None):
            return f"producer {event.producer} stopped after {event.produced} items"
        case ProducerStopped():
            return f"producer {event.producer} {event.outcome}: {printable(event.error)} (after {event.produced} items)"
        case ConsumerStopped(error=None):
            return f"consumer {event.consumer} stopped with sum {event.sum} after {event.received} items"
        case ConsumerStopped():
            return (f"consumer {event.consumer} {event.outcome}: {printable(event.error)} (sum {event.sum} after "
                    f"{event.received} items)")
        case Drained():
            return f"cleanup: drained {event.count} items left in the queue"
        case ChannelClosed():
            return "cleanup: queue closed, every process reaped"
        case Cancelled(by=None):
            return "cancelled: everything stopped and cleaned up"
        case Cancelled():
            return f"cancelled by {event.by}: everything stopped and cleaned up"
        case Summary():
            return summary_text(event.result)
    return None


def summary_text(result: SumResult) -> str:
    verdict = (f"consumer {result.winner} won with sum {result.sums[result.winner]} > {result.threshold}"
               if result.winner >= 0 else f"nobody exceeded {result.threshold}")
    return (f"summary: {verdict}; "
            f"sums {list(result.sums)}, received {list(result.received)}, produced {list(result.produced)}, "
            f"drained {result.drained}, {result.elapsed:.2f}s")


# -- the command ------------------------------------------------------------------


@click.command("sum")
@click.option("--producers", type=int, default=3, show_default=True, help="Producer processes.")
@click.option("--consumers", type=int, default=3, show_default=True, help="Consumer processes.")
@click.option("--threshold", type=int, default=10, show_default=True, help="A consumer wins once its sum exceeds this.")
@click.option("--values", "values_text", default="1,2,3", show_default=True, help="Comma list of values to produce.")
@click.option("--queue-size", type=int, default=3, show_default=True, help="Capacity of the shared queue.")
@click.option("--delay", "delay_text", default="0", show_default=True,
              help="Seconds a producer sleeps after each put: SECONDS or MIN-MAX (the seed program: 1-2).")
@click.option("--batch", type=int, default=1, show_default=True, help="Values per queue operation.")
@click.option("--seed", type=int, default=None, help="Seed for the producers' choices.")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (exit 124).")
@click.option("--start-method", type=click.Choice(START_METHODS), default=None)
@click.option("--json", "json_lines", is_flag=True, help="JSON Lines events on stdout, the summary last.")
@click.option("--quiet", is_flag=True,
              help="Print only the summary (and, with --metrics-addr, where the metrics are).")
@click.option("--events", "events_path", default=None, help="Also write every event as JSON Lines to FILE.")
@click.option("--name", default=None, help="Name of the run for procctl status/pause/... (default: its pid).")
@click.option("--metrics-addr", default=None,
              help="Serve Prometheus metrics on HOST:PORT/metrics (default host: 127.0.0.1).")
def sum_command(producers: int, consumers: int, threshold: int, values_text: str, queue_size: int,
                delay_text: str, batch: int, seed: int | None, timeout: float | None,
                start_method: str | None, json_lines: bool, quiet: bool, events_path: str | None,
                name: str | None, metrics_addr: str | None) -> int:
    """Producers fill one queue; the first consumer whose sum exceeds the threshold stops everyone."""
    from .cli import signal_bridge
    from .cli_control import ControlPlan

    bridge = signal_bridge()
    if events_path is not None:
        check_writable_file(events_path, "--events")
    control = ControlPlan.check(name, metrics_addr, job="sum", announce=not (json_lines or quiet))
    try:
        # Checked once; the live view and the job both get the checked plan.
        plan = make_plan(producers, consumers, threshold, values=parse_values(values_text), queue_size=queue_size,
                         delay=parse_delay(delay_text), seed=seed, start_method=start_method, timeout=timeout,
                         batch=batch)
    except ValueError as exc:
        raise BadInput(_as_option(str(exc))) from None
    live = sys.stdout.isatty() and not json_lines and not quiet
    view: Any = None
    if live:
        from .live import SumLiveView

        view = SumLiveView(plan)
    reporter = Reporter(json_lines=json_lines, quiet=quiet or live, events_path=events_path, background=True)
    reporter.watch(bridge)
    listening = json_lines or view is not None or events_path or not quiet
    served: Any = None

    def on_event(event: JobEvent) -> None:
        tell(reporter, event)
        if view is not None:
            view.on_event(event)
        if served is not None:
            served.record(event.to_dict())

    job = SumJob.from_plan(plan, on_event=on_event if listening else None)
    if view is not None:
        view.status = lambda: job.controller.status() if job.controller is not None else []
    stopped: list[str] = []  # who stopped the run (`procctl stop`, a key): a clean cancel, not a failure

    def stop() -> None:
        stopped.append("procctl stop")
        job.cancel()
        if view is not None:
            view.stopping("procctl stop: stopping")

    try:
        served = control.serve(lambda: job.controller, stop, reporter)
        if view is not None:
            view.footer = served.footer
        try:
            return _run(job, reporter, bridge, view, stopped)
        finally:
            served.close()
    finally:
        reporter.close()


def tell(reporter: Reporter, event: SumEvent) -> None:
    reporter.emit(event.to_dict(), event_text(event))


def _run(job: SumJob, reporter: Reporter, bridge: SignalBridge, view: Any = None,
         stopped: list[str] | None = None) -> int:
    def on_signal() -> None:
        # SIGUSR1/2 only wake the bridge; SIGINT/SIGTERM mean a clean stop.
        if bridge.stop_signal is not None:
            job.cancel()
            if view is not None:
                view.stopping(f"{bridge.signal_name}: stopping")

    def tell_counts(result: SumResult | None) -> None:
        """The counts all the same, as the last line (nobody won); None: nothing ran, every count is 0."""
        if result is None:
            result = SumResult.nothing_ran(job.plan, job.elapsed())
        summary = Summary(result)
        reporter.summary(summary.to_dict(), summary_text(result))

    with bridge.attach(wake=on_signal, hurry=job.kill, nudge=job.wakeup):
        try:
            if bridge.stop_requested():  # came before anything started: start nothing
                raise SumCancelled("cancelled before the run started")
            if view is None:
                result = job.run()
            else:
                result = _run_live(job, view, stopped if stopped is not None else [])
        except SumCancelled as exc:
            if stopped and bridge.exit_code is None:
                tell(reporter, Cancelled(None, by=stopped[0], t=job.elapsed()))
                code = EXIT_OK
            else:
                tell(reporter, Cancelled(bridge.signal_name, t=job.elapsed()))
                code = bridge.exit_code or EXIT_SIGINT
            tell_counts(exc.result)
            return code
        except TimeoutError as exc:
            reporter.emit(TimedOut(job.plan.timeout, t=job.elapsed()).to_dict(), None)
            say(f"procctl sum: {exc}")
            if isinstance(exc, SumTimeout):
                tell_counts(exc.result)
            return EXIT_TIMEOUT
        except ValueError as exc:  # the controller's own look at the limits, with what is open by then
            say(f"procctl sum: error: {exc}")
            return EXIT_USAGE
        except (SumJobError, WorkerStartError, OSError) as exc:
            counts = exc.result if isinstance(exc, SumJobError) else None
            if bridge.exit_code is not None:  # a second signal killed the workers: the signal's doing
                tell(reporter, Cancelled(bridge.signal_name, t=job.elapsed()))
                if counts is not None:
                    tell_counts(counts)
                return bridge.exit_code
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            if isinstance(cause, OSError) and cause.errno in LIMIT_ERRNOS:
                say(f"procctl sum: error: {error_text(exc)}")
                return EXIT_USAGE  # more workers than the system allows
            if counts is not None:  # what was settled, as the last line: nobody won
                tell_counts(counts)
            say(f"procctl sum: error: {error_text(exc)}")
            return EXIT_FAILED
    summary = Summary(result)
    reporter.summary(summary.to_dict(), summary_text(result))
    return EXIT_OK


def _run_live(job: SumJob, view: Any, stopped: list[str]) -> Any:
    """The job under the live view and its keys; the view closes before the summary."""
    from .live import KeyReader

    finished = threading.Event()
    keys = KeyReader(lambda key: _on_key(job, view, stopped, finished, key))
    with keys:
        view.keys = keys.active
        try:
            with view:
                return job.run()
        finally:
            finished.set()


def _on_key(job: SumJob, view: Any, stopped: list[str], finished: threading.Event, key: str) -> None:
    """A key of the live view (from the key reader's thread): as `procctl pause/resume/stop`."""
    if key in "pr":
        pc = job.controller
        if pc is None:
            view.message = "the workers are not started yet"
            return
        try:
            if key == "p":
                pc.pause(timeout=ACK_WAIT)
            else:
                pc.run(timeout=ACK_WAIT)
            view.message = "paused every worker" if key == "p" else "resumed every worker"
        except TimeoutError as exc:
            view.message = f"{exc}; the command stays posted"
        except RuntimeError as exc:
            view.message = str(exc)
    elif key in "sq":
        stopped.append(f"the {key} key")
        job.cancel()
        view.stopping("stopping")
        view.message = "stopping gracefully" if key == "s" else "stopping now"
        if key == "q" and not finished.wait(QUIT_GRACE):
            job.kill()  # (workers that checkpoint have stopped cleanly by now)
