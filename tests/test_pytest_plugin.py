"""procctl's pytest plugin, tested by running inner pytest sessions with pytester.

The plugin is registered by the pytest11 entry point (procctl is installed in
editable mode), in this session and in the inner ones alike; pass it with -p
only when plugin autoloading is disabled, or it would be registered twice.
Inner sessions that involve pytest-timeout run in a subprocess, so that their
alarms and os._exit() stay out of this process.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest
from procs import still_running

pytest_plugins = ["pytester"]

SUBPROCESS_TIMEOUT = 90  # bound on one inner pytest run in a subprocess


def plugin_args() -> list[str]:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return ["-p", "procctl.pytest_plugin", "-p", "pytest_timeout"]
    return []


def gone(pids, timeout=5.0):
    """True once none of `pids` runs (zombies of a reaper-less init count as gone)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return all(_is_zombie(p) for p in alive)


def _is_zombie(proc):
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def read_pids(path):
    return [int(x) for x in path.read_text().split()]


# An inner test module that leaves a child behind: the child blocks reading its
# stdin, which the module keeps open, so it is a leftover until someone kills it.
LEAK = """
import subprocess, sys
held = []

def leak(pidfile):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    held.append(child)
    with open(pidfile, "w") as fh:
        fh.write(str(child.pid))
"""


def leaky_module(pytester, pidfile, marker='@pytest.mark.usefixtures("no_leftover_processes")'):
    pytester.makepyfile(
        test_leak=LEAK
        + textwrap.dedent(f"""
            import psutil, pytest

            {marker}
            def test_leaks():
                leak({str(pidfile)!r})

            def test_next_one_is_clean():
                pid = int(open({str(pidfile)!r}).read())
                assert not psutil.pid_exists(pid)
            """)
    )


# -- no_leftover_processes ---------------------------------------------------------------


def test_a_test_leaving_a_child_fails_and_the_child_is_killed(pytester, tmp_path):
    pidfile = tmp_path / "pid"
    leaky_module(pytester, pidfile)
    result = pytester.runpytest(*plugin_args())
    result.assert_outcomes(passed=2, errors=1)  # the leak errors at teardown of test_leaks
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks*", "*left 1 child process(es) behind*"])
    result.stdout.fnmatch_lines([f"*pid {read_pids(pidfile)[0]} (*sys.stdin.read()*"])
    assert not psutil.pid_exists(read_pids(pidfile)[0])


def test_a_clean_test_passes(pytester):
    pytester.makepyfile("""
        import multiprocessing, subprocess, sys, pytest

        @pytest.mark.usefixtures("no_leftover_processes")
        def test_waits_for_its_children():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            p = multiprocessing.get_context("fork").Process(target=sum, args=([1],))
            p.start()
            p.join()

        @pytest.mark.usefixtures("no_leftover_processes")
        def test_children_that_end_by_themselves_are_no_leftovers():
            child = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE)
            assert child.stdout.read() == b""  # EOF: it has ended, and nobody reaped it
        """)
    result = pytester.runpytest(*plugin_args())
    result.assert_outcomes(passed=2)


def test_ini_option_checks_every_test(pytester, tmp_path):
    pidfile = tmp_path / "pid"
    pytester.makeini("[pytest]\nprocctl_check_leftovers = true\n")
    leaky_module(pytester, pidfile, marker="")
    result = pytester.runpytest(*plugin_args())
    result.assert_outcomes(passed=2, errors=1)
    assert not psutil.pid_exists(read_pids(pidfile)[0])


