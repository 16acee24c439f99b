"""The interface of a round-loop hook (sim/run/experiment.py calls them in order)."""

from __future__ import annotations

from typing import Callable

from fedmeta.sim.engine.result import RoundResult
from fedmeta.sim.run.run_state import RunState

ProgressFn = Callable[[int, int, dict], None]


class Hook:
    """A job around the rounds of a run. The base does nothing; a hook overrides what it needs.
    Hooks run in the order of the experiment's list (sim/run/experiment.py), and share the run's
    state; a hook of your own subclasses this one and is passed in `run_experiment(extra_hooks=)`."""

    def before_round(self, state: RunState) -> str | None:
        """Before each round: a reason to stop the run (the round is not trained), or None."""
        return None

    def after_round(self, state: RunState, res: RoundResult) -> str | None:
        """After each round (its result already in `state`): a reason to stop, or None."""
        return None

    def summary(self) -> dict:
        """Keys this hook adds to the run's summary.json, once, at the end."""
        return {}
