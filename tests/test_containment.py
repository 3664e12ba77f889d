"""Process-tree containment (issue 9 section 3): what a worker starts dies with it.

One controller per case runs one worker per kind of descendant (Popen, a new
session, multiprocessing, os.fork(), double-forked daemons with and without
a new session); each worker tells the test the pids it started through a
FIFO, then ends the way the case says. Every case proves that none of those
pids still runs. Without a writable cgroup v2 exactly one case is not
covered, and a test says so: descendants that left the worker's process
group (their own group, or a new session) when the worker dies abruptly.
"""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import targets_tree
from clihelp import LiveCli, json_events, worker_pids
from procs import end_session, still_running

from procctl import Outcome, ProcessController, State, containment

KINDS = ["popen", "setsid", "pgroup", "multiprocessing", "fork", "daemon", "daemon_setsid"]
#: Kinds that leave the worker's process group: beyond reach of a worker that dies abruptly, without cgroups.
#: Those that left the worker's process group (a new session leaves it too).
NEW_SESSION = {"setsid", "pgroup", "daemon_setsid"}
ENDS = ["stop", "finish", "fail", "crash", "sigkill"]
ABRUPT = {"crash", "sigkill"}


def _cgroup_writable() -> bool:
    parent = containment.own_cgroup_dir()
    if parent is None:
        return False
    path = containment.make_cgroup(parent, f"procctl-probe-{os.getpid()}")
    if path is None:
        return False
    containment.remove_cgroup(path, 1.0)
    return True


CGROUP = _cgroup_writable()
needs_cgroup = pytest.mark.skipif(not CGROUP, reason="no writable cgroup v2 here")


class Fifo:
    """Lines the workers write: 'worker_id pid pid ...'."""

    def __init__(self, path: str) -> None:
        os.mkfifo(path)
        self.path = path
        # O_RDWR: opening never blocks, and EOF never comes between writers.
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.buffer = b""

    def read(self, workers: int, timeout: float = 20.0) -> dict[int, list[int]]:
        got: dict[int, list[int]] = {}
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while len(got) < workers:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"workers did not report their children: {got}"
                if sel.select(remaining):
                    self.buffer += os.read(self.fd, 65536)
                *lines, self.buffer = self.buffer.split(b"\n")
                for line in lines:
                    wid, *pids = map(int, line.split())
                    got[wid] = pids
        return got

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def fifo(tmp_path):
    f = Fifo(str(tmp_path / "pids"))
    yield f
    f.close()


def _running_after(pids: list[int], timeout: float) -> set[int]:
    """Those of `pids` that have not exited within `timeout` (pidfds: an orphan's
    zombie, which a reaper-less init may keep, has exited)."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            for fd in fds:
                sel.register(fd, selectors.EVENT_READ)
            pending = dict(fds)
            while pending and (remaining := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(remaining):
                    sel.unregister(key.fd)
                    pending.pop(key.fd)
        return set(pending.values())
    finally:
        for fd in fds:
            os.close(fd)


def _survivors(pids: list[int], timeout: float = 2.0) -> set[int]:
    """Those of `pids` still running after `timeout`; they are killed (the test fails)."""
    alive = _running_after(pids, timeout)
    for pid in alive:  # the test fails; leave nothing for the next one
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def _run_case(method: str, end: str, fifo: Fifo, cgroup: bool | None) -> tuple[dict[int, list[int]], dict]:
    pc = ProcessController(targets_tree.by_worker, len(KINDS), args=(KINDS, fifo.path, end),
                           start_method=method, grace=0.5 if end in ABRUPT else 5.0, cgroup=cgroup)
    pc.term_timeout = pc.kill_timeout = 0.5
    with pc:
        pc.run()
        started = fifo.read(len(KINDS))
        if end == "sigkill":
            for pid in pc.pids():
                os.kill(pid, signal.SIGKILL)
        if end in ABRUPT:
            # Until the controller watches pidfds (issue 10, 2), a dead worker whose fork
            # children hold its sentinel is seen only by the stop's escalation.
            pc.wait(timeout=1)
        elif end != "stop":
            assert pc.wait(timeout=15)
        reports = pc.stop()
    return started, reports


@pytest.mark.parametrize("end", ENDS)
def test_descendants_die_with_their_worker(start_method, end, fifo):
    started, reports = _run_case(start_method, end, fifo, cgroup=False)
    expected = {"stop": Outcome.STOPPED, "finish": Outcome.FINISHED, "fail": Outcome.FAILED,
                "crash": Outcome.CRASHED, "sigkill": Outcome.CRASHED}[end]
    if end not in ABRUPT:  # a worker whose fork child holds its sentinel may read as killed (issue 10, 2)
        assert {r.outcome for r in reports.values()} == {expected}
    everyone = {p for pids in started.values() for p in pids}
    # The one case process groups and subreaping cannot cover (README): a
    # descendant in a process group (or session) of its own when its worker dies abruptly.
    uncovered = set()
    if end in ABRUPT:
        uncovered = {p for wid, pids in started.items() if KINDS[wid] in NEW_SESSION for p in pids}
    assert _survivors(list(everyone - uncovered)) == set(), {KINDS[w]: pids for w, pids in started.items()}
    assert _survivors(list(uncovered), timeout=0) == uncovered


@needs_cgroup
@pytest.mark.parametrize("end, cgroup", [("crash", None), ("sigkill", True)])
def test_a_cgroup_covers_every_case(start_method, end, cgroup, fifo):
    # None, the default: a cgroup wherever one is writable.
    started, _ = _run_case(start_method, end, fifo, cgroup=cgroup)
    assert _survivors([p for pids in started.values() for p in pids]) == set()


@needs_cgroup
def test_controllers_starting_in_threads_at_once_get_a_cgroup_each(monkeypatch):
    """Two controllers that took one cgroup killed each other's workers at close()."""
    n = 6
    barrier = threading.Barrier(n, timeout=20)
    real = containment.own_cgroup_dir

    def together():  # every thread is past its own look before any names its cgroup
        barrier.wait()
        return real()

    monkeypatch.setattr(containment, "own_cgroup_dir", together)
    trees = []

    def make():
        trees.append(containment.WorkerTrees(True))

    makers = [threading.Thread(target=make) for _ in range(n)]
    for t in makers:
        t.start()
    for t in makers:
        t.join(30)
    try:
        assert len({t.cgroup for t in trees}) == n, [t.cgroup for t in trees]
    finally:
        for t in trees:
            t.close(2.0)


