"""One-run privacy audit (Steinke, Nasr & Jagielski 2023): validity, power, exact values, input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmeta.actors.audit import audit_one_run, best_audit, epsilon_lower_bound, guesses, tpr_at_fpr

SEEDS = range(20)
M = 1000
# At 95% confidence a valid bound exceeds the true epsilon in <= 5% of runs: 1 of 20 expected, allow 2.
MAX_FAILURES = 2
ATOL = 1e-9  # bisection (delta > 0) is exact only to ~1e-12


def randomized_response_run(eps0: float, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An eps0-DP "training run": each canary's score reveals its inclusion bit with prob e^eps0/(1+e^eps0)."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    s = np.where(included, 1.0, -1.0)
    truthful = rng.random(m) < math.exp(eps0) / (1.0 + math.exp(eps0))
    y = np.where(truthful, s, -s)
    # independent jitter only breaks ties; post-processing keeps the mechanism eps0-DP per canary
    return y + 0.1 * rng.standard_normal(m), included


def leak_free_run(m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(m), rng.random(m) < 0.5


# ---------------------------------------------------------------------------------------------
# validity and power on simulated mechanisms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps0", [0.5, 2.0])
def test_randomized_response_bound_rarely_exceeds_true_epsilon(eps0: float) -> None:
    single, best, best_delta = [], [], []
    for seed in SEEDS:
        scores, included = randomized_response_run(eps0, M, seed)
        single.append(audit_one_run(scores, included, M // 2, M // 2)["epsilon_lower"])
        best.append(best_audit(scores, included)["epsilon_lower"])
        best_delta.append(best_audit(scores, included, delta=1e-5)["epsilon_lower"])
    for bounds in (single, best, best_delta):
        assert sum(b > eps0 for b in bounds) <= MAX_FAILURES, bounds
    # the delta term can only weaken the bound
    assert all(bd <= b + ATOL for bd, b in zip(best_delta, best))


def test_randomized_response_bound_has_power_at_eps_2() -> None:
    # guessing all 1000 canaries right w.p. ~0.88 gives eps ~ logit(0.86) ~ 1.8 at 95%
    for seed in SEEDS:
        scores, included = randomized_response_run(2.0, M, seed)
        assert audit_one_run(scores, included, M // 2, M // 2)["epsilon_lower"] > 1.0
        assert best_audit(scores, included)["epsilon_lower"] > 1.0
        assert best_audit(scores, included, delta=1e-5)["epsilon_lower"] > 1.0


def test_no_leakage_gives_zero_in_most_seeds() -> None:
    single, best = [], []
    for seed in SEEDS:
        scores, included = leak_free_run(M, seed)
        single.append(audit_one_run(scores, included, M // 2, M // 2)["epsilon_lower"])
        best.append(best_audit(scores, included)["epsilon_lower"])
    for bounds in (single, best):
        assert sum(b > 0.0 for b in bounds) <= MAX_FAILURES, bounds


# ---------------------------------------------------------------------------------------------
# monotonicity (hypothesis); 2 m delta <= 1 is where the p-value is provably monotone
# ---------------------------------------------------------------------------------------------


@st.composite
def audit_setting(draw: st.DrawFn) -> tuple[int, int, float]:
    r = draw(st.integers(1, 300))
    m = draw(st.integers(r, r + 500))
    delta = draw(st.one_of(st.just(0.0), st.floats(1e-9, 1.0 / (2 * m))))
    return r, m, delta


@settings(max_examples=60, deadline=None)
@given(audit_setting(), st.data(), st.floats(0.5, 0.999))
def test_more_correct_guesses_never_lower_the_bound(
    setting: tuple[int, int, float], data: st.DataObject, confidence: float
) -> None:
    r, m, delta = setting
    v1 = data.draw(st.integers(0, r))
    v2 = data.draw(st.integers(v1, r))
    b1 = epsilon_lower_bound(v1, r, delta=delta, canaries=m, confidence=confidence)
    b2 = epsilon_lower_bound(v2, r, delta=delta, canaries=m, confidence=confidence)
    assert b2 >= b1 - ATOL


@settings(max_examples=60, deadline=None)
@given(audit_setting(), st.data(), st.floats(0.5, 0.999), st.floats(0.5, 0.999))
def test_higher_confidence_never_raises_the_bound(
    setting: tuple[int, int, float], data: st.DataObject, c1: float, c2: float
) -> None:
    r, m, delta = setting
    v = data.draw(st.integers(0, r))
    low, high = sorted((c1, c2))
    b_low = epsilon_lower_bound(v, r, delta=delta, canaries=m, confidence=low)
    b_high = epsilon_lower_bound(v, r, delta=delta, canaries=m, confidence=high)
    assert b_high <= b_low + ATOL


@settings(max_examples=40, deadline=None)
@given(audit_setting(), st.data())
def test_delta_only_weakens_the_bound(setting: tuple[int, int, float], data: st.DataObject) -> None:
    r, m, delta = setting
    v = data.draw(st.integers(0, r))
    assert epsilon_lower_bound(v, r, delta=delta, canaries=m) <= epsilon_lower_bound(v, r) + ATOL


# ---------------------------------------------------------------------------------------------
# values against independent derivations
# ---------------------------------------------------------------------------------------------


def binomial_tail(r: int, q: float, v: int) -> float:
    """P[Bin(r, q) >= v] from the definition, without scipy.stats."""
    return math.fsum(math.comb(r, k) * q**k * (1.0 - q) ** (r - k) for k in range(max(v, 0), r + 1))


def theorem_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Thm. 3.1's right-hand side literally: max over i in 1..m (not just 1..v)."""
    q = math.exp(eps) / (1.0 + math.exp(eps))
    f_v = binomial_tail(r, q, v)
    worst = max((binomial_tail(r, q, v - i) - f_v) / i for i in range(1, m + 1))
    return min(1.0, f_v + 2 * m * delta * worst)


