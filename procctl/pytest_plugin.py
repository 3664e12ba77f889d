"""pytest plugin for suites that run processes, registered by procctl's ``pytest11`` entry point.

Fixtures:

``no_leftover_processes``
    Fails a test that leaves a child process behind (reported as an error at
    teardown), after giving exiting children a moment, and kills what is left
    so the next test starts clean.  Use it with
    ``@pytest.mark.usefixtures("no_leftover_processes")``, or for every test
    with ``procctl_check_leftovers = true`` in the ini file.  Needs psutil.

``process_controller``
    A factory: ``pc = process_controller(target, workers=2, **kwargs)`` returns
    a started ProcessController, closed at teardown (short grace) even when the
    test failed or timed out under pytest-timeout.

This module loads in every pytest run of anyone who installs procctl: it
imports nothing heavy at module level (procctl's controller, psutil and
pytest_timeout are imported when a fixture or hook needs them).
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from . import registry

if TYPE_CHECKING:
    import psutil

    from procctl import ProcessController

__all__ = ["no_leftover_processes", "process_controller"]

#: The entry points of multiprocessing's long-lived helpers (fork server, resource
#: tracker) and procctl's guardian (its go-between; the guardian itself is known by pid): a *direct* child of
#: ours started with one of these is the helper itself,
#: started once per session, not a leak.  Its children (forkserver workers share its
#: command line) are judged like any other process, and so is any process that is
#: one of procctl's workers, whatever its command line.
HELPER_ENTRIES = ("from multiprocessing.forkserver import main", "from multiprocessing.resource_tracker import main",
                  "from procctl.guardian_process import main")
#: Set in the environment while a checked test runs: processes it starts carry it,
#: even once re-parented away from us (to init or a subreaper).
MARKER = "PROCCTL_TEST_MARK"
#: How long children may take to exit by themselves before they count as left behind.
LEFTOVER_WAIT = 1.0
#: How long killed leftovers may take to go away.
KILL_WAIT = 5.0
#: The grace the process_controller fixture gives workers at teardown: the test is over.
TEARDOWN_GRACE = 1.0

ControllerFactory = Callable[..., "ProcessController"]

# Controllers made by process_controller for one test, on the test item, so that the
# leftover check and the timeout hook can reach them (no module state: pytester runs
# an inner session in the same process).
_CONTROLLERS = pytest.StashKey[list[Any]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "procctl_check_leftovers",
        type="bool",
        default=False,
        help="procctl: fail every test that leaves a child process behind (needs psutil)",
    )


# -- leftover processes -------------------------------------------------------------


def _import_psutil() -> Any:
    try:
        import psutil
    except ImportError:
        pytest.fail(
            "procctl's no_leftover_processes fixture needs psutil: pip install psutil "
            "(or pip install 'procctl[test]')",
            pytrace=False,
        )
    return psutil


def _helper_pids(psutil: Any) -> set[int]:
    """multiprocessing's helpers and procctl's guardian, by pid: the processes
    themselves, not what they start, and never one of procctl's workers."""
    helpers = set()
    guardian = sys.modules.get("procctl.guardian")
    if guardian is not None and guardian.guardian_pid() is not None:
        helpers.add(guardian.guardian_pid())
    try:
        kids = psutil.Process().children()
    except psutil.NoSuchProcess:
        return helpers
    for proc in kids:
        try:
            cmdline = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if any(entry in cmdline for entry in HELPER_ENTRIES):
            helpers.add(proc.pid)
    # A command line says what a process was started as, not what it is: a
    # forkserver worker carries the fork server's. The controllers know their
    # workers by pid, and those are never helpers.
    return helpers - _worker_pids()


def _worker_pids() -> set[int]:
    """The pids of the live workers of this process's open controllers."""
    return {pid for pc in list(registry.open_controllers) for pid in pc.pids()}


@dataclass(frozen=True)
class Whoami:
    """The test process, as its leftovers' lines of parents are judged."""

    pgid: int
    cmdline: list[str]
    ancestors: set[int]
    #: Where our vdso is mapped (see _layout); None where that cannot be read.
    layout: str | None = None


