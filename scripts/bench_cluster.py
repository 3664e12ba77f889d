"""The `--cluster` case of scripts/bench.py: procctl.cluster on a LocalCluster of
2 nodes x 4 workers, beside Dask's own primitives in the same run.

Its own measure(): bench_cases.sweep() would kill the Dask worker processes,
which are the case's own children here; this one sweeps only what runs under
them (procctl's workers) and counts that as strays.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import bench_cases as bc
import bench_workers as bw
import psutil

perf = time.perf_counter
NODES, PER_NODE = 2, 4
LEASE = 2.0


def event_task(i: int, rounds: int, tag: str) -> int:
    """A plain Dask task: wait for each round's Event, say so on a Queue."""
    from distributed import Event, Queue

    seen = Queue(f"{tag}-seen")
    for r in range(rounds):
        Event(f"{tag}-go-{r}").wait()
        seen.put(i)
    return i


def noop(i: int) -> int:
    return i


def sleep_1ms(x: int) -> int:
    time.sleep(0.001)
    return x


def _under_nodes(node_pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in node_pids:
        try:
            out += [p for p in psutil.Process(pid).children(recursive=True) if not bc.is_helper(p) and _alive(p)]
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(p: psutil.Process) -> bool:
    # An exiting helper (a guardian its agent let go) is a zombie for a moment,
    # whose command line can no longer tell it is a helper: it has ended.
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def measure(r: dict[str, Any], fn: Any, timeout: float, node_pids: list[int]) -> Any:
    if r["error"]:
        return None
    value = None
    try:
        with bc.deadline(timeout):
            value = fn()
    except bc.CaseTimeout as exc:
        r["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - a failing contender is a result
        r["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        left = _under_nodes(node_pids)
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=5)
        r["stray"] += len(left)
    return value


def broadcast_rounds(address: str, client: Any, m: str, rounds: int) -> tuple[list[float], list[float]]:
    """Round trips side by side, one of each in turn: a ClusterController's
    run/pause acknowledged by its 8 workers, and a Dask Event set -> seen by 8
    waiting tasks. Both warmed by a first round that is not counted."""
    from distributed import Event, Queue

    from procctl.cluster import ClusterController

    ours: list[float] = []
    theirs: list[float] = []
    tag = f"bench-{os.getpid()}-{time.monotonic_ns()}"
    with ClusterController(bw.pc_idle, PER_NODE, address=address, lease=10, start_method=m) as cc:
        # (Its agents are long-running tasks that give their thread back: the 8 plain
        # tasks then take the nodes' 8 task slots.)
        seen = Queue(f"{tag}-seen", client=client)
        events = [Event(f"{tag}-go-{r}", client=client) for r in range(rounds + 1)]
        futs = client.map(event_task, range(NODES * PER_NODE), rounds=rounds + 1, tag=tag, pure=False)
        cc.run()  # round 0 of each: every worker and task is up and waiting
        events[0].set()
        for _ in futs:
            seen.get()
        for r in range(1, rounds + 1):
            t0 = perf()
            if r % 2:
                cc.pause()
            else:
                cc.run()
            ours.append(perf() - t0)
            t0 = perf()
            events[r].set()
            for _ in futs:
                seen.get()
            theirs.append(perf() - t0)
        client.gather(futs)
        seen.close()
    return ours, theirs


def lifecycle(address: str, m: str) -> float:
    from procctl import State
    from procctl.cluster import ClusterController

    t0 = perf()
    with ClusterController(bw.pc_lifecycle, PER_NODE, address=address, initial_state=State.RUNNING,
                           start_method=m) as cc:
        cc.wait(30)  # every worker reached its first checkpoint and returned
        reports = cc.stop(grace=30)
    t = perf() - t0
    if sorted(r.result for r in reports.values()) != list(range(1, NODES * PER_NODE + 1)):
        raise AssertionError(f"not every worker reached its first checkpoint: {reports}")
    return t


def plain_tasks(address: str) -> float:
    """The same 8 workers as plain Dask tasks that start and return, from a
    client of their own (ClusterController connects in its lifecycle too)."""
    from distributed import Client

    t0 = perf()
    with Client(address, set_as_default=False) as client:
        out = client.gather(client.map(noop, range(NODES * PER_NODE), pure=False))
    t = perf() - t0
    if out != list(range(NODES * PER_NODE)):
        raise AssertionError("wrong results")
    return t


def executor_map(address: str, m: str, n: int) -> float:
    from procctl.cluster import ClusterExecutor

    with ClusterExecutor(address=address, workers_per_node=PER_NODE, start_method=m) as ex:
        list(ex.map(sleep_1ms, range(100)))  # warm
        t0 = perf()
        out = list(ex.map(sleep_1ms, range(n)))
        dt = perf() - t0
    if out != list(range(n)):
        raise AssertionError("wrong results")
    return n / dt


def client_map(client: Any, n: int) -> float:
    client.gather(client.map(sleep_1ms, range(100), pure=False))
    t0 = perf()
    out = client.gather(client.map(sleep_1ms, range(n), pure=False))
    dt = perf() - t0
    if out != list(range(n)):
        raise AssertionError("wrong results")
    return n / dt


CLIENT = """
import json, sys
sys.path.insert(0, sys.argv[3])
import bench_workers as bw
from procctl.cluster import ClusterController
cc = ClusterController(bw.pc_idle, int(sys.argv[2]), address=sys.argv[1], lease=float(sys.argv[4]),
                       start_method=sys.argv[5])
cc.start()
cc.run()
print(json.dumps([s.pid for s in cc.status()]), flush=True)
sys.stdin.read()
"""


def client_killed(address: str, m: str) -> float:
    """Seconds from a SIGKILL of the client to every procctl worker gone."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, address, str(PER_NODE), here, str(LEASE), m],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())
        procs = [psutil.Process(pid) for pid in pids]
        os.kill(proc.pid, signal.SIGKILL)
        t0 = perf()
        _, alive = psutil.wait_procs(procs, timeout=LEASE + 10)
        if alive:
            raise AssertionError(f"{len(alive)} workers alive {LEASE + 10}s after the client died")
        return perf() - t0
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def case_cluster(m: str, p: dict[str, Any]) -> list[dict[str, Any]]:
    """procctl's rows under start method `m` (the nodes' workers); Dask's own are the same in any."""
    import dask
    from distributed import Client

    from procctl.cluster.session import local_cluster

    # The nodes' dask-scratch-space, in a directory removed afterwards (it was
    # left in the temp dir by every run).
    scratch = tempfile.mkdtemp(prefix="bench-dask-")
    cluster = client = None
    try:
        with dask.config.set({"temporary-directory": scratch}):
            cluster = local_cluster(NODES, threads_per_worker=PER_NODE)
        client = Client(cluster, set_as_default=False)
        node_pids = list(client.run(os.getpid).values())
        address = cluster.scheduler_address
        n8 = NODES * PER_NODE
        note = f"LocalCluster {NODES} nodes x {PER_NODE}"
        b = bc.row("cluster", m, n8, "ClusterController broadcast p50", "procctl", "s", note=note)
        be = bc.row("cluster", m, n8, "Dask Event set -> seen by 8 tasks", "floor", "s", note=note)
        lc = bc.row("cluster", m, n8, "ClusterController lifecycle", "procctl", "s", note=note)
        lt = bc.row("cluster", m, n8, "8 plain Dask tasks", "floor", "s",
                    note=note + "; from a client of their own, as a ClusterController connects")
        em = bc.row("cluster", m, n8, "ClusterExecutor.map 1 ms tasks", "procctl", "items/s", higher=True,
                    note=note)
        cm = bc.row("cluster", m, n8, "Client.map 1 ms tasks", "floor", "items/s", higher=True, note=note)
        ck = bc.row("cluster", m, n8, f"client SIGKILL -> workers gone (lease {LEASE})", "procctl", "s",
                    note=note)
        got = measure(b, lambda: broadcast_rounds(address, client, m, p["rounds"]), 180, node_pids)
        if got is not None:
            b["samples"] += got[0]
            be["samples"] += got[1]
        else:
            be["error"] = "not measured: " + b["error"]
        bc.save()
        for _ in range(p["repeats"]):
            bc.record(lc, measure(lc, lambda: lifecycle(address, m), 60, node_pids))
            bc.record(lt, measure(lt, lambda: plain_tasks(address), 60, node_pids))
            bc.record(em, measure(em, lambda: executor_map(address, m, p["tasks"]), 120, node_pids))
            bc.record(cm, measure(cm, lambda: client_map(client, p["tasks"]), 120, node_pids))
        bc.record(ck, measure(ck, lambda: client_killed(address, m), 60, node_pids))
        for r in (b, be):
            if r["samples"]:
                r["note"] += f"; p99 {statistics.quantiles(r['samples'], n=100)[-1] * 1e3:.1f} ms"
        return [b, be, lc, lt, em, cm, ck]
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        shutil.rmtree(scratch, ignore_errors=True)
