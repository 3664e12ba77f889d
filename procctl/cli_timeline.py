"""`procctl timeline LOG`: draw a run from its event log (`--events`).

The picture is the one `--timeline` draws (the log holds the broadcasts and
the summary too); `--format chrome` writes the Chrome trace that `--trace` writes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from .clitools import EXIT_OK, BadInput, SignalBridge, check_writable_file, count, read_input, same_file, say

FORMATS = ("svg", "html", "chrome")


def read_log(path: str, bridge: SignalBridge) -> list[dict[str, Any]]:
    """The records of an event log; a torn last line (a run killed mid-write) is skipped,
    and the renderers skip events whose values they cannot draw (timeline.usable)."""
    try:
        with open(path, "rb") as fh:
            lines = read_input(fh, f"the event log {path!r}", bridge).decode("utf-8").splitlines()
    except OSError as exc:
        raise BadInput(f"cannot read the event log {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path!r} is not an event log (not UTF-8 text)") from None
    except MemoryError:  # under a memory limit of its own (ulimit -v)
        raise BadInput(f"the event log {path!r} is too large to read") from None
    records = []
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # (a line nested thousands deep)
            bad += 1
            continue
        if isinstance(record, dict) and "event" in record:
            records.append(record)
        else:
            bad += 1
    if bad and not records:
        raise BadInput(f"{path!r} is not an event log: no line is a JSON event")
    return records


#: The outcome a sum log's producer_stopped or consumer_stopped record says, as a timeline draws it.
_SUM_STOPS = ("producer_stopped", "consumer_stopped")


def from_sum_log(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, int] | None:
    """A `procctl sum` log as a run's events (None if it is not one): a row per
    worker, producers first (worker ids 0..P-1, then the consumers), running
    from the start to its end, with its outcome; the crossing of the threshold
    as the STOPPED broadcast it caused."""
    from .timeline import number, worker_id

    stops = [r for r in records if r.get("event") in _SUM_STOPS]
    if not stops and not any(r.get("event") in ("received", "crossed") for r in records):
        return None
    summary: dict[str, Any] = next((r for r in reversed(records) if r.get("event") == "summary"), {})
    producers = summary.get("produced")
    consumers = summary.get("sums")
    counted = [worker_id(r.get("producer")) for r in stops if r.get("event") == "producer_stopped"]
    p = len(producers) if isinstance(producers, list) else 1 + max((i for i in counted if i is not None), default=-1)
    indexes = [worker_id(r.get("consumer")) for r in records if r.get("consumer") is not None]
    c = len(consumers) if isinstance(consumers, list) else 1 + max((i for i in indexes if i is not None), default=-1)
    if p + c == 0:
        return None
    events: list[dict[str, Any]] = [{"t": 0.0, "event": "running", "worker": wid} for wid in range(p + c)]
    for r in records:
        kind, t = r.get("event"), number(r.get("t"))
        if t is None:
            continue
        if kind in _SUM_STOPS:
            index = worker_id(r.get("producer" if kind == "producer_stopped" else "consumer"))
            if index is not None and r.get("outcome"):
                wid = index if kind == "producer_stopped" else p + index
                events.append({"t": t, "event": str(r["outcome"]), "worker": wid, "error": r.get("error")})
        elif kind == "crossed" and r.get("winner"):
            events.append({"t": t, "event": "broadcast", "state": "stopped"})
        elif kind in ("summary", "closed"):
            events.append(r)
    return events, f"procctl sum: {p} producers, {c} consumers (producers first)", p + c


def _is_map_log(records: list[dict[str, Any]]) -> bool:
    return any(r.get("event") == "started" and "items" in r for r in records)


def title_of(records: list[dict[str, Any]]) -> tuple[str | None, int | None]:
    """The title and worker count `procctl run` used, from the log's summary
    (a count that no run can have is left out, as the events that are not usable)."""
    from .timeline import MAX_WORKERS, worker_id

    for record in reversed(records):
        n = record.get("workers")
        if record.get("event") == "summary" and (n == MAX_WORKERS or worker_id(n) is not None):
            return f"procctl run: {count(n, 'worker')}", n
    return None, None


@click.command("timeline")
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, help="Output file (.svg, .html, or .json for chrome).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="svg, html, or chrome (the trace event format). Default: from the output's extension, else html.")
def timeline_command(log: str, output: str | None, fmt: str | None) -> int:
    """Draw the run recorded in LOG (an --events file) as a Gantt chart or a Chrome trace."""
    from .timeline import render_timeline, timeline_format
    from .trace import write_trace

    if output is not None and not output.strip():
        raise BadInput(f"-o needs a file name, not {output!r}")
    if fmt is None:
        ext = os.path.splitext(output or "")[1].lower()
        fmt = {".svg": "svg", ".html": "html", ".json": "chrome"}.get(ext, "html" if not output else "")
        if not fmt:
            raise BadInput(f"-o {output!r}: end it in .svg, .html or .json, or give --format")
    if output is None:
        output = os.path.splitext(log)[0] + {"svg": ".svg", "html": ".html", "chrome": ".json"}[fmt]
        if same_file(output, log):  # run.json (or run.svg): the picture must not take its place
            output = os.path.splitext(log)[0] + {"svg": ".timeline.svg", "html": ".timeline.html",
                                                 "chrome": ".trace.json"}[fmt]
    elif same_file(output, log):
        raise BadInput(f"-o {output!r} is the event log itself: give another file")
    elif fmt == "chrome":
        if os.path.splitext(output)[1].lower() in (".svg", ".html", ".htm"):
            raise BadInput(f"-o {output!r} does not match --format chrome (a trace is JSON: .json)")
    else:
        try:
            if timeline_format(output) != "." + fmt:
                raise BadInput(f"-o {output!r} does not match --format {fmt}")
        except ValueError as exc:
            raise BadInput(f"-o: {exc}") from None
    check_writable_file(output, "-o")
    from .cli import signal_bridge  # procctl.cli imports this module at its end

    bridge = signal_bridge()
    bridge.stop_note = None  # a Ctrl-C ends the command: there is no worker to stop
    records = read_log(log, bridge)
    title, workers = title_of(records)
    sum_run = from_sum_log(records)
    if sum_run is not None:
        records, title, workers = sum_run
    elif _is_map_log(records):
        say(f"procctl: {log} is a procctl map log: it records items, not workers, so the chart has no rows")
    if fmt == "chrome":
        write_trace(records, output, title=title)
    else:
        render_timeline(records, output, workers=workers, title=title)
    say(f"procctl: wrote {output}")
    return EXIT_OK
