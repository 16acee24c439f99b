"""The privacy weight lambda, learned in the outer loop (the meta-reinforced-privacy note, §3.3-4).

An evaluated individual's personalized model v minimizes its loss plus lambda/2 ||v - w||^2 around
the global model w (Ditto's personal objective; plain fine-tuning at lambda = 0). The pull bounds
how far v moves to fit the individual's own examples, which is what the loss-threshold membership
attack reads (Yeom et al. 2018). Instead of fixing lambda, the run treats it as the Lagrange
multiplier of the constraint "leakage <= target" and learns it by projected dual ascent between
rounds (Boyd & Vandenberghe 2004, §5.5; the integral term of Stooke, Achiam & Abbeel 2020, "Responsive
Safety in RL by PID Lagrangian Methods"):

    lambda <- clip(lambda + step * (leakage - target_auc), 0, max_weight)

so lambda grows while the models leak more than the target and shrinks (giving accuracy back) while
they leak less. `leakage` is a private release: the evaluation panel's mean of each individual's
own AUC (its train examples against its test examples under its personalized model), summed over
the panel with Gaussian noise of std z (an individual adds at most 1) and, under secure
aggregation, masked per individual. Each release is composed with the run's rounds in its
accountant, so the run's epsilon includes the controller. lambda is logged (`privacy_weight`) at
each update, and a resumed run continues from the last logged value.
"""

from __future__ import annotations

import math

from fedmeta.sim.algorithms import build_algorithm
from fedmeta.sim.engine.federation import Federation, RoundResult
from fedmeta.sim.run.hooks import Hook
from fedmeta.sim.run.run_state import RunState


def dual_ascent(weight: float, leakage: float, target: float, step: float, max_weight: float) -> float:
    """One projected dual-ascent step of the privacy weight on the constraint leakage <= target."""
    if not math.isfinite(leakage):
        return weight  # nobody in the panel had test data: nothing learned
    return min(max(weight + step * (leakage - target), 0.0), max_weight)


class LeakageControl(Hook):
    """Every `privacy.leakage_control.every` rounds (default `eval.every`) and after the last: release
    the panel's leakage at the current lambda, account it, take a dual-ascent step. It runs before the
    evaluation hook, which then personalizes with the new lambda."""

    def __init__(self, fed: Federation, state: RunState):
        self.fed = fed
        self.cfg = fed.cfg.privacy.leakage_control
        self.every = self.cfg.every or fed.cfg.eval.every
        if state.privacy_weight is None:  # a resumed run continues from its log
            logged = state.log.last("privacy_weight")
            state.privacy_weight = (
                build_algorithm(fed.cfg.algorithm).privacy_weight if logged is None else logged
            )
        self.state, self.skipped = state, None

    def after_round(self, state: RunState, res: RoundResult) -> None:
        done, rounds = state.rounds_done, self.fed.cfg.federation.rounds
        if done % self.every and done != rounds:
            return
        z = self.cfg.noise_multiplier or self.fed.plan.dp.metric_noise  # an individual adds at most 1
        self.skipped = state.accounting.release_stop(z)
        if self.skipped:  # the budget has no room for it: lambda stays
            return
        released = self.fed.private_metric(done, state.global_params, "leakage", state.privacy_weight, z)
        state.accounting.record_release(z)
        leakage = released["mia_auc_DI"] if released["count"] else math.nan
        state.privacy_weight = dual_ascent(
            state.privacy_weight, leakage, self.cfg.target_auc, self.cfg.step, self.cfg.max_weight
        )
        state.log.add_many(
            done, {"leakage_released": released["mia_auc_DI"], "privacy_weight": state.privacy_weight}
        )
        state.shown["privacy_weight"] = state.privacy_weight

    def summary(self) -> dict:
        releases = sum(r["metric"] == "leakage_released" for r in self.state.log.rows)
        return {
            "leakage_control": {
                "target_auc": self.cfg.target_auc,
                "privacy_weight": self.state.privacy_weight,
                "releases": releases,
                "stopped": self.skipped,
            }
        }
