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
from dataclasses import dataclass, replace

import numpy as np

from fedmeta.actors.privacy import SampleLevelDP, Sampling, UserLevelDP
from fedmeta.actors.secagg.policy import panel_secagg, plan_secagg
from fedmeta.actors.secagg.session import SecAggParams
from fedmeta.sim.algorithms.local import resolve_compute
from fedmeta.sim.artifacts.usercode import add_code_path, code_paths
from fedmeta.sim.config import ConfigError, ExperimentConfig, with_absolute_paths
from fedmeta.sim.data import FederatedDataset, build_dataset
from fedmeta.sim.data.canaries import canary_count, canary_ids, canary_inclusion
from fedmeta.sim.data.drift import joiner_ids
from fedmeta.sim.models import build_model, init_params, num_params
from fedmeta.sim.sampling import eval_individuals
from fedmeta.sim.seeding import Secrets, np_rng, torch_gen


@dataclass(frozen=True)
class FederationPlan:
    cfg: ExperimentConfig
    data: FederatedDataset
    input_shape: tuple[int, ...]
    num_classes: int
    n_params: int
    init_params: np.ndarray  # (n_params,) float32, from (seed, "init")
    compute: str  # the cohort engine: "vmap" or "loop"
    dp: UserLevelDP  # user-level DP, with z resolved
    local_dp: SampleLevelDP | None  # local DP-SGD inside clients, for its accounting
    secagg: SecAggParams | None  # None: plain sums
    canary_ids: np.ndarray  # the audit's canary clients (the last ids), and which of them train
    canary_included: np.ndarray
    eval_ids: np.ndarray  # the evaluation panel of individuals (never a canary)
    global_sizes: tuple[int, ...]  # samples of each D_G individual, in D_G's block order
    input_profile: dict  # per-feature mean/var of the training inputs (for serving)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, data: FederatedDataset | None = None) -> FederationPlan:
        add_code_path(code_paths(cfg))  # the researcher's own model/algorithm modules
        cfg = with_absolute_paths(cfg)  # the actors may start in another folder
        data = data or build_dataset(cfg.data, cfg.seed)
        _check_data(cfg, data)
        model = build_model(cfg.model, data.input_shape, data.num_classes)
        try:
            canaries = canary_count(cfg.privacy.audit_canaries, data.num_clients, cfg.privacy.mode != "off")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        dp, secagg = _resolve_privacy(cfg, data.num_clients)
        if cfg.data.drift.joiners >= data.num_clients - canaries:
            raise ConfigError(
                f"data.drift.joiners: {cfg.data.drift.joiners} leaves nobody in the federation before "
                f"the drift round ({data.num_clients} clients, {canaries} of them canaries)"
            )
        ids = canary_ids(canaries, data.num_clients)
        return cls(
            cfg,
            data,
            tuple(data.input_shape),
            data.num_classes,
            num_params(model),
            init_params(model, torch_gen(cfg.seed, "init")).numpy(),
            resolve_compute(cfg.ray.compute, cfg.model.kind, cfg.privacy.local_dp, model, data.input_shape),
            dp,
            _local_dp(cfg),
            secagg,
            ids,
            canary_inclusion(Secrets.seeded(cfg.seed), canaries),  # until with_secrets
            eval_individuals(cfg.seed, data.num_clients - canaries, cfg.eval.num_individuals),
            tuple(data.global_sizes()),
            input_profile(data, cfg.seed),
        )

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
            if self.dp.enabled and cfg.privacy.noise_multiplier not in (
                None,
                self.cfg.privacy.noise_multiplier,
            ):
                dp = replace(dp, noise_multiplier=cfg.privacy.noise_multiplier)  # z itself is searched
            secagg = plan_secagg(cfg, dp)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model = build_model(cfg.model, self.input_shape, self.num_classes)
        compute = resolve_compute(
            cfg.ray.compute, cfg.model.kind, cfg.privacy.local_dp, model, self.input_shape
        )
        panel = eval_individuals(cfg.seed, self.num_clients - len(self.canary_ids), cfg.eval.num_individuals)
        shape = {}
        if cfg.model != self.cfg.model:  # an architecture is searched: its own seeded initial model
            shape = {
                "n_params": num_params(model),
                "init_params": init_params(model, torch_gen(cfg.seed, "init")).numpy(),
            }
        return replace(
            self,
            cfg=cfg,
            dp=dp,
            local_dp=_local_dp(cfg),
            secagg=secagg,
            compute=compute,
            eval_ids=panel,
            **shape,
        )

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
        try:
            return panel_secagg(self.cfg, len(self.eval_ids))
        except ValueError as e:
            raise ConfigError(f"eval.num_individuals: the secure tuning metric sums the panel: {e}") from None


