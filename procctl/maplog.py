"""`procctl map`'s joblog: one JSON Lines record per item that ended.

Both sides of the process boundary use this format: on one machine a worker
appends the record of an item it ran (right after the task returns, so a
SIGKILL of the command line cannot lose a finished item's record in transit),
and the command line appends the record of an item whose worker crashed or
timed out, and reads the file back for --resume. With --cluster the workers
may be on other machines: the command line writes every record, from the
ItemOutcome (which carries the start, runtime and pid) as it arrives.

A record, in the spirit of GNU parallel's joblog (Seq, Starttime, JobRuntime,
Exitval, Command), keyed by the item's input line number and a digest of it::

    {"line": 7, "sha": "3f0a...", "item": {"n": 7}, "status": "done", "start": 1718000000.123,
     "runtime": 0.052, "pid": 4242, "result": 49}
    {"line": 8, "sha": "91bc...", "item": {"n": 8}, "status": "failed", "start": ..., "runtime": ...,
     "pid": 4243, "error": "ValueError: no", "traceback": "Traceback ..."}

Each record is written with one `write()` on a file opened with O_APPEND, so
records from several processes never interleave.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DONE = "done"
FAILED = "failed"


@dataclass(frozen=True)
class ItemOutcome:
    """What a worker sends back for one item: the result as JSON text, or the error,
    and when, how long and in which process it ran (for a record written elsewhere)."""

    ok: bool
    text: str  # the result encoded as JSON, or "ExceptionType: message"
    traceback: str | None = None
    start: float | None = None  # wall-clock time the call began
    runtime: float | None = None  # seconds the call took
    pid: int | None = None  # the worker process that ran it
    #: The worker could not append the item's record to the joblog (why):
    #: the command line tries again, and stops the run if it cannot either.
    log_error: str | None = None


def canonical(item: Any) -> str:
    """The item's JSON text as the digest sees it: key order and spacing do not matter."""
    return json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(item: Any) -> str:
    return hashlib.sha256(canonical(item).encode("utf-8")).hexdigest()[:16]


def record_head(line: int, item: Any, item_text: str) -> str:
    """The opening of an item's record; the writer adds the outcome and closes it."""
    return f'{{"line": {line}, "sha": "{digest(item)}", "item": {item_text}'


def record_tail(outcome: ItemOutcome) -> str:
    """The outcome and the rest of a record; null where the outcome cannot know (a crashed worker's item)."""
    tail = f', "status": "{DONE if outcome.ok else FAILED}", "start": {_number(outcome.start)}'
    tail += f', "runtime": {_number(outcome.runtime)}, "pid": {json.dumps(outcome.pid)}'
    if outcome.ok:
        return tail + f', "result": {outcome.text}}}\n'
    tail += f', "error": {json.dumps(outcome.text)}'
    if outcome.traceback:
        tail += f', "traceback": {json.dumps(outcome.traceback)}'
    return tail + "}\n"


def _number(value: float | None) -> str:
    return "null" if value is None else f"{value:.6f}"


def append(path: str, text: str) -> None:
    """Append one whole record with a single write (O_APPEND: no interleaving between processes)."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while data:  # a regular file takes it whole; loop only for the odd short write
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


class JoblogError(ValueError):
    """The joblog cannot be read or does not belong to this input."""


def _contents(path: str) -> bytes:
    """The joblog's bytes (none if it does not exist, or is not a regular file: a
    device such as /dev/full or /dev/zero would give bytes without end)."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return b""
            return f.read()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise JoblogError(f"cannot be read: {exc.strerror}") from None


def read_records(path: str, raw: bytes | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(joblog line number, record) for each record of the joblog at `path`
    (or of its bytes `raw`, already read); none if it does not exist.

    A last line cut short (the disk filled up mid-write) is skipped.
    """
    lines = (_contents(path) if raw is None else raw).split(b"\n")
    for number, data in enumerate(lines, start=1):
        if not data.strip():
            continue
        try:
            record = json.loads(data)
            if not isinstance(record, dict) or not {"line", "sha", "status"} <= record.keys():
                raise ValueError("not a record")
        except ValueError:
            if number == len(lines):  # no newline after it: a torn last record
                continue
            raise JoblogError(f"line {number} is not a joblog record") from None
        yield number, record


def read_done(path: str, digests: dict[int, str]) -> set[int]:
    """Input line numbers the joblog at `path` records as done.

    `digests` maps each input line number to its item's digest; a record that
    names a line whose item differs means the joblog is from another input,
    and resuming from it would skip the wrong items: JoblogError. A record
    past the input's last line is of an item this input no longer has (as
    GNU parallel's --resume, a shorter input goes on). A last
    record cut short is cut off the file once the rest is found to be this
    input's, so that the next record starts a line of its own (that item is
    not done: it runs again).
    """
    raw = _contents(path)
    done: set[int] = set()
    last = max(digests, default=0)
    for number, record in read_records(path, raw):
        line = record["line"]
        if isinstance(line, int) and not isinstance(line, bool) and line > last:
            continue  # past the end of this input (cut short since): an item this run does not have
        if isinstance(line, bool) or not isinstance(line, int) or digests.get(line) != record["sha"]:
            raise JoblogError(f"line {number} records input line {line} with another item than the input has "
                              "there: this joblog is from another input")
        if record["status"] == DONE:
            done.add(line)
    if raw and not raw.endswith(b"\n"):
        try:
            os.truncate(path, raw.rfind(b"\n") + 1)
        except OSError as exc:
            raise JoblogError(f"cannot be repaired: {exc.strerror}") from None
    return done
