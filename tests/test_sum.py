"""The sum-threshold job: invariants over shapes, the classic hangs, start methods, the CLI.

Every run is bounded by pytest-timeout and the no-process-left fixture; the
long stress lives behind @pytest.mark.soak and in scripts/soak_sum.py.
"""

from __future__ import annotations

import importlib
import json
import numbers
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from procctl import ChannelStats, Outcome, ProcessController, State, WorkerReport
from procctl.jobs import SumCancelled, SumJob, SumJobError, SumResult, sum_threshold
from procctl.jobs.sum_ledger import Ledger
from procctl.jobs.sum_plan import ConsumerTally, ProducerTally

# procctl.jobs re-exports the function under the module's name: fetch the module itself.
job_module = importlib.import_module("procctl.jobs.sum_threshold")
worker_module = importlib.import_module("procctl.jobs.sum_worker")

HELPER_THREADS = ("QueueFeederThread", "sum-drainer", "sum-events", "procctl-channels")


# -- helpers ------------------------------------------------------------------------


def check(result: SumResult, producers: int, consumers: int, threshold: int, values=(1, 2, 3)) -> None:
    """The issue's invariants, for one result."""
    assert isinstance(result, SumResult)
    assert len(result.sums) == len(result.received) == consumers
    assert len(result.produced) == producers
    assert 0 <= result.winner < consumers
    assert result.threshold == threshold
    assert result.sums[result.winner] > threshold
    assert sum(result.produced) == sum(result.received) + result.drained, result
    assert result.drained >= 0 and min(result.produced) >= 0 and min(result.received) >= 0
    for total, count in zip(result.sums, result.received, strict=True):
        assert min(values) * count <= total <= max(values) * count
    assert result.elapsed > 0
    assert not [t.name for t in threading.enumerate() if t.name in HELPER_THREADS]


def check_story(result: SumResult, events: list[dict]) -> None:
    """The events tell the same story as the result, in order."""
    kinds = [e["event"] for e in events]
    winners = [e for e in events if e["event"] == "crossed" and e["winner"]]
    assert [e["consumer"] for e in winners] == [result.winner]
    for e in events:
        if e["event"] == "crossed" and not e["winner"]:
            assert e["sum"] > result.threshold
    for c, (total, count) in enumerate(zip(result.sums, result.received, strict=True)):
        got = [e for e in events if e["event"] == "received" and e["consumer"] == c]
        assert len(got) == count
        assert sum(e["value"] for e in got) == total
    stopped = {e["producer"]: e["produced"] for e in events if e["event"] == "producer_stopped"}
    assert stopped == dict(enumerate(result.produced))
    assert kinds[-2:] == ["drained", "closed"]
    assert events[-2]["items"] == result.drained
    first_cleanup = kinds.index("producer_stopped")
    assert "received" not in kinds[first_cleanup:]


def _ours(proc: psutil.Process) -> bool:
    """A live process of ours: not a multiprocessing or procctl helper, not a zombie on its way out."""
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        helpers = ("resource_tracker", "forkserver", "procctl.guardian")  # long-lived, by design
        return not any(h in " ".join(proc.cmdline()) for h in helpers)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False  # ended while we looked


def children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if _ours(p)]


# -- invariants over shapes -----------------------------------------------------------


SHAPES = [(1, 1), (1, 5), (5, 1), (4, 4), (8, 2)]


@pytest.mark.parametrize("queue_size", [1, 1000])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{p}x{c}" for p, c in SHAPES])
def test_invariants_over_shapes_and_thresholds(shape, queue_size):
    producers, consumers = shape
    for threshold in (0, 1, 37, 2_000):
        result = sum_threshold(producers, consumers, threshold, queue_size=queue_size, start_method="fork")
        check(result, producers, consumers, threshold)


@pytest.mark.parametrize("threshold,batch", [(60_000, 1), (400_000, 64)])
def test_large_thresholds(threshold, batch):
    result = sum_threshold(3, 3, threshold, queue_size=1000, batch=batch, start_method="fork")
    check(result, 3, 3, threshold)
    assert sum(result.received) >= threshold // 3