def test_a_leaked_executor_is_stopped_not_just_its_workers_killed(pytester):
    # Killed alone, its workers were replaced (a crashed worker is), and the
    # replacements blamed on the next test.
    pytester.makeini("[pytest]\nprocctl_check_leftovers = true\n")
    pytester.makepyfile(test_leak="""
        import operator
        from procctl import ProcessExecutor, ProcessController
        KEEP = []

        def idle(ctx):
            ctx.sleep(60)

        def test_leaks_an_executor_and_a_controller():
            ex = ProcessExecutor(2, start_method="fork")
            assert ex.submit(operator.neg, 3).result() == -3
            pc = ProcessController(idle, 1, restart="always", start_method="fork")
            pc.start()
            KEEP.extend([ex, pc])

        def test_next_one_finds_them_ended():
            ex, pc = KEEP
            assert ex.status() == [] and pc.pids() == []
        """)
    result = pytester.runpytest(*plugin_args())
    result.assert_outcomes(passed=2, errors=1)  # the leak errors at teardown of the first
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_an_executor_and_a_controller*"])


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_leaked_multiprocessing_pool_is_terminated_and_the_run_ends(pytester, method):
    # Its idle workers, killed alone, took the lock of its task queue with them: the
    # Pool's own terminate() at the interpreter's exit waited for it forever.
    pytester.makeini("[pytest]\nprocctl_check_leftovers = true\n")
    pytester.makepyfile(test_leak=f"""
        import multiprocessing, operator
        KEEP = []

        def test_leaks_a_pool():
            pool = multiprocessing.get_context({method!r}).Pool(2)
            assert pool.map(operator.neg, range(4)) == [0, -1, -2, -3]
            KEEP.append(pool)

        def test_next_one_is_not_charged_with_replacements():
            pass
        """)
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_pool*"])


def test_without_the_option_or_the_fixture_nothing_is_checked(pytester, tmp_path):
    pidfile = tmp_path / "pid"
    pytester.makepyfile(test_leak=LEAK + f"\ndef test_leaks():\n    leak({str(pidfile)!r})\n")
    result = pytester.runpytest(*plugin_args())
    pid = read_pids(pidfile)[0]
    try:
        result.assert_outcomes(passed=1)
        assert psutil.pid_exists(pid)  # nobody killed it
    finally:
        proc = psutil.Process(pid)
        proc.kill()
        proc.wait(timeout=5)


def test_ini_option_is_registered(pytester):
    result = pytester.runpytest("--help", *plugin_args())
    result.stdout.fnmatch_lines(["*procctl_check_leftovers*"])


def test_missing_psutil_gives_a_clear_error(pytester):
    pytester.makeconftest("import sys\nsys.modules['psutil'] = None  # as if not installed\n")
    pytester.makepyfile("""
        import pytest

        @pytest.mark.usefixtures("no_leftover_processes")
        def test_x():
            pass
        """)
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs psutil: pip install psutil*"])


def test_plugin_module_imports_cheaply():
    code = "import sys, procctl.pytest_plugin; print(sorted({'psutil', 'pytest_timeout'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# -- process_controller -------------------------------------------------------------------

CONTROLLED = """
import threading
import pytest

made = []

def spin(ctx):
    while ctx.checkpoint():
        pass
    return "stopped"

def start(process_controller, pidfile):
    pc = process_controller(spin, workers=2, start_method="fork")
    pc.run()
    made.append(pc)
    with open(pidfile, "w") as fh:
        fh.write(" ".join(map(str, pc.pids())))
    return pc

def test_closed_at_teardown():
    (pc,) = made
    assert pc.pids() == []
    assert sorted(r.outcome.value for r in pc.reports.values()) == ["stopped", "stopped"]
"""

CHECKED_INI = "[pytest]\nprocctl_check_leftovers = true\n"


def controlled_module(pytester, body):
    pytester.makepyfile(test_controlled=CONTROLLED + textwrap.dedent(body))
    # test_closed_at_teardown must run after the test under scrutiny
    pytester.makeconftest("""
        def pytest_collection_modifyitems(items):
            items.sort(key=lambda item: item.name == "test_closed_at_teardown")
        """)


def test_factory_returns_a_started_controller_closed_after_a_pass(pytester, tmp_path):
    pytester.makeini(CHECKED_INI)
    controlled_module(pytester, f"""
        def test_uses_it(process_controller):
            pc = start(process_controller, {str(tmp_path / "pids")!r})
            assert [s.alive for s in pc.status()] == [True, True]
            assert pc.state.name == "RUNNING"
        """)
    result = pytester.runpytest(*plugin_args())
    result.assert_outcomes(passed=2)
    assert gone(read_pids(tmp_path / "pids"))


