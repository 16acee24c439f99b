"""Ray Tune over the federation: a small search end to end on local Ray (2 CPUs)."""
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from sim.cli import app
from sim.config import ConfigError, from_dict
from sim.tune import apply_params, search_space
from tests.conftest import tiny_raw


def test_apply_params_and_space():
    raw = tiny_raw()
    out = apply_params(raw, {"algorithm.lr": 0.3, "algorithm.local_epochs": np.int64(4)})
    assert out["algorithm"]["lr"] == 0.3 and out["algorithm"]["local_epochs"] == 4 and raw["algorithm"]["lr"] == 0.1
    cfg = from_dict(out)
    assert set(search_space(cfg.tune.params)) == {"algorithm.lr", "algorithm.local_epochs", "eval.finetune_lr"}
    with pytest.raises(ConfigError, match="tune.params.0.key: 'algorithm.nope' is not a numeric key"):
        from_dict(tiny_raw(tune={"params": [{"key": "algorithm.nope", "low": 0.1, "high": 1.0}]}))
    with pytest.raises(ConfigError, match="tune.params.0.low: a log-scale range needs low > 0"):
        from_dict(tiny_raw(tune={"params": [{"key": "algorithm.lr", "low": 0.0, "high": 1.0, "log": True}]}))


@pytest.mark.slow
def test_tune_search_end_to_end(ray_session, tmp_path):
    """Optuna TPE + ASHA on a tiny federation, continued from a run's checkpoint; the candidate
    is a servable member and the experiment restores with Tuner.restore."""
    from ray import tune

    from sim.checkpoint import load_model
    from sim.experiment import run_experiment

    run_dir, _ = run_experiment(from_dict(tiny_raw(tmp_path, federation={"rounds": 2})))
    yaml_path = tmp_path / "t.yaml"
    raw = tiny_raw(tmp_path, tune={"num_samples": 3, "max_concurrent": 2, "rounds_per_trial": 2, "grace_period": 1},
                   ray={"num_workers": 1, "num_cpus_per_worker": 0.5})
    import yaml

    yaml_path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["tune", str(yaml_path), "--start", str(run_dir), "--json", "--name", "t1"])
    assert res.exit_code == 0, res.output
    # Ray forwards the trials' own log lines ("(federation_trial pid=...) ..."): not the CLI's output
    lines = [line for line in res.stdout.strip().splitlines() if not re.match(r"^(\x1b\[[0-9;]*m)?\(", line)]
    out = json.loads(lines[-2])
    assert out["trials"] == 3 and 0 <= out["best_metric"] <= 1
    assert set(out["best_config"]) == {"algorithm.lr", "algorithm.local_epochs", "eval.finetune_lr"}
    model, card = load_model(lines[-1])
    assert card["tuned"] == out["best_config"] and card["data_schema"]["input_shape"] == [1, 8, 8]
    from sim.tune import make_trainable

    restored = tune.Tuner.restore(out["experiment"], trainable=make_trainable(from_dict(raw), str(run_dir), 2))
    assert len(restored.get_results()) == 3
