#!/usr/bin/env python
"""Soak and benchmark the sum-threshold job.

    python scripts/soak_sum.py soak [--runs 300] [--start-method fork] [--seed 1]
    python scripts/soak_sum.py bench [--threshold 600000] [--queue-size 3] [--repeat 3] [--batch 16]

`soak` runs random shapes and checks the invariants on every run.  `bench`
compares items per second of `sum_threshold(3, 3, delay=0)` with a
hand-written raw multiprocessing.Queue loop doing the same work (3
producers putting random values, 3 consumers summing until one exceeds the
threshold), both timed from the first process start to the last process
reaped, interleaved in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue as queue_module
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from procctl.jobs import SumResult, sum_threshold  # noqa: E402

VALUES = (1, 2, 3)


# -- soak --------------------------------------------------------------------------


def check(result: SumResult, producers: int, consumers: int, threshold: int) -> None:
    assert result.sums[result.winner] > threshold, result
    assert sum(result.produced) == sum(result.received) + result.drained, result
    assert len(result.sums) == consumers and len(result.produced) == producers, result


def soak(runs: int, start_method: str | None, seed: int) -> int:
    rng = random.Random(seed)
    started = time.monotonic()
    for i in range(runs):
        p, c = rng.randint(1, 8), rng.randint(1, 8)
        threshold = rng.choice([0, 1, 10, 100, 1_000, 20_000, 200_000])
        size = rng.choice([1, 2, 3, 100, 1_000])
        batch = rng.choice([1, 1, 1, 4, 64, 256])
        if threshold >= 200_000 and batch == 1:
            batch = 64  # keep each run short
        result = sum_threshold(p, c, threshold, queue_size=size, batch=batch, start_method=start_method)
        check(result, p, c, threshold)
        print(f"{i + 1:4d} {p}x{c} threshold {threshold:>7} queue {size:>4} batch {batch:>3}: "
              f"{sum(result.produced):>8} items, drained {result.drained:>6}, {result.elapsed:.2f}s", flush=True)
    print(f"soak: {runs} runs, all invariants held, {time.monotonic() - started:.1f}s")
    return 0


# -- the raw loop --------------------------------------------------------------------


def _raw_producer(q, stop, results) -> None:
    rng = random.Random()
    put, choice, n = q.put, rng.choice, 0
    while not stop.value:
        put(choice(VALUES))
        n += 1
    results.put(("produced", n))


def _raw_consumer(q, stop, done, threshold, results) -> None:
    get, total, n = q.get, 0, 0
    while True:
        value = get()
        if value is None:
            break
        total += value
        n += 1
        if total > threshold:
            done.set()
            break
        if stop.value:
            break
    results.put(("received", n))


def raw_loop(threshold: int, queue_size: int, producers: int = 3, consumers: int = 3) -> tuple[int, float]:
    """(items produced, seconds): the plain multiprocessing version, cleanup included."""
    mp = multiprocessing.get_context("fork")
    started = time.monotonic()
    q, results = mp.Queue(queue_size), mp.Queue()
    stop, done = mp.RawValue("i", 0), mp.Event()
    prods = [mp.Process(target=_raw_producer, args=(q, stop, results)) for _ in range(producers)]
    cons = [mp.Process(target=_raw_consumer, args=(q, stop, done, threshold, results)) for _ in range(consumers)]
    for p in prods + cons:
        p.start()
    done.wait()
    stop.value = 1
    while any(p.is_alive() for p in prods):  # drain so blocked producers can finish
        try:
            q.get(timeout=0.01)
        except queue_module.Empty:
            pass
    for _ in cons:
        q.put(None)  # wake consumers blocked in get()
    counts = [results.get() for _ in range(producers + consumers)]
    for p in prods + cons:
        p.join()
    q.close()
    q.join_thread()
    return sum(n for kind, n in counts if kind == "produced"), time.monotonic() - started


def job_run(threshold: int, queue_size: int, batch: int) -> tuple[int, float]:
    result = sum_threshold(3, 3, threshold, queue_size=queue_size, batch=batch, start_method="fork")
    check(result, 3, 3, threshold)
    return sum(result.produced), result.elapsed


def bench(threshold: int, queue_size: int, repeat: int, batch: int) -> int:
    rates: dict[str, list[float]] = {"raw": [], "job": [], f"job batch={batch}": []}
    for _ in range(repeat):
        for name, run in (("raw", lambda: raw_loop(threshold, queue_size)),
                          ("job", lambda: job_run(threshold, queue_size, 1)),
                          (f"job batch={batch}", lambda: job_run(threshold, queue_size, batch))):
            items, seconds = run()
            rates[name].append(items / seconds)
            print(f"  {name:>14}: {items:>9} items in {seconds:6.2f}s = {items / seconds:>10.0f} items/s", flush=True)
    raw = statistics.median(rates["raw"])
    print(f"3x3, delay 0, threshold {threshold}, queue size {queue_size}, medians of {repeat}:")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:>14}: {median:>10.0f} items/s  ({median / raw:.2f}x raw)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("soak")
    s.add_argument("--runs", type=int, default=300)
    s.add_argument("--start-method", default=None)
    s.add_argument("--seed", type=int, default=1)
    b = sub.add_parser("bench")
    b.add_argument("--threshold", type=int, default=600_000)
    b.add_argument("--queue-size", type=int, default=3)
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if args.mode == "soak":
        return soak(args.runs, args.start_method, args.seed)
    return bench(args.threshold, args.queue_size, args.repeat, args.batch)


if __name__ == "__main__":
    sys.exit(main())