class Snapshot:
    """What ran before a test, and the mark its processes will carry."""

    serial = 0

    def __init__(self, psutil: Any) -> None:
        Snapshot.serial += 1
        self.mark = f"{os.getpid()}-{Snapshot.serial}"
        self.before = {p.pid for p in _descendants(psutil)}
        self.existing = set(psutil.pids())
        self.previous_mark = os.environ.get(MARKER)
        os.environ[MARKER] = self.mark

    def restore(self) -> None:
        if self.previous_mark is None:
            os.environ.pop(MARKER, None)
        else:
            os.environ[MARKER] = self.previous_mark

    def new_processes(self, psutil: Any) -> list[psutil.Process]:
        """Processes the test started that still exist: descendants of ours, and
        orphans re-parented away that carry the mark or were forked from us."""
        helpers = _helper_pids(psutil)
        found = {p.pid: p for p in _descendants(psutil) if p.pid not in self.before and p.pid not in helpers}
        me = psutil.Process()
        try:
            cmdline = me.cmdline()
        except psutil.Error:
            cmdline = []  # (then only the mark tells an orphan)
        whoami = Whoami(os.getpgid(0), cmdline, _ancestors(psutil), _layout("self"))
        # A helper started by an earlier test (a fork server) gives what it
        # starts for this one that test's mark: started since the snapshot with
        # a helper's mark, a process came through the helper, for this test.
        marks = {self.mark} | _marks_of(helpers, psutil)
        for pid in set(psutil.pids()) - self.existing - set(found) - helpers - {me.pid}:
            try:
                proc = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
            if self._ours(proc, whoami, found, psutil, marks):
                found[pid] = proc
        return list(found.values())

    def _ours(self, proc: psutil.Process, whoami: Whoami, found: dict[int, Any], psutil: Any,
              marks: set[str]) -> bool:
        try:
            environ = proc.environ()
            if environ.get(MARKER) in marks:
                return True
            if os.getpgid(proc.pid) != whoami.pgid:
                # Out of our group: only one forked from us without an exec
                # (a daemon's setsid) can be ours; our command line tells it.
                return self._forked_orphan(proc, whoami, found, psutil)
            # An empty environment is one not yet in place (read in the middle of
            # an exec, as a loaded machine shows it): then the group and the line
            # of parents tell, as for a fork.
            return self._forked_orphan(proc, whoami, found, psutil, unknown=not environ)
        except (OSError, psutil.Error):
            return False

    def _forked_orphan(self, proc: psutil.Process, whoami: Whoami, found: dict[int, Any], psutil: Any,
                       unknown: bool = False) -> bool:
        """A process of our group, started since the snapshot, that is no longer
        our descendant is ours if it or a process it descends from was forked
        from us (our command line) and orphaned: its line of parents, all started
        since the snapshot, ends at init or at one of our ancestors (a subreaper).
        Not a process our shell started meanwhile (`sleep` beside pytest), nor one
        of another session in our group (pytest-xdist's workers, two pytest runs
        of one shell script): their lines reach a process older than the snapshot
        that is not our ancestor, or have none of our command line."""
        forked = unknown
        for _ in range(64):
            forked = forked or bool(whoami.cmdline) and proc.cmdline() == whoami.cmdline and (
                _same_layout(whoami.layout, proc.pid))
            ppid = proc.ppid()
            if ppid in found:
                return True
            if ppid in whoami.ancestors:
                return forked
            if ppid in self.existing:
                return False
            proc = psutil.Process(ppid)
        return False


def _marks_of(pids: set[int], psutil: Any) -> set[str]:
    """The marks of our own tests that the processes `pids` carry (those started
    while a checked test of this process ran; not a mark inherited from outside,
    which other processes carry too)."""
    ours = f"{os.getpid()}-"
    marks = set()
    for pid in pids:
        try:
            mark = psutil.Process(pid).environ().get(MARKER)
        except psutil.Error:
            continue
        if mark and mark.startswith(ours):
            marks.add(mark)
    return marks


