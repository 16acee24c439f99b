"""SecAgg+ parameters from security targets (actors/secagg/params.py).

The table is the one in the unit tests of Google's parameter finder (federated-compute,
fcp/secagg/server/graph_parameter_finder_test.cc, "ComputesParametersThatMatchPrecomputedValues"):
(n, adversarial rate, dropout rate, adversary) -> (k, t), sigma = 40, eta = 20. The finder there
checks the degree exactly and the threshold as an upper bound; ours matches both exactly, except at
n = 10 where it returns t = 2 (its Shamir minimum) without re-checking correctness (below)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.actors.secagg.params import (
    HararyParams,
    SecAggTargetWarning,
    _Hypergeometric,
    evaluate_harary_params,
    find_harary_params,
)

SH, SM = "semi_honest", "semi_malicious"
# (n, gamma = adversarial, delta = dropout, adversary, k, t)
FINDER_TABLE = [
    (100, 0.45, 0.45, SH, 92, 46),
    (1000, 0.45, 0.45, SH, 822, 417),
    (10, 0.33, 0.33, SH, 8, 4),
    (100, 0.33, 0.33, SH, 68, 34),
    (1000, 0.33, 0.33, SH, 286, 150),
    (10000, 0.33, 0.33, SH, 422, 221),
    (100000, 0.33, 0.33, SH, 480, 251),
    (1000000, 0.33, 0.33, SH, 518, 270),
    (100, 0.3, 0.3, SM, 92, 62),
    (1000, 0.3, 0.3, SM, 872, 584),
    (100, 0.05, 0.33, SH, 28, 6),
    (1000, 0.05, 0.33, SH, 72, 24),  # issue 15's example: 1,000 clients
    (10000, 0.05, 0.33, SH, 86, 29),
    (100000, 0.05, 0.33, SH, 96, 32),
    (1000000, 0.05, 0.33, SH, 102, 34),
    (10, 0.05, 0.33, SM, 8, 5),
    (100, 0.05, 0.33, SM, 72, 39),
    (1000, 0.05, 0.33, SM, 398, 223),
    (10000, 0.05, 0.33, SM, 746, 420),
    (100000, 0.05, 0.33, SM, 882, 496),
    (1000000, 0.05, 0.33, SM, 970, 545),
    (10, 0.33, 0.05, SH, 4, 4),
    (100, 0.33, 0.05, SH, 34, 29),
    (1000, 0.33, 0.05, SH, 78, 60),
    (10000, 0.33, 0.05, SH, 92, 70),
    (100000, 0.33, 0.05, SH, 102, 77),
    (1000000, 0.33, 0.05, SH, 110, 83),
    (10, 0.33, 0.05, SM, 4, 4),
    (100, 0.33, 0.05, SM, 42, 37),
    (1000, 0.33, 0.05, SM, 132, 109),
    (10000, 0.33, 0.05, SM, 178, 146),
    (100000, 0.33, 0.05, SM, 196, 160),
    (1000000, 0.33, 0.05, SM, 212, 173),
    (10, 0.05, 0.05, SH, 2, 2),
    (100, 0.05, 0.05, SH, 12, 6),
    (1000, 0.05, 0.05, SH, 30, 17),
    (10000, 0.05, 0.05, SH, 34, 20),
    (100000, 0.05, 0.05, SH, 36, 21),
    (1000000, 0.05, 0.05, SH, 38, 22),
    (10, 0.05, 0.05, SM, 2, 2),
    (100, 0.05, 0.05, SM, 16, 11),
    (1000, 0.05, 0.05, SM, 52, 37),
    (10000, 0.05, 0.05, SM, 62, 44),
    (100000, 0.05, 0.05, SM, 68, 48),
    (1000000, 0.05, 0.05, SM, 74, 52),
    (10, 0.33, 0.0, SH, 4, 4),
    (100, 0.33, 0.0, SH, 26, 25),
    (1000, 0.33, 0.0, SH, 38, 36),
    (10000, 0.33, 0.0, SH, 42, 40),
    (100000, 0.33, 0.0, SH, 46, 44),
    (1000000, 0.33, 0.0, SH, 50, 47),
    (10, 0.33, 0.0, SM, 4, 4),
    (100, 0.33, 0.0, SM, 26, 26),
    (1000, 0.33, 0.0, SM, 38, 37),
    (10000, 0.33, 0.0, SM, 42, 41),
    (100000, 0.33, 0.0, SM, 46, 45),
    (1000000, 0.33, 0.0, SM, 50, 49),
    (100, 0.0, 0.33, SH, 26, 2),
    (1000, 0.0, 0.33, SH, 38, 2),
    (10000, 0.0, 0.33, SH, 42, 2),
    (100000, 0.0, 0.33, SH, 46, 2),
    (1000000, 0.0, 0.33, SH, 50, 2),
    (10, 0.0, 0.33, SM, 8, 5),
    (100, 0.0, 0.33, SM, 68, 35),
    (1000, 0.0, 0.33, SM, 228, 115),
    (10000, 0.0, 0.33, SM, 326, 164),
    (100000, 0.0, 0.33, SM, 372, 187),
    (1000000, 0.0, 0.33, SM, 410, 206),
    *[(n, 0.0, 0.0, adv, 2, 2) for adv in (SH, SM) for n in (10, 100, 1000, 10000, 100000, 1000000)],
]
# degrees in the thousands: a few seconds each (the scan is O(n k))
SLOW_TABLE = [
    (10000, 0.45, 0.45, SH, 3494, 1771),
    (100000, 0.45, 0.45, SH, 5508, 2788),
    (1000000, 0.45, 0.45, SH, 6240, 3156),
    (10000, 0.3, 0.3, SM, 4822, 3230),
    (100000, 0.3, 0.3, SM, 9388, 6286),
    (1000000, 0.3, 0.3, SM, 11136, 7454),
]


def _id(row):
    n, g, d, adv = row[:4]
    return f"n{n}-adv{g}-drop{d}-{adv}"


def _check_row(row):
    n, gamma, delta, adversary, k, t = row
    got = find_harary_params(n, delta, gamma, 40, 20, adversary)
    assert (got.k, got.t) == (k, t)
    assert got.meets_targets and not got.complete
    assert got.security_log2 < -40 and got.abort_log2 < -20


@pytest.mark.parametrize("row", FINDER_TABLE, ids=_id)
def test_the_finder_reproduces_federated_computes_table(row):
    _check_row(row)


@pytest.mark.slow
@pytest.mark.parametrize("row", SLOW_TABLE, ids=_id)
def test_the_finder_reproduces_the_large_degrees_of_the_table(row):
    _check_row(row)


@pytest.mark.parametrize("gamma", [0.05, 0.0])
def test_ten_clients_with_a_third_dropping_need_six_neighbours_not_four(gamma):
    """federated-compute's table has k = 4, t = 2 here (semi-honest): its finder takes t1 + 1 from
    the security bound and then raises it to 2 for Shamir without checking correctness again. With
    4 of 9 possible neighbours and 3 of 10 clients dropped, a client keeps fewer than 2 surviving
    neighbours with probability 7/210 * 10 > 2^-20, so k = 4 misses the target; k = 6 meets it."""
    fcp = evaluate_harary_params(10, 4, 2, 0.33, gamma)
    assert fcp.meets_security and not fcp.meets_correctness
    assert fcp.abort_log2 == pytest.approx(math.log2(10 * 7 / 210))
    got = find_harary_params(10, 0.33, gamma)
    assert (got.k, got.t) == (6, 2) and got.meets_targets


def test_the_complete_graph_when_no_sparse_graph_meets_the_targets():
    # federated-compute's finder refuses 0.3 + 2 * 0.33 > 0.9 outright; the complete graph meets it
    got = find_harary_params(20, 0.33, 0.3, adversary=SM)
    assert got.complete and (got.k, got.t) == (19, 13) and got.meets_targets
    assert not any(
        evaluate_harary_params(20, 18, t, 0.33, 0.3, adversary=SM).meets_targets for t in range(2, 19)
    )
    assert find_harary_params(30, 0.33, 0.33, adversary=SM).k == 28  # there it still finds a sparse one
    small = find_harary_params(3, 0.33, 0.05)
    assert small.complete and (small.k, small.t) == (2, 2)


@pytest.mark.parametrize(
    "args, match",
    [
        ((1, 0.1, 0.05), "at least 2 clients"),
        ((0, 0.1, 0.05), "at least 2 clients"),
        ((True, 0.1, 0.05), "at least 2 clients"),
        ((10.0, 0.1, 0.05), "at least 2 clients"),
        ((100, 1.0, 0.05), r"dropout rate must be in \[0, 1\)"),
        ((100, -0.1, 0.05), r"dropout rate must be in \[0, 1\)"),
        ((100, 0.1, 1.0), r"adversarial rate must be in \[0, 1\)"),
        ((100, 0.1, float("nan")), r"adversarial rate must be in \[0, 1\)"),
        ((100, 0.1, 0.05, 0), "security_bits must be a positive"),
        ((100, 0.1, 0.05, 40, -1), "correctness_bits must be a positive"),
        ((100, 0.1, 0.05, 40, 20, "malicious"), "adversary must be one of"),
    ],
)
def test_impossible_inputs_are_value_errors(args, match):
    with pytest.raises(ValueError, match=match):
        find_harary_params(*args)


@pytest.mark.parametrize(
    "n, delta, gamma, adversary", [(1000, 0.5, 0.5, SH), (2, 0.0, 0.0, SH), (100, 0.45, 0.1, SM)]
)
def test_unreachable_targets_say_so_and_name_the_complete_graph(n, delta, gamma, adversary):
    with pytest.raises(
        ValueError, match="no neighbour graph .* meets the targets.*not even the complete graph"
    ):
        find_harary_params(n, delta, gamma, adversary=adversary)


def test_an_explicit_k_and_t_are_checked_against_the_targets():
    # the old default (k = 20, t = 11) for 1,000 clients, a third dropping and 5% corrupt
    old = evaluate_harary_params(1000, 20, 11, 0.33, 0.05, adversary=SM)
    assert not old.meets_targets and not old.meets_correctness
    assert "target 2^-20" in old.shortfall() and "abort probability" in old.shortfall()
    # the finder's own answer, and anything with more neighbours at the same margins, meets them
    assert evaluate_harary_params(1000, 398, 223, 0.33, 0.05, adversary=SM).meets_targets
    assert evaluate_harary_params(1000, 72, 24, 0.33, 0.05).meets_targets
    # one less threshold lets the corrupt neighbours reconstruct; one less degree loses correctness
    low = evaluate_harary_params(1000, 72, 23, 0.33, 0.05)
    assert not low.meets_security and low.meets_correctness and "security failure" in low.shortfall()
    assert low.reconstruct_log2 > -41 > low.disconnect_log2
    assert not any(evaluate_harary_params(1000, 70, t, 0.33, 0.05).meets_targets for t in range(1, 71))
    # semi-malicious: t <= k/2 can never be secure (a lying server collects both secrets)
    assert not evaluate_harary_params(1000, 398, 199, 0.33, 0.05, adversary=SM).meets_security
    assert evaluate_harary_params(1000, 72, 24, 0.33, 0.05).summary() == {
        "dropout_rate": 0.33,
        "adversarial_fraction": 0.05,
        "security_bits": 40,
        "correctness_bits": 20,
        "adversary": SH,
        "security_bits_achieved": 42.04,
        "correctness_bits_achieved": 21.81,
        "meets_targets": True,
    }
    assert issubclass(SecAggTargetWarning, UserWarning)


def test_the_complete_graph_and_degrees_beyond_it():
    full = evaluate_harary_params(10, None, 5, 0.33, 0.05, adversary=SM)
    assert full.complete and full.k == 9 and full.disconnect_log2 == -math.inf and full.meets_targets
    assert evaluate_harary_params(10, 20, 5, 0.33, 0.05, adversary=SM) == full  # k >= n - 1: complete
    assert full.summary()["security_bits_achieved"] is None  # 0 corrupt of 10: impossible
    with pytest.raises(ValueError, match=r"threshold t must be an integer in \[1, 9\]"):
        evaluate_harary_params(10, None, 10, 0.33, 0.05)
    with pytest.raises(ValueError, match="degree k must be >= 1"):
        evaluate_harary_params(10, 0, 1, 0.33, 0.05)


@pytest.mark.parametrize(
    "total, marked, draws",
    [
        (1000, 50, 72),
        (1000, 670, 398),
        (10, 7, 4),
        (100, 0, 20),
        (100, 100, 20),
        (50, 30, 49),
        (10**6, 330000, 518),
    ],
)
def test_hypergeometric_tails_match_scipy(total, marked, draws):
    stats = pytest.importorskip("scipy.stats")
    h, ref = _Hypergeometric(total, marked, draws), stats.hypergeom(total, marked, draws)
    for x in range(-1, draws + 2):
        cdf, sf = ref.cdf(x), ref.sf(x - 1)  # P[X <= x], P[X >= x]
        for got, want in ((h.log_cdf(x), cdf), (h.log_sf(x), sf)):
            if want < 1e-300:
                assert got < math.log(1e-290)
            else:
                assert got == pytest.approx(math.log(want), abs=1e-9, rel=1e-9)


RATES = st.floats(0.0, 0.45).map(lambda r: round(r, 3))
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


def _k(n, delta, gamma, adversary):
    try:
        return find_harary_params(n, delta, gamma, adversary=adversary).k
    except ValueError:
        return math.inf


@PROPERTY
@given(st.integers(3, 400), RATES, RATES, RATES, st.sampled_from([SH, SM]))
def test_more_dropout_or_more_adversaries_never_lowers_k(n, a, b, gamma, adversary):
    lo, hi = sorted((a, b))
    assert _k(n, lo, gamma, adversary) <= _k(n, hi, gamma, adversary)  # more dropout
    assert _k(n, gamma, lo, adversary) <= _k(n, gamma, hi, adversary)  # more adversaries


@PROPERTY
@given(st.integers(3, 300), RATES, RATES, st.sampled_from([SH, SM]))
def test_the_finder_meets_its_targets_with_the_fewest_neighbours(n, delta, gamma, adversary):
    try:
        got = find_harary_params(n, delta, gamma, adversary=adversary)
    except ValueError:
        return
    assert isinstance(got, HararyParams) and got.meets_targets and 2 <= got.t <= got.k <= n - 1
    assert got.k % 2 == 0 or got.complete
    if adversary == SM:
        assert 2 * got.t > got.k  # passes the protocol's t > k/2 check as it is
    again = evaluate_harary_params(n, got.k, got.t, delta, gamma, adversary=adversary)
    assert again == got
    # no sparser even degree meets the targets with any threshold
    for k in range(2, got.k, 2):
        assert not any(
            evaluate_harary_params(n, k, t, delta, gamma, adversary=adversary).meets_targets
            for t in range(2, k + 1)
        ), k
