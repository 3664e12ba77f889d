"""`procctl ls/status/pause/resume/stop/scale/events/metrics`: talk to live runs,
and the control plan a run command (run, sum) serves while it runs.

procctl.cli registers the commands on the group; errors and exit codes are handled there.
"""

from __future__ import annotations

import json
import os
import select
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import click

from .clitools import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    BadInput,
    Reporter,
    count,
    info_text,
    json_line,
    minutes_seconds,
    say,
    stream_failed,
)
from .control import (
    END_OF_EVENTS,
    MAX_COUNT,
    ControlError,
    ControlServer,
    NoAnswer,
    Request,
    RunHooks,
    ask,
    check_name,
    connect,
    peer_pid,
    read_line,
    runtime_dir,
    socket_path,
    sockets,
)
from .states import Event

# -- the run's side ------------------------------------------------------------------


@dataclass(frozen=True)
class ControlPlan:
    """What a run command will serve, checked before anything starts."""

    name: str | None
    metrics_addr: tuple[str, int] | None
    job: str
    announce: bool  # print the name, pid and hints at start

    @classmethod
    def check(cls, name: str | None, metrics_addr: str | None, *, job: str, announce: bool) -> ControlPlan:
        from .metrics import parse_addr

        if name is not None:
            try:
                check_name(name)
            except ValueError as exc:
                raise BadInput(f"--name: {exc}") from None
        addr = None
        if metrics_addr is not None:
            try:
                addr = parse_addr(metrics_addr)
            except ValueError as exc:
                raise BadInput(str(exc)) from None
        return cls(name, addr, job, announce)

    def serve(self, controller: Callable[[], Any], stop: Callable[[], None], reporter: Reporter,
              scale: Callable[[int], None] | None = None, *, announce: bool = True) -> ServedControl:
        """Start the control socket (and the metrics endpoint); BadInput if the name is taken.

        `scale(n)` resizes the run (None: the run cannot, and `procctl scale` is refused).
        With `announce` False, the run's name, pid and socket are said by
        `ServedControl.announce()` (`run --cluster`: once the cluster answered)."""
        try:
            server = ControlServer(RunHooks(self.job, controller, stop, scale), self.name)  # (its directory)
            server.start()
        except ControlError as exc:
            if "already live" in str(exc):
                raise BadInput(f"--name {self.name}: {exc}") from None
            say(f"procctl: warning: no control socket ({exc}); going on without it")
            return ServedControl(None, None)
        except OSError as exc:
            say(f"procctl: warning: no control socket ({exc.strerror or exc}); going on without it")
            return ServedControl(None, None)
        http = None
        if self.metrics_addr is not None:
            from .metrics import MetricsHTTP

            try:
                http = MetricsHTTP(self.metrics_addr, server.metrics_text).start()
            except OSError as exc:
                server.close()
                host, port = self.metrics_addr
                raise BadInput(f"--metrics-addr {host}:{port}: cannot listen: {exc.strerror or exc}") from None
        served = ServedControl(server, http, self.job, said=self.announce)
        if announce:
            served.announce(reporter)
        return served


