"""Issue 10, items 8-13: whatever the system or the operator does, one clear
line and the documented exit status; never a traceback, a hang or a stray
process. The command line runs as a real subprocess (`python -m procctl`)."""

from __future__ import annotations

import contextlib
import decimal
import fcntl
import fractions
import io
import json
import marshal
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from clihelp import CLI, LiveCli, assert_all_gone, json_events, run_cli, worker_pids
from procs import end_session, still_running

from procctl import Outcome, ProcessController
from procctl.clitools import Reporter
from procctl.states import State, WorkerStatus

TESTS = os.path.dirname(__file__)
QUICK_RUN = ["run", "--workers", "3", "--step", "0", "--finish-chance", "0"]
QUICK_SUM = ["sum", "--seed", "1"]
COMMANDS = {"run": QUICK_RUN, "sum": QUICK_SUM}


def strict_json(line: str) -> dict:
    """json.loads that refuses NaN and Infinity, as strict parsers do."""
    def refuse(token: str) -> None:
        raise ValueError(f"invalid JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def with_limit(which: int, soft: int):
    def preexec() -> None:
        _, hard = resource.getrlimit(which)
        resource.setrlimit(which, (soft, hard))
    return preexec


# -- 8: more workers than the system can start --------------------------------------


@pytest.mark.parametrize("args", [["run", "--workers", "99999999999999999999999"],
                                  ["sum", "--producers", "99999999999999999999999"],
                                  ["sum", "--consumers", "10000000"]], ids=lambda a: " ".join(a[:2]))
def test_huge_worker_count_is_one_line_and_exit_2(args):
    res = run_cli(args)
    assert res.returncode == 2 and res.stdout == ""
    line = one_error_line(res.stderr)
    assert "file descriptors" in line and "the limit is" in line


@pytest.mark.parametrize("args", [["run", "--workers", "200"], ["sum", "--producers", "100", "--consumers", "100"]],
                         ids=["run", "sum"])
def test_worker_count_beyond_the_fd_limit_names_the_limit(args):
    res = subprocess.run(CLI + args, capture_output=True, text=True, timeout=30,
                         preexec_fn=with_limit(resource.RLIMIT_NOFILE, 256))
    assert res.returncode == 2 and res.stdout == ""
    line = one_error_line(res.stderr)
    assert "200 workers need about" in line and "file descriptors; the limit is 256" in line


EXECUTOR_AT_THE_LIMIT = """
import resource
from procctl import ProcessController, ProcessExecutor
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
for make in (lambda: ProcessExecutor(40), lambda: ProcessController(print, 40, channels={"c": 0})):
    try:
        make()
    except ValueError as exc:
        print("refused:", exc)
"""


def test_executors_and_channels_count_their_work_links_against_the_fd_limit():
    # A worker with a work link costs the manager about 6 descriptors, not 4: the
    # check let 40 through under 256, and the start failed part-way (worker tracebacks).
    res = subprocess.run([sys.executable, "-c", EXECUTOR_AT_THE_LIMIT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("refused: max_workers=40") and "workers=40" in lines[1], lines
    res = subprocess.run(CLI + ["sum", "--producers", "29", "--consumers", "29"], capture_output=True, text=True,
                         timeout=30, preexec_fn=with_limit(resource.RLIMIT_NOFILE, 256))
    assert res.returncode == 2 and "file descriptors; the limit is 256" in one_error_line(res.stderr)


def test_the_fd_check_lets_through_what_fits():
    # The estimate is not so careful that it refuses what the system can do.
    res = subprocess.run(CLI + ["run", "--workers", "40", "--step", "0", "--quiet"], capture_output=True,
                         text=True, timeout=30, preexec_fn=with_limit(resource.RLIMIT_NOFILE, 256))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("summary: 40 workers")


def test_worker_count_beyond_the_process_limit_names_the_limit(monkeypatch):
    # The kernel exempts root from RLIMIT_NPROC, and the tests may run as
    # root: play a user with 3 processes under a limit of 8.
    from procctl import limits

    monkeypatch.setattr(limits.os, "getuid", lambda: 1000)
    monkeypatch.setattr(limits, "_user_processes", lambda: 3)
    monkeypatch.setattr(limits, "_soft_limit", lambda name: 8 if name == "RLIMIT_NPROC" else None)
    assert limits.capacity_problem(4) is None
    problem = limits.capacity_problem(20)
    assert "20 workers need 20 more processes; the limit is 8" in problem
    with pytest.raises(ValueError, match="workers=20 .*the limit is 8"):
        ProcessController(_noop, 20)


def test_library_refuses_a_worker_count_the_system_cannot_start():
    with pytest.raises(ValueError, match="workers"):
        ProcessController(print, 10**23)


FD_STARVED = """
import os, resource, sys
from procctl import ProcessController, WorkerStartError
sys.path.insert(0, {tests!r})
import targets_cli
resource.setrlimit(resource.RLIMIT_NOFILE, (96, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
pc = ProcessController(targets_cli.idle, 8, start_method={method!r})  # fits: the check passes
hogs = []
try:
    while True:
        hogs.append(os.open(os.devnull, os.O_RDONLY))  # then another part of the program takes the room
except OSError:
    pass
for fd in hogs[-14:]:
    os.close(fd)  # enough to start a few workers, not all
try:
    pc.start()
except WorkerStartError as exc:
    print(exc)
else:
    print("started")
pc.close()
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_start_that_runs_out_of_fds_says_so(method):
    res = subprocess.run([sys.executable, "-c", FD_STARVED.format(tests=TESTS, method=method)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "file descriptors" in res.stdout or "Too many open files" in res.stdout, res.stdout
    assert "cannot be sent to the child" not in res.stdout


def test_a_fork_server_that_cannot_listen_under_a_deep_tmpdir_says_so(tmp_path):
    deep = tmp_path / ("x" * 60) / ("y" * 60)  # past a Unix socket address's 108 bytes
    deep.mkdir(parents=True)
    res = run_cli(QUICK_RUN + ["--start-method", "forkserver"], env={"TMPDIR": str(deep)})
    assert res.returncode == 1, res.stderr
    line = one_error_line(res.stderr)
    assert "set TMPDIR to a shorter one" in line and "cannot be sent to the child" not in line, line

NO_THREAD_ROOM = """
import resource, sys
sys.path.insert(0, {tests!r})
from procctl.cli import main
import procctl.controller, procctl.capture, procctl.control  # what the command needs, before the limit
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 6 * 2**20, resource.RLIM_INFINITY))  # no room for 8 MiB of stack
sys.argv = ["procctl", *{args!r}]
main()
"""


@pytest.mark.parametrize("args", [QUICK_RUN, ["map", "json:dumps", "--items", "-"]], ids=["run", "map"])
def test_no_room_for_a_thread_is_one_line_naming_the_limit(args):
    """ulimit -v (or -u) that leaves no room for a thread: exit 2 and the limit named, as for workers."""
    res = subprocess.run([sys.executable, "-c", NO_THREAD_ROOM.format(tests=TESTS, args=args)],
                         capture_output=True, text=True, timeout=60, input="1\n")
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert "cannot start another thread" in line and "ulimit -v" in line, line


REFUSED_THREAD = """
import sys, threading
sys.path.insert(0, {tests!r})
real = threading.Thread.start
def start(self):
    if self.name == {name!r}:
        raise RuntimeError("can't start new thread")  # what CPython says when pthread_create fails
    real(self)
threading.Thread.start = start  # (fork children inherit it)
from procctl.cli import main
sys.argv = ["procctl", *{args!r}]
main()
"""


@pytest.mark.parametrize("name, args, code, says", [
    ("procctl-capture", QUICK_RUN, 2, "cannot start another thread"),
    ("procctl-control", ["map", "json:dumps", "--items", "-"], 0, "no control socket"),
    ("procctl-executor", ["map", "json:dumps", "--items", "-"], 2, "cannot start another thread"),
    # A worker without its returner thread works on: its queued tasks come back between tasks.
    ("procctl-returner", ["map", "json:dumps", "--items", "-", "--workers", "2"], 0, ""),
    # The command writes its output itself, as it did before it had that thread.
    ("procctl-output", QUICK_RUN + ["--json"], 0, ""),
], ids=["capture", "control", "executor", "returner", "output"])
def test_a_thread_the_system_refuses_is_a_limit_not_a_traceback(name, args, code, says):
    res = subprocess.run([sys.executable, "-c", REFUSED_THREAD.format(tests=TESTS, name=name, args=args)],
                         capture_output=True, text=True, timeout=60, input="1\n2\n3\n")
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr and says in res.stderr, res.stderr
    if args[0] == "map" and code == 0:
        assert sorted(json.loads(line)["result"] for line in res.stdout.splitlines()) == ["1", "2", "3"]
    if code == 0:
        assert "" not in res.stdout.splitlines() and json_events(res.stdout), res.stdout


INNER_EBADF = """
import errno, sys
sys.path.insert(0, {tests!r})
import procctl.capture
def close(self):
    raise OSError(errno.EBADF, "Bad file descriptor")  # a descriptor of the manager's own, not stdout
procctl.capture.OutputCapture.close = close
from procctl.cli import main
sys.argv = ["procctl", *{args!r}]
main()
"""


@pytest.mark.parametrize("args, running", [
    (["run", "--workers", "3", "--step", "0", "--finish-chance", "0", "--schedule", "run", "--json"],
     '"event": "running"'),
    (["sum", "--threshold", "1000000000000", "--json"], '"event": "received"'),
    # (map writes its results from its loop: it waits for the reader from its first line)
    (["map", "json:dumps", "--items", "{items}", "--json"], '"event": "started"'),
], ids=["run", "sum", "map"])
def test_a_stop_signal_is_taken_while_the_output_is_a_full_pipe(args, running, tmp_path):
    """A reader that stops reading held up the controller (its events are written
    while it holds itself) and so the stop: the workers lived on after SIGINT,
    SIGINT and SIGTERM. Now one SIGINT stops the workers and, a second later,
    ends the command, whose output cannot take its last lines."""
    items = tmp_path / "items"
    items.write_text("".join(f"{i}\n" for i in range(200_000)))
    args = [a.format(items=items) for a in args]
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    events = os.open(fifo, os.O_RDWR)  # (opening never blocks, and no end of file comes between writers)
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 4096)  # full before the command writes a byte
    os.set_blocking(w, True)
    proc = subprocess.Popen(CLI + args + ["--events", str(fifo)], stdout=w, stderr=subprocess.PIPE,
                            start_new_session=True, cwd=TESTS)
    os.close(w)
    log = b""

    def read_until(word: bytes, timeout: float = 30.0) -> None:
        nonlocal log
        end = time.monotonic() + timeout
        while word not in log:
            ready, _, _ = select.select([events], [], [], max(0.0, end - time.monotonic()))
            assert ready, (word, log[-300:])
            log += os.read(events, 65536)

    try:
        read_until(running.encode())
        pids = [p.pid for p in psutil.Process(proc.pid).children()]
        proc.send_signal(signal.SIGINT)
        read_until(b'"event": "summary"')  # every worker stopped and reaped, the output still full
        assert not still_running(pids, timeout=10)
        _, err = proc.communicate(timeout=20)  # the reader gets 1 s more after the stop, then the command ends
        assert proc.returncode == 130, err
        assert "Traceback" not in err.decode()
    finally:
        end_session(proc)
        os.close(r)
        os.close(events)


OUTPUT_BACKLOG_SCRIPT = """
import contextlib, fcntl, json, os, sys, threading
r, w = os.pipe()
fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
os.set_blocking(w, False)
with contextlib.suppress(BlockingIOError):
    while True:
        os.write(w, b"x" * 4096)
os.set_blocking(w, True)
os.dup2(w, 1)  # the standard output: a pipe its reader no longer reads
from procctl.clitools import OUTPUT_BACKLOG, Reporter

class Bridge:  # what the reporter asks of the command's signal bridge
    stopping = False
    nudges = []
    def stop_requested(self):
        return self.stopping
    def listen(self, nudge):
        self.nudges.append(nudge)

class Line:
    def prefixed(self):
        return "x" * 999 + "\\n"

bridge = Bridge()
reporter = Reporter(background=True)
reporter.watch(bridge)
flood = threading.Thread(target=lambda: [reporter.passthrough(Line()) for _ in range(10000)], daemon=True)
flood.start()  # 10 MB of a worker's output
flood.join(1.0)
held, backlog = flood.is_alive(), reporter._backlog
bridge.stopping = True  # SIGINT
for nudge in bridge.nudges:
    nudge()
flood.join(20)
print(json.dumps({"held": held, "backlog": backlog, "limit": OUTPUT_BACKLOG, "ended": not flood.is_alive(),
                  "dropped": reporter._dropped}), file=sys.stderr, flush=True)
os._exit(0)
"""


def test_output_a_reader_does_not_take_waits_for_it_in_bounded_memory_until_a_stop():
    """The background writer keeps at most OUTPUT_BACKLOG unwritten: past it a
    worker's output waits for the reader (as a blocked write did), and once a
    stop was asked for, what comes is dropped instead (it grew by 100 MB a
    second with a flooding worker and a reader that had stopped)."""
    res = subprocess.run([sys.executable, "-c", OUTPUT_BACKLOG_SCRIPT], capture_output=True, text=True, timeout=60)
    got = json.loads(res.stderr.strip().splitlines()[-1])
    assert got["held"] and got["backlog"] <= got["limit"] + 1000, got
    assert got["ended"] and got["dropped"] > 0, got


def test_an_error_of_the_commands_own_is_not_called_an_output_error():
    res = subprocess.run([sys.executable, "-c", INNER_EBADF.format(tests=TESTS, args=QUICK_RUN)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert one_error_line(res.stderr) == "procctl: error: Bad file descriptor"


def test_a_removed_current_directory_is_no_output_error(tmp_path):
    """A command run in a directory that was removed: what it needs is elsewhere,
    and spawn workers (which multiprocessing starts from that directory) say so."""
    gone = tmp_path / "gone"
    gone.mkdir()
    # CPython 3.13.0 itself cannot `import socket` there (SystemError in os._get_exports_list),
    # before any line of procctl runs: not procctl's to mend.
    probe = subprocess.run([sys.executable, "-c", "import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]);"
                            " import socket", str(gone)], capture_output=True, text=True, timeout=30)
    if "SystemError" in probe.stderr:
        pytest.skip(f"this Python cannot import socket from a removed directory: {probe.stderr.splitlines()[-1]}")
    assert probe.returncode == 0, probe.stderr
    gone.mkdir()
    cli = [sys.executable, "-c", "import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]);"
           " sys.argv = ['procctl', *sys.argv[2:]]; from procctl.cli import main; main()", str(gone)]
    res = subprocess.run(cli + ["map", "json:dumps", "--items", "-"], capture_output=True, text=True,
                         timeout=60, input="1\n")
    assert res.returncode == 0 and json.loads(res.stdout)["result"] == "1", res.stderr
    gone.mkdir()
    res = subprocess.run(cli + QUICK_RUN + ["--start-method", "spawn"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    line = one_error_line(res.stderr)
    assert "current directory no longer exists" in line and "cannot be sent" not in line, line


# -- 9: an event log that cannot be written -----------------------------------------


@pytest.mark.parametrize("command", ["run", "sum"])
def test_events_to_dev_full_is_one_warning_and_the_run_goes_on(command):
    res = run_cli(COMMANDS[command] + ["--json", "--events", "/dev/full"])
    assert res.returncode == 0
    line = one_error_line(res.stderr)
    assert "event log" in line and "/dev/full" in line
    assert strict_json(res.stdout.splitlines()[-1])["event"] == "summary"


@pytest.mark.parametrize("args", [["run", "--workers", "20", "--step", "0", "--finish-chance", "0"],
                                  ["sum", "--seed", "1", "--threshold", "300"]], ids=["run", "sum"])
def test_a_disk_that_fills_mid_run_is_one_warning(args, tmp_path):
    log = tmp_path / "events.jsonl"
    # RLIMIT_FSIZE makes files "full" at 4 KiB (writes then fail with EFBIG):
    # room for the controller's one-page board, not for the whole log. The
    # run writes no bytecode: CPython would cache a .pyc cut at 4 KiB, and
    # every later import of that module in the suite would fail.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(CLI + args + ["--json", "--events", str(log)], capture_output=True, env=env,
                         text=True, timeout=60, preexec_fn=with_limit(resource.RLIMIT_FSIZE, 4096))
    assert res.returncode == 0, res.stderr
    line = one_error_line(res.stderr)
    assert "event log" in line and "could not be written" in line
    events = [strict_json(line) for line in res.stdout.splitlines()]
    assert events[-1]["event"] == "summary" and len("\n".join(res.stdout)) > 4096
    assert 0 < log.stat().st_size <= 4096


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_under_a_file_size_limit_no_bytecode_is_cut_short(tmp_path, start_method):
    """CPython caches a .pyc cut at the limit (it does not check its write),
    and every later import of that module fails ("marshal data too short"):
    under `ulimit -f`, the command and its workers write no bytecode."""
    # A copy of the package with no bytecode yet: every module would be written afresh.
    shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "procctl"),
                    tmp_path / "procctl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-m", "procctl"] + QUICK_RUN + ["--start-method", start_method],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
                         preexec_fn=with_limit(resource.RLIMIT_FSIZE, 4096))
    assert res.returncode == 0, res.stderr
    written = {str(p.relative_to(tmp_path)): p.read_bytes() for p in (tmp_path / "procctl").rglob("*.pyc")}
    cut = []
    for name, data in written.items():
        try:
            marshal.loads(data[16:])
        except (EOFError, ValueError):
            cut.append(name)
    assert cut == [], cut
    # Only what loads before procctl's first line: the package and its __main__, both small.
    assert {os.path.basename(name).split(".")[0] for name in written} <= {"__init__", "__main__"}, sorted(written)


@pytest.mark.parametrize("args", [QUICK_RUN, QUICK_SUM, ["map", "json:dumps", "--items", "-"]],
                         ids=["run", "sum", "map"])
def test_a_file_size_limit_below_the_shared_memory_says_so(args):
    """`ulimit -f 2` counts for the memfds the workers share: the error says
    which and why (it was "[Errno 27] File too large"), as the last line, with
    no traceback, and nothing runs."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # (see test_a_disk_that_fills_mid_run_is_one_warning)
    res = subprocess.run(CLI + args + ["--quiet"], capture_output=True, text=True, timeout=60, env=env, input="1\n",
                         preexec_fn=with_limit(resource.RLIMIT_FSIZE, 2048))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "shared" in errors[0] and "the file size limit (ulimit -f) is lower" in errors[0], \
        res.stderr
    assert "[Errno" not in errors[0]


# -- 10: progress values, the live view, strict JSON ------------------------------


def _a_count(value) -> bool:
    """What progress() takes: a real number (not a bool), finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, fractions.Fraction, decimal.Decimal)):
        return False
    try:
        return 0 <= float(value) < float("inf")
    except OverflowError:  # an int past the float range
        return False


def test_progress_accepts_finite_non_negative_numbers_and_names_the_rest():
    from targets_cli import PROGRESS_CASES, report_progress

    with ProcessController(report_progress, len(PROGRESS_CASES), start_method="fork") as pc:
        pc.run()
        assert pc.wait(timeout=30)
        reports = pc.stop()
    for wid, (done, total) in enumerate(PROGRESS_CASES):
        report = reports[wid]
        bad = [name for name, value in (("done", done), ("total", total))
               if value is not None and not _a_count(value)]
        if bad:
            assert report.outcome is Outcome.FAILED, (done, total)
            assert report.error_line.startswith(f"ValueError: progress(): {bad[0]} must be a finite number")
        else:
            assert report.outcome is Outcome.FINISHED and report.result == "reported", report.error


def test_live_view_draws_totals_past_the_float_range():
    from rich.console import Console

    from procctl.live import LiveView

    rows = [WorkerStatus(i, None, State.RUNNING, True, None, 0.5e308, 1e308, 1e307, 5.0) for i in range(4)]
    rows.append(WorkerStatus(4, None, State.RUNNING, True, None, 1.0, float("inf"), float("inf"), float("inf")))
    console = Console(file=io.StringIO(), width=100, height=30)
    console.print(LiveView(lambda: rows, "t", console=console).render(rows))
    assert "50.0%" in console.file.getvalue()


def test_live_view_shows_brackets_in_info_as_they_are():
    # rich would read them as markup: "[/]" raised MarkupError and ended the run, "[red]" vanished.
    from rich.console import Console

    from procctl.live import LiveView

    rows = [WorkerStatus(0, None, State.RUNNING, True, None, 1.0, 10.0, info={"note": "[/]", "file": "[red]x"})]
    console = Console(file=io.StringIO(), width=100, height=30)
    console.print(LiveView(lambda: rows, "t", console=console).render(rows))
    assert "note=[/] file=[red]x" in console.file.getvalue()


def test_worker_output_after_the_live_view_closed_is_still_shown():
    # The capture drains what the workers wrote last once they ended, after the
    # view closed: those lines were dropped, neither shown nor counted.
    from rich.console import Console

    from procctl.capture import Output
    from procctl.live import MAX_LINES_SHOWN, LiveView

    console = Console(file=io.StringIO(), width=100, height=30, force_terminal=True)
    view = LiveView(lambda: [], "t", console=console)
    with view:
        pass
    lines = [f"line {i}" for i in range(MAX_LINES_SHOWN + 5)] + ["LAST-LINE"]
    view.output(Output(0, 1, "\n".join(lines) + "\n"))
    out = console.file.getvalue()
    assert "[0] LAST-LINE" in out and "[procctl] 6 lines of worker 0's output not shown" in out


def test_a_lone_surrogate_in_a_line_does_not_end_the_output():
    # An error naming a file with an undecodable byte (os.fsdecode): the human
    # output stopped there, as if stdout's reader had gone (no failed line, no summary).
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    reporter = Reporter(stream=stream)
    reporter.emit({"event": "failed"}, "worker 0: failed: cannot parse data-\udcff.csv")
    reporter.summary({"event": "summary"}, "summary: 1 failed")
    assert raw.getvalue().decode() == "worker 0: failed: cannot parse data-\\udcff.csv\nsummary: 1 failed\n"


def test_json_lines_never_hold_nan_or_infinity():
    out = io.StringIO()
    reporter = Reporter(json_lines=True, stream=out)
    reporter.emit({"event": "x", "done": float("nan"), "total": float("inf"), "more": [float("-inf"), 1.5]}, None)
    assert strict_json(out.getvalue()) == {"event": "x", "done": None, "total": None, "more": [None, 1.5]}


def test_run_with_huge_totals_writes_strict_json(tmp_path):
    log = tmp_path / "events.jsonl"
    res = run_cli(["run", "--workers", "3", "--target", "targets_cli:huge_totals", "--step", "0.1",
                   "--json", "--events", str(log)], cwd=TESTS)
    assert res.returncode == 0, res.stderr
    for text in (res.stdout, log.read_text()):
        events = [strict_json(line) for line in text.splitlines()]
        assert events[-1]["outcomes"] == {"stopped": 3}
        assert any(e.get("total") == 1e308 for e in events)


# -- 11: signals at any moment --------------------------------------------------


def _launch(args: list[str], events: str, blocked: bool = False) -> subprocess.Popen:
    def block() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

    return subprocess.Popen(CLI + args + ["--events", events], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=block if blocked else None)


def _assert_clean_stop(proc: subprocess.Popen, code: int, events: str) -> None:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err.decode()
    assert b"Traceback" not in err
    log = [strict_json(line) for line in open(events).read().splitlines()]
    assert log and log[-1]["event"] in ("summary", "cancelled"), log
    assert_all_gone(worker_pids(log))


SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]
RUN_ARGS = {"run": ["run", "--workers", "2", "--schedule", "run", "--step", "0.2", "--finish-chance", "0", "--json"],
            "sum": ["sum", "--threshold", "10000", "--delay", "0.05", "--json"]}


@pytest.mark.parametrize("command", ["run", "sum"])
@pytest.mark.parametrize("sig, code", SIGNALS + [(signal.SIGHUP, 129)], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_before_the_handlers_exist_is_a_clean_stop(command, sig, code, tmp_path):
    # Blocked by the parent, the signal is pending from procctl's first
    # instruction: it arrives before any handler of the command exists.
    events = str(tmp_path / "events.jsonl")
    proc = _launch(RUN_ARGS[command], events, blocked=True)
    try:
        os.killpg(proc.pid, sig)
        _assert_clean_stop(proc, code, events)
    finally:
        proc.kill()
        proc.wait(10)


def _died_before_procctl_ran(proc: subprocess.Popen, sig: int, err: bytes) -> bool:
    """The signal hit the interpreter's own start-up, before any procctl code
    ran: a death by the signal (a shell reports 128+N, as we do), or for
    SIGINT CPython's own KeyboardInterrupt from site or runpy."""
    if proc.returncode == -sig:
        return True
    return sig == signal.SIGINT and proc.returncode == 1 and b"/procctl/" not in err


@pytest.mark.parametrize("command", ["run", "sum"])
@pytest.mark.parametrize("sig, code", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_a_random_moment_is_a_clean_stop(command, sig, code, tmp_path):
    # Four runs get the signal at random moments of their first 0.6 s (start-up,
    # argument checks, workers starting, running); a fifth once it is running.
    runs = []
    for i in range(5):
        events = str(tmp_path / f"events{i}.jsonl")
        runs.append((_launch(RUN_ARGS[command], events), events, random.uniform(0.0, 0.6) if i else None))
    reached = 0
    try:
        running = runs[0][0]
        ready, _, _ = select.select([running.stdout], [], [], 30)  # its first event: it runs
        assert ready, "procctl never started"
        os.killpg(running.pid, sig)
        t0 = time.monotonic()
        for proc, _, delay in sorted(runs[1:], key=lambda r: r[2]):
            # Bounded pacing of the signal times (the random delays under test).
            time.sleep(max(0.0, t0 + delay - time.monotonic()))
            os.killpg(proc.pid, sig)
        for proc, events, _ in runs:
            out, err = proc.communicate(timeout=30)
            if _died_before_procctl_ran(proc, sig, err):
                assert not out
                continue
            reached += 1
            assert proc.returncode == code, err.decode()
            assert b"Traceback" not in err
            log = [strict_json(line) for line in open(events).read().splitlines()]
            assert log and log[-1]["event"] in ("summary", "cancelled"), (log[-3:], err.decode())
            assert_all_gone(worker_pids(log))
    finally:
        for proc, _, _ in runs:
            proc.kill()
            proc.wait(10)
    assert reached, "not even the running one counted"


def test_second_signal_while_spawn_workers_start_exits_130(tmp_path):
    gate = str(tmp_path / "gate")
    os.mkfifo(gate + ".arrived")
    os.mkfifo(gate + ".hold")
    arrived = os.open(gate + ".arrived", os.O_RDONLY | os.O_NONBLOCK)
    env = dict(os.environ, PROCCTL_TEST_GATE=gate)
    cli = LiveCli(["run", "--workers", "3", "--start-method", "spawn", "--target", "targets_cli:idle",
                   "--json"], cwd=TESTS, env=env)
    try:
        ready, _, _ = select.select([arrived], [], [], 30)
        assert ready, "no worker began to start"
        os.kill(cli.proc.pid, signal.SIGINT)  # a stop, while the workers are starting
        cli.wait_for(lambda lines: b"stopping the workers" in cli.err)
        os.kill(cli.proc.pid, signal.SIGINT)  # and the second: kill them at once
        rc, out, err = cli.finish(timeout=30)
    finally:
        os.close(arrived)
        cli.kill()
    assert rc == 130, err
    assert "importable" not in err and "Traceback" not in err
    summary = json_events(out)[-1]
    # (A worker that came up before the second signal stopped as the first asked: seen once under load.)
    assert summary["event"] == "summary" and set(summary["outcomes"]) <= {"killed", "failed", "crashed", "stopped"}


@pytest.mark.parametrize("gap", [0.03, 0.05])
def test_a_signal_while_the_command_exits_is_its_exit_status_not_its_death(gap):
    # The second SIGTERM kills at once, and the command ends within tens of ms:
    # a signal then lands in the interpreter's shutdown, which has put the
    # default actions back (it died by SIGTERM, -15, every time).
    cli = LiveCli(["run", "--workers", "4", "--step", "0.2"], cwd=TESTS)
    try:
        cli.wait_for(lambda lines: sum("running" in line for line in lines) >= 4)
        os.kill(cli.proc.pid, signal.SIGTERM)
        time.sleep(gap)  # the moment under test, not a synchronisation
        os.kill(cli.proc.pid, signal.SIGTERM)
        rc, _, err = cli.finish(timeout=30)
    finally:
        cli.kill()
    assert rc == 143, err
    assert "Traceback" not in err


def test_a_pause_nobody_acknowledges_gives_way_to_timeout():
    # A worker that closed its descriptors never acknowledges the pause: the
    # schedule's wait for it (2 s) must not hold up --timeout.
    res = run_cli(["run", "--target", "targets_hardening:close_fds_and_sleep", "--workers", "1",
                   "--schedule", "run,pause", "--step", "0.2", "--timeout", "1.2", "--grace", "0.2", "--json"],
                  timeout=30, cwd=TESTS)
    assert res.returncode == 124, res.stderr
    summary = json_events(res.stdout)[-1]
    assert summary["outcomes"] == {"killed": 1}
    # The run's own clock (the interpreter's start-up, slow on a loaded machine, is not in it):
    # about 1.5 s; it waited out the pause's 2 s first: about 2.6 s.
    assert summary["elapsed"] < 2.3, summary


# -- 12: broken and closed output streams ------------------------------------------


@pytest.mark.parametrize("command", ["run", "sum"])
def test_sigterm_while_stderr_is_a_broken_pipe_exits_143(command):
    args = {"run": ["run", "--workers", "2", "--schedule", "run", "--step", "0", "--finish-chance", "0"],
            "sum": ["sum", "--threshold", "10000", "--delay", "0.05"]}[command]
    cli = LiveCli(args + ["--json"])
    try:
        cli.wait_for(lambda lines: any('"running"' in line or '"received"' in line for line in lines))
        cli.proc.stderr.close()  # nobody reads stderr any more
        cli._sel.unregister(cli.proc.stderr)
        os.kill(cli.proc.pid, signal.SIGTERM)
        out, _ = cli.proc.communicate(timeout=30)
    finally:
        cli.kill()
    assert cli.proc.returncode == 143
    events = json_events("\n".join(cli.lines) + "\n" + out.decode())
    assert events[-1]["event"] in ("summary", "cancelled")
    assert_all_gone(worker_pids(events))


@pytest.mark.parametrize("stream", [1, 2], ids=["stdout", "stderr"])
@pytest.mark.parametrize("command", ["run", "sum"])
def test_a_closed_output_stream_is_not_a_crash(command, stream, tmp_path):
    log = tmp_path / "events.jsonl"
    res = subprocess.run(CLI + COMMANDS[command] + ["--events", str(log)], capture_output=True, text=True,
                         timeout=60, preexec_fn=lambda: os.close(stream))
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert strict_json(log.read_text().splitlines()[-1])["event"] == "summary"


@pytest.mark.parametrize("command", ["run", "sum", "map"])
def test_output_to_a_full_device_is_one_error_line_and_exit_1(command, tmp_path):
    """Output that cannot be written (a full disk): one line, exit 1, as GNU tools
    do; a short output was lost silently (exit 0), a long one failed mid-run."""
    args = ["map", "math:sqrt"] if command == "map" else COMMANDS[command] + ["--json"]
    with open("/dev/full", "w") as full:
        res = subprocess.run(CLI + args, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                             input="1\n4\n", cwd=str(tmp_path))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    lost = [line for line in res.stderr.splitlines() if "cannot be written" in line or "cannot write" in line]
    assert len(lost) == 1 and "No space left on device" in lost[0], res.stderr


@pytest.mark.parametrize("command", ["run", "sum", "map"])
def test_stderr_on_a_full_device_does_not_change_the_exit_status(command, tmp_path):
    """Stderr is no output: the story and the summary a command writes there
    are dropped when it is full, and the job's exit status stays (map said 1)."""
    args = ["map", "math:sqrt"] if command == "map" else COMMANDS[command]
    with open("/dev/full", "w") as full:
        res = subprocess.run(CLI + args, stdout=subprocess.DEVNULL, stderr=full, timeout=60,
                             input="1\n4\n", text=True, cwd=str(tmp_path))
    assert res.returncode == 0


def test_a_trace_on_a_full_disk_is_named():
    res = run_cli(QUICK_RUN + ["--trace", "/dev/full"])
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert "--trace '/dev/full' cannot be written (No space left on device)" in res.stderr


# -- 13: targets that exit or interrupt at import; library arguments ---------------


@pytest.mark.parametrize("body, says", [("import sys\nsys.exit(5)\n", "sys.exit(5)"),
                                        ("raise KeyboardInterrupt\n", "KeyboardInterrupt"),
                                        ("raise SystemExit\n", "sys.exit(None)")])
def test_target_module_that_exits_at_import_is_bad_input(body, says, tmp_path):
    (tmp_path / "leaves.py").write_text(body + "def f(ctx):\n    pass\n")
    res = run_cli(["run", "--target", "leaves:f"], cwd=str(tmp_path))
    assert res.returncode == 2 and res.stdout == ""
    line = one_error_line(res.stderr)
    assert "leaves" in line and says in line



def test_a_run_target_that_cannot_take_the_context_is_bad_input():
    res = run_cli(["run", "--workers", "2", "--step", "0", "--target", "os:getpid"])
    assert res.returncode == 2 and res.stdout == ""
    assert "'os:getpid' must take one argument (its WorkerContext)" in one_error_line(res.stderr)


# An address-space limit of 2 GiB: inputs may take a quarter of it (512 MiB).
SPACE = 2 << 30
ENDLESS = [(["timeline", "/dev/zero", "-o", "{tmp}/o.html"], None, "the event log '/dev/zero'"),
           (["map", "maptargets:mark", "--items", "/dev/zero"], None, "--items '/dev/zero'"),
           (["map", "maptargets:mark"], "/dev/zero", "--items from stdin"),
           (["map", "maptargets:mark", "--items", "{tmp}/sparse"], None, "--items '{tmp}/sparse'"),
           (["timeline", "{tmp}/sparse", "-o", "{tmp}/o.html"], None, "the event log '{tmp}/sparse'")]


@pytest.mark.parametrize("args, stdin, names", ENDLESS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_an_input_without_end_is_one_line_and_exit_2(args, stdin, names, tmp_path):
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(SPACE // 4 + 1)  # measured before it is read: no byte of it is
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with open(stdin or os.devnull, "rb") as source:
        res = subprocess.run(CLI + args, stdin=source, capture_output=True, text=True, timeout=60,
                             cwd=TESTS, preexec_fn=with_limit(resource.RLIMIT_AS, SPACE))
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr)
    assert f"{names.replace('{tmp}', str(tmp_path))} is too large to read: over 512 MiB" in line


@pytest.mark.parametrize("args", [["timeline", "/dev/stdin", "-o", "{tmp}/o.html"], ["map", "maptargets:mark"]],
                         ids=["timeline", "map"])
def test_a_signal_while_an_input_trickles_in_ends_the_command(args, tmp_path):
    proc = subprocess.Popen(CLI + [a.replace("{tmp}", str(tmp_path)) for a in args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=TESTS, start_new_session=True)
    try:
        # A pipe holds 64 KiB: once 4 MiB went in, the command is in its read loop.
        proc.stdin.write(b"1\n" * (2 << 20))
        proc.stdin.flush()
        proc.send_signal(signal.SIGINT)  # it waits for more (the pipe stays open): the signal ends the wait
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"workers" not in err and out == b""


LEAVES_A_THREAD = """
import threading
threading.Thread(target=threading.Event().wait, name="left-behind").start()  # not a daemon: it never ends
def f(ctx):
    return 1
def g(item):
    return item
"""


@pytest.mark.parametrize("args", [["run", "--workers", "2", "--target", "leaves:f"], ["map", "leaves:g"]],
                         ids=["run", "map"])
def test_a_thread_the_target_module_leaves_in_the_manager_does_not_hold_the_exit(args, tmp_path):
    # procctl imports the target's module too: the interpreter waited for its
    # thread at exit, for ever, with the signals held: only a SIGKILL ended it.
    (tmp_path / "leaves.py").write_text(LEAVES_A_THREAD)
    res = run_cli(args, cwd=str(tmp_path), input="1\n", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "left-behind" in res.stderr


def _noop(ctx):
    return None


@pytest.mark.parametrize("kwargs, error, name", [
    ({"on_event": 5}, TypeError, "on_event"),
    ({"args": "ab"}, TypeError, "args"),
    ({"args": b"ab"}, TypeError, "args"),
    ({"args": iter([1, 2])}, TypeError, "args"),
    ({"args": {1, 2}}, TypeError, "args"),
    ({"kwargs": [("a", 1)]}, TypeError, "kwargs"),
    ({"kwargs": {1: "a"}}, TypeError, "kwargs"),
], ids=["on_event=5", "args=str", "args=bytes", "args=iterator", "args=set", "kwargs=list", "kwargs=int-key"])
def test_library_rejects_bad_arguments_by_name(kwargs, error, name):
    with pytest.raises(error, match=name):
        ProcessController(_noop, 2, **kwargs)


@pytest.mark.parametrize("call", ["initial_state", "broadcast"])
@pytest.mark.parametrize("value", [True, False])
def test_a_bool_is_not_a_state(call, value):
    # State(False) is STOPPED and State(True) PAUSED: a bool slipped through as a command.
    if call == "initial_state":
        with pytest.raises(TypeError, match="initial_state"):
            ProcessController(_noop, 1, initial_state=value)
        return
    with ProcessController(_noop, 1) as pc:
        with pytest.raises(TypeError, match="state"):
            pc.broadcast(value)
        assert {s.state for s in pc.status()} == {State.PAUSED}


def test_library_accepts_a_list_of_args_and_a_mapping_of_kwargs():
    from types import MappingProxyType

    ProcessController(_noop, 1, args=[1, 2], kwargs=MappingProxyType({"a": 1})).close()


def test_wait_before_start_is_an_error():
    pc = ProcessController(_noop, 1)
    for wait in (pc.wait, lambda: pc.wait_ended(0.1)):
        with pytest.raises(RuntimeError, match="not started"):
            wait()
    pc.close()
    assert pc.wait() is True  # closed: nothing left to wait for


def test_the_command_holds_every_operator_signal_from_its_first_line():
    """procctl's entry point blocks each signal the command acts on before it
    loads anything (a SIGHUP 0.06-0.15 s in killed it by its default action)."""
    code = ("import signal, procctl.cli as cli\n"
            "cli.main = lambda: print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))\n"
            "import procctl.__main__ as entry\n"
            "entry.main()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    held = set(json.loads(res.stdout))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        assert int(sig) in held, (sig, held)
    import procctl.__main__
    from procctl.threads import MANAGED_SIGNALS

    assert procctl.__main__.HELD == MANAGED_SIGNALS  # (spelt out there: blocked before any import)


HANGUP_ARGS = {"run": ["run", "--workers", "2", "--schedule", "run", "--step", "0.2", "--finish-chance", "0"],
               "sum": ["sum", "--threshold", "100000000", "--delay", "0.05"],
               "map": ["map", "maptargets:nap", "--workers", "2"]}


@pytest.mark.parametrize("command", sorted(HANGUP_ARGS))
def test_a_terminal_that_goes_away_stops_the_run_and_its_log_ends(command, tmp_path):
    """The terminal closes under a live view: SIGHUP, a graceful stop (129),
    and the event log still gets its summary (the view's last draw on the dead
    terminal, EIO, cut the command short of it)."""
    import pty

    events = tmp_path / "events.jsonl"
    args = HANGUP_ARGS[command] + ["--events", str(events)]
    if command == "map":
        items = tmp_path / "items.jsonl"
        items.write_text("".join(json.dumps({"n": i, "s": 0.3}) + "\n" for i in range(20)))
        args += ["--items", str(items)]
    pid, fd = pty.fork()
    if pid == 0:  # the child: procctl on its own terminal, as a person starts it
        try:
            os.chdir(TESTS)
            os.environ.update(COLUMNS="100", LINES="30", XDG_RUNTIME_DIR=str(tmp_path))
            os.execv(sys.executable, [sys.executable, "-m", "procctl"] + args)
        finally:
            os._exit(127)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"keys: p pause" not in seen:  # its live view is up
            assert time.monotonic() < deadline, seen[-500:]
            if select.select([fd], [], [], deadline - time.monotonic())[0]:
                try:
                    seen += os.read(fd, 65536)
                except OSError:
                    break
        os.close(fd)  # the terminal goes away
        fd = -1
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if fd >= 0:
            os.close(fd)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 129
    log = [strict_json(line) for line in events.read_text().splitlines()]
    assert log[-1]["event"] == "summary", log[-3:]
    if command == "run":
        assert_all_gone(worker_pids(log))


SLOW_IMPORT = ("import sys, time\nprint('importing', file=sys.stderr, flush=True)\ntime.sleep(1000)\n\n\n"
               "def f(arg):\n    return 1\n")


@pytest.mark.parametrize("command", ["run", "map"])
@pytest.mark.parametrize("how", ["SIGTERM", "--timeout"])
def test_a_target_module_that_blocks_as_it_imports_gives_way_to_a_stop(command, how, tmp_path):
    """The target's module blocks while it imports (a sleep, a network call):
    a SIGTERM or --timeout still ends the command, none started (it ignored
    both until a SIGKILL)."""
    (tmp_path / "slow_import.py").write_text(SLOW_IMPORT)
    (tmp_path / "items.jsonl").write_text("1\n2\n")
    args = (["run", "--workers", "2", "--target", "slow_import:f", "--schedule", "run"] if command == "run"
            else ["map", "slow_import:f", "--items", str(tmp_path / "items.jsonl"), "--workers", "2"])
    if how == "--timeout":
        args += ["--timeout", "1"]
    proc = subprocess.Popen(CLI + args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)})
    seen = b""
    try:
        if how == "SIGTERM":
            while b"importing" not in seen:  # the module says it is in its import (which sleeps 1000 s)
                assert select.select([proc.stderr], [], [], 20)[0], seen
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, seen
                seen += chunk
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        err = seen + err
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == (143 if how == "SIGTERM" else 124), err
    assert b"while 'slow_import' was importing: no worker started" in err, err
    assert b"Traceback" not in err
    if command == "run":
        assert b"none started" in out
    else:  # (its items file is read whole: the summary says what it leaves undone)
        assert b"0 done, 0 failed, 2 unfinished" in err


def test_an_output_under_a_file_says_it_is_not_a_directory(tmp_path):
    # It said "directory ... does not exist" of a file that exists.
    (tmp_path / "notes.txt").write_text("")
    res = run_cli(["run", "--workers", "1", "--schedule", "stop", "--events", str(tmp_path / "notes.txt" / "x")])
    assert res.returncode == 2 and res.stderr.splitlines() == [
        f"procctl: error: --events {str(tmp_path / 'notes.txt' / 'x')!r}: {str(tmp_path / 'notes.txt')!r}"
        " is not a directory"], res.stderr
