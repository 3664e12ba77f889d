"""Targets for tests/test_cli_hardening.py (importable by name for spawn)."""

from __future__ import annotations

import decimal
import fractions
import multiprocessing
import os

#: What each worker passes to ctx.progress(done, total), by worker id.
PROGRESS_CASES: list[tuple[object, object]] = [
    (10**400, None), (float("nan"), None), (float("inf"), None), (-1, None), ("abc", None),
    (1, float("inf")), (1, float("nan")), (1, -5), (1, 10**400),
    ("3", None), (True, None), (1, b"3"),  # not numbers (float() would take them)
    (5, 10), (0, None), (1e308, 1e308), (fractions.Fraction(1, 2), 2), (decimal.Decimal("1.5"), 3),  # accepted
    (decimal.Decimal("NaN"), None), (1, decimal.Decimal("-1")), (1j, None),
]


def report_progress(ctx):
    done, total = PROGRESS_CASES[ctx.worker_id]
    ctx.checkpoint()
    ctx.progress(done, total)
    return "reported"


def huge_totals(ctx):
    """Totals that overflow to infinity when summed over workers."""
    ctx.progress(0.5e308, 1e308)
    while ctx.checkpoint():
        ctx.sleep(0.05)
        ctx.progress(0.6e308, 1e308)


def idle(ctx):
    while ctx.sleep(float("inf")):
        pass


# A spawned worker that imports this module with PROCCTL_TEST_GATE set says it
# is here (a byte on the FIFO `<gate>.arrived`), then blocks opening the FIFO
# `<gate>.hold`, which nobody opens: it stays "starting" until it is killed.
_gate = os.environ.get("PROCCTL_TEST_GATE")
if _gate and multiprocessing.parent_process() is not None:
    with open(_gate + ".arrived", "wb", buffering=0) as _arrived:
        _arrived.write(b"!")
    open(_gate + ".hold", "rb").close()  # noqa: SIM115 - blocks until killed