@pytest.mark.parametrize("r", [5, 10, 50, 300])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_all_correct_matches_closed_form(r: int, confidence: float) -> None:
    # P[Bin(r, p) >= r] = p^r = beta  =>  p = beta^(1/r), eps = log(p / (1 - p)), floored at 0
    p = (1.0 - confidence) ** (1.0 / r)
    expected = max(0.0, math.log(p / (1.0 - p)))
    assert epsilon_lower_bound(r, r, confidence=confidence) == pytest.approx(expected, abs=1e-6)


def test_all_correct_known_numbers() -> None:
    assert epsilon_lower_bound(5, 5) == pytest.approx(math.log(0.05**0.2 / (1 - 0.05**0.2)), abs=1e-6)
    assert epsilon_lower_bound(1, 1) == 0.0  # one right guess is a coin flip's 50%: not evidence at 95%
    assert epsilon_lower_bound(0, 0) == 0.0


@pytest.mark.parametrize(("v", "r"), [(70, 100), (600, 1000), (18, 20), (40, 60)])
def test_pure_dp_matches_root_of_binomial_tail(v: int, r: int) -> None:
    beta = 0.05
    if binomial_tail(r, 0.5, v) >= beta:
        expected = 0.0
    else:
        q = scipy.optimize.brentq(lambda x: binomial_tail(r, x, v) - beta, 0.5, 1.0 - 1e-15, xtol=1e-15)
        expected = math.log(q / (1.0 - q))
    assert epsilon_lower_bound(v, r) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta"),
    [(200, 100, 80, 1e-3), (100, 60, 55, 1e-4), (150, 150, 120, 1e-3), (60, 30, 30, 1e-3)],
)
def test_approximate_dp_is_the_threshold_of_the_theorem(m: int, r: int, v: int, delta: float) -> None:
    beta = 0.05
    eps = epsilon_lower_bound(v, r, delta=delta, canaries=m)
    assert eps > 0.0
    assert theorem_p_value(m, r, v, eps, delta) < beta  # the reported eps is rejected ...
    assert theorem_p_value(m, r, v, eps + 1e-6, delta) >= beta  # ... and it is the largest one
    assert eps < epsilon_lower_bound(v, r)  # and the delta term made it strictly weaker


