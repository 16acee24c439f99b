"""Checkpoints: atomic writes, and models rebuilt from the model card alone."""
import numpy as np
import pytest

from sim import checkpoint as ckpt


def test_load_model_needs_a_model_card(tmp_path):
    ckpt.save(tmp_path, ckpt.Checkpoint(round=1, global_params=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="no fedmeta-model-card/1 model card"):
        ckpt.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        ckpt.load_model(tmp_path / "elsewhere")


def test_load_model_checks_the_parameter_count(tmp_path):
    card = {"format": ckpt.MODEL_CARD_FORMAT, "model": {"config": {"kind": "mlp", "hidden": [4]}, "n_params": 99},
            "data_schema": {"input_shape": [2], "num_classes": 3}}
    ckpt.save(tmp_path, ckpt.Checkpoint(round=1, global_params=np.zeros(27, np.float32), model_card=card))
    with pytest.raises(ValueError, match="27 parameters, the model card says 99"):
        ckpt.load_model(tmp_path / ckpt.CHECKPOINT)
    card["model"]["n_params"] = 27       # 2*4 + 4 + 4*3 + 3
    ckpt.save(tmp_path, ckpt.Checkpoint(round=1, global_params=np.arange(27, dtype=np.float32), model_card=card))
    model, loaded = ckpt.load_model(tmp_path)
    assert loaded == card and float(model[1].bias[0]) == 8.0