def _check_data(cfg: ExperimentConfig, data: FederatedDataset) -> None:
    """The cohort fits the population, and a drift rotation has images to rotate."""
    fed = cfg.federation
    if fed.clients_per_round > data.num_clients:
        raise ConfigError(
            f"federation.clients_per_round: {fed.clients_per_round} exceeds the "
            f"{data.num_clients} clients in the data"
        )
    if cfg.data.drift.rotation and len(data.input_shape) != 3:
        raise ConfigError(
            f"data.drift.rotation: rotates images (channels, h, w); this data's inputs have shape "
            f"{tuple(data.input_shape)}"
        )


def _resolve_privacy(cfg: ExperimentConfig, num_clients: int) -> tuple[UserLevelDP, SecAggParams | None]:
    """User-level DP and the secure-aggregation parameters of a run over `num_clients` clients."""
    fed = cfg.federation
    # DP: how cohorts are drawn (what the accountant composes) and the noise multiplier,
    # resolved once per run
    try:
        dp = UserLevelDP.from_config(
            cfg.privacy,
            _sampling(cfg, num_clients),
            fed.rounds,
            secure=cfg.secagg.enabled,
            reporting=fed.clients_per_round,
        )
        secagg = plan_secagg(cfg, dp)
    except ValueError as e:  # the messages name their key
        raise ConfigError(str(e)) from None
    return dp, secagg


def _local_dp(cfg: ExperimentConfig) -> SampleLevelDP | None:
    p = cfg.privacy
    return (
        SampleLevelDP(p.local_clip, p.local_noise_multiplier, cfg.algorithm.batch_size)
        if p.local_dp
        else None
    )


def _sampling(cfg: ExperimentConfig, num_clients: int) -> Sampling:
    kind = cfg.federation.sampling
    if kind == "auto":  # what DP accountants assume when DP is on; today's fixed cohorts otherwise
        kind = "poisson" if cfg.privacy.mode != "off" else "fixed"
    fed = cfg.federation
    if fed.mode == "fedbuff":
        # who lands in a FedBuff buffer depends on device speed, so uniform-sampling amplification
        # does not hold: account every step as if every user were in it (q = 1), a valid upper bound
        if fed.fedbuff.concurrency > num_clients:
            raise ValueError(
                f"federation.fedbuff.concurrency: {fed.fedbuff.concurrency} clients in flight, more "
                f"than the {num_clients} in the data"
            )
        return Sampling(kind, num_clients, num_clients)
    sampled = math.ceil(fed.over_selection * fed.clients_per_round - 1e-9)  # over-selection draws more
    if sampled > num_clients:
        raise ValueError(
            f"federation.over_selection: {fed.over_selection} x clients_per_round samples {sampled} "
            f"clients, more than the {num_clients} in the data"
        )
    return Sampling(kind, num_clients, sampled)


PROFILE_CLIENTS = 64  # clients behind the model card's input profile


def profile_ids(num_clients: int, seed: int, clients: int = PROFILE_CLIENTS) -> list[int]:
    """The seeded sample of clients whose training inputs the input profile describes (sorted)."""
    return sorted(
        np_rng(seed, "input-profile")
        .choice(num_clients, size=min(clients, num_clients), replace=False)
        .tolist()
    )


def input_profile(data: FederatedDataset, seed: int, clients: int = PROFILE_CLIENTS) -> dict:
    """Per-feature mean and variance of the federation's training inputs, from a seeded sample of
    clients: what a serving router compares live inputs with. Exact: the model card ships it as it
    is only without DP (sim/run/card_stats.py releases a noised one under DP)."""
    ids = profile_ids(data.num_clients, seed, clients)
    x = np.concatenate([c.x_train.reshape(len(c.x_train), -1).numpy() for c in data.clients(ids)])
    return {"mean": x.mean(0).tolist(), "var": x.var(0).tolist(), "n": int(len(x))}