def test_delta_large_enough_rejects_nothing() -> None:
    # 2 m delta = 1 puts the p-value of 10 out of 10 at >= f + (1 - f)/10 > 5% for every eps
    assert epsilon_lower_bound(10, 10, delta=0.05, canaries=10) == 0.0


# ---------------------------------------------------------------------------------------------
# guesses, audits and the grid
# ---------------------------------------------------------------------------------------------


def test_guesses_marks_extremes_and_breaks_ties_stably() -> None:
    g = guesses([0.3, 5.0, -1.0, 2.0, 0.0], k_plus=2, k_minus=1)
    assert g.dtype == np.int8
    assert g.tolist() == [0, 1, -1, 1, 0]
    # all equal: the stable ascending order is the index order, so low indices are "low"
    assert guesses(np.zeros(4), 1, 2).tolist() == [-1, -1, 0, 1]
    assert guesses([1.0, 2.0], 0, 0).tolist() == [0, 0]
    assert guesses([1.0, 2.0], 1, 1).tolist() == [-1, 1]


def test_audit_counts_correct_guesses() -> None:
    scores = np.array([3.0, 2.0, 1.0, -1.0, -2.0, -3.0, 0.5, 0.4])
    included = np.array([True, True, False, False, False, True, True, False])
    res = audit_one_run(scores, included, k_plus=3, k_minus=3)
    # +1 on scores 3, 2, 1 (2 right); -1 on -3, -2, -1 (2 right)
    assert res["guesses"] == 6 and res["correct"] == 4 and res["canaries"] == 8
    assert res["epsilon_lower"] == epsilon_lower_bound(4, 6)
    assert set(res) == {"epsilon_lower", "guesses", "correct", "canaries", "confidence", "delta"}
    assert audit_one_run(scores, included.astype(int), 3, 3) == res  # 0/1 integers are accepted


def test_perfect_attack_on_all_canaries() -> None:
    rng = np.random.default_rng(7)
    included = rng.random(400) < 0.5
    scores = np.where(included, 1.0, 0.0) + 0.01 * rng.random(400)
    k_plus, k_minus = int(included.sum()), int((~included).sum())
    res = audit_one_run(scores, included, k_plus, k_minus)
    assert res["correct"] == res["guesses"] == 400
    assert res["epsilon_lower"] == pytest.approx(epsilon_lower_bound(400, 400))


def test_best_audit_is_bonferroni_max_over_grid() -> None:
    scores, included = randomized_response_run(1.0, 256, seed=3)
    res = best_audit(scores, included, confidence=0.9, ks=[8, (64, 0), 128])
    assert res["grid_size"] == 3
    assert res["per_test_confidence"] == pytest.approx(1 - 0.1 / 3)
    singles = [
        audit_one_run(scores, included, kp, km, confidence=1 - 0.1 / 3)["epsilon_lower"]
        for kp, km in [(8, 8), (64, 0), (128, 128)]
    ]
    assert res["epsilon_lower"] == max(singles)
    assert res["confidence"] == 0.9


def test_best_audit_default_grid_and_single_point() -> None:
    scores, included = randomized_response_run(1.0, 1000, seed=4)
    res = best_audit(scores, included)
    assert res["grid_size"] == 8  # 500, 250, 125, 62, 31, 15, 7, 3
    assert res["k_plus"] == res["k_minus"] and res["k_plus"] in {500, 250, 125, 62, 31, 15, 7, 3}
    one = best_audit(scores, included, ks=[500])
    assert one["epsilon_lower"] == audit_one_run(scores, included, 500, 500)["epsilon_lower"]
    assert best_audit(scores[:3], included[:3])["grid_size"] == 1  # m = 3: only k = 1


# ---------------------------------------------------------------------------------------------
# TPR at fixed FPR
# ---------------------------------------------------------------------------------------------


