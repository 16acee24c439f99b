import numpy as np
from hypothesis import given, settings, strategies as st

from sim.sampling import apply_dropout, eval_individuals, sample_cohort, split_even


@given(seed=st.integers(0, 2**31), rnd=st.integers(0, 1000), n=st.integers(1, 500), data=st.data())
@settings(max_examples=50, deadline=None)
def test_cohort_is_seeded_distinct_and_in_range(seed, rnd, n, data):
    k = data.draw(st.integers(1, n))
    c = sample_cohort(seed, rnd, n, k)
    assert len(set(c.tolist())) == k and c.min() >= 0 and c.max() < n
    assert np.array_equal(c, sample_cohort(seed, rnd, n, k))


def test_rounds_differ_and_dropout_partitions():
    a, b = sample_cohort(0, 1, 1000, 100), sample_cohort(0, 2, 1000, 100)
    assert not np.array_equal(a, b)
    alive, dropped = apply_dropout(0, 1, a, 0.3)
    assert sorted(alive.tolist() + dropped.tolist()) == a.tolist()
    assert 10 < len(dropped) < 50
    assert len(apply_dropout(0, 1, a, 0.0)[1]) == 0
    assert np.array_equal(eval_individuals(5, 100, 10), eval_individuals(5, 100, 10))


def test_split_even():
    parts = split_even(np.arange(10), 3)
    assert [len(p) for p in parts] == [4, 3, 3] and sum(parts, []) == list(range(10))
    assert split_even(np.arange(1), 4) == [[0]]
