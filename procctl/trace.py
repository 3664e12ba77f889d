"""A run's events in the Chrome trace event format, for Perfetto and chrome://tracing.

One process ("the run"), one track per worker (tid = worker id + 1) and one
for the controller (tid 0). Phases written:

- ``M`` metadata: the process and track names;
- ``X`` complete events: spans ``running`` and ``paused`` (cat ``state``), and
  ``grace`` (cat ``stop``) from the STOPPED broadcast to the worker's end;
- ``i`` instant events: each worker's outcome (cat ``outcome``, thread scope)
  and each broadcast (cat ``broadcast``, global scope);
- ``C`` counters: each worker's progress (``progress worker N``: done, total).

Times are microseconds since the controller started. Standard library only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

from .timeline import EventLike, _as_dict, build_run, number, usable

__all__ = ["PHASES", "trace_events", "write_trace"]

PHASES = ("M", "X", "i", "C")
PID = 1


def _us(t: float) -> float:
    return round(t * 1e6, 3)


def trace_events(events: Iterable[EventLike], *, title: str | None = None) -> dict[str, Any]:
    """The trace as a JSON-ready object: {"traceEvents": [...], "displayTimeUnit": "ms"}."""
    dicts = [_as_dict(e) for e in events]
    run = build_run(dicts)
    out: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": PID, "tid": 0, "args": {"name": title or "procctl run"}},
        {"ph": "M", "name": "thread_name", "pid": PID, "tid": 0, "args": {"name": "controller"}},
    ]
    stop_at = next((t for t, state in run.broadcasts if state == "stopped"), None)
    for row in run.rows:
        tid = row.worker + 1
        out.append({"ph": "M", "name": "thread_name", "pid": PID, "tid": tid, "args": {"name": f"worker {row.worker}"}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": PID, "tid": tid, "args": {"sort_index": tid}})
        for span in row.spans:
            out.append({"ph": "X", "cat": "state", "name": span.state, "pid": PID, "tid": tid,
                        "ts": _us(span.start), "dur": _us(span.end - span.start)})
        if row.outcome is not None and row.outcome_t is not None:
            if stop_at is not None and row.outcome_t >= stop_at:
                out.append({"ph": "X", "cat": "stop", "name": "grace", "pid": PID, "tid": tid,
                            "ts": _us(stop_at), "dur": _us(row.outcome_t - stop_at)})
            detail = {"detail": row.detail} if row.detail else {}
            out.append({"ph": "i", "s": "t", "cat": "outcome", "name": row.outcome, "pid": PID, "tid": tid,
                        "ts": _us(row.outcome_t), "args": detail})
    for t, state in run.broadcasts:
        out.append({"ph": "i", "s": "g", "cat": "broadcast", "name": f"broadcast {state}", "pid": PID, "tid": 0,
                    "ts": _us(t), "args": {"state": state}})
    for d in sorted((d for d in dicts if usable(d)), key=lambda d: float(d["t"])):
        done, total = d.get("done"), d.get("total")
        if d.get("worker") is not None and number(done, math.inf) is not None:
            args: dict[str, Any] = {"done": done}  # as logged: 3 stays 3
            if number(total, math.inf) is not None:
                args["total"] = total
            out.append({"ph": "C", "name": f"progress worker {d['worker']}", "pid": PID,
                        "tid": d["worker"] + 1, "ts": _us(max(0.0, float(d["t"]))), "args": args})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_trace(events: Iterable[EventLike], path: str | os.PathLike[str], *, title: str | None = None) -> None:
    """Write the run described by `events` to `path` as a Chrome trace (JSON)."""
    body = trace_events(events, title=title)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(body, fh, allow_nan=False)
        fh.write("\n")
