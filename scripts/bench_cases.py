# ruff: noqa: B023  (the lambdas are called at once, inside their loop iteration)
"""The cases of scripts/bench.py. Each runs inside a fresh case process.

Every measurement runs under `deadline()` (SIGALRM raises CaseTimeout) and
cleans up in `finally`; `sweep()` afterwards kills and reaps any process a
contender left behind and counts it as a stray.  Rows are plain dicts:

    {"case", "method", "n", "name", "role", "unit", "higher", "samples",
     "error", "note", "stray", ...}

role is "procctl", "floor", "peer" or "contrast".
"""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import os
import queue
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import bench_workers as bw
import psutil

import procctl
from procctl import ProcessController
from procctl.states import finite

perf = time.perf_counter

#: Long-lived helpers, one per process, not strays: multiprocessing's, and
#: procctl's guardian (containment.py), which outlives a controller on purpose.
HELPER_MARKS = ("forkserver import main", "resource_tracker import main", "semaphore_tracker import main",
                "procctl.guardian_process import main")


#: What sweep() found, for the notes.
STRAYS: list[str] = []


class CaseTimeout(Exception):
    pass


class Unavailable(Exception):
    """The contender cannot run here (not installed, no such option)."""


@contextmanager
def deadline(seconds: float):
    def on_alarm(signum, frame):
        raise CaseTimeout(f"timed out after {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def is_helper(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False
    return any(mark in cmd for mark in HELPER_MARKS)


def sweep() -> int:
    """Kill and reap every descendant that is not a multiprocessing helper."""
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    strays = [p for p in kids if not is_helper(p)]
    for p in strays:
        try:
            STRAYS.append(" ".join(p.cmdline())[:120] or p.name())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            STRAYS.append(f"pid {p.pid} (zombie)")
    for p in strays:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(strays, timeout=5)
    return len(strays)


#: Rows of this case process, saved after every measurement so that a case
#: killed by the harness's timeout still reports what it measured.
SINK: dict[str, Any] = {"path": None, "rows": []}


def save() -> None:
    if SINK["path"]:
        tmp = SINK["path"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(finite([r for r in SINK["rows"] if r["case"] != "warmup"]), f, allow_nan=False)
        os.replace(tmp, SINK["path"])


def row(case: str, method: str, n: int | None, name: str, role: str, unit: str, *,
        higher: bool = False, note: str = "") -> dict[str, Any]:
    r = {"case": case, "method": method, "n": n, "name": name, "role": role, "unit": unit,
         "higher": higher, "samples": [], "error": None, "note": note, "stray": 0}
    if case != "warmup":
        SINK["rows"].append(r)
    return r


def measure(r: dict[str, Any], fn: Callable[[], Any], timeout: float) -> Any:
    """Run one measurement under a deadline; record errors and strays in the row."""
    if r["error"]:
        return None
    value = None
    try:
        with deadline(timeout):
            value = fn()
    except Unavailable as exc:
        r["error"] = f"not available: {exc}"
    except CaseTimeout as exc:
        r["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - a failing contender is a result
        r["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        k = sweep()
        if k:
            r["stray"] += k
            r["stray_what"] = STRAYS[-k:]
    return value


def progress(r: dict[str, Any], n: int) -> None:
    print(f"    {r['case']} {r['method']} N={n} {r['name']} ...", file=sys.stderr, flush=True)


def record(r: dict[str, Any], value: Any) -> None:
    if value is not None:
        r["samples"].append(value)
    save()


def _join_all(procs, timeout: float) -> None:
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))


def _kill_all(procs) -> None:
    """Best-effort cleanup of raw Process objects, whatever state they are in."""
    for p in procs:
        try:
            if p.pid is not None and p.exitcode is None:
                p.kill()
        except (ValueError, OSError, AttributeError):
            pass
    for p in procs:
        try:
            if p.pid is not None:
                p.join(5)
            p.close()
        except (ValueError, OSError, AttributeError):
            pass


def _close_conns(conns) -> None:
    for c in conns:
        try:
            c.close()
        except OSError:
            pass


def _check_reports(reports, n: int, outcomes: tuple[str, ...]) -> None:
    if len(reports) != n:
        raise RuntimeError(f"{len(reports)} reports for {n} workers")
    bad = [r for r in reports.values() if r.outcome.value not in outcomes]
    if bad:
        raise RuntimeError(f"worker {bad[0].worker_id}: {bad[0].outcome.value} {bad[0].error_line or ''}")


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as exc:
        raise Unavailable(f"{name} not installed") from exc


# =============================================================================
# 1. Lifecycle
# =============================================================================


def life_procctl(m: str, n: int) -> float:
    """The lifecycle a batch script sees (issue 10's harness): start PAUSED,
    run(), wait() for every worker to return, leave the block."""
    t0 = perf()
    with ProcessController(bw.pc_lifecycle, n, start_method=m, grace=30.0) as pc:
        pc.run()
        pc.wait(timeout=120)
    t = perf() - t0
    _check_reports(pc.reports, n, ("finished",))
    return t


def life_raw(m: str, n: int) -> float:
    ctx = mp.get_context(m)
    procs, conns = [], []
    try:
        t0 = perf()
        for _ in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=bw.raw_lifecycle, args=(b,))
            procs.append(p)
            conns.append(a)
            p.start()
            b.close()
        for a in conns:
            a.send(0)
        for a in conns:
            a.recv()
        for p in procs:
            p.join()
        for a in conns:
            a.close()
        for p in procs:
            p.close()
        return perf() - t0
    finally:
        _close_conns(conns)
        _kill_all(procs)


def life_pool(m: str, n: int) -> float:
    t0 = perf()
    pool = mp.get_context(m).Pool(n)
    try:
        pool.map(bw.trivial, range(n), chunksize=1)
        pool.close()
        pool.join()
        return perf() - t0
    finally:
        pool.terminate()
        pool.join()


def life_ppe(m: str, n: int) -> float:
    from concurrent.futures import ProcessPoolExecutor

    t0 = perf()
    ex = ProcessPoolExecutor(n, mp_context=mp.get_context(m))
    try:
        list(ex.map(bw.trivial, range(n)))
        ex.shutdown(wait=True)
        return perf() - t0
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _loky_ctx(m: str):
    _import("loky")
    from loky.backend import context as lctx

    # loky refuses plain fork (not safe with its threads); its default is
    # its own fork+exec method.
    return lctx.get_context("loky" if m == "fork" else m)


def life_loky(m: str, n: int) -> float:
    loky = _import("loky")
    ctx = _loky_ctx(m)
    t0 = perf()
    ex = loky.ProcessPoolExecutor(n, context=ctx)
    try:
        list(ex.map(bw.trivial, range(n)))
        ex.shutdown(wait=True)
        return perf() - t0
    finally:
        ex.shutdown(wait=True, kill_workers=True)


def life_pebble(m: str, n: int) -> float:
    pebble = _import("pebble")
    t0 = perf()
    pool = pebble.ProcessPool(max_workers=n, context=mp.get_context(m))
    try:
        futs = [pool.schedule(bw.trivial, args=(i,)) for i in range(n)]
        for f in futs:
            f.result()
        pool.close()
        pool.join()
        return perf() - t0
    finally:
        pool.stop()
        pool.join()


def life_mpire(m: str, n: int) -> float:
    mpire = _import("mpire")
    t0 = perf()
    pool = mpire.WorkerPool(n_jobs=n, start_method=m)
    try:
        pool.map(bw.trivial, range(n), chunk_size=1, progress_bar=False)
        pool.stop_and_join()
        return perf() - t0
    finally:
        pool.terminate()


def life_billiard(m: str, n: int) -> float:
    billiard = _import("billiard")
    t0 = perf()
    pool = billiard.get_context(m).Pool(n)
    try:
        pool.map(bw.trivial, range(n), chunksize=1)
        pool.close()
        pool.join()
        return perf() - t0
    finally:
        pool.terminate()
        pool.join()


LIFECYCLE = [
    ("procctl", "procctl", life_procctl),
    ("raw Process+Pipe", "floor", life_raw),
    ("mp.Pool", "peer", life_pool),
    ("ProcessPoolExecutor", "peer", life_ppe),
    ("loky", "peer", life_loky),
    ("pebble", "peer", life_pebble),
    ("mpire", "peer", life_mpire),
    ("billiard", "peer", life_billiard),
]


def _skipped_peers(rows, case: str, m: str, n: int, p: dict[str, Any], table) -> None:
    why = None
    if not p.get("peers", True):
        why = "skipped: peers run under the first start method only"
    elif n > p["peer_max_n"]:
        why = f"skipped: this mode runs peers up to N={p['peer_max_n']}"
    if why:
        names = ", ".join(e[0].split()[0].removeprefix("mp.").split(".")[0] for e in table if e[1] == "peer")
        r = row(case, m, n, f"peers ({names})", "peer", "s")
        r["error"] = why
        rows.append(r)


def case_lifecycle(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    plans = []
    for n in p["ns"]:
        entries = []
        for name, role, fn in LIFECYCLE:
            note = ""
            if name == "loky" and m == "fork":
                note = "loky's own fork+exec method (no plain fork)"
            if role == "peer":
                note = (note + "; " if note else "") + "N trivial tasks, then shut down"
            if role == "peer" and (n > p["peer_max_n"] or not p.get("peers", True)):
                continue
            r = row("lifecycle", m, n, name, role, "s", note=note)
            rows.append(r)
            entries.append((r, fn))
        _skipped_peers(rows, "lifecycle", m, n, p, LIFECYCLE)
        timeout = p["timeout"] + n * p["timeout_per_n"]
        for r, fn in entries:  # warm up: imports, forkserver, resource trackers
            if not r.get("error"):
                w = row("warmup", m, 2, "", "", "s")
                if r["name"] in p.get("import_warmup", ()):
                    # (--quick: a run of these takes a second or two, its first-run
                    # costs a few percent of that; they are imported, not run)
                    measure(w, lambda name=r["name"]: _import(name), 60)
                    r["note"] += "; warmed up by import only"
                else:
                    measure(w, lambda fn=fn: fn(m, 2), 60)
                if w["error"] and "not available" in w["error"]:
                    r["error"] = w["error"]
        plans.append((n, entries, timeout))
    # N=500 under forkserver is seconds a repetition: fewer repetitions from `big_n` on
    # keep the full run in its time (and N=100 the quick one).
    _own_first(plans, m, p, lambda n: p["repeats"] if n < p.get("big_n", 500) else min(p["big_repeats"],
                                                                                         p["repeats"]))
    return rows


def _repeat(entries: list[tuple[dict[str, Any], Any]], m: str, n: int, p: dict[str, Any], reps: int,
            timeout: float) -> None:
    """procctl and its floor, interleaved, `reps` times; then the peers. A slow
    peer (or one that times out) must not cost the targets their repetitions."""
    own = [(r, fn) for r, fn in entries if r["role"] != "peer"]
    peers = [(r, fn) for r, fn in entries if r["role"] == "peer"]
    for _ in range(reps):
        for r, fn in own:
            progress(r, n)
            record(r, measure(r, lambda fn=fn: fn(m, n), timeout))
    # Peers: `peer_repeats` each, but one whose next repetition would take its
    # wall time (setup included) past `peer_budget` seconds stops there, and
    # says so: loky starts 100 fresh interpreters (10-20 s a run here), billiard's
    # terminate() takes 7 s, and three of those would break the full run's 10 minutes.
    want = min(reps, p["peer_repeats"])
    budget = p.get("peer_budget")
    spent = {id(r): 0.0 for r, _ in peers}
    last = dict(spent)
    for k in range(want):
        for r, fn in peers:
            if k and budget is not None and spent[id(r)] + last[id(r)] > budget:
                if "repetition" not in r["note"]:
                    r["note"] += (f"; {k} of {want} repetitions: a run takes {last[id(r)]:.1f} s with its setup, "
                                  f"another would pass the {budget:g} s per peer that keep this mode "
                                  "within its time")
                    save()
                continue
            progress(r, n)
            t0 = time.monotonic()
            record(r, measure(r, lambda fn=fn: fn(m, n), timeout))
            last[id(r)] = time.monotonic() - t0
            spent[id(r)] += last[id(r)]


# =============================================================================
# 2. Broadcast round trip
# =============================================================================


class PipeFloor:
    def __init__(self, ctx, n: int) -> None:
        self.procs, self.conns = [], []
        for _ in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=bw.raw_pipe_echo, args=(b,))
            self.procs.append(p)
            self.conns.append(a)
            p.start()
            b.close()

    def round(self, msg: int) -> None:
        conns = self.conns
        for c in conns:
            c.send(msg)
        for c in conns:
            c.recv()

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        _join_all(self.procs, 5)
        _close_conns(self.conns)
        _kill_all(self.procs)


class CondFloor:
    def __init__(self, ctx, n: int) -> None:
        self.n = n
        self.lock = ctx.Lock()
        self.cmd = ctx.Condition(self.lock)
        self.done = ctx.Condition(self.lock)
        self.gen = ctx.RawValue("q", 0)
        self.acks = ctx.RawValue("q", 0)
        self.procs = []
        for _ in range(n):
            p = ctx.Process(target=bw.raw_cond_worker,
                            args=(self.lock, self.cmd, self.done, self.gen, self.acks, n))
            self.procs.append(p)
            p.start()

    def round(self, msg: int) -> None:
        with self.lock:
            self.gen.value += 1
            self.acks.value = 0
            self.cmd.notify_all()
            while self.acks.value < self.n:
                if not self.done.wait(30):
                    raise TimeoutError(f"{self.n - self.acks.value} workers did not ack")

    def close(self) -> None:
        try:
            if self.lock.acquire(timeout=5):
                try:
                    self.gen.value = -1
                    self.cmd.notify_all()
                finally:
                    self.lock.release()
        except Exception:  # noqa: BLE001 - cleanup goes on
            pass
        _join_all(self.procs, 5)
        _kill_all(self.procs)


def case_broadcast(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context(m)
    rows = []
    for n in p["ns"]:
        rp = row("broadcast", m, n, "procctl pause()/run()", "procctl", "s")
        rf = row("broadcast", m, n, "per-worker Pipe", "floor", "s")
        rc = row("broadcast", m, n, "shared Condition+counters", "floor", "s")
        rn = row("broadcast", m, n, "Pool/PPE/loky/pebble/mpire/billiard", "peer", "s",
                 note="no broadcast: peers cannot pause or resume their workers")
        rn["error"] = "n/a: no broadcast"
        rows += [rp, rf, rc, rn]
        rounds = p["rounds"]

        def run() -> None:
            pc = ProcessController(bw.pc_idle, n, start_method=m, ack_timeout=30.0, grace=10.0)
            pipe = cond = None
            try:
                pc.start()
                pc.run()
                pipe = PipeFloor(ctx, n)
                cond = CondFloor(ctx, n)
                for i in range(5):  # warm up, and wait until every floor worker is up
                    pc.pause()
                    pc.run()
                    pipe.round(i)
                    cond.round(i)
                for i in range(rounds):
                    for fn, r in ((pc.pause, rp), (pipe.round, rf), (cond.round, rc),
                                  (pc.run, rp), (pipe.round, rf), (cond.round, rc)):
                        t0 = perf()
                        if r is rp:
                            fn()
                        else:
                            fn(i)
                        r["samples"].append(perf() - t0)
                    if i % 10 == 9:
                        save()
                reports = pc.stop()
                _check_reports(reports, n, ("stopped", "finished"))
            finally:
                pc.close()
                for floor in (pipe, cond):
                    if floor is not None:
                        floor.close()

        measure(rp, run, p["timeout"] + n * p["timeout_per_n"])
        if rp["error"]:
            for r in (rf, rc):
                if r["samples"]:
                    r["note"] = "run ended early: procctl failed (see its row)"
                else:
                    r["error"] = "not measured: " + rp["error"]
        save()
    return rows


# =============================================================================
# 3. Stop while busy
# =============================================================================


def _wait_ready(sem, n: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    for i in range(n):
        if not sem.acquire(timeout=max(0.0, end - time.monotonic())):
            raise TimeoutError(f"only {i} of {n} workers got busy")


def _time_stop(m: str, n: int, target: Any, args: tuple[Any, ...], ready: Any) -> float:
    """Seconds of stop() of `n` busy workers, every one of which released `ready`.

    Started PAUSED, so that busy early workers do not starve the manager while
    it starts the rest (13 s for 100 workers started RUNNING on 2 cores); then
    run(), wait until every worker did a unit, and stop them RUNNING.
    """
    pc = ProcessController(target, n, args=args, start_method=m, grace=30.0)
    try:
        pc.start()
        pc.run()
        _wait_ready(ready, n, 60)
        t0 = perf()
        reports = pc.stop()
        t = perf() - t0
    finally:
        pc.close()
    _check_reports(reports, n, ("stopped",))
    return t


def stop_procctl(m: str, n: int) -> float:
    ready = mp.get_context(m).Semaphore(0)
    return _time_stop(m, n, bw.pc_busy, (ready,), ready)


def stop_raw(m: str, n: int) -> float:
    ctx = mp.get_context(m)
    stop, ready, up, go = ctx.Event(), ctx.Semaphore(0), ctx.Semaphore(0), ctx.Event()
    procs = []
    try:
        for _ in range(n):
            p = ctx.Process(target=bw.raw_busy, args=(stop, ready, up, go))
            procs.append(p)
            p.start()
        _wait_ready(up, n, 60)
        go.set()
        _wait_ready(ready, n, 60)
        t0 = perf()
        stop.set()
        for p in procs:
            p.join()
        t = perf() - t0
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"raw workers exited with {bad[:3]}")
        return t
    finally:
        _kill_all(procs)


def _tasks(n: int) -> int:
    return 20 * n + 200


class _Done:
    """Counts completed tasks from any callback thread."""

    def __init__(self) -> None:
        self.sem = threading.Semaphore(0)

    def __call__(self, *_: Any) -> None:
        self.sem.release()


def _stop_executor(ex: Any, n: int, shutdown: Any) -> float:
    """Fill an executor (PPE, loky) with 1 ms tasks; time `shutdown(ex)`."""
    done = _Done()
    try:
        for i in range(_tasks(n)):
            ex.submit(bw.unit_task, i).add_done_callback(done)
        _wait_ready(done.sem, n, 60)
        t0 = perf()
        shutdown(ex)
        return perf() - t0
    finally:
        shutdown(ex)


def stop_ppe(m: str, n: int) -> float:
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(n, mp_context=mp.get_context(m))
    return _stop_executor(ex, n, lambda e: e.shutdown(wait=True, cancel_futures=True))


def stop_loky(m: str, n: int) -> float:
    ex = _import("loky").ProcessPoolExecutor(n, context=_loky_ctx(m))
    return _stop_executor(ex, n, lambda e: e.shutdown(wait=True, kill_workers=True))


def stop_pebble(m: str, n: int) -> float:
    pebble = _import("pebble")
    pool = pebble.ProcessPool(max_workers=n, context=mp.get_context(m))
    done = _Done()
    try:
        futs = []
        for i in range(_tasks(n)):
            f = pool.schedule(bw.unit_task, args=(i,))
            f.add_done_callback(done)
            futs.append(f)
        _wait_ready(done.sem, n, 60)
        t0 = perf()
        for f in futs:
            f.cancel()
        pool.stop()
        pool.join()
        return perf() - t0
    finally:
        pool.stop()
        pool.join()


def _stop_apply_pool(pool: Any, n: int) -> float:
    """Fill a Pool-like (mp.Pool, billiard) with 1 ms tasks; time terminate() and join()."""
    done = _Done()
    try:
        for i in range(_tasks(n)):
            pool.apply_async(bw.unit_task, (i,), callback=done)
        _wait_ready(done.sem, n, 60)
        t0 = perf()
        pool.terminate()
        pool.join()
        return perf() - t0
    finally:
        pool.terminate()
        pool.join()


def stop_pool(m: str, n: int) -> float:
    return _stop_apply_pool(mp.get_context(m).Pool(n), n)


def stop_billiard(m: str, n: int) -> float:
    return _stop_apply_pool(_import("billiard").get_context(m).Pool(n), n)


def stop_mpire(m: str, n: int) -> float:
    mpire = _import("mpire")
    pool = mpire.WorkerPool(n_jobs=n, start_method=m)
    done = _Done()
    try:
        for i in range(_tasks(n)):
            pool.apply_async(bw.unit_task, args=(i,), callback=done)
        _wait_ready(done.sem, n, 60)
        t0 = perf()
        pool.terminate()
        return perf() - t0
    finally:
        pool.terminate()


STOP = [
    ("procctl stop()", "procctl", stop_procctl, ""),
    ("raw Event per unit", "floor", stop_raw, ""),
    ("PPE shutdown(cancel_futures)", "peer", stop_ppe, "waits for running tasks"),
    ("pebble cancel+stop", "peer", stop_pebble, ""),
    ("loky shutdown(kill_workers)", "peer", stop_loky, ""),
    ("mp.Pool.terminate()", "peer", stop_pool, ""),
    ("mpire terminate()", "peer", stop_mpire, ""),
    ("billiard terminate()", "peer", stop_billiard, ""),
]


def case_stop(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    plans = []
    for n in p["ns"]:
        entries = []
        for name, role, fn, note in STOP:
            if role == "peer":
                note = (note + "; " if note else "") + "1 ms tasks queued, stop timed"
            if role == "peer" and (n > p["peer_max_n"] or not p.get("peers", True)):
                continue
            if name.startswith("billiard") and p.get("quick"):
                continue  # its terminate() alone takes seconds: full mode only
            r = row("stop", m, n, name, role, "s", note=note)
            rows.append(r)
            entries.append((r, fn))
        _skipped_peers(rows, "stop", m, n, p, STOP)
        timeout = p["timeout"] + n * p["timeout_per_n"]
        for r, fn in entries:
            if not r["error"] and r["role"] != "peer":
                w = row("warmup", m, 2, "", "", "s")
                measure(w, lambda fn=fn: fn(m, 2), 60)
                if w["error"] and "not available" in w["error"]:
                    r["error"] = w["error"]
        plans.append((n, entries, timeout))
    _own_first(plans, m, p, lambda n: p["repeats"])
    return rows


def _own_first(plans: list[tuple[int, list[tuple[dict[str, Any], Any]], float]], m: str, p: dict[str, Any],
               reps: Callable[[int], int]) -> None:
    """procctl and its floor at every N, then the peers: a peer that hangs past
    the case's timeout (the stdlib Pool's terminate() did) costs the targets nothing."""
    for peers in (False, True):
        for n, entries, timeout in plans:
            _repeat([e for e in entries if (e[0]["role"] == "peer") == peers], m, n, p, reps(n), timeout)


# =============================================================================
# 4. Paused cost
# =============================================================================


def _cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def _cpu_over(groups: dict[str, list[int]], window: float) -> dict[str, float]:
    before = {k: _cpu(v) for k, v in groups.items()}
    time.sleep(window)  # the measurement window itself, not synchronisation
    after = {k: _cpu(v) for k, v in groups.items()}
    out = {}
    for k in groups:
        common = before[k].keys() & after[k].keys()
        if len(common) != len(groups[k]):
            raise RuntimeError(f"{k}: {len(groups[k]) - len(common)} workers vanished during the window")
        out[k] = sum(after[k][pid] - before[k][pid] for pid in common)
    return out


def _raw_waiters(ctx, n: int, target) -> tuple[list, Any]:
    q = ctx.Queue()
    ready, go = ctx.Semaphore(0), ctx.Event()
    procs = []
    try:
        for _ in range(n):
            p = ctx.Process(target=bw.ready_then, args=(ready, go, target, q))
            procs.append(p)
            p.start()
        _wait_ready(ready, n, 60)
    except BaseException:
        _kill_all(procs)
        raise
    go.set()  # the naive pollers start spinning only once all are up
    return procs, q


def _stop_waiters(procs, q) -> None:
    try:
        for _ in procs:
            q.put(None)
        _join_all(procs, 10)
    finally:
        _kill_all(procs)
        q.close()
        q.join_thread()


def case_paused(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context(m)
    n, window, naive_window = p["n"], p["window"], p["naive_window"]
    unit = "CPU-s/3s"
    rp = row("paused", m, n, "procctl paused workers", "procctl", unit,
             note=f"{window:g} s window, measured beside the floor")
    rf = row("paused", m, n, "raw blocked in Queue.get()", "floor", unit, note="same window as procctl")
    rn = row("paused", m, n, "naive get_nowait()+sleep(0)", "contrast", unit,
             note=f"{naive_window:g} s window" + (", scaled to 3 s" if naive_window != 3 else ""))
    rows = [rp, rf, rn]

    def run_idle() -> None:
        pc = ProcessController(bw.pc_idle, n, start_method=m, grace=10.0)
        procs, q = [], None
        try:
            pc.start()
            procs, q = _raw_waiters(ctx, n, bw.raw_blocked_get)
            for _ in range(p["repeats"]):
                got = _cpu_over({"pc": pc.pids(), "raw": [x.pid for x in procs]}, window)
                rp["samples"].append(got["pc"] * 3.0 / window)
                rf["samples"].append(got["raw"] * 3.0 / window)
            _check_reports(pc.stop(), n, ("stopped",))
        finally:
            pc.close()
            if q is not None:
                _stop_waiters(procs, q)

    def run_naive() -> None:
        procs, q = [], None
        try:
            procs, q = _raw_waiters(ctx, n, bw.raw_naive_poll)
            got = _cpu_over({"naive": [x.pid for x in procs]}, naive_window)
            rn["samples"].append(got["naive"] * 3.0 / naive_window)
        finally:
            if q is not None:
                _stop_waiters(procs, q)

    measure(rp, run_idle, 60 + p["repeats"] * window * 2)
    if rp["error"]:
        rf["error"] = "not measured: " + rp["error"]
    save()
    measure(rn, run_naive, 60 + naive_window * 2)
    save()
    return rows


# =============================================================================
# 5. Sum job throughput
# =============================================================================


def raw_sum(m: str, threshold: int, batch: int, queue_size: int, seed: int) -> dict[str, Any]:
    """A hand-written 3x3 sum-threshold run over one multiprocessing.Queue."""
    ctx = mp.get_context(m)
    values = (1, 2, 3)
    q = ctx.Queue(queue_size)
    stop = ctx.Event()
    flag = ctx.RawValue("b", 0)
    lock = ctx.Lock()
    winner = ctx.RawValue("i", -1)
    produced, sums, received = ctx.RawArray("q", 3), ctx.RawArray("q", 3), ctx.RawArray("q", 3)
    producers, consumers = [], []
    try:
        t0 = perf()
        for i in range(3):
            c = ctx.Process(target=bw.raw_consumer,
                            args=(i, q, flag, stop, lock, winner, sums, received, threshold))
            consumers.append(c)
            c.start()
        for i in range(3):
            pr = ctx.Process(target=bw.raw_producer, args=(i, q, flag, produced, values, batch, seed))
            producers.append(pr)
            pr.start()
        if not stop.wait(120):
            raise TimeoutError("nobody crossed the threshold")
        drained = 0
        # Keep the queue moving until every producer (and its feeder) is gone:
        # then every item a producer counted is in the pipe or was taken.
        while any(pr.exitcode is None for pr in producers):
            try:
                item = q.get(timeout=0.01)
            except queue.Empty:
                continue
            drained += len(item) if isinstance(item, list) else 1
        # The consumers end at the flag (within one 10 ms get). Joined, none
        # holds the queue's read lock or an item half read: get_nowait() raised
        # Empty while a consumer held the lock, and the drain stopped early.
        _join_all(consumers, 30)
        if any(c.exitcode is None for c in consumers):
            raise TimeoutError("a consumer did not end after the flag")
        # Nobody else reads now: take exactly what is left, blocking (bounded)
        # until the counts balance, then make sure nothing more is there.
        left = sum(produced) - sum(received) - drained
        end = time.monotonic() + 30
        while left > 0 and time.monotonic() < end:
            try:
                item = q.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            k = len(item) if isinstance(item, list) else 1
            drained += k
            left -= k
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            drained += len(item) if isinstance(item, list) else 1
        q.close()
        q.join_thread()
        elapsed = perf() - t0
        res = {"winner": winner.value, "sums": list(sums), "received": list(received),
               "produced": list(produced), "drained": drained, "elapsed": elapsed}
        _check_sum(res, threshold)
        return res
    finally:
        _kill_all(producers + consumers)


def _check_sum(res: dict[str, Any], threshold: int) -> None:
    if sum(res["produced"]) != sum(res["received"]) + res["drained"]:
        raise RuntimeError(f"accounting broken: produced {sum(res['produced'])} != received "
                           f"{sum(res['received'])} + drained {res['drained']}")
    if res["winner"] is None or res["winner"] < 0 or res["sums"][res["winner"]] <= threshold:
        raise RuntimeError(f"bad winner {res['winner']} with sums {res['sums']}")


def procctl_sum(m: str, threshold: int, batch: int | None, queue_size: int, seed: int) -> dict[str, Any]:
    fn = getattr(procctl, "sum_threshold", None)
    if fn is None:
        raise Unavailable("procctl.sum_threshold does not exist yet")
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = dict(producers=3, consumers=3, threshold=threshold, values=(1, 2, 3),
                              queue_size=queue_size, delay=0.0)
    if batch is not None:
        if "batch" not in params:
            raise Unavailable("sum_threshold has no batch= option")
        kw["batch"] = batch
    missing = [k for k in kw if k not in params and not any(
        x.kind is inspect.Parameter.VAR_KEYWORD for x in params.values())]
    if missing:
        raise Unavailable(f"sum_threshold lacks {missing}")
    if "start_method" in params:
        kw["start_method"] = m
    if "seed" in params:
        kw["seed"] = seed
    if "timeout" in params:
        kw["timeout"] = 120.0
    t0 = perf()
    r = fn(**kw)
    wall = perf() - t0
    res = {"winner": r.winner, "sums": list(r.sums), "received": list(r.received),
           "produced": list(r.produced), "drained": r.drained, "elapsed": r.elapsed, "wall": wall}
    _check_sum(res, threshold)
    return res


def channels_3x3(m: str, items: int, batch: int, queue_size: int) -> dict[str, Any]:
    """The sum job's traffic on bare channels (no job): items/s over the same shape."""
    from procctl import ProcessController, State

    per = max(1, items // batch // 3)
    t0 = perf()
    with ProcessController(bw.chan_3x3, 6, args=(per, batch), start_method=m, initial_state=State.RUNNING,
                           channels={"items": queue_size}) as pc:
        ended = 0
        while ended < 3:  # the producers
            ended += sum(r.worker_id < 3 for r in pc.reap(timeout=60))
        pc.channels["items"].close()
        if not pc.wait(60):
            raise TimeoutError("the consumers did not finish")
        elapsed = perf() - t0
        reports = pc.stop()
    got = sum(r.result for w, r in reports.items() if w >= 3)
    if got != 3 * per:
        raise RuntimeError(f"channels lost items: {got} of {3 * per}")
    return {"produced": [got * batch], "elapsed": elapsed}


def case_throughput(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    unit = "items/s"
    qs = p["queue_size"]
    # sum_threshold caps its batch (MAX_BATCH); the raw floor uses lists of p["batch"].
    try:
        import importlib

        st = importlib.import_module("procctl.jobs.sum_threshold")
        pbatch = min(p["batch"], getattr(st, "MAX_BATCH", p["batch"]))
    except ImportError:
        pbatch = p["batch"]
    variants = [
        ("procctl.sum_threshold per item", "procctl", lambda s: procctl_sum(m, p["threshold"], None, qs, s)),
        ("raw mp.Queue per item", "floor", lambda s: raw_sum(m, p["threshold"], 1, qs, s)),
        (f"procctl.sum_threshold batch={pbatch}", "procctl",
         lambda s: procctl_sum(m, p["batch_threshold"], pbatch, qs, s)),
        (f"raw mp.Queue lists of {p['batch']}", "floor",
         lambda s: raw_sum(m, p["batch_threshold"], p["batch"], qs, s)),
        # What the job runs on, alone: where its per-item figure comes from.
        ("channels alone per item", "peer", lambda s: channels_3x3(m, p["threshold"], 1, qs)),
        (f"channels alone batch={pbatch}", "peer",
         lambda s: channels_3x3(m, p["batch_threshold"], pbatch, qs)),
    ]
    rows = []
    entries = []
    for name, role, fn in variants:
        r = row("throughput", m, 3, name, role, unit, higher=True,
                note=f"3x3, delay 0, queue_size {qs}; items/s = sum(produced)/elapsed")
        r["invariants"] = []
        rows.append(r)
        entries.append((r, fn))
    # A small run of each side first, not counted: a case's first run pays its imports and code paths.
    w = row("warmup", m, 3, "", "", unit)
    measure(w, lambda: procctl_sum(m, p["threshold"] // 20, None, qs, 0), 60)
    measure(w, lambda: raw_sum(m, p["threshold"] // 20, 1, qs, 0), 60)
    for rep in range(p["repeats"]):
        for r, fn in entries:
            res = measure(r, lambda fn=fn: fn(rep + 1), 150)
            if res is not None:
                r["samples"].append(sum(res["produced"]) / res["elapsed"])
                r["invariants"].append("ok")
                r.setdefault("runs", []).append(res)
            save()
    return rows


# =============================================================================
# 6. Memory
# =============================================================================


def _pss_mib(pids: list[int]) -> float:
    vals = [psutil.Process(pid).memory_full_info().pss for pid in pids]
    return statistics.fmean(vals) / 2**20


def mem_procctl(m: str, n: int) -> float:
    pc = ProcessController(bw.pc_idle, n, start_method=m, grace=10.0)
    try:
        pc.start()
        value = _pss_mib(pc.pids())
        _check_reports(pc.stop(), n, ("stopped",))
        return value
    finally:
        pc.close()


def mem_raw(m: str, n: int) -> float:
    ctx = mp.get_context(m)
    procs, conns = [], []
    try:
        for _ in range(n):
            a, b = ctx.Pipe()
            pr = ctx.Process(target=bw.raw_idle_recv, args=(b,))
            procs.append(pr)
            conns.append(a)
            pr.start()
            b.close()
        for a in conns:
            a.recv()  # the worker is up and about to block in recv()
        value = _pss_mib([pr.pid for pr in procs])
        for a in conns:
            a.send(None)
        _join_all(procs, 10)
        return value
    finally:
        _close_conns(conns)
        _kill_all(procs)


def case_memory(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    n = p["n"]
    rp = row("memory", m, n, "procctl idle worker", "procctl", "MiB PSS")
    rf = row("memory", m, n, "raw idle Process", "floor", "MiB PSS")
    for _ in range(p["repeats"]):
        for r, fn in ((rp, mem_procctl), (rf, mem_raw)):
            record(r, measure(r, lambda fn=fn: fn(m, n), 120))
    return [rp, rf]



# =============================================================================
# 7. The work plane: ProcessExecutor and channels (2 workers)
# =============================================================================


def _rate(n: int, fn: Callable[[], Any]) -> float:
    t0 = perf()
    fn()
    return n / (perf() - t0)


def ex_trivial(m: str, n: int, chunksize: int | None) -> float:
    with procctl.ProcessExecutor(2, start_method=m) as ex:
        list(ex.map(bw.ident, range(100), chunksize=1))  # warm
        return _rate(n, lambda: list(ex.map(bw.ident, range(n), chunksize=chunksize)))


def pool_imap1(m: str, n: int) -> float:
    with mp.get_context(m).Pool(2) as pool:
        list(pool.imap_unordered(bw.ident, range(100), chunksize=1))
        return _rate(n, lambda: list(pool.imap_unordered(bw.ident, range(n), chunksize=1)))


def pool_map_auto(m: str, n: int) -> float:
    with mp.get_context(m).Pool(2) as pool:
        pool.map(bw.ident, range(100))
        return _rate(n, lambda: pool.map(bw.ident, range(n)))


def ppe_map(m: str, n: int, chunksize: int) -> float:
    import concurrent.futures as cf

    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(m)) as ex:
        list(ex.map(bw.ident, range(100)))
        return _rate(n, lambda: list(ex.map(bw.ident, range(n), chunksize=chunksize)))


def _latency_p50(ex: Any, rounds: int) -> float:
    for i in range(20):
        ex.submit(bw.ident, i).result()
    lat = []
    for i in range(rounds):
        t0 = perf()
        ex.submit(bw.ident, i).result()
        lat.append(perf() - t0)
    return statistics.median(lat) * 1e3


def ex_latency(m: str, rounds: int) -> float:
    with procctl.ProcessExecutor(2, start_method=m) as ex:
        return _latency_p50(ex, rounds)


def ppe_latency(m: str, rounds: int) -> float:
    import concurrent.futures as cf

    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(m)) as ex:
        return _latency_p50(ex, rounds)


def ex_cpu(m: str, n: int) -> float:
    with procctl.ProcessExecutor(2, start_method=m) as ex:
        return _rate(n, lambda: list(ex.map(bw.cpu_1ms, range(n), chunksize=1)))


def pool_cpu(m: str, n: int) -> float:
    with mp.get_context(m).Pool(2) as pool:
        return _rate(n, lambda: list(pool.imap_unordered(bw.cpu_1ms, range(n), chunksize=1)))


def ppe_cpu(m: str, n: int) -> float:
    import concurrent.futures as cf

    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(m)) as ex:
        list(ex.map(bw.trivial, range(4)))  # its workers start at the first submit: before the timer, as the others'
        return _rate(n, lambda: list(ex.map(bw.cpu_1ms, range(n))))


def ex_stop_queued(m: str, n: int) -> float:
    ex = procctl.ProcessExecutor(2, start_method=m)
    for i in range(n):
        ex.submit(bw.cpu_1ms, i)
    t0 = perf()
    left = ex.stop(grace=5)
    dt = (perf() - t0) * 1e3
    counts = ex.counts()
    if counts.completed + counts.failed + len(left.items) != n or not left.items:
        raise AssertionError(f"stop handed back {len(left.items)} of {n} items, {counts.completed} completed")
    return dt


def ppe_cancel_queued(m: str, n: int) -> float:
    import concurrent.futures as cf

    ex = cf.ProcessPoolExecutor(2, mp_context=mp.get_context(m))
    for i in range(n):
        ex.submit(bw.cpu_1ms, i)
    t0 = perf()
    ex.shutdown(wait=True, cancel_futures=True)
    return (perf() - t0) * 1e3


def chan_rate(m: str, n: int) -> float:
    with ProcessController(bw.chan_consume, 2, args=(n,), start_method=m, channels={"jobs": 1000}) as pc:
        pc.run()
        ch = pc.channels["jobs"]
        t0 = perf()
        for i in range(n):
            ch.put(i)
        ch.close()
        pc.wait(60)
        dt = perf() - t0
        pc.stop()
    return n / dt


def mpq_rate(m: str, n: int) -> float:
    ctx = mp.get_context(m)
    q = ctx.Queue(1000)
    up = ctx.Semaphore(0)
    procs = [ctx.Process(target=bw.mpq_consume, args=(q, up)) for _ in range(2)]
    for pr in procs:
        pr.start()
    try:
        _wait_ready(up, len(procs), 60)  # as chan_rate's consumers have acknowledged their run: both warm
        t0 = perf()
        for i in range(n):
            q.put(i)
        for _ in procs:
            q.put(None)
        _join_all(procs, 60)
        return n / (perf() - t0)
    finally:
        _kill_all(procs)
        q.close()
        q.join_thread()


def chan_blocked_cpu(m: str, window: float) -> float:
    """CPU-seconds two consumers burn over `window` while blocked in get on an empty channel."""
    with ProcessController(bw.chan_consume, 2, args=(0,), start_method=m, channels={"jobs": 0}) as pc:
        pc.run()
        pc.channels["jobs"].put(0)  # one item through: both are in their get loop
        pids = pc.pids()
        deadline = time.monotonic() + 10
        while pc.channels["jobs"].stats().got < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        cpu = _cpu_over({"procctl": pids}, window)["procctl"]
        pc.channels["jobs"].close()
        pc.wait(10)
    return cpu


def case_workplane(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    n, big, rounds, cpu, queued = p["n"], p["big"], p["rounds"], p["cpu"], p["queued"]
    # (PPE with chunksize=1 runs about 5k items/s: --quick gives it fewer, no target reads it)
    ppe_n = p.get("ppe_n", n)
    idle = "2 consumers blocked in get, over 1 s"
    variants = [
        ("ProcessExecutor.map chunksize=1", "procctl", "items/s", True, lambda: ex_trivial(m, n, 1)),
        ("Pool.imap_unordered chunksize=1", "peer", "items/s", True, lambda: pool_imap1(m, n)),
        ("ProcessPoolExecutor.map chunksize=1", "peer", "items/s", True, lambda: ppe_map(m, ppe_n, 1)),
        ("ProcessExecutor.map automatic chunks", "procctl", "items/s", True, lambda: ex_trivial(m, big, None)),
        ("Pool.map automatic chunks", "peer", "items/s", True, lambda: pool_map_auto(m, big)),
        ("ProcessExecutor submit->result p50", "procctl", "ms", False, lambda: ex_latency(m, rounds)),
        ("ProcessPoolExecutor submit->result p50", "peer", "ms", False, lambda: ppe_latency(m, rounds)),
        ("ProcessExecutor 1 ms CPU tasks", "procctl", "items/s", True, lambda: ex_cpu(m, cpu)),
        ("Pool 1 ms CPU tasks", "peer", "items/s", True, lambda: pool_cpu(m, cpu)),
        ("ProcessPoolExecutor 1 ms CPU tasks", "peer", "items/s", True, lambda: ppe_cpu(m, cpu)),
        (f"ProcessExecutor.stop() with {queued} queued", "procctl", "ms", False,
         lambda: ex_stop_queued(m, queued)),
        (f"PPE shutdown(cancel_futures=True) with {queued} queued", "peer", "ms", False,
         lambda: ppe_cancel_queued(m, queued)),
        ("channel put/get, 2 consumers", "procctl", "items/s", True, lambda: chan_rate(m, n)),
        ("mp.Queue put/get, 2 consumers", "floor", "items/s", True, lambda: mpq_rate(m, n)),
        (idle, "procctl", "CPU-s", False, lambda: chan_blocked_cpu(m, 1.0)),
    ]
    rows = []
    for name, role, unit, higher, fn in variants:
        r = row("workplane", m, 2, name, role, unit, higher=higher, note="2 workers, trivial task unless said")
        if name == "ProcessPoolExecutor.map chunksize=1" and ppe_n != n:
            r["note"] += f"; {ppe_n} items (the others {n})"
        rows.append((r, fn))
    for rep in range(p["repeats"]):
        for r, fn in rows:
            if r["name"] == idle and rep >= p.get("idle_repeats", p["repeats"]):
                continue  # (a 1 s window of nothing: --quick measures it once)
            progress(r, 2)
            record(r, measure(r, fn, p.get("timeout", 120)))
    return [r for r, _ in rows]


# =============================================================================
# 8. Supervision (issue 9): restart latency, heartbeat overhead
# =============================================================================


def restart_procctl(m: str, restarts: int, from_exit: bool) -> float:
    """Median seconds from a worker's death to its replacement's first checkpoint.

    The death is the moment the kernel says the process has ended (its pidfd
    turns readable), as a watcher process of ours sees it: apart from the
    controller, whose own "crashed" event comes after it has started the
    replacement, and from its process, whose GIL would hold a watcher thread
    back while the manager forks. With `from_exit` it is the moment the
    worker called os._exit: that adds the kernel's teardown of the process,
    which no start of a fresh Process pays.
    """
    ctx = mp.get_context(m)
    starts, deaths = mp.RawArray("d", restarts + 1), mp.RawArray("d", restarts + 1)
    pids, ended = mp.RawArray("q", restarts + 1), mp.RawArray("d", restarts)
    up, armed = ctx.Semaphore(0), ctx.Semaphore(0)
    watcher = mp.get_context("fork").Process(target=bw.watch_deaths, args=(pids, ended, up, armed), daemon=True)
    watcher.start()
    pc = ProcessController(bw.sup_restart, 1, args=(starts, deaths, pids, up, armed), start_method=m,
                           initial_state=procctl.State.RUNNING, restart="on-failure", max_restarts=restarts + 1,
                           backoff=(0.0, 0.0))
    try:
        pc.start()
        if not pc.wait(60):
            raise RuntimeError("the restarts did not finish within 60 s")
        reports = pc.stop()
    finally:
        pc.close()
        watcher.join(10)
        _kill_all([watcher])
    if reports[0].restarts != restarts or pc.gave_up:
        raise RuntimeError(f"expected {restarts} restarts, got {reports[0].restarts}")
    dead = list(deaths) if from_exit else list(ended)
    if not all(dead[:restarts]):
        raise RuntimeError("a death was not seen")
    return statistics.median(starts[k + 1] - dead[k] for k in range(restarts))


def restart_raw(m: str, restarts: int) -> float:
    """Median seconds from Process.start() to the child's first instruction."""
    ctx = mp.get_context(m)
    stamps = mp.RawArray("d", restarts)
    lat = []
    for k in range(restarts):
        p = ctx.Process(target=bw.raw_first, args=(stamps, k))
        t0 = time.monotonic()
        p.start()
        try:
            p.join(30)
        finally:
            _kill_all([p])
        lat.append(stamps[k] - t0)
    return statistics.median(lat)


def checkpoints_procctl(m: str, n: int, heartbeat: float | None) -> float:
    """Nanoseconds per checkpoint in a tight loop, with or without hang detection."""
    pc = ProcessController(bw.sup_checkpoints, 1, args=(n,), start_method=m, heartbeat=heartbeat)
    try:
        pc.start()
        pc.run()
        if not pc.wait(120):
            raise RuntimeError("the checkpoint loop did not finish within 120 s")
        reports = pc.stop()
    finally:
        pc.close()
    _check_reports(reports, 1, ("finished",))
    return float(reports[0].result) / n * 1e9


def case_supervision(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    k, n, beat = p["restarts"], p["checkpoints"], p["heartbeat"]
    variants = [
        (f"restart: process ended -> first checkpoint (x{k})", "procctl", "s", lambda: restart_procctl(m, k, False)),
        (f"raw Process start -> first instruction (x{k})", "floor", "s", lambda: restart_raw(m, k)),
        (f"restart: os._exit -> first checkpoint (x{k})", "contrast", "s", lambda: restart_procctl(m, k, True)),
        (f"checkpoint, heartbeat={beat}s", "procctl", "ns", lambda: checkpoints_procctl(m, n, beat)),
        ("checkpoint, no heartbeat", "floor", "ns", lambda: checkpoints_procctl(m, n, None)),
    ]
    rows = []
    for name, role, unit, fn in variants:
        rows.append((row("supervision", m, 1, name, role, unit, note="medians; interleaved"), fn))
    for _ in range(p["repeats"]):
        for r, fn in rows:
            progress(r, 1)
            record(r, measure(r, fn, 150))
    return [r for r, _ in rows]


# =============================================================================
# 9. Containment (issue 9): a stop that also ends every worker's children
# =============================================================================


def _check_gone(pids: list[int]) -> None:
    """Raise if one of `pids` (grandchildren) still runs after the stop."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                raise RuntimeError(f"grandchild {pid} survived the stop")
        except psutil.NoSuchProcess:
            pass


def contain_procctl(m: str, n: int, k: int) -> float:
    """Seconds for stop() of `n` busy workers, each with `k` grandchildren, until all are reaped."""
    ctx = mp.get_context(m)
    ready = ctx.Semaphore(0)
    pids = mp.RawArray("i", max(1, n * k))
    t = _time_stop(m, n, bw.pc_busy_with_children, (ready, pids, k), ready)
    if k and 0 in pids[:n * k]:
        raise RuntimeError("a worker did not record its grandchildren")
    _check_gone(list(pids[:n * k]))
    return t


def case_containment(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    k = p["grandchildren"]
    rows = []
    for n in p["ns"]:
        variants = [
            (f"stop(), {k} grandchildren each", "procctl", lambda: contain_procctl(m, n, k)),
            ("stop(), no grandchildren", "floor", lambda: contain_procctl(m, n, 0)),
        ]
        entries = [(row("containment", m, n, name, role, "s", note="busy workers; interleaved"), fn)
                   for name, role, fn in variants]
        w = row("warmup", m, 2, "", "", "s")
        measure(w, lambda: contain_procctl(m, 2, k), 60)
        timeout = p["timeout"] + n * p["timeout_per_n"]
        for _ in range(p["repeats"]):
            for r, fn in entries:
                progress(r, n)
                record(r, measure(r, fn, timeout))
        rows += [r for r, _ in entries]
    return rows


CASES = {
    "lifecycle": case_lifecycle,
    "broadcast": case_broadcast,
    "stop": case_stop,
    "paused": case_paused,
    "throughput": case_throughput,
    "memory": case_memory,
    "workplane": case_workplane,
    "cluster": lambda m, p: __import__("bench_cluster").case_cluster(m, p),
    "supervision": case_supervision,
    "containment": case_containment,
}
