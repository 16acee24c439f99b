"""Checkpoints: written to a temporary file and renamed, so a crash or Ctrl-C mid-write leaves the
previous checkpoint intact; a checkpoint carries everything a resumed run needs.

On disk: a magic line, the SHA-256 of the body, and the body, a `torch.save` of plain containers
and tensors (numpy arrays are stored as tensors and given back as arrays). Loading checks the
digest (a truncated or altered file is refused, never half-read) and unpickles with
`weights_only=True`, so a checkpoint cannot run code, whoever wrote it."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedmeta.sim.artifacts.durable import replace_durably
from fedmeta.sim.config import ConfigError

CHECKPOINT = "checkpoint.pt"
MAGIC = b"fedmeta-checkpoint/2\n"
MODEL_CARD_FORMAT = "fedmeta-model-card/1"


@dataclass
class Checkpoint:
    round: int  # rounds completed
    global_params: np.ndarray  # (n_params,) float32
    metrics_rows: list[dict] = field(default_factory=list)
    individuals_rows: list[dict] = field(default_factory=list)
    train_clients: int = 0  # clients trained so far (for throughput)
    train_seconds: float = 0.0  # wall time spent in training rounds so far
    dropouts: int = 0
    model_card: dict = field(default_factory=dict)
    accountant: dict | None = None  # PrivacyAccountant.state_dict(): the privacy spent so far
    local_dp: dict | None = None  # LocalDPLedger.state_dict(): clients' local DP-SGD steps
    server_state: dict = field(default_factory=dict)  # the server rule's state (adaptive optimizers)
    faults: dict = field(default_factory=dict)  # actor losses survived so far (sim/engine/faults.py)
    participation: dict | None = None  # KnownParticipation.state_dict(): what the aggregator learned per user


class CheckpointError(ConfigError):
    """A checkpoint that cannot be trusted: truncated, altered, or not a fedmeta checkpoint (a bad
    input like a bad config: the CLI prints its one line and exits 2)."""


_ARRAY = "__ndarray__"


def _plain(obj):
    """numpy arrays/scalars as tensors/Python numbers: what `weights_only` loading accepts."""
    if isinstance(obj, np.ndarray):
        return {
            _ARRAY: torch.from_numpy(np.array(obj, order="C", copy=True))
        }  # a copy: never shares or needs a writable buffer
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _restore(obj):
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY}:
            return obj[_ARRAY].numpy()
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_restore(v) for v in obj)
    return obj


def save(run_dir: Path, ck: Checkpoint) -> Path:
    path = run_dir / CHECKPOINT
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    state = _plain({**ck.__dict__, "global_params": np.asarray(ck.global_params, dtype=np.float32)})
    buf = io.BytesIO()
    torch.save(state, buf)
    body = buf.getvalue()
    with open(tmp, "wb") as f:
        f.write(MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
        f.flush()
        os.fsync(f.fileno())  # the rename below must not point at unwritten blocks after a crash
    replace_durably(tmp, path)  # and the rename itself must survive it
    return path


def _body(path: Path) -> bytes:
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        if data.startswith(b"PK"):  # a zip: torch.save of a fedmeta older than the digest
            raise CheckpointError(
                f"{path}: written by an older fedmeta (no digest); re-run to resume or serve it"
            )
        raise CheckpointError(f"{path}: not a fedmeta checkpoint")
    digest, _, body = data[len(MAGIC) :].partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise CheckpointError(
            f"{path}: damaged (its SHA-256 does not match: truncated or altered after writing)"
        )
    return body


def load(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT} to resume from")
    try:
        raw = torch.load(io.BytesIO(_body(path)), weights_only=True)
        raw = _restore(raw)
        return Checkpoint(**raw)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, TypeError, KeyError) as e:
        # the digest matched, so the writer put this there: refuse what weights_only will not load
        raise CheckpointError(f"{path}: not loadable as a fedmeta checkpoint ({type(e).__name__})") from None


def load_model(path: Path, trust_code: bool = False) -> tuple[torch.nn.Module, dict]:
    """The global model of a checkpoint (a run directory or its checkpoint.pt), rebuilt from its
    model card alone, with its weights loaded; and the card. No experiment config needed. The card
    is data: its fields are type-checked before use, and a custom model it names (code to import
    and call) is refused unless `trust_code` (`--trust-code`; sim/artifacts/usercode.py)."""
    from fedmeta.sim.artifacts.usercode import named_code, refuse_code
    from fedmeta.sim.config import ModelConfig
    from fedmeta.sim.models import build_model, param_shapes, unflatten

    path = Path(path)
    ck = load(path.parent if path.name == CHECKPOINT else path)
    card = ck.model_card
    if not isinstance(card, dict) or card.get("format") != MODEL_CARD_FORMAT:
        raise ValueError(
            f"{path}: checkpoint has no {MODEL_CARD_FORMAT} model card (written by an older fedmeta?)"
        )
    try:
        schema, model_card = _card_field(card, "data_schema", dict), _card_field(card, "model", dict)
        shape = _card_field(schema, "input_shape", list, "data_schema.")
        if not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20 for d in shape
        ):
            raise ValueError(f"data_schema.input_shape: expected a list of positive ints, got {shape!r}")
        classes = _card_field(schema, "num_classes", int, "data_schema.")
        _card_field(model_card, "n_params", int, "model.")
        config = ModelConfig(**_card_field(model_card, "config", dict, "model."))
        refuse_code(named_code(config.kind, config.target), f"{path}: model card", trust_code)
        model = build_model(config, tuple(shape), classes)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: its model card does not describe a model ({first})") from None
    flat = torch.as_tensor(ck.global_params, dtype=torch.float32)
    if flat.numel() != card["model"]["n_params"]:
        raise ValueError(
            f"{path}: {flat.numel()} parameters, the model card says {card['model']['n_params']}"
        )
    model.load_state_dict(unflatten(flat, param_shapes(model)))
    return model.eval(), card


def _card_field(node: dict, key: str, kind: type, prefix: str = ""):
    """A model card's field, checked to be a `kind` before anything uses it."""
    if key not in node:
        raise KeyError(f"{prefix}{key}: missing")
    value = node[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise TypeError(f"{prefix}{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def save_member(
    run_dir: Path,
    model_config: dict,
    global_params: np.ndarray,
    input_shape: list[int],
    num_classes: int,
    input_profile: dict,
    quality: dict | None = None,
    **card_extra,
) -> Path:
    """A checkpoint holding only a model and its card (no training history): how a specialized
    member (e.g. one per group of similar individuals or per data regime) is handed to serving."""
    card = {
        "format": MODEL_CARD_FORMAT,
        "supports_federated_meta_learning": True,
        "model": {"config": model_config, "n_params": int(np.asarray(global_params).size)},
        "data_schema": {
            "input_shape": list(input_shape),
            "num_classes": int(num_classes),
            "dtype": "float32",
        },
        "input_profile": input_profile,
        "quality": quality or {},
        **card_extra,
    }
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return save(
        run_dir, Checkpoint(round=0, global_params=np.asarray(global_params, np.float32), model_card=card)
    )
