"""Embed ProcessController in a batch script with your own worker function.

    python examples/batch_script.py

Eight workers crunch numbers; the script pauses them, resumes them, then
stops them and prints each worker's outcome.
"""

from __future__ import annotations

import hashlib

from procctl import ProcessController, WorkerContext


def crunch(ctx: WorkerContext, rounds: int) -> int:
    done = 0
    digest = str(ctx.worker_id).encode()
    while ctx.checkpoint():  # True: go on; blocks while PAUSED; False once STOPPED
        for _ in range(1000):
            digest = hashlib.sha256(digest).digest()
        done += 1
        ctx.progress(done, rounds)
        if done >= rounds:
            return done  # finished by itself: the controller reaps it
    return done  # stopped


def main() -> None:
    with ProcessController(crunch, workers=8, args=(2000,)) as pc:  # workers start PAUSED
        pc.run()  # returns once every live worker acknowledged
        pc.wait(timeout=0.3)  # let them work a little (returns early if all end)
        pc.pause()
        print("paused:", [s.done for s in pc.status()])
        pc.run()
        reports = pc.stop(grace=5.0)
    for r in reports.values():
        print(r.worker_id, r.outcome.value, r.result, r.exitcode, f"{r.duration:.2f}s")


if __name__ == "__main__":
    main()