def test_factory_closes_when_the_test_fails(pytester, tmp_path):
    pytester.makeini(CHECKED_INI)
    controlled_module(pytester, f"""
        def test_fails(process_controller):
            start(process_controller, {str(tmp_path / "pids")!r})
            assert False, "the test failed"
        """)
    result = pytester.runpytest(*plugin_args())
    result.assert_outcomes(failed=1, passed=1)  # no leftover error: closed first
    assert gone(read_pids(tmp_path / "pids"))


def test_check_torn_down_before_the_factory_sees_no_workers(pytester, tmp_path):
    # process_controller before no_leftover_processes: its teardown would come
    # after the check; the check closes the controllers itself.
    controlled_module(pytester, f"""
        def test_order(process_controller, no_leftover_processes):
            start(process_controller, {str(tmp_path / "pids")!r})
        """)
    result = pytester.runpytest(*plugin_args())
    result.assert_outcomes(passed=2)


def test_factory_closes_on_a_signal_timeout(pytester, tmp_path):
    pytester.makeini(CHECKED_INI + "timeout = 3\ntimeout_method = signal\n")
    controlled_module(pytester, f"""
        def test_hangs(process_controller):
            start(process_controller, {str(tmp_path / "pids")!r})
            threading.Event().wait()  # until pytest-timeout's alarm raises here
        """)
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*Timeout*"])
    assert gone(read_pids(tmp_path / "pids"))


def test_an_executor_block_ends_on_a_signal_timeout(pytester, tmp_path):
    # Leaving `with ProcessExecutor()` by a timeout stops its tasks (grace, then
    # SIGTERM): waiting for them, as shutdown(wait=True) would, hung the suite.
    pytester.makeini("[pytest]\ntimeout = 2\ntimeout_method = signal\n")
    pytester.makepyfile(test_stuck=textwrap.dedent(f"""
        import os, time
        from procctl import ProcessExecutor

        def stuck(_):
            while True:
                time.sleep(0.5)  # never looks at a checkpoint

        def test_hangs():
            with ProcessExecutor(2, grace=0.5, start_method="fork") as ex:
                ex.submit(stuck, 0), ex.submit(stuck, 1)
                with open({str(tmp_path / "pids")!r}, "w") as fh:
                    fh.write(" ".join(str(s.pid) for s in ex.status()))
                ex.submit(stuck, 2).result()  # until pytest-timeout's alarm raises here
        """))
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout*"])
    assert gone(read_pids(tmp_path / "pids"))


@pytest.mark.soak  # the signal method is checked in CI; this one takes 6 s
def test_factory_kills_workers_on_a_thread_timeout(pytester, tmp_path):
    # The thread method ends the inner pytest with os._exit(): no teardown runs,
    # so the plugin kills the workers from the timer thread first.
    pytester.makeini("[pytest]\ntimeout = 5\ntimeout_method = thread\n")
    controlled_module(pytester, f"""
        def test_hangs(process_controller):
            start(process_controller, {str(tmp_path / "pids")!r})
            threading.Event().wait()
        """)
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    assert result.ret == 1
    pids = read_pids(tmp_path / "pids")
    output = result.stdout.str() + result.stderr.str()
    assert f"procctl: test timed out; killed workers {sorted(pids)}" in output
    assert "Timeout" in output
    assert gone(pids)


def test_thread_timeout_of_a_plain_test_is_left_to_pytest_timeout(pytester):
    pytester.makeini("[pytest]\ntimeout = 1\ntimeout_method = thread\n")
    pytester.makepyfile("""
        import threading
        def test_hangs():
            threading.Event().wait()
        """)
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    assert result.ret == 1
    output = result.stdout.str() + result.stderr.str()
    assert "Timeout" in output and "procctl:" not in output


class _InterruptedOnce:
    """A controller whose first stop() is cut short, as by a timeout alarm in teardown."""

    grace = 5.0

    def __init__(self):
        self.calls = []

    def stop(self, grace=None):
        self.calls.append(("stop", grace))
        if len(self.calls) == 1:
            raise KeyboardInterrupt

    def kill(self):
        self.calls.append(("kill", None))


def test_an_interrupted_close_kills_then_reaps_and_propagates():
    from procctl.pytest_plugin import TEARDOWN_GRACE, _close_one

    pc = _InterruptedOnce()
    try:
        _close_one(pc)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interruption must propagate")
    assert pc.calls == [("stop", TEARDOWN_GRACE), ("kill", None), ("stop", 0)]


@pytest.mark.parametrize("how", ["setsid", "fork", "fork-setsid"])
def test_a_grandchild_reparented_away_is_caught_with_pid_and_command_line(pytester, tmp_path, how):
    """A double-forked daemon is no longer our descendant: the plugin still finds it, by
    the mark it inherited (exec'd), or forked without exec, by our command line it
    carries (its environment is the one of our exec, without the mark), in our
    process group or out of it (the classic daemon's setsid)."""
    pidfile = tmp_path / "pid"
    daemon = {
        "setsid": f"subprocess.run(['sh', '-c', 'setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}'])",
    }.get(how) or textwrap.dedent(f"""\
            if os.fork() == 0:
                {"os.setsid()" if how == "fork-setsid" else "pass"}
                if os.fork() == 0:
                    os.closerange(3, 1024)
                    time.sleep(1000)
                os._exit(0)
            os.wait()
            open({str(pidfile)!r}, "w").write("x")""")
    pytester.makepyfile(test_orphan=textwrap.dedent("""
        import os, subprocess, time, pytest

        @pytest.mark.usefixtures("no_leftover_processes")
        def test_orphan():
        """) + textwrap.indent(daemon, "    ") + "\n")
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*left 1 child process(es) behind*", "*pid *"])
    if how == "setsid":
        pid = read_pids(pidfile)[0]
        result.stdout.fnmatch_lines([f"*pid {pid} (*sleep 1000)*"])
        assert gone([pid])


def test_a_process_of_another_session_in_our_group_is_not_ours(pytester, tmp_path):
    """What another session in our process group starts meanwhile (pytest-xdist's
    workers, two pytest runs of one shell script, the shell's own `sleep`) is
    not a leftover of our test: it was reported, and killed."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    os.mkfifo(ready)
    os.mkfifo(go)
    pytester.makepyfile(test_neighbour=textwrap.dedent(f"""
        import pytest

        @pytest.mark.usefixtures("no_leftover_processes")
        def test_while_a_neighbour_starts():
            with open({str(ready)!r}, "w") as fh:
                fh.write("x")
            open({str(go)!r}).read()
        """))
    result = []
    inner = threading.Thread(
        target=lambda: result.append(pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)))
    fd = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
    inner.start()
    neighbour = None
    try:
        assert select.select([fd], [], [], 30)[0], "the inner test did not start"  # its snapshot is taken
        neighbour = subprocess.Popen(["sleep", "60"])  # our group, not its descendant
        open(go, "w").close()  # the inner test goes on (it waits to read it)
        inner.join(SUBPROCESS_TIMEOUT)
        assert neighbour.poll() is None, "the inner session killed its neighbour"
        result[0].assert_outcomes(passed=1)
    finally:
        os.close(fd)
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def test_an_orphan_forked_by_another_session_of_our_command_line_is_not_ours(tmp_path):
    """Two pytest sessions with one command line in one process group (pytest-xdist's
    workers): an orphan that one of them forks without an exec is that session's
    leftover, not the other's (both carry the command line; only the forking one
    shares the orphan's memory layout)."""
    (tmp_path / "test_pair.py").write_text(textwrap.dedent("""
        import os, time, pytest

        def wait(name):
            open(os.path.join(os.environ["PAIR_DIR"], name)).read()

        def tell(name):
            with open(os.path.join(os.environ["PAIR_DIR"], name), "w") as fh:
                fh.write("x")

        @pytest.mark.usefixtures("no_leftover_processes")
        def test_pair():
            role = os.environ["PAIR_ROLE"]
            if role == "clean":
                tell("clean-ready")   # its snapshot is taken
                wait("clean-go")      # the other session forks meanwhile
                return
            wait("leak-go")
            if os.fork() == 0:
                if os.fork() == 0:
                    os.closerange(3, 1024)
                    time.sleep(1000)
                os._exit(0)
            os.wait()
            tell("leak-forked")
            wait("leak-end")
        """))
    for name in ("clean-ready", "clean-go", "leak-go", "leak-forked", "leak-end"):
        os.mkfifo(tmp_path / name)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin_args(), "test_pair.py"]
    sessions = {}
    try:
        for role in ("leak", "clean"):  # one command line, one process group (ours)
            sessions[role] = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True, env={**os.environ, "PAIR_ROLE": role,
                                                              "PAIR_DIR": str(tmp_path)})
        fifo = lambda name, mode: open(tmp_path / name, mode)  # noqa: E731 - each open waits for its peer
        fifo("clean-ready", "r").read()
        fifo("leak-go", "w").close()
        fifo("leak-forked", "r").read()
        fifo("clean-go", "w").close()
        clean_out = sessions["clean"].communicate(timeout=SUBPROCESS_TIMEOUT)[0]
        fifo("leak-end", "w").close()
        leak_out = sessions["leak"].communicate(timeout=SUBPROCESS_TIMEOUT)[0]
    finally:
        for proc in sessions.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert sessions["clean"].returncode == 0 and "1 passed" in clean_out, clean_out
    assert sessions["leak"].returncode == 1 and "left 1 child process(es) behind" in leak_out, leak_out

