"""The SecAgg+ parameter policy: from the config's targets (secagg.* and the federation's dropout)
to the neighbour graph (k, t) and modulus of a round, and what they achieve per round.

The bounds themselves are actors/secagg/params.py (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", checked against federated-compute's finder); this
module decides which targets and cohort sizes they are asked for, so that the plan (sim/engine/plan.py)
only calls `plan_secagg`, and the report and the rounds ask the same module what a round achieved."""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

from fedmeta.actors.privacy import Sampling, UserLevelDP
from fedmeta.actors.secagg.params import (
    HararyParams,
    SecAggTargetWarning,
    evaluate_harary_params,
    find_harary_params_over,
    poisson_cohort_sizes,
    survivor_floor,
    weakest_harary_params,
)
from fedmeta.actors.secagg.session import SecAggParams, secagg_params
from fedmeta.sim.config import ExperimentConfig


def plan_secagg(cfg: ExperimentConfig, dp: UserLevelDP) -> SecAggParams | None:
    """The secure aggregation of each round's cohort (None: plain sums): k and t sized for every
    cohort size the sampling gives, the modulus for the noisy sum of the largest one."""
    sa = cfg.secagg
    if not sa.enabled:
        return None
    s = dp.sampling
    delta = secagg_targets(cfg)["dropout"]
    _check_planned_dropout(cfg, delta)
    # a Poisson cohort varies: size the modulus 10 standard deviations above its mean
    most = (
        s.cohort
        if s.kind == "fixed"
        else min(s.population, s.cohort + 10 * math.ceil(math.sqrt(s.cohort)) + 10)
    )
    # and the graph for every size it takes, not its mean: the bounds are not monotone in n
    # (actors/secagg/params.py), and a cohort above `sizes` is refused (SecureSum)
    sizes = cohort_sizes(s)
    k, t, low = _secagg_graph(cfg, s.cohort, sizes)
    params = secagg_params(
        k, t, dp.clip_norm, sa.quant_bits, s.cohort, dp.share_noise_multiplier, most, low, delta, sizes
    )
    _warn_below_targets(cfg, params, "each round's cohort")
    return params


COHORT_TAIL_BITS = (
    20  # a Poisson cohort outside the sizes the graph is sized for: < 2^-20 per side, per round
)


def panel_secagg(cfg: ExperimentConfig, n: int) -> SecAggParams:
    """Secure aggregation of a panel's `n` values in [0, 1] (a clip of 1; the tuning metric): the
    panel is the cohort the graph and modulus are sized for."""
    k, t, low = _secagg_graph(cfg, n)
    params = secagg_params(
        k,
        t,
        1.0,
        cfg.secagg.quant_bits,
        n,
        allow_low_threshold=low,
        dropout=secagg_targets(cfg)["dropout"],
        cohort_range=(n, n),
    )
    _warn_below_targets(cfg, params, "the secure tuning metric's panel")
    return params


def cohort_sizes(s: Sampling) -> tuple[int, int]:
    """(lo, hi): the cohort sizes a round's k and t must hold for. A fixed cohort has its size; a
    Poisson one the 2^-COHORT_TAIL_BITS quantiles of Binomial(population, rate), and at least 2
    (a smaller round cannot run the protocol)."""
    if s.kind == "fixed" or s.cohort < 2:
        return s.cohort, s.cohort
    lo, hi = poisson_cohort_sizes(s.population, s.rate, COHORT_TAIL_BITS)
    return min(max(lo, 2), s.cohort), max(hi, s.cohort)


def _planned_dropout(cfg: ExperimentConfig) -> float:
    """The share of a sampled cohort that drops after key set-up by design, on average:
    federation.dropout, and the over-selected clients beyond clients_per_round."""
    fed = cfg.federation
    sampled = max(fed.clients_per_round, math.ceil(fed.over_selection * fed.clients_per_round - 1e-9))
    return 1 - (1 - fed.dropout) * fed.clients_per_round / sampled