class ServedControl:
    """The control socket and metrics endpoint of a live run (either may be missing)."""

    def __init__(self, server: ControlServer | None, http: Any, job: str | None = None, *,
                 said: bool = True) -> None:
        self.server = server
        self.http = http
        self._job = job
        self._said = said  # False: --json, --quiet (only where the metrics are is said)

    def announce(self, reporter: Reporter) -> None:
        """Say the run's name and pid, how to pause and resume it, and where its socket is."""
        server, http = self.server, self.http
        if self._job is None or server is None:
            return
        verb = self._job.split()[0]
        if not self._said:
            # Under --json or --quiet too: where the metrics are is no chatter (with
            # port 0, nothing else says it). On stderr: stdout holds the JSON.
            if http is not None:
                say(f"procctl {verb}: metrics on {http.url}")
            return
        by_signal = verb in ("run", "map")  # these map SIGUSR1/SIGUSR2 to pause/resume
        usr1 = f" (or kill -USR1 {server.pid})" if by_signal else ""
        usr2 = f" (or kill -USR2 {server.pid})" if by_signal else ""
        reporter.note(f"procctl {verb}: name {server.name}, pid {server.pid}; pause with `procctl pause "
                      f"{server.name}`{usr1}, resume with `procctl resume {server.name}`{usr2}; "
                      f"control socket {server.path}")
        if http is not None:
            reporter.note(f"procctl {verb}: metrics on {http.url}")

    @property
    def path(self) -> str | None:
        return self.server.path if self.server is not None else None

    @property
    def name(self) -> str | None:
        return self.server.name if self.server is not None else None

    @property
    def footer(self) -> str:
        """Where the run is reached from another shell, for a live view's footer."""
        return f"run {self.name} · pid {os.getpid()} · {self.path}" if self.path else ""

    def record(self, event: Event | dict[str, Any]) -> None:
        if self.server is not None:
            self.server.record(event)

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.server is not None:
            self.server.close()


# -- finding the run a command means ---------------------------------------------------


def live_runs() -> list[dict[str, Any]]:
    """Every live run of this user (its info); stale sockets met on the way are removed."""
    runs = []
    for path in sockets(_directory()):
        try:
            reply = ask(path, Request("info"), timeout=5.0)
        except NoAnswer:  # live, but not answering: listed as such (its name from its socket)
            runs.append({"name": os.path.basename(path)[:-5], "pid": peer_pid(path), "job": "?",
                         "workers": None, "state": "not answering", "elapsed": None, "socket": path})
            continue
        except ControlError:
            continue  # gone (and removed if stale)
        if reply.get("ok"):
            runs.append(reply)
    return runs


def _directory() -> str:
    try:
        return runtime_dir(create=False)
    except ControlError as exc:
        raise BadInput(str(exc)) from None


def resolve(run: str | None, command: str) -> str:
    """The socket of RUN (a name or a pid), or of the only live run when RUN is None."""
    if run is not None:
        try:
            path = socket_path(run, _directory())
        except ValueError:
            path = ""
        if path and os.path.lexists(path):
            try:
                connect(path, 5.0).close()
            except ControlError:
                pass  # stale (and removed): maybe RUN is a pid
            else:
                if run.isdigit():  # a name that is another live run's pid is no answer
                    other = [i for i in live_runs() if str(i["pid"]) == run and i["socket"] != path]
                    if other:
                        raise BadInput(f"{run!r} is the name of one live run and the pid of another"
                                       f" (named {other[0]['name']!r}): name the run")
                return path
        for info in live_runs():
            if run in (info["name"], str(info["pid"])):
                return str(info["socket"])
        raise BadInput(f"no live run named {run!r} (see procctl ls)")
    runs = live_runs()
    if len(runs) == 1:
        return str(runs[0]["socket"])
    if not runs:
        raise BadInput("no live procctl run of this user")
    listed = ", ".join(f"{r['name']} (pid {r['pid']}, {r['job']})" for r in runs)
    raise BadInput(f"{len(runs)} live runs, name one: {listed}")


def _ask(path: str, request: Request, command: str) -> dict[str, Any]:
    try:
        reply = ask(path, request)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    return _check_reply(reply, command)


def _check_reply(reply: dict[str, Any], command: str) -> dict[str, Any]:
    if not reply.get("ok"):
        if reply.get("bad_input"):
            raise BadInput(str(reply.get("error")))  # exit 2, as for any bad argument
        raise click.ClickException(str(reply.get("error", "the run refused the request")))
    return reply


def parse_workers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BadInput(f"--workers {text!r} must be a comma list of worker ids, e.g. 0,3") from None
    if any(i < 0 for i in ids):
        raise BadInput(f"--workers {text!r}: worker ids are >= 0")
    return tuple(dict.fromkeys(ids))  # each once (1,1,1 was said back as "workers 1,1,1")


