"""The `tune` section: hyperparameter search with Ray Tune, and tuning on a drift alarm.

`TuneConfig` is the searcher (Optuna TPE/GP/NSGA-II or random), ASHA's early stopping, the
searched ranges (`TuneParam`, dotted keys of this config) and, for a multi-objective search, the
objectives (`TuneObjective`, of `TUNE_OBJECTIVES`); `auto` and the detector settings make
`fedmeta run` tune itself when the inference inputs drift.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedmeta.sim.config.base import Section


class TuneParam(Section):
    """One searched hyperparameter: a dotted key of this config and its range."""

    key: str = Field(
        description="e.g. algorithm.lr, algorithm.local_epochs, privacy.clip_norm, algorithm.privacy_lambda, "
        "model.hidden.0 (a list entry by its index)"
    )
    low: float
    high: float
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _range(self) -> "TuneParam":
        if not self.low < self.high:
            raise ValueError(f"high: must be above low ({self.low}), got {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"low: a log-scale range needs low > 0, got {self.low}")
        return self


# What a trial can be judged on: the private panel accuracies (higher is better), the trial model's
# inference time per batch in ms, its membership-inference AUC (the audit's leakage) and the epsilon
# its own rounds and metric releases spent (lower is better).
TUNE_OBJECTIVES = {
    "acc_personalized_DI": "max",
    "acc_global_DI": "max",
    "latency_ms": "min",
    "mia_auc": "min",
    "epsilon": "min",
}


class TuneObjective(Section):
    """One objective of a multi-objective search."""

    metric: Literal["acc_personalized_DI", "acc_global_DI", "latency_ms", "mia_auc", "epsilon"]
    mode: Literal["max", "min"] | None = Field(
        None, description="null: max for the accuracies, min for the others"
    )

    @property
    def direction(self) -> str:
        return self.mode or TUNE_OBJECTIVES[self.metric]


def _default_tune_params() -> list[TuneParam]:
    return [
        TuneParam(key="algorithm.lr", low=0.01, high=0.5, log=True),
        TuneParam(key="algorithm.local_epochs", low=1, high=10, integer=True),
        TuneParam(key="eval.finetune_lr", low=0.005, high=0.3, log=True),
    ]


class TuneConfig(Section):
    """`fedmeta tune`: Bayesian (Optuna TPE) or random search over the federation's hyperparameters."""

    num_samples: int = Field(8, ge=1, description="trials")
    max_concurrent: int = Field(2, ge=1, description="trials at once (each runs its own actor pool)")
    rounds_per_trial: int = Field(10, ge=1)
    report_every: int = Field(
        1,
        ge=1,
        description="a trial reports its panel metrics every this many rounds and after "
        "its last (ASHA sees only these); under DP each report is a "
        "release that spends budget",
    )
    searcher: Literal["optuna", "random"] = "optuna"
    metric: Literal["acc_personalized_DI", "acc_global_DI"] = "acc_personalized_DI"
    objectives: list[TuneObjective] = Field(
        default_factory=list,
        description="two or more: a multi-objective search (Optuna's multi-objective sampler "
        "through Tune's OptunaSearch, no early stopping) whose result is the Pareto "
        "front; empty: maximize `metric`",
    )
    sampler: Literal["tpe", "gp", "nsga2"] = Field(
        "tpe",
        description="optuna: the sampler: tpe, gp (Gaussian-process BO) or nsga2 (only with objectives)",
    )
    startup_trials: int = Field(
        3,
        ge=1,
        description="optuna tpe/gp: random trials before the model proposes (Optuna's "
        "default 10 would leave a short search random)",
    )
    ei_candidates: int = Field(
        24,
        ge=1,
        description="optuna tpe: candidates drawn from the good trials' density per "
        "proposal, of which the best density ratio runs (Optuna's default "
        "24; more follows the model harder, which pays in a short search)",
    )
    warm_start: bool = Field(
        True,
        description="optuna: the first trial runs the config's own values (e.g. the "
        "pre-drift hyperparameters), clipped into the ranges",
    )
    latency_batch: int = Field(64, ge=1, description="objective latency_ms: inputs per timed inference batch")
    grace_period: int = Field(3, ge=1, description="ASHA: rounds before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2)
    params: list[TuneParam] = Field(default_factory=_default_tune_params, min_length=1)
    auto: bool = Field(
        False, description="fedmeta run: watch the individuals' inference inputs and tune on a drift alarm"
    )
    reference_rounds: int = Field(
        3, ge=1, description="auto: rounds of inputs the drift detector is calibrated on"
    )
    watch_individuals: int = Field(
        20, ge=1, description="auto: individuals whose test inputs form each round's stream"
    )
    false_alarm_rate: float = Field(
        0.01, gt=0, lt=1, description="auto: detector calibration target per batch"
    )

    @model_validator(mode="after")
    def _objectives(self) -> "TuneConfig":
        names = [o.metric for o in self.objectives]
        if len(self.objectives) == 1:
            raise ValueError(
                "objectives: give two or more for a multi-objective search, or none and set `metric`"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: each metric once, got {names}")
        if self.sampler == "nsga2" and not self.objectives:
            raise ValueError("sampler: nsga2 is a multi-objective sampler; give objectives, or use tpe")
        return self
