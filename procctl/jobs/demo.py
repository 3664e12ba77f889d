"""The default job of `procctl run`: the seed program's worker.

Each time the worker goes Running it decides, with probability
`finish_chance`, that its task is complete and returns; otherwise it waits
(in the kernel) for the next command.
"""

from __future__ import annotations

import math
import random
from typing import Any

from ..worker import WorkerContext


def demo_worker(ctx: WorkerContext, finish_chance: float = 0.3, seed: int | None = None) -> dict[str, Any]:
    rng = random.Random(None if seed is None else seed * 1_000_003 + ctx.worker_id)
    runs = 0
    while ctx.checkpoint():
        runs += 1
        if rng.random() < finish_chance:
            return {"runs": runs, "finished": True}
        ctx.sleep(math.inf)  # "work" until the next command
    return {"runs": runs, "finished": False}