# -- the commands ---------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, float) and abs(value) >= 1e7:
        return f"{value:.3g}"  # (1e308 in full is 309 digits: a column holds 9)
    return format(value, spec) if spec else str(value)


def _fmt_eta(seconds: float | None) -> str:
    """Minutes:seconds, as the live view shows an ETA (seconds past a column's room as _fmt)."""
    if seconds is None or not 0 <= seconds < 1e7:
        return _fmt(seconds, ".0f")
    return minutes_seconds(seconds) or "-"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


@click.command("ls")
@click.option("--json", "as_json", is_flag=True, help="A JSON array of runs.")
def ls_command(as_json: bool) -> int:
    """The user's live runs: name, pid, job, workers, state, elapsed."""
    runs = live_runs()
    keys = ("name", "pid", "job", "workers", "state", "elapsed", "socket")
    if as_json:
        click.echo(json.dumps([{k: r.get(k) for k in keys} for r in runs]))
        return EXIT_OK
    if not runs:  # (on stderr, as kubectl's "No resources found": stdout has no run)
        say("procctl: no live runs of this user")
        return EXIT_OK
    click.echo(f"{'NAME':<16} {'PID':>7} {'JOB':<20} {'WORKERS':>7} {'STATE':<13} {'ELAPSED':>8}")
    for r in runs:
        elapsed = "-" if r["elapsed"] is None else f"{r['elapsed']:.1f}s"
        click.echo(f"{r['name']:<16} {_or_dash(r['pid']):>7} {r['job']:<20} {_or_dash(r['workers']):>7}"
                   f" {r['state']:<13} {elapsed:>8}")
    return EXIT_OK


@click.command("status")
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the run and its workers.")
def status_command(run: str | None, as_json: bool) -> int:
    """Each worker of RUN: id, pid, state, outcome, restarts, progress, rate, ETA, info, CPU %, RSS."""
    reply = _ask(resolve(run, "status"), Request("status"), "status")
    reply.pop("ok", None)
    if as_json:
        click.echo(json_line(reply))
        return EXIT_OK
    click.echo(f"{reply['name']} (pid {reply['pid']}, {reply['job']}): {reply['state']}, "
               f"{count(len(reply['workers']), 'worker')}, {reply['elapsed']:.1f}s")
    click.echo(f"{'ID':>4} {'PID':>7} {'STATE':<8} {'OUTCOME':<9} {'RESTARTS':>8} {'PROGRESS':>14} {'RATE':>9} "
               f"{'ETA':>7} {'CPU%':>6} {'RSS':>10}  INFO")
    for w in reply["workers"]:
        done, total = w.get("done"), w.get("total")
        progress = "-" if done is None else (f"{done:g}/{total:g}" if total else f"{done:g}")
        info = info_text(w.get("info"))
        click.echo(f"{w['id']:>4} {_fmt(w['pid']):>7} {w['state']:<8} {_fmt(w['outcome']):<9} "
                   f"{w['restarts']:>8} {progress:>14} {_fmt(w['rate'], '.1f'):>9} {_fmt_eta(w['eta']):>7} "
                   f"{_fmt(w['cpu_percent'], '.1f'):>6} {_fmt_bytes(w['rss']):>10}  {info}")
    return EXIT_OK


def _state_command(cmd: str, verb: str, imperative: str) -> click.Command:
    @click.command(cmd)
    @click.argument("run", required=False)
    @click.option("--workers", "workers_text", default=None, help="Only these workers: a comma list of ids.")
    def command(run: str | None, workers_text: str | None) -> int:
        workers = parse_workers(workers_text)
        path = resolve(run, cmd)
        reply = _ask(path, Request(cmd, workers), cmd)
        who = "every worker" if workers is None else "workers " + ",".join(map(str, workers))
        if reply.get("acknowledged") is False:
            # Not done (yet): no success line; busy workers apply it at their next checkpoint.
            say(f"procctl {cmd}: {reply.get('note')}; the command stays posted")
            return EXIT_FAILED
        click.echo(f"{verb} {who} of {os.path.basename(path)[:-5]}")
        return EXIT_OK

    command.help = f"{imperative} the workers of RUN (all, or --workers 0,3)."
    return command


