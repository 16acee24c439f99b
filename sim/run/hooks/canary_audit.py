"""The one-run privacy audit of the released model, from the canaries' scores."""

from __future__ import annotations

import numpy as np

from fedmeta.sim.data.canaries import canary_direction
from fedmeta.sim.engine.federation import Federation
from fedmeta.sim.run.hooks.base import Hook
from fedmeta.sim.run.run_state import RunState


class CanaryAudit(Hook):
    """The one-run privacy audit of the released model (Steinke, Nasr & Jagielski 2023; actors/audit.py):
    score every canary (sim/data/canaries.py) by what the model's total change holds of its
    direction, guess 'in' for the highest and 'out' for the lowest, and turn the correct guesses into
    an epsilon that holds as a lower bound with probability `privacy.audit_confidence`; with the
    attack's TPR at 1% FPR."""

    def __init__(self, fed: Federation, state: RunState):
        self.fed, self.state = fed, state

    def summary(self) -> dict:
        plan = self.fed.plan
        out = {
            "audit_canaries": len(plan.canary_ids),
            "audit_epsilon_lower": None,
            "audit_tpr_at_1pct_fpr": None,
        }
        if len(plan.canary_ids) < 2:
            return out
        from fedmeta.actors.audit import best_audit, tpr_at_fpr

        scores, inside = canary_scores(plan, self.state.global_params), plan.canary_included
        res = best_audit(
            scores,
            inside,
            delta=plan.dp.delta if plan.dp.enabled else 0.0,
            confidence=plan.cfg.privacy.audit_confidence,
        )
        tpr = tpr_at_fpr(scores[inside], scores[~inside], 0.01) if inside.any() and (~inside).any() else None
        return {
            **out,
            "audit_epsilon_lower": res["epsilon_lower"],
            "audit_tpr_at_1pct_fpr": tpr,
            "audit_confidence": plan.cfg.privacy.audit_confidence,
        }


def canary_scores(plan, global_params) -> np.ndarray:
    """Each canary's direction projected on the model's total change: what it added, plus noise."""
    change = np.asarray(global_params, dtype=np.float64) - plan.init_params
    return np.array(
        [float(change @ canary_direction(plan.cfg.seed, int(c), plan.n_params)) for c in plan.canary_ids]
    )
