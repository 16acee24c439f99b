"""The run's differential privacy as one object: ``UserLevelDP``, and ``SampleLevelDP`` for local DP-SGD.

``UserLevelDP`` is user-level DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018) resolved once from
the privacy config, the only place that knows the privacy mode: workers call its client half (clip
to C; Skellam noise shares in the distributed mode), the aggregator its server half (central noise,
the planned cohort as denominator), and the run's accounting steps with its ``round_noise``. It is
immutable and small, so it travels to the actors as it is; ``SampleLevelDP`` is what the
accounting of local DP-SGD inside clients needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedmeta.actors.privacy.accountants import Sampling, make_accountant
from fedmeta.actors.privacy.calibration import _resolve_noise
from fedmeta.actors.privacy.checks import AccountantName
from fedmeta.actors.privacy.mechanisms import (
    central_noise,
    clip_updates,
    distributed_noise_share,
    effective_noise_multiplier,
)
from fedmeta.sim.seeding import gaussian_noise


@dataclass(frozen=True)
class UserLevelDP:
    """User-level DP of a run (DP-FedAvg), resolved once from the privacy config: the only place
    that knows the privacy mode. Workers call the client half, the aggregator the server half,
    the experiment's accounting steps with `round_noise`; the summary and the model card report
    `RunAccounting.facts`. Immutable and small, so it travels to the actors as it is.

    `bound_updates` is also on without DP under secure aggregation, whose fixed-point encoding
    needs every update inside the C-ball (and equal weights, as a sample-count weight would
    change the sensitivity the noise is calibrated to)."""

    mode: Literal["off", "central", "distributed"] = "off"
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0  # z, resolved from the config or from target_epsilon
    expected_clients: int = 1  # the planned cohort: DP-FedAvg's fixed denominator
    sampling: Sampling = Sampling()  # how cohorts are drawn: what the accountant composes
    delta: float = 1e-5
    accountant: AccountantName = "rdp"
    target_epsilon: float | None = None
    bound_updates: bool = False
    metric_noise_multiplier: float | None = None  # panel metric releases (None: z)

    @classmethod
    def from_config(
        cls, p, sampling: Sampling, rounds: int, secure: bool = False, reporting: int | None = None
    ) -> UserLevelDP:
        """`p` is a `fedmeta.sim.config.PrivacyConfig`; `reporting`: the clients expected to report when
        more are sampled (over-selection; default: the cohort). Raises ValueError naming the key
        when a target epsilon cannot be met in `rounds` rounds, or the accountant cannot account
        the sampling."""
        if p.mode != "off":
            make_accountant(p.accountant, sampling)  # refuses PRV for fixed-size cohorts
        expected = min(reporting or sampling.cohort, sampling.cohort)
        return cls(
            p.mode,
            p.clip_norm,
            _resolve_noise(p, sampling, rounds),
            expected,
            sampling,
            p.delta,
            p.accountant,
            p.target_epsilon,
            bound_updates=p.mode != "off" or secure,
            metric_noise_multiplier=p.metric_noise_multiplier,
        )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def sample_rate(self) -> float:
        return self.sampling.rate

    @property
    def metric_noise(self) -> float:
        """Noise std of a panel metric release over its sensitivity 1 (`privacy.metric_noise_multiplier`,
        else z): a panel mean's noise is this over the panel's size, so a larger panel buys the same
        precision with more noise and less epsilon."""
        return self.noise_multiplier if self.metric_noise_multiplier is None else self.metric_noise_multiplier

    # ------------------------------------------------------------ client half
    def client_half(
        self, updates: torch.Tensor, natural_weights: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(updates, weights) a worker sums: clipped to C with equal weights when bounded,
        otherwise as the algorithm weighs them."""
        if not self.bound_updates:
            return updates, torch.tensor(natural_weights, device=updates.device)
        clipped, _ = clip_updates(updates, self.clip_norm)
        return clipped, torch.ones(len(updates), device=updates.device)

    @property
    def share_noise_multiplier(self) -> float:
        """z carried by the clients' Skellam shares (distributed mode), 0 otherwise."""
        return self.noise_multiplier if self.mode == "distributed" else 0.0

    def noise_share(self, n: int, step: float, rng: np.random.Generator) -> np.ndarray | None:
        """A client's integer noise share in quantization steps (distributed mode), else None."""
        if self.share_noise_multiplier <= 0:
            return None
        return distributed_noise_share(
            n, self.clip_norm, self.noise_multiplier, self.expected_clients, step, rng
        )

    def metric_share(
        self, n: int, step: float, noise: float | None, panel: int, rng: np.random.Generator
    ) -> np.ndarray | None:
        """A panel member's integer noise share of a metric release (distributed mode), else None:
        the shares of the `panel` carry the release's Gaussian of std `noise` (default `metric_noise`) on each
        sum of values in [0, 1], so the aggregator never sees a metric without its noise."""
        if self.mode != "distributed":
            return None
        z = self.metric_noise if noise is None else noise
        return distributed_noise_share(n, 1.0, z, max(panel, 1), step, rng) if z > 0 else None

    # ------------------------------------------------------------ server half
    @property
    def noise_without_clients(self) -> bool:
        """Central DP releases its noise even when nobody was sampled (a Poisson cohort can be
        empty): skipping the round would reveal that no one took part."""
        return self.mode == "central"

    def server_half(self, total: torch.Tensor, weight: float, gen) -> tuple[torch.Tensor, dict]:
        """The mean update from the sum: central noise z*C added (central mode), divided by the
        planned cohort size under DP (not the data-dependent weight that reported)."""
        metrics: dict = {}
        if self.mode == "central":
            total, metrics = central_noise(total, self.clip_norm, self.noise_multiplier, gen)
        return total / (self.expected_clients if self.enabled else weight), metrics

    def noisy_sum(self, total: torch.Tensor, gen, noise: float | None = None) -> torch.Tensor:
        """A released sum of values in [0, 1] (e.g. accuracies): Gaussian noise of std
        `metric_noise` (or `noise`) under DP."""
        z = self.metric_noise if noise is None else noise
        return total + z * gaussian_noise((), gen, dtype=total.dtype) if self.enabled else total

    @property
    def metric_release_noise(self) -> float:
        """The noise multiplier of one tuning-metric release: two `noisy_sum`s (global and
        personalized accuracy) to which an individual adds at most 1 each, i.e. L2 sensitivity
        sqrt(2) under adding, removing or replacing one individual."""
        return self.metric_noise / math.sqrt(2)

    # ------------------------------------------------------------ accounting
    def round_noise(self, survivors: int | None) -> float:
        """The z a released round achieved: in the distributed mode only the survivors' shares
        reached the sum."""
        if self.mode == "distributed":
            return effective_noise_multiplier(self.noise_multiplier, self.expected_clients, survivors)
        return self.noise_multiplier


@dataclass(frozen=True)
class SampleLevelDP:
    """Local DP-SGD inside clients (privacy.local_dp): what its accounting needs."""

    clip: float
    noise_multiplier: float
    batch_size: int  # local batch: the per-step sampling rate is batch / n_train
