"""The plan of a federation: everything that follows from the config and the data, decided
before any actor starts (pure, no Ray).

`FederationPlan.from_config` probes the data on the driver (bad paths fail here; FEMNIST decides
the number of clients), sizes the model, draws the initial parameters, resolves the noise
multiplier (from `target_epsilon` when given) and the secure-aggregation parameters, and checks
that the cohort fits the population. Every problem is a `ConfigError` naming its key. The
federation (sim/engine/federation.py) then only starts actors from the plan; Tune trials, the
benchmarks, `fedmeta table` and the tests build the same plan.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from fedmeta.actors.privacy import SampleLevelDP, Sampling, UserLevelDP
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
from fedmeta.sim.algorithms.local import resolve_compute
from fedmeta.sim.config import ConfigError, ExperimentConfig, with_absolute_paths
from fedmeta.sim.data import FederatedDataset, build_dataset
from fedmeta.sim.data.canaries import canary_count, canary_ids, canary_inclusion
from fedmeta.sim.data.drift import joiner_ids
from fedmeta.sim.models import build_model, init_params, num_params
from fedmeta.sim.sampling import eval_individuals
from fedmeta.sim.seeding import Secrets, np_rng, torch_gen
from fedmeta.sim.artifacts.usercode import add_code_path, code_paths


@dataclass(frozen=True)
class FederationPlan:
    cfg: ExperimentConfig
    data: FederatedDataset
    input_shape: tuple[int, ...]
    num_classes: int
    n_params: int
    init_params: np.ndarray          # (n_params,) float32, from (seed, "init")
    compute: str                     # the cohort engine: "vmap" or "loop"
    dp: UserLevelDP                  # user-level DP, with z resolved
    local_dp: SampleLevelDP | None   # local DP-SGD inside clients, for its accounting
    secagg: SecAggParams | None      # None: plain sums
    canary_ids: np.ndarray           # the audit's canary clients (the last ids), and which of them train
    canary_included: np.ndarray
    eval_ids: np.ndarray             # the evaluation panel of individuals (never a canary)
    global_sizes: tuple[int, ...]    # samples of each D_G individual, in D_G's block order
    input_profile: dict              # per-feature mean/var of the training inputs (for serving)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, data: FederatedDataset | None = None) -> FederationPlan:
        add_code_path(code_paths(cfg))     # the researcher's own model/algorithm modules
        cfg = with_absolute_paths(cfg)      # the actors may start in another folder
        data = data or build_dataset(cfg.data, cfg.seed)
        fed = cfg.federation
        if fed.clients_per_round > data.num_clients:
            raise ConfigError(f"federation.clients_per_round: {fed.clients_per_round} exceeds the "
                              f"{data.num_clients} clients in the data")
        if cfg.data.drift.rotation and len(data.input_shape) != 3:
            raise ConfigError(f"data.drift.rotation: rotates images (channels, h, w); this data's inputs have shape "
                              f"{tuple(data.input_shape)}")
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        try:
            canaries = canary_count(cfg.privacy.audit_canaries, data.num_clients, cfg.privacy.mode != "off")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # DP: how cohorts are drawn (what the accountant composes) and the noise multiplier,
        # resolved once per run
        try:
            dp = UserLevelDP.from_config(cfg.privacy, _sampling(cfg, data.num_clients), fed.rounds,
                                         secure=cfg.secagg.enabled, reporting=fed.clients_per_round)
            secagg = _secagg(cfg, dp)
        except ValueError as e:     # the messages name their key
            raise ConfigError(str(e)) from None
        if cfg.data.drift.joiners >= data.num_clients - canaries:
            raise ConfigError(f"data.drift.joiners: {cfg.data.drift.joiners} leaves nobody in the federation before "
                              f"the drift round ({data.num_clients} clients, {canaries} of them canaries)")
        ids = canary_ids(canaries, data.num_clients)
        return cls(cfg, data, tuple(data.input_shape), data.num_classes, num_params(model),
                   init_params(model, torch_gen(cfg.seed, "init")).numpy(),
                   resolve_compute(cfg.ray.compute, cfg.model.kind, cfg.privacy.local_dp, model, data.input_shape),
                   dp, _local_dp(cfg), secagg,
                   ids, canary_inclusion(Secrets.seeded(cfg.seed), canaries),     # until with_secrets
                   eval_individuals(cfg.seed, data.num_clients - canaries, cfg.eval.num_individuals),
                   tuple(data.global_sizes()), input_profile(data, cfg.seed))

    def with_secrets(self, secrets: Secrets) -> FederationPlan:
        """The plan of a run with these secrets: the audit's canary coins drawn from them (the plan
        alone, before a run has its secret, draws them from the seed)."""
        return replace(self, canary_included=canary_inclusion(secrets, len(self.canary_ids)))

    def with_config(self, cfg: ExperimentConfig) -> FederationPlan:
        """The plan under new hyperparameters (a Tune trial, or the run after tuning): the same
        data, initial model and noise (z, q); clipping, secure aggregation and the rest follow
        the new config."""
        try:
            dp = replace(self.dp, clip_norm=cfg.privacy.clip_norm)
            if self.dp.enabled and cfg.privacy.noise_multiplier not in (None, self.cfg.privacy.noise_multiplier):
                dp = replace(dp, noise_multiplier=cfg.privacy.noise_multiplier)   # z itself is searched
            secagg = _secagg(cfg, dp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model = build_model(cfg.model, self.input_shape, self.num_classes)
        compute = resolve_compute(cfg.ray.compute, cfg.model.kind, cfg.privacy.local_dp, model, self.input_shape)
        panel = eval_individuals(cfg.seed, self.num_clients - len(self.canary_ids), cfg.eval.num_individuals)
        shape = {}
        if cfg.model != self.cfg.model:     # an architecture is searched: its own seeded initial model
            shape = {"n_params": num_params(model), "init_params": init_params(model, torch_gen(cfg.seed, "init")).numpy()}
        return replace(self, cfg=cfg, dp=dp, local_dp=_local_dp(cfg), secagg=secagg, compute=compute, eval_ids=panel,
                       **shape)

    @property
    def num_clients(self) -> int:
        return self.data.num_clients

    @property
    def sample_rate(self) -> float:
        return self.dp.sample_rate

    @property
    def sampling(self) -> Sampling:
        return self.dp.sampling

    @property
    def joiner_ids(self) -> np.ndarray:
        """The individuals who join at `data.drift.at_round` (`data.drift.joiners`; none by default)."""
        return joiner_ids(self.num_clients, len(self.canary_ids), self.cfg.data.drift.joiners)

    def absent(self, rnd: int) -> np.ndarray:
        """Who is not in the federation yet in round `rnd` (0-based): the joiners before the drift
        round. A sampled absent individual is left out of the cohort, as an 'out' canary is, so
        either accounting stays valid (a user's chance to be in a round is at most q)."""
        d = self.cfg.data.drift
        return self.joiner_ids if d.joiners and rnd < d.at_round else np.zeros(0, dtype=np.int64)

    @property
    def excluded_canaries(self) -> np.ndarray:
        """The canaries that flipped 'out': never in a cohort."""
        return self.canary_ids[~self.canary_included]

    def metric_secagg(self) -> SecAggParams:
        """Secure aggregation of the panel's accuracies: values in [0, 1] (a clip of 1), the panel
        as the cohort the modulus is sized for."""
        sa, n = self.cfg.secagg, len(self.eval_ids)
        try:
            k, t, low = _secagg_graph(self.cfg, n)
            params = secagg_params(k, t, 1.0, sa.quant_bits, n, allow_low_threshold=low,
                                   dropout=secagg_targets(self.cfg)["dropout"], cohort_range=(n, n))
        except ValueError as e:
            raise ConfigError(f"eval.num_individuals: the secure tuning metric sums the panel: {e}") from None
        _warn_below_targets(self.cfg, params, "the secure tuning metric's panel")
        return params


def _local_dp(cfg: ExperimentConfig) -> SampleLevelDP | None:
    p = cfg.privacy
    return SampleLevelDP(p.local_clip, p.local_noise_multiplier, cfg.algorithm.batch_size) if p.local_dp else None


def _sampling(cfg: ExperimentConfig, num_clients: int) -> Sampling:
    kind = cfg.federation.sampling
    if kind == "auto":     # what DP accountants assume when DP is on; today's fixed cohorts otherwise
        kind = "poisson" if cfg.privacy.mode != "off" else "fixed"
    fed = cfg.federation
    if fed.mode == "fedbuff":
        # who lands in a FedBuff buffer depends on device speed, so uniform-sampling amplification
        # does not hold: account every step as if every user were in it (q = 1), a valid upper bound
        if fed.fedbuff.concurrency > num_clients:
            raise ValueError(f"federation.fedbuff.concurrency: {fed.fedbuff.concurrency} clients in flight, more "
                             f"than the {num_clients} in the data")
        return Sampling(kind, num_clients, num_clients)
    sampled = math.ceil(fed.over_selection * fed.clients_per_round - 1e-9)   # over-selection draws more
    if sampled > num_clients:
        raise ValueError(f"federation.over_selection: {fed.over_selection} x clients_per_round samples {sampled} "
                         f"clients, more than the {num_clients} in the data")
    return Sampling(kind, num_clients, sampled)


def _secagg(cfg: ExperimentConfig, dp: UserLevelDP) -> SecAggParams | None:
    sa = cfg.secagg
    if not sa.enabled:
        return None
    s = dp.sampling
    delta = secagg_targets(cfg)["dropout"]
    _check_planned_dropout(cfg, delta)
    # a Poisson cohort varies: size the modulus 10 standard deviations above its mean
    most = s.cohort if s.kind == "fixed" else min(s.population, s.cohort + 10 * math.ceil(math.sqrt(s.cohort)) + 10)
    # and the graph for every size it takes, not its mean: the bounds are not monotone in n
    # (actors/secagg/params.py), and a cohort above `sizes` is refused (SecureSum)
    sizes = cohort_sizes(s)
    k, t, low = _secagg_graph(cfg, s.cohort, sizes)
    params = secagg_params(k, t, dp.clip_norm, sa.quant_bits, s.cohort, dp.share_noise_multiplier, most, low,
                           delta, sizes)
    _warn_below_targets(cfg, params, "each round's cohort")
    return params


COHORT_TAIL_BITS = 20     # a Poisson cohort outside the sizes the graph is sized for: < 2^-20 per side, per round


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
    survivors = sampled if fed.dropout <= 0 else int(binom.ppf(2.0 ** -cfg.secagg.correctness_bits, sampled,
                                                               1 - fed.dropout))
    return 1 - min(survivors, fed.clients_per_round) / sampled


def _check_planned_dropout(cfg: ExperimentConfig, delta: float) -> None:
    """A dropout bound below the planned dropout would have most rounds refused at the survivor floor."""
    planned = _planned_dropout(cfg)
    if planned > delta + 1e-9:
        raise ValueError(f"secagg.dropout_rate: {delta:g}, but {planned:.3g} of each cohort drops by design "
                         f"(federation.dropout, over_selection): most rounds would keep fewer than the "
                         f"ceil(n(1 - {delta:g})) survivors the neighbour graph is sized for, and secure "
                         f"aggregation refuses to unmask them; set secagg.dropout_rate to at least {planned:.3g}, "
                         f"or null")


# Which server `secagg.neighbors: auto` is sized against (secagg.adversary). Bell et al. 2020 (and
# federated-compute's finder) have two: a semi-honest server, which needs only t > (corrupt
# neighbours) -- often t < k/2, e.g. k = 72, t = 24 for 1,000 clients with 5% corrupt and 33% dropout
# -- and a semi-malicious one, which may tell different clients different stories about who dropped
# out and so collect the shares of both secrets of one client; that needs 2t - k > (corrupt
# neighbours), hence t > k/2 (k = 398, t = 223). protocol.py's scope is the honest-but-curious
# server (one unmask request for all, no consistency round), so semi_honest is the default and its
# t <= k/2 is passed to the protocol as allow_low_threshold; semi_malicious never needs it.
SECAGG_DROPOUT_FLOOR = 0.33    # secagg.dropout_rate: null takes at least this (Bell et al.'s and the finder's example)


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
            raise ValueError(f"secagg.dropout_rate: null, but with federation.dropout {fed.dropout:g} a cohort of "
                             f"{fed.clients_per_round} can lose every client in more than 2^-"
                             f"{cfg.secagg.correctness_bits} of rounds (secagg.correctness_bits); set "
                             f"secagg.dropout_rate below 1 and accept the rounds that abort, or sample more clients")
    return {"dropout": float(delta), "adversarial": sa.adversarial_fraction, "security_bits": sa.security_bits,
            "correctness_bits": sa.correctness_bits, "adversary": sa.adversary}


def _secagg_graph(cfg: ExperimentConfig, n: int,
                  sizes: tuple[int, int] | None = None) -> tuple[int | None, int | None, bool]:
    """(neighbors, threshold, allow_low_threshold) for `secagg_params` and a cohort of `n` (in
    expectation; of `sizes` = (lo, hi) clients, `cohort_sizes`): the config's, or with `neighbors:
    auto` the smallest k (and t) that meet `secagg_targets` at every size (an explicit threshold
    still wins; `_warn_below_targets` checks it)."""
    sa = cfg.secagg
    if sa.neighbors != "auto":
        return sa.neighbors, sa.threshold, False
    if n < 2:            # secagg_params says what is wrong
        return None, sa.threshold, False
    targets = secagg_targets(cfg)
    lo, hi = sizes or (n, n)
    try:
        found = find_harary_params_over(lo, n, hi, **targets)
    except ValueError as e:
        raise ValueError(f"secagg.neighbors: auto: {e}; or set secagg.neighbors (null: the complete graph) and "
                         f"secagg.threshold and accept the bounds they reach") from None
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
            if k // 2 + 1 <= n - 1 and weakest_harary_params(k, k // 2 + 1, lo, n, hi, **targets).meets_targets:
                t = k // 2 + 1
            else:
                k = None
    return k, t, honest and k is not None and 2 * t <= k


def secagg_guarantee(cfg: ExperimentConfig, params: SecAggParams) -> HararyParams:
    """What the resolved (k, t) achieves against `secagg_targets` for its cohort: at the size
    where it is weakest, for a Poisson cohort's range of sizes."""
    lo, hi = params.cohort_range or (params.cohort, params.cohort)
    return weakest_harary_params(params.neighbors, params.threshold, lo, params.cohort, hi, **secagg_targets(cfg))


def secagg_round_facts(cfg: ExperimentConfig, params: SecAggParams, n: int) -> dict:
    """A secure round over the `n` clients invited to key set-up: the survivor floor below which it
    refuses to unmask, and the security and correctness bits its k and t achieve at that size
    (-log2 of the bounds; inf: the event cannot happen; no bits where the protocol cannot run)."""
    return dict(_round_facts(n, params.neighbors, params.threshold, tuple(sorted(secagg_targets(cfg).items()))))


@lru_cache(maxsize=4096)
def _round_facts(n: int, k: int | None, t: int, targets: tuple) -> tuple:
    """Memoized per cohort size: a run has a few dozen distinct sizes."""
    kw = dict(targets)
    out = {"secagg_survivor_floor": survivor_floor(n, kw["dropout"])}
    if n >= 2 and t <= (n - 1 if k is None else min(k, n - 1)):
        got = evaluate_harary_params(n, k, t, **kw)
        out.update(secagg_security_bits=_bits(got.security_log2), secagg_correctness_bits=_bits(got.abort_log2))
    return tuple(out.items())


def _bits(log2p: float) -> float:
    return round(-log2p, 2) + 0.0      # -(-inf) = inf: the event cannot happen; + 0.0: no -0.0


def _warn_below_targets(cfg: ExperimentConfig, params: SecAggParams, what: str) -> None:
    got = secagg_guarantee(cfg, params)
    if not got.meets_targets:
        graph = "the complete graph" if got.complete else f"k = {got.k}"
        lo, hi = params.cohort_range or (params.cohort, params.cohort)
        span = f" of the {lo} to {hi} a Poisson cohort may have" if lo != hi else ""
        warnings.warn(f"secagg: {graph}, t = {got.t} for {what} ({got.n} clients{span}, {got.dropout:g} dropout, "
                      f"{got.adversarial:g} adversarial) falls short of the targets: {got.shortfall()}; "
                      f"secagg.neighbors: auto picks k and t that meet them", SecAggTargetWarning, stacklevel=3)


PROFILE_CLIENTS = 64    # clients behind the model card's input profile


def profile_ids(num_clients: int, seed: int, clients: int = PROFILE_CLIENTS) -> list[int]:
    """The seeded sample of clients whose training inputs the input profile describes (sorted)."""
    return sorted(np_rng(seed, "input-profile").choice(num_clients, size=min(clients, num_clients),
                                                       replace=False).tolist())


def input_profile(data: FederatedDataset, seed: int, clients: int = PROFILE_CLIENTS) -> dict:
    """Per-feature mean and variance of the federation's training inputs, from a seeded sample of
    clients: what a serving router compares live inputs with. Exact: the model card ships it as it
    is only without DP (sim/run/card_stats.py releases a noised one under DP)."""
    ids = profile_ids(data.num_clients, seed, clients)
    x = np.concatenate([c.x_train.reshape(len(c.x_train), -1).numpy() for c in data.clients(ids)])
    return {"mean": x.mean(0).tolist(), "var": x.var(0).tolist(), "n": int(len(x))}
