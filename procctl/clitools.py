"""Pieces every procctl command shares: exit codes, bad input, signals, output."""

from __future__ import annotations

import math
import os
import re
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import IO, Any, NoReturn

from . import threads
from .states import strict_json

#: Worker processes per Dask worker with --cluster, unless --workers-per-node says.
DEFAULT_WORKERS_PER_NODE = 4
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_SIGHUP = 129
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

#: The signals that ask for a graceful stop, and the exit status each gives.
#: SIGHUP (the terminal went away) as GNU parallel takes it: as a SIGTERM.
EXIT_FOR_SIGNAL: dict[int, int] = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM,
                                   signal.SIGHUP: EXIT_SIGHUP}
#: How long a live view's `q` (stop and quit now) lets workers stop cleanly before it kills them.
QUIT_GRACE = 1.0


class BadInput(Exception):
    """Bad usage: reported as one line on stderr, exit status 2."""


#: The operator's signals: held from the command's first line until its
#: handlers are in place, so that none is lost or kills us half-way.
HELD_SIGNALS = threads.MANAGED_SIGNALS


def _nothing() -> None:
    pass


#: The exit status the command line ends with, for late_signal_status().
EXIT_STATUS: list[int] = []


def exit_holding_signals(code: int) -> NoReturn:
    """End the command with `code`, the operator's signals held for the
    interpreter's shutdown, which puts their default actions back: one that
    comes now stays pending, never kills us by its default action, and
    late_signal_status() makes it the exit status."""
    hold_signals()
    EXIT_STATUS[:] = [code]
    left = [t.name for t in threading.enumerate()
            if t is not threading.current_thread() and not t.daemon and t.is_alive()]
    if left:
        # A thread the target's module started here when procctl imported it:
        # the interpreter would wait for it before any exit handler, for ever,
        # with the signals held. The run has ended: end the command.
        say(f"procctl: not waiting for {len(left)} thread(s) the target's module left running in"
            f" procctl's own process ({', '.join(left[:3])})")
        _end_at_exit()
        late_signal_status()
    sys.exit(code)


def _end_at_exit() -> None:
    """What procctl's own exit handlers do (close what is left open, let the guardian go)."""
    for name, hook in (("procctl.executor", "_shutdown_at_exit"), ("procctl.controller", "_close_at_exit")):
        module = sys.modules.get(name)
        if module is not None:
            getattr(module, hook)()


def late_signal_status() -> None:
    """At exit, after every other exit handler (registered first: they run in
    reverse), a SIGINT or SIGTERM held since exit_holding_signals() (or still
    held from before) makes a command that succeeded end with 130 or 143.
    Then the process ends at once: what the interpreter would still do (tear
    its modules down) changes nothing for a command, and a signal that came
    meanwhile would be lost."""
    if not EXIT_STATUS:
        return  # not the command line's exit (or it failed before its end)
    code = EXIT_STATUS[0]
    if not flush_output() and code == EXIT_OK:
        code = EXIT_FAILED
    if code == EXIT_OK:
        pending = signal.sigpending()
        code = next((EXIT_FOR_SIGNAL[sig] for sig in EXIT_FOR_SIGNAL
                     if sig in pending and signal.getsignal(sig) != signal.SIG_IGN), EXIT_OK)  # (nohup's)
    threads.exit_now(code)


#: Set once the command's output could not be written (not a reader that went away).
OUTPUT_LOST: list[str] = []


def output_lost(exc: OSError) -> None:
    """Say once that the output cannot be written; the command will exit 1."""
    if not OUTPUT_LOST:
        OUTPUT_LOST.append(exc.strerror or str(exc))
        say(f"procctl: error: cannot write the output: {OUTPUT_LOST[0]}")