def test_controllers_in_parallel_threads_leave_each_others_workers_alone():
    outcomes = []

    def lifecycle():
        with ProcessController(targets_tree.sleeps, 3) as pc:
            pc.run()
            pc.pause()
            pc.run()
            outcomes.extend(r.outcome for r in pc.stop(grace=10).values())

    runs = [threading.Thread(target=lifecycle) for _ in range(4)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(60)
    assert outcomes == [Outcome.STOPPED] * 12


def test_escalation_kills_the_whole_tree_of_a_stuck_worker(fifo):
    """SIGKILL after the grace period: the controller freezes and kills the tree."""
    pc = ProcessController(targets_tree.by_worker, len(KINDS), args=(KINDS, fifo.path, "hang"),
                           start_method="fork", grace=0.2)
    pc.term_timeout = 0.2
    with pc:
        pc.run()
        started = fifo.read(len(KINDS))
        reports = pc.stop()
    assert {r.outcome for r in reports.values()} == {Outcome.KILLED}
    assert _survivors([p for pids in started.values() for p in pids]) == set()


MANAGER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import targets_tree
    from test_containment import Fifo, KINDS
    from procctl import ProcessController
    if __name__ == "__main__":
        fifo = Fifo({fifo!r})
        pc = ProcessController(targets_tree.by_worker, len(KINDS), args=(KINDS, {fifo!r}, "stop"),
                               start_method={method!r}, cgroup={cgroup!r})
        pc.start()
        pc.run()
        started = fifo.read(len(KINDS))
        print(json.dumps({{"workers": pc.pids(), "started": started}}), flush=True)
        sys.stdin.read()  # until the test kills us
""")


@pytest.mark.parametrize("cgroup", [False, pytest.param(True, marks=needs_cgroup)])
def test_descendants_die_when_the_manager_is_sigkilled(start_method, cgroup, tests_dir, tmp_path):
    src = MANAGER.format(tests=tests_dir, fifo=str(tmp_path / "pids"), method=start_method, cgroup=cgroup)
    script = tmp_path / "manager.py"
    script.write_text(src)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.poll() is not None else "manager said nothing"
        info = json.loads(line)
        started = {int(w): pids for w, pids in info["started"].items()}
        everyone = [p for pids in started.values() for p in pids] + info["workers"]
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        uncovered = set() if cgroup else {p for w, pids in started.items() if KINDS[w] in NEW_SESSION
                                          for p in pids}
        alive = _running_after(list(set(everyone) - uncovered), timeout=2.0)
        took = time.monotonic() - t0
        assert alive == set(), (took, {KINDS[w]: pids for w, pids in started.items()})
        # (A new-session child may outlive a killed manager without cgroups, the
        # documented gap; it may also die with what it shared: not asserted.)
    finally:
        _survivors([p for pids in locals().get("started", {}).values() for p in pids], timeout=0)
        end_session(proc)


GUARDIAN_WAKEUPS = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import targets_tree
    from procctl import ProcessController, guardian

    def lifecycle():
        with ProcessController(targets_tree.quick, 10, start_method="fork") as pc:
            pc.run()
            pc.wait(timeout=60)

    def switches(pid):
        with open(f"/proc/{{pid}}/status") as f:
            return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)

    lifecycle()  # the guardian starts
    lifecycle()  # (and is asleep by now, as a rule)
    link = guardian.link()
    if {ring_at!r}:
        link._ring_at = {ring_at!r}
    gpid = guardian.guardian_pid()
    before = switches(gpid)
    for _ in range(5):
        lifecycle()
    print(json.dumps({{"wakeups": switches(gpid) - before}}), flush=True)
""")


