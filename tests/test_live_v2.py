"""The live view, version 2: worker output above the view, keys, the stop's countdown, narrow terminals."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import selectors
import struct
import subprocess
import termios
import time

import pytest
from clihelp import CLI, run_cli

from procctl.states import State, WorkerStatus

TESTS = os.path.dirname(os.path.abspath(__file__))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Pty:
    """`procctl ...` on a pseudo-terminal of the given size."""

    def __init__(self, args, tmp_path, cols=120, rows=40):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows),
               "XDG_RUNTIME_DIR": str(tmp_path)}
        self.proc = subprocess.Popen(CLI + args, stdin=slave, stdout=slave, stderr=slave, cwd=TESTS, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.raw = b""

    @property
    def text(self):
        return ANSI.sub("", self.raw.decode(errors="replace")).replace("\r", "\n")

    def wait_for(self, what, timeout=20, since=0):
        """Block until `what` (a string, or a compiled regular expression) is on
        the screen, in what came after byte `since` of it."""
        def seen():
            text = ANSI.sub("", self.raw[since:].decode(errors="replace"))
            return what in text if isinstance(what, str) else what.search(text)

        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.master, selectors.EVENT_READ)
            while not seen():
                left = deadline - time.monotonic()
                assert left > 0, f"no {what!r} on the screen; last: {self.text[-1500:]}"
                if sel.select(left) and not self._read():
                    raise AssertionError(f"ended before {what!r}: {self.text[-1500:]}")

    def _read(self):
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the other side is closed
            return False
        self.raw += chunk
        return bool(chunk)

    def key(self, ch):
        os.write(self.master, ch.encode())

    def finish(self, timeout=30):
        deadline = time.monotonic() + timeout
        while self._read():
            assert time.monotonic() < deadline, "the run did not end"
        code = self.proc.wait(timeout=max(1, deadline - time.monotonic()))
        os.close(self.master)
        return code

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)


@pytest.fixture
def screen(tmp_path):
    made = []

    def make(args, **size):
        made.append(Pty(args, tmp_path, **size))
        return made[-1]

    yield make
    for p in made:
        p.kill()


def test_chatty_workers_never_tear_a_line_and_keys_p_r_s_work(screen):
    term = screen(["run", "--workers", "2", "--target", "targets_control:chatty", "--schedule", "run",
                   "--step", "0", "--name", "chat"])
    term.wait_for("processed item 1999")  # both workers wrote everything; the view goes on
    term.wait_for("keys: p pause")
    term.key("p")
    term.wait_for("paused every worker")
    term.key("r")
    term.wait_for("resumed every worker")
    term.key("s")
    assert term.finish() == 0
    text = term.text
    assert "run chat" in text and f"pid {term.proc.pid}" in text and "chat.sock" in text  # the footer
    lines = [seg.strip() for seg in text.split("\n") if "processed item" in seg]
    hidden = sum(int(n) for n in re.findall(r"\[procctl\] (\d+) lines of worker \d's output not shown", text))
    assert len(lines) + hidden == 4000  # each line shown once whole, or counted
    assert len(lines) >= 400
    for line in lines:
        assert re.fullmatch(r"\[(\d)\] worker \1 processed item \d+", line), repr(line)
    assert "summary: 2 workers, 2 stopped" in text


def ignoring(term):
    """Both workers ignore SIGTERM (a key before that stopped one that had not yet
    begun its target: "stopped", and no countdown)."""
    term.wait_for("worker 0 ignores SIGTERM")
    term.wait_for("worker 1 ignores SIGTERM")


def test_q_stops_at_once_and_the_countdown_shows_during_a_grace(screen):
    term = screen(["run", "--workers", "2", "--target", "targets:ignore_stop_and_say", "--schedule", "run",
                   "--step", "0", "--grace", "1.5"])
    term.wait_for("keys: p pause")
    ignoring(term)
    term.key("s")
    term.wait_for("grace period left; still running: 0, 1")
    assert term.finish() == 1  # the workers ignored the stop: killed after the grace
    assert "2 killed" in term.text

    term = screen(["run", "--workers", "2", "--target", "targets:ignore_stop_and_say", "--schedule", "run",
                   "--step", "0", "--grace", "30"])
    term.wait_for("keys: p pause")
    ignoring(term)
    started = time.monotonic()
    term.key("q")
    assert term.finish() == 1
    assert time.monotonic() - started < 15  # not the 30 s grace
    assert "stopping now" in term.text or "2 killed" in term.text

    # q while a graceful stop waits out its grace: it is cut short, not waited out.
    term = screen(["run", "--workers", "2", "--target", "targets:ignore_stop_and_say", "--schedule", "run",
                   "--step", "0", "--grace", "30"])
    term.wait_for("keys: p pause")
    ignoring(term)
    term.key("s")
    term.wait_for("grace period left; still running: 0, 1")
    started = time.monotonic()
    term.key("q")
    assert term.finish() == 1
    assert time.monotonic() - started < 15
    assert "2 killed" in term.text

    # Workers that checkpoint stop cleanly on q: exit 0.
    term = screen(["run", "--workers", "2", "--schedule", "run", "--step", "0", "--finish-chance", "0"])
    term.wait_for("keys: p pause")
    term.key("q")
    assert term.finish() == 0
    assert "2 stopped" in term.text


def test_q_is_read_while_a_shrink_waits_for_its_worker(screen):
    """The - key's shrink waits for the removed worker (here one that ignores the
    stop: the whole 30 s grace); the keys were not read meanwhile, so q took
    the grace too."""
    term = screen(["run", "--workers", "2", "--target", "targets:ignore_stop_and_say", "--schedule", "run",
                   "--step", "0", "--grace", "30"])
    term.wait_for("keys: p pause")
    ignoring(term)
    term.key("-")
    started = time.monotonic()
    term.key("q")
    assert term.finish() == 1
    assert time.monotonic() - started < 15  # not the 30 s grace
    assert "2 killed" in term.text


def test_progress_info_cannot_drive_the_terminal_and_rows_tell_the_last_event(screen):
    term = screen(["run", "--workers", "1", "--target", "targets_control:escaping_info", "--schedule", "run",
                   "--step", "0"])
    term.wait_for("keys: p pause")
    term.wait_for("cleared")
    since = len(term.raw)
    term.key("p")  # and each row tells its worker's last event
    # (Any age: "0s ago" is on screen only in frames drawn within half a second of the pause.)
    term.wait_for(re.compile(r"paused \d+s ago"), since=since)
    header = next(line for line in reversed(term.text.split("\n")) if "worker" in line and "state" in line)
    assert header.split()[:7] == ["worker", "pid", "state", "progress", "eta", "last", "event"], header
    term.key("s")
    assert term.finish() == 0
    assert b"\x1b[2J" not in term.raw  # written as text: \x1b[2J\x1b[Hcleared\nbroken
    assert "note=\\x1b[2J\\x1b[Hcleared\\nbr" in term.text  # (the column ends in …)



def test_worker_output_cannot_drive_the_terminal(screen):
    term = screen(["run", "--workers", "1", "--target", "targets_control:escaping_output", "--schedule", "run",
                   "--step", "0"])
    term.wait_for("keys: p pause")
    term.wait_for("red stays red")
    term.key("s")
    assert term.finish() == 0
    for raw in (b"\x1b[2J", b"\x1bc", b"\x07", b"\xc2\x9b", b"before\r"):
        assert raw not in term.raw, raw
    text = term.text
    assert "[0] cleared the screen" in text  # the prefix stays on its line
    assert "[0] reset the terminal \\x07bell \\x9b2J" in text
    assert "[0] after the return" in text and "[0] a windows line" in text
    assert b"\x1b[31mred stays red" in term.raw  # colours are kept


def _states(tmp_path, name):
    res = run_cli(["status", name, "--json"], env={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    return {w["state"] for w in json.loads(res.stdout)["workers"]}


KEYED_VIEWS = {
    # the command, what shows that its workers are up, what shows that p took effect, what r says
    "map": (["map", "maptargets:nap", "--items", "{items}", "--workers", "2"], "in flight",
            ["pausing every worker", "s  paused"], "resuming every worker"),
    "sum": (["sum", "--producers", "2", "--consumers", "2", "--threshold", "100000000", "--delay", "0.05"], "got ",
            ["paused every worker"], "resumed every worker"),
}


@pytest.mark.parametrize("command", sorted(KEYED_VIEWS))
def test_map_and_sum_live_views_take_the_keys_and_show_where_to_reach_them(screen, tmp_path, command):
    args, up, paused, resumed = KEYED_VIEWS[command]
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"n": i, "s": 0.05}) + "\n" for i in range(400)))
    term = screen([a.replace("{items}", str(items)) for a in args] + ["--name", "kv"])
    term.wait_for("keys: p pause")
    term.wait_for("run kv")
    assert f"pid {term.proc.pid}" in term.text and "kv.sock" in term.text
    term.wait_for(up)
    term.key("p")
    for shown in paused:
        term.wait_for(shown)
    assert _states(tmp_path, "kv") == {"paused"}
    term.key("r")
    term.wait_for(resumed)
    term.key("s")
    assert term.finish() == 0
    if command == "map":
        assert re.search(r"summary: 400 items: \d+ done, 0 failed, [1-9]\d* unfinished", term.text)


def test_the_sum_view_shows_every_producer_and_consumer(screen):
    """Issue 5's live view, for sum too: counts per state, the leading consumer's
    bar, and a row per worker (role, state, CPU %, RSS, last event), each
    consumer with its sum toward the threshold."""
    term = screen(["sum", "--producers", "2", "--consumers", "2", "--threshold", "100000000", "--delay", "0.05"],
                  cols=140)
    term.wait_for("4 running")
    term.wait_for("got ")
    for shown in ("producer 0", "producer 1", "consumer 0", "consumer 1", "cpu %", "rss", "last event",
                  "leader: consumer", "toward the threshold"):
        assert shown in term.text, shown
    term.key("p")
    term.wait_for("4 paused")
    term.key("s")
    term.wait_for("4 stopped")
    assert term.finish() == 0


def test_map_live_view_q_kills_what_does_not_stop(screen, tmp_path, monkeypatch):
    monkeypatch.setenv("MAP_MARKS", str(tmp_path / "marks"))
    items = tmp_path / "items.jsonl"
    items.write_text("1\n2\n")
    term = screen(["map", "maptargets:ignore_stop", "--items", str(items), "--workers", "2", "--grace", "30"])
    term.wait_for("keys: p pause")
    term.wait_for("task started")
    started = time.monotonic()
    term.key("q")
    term.finish()
    assert time.monotonic() - started < 15  # not the 30 s grace
    assert "summary: 2 items: 0 done, 0 failed, 2 unfinished" in term.text


def test_plus_and_minus_keys_resize_from_the_size_within_max_workers(screen):
    # Workers 0 and 1 finish at once: + and - count from the run's size (4), not its live workers (2).
    term = screen(["run", "--workers", "4", "--max-workers", "5", "--target", "targets_control:first_two_finish",
                   "--schedule", "run", "--step", "0"])
    term.wait_for("keys: p pause")
    term.wait_for("2 finished")
    for key, note in [("+", "resized to 5 workers"), ("+", "cannot resize to 6 workers: more than --max-workers 5"),
                      ("-", "resized to 4 workers")]:
        term.key(key)
        term.wait_for(note)
        if note == "resized to 5 workers":
            term.wait_for("procctl run: 5 workers")  # the header follows the size
    term.key("s")
    assert term.finish() == 0
    assert "Traceback" not in term.text
    assert "summary: 5 workers, 2 finished, 3 stopped" in term.text  # 2 and 3 at the stop, 4 by the shrink


def test_at_50_columns_columns_go_rather_than_the_state(screen):
    term = screen(["run", "--workers", "3", "--target", "targets_control:steady", "--schedule", "run",
                   "--step", "0"], cols=50)
    term.wait_for("keys:")
    term.wait_for("running")
    text = term.text
    rows = [line for line in text.split("\n") if re.match(r"\s*[0-2]\s+\S", line) and "running" in line]
    assert rows, text[-2000:]
    header = next(line for line in reversed(text.split("\n")) if "worker" in line and "state" in line)
    # Dropped for the narrow screen in the README's order (info, pid, RSS): pid
    # goes before RSS, though it would fit where RSS does not.
    assert header.split() == ["worker", "state", "progress", "eta", "cpu", "%"], header
    term.key("s")
    assert term.finish() == 0


def test_without_a_terminal_lines_are_prefixed_and_a_crash_loses_nothing(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    res = run_cli(["run", "--workers", "3", "--target", "targets_control:print_then_crash", "--schedule", "run,stop",
                   "--step", "0.3", "--log-dir", str(logs)], cwd=TESTS)
    assert res.returncode == 1, res.stderr
    # Each line is handed on as the worker writes it: the manager's own lines may come between.
    lines = res.stdout.splitlines()
    ours = [x for x in lines if x.startswith("[0] ")]
    assert ours == ["[0] before the crash, line 1", "[0] before the crash, line 2"]
    files = sorted(p.name for p in logs.iterdir())
    assert len(files) == 3 and all(re.fullmatch(r"worker-[0-2]-\d+\.log", f) for f in files)
    crashed = next(p for p in logs.iterdir() if p.name.startswith("worker-0-"))
    assert crashed.read_text() == "before the crash, line 1\nbefore the crash, line 2\n"

    res = run_cli(["run", "--workers", "2", "--target", "targets_control:chatty", "--schedule", "run,stop",
                   "--step", "0.5", "--json"], cwd=TESTS)
    assert res.returncode == 0, res.stderr
    out = [line for line in res.stderr.splitlines() if "processed item" in line]
    assert len(out) == 4000 and all(re.fullmatch(r"\[(\d)\] worker \1 processed item \d+", x) for x in out)
    assert res.stdout.splitlines()[-1].startswith('{"event": "summary"')  # stdout stays JSON Lines


def test_log_dir_is_created_or_one_line_and_exit_2(tmp_path):
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        res = run_cli(["run", "--log-dir", str(bad)])
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and "--log-dir" in res.stderr
    for args in (["--log-dir", "-"],  # a directory named '-' was made (as no other output takes '-')
                 ["--events", str(tmp_path / "x"), "--log-dir", str(tmp_path / "x")],  # (the run began, then exit 1)
                 ["--timeline", str(tmp_path / "y.html"), "--log-dir", str(tmp_path / "y.html")]):
        res = run_cli(["run", "--workers", "1", "--schedule", "stop", *args], cwd=str(tmp_path))
        assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and "--log-dir" in res.stderr, res.stderr
        assert res.stdout == "" and not (tmp_path / "-").exists() and not (tmp_path / "x").exists()
    made = tmp_path / "new" / "logs"  # created, as GNU parallel's --results does
    res = run_cli(["run", "--workers", "2", "--schedule", "run,stop", "--step", "0.1", "--quiet",
                   "--log-dir", str(made)])
    assert res.returncode == 0, res.stderr
    assert sorted(p.name.split("-")[1] for p in made.iterdir()) == ["0", "1"]


@pytest.mark.parametrize("width", [90, 100, 120])
@pytest.mark.parametrize("long_state", [False, True], ids=["state", "restarted-silent-state"])
def test_a_long_info_takes_only_the_room_the_other_columns_leave(width, long_state):
    """A long info is cut (or goes), never the columns after it (RSS read
    `24 M…` at 100 columns) nor before it (the pid, at 90), also when the state
    says more than its nominal width (`running r12 no beat 9.5s`)."""
    import io

    from rich.console import Console

    from procctl.live import LiveView
    from procctl.states import State, WorkerStatus

    extra = dict(restarts=12, beat_age=9.5) if long_state else {}
    rows = [WorkerStatus(i, 31000 + i, State.RUNNING, True, done=5, total=10, eta=75, info={"file": "x" * 60},
                         **extra) for i in range(2)]
    out = io.StringIO()
    console = Console(file=out, width=width, height=30, color_system=None)
    view = LiveView(lambda: rows, "t", console=console, heartbeat=1.0 if long_state else None)
    view._usage_of.of = lambda r: ("12.5", "24 MiB")  # (no such processes: the usage the row would show)
    console.print(view.render(rows))
    lines = [line for line in out.getvalue().splitlines() if line.startswith("0 ")]
    assert len(lines) == 1 and "31000 " in lines[0] and lines[0].rstrip().endswith("12.5   24 MiB"), lines
    assert "1:15" in lines[0] and (not long_state or "no beat 9.5s" in lines[0]), lines
    assert lines[0].count("…") <= 1 and ("…" not in lines[0] or "x…" in lines[0]), lines  # only the info is cut


def test_the_map_view_shows_no_eta_once_a_stop_began():
    import io

    from rich.console import Console

    from procctl.live import MapLiveView

    out = io.StringIO()
    view = MapLiveView("procctl map", 200, lambda: (40, 4, 2), Console(file=out, width=100))
    for note, eta in (("running", True), ("paused", True), ("stopping", False)):
        view.note = note
        out.seek(0)
        out.truncate()
        view._live.console.print(view)
        assert ("ETA" in out.getvalue()) is eta, (note, out.getvalue())


@pytest.mark.parametrize("state", [State.RUNNING, State.PAUSED])
def test_the_overall_bar_has_an_eta_only_while_workers_run(state):
    """A paused worker keeps its rate (as it was when it paused) and has no
    ETA: neither has the overall bar when every worker is paused (it showed one)."""
    import io

    from rich.console import Console

    from procctl.live import LiveView

    rows = [WorkerStatus(i, None, state, True, None, 5.0, 10.0, 1.0, None) for i in range(2)]
    console = Console(file=io.StringIO(), width=100, height=30)
    console.print(LiveView(lambda: rows, "t", console=console).render(rows))
    assert ("ETA" in console.file.getvalue()) is (state is State.RUNNING), console.file.getvalue()
