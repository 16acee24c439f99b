"""The `privacy` and `secagg` sections: differential privacy and masked secure aggregation.

`PrivacyConfig` is user-level DP-FedAvg (central or distributed noise), sample-level DP-SGD, the
membership-inference and canary audits and the adaptive privacy weight (`LeakageControlConfig`);
`SecAggConfig` is the SecAgg+ mask graph and the security targets its parameters are chosen for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedmeta.sim.config.base import SHORT, Section

DEFAULT_NOISE_MULTIPLIER = 1.0


class LeakageControlConfig(Section):
    """The privacy weight lambda of the personalization objective, adapted between rounds (sim/run/leakage.py):
    a dual-ascent step on the constraint `leakage <= target_auc`, from a private release of the panel's
    membership-inference AUC."""

    target_auc: float | None = Field(
        None,
        gt=0.5,
        lt=1,
        description=(
            "drive the personalized models' mean per-individual MIA AUC to this (null: lambda stays fixed)"
        ),
    )
    step: float = Field(20.0, gt=0, description="lambda += step * (released AUC - target_auc) at each update")
    max_weight: float = Field(100.0, gt=0, description="lambda is kept in [0, max_weight]")
    every: int | None = Field(None, ge=1, description="rounds between updates (null: eval.every)")
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description=(
            "under DP: noise std of each leakage release / its sensitivity 1 (null: privacy.metric_noise_multiplier, "
            "else z); the mean's "
            "noise is this over eval.num_individuals"
        ),
    )


class PrivacyConfig(Section):
    """User-level DP-FedAvg: clip each client's update to L2 norm C, Gaussian noise z*C on the sum."""

    mode: Literal["off", "central", "distributed"] = Field(
        "off",
        description="central: the aggregator adds noise to the sum; distributed: each client adds a "
        "Skellam share before masking (needs secagg)",
    )
    clip_norm: float = Field(1.0, gt=0, description="L2 bound C on each client's update")
    noise_multiplier: float | None = Field(
        None, gt=0, description="z (1.0 when neither this nor target_epsilon is set)"
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="alone: find z for this epsilon over all rounds "
        "(Opacus); with noise_multiplier: the budget at "
        "which training and tuning stop",
    )
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    mia_audit: bool = Field(True, description="loss-threshold membership inference at each evaluation")
    local_dp: bool = Field(
        False,
        description="sample-level DP-SGD inside each client (per-sample clipping + "
        "Gaussian noise at every local step; loop path)",
    )
    local_clip: float = Field(1.0, gt=0, description="local DP-SGD: L2 bound on each per-sample gradient")
    local_noise_multiplier: float = Field(1.0, gt=0, description="local DP-SGD: noise std / local_clip")
    audit_canaries: int | None = Field(
        None,
        ge=0,
        description="canary clients of the one-run audit "
        "(Steinke et al. 2023); null: 5% of the population "
        "(at most 100) when DP is on, none otherwise",
    )
    audit_confidence: float = Field(
        0.95, gt=0, lt=1, description="the audit's lower bound holds with this probability"
    )
    metric_noise_multiplier: float | None = Field(
        None,
        gt=0,
        description=(
            "under DP: noise std of each panel metric release (Tune's reports, the card's quality) / its sensitivity 1; "
            "the mean's noise is this over eval.num_individuals (null: z)"
        ),
    )
    profile_clip: float | None = Field(
        None,
        gt=0,
        description=(
            "under DP: L2 bound on each client's contribution to the model card's input profile (its per-feature "
            "means of x and x^2); null: sqrt(2 x features), which never clips inputs in [0, 1]"
        ),
    )
    leakage_control: LeakageControlConfig = LeakageControlConfig()


class SecAggConfig(Section):
    """Masked secure aggregation (Bonawitz et al. 2017; SecAgg+ neighbour graph, Bell et al. 2020)."""

    enabled: bool = False
    neighbors: int | Literal["auto"] | None = Field(
        "auto",
        description="k of the k-regular mask graph (even, >= 2; SecAgg+); auto = the smallest k (and its "
        "threshold) that meets the targets below for the cohort (Bell et al. 2020's parameter "
        "finder, actors/secagg/params.py; the complete graph when no sparser one does); "
        "null = complete graph",
    )
    threshold: int | None = Field(
        None,
        ge=1,
        description="t shares recover a secret; null = the finder's t with neighbors: auto, else k // 2 + 1",
    )
    quant_bits: int = Field(
        16, ge=1, le=30, description="quantization step = privacy.clip_norm / 2^quant_bits"
    )
    # security targets: what `auto` is chosen for, and what an explicit k/t is checked against (a
    # UserWarning at plan time when it falls short); the summary reports them (secagg_targets)
    dropout_rate: float | None = Field(
        None,
        ge=0,
        lt=1,
        description=(
            "delta: the most a round's cohort may lose after key set-up (a bound, not a mean: a round keeping fewer "
            "than ceil(n (1 - delta)) of its n clients is refused); null = the larger of "
            "0.33 (Bell et al.'s example) and the share the federation drops by design (federation.dropout and the "
            "over-selected clients) in all but 2^-correctness_bits of rounds"
        ),
    )
    adversarial_fraction: float = Field(
        0.05, ge=0, lt=1, description=("gamma: the most clients that may collude with the server")
    )
    security_bits: int = Field(
        40,
        ge=1,
        le=128,
        description="sigma: the adversary learns more than the sum, or a "
        "sum over part of the cohort, with probability < 2^-sigma",
    )
    correctness_bits: int = Field(
        20,
        ge=1,
        le=64,
        description="eta: a round with at most dropout_rate dropouts aborts with probability < 2^-eta",
    )
    adversary: Literal["semi_honest", "semi_malicious"] = Field(
        "semi_honest",
        description=(
            "the server auto sizes k and t against: semi_honest follows the protocol (this simulation's model, and "
            "Bell et al.'s tables: k = 72, t = 24 for 1,000 clients); semi_malicious may lie about who dropped out, "
            "which needs t > k/2 (k = 398, t = 223 there)"
        ),
    )

    @field_validator("neighbors", mode="before")
    @classmethod
    def _auto_int_or_null(cls, v: Any) -> Any:
        if v is None or v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 2):
            return v
        raise ValueError(f"expected an even integer >= 2, 'auto' or null, got {SHORT.repr(v)}")

    @model_validator(mode="after")
    def _even_k(self) -> "SecAggConfig":
        if isinstance(self.neighbors, int) and self.neighbors % 2:
            raise ValueError(f"neighbors: must be even (a k-regular Harary graph), got {self.neighbors}")
        return self
