"""SecAgg+ refuses what it cannot protect (issue 26, item 6): the survivor floor below which the
server will not unmask, and k and t sized for every cohort size Poisson sampling produces, not its
mean (actors/secagg/params.py, protocol.py). Pure: no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmeta.actors.secagg.params import (
    evaluate_harary_params,
    find_harary_params,
    find_harary_params_over,
    poisson_cohort_sizes,
    survivor_floor,
    weakest_harary_params,
)
from fedmeta.actors.secagg.protocol import BelowSurvivorFloor, SecAggAbort, run_round
from fedmeta.actors.secagg.quantize import sum_mod

TARGETS = {"dropout": 0.33, "adversarial": 0.05}  # Bell et al.'s example, the config's defaults
BITS = 16


def _vectors(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2**BITS, size=3, dtype=np.uint64) for i in range(n)}


# ---------------------------------------------------------------------------------------------
# The survivor floor
# ---------------------------------------------------------------------------------------------


def test_the_floor_is_the_surviving_count_the_bounds_assume():
    assert [survivor_floor(n, 0.33) for n in (0, 1, 10, 100, 120)] == [0, 1, 7, 67, 81]
    assert survivor_floor(10, 0.3) == 7  # 0.7 * 10 is 6.999...: still 7, as the finder counts
    assert survivor_floor(10, 0.0) == 10
    with pytest.raises(ValueError, match="dropout rate"):
        survivor_floor(10, 1.0)


@pytest.mark.adversary
def test_a_round_sized_for_a_third_dropping_refuses_to_unmask_with_sixty_percent_gone():
    """The finding: (k, t) = (28, 6), the finder's graph for 100 clients with 33% dropout, completed
    a round that kept 40 of 100; every survivor still had t live neighbours, so t alone let it
    through. With the floor the server refuses before asking anyone for a share."""
    vectors, dropped = _vectors(100), set(range(0, 100, 5)) | set(range(1, 100, 5)) | set(range(2, 100, 5))
    assert len(dropped) == 60
    kw = {"drop": {"masked": dropped}, "allow_low_threshold": True}
    total, _ = run_round(vectors, 28, 6, BITS, np.random.default_rng(1), **kw)  # no floor: released
    assert np.array_equal(total, sum_mod([vectors[i] for i in sorted(set(vectors) - dropped)], BITS))
    with pytest.raises(
        BelowSurvivorFloor,
        match=r"40 of the 100 clients survived, below the survivor floor "
        r"ceil\(n\(1 - 0.33\)\) = 67.*unmasking refused",
    ):
        run_round(vectors, 28, 6, BITS, np.random.default_rng(1), dropout=0.33, **kw)


@pytest.mark.adversary
@pytest.mark.parametrize("phase", ["advertise", "share", "masked"])
def test_below_the_floor_no_share_is_revealed_and_nothing_is_unmasked(phase):
    """Whatever phase the clients drop in, the floor counts the n clients invited to key set-up:
    with 4 of 10 gone (the complete graph, t = 5: the threshold alone would pass) the server stops
    at the end of the masked phase, before the unmask request, holding only the masked sum."""
    from fedmeta.actors.secagg.protocol import SecAggClient, SecAggServer

    vectors, gone = _vectors(10), {1, 4, 6, 9}
    child = np.random.default_rng(2).spawn(11)
    server = SecAggServer(0, list(vectors), None, 5, BITS, 3, child[0], dropout=0.33)
    assert server.survivor_floor == 7
    clients = {c: SecAggClient(c, 0, BITS, 5, g) for c, g in zip(vectors, child[1:])}
    drop = {p: gone if p == phase else set() for p in ("advertise", "share", "masked")}
    keys = server.receive_keys([clients[c].advertise() for c in vectors if c not in drop["advertise"]])
    inbox = server.route_shares([clients[c].share_keys(keys[c]) for c in keys if c not in drop["share"]])
    msgs = [clients[c].masked_input(vectors[c], inbox[c]) for c in inbox if c not in drop["masked"]]
    with pytest.raises(BelowSurvivorFloor, match="6 of the 10 clients survived"):
        server.collect_masked(msgs)
    assert isinstance(BelowSurvivorFloor("x"), SecAggAbort)  # callers that abort on SecAggAbort abort
    assert not server.survivors and not server.revealed_self and not server.revealed_key
    assert len(server.held_vectors()) == 1  # the masked sum, never an unmasked one
    with pytest.raises(Exception, match="phase"):  # and the round cannot be pushed on
        server.unmask([])


def test_at_the_floor_the_round_completes():
    vectors = _vectors(10)
    total, server = run_round(
        vectors, None, 5, BITS, np.random.default_rng(3), {"masked": {0, 5, 8}}, dropout=0.33
    )
    assert len(server.survivors) == 7 == server.survivor_floor
    assert np.array_equal(total, sum_mod([vectors[i] for i in sorted(server.survivors)], BITS))


# ---------------------------------------------------------------------------------------------
# Sizing k and t for a Poisson cohort
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "population, rate",
    [(40, 0.25), (120, 100 / 120), (1000, 0.1), (10**5, 0.01), (50, 0.02), (10, 0.9), (7, 1.0)],
)
def test_cohort_sizes_are_the_binomial_quantiles(population, rate):
    stats = pytest.importorskip("scipy.stats")
    lo, hi = poisson_cohort_sizes(population, rate)
    q, b = 2.0**-20, stats.binom(population, rate)
    assert b.cdf(lo - 1) < q <= b.cdf(lo) or lo == 0  # P[X < lo] < q, and lo is the largest such
    assert b.sf(hi) < q <= b.sf(hi - 1) or hi == population  # P[X > hi] < q, and hi is the smallest such


@pytest.mark.adversary
def test_the_mean_cohorts_graph_falls_short_at_sizes_a_poisson_cohort_reaches():
    """The finding: (28, 6) is the finder's answer for 100 clients and holds at 110, but at 120 six
    clients are corrupt, t = 6 of them can reconstruct, and 40 security bits become 6. The bounds
    are not monotone in n (floor(0.05 n) jumps at multiples of 20), so the sizing is checked at
    every size of a Poisson cohort's range, here 100 expected of 200 (120 is inside it)."""
    assert (find_harary_params(100, **TARGETS).k, find_harary_params(100, **TARGETS).t) == (28, 6)
    at = {n: evaluate_harary_params(n, 28, 6, **TARGETS) for n in (110, 120)}
    assert -at[110].security_log2 == pytest.approx(40.34, abs=0.01) and -at[
        120
    ].security_log2 == pytest.approx(6.34, abs=0.01)
    assert not at[120].meets_security
    lo, hi = poisson_cohort_sizes(200, 0.5)
    assert lo < 100 < 120 < hi
    got = find_harary_params_over(lo, 100, hi, **TARGETS)
    assert got.n == hi and not got.complete
    for n in range(lo, hi + 1):
        p = evaluate_harary_params(n, got.k, got.t, **TARGETS)
        assert p.meets_security, n
        assert p.meets_targets or n < 100, n  # correctness from the expected size up
    # the fewest neighbours that do: k - 2 fails at some size, whatever its threshold
    assert not any(
        all(evaluate_harary_params(n, got.k - 2, t, **TARGETS).meets_security for n in range(lo, hi + 1))
        and all(evaluate_harary_params(n, got.k - 2, t, **TARGETS).meets_targets for n in range(100, hi + 1))
        for t in range(2, got.k - 1)
    )
    weakest = weakest_harary_params(got.k, got.t, lo, 100, hi, **TARGETS)
    assert weakest.meets_targets and lo <= weakest.n <= hi
    assert (
        weakest_harary_params(28, 6, lo, 100, hi, **TARGETS).n == 120
        and not weakest_harary_params(28, 6, lo, 100, hi, **TARGETS).meets_targets
    )