def flush_output() -> bool:
    """Flush what is left of stdout; False if the output was lost (a full
    disk, /dev/full) now or earlier. A reader that went away is no error here."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError as exc:
        stream_failed(sys.stdout, exc)
    except ValueError:  # closed
        pass
    return not OUTPUT_LOST


def stream_failed(stream: IO[str], exc: OSError) -> None:
    """`stream` cannot be written: its reader went away (| head: the rest goes
    to /dev/null, quietly), or the output is lost (a full disk: said once).
    Stderr is no output: the story a command tells there (procctl map's) is
    dropped, and the exit status stays the job's."""
    _silence(stream)
    if not isinstance(exc, BrokenPipeError) and not _is_stderr(stream):
        output_lost(exc)


def _is_stderr(stream: IO[str]) -> bool:
    if stream is sys.stderr or stream is sys.__stderr__:
        return True
    try:
        return stream.fileno() == 2
    except (OSError, ValueError, AttributeError):
        return False


#: The longest alarm alarm_after() sets (setitimer's own bound is far beyond).
MAX_ALARM = 1e8


@contextmanager
def alarm_after(seconds: float | None, on_alarm: Callable[[], None]) -> Iterator[None]:
    """Call `on_alarm` from a SIGALRM handler `seconds` into the block (it may
    raise into whatever the main thread runs then). None, or a thread other
    than the main one: no alarm. The caller's own handler and interval timer
    are put back after, that timer less the time the block took."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    old_handler = signal.signal(signal.SIGALRM, lambda signum, frame: on_alarm())
    old_timer = signal.setitimer(signal.ITIMER_REAL, min(max(seconds, 1e-3), MAX_ALARM))
    began = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if old_handler is None else old_handler)
        if old_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, max(1e-6, old_timer[0] - (time.monotonic() - began)), old_timer[1])


def hold_signals() -> None:
    """Block the operator's signals; `SignalBridge.install()` releases them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


def ensure_std_fds() -> None:
    """Give a closed stdin, stdout or stderr (`procctl run >&-`) /dev/null.

    Else the command would fail on the missing stream, and the first pipe it
    opens would take descriptor 1 or 2, where a worker's print would land.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - lives as long as we do
    if sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - lives as long as we do


def _stdout_fd(stream: IO[str]) -> int:
    """1 when `stream` is this process's standard output on descriptor 1 and no
    terminal (a live view draws there through sys.stdout), else -1."""
    try:
        return 1 if stream is sys.stdout and stream.fileno() == 1 and not stream.isatty() else -1
    except (OSError, ValueError, AttributeError):
        return -1


def _silence(stream: IO[str]) -> None:
    """The reader of `stream` went away: send the rest to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def say(line: str) -> None:
    """One line on stderr; a closed or broken stderr is no reason to fail."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        _silence(sys.stderr)


def _raw_say(data: bytes) -> None:
    try:
        os.write(2, data)
    except OSError:
        pass  # a broken or closed stderr: the exit status still tells


def printable(value: object) -> str:
    """`value` as text that cannot drive a terminal: control characters (an
    escape sequence, a newline in a worker's progress info) written as escapes."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def minutes_seconds(seconds: float | None) -> str | None:
    """An ETA as minutes:seconds (None for none, or one without end)."""
    if seconds is None or not math.isfinite(seconds):
        return None
    whole = int(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def count(n: int, word: str) -> str:
    """`n` and `word`, plural unless n is 1: "1 worker", "3 workers"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def error_text(exc: BaseException) -> str:
    """What an exception says, on one line; an OSError's own words without "[Errno N]"."""
    said = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        said = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return first_line(said) or type(exc).__name__


def first_line(text: str | None) -> str:
    """The first line of a text that may have several (an exception's message)."""
    return text.strip().splitlines()[0] if text and text.strip() else ""


def info_text(info: dict[str, Any] | None) -> str:
    """A worker's progress info as `key=value ...`, safe on a terminal."""
    return " ".join(f"{printable(k)}={printable(v)}" for k, v in (info or {}).items())


class SignalBridge:
    """Record the signals an operator sends; the command's loop acts on them.

    `install()` runs first thing in main, so a signal at any moment of a
    command counts. The first SIGINT, SIGTERM or SIGHUP asks for a graceful stop; a
    second one calls `hurry` at once (from the handler, since the loop may
    then be inside a grace wait that only the workers' deaths end). SIGUSR1
    and SIGUSR2 are queued for the loop as pause and resume, SIGTTIN and
    SIGTTOU as one worker more or fewer. The handler
    records, wakes, and says what it does with one raw write to descriptor 2:
    sys.stderr could be in the middle of a write it interrupted, or raise on
    a broken pipe into whatever code the signal interrupted.
    """

    HANDLED = tuple(sorted(HELD_SIGNALS))

    def __init__(self) -> None:
        self._wake: Callable[[], None] = _nothing
        self._hurry: Callable[[], None] = _nothing
        self._nudge: Callable[[], None] = _nothing
        self._nudging = threading.Lock()
        self.stop_signal: int | None = None
        #: Called from the watcher thread as each signal arrives, besides the attached nudge.
        self._listeners: list[Callable[[], None]] = []
        #: SIGUSR1/SIGUSR2 queued for the loop, by the handler and by other threads
        #: (the control server, the keys): a deque, whose append and popleft are atomic.
        self.pending: deque[int] = deque()
        self._saved: dict[int, Any] = {}
        self._wakeup_w = -1
        self._old_wakeup = -1
        #: What the first SIGINT/SIGTERM says; None for a command that has no
        #: workers to stop (`procctl events --follow`: the signal only ends it).
        self.stop_note: bytes | None = b"procctl: stopping the workers (again to kill them at once)\n"

    def install(self) -> SignalBridge:
        """Take over the signals, then deliver those that came while held."""
        for sig in self.HANDLED:
            if sig in (signal.SIGINT, signal.SIGHUP) and signal.getsignal(sig) == signal.SIG_IGN:
                # `nohup procctl ...`, or a background job of a shell without job
                # control (SIGINT ignored): the operator asked that it be ignored, and
                # it stays so (as Python's own SIGINT handling does), not ignored
                # for the first milliseconds and acted on after.
                continue
            self._saved[sig] = signal.signal(sig, self._handle)
        self._watch_wakeups()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        return self

    def uninstall(self) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        self._saved.clear()
        if self._wakeup_w >= 0:
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self._wakeup_w)  # the watcher reads its end of file and ends
            self._wakeup_w = -1

    def _watch_wakeups(self) -> None:
        """A thread that nudges the command's wait whenever a signal arrives.

        Python runs a handler in the main thread at its next bytecode. A
        signal that lands just before the main thread enters a wait's system
        call (between the last check and epoll_wait) does not interrupt that
        call, and the handler would wait for the next event, maybe for ever.
        The C-level handler writes each signal's number to the wakeup fd
        wherever it lands; this thread reads it and calls the attached
        `nudge`, which makes the wait return, and the handler runs.
        """
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: no handler runs here either
            os.close(r)
            os.close(w)
            return
        self._wakeup_w = w
        threads.start(threading.Thread(target=self._watch, args=(r,), name="procctl-signals", daemon=True))

    def _watch(self, r: int) -> None:
        try:
            while os.read(r, 64):
                with self._nudging:  # attach() lets go of a job only between two nudges
                    for nudge in (self._nudge, *self._listeners):
                        try:
                            nudge()
                        except Exception:  # noqa: BLE001 - the job's pipe is gone: nothing left to wake
                            pass
        except OSError:
            pass
        finally:
            os.close(r)

    __enter__ = install

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @contextmanager
    def attach(self, wake: Callable[[], None], hurry: Callable[[], None],
               nudge: Callable[[], None] = _nothing) -> Iterator[SignalBridge]:
        """Wire the signals to a running job for the duration of the block.

        `wake` and `hurry` run in the handler. `nudge`, called from another
        thread as each signal arrives, must only make the block's wait
        return (write to the pipe it waits on), so that the handler runs.
        """
        self._wake, self._hurry, self._nudge = wake, hurry, nudge
        try:
            yield self
        finally:
            with self._nudging:  # after this, no nudge reaches the job (whose pipe may close next)
                self._wake = self._hurry = self._nudge = _nothing

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum in EXIT_FOR_SIGNAL:
            if self.stop_signal is None:
                self.stop_signal = signum
                if self.stop_note is not None:
                    _raw_say(self.stop_note)
            else:
                self._hurry()
        else:
            self.pending.append(signum)
        self._wake()

    def stop_requested(self) -> bool:
        """True once SIGINT or SIGTERM came."""
        return self.stop_signal is not None

    def listen(self, nudge: Callable[[], None]) -> None:
        """Call `nudge` from the watcher thread whenever a signal arrives, as long
        as the bridge is installed (it must only make a wait look again)."""
        self._listeners.append(nudge)

    @property
    def signal_name(self) -> str | None:
        return None if self.stop_signal is None else signal.Signals(self.stop_signal).name

    def take(self) -> list[int]:
        """The queued SIGUSR1/SIGUSR2, oldest first."""
        taken = []
        while self.pending:
            taken.append(self.pending.popleft())
        return taken

    @property
    def exit_code(self) -> int | None:
        return None if self.stop_signal is None else EXIT_FOR_SIGNAL[self.stop_signal]


def json_line(record: dict[str, Any]) -> str:
    """`record` as strict JSON: a NaN or infinity (which JSON has no word for) is null."""
    return strict_json(record)


#: How long the output may take its last lines once a stop signal says to end
#: the command (a reader that stopped reading gets none of them).
OUTPUT_GRACE = 1.0
#: Unwritten output beyond which a command waits for its reader (or, once a
#: stop was asked for, drops what comes).
OUTPUT_BACKLOG = 1 << 20


class Reporter:
    """Writes a run's story: human lines, or JSON Lines with --json.

    Every record also goes, as JSON, to the --events file when one is given,
    flushed at once so that a run killed with SIGKILL leaves a readable log.
    An event log that cannot be written (a full disk, /dev/full) is said once
    on stderr and dropped; the run, its output and its exit status go on.
    Records may come from a job's helper thread: one lock keeps lines whole.

    `background=True` (procctl run and sum): lines for the standard output go
    to it from a thread of the reporter's own, so that a reader that stops
    reading (a full pipe) holds up neither the controller, which reports its
    events while it holds itself, nor the stop a signal asks for. close()
    waits until they are written (once a stop signal came, OUTPUT_GRACE at most).
    """

    def __init__(self, *, json_lines: bool = False, quiet: bool = False,
                 stream: IO[str] | None = None, events_path: str | None = None,
                 background: bool = False) -> None:
        self.json_lines = json_lines
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stdout
        self.events_path = events_path
        self._events = open(events_path, "w", encoding="utf-8") if events_path else None  # noqa: SIM115
        self._broken = False
        self._lock = threading.Lock()
        #: The standard output's descriptor when its lines go from the writer thread, else -1.
        self._fd = _stdout_fd(self.stream) if background else -1
        self._encoding = getattr(self.stream, "encoding", None) or "utf-8"
        self._out: deque[bytes] = deque()
        self._backlog = 0  # bytes queued or being written
        self._dropped = 0
        self._abandoned = False  # drain() gave up on the reader
        self._bridge: SignalBridge | None = None
        self._out_changed = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        self._writing = False
        self._closing = False

    def emit(self, record: dict[str, Any], text: str | None, *, to_json: bool = True) -> None:
        """One event: `record` for machines, `text` (if any) for people.

        `to_json=False` keeps the record out of the --json stream (the events
        file still gets it): for a command whose stdout carries the same facts.
        """
        as_json = self.json_lines and to_json and not self.quiet  # --json --quiet: the summary record alone
        line = json_line(record) if as_json or self._events is not None else ""  # (none made for nobody)
        with self._lock:
            if self._events is not None:
                try:
                    self._events.write(line + "\n")
                    self._events.flush()
                except OSError as exc:
                    self._drop_events(exc)
            if self.json_lines:
                if as_json:
                    self._write(line)
            elif text is not None and not self.quiet:
                self._write(text)

    def summary(self, record: dict[str, Any], text: str) -> None:
        """The last record: always shown, even with --quiet."""
        quiet, self.quiet = self.quiet, False
        self.emit(record, text)
        self.quiet = quiet

    def passthrough(self, output: Any) -> None:
        """A worker's output lines (a capture.Output), prefixed `[3] `: on stdout,
        or on stderr with --json so that stdout stays JSON Lines."""
        text = output.prefixed()
        stream = sys.stderr if self.json_lines else self.stream
        with self._lock:
            if stream is self.stream and self._fd >= 0:
                if not self._broken:
                    self._queue(text)
                return
            try:
                stream.write(text)
                stream.flush()
            except OSError as exc:
                if stream is self.stream:
                    self._lost(exc)
            except ValueError:
                pass

    def note(self, line: str) -> None:
        """A line for people, outside the story (shown unless --json or --quiet were given)."""
        with self._lock:
            self._write(line)

    def _write(self, line: str) -> None:
        if self._broken:
            return
        if self._fd >= 0:  # (held: self._lock)
            self._queue(line + "\n")
            return
        self._write_text(line + "\n")

    def _write_text(self, text: str) -> None:
        try:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:  # a lone surrogate (a file name's undecodable byte) in an error
                self.stream.write(text.encode(self._encoding, "backslashreplace").decode(self._encoding))
            self.stream.flush()
        except OSError as exc:
            self._lost(exc)
        except ValueError:
            self._broken = True

    def _lost(self, exc: OSError) -> None:
        """The output cannot be written: stop writing (stream_failed says why, once)."""
        if not self._broken:
            self._broken = True
            stream_failed(self.stream, exc)

    def _drop_events(self, exc: OSError) -> None:
        events, self._events = self._events, None
        say(f"procctl: warning: the event log {self.events_path!r} could not be written ({exc.strerror});"
            " going on without it")
        if events is not None:
            try:
                events.close()
            except OSError:
                pass  # the unwritten rest goes with it

    def _queue(self, text: str) -> None:
        """Hand `text` to the writer thread (held: self._lock). Past OUTPUT_BACKLOG
        unwritten bytes, wait for room (the reader's pace), unless a stop was
        asked for: then the line is dropped (counted) rather than hold up the stop."""
        if self._abandoned:
            self._dropped += 1
            return
        data = text.encode(self._encoding, "backslashreplace")
        while self._backlog > OUTPUT_BACKLOG and not self._broken:
            if self._bridge is not None and self._bridge.stop_requested():
                self._dropped += 1
                return
            self._out_changed.wait()  # (the writer frees room; a signal nudges)
        if self._broken:
            return
        if self._writer is None:
            try:  # what went through sys.stdout before (nothing, as a rule) comes first
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
            writer = threading.Thread(target=self._write_out, name="procctl-output", daemon=True)
            try:
                threads.start(writer)
            except OSError:  # no room for a thread (a limit): write here, as without one
                self._fd = -1
                self._write_text(text)
                return
            self._writer = writer
        self._out.append(data)
        self._backlog += len(data)
        self._out_changed.notify_all()

    def _write_out(self) -> None:
        """The writer thread: what is queued, in order, to the standard output."""
        while True:
            with self._lock:
                while not self._out and not self._closing:
                    self._out_changed.wait()
                if not self._out:
                    return
                data = b"".join(self._out)
                self._out.clear()
                self._writing = True
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
                    with self._lock:
                        self._backlog -= n
                        self._out_changed.notify_all()
            except OSError as exc:
                with self._lock:
                    self._out.clear()
                    self._lost(exc)
            finally:
                with self._lock:
                    if self._broken:
                        self._backlog = 0
                    self._writing = False
                    self._out_changed.notify_all()

    def watch(self, bridge: SignalBridge) -> None:
        """Let the operator's SIGINT and SIGTERM end a wait for a reader that
        stopped reading (see drain() and _queue())."""
        self._bridge = bridge
        bridge.listen(self.nudge)

    def nudge(self) -> None:
        """Make a wait for the output look again (a signal came). From any thread but a handler."""
        with self._lock:
            self._out_changed.notify_all()

    def drain(self) -> None:
        """Wait until the standard output has taken every line. Once a SIGINT
        or SIGTERM has come (before or meanwhile), the reader gets OUTPUT_GRACE
        more: then the rest is dropped, and so is whatever comes after."""
        bridge = self._bridge
        with self._lock:
            until = None
            while (self._out or self._writing) and not self._abandoned:
                if until is None and bridge is not None and bridge.stop_requested():
                    until = time.monotonic() + OUTPUT_GRACE  # a reader that reads takes them in that time
                if until is None:
                    self._out_changed.wait()
                elif not self._out_changed.wait(max(0.0, until - time.monotonic())):
                    self._dropped += len(self._out)
                    self._out.clear()
                    self._abandoned = True  # (the writer stays in its write: the process exits under it)

    def close(self) -> None:
        """drain(), then close (the event log too)."""
        self.drain()
        with self._lock:
            self._closing = True
            self._out_changed.notify_all()
            dropped, self._dropped = self._dropped, 0
        if dropped:
            say(f"procctl: output was dropped ({dropped} records at least): after the stop, its reader did not take it")
        with self._lock:
            if self._events is not None:
                try:
                    self._events.close()
                except OSError as exc:
                    self._events = None
                    say(f"procctl: warning: the event log {self.events_path!r} could not be written"
                        f" ({exc.strerror})")
                self._events = None


def split_range(text: str) -> list[str]:
    """'MIN-MAX' -> ['MIN', 'MAX']: split at a '-' that is not a sign (one
    after a digit or a point, not first nor after an exponent's 'e')."""
    return re.split(r"(?<=[0-9.])-", text)


def same_file(a: str, b: str) -> bool:
    """Whether paths `a` and `b` name one file (through links too; one that does not exist yet by its path)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_distinct_files(paths: dict[str, str | None]) -> None:
    """Bad input if two of the options (option: path) name the same file: one would overwrite the other."""
    given = [(option, path) for option, path in paths.items() if path is not None and path.strip()]
    for i, (option, path) in enumerate(given):
        for other, earlier in given[:i]:
            if same_file(earlier, path):
                raise BadInput(f"{other} and {option} name the same file {path!r}")


def check_writable_file(path: str, option: str) -> None:
    """Bad input unless `path` can be written: try it, as only trying tells."""
    if not path.strip():
        raise BadInput(f"{option} needs a file name, not {path!r}")
    if path == "-":  # (a file named '-' in the current directory is never what was meant)
        hint = ": --json puts the events on stdout" if option == "--events" else ""
        raise BadInput(f"{option} needs a file name; '-' is not stdout here{hint} (./- is a file named '-')")
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise BadInput(f"{option} {path!r} is a directory")
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise BadInput(f"{option} {path!r}: {directory!r} {what}")
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise BadInput(f"{option} {path!r} cannot be written: {exc.strerror}") from None
    if not existed:
        os.unlink(path)


#: An input (map's items, an event log) is read this much at a time: a command
#: holds all of it in memory, and one without end (/dev/zero, a pipe from
#: `yes`) must end in one line past input_limit(), not in MemoryError after gigabytes.
INPUT_CHUNK = 1 << 20


def input_limit() -> int:
    """What an input may take: a sixteenth of this machine's memory, or a
    quarter of this process's address-space limit (`ulimit -v`) if that is
    less; at least 16 MiB."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 16
    except (ValueError, OSError):  # pragma: no cover - not Linux
        memory = 1 << 30
    import resource

    space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if space != resource.RLIM_INFINITY:
        memory = min(memory, space // 4)
    return max(memory, 16 << 20)


def read_input(stream: IO[bytes], what: str, bridge: SignalBridge, limit: int | None = None) -> bytes:
    """All of `stream` (a binary file or stdin), read a chunk at a time.

    BadInput naming `what` once it passes `limit` bytes (a regular file is
    measured before anything is read). SIGINT or SIGTERM while it reads (a
    terminal waiting for Ctrl-D, an endless pipe) ends the command: 130 or
    143, as the signal says (click.Abort; main() exits with the signal's status).
    """
    import click

    limit = input_limit() if limit is None else limit

    def too_large() -> BadInput:
        return BadInput(f"{what} is too large to read: over {limit >> 20} MiB"
                        f", the most a command reads into memory here")

    try:
        st = os.fstat(stream.fileno())
        size, regular = st.st_size, stat.S_ISREG(st.st_mode)
    except (OSError, ValueError, AttributeError):
        size, regular = 0, False
    if size > limit:
        raise too_large()
    if regular:
        # A file is read whole, even after a stop signal: it ends at once, and the
        # command can then say what it leaves undone (map's summary, --unfinished).
        data = stream.read()
        if len(data) > limit:
            raise too_large()
        return bytes(data)

    def interrupt() -> None:
        if bridge.stop_requested():  # (SIGUSR1/SIGUSR2 and the like wait, queued, for the workers)
            raise KeyboardInterrupt  # out of the read, which the kernel would resume after the handler

    chunks: list[bytes] = []
    total = 0
    note, bridge.stop_note = bridge.stop_note, None  # no worker has started: nothing to say but the exit
    try:
        with bridge.attach(wake=interrupt, hurry=lambda: None):
            while not bridge.stop_requested():
                chunk = stream.read1(INPUT_CHUNK) if hasattr(stream, "read1") else stream.read(INPUT_CHUNK)
                if not chunk:
                    return b"".join(chunks)
                total += len(chunk)
                if total > limit:
                    chunks.clear()
                    raise too_large()
                chunks.append(chunk)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise click.Abort from None
    finally:
        bridge.stop_note = note


def working_dir() -> str | None:
    """The current directory, or None if it was removed (a command may still
    run there: what it needs is on sys.path or given by full path)."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None