@pytest.mark.parametrize("ring_at, woken", [(None, False), (64, True)])
def test_the_guardian_sleeps_while_workers_start_and_end(tests_dir, tmp_path, ring_at, woken):
    """Workers' starts and ends are noted to the guardian without waking it (a
    wakeup takes a CPU from the manager when it is busiest); it reads its notes
    when the bell rings, here when they fill a quarter of the pipe."""
    script = tmp_path / "manager.py"
    script.write_text(GUARDIAN_WAKEUPS.format(tests=tests_dir, ring_at=ring_at))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr
    wakeups = json.loads(done.stdout)["wakeups"]
    # Unrung, at most one: the guardian's own start-up may end within the count on a
    # loaded machine (once in the suite). Rung every 64 bytes, about 20.
    assert (wakeups >= 5) if woken else (wakeups <= 1), wakeups


GUARDIAN_SMALL_PIPE = textwrap.dedent("""
    import fcntl, json, os, sys, threading
    from procctl import guardian

    link = guardian.link()
    fcntl.fcntl(link._w, fcntl.F_SETPIPE_SZ, 4096)  # a user past fs.pipe-user-pages-soft gets such pipes
    link._ring_at = 1024
    for pid in range(10**6, 10**6 + 2000):  # 16 KB of notes in one flush: four times the pipe
        link.note("+", pid)
    flushed = threading.Thread(target=link.flush, daemon=True)
    flushed.start()
    flushed.join(20)
    gpid = link.pid
    link.release()
    print(json.dumps({{"flushed": not flushed.is_alive(), "guardian": gpid}}), flush=True)
""")


def test_a_flush_larger_than_the_guardians_pipe_does_not_block(tmp_path):
    script = tmp_path / "manager.py"
    script.write_text(GUARDIAN_SMALL_PIPE.format())
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["flushed"], "the notes' writer waited for a guardian nobody had rung"
    assert not still_running([got["guardian"]], timeout=5)


def test_sigterm_to_the_process_group_is_a_graceful_stop(start_method):
    """issue 10, 5: under forkserver too (the fork server stands the SIGTERM)."""
    cli = LiveCli(["run", "--workers", "4", "--schedule", "run", "--finish-chance", "0", "--step", "0",
                   "--start-method", start_method, "--json"])
    try:
        cli.wait_for(lambda lines: sum('"running"' in line for line in lines) == 4)
        cli.signal_group(signal.SIGTERM)
        rc, out, err = cli.finish()
    finally:
        cli.kill()
    assert rc == 143, err
    events = json_events(out)
    assert events[-1]["outcomes"] == {"stopped": 4}, err
    assert not still_running(worker_pids(events))


@needs_cgroup
def test_start_does_not_wait_for_the_cgroup_move_but_the_target_does(monkeypatch):
    # The move can wait for the kernel's RCU grace period (10-15 ms for the
    # first of a burst): a worker says it is up first, and runs its target only
    # once it is in its cgroup. Here every move is held until the test lets go.
    release_r, release_w = os.pipe()
    real = containment.join_cgroup

    def held(cgroup):
        select.select([release_r], [], [], 30.0)
        real(cgroup)

    monkeypatch.setattr(containment, "join_cgroup", held)  # inherited by fork children
    try:
        with ProcessController(targets_tree.own_cgroup, 3, start_method="fork", cgroup=True) as pc:
            assert {s.state for s in pc.status()} == {State.PAUSED}  # up, every move still held
            os.write(release_w, b"go")
            pc.run()
            assert pc.wait(timeout=30)
            reports = pc.reports
    finally:
        os.close(release_r)
        os.close(release_w)
    for wid, report in reports.items():
        assert report.outcome is Outcome.FINISHED
        assert report.result.endswith(f"/w{wid}"), report.result


