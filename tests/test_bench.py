"""scripts/bench.py's own rules: bad input is one line and exit 2 before anything runs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "scripts", "bench.py")


def bench(*args: str, tmp: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, TMPDIR=tmp))


@pytest.mark.parametrize("args", [
    ["--cases", "nope"], ["--cases", ","], ["--start-methods", "nope"], ["--start-methods", ","],
    ["--json", "/nonexistent/x.json"], ["--json="], ["--json", "/dev/full"], ["--json", "DIR"],
    ["--json", "FIFO"], ["--bogus"], ["--json"], ["--quick", "extra"],
    # the case process's own flags, given by hand
    ["--_case", "bogus"], ["--_case="], ["--_case", "memory"], ["--_case", "memory", "--_method", "nope"],
    ["--_case", "memory", "--_method", "fork", "--_params", "[]", "--_out", "x"],
    ["--_case", "memory", "--_method", "fork", "--_params", "{"],
    ["--_case", "memory", "--_method", "fork", "--_params", "{}"],
])
def test_bad_arguments_are_one_line_and_exit_2(args, tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)  # no reader: opening it for writing would wait forever
    args = [{"DIR": str(tmp_path), "FIFO": fifo}.get(a, a) for a in args]
    res = bench(*args, tmp=str(tmp_path))
    assert res.returncode == 2, res.stderr
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("bench.py: error: "), res.stderr
    assert sorted(os.listdir(tmp_path)) == ["fifo"]  # nothing made, nothing run


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import bench_cases

    return bench_cases


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_saved_rows_are_strict_json(bench_modules, tmp_path, monkeypatch):
    bc = bench_modules
    out = tmp_path / "rows.json"
    monkeypatch.setitem(bc.SINK, "path", str(out))
    monkeypatch.setitem(bc.SINK, "rows", [])
    r = bc.row("memory", "fork", 1, "x", "floor", "s")
    r["samples"] += [1.0, float("nan"), float("inf")]
    r["paired_ratio"] = {"y": float("-inf")}
    bc.save()
    got = _strict(out.read_text())
    assert got[0]["samples"] == [1.0, None, None] and got[0]["paired_ratio"] == {"y": None}


def _row(name: str, role: str, samples: list[float], case: str = "workplane", unit: str = "items/s",
         n: int = 2) -> dict:
    return {"case": case, "method": "fork", "n": n, "name": name, "role": role, "unit": unit,
            "higher": unit == "items/s", "samples": samples, "error": None, "note": "", "stray": 0}


def test_the_json_holds_the_ratios_the_table_prints(bench_modules):
    import io

    import bench

    rows = [_row("ProcessExecutor 1 ms CPU tasks", "procctl", [300.0, 330.0]),
            _row("Pool 1 ms CPU tasks", "peer", [200.0, 220.0]),
            _row("ProcessPoolExecutor 1 ms CPU tasks", "peer", [150.0, 165.0]),
            _row("ProcessExecutor submit->result p50", "procctl", [0.5, 0.7], unit="ms"),
            _row("ProcessPoolExecutor submit->result p50", "peer", [1.0, 1.4], unit="ms"),
            _row("procctl", "procctl", [2.0, 2.2, 2.4], case="broadcast", unit="s", n=10),
            _row("per-worker Pipe", "floor", [1.0, 1.1, 1.2], case="broadcast", unit="s", n=10)]
    for r in rows:
        bench.stats(r)
    bench.add_ratios(rows)
    assert rows[0]["median_ratio"] == {"Pool 1 ms CPU tasks": 1.5, "ProcessPoolExecutor 1 ms CPU tasks": 2.0}
    assert rows[3]["median_ratio"] == {"ProcessPoolExecutor submit->result p50": 0.5}
    assert rows[5]["median_ratio"] == {"per-worker Pipe": 2.2 / 1.1}
    out = io.StringIO()
    bench.print_table(rows, out)
    table = out.getvalue()
    assert "1.50x Pool, 2.00x PPE" in table and "0.50x PPE" in table and "2.00x Pipe" in table
    assert "raw" not in table  # (it labelled every unknown baseline "raw")
    assert "0.6 ms" in table  # a unit, not a bare number


def test_the_sigkill_target_is_in_seconds(bench_modules):
    import io

    import bench

    rows = [_row("client SIGKILL -> workers gone (lease 2.0)", "procctl", [2.47], case="cluster", unit="s",
                 n=8)]
    bench.stats(rows[0])
    ts = [t for t in bench.targets(rows, ["fork"]) if "SIGKILL" in t["target"]]
    out = io.StringIO()
    bench.print_targets(ts, out)
    assert "2.47 s <= 4 s" in out.getvalue()


def test_processes_reaped_after_a_failed_case_process_are_counted(bench_modules, monkeypatch, tmp_path):
    import bench

    def reaped() -> int:  # (the real one kills every child of the test's process)
        bench.LEFT.extend(["a worker", "another"])
        return 2

    monkeypatch.setattr(bench, "reap_leftovers", reaped)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    rows = bench.run_job("memory", "fork", {}, 30)  # no parameters: the case process fails at once
    assert "KeyError" in rows[-1]["error"]
    assert sum(r["stray"] for r in rows) == 2 and rows[-1]["stray_what"] == ["a worker", "another"]


@pytest.fixture
def short_tmp():
    """A temporary directory with a short path: the case's fork server listens on a Unix
    socket under it (pytest's tmp_path can be past the 108 bytes a socket address takes)."""
    path = tempfile.mkdtemp(prefix="b", dir="/tmp")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_a_double_ctrl_c_leaves_no_temporary_file(short_tmp):
    tmp_path = short_tmp
    # (SIGINT as a terminal sends it, even where the test runner ignores it)
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.argv = [{BENCH!r}, '--cases', 'memory', '--start-methods', 'forkserver']; "
            f"runpy.run_path({BENCH!r}, run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        end = time.monotonic() + 20
        while not any(tmp_path.rglob("pymp-*")) and time.monotonic() < end:  # its fork server is up
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "bench: interrupted"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [["--cluster"], ["--cases", "lifecycle,cluster"]])
def test_the_cluster_case_without_dask_is_one_line_and_exit_2(args, tmp_path):
    code = ("import runpy, sys; sys.modules['distributed'] = None; "  # (as if not installed)
            f"sys.argv = [{BENCH!r}, *{args!r}]; runpy.run_path({BENCH!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                         stdin=subprocess.DEVNULL, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr == "bench.py: error: the cluster case needs Dask's distributed: pip install 'procctl[dask]'\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_prints_and_writes_what_was_measured(sig, short_tmp):
    tmp_path = short_tmp
    out = tmp_path / "out.json"
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.argv = [{BENCH!r}, '--quick', '--cases', 'memory,workplane', '--start-methods', 'fork', "
            f"'--json', {str(out)!r}]; runpy.run_path({BENCH!r}, run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        end = time.monotonic() + 30
        while not any(tmp_path.glob("bench-workplane-*")) and time.monotonic() < end:  # memory is done
            time.sleep(0.05)
        time.sleep(0.3)  # (its case process is running)
        proc.send_signal(sig)
        stdout, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert err.strip().splitlines()[-1] == ("bench: interrupted" if sig == signal.SIGINT else "bench: terminated")
    assert "Traceback" not in err
    assert "6. Memory" in stdout and ("PASS  memory fork" in stdout or "MISS  memory fork" in stdout), stdout
    assert f"interrupted by {name}" in stdout
    got = _strict(out.read_text())
    assert got["header"]["interrupted"] == name
    memory = [r for r in got["rows"] if r["case"] == "memory"]
    assert len(memory) == 2 and all(r["samples"] and not r["error"] for r in memory)
    last = got["rows"][-1]  # (the work plane's rows so far, then this; or this alone, if none was in yet)
    assert last["case"] == "workplane" and last["error"].startswith(f"interrupted ({name})"), last
    assert os.listdir(tmp_path) == ["out.json"]  # the case's directory is gone
