"""procctl: run N worker processes you can pause, resume and stop, leaving nothing behind.

Names load on first use, so that importing a submodule (the pytest plugin,
the worker side in a spawned child) does not pay for the whole library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "ProcessController": "controller",
    "WorkerStartError": "controller",
    "Event": "states",
    "Outcome": "states",
    "State": "states",
    "WorkerReport": "states",
    "WorkerStatus": "states",
    "WorkerContext": "worker",
    "sum_threshold": "jobs.sum_threshold",
    "SumResult": "jobs.sum_threshold",
}

__all__ = [
    "Event", "Outcome", "ProcessController", "State", "SumResult", "WorkerContext",
    "WorkerReport", "WorkerStartError", "WorkerStatus", "__version__", "sum_threshold",
]

if TYPE_CHECKING:
    from .controller import ProcessController, WorkerStartError
    from .jobs.sum_threshold import SumResult, sum_threshold
    from .states import Event, Outcome, State, WorkerReport, WorkerStatus
    from .worker import WorkerContext


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'procctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