@pytest.mark.parametrize(
    "n, delta, gamma, adversary",
    [(10, 0.33, 0.05, "semi_honest"), (100, 0.05, 0.33, "semi_malicious"), (1000, 0.33, 0.05, "semi_honest")],
)
def test_one_size_is_the_plain_finder(n, delta, gamma, adversary):
    kw = {"dropout": delta, "adversarial": gamma, "adversary": adversary}
    assert find_harary_params_over(n, n, n, **kw) == find_harary_params(n, **kw)
    # a range one size wider below: never fewer neighbours, and secure at both sizes
    over, one = find_harary_params_over(n - 1, n, n, **kw), find_harary_params(n, **kw)
    assert over.k >= one.k and over.meets_targets
    assert evaluate_harary_params(n - 1, over.k, over.t, **kw).meets_security


def test_unreachable_range_targets_say_so():
    with pytest.raises(
        ValueError, match=r"no neighbour graph for cohorts of 50 to 150 clients \(expected 100\)"
    ):
        find_harary_params_over(50, 100, 150, 0.45, 0.45, adversary="semi_malicious")
    with pytest.raises(ValueError, match="2 <= low <= expected <= high"):
        find_harary_params_over(10, 5, 20, **TARGETS)
    assert math.isinf(-evaluate_harary_params(10, 6, 2, **TARGETS).security_log2)  # nothing to break at 10
