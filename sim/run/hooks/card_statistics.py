"""The model card's released statistics about users (sim/run/card_stats.py), made once."""

from __future__ import annotations

from fedmeta.sim.engine.federation import Federation, RoundResult
from fedmeta.sim.run.card_stats import release_card_statistics
from fedmeta.sim.run.hooks.base import Hook
from fedmeta.sim.run.run_state import RunState


class CardStatistics(Hook):
    """Under DP, after the last round: release the model card's input profile and panel quality
    once (sim/run/card_stats.py), each only if the budget has room, and account them, so the final
    checkpoint's card ships them and the run's epsilon includes them. Without DP the card ships
    the exact ones, marked not private."""

    def __init__(self, fed: Federation):
        self.fed = fed

    def after_round(self, state: RunState, res: RoundResult) -> None:
        fed, done = self.fed, state.rounds_done
        if not fed.plan.dp.enabled or done != fed.cfg.federation.rounds or state.card_stats is not None:
            return
        panel = lambda: fed.private_metric(done, state.global_params, "accuracy", state.privacy_weight)  # noqa: E731
        state.card_stats = release_card_statistics(
            fed.plan, state.accounting, fed.secrets.noise("card-input-profile"), panel, done
        )
