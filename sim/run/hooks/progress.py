"""The command line's progress bar."""

from __future__ import annotations

from fedmeta.sim.engine.federation import RoundResult
from fedmeta.sim.run.hooks.base import Hook, ProgressFn
from fedmeta.sim.run.run_state import RunState


class Progress(Hook):
    def __init__(self, progress: ProgressFn, rounds: int):
        self.progress, self.rounds = progress, rounds

    def after_round(self, state: RunState, res: RoundResult) -> None:
        self.progress(state.rounds_done, self.rounds, state.shown)
