"""scripts/bench.py's own rules: bad input is one line and exit 2 before anything runs."""

from __future__ import annotations

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
