"""Run directories: a fresh one per run, and the config a finished or interrupted run was started with."""
from __future__ import annotations

import time
from pathlib import Path

from sim.config import ConfigError, ExperimentConfig, from_dict


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


def resume_config(run_dir: Path) -> ExperimentConfig:
    """The config a run was started with (its run dir's config.yaml)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return from_dict(yaml.safe_load(path.read_text()), source=str(path))
