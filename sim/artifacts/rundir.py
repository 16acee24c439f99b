"""Run directories: a fresh one per run, the config a finished or interrupted run was started with,
and the run's secret (run_secret.key, kept in the per-user state directory: sim/artifacts/statedir.py), which
only the driver reads."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from fedmeta.sim.artifacts.durable import write_atomic
from fedmeta.sim.artifacts.statedir import run_secrets_dir
from fedmeta.sim.artifacts.usercode import artifact_config
from fedmeta.sim.config import ConfigError, ExperimentConfig, from_dict, read_yaml
from fedmeta.sim.seeding import Secrets

SECRET_FILE = "run_secret.key"
PERSONALIZED = "personalized"  # personalized/<user id>.npy: what per-user serving loads (serve/members.py)


def new_run_dir(cfg: ExperimentConfig) -> Path:
    """A fresh run directory, 0700 (it holds the model, the per-user exports and logs)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700)
    path.chmod(0o700)  # whatever the umask
    return path


def resume_config(run_dir: Path, trust_code: bool = False) -> ExperimentConfig:
    """The config a run was started with (its run dir's config.yaml), read as data: a custom model
    or algorithm it names is refused unless `trust_code` (sim/artifacts/usercode.py)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = from_dict(read_yaml(path, "not a run directory (no config.yaml)"), source=str(path))
    return artifact_config(cfg, str(path), trust_code)


def run_secrets(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> Secrets:
    """The run's secret randomness. A new run draws a 32-byte secret from the OS and keeps it in
    the per-user state directory under the run's id (sim/artifacts/statedir.py: 0600, outside the run
    directory that users copy and ship), so `--resume` continues the same secret streams.
    `run.seeded_secrets`: derived from the seed."""
    if cfg.run.seeded_secrets:
        return Secrets.seeded(cfg.seed)
    legacy = run_dir / SECRET_FILE  # where runs before issue 27 kept it: moved out on resume
    folder = run_secrets_dir(run_dir, create=True)
    path = folder / SECRET_FILE
    if resume and legacy.is_file() and not path.exists():
        write_atomic(path, legacy.read_bytes(), 0o600)
        legacy.unlink()
    if resume and path.is_file():
        key = path.read_bytes()
        if len(key) != 32:
            raise ConfigError(f"--resume: {path} is not a 32-byte run secret")
        return Secrets(key, cfg.seed)
    if resume:
        warnings.warn(
            f"{path} is missing (the run's secret lives in the state directory of the machine that "
            f"started it: copy its folder {folder.name} there to this machine's {folder.parent}): the "
            "resumed rounds draw a fresh run secret (their noise and masks differ from an uninterrupted "
            "run's)",
            stacklevel=2,
        )
    secrets = Secrets.fresh(cfg.seed)
    write_atomic(path, secrets.key, 0o600)
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
