"""Checkpoints: written to a temporary file and renamed, so a crash or Ctrl-C mid-write leaves the
previous checkpoint intact; a checkpoint carries everything a resumed run needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
MODEL_CARD_FORMAT = "fedmeta-model-card/1"


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
    server_state: dict = field(default_factory=dict)   # the server rule's state (adaptive optimizers)
    faults: dict = field(default_factory=dict)         # actor losses survived so far (sim/faults.py)


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


def load_model(path: Path) -> tuple[torch.nn.Module, dict]:
    """The global model of a checkpoint (a run directory or its checkpoint.pt), rebuilt from its
    model card alone, with its weights loaded; and the card. No experiment config needed."""
    from sim.config import ModelConfig
    from sim.models import build_model, param_shapes, unflatten

    path = Path(path)
    ck = load(path.parent if path.name == CHECKPOINT else path)
    card = ck.model_card
    if card.get("format") != MODEL_CARD_FORMAT:
        raise ValueError(f"{path}: checkpoint has no {MODEL_CARD_FORMAT} model card (written by an older fedmeta?)")
    schema = card["data_schema"]
    model = build_model(ModelConfig(**card["model"]["config"]), tuple(schema["input_shape"]), schema["num_classes"])
    flat = torch.as_tensor(ck.global_params, dtype=torch.float32)
    if flat.numel() != card["model"]["n_params"]:
        raise ValueError(f"{path}: {flat.numel()} parameters, the model card says {card['model']['n_params']}")
    model.load_state_dict(unflatten(flat, param_shapes(model)))
    return model.eval(), card


def save_member(run_dir: Path, model_config: dict, global_params: np.ndarray, input_shape: list[int],
                num_classes: int, input_profile: dict, quality: dict | None = None, **card_extra) -> Path:
    """A checkpoint holding only a model and its card (no training history): how a specialized
    member (e.g. one per group of similar individuals or per data regime) is handed to serving."""
    card = {"format": MODEL_CARD_FORMAT, "supports_federated_meta_learning": True,
            "model": {"config": model_config, "n_params": int(np.asarray(global_params).size)},
            "data_schema": {"input_shape": list(input_shape), "num_classes": int(num_classes), "dtype": "float32"},
            "input_profile": input_profile, "quality": quality or {}, **card_extra}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return save(run_dir, Checkpoint(round=0, global_params=np.asarray(global_params, np.float32), model_card=card))