GO_BETWEEN_REAPED = textwrap.dedent("""
    import json, os, select, sys, threading
    sys.path.insert(0, {tests!r})
    import psutil
    import targets
    from procctl import ProcessController

    pc = ProcessController(targets.loop, 1, start_method="fork").start()
    others = [c for c in psutil.Process().children() if c.pid not in pc.pids()]
    ended = True
    for child in others:  # the guardian's go-between: wait for its exit, without reaping it
        try:
            fd = os.pidfd_open(child.pid)
        except ProcessLookupError:
            continue  # ended, and reaped already (what is under test) since we listed it
        ended = ended and bool(select.select([fd], [], [], 20)[0])
        os.close(fd)
    for t in threading.enumerate():
        if t.name == "procctl-guardian-settle":
            t.join(20)
    zombies = [c.pid for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]
    pc.close()
    print(json.dumps({{"go_betweens": len(others), "ended": ended, "zombies": zombies}}), flush=True)
""")


def _run_script(template: str, tests_dir: str, tmp_path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `template` (with {tests} filled in) as a script in a session of its
    own; it must exit 0."""
    script = tmp_path / "script.py"
    script.write_text(template.format(tests=tests_dir))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr
    return done


def test_the_guardians_go_between_is_reaped_while_the_run_goes_on(tests_dir, tmp_path):
    """A script's own "no zombie child" check, in the middle of a run: the
    go-between that starts the guardian is reaped once it has exited, not at close()."""
    done = _run_script(GO_BETWEEN_REAPED, tests_dir, tmp_path)
    got = json.loads(done.stdout)
    assert got["ended"] and got["zombies"] == [], got


@pytest.mark.parametrize("no_bytecode", [True, False], ids=["-B", "bytecode"])
def test_the_guardian_writes_bytecode_only_if_its_manager_does(no_bytecode):
    """The guardian starts with -I, which drops PYTHONDONTWRITEBYTECODE: it
    carries the manager's -B itself (as multiprocessing's spawn does). Without
    it, a manager run under a file-size limit left truncated .pyc files behind."""
    code = ("import json, psutil; from procctl import guardian; link = guardian.link(); "
            "print(json.dumps(psutil.Process(link.pid).cmdline())); link.release()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    flags = ["-B"] if no_bytecode else []
    done = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=60,
                          env=env, start_new_session=True)
    assert done.returncode == 0, done.stderr
    cmdline = json.loads(done.stdout)
    assert "procctl.guardian_process" in cmdline[-1]
    assert ("-B" in cmdline) is no_bytecode, cmdline


OUT_OF_FDS = textwrap.dedent("""
    import json, os, resource, sys
    sys.path.insert(0, {tests!r})
    import targets_cli
    from procctl import ProcessController

    pc = ProcessController(targets_cli.idle, 3, start_method="fork", cgroup=False)
    pc.start()
    pids = pc.pids()
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = []
    try:
        while True:
            held.append(os.dup(0))
    except OSError:
        pass
    try:
        pc.kill()  # no descriptor left to read /proc with
        error = None
    except OSError as exc:
        error = repr(exc)
    for fd in held:
        os.close(fd)
    pc.close()
    print(json.dumps({{"error": error, "pids": pids}}), flush=True)
""")


def test_a_kill_with_no_descriptor_left_still_kills_every_worker(tests_dir, tmp_path):
    """Out of descriptors (as a start that failed at the limit is, while
    another thread takes what frees), /proc cannot be read: the workers are
    killed all the same, their groups with them (the descendants walk raised
    OSError, and the workers lived on)."""
    done = _run_script(OUT_OF_FDS, tests_dir, tmp_path)
    got = json.loads(done.stdout)
    assert got["error"] is None, got
    assert still_running(got["pids"]) == [], got


NESTED = textwrap.dedent("""
    import logging, sys
    sys.path.insert(0, {tests!r})
    import targets_tree
    from procctl import ProcessController

    if __name__ == "__main__":
        logging.basicConfig()
        with ProcessController(targets_tree.nested, 2, start_method="spawn") as pc:
            pc.run()
            pc.wait(timeout=60)
            print(sorted(str(r.result) for r in pc.stop().values()), flush=True)
""")


def test_a_controller_inside_a_worker_ends_without_a_false_warning(tests_dir, tmp_path):
    """A worker's own controller's guardian ends with the worker's tree, before
    the worker's exit handlers release it: that is its end, not "the guardian
    is gone" (a warning every such worker printed)."""
    done = _run_script(NESTED, tests_dir, tmp_path, timeout=120)
    assert done.stdout.strip() == str(["['finished', 'finished']"] * 2), done.stdout
    assert "guardian" not in done.stderr, done.stderr
