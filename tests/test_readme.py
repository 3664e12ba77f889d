"""The README's first commands are what CI runs, and its command list matches the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_a_venv_and_ci_runs_its_test_command():
    main, tests = first_commands()
    for line in (main, tests):
        assert line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install ")
    assert main.endswith("procctl run --workers 10")
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert tests in [line.strip() for line in ci]


def test_readme_names_every_command():
    from procctl.cli import main_group

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for name in main_group.list_commands(None):
        assert f"procctl {name}" in text, name


def _python_blocks() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.parametrize("which", ["first example", "channels"])
def test_the_readmes_examples_run_as_written(tmp_path, which, start_method):
    """The library's first example and the channels one, copied into a script,
    run under fork (Linux's default up to Python 3.13) and forkserver (3.14's)."""
    blocks = _python_blocks()
    code = blocks[0] if which == "first example" else next(b for b in blocks if 'channels={"jobs"' in b)
    script = tmp_path / "example.py"
    script.write_text("import multiprocessing\nif __name__ == '__main__':\n"
                      f"    multiprocessing.set_start_method({start_method!r})\n" + code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    if which == "first example":
        assert len(done.stdout.splitlines()) == 8  # a line per worker
