"""Run directories: a fresh one per run, the config a finished or interrupted run was started with,
and the run's secret (run_secret.key), which only the driver reads."""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from sim.config import ConfigError, ExperimentConfig, from_dict, read_yaml
from sim.seeding import Secrets

SECRET_FILE = "run_secret.key"
PERSONALIZED = "personalized"     # personalized/<user id>.npy: what per-user serving loads (serve/app.py)


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
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return from_dict(read_yaml(path, "not a run directory (no config.yaml)"), source=str(path))


def run_secrets(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> Secrets:
    """The run's secret randomness. A new run draws a 32-byte secret from the OS and keeps it in
    run_secret.key (mode 0600, beside, never inside, the checkpoint that serving reads), so
    `--resume` continues the same secret streams. `run.seeded_secrets`: derived from the seed."""
    if cfg.run.seeded_secrets:
        return Secrets.seeded(cfg.seed)
    path = run_dir / SECRET_FILE
    if resume and path.is_file():
        key = path.read_bytes()
        if len(key) != 32:
            raise ConfigError(f"--resume: {path} is not a 32-byte run secret")
        return Secrets(key, cfg.seed)
    if resume:
        warnings.warn(f"{path} is missing: the resumed rounds draw a fresh run secret (their noise and masks "
                      "differ from an uninterrupted run's)", stacklevel=2)
    secrets = Secrets.fresh(cfg.seed)
    tmp = run_dir / f".{SECRET_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.key)
    tmp.replace(path)
    return secrets


def forget_personalized(run_dir: Path | None, cid: int) -> list[Path]:
    """Delete user `cid`'s exported personalized model (and a half-written copy): after consent is
    revoked nothing of theirs is left for per-user serving to load. Returns what was deleted."""
    if run_dir is None:
        return []
    folder = Path(run_dir) / PERSONALIZED
    gone = []
    for path in (folder / f"{int(cid)}.npy", folder / f".{int(cid)}.npy.tmp"):
        try:
            path.unlink()
            gone.append(path)
        except FileNotFoundError:
            pass
    return gone
