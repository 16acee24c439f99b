"""One-run privacy auditing: an empirical *lower* bound on epsilon from a single training run.

What it measures. A DP guarantee is an upper bound on how much any one record can change the
output. An audit goes the other way: it runs a membership attack against canaries and turns the
attack's success into a statistically valid *lower* bound on epsilon. If the lower bound exceeds the
epsilon the accountant claims, the implementation (or its analysis) is broken; if it is close, the
analysis is tight.

Method: Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
arXiv:2305.08846). Classic audits need hundreds of training runs (one membership bit per run); this
one needs only **one**: m canaries are each included in the training set independently with
probability 1/2 (S_i = +1 included, -1 excluded), the model is trained once, and the auditor scores
every canary. It guesses "included" for the k_plus highest scores and "excluded" for the k_minus
lowest, abstaining on the rest: r = k_plus + k_minus guesses, v of them correct.

The theorem (Thm. 3.1 of the paper, its main result for approximate DP). Let M be (eps, delta)-DP
with respect to adding/removing one canary, S uniform on {-1,+1}^m, and T in {-1,0,+1}^m the guesses,
computed from M's output only, with ||T||_1 <= r. Let W = sum_i max(0, T_i S_i) be the number of
correct guesses and f(w) = P[Binomial(r, q) >= w] with q = e^eps / (1 + e^eps). Then for every w

    P[W >= w]  <=  f(w) + 2 m delta * max_{i in 1..m} (f(w - i) - f(w)) / i.

With delta = 0 this says W is stochastically dominated by Binomial(r, q): an eps-DP algorithm is
no easier to guess than eps-randomized response. The right-hand side is the p-value of the
observation v under the null hypothesis "M is (eps, delta)-DP"; the audit reports the largest eps
that this p-value rejects at level beta = 1 - confidence (0.0 when even eps = 0 is not rejected).
For i > w the ratio is (1 - f(w)) / i <= (1 - f(w)) / w, so the max only needs i in 1..w; this is
also how the paper's reference code (its appendix) evaluates it.

Guarantee. The result is a **lower** bound: if the training algorithm really is (eps*, delta)-DP,
then P[reported bound > eps*] <= 1 - confidence, over the random inclusion of the canaries and the
training randomness. It is not an estimate of epsilon and is usually far below the true value.

Scores. Higher score must mean "more likely included"; a natural choice is minus the loss of the
canary's example under the released model (or, in the white-box / federated setting, the alignment
of a canary's gradient or update with the model change). The guesses must not look at which canaries
were included; only `audit_one_run` / `best_audit` see `included`, and only to count correct guesses.

Pure numpy/scipy: no ray, no torch, no global RNG.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import scipy.special
import scipy.stats

__all__ = ["audit_one_run", "best_audit", "epsilon_lower_bound", "guesses", "tpr_at_fpr"]

# Bisection stops when the bracket is this narrow (absolute, in epsilon units).
_EPS_TOL = 1e-12
_MAX_BISECTIONS = 200
# Default grid for best_audit: k_plus = k_minus = m//2, m//4, ... (at most this many points).
_DEFAULT_GRID_POINTS = 8


# --------------------------------------------------------------------------------------------
# input checks: one line, naming the argument
# --------------------------------------------------------------------------------------------


def _as_count(value: object, name: str) -> int:
    """A non-negative integer; bools and floats are rejected so that 3.7 guesses never sneak in."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative integer, got bool {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {count}")
    return count


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:  # also rejects NaN
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return c


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 <= d < 1.0:  # also rejects NaN
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return d


def _as_scores(scores: object, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} must not contain NaN (NaN has no rank)")
    return arr


