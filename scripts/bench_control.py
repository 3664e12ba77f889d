"""Measure the control socket and the output capture (issue 11's figures).

    python scripts/bench_control.py [--workers 100] [--requests 1000] [--lines 200000]

Same-run ratios:
- status reply time for a run of N workers (median, p99; each request on a fresh connection);
- the broadcast round trip (pause + run) alone, and during a flood of status
  requests from another process: the ratio should stay under 1.10;
- a chatty worker's own time to print L lines, with its output captured
  (line by line to the manager) against the same worker writing to a pipe the
  manager drains (no capture): the ratio should stay under 1.10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from procctl import ProcessController
from procctl.capture import OutputCapture
from procctl.capture_worker import run_captured
from procctl.control import Request, ask

perf = time.perf_counter


def idle(ctx):
    while ctx.sleep(float("inf")):
        pass


def chatty(ctx, lines, work):
    """Print `lines` lines of 100 bytes with `work` loop turns of computation each; return the time taken."""
    text = "x" * 60
    started = perf()
    acc = 0
    for i in range(lines):
        for j in range(work):
            acc += j * i
        print(f"worker {ctx.worker_id} processed item {i:8d} {text}")
    sys.stdout.flush()
    return perf() - started


def round_trips(pc, pairs):
    times = []
    for _ in range(pairs):
        t = perf()
        pc.pause(timeout=30)
        pc.run(timeout=30)
        times.append((perf() - t) / 2)
    return statistics.median(times)


def bench_control(workers, requests, pairs):
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp())
    with ProcessController(idle, workers, control="bench") as pc:
        pc.run()
        path = pc._control.path
        latencies = []
        for _ in range(200):
            t = perf()
            reply = ask(path, Request("status"))
            latencies.append(perf() - t)
            assert reply["ok"] and len(reply["workers"]) == workers
        latencies.sort()
        print(f"status reply, {workers} workers: median {1e3 * statistics.median(latencies):.2f} ms,"
              f" p99 {1e3 * latencies[int(0.99 * len(latencies))]:.2f} ms, max {1e3 * latencies[-1]:.2f} ms")
        quiet = round_trips(pc, pairs)
        flood = subprocess.Popen([sys.executable, "-c",
                                  "import sys; from procctl.control import ask, Request\n"
                                  f"for _ in range({requests}): ask(sys.argv[1], Request('status'))\n"
                                  "print('done', flush=True)", path], stdout=subprocess.PIPE, text=True)
        busy = []
        while flood.poll() is None:
            busy.append(round_trips(pc, 5))
        flood.wait()
        loaded = statistics.median(busy) if busy else float("nan")
        print(f"broadcast round trip, {workers} workers: {1e3 * quiet:.3f} ms alone, {1e3 * loaded:.3f} ms during"
              f" {requests} status requests: ratio {loaded / quiet:.2f} (target <= 1.10)")


class Counter:
    def __init__(self):
        self.n = 0
        self.size = 0

    def lines(self, output):
        self.n += output.text.count("\n")

    def drain(self, fd):
        while chunk := os.read(fd, 1 << 18):
            self.size += len(chunk)
            self.n += chunk.count(b"\n")


def bench_capture(lines, work, line_buffered, rounds):
    """Alternate the two `rounds` times (the machine is shared): medians."""
    results = {"pipe": [], "capture": []}
    for how in ("pipe", "capture") * rounds:
        seen = Counter()
        if how == "capture":
            capture = OutputCapture(seen.lines, line_buffered=line_buffered).start()
            target, args = run_captured, (capture.spec, chatty, lines, work)
        else:
            capture = None
            target, args = chatty, (lines, work)
        r, w = os.pipe()
        reader = threading.Thread(target=seen.drain, args=(r,))
        reader.start()
        saved = os.dup(1)
        os.dup2(w, 1)  # the uncaptured worker inherits the pipe as its stdout
        try:
            pc = ProcessController(target, 1, args=args, start_method="fork").start()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        os.close(w)
        try:
            pc.run()
            pc.wait(600)
            report = pc.stop()[0]
        finally:
            pc.close()
            reader.join()
            os.close(r)
            if capture is not None:
                capture.close()
        results[how].append(report.result)
        assert seen.n == lines, (how, seen.n)
    mode = "line-buffered (terminal, --log-dir)" if line_buffered else "buffered as for a pipe"
    pipe, captured = statistics.median(results["pipe"]), statistics.median(results["capture"])
    print(f"chatty worker, {lines} lines of 94 bytes, {mode}: pipe {pipe:.3f} s ({lines * 94 / pipe / 1e6:.1f} MB/s),"
          f" captured {captured:.3f} s: ratio {captured / pipe:.2f} (target <= 1.10)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--work", type=int, default=20, help="loop turns of computation per line")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-control", action="store_true")
    args = parser.parse_args()
    if not args.skip_control:
        bench_control(args.workers, args.requests, args.pairs)
    bench_capture(args.lines, args.work, False, args.rounds)
    bench_capture(args.lines, args.work, True, args.rounds)


if __name__ == "__main__":
    main()
