"""Pieces every procctl command shares: exit codes, bad input, signals, output."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import IO, Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

EXIT_FOR_SIGNAL: dict[int, int] = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}


class BadInput(Exception):
    """Bad usage: reported as one line on stderr, exit status 2."""


class SignalBridge:
    """Record the signals an operator sends; the command's loop acts on them.

    The first SIGINT or SIGTERM asks for a graceful stop; a second one calls
    `hurry` at once (from the handler, since the loop may then be inside a
    grace wait that only the workers' deaths end). SIGUSR1 and SIGUSR2 are
    queued for the loop as pause and resume.
    """

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, wake: Callable[[], None], hurry: Callable[[], None]) -> None:
        self._wake = wake
        self._hurry = hurry
        self.stop_signal: int | None = None
        self.pending: list[int] = []
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> SignalBridge:
        for sig in self.HANDLED:
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        self._saved.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum in EXIT_FOR_SIGNAL:
            if self.stop_signal is None:
                self.stop_signal = signum
                print("procctl: stopping the workers (again to kill them at once)", file=sys.stderr)
            else:
                self._hurry()
        else:
            self.pending.append(signum)
        self._wake()

    def take(self) -> list[int]:
        """The queued SIGUSR1/SIGUSR2, oldest first."""
        taken, self.pending = self.pending, []
        return taken

    @property
    def exit_code(self) -> int | None:
        return None if self.stop_signal is None else EXIT_FOR_SIGNAL[self.stop_signal]


class Reporter:
    """Writes a run's story: human lines, or JSON Lines with --json.

    Every record also goes, as JSON, to the --events file when one is given,
    flushed at once so that a run killed with SIGKILL leaves a readable log.
    """

    def __init__(self, *, json_lines: bool = False, quiet: bool = False,
                 stream: IO[str] | None = None, events_path: str | None = None) -> None:
        self.json_lines = json_lines
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stdout
        self._events = open(events_path, "w", encoding="utf-8") if events_path else None
        self._broken = False

    def emit(self, record: dict[str, Any], text: str | None, *, to_json: bool = True) -> None:
        """One event: `record` for machines, `text` (if any) for people.

        `to_json=False` keeps the record out of the --json stream (the events
        file still gets it): for a command whose stdout carries the same facts.
        """
        line = json.dumps(record, default=str)
        if self._events is not None:
            self._events.write(line + "\n")
            self._events.flush()
        if self.json_lines:
            if not to_json:
                return
            self._write(line)
        elif text is not None and not self.quiet:
            self._write(text)

    def summary(self, record: dict[str, Any], text: str) -> None:
        """The last record: always shown, even with --quiet."""
        quiet, self.quiet = self.quiet, False
        self.emit(record, text)
        self.quiet = quiet

    def _write(self, line: str) -> None:
        if self._broken:
            return
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except BrokenPipeError:
            # The reader went away (| head): stop writing, exit quietly.
            self._broken = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def check_writable_file(path: str, option: str) -> None:
    """Bad input unless `path` can be written: try it, as only trying tells."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise BadInput(f"{option} {path!r} is a directory")
    if not os.path.isdir(directory):
        raise BadInput(f"{option} {path!r}: directory {directory!r} does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise BadInput(f"{option} {path!r} cannot be written: {exc.strerror}") from None
    if not existed:
        os.unlink(path)