# -- forkserver workers ----------------------------------------------------------------------

# The inner module starts the fork server itself (a fresh interpreter): the server
# is a direct child with a helper's command line, and its children, procctl's
# workers, carry that same command line.
FORKSERVER = """
import os
import psutil, pytest
from procctl import ProcessController

held = []

def idle(ctx):
    while ctx.sleep(3600.0):
        pass

def pids_to(path, pc):
    (pid,) = pc.pids()
    with open(path, "w") as fh:
        fh.write(f"{pid} {psutil.Process(pid).ppid()}")
"""


def forkserver_module(pytester, pidfile, body):
    pytester.makepyfile(test_forkserver=FORKSERVER + textwrap.dedent(body).format(pidfile=str(pidfile)))


def test_a_leaked_forkserver_worker_is_caught_and_killed(pytester, tmp_path):
    pidfile = tmp_path / "pids"
    forkserver_module(pytester, pidfile, """
        @pytest.mark.usefixtures("no_leftover_processes")
        def test_leaks_a_worker():
            pc = ProcessController(idle, 1, start_method="forkserver")
            held.append(pc)  # a live reference: nothing closes it before the check
            pc.start()
            pids_to({pidfile!r}, pc)

        def test_the_worker_was_killed():
            worker, _ = map(int, open({pidfile!r}).read().split())
            assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
        """)
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    worker, server = read_pids(pidfile)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_worker*",
                                 "*left 1 child process(es) behind*",
                                 f"*pid {worker} ({sys.executable} *-c from multiprocessing.forkserver*"])
    assert f"pid {server} " not in result.stdout.str()  # the fork server is a helper