pause_command = _state_command("pause", "paused", "Pause")
resume_command = _state_command("resume", "resumed", "Resume")


@click.command("stop")
@click.argument("run", required=False)
@click.option("--workers", "workers_text", default=None, help="Only these workers: a comma list of ids.")
@click.option("--no-wait", is_flag=True,
              help="Return once the stop began, not when the run (or the workers named) has ended.")
def stop_command(run: str | None, workers_text: str | None, no_wait: bool) -> int:
    """Stop RUN gracefully (grace period, then SIGTERM, then SIGKILL); wait until it has ended
    (with --workers, until those workers have)."""
    from .cli import signal_bridge

    bridge = signal_bridge()
    bridge.stop_note = None  # a Ctrl-C here ends the wait, not the run: nothing to say
    workers = parse_workers(workers_text)
    path = resolve(run, "stop")
    name = os.path.basename(path)[:-5]
    who = name if workers is None else f"workers {','.join(map(str, workers))} of {name}"
    if no_wait:
        _ask(path, Request("stop", workers), "stop")
        click.echo(f"stopping {who}")
        return EXIT_OK
    # The run answers at once, then once more when those workers, or the run
    # (a script's: its workers), have ended; a run killed meanwhile says nothing more.
    stream = _open(path, Request("stop", workers, wait=True))
    if not stream.reply.get("ok"):
        stream.sock.close()
        _check_reply(stream.reply, "stop")
    second: list[dict[str, Any]] = []
    with stream.sock:
        seen = _follow(stream, bridge, lambda line: None, until=partial(_second_reply, second))
    if bridge.stop_requested():
        return bridge.exit_code or EXIT_FAILED  # no longer waiting; the run goes on stopping
    if not seen:
        raise click.ClickException(f"the run {name} went away before the stop was seen through (killed?)")
    if second:
        _check_reply(second[0], "stop")  # (a stop that failed: its error, exit 1)
    click.echo(f"stopped {who}")
    return EXIT_OK


def _second_reply(into: list[dict[str, Any]], line: bytes) -> bool:
    """The second reply to a stop of some workers (they have ended, or the stop
    failed), kept in `into`: the end of the wait."""
    try:
        reply = json.loads(line)
    except ValueError:
        return False
    if isinstance(reply, dict) and "ok" in reply:
        into.append(reply)
        return True
    return False


@click.command("scale", context_settings={"ignore_unknown_options": True})  # `scale RUN -1`: a bad N, not an option
@click.argument("run")
@click.argument("n", type=click.IntRange(min=1, max=MAX_COUNT))
def scale_command(run: str, n: int) -> int:
    """Resize RUN to N workers (when the run supports it)."""
    reply = _ask(resolve(run, "scale"), Request("scale", n=n), "scale")
    if reply.get("pending"):
        click.echo(f"scaling {run} to {count(n, 'worker')}: under way (removed workers end within their grace)")
    else:
        click.echo(f"scaled {run} to {count(n, 'worker')}")
    return EXIT_OK


@dataclass
class _Stream:
    """An event stream: its socket, what came after the run's reply, and the reply."""

    sock: Any
    buffer: bytearray
    reply: dict[str, Any]


def _open(path: str, request: Request) -> _Stream:
    """Send RUN a request that goes on (its events; a stop that waits) and read
    its first reply (ok, or why not: busy)."""
    try:
        sock = connect(path)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    buffer = bytearray()
    try:
        sock.sendall(request.to_line())
        line = read_line(sock, buffer)  # (within connect()'s timeout)
        reply = json.loads(line) if line is not None else {"ok": False, "error": "the run ended before it answered"}
    except (OSError, ValueError) as exc:
        sock.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise click.ClickException(f"the run at {path} did not answer as procctl does: {why}") from None
    sock.settimeout(None)
    return _Stream(sock, buffer, reply)


