import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.sim.sampling import apply_dropout, eval_individuals, sample_cohort, split_even
from fedmeta.sim.seeding import Secrets


@given(seed=st.integers(0, 2**31), rnd=st.integers(0, 1000), n=st.integers(1, 500), data=st.data())
@settings(max_examples=50, deadline=None)
def test_cohort_is_seeded_distinct_and_in_range(seed, rnd, n, data):
    k = data.draw(st.integers(1, n))
    c = sample_cohort(Secrets.seeded(seed), rnd, n, k)
    assert len(set(c.tolist())) == k and c.min() >= 0 and c.max() < n
    assert np.array_equal(c, sample_cohort(Secrets.seeded(seed), rnd, n, k))


def test_rounds_differ_and_dropout_partitions():
    a, b = sample_cohort(Secrets.seeded(0), 1, 1000, 100), sample_cohort(Secrets.seeded(0), 2, 1000, 100)
    assert not np.array_equal(a, b)
    alive, dropped = apply_dropout(Secrets.seeded(0), 1, a, 0.3)
    assert sorted(alive.tolist() + dropped.tolist()) == a.tolist()
    assert 10 < len(dropped) < 50
    assert len(apply_dropout(Secrets.seeded(0), 1, a, 0.0)[1]) == 0
    assert np.array_equal(eval_individuals(5, 100, 10), eval_individuals(5, 100, 10))


def test_split_even():
    parts = split_even(np.arange(10), 3)
    assert [len(p) for p in parts] == [4, 3, 3] and sum(parts, []) == list(range(10))
    assert split_even(np.arange(1), 4) == [[0]]


@given(seed=st.integers(0, 2**31), rnd=st.integers(0, 1000), n=st.integers(1, 300), q=st.floats(0.01, 1.0))
@settings(max_examples=50, deadline=None)
def test_poisson_cohort_is_seeded_distinct_and_in_range(seed, rnd, n, q):
    from fedmeta.sim.sampling import sample_poisson

    c = sample_poisson(Secrets.seeded(seed), rnd, n, q)
    assert len(set(c.tolist())) == len(c) and (len(c) == 0 or (c.min() >= 0 and c.max() < n))
    assert np.array_equal(c, sample_poisson(Secrets.seeded(seed), rnd, n, q)) and np.array_equal(
        c, np.sort(c)
    )


def test_poisson_sampling_includes_each_client_independently_at_rate_q():
    """What the accountant assumes: every client in a round with probability q, independently, so
    cohort sizes are Binomial(n, q) and a client's participation count is Binomial(rounds, q)."""
    from scipy import stats

    from fedmeta.sim.sampling import sample_poisson

    n, q, rounds = 200, 0.1, 2000
    member = np.zeros((rounds, n), bool)
    for r in range(rounds):
        member[r, sample_poisson(Secrets.seeded(7), r, n, q)] = True
    sizes = member.sum(1)
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / rounds)
    assert 0.8 < sizes.var() / (n * q * (1 - q)) < 1.2
    counts = member.sum(0)  # per client: Binomial(rounds, q)
    assert stats.kstest(counts, stats.binom(rounds, q).cdf).pvalue > 1e-3
    # independence: the co-membership of two clients matches q^2
    both = (member[:, 0] & member[:, 1]).mean()
    assert abs(both - q * q) < 4 * np.sqrt(q * q / rounds)
