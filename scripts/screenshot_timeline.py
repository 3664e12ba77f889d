#!/usr/bin/env python3
"""Render sample timelines and screenshot them with headless Chromium, to look at.

    python scripts/screenshot_timeline.py [--out out/] [--no-screenshot]

Writes out/timeline-10.{svg,html,png} from a real ProcessController run of 10
workers (run, pause, run, stop, with workers that finish, fail, crash and get
killed) and out/timeline-200.* from a synthetic 200-worker run.  The PNGs are
what a person sees in a browser: the structure tests cannot tell whether the
picture is readable, these can.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from procctl import Event, ProcessController  # noqa: E402
from procctl.timeline import render_timeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]


def demo_worker(ctx: Any, plan: str, units: int) -> int:
    """One work unit per checkpoint; `plan` says how this worker's story ends."""
    if plan == "ignore-stop":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    done = 0
    while ctx.checkpoint():
        time.sleep(0.01)  # the work unit itself, not synchronisation
        done += 1
        if done < units:
            continue
        if plan == "finish":
            return done
        if plan == "fail":
            raise ValueError(f"bad record #{done} in shard {ctx.worker_id}")
        if plan == "crash":
            os._exit(9)
    if plan == "ignore-stop":
        while True:  # told to stop, it carries on: the controller must kill it
            time.sleep(0.05)
    return done


PLANS = [("finish", 60), ("finish", 150), ("fail", 90), ("crash", 120), ("ignore-stop", 0),
         ("finish", 230), ("loop", 0), ("loop", 0), ("loop", 0), ("loop", 0)]


def real_run() -> tuple[list[Event], int]:
    """run, pause, run, stop with 10 real workers; pc.wait() paces the steps and
    keeps the controller reaping, so every event carries its real time."""
    events: list[Event] = []
    pc = ProcessController(_dispatch, len(PLANS), on_event=events.append, grace=0.4, start_method="fork")
    pc.term_timeout = 0.2  # the ignore-stop worker ignores SIGTERM: do not wait long for it
    with pc:
        for step in (pc.run, pc.pause, pc.run):
            step()
            pc.wait(timeout=1.0)
        pc.stop()
    return events, len(PLANS)


def _dispatch(ctx: Any) -> int:
    plan, units = PLANS[ctx.worker_id]
    return demo_worker(ctx, plan, units)


def synthetic_run(workers: int = 200, seed: int = 7) -> list[dict[str, Any]]:
    """A plausible 200-worker log: acks jitter after each broadcast, some workers
    end by themselves, a few fail or crash, two ignore the stop and are killed."""
    rng = random.Random(seed)
    schedule = [(0.05, "running"), (3.0, "paused"), (4.2, "running"), (7.5, "stopped")]
    events: list[dict[str, Any]] = [{"t": 0.02 + rng.random() * 0.02, "event": "paused", "worker": w}
                                    for w in range(workers)]
    ended: dict[int, float] = {}
    for i, (t, state) in enumerate(schedule):
        events.append({"t": t, "event": "broadcast", "state": state})
        until = schedule[i + 1][0] if i + 1 < len(schedule) else 9.0
        for w in range(workers):
            if w in ended:
                continue
            ack = t + 0.003 + rng.expovariate(1 / 0.02)
            if state != "stopped":
                events.append({"t": ack, "event": state, "worker": w})
            _maybe_end(rng, events, ended, w, state, ack, until)
    events.append({"event": "summary", "workers": workers, "elapsed": max(ended.values()) + 0.05})
    return events


def _maybe_end(rng: random.Random, events: list[dict[str, Any]], ended: dict[int, float],
               w: int, state: str, ack: float, until: float) -> None:
    if state == "stopped":
        kind, t = ("killed", until - 0.4 + rng.random() * 0.05) if w in (17, 151) else ("stopped", ack + 0.05)
    elif state == "running" and rng.random() < 0.18:
        t = ack + rng.random() * (until - ack)
        kind = rng.choices(["finished", "failed", "crashed"], [0.85, 0.1, 0.05])[0]
    else:
        return
    event: dict[str, Any] = {"t": t, "event": kind, "worker": w}
    if kind == "failed":
        event["error"] = f"Traceback (most recent call last):\n  ...\nKeyError: 'row {w * 37}'"
    elif kind in ("crashed", "killed"):
        event["exitcode"] = -9 if kind == "killed" else -11
    events.append(event)
    ended[w] = t


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(browser: str, page: str, png: str) -> None:
    """Screenshot `page` at its natural size (read from the SVG's height)."""
    height = _svg_height(page) + (110 if page.endswith(".html") else 16)
    with tempfile.TemporaryDirectory(prefix="procctl-chromium-") as profile:
        cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size=1280,{height}", "file://" + os.path.abspath(page)]
        # Bounded: a wedged browser must not hang the script.
        subprocess.run(cmd, check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _svg_height(page: str) -> int:
    with open(page, encoding="utf-8") as fh:
        match = re.search(r'<svg[^>]*\sheight="(\d+)"', fh.read())
    return int(match.group(1)) if match else 900


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "out"))
    parser.add_argument("--no-screenshot", action="store_true")
    opts = parser.parse_args()
    os.makedirs(opts.out, exist_ok=True)
    events, n = real_run()
    pages = []
    for ext in (".svg", ".html"):
        pages.append(os.path.join(opts.out, f"timeline-10{ext}"))
        render_timeline(events, pages[-1], workers=n, title="procctl run · 10 workers (real run)")
        pages.append(os.path.join(opts.out, f"timeline-200{ext}"))
        render_timeline(synthetic_run(), pages[-1], workers=200, title="procctl run · 200 workers (synthetic)")
    browser = None if opts.no_screenshot else find_chromium()
    if browser is None and not opts.no_screenshot:
        print("no chromium found: apt-get install -y chromium; wrote the pages only", file=sys.stderr)
    for page in pages:
        if browser is not None:
            png = os.path.splitext(page)[0] + ("-html" if page.endswith(".html") else "") + ".png"
            screenshot(browser, page, png)
            print(png)
        else:
            print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