def test_story_events_match_the_result():
    for seed in range(3):
        events: list[dict] = []
        result = sum_threshold(3, 3, 40, seed=seed, on_event=events.append, start_method="fork")
        check(result, 3, 3, 40)
        check_story(result, events)


def test_events_are_typed_and_read_as_their_json_form():
    from procctl.jobs import sum_events as ev

    events: list = []
    result = sum_threshold(2, 2, 30, seed=5, on_event=events.append, start_method="fork")
    kinds = {type(e) for e in events}
    assert {ev.Received, ev.Crossed, ev.ProducerStopped, ev.ConsumerStopped, ev.Drained, ev.ChannelClosed} >= kinds
    assert {ev.Received, ev.ProducerStopped, ev.Drained, ev.ChannelClosed} <= kinds
    for e in events:
        assert isinstance(e, ev.SumEvent) and e.kind.value == e["event"]
        assert dict(e) == e.to_dict() == json.loads(json.dumps(e.to_dict())) and e == e.to_dict()
    drained = next(e for e in events if isinstance(e, ev.Drained))
    assert drained.count == drained["items"] == result.drained
    summary = ev.Summary(result).to_dict()
    assert summary == {"event": "summary", **result.to_dict()}


def test_batches_keep_accounting_exact():
    for batch in (2, 17, 256):
        events: list[dict] = []
        result = sum_threshold(2, 3, 500, batch=batch, queue_size=4, on_event=events.append, start_method="fork")
        check(result, 2, 3, 500)
        check_story(result, events)
        assert all(n % batch == 0 for n in result.produced)


@pytest.mark.parametrize("values", [tuple(i % 255 + 1 for i in range(257)), (255,) * 300 + (1,)],
                         ids=["257 small values", "301 with repeats"])
def test_batches_of_more_than_256_small_values(values):
    """A byte draws one of 256 entries: with more, every byte was dropped and the producers spun."""
    result = sum_threshold(2, 2, 2000, values=values, batch=4, start_method="fork", timeout=30)
    check(result, 2, 2, 2000, values=tuple(sorted(set(values))))


def test_values_and_random_delay():
    result = sum_threshold(2, 2, 30, values=[5, 7], delay=(0.001, 0.003), seed=4, start_method="fork")
    check(result, 2, 2, 30, values=(5, 7))


def test_start_methods(start_method):
    events: list[dict] = []
    result = sum_threshold(3, 3, 200, start_method=start_method, on_event=events.append)
    check(result, 3, 3, 200)
    check_story(result, events)


def test_nothing_left_over_many_runs():
    sum_threshold(2, 2, 5, start_method="fork")  # warm up lazily created helpers
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    for _ in range(10):
        sum_threshold(2, 2, 5, start_method="fork", on_event=lambda e: None)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads
    assert not children()


# -- the classic hangs ----------------------------------------------------------------


def test_producers_blocked_on_a_full_queue_at_cancellation():
    # One slot, many producers, one consumer: when it crosses, every producer
    # is (or soon is) blocked in put(), and nobody reads but the manager.
    drained = []
    for _ in range(5):
        result = sum_threshold(8, 1, 50, queue_size=1, start_method="fork")
        check(result, 8, 1, 50)
        drained.append(result.drained)
        assert result.elapsed < job_module.GRACE  # nobody had to be escalated
    # (Under load the one consumer can find the slot empty as it crosses: 1 run in 5 on CI's -n 4.)
    assert max(drained) >= 1, drained


def test_feeder_threads_holding_items_do_not_keep_producers_alive():
    # 1000 batches of 256 values is far more than a pipe holds: the feeder
    # threads are blocked writing when the stop comes; exit needs them flushed.
    # (A threshold the one consumer crosses only once four producers have
    # filled the channel: once someone won, producers put nothing more.)
    result = sum_threshold(4, 1, 400_000, queue_size=1000, batch=256, start_method="fork")
    check(result, 4, 1, 400_000)
    assert result.drained > 64 * 1024 // 3  # more than a pipe's worth of items
    assert result.elapsed < job_module.GRACE


def test_two_consumers_crossing_at_once_give_exactly_one_winner():
    crossings = 0
    for _ in range(8):
        events: list[dict] = []
        # Threshold 0 with one value: every consumer crosses on its first item.
        result = sum_threshold(4, 4, 0, values=(1,), queue_size=8, on_event=events.append, start_method="fork")
        check(result, 4, 4, 0, values=(1,))
        check_story(result, events)
        crossed = [e for e in events if e["event"] == "crossed"]
        assert sum(e["winner"] for e in crossed) == 1
        crossings += len(crossed) > 1
    assert crossings >= 1, "no run had two consumers crossing"


class _EndlessChannels:
    """A worker context whose channels never run dry nor fill up, counting every call."""

    def __init__(self, worker_id):
        self.worker_id = worker_id
        self.calls = 0

    def get(self, name, timeout=None):
        self._count()
        return 1

    def put(self, name, item, timeout=None):
        self._count()
        return True

    def _count(self):
        self.calls += 1
        if self.calls > 100:
            raise AssertionError("still taking or putting items after the race was won")


@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_once_a_consumer_won_nobody_takes_or_puts_another_item(role):
    """'As soon as any consumer's sum exceeds the threshold ... every producer and
    consumer stops': not only at the manager's STOPPED, which comes after it has
    seen the winner end. A consumer that had gone on taking items could end above
    the threshold, or above the winner."""
    plan = job_module.make_plan(1, 2, 10**9, values=(1,))
    ledger = Ledger(plan.workers)
    try:
        assert ledger.claim(1)  # consumer 1 won
        ctx = _EndlessChannels(0 if role == "producer" else 1)  # producer 0, consumer 0
        tally = (worker_module._produce(ctx, plan, ledger, 0) if role == "producer"
                 else worker_module._consume(ctx, plan, ledger, 0))
    finally:
        ledger.close()
    assert ctx.calls == 0
    assert tally == (ProducerTally(0, 0, 0) if role == "producer" else ConsumerTally(0, 0, 0, False, False))


def race_claims(ctx, barrier, ledgers):
    """Every worker tries to claim every round at the same instant."""
    wins = []
    for passed in ledgers:
        ledger = Ledger.attach(passed, 1)
        barrier.wait(10)
        wins.append(ledger.claim(ctx.worker_id))
        ledger.close()
    return wins


def test_claim_is_atomic_under_a_simultaneous_race():
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    rounds, workers = 50, 6
    ledgers = [Ledger(1) for _ in range(rounds)]
    barrier = mp.Barrier(workers)
    try:
        with ProcessController(race_claims, workers, args=(barrier, [lg.handoff() for lg in ledgers]),
                               start_method="fork", initial_state=State.RUNNING) as pc:
            assert pc.wait(30)
            reports = pc.stop()
        for r in range(rounds):
            winners = [w for w, rep in reports.items() if rep.result[r]]
            assert winners == [ledgers[r].winner()]
    finally:
        for lg in ledgers:
            lg.close()


def test_a_failing_worker_is_an_error_not_a_hang(monkeypatch):
    def broken(*args):
        raise RuntimeError("consumer broke")

    monkeypatch.setattr(worker_module, "_consume", broken)  # inherited by forked workers
    with pytest.raises(SumJobError, match="consumer broke"):
        sum_threshold(2, 2, 10, start_method="fork")


@pytest.mark.parametrize("start_method,batch", [("fork", 1), ("fork", 16), ("spawn", 1), ("forkserver", 1)])
def test_sigkilled_producer_and_consumer_mid_run_keep_the_accounting(start_method, batch):
    """SIGKILL a producer and a consumer while items flow, at a different moment
    each run: the others finish the race, and every item is accounted for,
    the killed workers' too (their last put or get included)."""
    import random

    rng = random.Random(batch)
    runs = 3  # fork: three moments; spawned workers come up slowly: up to three tries
    threshold = 6_000 * (2 if batch > 1 else 1)
    both_killed = produced_by_the_dead = 0
    for _ in range(runs):
        if both_killed and start_method != "fork":
            break
        left = [rng.randint(1, 20) * batch]  # values consumer 2 receives before the kill
        hit: list[str] = []
        events: list = []
        jobs: list[SumJob] = []

        def on_event(event, left=left, hit=hit, events=events, jobs=jobs):
            events.append(event)
            if event["event"] == "received" and event["consumer"] == 2:
                left[0] -= 1
                if left[0] == 0:
                    producers, consumers = jobs[0].pids()
                    for key, pid in (("producer_stopped", producers[1]), ("consumer_stopped", consumers[2])):
                        try:
                            os.kill(pid, signal.SIGKILL)
                            hit.append(key)
                        except ProcessLookupError:
                            pass  # the event came late: that worker had already ended

        job = SumJob(3, 3, threshold, batch=batch, queue_size=rng.choice([1, 8, 100]),
                     start_method=start_method, timeout=40, on_event=on_event)
        jobs.append(job)
        result = job.run()
        check(result, 3, 3, threshold)
        stopped = {e["event"]: e for e in events if e["event"] in ("producer_stopped", "consumer_stopped")
                   and e.get("producer", e.get("consumer")) == {"producer_stopped": 1}.get(e["event"], 2)}
        assert stopped["producer_stopped"]["produced"] == result.produced[1]
        assert stopped["consumer_stopped"]["received"] == result.received[2]
        crashed = [k for k, e in stopped.items() if e["outcome"] == "crashed"]
        assert set(crashed) <= set(hit)
        assert all("SIGKILL" in stopped[k]["error"] for k in crashed)
        if len(crashed) == 2:
            both_killed += 1
            produced_by_the_dead += result.produced[1]
            assert result.winner != 2
        # The survivors' stories match their counts exactly.
        for c in (0, 1):
            got = [e for e in events if e["event"] == "received" and e["consumer"] == c]
            assert (len(got), sum(e["value"] for e in got)) == (result.received[c], result.sums[c])
    assert both_killed, "no run had both victims killed while it ran"
    if start_method == "fork":
        assert produced_by_the_dead > 0, "the killed producers never had items to account for"


class _DrainedChannel:
    """What _settle reads of the ITEMS channel once the controller has stopped."""

    def __init__(self, put, got, leftovers):
        self.stats_ = ChannelStats(put, got, len(leftovers), 0)
        self.leftovers = leftovers

    def drain(self):
        return self.leftovers

    def stats(self):
        return self.stats_


@pytest.mark.parametrize("case", ["two producers died in put", "a consumer died after a get"])
def test_settling_credits_the_last_put_and_get_of_killed_workers(case):
    """The ledger and the channel's counts settle what killed workers never wrote
    down. Producers put 8 items worth 16; consumers took 3 worth 7 (the winner)
    and 3 worth 6; 2 worth 3 were drained."""
    plan = job_module.make_plan(2, 2, 6, values=(1, 2, 3))
    ledger = Ledger(plan.workers)
    crashed = {}
    try:
        if case == "two producers died in put":
            # Both died inside put(): only producer 1's item (worth 3) went in.
            ledger.slot(0).commit(4, 8)
            ledger.slot(0).pend(1, 1)
            crashed[0] = WorkerReport(0, 1, Outcome.CRASHED)
            c1 = ConsumerTally(1, 6, 3, False, False)
        else:
            # Consumer 1 took an item worth 3 and died before writing it down.
            ledger.slot(3).commit(1, 1)
            ledger.slot(3).commit(2, 3)
            crashed[3] = WorkerReport(3, 4, Outcome.CRASHED)
            c1 = None
        ledger.slot(1).commit(3, 5)
        ledger.slot(1).pend(1, 3)
        ledger.claim(0)
        reports = {
            0: WorkerReport(0, 1, Outcome.STOPPED, ProducerTally(0, 4, 8)),
            1: WorkerReport(1, 2, Outcome.CRASHED),
            2: WorkerReport(2, 3, Outcome.FINISHED, ConsumerTally(0, 7, 3, True, True)),
            3: WorkerReport(3, 4, Outcome.STOPPED, c1),
            **crashed,
        }
        books = job_module._settle(plan, reports, ledger, _DrainedChannel(8, 6, [1, 2]))
    finally:
        ledger.close()
    assert [(p.produced, p.value_sum) for p in books.producers] == [(4, 8), (4, 8)]
    assert [(c.received, c.sum, c.won) for c in books.consumers] == [(3, 7, True), (3, 6, False)]
    assert (books.drained, books.winner) == (2, 0)


