"""procctl: run N worker processes you can pause, resume and stop, leaving nothing behind.

Names load on first use, so that importing a submodule (the pytest plugin,
the worker side in a spawned child) does not pay for the whole library.
"""

from __future__ import annotations

# Not typing's: importing typing costs about 10 ms, and `procctl` (the command)
# holds its signals only once this module has run (see __main__.py).
TYPE_CHECKING = False

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
    "context": "worker",
    "ProcessExecutor": "executor",
    "Unfinished": "executor",
    "TaskCounts": "executor",
    "Channel": "channels",
    "ChannelStats": "channels",
    "Closed": "errors",
    "WorkerCrashed": "errors",
    "TaskTimeout": "errors",
    "sum_threshold": "jobs.sum_threshold",
    "SumResult": "jobs.sum_threshold",
}

__all__ = [
    "Channel", "ChannelStats", "Closed", "Event", "Outcome", "ProcessController", "ProcessExecutor",
    "State", "SumResult", "TaskCounts", "TaskTimeout", "Unfinished", "WorkerContext", "WorkerCrashed",
    "WorkerReport", "WorkerStartError", "WorkerStatus", "__version__", "context", "sum_threshold",
]

if TYPE_CHECKING:
    from typing import Any

    from .channels import Channel, ChannelStats
    from .controller import ProcessController, WorkerStartError
    from .errors import Closed, TaskTimeout, WorkerCrashed
    from .executor import ProcessExecutor, TaskCounts, Unfinished
    from .jobs.sum_threshold import SumResult, sum_threshold
    from .states import Event, Outcome, State, WorkerReport, WorkerStatus
    from .worker import WorkerContext, context


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'procctl' has no attribute {name!r}")
    from importlib import import_module  # (here: `procctl`, the command, holds its signals once we have run)

    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
