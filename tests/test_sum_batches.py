"""Batches of small values are drawn as bytes: right values, none favoured, exact accounting."""

from __future__ import annotations

import importlib
import random
from collections import Counter

from procctl import sum_threshold

job = importlib.import_module("procctl.jobs.sum_worker")


def test_byte_batches_hold_only_the_values_in_equal_shares():
    make = job._item_maker(random.Random(7), (1, 2, 3), 1000)
    counts: Counter[int] = Counter()
    for _ in range(60):
        batch = make()
        assert isinstance(batch, bytes) and len(batch) == 1000
        counts.update(batch)
    assert set(counts) == {1, 2, 3}
    # 60,000 draws: each share within 2% of a third.
    assert all(abs(n / 60_000 - 1 / 3) < 0.02 for n in counts.values())


def test_bytes_past_the_last_whole_multiple_are_dropped():
    # 256 bytes over 3 values: byte 255 would favour values[0], so it is dropped.
    class Bytes255First(random.Random):
        def randbytes(self, n: int) -> bytes:
            return (b"\xff\x00\x01\x02" * n)[:n]

    make = job._byte_batches(Bytes255First(), (1, 2, 3), 3)
    assert make() == bytes([1, 2, 3])


def test_large_values_keep_the_tuple_path():
    make = job._item_maker(random.Random(7), (1, 1000), 10)
    assert isinstance(make(), tuple)


def test_byte_batches_keep_the_accounting_exact():
    r = sum_threshold(2, 2, 50_000, batch=500, queue_size=2, start_method="fork")
    assert sum(r.produced) == sum(r.received) + r.drained
    assert r.sums[r.winner] > r.threshold


def test_byte_sums_are_exact_across_spans_and_lengths():
    # The Adler-32 sum is exact only over runs short enough for the span; longer batches go in runs.
    rng = random.Random(3)
    for values, batch in [((1, 2, 3), 1000), ((0, 255), 100_000), ((7,), 5), ((0, 1, 254, 255), 70_000)]:
        make, total = job._item_maker(rng, values, batch), job.value_sum(values)
        for _ in range(5):
            item = make()
            assert total(item) == sum(item)
    assert job.value_sum((1, 2, 3))((3, 3, 1)) == 7  # tuples still sum
    assert job.value_sum((255,) * 2)(bytes([255]) * 100_000) == 25_500_000
