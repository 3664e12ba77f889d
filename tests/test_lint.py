"""The typed, linted public surface: mypy --strict and ruff, as CI runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
def test_mypy_strict_is_clean():
    pytest.importorskip("mypy")
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", "procctl"], cwd=ROOT,
                         capture_output=True, text=True, timeout=230)
    assert res.returncode == 0, res.stdout + res.stderr


USER_SCRIPT = """
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType

from procctl import ProcessController, WorkerContext


def work(ctx: WorkerContext, a: int, b: int = 0) -> int:
    ctx.progress(Decimal("2.5"), Decimal(10))
    ctx.progress(Fraction(1, 3), 1)
    ctx.progress(3, 10.0, item="x")
    return a + b


with ProcessController(work, 2, args=[1], kwargs=MappingProxyType({"b": 2})) as pc:
    pc.run()
    pc.wait(10)
"""


@pytest.mark.timeout(240)
def test_the_type_hints_take_what_the_readme_says_is_taken(tmp_path):
    """A user's script, checked as strictly: progress() of a Fraction or a Decimal,
    args as a list, kwargs as any mapping (the README says each is taken)."""
    pytest.importorskip("mypy")
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                          str(script)], cwd=ROOT,
                         capture_output=True, text=True, timeout=230)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.timeout(120)
def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    res = subprocess.run([ruff, "check", "procctl", "tests", "scripts", "examples"], cwd=ROOT,
                         capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stdout + res.stderr


def test_py_typed_ships():
    assert os.path.exists(os.path.join(ROOT, "procctl", "py.typed"))


def test_import_procctl_loads_no_display_or_cli_dependency():
    code = ("import sys, procctl; procctl.ProcessController; procctl.State; "
            "bad = [m for m in ('rich', 'click', 'psutil') if m in sys.modules]; print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_the_guardian_process_imports_little():
    # A Dask worker starts a guardian per run of a cluster job (and each
    # `procctl` command one): logging, subprocess, typing and ctypes cost it
    # about 40 ms of CPU in a fresh interpreter, against 15 ms for the interpreter.
    code = ("import sys; from procctl.guardian_process import main; "
            "print([m for m in ('logging', 'subprocess', 'typing', 'ctypes', 'threading', 'contextlib')"
            " if m in sys.modules])")
    res = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {ROOT!r}); {code}"],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_the_worker_side_imports_little():
    # A spawn worker imports it in a fresh interpreter: dataclasses (with
    # inspect) and traceback cost it about 11 ms there, more than the rest of
    # procctl's worker side (lifecycle under spawn: 1.26x raw with them, 1.06x without).
    code = ("import sys, procctl.worker; "
            "print([m for m in ('dataclasses', 'inspect', 'traceback', 'procctl.states') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr
