"""The largest-batch search of bench/generate.py (--capacity), on
predicates standing for "generate() of this batch fits the budget", and how
an earlier result's capacity rows carry over (--previous)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from generate import capacity_budget, measured_capacity, search_largest  # noqa: E402


@pytest.mark.parametrize("largest,start", [(1068, 300), (347, 90), (500, 2000), (3, 1), (1, 1), (64, 64),
                                           (65, 64), (40000, 7)])
def test_search_brackets_the_largest_batch_within_a_sixteenth(largest, start):
    tried = []

    def runs(batch):
        tried.append(batch)
        return batch <= largest

    lo, hi = search_largest(runs, start)
    assert lo <= largest < hi
    assert runs(lo) and not runs(hi)
    assert hi - lo <= max(1, lo // 16)
    assert len(tried) <= 40  # doubling then bisection, never a walk


def test_search_when_nothing_runs_or_everything_does():
    assert search_largest(lambda batch: False, 300) == (0, 1)
    assert search_largest(lambda batch: True, 5, limit=100) == (80, None)  # no failure up to the limit


def test_capacity_rows_carry_over_only_under_the_same_budget():
    previous = dict(card="H", new_tokens=32, runs=3, capacity_gib=40.0, capacity_prompt=4096, capacity_new_tokens=256,
                    rows=[dict(model="m", path="latent-static", runs=[], largest_batch=427, fails_at_batch=448),
                          dict(model="m", path="static", runs=[])])
    # a run without --capacity keeps the earlier budget, and so its rows
    assert measured_capacity(previous, "H", 32, capacity_budget(previous)) == {("m", "latent-static"): (427, 448)}
    assert measured_capacity(previous, "H", 32, (20.0, 4096, 256)) == {}
    assert measured_capacity(previous, "other card", 32, capacity_budget(previous)) == {}
    assert capacity_budget(dict(card="H")) == (0, None, None)