def test_settling_keeps_the_sums_of_killed_workers_whole_past_64_bits():
    """The ledger's sums are modulo 2**64; a killed worker's is made whole from
    its count (it read 3 for 2**64 + 3, 0 for 2**63)."""
    v = 2**64 + 3
    plan = job_module.make_plan(2, 2, 4 * v, values=(v,))
    ledger = Ledger(plan.workers)
    try:
        ledger.slot(1).commit(3, 3 * v)  # producer 1 and consumer 1 were SIGKILLed
        ledger.slot(3).commit(2, 2 * v)
        ledger.claim(0)
        reports = {
            0: WorkerReport(0, 1, Outcome.STOPPED, ProducerTally(0, 4, 4 * v)),
            1: WorkerReport(1, 2, Outcome.CRASHED),
            2: WorkerReport(2, 3, Outcome.FINISHED, ConsumerTally(0, 5 * v, 5, True, True)),
            3: WorkerReport(3, 4, Outcome.CRASHED),
        }
        books = job_module._settle(plan, reports, ledger, _DrainedChannel(7, 7, []))
    finally:
        ledger.close()
    assert [(p.produced, p.value_sum) for p in books.producers] == [(4, 4 * v), (3, 3 * v)]
    assert [(c.received, c.sum, c.crossed) for c in books.consumers] == [(5, 5 * v, True), (2, 2 * v, False)]


# One worker SIGKILLed as it is forked, before it is up (an at-fork hook: one
# child claims the one mark): the run goes on with the others, as for a worker
# killed mid-run; it was a WorkerStartError, and the others were killed.
KILLED_WHILE_STARTING = """
import json, os, signal, sys
if __name__ == "__main__":
    from procctl.jobs import SumJob
    mark = os.path.join({tmp!r}, "kill-one")
    open(mark, "w").close()
    def kill_one():
        try:
            os.unlink(mark)
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)
    os.register_at_fork(after_in_child=kill_one)
    r = SumJob(3, 3, 300, start_method="fork", timeout=60).run()
    print(json.dumps({{"winner": r.winner, "won": r.sums[r.winner] > r.threshold,
                       "balanced": sum(r.produced) == sum(r.received) + r.drained}}))
"""


# The only consumer SIGKILLed as it is forked (the second fork of a 1x1 run):
# nobody can win, and the command says so after the counts (it printed none).
CONSUMER_KILLED = """
import os, signal, sys
if __name__ == "__main__":
    forks = [0]
    os.register_at_fork(before=lambda: forks.__setitem__(0, forks[0] + 1),
                        after_in_child=lambda: forks[0] == 2 and os.kill(os.getpid(), signal.SIGKILL))
    sys.argv = ["procctl", "sum", "--producers", "1", "--consumers", "1", "--threshold", "1000000000",
                "--start-method", "fork", "--json"]
    from procctl.__main__ import main
    main()
"""


def test_a_run_nobody_can_win_ends_with_its_counts_and_exit_1(tmp_path):
    script = tmp_path / "consumer_killed.py"
    script.write_text(CONSUMER_KILLED)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90,
                         start_new_session=True)
    assert res.returncode == 1, res.stderr
    assert res.stderr.splitlines() == ["procctl sum: error: no consumer could win any more: consumer 0 crashed"]
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["event"] == "summary" and summary["winner"] is None
    assert sum(summary["produced"]) == sum(summary["received"]) + summary["drained"]


def test_a_worker_killed_while_the_job_starts_does_not_end_the_run(tmp_path):
    script = tmp_path / "killed_while_starting.py"
    script.write_text(KILLED_WHILE_STARTING.format(tmp=str(tmp_path)))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90,
                         start_new_session=True)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(tmp_path / "kill-one")  # a worker took it: one was killed
    got = json.loads(res.stdout)
    assert got["winner"] >= 0 and got["won"] and got["balanced"], got


