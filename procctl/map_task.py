"""Worker side of `procctl map`: run the user's function on one item.

The command line submits `run_item` once per item. It never raises for the
user's exception (a task that raises is a failed item, not a broken worker):
it returns an ItemOutcome with the result already encoded as JSON, so the
encoding work is spread over the workers and a result that is not JSON fails
its item here, with a clear message. The outcome carries the call's start,
runtime and pid, so whoever writes the joblog record (this worker, or the
command line for a worker on another machine) writes the same record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from .maplog import ItemOutcome, append, record_tail
from .worker import context
from .worker_plane import saw_stop


def run_item(fn: Callable[[Any], Any], item: Any, joblog: str | None = None,
             head: str | None = None) -> ItemOutcome:
    """fn(item) as an ItemOutcome; with a joblog, append the item's record before returning.

    Without one (--cluster: the joblog is on the command line's machine) the
    command line writes the record from the outcome when it arrives."""
    start = time.time()
    t0 = time.perf_counter()
    tb: str | None = None
    try:
        value = fn(item)
    except Exception as exc:  # noqa: BLE001 - any exception of the task fails its item
        ok, text, tb = False, exception_text(exc), traceback.format_exc()
    else:
        try:
            ok, text = True, json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            ok, text = False, f"result is not JSON: {exception_text(exc)}"
    if _interrupted():
        # It was told to stop (a checkpoint returned False): the executor counts
        # the item unfinished, so it is neither done nor failed, and not logged.
        return ItemOutcome(False, "stopped")
    outcome = ItemOutcome(ok, text, tb, start, time.perf_counter() - t0, os.getpid())
    if joblog is not None and head is not None:
        try:
            append(joblog, head + record_tail(outcome))
        except OSError as exc:  # the log's fault, not the item's: its outcome stands
            outcome = dataclasses.replace(outcome, log_error=exc.strerror or str(exc))
    return outcome


def output_to_stderr() -> None:
    """Point this worker's stdout (file descriptor 1 and sys.stdout) at its stderr:
    the command's stdout carries the results, one JSON value a line."""
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
    try:
        os.dup2(2, 1)
    except OSError:  # no stderr (closed): then the output goes nowhere rather than into the results
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)


def _interrupted() -> bool:
    """Whether the task was told to stop, as the executor judges it (worker_plane.saw_stop)."""
    try:
        ctx = context()
    except RuntimeError:  # not in a procctl worker
        return False
    return saw_stop(ctx)


def exception_text(exc: BaseException) -> str:
    """`ValueError: message` (all of it: an item's error in JSON), from the exception itself."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
