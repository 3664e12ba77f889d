"""A module for `procctl run --target`:

    cd examples && procctl run --workers 4 --target tasks:count_primes --schedule run,pause,run

Each worker takes every `ctx.workers`-th candidate, starting at its own id,
so the workers together cover every candidate once, whatever their number.
"""

from __future__ import annotations

from procctl import WorkerContext


def count_primes(ctx: WorkerContext, limit: int = 60_000) -> int:
    """Count this worker's share of the primes below `limit`, checkpointing per candidate."""
    found = 0
    for n in range(2 + ctx.worker_id, limit, ctx.workers):
        if not ctx.checkpoint():
            break
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            found += 1
        ctx.progress(n, limit)
    return found