def _dropout_bound(cfg: ExperimentConfig) -> float:
    """The share of a sampled cohort that drops after key set-up by design, at worst: each of the
    m sampled clients drops independently with probability federation.dropout, and of the
    survivors at most clients_per_round report (over-selection). The survivors' 2^-correctness_bits
    lower quantile of Binomial(m, 1 - dropout) bounds them in all but that share of rounds, which is
    what a survivor floor sized on it must hold for (the mean would refuse about half the rounds)."""
    from scipy.stats import binom

    fed = cfg.federation
    sampled = max(fed.clients_per_round, math.ceil(fed.over_selection * fed.clients_per_round - 1e-9))
    survivors = (
        sampled
        if fed.dropout <= 0
        else int(binom.ppf(2.0**-cfg.secagg.correctness_bits, sampled, 1 - fed.dropout))
    )
    return 1 - min(survivors, fed.clients_per_round) / sampled


def _check_planned_dropout(cfg: ExperimentConfig, delta: float) -> None:
    """A dropout bound below the planned dropout would have most rounds refused at the survivor floor."""
    planned = _planned_dropout(cfg)
    if planned > delta + 1e-9:
        raise ValueError(
            f"secagg.dropout_rate: {delta:g}, but {planned:.3g} of each cohort drops by design "
            f"(federation.dropout, over_selection): most rounds would keep fewer than the "
            f"ceil(n(1 - {delta:g})) survivors the neighbour graph is sized for, and secure "
            f"aggregation refuses to unmask them; set secagg.dropout_rate to at least {planned:.3g}, "
            f"or null"
        )


# Which server `secagg.neighbors: auto` is sized against (secagg.adversary). Bell et al. 2020 (and
# federated-compute's finder) have two: a semi-honest server, which needs only t > (corrupt
# neighbours) -- often t < k/2, e.g. k = 72, t = 24 for 1,000 clients with 5% corrupt and 33% dropout
# -- and a semi-malicious one, which may tell different clients different stories about who dropped
# out and so collect the shares of both secrets of one client; that needs 2t - k > (corrupt
# neighbours), hence t > k/2 (k = 398, t = 223). protocol.py's scope is the honest-but-curious
# server (one unmask request for all, no consistency round), so semi_honest is the default and its
# t <= k/2 is passed to the protocol as allow_low_threshold; semi_malicious never needs it.
SECAGG_DROPOUT_FLOOR = (
    0.33  # secagg.dropout_rate: null takes at least this (Bell et al.'s and the finder's example)
)


def secagg_targets(cfg: ExperimentConfig) -> dict:
    """The security targets of the secure aggregation (arguments of actors.secagg.params): the
    configured ones, with `dropout_rate: null` resolved to the larger of SECAGG_DROPOUT_FLOOR and the
    share of a sampled cohort that drops after key set-up by design (federation.dropout, and the
    over-selected clients beyond clients_per_round) in all but 2^-correctness_bits of rounds
    (`_dropout_bound`)."""
    sa = cfg.secagg
    delta = sa.dropout_rate
    if delta is None:
        delta = max(SECAGG_DROPOUT_FLOOR, _dropout_bound(cfg))
        if delta >= 1:
            fed = cfg.federation
            raise ValueError(
                f"secagg.dropout_rate: null, but with federation.dropout {fed.dropout:g} a cohort of "
                f"{fed.clients_per_round} can lose every client in more than 2^-"
                f"{cfg.secagg.correctness_bits} of rounds (secagg.correctness_bits); set "
                f"secagg.dropout_rate below 1 and accept the rounds that abort, or sample more clients"
            )
    return {
        "dropout": float(delta),
        "adversarial": sa.adversarial_fraction,
        "security_bits": sa.security_bits,
        "correctness_bits": sa.correctness_bits,
        "adversary": sa.adversary,
    }