def test_tpr_at_fpr_on_constructed_scores() -> None:
    nonmembers = np.arange(100.0)  # 0 .. 99
    members = np.array([100.0, 50.0, 99.5, 99.0])
    # 1% FPR: threshold is the top non-member (99); strictly above it: 100 and 99.5
    assert tpr_at_fpr(members, nonmembers, fpr=0.01) == 0.5
    # 10% FPR: threshold 90 (9 non-members above it, <= 10%); 50 is still below
    assert tpr_at_fpr(members, nonmembers, fpr=0.1) == 0.75
    assert tpr_at_fpr(members, nonmembers, fpr=0.0) == 0.5
    assert tpr_at_fpr(members, nonmembers, fpr=1.0) == 1.0
    assert tpr_at_fpr(np.arange(10.0) - 100, nonmembers) == 0.0


def test_tpr_at_fpr_empirical_fpr_never_exceeds_target() -> None:
    rng = np.random.default_rng(11)
    nonmembers = rng.standard_normal(137)
    for fpr in (0.0, 0.01, 0.05, 0.1, 0.33, 0.5):
        # the non-members themselves are "members" scored against their own threshold: that is the FPR
        assert tpr_at_fpr(nonmembers, nonmembers, fpr=fpr) <= fpr


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"correct": 5, "guesses_made": 4}, "correct"),
        ({"correct": -1, "guesses_made": 4}, "correct"),
        ({"correct": 1, "guesses_made": -4}, "guesses_made"),
        ({"correct": 1.5, "guesses_made": 4}, "correct"),
        ({"correct": True, "guesses_made": 4}, "correct"),
        ({"correct": 1, "guesses_made": 4, "confidence": 0.0}, "confidence"),
        ({"correct": 1, "guesses_made": 4, "confidence": 1.0}, "confidence"),
        ({"correct": 1, "guesses_made": 4, "confidence": float("nan")}, "confidence"),
        ({"correct": 1, "guesses_made": 4, "delta": -0.1}, "delta"),
        ({"correct": 1, "guesses_made": 4, "delta": 1.0, "canaries": 10}, "delta"),
        ({"correct": 1, "guesses_made": 4, "delta": 1e-5}, "canaries"),
        ({"correct": 1, "guesses_made": 4, "canaries": 3}, "canaries"),
    ],
)
def test_epsilon_lower_bound_rejects_bad_inputs(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        epsilon_lower_bound(**kwargs)


def test_guesses_and_audits_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="k_plus"):
        guesses([1.0, 2.0], 2, 1)
    with pytest.raises(ValueError, match="k_minus"):
        guesses([1.0, 2.0], 0, -1)
    with pytest.raises(ValueError, match="scores"):
        guesses([1.0, float("nan")], 1, 0)
    with pytest.raises(ValueError, match="included"):
        audit_one_run([1.0, 2.0, 3.0], [True, False], 1, 1)
    with pytest.raises(ValueError, match="included"):
        audit_one_run([1.0, 2.0], [2, 0], 1, 1)
    with pytest.raises(ValueError, match="delta"):
        audit_one_run([1.0, 2.0], [True, False], 1, 1, delta=2.0)
    with pytest.raises(ValueError, match="ks"):
        best_audit([1.0, 2.0], [True, False], ks=[2])
    with pytest.raises(ValueError, match="confidence"):
        best_audit([1.0, 2.0], [True, False], confidence=1.5)


def test_tpr_at_fpr_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr([1.0], [0.0], fpr=1.5)
    with pytest.raises(ValueError, match="member_scores"):
        tpr_at_fpr([], [0.0])
    with pytest.raises(ValueError, match="nonmember_scores"):
        tpr_at_fpr([1.0], [])


def test_integer_like_counts_are_accepted() -> None:
    # numpy integers come out of np.sum; they must work like ints
    assert epsilon_lower_bound(np.int64(9), np.int32(10)) == epsilon_lower_bound(9, 10)
