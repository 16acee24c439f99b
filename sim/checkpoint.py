"""Checkpoints: written to a temporary file and renamed, so a crash or Ctrl-C mid-write leaves the
previous checkpoint intact; a checkpoint carries everything a resumed run needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    round: int                       # rounds completed
    global_params: np.ndarray        # (n_params,) float32
    metrics_rows: list[dict] = field(default_factory=list)
    individuals_rows: list[dict] = field(default_factory=list)
    train_clients: int = 0           # clients trained so far (for throughput)
    train_seconds: float = 0.0       # wall time spent in training rounds so far
    dropouts: int = 0
    model_card: dict = field(default_factory=dict)
    accountant: dict | None = None   # PrivacyAccountant.state_dict(): the privacy spent so far
    local_dp: dict | None = None     # LocalDPLedger.state_dict(): clients' local DP-SGD steps


def save(run_dir: Path, ck: Checkpoint) -> Path:
    path = run_dir / CHECKPOINT
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    torch.save({**ck.__dict__, "global_params": torch.tensor(np.asarray(ck.global_params, dtype=np.float32))}, tmp)
    tmp.replace(path)
    return path


def load(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT} to resume from")
    raw = torch.load(path, weights_only=False)
    raw["global_params"] = raw["global_params"].numpy()
    return Checkpoint(**raw)