def _secagg_graph(
    cfg: ExperimentConfig, n: int, sizes: tuple[int, int] | None = None
) -> tuple[int | None, int | None, bool]:
    """(neighbors, threshold, allow_low_threshold) for `secagg_params` and a cohort of `n` (in
    expectation; of `sizes` = (lo, hi) clients, `cohort_sizes`): the config's, or with `neighbors:
    auto` the smallest k (and t) that meet `secagg_targets` at every size (an explicit threshold
    still wins; `_warn_below_targets` checks it)."""
    sa = cfg.secagg
    if sa.neighbors != "auto":
        return sa.neighbors, sa.threshold, False
    if n < 2:  # secagg_params says what is wrong
        return None, sa.threshold, False
    targets = secagg_targets(cfg)
    lo, hi = sizes or (n, n)
    try:
        found = find_harary_params_over(lo, n, hi, **targets)
    except ValueError as e:
        raise ValueError(
            f"secagg.neighbors: auto: {e}; or set secagg.neighbors (null: the complete graph) and "
            f"secagg.threshold and accept the bounds they reach"
        ) from None
    k, t = found.k, (found.t if sa.threshold is None else sa.threshold)
    honest = sa.adversary == "semi_honest"
    if found.complete:
        # The complete graph (k = n - 1). Pass an even k >= n - 1: the protocol builds the complete
        # graph for up to k + 1 clients and a k-regular one (odd k is refused there) for a larger
        # Poisson cohort. Against a semi-malicious server t > k/2 must still hold there: keep the
        # finder's t when it does, else k/2 + 1 if that still meets the targets, else the plain
        # complete graph.
        k += k % 2
        if not honest and 2 * t <= k:
            if (
                k // 2 + 1 <= n - 1
                and weakest_harary_params(k, k // 2 + 1, lo, n, hi, **targets).meets_targets
            ):
                t = k // 2 + 1
            else:
                k = None
    return k, t, honest and k is not None and 2 * t <= k


def secagg_guarantee(cfg: ExperimentConfig, params: SecAggParams) -> HararyParams:
    """What the resolved (k, t) achieves against `secagg_targets` for its cohort: at the size
    where it is weakest, for a Poisson cohort's range of sizes."""
    lo, hi = params.cohort_range or (params.cohort, params.cohort)
    return weakest_harary_params(
        params.neighbors, params.threshold, lo, params.cohort, hi, **secagg_targets(cfg)
    )


def secagg_round_facts(cfg: ExperimentConfig, params: SecAggParams, n: int) -> dict:
    """A secure round over the `n` clients invited to key set-up: the survivor floor below which it
    refuses to unmask, and the security and correctness bits its k and t achieve at that size
    (-log2 of the bounds; inf: the event cannot happen; no bits where the protocol cannot run)."""
    return dict(
        _round_facts(n, params.neighbors, params.threshold, tuple(sorted(secagg_targets(cfg).items())))
    )


@lru_cache(maxsize=4096)
def _round_facts(n: int, k: int | None, t: int, targets: tuple) -> tuple:
    """Memoized per cohort size: a run has a few dozen distinct sizes."""
    kw = dict(targets)
    out = {"secagg_survivor_floor": survivor_floor(n, kw["dropout"])}
    if n >= 2 and t <= (n - 1 if k is None else min(k, n - 1)):
        got = evaluate_harary_params(n, k, t, **kw)
        out.update(
            secagg_security_bits=_bits(got.security_log2), secagg_correctness_bits=_bits(got.abort_log2)
        )
    return tuple(out.items())


def _bits(log2p: float) -> float:
    return round(-log2p, 2) + 0.0  # -(-inf) = inf: the event cannot happen; + 0.0: no -0.0


def _warn_below_targets(cfg: ExperimentConfig, params: SecAggParams, what: str) -> None:
    got = secagg_guarantee(cfg, params)
    if not got.meets_targets:
        graph = "the complete graph" if got.complete else f"k = {got.k}"
        lo, hi = params.cohort_range or (params.cohort, params.cohort)
        span = f" of the {lo} to {hi} a Poisson cohort may have" if lo != hi else ""
        warnings.warn(
            f"secagg: {graph}, t = {got.t} for {what} ({got.n} clients{span}, {got.dropout:g} dropout, "
            f"{got.adversarial:g} adversarial) falls short of the targets: {got.shortfall()}; "
            f"secagg.neighbors: auto picks k and t that meet them",
            SecAggTargetWarning,
            stacklevel=3,
        )
