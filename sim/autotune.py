"""`fedmeta run` with drift detection and auto-tuning (`tune.auto: true`).

After every round the driver takes the inference inputs of a fixed panel of individuals (their
test splits, as the data stands in that round: with `data.drift` they move at the drift round) and
feeds them to a drift monitor (sim/drift.py: an auto-encoder detector calibrated on the first
`reference_rounds` rounds to `false_alarm_rate`). On the first alarm the run checkpoints, Ray Tune
searches from that checkpoint (sim/tune.py), and the run continues under the best configuration.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sim.config import ExperimentConfig, from_dict
from sim.data import FederatedDataset
from sim.data.drift import DriftedDataset, data_for_round
from sim.drift import AutoencoderDetector, DriftMonitor
from sim.sampling import eval_individuals


class AutoTune:
    def __init__(self, cfg: ExperimentConfig, data: FederatedDataset, run_dir: Path):
        self.cfg, self.data, self.run_dir = cfg, data, run_dir
        self.drifted = DriftedDataset(cfg.data, cfg.seed, data) if cfg.data.drift.at_round is not None else None
        self.panel = eval_individuals(cfg.seed + 1, data.num_clients, cfg.tune.watch_individuals).tolist()
        self.reference: list[np.ndarray] = []
        self.monitor: DriftMonitor | None = None
        self.alarm_round: int | None = None
        self.result: dict | None = None

    def inputs(self, done: int) -> np.ndarray:
        """The panel's inference inputs after `done` rounds (their data as of the last trained round)."""
        data = data_for_round(self.cfg.data, self.data, self.drifted, done - 1)
        return torch.cat([c.x_test for c in data.clients(self.panel)]).flatten(1).numpy()

    def after_round(self, done: int, checkpoint, release) -> ExperimentConfig | None:
        """Watch this round's inputs; on the first alarm, tune and return the configuration to continue
        with (`release` frees the run's actors first, so the trials get the CPUs)."""
        if self.result is not None:
            return None
        rows = self.inputs(done)
        t = self.cfg.tune
        if self.monitor is None:
            self.reference.append(rows)
            if len(self.reference) >= t.reference_rounds:
                detector = AutoencoderDetector(seed=self.cfg.seed)
                detector.fit_calibrated(np.concatenate(self.reference), t.false_alarm_rate, min(64, len(rows)),
                                        np.random.default_rng(self.cfg.seed))
                self.monitor = DriftMonitor(detector)
            return None
        if not self.monitor.update(rows)["alarm"]:
            return None
        from sim.tune import apply_params, run_tune

        self.alarm_round = done
        checkpoint()
        release()
        base = self.cfg.model_dump(mode="json")
        base["tune"]["auto"] = False
        self.result = run_tune(from_dict(base), start=str(self.run_dir), start_round=done,
                               out_dir=self.run_dir / "tune", name=f"after-round-{done}")
        return from_dict(apply_params(self.cfg.model_dump(mode="json"), self.result["best_config"]))

    def summary(self) -> dict:
        return {"drift_alarm_round": self.alarm_round,
                "tuned_config": None if self.result is None else self.result["best_config"],
                "tune_experiment": None if self.result is None else self.result["experiment"]}