def test_a_run_with_every_consumer_killed_is_an_error_not_a_hang():
    killed: list[int] = []
    jobs: list[SumJob] = []

    def on_event(event):
        if not killed:
            killed.extend(jobs[0].pids()[1])
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    jobs.append(SumJob(2, 2, 10**9, start_method="fork", on_event=on_event))
    job = jobs[0]
    with pytest.raises(SumJobError, match="no consumer could win") as caught:
        job.run()
    counts = caught.value.result  # the settled counts all the same (it had none)
    assert counts is not None and counts.winner == -1 and len(counts.sums) == 2
    assert sum(counts.produced) == sum(counts.received) + counts.drained
    assert not children()


def test_a_cancel_before_run_starts_nothing():
    # It started every worker and produced items before the cancel took effect.
    job = SumJob(3, 3, 10**9, start_method="fork")
    job.cancel()
    with pytest.raises(SumCancelled) as caught:
        job.run()
    assert caught.value.result == SumResult(-1, 10**9, (0,) * 3, (0,) * 3, (0,) * 3, 0, 0.0)
    assert job.controller is None and not children()


class Int64:
    """An Integral that is not an int, as numpy's int64 is (it was refused)."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value

    __int__ = __index__

    def __lt__(self, other):
        return self.value < other

    def __le__(self, other):
        return self.value <= other

    def __gt__(self, other):
        return self.value > other


numbers.Integral.register(Int64)


def test_integral_numbers_of_other_types_are_integers():
    result = sum_threshold(1, 1, Int64(5), values=(Int64(2), 3), seed=Int64(1), queue_size=Int64(2),
                           start_method="fork")
    assert result.winner == 0 and result.sums[0] > 5 and type(result.threshold) is int


# -- timeout, cancel, bad arguments ----------------------------------------------------


def test_a_timeout_beyond_any_float_is_no_limit():
    assert sum_threshold(2, 2, 10, timeout=10**400, start_method="fork").winner >= 0  # (an OverflowError once)


def test_timeout_stops_cleanly_and_raises():
    started = time.monotonic()
    # (The clock runs from before the workers start: at 0.5 s, under load, no item came.)
    with pytest.raises(TimeoutError, match="within 1.5s") as info:
        sum_threshold(2, 2, 10**9, delay=0.01, timeout=1.5, start_method="fork")
    assert time.monotonic() - started < 5
    counts = info.value.result  # a SumTimeout: the run's counts, nobody won
    assert counts.winner == -1 and max(counts.sums) <= 10**9 and len(counts.produced) == 2
    assert sum(counts.produced) == sum(counts.received) + counts.drained > 0
    assert not children()
    assert not [t.name for t in threading.enumerate() if t.name in HELPER_THREADS]


def test_cancel_from_another_thread():
    job = SumJob(3, 3, 10**9, queue_size=1, start_method="fork")
    timer = threading.Timer(0.3, job.cancel)
    timer.start()
    try:
        with pytest.raises(SumCancelled) as caught:
            job.run()
    finally:
        timer.cancel()
    counts = caught.value.result  # the counts as settled, as a timeout's
    assert counts is not None and counts.winner == -1 and len(counts.sums) == 3
    assert sum(counts.produced) == sum(counts.received) + counts.drained
    assert not children()


BAD_ARGUMENTS = [
    {"producers": 0}, {"producers": -1}, {"producers": 1.5}, {"producers": True}, {"consumers": 0},
    {"threshold": -1}, {"threshold": 2.5}, {"threshold": "10"}, {"threshold": None},
    {"values": ()}, {"values": (1, 0)}, {"values": (1, -2)}, {"values": (1.5,)}, {"values": "123"},
    {"values": 3}, {"queue_size": 0}, {"queue_size": -3}, {"delay": -0.1}, {"delay": (2, 1)},
    {"delay": (-1, 1)}, {"delay": (1, 2, 3)}, {"delay": float("nan")}, {"delay": "1"},
    {"timeout": -1}, {"timeout": float("nan")}, {"seed": "x"}, {"start_method": "thread"},
    {"batch": 0}, {"batch": 100_001}, {"on_event": 3}, {"delay": 2**1024}, {"delay": (0, 10**400)},
]


def test_a_timeout_of_zero_is_a_timeout_not_a_bad_argument():
    """As every timeout (README: a number >= 0) and `procctl run --timeout 0`:
    it was refused as not positive."""
    with pytest.raises(TimeoutError):
        sum_threshold(2, 2, 10**9, timeout=0, start_method="fork")
    assert run_sum("--threshold", "1000000000", "--timeout", "0").returncode == 124
    assert not children()


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS, ids=[repr(k) for k in BAD_ARGUMENTS])
def test_bad_arguments_raise_before_any_process_starts(kwargs):
    before = {p.pid for p in children()}
    with pytest.raises(ValueError) as info:
        sum_threshold(**kwargs)
    assert next(iter(kwargs)).split("_")[0] in str(info.value)
    assert {p.pid for p in children()} <= before


def test_an_infinite_grace_is_no_limit_as_for_the_controller():
    from procctl.jobs.sum_threshold import SumJob

    assert SumJob(1, 1, grace=float("inf")).grace == float("inf")
    for bad in (float("nan"), -1, "5"):
        with pytest.raises(ValueError, match="grace"):
            SumJob(1, 1, grace=bad)

# -- the command line --------------------------------------------------------------------


CLI = [sys.executable, "-m", "procctl", "sum"]


def run_sum(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("first, gap", [(0.25, 0.05), (0.4, 0.1)])
def test_a_second_ctrl_c_while_spawn_workers_start_still_ends_with_the_counts(first, gap):
    # Signals at moments while the spawn workers start (as issue 10's early-signal
    # runs): the second SIGINT kills them while start() waits, which is the
    # cancel's doing, and the counts are settled as ever (the summary was missing).
    for _ in range(6):
        proc = subprocess.Popen(CLI + ["--threshold", "1000000000", "--start-method", "spawn", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            time.sleep(first)
            proc.send_signal(signal.SIGINT)
            time.sleep(gap)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait(10)
        # A loaded machine's interpreter had not reached procctl's handlers yet (its own
        # start-up, which the README excepts: a death by the signal, or its traceback
        # from no file of procctl's and exit 1): again, later.
        in_start_up = proc.returncode == -signal.SIGINT or (proc.returncode == 1 and "/procctl/" not in err)
        if not in_start_up:
            break
        first *= 2
    assert proc.returncode == 130, err
    *_, cancelled, summary = map(json.loads, out.splitlines())
    assert cancelled["event"] == "cancelled" and cancelled["signal"] == "SIGINT"
    assert summary["event"] == "summary" and summary["winner"] is None, out[-2000:]
    assert sum(summary["produced"]) == sum(summary["received"]) + summary["drained"]


def test_cli_tells_the_story():
    res = run_sum("--seed", "3", "--threshold", "10")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(" received " in line for line in lines)
    assert sum("crossed the threshold" in line for line in lines) == 1
    for what in ("producer 0 stopped", "consumer 0 stopped", "cleanup: drained", "cleanup: queue closed"):
        assert any(line.startswith(what) for line in lines), what
    assert lines[-1].startswith("summary: consumer ")
    assert res.stderr == ""


def test_cli_json_lines_end_with_the_summary():
    res = run_sum("--json", "--producers", "2", "--consumers", "3", "--threshold", "25", "--delay", "0-0.001")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    summary = events[-1]
    assert set(summary) == {"event", "winner", "threshold", "sums", "received", "produced", "drained", "elapsed"}
    result = SumResult(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in summary.items() if k != "event"})
    check(result, 2, 3, 25)
    check_story(result, events[:-1])
    assert all(isinstance(e["t"], float) for e in events[:-1])


def test_cli_json_times_never_go_back():
    # Many processes stamp events; the log tells them in one order, and its times follow it.
    res = run_sum("--json", "--producers", "4", "--consumers", "3", "--threshold", "2000")
    assert res.returncode == 0, res.stderr
    times = [json.loads(line)["t"] for line in res.stdout.splitlines()[:-1]]
    assert len(times) > 100
    assert all(a <= b for a, b in zip(times, times[1:], strict=False))


BAD_CLI = [
    ["--producers", "0"], ["--consumers", "abc"], ["--threshold", "-1"], ["--threshold", "1.5"],
    ["--values", ""], ["--values", "1,x"], ["--values", "0"], ["--queue-size", "0"], ["--delay", "-1"],
    ["--delay", "2-1"], ["--delay", "soon"], ["--delay", "1-2-3"], ["--delay", "1e-3-"],
    ["--timeout", "-2"], ["--start-method", "thread"],
    ["--batch", "0"], ["--seed", "x"], ["--bogus"],
]


@pytest.mark.parametrize("text, delay", [("0.5", 0.5), ("1-2", (1.0, 2.0)), ("1e-3-2e-3", (0.001, 0.002)),
                                         ("5e-4-0.01", (0.0005, 0.01)), ("0-1E-3", (0.0, 0.001))])
def test_cli_delay_min_max_takes_exponents(text, delay):
    from procctl.cli_sum import parse_delay

    # The exponent's '-' is not MIN-MAX's ('1e-3-2e-3' was refused).
    assert parse_delay(text) == delay


@pytest.mark.parametrize("args", BAD_CLI, ids=[" ".join(a) for a in BAD_CLI])
def test_cli_bad_input_is_one_line_and_exit_2(args):
    res = run_sum(*args)
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr


def test_cli_timeout_exits_124():
    res = run_sum("--threshold", "1000000000", "--delay", "0.01", "--timeout", "1.5", "--json")
    assert res.returncode == 124, res.stderr
    *_, closed, timed_out, summary = map(json.loads, res.stdout.splitlines())
    # Its time, as every record's, and never before the one above (it had none).
    assert list(timed_out) == ["t", "event", "timeout"] and timed_out["timeout"] == 1.5
    assert closed["event"] == "closed" and timed_out["t"] >= closed["t"] >= 1.5
    # The last line is the summary, as on a win: nobody won, the counts add up.
    assert summary["event"] == "summary" and summary["winner"] is None
    assert sum(summary["produced"]) == sum(summary["received"]) + summary["drained"] > 0
    assert "within 1.5s" in res.stderr


def _live(*args: str) -> subprocess.Popen:
    # Unbuffered: the first line is read up to its newline and no further, so that
    # communicate() gets every line after it whole (a buffered readline took the
    # beginning of the next lines with it, once several had come: a loaded machine).
    proc = subprocess.Popen(CLI + ["--json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                            start_new_session=True)  # its own process group, as on a terminal
    return proc


def _wait_first_line(proc: subprocess.Popen, timeout: float = 20) -> list[psutil.Process]:
    done = threading.Event()
    timer = threading.Timer(timeout, lambda: done.is_set() or proc.kill())
    timer.start()
    try:
        line = proc.stdout.readline()  # the first event: the run is under way
    finally:
        done.set()
        timer.cancel()
    assert line, proc.stderr.read().decode()
    return psutil.Process(proc.pid).children(recursive=True)


@pytest.mark.parametrize("sig,code,group", [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)])
def test_cli_signal_stops_cleanly(sig, code, group):
    proc = _live("--threshold", "1000000000", "--delay", "0.001")
    try:
        workers = _wait_first_line(proc)
        assert workers
        if group:
            os.killpg(proc.pid, sig)  # Ctrl-C on a terminal: the whole group
        else:
            os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == code, err
    assert b"Traceback" not in err
    events = [json.loads(line) for line in out.splitlines()]
    # The last line is the summary, as issue 3 says, with the counts and no winner.
    assert [e["event"] for e in events[-4:]] == ["drained", "closed", "cancelled", "summary"]
    summary = events[-1]
    assert summary["winner"] is None and summary["threshold"] == 1000000000
    assert sum(summary["produced"]) == sum(summary["received"]) + summary["drained"] > 0
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive


# -- soak -----------------------------------------------------------------------------------


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_soak_random_shapes():
    import random

    rng = random.Random(1)
    for _ in range(300):
        p, c = rng.randint(1, 8), rng.randint(1, 8)
        threshold = rng.choice([0, 1, 10, 100, 1000, 20_000])
        size = rng.choice([1, 2, 3, 100, 1000])
        batch = rng.choice([1, 1, 4, 64])
        check(sum_threshold(p, c, threshold, queue_size=size, batch=batch), p, c, threshold)
