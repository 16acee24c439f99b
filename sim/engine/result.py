"""What one round (or FedBuff server step) of a federation returns to the round loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoundResult:
    global_params: np.ndarray
    clients: int
    dropped: int
    seconds: float
    metrics: dict
    trained: list[int] = field(default_factory=list)  # the clients whose updates went in
    faults: dict = field(default_factory=dict)  # the run's actor losses so far (FaultLog.counts)