def _as_included(included: object, m: int) -> np.ndarray:
    arr = np.asarray(included)
    if arr.shape != (m,):
        raise ValueError(
            f"included must be a 1-D array of length {m} (one entry per score), got shape {arr.shape}"
        )
    if arr.dtype != np.bool_:
        # 0/1 integer arrays are unambiguous; anything else (2, 0.5, strings) is a caller bug
        if not (np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all()):
            raise ValueError(f"included must be a boolean array (or 0/1 integers), got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


# --------------------------------------------------------------------------------------------
# guesses
# --------------------------------------------------------------------------------------------


def guesses(scores: Sequence[float] | np.ndarray, k_plus: int, k_minus: int) -> np.ndarray:
    """Per-canary guesses in {-1, 0, +1} (int8): +1 for the k_plus highest scores, -1 for the k_minus lowest.

    Ties are broken deterministically by a stable ascending sort: among equal scores the one with the
    smaller index counts as lower. The break must not depend on inclusion, and it does not.
    """
    arr = _as_scores(scores, "scores")
    k_plus = _as_count(k_plus, "k_plus")
    k_minus = _as_count(k_minus, "k_minus")
    m = arr.size
    if k_plus + k_minus > m:
        raise ValueError(
            f"k_plus + k_minus must be <= len(scores) = {m}, got k_plus={k_plus}, k_minus={k_minus}"
        )
    order = np.argsort(arr, kind="stable")
    out = np.zeros(m, dtype=np.int8)
    out[order[:k_minus]] = -1
    out[order[m - k_plus :]] = 1  # m - 0 slices nothing, so k_plus = 0 is handled
    return out


# --------------------------------------------------------------------------------------------
# the bound
# --------------------------------------------------------------------------------------------


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Thm. 3.1's bound on P[W >= v] when M is (eps, delta)-DP, clipped to 1."""
    if v == 0:
        return 1.0
    q = float(scipy.special.expit(eps))
    tail = float(scipy.stats.binom.sf(v - 1, r, q))  # f(v) = P[Bin(r, q) >= v]
    if delta == 0.0:
        return min(tail, 1.0)
    # f(v - i) - f(v) = P[v - i <= Bin < v]: a running sum of pmf terms going down from v - 1.
    # Summing positive terms (instead of subtracting two tails) keeps precision in the far tail.
    pmf = scipy.stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    windows = np.cumsum(pmf)
    worst = float(np.max(windows / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * worst, 1.0)


def _pure_dp_bound(r: int, v: int, beta: float) -> float:
    """Largest eps that delta = 0 rejects: q* solves P[Bin(r, q*) >= v] = beta, eps = logit(q*), floored at 0.

    P[Bin(r, q) >= v] is the regularized incomplete beta I_q(v, r - v + 1), increasing in q, so q* is
    its inverse at beta (the one-sided Clopper-Pearson lower limit). Every eps < logit(q*) is rejected.
    """
    if v == 0:
        return 0.0
    q_star = float(scipy.special.betaincinv(v, r - v + 1, beta))
    # 1 - q* from the mirrored equation, so that q* close to 1 still gives a finite, accurate logit
    one_minus = float(scipy.special.betaincinv(r - v + 1, v, 1.0 - beta))
    if q_star <= 0.5:
        return 0.0
    return max(0.0, math.log(q_star) - math.log(one_minus))


def epsilon_lower_bound(
    correct: int,
    guesses_made: int,
    delta: float = 0.0,
    canaries: int | None = None,
    confidence: float = 0.95,
) -> float:
    """Steinke-Nasr-Jagielski lower bound on epsilon from `correct` right out of `guesses_made` guesses.

    Returns the largest eps such that the p-value of Thm. 3.1 (see the module docstring),
    f(v) + 2 m delta max_i (f(v - i) - f(v)) / i with f from Binomial(r, e^eps / (1 + e^eps)),
    is below beta = 1 - confidence; 0.0 when eps = 0 is not rejected. With probability >= confidence
    the true epsilon (at this delta) is at least the returned value.

    delta = 0 is solved in closed form through the inverse incomplete beta function. delta > 0 needs
    `canaries` (m, the number of canaries, including those the auditor abstained on) and is found by
    bisection on [0, the delta = 0 bound]; the delta term only adds to the p-value, so the delta > 0
    bound never exceeds the delta = 0 one. The bisection returns its lower end, an eps the test
    actually rejects. That keeps the result valid even where the p-value is not monotone in eps: an
    (eps*, delta)-DP algorithm is (eps, delta)-DP for every eps >= eps*, so inf over eps >= eps* of the
    p-value still bounds P[W >= v], and reporting any rejected eps > eps* is an event of probability
    <= beta. For 2 m delta <= 1 the p-value is nondecreasing in eps (it is max_i of
    f(v) + 2 m delta (f(v - i) - f(v)) / i, each with derivative in q proportional to
    b(v-1) (1 - 2 m delta / i) + 2 m delta b(v-1-i) / i >= 0, b the Binomial(r - 1, q) pmf) and
    nonincreasing in v (one more correct guess lowers f by P[Bin = v] and raises the max by at most
    2 m delta P[Bin = v]); the result is then the exact threshold to within 1e-12, monotone in
    `correct` and in `confidence`.
    """
    m, r, v, d, beta = _bound_inputs(correct, guesses_made, delta, canaries, confidence)
    upper = _pure_dp_bound(r, v, beta)
    if d == 0.0 or upper == 0.0:
        return upper
    return _bisect_bound(m, r, v, d, beta, upper)


def _bound_inputs(
    correct: int, guesses_made: int, delta: float, canaries: int | None, confidence: float
) -> tuple[int, int, int, float, float]:
    """`epsilon_lower_bound`'s arguments checked: (m canaries, r guesses, v correct, delta, beta)."""
    r = _as_count(guesses_made, "guesses_made")
    v = _as_count(correct, "correct")
    if v > r:
        raise ValueError(f"correct must be <= guesses_made, got correct={v} > guesses_made={r}")
    d = _check_delta(delta)
    beta = 1.0 - _check_confidence(confidence)
    if canaries is None:
        if d > 0.0:
            raise ValueError("canaries (the number m of canaries) is required when delta > 0")
        m = r
    else:
        m = _as_count(canaries, "canaries")
        if m < r:
            raise ValueError(f"canaries must be >= guesses_made, got canaries={m} < guesses_made={r}")
    return m, r, v, d, beta


def _bisect_bound(m: int, r: int, v: int, d: float, beta: float, upper: float) -> float:
    """The delta > 0 bound: bisection on [0, upper] (the delta = 0 bound), returning its lower end."""
    if _p_value(m, r, v, 0.0, d) >= beta:
        return 0.0
    lo, hi = 0.0, upper  # invariant: p(lo) < beta; at hi the delta = 0 part alone already reaches beta
    for _ in range(_MAX_BISECTIONS):
        if hi - lo <= _EPS_TOL:
            break
        mid = 0.5 * (lo + hi)
        if _p_value(m, r, v, mid, d) < beta:
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------------------------
# audits from scores
# --------------------------------------------------------------------------------------------


def _count_correct(arr: np.ndarray, member: np.ndarray, k_plus: int, k_minus: int) -> int:
    t = guesses(arr, k_plus, k_minus).astype(np.int64)
    s = np.where(member, 1, -1)
    return int(np.sum(t * s == 1))  # W = sum_i max(0, T_i S_i)


def audit_one_run(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    k_plus: int,
    k_minus: int,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> dict:
    """Guess from `scores` (higher = more likely included), count the guesses `included` confirms, bound eps.

    k_plus and k_minus must be fixed before looking at the scores of this run; choosing them after
    seeing how well each choice does invalidates the confidence (use `best_audit` for that).
    Returns {"epsilon_lower", "guesses" (r), "correct" (v), "canaries" (m), "confidence", "delta"}.
    """
    arr = _as_scores(scores, "scores")
    member = _as_included(included, arr.size)
    d = _check_delta(delta)
    c = _check_confidence(confidence)
    v = _count_correct(arr, member, k_plus, k_minus)
    r = int(k_plus) + int(k_minus)
    eps = epsilon_lower_bound(v, r, delta=d, canaries=arr.size, confidence=c)
    return {
        "epsilon_lower": eps,
        "guesses": r,
        "correct": v,
        "canaries": int(arr.size),
        "confidence": c,
        "delta": d,
    }


def _default_grid(m: int) -> list[tuple[int, int]]:
    """k_plus = k_minus = m//2, m//4, ... down to 1, at most _DEFAULT_GRID_POINTS values.

    Halving covers "guess on everything" to "guess only on the most confident few" with few points,
    which keeps the Bonferroni price (a factor on beta) small.
    """
    ks: list[int] = []
    k = m // 2
    while k >= 1 and len(ks) < _DEFAULT_GRID_POINTS:
        ks.append(k)
        k //= 2
    return [(k, k) for k in ks]


def _as_grid(ks: object, m: int) -> list[tuple[int, int]]:
    if ks is None:
        return _default_grid(m)
    grid: list[tuple[int, int]] = []
    for item in ks:  # an int k means k_plus = k_minus = k; a pair means (k_plus, k_minus)
        if isinstance(item, (tuple, list)) and len(item) == 2:
            pair = (_as_count(item[0], "ks"), _as_count(item[1], "ks"))
        else:
            k = _as_count(item, "ks")
            pair = (k, k)
        if pair[0] + pair[1] > m:
            raise ValueError(f"ks entry {item!r} makes k_plus + k_minus > {m} canaries")
        if pair[0] + pair[1] == 0:
            raise ValueError(f"ks entry {item!r} makes no guess at all")
        grid.append(pair)
    return list(dict.fromkeys(grid))  # duplicates would only cost Bonferroni budget


def best_audit(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    delta: float = 0.0,
    confidence: float = 0.95,
    ks: Sequence[int] | Sequence[tuple[int, int]] | None = None,
) -> dict:
    """Audit at several numbers of guesses and report the best bound, kept valid by a union bound.

    Like the paper, this tries several (k_plus, k_minus): guessing on every canary wins when the signal
    is spread evenly, guessing on a few wins when only the most extreme scores leak. Taking the max of
    G bounds each valid at level beta would only be valid at level G * beta, so each grid point is
    evaluated at beta / G (Bonferroni): P[any of the G bounds exceeds the true eps] <= G * beta / G = beta,
    hence the reported maximum is a lower bound with probability >= `confidence`. The grid must be fixed
    independently of the scores (default: k_plus = k_minus = m//2, m//4, ..., 1, at most 8 points;
    `ks` may give ints k meaning k_plus = k_minus = k, or (k_plus, k_minus) pairs).

    Returns the `audit_one_run` dict of the best grid point (its "confidence" is the overall one) plus
    "k_plus", "k_minus", "grid_size" and "per_test_confidence" (1 - (1 - confidence) / grid_size).
    """
    arr = _as_scores(scores, "scores")
    member = _as_included(included, arr.size)
    d = _check_delta(delta)
    c = _check_confidence(confidence)
    grid = _as_grid(ks, arr.size)
    if not grid:
        raise ValueError(f"ks gives no (k_plus, k_minus) to try (m = {arr.size} canaries)")
    per_test = 1.0 - (1.0 - c) / len(grid)
    best: dict | None = None
    for k_plus, k_minus in grid:
        res = audit_one_run(arr, member, k_plus, k_minus, delta=d, confidence=per_test)
        if best is None or res["epsilon_lower"] > best["epsilon_lower"]:
            best = {**res, "k_plus": k_plus, "k_minus": k_minus}
    assert best is not None
    return {**best, "confidence": c, "grid_size": len(grid), "per_test_confidence": per_test}


# --------------------------------------------------------------------------------------------
# TPR at fixed FPR
# --------------------------------------------------------------------------------------------


def tpr_at_fpr(
    member_scores: Sequence[float] | np.ndarray,
    nonmember_scores: Sequence[float] | np.ndarray,
    fpr: float = 0.01,
) -> float:
    """Fraction of members scoring strictly above the (1 - fpr) quantile of the non-member scores.

    Higher score = "member". The quantile is taken with numpy's "higher" rule (an actual non-member
    score, never interpolated below it), so the empirical FPR at the threshold never exceeds `fpr`.
    """
    members = _as_scores(member_scores, "member_scores")
    nonmembers = _as_scores(nonmember_scores, "nonmember_scores")
    if members.size == 0:
        raise ValueError("member_scores must not be empty")
    if nonmembers.size == 0:
        raise ValueError("nonmember_scores must not be empty")
    f = float(fpr)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr!r}")
    threshold = np.quantile(nonmembers, 1.0 - f, method="higher")
    return float(np.mean(members > threshold))
