"""`fedmeta run` with drift detection and auto-tuning (`tune.auto: true`), as a hook of the round loop.

After every round the driver takes the inference inputs of a fixed panel of individuals (their
test splits, as the data stands in that round: with `data.drift` they move at the drift round) and
feeds them to a drift monitor (sim/detectors.py: an auto-encoder detector calibrated on the first
`reference_rounds` rounds to `false_alarm_rate`). On the first alarm, before the next round, the run
checkpoints, frees its actors, Ray Tune searches from that checkpoint (sim/tuning/tune.py), and the run
continues under the best configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedmeta.sim.config import from_dict
from fedmeta.sim.data.drift import data_for_round, drift_data
from fedmeta.sim.detectors import AutoencoderDetector, DriftMonitor
from fedmeta.sim.engine.federation import Federation, RoundResult
from fedmeta.sim.run import experiment
from fedmeta.sim.run.hooks import Hook
from fedmeta.sim.run.run_state import RunState
from fedmeta.sim.sampling import eval_individuals


class AutoTune(Hook):
    def __init__(self, fed: Federation, run_dir: Path, save: Callable[[RunState], None]):
        from fedmeta.sim.tuning.trial import check_fits

        check_fits(fed.cfg)  # before any round: a search this cluster can never place is an error now
        self.fed, self.run_dir, self.save = fed, run_dir, save
        cfg, data = fed.cfg, fed.plan.data
        self.cfg, self.data = cfg, data
        self.drifted = drift_data(cfg.data, cfg.seed, data, len(fed.plan.canary_ids))
        self.panel = eval_individuals(cfg.seed + 1, data.num_clients, cfg.tune.watch_individuals).tolist()
        self.reference: list[np.ndarray] = []
        self.monitor: DriftMonitor | None = None
        self.alarm_round: int | None = None
        self.state: RunState | None = None  # the run's, once an alarm calls for a search
        self.result: dict | None = None

    def inputs(self, rounds_done: int) -> np.ndarray:
        """The panel's inference inputs after `rounds_done` rounds (their data as of the last trained
        round; joiners only once they are in the federation)."""
        data = data_for_round(self.cfg.data, self.data, self.drifted, rounds_done - 1)
        absent = set(self.fed.plan.absent(rounds_done - 1).tolist())
        present = [c for c in self.panel if c not in absent]
        return torch.cat([c.x_test for c in data.clients(present)]).flatten(1).numpy()

    def after_round(self, state: RunState, res: RoundResult) -> None:
        """Watch this round's inputs; the first alarm calls for a search before the next round."""
        if (
            self.result is not None
            or self.alarm_round is not None
            or state.rounds_done >= self.cfg.federation.rounds
        ):
            return
        if self._alarm(state.rounds_done):
            self.alarm_round, self.state = state.rounds_done, state

    def before_round(self, state: RunState) -> None:
        """After an alarm: tune and continue under the best configuration. Here, not in
        `after_round`: a search takes minutes, and Ctrl-C or SIGTERM must stop it at once (the
        round's bookkeeping, where signals wait, is done by then)."""
        if self.alarm_round is not None and self.result is None:
            self.fed.restart(self._tune(state))

    def _alarm(self, rounds_done: int) -> bool:
        rows = self.inputs(rounds_done)
        t = self.cfg.tune
        if self.monitor is None:  # still calibrating on the first rounds' inputs
            self.reference.append(rows)
            if len(self.reference) >= t.reference_rounds:
                detector = AutoencoderDetector(seed=self.cfg.seed)
                detector.fit_calibrated(
                    np.concatenate(self.reference),
                    t.false_alarm_rate,
                    min(64, len(rows)),
                    np.random.default_rng(self.cfg.seed),
                )
                self.monitor = DriftMonitor(detector)
            return False
        return bool(self.monitor.update(rows)["alarm"])

    def _tune(self, state: RunState):
        """Checkpoint, free the actors (the trials get the CPUs), search from the checkpoint; the config to continue with."""
        # Ray Tune only when a drift calls for it
        from fedmeta.sim.tuning.trial import TuningBudgetSpent, apply_params
        from fedmeta.sim.tuning.tune import run_tune

        done = state.rounds_done
        self.save(state)
        self.fed.release()
        base = self.cfg.model_dump(mode="json")
        base["tune"]["auto"] = False
        try:
            self.result = run_tune(
                from_dict(base),
                start=str(self.run_dir),
                start_round=done,
                out_dir=self.run_dir / "tune",
                name=f"after-round-{done}",
            )
        except TuningBudgetSpent as e:  # the run goes on untuned; nothing was released
            self.result = {
                "best_config": None,
                "experiment": None,
                "epsilon_tuning": 0.0,
                "privacy_state": None,
                "skipped": str(e),
            }
            return self.cfg
        if self.result["privacy_state"] is not None:  # the trials spent budget on the same users
            state.accounting.load_state_dict({"accountant": self.result["privacy_state"]})
        return from_dict(apply_params(self.cfg.model_dump(mode="json"), self.result["best_config"]))

    def summary(self) -> dict:
        skipped = self.result.get("skipped") if self.result is not None else None
        if self.result is None and self.state is not None and self.state.stopped:
            skipped = f"the run stopped before the search: {self.state.stopped}"
        return {
            "drift_alarm_round": self.alarm_round,
            "tuned_config": None if self.result is None else self.result["best_config"],
            "epsilon_tuning": None if self.result is None else self.result["epsilon_tuning"],
            "tune_skipped": skipped,
            "tune_experiment": None if self.result is None else self.result["experiment"],
        }


def run_experiment(
    cfg, run_dir: Path | None = None, resume: bool = False, progress=None
) -> tuple[Path, dict]:
    """An experiment (sim/run/experiment.py), with the auto-tuning hook when `tune.auto` is on: the
    entry point of `fedmeta run` and `fedmeta.run`, which sit above tuning."""
    return experiment.run_experiment(
        cfg,
        run_dir=run_dir,
        resume=resume,
        progress=progress,
        extra_hooks=(AutoTune,) if cfg.tune.auto else (),
    )