def test_a_closed_forkserver_controller_passes(pytester, tmp_path):
    forkserver_module(pytester, tmp_path / "pids", """
        @pytest.mark.usefixtures("no_leftover_processes")
        def test_closes_its_controller():
            with ProcessController(idle, 2, start_method="forkserver") as pc:
                pc.run()
            assert pc.pids() == []
        """)
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("new_session", [False, True], ids=["own group", "setsid"])
def test_an_orphan_of_a_fork_server_an_earlier_test_started_is_caught(pytester, tmp_path, new_session,
                                                                      monkeypatch):
    """The fork server carries the mark of the checked test that started it,
    and so do the processes it starts for a later one: started during that
    test, they are that test's (they passed, orphaned, before the helper's mark
    counted). The inner session has no mark from outside: only its own count."""
    monkeypatch.delenv("PROCCTL_TEST_MARK", raising=False)
    pidfile = tmp_path / "pids"
    forkserver_module(pytester, pidfile, f"""
        import multiprocessing, subprocess

        def start_sleep(path):
            proc = subprocess.Popen(["sleep", "60"], start_new_session={new_session})
            with open(path, "w") as fh:
                fh.write(str(proc.pid))

        def nothing():
            pass

        @pytest.mark.usefixtures("no_leftover_processes")
        def test_starts_the_fork_server():
            p = multiprocessing.get_context("forkserver").Process(target=nothing)
            p.start()
            p.join()

        @pytest.mark.usefixtures("no_leftover_processes")
        def test_leaks_a_sleep_through_it():
            p = multiprocessing.get_context("forkserver").Process(target=start_sleep, args=({{pidfile!r}},))
            p.start()
            p.join()
        """)
    result = pytester.runpytest_subprocess(*plugin_args(), timeout=SUBPROCESS_TIMEOUT)
    orphan = int(pidfile.read_text())
    try:
        result.assert_outcomes(passed=2, errors=1)
        result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_sleep_through_it*",
                                     "*left 1 child process(es) behind*", f"*pid {orphan} (sleep 60)*"])
    finally:
        left = still_running([orphan])
        for proc in left:
            proc.kill()
    assert left == []  # the plugin killed it


def test_a_mark_from_outside_the_session_blames_nobody(pytester, tmp_path, monkeypatch):
    """A fork server started outside a checked test carries the mark the
    session was given from outside (a test of an outer session): a process
    of that outer session started meanwhile is not the inner test's."""
    monkeypatch.setenv("PROCCTL_TEST_MARK", "outer-1")
    ready, done = tmp_path / "ready", tmp_path / "done"
    os.mkfifo(ready)
    os.mkfifo(done)
    forkserver_module(pytester, tmp_path / "pids", f"""
        import multiprocessing

        def nothing():
            pass

        def test_starts_the_fork_server():
            p = multiprocessing.get_context("forkserver").Process(target=nothing)
            p.start()
            p.join()

        @pytest.mark.usefixtures("no_leftover_processes")
        def test_waits_while_the_outer_session_starts_a_process():
            with open({str(ready)!r}, "w") as fifo:
                fifo.write("r")
            with open({str(done)!r}) as fifo:
                fifo.read(1)
        """)
    said = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)  # (a reader first: the inner test's open goes through)
    inner = subprocess.Popen([sys.executable, "-m", "pytest", *plugin_args(), "-q", "-p", "no:cacheprovider"],
                             cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sibling = None
    try:
        assert select.select([said], [], [], 60)[0], "the inner test never said it was waiting"
        sibling = subprocess.Popen(["sleep", "60"], start_new_session=True)  # carries "outer-1"
        with open(done, "w") as fifo:  # the inner test is reading it
            fifo.write("d")
        out, _ = inner.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert inner.returncode == 0 and "2 passed" in out, out
        assert sibling.poll() is None  # not killed as the inner test's leftover
    finally:
        os.close(said)
        inner.kill()
        inner.communicate()
        if sibling is not None:
            sibling.kill()
            sibling.wait()


def _idle(ctx):
    while ctx.sleep(3600.0):
        pass


def test_a_worker_is_no_helper_whatever_its_command_line(monkeypatch):
    """Helpers are told from workers by identity: a fork worker shares our command
    line, and here that command line is a 'helper' entry; the worker is still found."""
    from procctl import ProcessController, pytest_plugin

    monkeypatch.setattr(pytest_plugin, "HELPER_ENTRIES", (" ".join(psutil.Process().cmdline()),))
    snapshot = pytest_plugin.Snapshot(psutil)
    try:
        with ProcessController(_idle, 1, start_method="fork") as pc:
            (worker,) = pc.pids()
            assert psutil.Process(worker).cmdline() == psutil.Process().cmdline()
            assert worker in {p.pid for p in snapshot.new_processes(psutil)}
    finally:
        snapshot.restore()
