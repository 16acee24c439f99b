"""The closed loop between serving and the federation: drifted traffic -> alarm -> Tune -> shadow
candidate -> promotion or rejection.

`ClosedLoop.step()` takes the inputs the Serve app saw since the last step (from the Router), and
feeds them in batches to a drift monitor (sim/detectors.py). The first `reference_rows` inputs are the
reference: the detector is fitted and calibrated on them to the target false-alarm rate. On an
alarm it runs a Ray Tune search on the federation (sim/tuning/tune.py), continuing from the served run's
checkpoint, and deploys the best model as a shadow candidate; from then on the Router's sequential
test on labelled feedback decides, and each step pushes the routing state (promoting or rejecting
when the test has decided).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedmeta.serve.app import Deployment
from fedmeta.sim.config import ExperimentConfig
from fedmeta.sim.detectors import AutoencoderDetector, DriftMonitor


@dataclass
class ClosedLoop:
    deployment: Deployment
    cfg: ExperimentConfig  # the federation (with its tune: section) the trials continue
    start: str  # run directory whose checkpoint the trials continue from
    start_round: int = 0
    reference_rows: int = 512
    batch: int = 64
    false_alarm_rate: float = 0.01
    fraction: float = 1.0  # share of traffic the candidate shadows
    trial_options: dict = field(default_factory=lambda: {"max_pairs": 400})
    seed: int = 0
    events: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._reference: list[np.ndarray] = []
        self._pending = np.zeros((0, 0), np.float32)
        self.monitor: DriftMonitor | None = None
        self.tuned = 0

    def _calibrate(self, rows: np.ndarray) -> None:
        detector = AutoencoderDetector(seed=self.seed)
        detector.fit_calibrated(rows, self.false_alarm_rate, self.batch, np.random.default_rng(self.seed))
        self.monitor = DriftMonitor(detector)
        self.events.append({"event": "calibrated", "rows": len(rows), "threshold": float(detector.threshold)})

    def _batches(self, rows: np.ndarray) -> list[np.ndarray]:
        pending = np.concatenate([self._pending, rows]) if len(self._pending) else rows
        n = len(pending) // self.batch * self.batch
        self._pending = pending[n:]
        return [pending[i : i + self.batch] for i in range(0, n, self.batch)]

    def watch(self, rows: np.ndarray) -> bool:
        """Feed new inputs; True when the monitor raised an alarm on them."""
        if self.monitor is None:
            self._reference.append(rows)
            seen = np.concatenate(self._reference) if self._reference else rows
            if len(seen) >= self.reference_rows:
                self._calibrate(seen)
            return False
        alarm = False
        for b in self._batches(rows):
            res = self.monitor.update(b)
            alarm = alarm or bool(res["alarm"])
        return alarm

    def step(self) -> dict:
        """One pass: watch the new traffic, tune on an alarm (once per candidate), push routing."""
        rows = self.deployment.router().take_inputs.remote().result()
        if len(rows) and self.watch(rows) and not self.deployment.candidates:
            self.events.append({"event": "drift_alarm", "signal": float(self.monitor.signals[-1])})
            self._tune_and_shadow()
        routing = self.deployment.push()
        for e in routing["events"]:
            if e["event"] == "awaiting_promotion":  # the loop is the operator's own automation: it promotes
                routing = self.deployment.promote(e["member"])
                e = routing["events"][-1]
            if e["event"] in ("promoted", "rejected"):
                self.events.append(e)
        return routing

    def _tune_and_shadow(self) -> None:
        from fedmeta.sim.tuning.tune import run_tune

        self.tuned += 1
        name = f"tuned-{self.tuned}"
        summary = run_tune(self.cfg, start=self.start, start_round=self.start_round, name=name)
        self.deployment.add_candidate(
            name, summary["candidate"], "shadow", self.fraction, **self.trial_options
        )
        self.events.append(
            {
                "event": "candidate",
                "member": name,
                "best_config": summary["best_config"],
                "best_metric": summary["best_metric"],
            }
        )
