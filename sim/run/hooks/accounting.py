"""The privacy the rounds release, accounted as they happen; a round that would overshoot the
budget is not started."""

from __future__ import annotations

from fedmeta.sim.engine.federation import RoundResult
from fedmeta.sim.run.hooks.base import Hook
from fedmeta.sim.run.run_state import RunState


class Accounting(Hook):
    """The privacy the round released: stop before a round that would overshoot the budget."""

    def before_round(self, state: RunState) -> str | None:
        return state.accounting.budget_stop()

    def after_round(self, state: RunState, res: RoundResult) -> None:
        state.accounting.record_round(res.metrics, res.trained)