def _layout(pid: int | str) -> str | None:
    """Where the kernel mapped the vdso in process `pid`: chosen at random at each
    exec and kept by fork. A process forked from us without an exec has ours; one
    of another exec of our command line (the other pytest-xdist workers) has its own."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                if line.rstrip().endswith("[vdso]"):
                    return line.split("-", 1)[0]
    except OSError:
        pass
    return None


def _same_layout(ours: str | None, pid: int) -> bool:
    """Could `pid` have been forked from us? (Yes where either layout is unknown:
    the command line then tells alone, as without address randomization.)"""
    if ours is None:
        return True
    theirs = _layout(pid)
    return theirs is None or theirs == ours


def _ancestors(psutil: Any) -> set[int]:
    """Our parent, its parent, and so on to init (0 and 1 always): one that
    ended as we looked ends the line, it does not end the check."""
    found = {0, 1}
    pid = os.getppid()
    for _ in range(64):
        if pid in found:
            break
        found.add(pid)
        try:
            pid = psutil.Process(pid).ppid()
        except psutil.Error:
            break
    return found


def _descendants(psutil: Any) -> list[psutil.Process]:
    try:
        kids: list[psutil.Process] = psutil.Process().children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return kids


def _describe(proc: psutil.Process, psutil: Any) -> str:
    try:
        cmdline = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        cmdline = "?"
    if len(cmdline) > 80:
        cmdline = cmdline[:77] + "..."
    return f"pid {proc.pid} ({cmdline})"


def _kill_all(procs: list[psutil.Process], psutil: Any) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=KILL_WAIT)
    mp = sys.modules.get("multiprocessing")
    if mp is not None:
        mp.active_children()  # let multiprocessing forget the processes it started


def wait_ended(procs: list[psutil.Process], timeout: float, psutil: Any) -> list[psutil.Process]:
    """Those of `procs` that have not ended within `timeout` seconds.

    Our own children are waited for and reaped. Any other process counts as
    ended once it has: its zombie is for its parent (init, a subreaper) to
    reap, which can take seconds, and psutil would wait for that. Its pidfd
    says when it ended.
    """
    me = os.getpid()
    ours: list[psutil.Process] = []
    others: list[psutil.Process] = []
    for proc in procs:
        try:
            (ours if proc.ppid() == me else others).append(proc)
        except psutil.NoSuchProcess:
            pass
    alive: list[psutil.Process] = list(psutil.wait_procs(ours, timeout=timeout)[1])
    fds: dict[int, psutil.Process] = {}
    for proc in others:
        try:
            fds[os.pidfd_open(proc.pid)] = proc
        except ProcessLookupError:
            pass
        except (AttributeError, OSError):  # no pidfds here: psutil's wait
            alive += psutil.wait_procs([proc], timeout=timeout)[1]
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
        return alive + list(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def _check_leftovers(snapshot: Snapshot, psutil: Any) -> None:
    new = snapshot.new_processes(psutil)
    if not new:
        return
    # Describe them now: once they are gone their command lines are too.
    described = {p.pid: _describe(p, psutil) for p in new}
    # Exiting processes get a moment; direct children that already exited are reaped here.
    alive = [p for p in wait_ended(new, LEFTOVER_WAIT, psutil) if _running(p, psutil)]
    if not alive:
        return
    for p in alive:  # as it is now, if it has a command line: one seen in the middle of
        try:  # an exec had none yet, or its parent's (a shell that then ran the command)
            now = bool(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            now = False
        if now:
            described[p.pid] = _describe(p, psutil)
    _end_owners({p.pid for p in alive})
    _kill_all(alive, psutil)
    lines = "\n  ".join(described[p.pid] for p in alive)
    pytest.fail(f"test left {len(alive)} child process(es) behind (now killed):\n  {lines}", pytrace=False)


def _end_owners(pids: set[int]) -> None:
    """Stop the open executors and controllers that these leftovers are workers of:
    killed alone, they would be replaced (an executor's crashed worker, a
    restart) and the replacement charged to the next test."""
    executor = sys.modules.get("procctl.executor")
    for pool in list(executor._live_executors) if executor is not None else []:
        try:
            if pids & {s.pid for s in pool.status()}:
                pool.kill()
                pool.stop(0.0)
        except Exception:  # noqa: BLE001 - a broken leftover: its processes are killed below
            pass
    for pc in list(registry.open_controllers):
        try:
            if pids & set(pc.pids()):
                pc.kill()
                pc.close()
        except Exception:  # noqa: BLE001 - as above
            pass
    for pool in _pools_of(pids):
        try:
            pool.terminate()
        except Exception:  # noqa: BLE001 - as above
            pass


def _pools_of(pids: set[int]) -> list[Any]:
    """The multiprocessing Pools of this process that these leftovers work for.

    Killed alone, a Pool's idle worker takes the lock of the Pool's task queue
    with it, and the Pool's own terminate() at the interpreter's exit waits
    for that lock forever (a test suite that never ends); the Pool also
    replaces the workers it lost. Terminated, it ends its workers itself.
    multiprocessing says which processes it started (active_children); the
    Pool that holds one is found by who refers to it (the Pool, through its
    list of workers), with nothing but gc's public calls.
    """
    mp = sys.modules.get("multiprocessing")
    mp_pool = sys.modules.get("multiprocessing.pool")
    if mp is None or mp_pool is None:
        return []
    import gc

    workers = [p for p in mp.active_children() if p.pid in pids]
    found: list[Any] = []
    level: list[Any] = workers
    for _ in range(3):  # the worker <- the Pool's list <- its attributes <- the Pool
        if not level:
            break
        referrers = [r for r in gc.get_referrers(*level) if r is not level and r is not workers]
        found += [r for r in referrers if isinstance(r, mp_pool.Pool) and r not in found]
        level = [r for r in referrers if isinstance(r, (list, dict))]
    return found


def _running(proc: psutil.Process, psutil: Any) -> bool:
    # The zombie of an orphan waits for an init that may never reap it: it has ended.
    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE or proc.ppid() == os.getpid())
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def no_leftover_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a process behind (a child, a grandchild, or one
    re-parented away); kill the leftovers."""
    psutil = _import_psutil()
    snapshot = Snapshot(psutil)
    try:
        yield
    finally:
        snapshot.restore()
    # process_controller may be torn down after us (argument order): close its
    # controllers first so their workers are not mistaken for leftovers.
    _close_controllers(request.node)
    _check_leftovers(snapshot, psutil)


