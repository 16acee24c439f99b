"""SecAgg+ graph parameters from security targets (pure: no ray, no RNG).

Bell, Bonawitz, Gascon, Lepoint, Raykova 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS'20), choose the degree k of the random Harary neighbour graph
(`graph.harary_graph`) and the Shamir threshold t from the cohort size n, a bound on the fraction
of clients that drop out after key set-up (delta), a bound on the fraction of clients the adversary
controls (gamma), a statistical security parameter sigma (failure 2^-sigma, 40 by default) and a
correctness parameter eta (failure 2^-eta, 20 by default). Google's implementation is the
parameter finder of federated-compute (fcp/secagg/server/graph_parameter_finder.cc); this module
follows its bounds and reproduces its unit-test table (tests/actors/secagg/test_params.py).

The graph places the n clients on a ring in random order, so the neighbours of a client are, for
the bounds, k clients drawn without replacement from n: the numbers of corrupt neighbours A and
surviving neighbours S are hypergeometric, A ~ H(n, floor(gamma n), k), S ~ H(n, ceil((1-delta) n), k).
The three bad events, each bounded by a union bound:

1. *disconnection* (security): the honest survivors' graph falls apart, so the server learns a sum
   over a part of the cohort. Cutting a Harary graph removes k/2 consecutive ring positions at two
   places: at most n (n - k - 1) / 2 such pairs, each all-bad (corrupt or dropped) with probability
   (B)_k / (n)_k for B = floor(gamma n) + floor(delta n) bad clients.
2. *reconstruction* (security): the adversary holds t shares of some honest client's secrets:
   n P[A >= t] (semi-honest server). Against a semi-malicious server, which may tell different
   clients different stories about who dropped, the honest shares it collects for the two secrets
   of one client overlap only in the corrupt neighbours, so 2t - k > A is needed: n P[A >= 2t - k].
   Each of events 1 and 2 must stay below 2^-(sigma+1), so together below 2^-sigma.
3. *abort* (correctness): some client keeps fewer than t surviving neighbours, n P[S <= t - 1],
   must stay below 2^-eta.

The finder scans even k = 2, 4, ... (k < n - 1) and takes the first k for which the smallest t
that passes event 2 (at least 2, as Shamir sharing needs) also passes events 1 and 3; if none
does, the complete graph (k = n - 1, the original SecAgg of Bonawitz et al. 2017) when it meets
the targets. Probabilities are computed in log space (math.lgamma, log-sum-exp): no scipy.

A round refuses to unmask when fewer than `survivor_floor(n, delta)` = ceil(n (1 - delta)) of its n
clients survive (as federated-compute's server does): the bounds above assume at most a delta
fraction dropped, and below the floor none of them holds. A Poisson cohort's size n varies, and
the bounds are not monotone in n (floor(gamma n) corrupt clients jumps by one at multiples of
1/gamma: (k, t) = (28, 6) has 40.3 security bits at n = 110 and 6.3 at n = 120), so
`find_harary_params_over` sizes (k, t) for every size `poisson_cohort_sizes` says the cohort can
take, not for its mean, and `weakest_harary_params` reports the size where they are weakest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "ADVERSARIES",
    "Adversary",
    "HararyParams",
    "SecAggTargetWarning",
    "evaluate_harary_params",
    "find_harary_params",
    "find_harary_params_over",
    "poisson_cohort_sizes",
    "survivor_floor",
    "weakest_harary_params",
]

Adversary = Literal["semi_honest", "semi_malicious"]
ADVERSARIES: tuple[str, ...] = ("semi_honest", "semi_malicious")

# as federated-compute's finder: a rate times n is rounded with this much slack, so that 0.3 * 10
# (2.9999999999999996 in floating point) counts 3 clients, not 2
_SLACK = 1e-14
_LN2 = math.log(2.0)


class SecAggTargetWarning(UserWarning):
    """An explicit degree or threshold that falls short of the security or correctness target."""


@dataclass(frozen=True)
class HararyParams:
    """A neighbour graph degree and threshold with the failure bounds they achieve (log2 of a
    probability bound; -inf when the event is impossible) and the targets they were held to."""

    n: int  # clients in the cohort
    k: int  # degree: each client's neighbours (n - 1: the complete graph)
    t: int  # Shamir threshold
    dropout: float  # delta: bound on the fraction of clients dropping after key set-up
    adversarial: float  # gamma: bound on the fraction of corrupt clients
    security_bits: float  # sigma: target security failure 2^-sigma
    correctness_bits: float  # eta: target correctness failure 2^-eta
    adversary: str  # "semi_honest" or "semi_malicious"
    disconnect_log2: float  # event 1: log2 P[honest survivors' graph disconnected]
    reconstruct_log2: float  # event 2: log2 P[the adversary holds enough shares of an honest client]
    abort_log2: float  # event 3: log2 P[some client has fewer than t surviving neighbours]

    @property
    def complete(self) -> bool:
        return self.k >= self.n - 1

    @property
    def security_log2(self) -> float:
        """log2 of the bound on the security failure (events 1 and 2 together)."""
        return _log2_add(self.disconnect_log2, self.reconstruct_log2)

    @property
    def meets_security(self) -> bool:
        # each of the two events gets half of the 2^-sigma budget, as in the finder
        return max(self.disconnect_log2, self.reconstruct_log2) < -(self.security_bits + 1)

    @property
    def meets_correctness(self) -> bool:
        return self.abort_log2 < -self.correctness_bits

    @property
    def meets_targets(self) -> bool:
        return self.meets_security and self.meets_correctness

    def shortfall(self) -> str:
        """What falls short of the targets, in words ('' when nothing does)."""
        out = []
        if not self.meets_security:
            out.append(f"security failure <= {_bound(self.security_log2)} (target 2^-{self.security_bits:g})")
        if not self.meets_correctness:
            out.append(
                f"abort probability <= {_bound(self.abort_log2)} (target 2^-{self.correctness_bits:g})"
            )
        return "; ".join(out)

    def summary(self) -> dict:
        """JSON-ready: the targets and what (k, t) achieves, in bits (-log2 of the bound; None when
        the event cannot happen)."""
        return {
            "dropout_rate": self.dropout,
            "adversarial_fraction": self.adversarial,
            "security_bits": self.security_bits,
            "correctness_bits": self.correctness_bits,
            "adversary": self.adversary,
            "security_bits_achieved": _bits(self.security_log2),
            "correctness_bits_achieved": _bits(self.abort_log2),
            "meets_targets": self.meets_targets,
        }


def _bits(log2p: float) -> float | None:
    return None if log2p == -math.inf else round(-log2p, 2) + 0.0  # + 0.0: no -0.0


def _bound(log2p: float) -> str:
    if log2p == -math.inf:
        return "0"
    return "1 (no guarantee)" if log2p >= 0 else f"2^{log2p:.1f}"


def _log2_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log2(1.0 + 2.0 ** (lo - hi))


def _check_inputs(n, dropout, adversarial, security_bits, correctness_bits, adversary) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"secure aggregation needs a cohort of at least 2 clients, got n={n!r}")
    for name, rate in (("dropout", dropout), ("adversarial", adversarial)):
        if not (isinstance(rate, (int, float)) and 0 <= rate < 1):
            raise ValueError(f"{name} rate must be in [0, 1), got {rate!r}")
    for name, bits in (("security_bits", security_bits), ("correctness_bits", correctness_bits)):
        if not (isinstance(bits, (int, float)) and 0 < bits < 1e4):
            raise ValueError(f"{name} must be a positive number of bits, got {bits!r}")
    if adversary not in ADVERSARIES:
        raise ValueError(f"adversary must be one of {ADVERSARIES}, got {adversary!r}")
    return int(n)


def _counts(n: int, dropout: float, adversarial: float) -> tuple[int, int]:
    """(corrupt clients, surviving clients) the bounds assume."""
    return math.floor((adversarial + _SLACK) * n), math.ceil((1 - dropout - _SLACK) * n)


def _lchoose(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


class _Hypergeometric:
    """X = marked items among `draws` drawn without replacement from `total`: log P[X <= x] and
    log P[X >= x] for every x of the support, from the log pmf (one lgamma base, then the pmf
    ratio's logs summed: O(draws))."""

    def __init__(self, total: int, marked: int, draws: int):
        self.lo, self.hi = max(0, draws + marked - total), min(draws, marked)
        x = np.arange(self.lo, self.hi, dtype=np.float64)
        steps = np.log((marked - x) * (draws - x)) - np.log((x + 1) * (total - marked - draws + x + 1))
        base = _lchoose(marked, self.lo) + _lchoose(total - marked, draws - self.lo) - _lchoose(total, draws)
        logpmf = base + np.concatenate(([0.0], np.cumsum(steps)))
        self._cdf = np.logaddexp.accumulate(logpmf)  # log P[X <= lo + i]
        self._sf = np.logaddexp.accumulate(logpmf[::-1])[::-1]  # log P[X >= lo + i]

    def log_cdf(self, x: int) -> float:
        """ln P[X <= x]."""
        if x < self.lo:
            return -math.inf
        return 0.0 if x >= self.hi else float(min(self._cdf[x - self.lo], 0.0))

    def log_sf(self, x: int) -> float:
        """ln P[X >= x]."""
        if x > self.hi:
            return -math.inf
        return 0.0 if x <= self.lo else float(min(self._sf[x - self.lo], 0.0))

    def smallest_with_sf_below(self, log_q: float) -> int:
        """The smallest x with ln P[X >= x] < log_q (hi + 1 at most)."""
        if self.hi < self.lo:
            return self.lo
        below = np.nonzero(self._sf < log_q)[0]
        return self.lo + int(below[0]) if len(below) else self.hi + 1


def _log_disconnect(n: int, k: int, bad: int) -> float:
    """ln of the union bound on a random Harary graph H(k, n) losing its connectivity when `bad`
    random clients are removed (event 1). 0 for the complete graph would be wrong: it cannot be cut."""
    if k >= n - 1 or k > bad:
        return -math.inf
    pairs = math.log(n) + math.log(n - k - 1) - _LN2
    # P[k given ring positions are all bad] = (bad)_k / (n)_k
    return (
        pairs + math.lgamma(bad + 1) - math.lgamma(bad - k + 1) + math.lgamma(n - k + 1) - math.lgamma(n + 1)
    )


class _Bounds:
    """The three events of one (n, delta, gamma) for any degree k."""

    def __init__(self, n, dropout, adversarial, security_bits, correctness_bits, adversary):
        self.n, self.adversary = n, adversary
        self.corrupt, self.surviving = _counts(n, dropout, adversarial)
        self.bad = self.corrupt + math.floor((dropout + _SLACK) * n)
        self.log_n = math.log(n)
        self.log_sec = -(security_bits + 1) * _LN2  # per event
        self.log_cor = -correctness_bits * _LN2

    def events(self, k: int, t: int) -> tuple[float, float, float]:
        """(event 1, event 2, event 3) as ln of their bounds."""
        a = _Hypergeometric(self.n, self.corrupt, k)
        s = _Hypergeometric(self.n, self.surviving, k)
        need = 2 * t - k if self.adversary == "semi_malicious" else t  # corrupt shares that break it
        reconstruct = self.log_n + a.log_sf(need) if need > 0 else self.log_n
        return (
            _log_disconnect(self.n, k, self.bad),
            min(reconstruct, 0.0),
            min(self.log_n + s.log_cdf(t - 1), 0.0),
        )

    def secure_threshold(self, k: int) -> int | None:
        """The smallest t >= 2 for which events 1 and 2 pass with degree k (possibly > k), or None
        when event 1 fails whatever t is."""
        if _log_disconnect(self.n, k, self.bad) >= self.log_sec:
            return None
        a = _Hypergeometric(self.n, self.corrupt, k)
        # the fewest corrupt shares m with n P[A >= m] below the budget: t must need at least m
        m = a.smallest_with_sf_below(self.log_sec - self.log_n)
        return max(m if self.adversary == "semi_honest" else math.ceil((m + k) / 2), 2)

    def completes(self, k: int, t: int) -> bool:
        """Event 3 passes: every client keeps t surviving neighbours except with probability 2^-eta."""
        s = _Hypergeometric(self.n, self.surviving, k)
        return self.log_n + s.log_cdf(t - 1) < self.log_cor

    def threshold(self, k: int) -> int | None:
        """The smallest t >= 2 for which events 1-3 pass with degree k, or None."""
        t = self.secure_threshold(k)
        if t is None or t > k:
            return None
        return t if self.completes(k, t) else None


def _result(
    b: _Bounds, k: int, t: int, dropout, adversarial, security_bits, correctness_bits
) -> HararyParams:
    d, r, f = (x / _LN2 for x in b.events(k, t))
    return HararyParams(
        b.n, k, t, float(dropout), float(adversarial), security_bits, correctness_bits, b.adversary, d, r, f
    )


def find_harary_params(
    n: int,
    dropout: float,
    adversarial: float,
    security_bits: float = 40,
    correctness_bits: float = 20,
    adversary: Adversary = "semi_honest",
) -> HararyParams:
    """The smallest even degree k (and its smallest threshold t) of the SecAgg+ neighbour graph
    for `n` clients such that with at most a `dropout` fraction dropping out and an `adversarial`
    fraction corrupt the protocol is secure except with probability 2^-security_bits and completes
    except with probability 2^-correctness_bits (Bell et al. 2020; see the module docstring).
    k = n - 1 (the complete graph) when no sparser graph does.

    `adversary`: "semi_honest" (the server follows the protocol) or "semi_malicious" (it may lie
    about who dropped out; then 2t - k exceeds the corrupt neighbours, so t > k / 2).

    Raises ValueError for n < 2, a rate outside [0, 1), or when no (k, t) meets the targets, not
    even the complete graph."""
    n = _check_inputs(n, dropout, adversarial, security_bits, correctness_bits, adversary)
    b = _Bounds(n, dropout, adversarial, security_bits, correctness_bits, adversary)
    for k in range(2, n - 1, 2):
        t = b.threshold(k)
        if t is not None:
            return _result(b, k, t, dropout, adversarial, security_bits, correctness_bits)
    t = b.threshold(n - 1)
    if t is not None:
        return _result(b, n - 1, t, dropout, adversarial, security_bits, correctness_bits)
    raise ValueError(
        f"no neighbour graph for {n} clients meets the targets (security 2^-{security_bits:g}, correctness "
        f"2^-{correctness_bits:g}) with {dropout:g} dropout and {adversarial:g} adversarial clients against a "
        f"{adversary.replace('_', '-')} server, not even the complete graph: lower the rates or the bits, or "
        f"use a larger cohort (or the complete graph with an explicit threshold, accepting its bounds)"
    )


def evaluate_harary_params(
    n: int,
    k: int | None,
    t: int,
    dropout: float,
    adversarial: float,
    security_bits: float = 40,
    correctness_bits: float = 20,
    adversary: Adversary = "semi_honest",
) -> HararyParams:
    """The failure bounds an explicit degree `k` (None or >= n - 1: the complete graph) and
    threshold `t` achieve for `n` clients under the same model as `find_harary_params`; check
    `.meets_targets` (and `.shortfall()` to say what falls short)."""
    n = _check_inputs(n, dropout, adversarial, security_bits, correctness_bits, adversary)
    degree = n - 1 if k is None else int(k)
    if degree < 1:
        raise ValueError(f"degree k must be >= 1, got {k!r}")
    degree = min(degree, n - 1)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 1 <= t <= degree:
        raise ValueError(f"threshold t must be an integer in [1, {degree}] (the degree), got {t!r}")
    b = _Bounds(n, dropout, adversarial, security_bits, correctness_bits, adversary)
    return _result(b, degree, int(t), dropout, adversarial, security_bits, correctness_bits)


def survivor_floor(n: int, dropout: float) -> int:
    """The fewest of a round's `n` clients that must survive to unmasking: ceil(n (1 - dropout)),
    the surviving count the bounds assume. Below it the graph was not sized for the round, so the
    server refuses to unmask (as federated-compute's does)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"cohort size must be a non-negative integer, got {n!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"dropout rate must be in [0, 1), got {dropout!r}")
    return _counts(int(n), dropout, 0.0)[1]


def poisson_cohort_sizes(population: int, rate: float, tail_bits: float = 20) -> tuple[int, int]:
    """(lo, hi): the sizes a Poisson cohort (each of `population` users in with probability `rate`,
    so X ~ Binomial(population, rate)) stays within except with probability 2^-tail_bits on each
    side: P[X < lo] and P[X > hi] are both below 2^-tail_bits."""
    if isinstance(population, bool) or not isinstance(population, (int, np.integer)) or population < 1:
        raise ValueError(f"population must be a positive integer, got {population!r}")
    if not (isinstance(rate, (int, float)) and 0 < rate <= 1):
        raise ValueError(f"sampling rate must be in (0, 1], got {rate!r}")
    population = int(population)
    if rate == 1:
        return population, population
    mean, sd = population * rate, math.sqrt(population * rate * (1 - rate))
    # the pmf over mean +- (12 sd + 40): Bernstein's inequality leaves less than 2^-80 outside
    half = math.ceil(12 * sd + 40)
    x = np.arange(max(0, math.floor(mean) - half), min(population, math.ceil(mean) + half) + 1)
    lchoose = np.array([_lchoose(population, int(v)) for v in x])
    logpmf = lchoose + x * math.log(rate) + (population - x) * math.log1p(-rate)
    log_q = -tail_bits * _LN2
    below = np.logaddexp.accumulate(logpmf)  # ln P[X <= x[i]]
    above = np.logaddexp.accumulate(logpmf[::-1])[::-1]  # ln P[X >= x[i]]
    lo = x[int(np.count_nonzero(below < log_q))]  # the largest x with P[X <= x - 1] < q
    tail = np.nonzero(above < log_q)[0]
    hi = x[(int(tail[0]) if len(tail) else len(x)) - 1]  # the smallest x with P[X >= x + 1] < q
    return int(lo), int(hi)


def _check_sizes(low: int, expected: int, high: int) -> None:
    if not 2 <= low <= expected <= high:
        raise ValueError(
            f"cohort sizes must satisfy 2 <= low <= expected <= high, got {low}, {expected}, {high}"
        )


def _threshold_over(bounds: dict[int, _Bounds], k: int, expected: int) -> int | None:
    """The smallest t >= 2 that passes events 1 and 2 at every size in `bounds` (where t > the
    degree the protocol refuses to run: nothing released, secure) and event 3 at every size from
    `expected` up; or None."""
    t = 2
    for n, b in bounds.items():
        need = b.secure_threshold(min(k, n - 1))
        if need is None:  # the graph can be cut at this size whatever t is
            return None
        t = max(t, need)
    for n, b in bounds.items():
        degree = min(k, n - 1)
        if n >= expected and (t > degree or not b.completes(degree, t)):
            return None
    return t


def find_harary_params_over(
    low: int,
    expected: int,
    high: int,
    dropout: float,
    adversarial: float,
    security_bits: float = 40,
    correctness_bits: float = 20,
    adversary: Adversary = "semi_honest",
) -> HararyParams:
    """`find_harary_params` for a cohort whose size varies (a Poisson cohort: `poisson_cohort_sizes`
    gives [low, high]) around `expected`: the smallest even k and its smallest t that meet the
    security target at every size in [low, high] the protocol runs with (t <= min(k, n - 1); it
    refuses smaller rounds, which then release nothing) and the correctness target at every size
    from `expected` to `high` (a cohort far below its expectation may abort: a lost round, not a
    leak). k = high - 1, the complete graph at every size, when no sparser graph does. Returned
    with its bounds at n = high; `weakest_harary_params` names the size where they are weakest.
    One size (low == high) is `find_harary_params`."""
    if low == high:
        return find_harary_params(high, dropout, adversarial, security_bits, correctness_bits, adversary)
    _check_sizes(low, expected, high)
    high = _check_inputs(high, dropout, adversarial, security_bits, correctness_bits, adversary)
    # the largest sizes first: the bounds grow with n (up to floor rounding), so most k fail there at once
    bounds = {
        n: _Bounds(n, dropout, adversarial, security_bits, correctness_bits, adversary)
        for n in range(high, low - 1, -1)
    }
    for k in (*range(2, high - 1, 2), high - 1):
        t = _threshold_over(bounds, k, expected)
        if t is not None:
            return _result(bounds[high], k, t, dropout, adversarial, security_bits, correctness_bits)
    raise ValueError(
        f"no neighbour graph for cohorts of {low} to {high} clients (expected {expected}) meets the targets "
        f"(security 2^-{security_bits:g}, correctness 2^-{correctness_bits:g}) with {dropout:g} dropout and "
        f"{adversarial:g} adversarial clients against a {adversary.replace('_', '-')} server, not even the complete "
        f"graph: lower the rates or the bits, or use a larger cohort"
    )


def _margin(p: HararyParams, correctness: bool) -> float:
    """Bits to spare on the tighter of the two targets (< 0: missed)."""
    security = -max(p.disconnect_log2, p.reconstruct_log2) - (p.security_bits + 1)
    return min(security, -p.abort_log2 - p.correctness_bits) if correctness else security


def weakest_harary_params(
    k: int | None,
    t: int,
    low: int,
    expected: int,
    high: int,
    dropout: float,
    adversarial: float,
    security_bits: float = 40,
    correctness_bits: float = 20,
    adversary: Adversary = "semi_honest",
) -> HararyParams:
    """The bounds of degree `k` (None: the complete graph) and threshold `t` at the cohort size in
    [low, high] where they are weakest against the targets: security at every size the protocol
    runs with (t <= min(k, n - 1)), correctness from `expected` up (as `find_harary_params_over`)."""
    _check_sizes(low, expected, high)
    worst, worst_margin = None, math.inf
    for n in range(high, low - 1, -1):
        degree = n - 1 if k is None else min(int(k), n - 1)
        if t > degree and n < expected:  # refused at this size: nothing released
            continue
        p = evaluate_harary_params(n, k, t, dropout, adversarial, security_bits, correctness_bits, adversary)
        margin = _margin(p, n >= expected)
        if worst is None or margin < worst_margin:
            worst, worst_margin = p, margin
    return worst
