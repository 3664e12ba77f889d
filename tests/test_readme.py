"""The README's first commands are what CI runs, and its command list matches the CLI."""

from __future__ import annotations

import os
import re

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
