"""The state of a run between rounds: what a checkpoint holds, as one explicit object."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedmeta.actors.privacy import RunAccounting
from fedmeta.sim import checkpoint as ckpt
from fedmeta.sim.metrics import MetricsLog


@dataclass
class RunState:
    rounds_done: int
    global_params: np.ndarray  # the model after the last *completed* round
    accounting: RunAccounting
    log: MetricsLog = field(default_factory=MetricsLog)
    train_clients: int = 0  # clients trained so far (for throughput)
    train_seconds: float = 0.0  # wall time spent in training rounds so far
    dropouts: int = 0
    server_state: dict = field(default_factory=dict)  # the server rule's, as of the last save
    faults: dict = field(default_factory=dict)  # actor losses survived so far (sim/engine/faults.py)
    stopped: str | None = None  # why the run stopped before its last round
    privacy_weight: float | None = None  # the personalization's lambda, when adapted (sim/run/leakage.py)
    card_stats: dict | None = None  # under DP, the model card's released statistics (sim/run/card_stats.py)
    shown: dict = field(default_factory=dict)  # the latest figures, for the progress bar

    @classmethod
    def resume(cls, ck: ckpt.Checkpoint, accounting: RunAccounting) -> RunState:
        accounting.load_state_dict(
            {"accountant": ck.accountant, "local_dp": ck.local_dp, "participation": ck.participation}
        )
        return cls(
            ck.round,
            ck.global_params,
            accounting,
            MetricsLog(ck.metrics_rows, ck.individuals_rows),
            ck.train_clients,
            ck.train_seconds,
            ck.dropouts,
            ck.server_state,
            faults=dict(ck.faults),
        )

    def advance(self, global_params: np.ndarray, clients: int, seconds: float, dropped: int) -> None:
        """A round completed: the model advances only on success."""
        self.global_params, self.rounds_done = global_params, self.rounds_done + 1
        self.train_clients += clients
        self.train_seconds += seconds
        self.dropouts += dropped

    def to_checkpoint(self, model_card: dict) -> ckpt.Checkpoint:
        spent = self.accounting.state_dict()
        return ckpt.Checkpoint(
            self.rounds_done,
            self.global_params,
            self.log.rows,
            self.log.individuals,
            self.train_clients,
            self.train_seconds,
            self.dropouts,
            model_card,
            spent["accountant"],
            spent["local_dp"],
            self.server_state,
            dict(self.faults),
            spent["participation"],
        )
