"""Checkpoints: atomic writes, models rebuilt from the model card alone, and damaged or hostile files
refused in one line without anything being overwritten."""

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.sim import checkpoint as ckpt


def test_load_model_needs_a_model_card(tmp_path):
    ckpt.save(tmp_path, ckpt.Checkpoint(round=1, global_params=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="no fedmeta-model-card/1 model card"):
        ckpt.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        ckpt.load_model(tmp_path / "elsewhere")


def test_load_model_checks_the_parameter_count(tmp_path):
    card = {
        "format": ckpt.MODEL_CARD_FORMAT,
        "model": {"config": {"kind": "mlp", "hidden": [4]}, "n_params": 99},
        "data_schema": {"input_shape": [2], "num_classes": 3},
    }
    ckpt.save(tmp_path, ckpt.Checkpoint(round=1, global_params=np.zeros(27, np.float32), model_card=card))
    with pytest.raises(ValueError, match="27 parameters, the model card says 99"):
        ckpt.load_model(tmp_path / ckpt.CHECKPOINT)
    card["model"]["n_params"] = 27  # 2*4 + 4 + 4*3 + 3
    ckpt.save(
        tmp_path, ckpt.Checkpoint(round=1, global_params=np.arange(27, dtype=np.float32), model_card=card)
    )
    model, loaded = ckpt.load_model(tmp_path)
    assert loaded == card and float(model[1].bias[0].detach()) == 8.0


# ---------------------------------------------------------------- damaged and hostile checkpoints
ROOT = Path(__file__).resolve().parents[2]


def _state():
    return ckpt.Checkpoint(
        round=4,
        global_params=np.arange(6, dtype=np.float32),
        metrics_rows=[{"round": 1, "acc": 0.5, "note": None}],
        server_state={"m": np.ones(3), "v": np.zeros(2, np.uint64), "t": np.int64(2)},
        accountant={"history": [(1.1, 0.01, 4)]},
    )


def test_round_trip_keeps_arrays_and_values(tmp_path):
    ckpt.save(tmp_path, _state())
    back = ckpt.load(tmp_path)
    assert (
        back.round == 4
        and back.metrics_rows == _state().metrics_rows
        and back.accountant == _state().accountant
    )
    np.testing.assert_array_equal(back.global_params, np.arange(6, dtype=np.float32))
    assert back.server_state["v"].dtype == np.uint64 and back.server_state["t"] == 2
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "foreign", "old_zip"])
def test_damaged_checkpoints_are_refused_in_one_line(tmp_path, damage):
    ckpt.save(tmp_path, _state())
    path = tmp_path / ckpt.CHECKPOINT
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        i = len(data) - 100
        path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        path.write_bytes(b"#!/bin/sh\necho hello\n")
    else:
        torch.save({"round": 1}, path)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(tmp_path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


class Payload:
    """What an attacker would pickle: unpickling it would call os.system."""

    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def test_a_checkpoint_never_unpickles_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    torch.save({"round": 1, "global_params": torch.zeros(2), "model_card": Payload()}, buf, pickle_protocol=2)
    body = buf.getvalue()  # a valid digest: the writer meant it, and it still must not run
    (tmp_path / ckpt.CHECKPOINT).write_bytes(
        ckpt.MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body
    )
    with pytest.raises(ckpt.CheckpointError, match="not loadable"):
        ckpt.load(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_cli_resume_report_and_serve_refuse_damaged_run_dirs(tmp_path):
    from fedmeta.sim.config import ExperimentConfig, to_yaml

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(ExperimentConfig()))
    ckpt.save(run, _state())
    data = (run / ckpt.CHECKPOINT).read_bytes()
    (run / ckpt.CHECKPOINT).write_bytes(data[:-7])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for args, expected in [
        (["run", "--resume", str(run), "--no-progress"], "damaged"),
        (["serve", str(run), "--port", "1"], "damaged"),
        (["report", str(run)], "no summary.json"),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "fedmeta", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, r.stderr[-2000:])
    (run / "summary.json").write_text('{"acc": 0.5')  # a summary cut short
    r = subprocess.run(
        [sys.executable, "-m", "fedmeta", "report", str(run)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "not valid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (run / "summary.json").unlink()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing was overwritten or added
    assert not (tmp_path / "runs").exists()