def _lines(buffer: bytearray) -> Iterator[bytes]:
    while (cut := buffer.find(b"\n")) >= 0:
        line = bytes(buffer[:cut])
        del buffer[:cut + 1]
        yield line


def _follow(stream: _Stream, bridge: Any, emit: Callable[[bytes], None],
            until: Callable[[bytes], bool] | None = None, output: int | None = None) -> bool:
    """Read the event stream to its end (or a SIGINT/SIGTERM, or a line `until`
    says is the last one wanted, or the reader of descriptor `output` going
    away: | head -1); False if it broke off before the run closed it (the run
    was killed)."""
    r, w = os.pipe()
    sock, buffer = stream.sock, stream.buffer
    ended = False
    try:
        poke = partial(_poke, w)
        with bridge.attach(wake=poke, hurry=lambda: None, nudge=poke):
            waits = select.poll()
            waits.register(sock, select.POLLIN)
            waits.register(r, select.POLLIN)
            if output is not None:
                # Asked for no event, a pipe's write end still says POLLERR once its
                # reader has gone (a file or a terminal never does).
                waits.register(output, 0)
            while not bridge.stop_requested():
                for line in _lines(buffer):
                    if line == END_OF_EVENTS:
                        ended = True
                    else:
                        emit(line)
                        if until is not None and until(line):
                            return True
                if ended:
                    break
                ready = dict(waits.poll())
                if r in ready:
                    break
                if output is not None and ready.get(output, 0) & (select.POLLERR | select.POLLHUP):
                    return True  # nobody reads what comes next
                try:
                    chunk = sock.recv(1 << 16)
                except OSError:
                    break
                if not chunk:
                    break
                buffer += chunk
    finally:
        os.close(r)
        os.close(w)
    return ended or bridge.stop_requested()


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"\0")
    except OSError:
        pass


@click.command("events")
@click.argument("run", required=False)
@click.option("--follow", "-f", is_flag=True, help="After the events so far, go on with the live ones.")
def events_command(run: str | None, follow: bool) -> int:
    """RUN's events as JSON Lines from the start (and, with --follow, live until it ends).

    A map run's are its run-level ones (not one per item); a sum run started
    with --quiet alone listens to none."""
    from .cli import signal_bridge

    bridge = signal_bridge()
    bridge.stop_note = None  # a Ctrl-C only stops the following: no worker of ours to stop
    stream = _open(resolve(run, "events"), Request("events", follow=follow))
    with stream.sock as sock:
        if not stream.reply.get("ok"):
            raise click.ClickException(str(stream.reply.get("error")))

        gone: list[bool] = []

        def emit(line: bytes) -> None:
            try:
                click.echo(line.decode())
            except OSError as exc:  # a reader that went away (| head): the rest goes nowhere, quietly
                stream_failed(sys.stdout, exc)
                gone.append(isinstance(exc, BrokenPipeError))

        if follow:
            ended = _follow(stream, bridge, emit, until=lambda line: any(gone), output=_output_fd())
        else:
            buffer = stream.buffer
            ended = False
            while (line := read_line(sock, buffer)) is not None:
                if line == END_OF_EVENTS:
                    ended = True
                else:
                    emit(line)
    if not ended:
        say("procctl events: the run ended without closing its events (killed?): they stop here")
        return EXIT_FAILED
    return bridge.exit_code or EXIT_OK


def _output_fd() -> int | None:
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # closed, or not a file
        return None


@click.command("metrics")
@click.argument("run", required=False)
def metrics_command(run: str | None) -> int:
    """RUN's figures in the Prometheus text exposition format."""
    reply = _ask(resolve(run, "metrics"), Request("metrics"), "metrics")
    click.echo(reply["text"], nl=False)
    return EXIT_OK


COMMANDS = (ls_command, status_command, pause_command, resume_command, stop_command, scale_command,
            events_command, metrics_command)

__all__ = ["COMMANDS", "ControlPlan", "ServedControl", "EXIT_FAILED", "EXIT_USAGE"]
