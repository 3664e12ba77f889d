"""scripts/bench.py's own rules: bad input is one line and exit 2 before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
