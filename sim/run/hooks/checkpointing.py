"""Checkpoints every `run.checkpoint_every` rounds, with the model card and the log."""

from __future__ import annotations

from pathlib import Path

from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.engine.federation import Federation, RoundResult
from fedmeta.sim.run.hooks.base import Hook
from fedmeta.sim.run.report import model_card
from fedmeta.sim.run.run_state import RunState


class Checkpointing(Hook):
    """Every `run.checkpoint_every` rounds and after the last: checkpoint.pt (atomic) and the metric
    tables. `save` is also what the experiment calls when the run stops or fails."""

    def __init__(self, fed: Federation, run_dir: Path):
        self.fed, self.run_dir = fed, run_dir

    def after_round(self, state: RunState, res: RoundResult) -> None:
        done = state.rounds_done
        if done % self.fed.cfg.run.checkpoint_every == 0 or done == self.fed.cfg.federation.rounds:
            self.save(state)

    def save(self, state: RunState) -> None:
        try:
            state.server_state = self.fed.server_state()
        except Exception:  # saving after a failure: the aggregator may be gone; keep its last known state
            pass
        card = model_card(self.fed.plan, state.rounds_done, state.accounting, state.log, state.card_stats)
        ckpt.save(self.run_dir, state.to_checkpoint(card))
        state.log.save(self.run_dir)