@pytest.fixture(autouse=True)
def _procctl_check_leftovers_ini(request: pytest.FixtureRequest) -> None:
    # Autouse fixtures from plugins are set up before any other, so the check
    # wraps every other fixture's teardown.  Off by default: one ini lookup.
    if request.config.getini("procctl_check_leftovers"):
        request.getfixturevalue("no_leftover_processes")


# -- process_controller ---------------------------------------------------------------


def _controllers(node: pytest.Item | pytest.Collector) -> list[ProcessController]:
    return node.stash.setdefault(_CONTROLLERS, [])


def _close_one(pc: ProcessController) -> None:
    try:
        pc.stop(grace=min(pc.grace, TEARDOWN_GRACE))
    except BaseException:
        # Interrupted (a pytest-timeout alarm during teardown, Ctrl-C): no worker
        # may outlive the test, so kill and reap before letting it propagate.
        pc.kill()
        pc.stop(grace=0)
        raise


def _close_controllers(node: pytest.Item | pytest.Collector) -> None:
    controllers = _controllers(node)
    while controllers:
        _close_one(controllers.pop())


@pytest.fixture
def process_controller(request: pytest.FixtureRequest) -> Iterator[ControllerFactory]:
    """``process_controller(target, workers=2, **kwargs)``: a started ProcessController,
    closed at teardown whatever happened in the test."""
    node = request.node

    def make(target: Callable[..., Any], workers: int = 2, **kwargs: Any) -> ProcessController:
        from procctl import ProcessController

        pc = ProcessController(target, workers, **kwargs)
        _controllers(node).append(pc)  # before start(): a failed start is closed too
        pc.start()
        return pc

    yield make
    _close_controllers(node)


# -- pytest-timeout --------------------------------------------------------------------


def _kill_on_timeout(item: pytest.Item) -> None:
    """SIGKILL the workers of the item's controllers. Runs in the timer thread
    while the main thread may be inside the controller: os.kill only, no reaping."""
    pids: list[int] = []
    for pc in _controllers(item):
        pids += pc.pids()
        pc.kill()
    if pids:
        sys.stderr.write(f"procctl: test timed out; killed workers {sorted(pids)} before exiting\n")
        sys.stderr.flush()


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """Under timeout_method=thread, pytest-timeout ends the whole process with
    os._exit(): no teardown runs.  For tests that use process_controller, take
    the timer over so the workers are killed first, then hand over to
    pytest-timeout's own expiry (stack dump, exit).  Signal-method timeouts raise
    inside the test, and the fixture's teardown closes the controllers."""
    method = settings.method
    if method == "signal" and threading.current_thread() is not threading.main_thread():
        method = "thread"  # what pytest-timeout itself falls back to
    if method != "thread" or "process_controller" not in getattr(item, "fixturenames", ()):
        return None
    import pytest_timeout  # type: ignore[import-untyped]  # loaded: it called this hook

    expire = getattr(pytest_timeout, "timeout_timer", None)
    is_debugging = getattr(pytest_timeout, "is_debugging", lambda: False)
    if expire is None:
        return None  # an unknown pytest-timeout: leave the timer to it

    def on_timeout() -> None:
        if settings.disable_debugger_detection or not is_debugging():
            _kill_on_timeout(item)
        expire(item, settings)

    timer = threading.Timer(settings.timeout, on_timeout)
    timer.name = f"procctl-timeout {item.nodeid}"

    def cancel() -> None:
        timer.cancel()
        timer.join()

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # what pytest-timeout's cancel hook calls
    timer.start()
    return True
